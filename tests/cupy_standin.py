"""A strict CuPy stand-in for the tests: CuPy's API and CuPy's refusals, NumPy underneath.

Why: CI has no GPU, so without this every GPU test skips and the GPU code paths never run. The
stand-in is installed as ``cupy`` / ``cupyx`` (``install()``) only for the GPU-mode tests; where a
real CUDA device is visible the same tests run on real CuPy instead (tests/conftest.py).

Being strict is the point: code that works on NumPy but would fail on a real GPU must fail here.
Each behaviour below follows CuPy 14 (its docs, "Differences between CuPy and NumPy", and
``cupy/_core/core.pyx``, ``_routines_indexing.pyx``):

* ``ndarray`` is its own type, NOT a ``numpy.ndarray``; ``isinstance(x, numpy.ndarray)`` is False.
* Implicit conversion to host raises TypeError: ``numpy.asarray(x)``, ``numpy.array(x)``,
  ``x.__array__()``. Explicit conversion works: ``x.get()``, ``cupy.asnumpy(x)``, ``x.tolist()``,
  ``x.item()``, and ``float(x)``/``int(x)``/``bool(x)`` on one-element arrays (they synchronise).
* CuPy functions and ufuncs refuse ``numpy.ndarray`` operands (TypeError "Unsupported type"), also
  reached through ``numpy_array + cupy_array`` and ``numpy.add(numpy_array, cupy_array)``; ufuncs
  also refuse lists. Only ``cupy.array``/``asarray``/``asanyarray``/``ascontiguousarray`` and
  advanced-index values copy host data to the device.
* ``x[basic_index] = numpy_array`` (non-scalar) raises ValueError, as CuPy's ``fill`` does.
* Reductions and integer indexing return 0-d arrays, never NumPy scalars.
* Only names CuPy has exist: NumPy-only routines (``errstate``, ``seterr``, ``lib.stride_tricks``
  beyond ``as_strided``, ...) are AttributeErrors. ``cupy.add.at`` exists (CuPy ufuncs have
  ``at``/``reduce``/``accumulate``/``outer``), and ``cupyx.scatter_add`` too.
* Custom kernels (``RawKernel``, ``RawModule``, ``ElementwiseKernel``, ``ReductionKernel``) run the
  NumPy reference registered under the kernel's name in ``minicaffe.kernels.emulation.REFERENCES``;
  a kernel with none raises NotImplementedError naming it. References receive the NumPy arrays
  underneath the stand-in arrays (views: writes land in the device arrays). A RawKernel launched
  with a NumPy array, or with a Python int for a parameter its C signature declares 32-bit, is
  refused: CuPy passes a Python int as a 64-bit ``long long``, which a 32-bit parameter misreads.
* ``cupy.random`` (``seed``, ``RandomState(seed, method)``, ``get_random_state``, ...) is a NumPy
  Generator per state: reproducible per seed, not cuRAND's numbers.
* ``cupy.cuda``: ``runtime.getDeviceCount/getDeviceProperties/getDevice/setDevice``, ``Device``,
  ``Stream``, ``Event``, ``get_current_stream``, a memory pool, ``nccl`` for one rank, ``curand``
  constants. ``STANDIN = True`` marks the module so tests can tell which backend ran.
* Counters the tests read (``transfers()``, ``allocations()``, ``reset_counters()``): every copy
  device -> host (``.get()``, ``asnumpy``, ``tolist``, ``item``, ``float``/``int``/``bool`` of a
  device array, printing one) and host -> device (``array``/``asarray`` of host data, ``.set()``,
  host arrays as index values), the uploads from pinned memory on a non-default stream among them;
  the explicit allocation calls (``empty``/``zeros``/``ones``/``full`` and their ``_like``); and a
  model of CuPy's memory pool (``get_default_memory_pool().used_bytes()/total_bytes()``): freed
  buffers are kept by size and reused by a later request of the same size, as CuPy's pool reuses
  its blocks, so a loop whose ``total_bytes`` stops growing allocates nothing new on a GPU either.
"""
import builtins
import collections
import re
import sys
import threading
import types
import weakref

import numpy

STANDIN = True
__version__ = "14.0.0+standin"

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


# --- counters the tests read ----------------------------------------------------------------------

_COUNTS = collections.Counter()
_SITES = collections.deque(maxlen=64)    # (kind, "file:line") of the latest transfers, for messages
_LOCK = threading.RLock()     # prefetch threads upload too; re-entrant: a finalizer may run inside


