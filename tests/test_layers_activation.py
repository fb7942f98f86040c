"""Neuron layers and Dropout: forward against per-element references, numerical gradients,
in place, errors."""
import math

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError
from minicaffe.testing import TEST, TRAIN, check_gradient, forward, make_layer


def away_from_zero(shape, seed=0, lo=0.05, hi=2.0):
    """Random values with |x| >= lo, so kinks at 0 stay outside the finite-difference step."""
    rs = np.random.RandomState(seed)
    mag = rs.uniform(lo, hi, shape)
    return mag * rs.choice([-1.0, 1.0], shape)


def positive(shape, seed=0, lo=0.2, hi=2.0):
    return np.random.RandomState(seed).uniform(lo, hi, shape)


def run(text, x, dy, in_place=False, phase=TRAIN, seed=11):
    """Forward then backward of one layer; returns (top data, bottom diff, param diffs)."""
    backend.set_random_seed(seed)  # the same random fillers in every run
    layer, bottom, top = make_layer(text, [x], in_place=in_place, phase=phase)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    for b in layer.blobs:
        b.diff[...] = 0
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy(), [b.diff.copy() for b in layer.blobs]


def elementwise(f, x):
    """Apply a scalar function element by element (the naive reference)."""
    return np.array([f(float(v)) for v in x.reshape(-1)]).reshape(x.shape)


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


# (prototxt, scalar reference, input maker)
FORWARD_CASES = [
    ('type: "ReLU"', lambda v: max(v, 0.0), away_from_zero),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', lambda v: v if v > 0 else 0.1 * v, away_from_zero),
    ('type: "ReLU" relu_param { negative_slope: -0.5 }', lambda v: v if v > 0 else -0.5 * v, away_from_zero),
    ('type: "Sigmoid"', _sigmoid, away_from_zero),
    ('type: "TanH"', math.tanh, away_from_zero),
    ('type: "AbsVal"', abs, away_from_zero),
    ('type: "BNLL"', lambda v: math.log1p(math.exp(v)), away_from_zero),
    ('type: "ELU"', lambda v: v if v > 0 else math.exp(v) - 1, away_from_zero),
    ('type: "ELU" elu_param { alpha: 0.3 }', lambda v: v if v > 0 else 0.3 * (math.exp(v) - 1), away_from_zero),
    ('type: "ELU" elu_param { alpha: -0.7 }', lambda v: v if v > 0 else -0.7 * (math.exp(v) - 1), away_from_zero),
    ('type: "Power"', lambda v: v, away_from_zero),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: -1 }', lambda v: (0.5 * v - 1) ** 2, away_from_zero),
    ('type: "Power" power_param { power: 3 scale: -2 }', lambda v: (-2 * v) ** 3, away_from_zero),
    ('type: "Power" power_param { power: 0.5 scale: 1.5 shift: 0.5 }', lambda v: (1.5 * v + 0.5) ** 0.5, positive),
    ('type: "Power" power_param { power: -1.5 shift: 1 }', lambda v: (v + 1) ** -1.5, positive),
    ('type: "Power" power_param { power: 1 scale: 3 shift: 2 }', lambda v: 3 * v + 2, away_from_zero),
    ('type: "Exp"', math.exp, away_from_zero),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', lambda v: 2 ** (0.5 * v + 1), away_from_zero),
    ('type: "Exp" exp_param { base: 0.5 shift: -1 }', lambda v: 0.5 ** (v - 1), away_from_zero),
    ('type: "Log"', math.log, positive),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', lambda v: math.log10(2 * v + 0.5), positive),
    ('type: "Log" log_param { base: 2 scale: -1 shift: 3 }', lambda v: math.log2(3 - v), positive),
]


