"""im2col / col2im for 2-D convolution: the CPU primitives the convolution engines are made of.

Layout: the column matrix is ``(C, kh, kw, N, oh, ow)``, i.e. ``(C*kh*kw, N*oh*ow)`` as a matrix,
so a whole batch (or a chunk of it) goes through ONE matrix multiply per group, and the rows of
group ``g`` (channels ``g*C/G .. (g+1)*C/G``) are one contiguous block. The input is read
channel-major (``(C, N, H, W)``, a transposed view), so im2col is one strided copy. col2im sums
``kh*kw`` strided slices into a padded image whose rows are split into ``stride`` column phases,
so each add runs over contiguous memory (strided arithmetic loses NumPy's vector loops).

On the CPU, a convolution's forward over wide maps builds the columns of a band of output rows
at a time (``im2col_rows``) so they are still in cache when the GEMM reads them, and col2im sums
a block of channels at a time for the same reason. With vertical stride 1 on narrow maps col2im
sums the kernel rows first, over whole planes, so only ``kw`` of its ``kh·kw`` adds move short
rows. A forward on narrow maps may instead build position-major columns
(``im2col_channels_last``, see there).

Which of these a convolution uses, and when, is decided once per shape by the engines in
``minicaffe.kernels.conv_engines``. On a GPU the engines call ``minicaffe.kernels.cuda_im2col``
instead (one CUDA kernel each, same layout): the strided copies and channel blocks here are shaped
for NumPy and would be hundreds of small launches there (they still compute the right thing on CuPy
arrays).

Scratch arrays come from the context's workspaces (one growing buffer per slot, device, dtype and
thread), so a net of many convolutions allocates its big column buffer once.

On the CPU the copies and col2im's channel blocks are split over the kernels' thread pool
(``core/threads.py``), by channel: each thread writes its own channels, with the same operations in
the same order as one thread would, so the result does not depend on the thread count.
"""
import numpy as np

from ..core import backend
from ..core import context as _context
from ..core import threads
from ..core.threads import parallel_copyto

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
COL = _context.Slot("col")                  # the column matrix: one buffer for every convolution of a net
IM2COL_PAD = _context.Slot("im2col_pad")    # the zero-padded input im2col reads
COL2IM_PAD = _context.Slot("col2im_pad")    # col2im's padded accumulator
_COL2IM_ROWS = _context.Slot("col2im_rows")  # col2im's sums over kernel rows (vertical stride 1)

# Channels of col2im's accumulator summed at once, in elements (1 MiB of float32: cache-sized).
COL2IM_BLOCK_ELEMENTS = 1 << 18

# col2im sums kernel rows first (``_rows_first``) with vertical stride 1 on output rows narrower
# than this; on wider rows NumPy's per-row cost is small already (VGG's 56: no change, measured).
COL2IM_ROWS_FIRST_MAX_WIDTH = 48


def workspace(xp, shape, dtype, slot):
    """A scratch array of ``shape`` from the buffer named ``slot`` (a string shared by every owner
    that names it, or a private ``context.Slot``), kept in the process's context
    (``Context.workspaces``, per thread).

    The contents are garbage, and only valid until the next request of the same slot: callers
    copy results out before returning.
    """
    return _context.current().workspaces.get(xp, shape, dtype, slot)


def clear_workspace():
    """Drop this thread's scratch buffers (e.g. before measuring memory)."""
    _context.current().workspaces.clear()


