"""LRN: both regions against explicit loops, numerical gradients, errors, GPU agreement."""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError, ShapeError
from minicaffe.testing import check_gradient, make_layer


def lrn_text(size=5, alpha=1.0, beta=0.75, k=1.0, within=False, name="norm"):
    region = "WITHIN_CHANNEL" if within else "ACROSS_CHANNELS"
    return (f'name: "{name}" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} '
            f'k: {k} norm_region: {region} }}')


def f32(v):
    """What a float prototxt field holds (Caffe's Dtype(alpha))."""
    return float(np.float32(v))


def naive_across(x, size, alpha, beta, k):
    N, C, H, W = x.shape
    pre = (size - 1) // 2
    y = np.empty_like(x)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    s = 0.0
                    for cc in range(c - pre, c + pre + 1):
                        if 0 <= cc < C:
                            s += x[n, cc, h, w] ** 2
                    scale = k + alpha / size * s
                    y[n, c, h, w] = x[n, c, h, w] * scale ** -beta
    return y


def naive_within(x, size, alpha, beta):
    N, C, H, W = x.shape
    pre = (size - 1) // 2
    y = np.empty_like(x)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    s = 0.0
                    for hh in range(h - pre, h + pre + 1):
                        for ww in range(w - pre, w + pre + 1):
                            if 0 <= hh < H and 0 <= ww < W:
                                s += x[n, c, hh, ww] ** 2
                    # Caffe: average pooling (divisor size², padding counted) and shift 1 (not k)
                    scale = 1.0 + alpha * s / (size * size)
                    y[n, c, h, w] = x[n, c, h, w] * scale ** -beta
    return y


def naive_across_backward(x, dy, size, alpha, beta, k):
    """dx_i = Σ_j dy_j ∂y_j/∂x_i from the definition, channel by channel."""
    N, C, H, W = x.shape
    pre = (size - 1) // 2
    dx = np.zeros_like(x)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                v = x[n, :, h, w]
                scale = np.array([k + alpha / size * sum(v[cc] ** 2 for cc in range(c - pre, c + pre + 1)
                                                         if 0 <= cc < C) for c in range(C)])
                for i in range(C):
                    total = 0.0
                    for j in range(C):
                        d = (scale[j] ** -beta) if i == j else 0.0
                        if abs(i - j) <= pre:
                            d += v[j] * -beta * scale[j] ** (-beta - 1) * alpha / size * 2 * v[i]
                        total += dy[n, j, h, w] * d
                    dx[n, i, h, w] = total
    return dx


def run(text, x, dy=None):
    layer, bottom, top = make_layer(text, [x])
    layer.forward(bottom, top)
    y = top[0].data.copy()
    if dy is None:
        return y, None
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy()


@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 0.5, 0.5, 2.0),
                                               (5, 1e-4, 0.75, 2.0), (1, 2.0, 1.0, 1.0),
                                               (7, 3.0, 0.6, 0.5), (9, 1.0, 0.75, 1.0)])
def test_across_channels_matches_loops(size, alpha, beta, k):
    x = np.random.RandomState(size).randn(2, 6, 3, 4)
    y, _ = run(lrn_text(size, alpha, beta, k), x)
    xf = x.astype(np.float32).astype(np.float64)
    expect = naive_across(xf, size, f32(alpha), f32(beta), f32(k))
    np.testing.assert_allclose(y, expect, rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("size,alpha,beta,k", [(3, 1.0, 0.75, 1.0), (5, 2.0, 0.5, 5.0),
                                               (1, 1.0, 0.75, 1.0), (5, 0.5, 1.3, 1.0)])
def test_within_channel_matches_loops(size, alpha, beta, k):
    x = np.random.RandomState(size).randn(2, 3, 5, 4)
    y, _ = run(lrn_text(size, alpha, beta, k, within=True), x)
    xf = x.astype(np.float32).astype(np.float64)
    expect = naive_within(xf, size, f32(alpha), f32(beta))
    np.testing.assert_allclose(y, expect, rtol=3e-6, atol=1e-7)


def test_across_backward_matches_the_definition():
    x = np.random.RandomState(0).randn(2, 7, 2, 3)
    dy = np.random.RandomState(1).randn(*x.shape)
    _, dx = run(lrn_text(5, 2.0, 0.75, 1.5), x, dy)
    xf = x.astype(np.float32).astype(np.float64)
    expect = naive_across_backward(xf, dy.astype(np.float32).astype(np.float64), 5, 2.0, 0.75, 1.5)
    np.testing.assert_allclose(dx, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("alpha,beta,k", [(1.0, 0.75, 1.0), (2.0, 0.5, 2.0), (0.7, 1.3, 1.5)])
def test_across_channels_gradient(size, alpha, beta, k):
    x = np.random.RandomState(size).randn(2, 7, 3, 2)
    check_gradient(lrn_text(size, alpha, beta, k), [x])


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.75), (3.0, 0.6), (2.0, 1.0)])
def test_within_channel_gradient(size, alpha, beta):
    x = np.random.RandomState(size).randn(2, 2, 5, 6)
    check_gradient(lrn_text(size, alpha, beta, within=True), [x])