@pytest.mark.parametrize("text,ref,maker", FORWARD_CASES)
def test_forward_matches_elementwise_reference(text, ref, maker):
    x = maker((2, 3, 4, 5), seed=3)
    layer, bottom, top = make_layer(text, [x])
    layer.forward(bottom, top)
    assert top[0].shape == x.shape
    assert top[0].data.dtype == np.float32
    expect = elementwise(ref, x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(top[0].data, expect, rtol=2e-6, atol=1e-6)


GRADIENT_CASES = [(text, maker) for text, _, maker in FORWARD_CASES] + [
    ('type: "PReLU"', away_from_zero),
    ('type: "PReLU" prelu_param { channel_shared: true }', away_from_zero),
    ('type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }', away_from_zero),
]


@pytest.mark.parametrize("text,maker", GRADIENT_CASES)
def test_gradient(text, maker):
    check_gradient(text, [maker((2, 3, 3, 2), seed=5)])


def test_prelu_gradient_on_2d_and_5d_bottoms():
    check_gradient('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }',
                   [away_from_zero((4, 3), seed=1)])
    check_gradient('type: "PReLU"', [away_from_zero((2, 3, 2, 2, 2), seed=2)])


IN_PLACE_CASES = [text for text, _, _ in FORWARD_CASES] + [
    'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }',
    'type: "PReLU" prelu_param { channel_shared: true }',
]


@pytest.mark.parametrize("text", IN_PLACE_CASES)
def test_in_place_equals_not_in_place(text):
    maker = positive if ("Log" in text or "0.5 scale: 1.5" in text or "-1.5" in text) else away_from_zero
    x = maker((2, 4, 3, 3), seed=7)
    dy = np.random.RandomState(8).randn(*x.shape)
    y1, dx1, p1 = run(text, x, dy)
    y2, dx2, p2 = run(text, x, dy, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(dx1, 0)


def test_relu_gradient_at_zero_is_the_negative_slope():
    x = np.array([[-1.0, 0.0, 2.0]])
    _, dx, _ = run('type: "ReLU" relu_param { negative_slope: 0.25 }', x, np.ones_like(x))
    np.testing.assert_array_equal(dx, [[0.25, 0.25, 1.0]])
    _, dx, _ = run('type: "ReLU"', x, np.ones_like(x))
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 1.0]])


def test_relu_negative_slope_in_place_keeps_the_sign_of_the_input():
    # with a negative slope the output alone cannot tell which side of 0 the input was on
    x = np.array([[-2.0, 3.0, -0.5, 0.5]])
    dy = np.array([[1.0, 2.0, 3.0, 4.0]])
    _, dx, _ = run('type: "ReLU" relu_param { negative_slope: -1 }', x, dy, in_place=True)
    np.testing.assert_array_equal(dx, [[-1.0, 2.0, -3.0, 4.0]])


def test_prelu_reference_per_channel_and_shared():
    x = away_from_zero((2, 3, 2, 2), seed=4)
    slopes = np.array([0.1, -0.2, 0.7])
    layer, bottom, top = make_layer('type: "PReLU"', [x])
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, np.full(3, 0.25, np.float32))  # default filler
    layer.blobs[0].data[...] = slopes
    layer.forward(bottom, top)
    dy = np.random.RandomState(0).randn(*x.shape)
    top[0].diff[...] = dy
    layer.blobs[0].diff[...] = 0
    layer.backward(top, [True], bottom)
    xf = x.astype(np.float32).astype(np.float64)
    expect_y = np.empty_like(xf)
    expect_dx = np.empty_like(xf)
    expect_ds = np.zeros(3)
    for n in range(2):
        for c in range(3):
            for h in range(2):
                for w in range(2):
                    v = xf[n, c, h, w]
                    g = np.float32(dy[n, c, h, w])
                    expect_y[n, c, h, w] = v if v > 0 else slopes[c] * v
                    expect_dx[n, c, h, w] = g if v > 0 else slopes[c] * g
                    if v <= 0:
                        expect_ds[c] += g * v
    np.testing.assert_allclose(top[0].data, expect_y, rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, expect_dx, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].diff, expect_ds, rtol=1e-5)

    shared, bottom, top = make_layer('type: "PReLU" prelu_param { channel_shared: true }', [x])
    assert shared.blobs[0].shape == () and shared.blobs[0].count == 1
    shared.blobs[0].data[...] = -0.3
    shared.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, np.where(xf > 0, xf, -0.3 * xf), rtol=1e-6)
    top[0].diff[...] = dy
    shared.blobs[0].diff[...] = 0
    shared.backward(top, [True], bottom)
    np.testing.assert_allclose(shared.blobs[0].diff, expect_ds.sum(), rtol=1e-5)


