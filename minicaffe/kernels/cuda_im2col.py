"""im2col / col2im on the GPU: one kernel launch each for a whole chunk of images.

Why: the array-code im2col (``minicaffe.kernels.im2col``) is shaped for NumPy on the CPU (cache-sized
blocks of channels in col2im, a padded copy first), which on a GPU becomes hundreds of tiny
launches per layer. Here each output element is computed by one thread:

* ``im2col``: ``col[c, i, j, n, y, x] = x[n, c, y*sh - ph + i*dh, x*sw - pw + j*dw]`` (0 outside),
  the same ``(C, kh, kw, N, oh, ow)`` layout the CPU code builds, so the GEMMs are unchanged;
* ``col2im``: each image element gathers (no atomics, so the result is deterministic) the column
  entries whose window covers it, kernel offsets in row-major order, as the CPU code sums them.

The GPU engines of ``minicaffe.kernels.conv_engines`` (``cuda_im2col``, and ``gemm_1x1`` for its
weight gradient) call these; the layers' own reference code never does.
"""
import numpy as np

from ..core import backend
from . import _cuda, emulation

_DIMS = "long long n, long long c, long long h, long long w, long long kh, long long kw, " \
        "long long sh, long long sw, long long ph, long long pw, long long dh, long long dw, " \
        "long long oh, long long ow"

IM2COL = "minicaffe_im2col"
COL2IM = "minicaffe_col2im"

_IM2COL_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, __T__* col, long long total, ''' + _DIMS + r''') {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        long long t = idx;
        const long long ox = t % ow; t /= ow;
        const long long oy = t % oh; t /= oh;
        const long long in = t % n; t /= n;
        const long long j = t % kw; t /= kw;
        const long long i = t % kh;
        const long long ic = t / kh;
        const long long iy = oy * sh - ph + i * dh;
        const long long ix = ox * sw - pw + j * dw;
        col[idx] = (iy >= 0 && iy < h && ix >= 0 && ix < w)
                   ? x[((in * c + ic) * h + iy) * w + ix] : (__T__)0;
    }
}
'''

_COL2IM_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* col, __T__* x, long long total, ''' + _DIMS + r''') {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        long long t = idx;
        const long long ix = t % w; t /= w;
        const long long iy = t % h; t /= h;
        const long long ic = t % c;
        const long long in = t / c;
        __T__ sum = 0;
        for (long long i = 0; i < kh; ++i) {
            const long long yy = iy + ph - i * dh;
            if (yy < 0 || yy % sh != 0) continue;
            const long long oy = yy / sh;
            if (oy >= oh) continue;
            for (long long j = 0; j < kw; ++j) {
                const long long xx = ix + pw - j * dw;
                if (xx < 0 || xx % sw != 0) continue;
                const long long ox = xx / sw;
                if (ox >= ow) continue;
                sum += col[((((ic * kh + i) * kw + j) * n + in) * oh + oy) * ow + ox];
            }
        }
        x[idx] = sum;
    }
}
'''


def _dims(n, c, h, w, g, oh, ow):
    return _cuda.i64(n, c, h, w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, oh, ow)


def im2col(x, geom, out_hw, out=None):
    """Columns (C, kh, kw, N, oh, ow) of ``x`` (N, C, H, W): one launch. ``out`` defaults to the
    "col" workspace, as the CPU ``im2col``."""
    from .im2col import COL, workspace
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    oh, ow = out_hw
    g = geom
    shape = (c, g.kh, g.kw, n, oh, ow)
    if out is None:
        out = workspace(xp, shape, x.dtype, COL)
    target = out if out.flags.c_contiguous else xp.empty(shape, dtype=x.dtype)
    total = c * g.kh * g.kw * n * oh * ow
    kern = _cuda.raw_kernel(IM2COL, _IM2COL_SRC, x.dtype)
    _cuda.launch(kern, total, _cuda.contiguous(xp, x), target, np.int64(total), *_dims(n, c, h, w, g, oh, ow))
    if target is not out:
        out[...] = target
    return out


def col2im(col, geom, in_hw, out):
    """The adjoint: ``out`` (N, C, H, W) = the columns (C, kh, kw, N, oh, ow) summed back, one launch."""
    xp = backend.get_array_module(col)
    c, kh, kw, n, oh, ow = col.shape
    h, w = in_hw
    target = out if out.flags.c_contiguous else xp.empty(out.shape, dtype=out.dtype)
    total = n * c * h * w
    kern = _cuda.raw_kernel(COL2IM, _COL2IM_SRC, col.dtype)
    _cuda.launch(kern, total, _cuda.contiguous(xp, col), target, np.int64(total),
                 *_dims(n, c, h, w, geom, oh, ow))
    if target is not out:
        out[...] = target
    return out


# --- NumPy references (what the kernels compute, for the CuPy stand-in) ------------------------

def _check_total(total, arr, name):
    if int(total) != arr.size:
        raise ValueError(f"{name}: total {int(total)} != {arr.size} elements of the output")


def _ref_im2col(grid, block, args, shared_mem=0):
    x, col, total, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = args
    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = (int(v) for v in (n, c, h, w, kh, kw, sh, sw,
                                                                             ph, pw, dh, dw, oh, ow))
    _check_total(total, col, IM2COL)
    xs = np.asarray(x).reshape(n, c, h, w)
    i = np.arange(kh)[:, None, None, None]
    j = np.arange(kw)[None, :, None, None]
    oy = np.arange(oh)[None, None, :, None]
    ox = np.arange(ow)[None, None, None, :]
    iy = oy * sh - ph + i * dh + 0 * ox          # (kh, kw, oh, ow)
    ix = ox * sw - pw + j * dw + 0 * oy
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    vals = xs[:, :, np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)] * inside   # (n, c, kh, kw, oh, ow)
    np.asarray(col).reshape(c, kh, kw, n, oh, ow)[...] = vals.transpose(1, 2, 3, 0, 4, 5)


def _ref_col2im(grid, block, args, shared_mem=0):
    col, x, total, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = args
    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = (int(v) for v in (n, c, h, w, kh, kw, sh, sw,
                                                                             ph, pw, dh, dw, oh, ow))
    _check_total(total, x, COL2IM)
    cols = np.asarray(col).reshape(c, kh, kw, n, oh, ow)
    acc = np.zeros((n, c, h + 2 * ph + sh * oh + dh * kh, w + 2 * pw + sw * ow + dw * kw), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            acc[:, :, y0:y0 + sh * oh:sh, x0:x0 + sw * ow:sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    np.asarray(x).reshape(n, c, h, w)[...] = acc[:, :, ph:ph + h, pw:pw + w]


for _name in _cuda.names(IM2COL):
    emulation.reference(_name)(_ref_im2col)
for _name in _cuda.names(COL2IM):
    emulation.reference(_name)(_ref_col2im)
