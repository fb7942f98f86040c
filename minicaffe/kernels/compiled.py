"""Compiled CPU kernels (Numba) for passes that NumPy can only run as several whole-array passes.

Why: some CPU work is a chain of element-wise operations, for example the solver's SGD step
(decay, momentum, update: 13 passes over each parameter). NumPy runs each operation as its own
pass through memory. At the thread count users run, those passes were bandwidth-bound and did not
scale: VGG-16's SGD step took 330 ms of a 2.5 s training iteration on 2 cores. A compiled loop
reads and writes each element once.

Issue 15 weighs three ways to compile: Numba, a C extension built at install time, and oneDNN
through a binding. Numba was taken because:
- it ships wheels wherever NumPy does, so `pip install` still needs no compiler;
- it compiles on first use and caches the machine code on disk (beside this module, or in
  ``NUMBA_CACHE_DIR``);
- a kernel stays readable Python with the same arithmetic as its NumPy twin.

Rules:
- A kernel here is a plain Python function of flat arrays and scalars. It is compiled with
  ``nogil=True``, so the kernels' thread pool (core/threads.py) runs its chunks in parallel.
- It does not use Numba's own threads.
- Every kernel has a NumPy twin, which is the reference: the kernel must give the same bits
  (tests/test_compiled.py). So each product or sum is rounded where NumPy rounds it (no fastmath,
  no contraction into FMA except where the twin emulates one).
- ``enabled()`` is False when Numba does not import or ``MINICAFFE_COMPILED=0``. Callers then take
  the NumPy path, with the same results.
"""
from __future__ import annotations

import threading

import numpy as np

from ..core import context

_lock = threading.Lock()
_state = {"numba": None, "tried": False, "compiled": {}}


def _numba():
    """The numba module, imported on first need (it takes ~0.3 s, which a command that never runs
    a kernel should not pay), else None."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    import numba
                except Exception:       # noqa: BLE001 -- any failure to load means: no compiled kernels
                    numba = None
                _state["numba"], _state["tried"] = numba, True
    return _state["numba"]


def enabled() -> bool:
    """Whether the compiled kernels run: Numba imports and ``MINICAFFE_COMPILED`` is not ``0``."""
    return context.current().switches.compiled and _numba() is not None


def get(fn):
    """``fn`` (a module-level function of this module) compiled with ``nogil`` and the on-disk cache,
    once per process."""
    got = _state["compiled"].get(fn)
    if got is None:
        numba = _numba()            # before the lock: it takes the lock itself on first use
        with _lock:
            got = _state["compiled"].get(fn)
            if got is None:
                try:
                    got = numba.njit(nogil=True, cache=True)(fn)
                except RuntimeError:    # no writable cache location (a read-only install, no HOME)
                    got = numba.njit(nogil=True)(fn)
                _state["compiled"][fn] = got
    return got


# --- the solver's update rules (solvers/updates.py's NumPy twins, step for step) ---------------------
#
# fused_axpy(a, x, y) there is "y = a·x + y rounded once": the float64 product and sum, rounded to
# the arrays' dtype. ``h *= m`` is a multiply in the arrays' dtype (m rounded to float32 first, as
# the twins' Python floats are). The flags say which optional passes run, so a skipped pass is
# skipped here too (adding a zero decay would turn a -0.0 gradient into +0.0).

def sgd_step(w, g, h, a, b, normalize, scale, decay, rate, momentum):
    """Elements ``a:b`` of one SGD step: normalise, L2 decay, ``h = momentum·h + rate·g``, ``w -= h``;
    ``g`` ends holding the update value, as the NumPy twin leaves it."""
    dt = w.dtype.type
    s, m = dt(scale), dt(momentum)
    for i in range(a, b):
        gi = g[i]
        if normalize:
            gi = gi * s
        if decay != 0.0:
            gi = dt(np.float64(decay) * np.float64(w[i]) + np.float64(gi))
        hi = h[i] * m
        hi = dt(np.float64(rate) * np.float64(gi) + np.float64(hi))
        h[i] = hi
        g[i] = hi
        w[i] = w[i] - hi


def nesterov_step(w, g, h, a, b, normalize, scale, decay, rate, momentum):
    """Elements ``a:b`` of one Nesterov step: as ``sgd_step``, then the update is
    ``(1 + momentum)·h' - momentum·h`` (rounded as the twin's ``old *= -m`` and fused add)."""
    dt = w.dtype.type
    s, m, neg_m = dt(scale), dt(momentum), dt(-momentum)
    one_m = np.float64(np.float32(1.0 + momentum))
    for i in range(a, b):
        gi = g[i]
        if normalize:
            gi = gi * s
        if decay != 0.0:
            gi = dt(np.float64(decay) * np.float64(w[i]) + np.float64(gi))
        old = h[i]
        hi = old * m
        hi = dt(np.float64(rate) * np.float64(gi) + np.float64(hi))
        h[i] = hi
        u = dt(one_m * np.float64(hi) + np.float64(old * neg_m))
        g[i] = u
        w[i] = w[i] - u
