"""Every convolution engine computes what the layer's reference computes, and DEFAULT picks the
engine each shape paid off with before the engine table existed.

The engines (minicaffe/kernels/conv_engines.py) are forced by name (``engines.force``), on every
case of the table below where the engine computes; the reference (``engine: CAFFE``) runs on the
same input; forward, data gradient, weight gradient (each alone and together) agree in float64.
No module constant is touched: ragged chunks and bands come from build options.
"""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.errors import NetError
from minicaffe.formats.prototxt import load_net_param
from minicaffe.core import context
from minicaffe.kernels import conv_engines, cudnn, engines, winograd
from minicaffe.proto import caffe_pb2
from minicaffe.testing import check_gradient, forward, make_layer

REF = engines.REFERENCE


def conv_text(layer_type, spec, bias=True):
    return (f'name: "conv" type: "{layer_type}" convolution_param {{ {spec} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "gaussian" std: 0.5 }} '
            'bias_filler { type: "uniform" min: -1 max: 1 } }')


# name: (bottom shape, convolution_param): small shapes that reach every engine's branches
CASES = {
    "k3p1": ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 pad: 1"),
    "k3s2p1": ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 pad: 1 stride: 2"),
    "group2": ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 group: 2"),
    "dilation2": ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 pad: 2 dilation: 2"),
    "rect": ((2, 4, 7, 6), "num_output: 6 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
    "per_axis": ((2, 4, 7, 6), "num_output: 6 kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 0 pad: 1 "
                               "dilation: 2 dilation: 1"),
    "k5s3p2g2": ((2, 4, 7, 6), "num_output: 6 kernel_size: 5 stride: 3 pad: 2 group: 2"),
    "no_bias": ((2, 3, 5, 5), "num_output: 2 kernel_size: 3 stride: 2 pad: 1"),
    # big windows for their stride (a first layer): im2col reads a phase-split source, odd widths
    "k7s2p3": ((2, 3, 15, 14), "num_output: 4 kernel_size: 7 stride: 2 pad: 3"),
    "k5s1x2g2": ((2, 4, 9, 13), "num_output: 4 kernel_size: 5 stride_h: 1 stride_w: 2 pad: 1 group: 2"),
    # strided kernels that are 3x3 once cut into stride-sized blocks (winograd_space_to_depth):
    # AlexNet's 11x11/4, a 6x6/2 with uneven pads, a 9x9/3 whose pad takes most of a block
    "k11s4": ((2, 3, 35, 31), "num_output: 4 kernel_size: 11 stride: 4"),
    "k6s2p": ((2, 2, 13, 12), "num_output: 3 kernel_size: 6 stride: 2 pad_h: 1 pad_w: 0"),
    "k9s3p4": ((1, 2, 20, 17), "num_output: 3 kernel_size: 9 stride: 3 pad: 4"),
    "1x1": ((2, 4, 7, 6), "num_output: 6 kernel_size: 1"),
    "1x1group2": ((2, 4, 7, 6), "num_output: 6 kernel_size: 1 group: 2"),
    # strided 1x1 over >= 196 output positions: the direct GEMM on the gathered view (CPU)
    "1x1stride2": ((3, 8, 31, 29), "num_output: 6 kernel_size: 1 stride: 2"),
    "1x1stride3group2": ((2, 8, 45, 45), "num_output: 6 kernel_size: 1 stride: 3 group: 2"),
    # ... with stride_w 1 on a narrow map: its gradient columns put the batch last
    "1x1stride_h2": ((4, 8, 40, 12), "num_output: 6 kernel_size: 1 stride_h: 2 stride_w: 1"),
    # narrow maps, batch >= 4: batch-last columns
    "narrow5": ((5, 4, 9, 10), "num_output: 4 kernel_size: 5"),
    "narrow5g2": ((5, 4, 9, 10), "num_output: 6 kernel_size: 3 stride_h: 2 stride_w: 1 pad: 1 group: 2"),
    "narrow5d2": ((5, 4, 9, 10), "num_output: 4 kernel_size: 3 dilation: 2 pad: 2"),
    # wide maps: several bands of output rows, the last one ragged (64 = 27 + 27 + 10 at 66 wide)
    "wide": ((8, 4, 66, 66), "num_output: 4 kernel_size: 3 pad: 1"),
    # Winograd's odd sizes and paddings, one output tile, and a shape where it pays
    "odd": ((2, 4, 13, 11), "num_output: 3 kernel_size: 3 pad: 1"),
    "pad_h2": ((2, 3, 7, 8), "num_output: 4 kernel_h: 3 kernel_w: 3 pad_h: 2 pad_w: 0"),
    # Winograd F(2x2, 5x5): pads 1, 2 and 4 (the data gradient's own pad is 4 - p), odd output
    # sizes (9x6), uneven pads, groups
    "k5p2": ((2, 3, 9, 8), "num_output: 4 kernel_size: 5 pad: 2"),
    "k5odd": ((1, 4, 11, 8), "num_output: 3 kernel_size: 5 pad: 1"),
    "k5p4": ((2, 2, 6, 7), "num_output: 3 kernel_size: 5 pad: 4"),
    "k5pad_h3": ((2, 3, 8, 9), "num_output: 4 kernel_h: 5 kernel_w: 5 pad_h: 3 pad_w: 0"),
    "k5g2": ((3, 4, 10, 9), "num_output: 6 kernel_size: 5 pad: 2 group: 2"),
    "one_tile": ((2, 2, 3, 3), "num_output: 2 kernel_size: 3"),
    "vgg": ((1, 128, 14, 15), "num_output: 3 kernel_size: 3 pad: 1"),
    # F(4x4): one image, outputs not multiples of 4 (10x9, 11x8), pad 2 on both axes
    "batch1_odd": ((1, 5, 10, 9), "num_output: 3 kernel_size: 3 pad: 1"),
    "pad2": ((2, 3, 9, 6), "num_output: 4 kernel_size: 3 pad: 2"),
    # pad 3 (the Winograd data gradient's own pad is 2 - p: from 3 on, the columns do it)
    "pad3": ((2, 3, 8, 7), "num_output: 2 kernel_size: 3 pad: 3"),
    # 1-D, and leading axes flattened into the batch
    "1d": ((2, 3, 9), "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2"),
    "axis2": ((2, 3, 4, 6, 5), "num_output: 2 kernel_size: 3 axis: 2 pad: 1"),
}

IM2COL_CASES = {
    "k3p1": ((2, 3, 7, 6), "kernel_size: 3 pad: 1"),
    "rect": ((2, 3, 9, 11), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2 dilation: 2"),
    "1x1s2": ((1, 2, 8, 8), "kernel_size: 1 stride: 2"),
    "k5s2": ((2, 3, 11, 9), "kernel_size: 5 stride: 2 pad: 1"),         # phase-split source
}


def _engine(layer_type, name, device):
    return next(e for e in engines.engines_for(layer_type, device) if e.name == name)


def _layer(layer_type, case, seed=0):
    shape, spec = (IM2COL_CASES if layer_type == "Im2col" else CASES)[case]
    x = np.random.default_rng(seed).standard_normal(shape)
    text = (f'name: "col" type: "Im2col" convolution_param {{ {spec} }}' if layer_type == "Im2col"
            else conv_text(layer_type, spec, bias=case != "no_bias"))
    with backend.float64_blobs():
        return make_layer(text, [x])


def _run(layer, bottom, top, name, options=None):
    """Forward, then backward three ways (both gradients, data only, weights only), with engine
    ``name``; the gradients start from junk (data: overwritten) and a known value (params: added to)."""
    engines.force(layer, name, **(options or {}))
    y = forward(layer, bottom, top)[0]
    assert layer.engine_name == name
    dy = np.random.default_rng(1).standard_normal(y.shape)
    start = [np.random.default_rng(2 + i).standard_normal(b.shape) for i, b in enumerate(layer.blobs)]
    top[0].diff[...] = dy
    out = [y]
    for prop, params in ((True, True), (True, False), (False, True)):
        bottom[0].diff[...] = 7.0
        for b, s in zip(layer.blobs, start):
            b.diff[...] = s
        layer.param_propagate_down = [params] * len(layer.blobs)
        layer.backward(top, [prop], bottom)
        if prop:
            out.append(bottom[0].diff.copy())
        else:
            assert np.all(bottom[0].diff == 7.0)
        for b, s in zip(layer.blobs, start):
            if params:
                out.append(b.diff.copy())
            else:
                np.testing.assert_array_equal(b.diff, s)
    layer.param_propagate_down = [True] * len(layer.blobs)
    engines.force(layer, None)
    return out


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10 * max(1.0, float(np.abs(w).max())))


def _cpu_engines():
    return [(t, n) for t in ("Convolution", "Deconvolution", "Im2col") for n in engines.names(t, "cpu")
            if n != REF]


@pytest.mark.parametrize("layer_type,name", _cpu_engines())
def test_every_cpu_engine_matches_the_reference(layer_type, name):
    ran = []
    for case in (IM2COL_CASES if layer_type == "Im2col" else CASES):
        layer, bottom, top = _layer(layer_type, case)
        if not _engine(layer_type, name, "cpu").runs_on(layer):
            continue
        ref = _run(layer, bottom, top, REF)
        _assert_same(_run(layer, bottom, top, name), ref)
        ran.append(case)
    assert ran, f"no case reaches engine {name}"


def _gpu_engines():
    return [(t, n) for t in ("Convolution", "Deconvolution", "Im2col") for n in engines.names(t, "gpu")]


GPU_CASES = ["k3s2p1", "group2", "dilation2", "rect", "per_axis", "1x1", "1x1group2", "1x1stride2", "narrow5g2",
             "1d", "axis2"]


@pytest.mark.parametrize("layer_type,name", _gpu_engines())
def test_every_gpu_engine_matches_the_cpu_reference(gpu, layer_type, name):
    """The GPU engines (and the reference itself, in CuPy) against the reference on NumPy."""
    ran = []
    for case in (IM2COL_CASES if layer_type == "Im2col" else GPU_CASES):
        backend.set_mode_cpu()
        layer, bottom, top = _layer(layer_type, case)
        want = _run(layer, bottom, top, REF)
        weights = [b.data.copy() for b in layer.blobs]
        backend.set_mode_gpu()
        layer, bottom, top = _layer(layer_type, case)
        for b, w in zip(layer.blobs, weights):
            b.data[...] = w
        if name != REF and not _engine(layer_type, name, "gpu").runs_on(layer):
            continue
        if name == "cudnn" and not cudnn.available()[0]:
            pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
        _assert_same(_run(layer, bottom, top, name), want)
        ran.append(case)
    assert ran, f"no case reaches engine {name}"


# --- tuning knobs: ragged chunks and bands -------------------------------------------------------
@pytest.mark.parametrize("layer_type,name,case", [
    ("Convolution", "im2col", "k5s3p2g2"), ("Deconvolution", "im2col", "group2"),
    ("Convolution", "im2col_batch_last", "narrow5g2"), ("Deconvolution", "im2col_batch_last", "narrow5"),
    ("Convolution", "gemm_1x1", "1x1stride_h2"), ("Deconvolution", "gemm_1x1", "1x1group2"),
    ("Convolution", "im2col_bands", "rect"), ("Deconvolution", "im2col_bands", "dilation2"),
    ("Convolution", "im2col_channels_last", "k5s3p2g2"), ("Deconvolution", "im2col_channels_last", "narrow5g2"),
    ("Convolution", "winograd", "odd")])
@pytest.mark.parametrize("images", [1, 4])
def test_column_engines_in_chunks_of_images_match_the_reference(layer_type, name, case, images):
    """A batch split into chunks of images (to bound the column buffer; batch-last chunks of fewer
    than 4 images fall back to batch first) gives the reference's numbers."""
    layer, bottom, top = _layer(layer_type, case)
    s = layer.conv
    per_image = s.cin * s.geom.kh * s.geom.kw * s.columns
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, name, {"max_col_elements": images * per_image}), ref)


