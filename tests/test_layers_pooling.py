"""Pooling: Caffe's window loops as the reference, ceil rounding, padded AVE divisor, argmax order."""
import math

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError, ShapeError
from minicaffe.testing import check_gradient, forward, make_layer


def pool_text(method, spec):
    return f'name: "pool" type: "Pooling" pooling_param {{ pool: {method} {spec} }}'


def caffe_out_size(size, k, p, s, ceil_mode=True):
    span = (size + 2 * p - k) / s
    out = (math.ceil(span) if ceil_mode else math.floor(span)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def naive_pool(x, method, k, s, p, ceil_mode=True):
    """Caffe's Forward_cpu, loop for loop: returns (top, mask or None) in float64."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n_, c_, h_, w_ = x.shape
    oh, ow = caffe_out_size(h_, kh, ph, sh, ceil_mode), caffe_out_size(w_, kw, pw, sw, ceil_mode)
    y = np.zeros((n_, c_, oh, ow))
    mask = np.full((n_, c_, oh, ow), -1)
    for n in range(n_):
        for c in range(c_):
            for py in range(oh):
                for px in range(ow):
                    hs, ws = py * sh - ph, px * sw - pw
                    if method == "MAX":
                        he, we = min(hs + kh, h_), min(ws + kw, w_)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best = -np.inf
                        for yy in range(hs, he):
                            for xx in range(ws, we):
                                if x[n, c, yy, xx] > best:
                                    best = x[n, c, yy, xx]
                                    mask[n, c, py, px] = yy * w_ + xx
                        y[n, c, py, px] = best
                    else:
                        he, we = min(hs + kh, h_ + ph), min(ws + kw, w_ + pw)
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h_), min(we, w_)
                        y[n, c, py, px] = x[n, c, hs:he, ws:we].sum() / size
    return y, (mask if method == "MAX" else None)


def naive_pool_backward(x, dy, method, k, s, p, ceil_mode=True):
    """Caffe's Backward_cpu: MAX routes to the argmax, AVE spreads over the clipped window."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n_, c_, h_, w_ = x.shape
    _, mask = naive_pool(x, method, k, s, p, ceil_mode)
    dx = np.zeros(x.shape)
    for n in range(n_):
        for c in range(c_):
            for py in range(dy.shape[2]):
                for px in range(dy.shape[3]):
                    if method == "MAX":
                        idx = mask[n, c, py, px]
                        dx[n, c, idx // w_, idx % w_] += dy[n, c, py, px]
                    else:
                        hs, ws = py * sh - ph, px * sw - pw
                        he, we = min(hs + kh, h_ + ph), min(ws + kw, w_ + pw)
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h_), min(we, w_)
                        dx[n, c, hs:he, ws:we] += dy[n, c, py, px] / size
    return dx


# name: (prototxt spec, kernel, stride, pad, ceil, H, W)
CASES = {
    "k3s2p1_6x6": ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True, 6, 6),
    "k3s2_ceil_7x7": ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, 7, 8),
    "k3s2_googlenet_ceil": ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, 14, 14),
    "k2s2": ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), True, 6, 7),
    "k3s1p1_inception": ("kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1), True, 5, 5),
    "k2s2p1_subtract": ("kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True, 5, 5),
    "rect": ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (3, 2), (2, 1), (1, 0), True, 7, 6),
    "k5s3_aux": ("kernel_size: 5 stride: 3", (5, 5), (3, 3), (0, 0), True, 14, 14),
    "floor": ("kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), False, 6, 6),
    "kernel_over_input": ("kernel_size: 5 stride: 2", (5, 5), (2, 2), (0, 0), True, 4, 6),
    "whole_image": ("kernel_size: 5 stride: 1", (5, 5), (1, 1), (0, 0), True, 5, 5),
}


def distinct_input(shape, seed):
    """Values with no ties (a shuffled range), so numerical MAX gradients are well defined."""
    rs = np.random.RandomState(seed)
    return (rs.permutation(int(np.prod(shape))).reshape(shape) / 10.0 - 3.0)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_match_caffe_loops(case, method):
    spec, k, s, p, ceil_mode, h, w = CASES[case]
    x = np.random.RandomState(0).randn(2, 3, h, w).astype(np.float32)
    num_top = 2 if method == "MAX" else 1
    layer, bottom, top = make_layer(pool_text(method, spec), [x], num_top=num_top)
    outs = forward(layer, bottom, top)
    ref, mask = naive_pool(x.astype(np.float64), method, k, s, p, ceil_mode)
    assert outs[0].shape == ref.shape
    assert outs[0].dtype == np.float32
    np.testing.assert_allclose(outs[0], ref, rtol=1e-6, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(outs[1], mask)
    dy = np.random.RandomState(1).randn(*ref.shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    dref = naive_pool_backward(x.astype(np.float64), dy, method, k, s, p, ceil_mode)
    np.testing.assert_allclose(bottom[0].diff, dref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", ["k3s2p1_6x6", "k3s2_ceil_7x7", "k2s2p1_subtract", "rect", "floor",
                                  "kernel_over_input", "whole_image"])
def test_gradient(case, method):
    spec, *_, h, w = CASES[case]
    check_gradient(pool_text(method, spec), [distinct_input((2, 2, h, w), 2)])


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = np.random.RandomState(3).randn(2, 3, 5, 4).astype(np.float32)
    layer, bottom, top = make_layer(pool_text(method, "global_pooling: true"), [x],
                                    num_top=2 if method == "MAX" else 1)
    outs = forward(layer, bottom, top)
    assert outs[0].shape == (2, 3, 1, 1)
    if method == "MAX":
        np.testing.assert_allclose(outs[0][:, :, 0, 0], x.max(axis=(2, 3)))
        np.testing.assert_array_equal(outs[1][:, :, 0, 0], x.reshape(2, 3, -1).argmax(axis=2))
    else:
        np.testing.assert_allclose(outs[0][:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-6)
    # the kernel follows the input size on reshape
    bottom[0].reshape(2, 3, 7, 7)
    layer.reshape(bottom, top)
    assert top[0].shape == (2, 3, 1, 1)
    check_gradient(pool_text(method, "global_pooling: true"), [distinct_input((2, 2, 3, 4), 4)])


@pytest.mark.parametrize("hw,spec,out", [
    (112, "kernel_size: 3 stride: 2", 56),            # GoogLeNet pool1/3x3_s2 (ceil; floor would give 55)
    (56, "kernel_size: 3 stride: 2", 28),             # GoogLeNet pool2
    (28, "kernel_size: 3 stride: 2", 14),             # GoogLeNet pool3
    (14, "kernel_size: 3 stride: 2", 7),              # GoogLeNet pool4
    (14, "kernel_size: 5 stride: 3", 4),              # GoogLeNet aux heads (AVE)
    (7, "kernel_size: 7 stride: 1", 1),               # GoogLeNet pool5/7x7_s1
    (28, "kernel_size: 3 stride: 1 pad: 1", 28),      # inception pool branch
    (224, "kernel_size: 2 stride: 2", 112),           # VGG
    (55, "kernel_size: 3 stride: 2", 27),             # AlexNet pool1
    (13, "kernel_size: 3 stride: 2", 6),              # AlexNet pool5
    (24, "kernel_size: 2 stride: 2", 12),             # LeNet
    (5, "kernel_size: 2 stride: 2 pad: 1", 3),        # ceil gives 4, the last window would start in the pad
    (112, "kernel_size: 3 stride: 2 round_mode: FLOOR", 55),
])
def test_output_shapes(hw, spec, out):
    layer, bottom, top = make_layer(pool_text("MAX", spec), [np.zeros((1, 2, hw, hw), np.float32)])
    assert top[0].shape == (1, 2, out, out)


def test_ave_divisor_counts_padding_but_not_overhang():
    """H=W=6, k3 s2 p1: a corner window holds 4 real pixels of 9 (padding counts); the last
    window [5, 8) is cut at the padded edge 7, so it divides by 2x2 = 4 with one real pixel."""
    layer, bottom, top = make_layer(pool_text("AVE", "kernel_size: 3 stride: 2 pad: 1"),
                                    [np.ones((1, 1, 6, 6), np.float32)])
    y = forward(layer, bottom, top)[0][0, 0]
    assert y.shape == (4, 4)
    assert y[0, 0] == pytest.approx(4 / 9)
    assert y[1, 1] == pytest.approx(1.0)
    assert y[0, 3] == pytest.approx(2 / 6)     # 2 real rows x 1 real col over 3x2
    assert y[3, 3] == pytest.approx(1 / 4)
    assert y[1, 3] == pytest.approx(3 / 6)


def test_max_ties_pick_the_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 0] = x[0, 0, 0, 1] = 5.0     # both in the first 2x2 window: (0, 1) comes first
    x[0, 0, 2:, 2:] = 1.0                   # a window of equal values: its first element wins
    layer, bottom, top = make_layer(pool_text("MAX", "kernel_size: 2 stride: 2"), [x], num_top=2)
    y, mask = forward(layer, bottom, top)
    assert mask[0, 0].tolist() == [[1, 2], [8, 10]]
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    expect = np.zeros((4, 4))
    expect[0, 1] = expect[0, 2] = expect[2, 0] = expect[2, 2] = 1.0
    np.testing.assert_array_equal(bottom[0].diff[0, 0], expect)


def test_overlapping_max_windows_accumulate():
    x = np.zeros((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 1] = 9.0     # the max of all four overlapping 2x2 windows
    layer, bottom, top = make_layer(pool_text("MAX", "kernel_size: 2 stride: 1"), [x])
    forward(layer, bottom, top)
    top[0].diff[...] = np.array([[1.0, 2.0], [3.0, 4.0]])
    layer.backward(top, [True], bottom)
    assert bottom[0].diff[0, 0, 1, 1] == 10.0
    assert np.count_nonzero(bottom[0].diff) == 1


def test_max_ignores_padding_for_negative_inputs():
    x = -np.ones((1, 1, 2, 2), np.float32) * np.array([[1, 2], [3, 4]], np.float32)
    layer, bottom, top = make_layer(pool_text("MAX", "kernel_size: 2 stride: 1 pad: 1"), [x], num_top=2)
    y, mask = forward(layer, bottom, top)
    np.testing.assert_array_equal(y[0, 0], [[-1, -1, -2], [-1, -1, -2], [-3, -3, -4]])
    np.testing.assert_array_equal(mask[0, 0], [[0, 0, 1], [0, 0, 1], [2, 2, 3]])


def test_backward_respects_propagate_down_and_reshape():
    x = np.random.RandomState(5).randn(2, 2, 6, 6).astype(np.float32)
    layer, bottom, top = make_layer(pool_text("MAX", "kernel_size: 3 stride: 2"), [x])
    forward(layer, bottom, top)
    bottom[0].diff[...] = 3.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 3.0)
    bottom[0].reshape(1, 2, 9, 9)
    bottom[0].data[...] = 1.0
    assert forward(layer, bottom, top)[0].shape == (1, 2, 4, 4)


@pytest.mark.parametrize("text,shape,match,num_top", [
    (pool_text("STOCHASTIC", "kernel_size: 2"), (1, 1, 4, 4), r"STOCHASTIC is not supported", 1),
    (pool_text("MAX", "kernel_size: 2 pad: 2"), (1, 1, 4, 4), r"pad 2x2 must be smaller than the kernel 2x2", 1),
    (pool_text("MAX", "global_pooling: true kernel_size: 2"), (1, 1, 4, 4), r"kernel size cannot be given", 1),
    (pool_text("AVE", "global_pooling: true stride: 2"), (1, 1, 4, 4), r"only pad = 0 and stride = 1", 1),
    (pool_text("MAX", "kernel_size: 2 kernel_h: 2 kernel_w: 2"), (1, 1, 4, 4), r"not both", 1),
    (pool_text("MAX", "kernel_h: 2"), (1, 1, 4, 4), r"needs kernel_size, or both kernel_h and kernel_w", 1),
    (pool_text("MAX", "stride: 0 kernel_size: 2"), (1, 1, 4, 4), r"stride must be positive", 1),
    (pool_text("MAX", "kernel_size: 2 pad_h: 1"), (1, 1, 4, 4), r"give pad, or both pad_h and pad_w", 1),
    (pool_text("MAX", "kernel_size: 2"), (1, 4, 4), r"must have 4 axes", 1),
    (pool_text("MAX", "kernel_size: 5"), (1, 1, 3, 3), r"kernel 5x5 larger than padded input 3x3", 1),
    (pool_text("AVE", "kernel_size: 2"), (1, 1, 4, 4), r"takes at most 1 top", 2),
    (pool_text("MAX", "kernel_size: 2"), (1, 1, 4, 4), r"takes at most 2 top", 3),
])
def test_errors_name_the_layer(text, shape, match, num_top):
    with pytest.raises(NetError, match=r"layer 'pool' \(Pooling\): .*" + match) as info:
        make_layer(text, [np.zeros(shape)], num_top=num_top)
    if "larger than" in match or "4 axes" in match:
        assert isinstance(info.value, ShapeError)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("spec", ["kernel_size: 3 stride: 2 pad: 1", "kernel_size: 3 stride: 2",
                                  "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
                                  "global_pooling: true"])
def test_cupy_matches_numpy(gpu, method, spec):
    x = np.random.RandomState(6).randn(2, 3, 9, 8).astype(np.float32)
    dy = None
    results = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        num_top = 2 if method == "MAX" else 1
        layer, bottom, top = make_layer(pool_text(method, spec), [x], num_top=num_top)
        outs = forward(layer, bottom, top)
        dy = np.random.RandomState(7).randn(*outs[0].shape) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append(outs + [bottom[0].diff.copy()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
