"""The kernels' thread pool: one per process, for the copies and element-wise passes BLAS leaves on
one thread.

Why: a convolution's GEMM already runs on every BLAS thread, but its im2col/col2im copies, pooling
and the other NumPy passes between GEMMs run on the calling thread alone. NumPy releases the GIL
inside copies and ufunc loops over large arrays, so splitting such a pass into contiguous chunks
(of images, channels or blocks of planes) and running them on a few threads uses the idle cores.

    threads.parallel_for(n_items, lambda i0, i1: work(i0, i1), work=elements)

Each chunk must write only its own part of the output, so a chunk computes every element exactly
as the single-threaded loop would (same operations, same order): results are bit-identical at any
thread count. Scratch buffers are per thread already (``context.Workspaces``), so a chunk asking for
a workspace gets its thread's own.

The size is read once from the context's switches: ``MINICAFFE_THREADS`` when set. Otherwise the
pool has the BLAS library's thread count (``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/
``MKL_NUM_THREADS``, else the number of cores) only when OpenBLAS's idle threads sleep soon after
a GEMM (``OPENBLAS_THREAD_TIMEOUT`` at most ``SHORT_BLAS_SPIN``), and one thread (everything inline)
if not. Why: by default OpenBLAS's threads spin for about 2^28 cycles (~0.1 s) after each GEMM, and
a net runs a GEMM every few milliseconds, so they hold every core all along; a second pool thread
then only time-shares a core with a spinning one. Measured on 2 cores (benchmarks/bench_nets.py,
CaffeNet batch 32 and GoogLeNet batch 16, best of 3, min of 4 runs): with OpenBLAS's default spin,
two pool threads gain nothing beyond the noise (GoogLeNet's pooling layers alone are 10% slower);
with ``OPENBLAS_THREAD_TIMEOUT=4`` they train 9-11% faster than one thread (1371 against 1541 ms,
1649 against 1806 ms) and infer 6-9% faster.

The pool is rebuilt when the size changes (``context.reload_environment``) or after a ``fork``
(threads do not survive one). A ``parallel_for`` inside a chunk runs inline, so nested calls never
wait on the pool.
"""
import collections
import os
import threading

import numpy as np

from ..errors import MinicaffeError
from . import context as _context
from . import spin as _spin

# Below this many elements of work in all, a pass runs inline: handing a chunk to another thread
# costs tens of microseconds, what a copy of ~64K float32 values takes.
MIN_PARALLEL_WORK = 1 << 16

# parallel_for: the caller runs the chunks no worker has started by the time its own is done (tests of
# the split turn it off, so that each chunk surely runs on a thread of its own)
CALLER_TAKES_OVER = True

# parallel_flat's chunks start at multiples of this many elements, so every chunk's SIMD loops see
# the alignment the whole array's loop sees (bit-identity cannot hinge on a loop's unaligned head).
FLAT_BLOCK = 1 << 12

# Below this many elements (per array) a flat pass runs inline: a ufunc over arrays that are still in
# cache runs at ~0.1 ns an element, so 256K elements take ~0.03 ms, the order of handing a chunk to
# another thread and waiting for it (measured on 2 cores, benchmarks/bench_threads.py: ReLU over 131K
# values 1.5x slower before it ran inline). Inside a net the arrays a pass reads were mostly written
# several layers before and come from memory, where a second thread pays from a few hundred thousand
# elements on: at 2M ResNet-50's stage-4 Eltwise and ReLU passes (1.6M
# values at batch 8) ran on one core, and the training net's forward + backward took 1190 ms
# against 1166 at 256K (median of 5, A/B in one process; GoogLeNet and CaffeNet within 0.5%, and
# inference the same or faster).
MIN_FLAT_ELEMENTS = 1 << 18

# The largest OPENBLAS_THREAD_TIMEOUT (2^n cycles of spinning, ~25 us at 16) at which the pool
# defaults to the BLAS thread count (measured at 4, OpenBLAS's least).
SHORT_BLAS_SPIN = 16