@pytest.mark.parametrize("max_k", [0, 10 ** 9])
@pytest.mark.parametrize("name,case", [("im2col", "k5s3p2g2"), ("im2col_batch_last", "narrow5g2"),
                                       ("gemm_1x1", "1x1stride2"), ("winograd", "odd")])
def test_weight_gradient_either_way_round_matches_the_reference(name, case, max_k, monkeypatch):
    """The column engines' weight gradient as rows(dy) @ cols(x)^T (chunks of up to
    WGRAD_ROWS_FIRST_MAX_K positions) or as (cols(x) @ rows(dy)^T)^T: the reference's numbers."""
    monkeypatch.setattr(conv_engines, "WGRAD_ROWS_FIRST_MAX_K", max_k)
    layer, bottom, top = _layer("Convolution", case)
    _assert_same(_run(layer, bottom, top, name), _run(layer, bottom, top, REF))


@pytest.mark.parametrize("min_columns", [1, 10 ** 9])
@pytest.mark.parametrize("layer_type,case", [("Convolution", "1x1"), ("Deconvolution", "1x1"),
                                             ("Convolution", "1x1group2"), ("Convolution", "1x1stride2")])
def test_gemm_1x1_weight_gradient_image_by_image_matches_the_reference(layer_type, case, min_columns,
                                                                       monkeypatch):
    """A 1x1 layer's weight gradient an image's GEMM at a time, BLAS adding into the sum (maps of
    WGRAD_BY_IMAGE_MIN_COLUMNS positions and more; strided, WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS), or
    as one GEMM over transposed copies: the reference's numbers either way. Groups keep the one
    GEMM beside a data gradient (alone, the batch goes in WGRAD_PARTS groups:
    Im2colConv._weight_grad_in_parts), and so does a Deconvolution, whose weight gradient reads its
    bottom as the convolution's output."""
    monkeypatch.setattr(conv_engines, "WGRAD_BY_IMAGE_MIN_COLUMNS", min_columns)
    monkeypatch.setattr(conv_engines, "WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS", min_columns)
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    positions = []      # each accumulated product's positions (K): the batch's, or a group's
    by_image = []
    accumulate = conv_engines.Im2colConv._accumulate_wgrad
    monkeypatch.setattr(conv_engines.Im2colConv, "_accumulate_wgrad",
                        lambda self, rows, *a: positions.append(rows.shape[1]) or accumulate(self, rows, *a))
    real = conv_engines.Gemm1x1Conv._weight_grad_by_image
    monkeypatch.setattr(conv_engines.Gemm1x1Conv, "_weight_grad_by_image",
                        lambda self, *a: by_image.append(1) or real(self, *a))
    _assert_same(_run(layer, bottom, top, "gemm_1x1"), ref)
    s = layer.conv
    if min_columns == 1 and case in ("1x1", "1x1stride2") and layer_type == "Convolution":
        assert len(by_image) == 2 and positions == []       # both gradients; the weights' alone
        return
    assert by_image == []
    group = -(-s.num // conv_engines.WGRAD_PARTS) * s.columns
    want = {s.num * s.columns} if layer_type == "Deconvolution" else {s.num * s.columns, group}
    assert set(positions) == want


@pytest.mark.parametrize("spec", ["num_output: 5 kernel_size: 1", "num_output: 5 kernel_size: 1 stride: 2"])
def test_gemm_1x1_weight_gradient_by_image_has_the_same_bits_at_one_thread_and_two(spec, env_switch,
                                                                                  monkeypatch):
    """The images' fixed groups (WGRAD_BY_IMAGE_PARTS), not the threads, order the float32 sums."""
    monkeypatch.setattr(conv_engines, "WGRAD_BY_IMAGE_MIN_COLUMNS", 1)
    monkeypatch.setattr(conv_engines, "WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS", 1)
    x = np.random.default_rng(41).standard_normal((5, 6, 13, 12)).astype(np.float32)
    one, two = _float32_weight_gradient_at_one_and_two_threads(spec, x, "gemm_1x1", {}, True, env_switch)
    assert one.tobytes() == two.tobytes()


def _float32_weight_gradient_at_one_and_two_threads(spec, x, name, opts, data_grad, env_switch):
    """A Convolution's float32 weight gradient (``spec`` on input ``x``, engine ``name`` with
    ``opts``, the data gradient asked for or not) with the kernels' pool at one thread, then at two."""
    def weight_gradient():
        lay, bot, tp = make_layer(conv_text("Convolution", spec), [x.astype(np.float32)])
        engines.force(lay, name, **opts)
        forward(lay, bot, tp)
        tp[0].diff[...] = np.random.default_rng(3).standard_normal(tp[0].shape)
        lay.blobs[0].diff[...] = 0
        lay.backward(tp, [data_grad], bot)
        return lay.blobs[0].diff.copy()
    got = []
    for n in ("1", "2"):
        env_switch("MINICAFFE_THREADS", n)
        got.append(weight_gradient())
    return got


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", ["k3s2p1", "k5s3p2g2", "dilation2", "rect", "per_axis", "narrow5g2", "1d"])
@pytest.mark.parametrize("options", [{"transposed": True}, {"transposed": False},
                                     {"transposed": False, "max_col_elements": 1}])
def test_channels_last_forward_either_way_round_matches_the_reference(layer_type, case, options):
    """Position-major columns, per group, multiplied either way round (positions x cout, transposed
    into the output; or cout x positions), in one chunk or one image at a time."""
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, "im2col_channels_last", options), ref)


def test_channels_last_copies_a_few_channels_one_at_a_time():
    """An RGB-like input (fewer channels per group than CHANNELS_LAST_MIN_RUN) takes the
    per-channel copy into the channels-last source; more channels take the one transpose."""
    from minicaffe.kernels.im2col import CHANNELS_LAST_MIN_RUN
    for cin, group in ((3, 1), (2 * CHANNELS_LAST_MIN_RUN, 2)):
        x = np.random.default_rng(3).standard_normal((2, cin, 9, 8))
        text = conv_text("Convolution", f"num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: {group}")
        with backend.float64_blobs():
            layer, bottom, top = make_layer(text, [x])
        ref = _run(layer, bottom, top, REF)
        _assert_same(_run(layer, bottom, top, "im2col_channels_last"), ref)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", ["k3p1", "k3s2p1", "group2", "dilation2", "rect", "per_axis", "wide", "k7s2p3",
                                  "k5s1x2g2"])
@pytest.mark.parametrize("rows", [1, 3])
def test_banded_forward_with_any_band_height_matches_the_reference(layer_type, case, rows):
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, "im2col_bands", {"band_rows": rows}), ref)


