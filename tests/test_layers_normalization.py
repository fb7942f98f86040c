"""BatchNorm, Scale and Bias: references, running statistics, gradients, in place, errors."""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.core.blob import Blob
from minicaffe.errors import NetError, ShapeError
from minicaffe.layers import create_layer
from minicaffe.testing import TEST, TRAIN, check_gradient, layer_param, make_layer


def f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


def per_channel_stats(x):
    """Mean and biased variance per channel (axis 1) by an explicit loop over channels."""
    c = x.shape[1] if x.ndim > 1 else 1
    xs = x.reshape(x.shape[0], c, -1)
    mean = np.array([xs[:, i].mean() for i in range(c)])
    var = np.array([((xs[:, i] - mean[i]) ** 2).mean() for i in range(c)])
    return mean, var


def normalise(x, mean, var, eps):
    c = x.shape[1] if x.ndim > 1 else 1
    shape = (1, c) + (1,) * (x.ndim - 2) if x.ndim > 1 else (1,)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


# --- BatchNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 5), (3, 2, 3, 2, 2)])
def test_batchnorm_train_normalises_with_batch_statistics(shape):
    x = np.random.RandomState(0).randn(*shape) * 3 + 1.5
    layer, bottom, top = make_layer('type: "BatchNorm"', [x], phase=TRAIN)
    assert layer.use_global_stats is False
    layer.forward(bottom, top)
    xf = f32(x)
    mean, var = per_channel_stats(xf)
    eps = float(np.float32(1e-5))
    np.testing.assert_allclose(top[0].data, normalise(xf, mean, var, eps), rtol=2e-5, atol=2e-5)
    # and the statistics Caffe stores: sums weighted by the factor, variance made unbiased
    m = x.size // shape[1]
    np.testing.assert_allclose(layer.blobs[0].data, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])


def test_batchnorm_one_axis_bottom_is_one_channel():
    x = np.random.RandomState(0).randn(7)
    layer, bottom, top = make_layer('type: "BatchNorm"', [x])
    assert layer.blobs[0].shape == (1,)
    layer.forward(bottom, top)
    xf = f32(x)
    np.testing.assert_allclose(top[0].data, (xf - xf.mean()) / np.sqrt(xf.var() + 1e-5), rtol=2e-5)
    check_gradient('type: "BatchNorm"', [x])


def test_batchnorm_running_statistics_after_two_forwards():
    rs = np.random.RandomState(1)
    x1 = rs.randn(4, 3, 2, 2) * 2 + 1
    x2 = rs.randn(4, 3, 2, 2) - 3
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }'
    layer, bottom, top = make_layer(text, [x1])
    layer.forward(bottom, top)
    bottom[0].data[...] = x2
    layer.forward(bottom, top)
    maf = float(np.float32(0.9))
    m1, v1 = per_channel_stats(f32(x1))
    m2, v2 = per_channel_stats(f32(x2))
    corr = 16 / 15
    np.testing.assert_allclose(layer.blobs[0].data, m2 + maf * m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].data, corr * v2 + maf * corr * v1, rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[2].data, [1 + maf], rtol=1e-7)

    # a TEST layer sharing these blobs normalises with blob / factor
    test_layer, tb, tt = make_layer('type: "BatchNorm"', [x2], phase=TEST)
    assert test_layer.use_global_stats is True
    for dst, src in zip(test_layer.blobs, layer.blobs):
        dst.data[...] = src.data
    test_layer.forward(tb, tt)
    mean = (m2 + maf * m1) / (1 + maf)
    var = corr * (v2 + maf * v1) / (1 + maf)
    np.testing.assert_allclose(tt[0].data, normalise(f32(x2), mean, var, 1e-5), rtol=2e-5, atol=2e-5)
    # and leaves the statistics alone
    np.testing.assert_allclose(test_layer.blobs[2].data, [1 + maf], rtol=1e-7)


def test_batchnorm_global_stats_with_zero_factor_uses_zero_statistics():
    x = np.random.RandomState(0).randn(2, 3, 2)
    layer, bottom, top = make_layer('type: "BatchNorm"', [x], phase=TEST)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, f32(x) / np.sqrt(float(np.float32(1e-5))), rtol=1e-5)


