"""The kernels' thread pool (minicaffe/core/threads.py): its size comes from the switches read once,
``parallel_for`` covers its range in contiguous chunks, and the engines that split their copies and
blocks over it give bit-identical results at 1 and 2 threads (and the reference's, to rounding).

The size thresholds (the least work worth a thread, pooling's block of planes, the scatter's block)
are lowered here so that the small shapes of these tests really run on two threads."""
import dataclasses
import threading
import time

import numpy as np
import pytest

from minicaffe.core import backend, context, spin, threads
from minicaffe.errors import MinicaffeError
from minicaffe.kernels import engines, pooling_engines
from minicaffe.layers import pooling
from minicaffe.testing import make_layer

from test_conv_engines import CASES as CONV_CASES, conv_text


@pytest.fixture
def pool_size(monkeypatch):
    """``pool_size(n)``: the pool has ``n`` threads and splits even the smallest pass."""
    ctx = context.current()
    saved = ctx.switches
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", False)
    monkeypatch.setattr(threads, "FLAT_BLOCK", 16)
    monkeypatch.setattr(threads, "MIN_FLAT_ELEMENTS", 0)
    monkeypatch.setattr(pooling, "POOL_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(pooling_engines, "SCATTER_BLOCK_OUTPUTS", 8)

    def set_size(n):
        ctx.switches = dataclasses.replace(saved, threads=str(n))
    yield set_size
    ctx.switches = saved


# --- the pool ----------------------------------------------------------------------------------------

def test_size_from_switches():
    """MINICAFFE_THREADS wins; else the BLAS thread count where OpenBLAS's threads sleep soon after a
    GEMM (else they hold the cores: one thread); a mistyped count is one line naming the variable."""
    import os
    sw = context.Switches.from_environ
    saved = context.current().switches
    try:
        for env, want in (({"MINICAFFE_THREADS": "3", "OMP_NUM_THREADS": "5"}, 3),
                          ({"OMP_NUM_THREADS": "5", "OPENBLAS_THREAD_TIMEOUT": "4"}, 5),
                          ({"OPENBLAS_NUM_THREADS": "4", "OPENBLAS_THREAD_TIMEOUT": "4"}, 4),
                          ({"OPENBLAS_THREAD_TIMEOUT": "4"}, os.cpu_count() or 1),
                          ({"OMP_NUM_THREADS": "5"}, 1),
                          ({"OMP_NUM_THREADS": "5", "OPENBLAS_THREAD_TIMEOUT": "28"}, 1),
                          ({}, 1)):
            context.current().switches = sw(env)
            assert threads.size() == want, env
        context.current().switches = sw({"MINICAFFE_THREADS": "two"})
        with pytest.raises(MinicaffeError, match="MINICAFFE_THREADS='two'"):
            threads.size()
    finally:
        context.current().switches = saved


@pytest.mark.parametrize("n_items,parts", [(10, 3), (2, 4), (7, 1), (5, 5)])
def test_chunks_cover_the_range_in_order(n_items, parts):
    got = threads.chunks(n_items, parts)
    assert [i for a, b in got for i in range(a, b)] == list(range(n_items))
    sizes = [b - a for a, b in got]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(got) == min(parts, n_items)


def test_parallel_for_uses_two_threads_and_nests_inline(pool_size):
    pool_size(2)
    seen, lock = [], threading.Lock()

    def body(i0, i1):
        inner = []
        threads.parallel_for(4, lambda a, b: inner.append((a, b)))     # nested: one inline call
        with lock:
            seen.append((i0, i1, threading.get_ident(), inner))
    threads.parallel_for(10, body)
    assert sorted((a, b) for a, b, _, _ in seen) == [(0, 5), (5, 10)]
    assert len({t for _, _, t, _ in seen}) == 2
    assert all(inner == [(0, 4)] for *_, inner in seen)


def test_parallel_for_inline_when_small_or_one_thread(pool_size, monkeypatch):
    calls = []
    pool_size(1)
    threads.parallel_for(10, lambda a, b: calls.append((a, b)))
    pool_size(2)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 100)
    threads.parallel_for(10, lambda a, b: calls.append((a, b)), work=99)
    assert calls == [(0, 10), (0, 10)]


def test_parallel_for_raises_a_chunks_error_after_all_chunks_end(pool_size):
    pool_size(2)
    done = []

    def body(i0, i1):
        if i0 == 5:
            raise KeyError("late chunk")
        done.append(i0)
    with pytest.raises(KeyError, match="late chunk"):
        threads.parallel_for(10, body)
    assert done == [0]


@pytest.mark.parametrize("takes_over", [False, True])
def test_parallel_for_raises_the_lowest_chunks_error(takes_over, pool_size, monkeypatch):
    pool_size(3)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", takes_over)

    def body(i0, i1):
        if i0 > 0:
            raise KeyError(f"chunk at {i0}")
    with pytest.raises(KeyError, match="chunk at 3"):
        threads.parallel_for(9, body)


def test_a_call_while_another_thread_holds_the_pool_runs_inline(pool_size, monkeypatch):
    """With the pool busy on another thread's call (its worker blocked), a second caller runs
    every chunk itself rather than wait; the first call ends with all its chunks run once."""
    pool_size(2)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", False)
    release, started = threading.Event(), threading.Event()
    first = []

    def slow(i0, i1):
        if i0 > 0:
            started.set()
            release.wait(10)
        first.append((i0, i1))
    other = threading.Thread(target=threads.parallel_for, args=(10, slow))
    other.start()
    try:
        assert started.wait(10)
        seen = []
        t0 = time.perf_counter()
        threads.parallel_for(10, lambda a, b: seen.append((a, b, threading.get_ident())))
        assert time.perf_counter() - t0 < 5          # it did not wait for the blocked worker
        assert seen == [(0, 10, threading.get_ident())]
    finally:
        release.set()
        other.join(10)
    assert sorted(first) == [(0, 5), (5, 10)]


