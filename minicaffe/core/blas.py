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
