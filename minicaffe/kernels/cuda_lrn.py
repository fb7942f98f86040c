"""LRN across channels on the GPU: one kernel for the forward, one for the backward.

Why: the array code (``layers/lrn.py``) sums ``size`` shifted slices of a padded buffer plus half
a dozen whole-array passes (about ``size + 6`` launches forward, ``size + 8`` backward). Here one
thread computes one element with Caffe's formula, summing its window of ``size`` channels centred
on it (zero outside) in the CPU code's order:

* forward: ``scale = k + alpha/size · Σ x²``, ``p = scale^beta``, ``y = x / p`` (``scale`` and ``p``
  are kept for the backward);
* backward: ``dx = dy / p − (2·alpha·beta/size) · x · Σ_window dy·y/scale``.

WITHIN_CHANNEL keeps the array code (rare in practice): the engine applies to ACROSS_CHANNELS.
"""
import numpy as np

from . import _cuda, emulation, engines

FORWARD = "minicaffe_lrn_fwd"
BACKWARD = "minicaffe_lrn_bwd"

_IDX = r'''
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long hw = idx % HW;
        const long long c = (idx / HW) % C;
        const long long base = (idx / (HW * C)) * C * HW + hw;'''

_FWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, __T__* scale, __T__* p, __T__* y, long long total,
                                    long long C, long long HW, long long size, long long pre,
                                    __T__ sum_scale, __T__ shift, __T__ beta) {''' + _IDX + r'''
        __T__ s = 0;
        for (long long o = 0; o < size; ++o) {
            const long long cc = c - pre + o;
            if (cc >= 0 && cc < C) { const __T__ v = x[base + cc * HW]; s += v * v; }
        }
        s = s * sum_scale + shift;
        scale[idx] = s;
        const __T__ pw = pow(s, beta);
        p[idx] = pw;
        y[idx] = x[idx] / pw;
    }
}
'''

_BWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, const __T__* y, const __T__* dy, const __T__* scale,
                                    const __T__* p, __T__* dx, long long total, long long C, long long HW,
                                    long long size, long long pre, __T__ coeff) {''' + _IDX + r'''
        __T__ acc = 0;
        for (long long o = 0; o < size; ++o) {
            const long long cc = c - pre + o;
            if (cc >= 0 && cc < C) {
                const long long j = base + cc * HW;
                acc += dy[j] * y[j] / scale[j];
            }
        }
        dx[idx] = dy[idx] / p[idx] - acc * x[idx] * coeff;
    }
}
'''


def _dims(x, layer):
    n, c, h, w = x.shape
    return _cuda.i64(x.size, c, h * w, layer.size, layer.pre)


def forward(layer, x, scale, p, y):
    kern = _cuda.raw_kernel(FORWARD, _FWD_SRC, x.dtype)
    _cuda.launch(kern, x.size, x, scale, p, y, *_dims(x, layer),
                 *_cuda.scalars(x.dtype, layer.sum_scale, layer.shift, layer.beta))


def backward(layer, x, y, dy, scale, p, dx):
    kern = _cuda.raw_kernel(BACKWARD, _BWD_SRC, x.dtype)
    _cuda.launch(kern, x.size, x, y, dy, scale, p, dx, *_dims(x, layer),
                 *_cuda.scalars(x.dtype, 2.0 * layer.beta * layer.sum_scale))


class CudaLRN:
    """LRN's GPU engine (ACROSS_CHANNELS): the forward's scale and scale^beta live in the layer's
    buffers, where its backward reads them."""

    def __init__(self, layer):
        self.layer = layer

    def lrn_forward(self, x, y):
        layer = self.layer
        layer.scale = layer.buffer("scale", x.shape, x.dtype)
        layer.scale_pow = layer.buffer("pow", x.shape, x.dtype)
        forward(layer, x, layer.scale, layer.scale_pow, y)

    def lrn_backward(self, x, y, dy, dx):
        backward(self.layer, x, y, dy, self.layer.scale, self.layer.scale_pow, dx)


engines.register(engines.Engine("LRN", "cuda", build=CudaLRN, devices=("gpu",),
                                applies=lambda layer: not layer.within, priority=20))


# --- NumPy references ------------------------------------------------------------------------

def _window_sum(a, size, pre):
    """Σ over channels c-pre..c+pre of ``a`` (N, C, HW), zero outside, in offset order."""
    n, c, hw = a.shape
    pad = np.zeros((n, c + size - 1, hw), a.dtype)
    pad[:, pre:pre + c] = a
    out = np.zeros_like(a)
    for o in range(size):
        out += pad[:, o:o + c]
    return out


def _ref_fwd(grid, block, args, shared_mem=0):
    x, scale, p, y, total, c, hw, size, pre, sum_scale, shift, beta = args
    shape = (int(total) // (int(c) * int(hw)), int(c), int(hw))
    xs = x.reshape(shape)
    s = _window_sum(xs * xs, int(size), int(pre)) * sum_scale + shift
    scale.reshape(shape)[...] = s
    pw = np.power(s, beta)
    p.reshape(shape)[...] = pw
    y.reshape(shape)[...] = xs / pw


def _ref_bwd(grid, block, args, shared_mem=0):
    x, y, dy, scale, p, dx, total, c, hw, size, pre, coeff = args
    shape = (int(total) // (int(c) * int(hw)), int(c), int(hw))
    ratio = dy.reshape(shape) * y.reshape(shape) / scale.reshape(shape)
    acc = _window_sum(ratio, int(size), int(pre))
    dx.reshape(shape)[...] = dy.reshape(shape) / p.reshape(shape) - acc * x.reshape(shape) * coeff


for _name in _cuda.names(FORWARD):
    emulation.reference(_name)(_ref_fwd)
for _name in _cuda.names(BACKWARD):
    emulation.reference(_name)(_ref_bwd)
