"""An emulation of cuDNN 9's C API for the CPU tests: the functions ``minicaffe/kernels/cudnn.py``
binds, called the way ctypes calls a C library, computed with NumPy on the memory the pointers name.

Why: CI has no GPU, and the cuDNN engine must not meet its first real call on the one GPU run a
task gets. Installed as the context's cuDNN library by the ``gpu`` fixture (tests/conftest.py) on
the CuPy stand-in, it makes the cuDNN engine the DEFAULT convolution engine of every stand-in GPU
test. On a real GPU the real library runs instead.

What makes it a faithful stand-in, not a mock:

* **Signatures.** ``C_SIGNATURES`` holds each function's C parameter types as the cuDNN 9 headers
  declare them (typed separately from the binding's table). Every call first checks that the
  binding declared ``argtypes``/``restype`` of the right count and kind for those C types (an
  ``int`` is ``c_int``, a ``size_t`` ``c_size_t``, a handle or descriptor ``c_void_p``, a
  ``cudnnHandle_t *`` a ``POINTER(c_void_p)``, a perf-result array a pointer to the header's
  48-byte structure ...), then converts each argument through its declared type as ctypes does. A
  wrong declaration fails here instead of corrupting a GPU process's stack.
* **Memory.** Arguments arrive as addresses. Results are written through them (a new handle into
  the ``cudnnHandle_t *``, the perf structures into the array), ``alpha``/``beta`` are read as a
  ``float`` for float32 data and a ``double`` for float64 data (a double passed for float data reads
  as 0.0, as in C), and tensors are read and written in the device memory the pointers name (the
  CuPy stand-in's arrays, found through ``cupy_standin._POINTERS`` and checked to span the
  descriptor's extent), with the descriptor's dims and packed NCHW strides.
* **Refusals.** What cuDNN refuses is refused with its status: descriptors created but never set,
  unknown or destroyed descriptors, tensors whose dtypes differ or whose compute type does not
  match, a filter that does not fit the input's channels and groups, an output descriptor of the
  wrong size, an algorithm the configuration does not support, a workspace smaller than the
  algorithm needs or NULL with a size. Beyond cuDNN it refuses a call made on a handle whose stream
  is not CuPy's current one (``BAD_PARAM_STREAM_MISMATCH``), which checks minicaffe's rule of
  setting the stream before every call.
* **Algorithms.** The ``*_v7`` heuristics list, best first, algorithms that real cuDNN marks
  non-deterministic (``BWD_DATA_ALGO_0``, ``BWD_FILTER_ALGO_0``/``_3``) and algorithms that want a
  large workspace (FFT) ahead of the deterministic ones, so the binding's choice (deterministic, in
  the workspace limit) is exercised; each records its workspace size, and a call with less fails.
  Every algorithm computes the same exact numbers; ``calls`` logs which ran.
"""
import ctypes
from ctypes import POINTER, c_char_p, c_double, c_float, c_int, c_size_t, c_void_p

import numpy as np

import cupy_standin

VERSION = 90800

# --- the C signatures, as the cuDNN 9 headers declare them (return type, parameter types) ---------
_CONV_CALL = ("cudnnHandle_t", "const void *", "const cudnnTensorDescriptor_t", "const void *",
              "const cudnnFilterDescriptor_t", "const void *", "const cudnnConvolutionDescriptor_t",
              "cudnnConvolutionFwdAlgo_t", "void *", "size_t", "const void *",
              "const cudnnTensorDescriptor_t", "void *")
