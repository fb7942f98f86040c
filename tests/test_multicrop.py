"""Crop schemes at the papers' counts and positions, crop extraction, preprocessing, top-k error, and
the Classifier with the schemes."""
import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import io as caffe_io
from minicaffe.errors import DataError, MinicaffeError, ShapeError
from minicaffe.classifier import MultiCropClassifier
from minicaffe.multicrop import (Crop, Preprocessor, alexnet_10, center_crop, default_scales, evaluate_crops,
                                 evaluate_dense, extract_crops, googlenet_144, grid_positions, make_crops,
                                 rescaled_size, topk_error, vgg_150)
from minicaffe.surgery import convert_fc_to_conv


def _inside(crops):
    for c in crops:
        assert 0 <= c.y0 < c.y1 <= c.size[0] and 0 <= c.x0 < c.x1 <= c.size[1], c


def _mirrored_halves(crops):
    half = len(crops) // 2
    assert [c.flip for c in crops] == [False] * half + [True] * half
    assert [c._replace(flip=False) for c in crops[half:]] == crops[:half]


def _boxes(crops):
    return [(c.y0, c.x0, c.y1, c.x1) for c in crops]


# --- schemes -------------------------------------------------------------------------------------

def test_alexnet_10_corners_centre_and_mirrors_in_pycaffe_order():
    crops = alexnet_10((10, 12), 6)
    assert len(crops) == 10
    assert _boxes(crops[:5]) == [(0, 0, 6, 6), (0, 6, 6, 12), (4, 0, 10, 6), (4, 6, 10, 12), (2, 3, 8, 9)]
    _mirrored_halves(crops)
    _inside(crops)
    assert {c.size for c in crops} == {(10, 12)}
    # the same pixels as pycaffe's oversample
    img = np.random.default_rng(0).random((10, 12, 3)).astype(np.float32)
    np.testing.assert_array_equal(extract_crops(img, crops, 6), caffe_io.oversample([img], (6, 6)))


def test_alexnet_10_with_a_shorter_side_uses_the_central_square():
    crops = alexnet_10((20, 30), 6, side=10)           # resized to 10x15, central square at x 2..12
    assert {c.size for c in crops} == {(10, 15)}
    assert _boxes(crops[:5]) == [(0, 2, 6, 8), (0, 6, 6, 12), (4, 2, 10, 8), (4, 6, 10, 12), (2, 4, 8, 10)]
    crops = alexnet_10((20, 30), 6, image_size=(8, 8))  # pycaffe Classifier's image_dims: warp
    assert {c.size for c in crops} == {(8, 8)} and _boxes(crops[:1]) == [(0, 0, 6, 6)]


def test_center_crop_is_caffes_test_crop():
    assert center_crop((256, 256), 227) == [Crop(14, 14, 241, 241, False, (256, 256))]
    assert center_crop((9, 20), (4, 6)) == [Crop(2, 7, 6, 13, False, (9, 20))]
    assert center_crop((30, 60), 8, side=10) == [Crop(1, 6, 9, 14, False, (10, 20))]


def test_googlenet_144_landscape_positions():
    crops = googlenet_144((20, 30), 8, scales=(10, 12, 14, 16))
    assert len(crops) == 4 * 3 * 6 * 2 == 144
    _mirrored_halves(crops)
    _inside(crops)
    first = crops[:18]                                 # scale 10: image 10x15, squares at x 0, 2, 5
    assert {c.size for c in first} == {(10, 15)}
    expected = []
    for x in (0, 2, 5):
        expected += [(0, x, 8, x + 8), (0, x + 2, 8, x + 10), (2, x, 10, x + 8), (2, x + 2, 10, x + 10),
                     (1, x + 1, 9, x + 9), (0, x, 10, x + 10)]      # 4 corners, centre, whole square
    assert _boxes(first) == expected
    assert [c.size for c in crops[:72:18]] == [(10, 15), (12, 18), (14, 21), (16, 24)]


def test_googlenet_144_portrait_takes_top_centre_bottom():
    crops = googlenet_144((30, 20), 8, scales=(10, 12, 14, 16))
    squares = [c for c in crops[:18] if c.y1 - c.y0 == 10]
    assert _boxes(squares) == [(0, 0, 10, 10), (2, 0, 12, 10), (5, 0, 15, 10)]
    assert crops[0].size == (15, 10)
    _inside(crops)