def test_batchnorm_use_global_stats_overrides_the_phase():
    x = np.random.RandomState(0).randn(3, 2, 2)
    train_global, _, _ = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [x],
                                    phase=TRAIN)
    test_batch, bottom, top = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: false }',
                                         [x], phase=TEST)
    assert train_global.use_global_stats is True and test_batch.use_global_stats is False
    test_batch.forward(bottom, top)
    mean, var = per_channel_stats(f32(x))
    np.testing.assert_allclose(top[0].data, normalise(f32(x), mean, var, 1e-5), rtol=2e-5, atol=2e-5)


def test_batchnorm_single_value_per_channel_has_no_bias_correction():
    x = np.array([[1.0, -2.0, 3.0]])  # m = 1
    layer, bottom, top = make_layer('type: "BatchNorm"', [x])
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, 0)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)
    np.testing.assert_allclose(layer.blobs[0].data, x[0])


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 4), (3, 2, 2, 1, 2)])
def test_batchnorm_gradient_batch_statistics(shape):
    x = np.random.RandomState(2).randn(*shape)
    check_gradient('type: "BatchNorm" batch_norm_param { use_global_stats: false eps: 0.001 }', [x])


def test_batchnorm_gradient_global_statistics():
    x = np.random.RandomState(2).randn(3, 4, 2, 2)

    def load(layer, bottom, top):
        layer.blobs[0].data[...] = [0.5, -1.0, 2.0, 0.0]
        layer.blobs[1].data[...] = [1.0, 4.0, 0.3, 2.0]
        layer.blobs[2].data[...] = 2.0

    # the statistics are not parameters of the objective's gradient (lr_mult 0), so bottoms only
    check_gradient('type: "BatchNorm"', [x], phase=TEST, setup_hook=load, check_params=False)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place_equals_not_in_place(phase):
    x = np.random.RandomState(3).randn(4, 3, 2, 2)
    dy = np.random.RandomState(4).randn(4, 3, 2, 2)
    results = []
    for in_place in (False, True):
        layer, bottom, top = make_layer('type: "BatchNorm"', [x], phase=phase, in_place=in_place)
        layer.blobs[0].data[...] = [1, 2, 3]
        layer.blobs[1].data[...] = [4, 5, 6]
        layer.blobs[2].data[...] = 2
        layer.forward(bottom, top)
        y = top[0].data.copy()
        # a later in-place layer (Scale, ReLU) overwrites the top before backward runs
        top[0].data[...] *= 3
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy(), [b.data.copy() for b in layer.blobs]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_backward_matches_formula_and_leaves_statistics():
    x = np.random.RandomState(5).randn(3, 2, 4)
    dy = np.random.RandomState(6).randn(3, 2, 4)
    layer, bottom, top = make_layer('type: "BatchNorm"', [x])
    layer.forward(bottom, top)
    stats = [b.data.copy() for b in layer.blobs]
    top[0].diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True], bottom)
    xf, g = f32(x), f32(dy)
    mean, var = per_channel_stats(xf)
    y = normalise(xf, mean, var, float(np.float32(1e-5)))
    expect = np.empty_like(xf)
    for c in range(2):
        gc, yc = g[:, c], y[:, c]
        expect[:, c] = (gc - gc.mean() - (gc * yc).mean() * yc) / np.sqrt(var[c] + float(np.float32(1e-5)))
    np.testing.assert_allclose(bottom[0].diff, expect, rtol=1e-4, atol=1e-5)
    for b, s in zip(layer.blobs, stats):
        np.testing.assert_array_equal(b.data, s)
        np.testing.assert_array_equal(b.diff, 0)


def test_batchnorm_statistics_are_fixed_parameters():
    from minicaffe.layers.normalization import BatchNorm
    assert BatchNorm.fixed_params is True
    layer, _, _ = make_layer('type: "BatchNorm"', [np.ones((2, 3))])
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    # as Caffe, the layer pins lr_mult 0 on its three blobs
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    layer, _, _ = make_layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 }',
                             [np.ones((2, 3))])
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]


def test_batchnorm_learnable_statistics_are_an_error():
    with pytest.raises(NetError, match=r"layer 'bn' \(BatchNorm\): param \{ lr_mult: 1 \}.*must be 0"):
        make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', [np.ones((2, 3))])


