"""Short spin-waits for the kernels' thread pool (core/threads.py), run outside the GIL.

Why: a thread that sleeps on a lock hands its core back to the system, and waking it again is slow
where the cores are virtual. On the project's 2-core machine (a KVM guest, whose idle cores halt at
once) a ``parallel_for`` of two equal halves of a 1M-element multiply took 316 us against 301 us on
one thread: its worker started 85 us after the call, and the caller saw it finish ~70 us after it
did. Over the 469 pool calls of a ResNet-50 training pass (batch 8), the time beyond their longest
part came to ~90 ms of ~1340.

So a worker that has finished its part keeps polling, for a bounded number of rounds, for the next
call, and the caller polls for its workers' ends before it sleeps on their locks. The locks stay
the truth: each poll only decides when to take a lock that is then already free, so a poll that
runs out ends in the same blocking wait as before. Each round calls ``sched_yield`` (~0.2 us here),
which gives the core to any other thread that wants it and keeps the compiler from hoisting the
read out of the loop.

The loops are Numba functions compiled with ``nogil``: a thread polling in Python would hold the
GIL that the other thread needs to start its part, and waiting for the GIL is itself a sleep.
``loops()`` is None where Numba does not import, ``MINICAFFE_COMPILED=0``, or the C library has no
``sched_yield``: the pool then only sleeps on its locks, as it did before.
"""
from __future__ import annotations

import ctypes
import threading

from . import context

_lock = threading.Lock()
_state = {"loops": None, "tried": False}


def wait_at_least(seqs, i, value, rounds, yield_):
    """Whether ``seqs[i] >= value`` within ``rounds`` polls (a worker's end: its last finished call)."""
    for _ in range(rounds):
        if seqs[i] >= value:
            return True
        yield_()
    return seqs[i] >= value


def finish_then_wait_above(done, go, i, value, rounds, yield_):
    """Store ``done[i] = value`` (call ``value``'s part is done), then whether ``go[i] > value`` (a
    later call has come) within ``rounds`` polls."""
    done[i] = value
    for _ in range(rounds):
        if go[i] > value:
            return True
        yield_()
    return go[i] > value


class Loops:
    """The compiled loops, with the C library's ``sched_yield`` bound as their last argument (an
    argument, not a global, so that Numba caches their machine code on disk)."""

    def __init__(self, numba, yield_):
        self._yield = yield_
        self._wait = _jit(numba, wait_at_least)
        self._finish = _jit(numba, finish_then_wait_above)

    def wait_at_least(self, seqs, i, value, rounds):
        return self._wait(seqs, i, value, rounds, self._yield)

    def finish_then_wait_above(self, done, go, i, value, rounds):
        return self._finish(done, go, i, value, rounds, self._yield)


def _jit(numba, fn):
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:    # no writable cache location (a read-only install, no HOME)
        return numba.njit(nogil=True)(fn)


def _sched_yield():
    """The C library's ``sched_yield`` as a ctypes function, else None (not a POSIX system)."""
    try:
        fn = ctypes.CDLL(None).sched_yield
    except (AttributeError, OSError, TypeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, ()
    return fn


def loops():
    """The compiled ``Loops`` (compiled, or loaded from the disk cache, on first use, once per
    process), or None where they cannot run: see the module's docstring."""
    if not context.current().switches.compiled:
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["loops"] = _build()
                _state["tried"] = True
    return _state["loops"]


def _build():
    try:
        import numba
    except Exception:       # noqa: BLE001 -- any failure to load means: no spinning, only the locks
        return None
    yield_ = _sched_yield()
    if yield_ is None:
        return None
    import numpy as np
    built = Loops(numba, yield_)
    seqs = np.zeros(2, np.int64)
    built.wait_at_least(seqs, 0, 0, 1)                      # compiled (or loaded) now, not mid-call
    built.finish_then_wait_above(seqs, seqs.copy(), 0, 0, 1)
    return built
