"""Compiled CPU kernels (Numba) for passes that NumPy can only run as several whole-array passes.

Why: some CPU work is a chain of element-wise operations, for example the solver's SGD step
(decay, momentum, update: 13 passes over each parameter) or Winograd's tile transforms (two stacked
GEMMs and a temporary each). NumPy runs each operation as its own pass through memory. At the thread count users run, those passes were bandwidth-bound and did not
scale: VGG-16's SGD step took 330 ms of a 2.5 s training iteration on 2 cores. A compiled loop
reads and writes each element once.

Issue 15 weighs three ways to compile: Numba, a C extension built at install time, and oneDNN
through a binding. Numba was taken because:
- it ships wheels wherever NumPy does, so `pip install` still needs no compiler;
- it compiles on first use and caches the machine code on disk (beside this module, or in
  ``NUMBA_CACHE_DIR``);
- a kernel stays readable Python with the same arithmetic as its NumPy twin.

Rules:
- A kernel here is a plain Python function of flat arrays and scalars. It is compiled with
  ``nogil=True``, so the kernels' thread pool (core/threads.py) runs its chunks in parallel.
- It does not use Numba's own threads.
- Every kernel has a NumPy twin, which is the reference: the kernel must give the same bits
  (tests/test_compiled.py). So each product or sum is rounded where NumPy rounds it (no fastmath,
  no contraction into FMA except where the twin emulates one). The exceptions are twins whose
  sums run in an order NumPy does not fix: BLAS's (Winograd's transform GEMMs, InnerProduct's
  few-rows product) and ``einsum``'s (BatchNorm's statistics and gradient and Scale's gradient,
  whose kernels sum in float64 through the vectorised ``ROW_HELPERS``). There the kernel agrees
  to rounding, and the bits still do not depend on the thread count.
- ``enabled()`` is False when Numba does not import or ``MINICAFFE_COMPILED=0``. Callers then take
  the NumPy path, with the same results (to rounding, for the exceptions above).
"""
from __future__ import annotations

import threading

import numpy as np

from ..core import context

_lock = threading.Lock()
_state = {"numba": None, "tried": False, "compiled": {}}


# Kernels whose twin is a BLAS call (which adds in its own order, not NumPy's): they may reorder
# their sums (LLVM's 'reassoc', so a dot product vectorises) and fuse multiply-adds ('contract').
# They agree with the twin to float32 rounding; their bits still do not depend on the thread count.
# (BatchNorm's and Scale's kernels, whose twins sum with einsum, also sum in their own order, in
# float64, through ROW_HELPERS below, but keep every other step's rounding: they are not listed here.)
REASSOCIATES = {"inner_product_rows": {"reassoc", "contract"},
                "inner_product_rows_backward": {"reassoc", "contract"}}

# Row sums the kernels call (BatchNorm's and Scale's, below), compiled with 'reassoc' so LLVM
# vectorises them: the float64 sum of a row of float32 values, one add after the other, is a chain
# of dependent adds (~1.2 G values/s on one core of the project's machine) where the vectorised sum
# runs at ~11 G/s; the fused BatchNorm + Scale + ReLU kernels were latency-bound on those chains
# (8x256x56x56 on one core: 12.7 ms forward, where a copy of the blob takes 1.4; 5.9 ms with these
# helpers; the backward 10.6 -> 9.4, bound by memory traffic now). Only the sums' order
# moves (how LLVM splits a row between vector lanes, fixed for a machine): each row is summed
# alone, so the bits do not depend on the thread count, and every kernel that needs a sum of the
# same values calls the same helper, so the fused kernels and the separate layers' give the same
# bits. The twins sum with einsum, in NumPy's order: they agree to float32 rounding, as before.
ROW_HELPERS = {"_row_sum": {"reassoc"}, "_row_dot": {"reassoc"}, "_row_scaled_dot": {"reassoc"},
               "_row_centre": {"reassoc"}}

# Every function the kernels call, by name, with its fastmath flags: compiled before any kernel
# (_compile_helpers). LRN's window sum is shared by its two kernels and adds in order: no flag.
HELPERS = {**ROW_HELPERS, "_lrn_window_sum": set(), "_rows_into_channels_first": set()}


