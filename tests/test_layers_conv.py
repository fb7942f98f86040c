"""Convolution and Deconvolution: naive-loop references (for DEFAULT's engine and the reference), gradients,
Caffe's shapes and errors. Every engine against the reference: test_conv_engines.py."""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.kernels import engines, im2col
from minicaffe.errors import NetError, ShapeError
from minicaffe.testing import check_gradient, forward, make_layer


def conv_text(num_output, kernel="kernel_size: 3", extra="", bias=True, layer_type="Convolution"):
    return (f'name: "conv" type: "{layer_type}" convolution_param {{ num_output: {num_output} {kernel} {extra} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "uniform" min: -1 max: 1 }} }}')


def naive_conv(x, w, b, stride, pad, dilation, group):
    """The textbook 7-loop convolution (plus the group split), in float64."""
    n_, c_, h_, w_ = x.shape
    o_, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = (h_ + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w_ + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    og = o_ // group
    y = np.zeros((n_, o_, oh, ow))
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for oy in range(oh):
                for ox in range(ow):
                    acc = 0.0 if b is None else float(b[o])
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                yy = oy * sh - ph + i * dh
                                xx = ox * sw - pw + j * dw
                                if 0 <= yy < h_ and 0 <= xx < w_:
                                    acc += float(x[n, g * cg + c, yy, xx]) * float(w[o, c, i, j])
                    y[n, o, oy, ox] = acc
    return y


def naive_deconv(x, w, b, stride, pad, dilation, group):
    """Deconvolution as scatter: every input pixel adds its kernel-weighted copy to the output."""
    n_, c_, h_, w_ = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = sh * (h_ - 1) + dh * (kh - 1) + 1 - 2 * ph
    ow = sw * (w_ - 1) + dw * (kw - 1) + 1 - 2 * pw
    cg = c_ // group
    y = np.zeros((n_, og * group, oh, ow))
    for n in range(n_):
        for c in range(c_):
            g = c // cg
            for yy in range(h_):
                for xx in range(w_):
                    for o in range(og):
                        for i in range(kh):
                            for j in range(kw):
                                ty = yy * sh - ph + i * dh
                                tx = xx * sw - pw + j * dw
                                if 0 <= ty < oh and 0 <= tx < ow:
                                    y[n, g * og + o, ty, tx] += float(x[n, c, yy, xx]) * float(w[c, o, i, j])
    if b is not None:
        y += np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return y


# (kernel text, extra text, stride, pad, dilation, group)
CASES = {
    "k3p1": ("kernel_size: 3", "pad: 1", (1, 1), (1, 1), (1, 1), 1),
    "k3s2p1": ("kernel_size: 3", "pad: 1 stride: 2", (2, 2), (1, 1), (1, 1), 1),
    "group2": ("kernel_size: 3", "group: 2", (1, 1), (0, 0), (1, 1), 2),
    "dilation2": ("kernel_size: 3", "pad: 2 dilation: 2", (1, 1), (2, 2), (2, 2), 1),
    "rect": ("kernel_h: 3 kernel_w: 2", "stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (2, 1), (1, 0), (1, 1), 1),
    "per_axis": ("kernel_size: 2 kernel_size: 3", "stride: 1 stride: 2 pad: 0 pad: 1 dilation: 2 dilation: 1",
                 (1, 2), (0, 1), (2, 1), 1),
    "1x1": ("kernel_size: 1", "", (1, 1), (0, 0), (1, 1), 1),
    "1x1group2": ("kernel_size: 1", "group: 2", (1, 1), (0, 0), (1, 1), 2),
    "1x1stride2": ("kernel_size: 1", "stride: 2", (2, 2), (0, 0), (1, 1), 1),
    "k5s3p2g2": ("kernel_size: 5", "stride: 3 pad: 2 group: 2", (3, 3), (2, 2), (1, 1), 2),
}


@pytest.mark.parametrize("engine", [None, engines.REFERENCE])     # DEFAULT's pick, and the reference
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_convolution_matches_naive_loops(case, bias, engine):
    kernel, extra, stride, pad, dil, group = CASES[case]
    x = np.random.RandomState(0).randn(2, 4, 7, 6).astype(np.float32)
    layer, bottom, top = make_layer(conv_text(6, kernel, extra, bias), [x])
    engines.force(layer, engine)
    y = forward(layer, bottom, top)[0]
    b = layer.blobs[1].data if bias else None
    ref = naive_conv(x, layer.blobs[0].data, b, stride, pad, dil, group)
    assert y.dtype == np.float32
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", [None, engines.REFERENCE])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ["k3p1", "k3s2p1", "group2", "dilation2", "rect", "1x1", "1x1group2", "k5s3p2g2"])
def test_deconvolution_matches_naive_scatter(case, bias, engine):
    kernel, extra, stride, pad, dil, group = CASES[case]
    x = np.random.RandomState(1).randn(2, 4, 4, 3).astype(np.float32)
    layer, bottom, top = make_layer(conv_text(6, kernel, extra, bias, "Deconvolution"), [x])
    engines.force(layer, engine)
    y = forward(layer, bottom, top)[0]
    b = layer.blobs[1].data if bias else None
    ref = naive_deconv(x, layer.blobs[0].data, b, stride, pad, dil, group)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_convolution_gradient(case):
    kernel, extra, *_ = CASES[case]
    x = np.random.RandomState(2).randn(2, 4, 6, 5)
    check_gradient(conv_text(4, kernel, extra), [x])


@pytest.mark.parametrize("case", ["k3p1", "k3s2p1", "group2", "dilation2", "rect", "1x1", "1x1group2"])
def test_deconvolution_gradient(case):
    kernel, extra, *_ = CASES[case]
    x = np.random.RandomState(3).randn(2, 4, 3, 4)
    check_gradient(conv_text(4, kernel, extra, layer_type="Deconvolution"), [x])


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_gradient_without_bias(layer_type):
    x = np.random.RandomState(4).randn(2, 2, 5, 5)
    check_gradient(conv_text(2, "kernel_size: 3", "stride: 2 pad: 1", bias=False, layer_type=layer_type), [x])


def test_deconvolution_is_the_adjoint_of_convolution():
    """<conv(x), y> == <x, deconv(y)> with the same weights (Caffe's defining relation)."""
    rs = np.random.RandomState(5)
    spec = "kernel_size: 3"
    extra = "stride: 2 pad: 1 dilation: 2 group: 2"
    x = rs.randn(2, 4, 9, 7)
    with backend.float64_blobs():
        conv, cb, ct = make_layer(conv_text(6, spec, extra, bias=False), [x])
        y = forward(conv, cb, ct)[0]
        r = rs.randn(*y.shape)
        deconv, db, dt = make_layer(conv_text(4, spec, extra, bias=False, layer_type="Deconvolution"), [r])
        assert deconv.blobs[0].shape == conv.blobs[0].shape == (6, 2, 3, 3)
        deconv.blobs[0].data[...] = conv.blobs[0].data
        z = forward(deconv, db, dt)[0]
    assert y.shape == (2, 6, 4, 3) and z.shape == x.shape
    np.testing.assert_allclose(np.sum(y * r), np.sum(x * z), rtol=1e-10)


@pytest.mark.parametrize("hw,spec,out", [
    (224, "kernel_size: 3 pad: 1", 224),             # VGG
    (224, "kernel_size: 7 stride: 2 pad: 3", 112),   # GoogLeNet conv1/7x7_s2
    (227, "kernel_size: 11 stride: 4", 55),           # AlexNet conv1
    (27, "kernel_size: 5 pad: 2 group: 1", 27),       # AlexNet conv2
    (28, "kernel_size: 5", 24),                       # LeNet conv1
    (56, "kernel_size: 1", 56),
    (10, "kernel_size: 3 dilation: 2", 6),
    (10, "kernel_size: 3 dilation: 3 pad: 3 stride: 2", 5),
])
def test_output_shapes(hw, spec, out):
    x = np.zeros((1, 3, hw, hw), np.float32)
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ num_output: 2 {spec} }}', [x])
    assert top[0].shape == (1, 2, out, out)
    assert layer.blobs[0].shape[:2] == (2, 3)


