"""cuDNN 9 through its C API, bound with ctypes: the library, a handle per device and thread, and
descriptors that free themselves.

Why the C API and not NVIDIA's Python frontend (``nvidia-cudnn-frontend``, which the issue names):
the frontend's Python graph API is large and still moving (a pure-Python graph over many backends),
its wheels carry a compiled module per Python version (cp312 only for v1.32), and it would be one
more wheel to carry to a GPU machine that has no network. The legacy convolution API that cuDNN 9
still ships (tensor/filter/convolution descriptors, ``cudnnGetConvolution*Algorithm_v7``,
``cudnnConvolutionForward``/``BackwardData``/``BackwardFilter``) is stable, covers everything
Caffe's CuDNNConvolutionLayer does, and needs only the cuDNN library itself: the
``nvidia-cudnn-cu12``/``-cu13`` wheel (``pip install minicaffe[cudnn]``) or a system install.
The same legacy API runs softmax, pooling and LRN (``cudnn_softmax``, ``cudnn_pooling``,
``cudnn_lrn``). Every signature and enum value below was taken from the cuDNN 9 headers
(``cudnn_graph.h``, ``cudnn_ops.h``, ``cudnn_cnn.h``); ``tests/cudnn_standin.py`` holds the headers' C signatures
separately and refuses a call whose declared ``argtypes`` differ, so a mistake here fails on the CPU,
not on the GPU.

Where the library comes from: ``library()`` opens it once into the context (``context.cudnn``, as
CuPy lives in ``context.cupy``): the wheel's ``nvidia/cudnn/lib/libcudnn.so.9`` (found through the
installed ``nvidia`` namespace package; the wheel's libraries carry an ``$ORIGIN`` run path, so the
shim finds its sub-libraries, and NVRTC and cuBLAS in the sibling ``nvidia`` wheels, whatever
``LD_LIBRARY_PATH`` says), else the system's ``libcudnn.so.9``. When
neither loads, the context keeps a ``Missing`` with the reason, and ``available()`` says False with
that reason: nothing here raises at import, and a machine without cuDNN runs the CuPy engines. The
CPU test suite puts an emulation of the library there instead (tests/conftest.py's ``gpu``
fixture), so the cuDNN engines run in every GPU-mode test without a GPU.

Conventions the binding keeps, which cuDNN requires:
* every call's status is checked; a failure is a RuntimeError naming the function and
  ``cudnnGetErrorString``'s text (an internal error, not a user's: the engine chose the call);
* one handle per (device, thread) (cuDNN handles are not thread-safe), set to CuPy's current stream
  before each call, so cuDNN's kernels are ordered with CuPy's;
* ``alpha``/``beta`` point to a ``float`` for float32 data and a ``double`` for float64 data;
* descriptors are created and set once per shape, and destroyed by a finalizer when the engine that
  built them goes.
"""
import ctypes
import ctypes.util
import os
import threading
import weakref
from ctypes import POINTER, Structure, c_char_p, c_double, c_float, c_int, c_size_t, c_uint, c_void_p

import numpy as np

from ..core import backend
from ..core import context as _context
from . import _cuda
from . import engines as _engines

# --- enum values (cuDNN 9 headers) ----------------------------------------------------------------
STATUS_SUCCESS = 0
STATUS_BAD_PARAM = 2000
STATUS_NOT_SUPPORTED = 3000
DATA_FLOAT, DATA_DOUBLE = 0, 1
TENSOR_NCHW = 0
CONVOLUTION, CROSS_CORRELATION = 0, 1
DEFAULT_MATH, TENSOR_OP_MATH, TENSOR_OP_MATH_ALLOW_CONVERSION, FMA_MATH = 0, 1, 2, 3
NON_DETERMINISTIC, DETERMINISTIC = 0, 1
SOFTMAX_FAST, SOFTMAX_ACCURATE, SOFTMAX_LOG = 0, 1, 2
SOFTMAX_MODE_INSTANCE, SOFTMAX_MODE_CHANNEL = 0, 1
NOT_PROPAGATE_NAN, PROPAGATE_NAN = 0, 1
POOLING_MAX, POOLING_AVERAGE_COUNT_INCLUDE_PADDING, POOLING_AVERAGE_COUNT_EXCLUDE_PADDING = 0, 1, 2
POOLING_MAX_DETERMINISTIC = 3
LRN_CROSS_CHANNEL_DIM1 = 0
# cudnnSetLRNDescriptor's ranges (cudnn_ops.h: CUDNN_LRN_MIN_N, _MAX_N, _MIN_K, _MIN_BETA); outside
# them the call fails with BAD_PARAM (checked against libcudnn.so.9 9.28: N 17, k 9e-6, beta 0.009
# fail; alpha has no bound)
LRN_MIN_N, LRN_MAX_N, LRN_MIN_K, LRN_MIN_BETA = 1, 16, 1e-5, 0.01
FWD_ALGO_COUNT, BWD_DATA_ALGO_COUNT, BWD_FILTER_ALGO_COUNT = 8, 6, 7
# the deterministic algorithm of each direction that needs no heuristics' blessing: implicit GEMM
# forward (no workspace), and BWD_DATA_ALGO_1 / BWD_FILTER_ALGO_1 (implicit GEMM, deterministic)
FWD_IMPLICIT_GEMM, BWD_DATA_ALGO_1, BWD_FILTER_ALGO_1 = 0, 1, 1