C_SIGNATURES = {
    "cudnnGetVersion": ("size_t", ()),
    "cudnnGetErrorString": ("const char *", ("cudnnStatus_t",)),
    "cudnnCreate": ("cudnnStatus_t", ("cudnnHandle_t *",)),
    "cudnnDestroy": ("cudnnStatus_t", ("cudnnHandle_t",)),
    "cudnnSetStream": ("cudnnStatus_t", ("cudnnHandle_t", "cudaStream_t")),
    "cudnnCreateTensorDescriptor": ("cudnnStatus_t", ("cudnnTensorDescriptor_t *",)),
    "cudnnSetTensor4dDescriptor": ("cudnnStatus_t", ("cudnnTensorDescriptor_t", "cudnnTensorFormat_t",
                                                     "cudnnDataType_t", "int", "int", "int", "int")),
    "cudnnDestroyTensorDescriptor": ("cudnnStatus_t", ("cudnnTensorDescriptor_t",)),
    "cudnnCreateFilterDescriptor": ("cudnnStatus_t", ("cudnnFilterDescriptor_t *",)),
    "cudnnSetFilter4dDescriptor": ("cudnnStatus_t", ("cudnnFilterDescriptor_t", "cudnnDataType_t",
                                                     "cudnnTensorFormat_t", "int", "int", "int", "int")),
    "cudnnDestroyFilterDescriptor": ("cudnnStatus_t", ("cudnnFilterDescriptor_t",)),
    "cudnnCreateConvolutionDescriptor": ("cudnnStatus_t", ("cudnnConvolutionDescriptor_t *",)),
    "cudnnSetConvolution2dDescriptor": ("cudnnStatus_t", ("cudnnConvolutionDescriptor_t", "int", "int", "int",
                                                          "int", "int", "int", "cudnnConvolutionMode_t",
                                                          "cudnnDataType_t")),
    "cudnnSetConvolutionGroupCount": ("cudnnStatus_t", ("cudnnConvolutionDescriptor_t", "int")),
    "cudnnSetConvolutionMathType": ("cudnnStatus_t", ("cudnnConvolutionDescriptor_t", "cudnnMathType_t")),
    "cudnnDestroyConvolutionDescriptor": ("cudnnStatus_t", ("cudnnConvolutionDescriptor_t",)),
    "cudnnGetConvolution2dForwardOutputDim": ("cudnnStatus_t", (
        "const cudnnConvolutionDescriptor_t", "const cudnnTensorDescriptor_t", "const cudnnFilterDescriptor_t",
        "int *", "int *", "int *", "int *")),
    "cudnnGetConvolutionForwardAlgorithm_v7": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnTensorDescriptor_t", "const cudnnFilterDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnTensorDescriptor_t", "const int", "int *",
        "cudnnConvolutionFwdAlgoPerf_t *")),
    "cudnnGetConvolutionBackwardDataAlgorithm_v7": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnFilterDescriptor_t", "const cudnnTensorDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnTensorDescriptor_t", "const int", "int *",
        "cudnnConvolutionBwdDataAlgoPerf_t *")),
    "cudnnGetConvolutionBackwardFilterAlgorithm_v7": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnTensorDescriptor_t", "const cudnnTensorDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnFilterDescriptor_t", "const int", "int *",
        "cudnnConvolutionBwdFilterAlgoPerf_t *")),
    "cudnnGetConvolutionForwardWorkspaceSize": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnTensorDescriptor_t", "const cudnnFilterDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnTensorDescriptor_t", "cudnnConvolutionFwdAlgo_t",
        "size_t *")),
    "cudnnGetConvolutionBackwardDataWorkspaceSize": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnFilterDescriptor_t", "const cudnnTensorDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnTensorDescriptor_t", "cudnnConvolutionBwdDataAlgo_t",
        "size_t *")),
    "cudnnGetConvolutionBackwardFilterWorkspaceSize": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnTensorDescriptor_t", "const cudnnTensorDescriptor_t",
        "const cudnnConvolutionDescriptor_t", "const cudnnFilterDescriptor_t", "cudnnConvolutionBwdFilterAlgo_t",
        "size_t *")),
    "cudnnConvolutionForward": ("cudnnStatus_t", _CONV_CALL),
    "cudnnConvolutionBackwardData": ("cudnnStatus_t", (
        "cudnnHandle_t", "const void *", "const cudnnFilterDescriptor_t", "const void *",
        "const cudnnTensorDescriptor_t", "const void *", "const cudnnConvolutionDescriptor_t",
        "cudnnConvolutionBwdDataAlgo_t", "void *", "size_t", "const void *", "const cudnnTensorDescriptor_t",
        "void *")),
    "cudnnConvolutionBackwardFilter": ("cudnnStatus_t", (
        "cudnnHandle_t", "const void *", "const cudnnTensorDescriptor_t", "const void *",
        "const cudnnTensorDescriptor_t", "const void *", "const cudnnConvolutionDescriptor_t",
        "cudnnConvolutionBwdFilterAlgo_t", "void *", "size_t", "const void *", "const cudnnFilterDescriptor_t",
        "void *")),
    "cudnnSoftmaxForward": ("cudnnStatus_t", (
        "cudnnHandle_t", "cudnnSoftmaxAlgorithm_t", "cudnnSoftmaxMode_t", "const void *",
        "const cudnnTensorDescriptor_t", "const void *", "const void *", "const cudnnTensorDescriptor_t", "void *")),
    "cudnnSoftmaxBackward": ("cudnnStatus_t", (
        "cudnnHandle_t", "cudnnSoftmaxAlgorithm_t", "cudnnSoftmaxMode_t", "const void *",
        "const cudnnTensorDescriptor_t", "const void *", "const cudnnTensorDescriptor_t", "const void *",
        "const void *", "const cudnnTensorDescriptor_t", "void *")),
    # pooling and LRN (cudnn_ops.h)
    "cudnnCreatePoolingDescriptor": ("cudnnStatus_t", ("cudnnPoolingDescriptor_t *",)),
    "cudnnSetPooling2dDescriptor": ("cudnnStatus_t", ("cudnnPoolingDescriptor_t", "cudnnPoolingMode_t",
                                                      "cudnnNanPropagation_t", "int", "int", "int", "int",
                                                      "int", "int")),
    "cudnnGetPooling2dForwardOutputDim": ("cudnnStatus_t", (
        "const cudnnPoolingDescriptor_t", "const cudnnTensorDescriptor_t", "int *", "int *", "int *", "int *")),
    "cudnnDestroyPoolingDescriptor": ("cudnnStatus_t", ("cudnnPoolingDescriptor_t",)),
    "cudnnPoolingForward": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnPoolingDescriptor_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const void *", "const cudnnTensorDescriptor_t", "void *")),
    "cudnnPoolingBackward": ("cudnnStatus_t", (
        "cudnnHandle_t", "const cudnnPoolingDescriptor_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const cudnnTensorDescriptor_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const void *", "const cudnnTensorDescriptor_t", "void *")),
    "cudnnCreateLRNDescriptor": ("cudnnStatus_t", ("cudnnLRNDescriptor_t *",)),
    "cudnnSetLRNDescriptor": ("cudnnStatus_t", ("cudnnLRNDescriptor_t", "unsigned", "double", "double",
                                                "double")),
    "cudnnDestroyLRNDescriptor": ("cudnnStatus_t", ("cudnnLRNDescriptor_t",)),
    "cudnnLRNCrossChannelForward": ("cudnnStatus_t", (
        "cudnnHandle_t", "cudnnLRNDescriptor_t", "cudnnLRNMode_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const void *", "const cudnnTensorDescriptor_t", "void *")),
    "cudnnLRNCrossChannelBackward": ("cudnnStatus_t", (
        "cudnnHandle_t", "cudnnLRNDescriptor_t", "cudnnLRNMode_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const cudnnTensorDescriptor_t", "const void *", "const cudnnTensorDescriptor_t",
        "const void *", "const void *", "const cudnnTensorDescriptor_t", "void *")),
}

_OPAQUE = {"cudnnHandle_t", "cudnnTensorDescriptor_t", "cudnnFilterDescriptor_t", "cudnnConvolutionDescriptor_t",
           "cudnnPoolingDescriptor_t", "cudnnLRNDescriptor_t", "cudaStream_t"}
_ENUMS = {"cudnnStatus_t", "cudnnDataType_t", "cudnnTensorFormat_t", "cudnnConvolutionMode_t", "cudnnMathType_t",
          "cudnnConvolutionFwdAlgo_t", "cudnnConvolutionBwdDataAlgo_t", "cudnnConvolutionBwdFilterAlgo_t",
          "cudnnDeterminism_t", "cudnnSoftmaxAlgorithm_t", "cudnnSoftmaxMode_t", "cudnnPoolingMode_t",
          "cudnnNanPropagation_t", "cudnnLRNMode_t"}