def conv_out_size(size, kernel, pad, stride, dilation):
    """Convolution output length: floor((size + 2 pad - extent) / stride) + 1."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


class ConvGeometry:
    """Kernel, stride, pad and dilation of a 2-D convolution over ``H x W`` inputs."""

    __slots__ = ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")

    def __init__(self, kh, kw, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1):
        self.kh, self.kw, self.sh, self.sw = int(kh), int(kw), int(sh), int(sw)
        self.ph, self.pw, self.dh, self.dw = int(ph), int(pw), int(dh), int(dw)

    @property
    def is_1x1(self):
        """im2col is a plain (transposing) copy: 1x1 kernel, stride 1, no padding."""
        return (self.kh == 1 and self.kw == 1 and self.sh == 1 and self.sw == 1
                and self.ph == 0 and self.pw == 0)

    def extent(self):
        return self.dh * (self.kh - 1) + 1, self.dw * (self.kw - 1) + 1

    def out_size(self, h, w):
        return (conv_out_size(h, self.kh, self.ph, self.sh, self.dh),
                conv_out_size(w, self.kw, self.pw, self.sw, self.dw))

    def __repr__(self):
        return (f"ConvGeometry(k={self.kh}x{self.kw}, s={self.sh}x{self.sw}, p={self.ph}x{self.pw}, "
                f"d={self.dh}x{self.dw})")


def _as_strided(xp, arr, shape, strides):
    return xp.lib.stride_tricks.as_strided(arr, shape=shape, strides=strides)


def column_phases(stride, pad, width):
    """How a padded row is split into ``stride`` phases: ``(r, w0, q0, count)`` per phase ``r``.

    Padded column ``q*stride + r`` goes to phase ``r``, position ``q``; real columns
    ``w0, w0 + stride, ...`` (``count`` of them) land at positions ``q0, q0 + 1, ...``.
    """
    out = []
    for r in range(stride):
        w0 = (r - pad) % stride
        out.append((r, w0, (w0 + pad) // stride, len(range(w0, width, stride))))
    return out


def phase_shape(stride, padded_width):
    """(stride, ceil(padded_width / stride)): the last two axes of a phase-layout row."""
    return stride, -(-padded_width // stride)


def padded_source(x, g):
    """(N, C, H, W) -> zero-padded (C, N, Hp, Wp), what im2col reads: a workspace, or a transposed
    view of ``x`` when there is no padding. Where ``phase_split_pays``, the padded rows split into
    their ``sw`` column phases instead: (C, N, Hp, sw, ceil(Wp / sw)) (``phase_source``)."""
    if phase_split_pays(g):
        return phase_source(x, g)
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    xt = x.transpose(1, 0, 2, 3)
    if g.ph == 0 and g.pw == 0:
        return xt
    src = workspace(xp, (c, n, h + 2 * g.ph, w + 2 * g.pw), x.dtype, IM2COL_PAD)
    # only the border needs zeros: the interior is overwritten right after
    src[:, :, :g.ph] = 0
    src[:, :, g.ph + h:] = 0
    src[:, :, g.ph:g.ph + h, :g.pw] = 0
    src[:, :, g.ph:g.ph + h, g.pw + w:] = 0
    parallel_copyto(src[:, :, g.ph:g.ph + h, g.pw:g.pw + w], xt)
    return src


# im2col reads a phase-split source (``phase_source``) when a window covers at least this many
# times the input positions that one output position advances over (kh·kw >= this · sh·sw) and
# the kernel is undilated horizontally: the columns are then much larger than the input, and
# copying them from contiguous rows pays for the extra pass that splits the input. Measured, one
# thread (interleaved, medians): im2col of GoogLeNet's conv1 7x7/2 (12.25) 0.57-0.64x at batch 4,
# 0.58x at batch 16, CaffeNet's conv1 11x11/4 (7.6) 0.41-0.70x at batch 32, split included; whole
# layer at batch 4 / 32: forward (bands) 0.88-0.92x / 0.99x, weight gradient 0.88-0.95x / 0.90x.
# 3x3/2 (2.25): 1.08-1.38x slower, so not there.
PHASE_SPLIT_MIN_EXPANSION = 6


def phase_split_pays(g):
    """Horizontally strided, undilated, and kh·kw >= PHASE_SPLIT_MIN_EXPANSION · sh·sw."""
    return g.sw > 1 and g.dw == 1 and g.kh * g.kw >= PHASE_SPLIT_MIN_EXPANSION * g.sh * g.sw


def phase_source(x, g):
    """(N, C, H, W) -> zero-padded (C, N, Hp, sw, Wq) in a workspace, ``Wq = ceil(Wp / sw)``:
    padded column ``q·sw + r`` at ``[..., r, q]``, so the columns a strided window row reads from
    one phase are contiguous (im2col copies runs of ``ow`` values instead of gathering every
    ``sw``-th one)."""
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    sw, wq = phase_shape(g.sw, w + 2 * g.pw)
    src = workspace(xp, (c, n, h + 2 * g.ph, sw, wq), x.dtype, IM2COL_PAD)
    src.fill(0)
    xt = x.transpose(1, 0, 2, 3)
    for r, w0, q0, cnt in column_phases(g.sw, g.pw, w):
        if cnt:
            parallel_copyto(src[:, :, g.ph:g.ph + h, r, q0:q0 + cnt], xt[:, :, :, w0::g.sw])
    return src


def im2col_rows(src, geom, out_hw, y0, y1, out=None):
    """Columns of output rows ``y0:y1`` only, from ``padded_source``: (C, kh, kw, N, y1-y0, ow).

    A band of rows keeps the column matrix small enough to stay in cache between the copy that
    writes it and the GEMM that reads it."""
    xp = backend.get_array_module(src)
    c, n = src.shape[:2]
    g = geom
    ow = out_hw[1]
    shape = (c, g.kh, g.kw, n, y1 - y0, ow)
    if out is None:
        out = workspace(xp, shape, src.dtype, COL)
    if src.ndim == 5:
        # phase-split source: kernel columns j = r, r + sw, ... read phase r at offsets 0, 1, ...
        s_c, s_n, s_h, _, s_q = src.strides
        for r in range(min(g.sw, g.kw)):
            view = _as_strided(xp, src[:, :, y0 * g.sh:, r], (c, g.kh, len(range(r, g.kw, g.sw)), n, y1 - y0, ow),
                               (s_c, g.dh * s_h, s_q, s_n, g.sh * s_h, s_q))
            parallel_copyto(out[:, :, r::g.sw], view)
        return out
    s_c, s_n, s_h, s_w = src.strides
    view = _as_strided(xp, src[:, :, y0 * g.sh:], shape,
                       (s_c, g.dh * s_h, g.dw * s_w, s_n, g.sh * s_h, g.sw * s_w))
    parallel_copyto(out, view)
    return out


def im2col(x, geom, out_hw, out=None):
    """Columns of ``x`` (N, C, H, W): an array (C, kh, kw, N, oh, ow).

    ``col[c, i, j, n, y, x] = x_padded[n, c, y*sh + i*dh, x*sw + j*dw]``, one strided copy (a
    copy reads strided rows about as fast as contiguous ones, unlike arithmetic) or, from a
    phase-split source, one per column phase. ``out`` (any array of that shape) receives the
    result; by default a workspace buffer is used.
    """
    return im2col_rows(padded_source(x, geom), geom, out_hw, 0, out_hw[0], out)


def col2im(col, geom, in_hw, out):
    """The adjoint of ``im2col``: sums columns (C, kh, kw, N, oh, ow) back onto ``out`` (N, C, H, W).

    Overlapping windows add up; padding positions are dropped; ``out`` is overwritten. The sums
    run in phase layout so each add streams over contiguous columns. With vertical stride 1 on
    maps narrower than COL2IM_ROWS_FIRST_MAX_WIDTH the kernel rows are summed first
    (``_rows_first``).
    """
    xp = backend.get_array_module(col)
    c, kh, kw, n, oh, ow = col.shape
    h, w = in_hw
    g = geom
    sw, wq = phase_shape(g.sw, w + 2 * g.pw)
    hp = h + 2 * g.ph
    rows_first = g.sh == 1 and kh > 1 and ow < COL2IM_ROWS_FIRST_MAX_WIDTH
    per_channel = n * hp * (sw * wq + (kw * ow if rows_first else 0))
    block = max(1, min(c, COL2IM_BLOCK_ELEMENTS // max(per_channel, 1)))
    ot = out.transpose(1, 0, 2, 3)
    phases = [p for p in column_phases(g.sw, g.pw, w) if p[3]]

    # a block of channels at a time, so the kh*kw sums hit an accumulator that stays in cache
    # (one pass over the whole padded image per kernel offset is bound by memory bandwidth)
    def blocks(c_lo, c_hi):
        acc = workspace(xp, (min(block, c_hi - c_lo), n, hp, sw, wq), col.dtype, COL2IM_PAD)
        rows = workspace(xp, (min(block, c_hi - c_lo), kw, n, hp, ow), col.dtype, _COL2IM_ROWS) if rows_first else None
        for c0 in range(c_lo, c_hi, block):
            c1 = min(c_hi, c0 + block)
            a = acc[:c1 - c0]
            a.fill(0)
            if rows_first:
                _rows_first(col[c0:c1], g, rows[:c1 - c0], a)
            else:
                for i in range(kh):
                    y0 = i * g.dh
                    for j in range(kw):
                        r, q0 = (j * g.dw) % g.sw, (j * g.dw) // g.sw
                        a[:, :, y0:y0 + g.sh * (oh - 1) + 1:g.sh, r, q0:q0 + ow] += col[c0:c1, i, j]
            for r, w0, q0, cnt in phases:
                ot[c0:c1, :, :, w0::g.sw] = a[:, :, g.ph:g.ph + h, r, q0:q0 + cnt]
    _by_channels(xp, c, blocks, col.size)
    return out


def _rows_first(col, g, rows, acc):
    """col2im's sums for vertical stride 1, two passes: ``rows[c, j, n]`` (padded height x ``ow``)
    gets kernel row ``i``'s columns at row offset ``i·dh``, one add per ``i`` over whole
    ``oh·ow`` planes (contiguous on both sides); then each ``rows[:, j]`` is added at column offset
    ``j·dw`` of ``acc``, ``kw`` adds of rows ``ow`` long, where the plain sum does ``kh·kw`` of them.
    NumPy's cost per row dominates at 27 or 28 wide: AlexNet's conv2 at 27², 1.15-1.25x faster."""
    kh, kw, oh, ow = col.shape[1], col.shape[2], col.shape[4], col.shape[5]
    rows.fill(0)
    for i in range(kh):
        rows[:, :, :, i * g.dh:i * g.dh + oh] += col[:, i]
    for j in range(kw):
        r, q0 = (j * g.dw) % g.sw, (j * g.dw) // g.sw
        acc[:, :, :, r, q0:q0 + ow] += rows[:, j]


def _by_channels(xp, c, fn, work):
    """``fn(c0, c1)`` over channel ranges: split over the thread pool on the CPU, at once on a GPU."""
    if xp is np:
        threads.parallel_for(c, fn, work=work)
    else:
        fn(0, c)


def batch_last_source(x, g):
    """(N, C, H, W) -> zero-padded (C, Hp, Wp, N) in a workspace: what ``im2col_batch_last`` reads."""
    n, c, h, w = x.shape
    src = workspace(np, (c, h + 2 * g.ph, w + 2 * g.pw, n), x.dtype, IM2COL_PAD)
    if g.ph or g.pw:
        src.fill(0)
    parallel_copyto(src[:, g.ph:g.ph + h, g.pw:g.pw + w, :], x.transpose(1, 2, 3, 0))
    return src


def im2col_batch_last(x, geom, out_hw):
    """Columns of ``x`` (N, C, H, W) with the batch axis last: an array (C, kh, kw, oh, ow, N) in the
    "col" workspace, ``col[c, i, j, y, x, n] = x_padded[n, c, y*sh + i*dh, x*sw + j*dw]`` (CPU)."""
    n, c = x.shape[:2]
    oh, ow = out_hw
    g = geom
    src = batch_last_source(x, g)
    out = workspace(np, (c, g.kh, g.kw, oh, ow, n), x.dtype, COL)
    s_c, s_h, s_w, s_n = src.strides
    view = _as_strided(np, src, out.shape, (s_c, g.dh * s_h, g.dw * s_w, g.sh * s_h, g.sw * s_w, s_n))
    parallel_copyto(out, view)
    return out


def col2im_batch_last(col, geom, in_hw, out):
    """The adjoint of ``im2col_batch_last``: sums columns (C, kh, kw, oh, ow, N) onto ``out``
    (N, C, H, W), overwriting it; the kernel offsets are summed in the order ``col2im`` uses."""
    c, kh, kw, oh, ow, n = col.shape
    h, w = in_hw
    g = geom
    hp, wp = h + 2 * g.ph, w + 2 * g.pw
    block = max(1, min(c, COL2IM_BLOCK_ELEMENTS // (hp * wp * n)))
    ot = out.transpose(1, 2, 3, 0)

    def blocks(c_lo, c_hi):
        acc = workspace(np, (min(block, c_hi - c_lo), hp, wp, n), col.dtype, COL2IM_PAD)
        for c0 in range(c_lo, c_hi, block):
            c1 = min(c_hi, c0 + block)
            a = acc[:c1 - c0]
            a.fill(0)
            for i in range(kh):
                y0 = i * g.dh
                for j in range(kw):
                    x0 = j * g.dw
                    a[:, y0:y0 + g.sh * (oh - 1) + 1:g.sh, x0:x0 + g.sw * (ow - 1) + 1:g.sw] += col[c0:c1, i, j]
            ot[c0:c1] = a[:, g.ph:g.ph + h, g.pw:g.pw + w]
    _by_channels(np, c, blocks, col.size)
    return out


def images_per_chunk(per_image_elements, num, max_elements):
    """How many images' columns fit in ``max_elements`` (at least one)."""
    return max(1, min(num, max_elements // max(per_image_elements, 1)))


# --- columns with the channels last: the GEMM's inner dimension contiguous (CPU) --------------------
#
# OpenBLAS's SGEMM runs 10-35% faster on a convolution's forward when the column matrix is stored
# position-major, ``(N·oh·ow, kh·kw·C)``, so each output position's inputs (the GEMM's inner
# dimension) are contiguous, than channel-major ``(C·kh·kw, N·oh·ow)`` (measured on AlexNet's conv2
# and GoogLeNet's 28x28 layers, one and two threads). Built from a channels-last copy of the input,
# the copy moves runs of ``kw·C/G`` values (a window row across its channels) instead of ``ow``.

# below this many channels per group, channels_last_source copies one channel at a time
CHANNELS_LAST_MIN_RUN = 8


def channels_last_source(x, g, group):
    """(N, C, H, W) -> zero-padded (G, N, Hp, Wp, C/G) in a workspace: what ``im2col_channels_last``
    reads, each group's channels last and contiguous."""
    n, c, h, w = x.shape
    cg = c // group
    src = workspace(np, (group, n, h + 2 * g.ph, w + 2 * g.pw, cg), x.dtype, IM2COL_PAD)
    if g.ph or g.pw:
        src[:, :, :g.ph] = 0
        src[:, :, g.ph + h:] = 0
        src[:, :, g.ph:g.ph + h, :g.pw] = 0
        src[:, :, g.ph:g.ph + h, g.pw + w:] = 0
    inner = src[:, :, g.ph:g.ph + h, g.pw:g.pw + w]
    xg = x.reshape(n, group, cg, h, w).transpose(1, 0, 3, 4, 2)
    if cg < CHANNELS_LAST_MIN_RUN:
        # a few channels (an RGB image): one strided copy per channel moves rows of ``w`` values,
        # where the whole transpose at once would move runs of ``cg``
        for ci in range(cg):
            parallel_copyto(inner[..., ci], xg[..., ci])
    else:
        parallel_copyto(inner.reshape((group * n,) + inner.shape[2:]), xg.reshape((group * n,) + xg.shape[2:]))
    return src


def channels_last_windows(src, geom, out_hw):
    """The (G·N, oh, ow, kh, kw, C/G) strided view of ``channels_last_source``'s output whose copy
    is ``im2col_channels_last``'s columns (a view: nothing is copied)."""
    g = geom
    oh, ow = out_hw
    s_gn, s_h, s_w, s_c = src.strides[1:]
    shape = (src.shape[0] * src.shape[1], oh, ow, g.kh, g.kw, src.shape[4])
    flat = src.reshape((shape[0],) + src.shape[2:])
    return _as_strided(np, flat, shape, (s_gn, g.sh * s_h, g.sw * s_w, g.dh * s_h, g.dw * s_w, s_c))


def im2col_channels_last(x, geom, out_hw, group=1):
    """Columns of ``x`` (N, C, H, W) position-major, per group: an array (G, N, oh, ow, kh, kw, C/G)
    in the "col" workspace, ``col[g, n, y, x, i, j, c] = x_padded[n, g·C/G + c, y·sh + i·dh,
    x·sw + j·dw]`` (CPU). Group ``g``'s matrix ``col[g].reshape(N·oh·ow, kh·kw·C/G)`` is contiguous,
    its columns ordered (i, j, c): the weights must be permuted to (cout, kh, kw, C/G) to match."""
    n = x.shape[0]
    view = channels_last_windows(channels_last_source(x, geom, group), geom, out_hw)
    out = workspace(np, view.shape, x.dtype, COL)
    parallel_copyto(out, view)
    return out.reshape((group, n) + view.shape[1:])