@pytest.fixture(params=["compiled", "numpy"])
def f4_transforms(request, env_switch):
    """Winograd F(4x4)'s tile transforms both ways: the compiled loops (kernels/compiled.py) and
    the NumPy stacked GEMMs (MINICAFFE_COMPILED=0)."""
    env_switch("MINICAFFE_COMPILED", "1" if request.param == "compiled" else "0")
    return request.param


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("band", [1, None])
@pytest.mark.parametrize("case", ["k3p1", "odd", "pad_h2", "one_tile", "batch1_odd", "pad2"])
def test_winograd_either_tile_in_any_band_matches_the_reference(case, band, tile, f4_transforms):
    """Both tile sizes forced, in bands of one tile row (ragged) or the default band, on odd
    output sizes (not multiples of 2 or 4), one image, pads 0, 1 and 2, one tile, in float64; F(4x4)
    with either transform path."""
    layer, bottom, top = _layer("Convolution", case)
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, "winograd", {"band_rows": band, "tile": tile}), ref)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_winograd_filters_follow_weight_updates(phase, tile):
    """The transformed filters (cached in a TEST net) are redone when the weights change in place,
    as an SGD step changes them."""
    x = np.random.default_rng(11).standard_normal((2, 3, 8, 8)).astype(np.float32)
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 4 kernel_size: 3 pad: 1", bias=False),
                                    [x], phase=phase)
    engines.force(layer, "winograd", tile=tile)
    first = forward(layer, bottom, top)[0]
    assert layer.engine_name == "winograd" and layer.engine.tile == tile
    layer.blobs[0].data[...] *= -2
    second = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(second, -2 * first, rtol=1e-4, atol=1e-5 * np.abs(first).max())


def test_winograd_filter_cache_follows_the_tile_size():
    """One cache asked for the other tile size recomputes (its transform has 36 positions, not 16),
    and ``forward`` reads the tile size from the filters it is given."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 2, 3, 3))
    x = rng.standard_normal((1, 2, 9, 9))
    cache = winograd.FilterCache()
    assert cache.get(w).shape == (16, 3, 2)
    u4 = cache.get(w, tile=4)
    assert u4.shape == (36, 3, 2) and u4 is cache.get(w, tile=4)
    y2, y4 = np.empty((1, 3, 9, 9)), np.empty((1, 3, 9, 9))
    winograd.forward(x, w, y2, 1, 1, u=winograd.transform_filters(w))
    winograd.forward(x, w, y4, 1, 1, u=u4.copy())
    np.testing.assert_allclose(y4, y2, rtol=1e-10, atol=1e-12)


def test_winograd_f4x4_without_opencv_gives_the_same_bits(monkeypatch):
    """Where cv2 does not import, the channels-last copy of the input is NumPy's (a pure copy
    either way: the same bits)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 13, 10)).astype(np.float32)
    w = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    with_cv2, without = np.empty((2, 4, 13, 10), np.float32), np.empty((2, 4, 13, 10), np.float32)
    winograd.forward(x, w, with_cv2, 1, 1, tile=4)
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)     # import cv2 raises ImportError
    winograd.forward(x, w, without, 1, 1, tile=4)
    assert with_cv2.tobytes() == without.tobytes()


def test_winograd_points_give_the_classic_f2x2_matrices():
    """``matrices`` derives F(2x2)'s transforms from 0, 1, -1 as Lavin & Gray print them (the F(2x2)
    code is written for these), and F(4x4)'s from its points with every entry a small dyadic
    fraction except G's (so B^T and A^T are exact in float32)."""
    at2, g2, bt2 = winograd.matrices(winograd.POINTS[2])
    np.testing.assert_array_equal(bt2, [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]])
    np.testing.assert_array_equal(g2, [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
    np.testing.assert_array_equal(at2, [[1, 1, 1, 0], [0, 1, -1, 1]])
    at4, g4, bt4 = winograd.matrices(winograd.POINTS[4])
    assert at4.shape == (4, 6) and g4.shape == (6, 3) and bt4.shape == (6, 6)
    for mat in (at4, bt4):
        np.testing.assert_array_equal(mat * 8, np.round(mat * 8))


def _winograd_einsum(x, w, points, dtype):
    """An unbanded Winograd correlation (valid, 4x4 tiles) straight from ``matrices(points)``, every
    step in ``dtype``: to compare point sets on the same footing."""
    at, g, bt = (a.astype(dtype) for a in winograd.matrices(points))
    m = at.shape[0]
    n, c, h, wd = x.shape
    th, tw = (h - 2) // m, (wd - 2) // m
    u = np.einsum("ik,ockl,jl->ijoc", g, w.astype(dtype), g)
    tiles = np.lib.stride_tricks.sliding_window_view(x.astype(dtype), (m + 2, m + 2), axis=(2, 3))[:, :, ::m, ::m]
    v = np.einsum("ik,nctskl,jl->ijncts", bt, tiles[:, :, :th, :tw], bt)
    prod = np.einsum("ijoc,ijncts->ijnots", u, v)
    out = np.einsum("ki,ijnots,lj->notksl", at, prod, at)
    return out.reshape(n, w.shape[0], th * m, tw * m)


@pytest.mark.parametrize("cin", [64, 512])
def test_winograd_float32_error_on_vgg_sized_layers(cin):
    """Float32 F(4x4) against the float64 reference, relative to max|y|, on a VGG-sized channel
    count (He-initialised weights, unit inputs). Bound: 1e-5, ~170 float32 ulps (6e-8) of max|y|:
    the tile transforms amplify rounding by the size of their entries (up to 8 in A^T, 2.5 in
    B^T, products of two of them per tile) on top of a GEMM's over 9 cin terms. Measured here:
    F(4x4) 0.9-1.5e-6, F(2x2) 3-7e-7, im2col + GEMM 4-7e-7 (64-512 channels). The chosen points
    0, 1, -1, 1/2, -2 beat the common 0, +-1, +-2 in the same straight-from-the-matrices code
    (1.9-6.2e-6 against 5.9-9.5e-6)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, cin, 18, 18)).astype(np.float32)
    w = (rng.standard_normal((16, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = np.empty((1, 16, 18, 18))
    winograd.forward(x64, w64, want, 1, 1, tile=2)         # float64: exact to ~1e-15
    scale = np.abs(want).max()
    err = {}
    for tile in (2, 4):
        y = np.empty((1, 16, 18, 18), np.float32)
        winograd.forward(x, w, y, 1, 1, tile=tile)
        err[tile] = np.abs(y - want).max() / scale
    assert err[4] < 1e-5 and err[2] < 1e-5
    valid = want[:, :, 1:17, 1:17]
    mine = np.abs(_winograd_einsum(x, w, winograd.POINTS[4], np.float32) - valid).max()
    common = np.abs(_winograd_einsum(x, w, (0, 1, -1, 2, -2), np.float32) - valid).max()
    assert mine < common


def test_winograd_f4x4_transforms_in_column_blocks_match_a_direct_correlation(f4_transforms):
    """Tile rows wider than ``SMALL_GEMM_COLUMNS`` (65 tiles x 64 channels = 4160 columns a side)
    go through the stacked transform GEMMs in column blocks, the last one ragged, and an output
    width (258) that crops the last tile column: float64 against the plain correlation (and the
    compiled transforms on the same shape)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 64, 10, 260))
    w = rng.standard_normal((64, 64, 3, 3))
    assert 65 * 64 > winograd.SMALL_GEMM_COLUMNS
    y = np.empty((2, 64, 8, 258))
    winograd.forward(x, w, y, 0, 0, tile=4)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))     # (n, c, 8, 258, 3, 3)
    want = np.einsum("nchwkl,ockl->nohw", windows, w, optimize=True)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_winograd_f4x4_transforms_in_row_steps_give_the_same_bits(monkeypatch, env_switch):
    """The NumPy transforms' temporaries bounded to one tile row a step (TRANSFORM_STEP_BYTES): the
    same output, bit for bit, as a whole chunk of rows at once."""
    env_switch("MINICAFFE_COMPILED", "0")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 8, 22, 18)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    whole, steps = (np.empty((2, 16, 22, 18), np.float32) for _ in range(2))
    winograd.forward(x, w, whole, 1, 1, tile=4)
    monkeypatch.setattr(winograd, "TRANSFORM_STEP_BYTES", 1)
    winograd.forward(x, w, steps, 1, 1, tile=4)
    np.testing.assert_array_equal(steps, whole)


WINOGRAD_GRAD_CASES = ["k3p1", "odd", "pad_h2", "one_tile", "vgg", "pad2"]


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", WINOGRAD_GRAD_CASES)
@pytest.mark.parametrize("options", [{}, {"band_rows": 1}])
def test_winograd_data_gradient_matches_the_reference(layer_type, case, options, f4_transforms):
    """The data gradient as a Winograd convolution of dy with the flipped filters (pads 0, 1, 2, odd
    sizes, one image, one tile), next to the column weight gradient; for Deconvolution that is its
    forward, and its own data gradient (weights frozen) the Winograd forward."""
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, "winograd", {"data_grad": True, **options}), ref)