_PERF_STRUCTS = {"cudnnConvolutionFwdAlgoPerf_t", "cudnnConvolutionBwdDataAlgoPerf_t",
                 "cudnnConvolutionBwdFilterAlgoPerf_t"}


class _Perf(ctypes.Structure):
    """The headers' perf-result structure, the emulation's own copy."""
    _fields_ = [("algo", c_int), ("status", c_int), ("time", c_float), ("memory", c_size_t),
                ("determinism", c_int), ("mathType", c_int), ("reserved", c_int * 3)]


def _same_struct(cls):
    """Whether a ctypes Structure has the perf structure's fields, types and size."""
    fields = getattr(cls, "_fields_", None)
    if fields is None or ctypes.sizeof(cls) != ctypes.sizeof(_Perf) or len(fields) != len(_Perf._fields_):
        return False
    for (n1, t1), (n2, t2) in zip(fields, _Perf._fields_):
        if n1 != n2:
            return False
        if issubclass(t2, ctypes.Array):
            if not (isinstance(t1, type) and issubclass(t1, ctypes.Array) and t1._type_ is t2._type_
                    and t1._length_ == t2._length_):
                return False
        elif t1 is not t2:
            return False
    return True


def _matches(ctext, declared):
    """Whether ctypes type ``declared`` is right for C type ``ctext`` (one parameter or return)."""
    t = ctext.replace("const ", "").strip()
    if t.endswith("*") or t.endswith("[]"):
        base = t.rstrip("*[] ").strip()
        if base == "void":
            return declared is c_void_p
        if base == "char":
            return declared is c_char_p
        if base in _OPAQUE:
            return declared is POINTER(c_void_p)
        if base == "int":
            return declared is POINTER(c_int)
        if base == "size_t":
            return declared is POINTER(c_size_t)
        if base in _PERF_STRUCTS:
            return (isinstance(declared, type) and issubclass(declared, ctypes._Pointer)
                    and _same_struct(declared._type_))
        raise AssertionError(f"no rule for C type {ctext!r}")
    if t in _OPAQUE:
        return declared is c_void_p
    if t == "int" or t in _ENUMS:
        return declared is c_int
    if t == "size_t":
        return declared is c_size_t
    if t == "unsigned":
        return declared is ctypes.c_uint
    if t == "double":
        return declared is c_double
    raise AssertionError(f"no rule for C type {ctext!r}")