def test_prelu_param_gradient_accumulates_and_respects_the_flags():
    x = away_from_zero((2, 3, 2, 2), seed=4)
    dy = np.ones_like(x)
    layer, bottom, top = make_layer('type: "PReLU"', [x])
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.blobs[0].diff[...] = 0
    layer.backward(top, [True], bottom)
    once = layer.blobs[0].diff.copy()
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once, rtol=1e-6)
    layer.param_propagate_down = [False]
    bottom[0].diff[...] = 7
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once, rtol=1e-6)
    np.testing.assert_array_equal(bottom[0].diff, 7)


def test_power_special_cases():
    x = away_from_zero((2, 3), seed=1)
    dy = np.random.RandomState(2).randn(2, 3)
    # power 0: the constant 1, zero gradient
    y, dx, _ = run('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', x, dy)
    np.testing.assert_array_equal(y, 1)
    np.testing.assert_array_equal(dx, 0)
    # scale 0: the constant shift^power, zero gradient
    y, dx, _ = run('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', x, dy)
    np.testing.assert_array_equal(y, 8)
    np.testing.assert_array_equal(dx, 0)
    # power 1: affine, gradient the constant scale
    y, dx, _ = run('type: "Power" power_param { power: 1 scale: -2 shift: 0.5 }', x, dy)
    np.testing.assert_allclose(y, -2 * x.astype(np.float32) + 0.5, rtol=1e-6)
    np.testing.assert_allclose(dx, -2 * dy.astype(np.float32), rtol=1e-6)
    # a negative base with a fractional power is NaN, as C's pow gives it
    y, _, _ = run('type: "Power" power_param { power: 0.5 scale: 0 shift: -4 }', x, dy)
    assert np.isnan(y).all()


def test_power_gradient_is_finite_where_the_base_is_zero():
    # Caffe divides y by the base here (0/0); the derivative 3·base² is 0
    x = np.array([[0.0, 1.0, -2.0]])
    _, dx, _ = run('type: "Power" power_param { power: 3 }', x, np.ones_like(x))
    np.testing.assert_allclose(dx, [[0.0, 3.0, 12.0]])
    _, dx, _ = run('type: "Power" power_param { power: 3 shift: 1 }', np.array([[-1.0]]), np.ones((1, 1)))
    np.testing.assert_array_equal(dx, [[0.0]])