def test_batchnorm_channel_mismatch_is_an_error():
    layer, bottom, top = make_layer('name: "bn" type: "BatchNorm"', [np.ones((2, 3, 2))])
    bottom[0].reshape(2, 4, 2)
    with pytest.raises(ShapeError, match=r"layer 'bn' \(BatchNorm\): bottom has 4 channels.*3"):
        layer.reshape(bottom, top)
    # the batch and spatial sizes may change
    bottom[0].reshape(5, 3, 7, 1)
    layer.reshape(bottom, top)
    assert top[0].shape == (5, 3, 7, 1)


def test_batchnorm_loaded_blobs_of_the_wrong_size_are_an_error():
    layer = create_layer(layer_param('name: "bn" type: "BatchNorm"'), TRAIN)
    layer.blobs = [Blob((4,)), Blob((4,)), Blob((1,))]
    b = Blob((2, 3))
    with pytest.raises(ShapeError, match=r"layer 'bn' \(BatchNorm\): needs 3 blobs.*\[4, 4, 1\]"):
        layer.setup([b], [Blob()])
    # Caffe's legacy 4-D shapes are accepted
    layer = create_layer(layer_param('name: "bn" type: "BatchNorm"'), TEST)
    layer.blobs = [Blob((1, 1, 1, 3)), Blob((1, 1, 1, 3)), Blob((1, 1, 1, 1))]
    for blob, v in zip(layer.blobs, ([1, 2, 3], [4, 4, 4], [2])):
        blob.data[...] = np.reshape(v, blob.shape)
    b.data[...] = [[1, 2, 3], [3, 2, 1]]
    top = [Blob()]
    layer.setup([b], top)
    layer.reshape([b], top)
    layer.forward([b], top)
    np.testing.assert_allclose(top[0].data, (b.data - [0.5, 1, 1.5]) / np.sqrt(2 + 1e-5), rtol=1e-5)


def test_batchnorm_float32_buffers():
    layer, bottom, top = make_layer('type: "BatchNorm"', [np.random.RandomState(0).randn(4, 3)])
    layer.forward(bottom, top)
    assert layer._x_centred.dtype == np.float32 and layer._inv_std.dtype == np.float32
    assert all(b.xdata.dtype == np.float32 for b in layer.blobs)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_gpu_matches_cpu(gpu, phase):
    x = np.random.RandomState(0).randn(4, 3, 5, 5) * 2 + 1
    dy = np.random.RandomState(1).randn(*x.shape)

    def go(in_place):
        layer, bottom, top = make_layer('type: "BatchNorm"', [x], phase=phase, in_place=in_place)
        layer.blobs[0].data[...] = [1, 2, 3]
        layer.blobs[1].data[...] = [4, 5, 6]
        layer.blobs[2].data[...] = 2
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        return y, bottom[0].diff.copy(), [b.data.copy() for b in layer.blobs]

    backend.set_mode_cpu()
    ref = go(False)
    backend.set_mode_gpu()
    for in_place in (False, True):
        got = go(in_place)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-5)
        for a, b in zip(got[2], ref[2]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- Scale and Bias ----------------------------------------------------------------------------
def naive_broadcast(x, s, axis, op):
    """Apply op(x[i], s[j]) element by element, j being i's index on axes axis..axis+s.ndim."""
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        j = idx[axis:axis + s.ndim]
        out[idx] = op(x[idx], s[j])
    return out


SCALE_PARAM_CASES = [
    # (scale_param text, bottom shape, expected blob shape, axis for the reference)
    ("", (2, 3, 4, 2), (3,), 1),
    ("axis: 0 num_axes: 2", (2, 3, 4, 2), (2, 3), 0),
    ("axis: 2 num_axes: 2", (2, 3, 4, 2), (4, 2), 2),
    ("axis: -1", (2, 3, 4, 2), (2,), 3),
    ("axis: 1 num_axes: -1", (2, 3, 4, 2), (3, 4, 2), 1),
    ("num_axes: 0", (2, 3, 4, 2), (), 0),
    ("axis: 0 num_axes: -1", (2, 3), (2, 3), 0),
]


@pytest.mark.parametrize("sp,shape,blob_shape,axis", SCALE_PARAM_CASES)
def test_scale_with_a_learned_blob_matches_loops(sp, shape, blob_shape, axis):
    x = np.random.RandomState(0).randn(*shape)
    text = f'type: "Scale" scale_param {{ {sp} filler {{ type: "gaussian" }} bias_term: true ' \
           f'bias_filler {{ type: "uniform" min: -1 max: 1 }} }}'
    layer, bottom, top = make_layer(text, [x])
    assert [b.shape for b in layer.blobs] == [blob_shape, blob_shape]
    layer.forward(bottom, top)
    s, b = f32(layer.blobs[0].data), f32(layer.blobs[1].data)
    expect = naive_broadcast(naive_broadcast(f32(x), s, axis, lambda u, v: u * v), b, axis,
                             lambda u, v: u + v)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-6, atol=1e-6)


