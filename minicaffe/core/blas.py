"""Independent small GEMMs run side by side on the kernels' pool, BLAS at one thread each.

Why: a layer often has several GEMMs that do not depend on one another: Winograd's 16 or 36 (one
per transform position), or a 1x1 convolution's one per image. NumPy calls BLAS once per GEMM,
and BLAS splits each one over every core. For the small ones that split is poor: the threads
meet once per GEMM, and each thread's share is too thin to run at full speed. Running whole GEMMs
on the pool's threads (core/threads.py) instead, BLAS at one thread, keeps every core busy on
GEMMs of full size. Measured on 2 cores, the 36 GEMMs of a Winograd F(4x4) band (numpy 2.2,
OpenBLAS 0.3.29):

* 64 -> 64 channels, 560 tiles: 2.46 ms with BLAS on 2 threads, 1.25 ms split;
* 128 channels, 490 tiles: 4.8 / 4.2 ms;
* 256 channels, 160 tiles: 6.1 / 5.6 ms.

ResNet-50's 1x1 layers with their epilogues, an image a GEMM at batch 10: 274 / 258 ms in all.

The thread count is set through ``threadpoolctl``, which knows how to reach OpenBLAS, MKL and BLIS
in whatever build NumPy loaded. The limit is process-wide: while it is on, a GEMM from any other
thread also runs on one thread (slower, same result). It is reference-counted, so overlapping
users restore the count only when the last one is done.

Results: OpenBLAS splits a GEMM's output between its threads, not the sums, so every shape we run
gives the same bits at one thread and at two. That is not a promise of the library, though: one
odd shape, 37 x 1000 x 513, differs in the last bit. So results may differ at the level of
float32 rounding between a pool of one thread (no split) and more, as they may between BLAS
thread counts.

``MINICAFFE_THREADS=1``, or a BLAS that threadpoolctl cannot reach, keeps every GEMM on BLAS's own
threads, as before.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading

from . import threads

_lock = threading.Lock()
_state = {"controllers": None, "depth": 0, "saved": None}


def _controllers():
    """threadpoolctl's controllers of the BLAS libraries loaded in this process, found once (an
    empty list when threadpoolctl does not import)."""
    if _state["controllers"] is None:
        with _lock:
            if _state["controllers"] is None:
                try:
                    from threadpoolctl import ThreadpoolController
                    found = list(ThreadpoolController().select(user_api="blas").lib_controllers)
                except Exception:       # noqa: BLE001 -- any failure means: leave BLAS alone
                    found = []
                _state["controllers"] = found
    return _state["controllers"]


@contextlib.contextmanager
def one_thread():
    """BLAS at one thread inside the block (see the module docstring); yields False, changing
    nothing, when no BLAS library can be reached."""
    libs = _controllers()
    if not libs:
        yield False
        return
    with _lock:
        _state["depth"] += 1
        if _state["depth"] == 1:
            _state["saved"] = [lib.num_threads for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
    try:
        yield True
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for lib, n in zip(libs, _state["saved"]):
                    lib.set_num_threads(n)


def parallel_gemms(n_items, fn):
    """``fn(i0, i1)``, whose items each run their own GEMMs, over contiguous chunks of
    ``range(n_items)`` on the kernels' pool with BLAS at one thread; one call ``fn(0, n_items)`` on
    BLAS's own threads when the pool has one thread, there are fewer items than threads, this is a
    chunk already, or BLAS cannot be reached."""
    n = threads.size()
    if n <= 1 or n_items < n or threads.inside_chunk() or not _controllers():
        fn(0, n_items)
        return
    with one_thread():
        threads.parallel_for(n_items, fn)


# --- out += a @ b in one GEMM (beta = 1) ------------------------------------------------------------
# Why: NumPy's matmul cannot add into its output, so a parameter gradient (which Caffe accumulates)
# took a GEMM into a scratch array and an add over both: for CaffeNet's fc6 at batch 32 (4096 x 9216)
# 27.9 ms, against 12.9 ms for BLAS's own GEMM with beta = 1 (2 cores, OpenBLAS 0.3.29). NumPy does
# not expose that GEMM, so it is called through ctypes in the OpenBLAS that NumPy's wheel carries
# (numpy.libs/), under the symbol names that build gives it. Any other BLAS (a system one, MKL),
# or a build whose names are not these, leaves ``add_product`` returning False, and the caller
# keeps its scratch-and-add path.

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_GEMM_NAMES = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", ctypes.c_int64),
               ("cblas_sgemm64_", "cblas_dgemm64_", ctypes.c_int64),
               ("scipy_cblas_sgemm", "scipy_cblas_dgemm", ctypes.c_int),
               ("cblas_sgemm", "cblas_dgemm", ctypes.c_int))


def _numpy_gemms():
    """{dtype: cblas ?gemm} of the OpenBLAS inside NumPy's own package, bound once; {} where there
    is none or its symbols are not known."""
    if _state.get("gemms") is None:
        _controllers()                  # found first: it takes the same lock
        with _lock:
            if _state.get("gemms") is None:
                _state["gemms"] = _bind_gemms()
    return _state["gemms"]


def _bind_gemms():
    import numpy as np
    home = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    ours = os.path.join(home, "numpy"), os.path.join(home, "numpy.libs")
    for lib in _controllers():
        path = os.path.abspath(getattr(lib, "filepath", "") or "")
        if getattr(lib, "internal_api", "") != "openblas" or not path.startswith(ours):
            continue
        try:
            handle = ctypes.CDLL(path)
        except OSError:
            return {}
        for sname, dname, index in _GEMM_NAMES:
            if hasattr(handle, sname) and hasattr(handle, dname):
                found = {}
                for dtype, name, real in ((np.float32, sname, ctypes.c_float), (np.float64, dname, ctypes.c_double)):
                    fn = getattr(handle, name)
                    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index, real,
                                   ctypes.c_void_p, index, ctypes.c_void_p, index, real, ctypes.c_void_p, index]
                    fn.restype = None
                    found[np.dtype(dtype)] = fn
                return found
    return {}


def _operand(a):
    """(transpose flag, leading dimension) of a 2-D NumPy array as a row-major GEMM operand: C-
    contiguous, or the transpose of a C-contiguous array; None otherwise."""
    if a.flags.c_contiguous:
        return _NO_TRANS, max(a.shape[1], 1)
    if a.T.flags.c_contiguous:
        return _TRANS, max(a.shape[0], 1)
    return None


def adds_products(*arrays):
    """Whether ``add_product`` can run on C-contiguous arrays like these (NumPy arrays of one dtype
    that NumPy's OpenBLAS multiplies): a caller picks its path before it has the operands."""
    import numpy as np
    return (all(type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays)
            and bool(arrays) and arrays[0].dtype in _numpy_gemms())


def add_product(a, b, out):
    """``out += a @ b`` as one GEMM with beta = 1; False (nothing done) where it cannot: not NumPy's
    OpenBLAS, a dtype other than float32/64 shared by all three, ``out`` not C-contiguous, or an
    operand neither C-contiguous nor the transpose of one. The sums are BLAS's own: the same bits
    as the product added afterwards where BLAS sums each element's products in one block (K up to
    a few hundred), and within rounding of it otherwise."""
    import numpy as np
    if not (type(a) is np.ndarray and type(b) is np.ndarray and type(out) is np.ndarray):
        return False
    if a.ndim != 2 or b.ndim != 2 or out.ndim != 2 or not out.flags.c_contiguous or not out.flags.writeable:
        return False
    gemm = _numpy_gemms().get(out.dtype)
    if gemm is None or a.dtype != out.dtype or b.dtype != out.dtype:
        return False
    (m, k), (k2, n) = a.shape, b.shape
    if k2 != k or out.shape != (m, n):
        raise ValueError(f"add_product: {a.shape} @ {b.shape} does not fit {out.shape}")
    opa, opb = _operand(a), _operand(b)
    if opa is None or opb is None:
        return False
    if m == 0 or n == 0 or k == 0:
        return True
    gemm(_ROW_MAJOR, opa[0], opb[0], m, n, k, 1.0, a.ctypes.data, opa[1], b.ctypes.data, opb[1], 1.0,
         out.ctypes.data, n)
    return True