def test_googlenet_whole_square_crop_is_the_square_resized():
    img = np.random.default_rng(1).random((20, 30, 3)).astype(np.float32)
    crops = googlenet_144((20, 30), 8, scales=(10, 12, 14, 16))
    out = extract_crops(img, crops, 8)
    assert out.shape == (144, 8, 8, 3)
    small = cv2.resize(img, (15, 10), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(out[5], cv2.resize(small[0:10, 0:10], (8, 8), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out[0], small[0:8, 0:8])
    np.testing.assert_array_equal(out[72], out[0][:, ::-1])          # its mirror


def test_vgg_150_grid_spacing_scales_and_flips():
    crops = vgg_150((40, 60), 8, scales=(16, 24, 32))
    assert len(crops) == 5 * 5 * 2 * 3 == 150
    _inside(crops)
    first = crops[:50]                                 # scale 16: 16x24, grid 0,2,4,6,8 x 0,4,...,16
    assert {c.size for c in first} == {(16, 24)}
    _mirrored_halves(first)
    assert _boxes(first[:25]) == [(y, x, y + 8, x + 8) for y in (0, 2, 4, 6, 8) for x in (0, 4, 8, 12, 16)]
    assert [c.size for c in crops[::50]] == [(16, 24), (24, 36), (32, 48)]
    # every scale's grid reaches the far corner
    for block in (crops[:25], crops[50:75], crops[100:125]):
        assert block[-1].y1 == block[-1].size[0] and block[-1].x1 == block[-1].size[1]
    img = np.random.default_rng(2).random((40, 60)).astype(np.float32)
    out = extract_crops(img, crops, 8)
    assert out.shape == (150, 8, 8, 1)
    np.testing.assert_array_equal(out[25:50], out[:25][:, :, ::-1])


def test_grid_positions_and_rescaling():
    assert grid_positions(16, 8, 5) == [0, 2, 4, 6, 8]
    assert grid_positions(8, 8, 5) == [0, 0, 0, 0, 0]
    assert rescaled_size((20, 30), 10) == (10, 15)
    assert rescaled_size((30, 20), 10) == (15, 10)
    assert rescaled_size((375, 500), 256) == (256, 341)


def test_make_crops_dispatch_and_default_scales():
    assert len(make_crops("1", (10, 10), 8)) == 1
    assert len(make_crops("10", (10, 10), 8)) == 10
    assert default_scales("150", 224) == (256, 384, 512)
    assert default_scales("144", 224) == (256, 288, 320, 352)
    assert default_scales("150", 32) == (37, 55, 73)
    assert {c.size for c in make_crops("150", (40, 40), 32)} == {(37, 37), (55, 55), (73, 73)}
    assert len(make_crops("144", (40, 50), 32, scales=[32, 36, 40, 44])) == 144
    with pytest.raises(MinicaffeError, match="unknown crop scheme '7'"):
        make_crops("7", (10, 10), 8)
    with pytest.raises(MinicaffeError, match="takes one scale"):
        make_crops("10", (10, 10), 8, scales=[8, 9])


def test_crops_that_do_not_fit_are_errors():
    with pytest.raises(ShapeError, match="10-crop: a 12x12 crop does not fit in an image of 10x10"):
        alexnet_10((10, 10), 12)
    with pytest.raises(ShapeError, match="150-crop at scale 6"):
        vgg_150((10, 10), 8, scales=(6,))


# --- preprocessing and scoring ----------------------------------------------------------------------

def test_preprocessor_matches_pycaffe_transformer():
    rng = np.random.default_rng(3)
    batch = rng.random((4, 5, 6, 3)).astype(np.float32)
    t = caffe_io.Transformer({"data": (4, 3, 5, 6)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.5)
    ref = t.preprocess_batch("data", batch)
    np.testing.assert_allclose(Preprocessor.from_transformer(t, "data")(batch), ref, rtol=1e-6)
    by_hand = (batch[..., ::-1] * 255 - np.array([104, 117, 123])) * 0.5
    np.testing.assert_allclose(ref, by_hand.transpose(0, 3, 1, 2), rtol=1e-5)
    # a mean image becomes its channel means
    mean_img = rng.random((3, 5, 6)).astype(np.float32)
    p = Preprocessor(mean=mean_img)
    np.testing.assert_allclose(p(batch), batch.transpose(0, 3, 1, 2) - mean_img.mean(axis=(1, 2))[:, None, None],
                               rtol=1e-5, atol=1e-6)


def test_topk_error_hand_values():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])
    labels = [1, 2, 0]
    assert topk_error(probs, labels, 1) == pytest.approx(2 / 3)
    assert topk_error(probs, labels, 2) == pytest.approx(1 / 3)    # the tie at 0.2 counts against
    assert topk_error(probs, labels, 3) == 0.0
    with pytest.raises(MinicaffeError, match="labels must be in \\[0, 3\\)"):
        topk_error(probs, [0, 1, 3], 1)
    with pytest.raises(ShapeError, match="scores for"):
        topk_error(probs, [0, 1], 1)
    with pytest.raises(DataError, match="no images"):
        topk_error(np.zeros((0, 3)), [], 1)


FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.2 }'
NET = f"""name: "small"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 {FILL} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6" inner_product_param {{ num_output: 6 {FILL} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc6" top: "prob" }}
"""


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_evaluate_crops_is_the_mean_of_per_crop_softmax():
    net = caffe.Net(NET, caffe.TEST)
    img = np.random.default_rng(4).random((10, 12, 3)).astype(np.float32)
    crops = caffe_io.oversample([img], (8, 8)).transpose(0, 3, 1, 2)
    net.blobs["data"].reshape(crops.shape)
    net.reshape()
    ref = net.forward(data=crops)["prob"].mean(axis=0)
    np.testing.assert_allclose(evaluate_crops(net, img, "10"), ref, atol=1e-6)
    # a net ending in scores gets a softmax per crop before averaging
    scores_net = caffe.Net(NET.replace('layer { name: "prob" type: "Softmax" bottom: "fc6" top: "prob" }', ""),
                           caffe.TEST)
    scores_net.copy_from_proto(net.to_proto())
    scores_net.blobs["data"].reshape(crops.shape)
    scores_net.reshape()
    raw = scores_net.forward(data=crops)["fc6"]
    np.testing.assert_allclose(evaluate_crops(scores_net, img, "10", crop_size=8), _softmax(raw).mean(axis=0),
                               atol=1e-6)
    p150 = evaluate_crops(net, img, "150", scales=(8, 10, 12), batch_size=32)
    assert p150.shape == (6,) and p150.sum() == pytest.approx(1, abs=1e-5)