def _float32_runs(layer_type, case, seed, options, propagate):
    """float32 blobs (what nets run), the reference and the Winograd engine with ``options`` on the
    same input and top gradient, parameter gradients from zero: ``{name: [y, bottom diff (when
    ``propagate``), parameter diffs...]}``."""
    shape, spec = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    layer, bottom, top = make_layer(conv_text(layer_type, spec), [x])
    dy = rng.standard_normal(top[0].shape).astype(np.float32)
    got = {}
    for name, opts in ((REF, {}), ("winograd", options)):
        engines.force(layer, name, **opts)
        y = forward(layer, bottom, top)[0]
        assert layer.engine_name == name
        top[0].diff[...] = dy
        for b in layer.blobs:
            b.diff[...] = 0
        layer.backward(top, [propagate], bottom)
        got[name] = [y] + ([bottom[0].diff.copy()] if propagate else []) + [b.diff.copy() for b in layer.blobs]
    engines.force(layer, None)
    return got


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", ["odd", "pad2"])
def test_winograd_data_gradient_in_float32_matches_the_reference(layer_type, case):
    """float32 blobs (what nets run): output, data and weight gradients to float32 rounding."""
    got = _float32_runs(layer_type, case, 4, {"data_grad": True}, True)
    for g, w in zip(got["winograd"], got[REF]):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def test_winograd_data_gradient_is_only_forced_where_it_computes():
    """Pad 3 and more: the data gradient stays on the columns by default and cannot be forced."""
    layer, bottom, top = _layer("Convolution", "pad3")
    engines.force(layer, "winograd")
    layer.reshape(bottom, top)
    assert layer.engine.data_grad is False
    engines.force(layer, "winograd", data_grad=True)
    with pytest.raises(ValueError, match="pad 3x3"):
        layer.reshape(bottom, top)
    engines.force(layer, None)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_winograd_data_gradient_passes_the_gradient_check(layer_type):
    """Central differences through a layer forced onto the Winograd data gradient (Deconvolution:
    its forward is that path, so its objective itself goes through it)."""
    x = np.random.default_rng(8).standard_normal((1, 2, 5, 4))
    text = conv_text(layer_type, "num_output: 2 kernel_size: 3 pad: 1")
    check_gradient(text, [x], setup_hook=lambda layer, b, t: engines.force(layer, "winograd", data_grad=True))


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("spec,group", [("num_output: 4 kernel_size: 3 pad: 1", 1),
                                        ("num_output: 4 kernel_size: 3 pad: 1 group: 2", 2)])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_winograd_flipped_filters_follow_weight_updates(layer_type, spec, group, phase):
    """The transformed flipped filters (cached in a TEST net, a pair of caches per group) are redone
    when the weights change in place: the data gradient (Deconvolution: the forward) scales with
    them."""
    x = np.random.default_rng(12).standard_normal((2, 2 * group, 8, 7)).astype(np.float32)
    layer, bottom, top = make_layer(conv_text(layer_type, spec, bias=False), [x], phase=phase)
    engines.force(layer, "winograd", data_grad=True)
    results = []
    for scale in (1.0, -2.0):
        layer.blobs[0].data[...] *= scale
        y = forward(layer, bottom, top)[0]
        assert layer.engine_name == "winograd"
        top[0].diff[...] = 1.0
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy()))
    for first, second in zip(*results):     # the outputs, then the data gradients
        np.testing.assert_allclose(second, -2 * first, rtol=1e-4, atol=1e-5 * np.abs(first).max())
    engines.force(layer, None)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("spec", ["num_output: 6 kernel_size: 3 pad: 1 group: 2",
                                  "num_output: 9 kernel_size: 3 group: 3",
                                  "num_output: 4 kernel_size: 3 pad: 2 group: 2"])
@pytest.mark.parametrize("tile,weight_grad", [(2, False), (4, False), (4, True)])
def test_winograd_grouped_runs_group_by_group(layer_type, spec, tile, weight_grad):
    """A grouped 3x3 layer through Winograd, forward, data gradient and (F(4x4)) weight gradient,
    each group on its channels' views (copied out for the weight gradient's kernels) with its own
    filters (CaffeNet's conv4 and conv5)."""
    x = np.random.default_rng(21).standard_normal((3, 6, 9, 10))
    with backend.float64_blobs():
        layer, bottom, top = make_layer(conv_text(layer_type, spec), [x])
    ref = _run(layer, bottom, top, REF)
    _assert_same(_run(layer, bottom, top, "winograd",
                      {"data_grad": True, "tile": tile, "weight_grad": weight_grad}), ref)


@pytest.mark.parametrize("shape,spec,want", [
    ((32, 384, 13, 13), "num_output: 384 kernel_size: 3 pad: 1 group: 2", True),      # CaffeNet conv4
    ((32, 384, 13, 13), "num_output: 256 kernel_size: 3 pad: 1 group: 2", True),      # conv5
    ((32, 384, 13, 13), "num_output: 64 kernel_size: 3 pad: 1 group: 2", False)])     # 32 outputs a group
def test_default_winograd_for_wide_groups(shape, spec, want):
    layer, _, _ = make_layer(conv_text("Convolution", spec), [np.zeros(shape, np.float32)])
    assert (layer.engine_name == "winograd") is want
    if want:
        assert layer.engine.data_grad and layer.engine.weight_grad


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", WINOGRAD_GRAD_CASES + ["pad3", "batch1_odd"])
@pytest.mark.parametrize("data_grad", [False, True])
def test_winograd_weight_gradient_matches_the_reference(layer_type, case, data_grad):
    """The weight gradient through Winograd F(4x4) (pads 0 to 3, odd sizes, one image, one tile),
    alone and beside either data gradient; for Deconvolution it is its forward's weight gradient,
    dy and x in each other's places."""
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    data_grad = data_grad and winograd.applies(layer.conv.geom, 1) and layer.conv.geom.ph <= 2 \
        and layer.conv.geom.pw <= 2
    _assert_same(_run(layer, bottom, top, "winograd", {"weight_grad": True, "data_grad": data_grad}), ref)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", WINOGRAD_GRAD_CASES + ["pad3", "batch1_odd"])
def test_winograd_gradients_with_dy_tiles_channels_last_match_the_reference(layer_type, case, monkeypatch):
    """dy's tiles channels last for every output count (GRAD_TILES_CHANNELS_LAST_MIN_OUT 1): with
    both gradients through F(4x4, 3x3) the weight gradient reads the data gradient's own padded dy
    (``shares_dy``; where that dy's padding is too short, as with pad 2, a copy of its own), alone
    always a copy of its own; the reference's numbers each way. A Deconvolution's weight gradient
    is its forward's, with a copy of its own."""
    monkeypatch.setattr(winograd, "GRAD_TILES_CHANNELS_LAST_MIN_OUT", 1)
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    g = layer.conv.geom
    data_grad = winograd.applies(g, 1) and g.ph <= 2 and g.pw <= 2
    shared = []         # per weight gradient: whether it read the data gradient's dy
    real = winograd._dy_source
    monkeypatch.setattr(winograd, "_dy_source", lambda dy, th, tw, given: shared.append(
        given is not None and real(dy, th, tw, given)[0] is given[0]) or real(dy, th, tw, given))
    _assert_same(_run(layer, bottom, top, "winograd", {"weight_grad": True, "data_grad": data_grad}), ref)
    engine = conv_engines.WinogradConv(layer.conv, layer.phase, data_grad=data_grad, weight_grad=True)   # _run's
    assert engine.grad_tiles_channels_last
    assert len(shared) == 2         # the weight gradient beside the data gradient, then alone
    assert shared[1] is False
    fits = g.ph <= 1 and g.pw <= 1
    # a Deconvolution's weight gradient runs in its forward (the convolution's), never beside this
    assert shared[0] is (layer_type == "Convolution" and engine.shares_dy and fits)
    assert engine.shares_dy is (data_grad and engine.grad_tile == 4)


