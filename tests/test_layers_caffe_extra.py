"""The Caffe layers added after the first set: Clip, Swish, Threshold, MVN, ContrastiveLoss,
BatchReindex, Filter, Embed, Parameter, Im2col and SPP. Each against a naive per-element loop,
with float64 numerical gradients, and the edge cases Caffe's own tests and CHECKs cover."""
import math

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import MinicaffeError
from minicaffe.testing import check_gradient, make_layer


def rand(shape, seed=0, lo=-1.0, hi=1.0):
    return np.random.RandomState(seed).uniform(lo, hi, shape)


def f32(a):
    """What a float32 blob holds for ``a``."""
    return np.asarray(a, np.float32).astype(np.float64)


def fwd_bwd(text, bottoms, top_diffs=None, num_top=1, propagate=None, in_place=False, seed=3):
    backend.set_random_seed(seed)
    layer, bottom, top = make_layer(text, bottoms, num_top=num_top, in_place=in_place)
    layer.forward(bottom, top)
    tops = [t.data.copy() for t in top]
    if top_diffs is not None:
        for b in layer.blobs:
            b.diff[...] = 0
        for t, d in zip(top, top_diffs):
            t.diff[...] = d
        layer.backward(top, propagate or [True] * len(bottom), bottom)
    return layer, bottom, top, tops


# --- Clip / Swish / Threshold --------------------------------------------------------------------

def test_clip_forward_and_gradient_against_loops():
    x = rand((2, 3, 4, 5), seed=1, lo=-2, hi=2)
    x.flat[:3] = [-0.5, 0.75, 0.1]          # exactly on the bounds: the gradient passes there
    dy = rand(x.shape, seed=2)
    _, bottom, _, (y,) = fwd_bwd('type: "Clip" clip_param { min: -0.5 max: 0.75 }', [x], [dy])
    xs = f32(x)
    np.testing.assert_array_equal(y, np.array([min(max(v, -0.5), 0.75) for v in xs.flat]).reshape(x.shape))
    expect = np.array([d if -0.5 <= v <= 0.75 else 0.0 for v, d in zip(xs.flat, f32(dy).flat)])
    np.testing.assert_array_equal(bottom[0].diff, expect.reshape(x.shape).astype(np.float32))
    assert bottom[0].diff.flat[0] == np.float32(dy.flat[0]) and bottom[0].diff.flat[1] == np.float32(dy.flat[1])


def test_clip_gradient_and_in_place():
    x = rand((2, 3, 3, 2), seed=4, lo=-2, hi=2)
    x[np.abs(np.abs(x) - 1) < 0.05] = 0.3   # keep the kinks out of the finite-difference step
    check_gradient('type: "Clip" clip_param { min: -1 max: 1 }', [x])
    dy = rand(x.shape, seed=5)
    _, b1, _, y1 = fwd_bwd('type: "Clip" clip_param { min: -1 max: 1 }', [x], [dy])
    _, b2, _, y2 = fwd_bwd('type: "Clip" clip_param { min: -1 max: 1 }', [x], [dy], in_place=True)
    np.testing.assert_array_equal(y1[0], y2[0])
    np.testing.assert_array_equal(b1[0].diff, b2[0].diff)


@pytest.mark.parametrize("beta", [1.0, 1.5, -0.5])
def test_swish_forward_gradient_in_place(beta):
    text = f'type: "Swish" swish_param {{ beta: {beta} }}'
    x = rand((2, 3, 4), seed=6, lo=-4, hi=4)
    dy = rand(x.shape, seed=7)
    _, bottom, _, (y,) = fwd_bwd(text, [x], [dy])
    expect = np.array([v / (1 + math.exp(-beta * v)) for v in f32(x).flat]).reshape(x.shape)
    np.testing.assert_allclose(y, expect, rtol=2e-6, atol=1e-6)
    check_gradient(text, [x])
    _, b2, _, y2 = fwd_bwd(text, [x], [dy], in_place=True)
    np.testing.assert_array_equal(y, y2[0])
    np.testing.assert_allclose(b2[0].diff, bottom[0].diff, rtol=1e-6, atol=1e-7)