# Spin-waits (core/spin.py), in microseconds. A worker that has finished its part polls this long
# for the next call before it sleeps on its lock: half of ResNet-50's pool calls in a training pass
# come within 200 us of the one before, 82% within 500 us, 91% within 1 ms. The caller polls up to
# SPIN_FOR_PARTS_US for its workers' ends before it sleeps. 0: sleep on the locks at once, as before.
# Measured on 2 cores, training passes (forward + backward), 11-21 interleaved rounds in one process,
# sleeping / polling, ms, medians (means): ResNet-50 batch 8 1264.3 / 1231.0 (1273.5 / 1227.3),
# GoogLeNet batch 16 1063.1 / 1054.2 (1064.3 / 1042.7), CaffeNet batch 32 619.1 / 619.6 (637.9 /
# 630.1), VGG-16 batch 4 1316.4 / 1325.2 (1337.9 / 1321.2). The pool calls' time beyond their longest
# part, summed over a pass: ResNet-50 82.4 / 61.9 ms (469 calls), GoogLeNet 67.5 / 52.3 (402),
# CaffeNet 24.9 / 19.3 (149), VGG-16 67.4 / 57.4 (337). What is left is mostly the worker's wait
# for the GIL as its part starts (the caller holds it then), which is a sleep too: publishing the
# call from outside the GIL let the worker start 15 us after it (50 before), but the caller then
# slept on the GIL instead, and the calls took as long.
SPIN_AFTER_PART_US = 1000
SPIN_FOR_PARTS_US = 10000

# one int64 sequence number a thread, a cache line apart, so that polling threads do not share one
_SEQ_STRIDE = 8

_lock = threading.Lock()
_state = {"key": None, "pool": None}
_local = threading.local()


def size():
    """The pool's thread count (the caller's thread included), from the context's switches."""
    sw = _context.current().switches
    if sw.threads is not None:
        text = sw.threads.strip()
        if not text.isdigit() or int(text) < 1:
            raise MinicaffeError(f"{_context.THREADS_VAR}={sw.threads!r}: expected a whole number of threads >= 1")
        return int(text)
    spin = (sw.blas_spin or "").strip()
    if not (spin.isdigit() and int(spin) <= SHORT_BLAS_SPIN):
        return 1
    if sw.blas_threads is not None and sw.blas_threads.strip().isdigit() and int(sw.blas_threads) >= 1:
        return int(sw.blas_threads)
    return _cpu_count()


def _cpu_count():
    """``os.cpu_count()``, read once: it asks the system each call (~2 us here), and ``size`` runs
    at every ``parallel_for`` (~600 times in GoogLeNet's training pass)."""
    if _state.get("cpus") is None:
        _state["cpus"] = os.cpu_count() or 1
    return _state["cpus"]