@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("tile", [4, 3])
def test_winograd_dy_tiles_channels_last_are_the_channels_first_tiles_transposed(pad, tile):
    """``compiled.winograd4_gradient_tiles_cl`` (3x3 kernels, 4x4 tiles) and
    ``winograd3x5_gradient_tiles_cl`` (5x5, 3x3 tiles) on dy padded channels last (at an offset
    ``pad``, zeros past the map's edge) give the channels-first kernels' tiles bit for bit,
    transposed (the same operations on each value), in the whole map and in a last band."""
    from minicaffe.kernels import compiled
    first, last = ((compiled.winograd4_gradient_tiles, compiled.winograd4_gradient_tiles_cl) if tile == 4 else
                   (compiled.winograd3x5_gradient_tiles, compiled.winograd3x5_gradient_tiles_cl))
    positions = 36 if tile == 4 else 49
    rng = np.random.default_rng(15)
    for n, k, oh, ow in ((2, 24, 17, 22), (1, 16, 5, 6), (3, 20, 9, 8)):
        dy = rng.standard_normal((n, k, oh, ow)).astype(np.float32)
        th, tw = -(-oh // tile), -(-ow // tile)
        src = winograd._source_channels_last(dy, pad, pad, pad + tile * th + 1, pad + tile * tw + 2).copy()
        for t0, rows in ((0, th), (th - min(2, th), min(2, th))):
            want = np.empty((positions, k, n * rows * tw), np.float32)
            compiled.get(first)(dy, want, t0, rows, tw, 0, k)
            got = np.full((positions, n * rows * tw, k), np.nan, np.float32)
            compiled.get(last)(src, pad, pad, got, t0, rows, tw, 0, n * rows)
            assert got.transpose(0, 2, 1).tobytes() == want.tobytes()


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", ["odd", "pad2", "wide"])
def test_winograd_weight_gradient_in_float32_matches_the_reference(layer_type, case):
    """float32 blobs: the weight gradient to float32 rounding (its 36 products sum over the whole
    batch's tiles, and the transforms scale dy's values by up to 8 before G^T scales them back)."""
    got = {name: runs[1] for name, runs in _float32_runs(layer_type, case, 5, {"weight_grad": True}, False).items()}
    assert got["winograd"].dtype == np.float32
    np.testing.assert_allclose(got["winograd"], got[REF], rtol=1e-4, atol=2e-6 * float(np.abs(got[REF]).max()))


def test_winograd_weight_gradient_passes_the_gradient_check():
    x = np.random.default_rng(9).standard_normal((2, 2, 6, 5))
    text = conv_text("Convolution", "num_output: 3 kernel_size: 3 pad: 1")
    check_gradient(text, [x], setup_hook=lambda layer, b, t: engines.force(layer, "winograd", weight_grad=True))


def _numpy_compiled_and_two_threads(env_switch, run):
    """``{(MINICAFFE_COMPILED, MINICAFFE_THREADS): run()}``: the NumPy twins at one thread, the
    compiled kernels at one and at two."""
    out = {}
    for mode, threads_ in (("0", "1"), ("1", "1"), ("1", "2")):
        env_switch("MINICAFFE_COMPILED", mode)
        env_switch("MINICAFFE_THREADS", threads_)
        out[mode, threads_] = run()
    return out


@pytest.mark.parametrize("band", [1, 2, None])
def test_winograd_weight_gradient_compiled_and_numpy_agree_in_any_band(band, env_switch):
    """``winograd.weight_gradient`` adds into ``dw``, in bands of tile rows: the compiled kernels
    against their NumPy twins (equal to float32 rounding: the input tiles' and the filters' twins
    add in einsum's and BLAS's orders), and the compiled result the same bits at one and two
    threads; dy's tile transform is the same bits as its twin (the same operations)."""
    from minicaffe.kernels import compiled
    rng = np.random.default_rng(14)
    for n, c, k, h, w, p in ((2, 16, 24, 17, 22, 1), (1, 8, 8, 5, 6, 0), (3, 12, 6, 9, 8, 2)):
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        oh, ow = h + 2 * p - 2, w + 2 * p - 2
        dy = rng.standard_normal((n, k, oh, ow)).astype(np.float32)
        start = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        def run():
            dw = start.copy()
            winograd.weight_gradient(x, dy, dw, p, p, band=band)
            return dw
        out = _numpy_compiled_and_two_threads(env_switch, run)
        scale = np.abs(out["0", "1"] - start).max()
        np.testing.assert_allclose(out["1", "1"], out["0", "1"], rtol=0, atol=4e-6 * scale)
        assert out["1", "1"].tobytes() == out["1", "2"].tobytes()
        tw, th = -(-ow // 4), -(-oh // 4)
        rows = min(2, th)
        tiles = np.empty((36, k, n * rows * tw), np.float32)
        compiled.get(compiled.winograd4_gradient_tiles)(dy, tiles, th - rows, rows, tw, 0, k)
        assert tiles.tobytes() == winograd._gradient_tiles_numpy(dy, th - rows, rows, tw, 4).tobytes()


def test_winograd_weight_gradient_without_compiled_kernels_takes_the_columns(env_switch, monkeypatch):
    """With MINICAFFE_COMPILED=0 the engine's weight gradient goes through the columns (the NumPy
    twins are slower than they are), with the same result to rounding."""
    layer, bottom, top = _layer("Convolution", "odd")
    ref = _run(layer, bottom, top, REF)
    env_switch("MINICAFFE_COMPILED", "0")
    calls = []
    monkeypatch.setattr(winograd, "weight_gradient", lambda *a, **k: calls.append(a))
    _assert_same(_run(layer, bottom, top, "winograd", {"weight_grad": True}), ref)
    assert calls == []


# --- what DEFAULT picks ---------------------------------------------------------------------------
@pytest.mark.parametrize("layer_type,shape,spec,want", [
    ("Convolution", (64, 20, 12, 12), "num_output: 50 kernel_size: 5", "im2col_channels_last"),      # LeNet conv2
    ("Convolution", (4, 3, 227, 227), "num_output: 8 kernel_size: 11 stride: 4",
     "winograd_space_to_depth"),                                                                     # CaffeNet conv1
    ("Convolution", (1, 1, 227, 227), "num_output: 8 kernel_size: 11 stride: 4",
     "winograd_space_to_depth"),                                                                     # 16 channels cut
    ("Convolution", (4, 3, 227, 227), "num_output: 6 kernel_size: 11 stride: 4 group: 3",
     "im2col_channels_last"),
    ("Convolution", (4, 96, 27, 27), "num_output: 8 kernel_size: 5 pad: 2 group: 2",
     "im2col_channels_last"),                                                                        # CaffeNet conv2
    ("Convolution", (4, 16, 28, 28), "num_output: 8 kernel_size: 5 pad: 2", "im2col_channels_last"),  # GoogLeNet 3a/5x5
    ("Convolution", (4, 128, 56, 56), "num_output: 8 kernel_size: 3 pad: 1 stride: 2",
     "im2col_channels_last"),                                                                        # ResNet 3x3/2
    ("Convolution", (4, 112, 14, 14), "num_output: 8 kernel_size: 5 pad: 2", "im2col_batch_last"),   # 784 positions
    ("Convolution", (4, 192, 7, 7), "num_output: 8 kernel_size: 3 pad: 1", "im2col_batch_last"),     # inception_5b
    ("Convolution", (4, 3, 224, 224), "num_output: 8 kernel_size: 7 stride: 2 pad: 3",
     "im2col_channels_last"),                                                                              # GoogLeNet conv1
    ("Convolution", (4, 256, 13, 13), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),           # CaffeNet conv3
    ("Convolution", (2, 192, 28, 28), "num_output: 8 kernel_size: 1", "gemm_1x1"),                  # GoogLeNet 1x1
    ("Convolution", (4, 128, 14, 14), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),           # inception_4c
    ("Convolution", (4, 112, 14, 14), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),           # inception_4b
    ("Convolution", (4, 32, 28, 28), "num_output: 8 kernel_size: 3 pad: 1", "im2col_channels_last"),  # 32 channels
    ("Convolution", (1, 256, 56, 56), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),           # VGG conv3
    ("Convolution", (1, 64, 56, 56), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),            # 64 channels
    ("Convolution", (1, 256, 56, 56), "num_output: 8 kernel_size: 3 pad: 1 group: 2", "im2col_bands"),
    ("Convolution", (1, 256, 56, 56), "num_output: 8 kernel_size: 3 pad: 1 stride: 2", "im2col"),
    ("Convolution", (1, 256, 56, 56), "num_output: 8 kernel_size: 5 pad: 2", "im2col_bands"),
    ("Convolution", (1, 256, 56, 56), "num_output: 8 kernel_size: 1 stride: 2", "gemm_1x1"),        # ResNet 28²
    ("Convolution", (1, 1024, 14, 14), "num_output: 8 kernel_size: 1 stride: 2", "im2col"),        # ResNet 7²
    ("Convolution", (3, 64, 16, 16), "num_output: 8 kernel_size: 3 pad: 1", "winograd"),           # 48 tiles
    ("Convolution", (2, 64, 12, 12), "num_output: 8 kernel_size: 3 pad: 1", "im2col"),             # 18 tiles
    ("Deconvolution", (4, 8, 12, 12), "num_output: 8 kernel_size: 3 pad: 1", "im2col_batch_last"),
    ("Deconvolution", (1, 128, 14, 14), "num_output: 8 kernel_size: 3 pad: 1", "im2col"),          # 8 channels
    ("Deconvolution", (4, 21, 16, 16), "num_output: 21 kernel_size: 4 stride: 2", "im2col"),       # FCN upscore
    ("Deconvolution", (2, 16, 20, 20), "num_output: 8 kernel_size: 1", "gemm_1x1"),
])
def test_default_engine_is_the_one_that_pays(layer_type, shape, spec, want):
    layer, _, _ = make_layer(conv_text(layer_type, spec), [np.zeros(shape, np.float32)])
    assert layer.engine_name == want


@pytest.mark.parametrize("blas,pool,shape,want", [
    ("1", "1", (2, 512, 14, 14), True), ("2", "1", (2, 512, 14, 14), False),    # 32 4x4 tiles
    ("2", "2", (2, 512, 14, 14), True),
    ("1", "1", (2, 256, 13, 13), True), ("2", "1", (2, 256, 13, 13), False),    # 32 tiles
    ("2", "2", (2, 256, 13, 13), True),
    ("1", "1", (1, 512, 14, 14), False), ("2", "2", (1, 512, 14, 14), False),   # 16 tiles
    ("1", "1", (10, 512, 7, 7), False), ("2", "2", (10, 512, 7, 7), False),     # 7x7 maps
    ("2", "1", (3, 256, 13, 13), True)])                                        # 48 tiles
def test_default_winograd_threshold_follows_the_blas_thread_count(blas, pool, shape, want, env_switch):
    """At one BLAS thread Winograd pays from 24 4x4 tiles; at more, where im2col's one GEMM splits
    well over BLAS's threads, from 48 (conv_engines.WINOGRAD_MIN_TILES), unless the kernels' pool
    runs the transform GEMMs side by side (from 32); maps from 13x13 either way (7x7 ones would cost
    more filter-cache memory than they save time); DEFAULT's Winograd then always gets F(4x4)."""
    env_switch("OMP_NUM_THREADS", blas)
    env_switch("MINICAFFE_THREADS", pool)
    layer, _, _ = make_layer(conv_text("Convolution", "num_output: 8 kernel_size: 3 pad: 1"),
                             [np.zeros(shape, np.float32)])
    assert (layer.engine_name == "winograd") is want
    if want:
        assert layer.engine.tile == 4


def test_winograd_tile_size_follows_the_batch_tile_count():
    """DEFAULT's Winograd runs F(4x4) (24 4x4 tiles or more, as the engine needs to be picked);
    forced on fewer tiles it runs F(2x2), which is ahead of F(4x4) there."""
    layer, _, _ = make_layer(conv_text("Convolution", "num_output: 8 kernel_size: 3 pad: 1"),
                             [np.zeros((4, 128, 14, 14), np.float32)])
    assert layer.engine_name == "winograd" and layer.engine.tile == 4
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 8 kernel_size: 3 pad: 1"),
                                    [np.zeros((1, 128, 7, 7), np.float32)])
    engines.force(layer, "winograd")
    layer.reshape(bottom, top)
    assert layer.engine_name == "winograd" and layer.engine.tile == 2


@pytest.mark.parametrize("cin,cout,pad,want", [
    (256, 256, 1, True), (512, 256, 1, True), (64, 64, 0, True), (128, 128, 2, True),
    (128, 256, 1, True),        # widens: pays since the weight gradient left the columns too
    (32, 32, 1, False), (256, 256, 3, False)])
@pytest.mark.parametrize("num", [1, 4])
def test_default_winograd_data_gradient_where_it_pays(cin, cout, pad, want, num):
    """By shape: 4 images of 16x16 give the 64 4x4 tiles it needs, one image too few."""
    layer, bottom, top = make_layer(conv_text("Convolution", f"num_output: {cout} kernel_size: 3 pad: {pad}"),
                                    [np.zeros((num, cin, 16, 16), np.float32)])
    engines.force(layer, "winograd")
    layer.reshape(bottom, top)
    assert layer.engine.data_grad is (want and num == 4)
    engines.force(layer, None)


@pytest.mark.parametrize("shape,want", [
    ((4, 64, 28, 28), True),           # 196 tiles of a 28x28 map
    ((1, 64, 28, 28), False),          # 49 tiles
    ((16, 64, 14, 14), True),          # 256 tiles of a 14x14 map
    ((4, 64, 13, 13), True),           # 64 tiles of a 13x13 map (CaffeNet's conv3)
    ((3, 64, 14, 14), False),          # 48 tiles
    ((1, 64, 56, 56), True)])
def test_default_winograd_weight_gradient_where_it_pays(shape, want):
    layer, _, _ = make_layer(conv_text("Convolution", "num_output: 64 kernel_size: 3 pad: 1"),
                             [np.zeros(shape, np.float32)])
    assert layer.engine_name == "winograd" and layer.engine.weight_grad is want


@pytest.mark.parametrize("threads,shape,spec,want", [
    ("1", (4, 64, 14, 14), "num_output: 128 kernel_size: 3 pad: 1", True),
    ("2", (4, 64, 14, 14), "num_output: 128 kernel_size: 3 pad: 1", True),
    ("2", (1, 64, 14, 14), "num_output: 128 kernel_size: 3 pad: 1", False),           # 16 tiles
    ("1", (4, 128, 14, 14), "num_output: 64 kernel_size: 3 pad: 1", True),            # widens
    ("1", (4, 64, 14, 14), "num_output: 64 kernel_size: 3 pad: 3", False),            # pad > 2
    ("1", (4, 64, 14, 14), "num_output: 64 kernel_size: 3 stride: 2 pad: 1", False)])
def test_default_deconvolution_takes_winograd_where_its_forward_pays(threads, shape, spec, want, env_switch):
    """Deconvolution's forward is a convolution's data gradient: Winograd where that pays."""
    env_switch("OMP_NUM_THREADS", threads)
    env_switch("MINICAFFE_THREADS", threads)
    layer, _, _ = make_layer(conv_text("Deconvolution", spec), [np.zeros(shape, np.float32)])
    assert (layer.engine_name == "winograd") is want


@pytest.mark.parametrize("blas,pool", [("2", "2"), ("2", "1"), ("1", "2")])
def test_default_winograd_data_gradient_at_any_thread_count(blas, pool, env_switch):
    """Measured to pay at two threads too once its transforms ran on the kernels' pool (VGG-16
    forward + backward 0.90x), so the thread count does not decide it."""
    env_switch("OMP_NUM_THREADS", blas)
    env_switch("MINICAFFE_THREADS", pool)
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 256 kernel_size: 3 pad: 1"),
                                    [np.zeros((1, 256, 32, 32), np.float32)])     # 64 4x4 tiles
    assert layer.engine_name == "winograd" and layer.engine.data_grad is True