@pytest.mark.parametrize("takes_over", [False, True])
def test_caller_claims_the_chunks_no_thread_started(takes_over, pool_size, monkeypatch):
    """One worker of three is woken late (a busy machine): with CALLER_TAKES_OVER the caller and the
    other worker run its chunk, and the call still waits for it to come and go; without, it runs
    its own chunk when it comes. Every chunk runs once either way."""
    pool_size(3)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", takes_over)
    threads.parallel_for(9, lambda a, b: None)          # the pool of three threads is there
    pool = threads._state["pool"]
    go = pool.go[1]

    class Late:
        def release(self):
            threading.Timer(0.3, go.release).start()
    pool.go[1] = Late()
    seen, lock = [], threading.Lock()

    def body(i0, i1):
        with lock:
            seen.append((i0, i1, threading.get_ident()))
    try:
        threads.parallel_for(9, body)
    finally:
        pool.go[1] = go
    assert sorted((a, b) for a, b, _ in seen) == [(0, 3), (3, 6), (6, 9)]
    ran_late = any(t == pool.workers[1].ident for *_, t in seen)
    assert ran_late is not takes_over
    assert pool.job is None


def test_an_interrupt_while_waiting_is_raised_after_the_workers_end(pool_size, monkeypatch):
    """A Ctrl-C (KeyboardInterrupt) that arrives while the caller waits for a worker is raised only
    once that worker is done, so no worker is still running a chunk when the call returns."""
    pool_size(2)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", False)
    threads.parallel_for(4, lambda a, b: None)
    pool = threads._state["pool"]
    done = pool.done[0]
    finished = threading.Event()

    class Interrupted:
        calls = 0

        def acquire(self):
            Interrupted.calls += 1
            if Interrupted.calls == 1:
                raise KeyboardInterrupt
            return done.acquire()

    def body(i0, i1):
        if i0 > 0:
            time.sleep(0.2)
            finished.set()
    pool.done[0] = Interrupted()
    try:
        with pytest.raises(KeyboardInterrupt):
            threads.parallel_for(4, body)
        assert finished.is_set() and Interrupted.calls == 2
    finally:
        pool.done[0] = done
    seen = []
    threads.parallel_for(4, lambda a, b: seen.append((a, b)))       # the pool still works
    assert sorted(seen) == [(0, 2), (2, 4)]


def test_workers_of_a_replaced_pool_end(pool_size):
    """A pool of another size replaces the old one, whose workers end."""
    pool_size(3)
    threads.parallel_for(9, lambda a, b: None)
    old = threads._state["pool"]
    workers = old.workers
    assert len(workers) == 2 and all(t.is_alive() for t in workers)
    pool_size(2)
    threads.parallel_for(9, lambda a, b: None)
    assert threads._state["pool"] is not old
    for t in workers:
        t.join(5)
    assert not any(t.is_alive() for t in workers)
    seen = []           # a caller still holding the replaced pool runs inline, not on its ended workers
    current = threads._state["pool"], threads._state["key"]
    threads._state["pool"], threads._state["key"] = old, (3, current[1][1])
    try:
        pool_size(3)
        threads.parallel_for(9, lambda a, b: seen.append((a, b)))
    finally:
        threads._state["pool"], threads._state["key"] = current
    assert seen == [(0, 9)]


def test_spin_loops_poll_for_a_number_and_give_up_after_their_rounds():
    """core/spin.py's loops: a poll ends True once the number is there, False after its rounds."""
    loops = spin.loops()
    if loops is None:
        pytest.skip("no spin loops here (Numba missing or off)")
    seqs = np.zeros(16, np.int64)
    assert not loops.wait_at_least(seqs, 8, 3, 10)
    seqs[8] = 3
    assert loops.wait_at_least(seqs, 8, 3, 10) and loops.wait_at_least(seqs, 8, 2, 0)
    done, go = np.zeros(16, np.int64), np.zeros(16, np.int64)
    assert not loops.finish_then_wait_above(done, go, 8, 5, 10)
    assert done[8] == 5 and done.sum() == 5                 # stored where asked, nowhere else
    go[8] = 5
    assert not loops.finish_then_wait_above(done, go, 8, 5, 10)      # the same call is not a new one
    go[8] = 6
    assert loops.finish_then_wait_above(done, go, 8, 5, 10)
    assert loops.per_us > 0 and loops.rounds(1000) >= 1000 * loops.per_us - 1 and loops.rounds(0) == 0
    t0 = time.perf_counter()
    assert not loops.wait_at_least(seqs, 8, 4, loops.rounds(2000))       # ~2 ms of polls that run out
    assert 0.0005 < time.perf_counter() - t0 < 0.5


def test_spin_loops_off_with_the_compiled_kernels(monkeypatch):
    ctx = context.current()
    monkeypatch.setattr(ctx, "switches", dataclasses.replace(ctx.switches, compiled=False))
    assert spin.loops() is None