def test_sigmoid_and_bnll_do_not_overflow():
    x = np.array([[-200.0, -60.0, 0.0, 60.0, 200.0]])
    dy = np.ones_like(x)
    y, dx, _ = run('type: "Sigmoid"', x, dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(y, [[0, 0, 0.5, 1, 1]], atol=1e-7)
    y, dx, _ = run('type: "BNLL"', x, dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(y, [[0, math.log1p(math.exp(-60)), math.log(2), 60, 200]], rtol=1e-6)
    np.testing.assert_allclose(dx, [[0, math.exp(-60), 0.5, 1, 1]], rtol=1e-5, atol=1e-30)
    y, dx, _ = run('type: "ELU"', x, dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()


def test_float32_stays_float32():
    x = away_from_zero((2, 3), seed=1).astype(np.float32)
    for text, _, _ in FORWARD_CASES:
        layer, bottom, top = make_layer(text, [np.abs(x) + 0.5])
        layer.forward(bottom, top)
        assert top[0].xdata.dtype == np.float32, text


def test_propagate_down_false_leaves_bottom_diff():
    x = away_from_zero((2, 3), seed=1)
    for text, _, _ in FORWARD_CASES:
        layer, bottom, top = make_layer(text, [np.abs(x) + 0.5])
        layer.forward(bottom, top)
        bottom[0].diff[...] = 5
        top[0].diff[...] = 1
        layer.backward(top, [False], bottom)
        np.testing.assert_array_equal(bottom[0].diff, 5)


@pytest.mark.parametrize("text,message", [
    ('type: "Exp" exp_param { base: 0 }', "base must be strictly positive"),
    ('type: "Exp" exp_param { base: -2 }', "base must be strictly positive"),
    ('type: "Log" log_param { base: -0.5 }', "base must be strictly positive"),
    ('type: "Log" log_param { base: 1 }', "base 1"),
])
def test_bad_base_is_an_error_naming_the_layer(text, message):
    with pytest.raises(NetError, match=message) as info:
        make_layer('name: "act" ' + text, [np.ones((2, 3))])
    assert "layer 'act'" in str(info.value)


def test_prelu_errors():
    with pytest.raises(NetError, match="at least 2 axes") as info:
        make_layer('name: "pr" type: "PReLU"', [np.ones(4)])
    assert "layer 'pr' (PReLU)" in str(info.value)
    layer, bottom, top = make_layer('name: "pr" type: "PReLU"', [np.ones((2, 3))])
    # weights for another channel count (as if loaded from a different net)
    from minicaffe.core.blob import Blob
    from minicaffe.layers import create_layer
    from minicaffe.testing import layer_param
    other = create_layer(layer_param('name: "pr" type: "PReLU"'), TRAIN)
    other.blobs = [Blob((5,))]
    with pytest.raises(NetError, match="5 values but bottom has 3 channels"):
        other.setup(bottom, top)
    shared = create_layer(layer_param('name: "pr" type: "PReLU" prelu_param { channel_shared: true }'), TRAIN)
    shared.blobs = [Blob((3,))]
    with pytest.raises(NetError, match="channel_shared needs 1"):
        shared.setup(bottom, top)


def test_neuron_layers_take_one_bottom_and_one_top():
    with pytest.raises(NetError, match="exactly 1 bottom"):
        make_layer('type: "ReLU"', [np.ones((2, 2)), np.ones((2, 2))])
    with pytest.raises(NetError, match="exactly 1 top"):
        make_layer('type: "TanH"', [np.ones((2, 2))], num_top=2)


def test_reshape_follows_the_bottom():
    layer, bottom, top = make_layer('type: "ReLU"', [np.ones((2, 3))])
    bottom[0].reshape(4, 5, 6)
    bottom[0].data[...] = -1
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    assert top[0].shape == (4, 5, 6)
    np.testing.assert_array_equal(top[0].data, 0)


@pytest.mark.parametrize("text", IN_PLACE_CASES)
def test_gpu_matches_cpu(gpu, text):
    maker = positive if ("Log" in text or "0.5 scale: 1.5" in text or "-1.5" in text) else away_from_zero
    x = maker((2, 4, 3, 3), seed=7)
    dy = np.random.RandomState(8).randn(*x.shape)
    backend.set_mode_cpu()
    ref = run(text, x, dy)
    backend.set_mode_gpu()
    for in_place in (False, True):
        got = run(text, x, dy, in_place=in_place)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[2], ref[2]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_phase_does_not_matter_for_neurons():
    x = away_from_zero((3, 2), seed=9)
    a = run('type: "ELU"', x, np.ones_like(x), phase=TRAIN)
    b = run('type: "ELU"', x, np.ones_like(x), phase=TEST)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --- Dropout ---------------------------------------------------------------------------------
def forward_backward(text, x, dy, phase=TRAIN, in_place=False, seed=5):
    backend.set_random_seed(seed)
    layer, bottom, top = make_layer(text, [x], phase=phase, in_place=in_place)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy()


@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.8])
def test_dropout_train_keeps_a_fraction_and_scales(ratio):
    x = np.random.RandomState(0).uniform(0.5, 1.5, (20, 50, 10)).astype(np.float32)
    layer, bottom, top = make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x])
    layer.forward(bottom, top)
    y = top[0].data
    kept = y != 0
    n = x.size
    frac = kept.mean()
    # binomial: 5 standard deviations
    assert abs(frac - (1 - ratio)) < 5 * np.sqrt(ratio * (1 - ratio) / n)
    scale = np.float32(1.0 / (1.0 - ratio))
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-6)
    # the expectation of the output is the input (5 standard deviations of the ratio of sums)
    x64 = x.astype(np.float64)
    sd = np.sqrt(ratio / (1 - ratio) * (x64 ** 2).sum()) / x64.sum()
    assert abs(y.sum(dtype=np.float64) / x64.sum() - 1) < 5 * sd


def test_dropout_default_ratio_is_one_half():
    x = np.ones((100, 100))
    layer, bottom, top = make_layer('type: "Dropout"', [x])
    layer.forward(bottom, top)
    assert set(np.unique(top[0].data)) == {0.0, 2.0}
    assert abs((top[0].data == 2).mean() - 0.5) < 0.02