def test_winograd_is_switched_off_by_the_environment_at_reshape(env_switch):
    env_switch("MINICAFFE_WINOGRAD", "0")
    layer, _, _ = make_layer(conv_text("Convolution", "num_output: 8 kernel_size: 3 pad: 1"),
                             [np.zeros((1, 256, 56, 56), np.float32)])
    assert layer.engine_name == "im2col_bands"


@pytest.fixture
def no_cudnn():
    """cuDNN absent (the context holds what ``cudnn.library()`` holds when it cannot load one)."""
    ctx = context.current()
    saved = ctx.cudnn
    ctx.cudnn = cudnn.Missing("cuDNN 9 not found (the test removed it)")
    yield
    ctx.cudnn = saved


def _gpu_picks():
    picks = {}
    for layer_type, spec, shape in (("Convolution", "kernel_size: 3 pad: 1", (4, 256, 14, 14)),
                                    ("Convolution", "kernel_size: 1", (2, 16, 8, 8)),
                                    ("Convolution", "kernel_size: 1 stride: 2", (1, 16, 40, 40)),
                                    ("Deconvolution", "kernel_size: 4 stride: 2", (2, 8, 6, 6))):
        layer, _, _ = make_layer(conv_text(layer_type, f"num_output: 4 {spec}"), [np.zeros(shape, np.float32)])
        picks[layer_type, spec] = layer.engine_name
    return picks


def test_default_engine_on_gpu_is_cudnn(gpu):
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    assert set(_gpu_picks().values()) == {"cudnn"}


def test_default_engine_on_gpu_without_cudnn_is_the_cupy_engine(gpu, no_cudnn):
    assert cudnn.available() == (False, "cuDNN 9 not found (the test removed it)")
    assert _gpu_picks() == {("Convolution", "kernel_size: 3 pad: 1"): "cuda_im2col",
                            ("Convolution", "kernel_size: 1"): "gemm_1x1",
                            ("Convolution", "kernel_size: 1 stride: 2"): "cuda_im2col",
                            ("Deconvolution", "kernel_size: 4 stride: 2"): "cuda_im2col"}


def test_cudnn_switched_off_by_the_environment_falls_back(gpu, env_switch):
    env_switch("MINICAFFE_CUDNN", "0")
    assert cudnn.available() == (False, "MINICAFFE_CUDNN=0")
    assert "cudnn" not in _gpu_picks().values()


def test_engine_follows_a_new_shape_and_a_mode_switch(gpu, no_cudnn):
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 4 kernel_size: 3 pad: 1"),
                                    [np.zeros((4, 3, 9, 9), np.float32)])
    assert layer.engine_name == "cuda_im2col"
    backend.set_mode_cpu()
    layer.reshape(bottom, top)
    assert layer.engine_name == "im2col_batch_last"
    bottom[0].reshape(2, 3, 9, 9)
    layer.reshape(bottom, top)
    assert layer.engine_name == "im2col"


def test_forcing_an_engine_that_cannot_compute_the_shape_names_the_layer():
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 4 kernel_size: 3 stride: 2"),
                                    [np.zeros((1, 2, 9, 9), np.float32)])
    engines.force(layer, "winograd")
    with pytest.raises(NetError, match=r"^layer 'conv' \(Convolution\): engine winograd does not apply"):
        layer.reshape(bottom, top)