def test_scale_default_filler_is_one_and_bias_zero():
    x = np.random.RandomState(0).randn(2, 3, 2)
    layer, bottom, top = make_layer('type: "Scale" scale_param { bias_term: true }', [x])
    np.testing.assert_array_equal(layer.blobs[0].data, 1)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, x.astype(np.float32))


SCALE_BOTTOM_CASES = [
    # (scale_param text, bottom[0] shape, bottom[1] shape, axis for the reference)
    ("", (2, 3, 4, 2), (3,), 1),
    ("", (2, 3, 4, 2), (3, 4), 1),
    ("axis: 0", (2, 3, 4, 2), (2, 3, 4, 2), 0),       # element-wise
    ("axis: 0", (2, 3, 4, 2), (2, 3), 0),
    ("axis: 2", (2, 3, 4, 2), (4, 2), 2),
    ("axis: -2", (2, 3, 4, 2), (4,), 2),
    ("axis: 2", (2, 3, 4, 2), (), 0),                 # a scalar ignores the axis
]


@pytest.mark.parametrize("sp,shape0,shape1,axis", SCALE_BOTTOM_CASES)
def test_scale_from_a_second_bottom_matches_loops(sp, shape0, shape1, axis):
    rs = np.random.RandomState(1)
    x, s = rs.randn(*shape0), rs.randn(*shape1)
    layer, bottom, top = make_layer(f'type: "Scale" scale_param {{ {sp} }}', [x, s])
    assert layer.blobs == []
    layer.forward(bottom, top)
    expect = naive_broadcast(f32(x), f32(s), axis, lambda u, v: u * v)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-6)


@pytest.mark.parametrize("sp,shape,blob_shape,axis", SCALE_PARAM_CASES)
def test_scale_gradient_one_bottom(sp, shape, blob_shape, axis):
    x = np.random.RandomState(2).randn(*shape)
    for bias in ("false", "true"):
        check_gradient(f'type: "Scale" scale_param {{ {sp} bias_term: {bias} filler {{ type: "gaussian" }} '
                       f'bias_filler {{ type: "gaussian" }} }}', [x])


@pytest.mark.parametrize("sp,shape0,shape1,axis", SCALE_BOTTOM_CASES)
def test_scale_gradient_two_bottoms(sp, shape0, shape1, axis):
    rs = np.random.RandomState(3)
    bottoms = [rs.randn(*shape0), rs.randn(*shape1)]
    check_gradient(f'type: "Scale" scale_param {{ {sp} }}', bottoms)
    layer, _, _ = make_layer(f'type: "Scale" scale_param {{ {sp} bias_term: true }}', bottoms)
    assert [b.shape for b in layer.blobs] == [shape1]
    check_gradient(f'type: "Scale" scale_param {{ {sp} bias_term: true bias_filler {{ type: "gaussian" }} }}',
                   bottoms)


def _scale_run(text, bottoms, dy, in_place, seed=4):
    backend.set_random_seed(seed)
    layer, bottom, top = make_layer(text, bottoms, in_place=in_place)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    for b in layer.blobs:
        b.diff[...] = 0
    top[0].diff[...] = dy
    layer.backward(top, [True] * len(bottom), bottom)
    return [y] + [b.diff.copy() for b in bottom] + [b.diff.copy() for b in layer.blobs]


