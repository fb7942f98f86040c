"""The fast paths taken for speed compute what the general paths compute.

Inference (TEST phase) MAX pooling skips the argmax, and a backward pass after it must still route
the gradient to the first maximum; InnerProduct's weight gradient is accumulated band by band;
Split and Concat write gradients into the bottoms' own arrays. (The convolution engines' fast
paths are checked against the reference in test_conv_engines.py.)
"""
import numpy as np
import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.testing import forward, make_layer


@pytest.mark.parametrize("spec", ["kernel_size: 3 stride: 2", "kernel_size: 3 stride: 1 pad: 1",
                                  "kernel_size: 2 stride: 2", "kernel_h: 3 kernel_w: 2 stride: 2 pad: 1"])
def test_max_pooling_test_phase_backward_matches_train_phase(spec):
    rng = np.random.default_rng(0)
    # few distinct values: ties, where the first maximum must win in both phases
    x = rng.integers(-3, 3, (2, 3, 9, 8)).astype(np.float32)
    text = f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {spec} }}'
    results = []
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        layer, bottom, top = make_layer(text, [x], phase=phase)
        y = forward(layer, bottom, top)[0]
        top[0].diff[...] = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert np.abs(results[1][1]).sum() > 0


def test_inner_product_weight_gradient_in_bands_accumulates(monkeypatch):
    """The weight gradient built band by band (small scratch) adds the full product to what
    the diff already holds, for both weight layouts."""
    from minicaffe.layers import inner_product
    monkeypatch.setattr(inner_product, "WGRAD_BAND_ELEMENTS", 40)   # several bands of rows
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    for transpose in ("false", "true"):
        text = (f'type: "InnerProduct" inner_product_param {{ num_output: 7 transpose: {transpose} '
                'weight_filler { type: "gaussian" std: 0.1 } }')
        layer, bottom, top = make_layer(text, [x])
        forward(layer, bottom, top)
        dy = rng.standard_normal(top[0].shape).astype(np.float32)
        top[0].diff[...] = dy
        start = rng.standard_normal(layer.blobs[0].shape).astype(np.float32)
        layer.blobs[0].diff[...] = start
        layer.backward(top, [True], bottom)
        x2 = x.reshape(5, 12).astype(np.float64)
        product = x2.T @ dy if transpose == "true" else dy.T @ x2
        np.testing.assert_allclose(layer.blobs[0].diff, start + product, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k", [(14, 30), (40, 20000)])
def test_inner_product_forward_either_gemm_orientation(monkeypatch, m, k):
    """Small batches run ``(W @ x^T)^T`` (faster in OpenBLAS there), large ones with a long input
    ``x @ W^T``: both give the layer's product and bias, whichever the rule picks (2-8 rows of
    large weights take the compiled kernel instead: tests/test_compiled.py)."""
    from minicaffe.layers import inner_product
    rng = np.random.default_rng(3)
    x = rng.standard_normal((m, k)).astype(np.float32)
    text = ('type: "InnerProduct" inner_product_param { num_output: 6 weight_filler { type: "gaussian" '
            'std: 0.1 } bias_filler { type: "gaussian" std: 1 } }')
    picked = []
    real = inner_product._weights_first_pays
    monkeypatch.setattr(inner_product, "_weights_first_pays", lambda m, k: picked.append(real(m, k)) or picked[-1])
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T + b, rtol=1e-4, atol=1e-4)
    assert picked == [m <= 16]


@pytest.mark.parametrize("library,weights_first", [(("openblas", (0, 3, 29)), True), (("openblas", (0, 3, 31)), False),
                                                    (("mkl", None), False), ((None, None), False)])