def _worker_parts(calls, pause=0.0):
    """For ``calls`` calls of two parts each, whether the second part ran on another thread than
    the caller's, and its range, with ``pause`` seconds between calls."""
    out = []
    for _ in range(calls):
        got = {}
        threads.parallel_for(2, lambda a, b: got.update({a: threading.get_ident()}))
        out.append(got[1] != threading.get_ident() and got[0] == threading.get_ident())
        if pause:
            time.sleep(pause)
    return out


@pytest.mark.parametrize("after_part, for_parts, pause", [
    (1000, 10000, 0.0),         # the worker polling when each call comes
    (1, 1, 0.005),              # its poll over long before: it sleeps on its lock, as without polling
    (0, 0, 0.0),                # no polling at all
])
def test_the_worker_takes_every_call_whether_it_polls_or_sleeps(after_part, for_parts, pause, pool_size,
                                                                   monkeypatch):
    monkeypatch.setattr(threads, "SPIN_AFTER_PART_US", after_part)
    monkeypatch.setattr(threads, "SPIN_FOR_PARTS_US", for_parts)
    pool_size(2)
    assert all(_worker_parts(50, pause))


def test_a_caller_whose_poll_runs_out_sleeps_until_the_worker_ends(pool_size, monkeypatch):
    monkeypatch.setattr(threads, "SPIN_FOR_PARTS_US", 1)
    pool_size(2)
    ended = []

    def body(i0, i1):
        if i0 > 0:
            time.sleep(0.05)
            ended.append(i0)
    for _ in range(3):
        threads.parallel_for(2, body)
        assert len(ended) == _ + 1          # the worker's part ended before the call returned


def test_a_pool_without_spin_loops_sleeps_on_its_locks(pool_size, monkeypatch):
    loops = spin.loops
    monkeypatch.setattr(spin, "loops", lambda: None)
    pool_size(3)                            # a new pool, built without the loops
    seen = []
    threads.parallel_for(2, lambda a, b: seen.append(a))
    assert threads._state["pool"].spin is None and sorted(seen) == [0, 1]
    assert all(_worker_parts(20))
    monkeypatch.setattr(spin, "loops", loops)
    pool_size(2)
    threads.parallel_for(2, lambda a, b: None)      # the next tests' pool polls again
    assert threads._state["pool"].spin is spin.loops()


@pytest.mark.parametrize("text, shape", [
    ('name: "r" type: "ReLU"', (4, 3, 7, 5)),
    ('name: "l" type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }', (5, 4, 6, 5)),
    ('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', (3, 4, 11, 10)),
])
def test_caller_takeover_keeps_the_bits(text, shape, pool_size, monkeypatch):
    """With the caller taking over unstarted chunks (the default), whichever thread runs a chunk, the
    results are the one-thread bits."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    pool_size(1)
    one = _layer_pass(text, x, False)
    pool_size(2)
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", True)
    for _ in range(3):
        two = _layer_pass(text, x, False)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(one, two, strict=True))


# --- the engines at 1 and 2 threads ------------------------------------------------------------------

def _run(text, x, engine, phase=0, num_top=1, seed=0):
    """Forward and backward of a fresh layer with ``engine`` forced: tops, bottom diff, param diffs."""
    layer, bottom, top = make_layer(text, [x], num_top=num_top, phase=phase)
    rng = np.random.default_rng(seed + 1)
    for b in layer.blobs:
        b.data[...] = rng.standard_normal(b.shape)
    engines.force(layer, engine)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True], bottom)
    return [t.data.copy() for t in top] + [bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]


def _compare(text, shape, layer_type, pool_size, phase=0, num_top=1):
    x = np.random.default_rng(0).standard_normal(shape)
    checked = 0
    for name in engines.names(layer_type, "cpu"):
        probe, bottom, top = make_layer(text, [x], num_top=num_top, phase=phase)
        if name != engines.REFERENCE and not next(
                e for e in engines.engines_for(layer_type, "cpu") if e.name == name).runs_on(probe):
            continue
        pool_size(1)
        one = _run(text, x.astype(np.float32), name, phase, num_top)
        pool_size(2)
        two = _run(text, x.astype(np.float32), name, phase, num_top)
        for a, b in zip(one, two):
            assert np.array_equal(a, b), (name, text)
        with backend.float64_blobs():       # and two threads still compute the reference's numbers
            got = _run(text, x, name, phase, num_top)
            pool_size(1)
            want = _run(text, x, engines.REFERENCE, phase, num_top)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{name} {text}")
        checked += 1
    assert checked >= 1


POOL_CASES = [
    ("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", (2, 3, 9, 8), 0, 2),
    ("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", (3, 4, 11, 10), 0, 1),
    ("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", (3, 4, 11, 10), 1, 1),   # TEST: no argmax kept
    ("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", (3, 4, 9, 9), 0, 1),
]


@pytest.mark.parametrize("spec,shape,phase,num_top", POOL_CASES, ids=range(len(POOL_CASES)))
def test_pooling_bit_identical_at_two_threads(spec, shape, phase, num_top, pool_size):
    _compare(f'name: "pool" type: "Pooling" {spec}', shape, "Pooling", pool_size, phase, num_top)


@pytest.mark.parametrize("case", ["k3p1", "k3s2p1", "group2", "1x1stride2", "narrow5g2", "wide", "vgg"])
@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_convolution_bit_identical_at_two_threads(case, layer_type, pool_size):
    shape, spec = CONV_CASES[case]
    _compare(conv_text(layer_type, spec), shape, layer_type, pool_size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_tiles_bit_identical_at_two_threads(tile, dtype, pool_size, monkeypatch):
    """Winograd's transforms split over channels (F(2x2)) or tile rows (F(4x4)) on the pool: the
    same bits at 1 and 2 threads, both tile sizes forced, in bands of two tile rows."""
    x = np.random.default_rng(4).standard_normal((2, 5, 13, 11)).astype(dtype)
    text = conv_text("Convolution", "num_output: 3 kernel_size: 3 pad: 1")

    def run():
        with _blobs_of(dtype):
            layer, bottom, top = make_layer(text, [x], phase=1)
        rng = np.random.default_rng(5)
        for b in layer.blobs:
            b.data[...] = rng.standard_normal(b.shape)
        engines.force(layer, "winograd", tile=tile, band_rows=2)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        assert layer.engine.tile == tile
        return [top[0].data.copy()]
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, f"winograd F({tile}x{tile})")


# --- the element-wise layers and the solver's update at 1 and 2 threads ------------------------------

def _spy_threads(monkeypatch):
    """The set of thread ids that ran a pool chunk (so a test sees the pass really was split)."""
    seen = set()
    inner = threads._run_inner

    def spy(fn, i0, i1):
        seen.add(threading.get_ident())
        return inner(fn, i0, i1)
    monkeypatch.setattr(threads, "_run_inner", spy)
    return seen


def _at_one_and_two_threads(run, pool_size, monkeypatch):
    """``run()`` with a pool of one thread, then of two; checks the second really was split."""
    pool_size(1)
    one = run()
    pool_size(2)
    seen = _spy_threads(monkeypatch)
    two = run()
    assert len(seen) == 2
    return one, two


def _assert_same_bits(one, two, dtype, what):
    for a, b in zip(one, two, strict=True):
        assert a.dtype == dtype and a.tobytes() == b.tobytes(), what


def _blobs_of(dtype):
    """Blobs of ``dtype`` inside the block (float32 is the default)."""
    import contextlib
    return backend.float64_blobs() if dtype == np.float64 else contextlib.nullcontext()


def _layer_pass(text, x, in_place, bottoms=1, seed=3):
    """Forward then backward of a fresh layer on ``bottoms`` copies-with-noise of ``x``: the top,
    every bottom's diff and every parameter diff, as copies."""
    rng = np.random.default_rng(seed)
    xs = [x] + [rng.standard_normal(x.shape).astype(x.dtype) for _ in range(bottoms - 1)]
    layer, bottom, top = make_layer(text, xs, in_place=in_place)
    layer.forward(bottom, top)
    out = [top[0].data.copy()]
    top[0].diff[...] = rng.standard_normal(top[0].shape)
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True] * bottoms, bottom)
    return out + [b.diff.copy() for b in bottom] + [b.diff.copy() for b in layer.blobs]


