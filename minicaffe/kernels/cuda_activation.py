"""PReLU and ELU on the GPU: one element-wise kernel each way, PReLU's slope gradient one
deterministic per-channel reduction.

Why: the layers' array code (``layers/activation.py``) is written for NumPy: ``max(x,0) +
slope·min(x,0)`` is four passes and a temporary, ELU's forward six and its gradient six, PReLU's
backward nine. Each kernel here computes the CPU code's values in one pass:

* PReLU: ``y = x > 0 ? x : x·a[c]``, ``dx = x > 0 ? dy : dy·a[c]`` (the gradient at 0 is the slope,
  as in Caffe), and ``a_diff[c] += Σ min(x, 0)·dy`` over the channel, summed in double by one block
  per channel in a fixed order (``cuda_normalization``'s reduction), so the result does not vary from
  run to run. ``channel_shared`` is the same with one channel spanning the whole blob.
* ELU: ``y = x > 0 ? x : alpha·(exp(x) − 1)`` and ``dx = x > 0 ? dy : dy·(y + alpha)`` (Caffe's
  gradient, from the output; in place with ``alpha >= 0`` the output's sign is the input's).

Registered as the ``cuda`` engines of PReLU and ELU.
"""
import numpy as np

from . import _cuda, emulation, engines
from .cuda_normalization import _CHANNEL, _CHANNEL_LOOP, _FOLD, BLOCK, _channel_sum, _channel_view, _geometry

PRELU_FORWARD = "minicaffe_prelu_fwd"
PRELU_BACKWARD = "minicaffe_prelu_bwd"
PRELU_SLOPE_GRAD = "minicaffe_prelu_slope_grad"
ELU_FORWARD = "minicaffe_elu_fwd"
ELU_BACKWARD = "minicaffe_elu_bwd"

_CH = "const long long c = (i / inner) % dim;"
_ELEMENTWISE = {
    PRELU_FORWARD: ("__D__ x, raw __D__ a, int64 dim, int64 inner", "__D__ y",
                    _CH + " const __T__ v = x; y = v > (__T__)0 ? v : v * a[c];"),
    PRELU_BACKWARD: ("__D__ x, __D__ dy, raw __D__ a, int64 dim, int64 inner", "__D__ dx",
                     _CH + " const __T__ g = dy; dx = x > (__T__)0 ? g : g * a[c];"),
    ELU_FORWARD: ("__D__ x, __D__ alpha", "__D__ y",
                  "const __T__ v = x; y = v > (__T__)0 ? v : alpha * (exp(v) - (__T__)1);"),
    ELU_BACKWARD: ("__D__ x, __D__ y, __D__ dy, __D__ alpha", "__D__ dx",
                   "const __T__ g = dy; dx = x > (__T__)0 ? g : g * (y + alpha);"),
}

_PRELU_SLOPE_GRAD_SRC = _FOLD + """
extern "C" __global__ void __NAME__(const __T__* x, const __T__* dy, long long outer, long long dim,
    long long inner, __T__* slope_diff) {
  __shared__ double s[%(block)d];
  double acc = 0.0;
""" % {"block": BLOCK} + _CHANNEL + _CHANNEL_LOOP + """
    const __T__ v = x[idx];
    acc += (double)((v > (__T__)0 ? (__T__)0 : v) * dy[idx]);
  }
  s[threadIdx.x] = acc;
  __syncthreads();
  __NAME___fold(s);
  if (threadIdx.x == 0) slope_diff[c] = slope_diff[c] + (__T__)s[0];
}
"""


def _ew(name, dtype):
    return _cuda.elementwise_kernel(name, *_ELEMENTWISE[name], dtype)


def prelu_geometry(shape, channel_shared):
    """(outer, dim, inner) of a PReLU bottom: (N, C, rest), or (N, 1, C·rest) with one shared slope."""
    n = shape[0]
    rest = 1
    for d in shape[2:]:
        rest *= d
    return (n, 1, shape[1] * rest) if channel_shared else (n, shape[1], rest)


def prelu_forward(x, slope, y, geometry):
    _, dim, inner = geometry
    _ew(PRELU_FORWARD, x.dtype)(x, slope, *_cuda.i64(dim, inner), y)


def prelu_backward(x, dy, slope, dx, geometry):
    _, dim, inner = geometry
    _ew(PRELU_BACKWARD, dy.dtype)(x, dy, slope, *_cuda.i64(dim, inner), dx)