DATA_TYPES = {np.dtype(np.float32): DATA_FLOAT, np.dtype(np.float64): DATA_DOUBLE}

# an algorithm may ask for 1/32 of the device's memory as scratch, between these bounds
# (MINICAFFE_CUDNN_WORKSPACE_MB overrides). One workspace serves every cuDNN convolution on a device
# (cudnn_conv), so the limit is also about what it costs. Caffe's CuDNNConvolutionLayer allowed
# 8 MiB per layer, which rules out the fast algorithms on large layers; so did 256 MiB on an H200,
# where 4 GiB took VGG-16 inference at batch 64 from 60 to 18 ms (TF32 on; 73 to 55 ms off) and
# GoogLeNet training at batch 128 from 107-125 to 83 ms, for 0.9-2.4 GB more memory.
MIN_WORKSPACE_MB, MAX_WORKSPACE_MB = 256, 4096
_device_memory = {}


class AlgoPerf(Structure):
    """``cudnnConvolutionFwdAlgoPerf_t`` (and the BwdData/BwdFilter ones: one layout):
    algo, status, time, memory, determinism, mathType, reserved[3]."""
    _fields_ = [("algo", c_int), ("status", c_int), ("time", c_float), ("memory", c_size_t),
                ("determinism", c_int), ("mathType", c_int), ("reserved", c_int * 3)]


_P = c_void_p                  # cudnnHandle_t, the descriptors, cudaStream_t, device pointers
_PP = POINTER(c_void_p)        # cudnnHandle_t *, cudnn*Descriptor_t *
_I, _IP, _SZP = c_int, POINTER(c_int), POINTER(c_size_t)
_PERF = POINTER(AlgoPerf)

# name -> (restype, argtypes); enums are C ints
SIGNATURES = {
    "cudnnGetVersion": (c_size_t, []),
    "cudnnGetErrorString": (c_char_p, [_I]),
    "cudnnCreate": (_I, [_PP]),
    "cudnnDestroy": (_I, [_P]),
    "cudnnSetStream": (_I, [_P, _P]),
    "cudnnCreateTensorDescriptor": (_I, [_PP]),
    "cudnnSetTensor4dDescriptor": (_I, [_P, _I, _I, _I, _I, _I, _I]),
    "cudnnDestroyTensorDescriptor": (_I, [_P]),
    "cudnnCreateFilterDescriptor": (_I, [_PP]),
    "cudnnSetFilter4dDescriptor": (_I, [_P, _I, _I, _I, _I, _I, _I]),
    "cudnnDestroyFilterDescriptor": (_I, [_P]),
    "cudnnCreateConvolutionDescriptor": (_I, [_PP]),
    "cudnnSetConvolution2dDescriptor": (_I, [_P, _I, _I, _I, _I, _I, _I, _I, _I]),
    "cudnnSetConvolutionGroupCount": (_I, [_P, _I]),
    "cudnnSetConvolutionMathType": (_I, [_P, _I]),
    "cudnnDestroyConvolutionDescriptor": (_I, [_P]),
    "cudnnGetConvolution2dForwardOutputDim": (_I, [_P, _P, _P, _IP, _IP, _IP, _IP]),
    "cudnnGetConvolutionForwardAlgorithm_v7": (_I, [_P, _P, _P, _P, _P, _I, _IP, _PERF]),
    "cudnnGetConvolutionBackwardDataAlgorithm_v7": (_I, [_P, _P, _P, _P, _P, _I, _IP, _PERF]),
    "cudnnGetConvolutionBackwardFilterAlgorithm_v7": (_I, [_P, _P, _P, _P, _P, _I, _IP, _PERF]),
    "cudnnGetConvolutionForwardWorkspaceSize": (_I, [_P, _P, _P, _P, _P, _I, _SZP]),
    "cudnnGetConvolutionBackwardDataWorkspaceSize": (_I, [_P, _P, _P, _P, _P, _I, _SZP]),
    "cudnnGetConvolutionBackwardFilterWorkspaceSize": (_I, [_P, _P, _P, _P, _P, _I, _SZP]),
    "cudnnConvolutionForward": (_I, [_P, _P, _P, _P, _P, _P, _P, _I, _P, c_size_t, _P, _P, _P]),
    "cudnnConvolutionBackwardData": (_I, [_P, _P, _P, _P, _P, _P, _P, _I, _P, c_size_t, _P, _P, _P]),
    "cudnnConvolutionBackwardFilter": (_I, [_P, _P, _P, _P, _P, _P, _P, _I, _P, c_size_t, _P, _P, _P]),
    "cudnnSoftmaxForward": (_I, [_P, _I, _I, _P, _P, _P, _P, _P, _P]),
    "cudnnSoftmaxBackward": (_I, [_P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P]),
    "cudnnCreatePoolingDescriptor": (_I, [_PP]),
    "cudnnSetPooling2dDescriptor": (_I, [_P, _I, _I, _I, _I, _I, _I, _I, _I]),
    "cudnnGetPooling2dForwardOutputDim": (_I, [_P, _P, _IP, _IP, _IP, _IP]),
    "cudnnDestroyPoolingDescriptor": (_I, [_P]),
    "cudnnPoolingForward": (_I, [_P, _P, _P, _P, _P, _P, _P, _P]),
    "cudnnPoolingBackward": (_I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P]),
    "cudnnCreateLRNDescriptor": (_I, [_PP]),
    "cudnnSetLRNDescriptor": (_I, [_P, c_uint, c_double, c_double, c_double]),
    "cudnnDestroyLRNDescriptor": (_I, [_P]),
    "cudnnLRNCrossChannelForward": (_I, [_P, _P, _I, _P, _P, _P, _P, _P, _P]),
    "cudnnLRNCrossChannelBackward": (_I, [_P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P]),
}