def test_swish_default_beta_is_one():
    x = rand((3, 4), seed=8, lo=-3, hi=3)
    _, _, _, (y,) = fwd_bwd('type: "Swish"', [x])
    np.testing.assert_allclose(y, f32(x) / (1 + np.exp(-f32(x))), rtol=2e-6, atol=1e-6)


def test_threshold_forward_is_strictly_greater_and_has_no_gradient():
    x = np.array([[-1.0, 0.2, 0.3, 0.30001, 5.0]])
    layer, bottom, top, (y,) = fwd_bwd('type: "Threshold" threshold_param { threshold: 0.3 }', [x])
    np.testing.assert_array_equal(y, [[float(v > np.float32(0.3)) for v in f32(x).flat]])
    assert y[0, 2] == 0 and y[0, 3] == 1
    _, _, _, (y0,) = fwd_bwd('type: "Threshold"', [x])       # default threshold 0
    np.testing.assert_array_equal(y0, [[0, 1, 1, 1, 1]])
    with pytest.raises(MinicaffeError, match="test_layer.*no gradient"):
        layer.backward(top, [True], bottom)
    layer.backward(top, [False], bottom)   # not asked: nothing to do


# --- MVN --------------------------------------------------------------------------------------------

def mvn_reference(x, across, variance, eps=1e-9):
    x = f32(x)
    n = x.shape[0]
    c = x.shape[1] if x.ndim > 1 else 1
    groups = x.reshape(n, -1) if across else x.reshape(n * c, -1)
    out = np.empty_like(groups)
    for r in range(groups.shape[0]):
        row = groups[r]
        mean = sum(row) / len(row)
        centred = [v - mean for v in row]
        if variance:
            std = math.sqrt(sum(v * v for v in centred) / len(row)) + eps
            centred = [v / std for v in centred]
        out[r] = centred
    return out.reshape(x.shape)


MVN_CASES = ['', 'mvn_param { across_channels: true }', 'mvn_param { normalize_variance: false }',
             'mvn_param { across_channels: true normalize_variance: false }', 'mvn_param { eps: 0.1 }']


@pytest.mark.parametrize("extra", MVN_CASES)
def test_mvn_forward_against_loops_and_gradient(extra):
    text = f'type: "MVN" {extra}'
    x = rand((2, 3, 4, 5), seed=9, lo=-2, hi=3)
    _, _, _, (y,) = fwd_bwd(text, [x])
    across = "across_channels: true" in extra
    variance = "normalize_variance: false" not in extra
    eps = 0.1 if "eps" in extra else 1e-9
    np.testing.assert_allclose(y, mvn_reference(x, across, variance, eps), rtol=1e-5, atol=1e-5)
    if eps == 1e-9:
        # Caffe's gradient treats eps as 0; with the default 1e-9 that is exact to the check's precision
        check_gradient(text, [rand((2, 3, 3, 2), seed=10)])


def test_mvn_top_has_caffes_legacy_four_axes_and_works_in_place():
    x = rand((4, 6), seed=11)
    layer, _, top, (y,) = fwd_bwd('type: "MVN"', [x])
    assert top[0].shape == (4, 6, 1, 1)     # Caffe reshapes to num, channels, height, width
    # one value per (n, c): centred to exactly 0
    np.testing.assert_array_equal(y, 0)
    _, _, _, (ya,) = fwd_bwd('type: "MVN" mvn_param { across_channels: true }', [x])
    np.testing.assert_allclose(ya.reshape(4, 6), mvn_reference(x, True, True), rtol=1e-5, atol=1e-5)
    x4 = rand((2, 3, 4, 4), seed=12)
    dy = rand(x4.shape, seed=13)
    _, b1, _, y1 = fwd_bwd('type: "MVN"', [x4], [dy])
    _, b2, _, y2 = fwd_bwd('type: "MVN"', [x4], [dy], in_place=True)
    np.testing.assert_array_equal(y1[0], y2[0])
    np.testing.assert_allclose(b1[0].diff, b2[0].diff, rtol=1e-6, atol=1e-6)
    with pytest.raises(MinicaffeError, match="at most 4 axes"):
        make_layer('type: "MVN"', [np.zeros((1, 2, 2, 2, 2))])


