"""Strided 1x1 convolutions on the CPU: a GEMM per image on the gathered strided view (no im2col)
from ``DIRECT_1X1_MIN_COLUMNS`` output positions up, im2col and one batch GEMM below; both give
the convolution (stride 1 is always direct)."""
import numpy as np
import pytest

from minicaffe.kernels import im2col
from minicaffe.layers import conv
from minicaffe.testing import forward, make_layer


def _reference(x, w, b, sh, sw, group):
    xs = x[:, :, ::sh, ::sw].astype(np.float64)
    cout, cg = w.shape[0], w.shape[1]
    og = cout // group
    y = np.concatenate([np.einsum("oc,nchw->nohw", w[g * og:(g + 1) * og, :, 0, 0].astype(np.float64),
                                  xs[:, g * cg:(g + 1) * cg]) for g in range(group)], axis=1)
    return y + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("spec,sh,sw,group", [("stride: 2", 2, 2, 1), ("stride: 3 group: 2", 3, 3, 2),
                                              ("stride_h: 2 stride_w: 1", 2, 1, 1)])
def test_1x1_direct_on_strided_view_matches_columns_and_reference(spec, sh, sw, group, monkeypatch):
    x = np.random.default_rng(0).standard_normal((3, 8, 31, 29)).astype(np.float32)
    text = (f'type: "Convolution" convolution_param {{ num_output: 6 kernel_size: 1 {spec} '
            'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.2 } }')
    layer, bottom, top = make_layer(text, [x])
    expect = _reference(x, layer.blobs[0].data, layer.blobs[1].data, sh, sw, group)
    monkeypatch.setattr(im2col, "DIRECT_1X1_MIN_COLUMNS", 1)

    def no_im2col(*args, **kwargs):
        raise AssertionError("the direct 1x1 path built a column matrix")
    with monkeypatch.context() as m:
        m.setattr(conv, "im2col", no_im2col)
        m.setattr(conv, "im2col_rows", no_im2col)
        direct = forward(layer, bottom, top)[0].copy()
    monkeypatch.setattr(im2col, "DIRECT_1X1_MIN_COLUMNS", 1 << 40)
    columns = forward(layer, bottom, top)[0].copy()
    assert direct.shape == expect.shape
    np.testing.assert_allclose(direct, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(columns, expect, rtol=1e-5, atol=1e-5)


def test_deconvolution_1x1_stride_2_gradients_do_not_depend_on_the_path(monkeypatch):
    """Deconvolution's backward runs the engine's forward with a weight gradient too: the gathered
    view must not stand in for the input the weight gradient reads."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    text = ('type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 1 stride: 2 '
            'weight_filler { type: "gaussian" std: 0.3 } }')
    results = []
    for threshold in (1, 1 << 40):
        monkeypatch.setattr(im2col, "DIRECT_1X1_MIN_COLUMNS", threshold)
        layer, bottom, top = make_layer(text, [x])
        layer.blobs[0].data[...] = np.random.default_rng(2).standard_normal(layer.blobs[0].shape)
        y = forward(layer, bottom, top)[0]
        top[0].diff[...] = np.random.default_rng(3).standard_normal(y.shape)
        layer.blobs[0].diff[...] = 0
        layer.backward(top, [True], bottom)
        results.append((bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
    assert np.abs(results[0][1]).sum() > 0