def test_evaluate_dense_averages_scales_and_flip():
    net = caffe.Net(NET, caffe.TEST)
    conv = convert_fc_to_conv(net)
    img = np.random.default_rng(5).random((12, 16, 3)).astype(np.float32)
    p = evaluate_dense(conv, img, scales=(8, 12))
    from minicaffe.multicrop import resize
    from minicaffe.surgery import dense_scores
    parts = [dense_scores(conv, resize(img, rescaled_size(img.shape, q)).transpose(2, 0, 1)[None], flip=True)[0]
             for q in (8, 12)]
    np.testing.assert_allclose(p, np.mean(parts, axis=0), atol=1e-6)
    assert p.sum() == pytest.approx(1, abs=1e-5)


# --- Classifier ------------------------------------------------------------------------------------

@pytest.fixture
def model_files(tmp_path):
    net = caffe.Net(NET, caffe.TEST)
    proto, weights = tmp_path / "deploy.prototxt", tmp_path / "w.caffemodel"
    proto.write_text(NET)
    net.save(str(weights))
    return str(proto), str(weights)


def test_caffe_classifier_offers_the_papers_schemes(model_files):
    rng = np.random.default_rng(6)
    images = [rng.random((10, 13, 3)).astype(np.float32) for _ in range(3)]
    mean = np.array([0.5, 0.4, 0.3])
    clf = caffe.Classifier(*model_files, image_dims=(10, 10), mean=mean, raw_scale=2.0, channel_swap=(2, 1, 0))
    pre = Preprocessor(mean=mean, raw_scale=2.0, channel_swap=(2, 1, 0))
    net = caffe.Net(model_files[0], caffe.TEST, weights=model_files[1])
    for scheme, scales in (("144", None), ("150", (8, 10, 12)), ("10", (9,))):
        p = clf.predict(images, scheme=scheme, scales=scales)
        assert p.shape == (3, 6)
        # the original 10x13 images rescaled per scale, not the 10x10 image_dims warp
        want = [evaluate_crops(net, im, scheme, scales, preprocess=pre) for im in images]
        np.testing.assert_allclose(p, want, atol=1e-5)
    dense = clf.predict(images, scheme="none", dense=True)
    want = [evaluate_dense(convert_fc_to_conv(net), im, None, pre) for im in images]
    np.testing.assert_allclose(dense, want, atol=1e-5)
    both = clf.predict(images, scheme="150", dense=True)
    np.testing.assert_allclose(both, 0.5 * (dense + clf.predict(images, scheme="150")), atol=1e-6)
    with pytest.raises(MinicaffeError, match="needs dense=True"):
        clf.predict(images, scheme="none")
    # no images: the same DataError as pycaffe's own predict (a file/data problem, not a net's)
    with pytest.raises(DataError, match="Classifier.predict: no images given"):
        clf.predict([], scheme="144")
    # pycaffe's own behaviour is untouched, and the multi-crop path agrees with it on a Softmax net
    multi = MultiCropClassifier(*model_files, image_dims=(10, 10), mean=mean, raw_scale=2.0, channel_swap=(2, 1, 0))
    for oversample in (True, False):
        np.testing.assert_allclose(multi.predict(images, oversample), clf.predict(images, oversample), atol=1e-6)
    # the registry knows the schemes for crops() (144 crops of one image at the default 8/224 ratios)
    from minicaffe.classifier import crops
    assert crops(np.zeros((12, 12, 3), np.float32), (8, 8), "144").shape == (144, 8, 8, 3)


