"""Fused element-wise layer kernels for the GPU (one launch per forward or backward).

Why: the array code of these layers is written for NumPy (e.g. leaky ReLU is four passes and a
temporary, its gradient three); on a GPU each pass is a launch and a trip through memory. Each
kernel here computes the CPU code's formula in one pass:

* ReLU: ``y = x > 0 ? x : slope·x`` (Caffe's ``max(x,0) + slope·min(x,0)``, the same values), and
  ``dx = x > 0 ? dy : slope·dy`` (the gradient at 0 is the slope, as in Caffe). ``x`` may be the
  output itself when the layer ran in place with ``slope >= 0`` (its sign is the input's).
* Eltwise of two bottoms (the common case: residual sums): SUM ``y = a·ca + b·cb``, PROD
  ``y = a·b``, MAX ``y = a > b ? a : b`` with the int32 winner mask (a tie goes to bottom 1, Caffe's
  ``a > b`` test). More bottoms keep the array code.

Registered as the ``cuda`` engines of ReLU and Eltwise (``CudaReLU``, ``CudaEltwise2``).
"""
import numpy as np

from ..core import backend
from ..proto import caffe_pb2
from . import _cuda, emulation, engines

RELU_FORWARD = "minicaffe_relu_fwd"
RELU_BACKWARD = "minicaffe_relu_bwd"

# (inputs, outputs, body): __D__ = the dtype name, __T__ = the C type (see _cuda.elementwise_kernel)
_RELU_FWD = ("__D__ x, __D__ slope", "__D__ y", "y = x > (__T__)0 ? x : x * slope")
_RELU_BWD = ("__D__ x, __D__ dy, __D__ slope", "__D__ dx", "dx = x > (__T__)0 ? dy : dy * slope")
ELTWISE_SUM = "minicaffe_eltwise_sum2"
ELTWISE_PROD = "minicaffe_eltwise_prod2"
ELTWISE_MAX = "minicaffe_eltwise_max2"
_ELTWISE = {
    ELTWISE_SUM: ("__D__ a, __D__ b, __D__ ca, __D__ cb", "__D__ y", "y = a * ca + b * cb"),
    ELTWISE_PROD: ("__D__ a, __D__ b", "__D__ y", "y = a * b"),
    ELTWISE_MAX: ("__D__ a, __D__ b", "__D__ y, int32 mask", "const bool t = a > b; y = t ? a : b; mask = t ? 0 : 1"),
}


def relu_forward(x, slope, y):
    kern = _cuda.elementwise_kernel(RELU_FORWARD, *_RELU_FWD, x.dtype)
    kern(x, *_cuda.scalars(x.dtype, slope), y)


def relu_backward(x, dy, slope, dx):
    kern = _cuda.elementwise_kernel(RELU_BACKWARD, *_RELU_BWD, dy.dtype)
    kern(x, dy, *_cuda.scalars(dy.dtype, slope), dx)


def eltwise_sum(a, b, ca, cb, y):
    _cuda.elementwise_kernel(ELTWISE_SUM, *_ELTWISE[ELTWISE_SUM], a.dtype)(a, b, *_cuda.scalars(a.dtype, ca, cb), y)


def eltwise_prod(a, b, y):
    _cuda.elementwise_kernel(ELTWISE_PROD, *_ELTWISE[ELTWISE_PROD], a.dtype)(a, b, y)


def eltwise_max(a, b, y, mask):
    _cuda.elementwise_kernel(ELTWISE_MAX, *_ELTWISE[ELTWISE_MAX], a.dtype)(a, b, y, mask)


class CudaReLU:
    """ReLU's GPU engine: one fused kernel a pass."""

    def __init__(self, layer):
        self.slope = layer.slope

    def compute(self, x, y):
        relu_forward(x, self.slope, y)

    def gradient(self, x, y, dy, dx):
        relu_backward(x, dy, self.slope, dx)


class CudaEltwise2:
    """Eltwise's GPU engine for two bottoms: one fused kernel into a new array (the backward is
    the layer's reference)."""

    def __init__(self, layer):
        self.layer = layer

    def forward_arrays(self, xs):
        a, b = xs
        op, out, mask = self.layer.op, backend.xp().empty_like(a), None
        if op == _Op.SUM:
            eltwise_sum(a, b, self.layer.coeffs[0], self.layer.coeffs[1], out)
        elif op == _Op.PROD:
            eltwise_prod(a, b, out)
        else:
            mask = backend.xp().empty(a.shape, dtype=np.int32)
            eltwise_max(a, b, out, mask)
        return out, mask


_Op = caffe_pb2.EltwiseParameter
engines.register(engines.Engine("ReLU", "cuda", build=CudaReLU, devices=("gpu",), priority=20))
engines.register(engines.Engine("Eltwise", "cuda", build=CudaEltwise2, devices=("gpu",),
                                applies=lambda layer: layer.num_bottoms == 2, priority=20))


def _ref_relu_fwd(x, slope, y):
    y[...] = np.where(x > 0, x, x * y.dtype.type(slope))
    return y


def _ref_relu_bwd(x, dy, slope, dx):
    dx[...] = np.where(x > 0, dy, dy * dx.dtype.type(slope))
    return dx


def _ref_sum(a, b, ca, cb, y):
    y[...] = a * y.dtype.type(ca) + b * y.dtype.type(cb)
    return y


def _ref_prod(a, b, y):
    y[...] = a * b
    return y


def _ref_max(a, b, y, mask):
    t = a > b
    y[...] = np.where(t, a, b)
    mask[...] = np.where(t, 0, 1)
    return y, mask


for _base, _fn in ((ELTWISE_SUM, _ref_sum), (ELTWISE_PROD, _ref_prod), (ELTWISE_MAX, _ref_max)):
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)
for _name in _cuda.names(RELU_FORWARD):
    emulation.reference(_name)(_ref_relu_fwd)
for _name in _cuda.names(RELU_BACKWARD):
    emulation.reference(_name)(_ref_relu_bwd)