NEURON_CASES = ['type: "ReLU"', 'type: "ReLU" relu_param { negative_slope: 0.1 }',
                'type: "ReLU" relu_param { negative_slope: -0.5 }', 'type: "Sigmoid"', 'type: "TanH"',
                'type: "AbsVal"', 'type: "BNLL"', 'type: "ELU" elu_param { alpha: 0.7 }',
                'type: "Power" power_param { power: 1.5 scale: 0.5 shift: 2 }',
                'type: "Exp" exp_param { base: 2 scale: 0.5 }',
                'type: "Log" log_param { shift: 5 }', 'type: "Clip" clip_param { min: -0.5 max: 0.8 }']


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec", NEURON_CASES)
def test_neuron_layers_bit_identical_at_two_threads(spec, in_place, dtype, pool_size, monkeypatch):
    """Forward and backward of the element-wise layers split in flat chunks (an odd count, so the
    last chunk is short) give the one-thread bits, in place too."""
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5)).astype(dtype)
    text = f'name: "act" {spec}'
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: _layer_pass(text, x, in_place), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


ELTWISE_CASES = [('operation: SUM', 2), ('operation: SUM coeff: 0.5 coeff: -2 coeff: 1', 3),
                 ('operation: PROD', 3), ('operation: PROD stable_prod_grad: false', 2),
                 ('operation: MAX', 3), ('operation: MAX', 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec, bottoms", ELTWISE_CASES)
def test_eltwise_bit_identical_at_two_threads(spec, bottoms, in_place, dtype, pool_size, monkeypatch):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5)).astype(dtype)
    x[0, 0, 0, :3] = 0          # MAX's ties and PROD's zeros
    text = f'name: "e" type: "Eltwise" eltwise_param {{ {spec} }}'
    with _blobs_of(dtype), np.errstate(invalid="ignore", divide="ignore"):    # top / 0: Caffe's NaN
        one, two = _at_one_and_two_threads(lambda: _layer_pass(text, x, in_place, bottoms), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


LRN_CASES = ['lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }',
             'lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 k: 2 }',
             'lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }']


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", LRN_CASES)
def test_lrn_bit_identical_at_two_threads(spec, dtype, pool_size, monkeypatch):
    """LRN split in chunks of images (3 images: chunks of 2 and 1) gives the one-thread bits."""
    x = np.random.default_rng(0).standard_normal((3, 6, 5, 4)).astype(dtype)
    text = f'name: "lrn" type: "LRN" {spec}'
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: _layer_pass(text, x, False), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("spec", LRN_CASES)
def test_lrn_in_a_layer_frame_bit_identical_at_two_threads(spec, pool_size, monkeypatch):
    """A forward-only LRN takes its padded buffers from the layer frame (a sharing net's forward)
    and clears their border on the calling thread before the chunks run: the one-thread bits at
    two threads, over NaN left in the frame by an earlier layer, and the bits of its own buffers.
    (The NumPy passes: the compiled ACROSS_CHANNELS kernel takes no buffers, tests/test_compiled.py.)"""
    from minicaffe.kernels import compiled
    monkeypatch.setattr(compiled, "enabled", lambda: False)
    x = np.random.default_rng(0).standard_normal((3, 6, 5, 4)).astype(np.float32)
    layer, bottom, top = make_layer(f'name: "lrn" type: "LRN" {spec}', [x])
    layer.forward_only = True
    ws = context.current().workspaces

    def run():
        with ws.layer_frames() as frame:
            frame.next_layer()
            ws.get(np, (4096,), np.float32, "col")[...] = np.nan       # an earlier layer's scratch
            frame.next_layer()
            layer.forward(bottom, top)
        assert not any(k[0] in ("pad", "rows", "pad_w") for k in layer._buffers)
        return [top[0].data.copy()]
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, np.float32, spec)
    layer.forward(bottom, top)                          # outside a frame: buffers of its own
    assert any(k[0] == "pad" for k in layer._buffers)
    assert top[0].data.tobytes() == one[0].tobytes()