class _Pool:
    """``n - 1`` worker threads (the caller is the n-th), each asleep on its own lock until a
    ``parallel_for`` hands it work, then signalling on a second lock that it is done. With the spin
    loops (core/spin.py) each side first polls a call number outside the GIL, and takes its lock
    once the number says the lock is free: a worker for SPIN_AFTER_PART_US after its part, the
    caller for SPIN_FOR_PARTS_US for its workers' ends.

    Why not ``concurrent.futures.ThreadPoolExecutor``: a call there builds a future and a work item
    per chunk, goes through the executor's queue and its idle-thread bookkeeping, and the caller
    waits on each future's condition; ResNet-50's training pass makes ~500 such calls. With this
    pool (the same chunks, the same bits) passes were shorter, 2 cores, medians of 7 interleaved in
    one process, executor / this pool, ms: ResNet-50 1021.6 / 1007.3 (and 1004.3 / 977.6 in a
    second run), GoogLeNet 901.3 / 882.2, VGG-16 1045.6 / 1033.7, CaffeNet 533.6 / 524.3."""

    def __init__(self, n):
        self.busy = threading.Lock()            # one caller at a time: another runs inline
        self.go = [threading.Lock() for _ in range(n - 1)]
        self.done = [threading.Lock() for _ in range(n - 1)]
        for lock in self.go + self.done:
            lock.acquire()
        self.job = None
        self.closed = False
        # spinning (core/spin.py): call k's number goes in go_seq when the workers' locks are
        # released, and a worker puts it in done_seq once it has released its done lock
        self.spin = _spin.loops()
        self.seq = 0
        self.go_seq = np.zeros(n * _SEQ_STRIDE, np.int64)
        self.done_seq = np.zeros(n * _SEQ_STRIDE, np.int64)
        self.workers = [threading.Thread(target=self._work, args=(i,), name=f"minicaffe_{i}", daemon=True)
                        for i in range(n - 1)]
        for t in self.workers:
            t.start()

    def _work(self, i):
        go, done = self.go[i], self.done[i]
        at = i * _SEQ_STRIDE
        while True:
            go.acquire()        # free already when the poll below saw the next call
            job, seq = self.job, self.seq
            if job is None:                     # close()
                return
            try:
                job(i)
            finally:
                done.release()
                if self.spin is not None:
                    # outside the GIL: say done (the caller may be polling for it), then poll for
                    # the next call
                    self.spin.finish_then_wait_above(self.done_seq, self.go_seq, at, seq,
                                                     self.spin.rounds(SPIN_AFTER_PART_US))

    def run(self, parts, fn, takes_over):
        """``fn`` over ``parts``, part 0 on the caller and one part a worker (``takes_over``: each
        thread, the caller included, claims the next part no thread has started, until none is
        left); {part index: exception} of the parts that raised."""
        errors = {}

        def one(k):
            try:
                _run_inner(fn, *parts[k])
            except BaseException as e:          # noqa: B902 -- re-raised by the caller, lowest part first
                errors[k] = e
        if takes_over:
            todo = collections.deque(range(len(parts)))     # popleft is atomic: each part is claimed once

            def job(_worker):
                while True:
                    try:
                        k = todo.popleft()
                    except IndexError:
                        return
                    one(k)
        else:
            def job(worker):
                one(worker + 1)
        workers = len(parts) - 1
        self.job = job
        self.seq += 1
        seq = self.seq
        for w in range(workers):
            self.go[w].release()
            self.go_seq[w * _SEQ_STRIDE] = seq     # a polling worker sees it with its lock free
        try:
            job(-1)                             # the caller's share: part 0, or claims as a worker does
        finally:
            # every worker done before this returns, even if a signal's exception (Ctrl-C) comes
            # while waiting: a worker still running would otherwise signal the next call's wait
            interrupted = None
            for w in range(workers):
                while True:
                    try:
                        if self.spin is not None and SPIN_FOR_PARTS_US > 0:
                            # outside the GIL; the lock below is then free, or this sleeps on it
                            self.spin.wait_at_least(self.done_seq, w * _SEQ_STRIDE, seq,
                                                    self.spin.rounds(SPIN_FOR_PARTS_US))
                        self.done[w].acquire()
                        break
                    except BaseException as e:      # noqa: B902 -- re-raised once all are done
                        interrupted = interrupted or e
            self.job = None
            if interrupted is not None:
                raise interrupted
        return errors

    def close(self):
        """Let the workers end (the pool is being replaced); waits for a call in flight."""
        with self.busy:
            self.closed = True
            self.job = None
            self.seq += 1
            for w, lock in enumerate(self.go):
                lock.release()
                self.go_seq[w * _SEQ_STRIDE] = self.seq


def _pool(n):
    """The pool of ``n`` threads for this process (rebuilt after a fork, or when ``n`` changes)."""
    key = (n, os.getpid())
    if _state["key"] != key:
        with _lock:
            if _state["key"] != key:
                old = _state["pool"]
                if old is not None and _state["key"][1] == key[1]:
                    old.close()
                _state["pool"] = _Pool(n)
                _state["key"] = key
    return _state["pool"]


