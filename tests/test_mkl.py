"""core/mkl.py and core/blas.py's ``matmul``: the CPU engines' GEMMs through MKL where the optional
``mkl`` package is installed.

The dispatch (which operands go to MKL, their transpose flags and leading dimensions, stacks, the
split of a large product over the pool, beta) is tested everywhere with a stand-in GEMM that reads
the pointers it is given as a CBLAS row-major ?gemm would; the real MKL is tested where it is
installed (``pip install "minicaffe[mkl]"``), skipped otherwise.
"""
import ctypes
import dataclasses
import os

import numpy as np
import pytest

from minicaffe.core import blas, context, mkl, threads
from test_blas import operands

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _matrix(ptr, dtype, rows, cols, ld):
    """The (rows, cols) matrix at address ``ptr`` whose rows are ``ld`` elements apart."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype)
    ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), shape=((rows - 1) * ld + cols,))
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (ld * flat.itemsize, flat.itemsize))


class StandInGemm:
    """A CBLAS ?gemm over raw pointers, in NumPy (float64 sums), recording its calls."""

    def __init__(self, dtype):
        self.dtype, self.calls = np.dtype(dtype), []

    def __call__(self, order, ta, tb, m, n, k, alpha, pa, lda, pb, ldb, beta, pc, ldc):
        assert order == _ROW_MAJOR and ta in (_NO_TRANS, _TRANS) and tb in (_NO_TRANS, _TRANS)
        assert lda >= max(1, k if ta == _NO_TRANS else m) and ldb >= max(1, n if tb == _NO_TRANS else k)
        assert ldc >= max(1, n)
        a = _matrix(pa, self.dtype, m, k, lda) if ta == _NO_TRANS else _matrix(pa, self.dtype, k, m, lda).T
        b = _matrix(pb, self.dtype, k, n, ldb) if tb == _NO_TRANS else _matrix(pb, self.dtype, n, k, ldb).T
        c = _matrix(pc, self.dtype, m, n, ldc)
        product = alpha * (a.astype(np.float64) @ b.astype(np.float64))
        # beta = 0: C is not read (BLAS's rule: NaN or garbage there does not matter)
        c[...] = (product if beta == 0 else product + beta * c).astype(self.dtype)
        self.calls.append((m, n, k))


@pytest.fixture
def stand_in(monkeypatch):
    """MKL replaced by StandInGemm for both float types; yields {dtype: the stand-in}."""
    gemms = {np.dtype(np.float32): StandInGemm(np.float32), np.dtype(np.float64): StandInGemm(np.float64)}
    monkeypatch.setattr(mkl, "gemms", lambda: gemms)
    yield gemms


@pytest.fixture
def pool(monkeypatch):
    """``pool(n)``: the kernels' pool at ``n`` threads for the rest of the test."""
    ctx = context.current()
    saved = ctx.switches

    def set_(n):
        ctx.switches = dataclasses.replace(saved, threads=str(n))
    yield set_
    ctx.switches = saved