NORM_CASES = [
    ('type: "BatchNorm"', (2, 5, 9, 31)),                            # batch statistics
    ('type: "BatchNorm" batch_norm_param { use_global_stats: true }', (2, 5, 9, 31)),
    ('type: "BatchNorm"', (1, 7, 300)),                              # one image, long rows
    ('type: "Scale"', (2, 5, 9, 31)),
    ('type: "Scale" scale_param { bias_term: true }', (2, 5, 9, 31)),
    ('type: "Scale" scale_param { bias_term: true axis: 1 num_axes: 2 }', (3, 4, 5, 70)),
    ('type: "Scale" scale_param { bias_term: true }', (1, 6, 300)),
    ('type: "BatchNorm"', (2, 6, 56, 56)),                           # ResNet's rows (einsum sums)
    ('type: "Scale" scale_param { bias_term: true }', (2, 6, 56, 56)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec, shape", NORM_CASES)
def test_batchnorm_scale_bit_identical_at_two_threads(spec, shape, in_place, dtype, pool_size, monkeypatch):
    """Split over channels, the per-channel sums (BatchNorm's statistics and gradient means, Scale's
    parameter gradients) keep their order: the one-thread bits, running statistics included. Rows of
    300 values take NumPy's blocked (pairwise) summation."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 3 + 1
    text = f'name: "n" {spec}'

    def run():
        layer, bottom, top = make_layer(text, [x], in_place=in_place)
        rng = np.random.default_rng(4)
        if layer.type == "BatchNorm":
            layer.blobs[0].data[...] = rng.standard_normal(layer.blobs[0].shape)
            layer.blobs[1].data[...] = rng.random(layer.blobs[1].shape) + 0.5
            layer.blobs[2].data[...] = 2.0
        else:
            for b in layer.blobs:
                b.data[...] = rng.standard_normal(b.shape)
        layer.forward(bottom, top)
        out = [top[0].data.copy()]
        top[0].diff[...] = rng.standard_normal(top[0].shape)
        for b in layer.blobs:
            b.diff[...] = 0.5
        layer.backward(top, [True], bottom)
        return out + [bottom[0].diff.copy()] + [b.data.copy() for b in layer.blobs] + \
            [b.diff.copy() for b in layer.blobs]
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: run(), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_dropout_bit_identical_at_two_threads(in_place, dtype, pool_size, monkeypatch):
    """Same seed, same mask and the same products at two threads (the bits are drawn whole)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5)).astype(dtype)
    text = 'name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }'
    def run():
        backend.set_random_seed(7)
        return _layer_pass(text, x, in_place)
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    assert 0 < np.count_nonzero(one[0]) < x.size
    for a, b in zip(one, two, strict=True):
        assert a.dtype == dtype and np.array_equal(a, b)


