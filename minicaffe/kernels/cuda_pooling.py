"""MAX and AVE pooling on the GPU: one kernel launch per forward and per backward.

Why: the array-code pooling (``layers/pooling.py``) runs one pass per window offset (four for MAX
with its argmax), i.e. ``4*kh*kw`` launches a forward on a GPU. Here one thread computes one output
(forward) or one bottom element (backward, gathering from the windows that cover it, in output order:
no atomics, deterministic, and the same summation order as Caffe's CPU loop).

Caffe's rules, as the layer's CPU code keeps them: MAX looks at the window clipped to the real image
and keeps the first maximum in row-major order (the argmax, an int32 ``h * W + w`` kept on the
device for the backward); AVE divides by the window clipped to the PADDED image (padding counts,
the overhang of a ceil-rounded window does not).

Registered as Pooling's ``cuda`` engine (``CudaPooling``), chosen at reshape in GPU mode except for
the whole-image case.
"""
import numpy as np

from ..core import backend
from ..proto import caffe_pb2
from . import _cuda, emulation, engines

MAX_FORWARD = "minicaffe_pool_max_fwd"
MAX_BACKWARD = "minicaffe_pool_max_bwd"
AVE_FORWARD = "minicaffe_pool_ave_fwd"
AVE_BACKWARD = "minicaffe_pool_ave_bwd"

_DIMS = ("long long n, long long c, long long h, long long w, long long oh, long long ow, "
         "long long kh, long long kw, long long sh, long long sw, long long ph, long long pw")

_LOOP = r'''
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {'''

_MAX_FWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, __T__* y, int* mask, long long total, ''' + _DIMS + r''') {''' + _LOOP + r'''
        const long long px = idx % ow;
        const long long py = (idx / ow) % oh;
        const long long plane = idx / (ow * oh);
        long long hs = py * sh - ph, ws = px * sw - pw;
        const long long he = min(hs + kh, h), we = min(ws + kw, w);
        hs = max(hs, 0LL); ws = max(ws, 0LL);
        const __T__* xp = x + plane * h * w;
        long long best = hs * w + ws;        // the first real pixel of the window
        __T__ val = xp[best];
        for (long long yy = hs; yy < he; ++yy) {
            for (long long xx = ws; xx < we; ++xx) {
                if (xp[yy * w + xx] > val) { val = xp[yy * w + xx]; best = yy * w + xx; }
            }
        }
        y[idx] = val;
        mask[idx] = (int)best;
    }
}
'''

_MAX_BWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* dy, const int* mask, __T__* dx, long long total, ''' + _DIMS + r''') {''' + _LOOP + r'''
        const long long xx = idx % w;
        const long long yy = (idx / w) % h;
        const long long plane = idx / (w * h);
        const long long phs = (yy + ph < kh) ? 0 : (yy + ph - kh) / sh + 1;
        const long long phe = min((yy + ph) / sh + 1, oh);
        const long long pws = (xx + pw < kw) ? 0 : (xx + pw - kw) / sw + 1;
        const long long pwe = min((xx + pw) / sw + 1, ow);
        const int here = (int)(yy * w + xx);
        const long long base = plane * oh * ow;
        __T__ sum = 0;
        for (long long py = phs; py < phe; ++py) {
            for (long long px = pws; px < pwe; ++px) {
                if (mask[base + py * ow + px] == here) sum += dy[base + py * ow + px];
            }
        }
        dx[idx] = sum;
    }
}
'''