def _address(arg):
    """What C receives for one argument: the integer (or address) ctypes would pass."""
    if arg is None:
        return 0
    if isinstance(arg, (int, np.integer)):
        return int(arg)
    if isinstance(arg, (float, np.floating)):       # a double parameter: passed by value
        return float(arg)
    if isinstance(arg, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(arg)
    if isinstance(arg, ctypes._Pointer):
        return ctypes.cast(arg, c_void_p).value or 0
    if isinstance(arg, ctypes._SimpleCData):
        return arg.value or 0
    if type(arg).__name__ == "CArgObject":      # ctypes.byref(obj)
        return ctypes.addressof(arg._obj)
    raise TypeError(f"cannot pass {type(arg).__name__} to C")


class _Function:
    """One emulated C function: checks the binding's declaration, converts as ctypes would, runs."""

    def __init__(self, name, impl):
        self.__name__ = name
        self.impl = impl
        self.argtypes = None
        self.restype = c_int            # ctypes' default, which a size_t or char * return must change

    def check(self):
        """AssertionError unless the declared argtypes/restype fit the header's C signature."""
        name = self.__name__
        ret, params = C_SIGNATURES[name]
        if self.argtypes is None:
            raise AssertionError(f"{name}: called without argtypes declared")
        if len(self.argtypes) != len(params):
            raise AssertionError(f"{name}: {len(self.argtypes)} argtypes declared, the header has {len(params)}")
        for i, (ctext, declared) in enumerate(zip(params, self.argtypes)):
            if not _matches(ctext, declared):
                raise AssertionError(f"{name}: parameter {i} is {ctext!r} in the header, declared {declared}")
        if not _matches(ret, self.restype):
            raise AssertionError(f"{name}: returns {ret!r} in the header, restype declared {self.restype}")

    def __call__(self, *args):
        self.check()
        params = C_SIGNATURES[self.__name__][1]
        if len(args) != len(params):
            raise TypeError(f"this function takes {len(params)} arguments ({len(args)} given)")
        for i, (t, a) in enumerate(zip(self.argtypes, args)):
            try:
                t.from_param(a)
            except TypeError as e:
                raise ctypes.ArgumentError(f"argument {i + 1}: {e}") from None
        return self.impl(*[_address(a) for a in args])


# --- statuses ---------------------------------------------------------------------------------------
SUCCESS, NOT_INITIALIZED, BAD_PARAM, NULL_POINTER = 0, 1001, 2000, 2002
STREAM_MISMATCH, SHAPE_MISMATCH, NOT_SUPPORTED = 2007, 2008, 3000
_NAMES = {SUCCESS: "CUDNN_STATUS_SUCCESS", NOT_INITIALIZED: "CUDNN_STATUS_NOT_INITIALIZED",
          BAD_PARAM: "CUDNN_STATUS_BAD_PARAM", NULL_POINTER: "CUDNN_STATUS_BAD_PARAM_NULL_POINTER",
          STREAM_MISMATCH: "CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH",
          SHAPE_MISMATCH: "CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH", NOT_SUPPORTED: "CUDNN_STATUS_NOT_SUPPORTED"}

_DTYPES = {0: np.float32, 1: np.float64}
FLOAT, DOUBLE = 0, 1
NON_DETERMINISTIC, DETERMINISTIC = 0, 1


class _Fail(Exception):
    def __init__(self, status):
        self.status = status


def _require(cond, status=BAD_PARAM):
    if not cond:
        raise _Fail(status)


# --- the arithmetic (independent of minicaffe's: per kernel tap, grouped einsums on padded NCHW) ---
def _out_size(n, k, s, p, d):
    return (n + 2 * p - (d * (k - 1) + 1)) // s + 1


def _taps(conv, kh, kw, oh, ow):
    (ph, pw), (sh, sw), (dh, dw) = conv["pad"], conv["stride"], conv["dilation"]
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(i * dh, i * dh + sh * (oh - 1) + 1, sh), slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


def _filters(conv, w):
    """cuDNN's CONVOLUTION mode flips the kernel; CROSS_CORRELATION (Caffe's) does not."""
    return w[..., ::-1, ::-1] if conv["mode"] == 0 else w


def conv_forward(conv, x, w, out_hw):
    g = conv["group"]
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    (ph, pw) = conv["pad"]
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), x.dtype)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    xg = xp.reshape(n, g, cg, *xp.shape[2:])
    wg = _filters(conv, w).reshape(g, k // g, cg, kh, kw)
    y = np.zeros((n, g, k // g, *out_hw), x.dtype)
    for i, j, (sy, sx) in _taps(conv, kh, kw, *out_hw):
        y += np.einsum("ngcpq,goc->ngopq", xg[:, :, :, sy, sx], wg[:, :, :, i, j])
    return y.reshape(n, k, *out_hw)


def conv_backward_data(conv, dy, w, in_hw):
    g = conv["group"]
    n, k, oh, ow = dy.shape
    _, cg, kh, kw = w.shape
    (ph, pw) = conv["pad"]
    h, wd = in_hw
    acc = np.zeros((n, g, cg, h + 2 * ph, wd + 2 * pw), dy.dtype)
    dyg = dy.reshape(n, g, k // g, oh, ow)
    wg = _filters(conv, w).reshape(g, k // g, cg, kh, kw)
    for i, j, (sy, sx) in _taps(conv, kh, kw, oh, ow):
        acc[:, :, :, sy, sx] += np.einsum("ngopq,goc->ngcpq", dyg, wg[:, :, :, i, j])
    return acc[:, :, :, ph:ph + h, pw:pw + wd].reshape(n, g * cg, h, wd)


def conv_backward_filter(conv, x, dy, wshape):
    g = conv["group"]
    n, c, h, wd = x.shape
    k, cg, kh, kw = wshape
    (ph, pw) = conv["pad"]
    oh, ow = dy.shape[2:]
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), x.dtype)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    xg = xp.reshape(n, g, cg, *xp.shape[2:])
    dyg = dy.reshape(n, g, k // g, oh, ow)
    dw = np.zeros((g, k // g, cg, kh, kw), x.dtype)
    for i, j, (sy, sx) in _taps(conv, kh, kw, oh, ow):
        dw[:, :, :, i, j] = np.einsum("ngopq,ngcpq->goc", dyg, xg[:, :, :, sy, sx])
    return _filters(conv, dw.reshape(k, cg, kh, kw))


# --- the library ---------------------------------------------------------------------------------------
class FakeCudnn:
    """The emulated library: one per test (state is per object). ``calls``: (function, algorithm)
    of every convolution run; ``live()``: how many handles and descriptors are not yet destroyed."""

    def __init__(self):
        self._next = 0x1000
        self.handles, self.tensors, self.filters, self.convs = {}, {}, {}, {}
        self.pools, self.lrns = {}, {}
        self.calls = []
        # algorithms real cuDNN lacks for a case are NOT_SUPPORTED here too (ws: bytes they need)
        for name in C_SIGNATURES:
            setattr(self, name, _Function(name, getattr(self, "_" + name)))

    def live(self):
        return (len(self.handles) + len(self.tensors) + len(self.filters) + len(self.convs) + len(self.pools)
                + len(self.lrns))

    # helpers
    def _new(self, table, addr, value):
        _require(addr != 0, NULL_POINTER)
        self._next += 0x10
        table[self._next] = value
        c_void_p.from_address(addr).value = self._next
        return SUCCESS

    @staticmethod
    def _status(fn, *args):
        try:
            fn(*args)
        except _Fail as f:
            return f.status
        return SUCCESS

    def _get(self, table, ident, must_be_set=True):
        _require(ident in table)
        value = table[ident]
        if must_be_set:
            _require(value is not None and value.get("set", True))
        return value

    @staticmethod
    def _memory(ptr, nbytes):
        """The device memory at ``ptr`` as bytes (a NumPy uint8 view), checked to span ``nbytes``."""
        _require(ptr != 0, NULL_POINTER)
        arr = cupy_standin._POINTERS.get(ptr)
        _require(arr is not None)                   # not a pointer any device array handed out
        base = arr
        while isinstance(base.base, np.ndarray):
            base = base.base
        start = base.__array_interface__["data"][0]
        _require(start <= ptr and ptr + nbytes <= start + base.nbytes)
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))[:nbytes]

    def _tensor(self, ptr, desc, dtype):
        count = int(np.prod(desc["dims"]))
        raw = self._memory(ptr, count * np.dtype(dtype).itemsize)
        return raw.view(dtype).reshape(desc["dims"])

    # version, errors, handles
    def _cudnnGetVersion(self):
        return VERSION

    def _cudnnGetErrorString(self, status):
        return _NAMES.get(status, "CUDNN_STATUS_UNKNOWN").encode()

    def _cudnnCreate(self, addr):
        return self._status(lambda: self._new(self.handles, addr, {"stream": 0}))

    def _cudnnDestroy(self, h):
        if h not in self.handles:
            return BAD_PARAM
        del self.handles[h]
        return SUCCESS

    def _cudnnSetStream(self, h, stream):
        if h not in self.handles:
            return BAD_PARAM
        self.handles[h]["stream"] = stream
        return SUCCESS

    # descriptors
    def _create(self, table, addr):
        return self._status(lambda: self._new(table, addr, {"set": False}))

    def _destroy(self, table, ident):
        if ident not in table:
            return BAD_PARAM
        del table[ident]
        return SUCCESS

    def _cudnnCreateTensorDescriptor(self, addr):
        return self._create(self.tensors, addr)

    def _cudnnCreateFilterDescriptor(self, addr):
        return self._create(self.filters, addr)

    def _cudnnCreateConvolutionDescriptor(self, addr):
        return self._create(self.convs, addr)

    def _cudnnDestroyTensorDescriptor(self, d):
        return self._destroy(self.tensors, d)

    def _cudnnDestroyFilterDescriptor(self, d):
        return self._destroy(self.filters, d)

    def _cudnnDestroyConvolutionDescriptor(self, d):
        return self._destroy(self.convs, d)

    def _set_4d(self, table, d, fmt, dtype, dims):
        def run():
            desc = self._get(table, d, must_be_set=False)
            _require(fmt == 0, NOT_SUPPORTED)          # NCHW only: the emulation has no other layout
            _require(dtype in _DTYPES, NOT_SUPPORTED)
            _require(min(dims) > 0 and int(np.prod(dims)) < 2 ** 31)
            desc.update(set=True, dtype=dtype, dims=tuple(dims))
        return self._status(run)

    def _cudnnSetTensor4dDescriptor(self, d, fmt, dtype, n, c, h, w):
        return self._set_4d(self.tensors, d, fmt, dtype, (n, c, h, w))

    def _cudnnSetFilter4dDescriptor(self, d, dtype, fmt, k, c, h, w):
        return self._set_4d(self.filters, d, fmt, dtype, (k, c, h, w))

    def _cudnnSetConvolution2dDescriptor(self, d, ph, pw, sh, sw, dh, dw, mode, compute):
        def run():
            desc = self._get(self.convs, d, must_be_set=False)
            _require(min(ph, pw) >= 0 and min(sh, sw, dh, dw) > 0 and mode in (0, 1))
            _require(compute in _DTYPES, NOT_SUPPORTED)
            desc.update(set=True, pad=(ph, pw), stride=(sh, sw), dilation=(dh, dw), mode=mode, compute=compute,
                        group=desc.get("group", 1), math=desc.get("math", 0))
        return self._status(run)

    def _cudnnSetConvolutionGroupCount(self, d, groups):
        def run():
            desc = self._get(self.convs, d, must_be_set=False)
            _require(groups >= 1)
            desc["group"] = groups
        return self._status(run)

    def _cudnnSetConvolutionMathType(self, d, math):
        def run():
            desc = self._get(self.convs, d, must_be_set=False)
            _require(math in (0, 1, 2, 3))
            desc["math"] = math
        return self._status(run)

    # shapes
    def _geometry(self, conv_id, x_id, w_id):
        """(conv, x desc, w desc, output dims), checked as cuDNN checks them."""
        conv = self._get(self.convs, conv_id)
        x = self._get(self.tensors, x_id)
        w = self._get(self.filters, w_id)
        n, c, h, wd = x["dims"]
        k, cg, kh, kw = w["dims"]
        g = conv["group"]
        _require(cg * g == c and k % g == 0)
        oh = _out_size(h, kh, conv["stride"][0], conv["pad"][0], conv["dilation"][0])
        ow = _out_size(wd, kw, conv["stride"][1], conv["pad"][1], conv["dilation"][1])
        _require(oh > 0 and ow > 0)
        return conv, x, w, (n, k, oh, ow)

    def _cudnnGetConvolution2dForwardOutputDim(self, conv_id, x_id, w_id, pn, pc, ph, pw):
        def run():
            *_, dims = self._geometry(conv_id, x_id, w_id)
            for addr, v in zip((pn, pc, ph, pw), dims):
                _require(addr != 0, NULL_POINTER)
                c_int.from_address(addr).value = v
        return self._status(run)

    def _problem(self, handle, x_id, w_id, conv_id, y_id):
        """The checked convolution: dtypes agree with each other and the compute type, y fits."""
        _require(handle in self.handles)
        conv, x, w, dims = self._geometry(conv_id, x_id, w_id)
        y = self._get(self.tensors, y_id)
        _require(x["dtype"] == w["dtype"] == y["dtype"], NOT_SUPPORTED)
        _require(conv["compute"] == x["dtype"], NOT_SUPPORTED)
        _require(y["dims"] == dims, SHAPE_MISMATCH)
        return conv, x, w, y

    # the algorithms: (id, determinism, workspace bytes or None when unsupported), heuristic order
    def _algorithms(self, direction, conv, x, w, y):
        dtype = np.dtype(_DTYPES[x["dtype"]])
        n, c, h, wd = x["dims"]
        k, cg, kh, kw = w["dims"]
        oh, ow = y["dims"][2:]
        unit = conv["stride"] == (1, 1) and conv["dilation"] == (1, 1)
        fft = 64 * (n * c * h * wd + n * k * oh * ow + k * cg * kh * kw) * dtype.itemsize
        fft = fft if unit and dtype == np.float32 else None          # FFT: float32, unit stride only
        cols = c * kh * kw * oh * ow * dtype.itemsize
        index = 4 * kh * kw * oh * ow + 256
        if direction == "fwd":
            return [(4, DETERMINISTIC, fft),                          # FFT
                    (1, DETERMINISTIC, index),                        # IMPLICIT_PRECOMP_GEMM
                    (2, DETERMINISTIC, cols if dtype == np.float32 else None),   # GEMM
                    (0, DETERMINISTIC, 0),                            # IMPLICIT_GEMM
                    (3, DETERMINISTIC, None)]                         # DIRECT: not implemented
        if direction == "bwd_data":
            return [(0, NON_DETERMINISTIC, 0), (3, DETERMINISTIC, fft), (1, DETERMINISTIC, 0),
                    (4, DETERMINISTIC, None)]
        return [(0, NON_DETERMINISTIC, 0), (3, NON_DETERMINISTIC, index), (2, DETERMINISTIC, fft),
                (1, DETERMINISTIC, index)]

    def _heuristics(self, direction, handle, ids, requested, returned, perfs):
        def run():
            conv, x, w, y = self._problem(handle, *ids)
            _require(requested >= 1 and returned != 0 and perfs != 0)
            algos = self._algorithms(direction, conv, x, w, y)[:requested]
            out = (_Perf * len(algos)).from_address(perfs)
            for p, (algo, det, ws) in zip(out, algos):
                p.algo, p.determinism, p.mathType = algo, det, conv["math"]
                p.status = SUCCESS if ws is not None else NOT_SUPPORTED
                p.memory = ws or 0
                p.time = -1.0
            c_int.from_address(returned).value = len(algos)
        return self._status(run)

    def _need(self, direction, conv, x, w, y, algo):
        for a, _, ws in self._algorithms(direction, conv, x, w, y):
            if a == algo:
                _require(ws is not None, NOT_SUPPORTED)
                return ws
        raise _Fail(BAD_PARAM)

    def _size(self, direction, handle, ids, algo, out):
        def run():
            conv, x, w, y = self._problem(handle, *ids)
            _require(out != 0, NULL_POINTER)
            c_size_t.from_address(out).value = self._need(direction, conv, x, w, y, algo)
        return self._status(run)

    def _cudnnGetConvolutionForwardAlgorithm_v7(self, h, x, w, conv, y, requested, returned, perfs):
        return self._heuristics("fwd", h, (x, w, conv, y), requested, returned, perfs)

    def _cudnnGetConvolutionBackwardDataAlgorithm_v7(self, h, w, dy, conv, dx, requested, returned, perfs):
        return self._heuristics("bwd_data", h, (dx, w, conv, dy), requested, returned, perfs)

    def _cudnnGetConvolutionBackwardFilterAlgorithm_v7(self, h, x, dy, conv, dw, requested, returned, perfs):
        return self._heuristics("bwd_filter", h, (x, dw, conv, dy), requested, returned, perfs)

    def _cudnnGetConvolutionForwardWorkspaceSize(self, h, x, w, conv, y, algo, out):
        return self._size("fwd", h, (x, w, conv, y), algo, out)

    def _cudnnGetConvolutionBackwardDataWorkspaceSize(self, h, w, dy, conv, dx, algo, out):
        return self._size("bwd_data", h, (dx, w, conv, dy), algo, out)

    def _cudnnGetConvolutionBackwardFilterWorkspaceSize(self, h, x, dy, conv, dw, algo, out):
        return self._size("bwd_filter", h, (x, dw, conv, dy), algo, out)

    # the calls
    def _execute(self, name, direction, handle, ids, algo, ws, ws_size, alpha, beta, compute):
        """Checks common to the three calls; ``compute(conv, x, w, y, a, b)`` does the arithmetic."""
        def run():
            conv, x, w, y = self._problem(handle, *ids)
            _require(self.handles[handle]["stream"] == cupy_standin.get_current_stream().ptr, STREAM_MISMATCH)
            need = self._need(direction, conv, x, w, y, algo)
            _require(ws_size >= need)
            if ws_size:
                _require(ws != 0, NULL_POINTER)
                self._memory(ws, ws_size)
            scalar = c_double if x["dtype"] == DOUBLE else c_float
            _require(alpha != 0 and beta != 0, NULL_POINTER)
            a, b = scalar.from_address(alpha).value, scalar.from_address(beta).value
            compute(conv, x, w, y, a, b)
            self.calls.append((name, algo))
        return self._status(run)

    @staticmethod
    def _blend(out, value, a, b):
        """out = a * value + b * out; with b == 0 the old contents are not read (NaN stays out)."""
        if b == 0:
            out[...] = a * value
        else:
            out[...] = a * value + b * out

    def _cudnnConvolutionForward(self, h, alpha, xd, xp, wd, wp, conv_id, algo, ws, ws_size, beta, yd, yp):
        def compute(conv, x, w, y, a, b):
            dt = _DTYPES[x["dtype"]]
            xa, wa, ya = self._tensor(xp, x, dt), self._tensor(wp, w, dt), self._tensor(yp, y, dt)
            self._blend(ya, conv_forward(conv, xa, wa, y["dims"][2:]), a, b)
        return self._execute("cudnnConvolutionForward", "fwd", h, (xd, wd, conv_id, yd), algo, ws, ws_size,
                             alpha, beta, compute)

    def _cudnnConvolutionBackwardData(self, h, alpha, wd, wp, dyd, dyp, conv_id, algo, ws, ws_size, beta, dxd, dxp):
        def compute(conv, x, w, y, a, b):
            dt = _DTYPES[x["dtype"]]
            wa, dya, dxa = self._tensor(wp, w, dt), self._tensor(dyp, y, dt), self._tensor(dxp, x, dt)
            self._blend(dxa, conv_backward_data(conv, dya, wa, x["dims"][2:]), a, b)
        return self._execute("cudnnConvolutionBackwardData", "bwd_data", h, (dxd, wd, conv_id, dyd), algo, ws,
                             ws_size, alpha, beta, compute)

    def _cudnnConvolutionBackwardFilter(self, h, alpha, xd, xp, dyd, dyp, conv_id, algo, ws, ws_size, beta,
                                        dwd, dwp):
        def compute(conv, x, w, y, a, b):
            dt = _DTYPES[x["dtype"]]
            xa, dya, dwa = self._tensor(xp, x, dt), self._tensor(dyp, y, dt), self._tensor(dwp, w, dt)
            self._blend(dwa, conv_backward_filter(conv, xa, dya, w["dims"]), a, b)
        return self._execute("cudnnConvolutionBackwardFilter", "bwd_filter", h, (xd, dwd, conv_id, dyd), algo, ws,
                             ws_size, alpha, beta, compute)

    # softmax (cudnn_ops.h): FAST, ACCURATE (max subtracted) or LOG, over C (CHANNEL) or C, H, W
    # (INSTANCE) of each image; x and y (dy and dx) may be the same memory
    def _softmax_tensors(self, handle, ids, algo, mode):
        _require(handle in self.handles)
        _require(self.handles[handle]["stream"] == cupy_standin.get_current_stream().ptr, STREAM_MISMATCH)
        _require(algo in (0, 1, 2) and mode in (0, 1))
        descs = [self._get(self.tensors, d) for d in ids]
        _require(all(d["dtype"] == descs[0]["dtype"] for d in descs), NOT_SUPPORTED)
        _require(all(d["dims"] == descs[0]["dims"] for d in descs), SHAPE_MISMATCH)
        return descs, _DTYPES[descs[0]["dtype"]], (1,) if mode == 1 else (1, 2, 3)

    def _scalars(self, dtype, alpha, beta):
        _require(alpha != 0 and beta != 0, NULL_POINTER)
        scalar = c_double if dtype == np.float64 else c_float
        return scalar.from_address(alpha).value, scalar.from_address(beta).value

    def _cudnnSoftmaxForward(self, h, algo, mode, alpha, xd, xp, beta, yd, yp):
        def run():
            (x, y), dt, axes = self._softmax_tensors(h, (xd, yd), algo, mode)
            a, b = self._scalars(dt, alpha, beta)
            xa, ya = self._tensor(xp, x, dt), self._tensor(yp, y, dt)
            shifted = xa - xa.max(axis=axes, keepdims=True) if algo != 0 else xa.copy()
            e = np.exp(shifted)
            total = e.sum(axis=axes, keepdims=True)
            value = shifted - np.log(total) if algo == 2 else e / total
            self._blend(ya, value, a, b)
            self.calls.append(("cudnnSoftmaxForward", algo))
        return self._status(run)

    def _cudnnSoftmaxBackward(self, h, algo, mode, alpha, yd, yp, dyd, dyp, beta, dxd, dxp):
        def run():
            (y, dy, dx), dt, axes = self._softmax_tensors(h, (yd, dyd, dxd), algo, mode)
            a, b = self._scalars(dt, alpha, beta)
            ya, dya, dxa = self._tensor(yp, y, dt), self._tensor(dyp, dy, dt), self._tensor(dxp, dx, dt)
            if algo == 2:       # y = log-softmax
                value = dya - np.exp(ya) * dya.sum(axis=axes, keepdims=True)
            else:
                value = (dya - (dya * ya).sum(axis=axes, keepdims=True)) * ya
            self._blend(dxa, value, a, b)
            self.calls.append(("cudnnSoftmaxBackward", algo))
        return self._status(run)

    # pooling (cudnn_ops.h): the floor output size, MAX over the real pixels of a window (the
    # padding never wins), AVE over the window with the padding counted (INCLUDE_PADDING) or not
    def _cudnnCreatePoolingDescriptor(self, addr):
        return self._create(self.pools, addr)

    def _cudnnDestroyPoolingDescriptor(self, d):
        return self._destroy(self.pools, d)

    def _cudnnSetPooling2dDescriptor(self, d, mode, nan, kh, kw, ph, pw, sh, sw):
        def run():
            desc = self._get(self.pools, d, must_be_set=False)
            _require(mode in (0, 1, 2, 3) and nan in (0, 1))
            _require(min(kh, kw, sh, sw) > 0 and min(ph, pw) >= 0)
            desc.update(set=True, mode=mode, nan=nan, window=(kh, kw), pad=(ph, pw), stride=(sh, sw))
        return self._status(run)

    def _pool_dims(self, pool, x):
        n, c, h, w = x["dims"]
        (kh, kw), (ph, pw), (sh, sw) = pool["window"], pool["pad"], pool["stride"]
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        _require(oh > 0 and ow > 0)
        return n, c, oh, ow

    def _cudnnGetPooling2dForwardOutputDim(self, pool_id, x_id, pn, pc, ph, pw):
        def run():
            dims = self._pool_dims(self._get(self.pools, pool_id), self._get(self.tensors, x_id))
            for addr, v in zip((pn, pc, ph, pw), dims):
                _require(addr != 0, NULL_POINTER)
                c_int.from_address(addr).value = v
        return self._status(run)

    def _pool_problem(self, handle, pool_id, x_id, y_id, *more):
        _require(handle in self.handles)
        _require(self.handles[handle]["stream"] == cupy_standin.get_current_stream().ptr, STREAM_MISMATCH)
        pool = self._get(self.pools, pool_id)
        x, y = self._get(self.tensors, x_id), self._get(self.tensors, y_id)
        others = [self._get(self.tensors, d) for d in more]
        _require(all(d["dtype"] == x["dtype"] for d in [y] + others), NOT_SUPPORTED)
        _require(y["dims"] == self._pool_dims(pool, x), SHAPE_MISMATCH)
        return pool, x, y, others, _DTYPES[x["dtype"]]

    def _cudnnPoolingForward(self, h, pool_id, alpha, xd, xp, beta, yd, yp):
        def run():
            pool, x, y, _, dt = self._pool_problem(h, pool_id, xd, yd)
            a, b = self._scalars(dt, alpha, beta)
            xa, ya = self._tensor(xp, x, dt), self._tensor(yp, y, dt)
            self._blend(ya, pool_forward(pool, xa, y["dims"][2:]), a, b)
            self.calls.append(("cudnnPoolingForward", pool["mode"]))
        return self._status(run)

    def _cudnnPoolingBackward(self, h, pool_id, alpha, yd, yp, dyd, dyp, xd, xp, beta, dxd, dxp):
        def run():
            pool, x, y, (dy, dx), dt = self._pool_problem(h, pool_id, xd, yd, dyd, dxd)
            _require(dy["dims"] == y["dims"] and dx["dims"] == x["dims"], SHAPE_MISMATCH)
            a, b = self._scalars(dt, alpha, beta)
            ya, dya = self._tensor(yp, y, dt), self._tensor(dyp, dy, dt)
            xa, dxa = self._tensor(xp, x, dt), self._tensor(dxp, dx, dt)
            self._blend(dxa, pool_backward(pool, xa, ya, dya), a, b)
            self.calls.append(("cudnnPoolingBackward", pool["mode"]))
        return self._status(run)

    # LRN (cudnn_ops.h): y = x (k + alpha/N Σ x²)^-beta over [c - lookBehind, c + lookAhead]
    def _cudnnCreateLRNDescriptor(self, addr):
        return self._status(lambda: self._new(self.lrns, addr, {"set": True, "n": 5, "alpha": 1e-4,
                                                                "beta": 0.75, "k": 2.0}))

    def _cudnnDestroyLRNDescriptor(self, d):
        return self._destroy(self.lrns, d)

    def _cudnnSetLRNDescriptor(self, d, n, alpha, beta, k):
        def run():
            desc = self._get(self.lrns, d)
            # the ranges the header gives and libcudnn 9.28 enforces (alpha has none)
            _require(LRN_MIN_N <= n <= LRN_MAX_N and k >= LRN_MIN_K and beta >= LRN_MIN_BETA)
            desc.update(n=n, alpha=alpha, beta=beta, k=k)
        return self._status(run)

    def _lrn_problem(self, handle, lrn_id, mode, ids):
        _require(handle in self.handles)
        _require(self.handles[handle]["stream"] == cupy_standin.get_current_stream().ptr, STREAM_MISMATCH)
        _require(mode == 0)                                  # CUDNN_LRN_CROSS_CHANNEL_DIM1
        lrn = self._get(self.lrns, lrn_id)
        descs = [self._get(self.tensors, d) for d in ids]
        _require(all(d["dtype"] == descs[0]["dtype"] for d in descs), NOT_SUPPORTED)
        _require(all(d["dims"] == descs[0]["dims"] for d in descs), SHAPE_MISMATCH)
        return lrn, descs, _DTYPES[descs[0]["dtype"]]

    def _cudnnLRNCrossChannelForward(self, h, lrn_id, mode, alpha, xd, xp, beta, yd, yp):
        def run():
            lrn, (x, y), dt = self._lrn_problem(h, lrn_id, mode, (xd, yd))
            a, b = self._scalars(dt, alpha, beta)
            xa, ya = self._tensor(xp, x, dt), self._tensor(yp, y, dt)
            self._blend(ya, lrn_forward(lrn, xa), a, b)
            self.calls.append(("cudnnLRNCrossChannelForward", mode))
        return self._status(run)

    def _cudnnLRNCrossChannelBackward(self, h, lrn_id, mode, alpha, yd, yp, dyd, dyp, xd, xp, beta, dxd, dxp):
        def run():
            lrn, (y, dy, x, dx), dt = self._lrn_problem(h, lrn_id, mode, (yd, dyd, xd, dxd))
            a, b = self._scalars(dt, alpha, beta)
            ya, dya = self._tensor(yp, y, dt), self._tensor(dyp, dy, dt)
            xa, dxa = self._tensor(xp, x, dt), self._tensor(dxp, dx, dt)
            self._blend(dxa, lrn_backward(lrn, xa, ya, dya), a, b)
            self.calls.append(("cudnnLRNCrossChannelBackward", mode))
        return self._status(run)


LRN_MIN_N, LRN_MAX_N, LRN_MIN_K, LRN_MIN_BETA = 1, 16, 1e-5, 0.01


# --- pooling and LRN arithmetic (from cuDNN's definitions, independent of minicaffe's code) ---------
def _pool_windows(pool, h, w, out_hw):
    """Each output's window: (row start, row end, col start, col end) in padded coordinates."""
    (kh, kw), (ph, pw), (sh, sw) = pool["window"], pool["pad"], pool["stride"]
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            yield i, j, i * sh - ph, i * sh - ph + kh, j * sw - pw, j * sw - pw + kw


def pool_forward(pool, x, out_hw):
    """cuDNN's pooling of ``x`` (N, C, H, W): MAX ignores the padding; AVE divides by ``kh·kw``
    (INCLUDE_PADDING) or by the real pixels of the window (EXCLUDE_PADDING). NaN-free data only: the
    emulation declares no NaN semantics beyond ``CUDNN_NOT_PROPAGATE_NAN`` being accepted."""
    n, c, h, w = x.shape
    y = np.empty((n, c) + tuple(out_hw), x.dtype)
    kh, kw = pool["window"]
    for i, j, r0, r1, c0, c1 in _pool_windows(pool, h, w, out_hw):
        win = x[:, :, max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)]
        if pool["mode"] in (0, 3):
            y[:, :, i, j] = win.max(axis=(2, 3)) if win.size else -np.inf
        else:
            count = kh * kw if pool["mode"] == 1 else win.shape[2] * win.shape[3]
            y[:, :, i, j] = win.sum(axis=(2, 3)) / count
    return y


def pool_backward(pool, x, y, dy):
    """The gradient: AVE spreads each ``dy`` over its window's real pixels (divided as the forward
    divides); MAX gives it to the window's winner, found again as the FIRST real pixel (row-major)
    that equals the forward's ``y``: Caffe's tie rule (real cuDNN's is to be confirmed on a GPU). A
    ``y`` that no pixel of the window equals (a top changed in place after the forward) routes the
    gradient nowhere."""
    n, c, h, w = x.shape
    dx = np.zeros_like(x)
    kh, kw = pool["window"]
    for i, j, r0, r1, c0, c1 in _pool_windows(pool, h, w, dy.shape[2:]):
        rs, cs = slice(max(r0, 0), min(r1, h)), slice(max(c0, 0), min(c1, w))
        win = x[:, :, rs, cs]
        if pool["mode"] in (0, 3):
            flat = win.reshape(n, c, -1)
            hit = flat == y[:, :, i, j][:, :, None]
            first = hit.argmax(axis=2)
            grad = np.zeros_like(flat)
            np.put_along_axis(grad, first[:, :, None], (dy[:, :, i, j] * hit.any(axis=2))[:, :, None], axis=2)
            dx[:, :, rs, cs] += grad.reshape(win.shape)
        else:
            count = kh * kw if pool["mode"] == 1 else win.shape[2] * win.shape[3]
            dx[:, :, rs, cs] += (dy[:, :, i, j] / count)[:, :, None, None]
    return dx


def _lrn_window_sum(a, behind, ahead):
    """Σ over channels c - behind .. c + ahead of ``a`` (N, C, ...), zero outside."""
    out = np.zeros_like(a)
    channels = a.shape[1]
    for c in range(channels):
        out[:, c] = a[:, max(c - behind, 0):min(c + ahead + 1, channels)].sum(axis=1)
    return out


def _lrn_reach(lrn):
    behind = (lrn["n"] - 1) // 2
    return behind, lrn["n"] - behind - 1


def lrn_forward(lrn, x):
    behind, ahead = _lrn_reach(lrn)
    scale = lrn["k"] + lrn["alpha"] / lrn["n"] * _lrn_window_sum(x * x, behind, ahead)
    return x * scale ** -lrn["beta"]


def lrn_backward(lrn, x, y, dy):
    """d/dx of ``lrn_forward``: ``dy·s^-β − (2αβ/N)·x·Σ_{j whose window holds i} dy_j·y_j/s_j``; the
    windows holding channel i are those of channels i - ahead .. i + behind."""
    behind, ahead = _lrn_reach(lrn)
    scale = lrn["k"] + lrn["alpha"] / lrn["n"] * _lrn_window_sum(x * x, behind, ahead)
    back = _lrn_window_sum(dy * y / scale, ahead, behind)
    return dy * scale ** -lrn["beta"] - 2 * lrn["alpha"] * lrn["beta"] / lrn["n"] * x * back