@pytest.mark.parametrize("spec, with_mean", [
    ("crop_size: 5 mirror: true scale: 0.25", True),
    ("crop_size: 5 mirror: true mean_value: 100 mean_value: 110 mean_value: 120", False),
    ("mirror: true scale: 0.5", True),
])
def test_transformer_batch_bit_identical_at_two_threads(spec, with_mean, pool_size, monkeypatch):
    """The data transformer's per-image crop, flip, mean and scale split over images: the same batch
    from the same seed, and a bad image is still the first one named."""
    from google.protobuf import text_format
    from minicaffe.data.transformer import DataTransformer
    from minicaffe.errors import DataError
    from minicaffe.proto import caffe_pb2
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (3, 8, 9), dtype=np.uint8) for _ in range(5)]
    mean = rng.random((3, 8, 9)).astype(np.float32) * 100

    def run(imgs):
        p = text_format.Parse(spec, caffe_pb2.TransformationParameter())
        t = DataTransformer(p, 0, "data", rng=np.random.default_rng(3))
        if with_mean:
            t.mean = mean
        return t.transform_batch(imgs, where=[f"image {i}" for i in range(len(imgs))])
    one, two = _at_one_and_two_threads(lambda: run(images), pool_size, monkeypatch)
    assert one.tobytes() == two.tobytes()
    bad = images[:3] + [images[3][:, :4]] + [images[4][:, :3]]
    with pytest.raises(DataError, match="image 3"):
        run(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("solver_type, extra", [
    ("SGD", "momentum: 0.9 weight_decay: 0.0005"),
    ("SGD", "momentum: 0.9 weight_decay: 0.001 regularization_type: \"L1\" iter_size: 2"),
    ("Nesterov", "momentum: 0.9 weight_decay: 0.0005"),
    ("AdaGrad", "delta: 1e-8 weight_decay: 0.0005"),
    ("RMSProp", "rms_decay: 0.95 delta: 1e-8 weight_decay: 0.0005"),
    ("AdaDelta", "momentum: 0.95 delta: 1e-6 weight_decay: 0.0005"),
    ("Adam", "momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.0005"),
])
def test_solver_update_bit_identical_at_two_threads(solver_type, extra, dtype, pool_size, monkeypatch):
    """Three steps of each update rule on a (7, 9, 5) weight split in flat chunks: the weights and
    every history array keep the one-thread bits. The NumPy body (compiled kernels off), at two
    threads in blocks of 40 elements (parameter_step's cache blocks) against whole chunks."""
    from minicaffe.solvers import updates
    ctx = context.current()
    monkeypatch.setattr(ctx, "switches", dataclasses.replace(ctx.switches, compiled=False))
    blocks = iter([1 << 40, 40])
    from minicaffe.proto import caffe_pb2
    from google.protobuf import text_format
    param = text_format.Parse(f'type: "{solver_type}" base_lr: 0.01 {extra}', caffe_pb2.SolverParameter())
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((7, 9, 5)).astype(dtype)
    grads = [rng.standard_normal(w0.shape).astype(dtype) for _ in range(3)]

    def run():
        monkeypatch.setattr(updates, "UPDATE_BLOCK", next(blocks))
        ctx.switches = dataclasses.replace(ctx.switches, compiled=False)
        rule = getattr(updates, solver_type)(param)
        w = w0.copy()
        hist = [np.zeros_like(w) for _ in range(rule.history_sets)]
        scratch = [np.empty_like(w) for _ in range(1 + rule.scratch)]
        decay = updates.f32(param.weight_decay)
        for it, g in enumerate(grads):
            updates.parameter_step(rule, w, g.copy(), hist, scratch, param.iter_size, decay,
                                   param.regularization_type, updates.f32(0.01), it)
        return [w] + hist
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a, b), solver_type


_PROBE = """
import json, os, sys
{first}
from minicaffe.core import context, threads
print(json.dumps([os.environ.get("OPENBLAS_THREAD_TIMEOUT"), context.current().switches.blas_spin,
                  threads.size()]))
"""


@pytest.mark.parametrize("first, user_value, want", [
    ("import minicaffe", None, (None, "4", "cores")),          # the commands' case: OpenBLAS loads with 4
    ("import numpy, minicaffe", None, (None, None, 1)),        # NumPy first: nothing changed, no pool
    ("import minicaffe", "28", ("28", "28", 1)),               # the user's value wins, and stays set
])
def test_openblas_spin_is_set_only_before_numpy_loads(first, user_value, want):
    """``import minicaffe`` before NumPy loads OpenBLAS with the shortest spin (core/context.py) and
    takes the variable out of the environment again (children see the user's); the pool follows what
    OpenBLAS was loaded with."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "MINICAFFE_THREADS", *context.BLAS_THREADS_VARS)}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    out = subprocess.run([sys.executable, "-c", _PROBE.format(first=first)], env=env, capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got[:2] == list(want[:2])
    assert got[2] == ((os.cpu_count() or 1) if want[2] == "cores" else want[2])


# --- the copies and sums of Concat, Slice and Split; Softmax, PReLU, MVN at 1 and 2 threads ----------

def _tops_and_diffs(text, xs, num_top=1, seed=6, in_place=False, phase=0):
    """Forward, then backward with random top diffs, of a fresh layer on bottoms ``xs``: every top,
    every bottom's diff and every parameter diff, as copies."""
    rng = np.random.default_rng(seed)
    layer, bottom, top = make_layer(text, xs, num_top=num_top, in_place=in_place, phase=phase)
    layer.forward(bottom, top)
    out = [t.data.copy() for t in top]
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)
    for b in layer.blobs:
        b.diff[...] = 0.5
    layer.backward(top, [True] * len(bottom), bottom)
    return out + [b.diff.copy() for b in bottom] + [b.diff.copy() for b in layer.blobs]


