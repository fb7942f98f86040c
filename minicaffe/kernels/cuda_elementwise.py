"""Fused element-wise layer kernels for the GPU (one launch per forward or backward).

Why: the array code of these layers is written for NumPy (e.g. leaky ReLU is four passes and a
temporary, its gradient three); on a GPU each pass is a launch and a trip through memory. Each
kernel here computes the CPU code's formula in one pass:

* ReLU: ``y = x > 0 ? x : slope·x`` (Caffe's ``max(x,0) + slope·min(x,0)``, the same values), and
  ``dx = x > 0 ? dy : slope·dy`` (the gradient at 0 is the slope, as in Caffe). ``x`` may be the
  output itself when the layer ran in place with ``slope >= 0`` (its sign is the input's).
"""
import numpy as np

from . import _cuda, emulation

RELU_FORWARD = "minicaffe_relu_fwd"
RELU_BACKWARD = "minicaffe_relu_bwd"

# (inputs, outputs, body): __D__ = the dtype name, __T__ = the C type (see _cuda.elementwise_kernel)
_RELU_FWD = ("__D__ x, __D__ slope", "__D__ y", "y = x > (__T__)0 ? x : x * slope")
_RELU_BWD = ("__D__ x, __D__ dy, __D__ slope", "__D__ dx", "dx = x > (__T__)0 ? dy : dy * slope")


def relu_forward(x, slope, y):
    kern = _cuda.elementwise_kernel(RELU_FORWARD, *_RELU_FWD, x.dtype)
    kern(x, *_cuda.scalars(x.dtype, slope), y)


def relu_backward(x, dy, slope, dx):
    kern = _cuda.elementwise_kernel(RELU_BACKWARD, *_RELU_BWD, dy.dtype)
    kern(x, dy, *_cuda.scalars(dy.dtype, slope), dx)


def _ref_relu_fwd(x, slope, y):
    y[...] = np.where(x > 0, x, x * y.dtype.type(slope))
    return y


def _ref_relu_bwd(x, dy, slope, dx):
    dx[...] = np.where(x > 0, dy, dy * dx.dtype.type(slope))
    return dx


for _name in _cuda.names(RELU_FORWARD):
    emulation.reference(_name)(_ref_relu_fwd)
for _name in _cuda.names(RELU_BACKWARD):
    emulation.reference(_name)(_ref_relu_bwd)
