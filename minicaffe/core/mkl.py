"""Intel MKL's GEMM for the CPU engines, where the optional ``mkl`` package is installed
(``pip install "minicaffe[mkl]"``); ``MINICAFFE_MKL=0`` leaves it unused.

Why: the engines' time on the CPU is mostly GEMMs (a ResNet-50 training pass: its 1x1 convolutions
alone are 45% of it), and NumPy's OpenBLAS runs many of their shapes well below the core's rate.
On the project's 2-core Intel Xeon (AVX-512), an image's GEMM each on the kernels' pool, one thread
per GEMM, GFLOP/s OpenBLAS 0.3.29 / MKL 2026.2: ResNet-50's 1x1 layers at batch 8, 256 <- 64 on
56x56 190 / 260, 64 <- 256 137 / 285, 64 <- 64 157 / 235, 512 <- 128 on 28x28 269 / 310, 2048 <- 512
on 7x7 190 / 210; both at 172-174 on one thread of a 2048^3 SGEMM. Whole training passes (forward +
backward, medians of interleaved passes in one process) were 4-8% shorter.

How: ``libmkl_rt`` from the package's install, with its SEQUENTIAL threading layer. Each call runs
on the thread that makes it; the parallelism is the kernels' pool's (core/blas.py splits a GEMM
over it), so there is no OpenMP runtime beside the pool: MKL's own threads (its GNU layer) spun
between calls and slowed the pool's work (a ResNet-50 pass 1% slower than with OpenBLAS, 8% faster
with ``OMP_WAIT_POLICY=passive``, which a library cannot set for its host).

Results differ from OpenBLAS's at float32 rounding (another order of sums). MKL's sequential GEMM
gave the same bits for a product computed whole and split by rows or columns into 2, 3, 4 or 16
parts, on the shapes of the nets here, so the result does not change with the pool's thread count
(as with OpenBLAS, that is observed, not promised by the library).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

from . import context as _context

# MKL_Set_Threading_Layer's value for its sequential layer (mkl_service.h: MKL_THREADING_SEQUENTIAL)
_SEQUENTIAL = 1

_lock = threading.Lock()
_state = {"tried": False, "gemms": {}, "path": None}


def _library_paths():
    """Where ``libmkl_rt`` may be: the ``mkl`` distribution's own files, then this environment's
    ``lib`` folder (the package installs its libraries there)."""
    found = []
    try:
        from importlib import metadata
        dist = metadata.distribution("mkl")
        for f in dist.files or ():
            if os.path.basename(str(f)).startswith("libmkl_rt.so"):
                found.append(os.path.abspath(str(dist.locate_file(f))))
    except Exception:       # noqa: BLE001 -- not installed, or metadata unreadable: look in lib/
        pass
    for folder in (os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")):
        found.extend(sorted(glob.glob(os.path.join(folder, "libmkl_rt.so*"))))
    return [p for i, p in enumerate(found) if p not in found[:i] and os.path.isfile(p)]


def _bind(path):
    """{dtype: cblas ?gemm} of the MKL at ``path``, its threading layer set to sequential; {} where
    it does not load."""
    import numpy as np
    try:
        handle = ctypes.CDLL(path)
        handle.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        handle.MKL_Set_Threading_Layer.restype = ctypes.c_int
        if handle.MKL_Set_Threading_Layer(_SEQUENTIAL) != _SEQUENTIAL:
            return {}
        found = {}
        for dtype, name, real in ((np.float32, "cblas_sgemm", ctypes.c_float),
                                  (np.float64, "cblas_dgemm", ctypes.c_double)):
            fn = getattr(handle, name)
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, real,
                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, real, ctypes.c_void_p,
                           ctypes.c_int]
            fn.restype = None
            found[np.dtype(dtype)] = fn
        return found
    except (OSError, AttributeError):
        return {}


def gemms():
    """{dtype: cblas ?gemm (row-major, 32-bit indices)} of MKL for float32 and float64, bound once;
    {} where the ``mkl`` package is not installed, does not load, or ``MINICAFFE_MKL=0``."""
    if not _context.current().switches.mkl:
        return {}
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                for path in _library_paths():
                    found = _bind(path)
                    if found:
                        _state["gemms"], _state["path"] = found, path
                        break
                _state["tried"] = True
    return _state["gemms"]


def library_path():
    """The ``libmkl_rt`` in use, or None."""
    return _state["path"] if gemms() else None


def warm_up() -> bool:
    """Load MKL and its kernels for this CPU now (a small product in each float type), instead of at
    the first GEMM; False where MKL is not in use. Why: its libraries' code is what a benchmark
    counts with the imports, as it counts PyTorch's and OpenCV's (benchmarks/bench_nets.py)."""
    import numpy as np
    from . import blas
    found = gemms()
    for dtype in found:
        a = np.ones((64, 64), dtype)
        blas.matmul(a, a)
    return bool(found)