def test_dropout_test_phase_is_exact_identity():
    x = np.random.RandomState(1).randn(3, 4, 5, 6).astype(np.float32)
    dy = np.random.RandomState(2).randn(*x.shape).astype(np.float32)
    for in_place in (False, True):
        y, dx = forward_backward('type: "Dropout" dropout_param { dropout_ratio: 0.7 }', x, dy,
                                 phase=TEST, in_place=in_place)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dx, dy)


def test_dropout_backward_uses_the_forward_mask():
    x = np.random.RandomState(1).uniform(1, 2, (6, 7))
    dy = np.random.RandomState(2).uniform(1, 2, (6, 7))
    y, dx = forward_backward('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', x, dy)
    np.testing.assert_array_equal(y == 0, dx == 0)
    kept = y != 0
    scale = np.float32(1 / 0.6)
    np.testing.assert_allclose(dx[kept], dy.astype(np.float32)[kept] * scale, rtol=1e-6)


def test_dropout_in_place_equals_not_in_place():
    x = np.random.RandomState(1).randn(4, 3, 5)
    dy = np.random.RandomState(2).randn(4, 3, 5)
    a = forward_backward('type: "Dropout"', x, dy)
    b = forward_backward('type: "Dropout"', x, dy, in_place=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_dropout_seed_reproduces_the_mask_and_masks_change_between_forwards():
    x = np.ones((50, 40))
    a = forward_backward('type: "Dropout"', x, x, seed=9)[0]
    b = forward_backward('type: "Dropout"', x, x, seed=9)[0]
    np.testing.assert_array_equal(a, b)
    layer, bottom, top = make_layer('type: "Dropout"', [x])
    layer.forward(bottom, top)
    first = top[0].data.copy()
    layer.forward(bottom, top)
    assert not np.array_equal(first, top[0].data)


def test_dropout_ratio_zero_is_identity_at_train():
    x = np.random.RandomState(1).randn(5, 5)
    y, dx = forward_backward('type: "Dropout" dropout_param { dropout_ratio: 0 }', x, x)
    np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_dropout_gradient(ratio):
    x = np.random.RandomState(3).randn(2, 3, 4)
    check_gradient(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x])
    check_gradient(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x], phase=TEST)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_dropout_bad_ratio_is_an_error(ratio):
    with pytest.raises(NetError, match=r"layer 'drop' \(Dropout\): dropout_ratio must be in \[0, 1\)"):
        make_layer(f'name: "drop" type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}',
                   [np.ones((2, 2))])


def test_dropout_float32_mask():
    layer, bottom, top = make_layer('type: "Dropout"', [np.ones((3, 3))])
    layer.forward(bottom, top)
    assert layer.mask.dtype == np.float32


def test_dropout_gpu_statistics_and_identity(gpu):
    x = np.random.RandomState(0).uniform(0.5, 1.5, (40, 50, 10)).astype(np.float32)
    dy = np.random.RandomState(1).randn(*x.shape).astype(np.float32)
    for in_place in (False, True):
        y, dx = forward_backward('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, dy,
                                 in_place=in_place)
        kept = y != 0
        assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.21 / x.size)
        np.testing.assert_allclose(y[kept], x[kept] / np.float32(0.7), rtol=1e-6)
        np.testing.assert_array_equal(dx == 0, ~kept)
        np.testing.assert_allclose(dx[kept], dy[kept] / np.float32(0.7), rtol=1e-6)
        y, dx = forward_backward('type: "Dropout"', x, dy, phase=TEST, in_place=in_place)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dx, dy)


def test_exp_with_an_overflowing_shift_gives_inf_as_caffe():
    """base^shift beyond float range is inf in Caffe (pow overflows); set-up must not raise OverflowError
    (the net no longer turns stray exceptions into one-line errors, so this would be a traceback)."""
    x = np.ones((2, 3), np.float32)
    layer, bottom, top = make_layer('type: "Exp" exp_param { shift: 1e30 }', [x])
    y = forward(layer, bottom, top)[0]
    assert np.all(np.isinf(y)) and np.all(y > 0)