def _close(got, want):
    tol = 1e-5 if got.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(initial=0.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_matmul_hands_each_layout_to_the_gemm(stand_in, dtype, layout):
    """C-contiguous operands and transposes of C-contiguous ones go to the GEMM with their flags and
    leading dimensions, with and without ``out``; the product is ``np.matmul``'s."""
    rng = np.random.default_rng(1)
    a, b = operands(rng, dtype, layout)
    got = blas.matmul(a, b)
    _close(got, np.matmul(a, b))
    out = np.full((23, 31), np.nan, dtype)
    assert blas.matmul(a, b, out=out) is out
    _close(out, np.matmul(a, b))
    assert len(stand_in[np.dtype(dtype)].calls) == 2


def test_matmul_takes_blocks_of_rows_and_columns(stand_in):
    """Views with a row (or column) step longer than their width keep their leading dimension: a
    block of columns of a wider matrix, a group's rows of stacked weights, an output written into
    a column block of a larger array."""
    rng = np.random.default_rng(2)
    big_a = rng.standard_normal((30, 50)).astype(np.float32)
    big_b = rng.standard_normal((45, 70)).astype(np.float32)
    a, b = big_a[3:20, 5:45], big_b[2:42, 10:60]
    out_big = np.zeros((25, 80), np.float32)
    out = out_big[4:21, 7:57]
    blas.matmul(a, b, out=out)
    _close(out, a @ b)
    assert not out_big[:4].any() and not out_big[:, :7].any() and not out_big[:, 57:].any()
    _close(blas.matmul(big_a[:, 5:45].T[:, 3:20].T, big_b[2:42].T[10:60].T), big_a[3:20, 5:45] @ big_b[2:42, 10:60])
    assert len(stand_in[np.dtype(np.float32)].calls) == 2


@pytest.mark.parametrize("shapes", [((4, 6, 5), (4, 5, 7)), ((6, 5), (4, 5, 7)), ((4, 6, 5), (5, 7)),
                                    ((1, 6, 5), (4, 5, 7)), ((4, 6, 5), (1, 5, 7)), ((0, 6, 5), (0, 5, 7))])
def test_matmul_runs_stacks_a_gemm_a_matrix(stand_in, pool, shapes):
    """3-D stacks (one side may be 2-D, or a stack of one, broadcast): a GEMM per matrix, side by
    side on the pool, the result ``np.matmul``'s."""
    pool(2)
    rng = np.random.default_rng(3)
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = rng.standard_normal(shapes[1]).astype(np.float32)
    want = np.matmul(a, b)
    got = blas.matmul(a, b)
    assert got.shape == want.shape
    _close(got, want)
    out = np.empty(want.shape, np.float32)
    blas.matmul(a, b, out=out)
    _close(out, want)
    assert len(stand_in[np.dtype(np.float32)].calls) == 2 * want.shape[0]


@pytest.mark.parametrize("case", ["dtypes", "4d", "overlap", "strided", "ints", "mismatch"])
def test_matmul_leaves_to_numpy_what_the_gemm_does_not_take(stand_in, case):
    """Mixed dtypes, 4-D stacks, an ``out`` that overlaps an operand, operands with no unit stride
    and integer arrays go to ``np.matmul``, with its result (or its error, for shapes that do not
    fit); the stand-in is never called."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 8)).astype(np.float32)
    b = rng.standard_normal((8, 5)).astype(np.float32)
    if case == "dtypes":
        _close(blas.matmul(a, b.astype(np.float64)), a @ b.astype(np.float64))
    elif case == "4d":
        a4 = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
        _close(blas.matmul(a4, b), np.matmul(a4, b))
    elif case == "overlap":
        sq = rng.standard_normal((8, 8)).astype(np.float32)
        want = sq @ sq
        blas.matmul(sq, sq, out=sq)
        _close(sq, want)
    elif case == "strided":
        wide = rng.standard_normal((6, 16)).astype(np.float32)
        _close(blas.matmul(wide[:, ::2], b), wide[:, ::2] @ b)
    elif case == "ints":
        ai = rng.integers(0, 5, (6, 8))
        assert np.array_equal(blas.matmul(ai, ai.T), ai @ ai.T)
    else:
        with pytest.raises(ValueError):
            blas.matmul(a, a)
    assert not any(g.calls for g in stand_in.values())


def test_a_large_product_is_split_over_the_pool_and_a_chunks_is_not(stand_in, pool, monkeypatch):
    """Outside the pool a product of SPLIT_MIN_WORK multiply-adds or more goes in a part per pool
    thread, along its longer side; inside a pool chunk (an image's GEMM) it runs whole."""
    pool(2)
    monkeypatch.setattr(blas, "SPLIT_MIN_WORK", 1000)
    rng = np.random.default_rng(5)
    calls = stand_in[np.dtype(np.float32)].calls
    for m, n in ((20, 60), (60, 20)):
        a = rng.standard_normal((m, 30)).astype(np.float32)
        b = rng.standard_normal((30, n)).astype(np.float32)
        calls.clear()
        _close(blas.matmul(a, b), a @ b)
        assert sorted(calls) == ([(20, 30, 30)] * 2 if n > m else [(30, 20, 30)] * 2)
    calls.clear()
    got = {}
    threads.parallel_for(2, lambda i0, i1: got.update({i: blas.matmul(a, b) for i in range(i0, i1)}), work=None)
    assert sorted(calls) == [(60, 20, 30)] * 2
    _close(got[0], a @ b)


def test_add_product_goes_to_mkl_first(stand_in):
    """``add_product`` (beta = 1) through MKL where it is there, whatever NumPy's BLAS is."""
    rng = np.random.default_rng(6)
    a, b = operands(rng, np.float32, "nt")
    out = rng.standard_normal((23, 31)).astype(np.float32)
    want = out + a @ b
    assert blas.adds_products(a, out)
    assert blas.add_product(a, b, out)
    _close(out, want)
    assert stand_in[np.dtype(np.float32)].calls == [(23, 31, 40)]


def test_the_switch_turns_mkl_off(monkeypatch):
    """``MINICAFFE_MKL=0``: no MKL GEMMs, installed or not; ``matmul`` is then NumPy's."""
    assert not context.Switches.from_environ({context.MKL_VAR: "0"}).mkl
    assert context.Switches.from_environ({}).mkl
    ctx = context.current()
    saved = ctx.switches
    ctx.switches = dataclasses.replace(saved, mkl=False)
    try:
        assert mkl.gemms() == {} and mkl.library_path() is None
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        assert np.array_equal(blas.matmul(a, a.T), a @ a.T)
    finally:
        ctx.switches = saved


_REAL = pytest.mark.skipif(not mkl.gemms(), reason="the mkl package is not installed (pip install minicaffe[mkl])")


@_REAL
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_real_mkl_agrees_with_numpy_and_not_with_the_thread_count(pool, dtype):
    """MKL's products of the nets' GEMM shapes (1x1 convolutions, im2col columns, a fully connected
    layer's data gradient) agree with NumPy's to rounding, and a product split over two pool
    threads has the bits of the product computed whole at one."""
    rng = np.random.default_rng(8)
    for m, k, n in ((256, 64, 3136), (64, 256, 3136), (96, 363, 3025), (32, 4096, 1024), (512, 4608, 49)):
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        pool(1)
        one = blas.matmul(a, b)
        pool(2)
        two = blas.matmul(a, b)
        assert one.tobytes() == two.tobytes(), (m, k, n)
        want = a.astype(np.float64) @ b.astype(np.float64)
        scale = np.abs(want).max()
        assert np.abs(one - want).max() <= (1e-5 if dtype == np.float32 else 1e-13) * scale * np.sqrt(k)


def test_warm_up_loads_each_float_type(stand_in):
    """``mkl.warm_up``: a small product in each float type where MKL is in use (a benchmark then
    counts its libraries with the imports); False, running nothing, where it is not."""
    assert mkl.warm_up()
    assert all(g.calls == [(64, 64, 64)] for g in stand_in.values())


def test_warm_up_without_mkl_does_nothing(monkeypatch):
    monkeypatch.setattr(mkl, "gemms", lambda: {})
    assert not mkl.warm_up()


def test_mkl_loads_where_ci_requires_it():
    """.ci/run's MKL leg sets MINICAFFE_REQUIRE_MKL=1 in a venv with the mkl extra: there the real
    MKL must load, so its cases above ran instead of skipping."""
    if os.environ.get("MINICAFFE_REQUIRE_MKL") != "1":
        pytest.skip("MINICAFFE_REQUIRE_MKL is not set (only .ci/run's MKL leg requires MKL)")
    assert mkl.gemms() and mkl.library_path(), "the mkl package is installed here but MKL did not load"