def _numba():
    """The numba module, imported on first need (it takes ~0.3 s, which a command that never runs
    a kernel should not pay), else None."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    import numba
                except Exception:       # noqa: BLE001 -- any failure to load means: no compiled kernels
                    numba = None
                _state["numba"], _state["tried"] = numba, True
    return _state["numba"]


def enabled() -> bool:
    """Whether the compiled kernels run: Numba imports and ``MINICAFFE_COMPILED`` is not ``0``."""
    return context.current().switches.compiled and _numba() is not None


def runs_on(*arrays) -> bool:
    """Whether a kernel here may take ``arrays``: the kernels are on, and every one is a
    C-contiguous NumPy array of the first one's dtype, float32 or float64 (the layouts and types
    the kernels are written for; the callers take their NumPy path otherwise)."""
    first = arrays[0]
    return (isinstance(first, np.ndarray) and first.dtype in (np.float32, np.float64)
            and all(isinstance(a, np.ndarray) and a.dtype == first.dtype and a.flags.c_contiguous
                    for a in arrays) and enabled())


def get(fn):
    """``fn`` (a module-level function of this module) compiled with ``nogil`` and the on-disk cache,
    once per process."""
    got = _state["compiled"].get(fn)
    if got is None:
        numba = _numba()            # before the lock: it takes the lock itself on first use
        with _lock:
            got = _state["compiled"].get(fn)
            if got is None:
                _compile_helpers(numba)
                got = _jit(numba, fn, REASSOCIATES.get(fn.__name__))
                _state["compiled"][fn] = got
    return got


def _jit(numba, fn, fastmath):
    # NumPy's error model: a float division by zero gives inf or nan, as in the twins, where Python's
    # raises ZeroDivisionError; its check also kept a loop that divides from vectorising (LRN's)
    extra = {"error_model": "numpy"}
    if fastmath:
        extra["fastmath"] = fastmath
    try:
        return numba.njit(nogil=True, cache=True, **extra)(fn)
    except RuntimeError:    # no writable cache location (a read-only install, no HOME)
        return numba.njit(nogil=True, **extra)(fn)


def _compile_helpers(numba):
    """Put the compiled HELPERS in this module's namespace, where Numba resolves a kernel's calls
    to them when it compiles the kernel (under ``_lock``; each once per process)."""
    module = globals()
    for name, flags in HELPERS.items():
        if not hasattr(module[name], "py_func"):        # not yet a Numba dispatcher
            module[name] = _jit(numba, module[name], flags)


def warm_up() -> bool:
    """Import Numba and load each kernel's float32 machine code now (from the disk cache after the
    first run) instead of at its first use; False when the kernels are off. Why: loading Numba and
    LLVM takes ~0.5 s and ~110-150 MB of resident memory, most of it the libraries' code (the same
    for any net), which a benchmark counts with the imports, as it counts PyTorch's and OpenCV's
    libraries (benchmarks/bench_nets.py)."""
    if not enabled():
        return False
    f = np.zeros(1, np.float32)
    get(sgd_step)(f, f.copy(), f.copy(), 0, 1, False, 1.0, 0.0, 0.0, 0.0, False)
    get(nesterov_step)(f, f.copy(), f.copy(), 0, 1, False, 1.0, 0.0, 0.0, 0.0, False)
    get(eltwise_sum_relu_backward)(f, f.copy(), f.copy(), 1.0, f.copy(), 1.0, True, True, 0, 1)
    get(relu_backward)(f, f.copy(), f.copy(), 0, 1)
    src, v = np.zeros((1, 6, 6, 1), np.float32), np.zeros((36, 1, 1), np.float32)
    get(winograd6_input)(src, v, 0, 1, 1, 0, 1, 4)
    get(winograd4_output)(v, np.zeros((1, 1, 4, 4), np.float32), 0, 1, 0, 1)
    get(channels_last_source)(np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32), 0, 0, 0, 1)
    get(space_to_depth_source)(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 1, 4), np.float32), 2, 0, 0, 0, 1)
    get(winograd2x5_output)(v, np.zeros((1, 1, 2, 2), np.float32), 0, 1, 0, 1)
    src7, v7 = np.zeros((1, 7, 7, 1), np.float32), np.zeros((49, 1, 1), np.float32)
    get(winograd7_input)(src7, v7, 0, 1, 1, 0, 1, 3)
    get(winograd3x5_output)(v7, np.zeros((1, 1, 3, 3), np.float32), 0, 1, 0, 1)
    get(winograd3x5_gradient_tiles)(np.zeros((1, 1, 3, 3), np.float32), v7.copy(), 0, 1, 1, 0, 1)
    dy = np.zeros((1, 1, 4, 4), np.float32)
    get(winograd4_gradient_tiles)(dy, np.zeros((36, 1, 1), np.float32), 0, 1, 1, 0, 1)
    get(winograd3x5_gradient_tiles_cl)(np.zeros((1, 3, 3, 1), np.float32), 0, 0, v7.copy(), 0, 1, 1, 0, 1)
    get(winograd4_gradient_tiles_cl)(np.zeros((1, 4, 4, 1), np.float32), 0, 0, np.zeros((36, 1, 1), np.float32),
                                      0, 1, 1, 0, 1)
    get(winograd2x5_gradient_tiles)(dy[:, :, :2, :2].copy(), np.zeros((36, 1, 1), np.float32), 0, 1, 1, 0, 1)
    get(winograd_filter_gradient)(v, np.zeros((6, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32), 0, 1)
    y, b = np.zeros((1, 1), np.float32), np.zeros(1, np.float32)
    get(convolution_epilogue)(y, b, True, b, True, True, y.copy(), y.copy(), True, True)
    get(epilogue_copy)(y, b, True, True, y.copy())
    get(inner_product_rows)(y, y.copy(), y.copy(), 0, 1)
    get(inner_product_rows_backward)(y, y.copy(), y.copy(), y.copy(), y.copy(), True, True, 0, 1)
    z = np.zeros((1, 1, 1), np.float32)
    get(batch_norm_backward)(z, z.copy(), b, z.copy(), 0, 1)
    get(scale_backward)(z, z.copy(), b, b, z.copy(), b.copy(), b.copy(), True, True, True, 0, 1)
    get(batch_norm_scale_relu)(z, z.copy(), z.copy(), b, b, True, True, True, 1e-5, b.copy(), b.copy(),
                               b.copy(), 0, 1)
    get(batch_norm_scale_relu_backward)(z, z.copy(), z.copy(), b, b, True, z.copy(), b.copy(), b.copy(),
                                        True, 0, 1)
    get(max_pool_scatter)(z, np.zeros((1, 1, 1, 1), np.uint8), np.zeros(1, np.intp), np.zeros((1, 1), np.float32),
                          1, 1, 1, 0, 0, np.zeros((1, 1), np.float32), False, 0, 1)
    z3 = np.zeros((1, 1, 1), np.float32)
    get(lrn_across_forward)(z3, z3.copy(), z3.copy(), z3.copy(), 1, 1.0, 1.0, 0, True, 0, 1)
    get(lrn_across_backward)(z3, z3.copy(), z3.copy(), z3 + 1, z3 + 1, z3.copy(), 1, 1.0, 0, 1)
    get(ave_pool_sum)(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.zeros(1, np.intp), 0, 1)
    get(ave_pool_spread)(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.zeros(1, np.intp), 0, 1)
    get(max_pool_argmax)(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint8),
                         np.zeros(1, np.intp), np.zeros(1, np.uint8), 0, 1)
    return True


# --- the solver's update rules (solvers/updates.py's NumPy twins, step for step) ---------------------
#
# fused_axpy(a, x, y) there is "y = a·x + y rounded once": the float64 product and sum, rounded to
# the arrays' dtype. ``h *= m`` is a multiply in the arrays' dtype (m rounded to float32 first, as
# the twins' Python floats are). The flags say which optional passes run, so a skipped pass is
# skipped here too (adding a zero decay would turn a -0.0 gradient into +0.0).

def sgd_step(w, g, h, a, b, normalize, scale, decay, rate, momentum, clear):
    """Elements ``a:b`` of one SGD step: normalise, L2 decay, ``h = momentum·h + rate·g``, ``w -= h``;
    ``g`` ends holding the update value, as the NumPy twin leaves it, or zero with ``clear`` (the
    next iteration's ClearParamDiffs done in this pass: updates.parameter_step).

    The loop runs over slices from 0: indexed ``a:b`` directly, each index might be negative, and
    the wrap-around that Numba adds for that kept LLVM from vectorising the loop (25.7M values, 2
    cores: 29.5 ms that way, 13.7 this way, the same bits)."""
    dt = w.dtype.type
    s, m = dt(scale), dt(momentum)
    zero = dt(0)
    ws, gs, hs = w[a:b], g[a:b], h[a:b]
    for i in range(b - a):
        gi = gs[i]
        if normalize:
            gi = gi * s
        if decay != 0.0:
            gi = dt(np.float64(decay) * np.float64(ws[i]) + np.float64(gi))
        hi = hs[i] * m
        hi = dt(np.float64(rate) * np.float64(gi) + np.float64(hi))
        hs[i] = hi
        gs[i] = zero if clear else hi
        ws[i] = ws[i] - hi


def nesterov_step(w, g, h, a, b, normalize, scale, decay, rate, momentum, clear):
    """Elements ``a:b`` of one Nesterov step: as ``sgd_step``, then the update is
    ``(1 + momentum)·h' - momentum·h`` (rounded as the twin's ``old *= -m`` and fused add)."""
    dt = w.dtype.type
    zero = dt(0)
    s, m, neg_m = dt(scale), dt(momentum), dt(-momentum)
    one_m = np.float64(np.float32(1.0 + momentum))
    ws, gs, hs = w[a:b], g[a:b], h[a:b]       # slices from 0, as in sgd_step: the loop vectorises
    for i in range(b - a):
        gi = gs[i]
        if normalize:
            gi = gi * s
        if decay != 0.0:
            gi = dt(np.float64(decay) * np.float64(ws[i]) + np.float64(gi))
        old = hs[i]
        hi = old * m
        hi = dt(np.float64(rate) * np.float64(gi) + np.float64(hi))
        hs[i] = hi
        u = dt(one_m * np.float64(hi) + np.float64(old * neg_m))
        gs[i] = zero if clear else u
        ws[i] = ws[i] - u


# --- a residual block's Eltwise SUM + ReLU, backward (train_fusion.EltwiseSumReluChain) -----------
#
# The twin is the two layers run one by one: ReLU's ``dy · (y > 0)`` (NumPy casts the mask to the
# arrays' dtype, 1 or 0, and multiplies: a negative gradient times 0 is -0.0, a NaN stays NaN), then
# the Eltwise's ``g = d`` or ``g = d · coeff`` per bottom (coeff rounded to the dtype first, as
# NumPy does with a Python float). Here ``g = d · coeff`` always: times 1 it is ``d``, bit for bit.

def relu_backward(y, dy, dx, a, b):
    """Elements ``a:b`` of a ReLU's gradient (no negative slope): ``dx = dy · (y > 0)``, ``dx`` may be
    ``dy`` (in place). Its twin: ``layers/activation.ReLU.gradient``'s mask and multiply, whose
    products this makes with the same bits (a negative gradient times zero is -0.0, NaN stays NaN).
    Why: the twin writes the mask, then reads it back with ``dy``, two passes; this is one."""
    dt = dy.dtype.type
    one, zero = dt(1), dt(0)
    ys, dys, dxs = y[a:b], dy[a:b], dx[a:b]
    for i in range(b - a):
        dxs[i] = dys[i] * (one if ys[i] > 0 else zero)


def eltwise_sum_relu_backward(dy, y, g0, coeff0, g1, coeff1, both, keep_dy, a, b):
    """Elements ``a:b``: ``d = dy · (y > 0)``; ``g0 = d · coeff0`` and, when ``both``,
    ``g1 = d · coeff1``; ``dy = d`` when ``keep_dy`` (what the ReLU leaves in its in-place diff).
    One loop per case, so each vectorises (slices from 0, as in ``sgd_step``)."""
    dt = dy.dtype.type
    one, zero = dt(1), dt(0)
    k0, k1 = dt(coeff0), dt(coeff1)
    dys, ys, g0s, g1s = dy[a:b], y[a:b], g0[a:b], g1[a:b]
    n = b - a
    if both and keep_dy:
        for i in range(n):
            d = dys[i] * (one if ys[i] > 0 else zero)
            dys[i] = d
            g0s[i] = d * k0
            g1s[i] = d * k1
    elif both:
        for i in range(n):
            d = dys[i] * (one if ys[i] > 0 else zero)
            g0s[i] = d * k0
            g1s[i] = d * k1
    elif keep_dy:
        for i in range(n):
            d = dys[i] * (one if ys[i] > 0 else zero)
            dys[i] = d
            g0s[i] = d * k0
    else:
        for i in range(n):
            g0s[i] = dys[i] * (one if ys[i] > 0 else zero) * k0


# --- Winograd tile transforms: F(4x4, 3x3) and F(2x2, 5x5) (winograd._band_channels_last) ---
#
# Both read 6x6 input tiles and use the same five finite points, so their input transform B^T is
# the same matrix (winograd.matrices): ``winograd6_input`` serves both, tiles ``step`` apart (4 or 2).
#
# The NumPy path computes these transforms as stacked 6x6 GEMMs, which add in BLAS's order. These
# loops use the transform matrices' few non-zero terms, written out, so they add in another order:
# they agree with the NumPy path to float32 rounding, and the engine tests check them against the
# convolution reference as they check every engine. Every tile is computed alone, so the bits do
# not depend on how the tile rows are split over threads. The innermost loop runs over channels,
# which are contiguous in both layouts, so it vectorises.
#
# B^T (points 0, 1, -1, 1/2, -2; winograd.matrices):
#   [1 -3/2 -2  3/2  1  0], [0 -1 1/2 5/2 1 0], [0 -1 5/2 -1/2 -1 0],
#   [0  2   1  -2  -1  0], [0 1/2 -1 -1/2 1 0], [0  1 -3/2 -2  3/2 1]
# A^T: [1 1 1 1 1 0], [0 1 -1 1/2 -2 0], [0 1 1 1/4 4 0], [0 1 -1 1/8 -8 1]  (F(4x4, 3x3))
# A^T: [1 1 1 1 1 0], [0 1 -1 1/2 -2 1]                                        (F(2x2, 5x5))

def winograd6_input(src, v, t0, rows, tw, i0, i1, step):
    """Items ``i0:i1`` of a band starting at tile row ``t0`` of ``rows``, item ``n * rows + r`` being
    image n's tile row r (a pool's chunk of them, ``_tile_row_items``): ``v[i * 6 + j, tile, c]``
    = (B^T d B)[i, j] of each 6x6 tile ``d`` of ``src``, the padded input channels last (n, row,
    column, c; winograd._source_channels_last), tiles ``step`` apart (4: F(4x4, 3x3), 2: F(2x2,
    5x5)), ordered (image, band row, tile column)."""
    cin = src.shape[3]
    dt = src.dtype.type
    h, t1, t2, t5 = dt(0.5), dt(1.5), dt(2.0), dt(2.5)
    t = np.empty((6, 6, cin), src.dtype)
    for n in range(i0 // rows, -(-i1 // rows)):
        for r in range(max(i0 - n * rows, 0), min(i1 - n * rows, rows)):
            base = step * (t0 + r)
            for q in range(tw):
                col = (n * rows + r) * tw + q
                x0 = step * q
                for i in range(6):          # B^T along each of the tile's rows
                    for c in range(cin):
                        d0 = src[n, base + i, x0 + 0, c]
                        d1 = src[n, base + i, x0 + 1, c]
                        d2 = src[n, base + i, x0 + 2, c]
                        d3 = src[n, base + i, x0 + 3, c]
                        d4 = src[n, base + i, x0 + 4, c]
                        d5 = src[n, base + i, x0 + 5, c]
                        t[i, 0, c] = d0 - t1 * d1 - t2 * d2 + t1 * d3 + d4
                        t[i, 1, c] = -d1 + h * d2 + t5 * d3 + d4
                        t[i, 2, c] = -d1 + t5 * d2 - h * d3 - d4
                        t[i, 3, c] = t2 * d1 + d2 - t2 * d3 - d4
                        t[i, 4, c] = h * d1 - d2 - h * d3 + d4
                        t[i, 5, c] = d1 - t1 * d2 - t2 * d3 + t1 * d4 + d5
                for j in range(6):          # then down each column
                    for c in range(cin):
                        d0, d1, d2 = t[0, j, c], t[1, j, c], t[2, j, c]
                        d3, d4, d5 = t[3, j, c], t[4, j, c], t[5, j, c]
                        v[j, col, c] = d0 - t1 * d1 - t2 * d2 + t1 * d3 + d4
                        v[6 + j, col, c] = -d1 + h * d2 + t5 * d3 + d4
                        v[12 + j, col, c] = -d1 + t5 * d2 - h * d3 - d4
                        v[18 + j, col, c] = t2 * d1 + d2 - t2 * d3 - d4
                        v[24 + j, col, c] = h * d1 - d2 - h * d3 + d4
                        v[30 + j, col, c] = d1 - t1 * d2 - t2 * d3 + t1 * d4 + d5


def channels_last_source(x, src, pad_h, pad_w, i0, i1):
    """Rows ``i0:i1`` (image n's padded row r is item ``n * rows + r``) of ``x`` (n, cin, h, w)
    padded and channels last in ``src`` (n, rows, cols, cin): ``src[n, r, q, c] = x[n, c, r - pad_h,
    q - pad_w]``, zero outside ``x``: the compiled Winograd transforms' input
    (winograd._source_channels_last, whose OpenCV transposes and NumPy copies are the twin; a copy,
    so the same bits). ``x`` may be a group's channels of a blob (its rows contiguous). Why: the twin transposes each image into a scratch image, then copies it into
    the padded rows, two passes; this reads each value once, a column of every channel at a time
    (the channels' rows stay in cache across the columns), and writes each padded row once.
    GoogLeNet's conv2/3x3 gradient at batch 16 (16x192x56x56) took 6.35 ms that way, 5.43 this way
    (2 cores); ResNet-50's 8x256x14x14 0.56 and 0.18, CaffeNet's 32x384x13x13 1.61 and 0.53."""
    num, cin, h, w = x.shape
    rows, cols = src.shape[1], src.shape[2]
    zero = src.dtype.type(0)
    q0 = min(max(pad_w, 0), cols)               # src's columns q0:q1 hold x's columns
    q1 = min(max(pad_w + w, q0), cols)
    for item in range(i0, i1):
        n = item // rows
        r = item - n * rows
        xr = r - pad_h
        row = src[n, r]
        if xr < 0 or xr >= h:
            for q in range(cols):
                for c in range(cin):
                    row[q, c] = zero
            continue
        for q in range(q0):
            for c in range(cin):
                row[q, c] = zero
        for q in range(q1, cols):
            for c in range(cin):
                row[q, c] = zero
        for q in range(q0, q1):
            col = q - pad_w
            for c in range(cin):
                row[q, c] = x[n, c, xr, col]


def space_to_depth_source(x, src, step, pad_h, pad_w, n0, n1):
    """Images ``n0:n1`` of a strided convolution's input ``x`` (n, cin, h, w) as the stride-1
    Winograd's padded channels-last source ``src`` (n, rows, cols, cin * step * step): ``src[n, i,
    j, (c * step + a) * step + b] = x[n, c, step * i + a - pad_h, step * j + b - pad_w]``, zero
    outside ``x`` (kernels/space_to_depth.py). Its twin: ``space_to_depth.source_numpy``."""
    num, cin, h, w = x.shape
    rows, cols = src.shape[1], src.shape[2]
    zero = src.dtype.type(0)
    for n in range(n0, n1):
        for i in range(rows):
            for a in range(step):
                r = step * i + a - pad_h
                inside = 0 <= r < h
                for j in range(cols):
                    for c in range(cin):
                        k = (c * step + a) * step
                        for b in range(step):
                            q = step * j + b - pad_w
                            if inside and 0 <= q < w:
                                src[n, i, j, k + b] = x[n, c, r, q]
                            else:
                                src[n, i, j, k + b] = zero


def winograd4_output(m, y, t0, rows, i0, i1):
    """Items ``i0:i1`` (image n's tile row r is item ``n * rows + r``) of a band of ``rows`` tile
    rows starting at tile row ``t0``: ``y[n, k, 4 (t0 + r) + a, 4 q + b]`` = (A^T M A)[a, b] of each
    tile's products ``m[:, tile, k]`` (36, tiles, cout), cropped at ``y``'s height and width, ``y``
    the channels-first output (n, cout, oh, ow). An item's four output rows are computed
    vectorised over channels into a buffer of its own, then copied into ``y`` a channel row at a
    time (``_rows_into_channels_first``: contiguous stores from the buffer in cache). Why: the
    channels-last band that this wrote before, transposed into ``y`` afterwards (OpenCV's
    transposes, winograd._into_y, still the NumPy twins' way), wrote and read the whole output
    once more: a band's output stage took 1.15 ms that way and 0.75 this way (GoogLeNet's
    conv2/3x3 at batch 16, 2 tile rows, 2 cores), 1.26 and 0.85 on 16x128x28x28."""
    num, cout = y.shape[0], y.shape[1]
    tw = m.shape[1] // (num * rows)
    dt = m.dtype.type
    h, q4, e, f4, t2, e8 = dt(0.5), dt(0.25), dt(0.125), dt(4.0), dt(2.0), dt(8.0)
    s = np.empty((4, 6, cout), m.dtype)
    buf = np.empty((4, 4 * tw, cout), m.dtype)
    for n in range(i0 // rows, -(-i1 // rows)):
        for r in range(max(i0 - n * rows, 0), min(i1 - n * rows, rows)):
            for q in range(tw):
                col = (n * rows + r) * tw + q
                for j in range(6):          # A^T down each column
                    for k in range(cout):
                        m0, m1, m2 = m[j, col, k], m[6 + j, col, k], m[12 + j, col, k]
                        m3, m4, m5 = m[18 + j, col, k], m[24 + j, col, k], m[30 + j, col, k]
                        s[0, j, k] = m0 + m1 + m2 + m3 + m4
                        s[1, j, k] = m1 - m2 + h * m3 - t2 * m4
                        s[2, j, k] = m1 + m2 + q4 * m3 + f4 * m4
                        s[3, j, k] = m1 - m2 + e * m3 - e8 * m4 + m5
                x0 = 4 * q
                for a in range(4):          # then along each row, into the item's buffer
                    for k in range(cout):
                        m0, m1, m2 = s[a, 0, k], s[a, 1, k], s[a, 2, k]
                        m3, m4, m5 = s[a, 3, k], s[a, 4, k], s[a, 5, k]
                        buf[a, x0, k] = m0 + m1 + m2 + m3 + m4
                        buf[a, x0 + 1, k] = m1 - m2 + h * m3 - t2 * m4
                        buf[a, x0 + 2, k] = m1 + m2 + q4 * m3 + f4 * m4
                        buf[a, x0 + 3, k] = m1 - m2 + e * m3 - e8 * m4 + m5
            _rows_into_channels_first(buf, y, n, 4 * (t0 + r))


def _rows_into_channels_first(buf, y, n, y0):
    """An output item's rows ``buf`` (rows, columns, cout) into image ``n`` of ``y`` (n, cout, oh,
    ow) from row ``y0`` on, cropped at ``oh`` and ``ow``: a channel row at a time, contiguous
    stores (the buffer is in cache)."""
    _, cout, oh, ow = y.shape
    for a in range(min(buf.shape[0], oh - y0)):
        for k in range(cout):
            for x in range(ow):
                y[n, k, y0 + a, x] = buf[a, x, k]


# --- Winograd F(4x4, 3x3)'s weight gradient (kernels/winograd.py's weight_gradient) --------------
#
# The gradient of the filters is the F(3x3, 4x4) transpose of the forward's algorithm: the input's
# tiles transformed as in the forward (winograd6_input), dy's 4x4 tiles by A (u = A^T' dy A^T,
# below), 36 GEMMs over the tiles, and G^T M G back to 3x3. dy stays channels first: a tile row of
# one channel is contiguous in dy and becomes a contiguous run of every position's (cout, tiles)
# matrix, the GEMMs' left operand as BLAS reads it fastest (no transposed view: 70 against 54
# GFLOP/s on one core, 256x256 channels over 784 tiles).

def winograd4_gradient_tiles(dy, u, t0, rows, tw, c0, c1):
    """Channels ``c0:c1``: ``u[i * 6 + j, c, (n * rows + r) * tw + q]`` = (A dy A^T)[i, j] of dy's
    4x4 tile at tile row ``t0 + r``, column ``q`` (zero past the map's edge), A^T the forward's
    4x6 output transform. Its twin is winograd._gradient_tiles_numpy, the same operations on whole
    arrays: the same bits."""
    num, oh, ow = dy.shape[0], dy.shape[2], dy.shape[3]
    dt = dy.dtype.type
    h, q4, e, t2, f4, e8 = dt(0.5), dt(0.25), dt(0.125), dt(2.0), dt(4.0), dt(8.0)
    z = dt(0.0)
    t = np.zeros((4, 6, tw), dy.dtype)      # A^T' along each of the tile rows' four rows
    ragged = ow < 4 * tw
    padded = np.zeros(4 * tw, dy.dtype)     # a row cut by the map's edge, zeros after it
    for n in range(num):
        for c in range(c0, c1):
            for r in range(rows):
                col0 = (n * rows + r) * tw
                for a in range(4):
                    y = 4 * (t0 + r) + a
                    if y >= oh:
                        t[a, :, :] = z
                        continue
                    row = dy[n, c, y]
                    if ragged:
                        padded[:ow] = row
                        row = padded
                    ta = t[a]
                    for q in range(tw):             # no branch in the loop, so it vectorises
                        y0, y1, y2, y3 = row[4 * q], row[4 * q + 1], row[4 * q + 2], row[4 * q + 3]
                        ta[0, q] = y0
                        ta[1, q] = y0 + y1 + y2 + y3
                        ta[2, q] = y0 - y1 + y2 - y3
                        ta[3, q] = y0 + h * y1 + q4 * y2 + e * y3
                        ta[4, q] = y0 - t2 * y1 + f4 * y2 - e8 * y3
                        ta[5, q] = y3
                for j in range(6):          # then down each column, into every position's run
                    r0, r1, r2, r3 = t[0, j], t[1, j], t[2, j], t[3, j]
                    u0, u1, u2 = u[j, c, col0:col0 + tw], u[6 + j, c, col0:col0 + tw], u[12 + j, c, col0:col0 + tw]
                    u3, u4, u5 = u[18 + j, c, col0:col0 + tw], u[24 + j, c, col0:col0 + tw], u[30 + j, c, col0:col0 + tw]
                    for q in range(tw):
                        y0, y1, y2, y3 = r0[q], r1[q], r2[q], r3[q]
                        u0[q] = y0
                        u1[q] = y0 + y1 + y2 + y3
                        u2[q] = y0 - y1 + y2 - y3
                        u3[q] = y0 + h * y1 + q4 * y2 + e * y3
                        u4[q] = y0 - t2 * y1 + f4 * y2 - e8 * y3
                        u5[q] = y3


def winograd4_gradient_tiles_cl(src, off_h, off_w, u, t0, rows, tw, i0, i1):
    """``winograd4_gradient_tiles`` from a channels-last dy and into channels-last tiles: items
    ``i0:i1`` of the band (item ``n * rows + r``: image n, tile row ``t0 + r``), ``u[i * 6 + j,
    item * tw + q, c]`` = (A dy A^T)[i, j] of channel c's 4x4 tile at that row, column ``q``. dy is
    read from ``src`` (n, hp, wp, cout), dy[n, c, y, x] at ``src[n, off_h + y, off_w + x, c]``,
    zeros past the map's edge (``winograd._source_channels_last``'s padding): the data gradient's
    own padded dy, or one made for this. Why: channels first, a tile row of a 14-wide map is four
    values (runs of ``tw``); here each of the kernel's loops runs over the channels. The same
    operations on each value as ``winograd4_gradient_tiles``: the same bits, transposed."""
    cout = src.shape[3]
    dt = src.dtype.type
    h, q4, e, t2, f4, e8 = dt(0.5), dt(0.25), dt(0.125), dt(2.0), dt(4.0), dt(8.0)
    t = np.empty((4, 6, cout), src.dtype)   # A^T' along each of the tile's four rows
    for i in range(i0, i1):
        n = i // rows
        y = off_h + 4 * (t0 + i - n * rows)
        for q in range(tw):
            col = i * tw + q
            x0 = off_w + 4 * q
            for a in range(4):
                row = src[n, y + a]
                s0, s1, s2, s3 = row[x0], row[x0 + 1], row[x0 + 2], row[x0 + 3]
                ta = t[a]
                for c in range(cout):
                    y0, y1, y2, y3 = s0[c], s1[c], s2[c], s3[c]
                    ta[0, c] = y0
                    ta[1, c] = y0 + y1 + y2 + y3
                    ta[2, c] = y0 - y1 + y2 - y3
                    ta[3, c] = y0 + h * y1 + q4 * y2 + e * y3
                    ta[4, c] = y0 - t2 * y1 + f4 * y2 - e8 * y3
                    ta[5, c] = y3
            for j in range(6):          # then down each column
                r0, r1, r2, r3 = t[0, j], t[1, j], t[2, j], t[3, j]
                u0, u1, u2 = u[j, col], u[6 + j, col], u[12 + j, col]
                u3, u4, u5 = u[18 + j, col], u[24 + j, col], u[30 + j, col]
                for c in range(cout):
                    y0, y1, y2, y3 = r0[c], r1[c], r2[c], r3[c]
                    u0[c] = y0
                    u1[c] = y0 + y1 + y2 + y3
                    u2[c] = y0 - y1 + y2 - y3
                    u3[c] = y0 + h * y1 + q4 * y2 + e * y3
                    u4[c] = y0 - t2 * y1 + f4 * y2 - e8 * y3
                    u5[c] = y3


def winograd_filter_gradient(m, g, dw, o0, o1):
    """Output channels ``o0:o1``: ``dw[o, i] += G^T M G`` of the n*n products ``m[:, o, i]`` (n*n,
    cout, cin), ``g`` the forward's n x r filter transform G in dw's dtype: F(4x4, 3x3)'s and
    F(2x2, 5x5)'s 6 x 3 and 6 x 5, F(3x3, 5x5)'s 7 x 5. Each sum over the n positions adds its
    products in position order, vectorised over input channels. Its twin is a GEMM with kron(G, G)
    (winograd._filter_gradient_numpy), which adds in BLAS's order: they agree to rounding."""
    n, r = g.shape
    cin = m.shape[2]
    s = np.empty((n, r, cin), m.dtype)      # G^T along each row of M, for every input channel
    t = np.empty(cin, m.dtype)              # one tap's sum, for every input channel
    for o in range(o0, o1):
        for j in range(n):
            for k in range(r):
                g0 = g[0, k]
                for i in range(cin):
                    s[j, k, i] = g0 * m[j, o, i]
                for p in range(1, n):
                    gp = g[p, k]
                    for i in range(cin):
                        s[j, k, i] += gp * m[p * n + j, o, i]
        for k in range(r):
            for l in range(r):
                g0 = g[0, l]
                for i in range(cin):
                    t[i] = g0 * s[0, k, i]
                for p in range(1, n):
                    gp = g[p, l]
                    for i in range(cin):
                        t[i] += gp * s[p, k, i]
                for i in range(cin):
                    dw[o, i, k, l] += t[i]


# --- Winograd F(2x2, 5x5): the output transform and the weight gradient's dy tiles ------------------

def winograd2x5_output(m, y, t0, rows, i0, i1):
    """Items ``i0:i1`` of a band of ``rows`` tile rows from tile row ``t0``: ``y[n, k, 2 (t0 + r) +
    a, 2 q + b]`` = (A^T M A)[a, b] of each tile's products ``m[:, tile, k]`` (36, tiles, cout), A^T
    F(2x2, 5x5)'s 2x6, into the channels-first ``y`` through a buffer as ``winograd4_output``."""
    num, cout = y.shape[0], y.shape[1]
    tw = m.shape[1] // (num * rows)
    dt = m.dtype.type
    h, t2 = dt(0.5), dt(2.0)
    s = np.empty((2, 6, cout), m.dtype)
    buf = np.empty((2, 2 * tw, cout), m.dtype)
    for n in range(i0 // rows, -(-i1 // rows)):
        for r in range(max(i0 - n * rows, 0), min(i1 - n * rows, rows)):
            for q in range(tw):
                col = (n * rows + r) * tw + q
                for j in range(6):          # A^T down each column
                    for k in range(cout):
                        m0, m1, m2 = m[j, col, k], m[6 + j, col, k], m[12 + j, col, k]
                        m3, m4, m5 = m[18 + j, col, k], m[24 + j, col, k], m[30 + j, col, k]
                        s[0, j, k] = m0 + m1 + m2 + m3 + m4
                        s[1, j, k] = m1 - m2 + h * m3 - t2 * m4 + m5
                x0 = 2 * q
                for a in range(2):          # then along each row, into the item's buffer
                    for k in range(cout):
                        m0, m1, m2 = s[a, 0, k], s[a, 1, k], s[a, 2, k]
                        m3, m4, m5 = s[a, 3, k], s[a, 4, k], s[a, 5, k]
                        buf[a, x0, k] = m0 + m1 + m2 + m3 + m4
                        buf[a, x0 + 1, k] = m1 - m2 + h * m3 - t2 * m4 + m5
            _rows_into_channels_first(buf, y, n, 2 * (t0 + r))


def winograd2x5_gradient_tiles(dy, u, t0, rows, tw, c0, c1):
    """Channels ``c0:c1``: ``u[i * 6 + j, c, (n * rows + r) * tw + q]`` = (A dy A^T)[i, j] of dy's
    2x2 tile at tile row ``t0 + r``, column ``q`` (zero past the map's edge), A^T F(2x2, 5x5)'s
    2x6 output transform: the F(5x5, 2x2) weight gradient's dy side (as winograd4_gradient_tiles
    for 3x3). Its twin is winograd._gradient_tiles2_numpy, the same operations: the same bits."""
    num, oh, ow = dy.shape[0], dy.shape[2], dy.shape[3]
    dt = dy.dtype.type
    h, t2 = dt(0.5), dt(2.0)
    z = dt(0.0)
    t = np.zeros((2, 6, tw), dy.dtype)      # A^T' along each of the tile rows' two rows
    ragged = ow < 2 * tw
    padded = np.zeros(2 * tw, dy.dtype)     # a row cut by the map's edge, zeros after it
    for n in range(num):
        for c in range(c0, c1):
            for r in range(rows):
                col0 = (n * rows + r) * tw
                for a in range(2):
                    y = 2 * (t0 + r) + a
                    if y >= oh:
                        t[a, :, :] = z
                        continue
                    row = dy[n, c, y]
                    if ragged:
                        padded[:ow] = row
                        row = padded
                    ta = t[a]
                    for q in range(tw):             # no branch in the loop, so it vectorises
                        y0, y1 = row[2 * q], row[2 * q + 1]
                        ta[0, q] = y0
                        ta[1, q] = y0 + y1
                        ta[2, q] = y0 - y1
                        ta[3, q] = y0 + h * y1
                        ta[4, q] = y0 - t2 * y1
                        ta[5, q] = y1
                for j in range(6):          # then down each column, into every position's run
                    r0, r1 = t[0, j], t[1, j]
                    u0, u1, u2 = u[j, c, col0:col0 + tw], u[6 + j, c, col0:col0 + tw], u[12 + j, c, col0:col0 + tw]
                    u3, u4, u5 = u[18 + j, c, col0:col0 + tw], u[24 + j, c, col0:col0 + tw], u[30 + j, c, col0:col0 + tw]
                    for q in range(tw):
                        y0, y1 = r0[q], r1[q]
                        u0[q] = y0
                        u1[q] = y0 + y1
                        u2[q] = y0 - y1
                        u3[q] = y0 + h * y1
                        u4[q] = y0 - t2 * y1
                        u5[q] = y1


# --- Winograd F(3x3, 5x5): 7x7 input tiles three apart (winograd._band_channels_last) ---------
#
# Six finite points 0, 1, -1, 1/2, -2, 2 (winograd.POINTS3X5): each 3x3 block of outputs from a 7x7
# input tile, 49 products where F(2x2, 5x5) makes 81 for the same nine outputs (36 per 2x2 block) and
# im2col + GEMM 225. As above, the matrices' non-zero terms written out, vectorised over channels;
# the NumPy twins (winograd._input_tiles_numpy, _output_numpy) compute the same transforms as einsums.
#
# B^T: [2 -4 -5/2 5 1/2 -1 0], [0 -2 2 9/2 -1/2 -1 0], [0 -2 6 -7/2 -3/2 1 0], [0 4 0 -5 0 1 0],
#      [0 1 -5/2 0 5/2 -1 0], [0 1 -3/2 -2 3/2 1 0], [0 -2 4 5/2 -5 -1/2 1]
# A^T: [1 1 1 1 1 1 0], [0 1 -1 1/2 -2 2 0], [0 1 1 1/4 4 4 1]

def winograd7_input(src, v, t0, rows, tw, i0, i1, step):
    """Items ``i0:i1`` of a band starting at tile row ``t0`` of ``rows`` (item ``n * rows + r`` is
    image n's tile row r): ``v[i * 7 + j, tile, c]`` = (B^T d B)[i, j] of each 7x7 tile ``d`` of
    ``src`` (n, row, column, c; channels last), tiles ``step`` (3) apart, ordered (image, band row,
    tile column)."""
    cin = src.shape[3]
    dt = src.dtype.type
    h, t15, t2, t25, t35, t4, t45, t5, t6 = (dt(0.5), dt(1.5), dt(2.0), dt(2.5), dt(3.5), dt(4.0),
                                             dt(4.5), dt(5.0), dt(6.0))
    t = np.empty((7, 7, cin), src.dtype)
    for n in range(i0 // rows, -(-i1 // rows)):
        for r in range(max(i0 - n * rows, 0), min(i1 - n * rows, rows)):
            base = step * (t0 + r)
            for q in range(tw):
                col = (n * rows + r) * tw + q
                x0 = step * q
                for i in range(7):          # B^T along each of the tile's rows
                    for c in range(cin):
                        d0 = src[n, base + i, x0 + 0, c]
                        d1 = src[n, base + i, x0 + 1, c]
                        d2 = src[n, base + i, x0 + 2, c]
                        d3 = src[n, base + i, x0 + 3, c]
                        d4 = src[n, base + i, x0 + 4, c]
                        d5 = src[n, base + i, x0 + 5, c]
                        d6 = src[n, base + i, x0 + 6, c]
                        t[i, 0, c] = t2 * d0 - t4 * d1 - t25 * d2 + t5 * d3 + h * d4 - d5
                        t[i, 1, c] = -t2 * d1 + t2 * d2 + t45 * d3 - h * d4 - d5
                        t[i, 2, c] = -t2 * d1 + t6 * d2 - t35 * d3 - t15 * d4 + d5
                        t[i, 3, c] = t4 * d1 - t5 * d3 + d5
                        t[i, 4, c] = d1 - t25 * d2 + t25 * d4 - d5
                        t[i, 5, c] = d1 - t15 * d2 - t2 * d3 + t15 * d4 + d5
                        t[i, 6, c] = -t2 * d1 + t4 * d2 + t25 * d3 - t5 * d4 - h * d5 + d6
                for j in range(7):          # then down each column
                    for c in range(cin):
                        d0, d1, d2, d3 = t[0, j, c], t[1, j, c], t[2, j, c], t[3, j, c]
                        d4, d5, d6 = t[4, j, c], t[5, j, c], t[6, j, c]
                        v[j, col, c] = t2 * d0 - t4 * d1 - t25 * d2 + t5 * d3 + h * d4 - d5
                        v[7 + j, col, c] = -t2 * d1 + t2 * d2 + t45 * d3 - h * d4 - d5
                        v[14 + j, col, c] = -t2 * d1 + t6 * d2 - t35 * d3 - t15 * d4 + d5
                        v[21 + j, col, c] = t4 * d1 - t5 * d3 + d5
                        v[28 + j, col, c] = d1 - t25 * d2 + t25 * d4 - d5
                        v[35 + j, col, c] = d1 - t15 * d2 - t2 * d3 + t15 * d4 + d5
                        v[42 + j, col, c] = -t2 * d1 + t4 * d2 + t25 * d3 - t5 * d4 - h * d5 + d6


def winograd3x5_output(m, y, t0, rows, i0, i1):
    """Items ``i0:i1`` of a band of ``rows`` tile rows from tile row ``t0``: ``y[n, k, 3 (t0 + r) +
    a, 3 q + b]`` = (A^T M A)[a, b] of each tile's products ``m[:, tile, k]`` (49, tiles, cout), A^T
    F(3x3, 5x5)'s 3x7, into the channels-first ``y`` through a buffer as ``winograd4_output``."""
    num, cout = y.shape[0], y.shape[1]
    tw = m.shape[1] // (num * rows)
    dt = m.dtype.type
    h, q4, t2, f4 = dt(0.5), dt(0.25), dt(2.0), dt(4.0)
    s = np.empty((3, 7, cout), m.dtype)
    buf = np.empty((3, 3 * tw, cout), m.dtype)
    for n in range(i0 // rows, -(-i1 // rows)):
        for r in range(max(i0 - n * rows, 0), min(i1 - n * rows, rows)):
            for q in range(tw):
                col = (n * rows + r) * tw + q
                for j in range(7):          # A^T down each column
                    for k in range(cout):
                        m0, m1, m2, m3 = m[j, col, k], m[7 + j, col, k], m[14 + j, col, k], m[21 + j, col, k]
                        m4, m5, m6 = m[28 + j, col, k], m[35 + j, col, k], m[42 + j, col, k]
                        s[0, j, k] = m0 + m1 + m2 + m3 + m4 + m5
                        s[1, j, k] = m1 - m2 + h * m3 - t2 * m4 + t2 * m5
                        s[2, j, k] = m1 + m2 + q4 * m3 + f4 * m4 + f4 * m5 + m6
                x0 = 3 * q
                for a in range(3):          # then along each row, into the item's buffer
                    for k in range(cout):
                        m0, m1, m2, m3 = s[a, 0, k], s[a, 1, k], s[a, 2, k], s[a, 3, k]
                        m4, m5, m6 = s[a, 4, k], s[a, 5, k], s[a, 6, k]
                        buf[a, x0, k] = m0 + m1 + m2 + m3 + m4 + m5
                        buf[a, x0 + 1, k] = m1 - m2 + h * m3 - t2 * m4 + t2 * m5
                        buf[a, x0 + 2, k] = m1 + m2 + q4 * m3 + f4 * m4 + f4 * m5 + m6
            _rows_into_channels_first(buf, y, n, 3 * (t0 + r))


def winograd3x5_gradient_tiles(dy, u, t0, rows, tw, c0, c1):
    """Channels ``c0:c1``: ``u[i * 7 + j, c, (n * rows + r) * tw + q]`` = (A dy A^T)[i, j] of dy's
    3x3 tile at tile row ``t0 + r``, column ``q`` (zero past the map's edge), A^T F(3x3, 5x5)'s
    3x7 output transform: the F(5x5, 3x3) weight gradient's dy side (as winograd2x5_gradient_tiles
    for 2x2 tiles). Its twin is winograd._gradient_tiles_numpy, the same operations: the same bits."""
    num, oh, ow = dy.shape[0], dy.shape[2], dy.shape[3]
    dt = dy.dtype.type
    h, q4, t2, f4 = dt(0.5), dt(0.25), dt(2.0), dt(4.0)
    z = dt(0.0)
    t = np.zeros((3, 7, tw), dy.dtype)      # A^T' along each of the tile rows' three rows
    ragged = ow < 3 * tw
    padded = np.zeros(3 * tw, dy.dtype)     # a row cut by the map's edge, zeros after it
    for n in range(num):
        for c in range(c0, c1):
            for r in range(rows):
                col0 = (n * rows + r) * tw
                for a in range(3):
                    y = 3 * (t0 + r) + a
                    if y >= oh:
                        t[a, :, :] = z
                        continue
                    row = dy[n, c, y]
                    if ragged:
                        padded[:ow] = row
                        row = padded
                    ta = t[a]
                    for q in range(tw):             # no branch in the loop, so it vectorises
                        y0, y1, y2 = row[3 * q], row[3 * q + 1], row[3 * q + 2]
                        ta[0, q] = y0
                        ta[1, q] = y0 + y1 + y2
                        ta[2, q] = y0 - y1 + y2
                        ta[3, q] = y0 + h * y1 + q4 * y2
                        ta[4, q] = y0 - t2 * y1 + f4 * y2
                        ta[5, q] = y0 + t2 * y1 + f4 * y2
                        ta[6, q] = y2
                for j in range(7):          # then down each column, into every position's run
                    r0, r1, r2 = t[0, j], t[1, j], t[2, j]
                    u0, u1 = u[j, c, col0:col0 + tw], u[7 + j, c, col0:col0 + tw]
                    u2, u3 = u[14 + j, c, col0:col0 + tw], u[21 + j, c, col0:col0 + tw]
                    u4, u5 = u[28 + j, c, col0:col0 + tw], u[35 + j, c, col0:col0 + tw]
                    u6 = u[42 + j, c, col0:col0 + tw]
                    for q in range(tw):
                        y0, y1, y2 = r0[q], r1[q], r2[q]
                        u0[q] = y0
                        u1[q] = y0 + y1 + y2
                        u2[q] = y0 - y1 + y2
                        u3[q] = y0 + h * y1 + q4 * y2
                        u4[q] = y0 - t2 * y1 + f4 * y2
                        u5[q] = y0 + t2 * y1 + f4 * y2
                        u6[q] = y2


def winograd3x5_gradient_tiles_cl(src, off_h, off_w, u, t0, rows, tw, i0, i1):
    """``winograd3x5_gradient_tiles`` from a channels-last dy and into channels-last tiles, as
    ``winograd4_gradient_tiles_cl`` is for F(4x4, 3x3): items ``i0:i1`` of the band (item ``n *
    rows + r``), ``u[i * 7 + j, item * tw + q, c]`` = (A dy A^T)[i, j] of channel c's 3x3 tile,
    dy[n, c, y, x] at ``src[n, off_h + y, off_w + x, c]`` (zeros past the map's edge). The same
    operations on each value: the same bits, transposed."""
    cout = src.shape[3]
    dt = src.dtype.type
    h, q4, t2, f4 = dt(0.5), dt(0.25), dt(2.0), dt(4.0)
    t = np.empty((3, 7, cout), src.dtype)   # A^T' along each of the tile's three rows
    for i in range(i0, i1):
        n = i // rows
        y = off_h + 3 * (t0 + i - n * rows)
        for q in range(tw):
            col = i * tw + q
            x0 = off_w + 3 * q
            for a in range(3):
                row = src[n, y + a]
                s0, s1, s2 = row[x0], row[x0 + 1], row[x0 + 2]
                ta = t[a]
                for c in range(cout):
                    y0, y1, y2 = s0[c], s1[c], s2[c]
                    ta[0, c] = y0
                    ta[1, c] = y0 + y1 + y2
                    ta[2, c] = y0 - y1 + y2
                    ta[3, c] = y0 + h * y1 + q4 * y2
                    ta[4, c] = y0 - t2 * y1 + f4 * y2
                    ta[5, c] = y0 + t2 * y1 + f4 * y2
                    ta[6, c] = y2
            for j in range(7):          # then down each column
                r0, r1, r2 = t[0, j], t[1, j], t[2, j]
                u0, u1, u2, u3 = u[j, col], u[7 + j, col], u[14 + j, col], u[21 + j, col]
                u4, u5, u6 = u[28 + j, col], u[35 + j, col], u[42 + j, col]
                for c in range(cout):
                    y0, y1, y2 = r0[c], r1[c], r2[c]
                    u0[c] = y0
                    u1[c] = y0 + y1 + y2
                    u2[c] = y0 - y1 + y2
                    u3[c] = y0 + h * y1 + q4 * y2
                    u4[c] = y0 - t2 * y1 + f4 * y2
                    u5[c] = y0 + t2 * y1 + f4 * y2
                    u6[c] = y2


# --- convolution epilogues (kernels/fusion.py's NumPy twins) -----------------------------------------
#
# One image's (C, positions) convolution output, while the GEMM that wrote it left it in cache: the
# folded BatchNorm/Scale factor and bias, then (Convolution + Eltwise SUM) the other summand, then
# ReLU, each element read and written once. The twins run them as whole-image passes. The ReLU is
# NumPy's ``maximum(v, 0)``: NaN stays NaN, -0.0 and every other value not above 0 becomes +0.0.

def convolution_epilogue(y, a, has_scale, b, has_bias, relu, r, out, summed, sum_relu):
    """``y = max(y·a[c] + b[c], 0)`` in place over ``y`` (C, P), each step only when its flag is set
    (a product, then a sum: rounded twice, as the twin's passes); then, when ``summed``,
    ``out = max(y + r, 0)`` (an Eltwise SUM's top, the ReLU when ``sum_relu``; ``r`` and ``out``
    (C, P) too, unused otherwise)."""
    zero = y.dtype.type(0)
    for c in range(y.shape[0]):
        ac, bc = a[c], b[c]
        for i in range(y.shape[1]):
            v = y[c, i]
            if has_scale or has_bias or relu:
                if has_scale:
                    v = v * ac
                if has_bias:
                    v = v + bc
                if relu and not (v > zero or v != v):
                    v = zero
                y[c, i] = v
            if summed:
                v = v + r[c, i]
                if sum_relu and not (v > zero or v != v):
                    v = zero
                out[c, i] = v


def epilogue_copy(y, b, has_bias, relu, out):
    """``out = max(y + b[c], 0)`` over (C, P) arrays, the sum only with ``has_bias``, the ReLU
    only with ``relu``: a stacked 1x1 group's rows copied into a member's top with its bias and
    ReLU (kernels/stacked_1x1.py), each element read and written once. The twin is NumPy's add
    (or copy) into ``out``, then its maximum in place: the same bits."""
    zero = y.dtype.type(0)
    for c in range(y.shape[0]):
        bc = b[c]
        for i in range(y.shape[1]):
            v = y[c, i]
            if has_bias:
                v = v + bc
            if relu and not (v > zero or v != v):
                v = zero
            out[c, i] = v


# --- InnerProduct's forward on a few rows (layers/inner_product.py; its twin is BLAS's GEMM) -------

def inner_product_rows(w, x, y, o0, o1):
    """``y[i, o] = w[o] · x[i]`` for outputs ``o0:o1``: each weight row read once, from memory, for
    the few rows of ``x``. Why: at 2-4 rows BLAS's GEMM packs the weights first, so it reads them
    twice; this reads them once. The rows go four weight rows by four rows of ``x`` at a time, 16
    sums side by side, so each value loaded serves four products: one weight row and one row of
    ``x`` at a time was bound by the loads, not by memory (VGG-16's fc6 at 4 rows on 2 cores: 36.6
    ms that way, 15.3 this way, against BLAS's 33). A ragged group repeats its last row (of ``w``
    or ``x``): that sum is computed twice and written once more, the same bits."""
    m, k = x.shape
    zero = y.dtype.type(0)
    for g in range(0, m, 4):
        r0, r1, r2, r3 = g, min(g + 1, m - 1), min(g + 2, m - 1), min(g + 3, m - 1)
        x0, x1, x2, x3 = x[r0], x[r1], x[r2], x[r3]
        for o in range(o0, o1, 4):
            oa, ob, oc, od = o, min(o + 1, o1 - 1), min(o + 2, o1 - 1), min(o + 3, o1 - 1)
            wa, wb, wc, wd = w[oa], w[ob], w[oc], w[od]
            s0a = s1a = s2a = s3a = s0b = s1b = s2b = s3b = zero
            s0c = s1c = s2c = s3c = s0d = s1d = s2d = s3d = zero
            for j in range(k):
                p, q, r, u = wa[j], wb[j], wc[j], wd[j]
                v0, v1, v2, v3 = x0[j], x1[j], x2[j], x3[j]
                s0a += p * v0
                s1a += p * v1
                s2a += p * v2
                s3a += p * v3
                s0b += q * v0
                s1b += q * v1
                s2b += q * v2
                s3b += q * v3
                s0c += r * v0
                s1c += r * v1
                s2c += r * v2
                s3c += r * v3
                s0d += u * v0
                s1d += u * v1
                s2d += u * v2
                s3d += u * v3
            y[r0, oa], y[r1, oa], y[r2, oa], y[r3, oa] = s0a, s1a, s2a, s3a
            y[r0, ob], y[r1, ob], y[r2, ob], y[r3, ob] = s0b, s1b, s2b, s3b
            y[r0, oc], y[r1, oc], y[r2, oc], y[r3, oc] = s0c, s1c, s2c, s3c
            y[r0, od], y[r1, od], y[r2, od], y[r3, od] = s0d, s1d, s2d, s3d


def inner_product_rows_backward(w, x, dy, dw, dx, want_dw, want_dx, j0, j1):
    """Input columns ``j0:j1`` of InnerProduct's backward on a few rows, in one pass over the
    weights: ``dw[o, j] += sum_i dy[i, o] x[i, j]`` (four rows' sum first, then added) and ``dx[i, j]
    = sum_o dy[i, o] w[o, j]`` (summed over outputs in order, into a block that stays in cache).
    Why: with 2-4 rows both products are bound by memory (VGG fc6's weights and their gradient are
    411 MB each), and BLAS ran them as two GEMMs and an add over a scratch band: the weights read
    once, the gradient read twice and written twice. Here each is read once and the gradient
    written once. Four rows of ``x`` at a time, each weight value loaded once for all eight
    products, in one loop (a loop per row and product was bound by its loads: VGG-16's fc6 at 4
    rows, 88 ms that way, 56 this way); a missing row is a zero row with a zero gradient, which
    adds nothing. Past four rows the weights are read once more for each four. Its twin is those
    GEMMs (BLAS's order): they agree to rounding."""
    m = x.shape[0]
    n = w.shape[0]
    step = 1024                     # a block of columns: 4 rows of x and of dx's sums in L1
    zero = dy.dtype.type(0)
    zeros = np.zeros(step, x.dtype)
    sums = np.empty((4, step), dx.dtype)        # dx's sums of a block, reused block after block
    for b0 in range(j0, j1, step):
        b1 = min(j1, b0 + step)
        nb = b1 - b0
        for g in range(0, m, 4):
            rows = min(4, m - g)
            acc = sums[:, :nb]
            acc[:] = 0
            c0, c1, c2, c3 = acc[0], acc[1], acc[2], acc[3]
            x0 = x[g, b0:b1]
            x1 = x[g + 1, b0:b1] if rows > 1 else zeros[:nb]
            x2 = x[g + 2, b0:b1] if rows > 2 else zeros[:nb]
            x3 = x[g + 3, b0:b1] if rows > 3 else zeros[:nb]
            for o in range(n):
                wrow = w[o, b0:b1]
                a0 = dy[g, o]
                a1 = dy[g + 1, o] if rows > 1 else zero
                a2 = dy[g + 2, o] if rows > 2 else zero
                a3 = dy[g + 3, o] if rows > 3 else zero
                if want_dw:
                    drow = dw[o, b0:b1]
                    if want_dx:
                        for t in range(nb):
                            v = wrow[t]
                            drow[t] += a0 * x0[t] + a1 * x1[t] + a2 * x2[t] + a3 * x3[t]
                            c0[t] += a0 * v
                            c1[t] += a1 * v
                            c2[t] += a2 * v
                            c3[t] += a3 * v
                    else:
                        for t in range(nb):
                            drow[t] += a0 * x0[t] + a1 * x1[t] + a2 * x2[t] + a3 * x3[t]
                else:
                    for t in range(nb):
                        v = wrow[t]
                        c0[t] += a0 * v
                        c1[t] += a1 * v
                        c2[t] += a2 * v
                        c3[t] += a3 * v
            if want_dx:
                for i in range(rows):
                    dx[g + i, b0:b1] = acc[i]


# --- row sums for BatchNorm's and Scale's kernels (ROW_HELPERS: compiled with 'reassoc') ----------

def _row_sum(a):
    """``Σ a`` in float64."""
    t = 0.0
    for j in range(a.shape[0]):
        t += a[j]
    return t


def _row_dot(a, b):
    """``Σ a·b`` in float64, each product rounded to the arrays' dtype first."""
    t = 0.0
    for j in range(a.shape[0]):
        t += a[j] * b[j]
    return t


def _row_scaled_dot(a, b, s):
    """``Σ a·(b·s)`` in float64, the products rounded to the arrays' dtype."""
    t = 0.0
    for j in range(a.shape[0]):
        t += a[j] * (b[j] * s)
    return t


def _row_centre(a, mu, out):
    """``out = a − mu`` (rounded to the dtype) and ``Σ (a − mu)²`` of those values in float64."""
    t = 0.0
    for j in range(a.shape[0]):
        d = a[j] - mu
        out[j] = d
        t += np.float64(d) * np.float64(d)
    return t


# --- BatchNorm's gradient with batch statistics (layers/normalization.py; its twin sums with einsum) -

def batch_norm_backward(dy, centred, inv_std, dx, c0, c1):
    """Channels ``c0:c1`` of (N, C, S) arrays: ``dx = (dy − mean(dy) − (x − mean)·mean(dy·(x − mean))
    /std²)/std``, two passes over each channel (its two sums, then ``dx``) where the twin makes about
    ten whole-array passes with temporaries. ``dx`` may be ``dy``. The sums run in float64, in
    another order than the twin's ``einsum`` (which NumPy does not fix either; ROW_HELPERS): the
    result agrees with the twin to float32 rounding; everything after the sums rounds as the twin
    does. Each channel is summed alone, so the bits do not depend on how channels are split over
    threads."""
    n, _, s = dy.shape
    m = n * s
    dt = dy.dtype.type
    for c in range(c0, c1):
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            s1 += _row_sum(dy[i, c])
            s2 += _row_dot(dy[i, c], centred[i, c])
        iv = inv_std[c]
        mean_dy = dt(s1 / m)
        k = (dt(s2 / m) * iv) * iv
        for i in range(n):
            for j in range(s):
                t = centred[i, c, j] * k
                t = t + mean_dy
                dx[i, c, j] = (dy[i, c, j] - t) * iv


# --- Scale's gradient (layers/normalization.py; its twin sums with einsum) ---------------------------

def scale_backward(dy, x, inv_std, s, dx, gb, gs, want_bias, want_scale, want_dx, c0, c1):
    """Channels ``c0:c1`` of (outer, C, inner) arrays: ``gb[c] = Σ dy`` (the bias's gradient),
    ``gs[c] = Σ dy·(x·inv_std[c])`` (the scale's; ``x·inv_std`` is the BatchNorm output the Scale
    read, rebuilt from what the BatchNorm kept, as the twin does; ``inv_std`` ones when ``x`` is the
    input itself) and ``dx = dy·s[c]`` (``dx`` may be ``dy``: a row's sums are taken before its
    ``dx`` is written). Each flag says whether its output is wanted. The sums run in float64, in
    another order than the twin's ``einsum`` (ROW_HELPERS): they agree to float32 rounding; ``dx``
    is the twin's product, bit for bit. Each channel is summed alone: the bits do not depend on how
    channels are split over threads."""
    n, _, inner = dy.shape
    dt = dy.dtype.type
    for c in range(c0, c1):
        sb = 0.0
        ss = 0.0
        iv = inv_std[c]
        sc = s[c]
        for i in range(n):
            if want_bias:
                sb += _row_sum(dy[i, c])
            if want_scale:
                ss += _row_scaled_dot(dy[i, c], x[i, c], iv)
            if want_dx:
                for j in range(inner):
                    dx[i, c, j] = dy[i, c, j] * sc
        if want_bias:
            gb[c] = dt(sb)
        if want_scale:
            gs[c] = dt(ss)


# --- BatchNorm (batch statistics) + Scale + ReLU in place on one blob, forward and backward ----------
# (kernels/train_fusion.py; the twins are the three layers run one after the other)

def batch_norm_scale_relu(x, centred, y, s, b, has_scale, has_bias, relu, eps, mean, var, inv_std,
                          c0, c1):
    """Channels ``c0:c1`` of (N, C, S) arrays: BatchNorm's forward with the batch's statistics, then
    Scale's ``·s[c] + b[c]`` and ReLU's ``max(·, 0)``, each only when its flag is set; ``y`` may be
    ``x`` (the layers in place on one blob). Writes ``centred = x − mean`` (what the BatchNorm keeps
    for its gradient), the channel's ``mean``, biased ``var`` and ``inv_std = 1/√(var + eps)``.
    Three passes over each channel, which stays in cache between them (ResNet-50's largest channel
    at batch 8 is 400 KB), where the separate layers make about nine passes through memory.

    Every step after the sums rounds as the twins do (a float32 product or sum, or its float64 value
    rounded once: the same bits); the two sums run in float64, in another order than the twin's
    ``einsum`` (ROW_HELPERS): mean and variance agree to float32 rounding. Each channel is summed
    alone, so the bits do not depend on how channels are split over threads."""
    n, _, sp = x.shape
    m = n * sp
    dt = x.dtype.type
    zero = dt(0)
    for c in range(c0, c1):
        s1 = 0.0
        for i in range(n):
            s1 += _row_sum(x[i, c])
        mu = dt(s1 / m)
        s2 = 0.0
        for i in range(n):
            s2 += _row_centre(x[i, c], mu, centred[i, c])
        v = dt(s2 / m)
        iv = dt(1.0) / dt(np.sqrt(np.float64(dt(v + dt(eps)))))
        mean[c] = mu
        var[c] = v
        inv_std[c] = iv
        sc = s[c]
        bc = b[c]
        for i in range(n):
            for j in range(sp):
                t = centred[i, c, j] * iv
                if has_scale:
                    t = t * sc
                if has_bias:
                    t = t + bc
                if relu and not (t > zero or t != t):
                    t = zero
                y[i, c, j] = t


def batch_norm_scale_relu_backward(dy, y, centred, inv_std, s, relu, dx, gb, gs, want_bias, c0, c1):
    """Channels ``c0:c1`` of (N, C, S) arrays: the gradient of ``batch_norm_scale_relu`` (with a
    scale) in two passes over each channel: ReLU's mask from its output ``y``, Scale's sums for the
    bias (``gb``, when ``want_bias``) and the scale (``gs``), BatchNorm's two sums; then
    ``dx``, which may be ``dy``. The same operations in the same order as the separate layers'
    compiled kernels (scale_backward, batch_norm_backward) after ReLU's ``dy·(y > 0)``, their sums
    through the same row helpers (over a row of the masked ``dy`` and one of ``dy·s``, each built in
    a scratch row): the same bits as those three layers run one by one with the kernels on."""
    n, _, sp = dy.shape
    m = n * sp
    dt = dy.dtype.type
    zero = dt(0)
    one = dt(1)
    d = np.empty(sp, dy.dtype)
    e = np.empty(sp, dy.dtype)
    for c in range(c0, c1):
        sb = 0.0
        ss = 0.0
        s1 = 0.0
        s2 = 0.0
        iv = inv_std[c]
        sc = s[c]
        for i in range(n):
            for j in range(sp):
                g = dy[i, c, j]
                if relu:
                    g = g * (one if y[i, c, j] > zero else zero)
                d[j] = g
                e[j] = g * sc
            sb += _row_sum(d)
            ss += _row_scaled_dot(d, centred[i, c], iv)
            s1 += _row_sum(e)
            s2 += _row_dot(e, centred[i, c])
        if want_bias:
            gb[c] = dt(sb)
        gs[c] = dt(ss)
        mean_dy = dt(s1 / m)
        k = (dt(s2 / m) * iv) * iv
        for i in range(n):
            for j in range(sp):
                g = dy[i, c, j]
                if relu:
                    g = g * (one if y[i, c, j] > zero else zero)
                cc = centred[i, c, j]
                t = cc * k
                t = t + mean_dy
                dx[i, c, j] = (g * sc - t) * iv


# --- LRN across channels (layers/lrn.py; its twin is the layer's NumPy passes) ---------------------

def _lrn_window_sum(ring, first, c_n, out):
    """``out`` = the sum over the window of rows of channels ``first .. first + size − 1`` in
    ``ring`` (channel c in row c % size; a channel outside 0..c_n−1 reads the last row, zeros), in
    the twin's order: the first two rows added, then each next (LRN._sum_padded, whose zero
    padding these zeros are: a zero added to −0.0 makes +0.0 there too)."""
    size = ring.shape[0] - 1
    sp = out.shape[0]
    rows = np.empty(size, np.intp)
    for o in range(size):
        ch = first + o
        rows[o] = ch % size if 0 <= ch < c_n else size
    a = ring[rows[0]]
    if size == 1:
        for j in range(sp):
            out[j] = a[j]
        return
    b = ring[rows[1]]
    for j in range(sp):
        out[j] = a[j] + b[j]
    for o in range(2, size):
        r = ring[rows[o]]
        for j in range(sp):
            out[j] = out[j] + r[j]


def lrn_across_forward(x, scale, pw, y, size, sum_scale, shift, beta_kind, keep, n0, n1):
    """Images ``n0:n1`` of (N, C, S) arrays: ``scale = shift + sum_scale·Σ x²`` over the ``size``
    channels centred on each (those outside the image count zero), ``pw = scale^beta`` and
    ``y = x / pw``; with ``keep`` False neither ``scale`` nor ``pw`` is written (a forward-only
    net: they go through two scratch rows). ``beta_kind`` is the power the twin takes with square
    roots (lrn._pow_into): 0 for beta 0.75 (sqrt(s)·sqrt(sqrt(s))), 1 for 0.5, 2 for 1; other betas
    keep the twin, whose np.power this would not match bit for bit.

    Each channel's squares are made once, into a ring of ``size`` rows, as the window moves down
    the channels, and the rest is one pass over the image, where the twin makes about fifteen
    whole-array passes. The same bits: the squares added in the twin's order (a zero for a channel
    outside the image changes no sum of squares), every step rounded to the dtype as NumPy rounds
    it, ``sum_scale`` and ``shift`` rounded to the dtype first (NumPy's rule for a Python float)."""
    _, c_n, sp = x.shape
    pre = (size - 1) // 2
    dt = x.dtype.type
    ss = dt(sum_scale)
    sh = dt(shift)
    ring = np.zeros((size + 1, sp), x.dtype)       # the last row: the zeros outside the image
    rows = np.empty((2, sp), x.dtype)               # scale and power when they are not kept
    for n in range(n0, n1):
        for c in range(-pre, c_n):
            ahead = c + pre
            if ahead < c_n:
                sq = ring[ahead % size]
                xr = x[n, ahead]
                for j in range(sp):
                    sq[j] = xr[j] * xr[j]
            if c < 0:
                continue
            acc = scale[n, c] if keep else rows[0]
            pr = pw[n, c] if keep else rows[1]
            _lrn_window_sum(ring, c - pre, c_n, acc)
            # each step a loop of its own, so that each vectorises
            for j in range(sp):
                acc[j] = acc[j] * ss
            for j in range(sp):
                acc[j] = acc[j] + sh
            if beta_kind == 0:
                for j in range(sp):
                    q = np.sqrt(acc[j])
                    pr[j] = q * np.sqrt(q)
            elif beta_kind == 1:
                for j in range(sp):
                    pr[j] = np.sqrt(acc[j])
            else:
                for j in range(sp):
                    pr[j] = acc[j]
            xr = x[n, c]
            yr = y[n, c]
            for j in range(sp):
                yr[j] = xr[j] / pr[j]


def lrn_across_backward(x, y, dy, scale, pw, dx, size, coeff, n0, n1):
    """Images ``n0:n1``: ``dx = dy / pw − coeff·x·Σ dy·y/scale`` over the channel window (the window
    is symmetric, so the channels whose windows hold c are those of c's own), ``coeff`` =
    2·beta·sum_scale, rounded to the dtype as NumPy rounds a Python float. The ratios ``dy·y/scale``
    are made once per channel into a ring of ``size`` rows as the window moves, the sum built in
    ``dx``'s row; the twin's operations in its order: the same bits."""
    _, c_n, sp = x.shape
    pre = (size - 1) // 2
    dt = x.dtype.type
    k = dt(coeff)
    ring = np.zeros((size + 1, sp), x.dtype)       # the last row: the zeros outside the image
    for n in range(n0, n1):
        for c in range(-pre, c_n):
            ahead = c + pre
            if ahead < c_n:
                r = ring[ahead % size]
                dr = dy[n, ahead]
                yr = y[n, ahead]
                sr = scale[n, ahead]
                for j in range(sp):
                    t = dr[j] * yr[j]
                    r[j] = t / sr[j]
            if c < 0:
                continue
            acc = dx[n, c]
            _lrn_window_sum(ring, c - pre, c_n, acc)
            xr = x[n, c]
            dr = dy[n, c]
            pr = pw[n, c]
            for j in range(sp):
                t = acc[j] * xr[j]
                t = t * k
                acc[j] = dr[j] / pr[j] - t


# --- MAX pooling's forward with its argmax (layers/pooling.py; its twin is Pooling._max_forward's
# four NumPy passes per window offset) -------------------------------------------------------------

def max_pool_argmax(xpad, y, code, starts, start, p0, p1):
    """Planes ``p0:p1`` of a block: ``y`` (planes, L) = the maximum over the windows, ``code``
    (planes, L) = the window offset code of each output's first maximum in row-major window order.
    ``xpad`` (planes, F) holds each plane padded with -inf in phase-plane order, where the values at
    window offset code ``k`` of the L outputs (in wide order) are the contiguous run
    ``xpad[p, starts[k]:starts[k] + L]`` (Pooling._window); ``start`` (L,) is the code each output
    starts from (its window's first real pixel). One pass per offset where the twin makes four
    (compare, maximum, two on the codes); the same bits: ``y`` follows ``np.maximum(y, v)`` (NaN
    wins; on a tie the new value, as NumPy returns its second operand) and a code moves to ``k``
    where ``v > y`` before the update, at least ``start`` (the twin's running maximum of codes)."""
    n_out = y.shape[1]
    ninf = y.dtype.type(-np.inf)
    ct = code.dtype.type
    for p in range(p0, p1):
        yr = y[p]
        cr = code[p]
        for t in range(n_out):
            yr[t] = ninf
            cr[t] = start[t]
        for k in range(starts.shape[0]):
            src = xpad[p, starts[k]:starts[k] + n_out]
            kk = ct(k)
            for t in range(n_out):
                v = src[t]
                yt = yr[t]
                c = cr[t]
                cr[t] = (kk if kk > c else c) if v > yt else c
                yr[t] = yt if (yt > v or yt != yt) else v


# --- AVE pooling's window sums (layers/pooling.py; the twins are its NumPy passes per offset) --------

def ave_pool_sum(xpad, acc, starts, p0, p1):
    """Planes ``p0:p1`` of a block: ``acc[p, t]`` = the sum of output ``t``'s window values, added in
    window-offset order from zero (``xpad``, ``starts``: as ``max_pool_argmax``'s, the padding
    zero): the twin's ``acc += window`` per offset, the same additions in the same order, so the
    same bits."""
    n_out = acc.shape[1]
    zero = acc.dtype.type(0)
    for p in range(p0, p1):
        ar = acc[p]
        for t in range(n_out):
            ar[t] = zero
        for k in range(starts.shape[0]):
            src = xpad[p, starts[k]:starts[k] + n_out]
            for t in range(n_out):
                ar[t] += src[t]


def ave_pool_spread(acc, g, starts, p0, p1):
    """Planes ``p0:p1`` of a block: each output's gradient ``g[p, t]`` (already divided by its
    window's size) added to every value of its window in the zeroed padded ``acc``, offset after
    offset: the twin's ``window += g`` per offset, the same bits."""
    n_out = g.shape[1]
    zero = acc.dtype.type(0)
    for p in range(p0, p1):
        ar = acc[p]
        for t in range(ar.shape[0]):
            ar[t] = zero
        gr = g[p]
        for k in range(starts.shape[0]):
            dst = ar[starts[k]:starts[k] + n_out]
            for t in range(n_out):
                dst[t] += gr[t]


# --- MAX pooling's backward (kernels/pooling_engines.py; its twin is one np.add.at per block) ------

def max_pool_scatter(dy, codes, table, dx, w, sh, sw, ph, pw, x, relu, p0, p1):
    """Planes ``p0:p1``: ``dx`` (planes, H·W) zeroed, then each output's gradient ``dy`` (planes,
    oh, ow) added at its argmax: the window's top-left corner ``(y·sh − ph)·W + x·sw − pw`` plus
    ``table[code]``, ``codes`` (planes, 1, oh, ow; any strides) the window offset codes. In output
    order, as the twin's ``np.add.at``: the same bits. Why: ``np.add.at`` holds the GIL, so the
    twin's blocks did not run in parallel (ResNet-50's pool1 backward at batch 8: 7.7 ms on one
    thread, 6.4 on two).

    ``relu``: also the gradient of a ReLU in place on the pool's bottom ``x`` (planes, H·W), as
    the twin's ``dx[x <= 0] = 0`` after the scatter: only argmaxes where ``x > 0`` get their
    gradient (kernels/train_fusion.py's ReluMaxPoolChain; the ReLU's own pass would leave -0.0
    where a negative sum meets ``x <= 0``, this +0.0)."""
    _, oh, ow = dy.shape
    hw = dx.shape[1]
    zero = dx.dtype.type(0)
    for p in range(p0, p1):
        for t in range(hw):
            dx[p, t] = zero
        for yy in range(oh):
            row = (yy * sh - ph) * w - pw
            for xx in range(ow):
                i = row + xx * sw + table[codes[p, 0, yy, xx]]
                if not relu or x[p, i] > zero:
                    dx[p, i] += dy[p, yy, xx]