# --- ContrastiveLoss --------------------------------------------------------------------------------

def contrastive_reference(a, b, y, margin, legacy):
    a, b = f32(a).reshape(len(y), -1), f32(b).reshape(len(y), -1)
    loss, ga = 0.0, np.zeros_like(a)
    n = len(y)
    for i in range(n):
        d2 = sum((a[i, k] - b[i, k]) ** 2 for k in range(a.shape[1]))
        if int(y[i]):
            loss += d2
            ga[i] = (a[i] - b[i]) / n
        elif legacy:
            loss += max(margin - d2, 0.0)
            if margin - d2 > 0:
                ga[i] = -(a[i] - b[i]) / n
        else:
            d = math.sqrt(d2)
            loss += max(margin - d, 0.0) ** 2
            if margin - d > 0:
                ga[i] = -(margin - d) / (d + 1e-4) * (a[i] - b[i]) / n
    return loss / n / 2, ga


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss_against_loop_and_gradient(legacy):
    n, c = 6, 4
    a, b = rand((n, c), seed=14), rand((n, c), seed=15)
    y = np.array([1, 0, 0, 1, 0, 0.7])       # 0.7 truncates to 0: dissimilar, as Caffe's int cast
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.5 legacy_version: {str(legacy).lower()} }}'
    _, bottom, _, (loss,) = fwd_bwd(text, [a, b, y], [np.array(2.0)], propagate=[True, True, False])
    ref_loss, ref_grad = contrastive_reference(a, b, y, 1.5, legacy)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, 2.0 * ref_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bottom[1].diff, -2.0 * ref_grad, rtol=1e-4, atol=1e-6)
    # the margin term is active for some dissimilar pairs and not for others
    assert not np.all(ref_grad[[1, 2, 4, 5]] == 0)
    check_gradient(text, [a.reshape(n, c, 1, 1), b.reshape(n, c, 1, 1), y.reshape(n, 1, 1, 1)],
                   check_bottom=[0, 1], atol=1e-4, rtol=2e-3)


def test_contrastive_loss_checks_shapes_and_refuses_label_gradient():
    text = 'type: "ContrastiveLoss"'
    with pytest.raises(MinicaffeError, match="same channels"):
        make_layer(text, [np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2)])
    with pytest.raises(MinicaffeError, match=r"\(N, C\) or \(N, C, 1, 1\)"):
        make_layer(text, [np.zeros((2, 3, 2, 1)), np.zeros((2, 3, 2, 1)), np.zeros(2)])
    layer, bottom, top, _ = fwd_bwd(text, [np.ones((2, 3)), np.zeros((2, 3)), np.ones(2)])
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(2)
    with pytest.raises(MinicaffeError, match="bottom\\[2\\]"):
        layer.backward(top, [True, True, True], bottom)


# --- BatchReindex / Filter ----------------------------------------------------------------------------

def test_batch_reindex_against_loop_with_repeats_and_gradient():
    x = rand((5, 2, 3), seed=16)
    idx = np.array([4, 0, 4, 2, 2, 2, 1.9])      # repeats, omissions, and 1.9 -> 1 (truncation)
    dy = rand((7, 2, 3), seed=17)
    _, bottom, top, (y,) = fwd_bwd('type: "BatchReindex"', [x, idx], [dy], propagate=[True, False])
    assert y.shape == (7, 2, 3)
    for i, k in enumerate(idx):
        np.testing.assert_array_equal(y[i], f32(x[int(k)]))
    expect = np.zeros_like(x)
    for i, k in enumerate(idx):
        expect[int(k)] += f32(dy[i])
    np.testing.assert_allclose(bottom[0].diff, expect, rtol=1e-6)
    assert np.all(bottom[0].diff[3] == 0)
    check_gradient('type: "BatchReindex"', [x, idx], check_bottom=[0])