_AVE_FWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, __T__* y, long long total, ''' + _DIMS + r''') {''' + _LOOP + r'''
        const long long px = idx % ow;
        const long long py = (idx / ow) % oh;
        const long long plane = idx / (ow * oh);
        long long hs = py * sh - ph, ws = px * sw - pw;
        long long he = min(hs + kh, h + ph), we = min(ws + kw, w + pw);
        const __T__ size = (__T__)((he - hs) * (we - ws));
        hs = max(hs, 0LL); ws = max(ws, 0LL); he = min(he, h); we = min(we, w);
        const __T__* xp = x + plane * h * w;
        __T__ sum = 0;
        for (long long yy = hs; yy < he; ++yy) {
            for (long long xx = ws; xx < we; ++xx) sum += xp[yy * w + xx];
        }
        y[idx] = sum / size;
    }
}
'''

_AVE_BWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* dy, __T__* dx, long long total, ''' + _DIMS + r''') {''' + _LOOP + r'''
        const long long xx = idx % w;
        const long long yy = (idx / w) % h;
        const long long plane = idx / (w * h);
        const long long phs = (yy + ph < kh) ? 0 : (yy + ph - kh) / sh + 1;
        const long long phe = min((yy + ph) / sh + 1, oh);
        const long long pws = (xx + pw < kw) ? 0 : (xx + pw - kw) / sw + 1;
        const long long pwe = min((xx + pw) / sw + 1, ow);
        const long long base = plane * oh * ow;
        __T__ sum = 0;
        for (long long py = phs; py < phe; ++py) {
            for (long long px = pws; px < pwe; ++px) {
                const long long hs = py * sh - ph, ws = px * sw - pw;
                const long long he = min(hs + kh, h + ph), we = min(ws + kw, w + pw);
                sum += dy[base + py * ow + px] / (__T__)((he - hs) * (we - ws));
            }
        }
        dx[idx] = sum;
    }
}
'''


def _dims(layer, shape):
    n, c, h, w = shape
    oh, ow = layer.out_hw
    return _cuda.i64(n, c, h, w, oh, ow, layer.kh, layer.kw, layer.sh, layer.sw, layer.ph, layer.pw)


def max_forward(layer, x, y, mask):
    """``y`` = window maxima of ``x``; ``mask`` (int32, y's shape) = their flat ``h * W + w``."""
    kern = _cuda.raw_kernel(MAX_FORWARD, _MAX_FWD_SRC, x.dtype)
    _cuda.launch(kern, y.size, x, y, mask, np.int64(y.size), *_dims(layer, x.shape))


def max_backward(layer, dy, mask, dx):
    """``dx`` = each output gradient routed to its argmax (overwritten)."""
    kern = _cuda.raw_kernel(MAX_BACKWARD, _MAX_BWD_SRC, dy.dtype)
    _cuda.launch(kern, dx.size, dy, mask, dx, np.int64(dx.size), *_dims(layer, dx.shape))


def ave_forward(layer, x, y):
    kern = _cuda.raw_kernel(AVE_FORWARD, _AVE_FWD_SRC, x.dtype)
    _cuda.launch(kern, y.size, x, y, np.int64(y.size), *_dims(layer, x.shape))


def ave_backward(layer, dy, dx):
    kern = _cuda.raw_kernel(AVE_BACKWARD, _AVE_BWD_SRC, dy.dtype)
    _cuda.launch(kern, dx.size, dy, dx, np.int64(dx.size), *_dims(layer, dx.shape))


class CudaPooling:
    """Pooling's GPU engine: one kernel a pass. The MAX argmax (int32, the top's shape) stays on
    the device between forward and backward; a backward with no forward since this engine was
    built recomputes it from the bottom."""

    def __init__(self, layer):
        self.layer = layer
        self.is_max = layer.method == caffe_pb2.PoolingParameter.MAX
        n, c = layer.bottom_shape[:2]
        self.mask = backend.xp().empty((n, c) + tuple(layer.out_hw), dtype=np.int32) if self.is_max else None
        self.mask_fresh = False

    def pool_forward(self, x, y, mask):
        if not self.is_max:
            ave_forward(self.layer, x, y)
            return
        max_forward(self.layer, x, y, self.mask)
        self.mask_fresh = True
        if mask is not None:
            mask[...] = self.mask

    def pool_backward(self, x, dy, dx):
        if not self.is_max:
            ave_backward(self.layer, dy, dx)
            return
        if not self.mask_fresh:
            max_forward(self.layer, x, backend.xp().empty_like(dy), self.mask)
            self.mask_fresh = True
        max_backward(self.layer, dy, self.mask, dx)


# the whole-image case (global pooling) keeps the reference: one argmax/mean reduction over rows
engines.register(engines.Engine("Pooling", "cuda", build=CudaPooling, devices=("gpu",),
                                applies=lambda layer: not layer.whole, priority=20))


