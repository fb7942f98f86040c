"""Pooling (MAX and AVE) with Caffe's output sizes, padding rules and argmax order.

This file is the reference: plain ``xp`` code (NumPy or CuPy) for Caffe's semantics. Faster ways
are engines chosen once per shape at ``reshape`` (``minicaffe.kernels.engines``): the CPU argmax
scatter for MAX backward (``kernels/pooling_engines.py``) and one CUDA kernel per pass on a GPU
(``kernels/cuda_pooling.py``), or cuDNN where it is installed and computes Caffe's windows
(``kernels/cudnn_pooling.py``); ``pooling_param.engine: CAFFE`` keeps this code.

The reference is vectorised over all windows at once: the input is copied into a padded array
(``-inf`` for MAX, ``0`` for AVE) large enough for every window of the ceil-rounded output, and the
loop runs only over the ``kh x kw`` offsets inside a window, each step one view of that array (see
the layout note below). On the CPU this runs over cache-sized blocks of image planes, split over the
kernels' thread pool (``core/threads.py``: each block is computed alone, so the result does not
depend on the thread count); inference
(TEST phase) MAX pooling with one top skips the argmax, which a backward pass then recomputes.
With the compiled kernels on, MAX's passes over a block's offsets are one compiled loop
(``compiled.max_pool_argmax``: the maxima and their argmax in one pass per offset, where NumPy
takes four with the argmax; the same bits).

Caffe's rules kept here:
* output ``ceil((H + 2p - k) / s) + 1`` (``round_mode: FLOOR`` floors), minus one when ``pad > 0``
  and the last window would start in the padding (``(out - 1) s >= H + p``);
* AVE divides by the window clipped to the padded image (``min(start + k, H + p) - start``), so
  padding zeros count but the overhang of a ceil-rounded window does not;
* MAX ignores padding and keeps the first maximum in row-major window order; its optional second
  top holds the argmax as the flat index ``h * W + w``.
"""
import numpy as np

from ..core import threads
from ..core.backend import get_array_module
from ..core.blob import Blob
from ..errors import ShapeError
from ..kernels import compiled, cuda_pooling, cudnn_pooling, engines, pooling_engines
from ..core.context import Slot
from ..kernels.im2col import column_phases, workspace
from ..proto import caffe_pb2
from ..core.layer import Layer, register

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_PAD, _WIDE_Y, _WIDE_DY = Slot("pool_pad"), Slot("pool_y"), Slot("pool_dy")
_GREATER, _CODE, _PART = Slot("pool_gt"), Slot("pool_code"), Slot("pool_part")
_SCRATCH_Y = Slot("pool_scratch_y")

# the modules whose import registers the engines of Pooling (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_pooling, cudnn_pooling, pooling_engines)

_PP = caffe_pb2.PoolingParameter

# Padded-image elements handled per block (2 MiB of float32: the block's passes stay in L2). Each
# block makes ~4 kh*kw NumPy calls, which hold the GIL between their loops: smaller blocks (64K was
# the size before the thread pool) leave two threads waiting on each other, up to 1.2x slower than
# one; at 512K two threads pool 1.4-1.8x faster than one (CaffeNet's and GoogLeNet's MAX layers),
# and one thread is no slower than at 64K (up to 1.35x faster).
POOL_BLOCK_ELEMENTS = 1 << 19


def _pooled_size(size, kernel, pad, stride, ceil_mode):
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _nchw_shape(layer, bottom):
    """``bottom[0]``'s shape, refused with a ShapeError naming ``layer`` unless it has the 4 axes
    (num, channels, height, width) that Pooling and SPP work on."""
    shape = bottom[0].shape
    if len(shape) != 4:
        raise layer.error(f"bottom must have 4 axes (num, channels, height, width), got shape {shape}",
                          ShapeError)
    return shape


