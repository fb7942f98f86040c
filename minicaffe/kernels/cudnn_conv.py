"""Convolution and Deconvolution through cuDNN (``engine: CUDNN``, and DEFAULT on the GPU where
cuDNN 9 is installed): forward, data gradient and weight gradient, any stride, pad, dilation and
group, float32 and float64.

The engine keeps the interface every convolution engine has (``conv_engines``'s docstring), in the
convolution's forward orientation, so Deconvolution uses it unchanged:

* ``forward(x, w, y, grad_src, dw)``: ``y[...] = conv(x, w)`` is ``cudnnConvolutionForward`` with
  beta 0; ``dw += ...`` is ``cudnnConvolutionBackwardFilter`` with beta 1 (cuDNN adds to the
  gradient, as Caffe's solvers expect: the net zeroes the diffs, the layers accumulate);
* ``backward(dy, w, dx, x, dw)``: ``dx[...] = conv^T(dy, w)`` is ``cudnnConvolutionBackwardData``
  with beta 0, the weight gradient as above.

The bias stays in the layer, as it is for every engine. A Caffe convolution is cuDNN's
``CUDNN_CROSS_CORRELATION`` (no kernel flip) over NCHW tensors and a KCRS filter.

Why the descriptors and algorithms are settled at build (once per shape, batch size and dtype), not
per call: a net reshapes rarely and runs often, and cuDNN's heuristics cost host time. The
algorithm of each direction is the first one cuDNN's heuristics (``*_v7``) rank that succeeds, is
deterministic and fits the workspace limit (``cudnn.pick_algorithm``): deterministic because a
resumed GPU run must be bit-identical to an uninterrupted one (non-deterministic algorithms add with
atomics in a varying order), and because the gradients must not depend on the run. Where none in
the list qualifies, the fallback algorithm of that direction runs if it fits; where nothing fits
(an H200 with TF32 on had no data-gradient algorithm for GoogLeNet's 7x7/2 at batch 128 under
256 MiB), the deterministic one needing the least workspace runs, with a warning naming the switch
that raises the limit: the limit keeps memory in check, it should not stop a net that fits the
card. One workspace for every cuDNN convolution of a thread on a
device (the context's scratch buffers, slot ``_WORKSPACE``), grown to the largest need met so far:
the layers' calls follow one another on one stream, so one buffer serves them all, where a buffer
per layer would hold up to the workspace limit for every convolution of the net at once.
"""
import ctypes
import logging

import numpy as np

from ..core import backend
from ..core import context as _context
from . import _cuda
from . import cudnn as _cudnn
from .im2col import workspace as _scratch

log = logging.getLogger("minicaffe")

# the scratch buffer every cuDNN convolution of a thread shares (see the module docstring)
_WORKSPACE = _context.Slot("cudnn workspace")

_INT_MAX = (1 << 31) - 1

# direction -> (the *_v7 heuristics, the workspace-size query, the call, how many algorithms exist,
# the deterministic fallback)
_DIRECTIONS = {
    "fwd": ("cudnnGetConvolutionForwardAlgorithm_v7", "cudnnGetConvolutionForwardWorkspaceSize",
            _cudnn.FWD_ALGO_COUNT, _cudnn.FWD_IMPLICIT_GEMM),
    "bwd_data": ("cudnnGetConvolutionBackwardDataAlgorithm_v7", "cudnnGetConvolutionBackwardDataWorkspaceSize",
                 _cudnn.BWD_DATA_ALGO_COUNT, _cudnn.BWD_DATA_ALGO_1),
    "bwd_filter": ("cudnnGetConvolutionBackwardFilterAlgorithm_v7",
                   "cudnnGetConvolutionBackwardFilterWorkspaceSize",
                   _cudnn.BWD_FILTER_ALGO_COUNT, _cudnn.BWD_FILTER_ALGO_1),
}


def computes(s):
    """Whether cuDNN's 2-D convolution computes Caffe's result for ``ConvShape`` ``s``: every size
    positive, each tensor within cuDNN's int32 element count, and the padding inside the dilated
    kernel (Caffe allows more; cuDNN's algorithms are not all defined there, so such shapes go to
    the CuPy engine)."""
    g = s.geom
    dims = (s.num, s.cin, s.cout, *s.in_hw, *s.out_hw, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw)
    if min(dims) <= 0 or s.cin % s.group or s.cout % s.group:
        return False
    sizes = (s.num * s.cin * s.in_hw[0] * s.in_hw[1], s.num * s.cout * s.out_hw[0] * s.out_hw[1],
             s.cout * s.kg)
    eh, ew = g.dh * (g.kh - 1) + 1, g.dw * (g.kw - 1) + 1
    return max(sizes) <= _INT_MAX and g.ph < eh and g.pw < ew