def test_batch_reindex_errors_and_empty_index():
    with pytest.raises(MinicaffeError, match="'test_layer'.*index 5 at position 1 is out of range"):
        fwd_bwd('type: "BatchReindex"', [np.zeros((5, 2)), np.array([0, 5.0])])
    with pytest.raises(MinicaffeError, match="index -1 at position 0"):
        fwd_bwd('type: "BatchReindex"', [np.zeros((5, 2)), np.array([-1.0])])
    with pytest.raises(MinicaffeError, match="1 axis"):
        make_layer('type: "BatchReindex"', [np.zeros((5, 2)), np.zeros((2, 1))])
    layer, bottom, top, (y,) = fwd_bwd('type: "BatchReindex"', [np.ones((3, 2)), np.zeros(0)],
                                       [np.zeros((0, 2))], propagate=[True, False])
    assert y.shape == (0, 2)
    np.testing.assert_array_equal(bottom[0].diff, 0)
    with pytest.raises(MinicaffeError, match="indices"):
        layer.backward(top, [True, True], bottom)


def test_filter_against_loop_and_gradient():
    a, b = rand((5, 3, 2), seed=18), rand((5, 4), seed=19)
    sel = np.array([1, 0, 0, 2.5, 1]).reshape(5, 1)
    layer, bottom, top = make_layer('type: "Filter"', [a, b, sel], num_top=2)
    assert top[0].shape == (5, 3, 2)       # the first reshape (net set-up): the whole batch
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    keep = [i for i in range(5) if sel[i, 0] != 0]
    np.testing.assert_array_equal(top[0].data, f32(a[keep]))
    np.testing.assert_array_equal(top[1].data, f32(b[keep]))
    top[0].diff[...] = 1.0
    top[1].diff[...] = 2.0
    layer.backward(top, [True, True, False], bottom)
    for i in range(5):
        np.testing.assert_array_equal(bottom[0].diff[i], 1.0 if i in keep else 0.0)
        np.testing.assert_array_equal(bottom[1].diff[i], 2.0 if i in keep else 0.0)
    check_gradient('type: "Filter"', [a, b, sel], check_bottom=[0, 1], num_top=2)
    with pytest.raises(MinicaffeError, match="selector"):
        layer.backward(top, [True, True, True], bottom)


def test_filter_with_nothing_selected_gives_empty_tops_and_zero_gradients():
    a = rand((3, 2), seed=20)
    layer, bottom, top = make_layer('type: "Filter"', [a, np.zeros(3)], num_top=1)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    assert top[0].shape == (0, 2)
    bottom[0].diff[...] = 7
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)


def test_filter_checks_shapes():
    with pytest.raises(MinicaffeError, match="one top per bottom"):
        make_layer('type: "Filter"', [np.zeros((3, 2)), np.zeros(3)], num_top=2)
    with pytest.raises(MinicaffeError, match=r"\(N\) or \(N, 1, ...\)"):
        make_layer('type: "Filter"', [np.zeros((3, 2)), np.zeros((3, 2))])
    with pytest.raises(MinicaffeError, match="bottom\\[0\\] has 4 items, the selector has 3"):
        make_layer('type: "Filter"', [np.zeros((4, 2)), np.zeros(3)])


# --- Embed / Parameter ------------------------------------------------------------------------------

EMBED = ('type: "Embed" embed_param {{ num_output: 3 input_dim: 5 bias_term: {bias} '
         'weight_filler {{ type: "uniform" min: -1 max: 1 }} bias_filler {{ type: "uniform" min: -1 max: 1 }} }}')