CONCAT_CASES = [   # (axis, bottom shapes): several images (split over images), one image (along the axis)
    (1, [(3, 2, 5, 7), (3, 5, 5, 7), (3, 1, 5, 7)]),
    (1, [(1, 4, 5, 7), (1, 7, 5, 7)]),
    (0, [(2, 3, 4), (5, 3, 4)]),
    (2, [(3, 2, 3, 5), (3, 2, 4, 5)]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis, shapes", CONCAT_CASES, ids=range(len(CONCAT_CASES)))
def test_concat_and_slice_bit_identical_at_two_threads(axis, shapes, dtype, pool_size, monkeypatch):
    """Concat's copies into its top and back into each bottom's diff, and Slice's (the same pieces
    the other way), split over images or along the axis, give the one-thread bits; a Slice of the
    Concat's top gives back the bottoms."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    cat = f'name: "c" type: "Concat" concat_param {{ axis: {axis} }}'
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: _tops_and_diffs(cat, xs), pool_size, monkeypatch)
        _assert_same_bits(one, two, dtype, cat)
        assert np.array_equal(one[0], np.concatenate(xs, axis=axis))
        points = np.cumsum([s[axis] for s in shapes])[:-1]
        cut = f'name: "s" type: "Slice" slice_param {{ axis: {axis} ' + \
            " ".join(f"slice_point: {p}" for p in points) + " }"
        one, two = _at_one_and_two_threads(lambda: _tops_and_diffs(cut, [one[0]], num_top=len(xs)),
                                           pool_size, monkeypatch)
        _assert_same_bits(one, two, dtype, cut)
        assert all(np.array_equal(a, x) for a, x in zip(one, xs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_top", [2, 3])
def test_split_backward_bit_identical_at_two_threads(num_top, dtype, pool_size, monkeypatch):
    """Split's sum of its tops' diffs, in flat chunks, adds in the one-thread order."""
    x = np.random.default_rng(0).standard_normal((3, 5, 7, 9)).astype(dtype)
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(
            lambda: _tops_and_diffs('name: "s" type: "Split"', [x], num_top=num_top), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, "Split")


SOFTMAX_CASES = [   # split over images (outer >= threads), over positions (one image), along the last axis
    ('softmax_param { axis: 1 }', (3, 5, 7, 9)),
    ('softmax_param { axis: 1 }', (1, 6, 7, 9)),
    ('softmax_param { axis: -1 }', (4, 3, 37)),
    ('softmax_param { axis: 2 }', (2, 3, 6, 10)),
    ('softmax_param { axis: 1 }', (1, 12, 3, 11)),   # 33 positions: blocks of 16 and 17 (not 16, 16, 1)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec, shape", SOFTMAX_CASES, ids=range(len(SOFTMAX_CASES)))
def test_softmax_bit_identical_at_two_threads(spec, shape, in_place, dtype, pool_size, monkeypatch):
    """Softmax forward and backward split over images or over positions: the one-thread bits."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 4
    text = f'name: "p" type: "Softmax" {spec}'
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: _tops_and_diffs(text, [x], in_place=in_place),
                                           pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec, shape", [('', (3, 5, 4, 9)), ('loss_param { ignore_label: 2 }', (1, 5, 7, 9)),
                                         ('loss_param { ignore_label: 1 normalization: FULL }', (6, 10))])
def test_softmax_loss_bit_identical_at_two_threads(spec, shape, dtype, pool_size, monkeypatch):
    """SoftmaxWithLoss: the probabilities and the gradient (label subtracted, ignored positions
    zeroed, scaled) split over images or positions give the one-thread bits, the loss too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype) * 3
    labels = rng.integers(0, shape[1], (shape[0],) + shape[2:]).astype(dtype)
    text = f'name: "l" type: "SoftmaxWithLoss" {spec}'

    def run():
        layer, bottom, top = make_layer(text, [x, labels], num_top=2)
        layer.forward(bottom, top)
        top[0].diff[...] = 0.7
        layer.backward(top, [True, False], bottom)
        return [t.data.copy() for t in top] + [bottom[0].diff.copy()]
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec, shape", [('', (2, 5, 7, 9)), ('', (9, 3)), ('', (1, 3, 40)),
                                         ('prelu_param { channel_shared: true }', (2, 5, 7, 9))])
def test_prelu_bit_identical_at_two_threads(spec, shape, in_place, dtype, pool_size, monkeypatch):
    """PReLU split over channels: the output, the input's gradient and the slope's gradient (each
    channel's sum over its own row, or the shared slope's one sum after the chunks) keep the
    one-thread bits; 3 channels at 2 threads give chunks of 2 and 1 (a one-channel chunk must sum
    in the same order as a wider one)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    text = f'name: "p" type: "PReLU" prelu_param {{ filler {{ type: "gaussian" std: 0.5 }} }} {spec}'
    if spec:
        text = f'name: "p" type: "PReLU" {spec}'
    with _blobs_of(dtype):
        def run():
            backend.set_random_seed(7)      # the same slopes from the filler
            return _tops_and_diffs(text, [x], in_place=in_place)
        one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", ['', 'mvn_param { normalize_variance: false }',
                                  'mvn_param { across_channels: true }'])
def test_mvn_bit_identical_at_two_threads(spec, dtype, pool_size, monkeypatch):
    """MVN split over rows (an image's channel, or an image across channels), in blocks of two or
    three rows within a chunk: each row's means are its own pairwise sums, the one-thread bits."""
    from minicaffe.layers import normalization
    monkeypatch.setattr(normalization, "MVN_BLOCK_ELEMENTS", 150)
    x = np.random.default_rng(0).standard_normal((3, 5, 7, 9)).astype(dtype) * 2 + 1
    text = f'name: "m" type: "MVN" {spec}'
    with _blobs_of(dtype):
        one, two = _at_one_and_two_threads(lambda: _tops_and_diffs(text, [x]), pool_size, monkeypatch)
    _assert_same_bits(one, two, dtype, spec)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_weight_gradient_bit_identical_at_two_threads(transpose, pool_size, monkeypatch):
    """InnerProduct's accumulation of the weight gradient (``dw += product``, in bands) split in
    flat chunks: the one-thread bits, over a gradient already holding values. (That is the path
    where BLAS's own accumulating GEMM cannot run: tests/test_blas.py tests that one.)"""
    from minicaffe.core import blas
    from minicaffe.layers import inner_product
    monkeypatch.setattr(inner_product, "WGRAD_BAND_ELEMENTS", 60)     # several bands
    monkeypatch.setattr(blas, "add_product", lambda a, b, out: False)
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 2)).astype(np.float32)
    text = 'name: "ip" type: "InnerProduct" inner_product_param { num_output: 7 ' \
           f'transpose: {str(transpose).lower()} weight_filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }}'

    def run():
        backend.set_random_seed(7)
        return _tops_and_diffs(text, [x])
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, np.float32, text)


