"""core/blas.py: independent GEMMs side by side on the pool, BLAS at one thread while they run."""
import dataclasses
import threading

import numpy as np
import pytest

from minicaffe.core import blas, context, threads
from minicaffe.kernels import conv_engines
from minicaffe.kernels.im2col import ConvGeometry

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def pool(monkeypatch):
    """``pool(n)``: the kernels' pool has ``n`` threads, each chunk surely on a thread of its own."""
    ctx = context.current()
    saved = ctx.switches
    monkeypatch.setattr(threads, "CALLER_TAKES_OVER", False)

    def set_size(n):
        ctx.switches = dataclasses.replace(saved, threads=str(n))
    yield set_size
    ctx.switches = saved


def _blas_threads():
    return [lib.num_threads for lib in blas._controllers()]


def test_items_run_once_each_on_one_blas_thread_and_the_count_comes_back(pool):
    if not blas._controllers():
        pytest.skip("no BLAS library threadpoolctl can reach")
    pool(2)
    before = _blas_threads()
    seen, inside, names = [], [], set()
    lock = threading.Lock()

    def fn(i0, i1):
        with lock:
            seen.extend(range(i0, i1))
            inside.append(_blas_threads())
            names.add(threading.current_thread().name)
    blas.parallel_gemms(7, fn)
    assert sorted(seen) == list(range(7))
    assert len(inside) == 2 and all(set(t) == {1} for t in inside)
    assert len(names) == 2
    assert _blas_threads() == before


def test_overlapping_users_restore_only_when_the_last_ends_and_errors_restore(pool):
    if not blas._controllers():
        pytest.skip("no BLAS library threadpoolctl can reach")
    before = _blas_threads()
    with blas.one_thread():
        with blas.one_thread():
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before
    pool(2)

    def boom(i0, i1):
        raise ValueError(f"chunk {i0}")
    with pytest.raises(ValueError, match="chunk 0"):
        blas.parallel_gemms(4, boom)
    assert _blas_threads() == before


@pytest.mark.parametrize("size, items", [(1, 8), (2, 1)])
def test_one_thread_or_one_item_is_one_call_on_blas_own_threads(pool, size, items):
    pool(size)
    before = _blas_threads()
    calls = []
    blas.parallel_gemms(items, lambda i0, i1: calls.append(((i0, i1), _blas_threads())))
    assert calls == [((0, items), before)]


def test_without_a_reachable_blas_nothing_changes(pool, monkeypatch):
    pool(2)
    monkeypatch.setitem(blas._state, "controllers", [])
    calls = []
    blas.parallel_gemms(6, lambda i0, i1: calls.append((i0, i1)))
    with blas.one_thread() as limited:
        assert limited is False
    assert calls == [(0, 6)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [1, 2])
def test_1x1_images_side_by_side_give_the_batched_forward_and_each_image_is_finished_once(pool, size, stride):
    """Gemm1x1Conv.forward_images (an image's GEMM then its epilogue, images split over the pool)
    against the batched forward; the same bits on every shape we run (see core/blas.py)."""
    pool(size)
    rng = np.random.default_rng(4)
    num, cin, cout, hw = 5, 24, 40, 9
    x = rng.standard_normal((num, cin, hw, hw)).astype(np.float32)
    w = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    geom = ConvGeometry(1, 1, stride, stride, 0, 0, 1, 1)
    out_hw = ((hw - 1) // stride + 1,) * 2
    engine = conv_engines.Gemm1x1Conv(conv_engines.ConvShape(geom, 1, cin, cout, (hw, hw), out_hw, num))
    want = np.empty((num, cout) + out_hw, np.float32)
    engine.forward(x, w, y=want)
    got = np.empty_like(want)
    finished = []
    lock = threading.Lock()

    def finish(i0, i1):
        assert not np.isnan(got[i0:i1]).any()      # its GEMM already ran
        with lock:
            finished.extend(range(i0, i1))
    got[...] = np.nan
    engine.forward_images(x, w, got, finish)
    assert sorted(finished) == list(range(num))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def operands(rng, dtype, layout, m=23, k=40, n=31):
    """Random (m, k) and (k, n) GEMM operands; ``layout``'s letters say which is C-contiguous
    (``n``) and which the transpose of a C-contiguous array (``t``)."""
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    if layout[0] == "t":
        a = np.ascontiguousarray(a.T).T
    if layout[1] == "t":
        b = np.ascontiguousarray(b.T).T
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_add_product_adds_one_gemm_into_the_output(dtype, layout):
    """``add_product``: ``out += a @ b`` with either operand C-contiguous or the transpose of one, in
    NumPy's own OpenBLAS (the wheel's; skipped where NumPy carries another BLAS), or MKL where it
    is installed (core/mkl.py). K = 40 is one block of BLAS's sums, so the bits are those of the
    same BLAS's product (``blas.matmul``) added afterwards."""
    if not blas._numpy_gemms():
        pytest.skip("NumPy's BLAS is not its wheel's OpenBLAS: add_product returns False there")
    rng = np.random.default_rng(7)
    a, b = operands(rng, dtype, layout)
    out = rng.standard_normal((23, 31)).astype(dtype)
    want = out + blas.matmul(a, b)
    assert blas.add_product(a, b, out)
    assert np.array_equal(out, want)


def test_add_product_declines_what_it_cannot_run_and_leaves_the_output():
    """Strided operands, mixed or integer dtypes and a non-contiguous output return False with
    ``out`` untouched (the caller keeps its own path); a shape that does not fit is an error."""
    a, b = np.ones((4, 6), np.float32), np.ones((6, 5), np.float32)
    out = np.zeros((4, 5), np.float32)
    assert not blas.add_product(a[:, ::2], b[::2], out)
    assert not blas.add_product(a.astype(np.float64), b, out)
    assert not blas.add_product(a.astype(np.int32), b.astype(np.int32), out.astype(np.int32))
    wide = np.zeros((4, 10), np.float32)
    assert not blas.add_product(a, b, wide[:, ::2])
    assert not out.any() and not wide.any()
    with pytest.raises(ValueError, match="does not fit"):
        blas.add_product(a, b, np.zeros((4, 4), np.float32))


def test_inner_product_weight_gradient_accumulates_through_one_gemm(monkeypatch):
    """InnerProduct's weight gradient past the compiled rows (here 20 rows) is added by
    ``add_product`` where it runs, and equals the scratch-and-add path's, both adding to what the
    gradient held."""
    from minicaffe.layers import inner_product
    from minicaffe.proto import caffe_pb2
    from minicaffe.testing import make_layer
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 50)).astype(np.float32)
    dy = rng.standard_normal((20, 30)).astype(np.float32)
    start = rng.standard_normal((30, 50)).astype(np.float32)
    calls, real = [], blas.add_product
    got = {}
    for via_gemm in (True, False):
        monkeypatch.setattr(blas, "add_product", (lambda *a: calls.append(1) or real(*a)) if via_gemm
                            else (lambda *a: False))
        layer, bottom, top = make_layer('name: "ip" type: "InnerProduct" inner_product_param { num_output: 30 }',
                                        [x], phase=caffe_pb2.TRAIN)
        layer.blobs[0].diff[...] = start
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        got[via_gemm] = layer.blobs[0].diff.copy(), bottom[0].diff.copy()
    assert calls and inner_product.ROWS_KERNEL_MAX_M < 20
    np.testing.assert_allclose(got[True][0], start + dy.astype(np.float64).T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[True][0], got[False][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[True][1], got[False][1])