def test_parameter_shapes_and_fillers():
    x = np.zeros((2, 6, 8, 8), np.float32)
    text = ('name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 5 pad_w: 2 '
            'group: 2 weight_filler { type: "constant" value: 0.25 } bias_filler { type: "constant" value: -2 } }')
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == (4, 3, 3, 5)
    assert layer.blobs[1].shape == (4,)
    assert np.all(layer.blobs[0].data == 0.25) and np.all(layer.blobs[1].data == -2)
    assert top[0].shape == (2, 4, 6, 8)
    d = make_layer('name: "d" type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 4 stride: 2 '
                   'pad: 1 group: 2 bias_term: false }', [x])
    assert [b.shape for b in d[0].blobs] == [(6, 2, 4, 4)]
    assert d[2][0].shape == (2, 4, 16, 16)   # 2*(8-1) + 4 - 2


def test_weight_gradient_accumulates_and_propagate_down():
    x = np.random.RandomState(6).randn(2, 3, 5, 5).astype(np.float32)
    layer, bottom, top = make_layer(conv_text(4, "kernel_size: 3", "pad: 1"), [x])
    forward(layer, bottom, top)
    top[0].diff[...] = np.random.RandomState(7).randn(*top[0].shape)
    bottom[0].diff[...] = 7.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)            # not asked for: untouched
    first_w, first_b = layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()
    assert np.abs(first_w).sum() > 0
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first_w, rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * first_b, rtol=1e-5)
    layer.param_propagate_down = [False, False]
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first_w, rtol=1e-5)