@pytest.mark.parametrize("spec, shapes", [
    ('crop_param { axis: 2 offset: 3 offset: 1 }', [(3, 4, 11, 9), (3, 4, 6, 5)]),      # over images
    ('crop_param { axis: 2 offset: 2 }', [(1, 5, 11, 9), (1, 5, 6, 5)]),                 # one image: channels
    ('crop_param { axis: 0 offset: 1 }', [(5, 4, 6, 7), (3, 2, 4, 5)]),
])
def test_crop_bit_identical_at_two_threads(spec, shapes, pool_size, monkeypatch):
    """Crop's copy of the window forward and into the zeroed gradient backward, split over images
    or channels: the one-thread bits, and the window is the reference's."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    text = f'name: "c" type: "Crop" {spec}'
    one, two = _at_one_and_two_threads(lambda: _tops_and_diffs(text, xs), pool_size, monkeypatch)
    _assert_same_bits(one, two, np.float32, spec)
    layer, bottom, top = make_layer(text, xs)
    assert np.array_equal(one[0], xs[0][layer.index])


@pytest.mark.parametrize("spec", ['type: "Scale" scale_param { bias_term: true }', 'type: "BatchNorm"'])
@pytest.mark.parametrize("shape", [(16, 5, 3), (16, 5), (9, 7, 4)])
def test_per_channel_sums_keep_their_order_with_odd_chunks(spec, shape, pool_size, monkeypatch):
    """Scale's parameter gradients and BatchNorm's statistics at three threads over 5 or 7 channels
    (where an even split would leave a thread one channel, whose sum NumPy orders differently):
    the one-thread bits."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3 + 1

    def run():
        return _tops_and_diffs(f'name: "n" {spec}', [x])
    pool_size(1)
    one = run()
    pool_size(3)
    seen = _spy_threads(monkeypatch)
    three = run()
    assert len(seen) >= 2
    _assert_same_bits(one, three, np.float32, spec)


@pytest.mark.parametrize("bias,relu", [(True, True), (True, False), (False, True)])
def test_fused_bias_relu_is_the_whole_array_passes_at_one_and_two_threads(bias, relu, pool_size, monkeypatch):
    """The fused convolution's epilogue (kernels/fusion.bias_relu, image by image on the pool):
    the bits of ``y += bias`` then ``max(y, 0)`` over the whole array, at 1 and 2 threads."""
    from minicaffe.kernels import fusion
    rng = np.random.default_rng(6)
    y = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32) if bias else None
    want = y.copy()
    if bias:
        want += b.reshape(1, -1, 1, 1)
    if relu:
        np.maximum(want, 0, out=want)

    def run():
        got = y.copy()
        fusion.bias_relu(got, b, relu)
        return [got]
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, np.float32, "bias_relu")
    _assert_same_bits(one, [want], np.float32, "bias_relu against the whole-array passes")


@pytest.mark.parametrize("bottoms, param", [
    ("abc", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }"),
    ("ab", ""),             # two bottoms, plain sum: the compiled pass (compiled.convolution_epilogue)
])
def test_fused_eltwise_sum_relu_bit_identical_at_two_threads(bottoms, param, pool_size, monkeypatch):
    """Eltwise SUM (with coefficients, or two bottoms plainly) + ReLU fused in a TEST net, in flat
    chunks on the pool: the same bits at 1 and 2 threads as the layers run one by one, signed
    zeros and NaN included."""
    import minicaffe as caffe
    text = "".join(f'input: "{k}" input_shape {{ dim: 2 dim: 3 dim: 8 dim: 8 }}\n' for k in bottoms) + f"""
    layer {{ name: "sum" type: "Eltwise" {" ".join(f'bottom: "{k}"' for k in bottoms)} top: "s" {param} }}
    layer {{ name: "relu" type: "ReLU" bottom: "s" top: "s" }}
    """
    rng = np.random.default_rng(7)
    xs = {k: rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for k in bottoms}
    xs[bottoms[0]].reshape(-1)[::17] = -0.0
    xs[bottoms[1]].reshape(-1)[::17] = -0.0         # -0 + -0 = -0, which the ReLU makes +0
    xs[bottoms[0]].reshape(-1)[5::41] = np.nan

    from minicaffe.formats.prototxt import parse_text
    from minicaffe.proto import caffe_pb2

    def run(fused=True):
        net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
        assert net._fusion is not None and len(net._fusion) == 1
        if not fused:
            net._fusion = None
        out = net.forward(**xs)["s"]
        return [out.copy()]
    from minicaffe.kernels import compiled, fusion
    asked = []
    real_get = compiled.get
    monkeypatch.setattr(fusion.compiled, "get", lambda fn: asked.append(fn.__name__) or real_get(fn))
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same_bits(one, two, np.float32, "fused Eltwise + ReLU")
    _assert_same_bits(one, run(fused=False), np.float32, "fused against the layers one by one")
    assert ("convolution_epilogue" in asked) == (bottoms == "ab" and compiled.enabled())