def applies(s):
    """DEFAULT's test: cuDNN is usable now (``cudnn.available()``) and computes this shape."""
    return _cudnn.available()[0] and computes(s)


class _Plan:
    """The descriptors and the three algorithms for one batch size and dtype."""

    def __init__(self, lib, s, num, dtype, limit):
        dt = _cudnn.DATA_TYPES[np.dtype(dtype)]
        g = s.geom
        self.lib, self.dtype = lib, np.dtype(dtype)
        self.x = lib.tensor4d(dtype, num, s.cin, *s.in_hw)
        self.y = lib.tensor4d(dtype, num, s.cout, *s.out_hw)
        self.w = lib.descriptor("Filter")
        lib.call("cudnnSetFilter4dDescriptor", self.w.ptr, dt, _cudnn.TENSOR_NCHW, s.cout, s.cin // s.group,
                 g.kh, g.kw)
        self.conv = lib.descriptor("Convolution")
        lib.call("cudnnSetConvolution2dDescriptor", self.conv.ptr, g.ph, g.pw, g.sh, g.sw, g.dh, g.dw,
                 _cudnn.CROSS_CORRELATION, dt)
        lib.call("cudnnSetConvolutionGroupCount", self.conv.ptr, s.group)
        lib.call("cudnnSetConvolutionMathType", self.conv.ptr, _cudnn.math_type(dtype))
        out = [ctypes.c_int() for _ in range(4)]
        lib.call("cudnnGetConvolution2dForwardOutputDim", self.conv.ptr, self.x.ptr, self.w.ptr,
                 *[ctypes.byref(o) for o in out])
        got = tuple(o.value for o in out)
        if got != (num, s.cout, *s.out_hw):
            raise RuntimeError(f"cuDNN computes output {got} for a convolution whose output is "
                               f"{(num, s.cout, *s.out_hw)}")
        handle = lib.handle(_stream())
        self.shape_text = (f"{num}x{s.cin}x{s.in_hw[0]}x{s.in_hw[1]} -> {s.cout}, {g.kh}x{g.kw}/{g.sh}, "
                           f"{self.dtype.name}")
        self.algo, self.workspace = {}, {}
        for direction in _DIRECTIONS:
            self.algo[direction], self.workspace[direction] = self._choose(handle, direction, limit)

    def _descs(self, direction):
        """The descriptors in the order each direction's calls take them."""
        return {"fwd": (self.x, self.w, self.conv, self.y), "bwd_data": (self.w, self.y, self.conv, self.x),
                "bwd_filter": (self.x, self.y, self.conv, self.w)}[direction]

    def _choose(self, handle, direction, limit):
        heuristics, size_query, count, fallback = _DIRECTIONS[direction]
        descs = [d.ptr for d in self._descs(direction)]
        perfs = (_cudnn.AlgoPerf * count)()
        returned = ctypes.c_int()
        self.lib.call(heuristics, handle, *descs, count, ctypes.byref(returned), perfs)
        perfs = perfs[:returned.value]
        algo = _cudnn.pick_algorithm(perfs, limit)
        chosen = algo is not None
        if not chosen:
            algo = fallback
        status, size = self._size(handle, size_query, descs, algo)
        if chosen or (status == _cudnn.STATUS_SUCCESS and size <= limit):
            if status != _cudnn.STATUS_SUCCESS:
                raise RuntimeError(f"cuDNN could not size the workspace of {direction} algorithm {algo}: "
                                   f"{self.lib.error_string(status)}")
            return algo, size
        # nothing fits the limit: the deterministic algorithm needing the least, over the limit
        options = [(size, algo)] if status == _cudnn.STATUS_SUCCESS else []
        least = _cudnn.least_workspace_algorithm(perfs)
        if least is not None:
            st, sz = self._size(handle, size_query, descs, least[0])
            if st == _cudnn.STATUS_SUCCESS:
                options.append((sz, least[0]))
        if not options:
            why = self.lib.error_string(status)
            raise RuntimeError(f"cuDNN offers no deterministic {direction} algorithm for this convolution "
                               f"(algorithm {algo}: {why})")
        size, algo = min(options)
        log.warning("cuDNN: no deterministic %s algorithm of a convolution (%s) fits the %d MiB "
                     "workspace limit; algorithm %d takes %d MiB (set %s to raise the limit)",
                     direction, self.shape_text, limit >> 20, algo, -(-size >> 20), _context.CUDNN_WORKSPACE_VAR)
        return algo, size

    def _size(self, handle, size_query, descs, algo):
        """(status, bytes) of ``algo``'s workspace."""
        size = ctypes.c_size_t()
        status = self.lib.try_call(size_query, handle, *descs, algo, ctypes.byref(size))
        return status, size.value


