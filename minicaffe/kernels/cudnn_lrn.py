"""LRN across channels through cuDNN (``engine: CUDNN``, and DEFAULT on the GPU where cuDNN 9 loads
and the parameters allow): ``cudnnLRNCrossChannelForward``/``Backward`` in
``CUDNN_LRN_CROSS_CHANNEL_DIM1`` mode, with ``lrnN = local_size``, ``lrnAlpha = alpha``,
``lrnBeta = beta``, ``lrnK = k``.

Why the formulas agree. Caffe: ``scale = k + alpha/n · Σ x²`` over the ``n = local_size`` channels
``c − (n−1)/2 .. c + (n−1)/2`` (zero outside), ``y = x · scale^(−beta)``. cuDNN:
``y = x · (k + alpha/lrnN · Σ x²)^(−beta)`` (its ``lrnAlpha`` is divided by the window width
inside the library), summed over ``[c − lookBehind, c + lookAhead]`` with
``lookBehind = floor((lrnN−1)/2)``, ``lookAhead = lrnN − lookBehind − 1`` (cudnn_ops.h), zero
outside the tensor. Caffe requires an odd ``local_size``, so both look ``(n−1)/2`` each way: the same
window, the same constant, the same power, and so the same gradient (cuDNN's backward takes ``y``,
``dy`` and ``x`` and differentiates that formula, as Caffe's backward does from ``scale``).
BVLC Caffe's own CuDNNLRNLayer passes its four parameters to ``cudnnSetLRNDescriptor`` the same
way.

Where it applies: ACROSS_CHANNELS only (WITHIN_CHANNEL stays on the CUDA engine and the reference:
Caffe builds it from an average pooling and a power, which cuDNN's LRN does not compute), and
only for parameters cuDNN accepts: ``CUDNN_LRN_MIN_N ≤ local_size ≤ CUDNN_LRN_MAX_N`` (1..16),
``k ≥ CUDNN_LRN_MIN_K`` (1e-5), ``beta ≥ CUDNN_LRN_MIN_BETA`` (0.01); ``cudnnSetLRNDescriptor``
fails outside them (checked against libcudnn 9.28). AlexNet's and GoogLeNet's LRNs (5, 1e-4, 0.75,
k 1 or 2) are inside.

The engine keeps nothing between forward and backward: the layer's ``scale``/``scale_pow`` stay
unset (they are the reference's and the CUDA engine's buffers).
"""
import numpy as np

from . import cudnn as _cudnn
from .engines import Engine, register

_INT_MAX = (1 << 31) - 1


def computes(layer):
    """Whether cuDNN computes ``layer``'s LRN exactly as Caffe does (module docstring)."""
    return (not layer.within and _cudnn.LRN_MIN_N <= layer.size <= _cudnn.LRN_MAX_N
            and layer.k >= _cudnn.LRN_MIN_K and layer.beta >= _cudnn.LRN_MIN_BETA)


class CudnnLRN:
    """LRN's engine interface (``lrn_forward(x, y)``, ``lrn_backward(x, y, dy, dx)``) on cuDNN."""

    def __init__(self, layer):
        lib = _cudnn.require()
        self.lib = lib
        self.lrn = lib.descriptor("LRN")
        lib.call("cudnnSetLRNDescriptor", self.lrn.ptr, layer.size, layer.alpha, layer.beta, layer.k)
        self._descs = {}

    def _desc(self, shape, dtype):
        key = (tuple(shape), np.dtype(dtype))
        d = self._descs.get(key)
        if d is None:
            d = self._descs[key] = self.lib.tensor4d(dtype, *shape)
        return d

    def _call(self, name, inputs, out):
        """``out`` = ``name`` over ``inputs`` (x; or y, dy, x), beta 0: ``out`` is overwritten."""
        d = self._desc(out.shape, out.dtype).ptr
        return self.lib.call_into(name, (self.lrn.ptr, _cudnn.LRN_CROSS_CHANNEL_DIM1), [(d, a) for a in inputs],
                                  out, d)

    def lrn_forward(self, x, y):
        self._call("cudnnLRNCrossChannelForward", [x], y)

    def lrn_backward(self, x, y, dy, dx):
        self._call("cudnnLRNCrossChannelBackward", [y, dy, x], dx)


def _computes(layer):
    """``computes``, and a bottom cuDNN's int32 sizes can describe."""
    shape = getattr(layer, "bottom_shape", None)
    return computes(layer) and (shape is None or 0 < int(np.prod(shape, dtype=np.int64)) <= _INT_MAX)


# above the CUDA kernels (priority 20) wherever cuDNN loads and takes the parameters
register(Engine("LRN", "cudnn", build=CudnnLRN, devices=("gpu",), priority=30, cudnn=True,
                applies=lambda layer: _computes(layer) and _cudnn.available()[0], computes=_computes))