@pytest.mark.parametrize("text,shape1", [
    ('type: "Scale" scale_param { filler { type: "gaussian" } bias_term: true '
     'bias_filler { type: "gaussian" } }', None),
    ('type: "Scale" scale_param { axis: 0 num_axes: 2 filler { type: "gaussian" } }', None),
    ('type: "Scale"', (3, 4)),
    ('type: "Scale" scale_param { bias_term: true bias_filler { type: "gaussian" } }', (3,)),
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', None),
    ('type: "Bias"', (3, 4)),
])
def test_scale_and_bias_in_place_equal_not_in_place(text, shape1):
    rs = np.random.RandomState(5)
    bottoms = [rs.randn(2, 3, 4, 2)] + ([rs.randn(*shape1)] if shape1 else [])
    dy = rs.randn(2, 3, 4, 2)
    a = _scale_run(text, bottoms, dy, in_place=False)
    b = _scale_run(text, bottoms, dy, in_place=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_scale_param_gradient_accumulates_and_second_bottom_gradient_overwrites():
    rs = np.random.RandomState(6)
    x, dy = rs.randn(2, 3, 2), rs.randn(2, 3, 2)
    layer, bottom, top = make_layer('type: "Scale" scale_param { bias_term: true }', [x])
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 1
    layer.backward(top, [True], bottom)
    xf, g = f32(x), f32(dy)
    np.testing.assert_allclose(layer.blobs[0].diff, 1 + (g * xf).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, 1 + g.sum(axis=(0, 2)), rtol=1e-5)
    layer.param_propagate_down = [False, False]
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 1 + (g * xf).sum(axis=(0, 2)), rtol=1e-5)

    s = rs.randn(3)
    layer, bottom, top = make_layer('type: "Scale"', [x, s])
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    bottom[1].diff[...] = 100
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[1].diff, (g * xf).sum(axis=(0, 2)), rtol=1e-5)
    bottom[1].diff[...] = 100
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[1].diff, 100)


@pytest.mark.parametrize("sp,shape,blob_shape,axis", SCALE_PARAM_CASES)
def test_bias_with_a_learned_blob(sp, shape, blob_shape, axis):
    x = np.random.RandomState(7).randn(*shape)
    text = f'type: "Bias" bias_param {{ {sp} filler {{ type: "gaussian" }} }}'
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == blob_shape
    layer.forward(bottom, top)
    expect = naive_broadcast(f32(x), f32(layer.blobs[0].data), axis, lambda u, v: u + v)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-6, atol=1e-6)
    check_gradient(text, [x])


@pytest.mark.parametrize("sp,shape0,shape1,axis", SCALE_BOTTOM_CASES)
def test_bias_from_a_second_bottom(sp, shape0, shape1, axis):
    rs = np.random.RandomState(8)
    x, b = rs.randn(*shape0), rs.randn(*shape1)
    text = f'type: "Bias" bias_param {{ {sp} }}'
    layer, bottom, top = make_layer(text, [x, b])
    layer.forward(bottom, top)
    expect = naive_broadcast(f32(x), f32(b), axis, lambda u, v: u + v)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-6, atol=1e-7)
    check_gradient(text, [x, b])


def test_bias_default_filler_is_zero():
    layer, bottom, top = make_layer('type: "Bias"', [np.ones((2, 3))])
    np.testing.assert_array_equal(layer.blobs[0].data, 0)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_writes_land_in_a_non_contiguous_top(kind):
    # another layer may hand a transposed (non-contiguous) array to a blob we then write in place:
    # the blob stores it contiguous, so writes through reshaped views land
    x = np.random.RandomState(9).randn(3, 2)
    p = "scale_param" if kind == "Scale" else "bias_param"
    layer, bottom, top = make_layer(f'type: "{kind}" {p} {{ filler {{ type: "gaussian" }} }}', [x],
                                    in_place=True)
    ref_layer, rb, rt = make_layer(f'type: "{kind}"', [x])
    ref_layer.blobs[0].data[...] = layer.blobs[0].data
    ref_layer.forward(rb, rt)
    bottom[0].xdata = np.ascontiguousarray(x.T.astype(np.float32)).T
    assert bottom[0].xdata.flags.c_contiguous
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, rt[0].data)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_scale_and_bias_shape_errors(kind):
    p = "scale_param" if kind == "Scale" else "bias_param"
    x = np.ones((2, 3, 4))
    with pytest.raises(ShapeError, match=rf"layer 'sb' \({kind}\): axis 3 is out of range"):
        make_layer(f'name: "sb" type: "{kind}" {p} {{ axis: 3 }}', [x])
    with pytest.raises(ShapeError, match=r"axis -4 is out of range"):
        make_layer(f'name: "sb" type: "{kind}" {p} {{ axis: -4 }}', [x])
    with pytest.raises(NetError, match=r"num_axes must be non-negative, or -1.*got -2"):
        make_layer(f'name: "sb" type: "{kind}" {p} {{ num_axes: -2 }}', [x])
    with pytest.raises(ShapeError, match=r"extends past bottom\[0\]'s shape \(2, 3, 4\)"):
        make_layer(f'name: "sb" type: "{kind}" {p} {{ axis: 1 num_axes: 3 }}', [x])
    with pytest.raises(ShapeError, match=r"shape \(4,\) does not match bottom\[0\] shape \(2, 3, 4\) "
                                         r"from axis 1"):
        make_layer(f'name: "sb" type: "{kind}"', [x, np.ones(4)])
    with pytest.raises(ShapeError, match=r"shape \(3, 4, 1\) does not match"):
        make_layer(f'name: "sb" type: "{kind}"', [x, np.ones((3, 4, 1))])
    # a learned blob that no longer fits a reshaped bottom
    layer, bottom, top = make_layer(f'name: "sb" type: "{kind}"', [x])
    bottom[0].reshape(2, 5, 4)
    with pytest.raises(ShapeError, match=r"shape \(3,\) does not match bottom\[0\] shape \(2, 5, 4\)"):
        layer.reshape(bottom, top)
    with pytest.raises(NetError, match="at most 2 bottom"):
        make_layer(f'type: "{kind}"', [x, x, x])