@register("Pooling")
class Pooling(Layer):
    """MAX or AVE pooling over 2-D windows of an (N, C, H, W) bottom.

    Engines get the layer at ``reshape`` and implement ``pool_forward(x, y, mask)`` (``mask``: the
    argmax top's array, or None) and ``pool_backward(x, dy, dx)`` (``dx`` overwritten); the
    layer's own methods of those names are the reference."""

    exact_num_bottom = 1
    min_num_top = 1
    max_num_top = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        if param.pooling_param.pool == _PP.MAX:
            self.max_num_top = 2  # the argmax mask

    def setup(self, bottom, top):
        pp = self.param.pooling_param
        self.method = pp.pool
        if self.method == _PP.STOCHASTIC:
            raise self.error("pool: STOCHASTIC is not supported (use MAX or AVE)")
        if self.method not in (_PP.MAX, _PP.AVE):
            raise self.error(f"unknown pool method {self.method}")
        has = pp.HasField
        self.global_pooling = bool(pp.global_pooling)
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise self.error("with global_pooling: true the kernel size cannot be given")
        else:
            if has("kernel_size") and (has("kernel_h") or has("kernel_w")):
                raise self.error("give kernel_size or kernel_h and kernel_w, not both")
            if not has("kernel_size") and not (has("kernel_h") and has("kernel_w")):
                raise self.error("needs kernel_size, or both kernel_h and kernel_w (or global_pooling)")
        if has("pad") and (has("pad_h") or has("pad_w")) or has("pad_h") != has("pad_w"):
            raise self.error("give pad, or both pad_h and pad_w, not both forms")
        if has("stride") and (has("stride_h") or has("stride_w")) or has("stride_h") != has("stride_w"):
            raise self.error("give stride, or both stride_h and stride_w, not both forms")
        if has("kernel_size"):
            self.kh = self.kw = int(pp.kernel_size)
        else:
            self.kh, self.kw = int(pp.kernel_h), int(pp.kernel_w)
        if has("pad_h"):
            self.ph, self.pw = int(pp.pad_h), int(pp.pad_w)
        else:
            self.ph = self.pw = int(pp.pad)
        if has("stride_h"):
            self.sh, self.sw = int(pp.stride_h), int(pp.stride_w)
        else:
            self.sh = self.sw = int(pp.stride)
        if self.sh <= 0 or self.sw <= 0:
            raise self.error(f"stride must be positive, got {self.sh}x{self.sw}")
        if self.global_pooling:
            if self.ph or self.pw or self.sh != 1 or self.sw != 1:
                raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed")
        else:
            if self.kh <= 0 or self.kw <= 0:
                raise self.error(f"kernel size must be positive, got {self.kh}x{self.kw}")
            if self.ph >= self.kh or self.pw >= self.kw:
                raise self.error(f"pad {self.ph}x{self.pw} must be smaller than the kernel {self.kh}x{self.kw}")
        self.ceil_mode = pp.round_mode == _PP.CEIL
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)   # its own methods: the reference
        self.engine = None
        self.bottom_shape = None
        self._hq = self._wq = self._flat = None     # the phase-plane geometry (see the layout note)
        self._off_wide = None      # the argmax window-offset codes, (N*C, 1, oh*Wq) in wide order
        self._off = None           # the same as an (N, C, oh, ow) view (flat indices for global pooling)
        self._argmax_valid = False  # does _off_wide/_off hold the argmax of the last forward's input?

    def reshape(self, bottom, top):
        shape = _nchw_shape(self, bottom)
        n, c, h, w = shape
        if self.global_pooling:
            self.kh, self.kw = h, w
        oh = _pooled_size(h, self.kh, self.ph, self.sh, self.ceil_mode)
        ow = _pooled_size(w, self.kw, self.pw, self.sw, self.ceil_mode)
        if oh <= 0 or ow <= 0:
            raise self.error(f"kernel {self.kh}x{self.kw} larger than padded input "
                             f"{h + 2 * self.ph}x{w + 2 * self.pw}", ShapeError)
        self.out_hw = (oh, ow)
        self.bottom_shape = tuple(shape)
        # the whole-image case (global pooling, or a kernel the size of an unpadded input)
        self.whole = (self.kh == h and self.kw == w and self.ph == 0 and self.pw == 0)
        self._hq, self._wq, self._flat = self._geometry(h, w)
        self._argmax_valid = False
        self.num_top = len(top)        # the engines' ``applies`` (cuDNN keeps no argmax for a mask top)
        for t in top:
            t.reshape(n, c, oh, ow)
        self.engine = self.engine_slot.get(self, self.bottom_shape)

    def forward(self, bottom, top):
        mask = top[1].xdata if len(top) > 1 else None
        self.engine = self.engine_slot.get(self, self.bottom_shape)    # the same, unless the mode changed
        self.engine.pool_forward(bottom[0].xdata, top[0].xdata, mask)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        self.engine = self.engine_slot.get(self, self.bottom_shape)
        self.engine.pool_backward(bottom[0].xdata, top[0].xdiff, bottom[0].xdiff)

    def backward_through_relu(self, top, bottom):
        """``backward`` and the gradient of a ReLU in place on the bottom in one pass, where the
        engine takes it (the argmax scatter: ``pool_backward(relu=True)``; kernels/train_fusion.py's
        ReluMaxPoolChain); False, with nothing done, elsewhere."""
        self.engine = self.engine_slot.get(self, self.bottom_shape)
        x, dx = bottom[0].xdata, bottom[0].xdiff
        relu_applies = getattr(self.engine, "relu_applies", None)
        if relu_applies is None or not relu_applies(x, dx):
            return False
        self.engine.pool_backward(x, top[0].xdiff, dx, relu=True)
        return True

    # --- helpers -----------------------------------------------------------------------------
    # Layout: the padded image is split by row phase (row % sh) and column phase (col % sw), each
    # phase a flat plane of ``Hq x Wq`` values: element (row, col) sits at
    # ``[n, c, row % sh, col % sw, (row // sh) * Wq + col // sw]``. The element at window offset
    # (i, j) of every window is then ONE contiguous run of ``oh * Wq`` values per (n, c), in
    # "wide" output order ``y * Wq + x`` (the columns x >= ow are never used). Long contiguous
    # runs keep NumPy's loops vectorised; a 4-D view with rows of ow (often 7-56) is 2-8x slower.
    def _geometry(self, h, w):
        """(Hq, Wq, F): phase-plane rows and columns, and the plane length every window view fits in."""
        oh, ow = self.out_hw
        hp = max((oh - 1) * self.sh + self.kh, h + self.ph)
        wp = max((ow - 1) * self.sw + self.kw, w + self.pw)
        hq, wq = -(-hp // self.sh), -(-wp // self.sw)
        last = ((self.kh - 1) // self.sh) * wq + (self.kw - 1) // self.sw + oh * wq
        return hq, wq, max(hq * wq, last)

    def _window_start(self, i, j):
        """Where window offset (i, j)'s values start in their phase plane (``_window``)."""
        return (i // self.sh) * self._wq + j // self.sw

    def _window(self, arr, i, j):
        """The element at window offset (i, j) of every window: a view (N, C, oh * Wq), wide order."""
        start = self._window_start(i, j)
        return arr[:, :, i % self.sh, j % self.sw, start:start + self.out_hw[0] * self._wq]

    def _planes(self, buf, h, w):
        """(index into the image, view of the phase plane) for each phase holding real pixels."""
        hq, wq = self._hq, self._wq
        out = []
        for rh, h0, qh, nh in column_phases(self.sh, self.ph, h):
            for rw, w0, qw, nw in column_phases(self.sw, self.pw, w):
                if nh and nw:
                    plane = buf[:, :, rh, rw, :hq * wq].reshape(buf.shape[0], buf.shape[1], hq, wq)
                    out.append(((slice(None), slice(None), slice(h0, None, self.sh), slice(w0, None, self.sw)),
                                plane[:, :, qh:qh + nh, qw:qw + nw]))
        return out

    def _pad_into(self, buf, x, fill):
        """``buf`` (phase-plane layout) = ``x`` padded with ``fill`` (and extended for ceil-rounded
        windows)."""
        buf.fill(fill)
        for index, plane in self._planes(buf, x.shape[2], x.shape[3]):
            plane[...] = x[index]
        return buf

    def _unpad(self, acc, dx):
        """The inverse of ``_pad_into``: copy the real image out of a phase-plane array into ``dx``."""
        for index, plane in self._planes(acc, dx.shape[2], dx.shape[3]):
            dx[index] = plane

    def _wide(self, n, c, dtype, slot):
        """A workspace array (N, C, oh * Wq) in wide output order."""
        return workspace(self.xp, (n, c, self.out_hw[0] * self._wq), dtype, slot)

    def _narrow(self, wide):
        """The (N, C, oh, ow) view of a wide-order array."""
        n, c = wide.shape[:2]
        return wide.reshape(n, c, self.out_hw[0], self._wq)[:, :, :, :self.out_hw[1]]

    def _to_wide(self, arr, slot):
        """``arr`` (N, C, oh, ow) in wide order, zeros in the unused columns."""
        n, c = arr.shape[:2]
        wide = self._wide(n, c, arr.dtype, slot)
        wide4 = wide.reshape(n, c, self.out_hw[0], self._wq)
        wide4[:, :, :, self.out_hw[1]:] = 0
        wide4[:, :, :, :self.out_hw[1]] = arr
        return wide

    def _ave_divisor(self, h, w, dtype, host=False):
        """Window sizes clipped to the padded image (not to the real one), as Caffe counts them."""
        oh, ow = self.out_hw
        hs = np.arange(oh) * self.sh - self.ph
        ws = np.arange(ow) * self.sw - self.pw
        sh = np.minimum(hs + self.kh, h + self.ph) - hs
        sw = np.minimum(ws + self.kw, w + self.pw) - ws
        divisor = np.outer(sh, sw).astype(dtype)
        return divisor if host else self.xp.asarray(divisor)

    def _blocks(self, m, h, w, fn):
        """``fn(b0, b1)`` over blocks of the ``m = N*C`` image planes, each small enough that its
        padded copy and window passes stay in cache (a pass over a whole batch per window offset
        is bound by memory bandwidth)."""
        if self.xp is not np:
            fn(0, m)           # a GPU wants few, large kernels
            return
        rows = max(1, POOL_BLOCK_ELEMENTS // (self.sh * self.sw * self._flat))
        # as many blocks as a whole number of threads takes, so every thread gets the same share:
        # VGG-16's pool5 at batch 4 (2048 planes of 14x14) was one block, on one core, and pool4's
        # 4 blocks of unequal size ran 1.4x faster at two threads than at one
        pool = threads.size()
        count = -(-m // rows)
        work = m * self._flat
        if pool > 1 and count % pool and m >= pool and work >= threads.MIN_PARALLEL_WORK:   # else inline
            rows = max(1, -(-m // (-(-count // pool) * pool)))

        def blocks(k0, k1):    # blocks k0..k1-1, on one thread of the pool
            for b0 in range(k0 * rows, min(m, k1 * rows), rows):
                fn(b0, min(m, b0 + rows))
        threads.parallel_for(-(-m // rows), blocks, work=work)

    def _scratch(self, k, flat, dtype):
        return workspace(self.xp, (k, 1, self.sh, self.sw, flat), dtype, _PAD)

    def _code_type(self):
        """The argmax codes' type: one byte where every window offset fits (byte arithmetic is ~10x
        faster than int32)."""
        return np.uint8 if self.kh * self.kw <= 256 else np.int32

    def _codes(self, m, wide_len):
        """The argmax code array (kept between calls while its shape, type and device hold), of
        ``_code_type``."""
        code_type = self._code_type()
        off = self._off_wide
        if off is None or off.shape != (m, 1, wide_len) or off.dtype != code_type or \
                get_array_module(off) is not self.xp:
            off = self._off_wide = self.xp.empty((m, 1, wide_len), dtype=code_type)
        return off, code_type

    def _max_forward(self, x, y, argmax):
        """y = the window maxima; with ``argmax``, ``self._off_wide`` = the window offset of each
        (the first maximum in row-major window order)."""
        xp = self.xp
        n, c, h, w = x.shape
        m, oh, ow = n * c, self.out_hw[0], self.out_hw[1]
        x2, y2 = x.reshape(m, 1, h, w), y.reshape(m, 1, oh, ow)
        flat = self._flat
        wide_len = oh * self._wq
        # the compiled pass (compiled.max_pool_argmax): one per window offset, the maxima and their
        # codes together, where the NumPy passes below take one per offset for the maxima alone and
        # four with the codes; the same bits. GoogLeNet's 3x3/2 pools at batch 16, 2 cores, ms,
        # compiled / NumPy: 16x192x56x56 6.5 / 19.9 with the codes (TRAIN), 7.8 for the maxima
        # alone (TEST); 16x480x28x28 5.1 / 14.2 (6.0 TEST).
        kernel = self._compiled_window_pass(x, compiled.max_pool_argmax)
        compiled_pass = kernel is not None
        if argmax or compiled_pass:
            if argmax:
                off, code_type = self._codes(m, wide_len)
            else:
                code_type = self._code_type()
            # start at the first real pixel of each window (so an all -inf window still points
            # inside the image), then move to every strictly larger value in row-major order:
            # the last such move is the first maximum
            i0 = np.maximum(self.ph - np.arange(oh) * self.sh, 0)
            j0 = np.zeros(self._wq, np.int64)
            j0[:ow] = np.maximum(self.pw - np.arange(ow) * self.sw, 0)
            start = xp.asarray((i0[:, None] * self.kw + j0[None, :]).astype(code_type).reshape(-1))
        starts = self._starts() if compiled_pass else None

        def block(b0, b1):
            k = b1 - b0
            xpad = self._pad_into(self._scratch(k, flat, x.dtype), x2[b0:b1], -np.inf)
            yw = workspace(xp, (k, 1, wide_len), x.dtype, _WIDE_Y)
            if compiled_pass:
                o = off[b0:b1] if argmax else workspace(xp, yw.shape, code_type, _CODE)
                kernel(xpad.reshape(k, -1), yw.reshape(k, wide_len), o.reshape(k, wide_len), starts, start, 0, k)
                y2[b0:b1] = self._narrow(yw)
                return
            if not argmax:
                xp.copyto(yw, self._window(xpad, 0, 0))
                for i in range(self.kh):
                    for j in range(self.kw):
                        if i or j:
                            xp.maximum(yw, self._window(xpad, i, j), out=yw)
                y2[b0:b1] = self._narrow(yw)
                return
            o = off[b0:b1]
            o[...] = start
            yw.fill(-np.inf)
            gt = workspace(xp, yw.shape, np.bool_, _GREATER)
            code = workspace(xp, yw.shape, code_type, _CODE)
            grew = gt.view(np.uint8) if code_type == np.uint8 else gt
            # Branch-free (a masked copy is slow on random masks): the offset code grows along
            # the loop, so "the last offset where the value grew strictly" is a running maximum.
            for i in range(self.kh):
                for j in range(self.kw):
                    v = self._window(xpad, i, j)
                    xp.greater(v, yw, out=gt)
                    xp.maximum(yw, v, out=yw)
                    xp.multiply(grew, code_type(i * self.kw + j), out=code)
                    xp.maximum(o, code, out=o)
            y2[b0:b1] = self._narrow(yw)
        self._blocks(m, h, w, block)
        if argmax:
            self._off = self._narrow(off).reshape(n, c, oh, ow)
        self._argmax_valid = argmax

    def _compiled_window_pass(self, a, fn):
        """The compiled ``fn`` (a pass over a block's window offsets: compiled.max_pool_argmax,
        ave_pool_sum or ave_pool_spread, the NumPy passes' twins, the same bits) where it runs on
        ``a``, else None. Why for AVE: each NumPy pass over a block moves runs of ``oh * Wq``
        values, a few dozen on small maps (GoogLeNet's auxiliary 5x5/3 AVE pools over 14x14: 16
        outputs), where NumPy's cost is per run; the compiled loop goes plane by plane."""
        if self.xp is np and a.dtype in (np.float32, np.float64) and compiled.enabled():
            return compiled.get(fn)
        return None

    def _starts(self):
        """Where each window offset's values start in a block's flattened padded plane (offsets
        in row-major order: ``_window``)."""
        flat = self._flat
        return np.array([((i % self.sh) * self.sw + j % self.sw) * flat + self._window_start(i, j)
                         for i in range(self.kh) for j in range(self.kw)], np.intp)

    def _argmax_wide(self, x):
        """The argmax window-offset codes of ``x`` (wide order), recomputed when the last forward
        skipped them (inference) or another engine ran it: for MAX backward."""
        if not self._argmax_valid:
            oh, ow = self.out_hw
            self._max_forward(x, workspace(self.xp, x.shape[:2] + (oh, ow), x.dtype, _SCRATCH_Y),
                              argmax=True)
        return self._off_wide

    def argmax_offsets(self, x):
        """For engines: each output's argmax as its window offset code ``i * kw + j`` (relative to
        the window's top-left corner, padding included), an (N*C, 1, oh, ow) view."""
        return self._narrow(self._argmax_wide(x))


    # --- the reference: forward / backward -------------------------------------------------------
    def pool_forward(self, x, y, mask):
        """y = the pooled ``x``; ``mask`` (MAX's optional second top) = the argmax ``h * W + w``."""
        xp = self.xp
        n, c, h, w = x.shape
        if self.method == _PP.AVE:
            if self.whole:
                y[...] = x.reshape(n, c, h * w).mean(axis=2).reshape(y.shape)
                return
            m, (oh, ow) = n * c, self.out_hw
            x2, y2 = x.reshape(m, 1, h, w), y.reshape(m, 1, oh, ow)
            divisor = self._ave_divisor(h, w, x.dtype)
            flat = self._flat
            kernel = self._compiled_window_pass(x, compiled.ave_pool_sum)
            starts = self._starts() if kernel is not None else None

            def block(b0, b1):
                k = b1 - b0
                xpad = self._pad_into(self._scratch(k, flat, x.dtype), x2[b0:b1], 0)
                acc = workspace(xp, (k, 1, oh * self._wq), x.dtype, _WIDE_Y)
                if kernel is not None:
                    kernel(xpad.reshape(k, -1), acc.reshape(k, -1), starts, 0, k)
                else:
                    acc.fill(0)
                    for i in range(self.kh):
                        for j in range(self.kw):
                            acc += self._window(xpad, i, j)
                out = y2[b0:b1]
                out[...] = self._narrow(acc)
                out /= divisor
            self._blocks(m, h, w, block)
            return
        # MAX
        if self.whole:
            flat = x.reshape(n, c, h * w)
            arg = flat.argmax(axis=2)      # first maximum, row-major: Caffe's choice
            y[...] = xp.take_along_axis(flat, arg[:, :, None], axis=2).reshape(y.shape)
            self._off = arg.astype(xp.int32).reshape(y.shape)
            self._argmax_valid = True
            if mask is not None:
                mask[...] = self._off
            return
        # inference needs the max alone (one pass per window offset instead of four); a backward
        # pass, rare in TEST nets, recomputes the argmax from the bottom first
        self._max_forward(x, y, argmax=mask is not None or self.phase != caffe_pb2.TEST)
        if mask is not None:
            oh, ow = self.out_hw
            off = self._off
            hbase = xp.asarray((np.arange(oh) * self.sh - self.ph)[:, None].astype(np.int32))
            wbase = xp.asarray((np.arange(ow) * self.sw - self.pw)[None, :].astype(np.int32))
            mask[...] = (hbase + off // self.kw) * w + wbase + off % self.kw

    def pool_backward(self, x, dy, dx):
        """dx = AVE: each output's gradient spread over its window / the divisor; MAX: each output's
        gradient added at its argmax. One pass per window offset."""
        xp = self.xp
        n, c, h, w = dx.shape
        if self.whole:
            if self.method == _PP.AVE:
                dx[...] = (dy / (h * w)).reshape(n, c, 1, 1)
            else:
                if not self._argmax_valid:
                    self.pool_forward(x, workspace(xp, dy.shape, dy.dtype, _SCRATCH_Y), None)
                dx.fill(0)
                flat = dx.reshape(n * c, h * w)
                flat[xp.arange(n * c), self._off.reshape(-1)] = dy.reshape(-1)
            return
        m, (oh, ow) = n * c, self.out_hw
        dy2, dx2 = dy.reshape(m, 1, oh, ow), dx.reshape(m, 1, h, w)
        flat, wq = self._flat, self._wq
        kernel = None
        if self.method == _PP.AVE:
            divisor = np.ones((oh, wq), dy.dtype)
            divisor[:, :ow] = self._ave_divisor(h, w, dy.dtype, host=True)
            divisor = xp.asarray(divisor.reshape(-1))
            kernel = self._compiled_window_pass(dy, compiled.ave_pool_spread)
            starts = self._starts() if kernel is not None else None
        else:
            off = self._argmax_wide(x)

        def block(b0, b1):
            k = b1 - b0
            acc = self._scratch(k, flat, dy.dtype)
            g = self._to_wide(dy2[b0:b1], _WIDE_DY)
            if kernel is not None:          # zeroes acc itself
                g /= divisor
                kernel(acc.reshape(k, -1), g.reshape(k, -1), starts, 0, k)
            elif self.method == _PP.AVE:
                acc.fill(0)
                g /= divisor
                for i in range(self.kh):
                    for j in range(self.kw):
                        win = self._window(acc, i, j)
                        win += g
            else:
                acc.fill(0)
                o = off[b0:b1]
                hit = workspace(xp, g.shape, np.bool_, _GREATER)
                part = workspace(xp, g.shape, dy.dtype, _PART)
                for i in range(self.kh):
                    for j in range(self.kw):
                        xp.equal(o, i * self.kw + j, out=hit)
                        xp.multiply(g, hit, out=part)
                        win = self._window(acc, i, j)
                        win += part
            self._unpad(acc, dx2[b0:b1])
        self._blocks(m, h, w, block)


@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling (He et al.): level l pools the (N, C, H, W) bottom into about
    2^l x 2^l bins — kernel ceil(H / 2^l), stride the kernel, pad half the overhang rounded up,
    Caffe's rule — and the flattened levels are concatenated into (N, C·sum of bins). With
    ``pyramid_height: 1`` the top is the single level's (N, C, 1, 1), unflattened, as in Caffe.
    Each level is an ordinary Pooling layer (MAX or AVE; STOCHASTIC is not supported)."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.spp_param
        self.height = int(p.pyramid_height)
        if self.height < 1:
            raise self.error(f"spp_param.pyramid_height must be at least 1, got {self.height}")
        methods = {caffe_pb2.SPPParameter.MAX: _PP.MAX, caffe_pb2.SPPParameter.AVE: _PP.AVE,
                   caffe_pb2.SPPParameter.STOCHASTIC: _PP.STOCHASTIC}
        if p.pool not in methods:
            raise self.error(f"unknown pool method {p.pool}")
        self.method = methods[p.pool]
        self._hw = None

    def _level_param(self, level, h, w):
        bins = 2 ** level
        param = caffe_pb2.LayerParameter(name=f"{self.name} (level {level})", type="Pooling")
        pp = param.pooling_param
        pp.pool = self.method
        kh, kw = -(-h // bins), -(-w // bins)
        pp.kernel_h, pp.kernel_w = kh, kw
        pp.stride_h, pp.stride_w = kh, kw
        pp.pad_h, pp.pad_w = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        return param

    def reshape(self, bottom, top):
        shape = _nchw_shape(self, bottom)
        n, c, h, w = shape
        if h <= 0 or w <= 0:
            raise self.error(f"input dimensions cannot be zero, got shape {shape}", ShapeError)
        if self._hw != (h, w):
            self.levels = []
            for level in range(self.height):
                pool = Pooling(self._level_param(level, h, w), self.phase)
                out = [Blob(name=f"{self.name}.level{level}")]
                pool.setup(bottom, out)
                self.levels.append((pool, out))
            self._hw = (h, w)
        sizes = []
        for pool, out in self.levels:
            pool.reshape(bottom, out)
            sizes.append(out[0].count_from(1))
        if self.height == 1:
            top[0].reshape(self.levels[0][1][0].shape)
        else:
            top[0].reshape(n, sum(sizes))
        self.sizes = sizes

    def forward(self, bottom, top):
        n = bottom[0].shape[0]
        parts = []
        for pool, out in self.levels:
            pool.forward(bottom, out)
            parts.append(out[0].xdata.reshape(n, -1))
        top[0].xdata = parts[0] if len(parts) == 1 else self.xp.concatenate(parts, axis=1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        n = bottom[0].shape[0]
        dy = top[0].xdiff.reshape(n, -1)
        total = None
        start = 0
        for (pool, out), size in zip(self.levels, self.sizes):
            out[0].xdiff = dy[:, start:start + size].reshape(out[0].shape)
            start += size
            pool.backward(out, [True], bottom)
            g = bottom[0].xdiff
            total = g.copy() if total is None else total + g
        bottom[0].xdiff = total