# --- NumPy references ------------------------------------------------------------------------

def _unpack(args, n_arrays):
    arrays, total, dims = args[:n_arrays], int(args[n_arrays]), [int(v) for v in args[n_arrays + 1:]]
    return arrays, total, dims


def _windows(dims):
    """Per output (oh, ow): clipped real-image window bounds, and the padded-window sizes."""
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = dims
    hs = np.arange(oh) * sh - ph
    ws = np.arange(ow) * sw - pw
    size = np.outer(np.minimum(hs + kh, h + ph) - hs, np.minimum(ws + kw, w + pw) - ws)
    return (np.maximum(hs, 0), np.minimum(hs + kh, h), np.maximum(ws, 0), np.minimum(ws + kw, w)), size


def _ref_max_fwd(grid, block, args, shared_mem=0):
    (x, y, mask), total, dims = _unpack(args, 3)
    n, c, h, w, oh, ow = dims[:6]
    if total != y.size or mask.size != total:
        raise ValueError(f"{MAX_FORWARD}: total {total} != {y.size}")
    (h0, h1, w0, w1), _ = _windows(dims)
    xs = np.asarray(x).reshape(n * c, h, w)
    ys, ms = np.asarray(y).reshape(n * c, oh, ow), np.asarray(mask).reshape(n * c, oh, ow)
    for py in range(oh):
        for px in range(ow):
            win = xs[:, h0[py]:h1[py], w0[px]:w1[px]].reshape(n * c, -1)
            k = win.argmax(axis=1)              # first maximum, row-major
            ww = w1[px] - w0[px]
            ys[:, py, px] = win[np.arange(n * c), k]
            ms[:, py, px] = (h0[py] + k // ww) * w + w0[px] + k % ww


def _ref_max_bwd(grid, block, args, shared_mem=0):
    (dy, mask, dx), total, dims = _unpack(args, 3)
    n, c, h, w, oh, ow = dims[:6]
    if total != dx.size:
        raise ValueError(f"{MAX_BACKWARD}: total {total} != {dx.size}")
    flat = np.zeros((n * c, h * w), np.asarray(dx).dtype)
    rows = np.repeat(np.arange(n * c), oh * ow)
    np.add.at(flat, (rows, np.asarray(mask).reshape(-1)), np.asarray(dy).reshape(-1))
    np.asarray(dx).reshape(n * c, h * w)[...] = flat


def _ref_ave_fwd(grid, block, args, shared_mem=0):
    (x, y), total, dims = _unpack(args, 2)
    n, c, h, w, oh, ow = dims[:6]
    if total != y.size:
        raise ValueError(f"{AVE_FORWARD}: total {total} != {y.size}")
    (h0, h1, w0, w1), size = _windows(dims)
    xs, ys = np.asarray(x).reshape(n * c, h, w), np.asarray(y).reshape(n * c, oh, ow)
    for py in range(oh):
        for px in range(ow):
            ys[:, py, px] = xs[:, h0[py]:h1[py], w0[px]:w1[px]].sum(axis=(1, 2)) / ys.dtype.type(size[py, px])


def _ref_ave_bwd(grid, block, args, shared_mem=0):
    (dy, dx), total, dims = _unpack(args, 2)
    n, c, h, w, oh, ow = dims[:6]
    if total != dx.size:
        raise ValueError(f"{AVE_BACKWARD}: total {total} != {dx.size}")
    (h0, h1, w0, w1), size = _windows(dims)
    dys = np.asarray(dy).reshape(n * c, oh, ow)
    acc = np.zeros((n * c, h, w), dys.dtype)
    for py in range(oh):
        for px in range(ow):
            acc[:, h0[py]:h1[py], w0[px]:w1[px]] += (dys[:, py, px] / dys.dtype.type(size[py, px]))[:, None, None]
    np.asarray(dx).reshape(n * c, h, w)[...] = acc


for _base, _fn in ((MAX_FORWARD, _ref_max_fwd), (MAX_BACKWARD, _ref_max_bwd),
                   (AVE_FORWARD, _ref_ave_fwd), (AVE_BACKWARD, _ref_ave_bwd)):
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)