def test_window_wider_than_the_channels():
    x = np.random.RandomState(3).randn(1, 3, 2, 2)
    y, _ = run(lrn_text(11, 1.0, 0.75, 1.0), x)
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(y, naive_across(xf, 11, 1.0, 0.75, 1.0), rtol=3e-6)
    check_gradient(lrn_text(11, 1.0, 0.75, 1.0), [x])
    check_gradient(lrn_text(7, 1.0, 0.75, within=True), [np.random.RandomState(4).randn(1, 2, 3, 2)])


def test_alexnet_setting_keeps_small_channels_exact_beside_large_ones():
    # a running (cumulative) sum in float32 would lose the small channels next to huge ones
    x = np.full((1, 8, 1, 1), 1e-3, np.float32)
    x[0, 0] = 3e3
    y, _ = run(lrn_text(5, 1e-4, 0.75, 2.0), x)
    expect = naive_across(x.astype(np.float64), 5, f32(1e-4), 0.75, 2.0)
    np.testing.assert_allclose(y, expect, rtol=2e-6)


def test_reshape_to_a_new_size_and_repeat_forward():
    layer, bottom, top = make_layer(lrn_text(5), [np.random.RandomState(0).randn(2, 6, 3, 3)])
    for shape in [(1, 4, 5, 2), (2, 6, 3, 3), (3, 9, 1, 1)]:
        x = np.random.RandomState(len(shape)).randn(*shape)
        bottom[0].reshape(shape)
        bottom[0].data[...] = x
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        xf = x.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(top[0].data, naive_across(xf, 5, 1.0, 0.75, 1.0), rtol=3e-6, atol=1e-7)


def test_float32_throughout():
    layer, bottom, top = make_layer(lrn_text(5, within=True), [np.random.RandomState(0).randn(1, 2, 4, 4)])
    layer.forward(bottom, top)
    assert layer.scale.dtype == np.float32 and layer.scale_pow.dtype == np.float32


@pytest.mark.parametrize("size", [4, 0, 2])
def test_even_or_non_positive_size_is_an_error(size):
    with pytest.raises(NetError, match=r"layer 'norm' \(LRN\): local_size must be a positive odd"):
        make_layer(lrn_text(size), [np.ones((1, 3, 2, 2))])


def test_bottom_must_have_four_axes():
    with pytest.raises(ShapeError, match=r"layer 'norm' \(LRN\): bottom must have 4 axes.*\(2, 3, 4\)"):
        make_layer(lrn_text(3), [np.ones((2, 3, 4))])


def test_in_place_is_an_error():
    with pytest.raises(NetError, match=r"layer 'norm' \(LRN\): LRN cannot run in place"):
        make_layer(lrn_text(3), [np.ones((1, 3, 2, 2))], in_place=True)


def test_propagate_down_false_leaves_bottom_diff():
    layer, bottom, top = make_layer(lrn_text(3), [np.ones((1, 3, 2, 2))])
    layer.forward(bottom, top)
    bottom[0].diff[...] = 4
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 4)


@pytest.mark.parametrize("within", [False, True])
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_gpu_matches_cpu(gpu, within, beta):
    x = np.random.RandomState(0).randn(2, 8, 5, 6)
    dy = np.random.RandomState(1).randn(*x.shape)
    text = lrn_text(5, 2.0, beta, 1.5, within=within)
    backend.set_mode_cpu()
    ref = run(text, x, dy)
    backend.set_mode_gpu()
    got = run(text, x, dy)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