def test_scale_wrong_number_of_loaded_blobs_is_an_error():
    layer = create_layer(layer_param('name: "sc" type: "Scale"'), TRAIN)
    layer.blobs = [Blob((3,)), Blob((3,))]
    with pytest.raises(NetError, match=r"layer 'sc' \(Scale\): expects 1 parameter blob\(s\).*got 2"):
        layer.setup([Blob((2, 3))], [Blob()])


def test_scale_in_place_without_a_kept_input_refuses_a_scale_gradient():
    # the input is only copied when forward knows the scale's gradient will be wanted
    x = np.random.RandomState(0).randn(2, 3)
    layer, bottom, top = make_layer('name: "sc" type: "Scale"', [x], in_place=True)
    layer.param_propagate_down = [False]
    layer.forward(bottom, top)
    layer.param_propagate_down = [True]
    with pytest.raises(NetError, match="the input was not kept"):
        layer.backward(top, [True], bottom)


@pytest.mark.parametrize("text,shape1", [
    ('type: "Scale" scale_param { filler { type: "gaussian" } bias_term: true '
     'bias_filler { type: "gaussian" } }', None),
    ('type: "Scale" scale_param { bias_term: true bias_filler { type: "gaussian" } }', (3, 4)),
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', None),
    ('type: "Bias"', (3,)),
])
def test_scale_and_bias_gpu_match_cpu(gpu, text, shape1):
    rs = np.random.RandomState(5)
    bottoms = [rs.randn(2, 3, 4, 2)] + ([rs.randn(*shape1)] if shape1 else [])
    dy = rs.randn(2, 3, 4, 2)
    backend.set_mode_cpu()
    ref = _scale_run(text, bottoms, dy, in_place=False)
    backend.set_mode_gpu()
    for in_place in (False, True):
        got = _scale_run(text, bottoms, dy, in_place=in_place)
        for u, v in zip(got, ref):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_channel_sums_by_einsum_are_float32_close_and_independent_of_the_chunk():
    """BatchNorm's and Scale's per-channel sums (einsum on NumPy) over ResNet-long rows: within
    float32 rounding of the float64 sums, and each channel's bits the same whether its chunk holds
    two channels or all of them (what keeps the bits at any thread count)."""
    from minicaffe.layers.normalization import _channel_mean
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 6, 3136)) * 3 + 1).astype(np.float32)
    b = rng.standard_normal((3, 6, 3136)).astype(np.float32)
    whole_mean, whole_dot = _channel_mean(np, a), _channel_mean(np, a, b, divide=False)
    assert whole_mean.dtype == np.float32 and whole_dot.dtype == np.float32
    np.testing.assert_allclose(whole_mean, a.astype(np.float64).mean(axis=(0, 2)), rtol=0, atol=1e-5)
    exact_dot = (a.astype(np.float64) * b).sum(axis=(0, 2))
    np.testing.assert_allclose(whole_dot, exact_dot, rtol=0, atol=1e-6 * np.abs(a * b).sum())
    for c0, c1 in ((0, 2), (2, 4), (4, 6), (0, 4), (2, 6)):
        assert np.array_equal(_channel_mean(np, a[:, c0:c1]), whole_mean[c0:c1])
        assert np.array_equal(_channel_mean(np, a[:, c0:c1], b[:, c0:c1], divide=False),
                              whole_dot[c0:c1])
