"""MAX and AVE pooling through cuDNN (``engine: CUDNN``, and DEFAULT on the GPU where cuDNN 9 loads
and the shape allows): ``cudnnPoolingForward``/``Backward``.

Where cuDNN computes exactly Caffe's pooling (``applies``), and why only there:

* **Output size.** Caffe rounds the output up (``ceil((H + 2p - k) / s) + 1``, one less when the
  last window would start in the padding); cuDNN rounds down (``floor(...) + 1``, what
  ``cudnnGetPooling2dForwardOutputDim`` returns). cuDNN runs only where the two sizes are the same
  in both directions (``round_mode: FLOOR`` always; CEIL when ``(H + 2p - k)`` is a multiple of
  the stride, or the clip takes the extra window away).
* **Windows.** Output ``i`` covers rows ``[i·s − p, i·s − p + k)``. With the floor size the last
  window ends at ``(out − 1)·s − p + k ≤ H + p``: no window runs past the padded border, so Caffe's
  AVE divisor, the window clipped to the padded image (``min(start + k, H + p) − start``), is
  ``k`` in every window: ``kh·kw``, which is cuDNN's ``CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING``.
  (Where the sizes differ, Caffe's last window is clipped and divides by less: cuDNN has no such
  mode, so those shapes stay on the CUDA engine.) MAX ignores the padding in both (a padded
  position never wins in cuDNN's max pooling; the padded MAX cases of tests/test_engines.py check
  it against the reference on the GPU run, with all-negative border windows likely at N(0, 1) data).
* **Global pooling** (the kernel the whole image, no padding, stride 1) is one window of ``H·W``
  in both: cuDNN computes it (the CUDA engine leaves it to the reference).
* **MAX with a second top** (Caffe's argmax mask) stays on the CUDA engine: cuDNN keeps no argmax.

MAX runs in ``CUDNN_POOLING_MAX_DETERMINISTIC`` mode: its backward gives the same bits on every run
(overlapping windows add into one input without atomics in a run-dependent order), as the
convolution engine's choice of deterministic algorithms does. NaNs are not propagated
(``CUDNN_NOT_PROPAGATE_NAN``), as Caffe's ``>`` comparison never lets a NaN win.

The backward: cuDNN finds each window's winner again from ``x`` and the forward's ``y`` (it keeps no
argmax), so the engine keeps its own copy of ``y`` from the forward (the top may be changed in place
by the next layer, a ReLU say, before the backward runs: Caffe's CuDNNPoolingLayer reads the top and
is wrong then, which is why Caffe's layer factory keeps MAX on its own code). The copy costs one
top-sized buffer per MAX layer in TRAIN nets; a TEST net keeps none, and a backward there (or one
with no forward since the engine was built) runs the forward again into the buffer first. AVE's
gradient does not depend on ``y``: ``dy`` is passed in its place.

Ties: Caffe routes a MAX gradient to the first maximum of the window in row-major order. Which
maximum cuDNN picks among equal values is not documented; the emulation (tests/cudnn_standin.py)
takes the first, as Caffe does, and the engine-vs-reference cases use tie-free data. Real cuDNN's
tie rule is to be confirmed on the GPU run (``tests/test_cudnn.py``'s tie test reports it there).
"""
import numpy as np

from ..core import backend
from ..proto import caffe_pb2
from . import cudnn as _cudnn
from .engines import Engine, register

_INT_MAX = (1 << 31) - 1
_PP = caffe_pb2.PoolingParameter


def floor_size(size, kernel, pad, stride):
    """cuDNN's pooled size along one axis (``cudnnGetPooling2dForwardOutputDim``)."""
    return (size + 2 * pad - kernel) // stride + 1


def computes(layer):
    """Whether cuDNN computes ``layer``'s pooling exactly as Caffe does (module docstring)."""
    if layer.method not in (_PP.MAX, _PP.AVE) or layer.bottom_shape is None:
        return False
    if getattr(layer, "num_top", 1) > 1:           # the argmax top: cuDNN keeps none
        return False
    n, c, h, w = layer.bottom_shape
    if n * c * h * w > _INT_MAX or n * c * h * w == 0:
        return False
    return (floor_size(h, layer.kh, layer.ph, layer.sh), floor_size(w, layer.kw, layer.pw, layer.sw)) \
        == tuple(layer.out_hw)


class CudnnPooling:
    """The Pooling engine interface (``pool_forward``/``pool_backward``) on cuDNN."""

    def __init__(self, layer):
        lib = _cudnn.require()
        self.lib = lib
        self.layer = layer
        self.is_max = layer.method == _PP.MAX
        self.keep_y = self.is_max and layer.phase != caffe_pb2.TEST
        self._plans = {}
        self._y = None            # the forward's output, for MAX's backward (see the docstring)
        self._y_fresh = False

    def _plan(self, dtype):
        """(pooling, x, y descriptors) for ``dtype``, made once."""
        dtype = np.dtype(dtype)
        plan = self._plans.get(dtype)
        if plan is None:
            L, lib = self.layer, self.lib
            pool = lib.descriptor("Pooling")
            mode = _cudnn.POOLING_MAX_DETERMINISTIC if self.is_max else _cudnn.POOLING_AVERAGE_COUNT_INCLUDE_PADDING
            lib.call("cudnnSetPooling2dDescriptor", pool.ptr, mode, _cudnn.NOT_PROPAGATE_NAN,
                     L.kh, L.kw, L.ph, L.pw, L.sh, L.sw)
            n, c, h, w = L.bottom_shape
            xd, yd = lib.tensor4d(dtype, n, c, h, w), lib.tensor4d(dtype, n, c, *L.out_hw)
            plan = self._plans[dtype] = (pool, xd, yd)
        return plan

    def _forward(self, x, y):
        pool, xd, yd = self._plan(x.dtype)
        self.lib.call_into("cudnnPoolingForward", (pool.ptr,), [(xd.ptr, x)], y, yd.ptr)

    def _saved_y(self, shape, dtype):
        if self._y is None or self._y.shape != tuple(shape) or self._y.dtype != dtype:
            self._y = backend.import_cupy().empty(shape, dtype)
        return self._y

    def pool_forward(self, x, y, mask):
        """``y`` = the pooled ``x`` (``mask`` is None: ``computes`` refuses the argmax top)."""
        self._forward(x, y)
        if self.keep_y:
            self._saved_y(y.shape, y.dtype)[...] = y
            self._y_fresh = True

    def pool_backward(self, x, dy, dx):
        """``dx`` = the pooled gradient (overwritten)."""
        if self.is_max:
            y = self._saved_y(dy.shape, dy.dtype)
            if not self._y_fresh:
                self._forward(x, y)
                self._y_fresh = self.keep_y
        else:
            y = dy                # AVE's gradient reads no y (the module docstring)
        pool, xd, yd = self._plan(dx.dtype)
        self.lib.call_into("cudnnPoolingBackward", (pool.ptr,), [(yd.ptr, y), (yd.ptr, dy), (xd.ptr, x)], dx,
                           xd.ptr)


# above the CUDA kernels (priority 20) wherever cuDNN loads and computes the shape
register(Engine("Pooling", "cudnn", build=CudnnPooling, devices=("gpu",), priority=30, cudnn=True,
                applies=lambda layer: computes(layer) and _cudnn.available()[0], computes=computes))