# --- the engine: field ----------------------------------------------------------------------------
NET = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 4 dim: 3 dim: 10 dim: 10 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 {engine} weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "up" type: "Deconvolution" bottom: "conv1" top: "up"
  convolution_param {{ num_output: 2 kernel_size: 1 {engine} weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
"""


def test_engine_caffe_in_a_prototxt_runs_the_reference():
    x = np.random.default_rng(5).standard_normal((4, 3, 10, 10)).astype(np.float32)
    outputs = {}
    for engine in ("", "engine: CAFFE"):
        caffe.set_random_seed(7)
        net = caffe.Net(load_net_param(NET.format(engine=engine)), caffe.TEST)
        names = [net.layer_dict[n].engine_name for n in ("conv1", "up")]
        assert names == ([REF, REF] if engine else ["im2col_batch_last", "gemm_1x1"])
        outputs[engine] = net.forward(data=x)["up"].copy()
    np.testing.assert_allclose(outputs["engine: CAFFE"], outputs[""], rtol=1e-5, atol=1e-5)


def test_engine_cudnn_without_cudnn_is_one_line_naming_the_layer():
    with pytest.raises(NetError, match=r"^layer 'conv1' \(Convolution\): engine: CUDNN was asked for") as info:
        caffe.Net(load_net_param(NET.format(engine="engine: CUDNN")), caffe.TEST)
    assert "\n" not in str(info.value)


def test_engine_cudnn_on_the_gpu_runs_cudnn(gpu):
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    x = np.random.default_rng(5).standard_normal((4, 3, 10, 10)).astype(np.float32)
    outputs = {}
    for engine in ("engine: CUDNN", "engine: CAFFE"):
        caffe.set_random_seed(7)
        net = caffe.Net(load_net_param(NET.format(engine=engine)), caffe.TEST)
        names = {net.layer_dict[n].engine_name for n in ("conv1", "up")}
        assert names == ({"cudnn"} if engine == "engine: CUDNN" else {REF})
        outputs[engine] = net.forward(data=x)["up"].copy()
    np.testing.assert_allclose(outputs["engine: CUDNN"], outputs["engine: CAFFE"], rtol=1e-5, atol=1e-5)


def test_engine_cudnn_on_the_gpu_without_cudnn_is_one_line_naming_the_layer(gpu, no_cudnn):
    with pytest.raises(NetError, match=r"^layer 'conv1' \(Convolution\): engine: CUDNN was asked for") as info:
        caffe.Net(load_net_param(NET.format(engine="engine: CUDNN")), caffe.TEST)
    assert "\n" not in str(info.value)


def test_im2col_ignores_the_engine_field_as_caffe_does():
    """Caffe's Im2col layer has no engine switch: the convolution_param it shares with Convolution
    may say CUDNN without harm."""
    layer, bottom, top = make_layer('name: "col" type: "Im2col" convolution_param { kernel_size: 3 engine: CUDNN }',
                                    [np.zeros((1, 2, 5, 5), np.float32)])
    assert layer.engine_name == "im2col"


def test_winograd_f4x4_compiled_transforms_agree_with_the_numpy_ones(env_switch):
    """The compiled F(4x4) transforms against the NumPy stacked GEMMs, float32, on VGG-like and
    ragged shapes in several bands: equal to float32 rounding (the two add in other orders), and
    the compiled output is the same bits at one and two threads (every tile is computed alone)."""
    rng = np.random.default_rng(13)
    for n, c, k, h, w in ((2, 64, 32, 30, 27), (3, 16, 24, 9, 14), (1, 8, 8, 4, 5)):
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        def run():
            y = np.empty((n, k, h, w), np.float32)
            winograd.forward(x, wt, y, 1, 1, tile=4, band=2)
            return y
        out = _numpy_compiled_and_two_threads(env_switch, run)
        scale = np.abs(out["0", "1"]).max()
        np.testing.assert_allclose(out["1", "1"], out["0", "1"], rtol=0, atol=2e-6 * scale)
        assert out["1", "1"].tobytes() == out["1", "2"].tobytes()


@pytest.mark.parametrize("spec,images", [("num_output: 5 kernel_size: 7 stride: 2 pad: 3", 1),    # a chunk an image
                                         ("num_output: 5 kernel_size: 7 stride: 2 pad: 3", None),
                                         ("num_output: 6 kernel_size: 3 pad: 1 group: 3", None)])
def test_weight_gradient_without_a_data_gradient_runs_in_fixed_groups(spec, images, env_switch, monkeypatch):
    """A first layer's backward (no data gradient): the chunks of images (or the batch, split) in
    WGRAD_PARTS groups side by side, each into its own partial. The float64 result is the
    reference's; the float32 bits are the same at one thread and at two (the groups are fixed by the
    chunks, not by the threads); every group ran."""
    x = np.random.default_rng(37).standard_normal((6, 3, 15, 14))
    with backend.float64_blobs():
        layer, bottom, top = make_layer(conv_text("Convolution", spec), [x])
    opts = {} if images is None else {"max_col_elements": images * 3 * 49 * 8 * 7}
    name = "im2col_channels_last"
    chunks = []
    real = conv_engines.Im2colConv._weight_grad_in_parts
    monkeypatch.setattr(conv_engines.Im2colConv, "_weight_grad_in_parts",
                        lambda self, dy, x, dw, ch: chunks.append(list(ch)) or real(self, dy, x, dw, ch))
    _assert_same(_run(layer, bottom, top, name, opts), _run(layer, bottom, top, REF))
    # the weight-gradient-only pass took the groups: 6 chunks of an image, or the batch in chunks of 2
    assert chunks == [[(n, n + 1) for n in range(6)] if images else [(0, 2), (2, 4), (4, 6)]]
    one, two = _float32_weight_gradient_at_one_and_two_threads(spec, x, name, opts, False, env_switch)
    assert one.tobytes() == two.tobytes()


@pytest.mark.parametrize("spec,channels", [("num_output: 5 kernel_size: 7 stride: 2 pad: 3", 3),
                                           ("num_output: 4 kernel_size: 3 stride: 2", 3),    # (kh, kw, c) == (c, kh, kw)
                                           ("num_output: 6 kernel_size: 3 stride: 3 pad: 1 group: 2", 4),
                                           ("num_output: 6 kernel_h: 5 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 2", 2)])
def test_first_layer_weight_gradient_on_position_major_columns(spec, channels, env_switch, monkeypatch):
    """A strided first layer's weight gradient (no data gradient: channels_last_strided_wide, made to
    hold on small maps here) an image's GEMM at a time on the forward's position-major columns,
    into partials in (cout, kh, kw, C/G) order that are permuted as they are added: the reference's
    numbers in float64 (square kernels over as many channels as the kernel is wide included, where
    the wrong permutation would still fit the weights' shape), every image through that path, and
    the same float32 bits at one thread and at two."""
    monkeypatch.setattr(conv_engines, "COL_BAND_MIN_WIDTH", 1)
    x = np.random.default_rng(43).standard_normal((5, channels, 15, 14))
    with backend.float64_blobs():
        layer, bottom, top = make_layer(conv_text("Convolution", spec), [x])
    assert conv_engines.channels_last_strided_wide(layer.conv)
    images = []
    real = conv_engines.ChannelsLastConv._chunk_weight_grad
    monkeypatch.setattr(conv_engines.ChannelsLastConv, "_chunk_weight_grad",
                        lambda self, dy, x, n0, n1, out: images.extend(range(n0, n1)) or real(self, dy, x, n0, n1, out))
    _assert_same(_run(layer, bottom, top, "im2col_channels_last"), _run(layer, bottom, top, REF))
    assert sorted(images) == list(range(5))      # the weights-only backward; the others keep their path
    one, two = _float32_weight_gradient_at_one_and_two_threads(spec, x, "im2col_channels_last", {}, False,
                                                                env_switch)
    assert one.tobytes() == two.tobytes()


# --- Winograd F(2x2, 5x5) and F(3x3, 5x5) -----------------------------------------------------------

WINOGRAD5_CASES = ["k5p2", "k5odd", "k5p4", "k5pad_h3", "k5g2", "narrow5"]


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("case", WINOGRAD5_CASES)
@pytest.mark.parametrize("band", [1, None])
@pytest.mark.parametrize("tile", [2, 3])
@pytest.mark.parametrize("dy_channels_last", [False, True])
def test_winograd_5x5_matches_the_reference(layer_type, case, band, tile, dy_channels_last, f4_transforms,
                                            monkeypatch):
    """5x5 stride-1 kernels through F(2x2, 5x5) or F(3x3, 5x5) (``tile``): forward, data gradient
    (pads 0 to 4) and weight gradient (F(5x5, 2x2) or F(5x5, 3x3), dy's tiles channels first or
    last: GRAD_TILES_CHANNELS_LAST_MIN_OUT 1, from the data gradient's padded dy where it fits)
    against the reference in float64, in bands of one tile row (ragged) or the default, groups,
    odd sizes (not multiples of 2 or 3); the compiled transforms and the NumPy twins (where the
    weight gradient takes the columns)."""
    if dy_channels_last:
        monkeypatch.setattr(winograd, "GRAD_TILES_CHANNELS_LAST_MIN_OUT", 1)
    layer, bottom, top = _layer(layer_type, case)
    ref = _run(layer, bottom, top, REF)
    options = {"band_rows": band, "data_grad": True, "weight_grad": True, "tile": tile}
    _assert_same(_run(layer, bottom, top, "winograd", options), ref)


def test_winograd_5x5_weight_gradient_passes_the_gradient_check():
    x = np.random.default_rng(19).standard_normal((2, 2, 7, 6))
    text = conv_text("Convolution", "num_output: 3 kernel_size: 5 pad: 2")
    check_gradient(text, [x], setup_hook=lambda layer, b, t: engines.force(
        layer, "winograd", data_grad=True, weight_grad=True))


def test_winograd_5x5_shares_the_input_transform_of_f4x4():
    """F(2x2, 5x5) from the same five points as F(4x4, 3x3): the same 6x6 B^T (so one compiled input
    transform serves both, tiles 4 or 2 apart), a 2x6 A^T and a 6x5 G (``matrices`` checks the
    identity exactly)."""
    at, g, bt = winograd.MATRICES5
    assert at.shape == (2, 6) and g.shape == (6, 5)
    np.testing.assert_array_equal(bt, winograd.matrices(winograd.POINTS[4])[2])
    np.testing.assert_array_equal(at, [[1, 1, 1, 1, 1, 0], [0, 1, -1, .5, -2, 1]])


def test_winograd_3x3_5x5_matrices():
    """F(3x3, 5x5) from six finite points (POINTS3X5): a 7x7 B^T, a 3x7 A^T and a 7x5 G (``matrices``
    checks the identity exactly), the A^T the compiled output transform writes out."""
    at, g, bt = winograd.MATRICES3X5
    assert at.shape == (3, 7) and g.shape == (7, 5) and bt.shape == (7, 7)
    np.testing.assert_array_equal(at, [[1, 1, 1, 1, 1, 1, 0], [0, 1, -1, .5, -2, 2, 0], [0, 1, 1, .25, 4, 4, 1]])
    np.testing.assert_array_equal(bt[3], [0, 4, 0, -5, 0, 1, 0])


@pytest.mark.parametrize("tile", [2, 3])
def test_winograd_5x5_float32_error_on_a_caffenet_conv2_group(tile):
    """Float32 F(2x2, 5x5) and F(3x3, 5x5) against float64, relative to max|y|, on a CaffeNet conv2
    group (48 -> 128 channels, 27x27, pad 2, He-initialised weights): bound 1e-5 as for F(4x4)
    (measured ~1e-6 and ~3e-6)."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((1, 48, 27, 27)).astype(np.float32)
    w = (rng.standard_normal((128, 48, 5, 5)) * np.sqrt(2 / (25 * 48))).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (2, 2), (2, 2))),
                                                       (5, 5), axis=(2, 3))
    want = np.einsum("nchwkl,ockl->nohw", windows, w.astype(np.float64), optimize=True)
    y = np.empty((1, 128, 27, 27), np.float32)
    winograd.forward(x, w, y, 2, 2, tile=tile)
    assert np.abs(y - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("tile", [2, 3])
def test_winograd_5x5_compiled_transforms_agree_with_the_numpy_ones(tile, env_switch):
    """The compiled F(2x2, 5x5) or F(3x3, 5x5) forward and its weight gradient (F(5x5, 2x2) or
    F(5x5, 3x3)) against the NumPy twins, float32, on ragged shapes in bands: equal to float32
    rounding, the same bits at one and two threads; dy's tile transform the same bits as its twin."""
    from minicaffe.kernels import compiled
    rng = np.random.default_rng(29)
    for n, c, k, h, w, p in ((2, 16, 24, 17, 22, 2), (1, 8, 8, 5, 6, 1), (3, 12, 6, 9, 8, 4)):
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = rng.standard_normal((k, c, 5, 5)).astype(np.float32)
        oh, ow = h + 2 * p - 4, w + 2 * p - 4
        dy = rng.standard_normal((n, k, oh, ow)).astype(np.float32)

        def run():
            y = np.empty((n, k, oh, ow), np.float32)
            winograd.forward(x, wt, y, p, p, band=2, tile=tile)
            dw = np.zeros_like(wt)
            winograd.weight_gradient(x, dy, dw, p, p, band=2, tile=tile)
            return y, dw
        out = _numpy_compiled_and_two_threads(env_switch, run)
        # F(5x5, 3x3)'s weight gradient rounds more (conv_engines.WINOGRAD5_WEIGHT_GRAD_*)
        for part, bound in ((0, 4e-6), (1, 4e-6 if tile == 2 else 2e-5)):
            scale = np.abs(out["0", "1"][part]).max()
            np.testing.assert_allclose(out["1", "1"][part], out["0", "1"][part], rtol=0, atol=bound * scale)
            assert out["1", "1"][part].tobytes() == out["1", "2"][part].tobytes()
        tw, th = -(-ow // tile), -(-oh // tile)
        rows = min(2, th)
        tiles = np.empty(((tile + 4) ** 2, k, n * rows * tw), np.float32)
        kernel = compiled.winograd3x5_gradient_tiles if tile == 3 else compiled.winograd2x5_gradient_tiles
        compiled.get(kernel)(dy, tiles, th - rows, rows, tw, 0, k)
        assert tiles.tobytes() == winograd._gradient_tiles_numpy(dy, th - rows, rows, tw, tile).tobytes()


@pytest.mark.parametrize("shape,spec,want", [
    ((32, 96, 27, 27), "num_output: 256 kernel_size: 5 pad: 2 group: 2", True),     # CaffeNet conv2, TRAIN
    ((10, 96, 27, 27), "num_output: 256 kernel_size: 5 pad: 2 group: 2", True),     # ... at batch 10
    ((4, 96, 27, 27), "num_output: 256 kernel_size: 5 pad: 2 group: 2", False),     # 784 tiles
    ((16, 32, 28, 28), "num_output: 96 kernel_size: 5 pad: 2", True),               # GoogLeNet 3b/5x5
    ((16, 16, 28, 28), "num_output: 32 kernel_size: 5 pad: 2", False),              # 3a/5x5: thin
    ((16, 32, 14, 14), "num_output: 128 kernel_size: 5 pad: 2", False),             # 4e/5x5: 14²
    ((16, 48, 7, 7), "num_output: 128 kernel_size: 5 pad: 2", False),               # 5b/5x5: 7²
    ((32, 96, 27, 27), "num_output: 256 kernel_size: 5 pad: 2 stride: 2", False)])  # strided
def test_default_winograd_5x5_where_it_pays(shape, spec, want):
    """DEFAULT takes Winograd for the forward and the data gradient where WINOGRAD5_* say (wide
    groups on maps from 20x20), its weight gradient on groups of 32 -> 96 channels and more
    (WINOGRAD5_WEIGHT_GRAD_*: CaffeNet's conv2 and GoogLeNet's 3b); F(3x3, 5x5) where the compiled
    kernels run (winograd.tile_size), else F(2x2, 5x5)."""
    from minicaffe.kernels import compiled
    layer, _, _ = make_layer(conv_text("Convolution", spec), [np.zeros(shape, np.float32)])
    assert (layer.engine_name == "winograd") is want
    if want:
        assert layer.engine.data_grad and layer.engine.weight_grad
        assert layer.engine.tile == layer.engine.grad_tile == (3 if compiled.enabled() else 2)


# --- a strided layer cut into blocks (kernels/space_to_depth.py) ----------------------------------
@pytest.mark.parametrize("shape,step,pads,rows,cols", [
    ((2, 3, 35, 31), 4, (0, 0), 10, 10), ((1, 2, 13, 12), 2, (1, 0), 10, 6), ((2, 1, 20, 17), 3, (4, 2), 6, 10)])
def test_space_to_depth_source_compiled_is_its_numpy_twin(shape, step, pads, rows, cols, env_switch):
    """The blocked input (zero past the input's edge, rows and columns beyond it or short of it),
    from the compiled kernel at one and two threads and from the NumPy twin: the same bits; and
    each value where the definition puts it."""
    from minicaffe.kernels import space_to_depth
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    out = _numpy_compiled_and_two_threads(
        env_switch, lambda: space_to_depth.source(x, step, *pads, rows, cols).copy())
    assert out["1", "1"].tobytes() == out["0", "1"].tobytes() == out["1", "2"].tobytes()
    src = out["1", "2"]
    n, c, h, w = shape
    for (k, i, j, ch, a, b) in [(0, 0, 0, 0, 0, 0), (n - 1, rows - 1, cols - 1, c - 1, step - 1, step - 1),
                                (n - 1, 2, 1, c - 1, 1, step - 1), (0, 1, 3, 0, step - 1, 0)]:
        r, q = step * i + a - pads[0], step * j + b - pads[1]
        want = x[k, ch, r, q] if 0 <= r < h and 0 <= q < w else 0.0
        assert src[k, i, j, (ch * step + a) * step + b] == want


def test_space_to_depth_filters_put_each_tap_in_its_block():
    """A tap (ky, kx) of the strided kernel is block tap (ky // s, kx // s) of channel (c*s + ky %
    s)*s + kx % s; the padded taps are zero."""
    from minicaffe.kernels import space_to_depth
    w = np.random.default_rng(4).standard_normal((2, 3, 11, 11)).astype(np.float32)
    blocked = space_to_depth.filters(w, 4)
    assert blocked.shape == (2, 48, 3, 3)
    for o, c, ky, kx in [(0, 0, 0, 0), (1, 2, 10, 10), (1, 1, 5, 9), (0, 2, 8, 3)]:
        assert blocked[o, (c * 4 + ky % 4) * 4 + kx % 4, ky // 4, kx // 4] == w[o, c, ky, kx]
    assert np.count_nonzero(blocked) == w.size


def test_space_to_depth_forward_in_float32_matches_the_reference_at_caffenet_size():
    """CaffeNet's conv1 shape (fewer images and outputs): the Winograd forward over the blocks
    against the reference to float32 rounding."""
    x = np.random.default_rng(5).standard_normal((2, 3, 227, 227)).astype(np.float32)
    layer, bottom, top = make_layer(conv_text("Convolution", "num_output: 8 kernel_size: 11 stride: 4"), [x])
    assert layer.engine_name == "winograd_space_to_depth"
    got = forward(layer, bottom, top)[0].copy()
    engines.force(layer, REF)
    want = forward(layer, bottom, top)[0]
    engines.force(layer, None)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_space_to_depth_without_compiled_kernels_runs_the_columns(env_switch, monkeypatch):
    """MINICAFFE_COMPILED=0: the engine's forward is ChannelsLastConv's (no blocked source)."""
    from minicaffe.kernels import space_to_depth
    layer, bottom, top = _layer("Convolution", "k11s4")
    ref = _run(layer, bottom, top, REF)
    env_switch("MINICAFFE_COMPILED", "0")
    calls = []
    monkeypatch.setattr(space_to_depth, "source", lambda *a, **k: calls.append(a))
    _assert_same(_run(layer, bottom, top, "winograd_space_to_depth"), ref)
    assert calls == []
