"""The Softmax layer through cuDNN (``engine: CUDNN``, and DEFAULT on the GPU where cuDNN 9 loads):
``cudnnSoftmaxForward``/``Backward`` with ``CUDNN_SOFTMAX_ACCURATE`` (the maximum subtracted first,
as Caffe's softmax does) in ``CUDNN_SOFTMAX_MODE_CHANNEL``.

Any softmax axis maps onto cuDNN's channel mode: a C-contiguous blob of shape (outer, classes,
inner) around the axis is, byte for byte, an NCHW tensor (outer, classes, inner, 1), and the channel
mode normalises over C at each (n, h, w). One descriptor per shape and dtype, made on first use.
A blob beyond cuDNN's int32 element count runs the CuPy kernel (``cuda_softmax``) instead.

SoftmaxWithLoss and InfogainLoss keep the CuPy kernels (``cuda_softmax``): their loss and its
gradient are fused there, and a cuDNN softmax would only replace one of their launches.
"""
import numpy as np

from . import cuda_softmax
from . import cudnn as _cudnn
from .engines import Engine, register

_INT_MAX = (1 << 31) - 1


class CudnnSoftmax:
    """The Softmax engine interface (``softmax``/``softmax_backward``, in place allowed) on cuDNN."""

    def __init__(self, layer):
        lib = _cudnn.require()
        self.lib = lib
        self._descs = {}

    def _desc(self, shape, axis, dtype):
        key = (tuple(shape), axis, np.dtype(dtype))
        d = self._descs.get(key)
        if d is None:
            d = self._descs[key] = self.lib.tensor4d(dtype, *cuda_softmax.layout(shape, axis), 1)
        return d

    @staticmethod
    def _fits(a):
        return a.size <= _INT_MAX and a.size > 0

    def _call(self, name, inputs, out, axis):
        """``out`` = ``name`` over ``inputs`` (x; or y, dy), beta 0: ``out`` is overwritten."""
        d = self._desc(out.shape, axis, out.dtype).ptr
        return self.lib.call_into(name, (_cudnn.SOFTMAX_ACCURATE, _cudnn.SOFTMAX_MODE_CHANNEL),
                                  [(d, a) for a in inputs], out, d)

    def softmax(self, x, axis, out):
        """``out`` = softmax of ``x`` along ``axis`` (``out`` may be ``x``)."""
        if not self._fits(x):
            return cuda_softmax.softmax(x, axis, out)
        return self._call("cudnnSoftmaxForward", [x], out, axis)

    def softmax_backward(self, y, dy, axis, dx):
        """``dx`` = (dy - sum(dy * y)) * y along ``axis`` (``dx`` may be ``dy``)."""
        if not self._fits(y):
            return cuda_softmax.softmax_backward(y, dy, axis, dx)
        return self._call("cudnnSoftmaxBackward", [y, dy], dx, axis)


register(Engine("Softmax", "cudnn", build=CudnnSoftmax, devices=("gpu",), priority=30, cudnn=True,
                applies=lambda layer: _cudnn.available()[0], computes=lambda layer: True))