@pytest.mark.parametrize("bias", ["true", "false"])
def test_embed_against_loop_and_gradient(bias):
    text = EMBED.format(bias=bias)
    idx = np.array([[0, 4, 2], [2, 2, 1]], dtype=np.float64)
    dy = rand((2, 3, 3), seed=21)
    layer, _, _, (y,) = fwd_bwd(text, [idx], [dy], propagate=[False])
    w = layer.blobs[0].data.astype(np.float64)
    assert layer.blobs[0].shape == (5, 3) and len(layer.blobs) == (2 if bias == "true" else 1)
    bvec = layer.blobs[1].data.astype(np.float64) if bias == "true" else np.zeros(3)
    for pos in np.ndindex(idx.shape):
        np.testing.assert_allclose(y[pos], w[int(idx[pos])] + bvec, rtol=1e-6)
    expect = np.zeros((5, 3))
    for pos in np.ndindex(idx.shape):
        expect[int(idx[pos])] += f32(dy[pos])
    np.testing.assert_allclose(layer.blobs[0].diff, expect, rtol=1e-6)
    if bias == "true":
        np.testing.assert_allclose(layer.blobs[1].diff, f32(dy).reshape(-1, 3).sum(axis=0), rtol=1e-5)
    check_gradient(text, [idx], check_bottom=[])


def test_embed_bad_indices_are_one_line_errors_naming_the_layer():
    text = EMBED.format(bias="true")
    for bad, what in (([1, 5], "5 at position 1 is out of range \\[0, 5\\)"),
                      ([-1, 0], "-1 at position 0 is out of range"),
                      ([1.5, 0], "1.5 at position 0 is not an integer")):
        with pytest.raises(MinicaffeError, match=f"'test_layer'.*embed index {what}") as info:
            fwd_bwd(text, [np.array(bad, np.float64)])
        assert "\n" not in str(info.value)
    layer, bottom, top, _ = fwd_bwd(text, [np.array([1.0])])
    with pytest.raises(MinicaffeError, match="indices"):
        layer.backward(top, [True], bottom)


def test_parameter_layer_outputs_its_blob_and_accumulates_its_gradient():
    text = 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }'
    layer, bottom, top = make_layer(text, [])
    assert layer.blobs[0].shape == (2, 3) and top[0].shape == (2, 3)
    np.testing.assert_array_equal(layer.blobs[0].data, 0)      # Caffe: no filler, zeros
    layer.blobs[0].data[...] = np.arange(6).reshape(2, 3)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, np.arange(6).reshape(2, 3))
    top[0].diff[...] = 1.5
    layer.backward(top, [], bottom)
    layer.backward(top, [], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, 3.0)
    check_gradient(text, [])


# --- Im2col -------------------------------------------------------------------------------------------

def im2col_reference(x, kh, kw, sh, sw, ph, pw, dh, dw):
    n, c, h, w = x.shape
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    out = np.zeros((n, c * kh * kw, oh, ow))
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    row = (ch * kh + i) * kw + j
                    for y in range(oh):
                        for z in range(ow):
                            yy, zz = y * sh - ph + i * dh, z * sw - pw + j * dw
                            if 0 <= yy < h and 0 <= zz < w:
                                out[b, row, y, z] = x[b, ch, yy, zz]
    return out


@pytest.mark.parametrize("conv,geom", [
    ("kernel_size: 3", (3, 3, 1, 1, 0, 0, 1, 1)),
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3, 2, 2, 1, 1, 1, 1)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0", (2, 3, 1, 2, 1, 0, 1, 1)),
    ("kernel_size: 2 dilation: 2 pad: 1", (2, 2, 1, 1, 1, 1, 2, 2)),
])
def test_im2col_against_loop_and_gradient(conv, geom):
    text = f'type: "Im2col" convolution_param {{ {conv} }}'
    x = rand((2, 3, 5, 6), seed=22)
    _, _, _, (y,) = fwd_bwd(text, [x])
    np.testing.assert_array_equal(y, im2col_reference(f32(x), *geom))
    check_gradient(text, [rand((2, 2, 4, 5), seed=23)])


