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

from . import mkl as _mkl
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


def _numpy_openblas():
    """threadpoolctl's controller of the OpenBLAS inside NumPy's own package, else None."""
    import numpy as np
    home = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    ours = os.path.join(home, "numpy"), os.path.join(home, "numpy.libs")
    for lib in _controllers():
        path = os.path.abspath(getattr(lib, "filepath", "") or "")
        if getattr(lib, "internal_api", "") == "openblas" and path.startswith(ours):
            return lib
    return None


def gemm_library():
    """(name, version) of the library ``matmul`` runs a NumPy float32/float64 GEMM in: ("mkl",
    None) where core/mkl.py loaded MKL, ("openblas", (0, 3, 31)) for the OpenBLAS inside NumPy's
    package (its version as threadpoolctl reads it), else (None, None): a BLAS not identified.
    Why: where two layouts of one product run at different speeds, which one wins changed between
    libraries and OpenBLAS releases (layers/inner_product.py)."""
    if _mkl.gemms():
        return "mkl", None
    lib = _numpy_openblas()
    if lib is None:
        return None, None
    text = str(getattr(lib, "version", "") or "")
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return "openblas", tuple(parts) if len(parts) == 3 else None


def _bind_gemms():
    import numpy as np
    lib = _numpy_openblas()
    if lib is not None:
        path = os.path.abspath(getattr(lib, "filepath", "") or "")
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
    that MKL or NumPy's OpenBLAS multiplies): a caller picks its path before it has the operands."""
    import numpy as np
    return (all(type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays)
            and bool(arrays) and (arrays[0].dtype in _mkl.gemms() or arrays[0].dtype in _numpy_gemms()))


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
    mkl_gemm = _mkl.gemms().get(out.dtype)
    if mkl_gemm is not None and _gemm_into(mkl_gemm, a, b, out, 1.0):
        return True
    opa, opb = _operand(a), _operand(b)
    if opa is None or opb is None:
        return False
    if m == 0 or n == 0 or k == 0:
        return True
    gemm(_ROW_MAJOR, opa[0], opb[0], m, n, k, 1.0, a.ctypes.data, opa[1], b.ctypes.data, opb[1], 1.0,
         out.ctypes.data, n)
    return True


# --- a @ b through MKL where it is installed (core/mkl.py) ----------------------------------------
# Why here: every CPU engine's GEMM goes through ``matmul`` (or ``add_product``), so the BLAS that
# runs it is chosen in one place. MKL's calls are sequential: a GEMM made on a pool thread (an
# image's, in ``parallel_gemms``) runs whole there, and one made outside the pool is split into a
# part per pool thread (by rows or columns of the product, whichever is longer) on the pool, as
# BLAS's own threads would split it. The parts are computed alone, so they need no order.

# products of fewer multiply-adds than this run whole, on the calling thread (splitting one costs
# ~10-20 us)
SPLIT_MIN_WORK = 1 << 21


def _layout(a):
    """(transpose flag, leading dimension) of a 2-D NumPy array as a row-major GEMM operand whose
    rows (or, transposed, columns) are contiguous runs with a positive step between them: a
    C-contiguous array, its transpose, or a block of rows or columns of either; None otherwise."""
    item = a.itemsize
    (m, n), (s0, s1) = a.shape, a.strides
    if (n <= 1 or s1 == item) and (m <= 1 or (s0 > 0 and s0 % item == 0 and s0 // item >= n)):
        return _NO_TRANS, max(s0 // item if m > 1 else n, n, 1)
    if (m <= 1 or s0 == item) and (n <= 1 or (s1 > 0 and s1 % item == 0 and s1 // item >= m)):
        return _TRANS, max(s1 // item if n > 1 else m, m, 1)
    return None


def _gemm_into(gemm, a, b, out, beta):
    """``out = a @ b + beta · out`` (2-D NumPy arrays) through ``gemm`` (a cblas ?gemm), split over
    the pool where it is called outside it and large enough; False (nothing done) where an operand's
    layout does not fit (``_layout``; ``out`` must have contiguous rows)."""
    la, lb, lo = _layout(a), _layout(b), _layout(out)
    if la is None or lb is None or lo is None or lo[0] != _NO_TRANS:
        return False
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return True

    def part(r0, r1, c0, c1):
        gemm(_ROW_MAJOR, la[0], lb[0], r1 - r0, c1 - c0, k, 1.0, a[r0:r1].ctypes.data, la[1],
             b[:, c0:c1].ctypes.data, lb[1], beta, out[r0:r1, c0:c1].ctypes.data, lo[1])
    pool = threads.size()
    if pool <= 1 or threads.inside_chunk() or m * n * k < SPLIT_MIN_WORK:
        part(0, m, 0, n)
        return True
    if n >= m:
        cuts = [n * i // pool for i in range(pool + 1)]
        threads.parallel_for(pool, lambda i0, i1: [part(0, m, cuts[i], cuts[i + 1]) for i in range(i0, i1)])
    else:
        cuts = [m * i // pool for i in range(pool + 1)]
        threads.parallel_for(pool, lambda i0, i1: [part(cuts[i], cuts[i + 1], 0, n) for i in range(i0, i1)])
    return True


def _module_matmul(a, b, out):
    """``matmul`` of the arrays' own module (NumPy's, or CuPy's on a GPU), into ``out`` when given."""
    from .backend import get_array_module
    xp = get_array_module(a)
    return xp.matmul(a, b) if out is None else xp.matmul(a, b, out=out)


def matmul(a, b, out=None):
    """``a @ b`` (into ``out`` when given), as ``np.matmul``: through MKL where it is installed
    (core/mkl.py) and the operands are NumPy arrays of its float types, 2-D, or 3-D stacks (one of
    them may be 2-D, or a stack of one) whose matrices ``_layout`` takes; a stack's products run
    side by side on the pool. Everything else goes to ``matmul`` of the arrays' own module (NumPy's,
    or CuPy's on a GPU)."""
    import numpy as np
    gemm = None
    if type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype:
        gemm = _mkl.gemms().get(a.dtype)
    if gemm is None or a.ndim not in (2, 3) or b.ndim not in (2, 3) or a.shape[-1] != b.shape[-2]:
        return _module_matmul(a, b, out)
    lead = a.shape[0] if a.ndim == 3 else 1
    lead_b = b.shape[0] if b.ndim == 3 else 1
    if lead != lead_b and 1 not in (lead, lead_b):
        return _module_matmul(a, b, out)
    stack = max(lead, lead_b) if 3 in (a.ndim, b.ndim) else None
    shape = ((stack,) if stack is not None else ()) + (a.shape[-2], b.shape[-1])
    if out is not None and (type(out) is not np.ndarray or out.shape != shape or out.dtype != a.dtype
                            or not out.flags.writeable or np.may_share_memory(out, a)
                            or np.may_share_memory(out, b)):
        return _module_matmul(a, b, out)
    target = np.empty(shape, a.dtype) if out is None else out
    if stack is None:
        return target if _gemm_into(gemm, a, b, target, 0.0) else _module_matmul(a, b, out)

    def item(arr, i):
        return arr if arr.ndim == 2 else arr[i if arr.shape[0] > 1 else 0]
    if stack == 0:
        return target
    if not all(_layout(x) is not None for x in (item(a, 0), item(b, 0), target[0])):
        return _module_matmul(a, b, out)

    def items(i0, i1):
        for i in range(i0, i1):
            _gemm_into(gemm, item(a, i), item(b, i), target[i], 0.0)
    threads.parallel_for(stack, items, work=stack * shape[-2] * shape[-1] * 2)
    return target