def _stream():
    return backend.import_cupy().cuda.get_current_stream().ptr


class CudnnConv:
    """The cuDNN engine for one ``ConvShape`` (see the module docstring). ``dtype``: the layer's
    blob dtype, whose plan is made at build; ``workspace_limit``: bytes (default: the context's)."""

    def __init__(self, shape, dtype=np.float32, workspace_limit=None):
        lib = _cudnn.require()
        self.s, self.lib = shape, lib
        self.limit = _cudnn.workspace_limit() if workspace_limit is None else int(workspace_limit)
        self._plans = {}
        self.plan(shape.num, dtype)

    def plan(self, num, dtype):
        """The plan for ``num`` images of ``dtype`` (made once)."""
        key = (int(num), np.dtype(dtype))
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = _Plan(self.lib, self.s, num, dtype, self.limit)
        return p

    def _workspace(self, nbytes):
        """(array, pointer, size) of a workspace of ``nbytes`` (None, NULL and 0 when none is needed).
        The caller holds the array until its call is queued; no engine keeps it (a kept view would
        keep an outgrown buffer alive)."""
        if nbytes == 0:
            return None, ctypes.c_void_p(None), 0
        ws = _scratch(backend.import_cupy(), (nbytes,), np.uint8, _WORKSPACE)
        return ws, _cudnn.pointer(ws), int(ws.nbytes)

    def _run(self, plan, direction, inputs, out, accumulate):
        """One call of ``direction``: ``out = op(inputs) + (out if accumulate)``."""
        cp = backend.import_cupy()
        inputs = [_cuda.contiguous(cp, a) for a in inputs]
        target = out
        if not out.flags.c_contiguous:
            target = cp.ascontiguousarray(out) if accumulate else cp.empty(out.shape, out.dtype)
        for a in (*inputs, target):
            if a.dtype != plan.dtype:
                raise RuntimeError(f"cuDNN plan for {plan.dtype} given a {a.dtype} array")
        alpha, beta = _cudnn.scalar(plan.dtype, 1.0), _cudnn.scalar(plan.dtype, 1.0 if accumulate else 0.0)
        handle = self.lib.handle(_stream())
        ws_array, ws, ws_size = self._workspace(plan.workspace[direction])
        d = plan._descs(direction)
        name = {"fwd": "cudnnConvolutionForward", "bwd_data": "cudnnConvolutionBackwardData",
                "bwd_filter": "cudnnConvolutionBackwardFilter"}[direction]
        self.lib.call(name, handle, ctypes.byref(alpha), d[0].ptr, _cudnn.pointer(inputs[0]), d[1].ptr,
                      _cudnn.pointer(inputs[1]), d[2].ptr, plan.algo[direction], ws, ws_size,
                      ctypes.byref(beta), d[3].ptr, _cudnn.pointer(target))
        if target is not out:
            out[...] = target

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        """``y[...] = conv(x, w)`` when ``y`` is given; ``dw += wgrad(x, grad_src)`` when ``dw`` is."""
        if y is None and dw is None:
            return
        plan = self.plan(x.shape[0], x.dtype)
        if y is not None:
            self._run(plan, "fwd", (x, w), y, accumulate=False)
        if dw is not None:
            self._run(plan, "bwd_filter", (x, grad_src), dw, accumulate=True)

    def backward(self, dy, w, dx=None, x=None, dw=None):
        """``dx[...] = conv^T(dy, w)`` when ``dx`` is given; ``dw += wgrad(x, dy)`` when ``dw`` is."""
        if dx is None and dw is None:
            return
        plan = self.plan(dy.shape[0], dy.dtype)
        if dw is not None:
            self._run(plan, "bwd_filter", (x, dy), dw, accumulate=True)
        if dx is not None:
            self._run(plan, "bwd_data", (w, dy), dx, accumulate=False)

    def algorithms(self, num=None, dtype=None):
        """{direction: (algorithm, workspace bytes)} of the plan for ``num`` images of ``dtype``
        (default: the build's), for reports and tests."""
        key = (self.s.num if num is None else int(num), np.dtype(dtype) if dtype else None)
        for (n, dt), p in self._plans.items():
            if n == key[0] and (key[1] is None or dt == key[1]):
                return {k: (p.algo[k], p.workspace[k]) for k in p.algo}
        return None