def test_average_crops_rules_by_hand():
    """The one averaging step: Caffe's mean of the output, or the VGG paper's mean of softmax."""
    from minicaffe.multicrop import average_crops
    out = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])       # 2 images × 2 crops
    np.testing.assert_allclose(average_crops(out, 2), [[2.0, 0.0], [0.0, 1.0]])
    e1, e3, e2 = np.exp(1.0), np.exp(3.0), np.exp(2.0)
    want = [[(e1 / (e1 + 1) + e3 / (e3 + 1)) / 2, (1 / (e1 + 1) + 1 / (e3 + 1)) / 2],
            [(1 / (1 + e2) + 0.5) / 2, (e2 / (1 + e2) + 0.5) / 2]]
    np.testing.assert_allclose(average_crops(out, 2, "softmax"), want)
    np.testing.assert_allclose(average_crops(out, 2, "softmax", is_probability=True), average_crops(out, 2))
    # one crop per image: pycaffe's centre-only predict returns the output as it is, shape and all
    assert average_crops(out[:, :, None, None], 1).shape == (4, 2, 1, 1)
    with pytest.raises(MinicaffeError, match="unknown averaging rule 'mean'"):
        average_crops(out, 2, "mean")


def _imports(path, package):
    """The minicaffe modules a source file imports (relative imports resolved, function-level ones
    included: a lazy import is still an edge of the import graph)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] * bool(node.module) + [f"{mod}.{a.name}" for a in node.names]   # a name may be a module
            found.update(n for n in names if n.startswith("minicaffe"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("minicaffe"))
    return found


def test_methods_import_nothing_above_them_and_pycaffe_has_no_cycle():
    """Tiers: methods < pycaffe < tools, imports go down only; classifier <-> multicrop and io <-> vis
    imported each other once. Checked on the source, so a lazy import inside a function counts."""
    import pathlib
    root = pathlib.Path(caffe.__file__).parent
    graph = {}
    for pkg in ("methods", "pycaffe"):
        for path in (root / pkg).glob("*.py"):
            name = f"minicaffe.{pkg}.{path.stem}"
            graph[name] = {m for m in _imports(path, f"minicaffe.{pkg}") if m != name}
    for name, deps in graph.items():
        if name.startswith("minicaffe.methods."):
            assert not [d for d in deps if d.startswith(("minicaffe.pycaffe", "minicaffe.tools"))], name

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    cycles = [name for name in graph if not name.endswith("__init__") and name in reach(name)]
    assert not cycles