def test_inner_product_data_gradient_orientation_follows_the_gemm_library(monkeypatch, library, weights_first):
    """The data gradient runs as ``(W^T @ dy^T)^T`` only in NumPy's OpenBLAS before 0.3.31 (small
    batches, as the forward), else as ``dy @ W``: the same gradients either way."""
    from minicaffe.core import blas
    from minicaffe.layers import inner_product
    monkeypatch.setattr(blas, "gemm_library", lambda: library)
    picked = []
    real = inner_product._data_grad_weights_first_pays
    monkeypatch.setattr(inner_product, "_data_grad_weights_first_pays",
                        lambda m, k: picked.append(real(m, k)) or picked[-1])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((14, 30)).astype(np.float32)
    text = ('type: "InnerProduct" inner_product_param { num_output: 6 weight_filler { type: "gaussian" '
            'std: 0.1 } }')
    layer, bottom, top = make_layer(text, [x])
    forward(layer, bottom, top)
    dy = rng.standard_normal((14, 6)).astype(np.float32)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    w = layer.blobs[0].data.astype(np.float64)
    np.testing.assert_allclose(bottom[0].diff, dy.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    assert picked == [weights_first]


def test_gemm_library_names_the_blas_that_matmul_runs_in():
    """MKL where core/mkl.py loaded it, else the OpenBLAS inside NumPy's package with a three-part
    version, else nothing named."""
    from minicaffe.core import blas, mkl
    name, version = blas.gemm_library()
    if mkl.gemms():
        assert (name, version) == ("mkl", None)
    elif blas._numpy_openblas() is not None:
        assert name == "openblas" and len(version) == 3 and version >= (0, 3, 0)
    else:
        assert (name, version) == (None, None)


def test_split_and_concat_write_gradients_into_the_bottoms_own_arrays():
    """Backward sums into the bottom's existing diff (no new array each iteration) and gives
    the same values every time."""
    import minicaffe as caffe
    from minicaffe.formats.prototxt import load_net_param
    text = """
    force_backward: true
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "a" type: "Convolution" bottom: "data" top: "a"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "b" type: "Convolution" bottom: "data" top: "b"
            convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
    """
    net = caffe.Net(load_net_param(text), caffe.TEST)
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)
    net.forward(data=x)
    dy = np.random.default_rng(4).standard_normal((2, 5, 4, 4)).astype(np.float32)
    first = net.backward(cat=dy)["data"]
    arrays = [net.blobs[name].diff for name in ("data", "a", "b")]
    second = net.backward(cat=dy)["data"]
    assert all(net.blobs[name].diff is arr for name, arr in zip(("data", "a", "b"), arrays))
    np.testing.assert_array_equal(first, second)
    wa = net.params["a"][0].data.reshape(2, 3)
    wb = net.params["b"][0].data.reshape(3, 3)
    expect = np.einsum("oc,nohw->nchw", wa, dy[:, :2]) + np.einsum("oc,nohw->nchw", wb, dy[:, 2:])
    np.testing.assert_allclose(second, expect, rtol=1e-5, atol=1e-5)


def _caffe_max_backward_float32(x, dy, k, s, p):
    """Caffe's MAX backward loop in float32: each output's gradient added at its window's first
    maximum, outputs in order (so overlapping windows sum in Caffe's order)."""
    n_, c_, h_, w_ = x.shape
    dx = np.zeros(x.shape, np.float32)
    for n in range(n_):
        for c in range(c_):
            for py in range(dy.shape[2]):
                for px in range(dy.shape[3]):
                    hs, ws = py * s - p, px * s - p
                    win = x[n, c, max(hs, 0):min(hs + k, h_), max(ws, 0):min(ws + k, w_)]
                    yy, xx = np.unravel_index(int(np.argmax(win)), win.shape)
                    dx[n, c, max(hs, 0) + yy, max(ws, 0) + xx] += dy[n, c, py, px]
    return dx


@pytest.mark.parametrize("spec,k,s,p", [("kernel_size: 3 stride: 2", 3, 2, 0),
                                        ("kernel_size: 3 stride: 1 pad: 1", 3, 1, 1),
                                        ("kernel_size: 2 stride: 2", 2, 2, 0),
                                        ("kernel_size: 3 stride: 2 pad: 1", 3, 2, 1)])
@pytest.mark.parametrize("kernels", [True, False])
def test_max_pooling_scatter_backward_matches_per_offset_passes_and_caffe_order(spec, k, s, p, kernels,
                                                                                monkeypatch):
    """The argmax scatter engine (the compiled scatter loop, or np.add.at over blocks of planes with
    the compiled kernels off) gives Caffe's float32 sums exactly, ties and overlapping windows
    included; the reference's per-offset passes give the same values."""
    import dataclasses
    from minicaffe.core import context
    from minicaffe.kernels import compiled, engines, pooling_engines
    if kernels and not compiled.enabled():
        pytest.skip("no compiled kernels (Numba)")
    ctx = context.current()
    monkeypatch.setattr(ctx, "switches", dataclasses.replace(ctx.switches, compiled=kernels))
    asked = []
    get = compiled.get
    monkeypatch.setattr(compiled, "get", lambda fn: asked.append(fn.__name__) or get(fn))
    rng = np.random.default_rng(6)
    x = rng.integers(-2, 2, (2, 5, 9, 11)).astype(np.float32)    # many ties
    monkeypatch.setattr(pooling_engines, "SCATTER_BLOCK_OUTPUTS", 50)    # several blocks, a ragged last one
    grads = {}
    for engine in ("scatter", "caffe"):
        layer, bottom, top = make_layer(f'type: "Pooling" pooling_param {{ pool: MAX {spec} }}', [x])
        engines.force(layer, engine)
        forward(layer, bottom, top)
        assert layer.engine_slot.name == engine
        dy = np.random.default_rng(7).standard_normal(top[0].shape).astype(np.float32)
        top[0].diff[...] = dy
        bottom[0].diff[...] = 5     # overwritten, not accumulated
        layer.backward(top, [True], bottom)
        grads[engine] = bottom[0].diff.copy()
    np.testing.assert_array_equal(grads["scatter"], _caffe_max_backward_float32(x, dy, k, s, p))
    np.testing.assert_allclose(grads["caffe"], grads["scatter"], rtol=1e-6, atol=1e-6)
    assert ("max_pool_scatter" in asked) == kernels