def inside_chunk():
    """Whether the calling thread is running a chunk of ``parallel_for`` (nested calls run inline)."""
    return getattr(_local, "inside", False)


def _run_inner(fn, i0, i1):
    _local.inside = True
    try:
        fn(i0, i1)
    finally:
        _local.inside = False


def chunks(n_items, parts):
    """``parts`` contiguous ranges ``(i0, i1)`` covering ``range(n_items)``, sizes differing by one at
    most (empty ranges left out)."""
    parts = max(1, min(parts, n_items))
    step, extra = divmod(n_items, parts)
    out, i0 = [], 0
    for p in range(parts):
        i1 = i0 + step + (p < extra)
        out.append((i0, i1))
        i0 = i1
    return out


def parallel_for(n_items, fn, work=None):
    """``fn(i0, i1)`` over contiguous chunks of ``range(n_items)``, one per thread of the pool; the
    caller runs the first chunk and waits for the rest (an exception in any chunk is raised here:
    the lowest chunk's, after every chunk ended).
    Inline (one call ``fn(0, n_items)``) when the pool has one thread, there is one item, ``work``
    (elements touched in all, when given) is under MIN_PARALLEL_WORK, this is already a chunk, or
    another thread's call is using the pool.

    With ``CALLER_TAKES_OVER``, a chunk is claimed by whichever thread comes to it first: the caller,
    done with its own, runs the chunks no worker has started yet. Why: on a machine whose other cores
    are busy (other processes), a worker may not be scheduled for milliseconds, and the caller would
    otherwise sit idle waiting for it. The chunks are the same ranges whoever runs them, so results
    do not change."""
    if n_items <= 0:
        return
    n = size()
    if n <= 1 or n_items == 1 or getattr(_local, "inside", False) or \
            (work is not None and work < MIN_PARALLEL_WORK):
        fn(0, n_items)
        return
    pool = _pool(n)
    if not pool.busy.acquire(blocking=False):
        # another thread's parallel_for holds the pool: this one runs inline rather than wait
        fn(0, n_items)
        return
    if pool.closed:         # replaced (and its workers ended) since this thread looked it up
        pool.busy.release()
        fn(0, n_items)
        return
    try:
        errors = pool.run(chunks(n_items, n), fn, CALLER_TAKES_OVER)
    finally:
        pool.busy.release()
    if errors:
        raise errors[min(errors)]


def parallel_flat(n_elements, fn, work=None):
    """``fn(start, stop)`` over contiguous ranges of ``range(n_elements)`` (of flattened arrays),
    one per thread, each starting at a multiple of FLAT_BLOCK. ``work``: elements touched in all
    (default ``n_elements``); inline below MIN_FLAT_ELEMENTS, and where ``parallel_for`` is."""
    if n_elements < MIN_FLAT_ELEMENTS:
        fn(0, n_elements)
        return
    block = FLAT_BLOCK
    blocks = -(-n_elements // block)
    parallel_for(blocks, lambda b0, b1: fn(b0 * block, min(b1 * block, n_elements)),
                 work=n_elements if work is None else work)


def flat_views(*arrays):
    """The 1-D views of NumPy arrays that are all C-contiguous (writes through them reach the
    arrays), else None: the caller then runs its pass whole, inline (CuPy arrays, strided views)."""
    out = []
    for a in arrays:
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            return None
        out.append(a.reshape(-1))
    return out


def parallel_copyto(dst, src):
    """``dst[...] = src`` (same shape, at least 1-D) split over the first axis. CPU arrays only: a
    CuPy copy is one kernel already and is done at once."""
    if not isinstance(dst, np.ndarray):
        dst[...] = src
        return
    parallel_for(dst.shape[0], lambda i0, i1: np.copyto(dst[i0:i1], src[i0:i1]), work=dst.size)