def test_im2col_times_weights_is_the_convolution():
    x = rand((2, 3, 6, 5), seed=24)
    _, _, _, (cols,) = fwd_bwd('type: "Im2col" convolution_param { kernel_size: 3 pad: 1 stride: 2 }', [x])
    conv, bottom, top, (y,) = fwd_bwd('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
                                      'pad: 1 stride: 2 bias_term: false weight_filler { type: "gaussian" } }', [x])
    w = conv.blobs[0].data.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(np.einsum("ok,nkyx->noyx", w, cols), y, rtol=1e-4, atol=1e-5)


def test_im2col_refuses_non_2d():
    with pytest.raises(MinicaffeError, match="2-D"):
        make_layer('type: "Im2col" convolution_param { kernel_size: 2 }', [np.zeros((2, 3, 4))])


# --- SPP ----------------------------------------------------------------------------------------------

def spp_level_reference(x, level, method):
    """One pyramid level by loops: Caffe's kernel/stride/pad for 2^level bins and its pooling rule
    (windows clipped to the image; AVE divides by the window clipped to the padded image)."""
    n, c, h, w = x.shape
    bins = 2 ** level
    kh, kw = -(-h // bins), -(-w // bins)
    ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2

    def pooled(size, k, p):
        out = -(-(size + 2 * p - k) // k) + 1
        if p and (out - 1) * k >= size + p:
            out -= 1
        return out

    oh, ow = pooled(h, kh, ph), pooled(w, kw, pw)
    out = np.zeros((n, c, oh, ow))
    for b in range(n):
        for ch in range(c):
            for y in range(oh):
                for z in range(ow):
                    y0, z0 = y * kh - ph, z * kw - pw
                    y1, z1 = min(y0 + kh, h + ph), min(z0 + kw, w + pw)
                    area = (y1 - y0) * (z1 - z0)
                    win = x[b, ch, max(y0, 0):min(y1, h), max(z0, 0):min(z1, w)]
                    out[b, ch, y, z] = win.max() if method == "MAX" else win.sum() / area
    return out


@pytest.mark.parametrize("height,method,shape", [(3, "MAX", (2, 3, 9, 7)), (2, "AVE", (2, 2, 6, 7)),
                                                 (3, "AVE", (1, 2, 8, 8)), (1, "MAX", (2, 3, 5, 4))])
def test_spp_against_loops_and_gradient(height, method, shape):
    text = f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {method} }}'
    x = rand(shape, seed=25)
    _, _, top, (y,) = fwd_bwd(text, [x])
    levels = [spp_level_reference(f32(x), lv, method) for lv in range(height)]
    if height == 1:
        assert top[0].shape == levels[0].shape      # one level: the pooling output itself
        np.testing.assert_allclose(y, levels[0], rtol=1e-6)
    else:
        expect = np.concatenate([lv.reshape(shape[0], -1) for lv in levels], axis=1)
        assert y.shape == expect.shape
        np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-7)
    check_gradient(text, [x])


def test_spp_follows_a_new_input_size():
    layer, bottom, top = make_layer('type: "SPP" spp_param { pyramid_height: 2 }', [rand((1, 2, 4, 4))])
    assert top[0].shape == (1, 2 * (1 + 4))
    from minicaffe.core.blob import Blob
    b = Blob((1, 2, 7, 5))
    b.data[...] = rand((1, 2, 7, 5), seed=26)
    layer.reshape([b], top)
    layer.forward([b], top)
    expect = np.concatenate([spp_level_reference(f32(b.data), lv, "MAX").reshape(1, -1) for lv in range(2)], 1)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-6)
