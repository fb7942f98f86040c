"""InnerProduct: naive dot-product loops, axis flattening, transpose layout, gradients, errors."""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.core.blob import Blob
from minicaffe.errors import NetError, ShapeError
from minicaffe.testing import check_gradient, forward, make_layer


def ip_text(num_output, extra="", bias=True):
    return (f'name: "ip" type: "InnerProduct" inner_product_param {{ num_output: {num_output} {extra} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "uniform" min: -1 max: 1 }} }}')


def naive_ip(x, w, b, axis, transpose):
    lead = x.shape[:axis]
    m = int(np.prod(lead, dtype=np.int64))
    rows = x.reshape(m, -1)
    n_out = w.shape[1] if transpose else w.shape[0]
    y = np.zeros((m, n_out))
    for i in range(m):
        for o in range(n_out):
            acc = 0.0 if b is None else float(b[o])
            for k in range(rows.shape[1]):
                acc += float(rows[i, k]) * float(w[k, o] if transpose else w[o, k])
            y[i, o] = acc
    return y.reshape(lead + (n_out,))


CASES = [  # (input shape, extra text, axis, transpose, bias)
    ((3, 2, 3, 2), "", 1, False, True),
    ((3, 2, 3, 2), "", 1, False, False),
    ((3, 2, 3, 2), "transpose: true", 1, True, True),
    ((2, 3, 4, 2), "axis: 2", 2, False, True),
    ((2, 3, 4, 2), "axis: 2 transpose: true", 2, True, False),
    ((2, 3, 5), "axis: -1", 2, False, True),
    ((4, 6), "", 1, False, True),
]


@pytest.mark.parametrize("shape,extra,axis,transpose,bias", CASES)
def test_forward_matches_naive_loops(shape, extra, axis, transpose, bias):
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    layer, bottom, top = make_layer(ip_text(5, extra, bias), [x])
    y = forward(layer, bottom, top)[0]
    k = int(np.prod(shape[axis:]))
    assert layer.blobs[0].shape == ((k, 5) if transpose else (5, k))
    assert len(layer.blobs) == (2 if bias else 1)
    assert y.shape == tuple(shape[:axis]) + (5,)
    assert y.dtype == np.float32
    ref = naive_ip(x, layer.blobs[0].data, layer.blobs[1].data if bias else None, axis, transpose)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,extra,axis,transpose,bias", CASES)
def test_gradient(shape, extra, axis, transpose, bias):
    x = np.random.RandomState(1).randn(*shape)
    check_gradient(ip_text(4, extra, bias), [x])


def test_transpose_is_the_same_map_with_the_weight_transposed():
    x = np.random.RandomState(2).randn(4, 3, 2).astype(np.float32)
    plain, pb, pt = make_layer(ip_text(6), [x])
    trans, tb, tt = make_layer(ip_text(6, "transpose: true"), [x])
    trans.blobs[0].data[...] = plain.blobs[0].data.T
    trans.blobs[1].data[...] = plain.blobs[1].data
    np.testing.assert_allclose(forward(trans, tb, tt)[0], forward(plain, pb, pt)[0], rtol=1e-6)
    dy = np.random.RandomState(3).randn(4, 6)
    for layer, bottom, top in ((plain, pb, pt), (trans, tb, tt)):
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
    np.testing.assert_allclose(tb[0].diff, pb[0].diff, rtol=1e-5)
    np.testing.assert_allclose(trans.blobs[0].diff, plain.blobs[0].diff.T, rtol=1e-5)


def test_param_gradients_accumulate_and_flags_are_respected():
    x = np.random.RandomState(4).randn(3, 4).astype(np.float32)
    layer, bottom, top = make_layer(ip_text(2), [x])
    forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    bottom[0].diff[...] = 5.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 5.0)
    np.testing.assert_allclose(layer.blobs[0].diff, np.tile(x.sum(axis=0), (2, 1)), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, [3.0, 3.0])
    layer.param_propagate_down = [True, False]
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * np.tile(x.sum(axis=0), (2, 1)), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, [3.0, 3.0])


def test_fillers_and_batch_reshape():
    text = ('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 '
            'weight_filler { type: "constant" value: 2 } bias_filler { type: "constant" value: 0.5 } }')
    layer, bottom, top = make_layer(text, [np.ones((2, 4), np.float32)])
    np.testing.assert_allclose(forward(layer, bottom, top)[0], np.full((2, 3), 8.5))
    bottom[0].reshape(7, 2, 2)     # another batch size, same K: fine
    bottom[0].data[...] = 1.0
    assert forward(layer, bottom, top)[0].shape == (7, 3)


def test_mismatched_input_size_names_the_layer():
    layer, bottom, top = make_layer(ip_text(3), [np.zeros((2, 4, 2, 2))])
    bottom[0].reshape(2, 4, 3, 3)
    with pytest.raises(ShapeError, match=r"layer 'ip' \(InnerProduct\): input \(2, 4, 3, 3\) flattened from "
                                         r"axis 1 has K=36 features, but the weight shape is \(3, 16\)"):
        layer.reshape(bottom, top)


def test_loaded_weight_with_wrong_k_is_an_error():
    from minicaffe.layers import create_layer
    from minicaffe.testing import layer_param
    layer = create_layer(layer_param(ip_text(3, "transpose: true")), 0)
    layer.blobs = [Blob((10, 3)), Blob((3,))]
    bottom, top = [Blob((2, 12))], [Blob()]
    layer.setup(bottom, top)
    with pytest.raises(ShapeError, match=r"layer 'ip'.*K=12.*\(10, 3\).*expected \(12, 3\)"):
        layer.reshape(bottom, top)


@pytest.mark.parametrize("text,shape,match", [
    (ip_text(0), (2, 3), r"num_output must be positive"),
    (ip_text(3, "axis: 2"), (2, 3), r"axis 2 out of range for a 2-D bottom"),
])
def test_setup_errors(text, shape, match):
    with pytest.raises(NetError, match=r"layer 'ip' \(InnerProduct\): " + match):
        make_layer(text, [np.zeros(shape)])


@pytest.mark.parametrize("extra", ["", "transpose: true", "axis: 2"])
def test_cupy_matches_numpy(gpu, extra):
    x = np.random.RandomState(5).randn(3, 4, 2, 3).astype(np.float32)
    results = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        backend.set_random_seed(8)
        layer, bottom, top = make_layer(ip_text(5, extra), [x])
        y = forward(layer, bottom, top)[0]
        top[0].diff[...] = np.random.RandomState(6).randn(*y.shape)
        layer.backward(top, [True], bottom)
        results.append([y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