def prelu_slope_grad(x, dy, slope_diff, geometry):
    """``slope_diff[c] += Σ min(x, 0)·dy`` over channel c (flat, contiguous arrays)."""
    outer, dim, inner = geometry
    _cuda.raw_kernel(PRELU_SLOPE_GRAD, _PRELU_SLOPE_GRAD_SRC, dy.dtype)(
        (int(dim),), (BLOCK,), (x, dy, *_cuda.i64(outer, dim, inner), slope_diff))


def elu_forward(x, alpha, y):
    _ew(ELU_FORWARD, x.dtype)(x, *_cuda.scalars(x.dtype, alpha), y)


def elu_backward(x, y, dy, alpha, dx):
    _ew(ELU_BACKWARD, dy.dtype)(x, y, dy, *_cuda.scalars(dy.dtype, alpha), dx)


class CudaPReLU:
    """PReLU's GPU engine: ``compute(x, y)`` and ``prelu_gradient(x, dy, slope_diff, dx)``, as the
    layer's own methods (either of ``slope_diff``/``dx`` may be None: not wanted)."""

    def __init__(self, layer):
        self.layer = layer

    def _slope(self):
        a = self.layer.blobs[0].xdata
        return a.reshape(-1) if a.flags.c_contiguous else self.layer.xp.ascontiguousarray(a).reshape(-1)

    def compute(self, x, y):
        xp = self.layer.xp
        prelu_forward(_cuda.contiguous(xp, x), self._slope(), y,
                      prelu_geometry(x.shape, self.layer.channel_shared))

    def prelu_gradient(self, x, dy, slope_diff, dx):
        xp = self.layer.xp
        geometry = prelu_geometry(x.shape, self.layer.channel_shared)
        x, dy = _cuda.contiguous(xp, x), _cuda.contiguous(xp, dy)
        if slope_diff is not None:      # first: in place, dx is dy
            prelu_slope_grad(x, dy, slope_diff.reshape(-1), geometry)
        if dx is not None:
            prelu_backward(x, dy, self._slope(), dx, geometry)


class CudaELU:
    """ELU's GPU engine: one fused kernel a pass."""

    def __init__(self, layer):
        self.alpha = layer.alpha

    def compute(self, x, y):
        elu_forward(x, self.alpha, y)

    def gradient(self, x, y, dy, dx):
        elu_backward(x, y, dy, self.alpha, dx)


engines.register(engines.Engine("PReLU", "cuda", build=CudaPReLU, devices=("gpu",), priority=20))
engines.register(engines.Engine("ELU", "cuda", build=CudaELU, devices=("gpu",), priority=20))


# --- NumPy references --------------------------------------------------------------------------------

def _ref_prelu_fwd(x, a, dim, inner, y):
    sc, x3 = _channel_view(a, x, int(dim), int(inner))
    y.reshape(x3.shape)[...] = np.where(x3 > 0, x3, x3 * sc)
    return y


def _ref_prelu_bwd(x, dy, a, dim, inner, dx):
    sc, dy3 = _channel_view(a, dy, int(dim), int(inner))
    dx.reshape(dy3.shape)[...] = np.where(x.reshape(dy3.shape) > 0, dy3, dy3 * sc)
    return dx


def _ref_prelu_slope_grad(grid, block, args, shared_mem=0):
    x, dy, (outer, dim, inner), slope_diff = args[0], args[1], _geometry(args, 2), args[5]
    x3 = x.reshape(outer, dim, inner)
    neg = np.where(x3 > 0, x.dtype.type(0), x3) * dy.reshape(x3.shape)
    slope_diff[...] = slope_diff + _channel_sum(neg).astype(dy.dtype)


def _ref_elu_fwd(x, alpha, y):
    t = y.dtype.type
    xv = x.copy()
    y[...] = np.where(xv > 0, xv, t(alpha) * (np.exp(np.minimum(xv, 0)) - t(1)))
    return y


def _ref_elu_bwd(x, y, dy, alpha, dx):
    dx[...] = np.where(x > 0, dy, dy * (y + dx.dtype.type(alpha)))
    return dx


for _base, _fn in ((PRELU_FORWARD, _ref_prelu_fwd), (PRELU_BACKWARD, _ref_prelu_bwd),
                   (PRELU_SLOPE_GRAD, _ref_prelu_slope_grad), (ELU_FORWARD, _ref_elu_fwd),
                   (ELU_BACKWARD, _ref_elu_bwd)):
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)