def test_multiple_bottoms_share_weights():
    rs = np.random.RandomState(8)
    a, b = rs.randn(2, 3, 5, 5), rs.randn(2, 3, 5, 5)
    layer, bottom, top = make_layer(conv_text(2, "kernel_size: 3"), [a, b], num_top=2)
    ya, yb = forward(layer, bottom, top)
    w, bias = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(ya, naive_conv(a, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(yb, naive_conv(b, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-4, atol=1e-5)
    check_gradient(conv_text(2, "kernel_size: 3"), [a, b], num_top=2)


def test_axis_flattens_leading_dims():
    x = np.random.RandomState(9).randn(2, 3, 4, 6, 5)
    layer, bottom, top = make_layer(conv_text(2, "kernel_size: 3", "axis: 2 pad: 1"), [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (2, 3, 2, 6, 5)
    ref = naive_conv(x.reshape(6, 4, 6, 5), layer.blobs[0].data, layer.blobs[1].data, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(y.reshape(ref.shape), ref, rtol=1e-4, atol=1e-5)
    check_gradient(conv_text(2, "kernel_size: 3", "axis: -3 stride: 2"), [x[:1, :2, :, :4, :4]])


def test_one_dimensional_convolution_equals_height_one():
    x = np.random.RandomState(10).randn(2, 3, 9)
    layer, bottom, top = make_layer(conv_text(4, "kernel_size: 3", "stride: 2 pad: 1 dilation: 2"), [x])
    y = forward(layer, bottom, top)[0]
    assert layer.blobs[0].shape == (4, 3, 3)
    w = layer.blobs[0].data[:, :, None, :]
    ref = naive_conv(x[:, :, None, :], w, layer.blobs[1].data, (1, 2), (0, 1), (1, 2), 1)
    np.testing.assert_allclose(y, ref[:, :, 0, :], rtol=1e-4, atol=1e-5)
    check_gradient(conv_text(2, "kernel_size: 2", "stride: 2 pad: 1"), [x[:, :, :6]])
    check_gradient(conv_text(2, "kernel_size: 3", "stride: 2 pad: 1", layer_type="Deconvolution"), [x[:, :, :4]])


def test_weights_given_before_setup_are_checked():
    from minicaffe.core.blob import Blob
    from minicaffe.layers import create_layer
    from minicaffe.testing import layer_param
    layer = create_layer(layer_param(conv_text(4, "kernel_size: 3")), 0)
    layer.blobs = [Blob((4, 3, 3, 3)), Blob((4,))]
    bottom = [Blob((1, 3, 5, 5))]
    layer.setup(bottom, [Blob()])
    assert layer.blobs[0].shape == (4, 3, 3, 3)
    layer = create_layer(layer_param(conv_text(4, "kernel_size: 3")), 0)
    layer.blobs = [Blob((4, 3, 5, 5)), Blob((4,))]
    with pytest.raises(ShapeError, match=r"layer 'conv'.*weight shape \(4, 3, 5, 5\).*\(4, 3, 3, 3\)"):
        layer.setup(bottom, [Blob()])


@pytest.mark.parametrize("geom", [
    (3, 3, 1, 1, 1, 1, 1, 1), (3, 2, 2, 3, 1, 2, 1, 2), (5, 4, 3, 2, 2, 0, 1, 1), (1, 1, 2, 2, 0, 0, 1, 1),
    (2, 3, 1, 4, 0, 1, 2, 1),
])
def test_im2col_matches_definition_and_col2im_is_its_adjoint(geom):
    kh, kw, sh, sw, ph, pw, dh, dw = geom
    g = im2col.ConvGeometry(kh, kw, sh, sw, ph, pw, dh, dw)
    rs = np.random.RandomState(15)
    x = rs.randn(2, 3, 9, 11)
    oh, ow = g.out_size(9, 11)
    col = im2col.im2col(x, g, (oh, ow)).copy()
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ref = np.empty((3, kh, kw, 2, oh, ow))
    for i in range(kh):
        for j in range(kw):
            for y in range(oh):
                for z in range(ow):
                    ref[:, i, j, :, y, z] = xpad[:, :, y * sh + i * dh, z * sw + j * dw].T
    np.testing.assert_array_equal(col, ref)
    c = rs.randn(*col.shape)
    back = im2col.col2im(c, g, (9, 11), out=np.full(x.shape, np.nan))
    np.testing.assert_allclose(np.sum(col * c), np.sum(x * back), rtol=1e-10)


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,text,match", [
    ((1, 3, 5, 5), conv_text(4, "kernel_size: 3", "group: 2"), r"input channels 3 not divisible by group 2"),
    ((1, 4, 5, 5), conv_text(3, "kernel_size: 3", "group: 2"), r"num_output 3 not divisible by group 2"),
    ((1, 4, 5, 5), conv_text(0, "kernel_size: 3"), r"num_output must be positive"),
    ((1, 4, 5, 5), conv_text(2, ""), r"kernel_size is required"),
    ((1, 4, 5, 5), conv_text(2, "kernel_size: 3 kernel_h: 3 kernel_w: 3"), r"not both"),
    ((1, 4, 5, 5), conv_text(2, "kernel_h: 3"), r"both kernel_h and kernel_w"),
    ((1, 4, 5, 5), conv_text(2, "kernel_size: 3", "stride: 0"), r"stride must be positive"),
    ((1, 4, 5, 5), conv_text(2, "kernel_size: 3 kernel_size: 3 kernel_size: 3"), r"once per spatial axis"),
    ((1, 4, 5, 5, 5), conv_text(2, "kernel_size: 3"), r"only 1-D and 2-D convolution.*3 spatial axes"),
    ((1, 4, 5, 5), conv_text(2, "kernel_size: 3", "axis: 4"), r"axis 4 out of range"),
])
def test_setup_errors_name_the_layer(shape, text, match):
    with pytest.raises(NetError, match=r"layer 'conv' \((De)?[Cc]onvolution\): .*" + match):
        make_layer(text, [np.zeros(shape)])


def test_kernel_larger_than_padded_input():
    with pytest.raises(ShapeError, match=r"layer 'conv' \(Convolution\): kernel 5x5 larger than padded input 3x3"):
        make_layer(conv_text(2, "kernel_size: 5"), [np.zeros((1, 1, 3, 3))])
    with pytest.raises(ShapeError, match=r"kernel 3x3 with dilation 3x3 \(extent 7x7\) larger than padded input 6x6"):
        make_layer(conv_text(2, "kernel_size: 3", "dilation: 3 pad: 1"), [np.zeros((1, 1, 4, 4))])
    # exactly fitting is fine: one output pixel
    layer, bottom, top = make_layer(conv_text(2, "kernel_size: 5", "pad: 1"), [np.zeros((1, 1, 3, 3))])
    assert top[0].shape == (1, 2, 1, 1)


def test_deconvolution_empty_output_is_an_error():
    with pytest.raises(ShapeError, match=r"layer 'conv' \(Deconvolution\): output size 0x0 is not positive"):
        make_layer(conv_text(2, "kernel_size: 2", "pad: 1", layer_type="Deconvolution"), [np.zeros((1, 1, 1, 1))])


def test_reshape_errors():
    layer, bottom, top = make_layer(conv_text(2, "kernel_size: 3"), [np.zeros((1, 3, 5, 5))])
    bottom[0].reshape(1, 4, 5, 5)
    with pytest.raises(ShapeError, match=r"layer 'conv'.*bottom has 4 channels but the layer was set up for 3"):
        layer.reshape(bottom, top)
    bottom[0].reshape(1, 3, 5)
    with pytest.raises(ShapeError, match=r"layer 'conv'.*must keep 4 axes"):
        layer.reshape(bottom, top)
    bottom[0].reshape(2, 3, 9, 7)   # a new spatial size is fine
    layer.reshape(bottom, top)
    assert top[0].shape == (2, 2, 7, 5)
    with pytest.raises(ShapeError, match=r"all bottoms must have one shape"):
        make_layer(conv_text(2, "kernel_size: 3"), [np.zeros((1, 3, 5, 5)), np.zeros((1, 3, 6, 5))], num_top=2)
    with pytest.raises(NetError, match=r"as many tops as bottoms"):
        make_layer(conv_text(2, "kernel_size: 3"), [np.zeros((1, 3, 5, 5))], num_top=2)


# --- GPU ----------------------------------------------------------------------------------------
def _run_both(text, x, dy_seed=13):
    out = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        backend.set_random_seed(21)
        layer, bottom, top = make_layer(text, [x])
        y = forward(layer, bottom, top)[0]
        top[0].diff[...] = np.random.RandomState(dy_seed).randn(*y.shape)
        layer.backward(top, [True], bottom)
        out.append([y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs])
    return out


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", ["k3s2p1", "group2", "dilation2", "rect", "1x1", "1x1group2"])
def test_cupy_matches_numpy(gpu, layer_type, case):
    kernel, extra, *_ = CASES[case]
    x = np.random.RandomState(14).randn(3, 4, 9, 8).astype(np.float32)
    cpu, dev = _run_both(conv_text(6, kernel, extra, layer_type=layer_type), x)
    for a, b in zip(cpu, dev):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
