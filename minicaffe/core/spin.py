"""Short spin-waits for the kernels' thread pool (core/threads.py), run outside the GIL.

Why: a thread that sleeps on a lock hands its core back to the system, and waking it again is slow
where the cores are virtual. On the project's 2-core machine (a KVM guest, whose idle cores halt at
once) a ``parallel_for`` of two equal halves of a 1M-element multiply took 316 us against 301 us on
one thread: its worker started 85 us after the call, and the caller saw it finish ~70 us after it
did. Over the 469 pool calls of a ResNet-50 training pass (batch 8), the time beyond their longest
part came to 80-90 ms of ~1300.

So a worker that has finished its part keeps polling, for about a millisecond, for the next call,
and the caller polls for its workers' ends before it sleeps on their locks. The locks stay the
truth: each poll only decides when to take a lock that is then already free, so a poll that runs
out ends in the same blocking wait as before. A round is an acquire load and the CPU's spin-wait
hint (~13 ns here); every YIELD_EVERY rounds it calls ``sched_yield``, which gives the core to any
other thread that wants it.

The loops are Numba functions compiled with ``nogil``: a thread polling in Python would hold the
GIL that the other thread needs to start its part, and waiting for the GIL is itself a sleep.
``loops()`` is None where Numba does not import (or lacks the extensions used here),
``MINICAFFE_COMPILED=0``, or the C library has no ``sched_yield``: the pool then only sleeps on its
locks, as it did before.
"""
from __future__ import annotations

import ctypes
import platform
import threading
import time

from . import context

_lock = threading.Lock()
_state = {"loops": None, "tried": False}

# a poll gives its core away (sched_yield) once every this many rounds (~13 us here), for a thread
# that shares the core; not every round: a loop of sched_yield calls on one core delayed the other
# core's thread as it woke from a poll (a flag seen 63 us after it was set, against 12 us with
# pause-only rounds and 7 us when the setter slept)
YIELD_EVERY = 1024

# Set by _define_intrinsics (Numba extensions, made only once Numba is imported): an acquire load
# and a release store of one int64 (the loop cannot hoist the load, and what a thread wrote before
# its store is seen by the thread that loads it), and the CPU's spin-wait hint (x86's pause,
# Arm's yield; nothing elsewhere).
_load_acquire = _store_release = _pause = None

# the compiled wait_at_least, which finish_then_wait_above calls (set by Loops before it compiles that)
_wait = None


def wait_at_least(seqs, i, value, rounds, yield_):
    """Whether ``seqs[i] >= value`` within ``rounds`` polls (a worker's end: its last finished call)."""
    for r in range(rounds):
        if _load_acquire(seqs, i) >= value:
            return True
        _pause()
        if r % YIELD_EVERY == YIELD_EVERY - 1:
            yield_()
    return _load_acquire(seqs, i) >= value


def finish_then_wait_above(done, go, i, value, rounds, yield_):
    """Store ``done[i] = value`` (call ``value``'s part is done), then whether ``go[i] > value`` (a
    later call has come) within ``rounds`` polls: the compiled ``wait_at_least`` for ``value + 1``
    (the numbers are whole)."""
    _store_release(done, i, value)
    return _wait(go, i, value + 1, rounds, yield_)


class Loops:
    """The compiled loops, with the C library's ``sched_yield`` bound as their last argument (an
    argument, not a global, so that Numba caches their machine code on disk), and ``per_us``, the
    rounds a microsecond measured when they were built."""

    def __init__(self, numba, yield_):
        global _wait
        self._yield = yield_
        self._wait = _wait = _jit(numba, wait_at_least)
        self._finish = _jit(numba, finish_then_wait_above)
        self.per_us = 1.0

    def rounds(self, microseconds):
        """Polling rounds that take about ``microseconds`` on this machine."""
        return max(0, int(microseconds * self.per_us))

    def wait_at_least(self, seqs, i, value, rounds):
        return self._wait(seqs, i, value, rounds, self._yield)

    def finish_then_wait_above(self, done, go, i, value, rounds):
        return self._finish(done, go, i, value, rounds, self._yield)


def _jit(numba, fn):
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:    # no writable cache location (a read-only install, no HOME)
        return numba.njit(nogil=True)(fn)


def _define_intrinsics():
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    def pointer(context, builder, aryty, ary, i):
        return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary), [i])

    @intrinsic
    def load_acquire(typingctx, arr, i):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(pointer(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
        return arr.dtype(arr, i), codegen

    @intrinsic
    def store_release(typingctx, arr, i, value):
        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
            builder.store_atomic(v, pointer(context, builder, sig.args[0], args[0], args[1]), "release", 8)
            return context.get_dummy_value()
        return types.none(arr, i, value), codegen

    machine = platform.machine().lower()
    hint = ("llvm.x86.sse2.pause", []) if machine in ("x86_64", "amd64", "i686", "i386") else \
        ("llvm.aarch64.hint", [1]) if machine in ("aarch64", "arm64") else None

    @intrinsic
    def pause(typingctx):
        def codegen(context, builder, sig, args):
            if hint is not None:
                name, operands = hint
                fty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)] * len(operands))
                fn = cgutils.get_or_insert_function(builder.module, fty, name)
                builder.call(fn, [ir.Constant(ir.IntType(32), v) for v in operands])
            return context.get_dummy_value()
        return types.none(), codegen

    global _load_acquire, _store_release, _pause
    _load_acquire, _store_release, _pause = load_acquire, store_release, pause


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
    try:
        _define_intrinsics()
        built = Loops(numba, yield_)
        seqs = np.zeros(2, np.int64)
        built.wait_at_least(seqs, 0, 0, 1)                      # compiled (or loaded) now, not mid-call
        built.finish_then_wait_above(seqs, seqs.copy(), 0, 0, 1)
    except Exception:       # noqa: BLE001 -- a Numba without these extensions: only the locks
        return None
    n = 1 << 16             # the rounds' pace: the least of three timings of n rounds that never end early
    best = min(_timed(built, seqs, n) for _ in range(3))
    built.per_us = n / max(best * 1e6, 1.0)
    return built


def _timed(built, seqs, n):
    t0 = time.perf_counter()
    built.wait_at_least(seqs, 0, 1, n)
    return time.perf_counter() - t0