class Missing:
    """What the context holds when cuDNN could not be opened: the reason, said once by ``available``."""

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return f"Missing({self.reason!r})"


def _wheel_dirs():
    """``nvidia/cudnn/lib`` of every installed ``nvidia-cudnn-cu*`` wheel (the ``nvidia`` namespace
    package may span several site directories)."""
    try:
        import nvidia  # noqa: F401  (a namespace package: its __path__ lists every site's folder)
    except ImportError:
        return []
    return [os.path.join(p, "cudnn", "lib") for p in getattr(nvidia, "__path__", [])
            if os.path.isdir(os.path.join(p, "cudnn", "lib"))]


def _open():
    """The cuDNN 9 library as a ``ctypes.CDLL``, or ``Missing`` with every reason tried."""
    tried = []
    for folder in _wheel_dirs():
        path = os.path.join(folder, "libcudnn.so.9")
        if not os.path.exists(path):
            continue
        try:
            return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            tried.append(f"{path}: {e}")
    for name in ("libcudnn.so.9", ctypes.util.find_library("cudnn")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            tried.append(f"{name}: {e}")
            continue
        lib.cudnnGetVersion.restype = c_size_t
        lib.cudnnGetVersion.argtypes = []
        if lib.cudnnGetVersion() >= 9000:
            return lib
        tried.append(f"{name}: version {lib.cudnnGetVersion()}, not 9")
    return Missing("cuDNN 9 not found (pip install minicaffe[cudnn] or minicaffe[cudnn-cuda13]"
                   + (f"; tried {'; '.join(tried)}" if tried else "") + ")")


class Library:
    """The raw library (a CDLL, or the tests' emulation) with every function's ``argtypes`` and
    ``restype`` declared, and the status check."""

    def __init__(self, raw):
        self.raw = raw
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(raw, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
        self.version = int(raw.cudnnGetVersion())
        self._handles = threading.local()
        self._unusable = {}         # device -> why no handle could be made there

    def error_string(self, status):
        text = self.raw.cudnnGetErrorString(status)
        return text.decode(errors="replace") if isinstance(text, bytes) else str(text)

    def call(self, name, *args):
        """``name(*args)``; a status other than success is a RuntimeError naming the function."""
        status = getattr(self.raw, name)(*args)
        if status != STATUS_SUCCESS:
            raise RuntimeError(f"{name} failed: {self.error_string(status)} (cudnnStatus_t {status})")

    def call_into(self, name, modes, inputs, out, out_desc):
        """``out`` = cuDNN's ``name`` with alpha 1 and beta 0 (overwritten), called as
        ``name(handle, *modes, &alpha, desc, x, ..., &beta, out_desc, out)``: the shape of the
        forward and backward calls of the LRN, softmax and pooling engines. ``inputs`` are
        (descriptor pointer, array) pairs, made contiguous first (and kept alive over the call);
        a non-contiguous ``out`` receives the result through a contiguous buffer."""
        cp = backend.import_cupy()
        arrays = [_cuda.contiguous(cp, a) for _, a in inputs]
        target = out if out.flags.c_contiguous else cp.empty(out.shape, out.dtype)
        one, zero = scalar(out.dtype, 1.0), scalar(out.dtype, 0.0)
        args = [self.handle(cp.cuda.get_current_stream().ptr), *modes, ctypes.byref(one)]
        for (desc, _), a in zip(inputs, arrays):
            args += [desc, pointer(a)]
        self.call(name, *args, ctypes.byref(zero), out_desc, pointer(target))
        if target is not out:
            out[...] = target
        return out

    def try_call(self, name, *args):
        """``name(*args)``'s status, for calls whose failure is an answer (an unsupported algorithm)."""
        return getattr(self.raw, name)(*args)

    def handle(self, stream_ptr):
        """This thread's handle on the current device, set to ``stream_ptr`` (CuPy's current stream)."""
        cp = backend.import_cupy()
        device = cp.cuda.Device().id
        handles = getattr(self._handles, "by_device", None)
        if handles is None:
            handles = self._handles.by_device = {}
        h = handles.get(device)
        if h is None:
            h = handles[device] = _Handle(self)
        self.call("cudnnSetStream", h.ptr, c_void_p(stream_ptr or None))
        return h.ptr

    def usable(self):
        """``(True, "")`` when a handle can be made on the current device (a driver too old for the
        library fails here, once per device and thread, not in the middle of a net), else
        ``(False, why)``."""
        cp = backend.import_cupy()
        device = cp.cuda.Device().id
        why = self._unusable.get(device)
        if why is None:
            try:
                self.handle(cp.cuda.get_current_stream().ptr)
                why = ""
            except Exception as e:      # noqa: BLE001 - the reason is the answer
                why = f"cuDNN {self.version} is installed but unusable here: {e}"
                self._unusable[device] = why      # said once, not re-tried at every reshape
        return not why, why

    def descriptor(self, kind):
        """A new ``Tensor``/``Filter``/``Convolution``/``Pooling``/``LRN`` descriptor, destroyed with
        its owner."""
        return Descriptor(self, kind)

    def tensor4d(self, dtype, n, c, h, w):
        """A new tensor descriptor of a dense NCHW ``dtype`` array of that shape (every engine's
        input and output tensors)."""
        d = Descriptor(self, "Tensor")
        self.call("cudnnSetTensor4dDescriptor", d.ptr, TENSOR_NCHW, DATA_TYPES[np.dtype(dtype)],
                  int(n), int(c), int(h), int(w))
        return d


def _destroy_quietly(raw, name, value):
    try:
        getattr(raw, name)(c_void_p(value))
    except Exception:   # at interpreter exit the library may be gone; nothing is left to free then
        pass


class _Handle:
    """A cuDNN handle, destroyed when the thread that made it ends (its thread-local dict goes)."""

    def __init__(self, lib):
        p = c_void_p()
        lib.call("cudnnCreate", ctypes.byref(p))
        self.ptr = p
        self._free = weakref.finalize(self, _destroy_quietly, lib.raw, "cudnnDestroy", p.value)


class Descriptor:
    """One cuDNN descriptor (``kind``: Tensor, Filter, Convolution, Pooling or LRN); ``.ptr`` is what
    calls take."""

    def __init__(self, lib, kind):
        p = c_void_p()
        lib.call(f"cudnnCreate{kind}Descriptor", ctypes.byref(p))
        self.ptr = p
        self._free = weakref.finalize(self, _destroy_quietly, lib.raw, f"cudnnDestroy{kind}Descriptor", p.value)


_BOUND = {}     # id(raw library) -> (raw, Library): declared once per library object


def library():
    """The bound cuDNN library, or ``Missing`` (with the reason) where it cannot be opened. Opened
    once into the context; the tests put an emulation there (``context.current().cudnn``)."""
    ctx = _context.current()
    raw = ctx.cudnn
    if raw is None:
        raw = ctx.cudnn = _open()
    if isinstance(raw, Missing):
        return raw
    entry = _BOUND.get(id(raw))
    if entry is None or entry[0] is not raw:
        try:
            entry = _BOUND[id(raw)] = (raw, Library(raw))
        except AttributeError as e:     # a library without the legacy convolution API
            ctx.cudnn = Missing(f"the cuDNN library lacks a function minicaffe uses ({e})")
            return ctx.cudnn
    return entry[1]


def require():
    """The bound library for an engine being built: ``library()``, where a ``Missing`` (an engine
    built without cuDNN, which ``applies`` should have prevented) is a RuntimeError with its reason."""
    lib = library()
    if isinstance(lib, Missing):
        raise RuntimeError(f"the cuDNN engine was built without cuDNN: {lib.reason}")
    return lib


def available():
    """``(True, "")`` where the cuDNN engines can run now (GPU mode, cuDNN 9 loaded, a handle made on
    the current device, not switched off by ``MINICAFFE_CUDNN=0``), else ``(False, reason)``. Never
    raises."""
    if not _context.switches().cudnn:
        return False, "MINICAFFE_CUDNN=0"
    if backend.mode() != "gpu":
        return False, "not in GPU mode"
    try:
        lib = library()
    except Exception as e:      # a broken install must not break the CuPy engines
        return False, f"cuDNN could not be opened: {e}"
    if isinstance(lib, Missing):
        return False, lib.reason
    return lib.usable()


_engines.explain_cudnn(lambda: available()[1])


def default_workspace_limit():
    """1/32 of the current device's memory, within ``MIN_WORKSPACE_MB``..``MAX_WORKSPACE_MB``
    (the least where the device cannot be asked)."""
    try:
        runtime = backend.import_cupy().cuda.runtime
        device = runtime.getDevice()
        total = _device_memory.get(device)
        if total is None:
            total = _device_memory[device] = int(runtime.getDeviceProperties(device)["totalGlobalMem"])
    except Exception:       # no device to ask: the floor
        total = 0
    return min(MAX_WORKSPACE_MB << 20, max(MIN_WORKSPACE_MB << 20, total // 32))


def workspace_limit():
    """The most bytes an algorithm's workspace may take (``MINICAFFE_CUDNN_WORKSPACE_MB``, else
    ``default_workspace_limit()``); a value that is not a number is a one-line error naming the variable."""
    text = _context.switches().cudnn_workspace_mb
    if text is None:
        return default_workspace_limit()
    try:
        mb = float(text)
        if mb < 0:
            raise ValueError
    except ValueError:
        from ..errors import MinicaffeError
        raise MinicaffeError(f"{_context.CUDNN_WORKSPACE_VAR}={text!r} is not a number of MiB >= 0") from None
    return int(mb * (1 << 20))


def math_type(dtype):
    """The math a convolution of ``dtype`` may use: float32 runs FMA only (exact FP32, as the CuPy
    engines and the CPU compute) unless CuPy's TF32 switch is on (``CUPY_TF32=1``: tensor cores,
    as CuPy's GEMMs then do); float64 takes the default (tensor cores compute float64 exactly)."""
    if np.dtype(dtype) == np.float64:
        return DEFAULT_MATH
    return DEFAULT_MATH if _context.switches().tf32 else FMA_MATH


def pick_algorithm(perfs, limit):
    """The first of ``perfs`` (cuDNN's heuristic order, best first) that succeeded, is deterministic
    (so a resumed GPU run is bit-identical to an uninterrupted one) and needs at most ``limit``
    bytes of workspace; ``None`` when none qualifies."""
    for p in perfs:
        if p.status == STATUS_SUCCESS and p.determinism == DETERMINISTIC and p.memory <= limit:
            return int(p.algo)
    return None


def least_workspace_algorithm(perfs):
    """The deterministic algorithm of ``perfs`` that succeeded and needs the least workspace, as
    ``(algo, bytes)``; ``None`` when none did. For shapes where nothing fits the limit: a GPU with
    room to spare should run them rather than fail at build (on an H200 GoogLeNet's 7x7/2 data
    gradient at batch 128 with TF32 on had none under 256 MiB)."""
    ok = [p for p in perfs if p.status == STATUS_SUCCESS and p.determinism == DETERMINISTIC]
    if not ok:
        return None
    best = min(ok, key=lambda p: p.memory)
    return int(best.algo), int(best.memory)


def scalar(dtype, value):
    """``alpha``/``beta`` as cuDNN reads them: a float for float32 data, a double for float64."""
    return (ctypes.c_double if np.dtype(dtype) == np.float64 else ctypes.c_float)(value)


def pointer(arr):
    """The device address of a CuPy array (None for a null pointer)."""
    return c_void_p(arr.data.ptr) if arr is not None else c_void_p(None)