def _count(kind, n=1):
    """Count one event; transfers also remember where they came from (the first caller outside here)."""
    with _LOCK:
        _COUNTS[kind] += n
    if kind.startswith("to_"):
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename == __file__:
            f = f.f_back
        _SITES.append((kind, f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"))


def transfers():
    """Copies since ``reset_counters()``: ``to_host`` (device -> host, each one a synchronisation),
    ``to_device`` (host -> device, all of them), ``to_device_pinned`` (those from pinned host memory)
    and ``to_device_async`` (those on a stream other than the default one); ``sites``: where the
    latest came from, for assertion messages."""
    return {"to_host": _COUNTS["to_host"], "to_device": _COUNTS["to_device"],
            "to_device_pinned": _COUNTS["pinned:to_device"], "to_device_async": _COUNTS["async:to_device"],
            "sites": list(_SITES)}


def allocations():
    """Since ``reset_counters()``: ``calls``, the explicit allocation calls (``empty``, ``zeros``,
    ``ones``, ``full`` and their ``_like``); ``buffers``/``bytes``, every new device buffer (results
    of ufuncs and copies too); ``by_name``: the calls per routine."""
    names = {k[len("alloc:"):]: v for k, v in _COUNTS.items() if k.startswith("alloc:")}
    return {"calls": builtins.sum(names.values()), "by_name": names,
            "buffers": _COUNTS["buffers"], "bytes": _COUNTS["buffer_bytes"]}


def reset_counters():
    """Zero the transfer and allocation counters (the memory pool model keeps its blocks)."""
    _COUNTS.clear()
    _SITES.clear()


def _to_host_done(n=1):
    _count("to_host", n)


def _upload(src=None, stream=None):
    """Count one host -> device copy; from pinned memory, and on a stream other than the default one,
    when so (``stream``: the one the call named, else the current one)."""
    _count("to_device")
    if isinstance(src, numpy.ndarray) and _is_pinned(src):
        _count("pinned:to_device")
    if (stream if stream is not None else get_current_stream()) is not Stream.null:
        _count("async:to_device")


# --- the array type -------------------------------------------------------------------------------

class _MemoryPointer:
    """``x.data``: what NCCL and kernels take (``.ptr``); the stand-in keeps the array for lookup."""
    __slots__ = ("ptr", "_arr", "device")

    def __init__(self, arr):
        self._arr = arr
        self.ptr = int(arr.__array_interface__["data"][0])
        self.device = Device(0)


# ptr -> numpy array, for calls made with raw pointers (NCCL with one rank, the cuDNN emulation).
# Weak: a pointer is only good while its array lives, as on a GPU, and a strong table would keep every
# temporary whose ``.data`` was taken alive, so the memory-pool model would see a leak CuPy has not.
_POINTERS = weakref.WeakValueDictionary()


class ndarray:
    """A device array: a NumPy array the host cannot see implicitly."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    # attributes
    shape = property(lambda self: self._a.shape, lambda self, s: setattr(self._a, "shape", s))
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    device = property(lambda self: Device(0))
    base = property(lambda self: None if self._a.base is None else _wrap(self._a.base))

    @property
    def data(self):
        mp = _MemoryPointer(self._a)
        _POINTERS[mp.ptr] = self._a
        return mp

    # explicit transfers
    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is not None:
            if not isinstance(out, numpy.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if out.dtype != self.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
            if out.shape != self.shape:
                raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
            out[...] = self._a
            _to_host_done()
            return out
        _to_host_done()
        return numpy.array(self._a, order=order if order != "A" else "K", copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(f"stream must be a cupy.cuda.Stream, not {type(stream)}")
        _upload(arr, stream)
        self._a[...] = arr

    def tolist(self):
        _to_host_done()
        return self._a.tolist()

    def item(self, *args):
        _to_host_done()
        return self._a.item(*args)

    # implicit transfers: refused as CuPy refuses them
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        ours = globals().get(ufunc.__name__)
        if not isinstance(ours, _Ufunc):
            return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            if isinstance(out, tuple):
                if len(out) != 1:
                    raise ValueError("The 'out' parameter must have exactly one array value")
                kwargs["out"] = out[0]
        func = ours if method == "__call__" else getattr(ours, method, None)
        if func is None:
            return NotImplemented
        return func(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        ours = _FUNCTIONS.get(func.__name__)
        if ours is None or func.__module__ not in ("numpy", "numpy.linalg"):
            return NotImplemented
        return ours(*args, **kwargs)

    # conversions that synchronise (allowed; each one a copy to the host)
    def __float__(self):
        _to_host_done()
        return float(self._a)

    def __int__(self):
        _to_host_done()
        return int(self._a)

    def __complex__(self):
        _to_host_done()
        return complex(self._a)

    def __bool__(self):
        _to_host_done()
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        for i in range(self._a.shape[0]):
            yield self[i]

    def __repr__(self):
        _to_host_done()
        return repr(self._a)

    def __str__(self):
        _to_host_done()
        return str(self._a)

    def __format__(self, spec):
        _to_host_done()
        return format(self._a, spec)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_wrap, (self._a.copy(),))

    # indexing
    def __getitem__(self, index):
        idx = _index(index)
        out = self._a[idx]
        if not isinstance(out, numpy.ndarray):   # integer indexing gives a 0-d array (a view)
            t = idx if isinstance(idx, tuple) else (idx,)
            out = self._a[t + (Ellipsis,)]
        return _wrap(out)

    def __setitem__(self, index, value):
        idx = _index(index)
        if isinstance(value, numpy.ndarray) and value.ndim > 0 and not _advanced(idx):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (list, tuple)):
            _check_no_host_arrays(value)
        elif isinstance(value, numpy.ndarray) and value.ndim > 0:
            _upload(value)             # advanced-index values: CuPy copies them to the device
        self._a[idx] = value

    # methods
    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap(self._a.astype(dtype, order=order, copy=copy))

    def view(self, dtype=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        if isinstance(value, numpy.ndarray) and value.shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, ndarray):
            value = value._a
        self._a.fill(value)

    def dot(self, b, out=None):
        return dot(self, b, out=out)

    def __dlpack__(self, *a, **k):
        raise TypeError("the CuPy stand-in has no DLPack export")


def _wrap(x):
    """Results back to the device: arrays and NumPy scalars become stand-in arrays."""
    if isinstance(x, numpy.ndarray):
        if x.dtype == object:
            raise TypeError("CuPy arrays cannot hold Python objects")
        _POOL._track(_root(x))
        arr = object.__new__(ndarray)
        arr._a = x
        return arr
    if isinstance(x, numpy.generic):
        return _wrap(numpy.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _check_no_host_arrays(x):
    if isinstance(x, numpy.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        for v in x:
            _check_no_host_arrays(v)


def _unwrap(x):
    """Arguments of a CuPy routine: stand-in arrays to NumPy, host arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _index(index):
    """Indices may be device arrays, host integer arrays (CuPy copies them over) or slices."""
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    if isinstance(index, ndarray):
        return index._a
    if isinstance(index, list):
        _upload(index)
        return [_index(i) for i in index]
    if isinstance(index, numpy.ndarray):
        _upload(index)
    return index


def _advanced(idx):
    t = idx if isinstance(idx, tuple) else (idx,)
    return builtins.any(isinstance(i, (numpy.ndarray, list)) for i in t)


def _binop(name, reflected=False):
    def op(self, other):
        if isinstance(other, numpy.ndarray):
            raise _unsupported(other)
        if not isinstance(other, (ndarray, int, float, complex, bool, numpy.generic)):
            return NotImplemented
        ufunc = globals()[name]
        return ufunc(other, self) if reflected else ufunc(self, other)
    return op


def _inplace(name):
    def op(self, other):
        if isinstance(other, numpy.ndarray):
            raise _unsupported(other)
        globals()[name](self, other, out=self)
        return self
    return op


for _op, _uf in [("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                 ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"),
                 ("matmul", "matmul"), ("and", "bitwise_and"), ("or", "bitwise_or"),
                 ("xor", "bitwise_xor"), ("lshift", "left_shift"), ("rshift", "right_shift")]:
    setattr(ndarray, f"__{_op}__", _binop(_uf))
    setattr(ndarray, f"__r{_op}__", _binop(_uf, reflected=True))
    setattr(ndarray, f"__i{_op}__", _inplace(_uf))
for _op, _uf in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
                 ("eq", "equal"), ("ne", "not_equal")]:
    setattr(ndarray, f"__{_op}__", _binop(_uf))
ndarray.__neg__ = lambda self: negative(self)  # noqa: E731
ndarray.__pos__ = lambda self: positive(self)  # noqa: E731
ndarray.__abs__ = lambda self: absolute(self)  # noqa: E731
ndarray.__invert__ = lambda self: invert(self)  # noqa: E731
ndarray.__divmod__ = lambda self, o: divmod(self, o)  # noqa: E731


def _method(name):
    def m(self, *args, **kwargs):
        return _wrap(getattr(self._a, name)(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    m.__name__ = name
    return m


# ndarray methods CuPy has (beyond those defined above)
for _name in ("all any argmax argmin argpartition argsort clip conj conjugate cumprod cumsum diagonal "
              "flatten max mean min nonzero partition prod ptp put ravel repeat reshape round sort "
              "squeeze std sum swapaxes take trace transpose var compress choose").split():
    setattr(ndarray, _name, _method(_name))


# --- routines -------------------------------------------------------------------------------------

class _Ufunc:
    """A CuPy ufunc: device arrays and scalars only; ``at``/``reduce``/``accumulate``/``outer``."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    @staticmethod
    def _arg(x, comparison=False):
        if isinstance(x, ndarray):
            return x._a
        if isinstance(x, (int, float, complex, bool, numpy.generic)):
            return x
        if comparison and isinstance(x, numpy.ndarray) and x.ndim == 0:
            return x.item()
        raise _unsupported(x)

    def _kw(self, kwargs):
        out = dict(kwargs)
        if out.get("out") is not None:
            o = out["out"]
            if isinstance(o, tuple):
                o = tuple(self._arg(v) for v in o)
            else:
                if not isinstance(o, ndarray):
                    raise TypeError(f"output must be a cupy.ndarray, not {type(o)}")
                o = o._a
            out["out"] = o
        return out

    def __call__(self, *args, **kwargs):
        cmp = self.__name__ in ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal")
        a = [self._arg(x, cmp) for x in args]
        out = kwargs.get("out")
        res = self._u(*a, **self._kw(kwargs))
        if out is not None and not isinstance(out, tuple):
            return out
        return _wrap(res)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise _unsupported(a)
        idx = _index(indices)
        if isinstance(idx, numpy.ndarray) and isinstance(indices, numpy.ndarray):
            raise _unsupported(indices)
        args = () if b is None else (self._arg(b),)
        self._u.at(a._a, idx, *args)

    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        r = self._u.reduce(self._arg(a), axis=axis, dtype=dtype, keepdims=keepdims,
                           **({} if out is None else {"out": self._kw({"out": out})["out"]}))
        return out if out is not None else _wrap(r)

    def accumulate(self, a, axis=0, dtype=None, out=None):
        r = self._u.accumulate(self._arg(a), axis=axis, dtype=dtype)
        if out is not None:
            out._a[...] = r
            return out
        return _wrap(r)

    def outer(self, a, b, **kwargs):
        return _wrap(self._u.outer(self._arg(a), self._arg(b), **self._kw(kwargs)))

    def __repr__(self):
        return f"<ufunc '{self.__name__}' (CuPy stand-in)>"


_UFUNCS = ("absolute abs add arccos arccosh arcsin arcsinh arctan arctan2 arctanh bitwise_and bitwise_or "
           "bitwise_xor bitwise_not cbrt ceil conj conjugate copysign cos cosh deg2rad degrees divide "
           "divmod equal exp exp2 expm1 fabs float_power floor floor_divide fmax fmin fmod frexp gcd "
           "greater greater_equal heaviside hypot invert isfinite isinf isnan lcm ldexp left_shift less "
           "less_equal log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or "
           "logical_xor matmul maximum minimum mod modf multiply negative nextafter not_equal positive "
           "power rad2deg radians reciprocal remainder right_shift rint sign signbit sin sinh sqrt "
           "square subtract tan tanh true_divide trunc").split()
for _name in _UFUNCS:
    globals()[_name] = _Ufunc(getattr(numpy, _name))


def _strict(np_func, name):
    def f(*args, **kwargs):
        return _wrap(np_func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    f.__name__ = name
    f.__doc__ = f"CuPy stand-in for cupy.{name} (device arrays only)."
    return f


# routines that take device arrays only (NumPy arrays refused); all exist in CuPy 14
_ROUTINES = ("all allclose amax amin angle any append argmax argmin argpartition argsort argwhere around "
             "array_equal array_split atleast_1d atleast_2d atleast_3d average bincount broadcast_arrays "
             "broadcast_to clip column_stack concatenate convolve copy corrcoef count_nonzero cov cross "
             "cumprod cumsum diag diagflat diagonal diff digitize dot dsplit dstack einsum empty_like "
             "expand_dims extract flatnonzero flip fliplr flipud full_like hsplit hstack inner isclose "
             "kron lexsort max maximum mean median min moveaxis nanargmax nanargmin nancumprod "
             "nancumsum nanmax nanmean nanmin nanprod nanstd nansum nanvar nonzero ones_like outer pad "
             "partition percentile place prod ptp put put_along_axis ravel ravel_multi_index repeat "
             "reshape resize roll rollaxis rot90 round searchsorted select sort split squeeze stack std "
             "sum swapaxes take take_along_axis tensordot tile trace transpose tril triu trim_zeros "
             "unique unravel_index var vdot vsplit vstack where zeros_like histogram isin "
             "may_share_memory shares_memory packbits unpackbits matmul").split()
_FUNCTIONS = {}
for _name in _ROUTINES:
    if isinstance(globals().get(_name), _Ufunc):
        _FUNCTIONS[_name] = globals()[_name]
        continue
    _FUNCTIONS[_name] = globals()[_name] = _strict(getattr(numpy, _name), _name)
for _name in _UFUNCS:
    _FUNCTIONS.setdefault(_name, globals()[_name])


def copyto(dst, src, casting="same_kind", where=None):
    if not isinstance(dst, ndarray):
        raise TypeError(f"dst must be a cupy.ndarray, not {type(dst)}")
    numpy.copyto(dst._a, _unwrap(src), casting=casting, where=True if where is None else _unwrap(where))


_FUNCTIONS["copyto"] = copyto


# creation from shapes (no array inputs)
for _name in "empty zeros ones full arange linspace logspace eye identity tri indices".split():
    globals()[_name] = _strict(getattr(numpy, _name), _name)


def _counted(f, name):
    def alloc(*args, **kwargs):
        _count("alloc:" + name)
        return f(*args, **kwargs)
    alloc.__name__, alloc.__doc__ = name, f.__doc__
    return alloc


# the explicit allocations, counted (``allocations()``)
for _name in "empty zeros ones full empty_like zeros_like ones_like full_like".split():
    globals()[_name] = _counted(globals()[_name], _name)
    if _name in _FUNCTIONS:
        _FUNCTIONS[_name] = globals()[_name]


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    """Host data (lists, NumPy arrays) or device arrays to a new device array."""
    if isinstance(obj, ndarray):
        obj = obj._a
    else:
        _upload(obj)
        if isinstance(obj, (list, tuple)):
            obj = _host_sequence(obj)
    return _wrap(numpy.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def _host_sequence(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return [_host_sequence(v) for v in x]
    return x


def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and order in (None, "K", "A"):
            return a
        return _wrap(numpy.asarray(a._a, dtype=dtype, order=order))
    _upload(a)
    if isinstance(a, (list, tuple)):
        a = _host_sequence(a)
    return _wrap(numpy.array(a, dtype=dtype, order=order if order else "K", copy=True))


asanyarray = asarray


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray):
        return _wrap(numpy.ascontiguousarray(a._a, dtype=dtype))
    _upload(a)
    return _wrap(numpy.ascontiguousarray(numpy.array(a, dtype=dtype, copy=True)))


def asfortranarray(a, dtype=None):
    return _wrap(numpy.asfortranarray(_unwrap(a), dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """Device (or host) array to a NumPy array."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else numpy


def fromDlpack(*a, **k):
    raise TypeError("the CuPy stand-in has no DLPack import")


from_dlpack = fromDlpack


def is_available():
    return True


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _PINNED_POOL


# dtypes and constants CuPy borrows from NumPy
for _name in ("bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
              "complex64 complex128 intp uintp byte ubyte short ushort intc uintc longlong ulonglong "
              "half single double csingle cdouble generic number integer signedinteger "
              "unsignedinteger inexact floating complexfloating dtype finfo iinfo can_cast "
              "result_type promote_types min_scalar_type issubdtype isscalar "
              "newaxis pi e inf nan euler_gamma index_exp s_ ndindex").split():
    globals()[_name] = getattr(numpy, _name)


def ndim(a):
    return a.ndim if isinstance(a, ndarray) else numpy.ndim(_unwrap(a))


def shape(a):
    return a.shape if isinstance(a, ndarray) else numpy.shape(_unwrap(a))


def size(a, axis=None):
    if isinstance(a, ndarray):
        return a.size if axis is None else a.shape[axis]
    return numpy.size(_unwrap(a), axis)



def result_type(*arrays_and_dtypes):  # noqa: F811 - device arrays give their dtype, as CuPy's does
    return numpy.result_type(*[a.dtype if isinstance(a, ndarray) else a for a in arrays_and_dtypes])


# --- custom kernels -------------------------------------------------------------------------------

def _reference(name, kind):
    from minicaffe.kernels import emulation
    fn = emulation.REFERENCES.get(name)
    if fn is None:
        raise NotImplementedError(
            f"CuPy stand-in: {kind} {name!r} has no NumPy reference; register one with "
            f"@minicaffe.kernels.emulation.reference({name!r}) so it can run without a GPU")
    return fn


_C_PARAMS = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_INT32 = re.compile(r"^(const\s+)?(unsigned\s+)?(int|int32_t|uint32_t|unsigned)\b")
_FLOAT32 = re.compile(r"^(const\s+)?float\b")


def _signatures(code):
    out = {}
    for m in _C_PARAMS.finditer(code or ""):
        params = [p.strip() for p in m.group(2).split(",") if p.strip()]
        out[m.group(1)] = params
    return out


class RawKernel:
    """``cupy.RawKernel(code, name)``; a launch runs ``REFERENCES[name](grid, block, args, shared_mem)``."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):
        self.code, self.name, self.options = code, name, options
        self._params = _signatures(code).get(name)

    def _check(self, args):
        for i, a in enumerate(args):
            if isinstance(a, numpy.ndarray):
                raise TypeError(f"RawKernel {self.name!r} argument {i}: a numpy.ndarray is host "
                                f"memory; pass a cupy.ndarray")
            if self._params and i < len(self._params) and "*" not in self._params[i]:
                p = self._params[i]
                if type(a) is int and _INT32.match(p):
                    raise TypeError(f"RawKernel {self.name!r} argument {i} ({p}): a Python int is passed "
                                    f"as a 64-bit long long; pass numpy.int32(...)")
                if type(a) is float and _FLOAT32.match(p):
                    raise TypeError(f"RawKernel {self.name!r} argument {i} ({p}): a Python float is "
                                    f"passed as a double; pass numpy.float32(...)")
        if self._params is not None and len(args) != len(self._params):
            raise TypeError(f"RawKernel {self.name!r} takes {len(self._params)} arguments, "
                            f"{len(args)} given")

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        args = tuple(args)
        self._check(args)
        fn = _reference(self.name, "RawKernel")
        fn(tuple(grid) if isinstance(grid, (tuple, list)) else (grid,),
           tuple(block) if isinstance(block, (tuple, list)) else (block,),
           tuple(a._a if isinstance(a, ndarray) else a for a in args), shared_mem=shared_mem)

    def compile(self, log_stream=None):
        return None

    attributes = property(lambda self: {"max_threads_per_block": 1024})
    max_threads_per_block = 1024


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        self.code = code

    def get_function(self, name):
        return RawKernel(self.code, name)

    def compile(self, log_stream=None):
        return None


class ElementwiseKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name, ...)``: runs its reference."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, loop_prep="", after_loop="", options=()):
        self.in_params, self.out_params, self.name = in_params, out_params, name
        self.nin = len([p for p in in_params.split(",") if p.strip()])
        self.nout = len([p for p in out_params.split(",") if p.strip()])

    def __call__(self, *args, **kwargs):
        for a in args:
            if isinstance(a, numpy.ndarray):
                raise _unsupported(a)
        fn = _reference(self.name, "ElementwiseKernel")
        res = fn(*[a._a if isinstance(a, ndarray) else a for a in args],
                 **{k: (v._a if isinstance(v, ndarray) else v) for k, v in kwargs.items()})
        # outputs passed in are the caller's device arrays: hand those back, not their NumPy views
        outs = list(args[self.nin:])
        if outs and isinstance(res, numpy.ndarray) and len(outs) == 1 and isinstance(outs[0], ndarray) \
                and res is outs[0]._a:
            return outs[0]
        return _wrap(res)


class ReductionKernel(ElementwiseKernel):
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel", reduce_type=None, reduce_dims=True, preamble="", options=()):
        super().__init__(in_params, out_params, map_expr, name=name)


def fuse(*args, **kwargs):
    def deco(f):
        return f
    return deco(args[0]) if args and callable(args[0]) else deco


# --- cupy.cuda ------------------------------------------------------------------------------------

class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if not 0 <= self.id < _DEVICE_COUNT:
            raise RuntimeError(f"CUDARuntimeError: cudaErrorInvalidDevice: invalid device ordinal ({self.id})")

    def use(self):
        _runtime_state["device"] = self.id

    def synchronize(self):
        pass

    def __enter__(self):
        self._prev = _runtime_state["device"]
        self.use()
        return self

    def __exit__(self, *exc):
        _runtime_state["device"] = self._prev

    compute_capability = property(lambda self: "90")

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


_DEVICE_COUNT = 1
_runtime_state = {"device": 0}


class Stream:
    """``cupy.cuda.Stream``. The stand-in runs everything at once, so ordering holds trivially;
    ``wait_event``/``record`` check their arguments as CuPy does, and count (``waits``)."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else id(self)
        self.non_blocking = bool(non_blocking)
        self.waits = 0

    def synchronize(self):
        pass

    def wait_event(self, event):
        if not isinstance(event, Event):
            raise TypeError(f"event must be a cupy.cuda.Event, not {type(event)}")
        self.waits += 1

    def record(self, event=None):
        if event is not None and not isinstance(event, Event):
            raise TypeError(f"event must be a cupy.cuda.Event, not {type(event)}")
        event = event or Event()
        event.record(self)
        return event

    def use(self):
        _stream_stack[-1:] = [self]
        return self

    def done(self):
        return True

    def __enter__(self):
        _stream_stack.append(self)
        return self

    def __exit__(self, *exc):
        _stream_stack.pop()


Stream.null = Stream(null=True)
_stream_stack = [Stream.null]


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = id(self)

    def record(self, stream=None):
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(f"stream must be a cupy.cuda.Stream, not {type(stream)}")
        self.stream = stream if stream is not None else get_current_stream()

    def synchronize(self):
        pass

    done = property(lambda self: True)


def get_current_stream(device_id=-1):
    return _stream_stack[-1]


def get_elapsed_time(start, end):
    return 0.0


def _root(a):
    """The NumPy array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while isinstance(a.base, numpy.ndarray):
        a = a.base
    return a


class MemoryPool:
    """A model of CuPy's device memory pool: each device buffer is a block of its size rounded up to
    512 bytes (CuPy's unit); a freed block is kept and handed to the next request of the same size,
    and ``total_bytes()`` (blocks in use + kept) grows only when no kept block fits. Stricter than
    CuPy, which also splits larger free blocks: a loop whose ``total_bytes()`` stays the same here
    does not grow CuPy's pool either. No limit is enforced (``set_limit`` is recorded only)."""

    _UNIT = 512

    def __init__(self):
        self._live = {}                       # id(owner array) -> rounded size
        self._free = collections.Counter()    # rounded size -> kept blocks
        self._used = self._kept = 0
        self._limit = 0

    def _track(self, owner):
        if not owner.nbytes:
            return
        size = -(-owner.nbytes // self._UNIT) * self._UNIT
        with _LOCK:
            if id(owner) in self._live:
                return
            _COUNTS["buffers"] += 1
            _COUNTS["buffer_bytes"] += owner.nbytes
            if self._free[size]:
                self._free[size] -= 1
                self._kept -= size
            self._live[id(owner)] = size
            self._used += size
        weakref.finalize(owner, self._release, id(owner))

    def _release(self, key):
        with _LOCK:
            size = self._live.pop(key, None)
            if size is not None:
                self._used -= size
                self._free[size] += 1
                self._kept += size

    def used_bytes(self):
        return self._used

    def free_bytes(self):
        return self._kept

    def total_bytes(self):
        return self._used + self._kept

    def n_free_blocks(self):
        return builtins.sum(self._free.values())

    def free_all_blocks(self, stream=None):
        self._free.clear()
        self._kept = 0

    def set_limit(self, size=None, fraction=None):
        self._limit = int(size or 0)

    def get_limit(self):
        return self._limit


class PinnedMemoryPointer(bytearray):
    """``cupy.cuda.alloc_pinned_memory(size)``'s result: page-locked host memory that NumPy can view
    (``numpy.frombuffer(mem, dtype, count)``); here ordinary host memory, remembered as pinned so
    that uploads from it are counted as such (``transfers()['to_device_pinned']``)."""

    def __init__(self, size):
        super().__init__(int(size))
        view = numpy.frombuffer(self, numpy.uint8) if size else None
        self.ptr = int(view.__array_interface__["data"][0]) if size else 0
        self.size = int(size)
        if size:
            _PINNED[self.ptr] = self.ptr + self.size
            weakref.finalize(self, _PINNED.pop, self.ptr, None)


_PINNED = {}      # start address -> end address of live pinned allocations


def _is_pinned(arr):
    start = arr.__array_interface__["data"][0]
    return builtins.any(lo <= start < hi for lo, hi in _PINNED.items())


class PinnedMemoryPool:
    """``cupy.cuda.PinnedMemoryPool``: ``malloc(size)`` gives a ``PinnedMemoryPointer``."""

    def malloc(self, size):
        return PinnedMemoryPointer(size)

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self):
        pass

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0


def alloc_pinned_memory(size):
    """``cupy.cuda.alloc_pinned_memory``: ``size`` bytes of pinned host memory from the pinned pool."""
    return _PINNED_POOL.malloc(size)


_POOL = MemoryPool()
_PINNED_POOL = PinnedMemoryPool()


def _runtime_module():
    m = types.ModuleType("cupy.cuda.runtime")
    m.getDeviceCount = lambda: _DEVICE_COUNT
    m.getDevice = lambda: _runtime_state["device"]
    m.setDevice = lambda i: Device(i).use()
    m.deviceSynchronize = lambda: None
    m.runtimeGetVersion = lambda: 13000
    m.driverGetVersion = lambda: 13000
    m.memGetInfo = lambda: (80 * 2 ** 30, 80 * 2 ** 30)
    m.is_hip = False

    def getDeviceProperties(i):
        Device(i)
        return {"name": b"CuPy stand-in (NumPy)", "major": 9, "minor": 0, "totalGlobalMem": 80 * 2 ** 30,
                "sharedMemPerBlock": 49152, "regsPerBlock": 65536, "warpSize": 32, "memPitch": 2 ** 31 - 1,
                "maxThreadsPerBlock": 1024, "maxThreadsDim": (1024, 1024, 64),
                "maxGridSize": (2 ** 31 - 1, 65535, 65535), "clockRate": 1, "totalConstMem": 65536,
                "textureAlignment": 512, "deviceOverlap": 1, "multiProcessorCount": 1,
                "kernelExecTimeoutEnabled": 0}
    m.getDeviceProperties = getDeviceProperties
    m.CUDARuntimeError = RuntimeError
    return m


def _nccl_module():
    m = types.ModuleType("cupy.cuda.nccl")
    m.available = True
    for i, n in enumerate(("NCCL_INT8", "NCCL_UINT8", "NCCL_INT32", "NCCL_UINT32", "NCCL_INT64",
                           "NCCL_UINT64", "NCCL_FLOAT16", "NCCL_FLOAT32", "NCCL_FLOAT64")):
        setattr(m, n, i)
    m.NCCL_FLOAT, m.NCCL_INT, m.NCCL_DOUBLE = m.NCCL_FLOAT32, m.NCCL_INT32, m.NCCL_FLOAT64
    m.NCCL_SUM, m.NCCL_PROD, m.NCCL_MAX, m.NCCL_MIN, m.NCCL_AVG = range(5)
    m.get_unique_id = lambda: bytes(128)
    m.get_version = lambda: 22700

    class NcclCommunicator:
        """One rank: every collective is the identity (a copy when send and receive differ)."""

        def __init__(self, ndev, commId, rank):
            if int(ndev) != 1 or int(rank) != 0:
                raise RuntimeError("the CuPy stand-in's NCCL has one rank only")
            if not isinstance(commId, (bytes, tuple)):
                raise TypeError("commId must be bytes or a tuple")

        def _copy(self, send, recv, count):
            if send != recv:
                src, dst = _POINTERS[send].reshape(-1), _POINTERS[recv].reshape(-1)
                dst[:count] = src[:count]

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
            self._copy(sendbuf, recvbuf, count)

        def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream):
            self._copy(sendbuf, recvbuf, count)

        def bcast(self, buff, count, datatype, root, stream):
            pass

        def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):
            self._copy(sendbuf, recvbuf, count)

        def allGather(self, sendbuf, recvbuf, count, datatype, stream):
            self._copy(sendbuf, recvbuf, count)

        def device_id(self):
            return 0

        def rank_id(self):
            return 0

        def size(self):
            return 1

        def destroy(self):
            pass

        def abort(self):
            pass

    m.NcclCommunicator = NcclCommunicator
    return m


def _curand_module():
    m = types.ModuleType("cupy.cuda.curand")
    m.CURAND_RNG_PSEUDO_DEFAULT, m.CURAND_RNG_PSEUDO_XORWOW = 100, 101
    m.CURAND_RNG_PSEUDO_MRG32K3A, m.CURAND_RNG_PSEUDO_MTGP32 = 121, 141
    m.CURAND_RNG_PSEUDO_MT19937, m.CURAND_RNG_PSEUDO_PHILOX4_32_10 = 142, 161
    return m


cuda = types.ModuleType("cupy.cuda")
cuda.runtime = _runtime_module()
cuda.nccl = _nccl_module()
cuda.curand = _curand_module()
cuda.Device, cuda.Stream, cuda.Event = Device, Stream, Event
cuda.get_current_stream, cuda.get_elapsed_time = get_current_stream, get_elapsed_time
cuda.MemoryPool, cuda.PinnedMemoryPool = MemoryPool, PinnedMemoryPool
cuda.PinnedMemoryPointer, cuda.alloc_pinned_memory = PinnedMemoryPointer, alloc_pinned_memory
cuda.set_allocator = lambda allocator=None: None
cuda.set_pinned_memory_allocator = lambda allocator=None: None
cuda.is_available = lambda: True
cuda.get_device_id = lambda: _runtime_state["device"]
cuda.Device = Device


# --- cupy.random ----------------------------------------------------------------------------------

class RandomState:
    """``cupy.random.RandomState(seed, method)``: a NumPy PCG64 stream per seed (not cuRAND's values)."""

    def __init__(self, seed=None, method=100):
        self.method = method
        self.seed(seed)

    def seed(self, seed=None):
        if isinstance(seed, numpy.ndarray):
            seed = int(numpy.uint64(hash(seed.tobytes()) % 2 ** 63))
        self._g = numpy.random.default_rng(None if seed is None else int(seed) % 2 ** 64)

    def _float(self, dtype):
        dtype = numpy.dtype(dtype)
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise TypeError(f"cupy.random supports float32 and float64 only, got {dtype}")
        return dtype

    def random_sample(self, size=None, dtype=float):
        dtype = self._float(dtype)
        return _wrap(self._g.random(size if size is not None else (), dtype=dtype))

    random = random_sample

    def rand(self, *size, dtype=float):
        return self.random_sample(size, dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        dtype = self._float(dtype)
        return _wrap((self._g.uniform(low, high, size if size is not None else ())).astype(dtype))

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        dtype = self._float(dtype)
        return _wrap(self._g.normal(loc, scale, size if size is not None else ()).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return self.normal(0.0, 1.0, size, dtype)

    def randn(self, *size, dtype=float):
        return self.normal(0.0, 1.0, size, dtype)

    def randint(self, low, high=None, size=None, dtype=int):
        if high is None:
            low, high = 0, low
        return _wrap(self._g.integers(low, high, size if size is not None else (), dtype=dtype))

    def permutation(self, num):
        if isinstance(num, ndarray):
            return _wrap(self._g.permutation(num._a))
        return _wrap(self._g.permutation(int(num)))

    def shuffle(self, a):
        if not isinstance(a, ndarray):
            raise TypeError("The array must be cupy.ndarray")
        self._g.shuffle(a._a)

    def choice(self, a, size=None, replace=True, p=None):
        a = a._a if isinstance(a, ndarray) else a
        p = p._a if isinstance(p, ndarray) else p
        return _wrap(self._g.choice(a, size, replace, p))


def _random_module():
    m = types.ModuleType("cupy.random")
    m.RandomState = RandomState
    state = {"rs": None}

    def get_random_state():
        if state["rs"] is None:
            state["rs"] = RandomState()
        return state["rs"]

    def set_random_state(rs):
        if not isinstance(rs, RandomState):
            raise TypeError(f"Random state must be an instance of RandomState. Actual: {type(rs)}")
        state["rs"] = rs

    def seed(s=None):
        get_random_state().seed(s)

    def reset_states():
        state["rs"] = None

    m.get_random_state, m.set_random_state, m.seed, m.reset_states = (get_random_state, set_random_state,
                                                                       seed, reset_states)
    for name in ("random_sample", "random", "rand", "randn", "uniform", "normal", "standard_normal",
                 "randint", "permutation", "shuffle", "choice"):
        setattr(m, name, (lambda n: lambda *a, **k: getattr(get_random_state(), n)(*a, **k))(name))

    def default_rng(seed=None):
        return RandomState(seed)
    m.default_rng = default_rng
    return m


random = _random_module()


# --- cupy.lib, cupyx ------------------------------------------------------------------------------

lib = types.ModuleType("cupy.lib")
lib.stride_tricks = types.ModuleType("cupy.lib.stride_tricks")


def _as_strided(x, shape=None, strides=None):
    if not isinstance(x, ndarray):
        raise _unsupported(x)
    return _wrap(numpy.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


lib.stride_tricks.as_strided = _as_strided

cupyx = types.ModuleType("cupyx")
cupyx.STANDIN = True


def _scatter(op):
    def f(a, slices, value):
        if not isinstance(a, ndarray):
            raise _unsupported(a)
        getattr(numpy, op).at(a._a, _index(slices), _Ufunc._arg(value))
    return f


cupyx.scatter_add, cupyx.scatter_max, cupyx.scatter_min = (_scatter("add"), _scatter("maximum"),
                                                          _scatter("minimum"))


def _empty_pinned(shape, dtype=float, order="C"):
    """``cupyx.empty_pinned``: a NumPy array over pinned memory (``alloc_pinned_memory``)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for d in shape:
        count *= int(d)
    mem = alloc_pinned_memory(count * numpy.dtype(dtype).itemsize)
    return numpy.ndarray(shape, dtype=dtype, buffer=mem, order=order)


def _zeros_pinned(shape, dtype=float, order="C"):
    out = _empty_pinned(shape, dtype, order)
    out[...] = 0
    return out


cupyx.empty_pinned, cupyx.zeros_pinned = _empty_pinned, _zeros_pinned


class _ErrorOnSync:
    """``cupyx.allow_synchronize(False)``: accepted, checks nothing (the stand-in never syncs)."""

    def __init__(self, allow):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cupyx.allow_synchronize = _ErrorOnSync


# --- installing it --------------------------------------------------------------------------------

_MODULES = {"cupy.cuda": cuda, "cupy.cuda.runtime": cuda.runtime, "cupy.cuda.nccl": cuda.nccl,
            "cupy.cuda.curand": cuda.curand, "cupy.random": random, "cupy.lib": lib,
            "cupy.lib.stride_tricks": lib.stride_tricks, "cupyx": cupyx}


def install():
    """Put the stand-in in ``sys.modules`` as cupy/cupyx; returns what it replaced, for ``uninstall``."""
    me = sys.modules[__name__]
    names = ["cupy", *_MODULES]
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules["cupy"] = me
    sys.modules.update(_MODULES)
    return saved


def uninstall(saved):
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod
