"""Classifier (pycaffe's predict: resize, 10-crop or centre crop, average) and the classify tool."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import io as cio
from minicaffe.classifier import CROP_SCHEMES, Classifier, crops, load_labels, register_crop_scheme, top_k
from minicaffe.errors import DataError, MinicaffeError
from minicaffe.tools import classify as classify_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEPLOY = """
name: "tiny_classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def model(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = tmp_path / "tiny.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    return str(deploy), str(weights)


def _images(n, h=11, w=13, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((h, w, 3)).astype(np.float32) for _ in range(n)]


def _manual_scores(deploy, weights, images, image_dims, mean, center_only):
    """pycaffe's predict, written out step by step with Net + Transformer."""
    net = caffe.Net(deploy, caffe.TEST, weights=weights)
    t = cio.Transformer({"data": net.blobs["data"].data.shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", mean)
    t.set_raw_scale("data", 255)
    t.set_channel_swap("data", (2, 1, 0))
    resized = [cio.resize_image(im, image_dims) for im in images]
    scores = []
    for im in resized:
        if center_only:
            y, x = (image_dims[0] - 8) // 2, (image_dims[1] - 8) // 2
            views = [im[y:y + 8, x:x + 8]]
        else:
            views = list(cio.oversample([im], (8, 8)))
        outs = []
        for v in views:
            net.blobs["data"].reshape(1, 3, 8, 8)
            net.blobs["data"].data[0] = t.preprocess("data", v)
            outs.append(net.forward()["prob"][0].copy())
        scores.append(np.mean(outs, axis=0))
    return np.array(scores)


@pytest.mark.parametrize("center_only", [False, True])
def test_predict_matches_pycaffe_steps(model, center_only):
    deploy, weights = model
    mean = np.array([100.0, 110.0, 120.0])
    clf = Classifier(deploy, weights, image_dims=(10, 12), mean=mean, raw_scale=255,
                     channel_swap=(2, 1, 0))
    images = _images(4)       # 4 images × 10 crops = 40, not a multiple of the net's batch of 3
    got = clf.predict(images, oversample=not center_only)
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)
    want = _manual_scores(deploy, weights, images, (10, 12), mean, center_only)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_classifier_defaults_and_errors(model):
    deploy, weights = model
    clf = Classifier(deploy, weights)
    assert list(clf.image_dims) == [8, 8] and list(clf.crop_dims) == [8, 8]
    assert isinstance(clf, caffe.Net) and clf.outputs == ["prob"]
    # whole-image crops: every one of the ten is the (mirrored) image itself
    out = clf.predict(_images(2, 8, 8))
    assert out.shape == (2, 5)
    with pytest.raises(MinicaffeError, match=r"image_dims \(4, 4\) are smaller than the net's input \(8, 8\)"):
        Classifier(deploy, weights, image_dims=(4, 4))
    with pytest.raises(DataError, match="no images"):
        clf.predict([])
    with pytest.raises(DataError, match="one number of channels"):
        clf.predict([np.zeros((8, 8, 3)), np.zeros((8, 8, 1))])
    with pytest.raises(MinicaffeError, match="nope.caffemodel"):
        Classifier(deploy, deploy.replace("deploy.prototxt", "nope.caffemodel"))


def test_crop_schemes():
    im = np.arange(9 * 11 * 2, dtype=np.float32).reshape(9, 11, 2)
    ten = crops(im, (4, 5))
    assert ten.shape == (10, 4, 5, 2)
    np.testing.assert_array_equal(ten, cio.oversample([im], (4, 5)))
    center = crops(im, (4, 5), "center")
    assert center.shape == (1, 4, 5, 2)
    np.testing.assert_array_equal(center[0], im[2:6, 3:8])
    batch = crops(np.stack([im, im + 1]), (4, 5))
    assert batch.shape == (20, 4, 5, 2)
    np.testing.assert_array_equal(batch[10:], ten + 1)
    with pytest.raises(MinicaffeError, match=r"unknown crop scheme 'no-such' \(known: 10, .*center"):
        crops(im, (4, 5), "no-such")


def test_registered_scheme_is_used_by_predict(model):
    deploy, weights = model

    def corners_only(batch, crop_dims):          # e.g. what a later multi-crop scheme plugs in
        return crops(batch, crop_dims, "10").reshape((len(batch), 10) + tuple(crop_dims) + (3,))[:, :4]

    register_crop_scheme("corners", corners_only)
    try:
        clf = Classifier(deploy, weights, image_dims=(10, 10))
        images = _images(2)
        got = clf.predict(images, scheme="corners")
        resized = np.stack([cio.resize_image(im, (10, 10)) for im in images])
        four = crops(resized, (8, 8), "10").reshape(2, 10, 8, 8, 3)[:, :4].reshape(8, 8, 8, 3)
        caffe_in = clf.transformer.preprocess_batch("data", four)
        want = clf.forward_all(data=caffe_in)["prob"].reshape(2, 4, -1).mean(1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    finally:
        CROP_SCHEMES.pop("corners")


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_one_averaging_rule_for_every_scheme(model, tmp_path):
    """Classifier.predict averages the net's output over the crops (Caffe's rule) on every route,
    pycaffe's '10' and the papers' '150' and dense alike; ``average="softmax"`` (MultiCropClassifier's
    default, the VGG paper's rule) is the mean of per-crop softmax probabilities. A net ending in raw
    scores tells the two apart."""
    from minicaffe.classifier import MultiCropClassifier
    from minicaffe.multicrop import Preprocessor, evaluate_crops, evaluate_dense
    from minicaffe.surgery import convert_fc_to_conv

    scores_deploy = tmp_path / "scores.prototxt"
    scores_deploy.write_text(DEPLOY.replace('layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }', ""))
    weights = model[1]
    kw = dict(image_dims=(10, 12), mean=np.array([0.5, 0.4, 0.3]), raw_scale=2.0)
    clf = Classifier(str(scores_deploy), weights, **kw)
    multi = MultiCropClassifier(str(scores_deploy), weights, **kw)
    images = _images(2)
    # pycaffe's 10 crops of the image_dims warp, each crop's raw output by hand
    resized = np.stack([cio.resize_image(im, (10, 12)) for im in images])
    raw = clf.forward_all(data=clf.transformer.preprocess_batch("data", crops(resized, (8, 8))))["fc"]
    raw = raw.reshape(2, 10, -1)
    np.testing.assert_allclose(clf.predict(images), raw.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi.predict(images), _softmax(raw).mean(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(clf.predict(images, average="softmax"), multi.predict(images), rtol=1e-6)
    assert not np.allclose(clf.predict(images), multi.predict(images))
    # the papers' schemes: the same two rules, from the original images
    net = caffe.Net(str(scores_deploy), caffe.TEST, weights=weights)
    pre = Preprocessor(mean=kw["mean"], raw_scale=2.0)
    for average, c in (("output", clf), ("softmax", multi)):
        want = [evaluate_crops(net, im, "150", (8, 10, 12), preprocess=pre, average=average) for im in images]
        np.testing.assert_allclose(c.predict(images, scheme="150", scales=(8, 10, 12)), want, rtol=1e-5, atol=1e-6)
        want = [evaluate_dense(convert_fc_to_conv(net), im, None, pre, average=average) for im in images]
        np.testing.assert_allclose(c.predict(images, scheme="none", dense=True), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MinicaffeError, match="unknown averaging rule 'median'"):
        clf.predict(images, average="median")


def test_labels_and_top_k(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("n0 cat\nn1 dog\nn2 bird\n\n")
    assert load_labels(str(path)) == ["n0 cat", "n1 dog", "n2 bird"]
    idx, scores = top_k(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]), 2)
    np.testing.assert_array_equal(idx, [[1, 2], [0, 2]])
    np.testing.assert_allclose(scores, [[0.7, 0.2], [0.5, 0.3]])
    assert top_k(np.array([[0.1, 0.9]]), 10)[0].shape == (1, 2)
    with pytest.raises(DataError, match="missing.txt: cannot read labels"):
        load_labels(str(tmp_path / "missing.txt"))


# --- the classify tool -----------------------------------------------------------------------

def _write_images(folder, n, seed=0):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        cv2.imwrite(str(p), (rng.random((12, 10, 3)) * 255).astype(np.uint8))
        paths.append(str(p))
    return paths


def test_classify_tool_image_folder_npy(model, tmp_path, capsys):
    deploy, weights = model
    paths = _write_images(tmp_path / "imgs", 3)
    common = ["--model_def", deploy, "--pretrained_model", weights, "--images_dim", "10,10"]
    out = tmp_path / "scores"
    assert classify_tool.main([paths[0], str(out)] + common) == 0
    single = np.load(str(out) + ".npy")                    # .npy appended, as np.save does
    assert single.shape == (1, 5)
    clf = Classifier(deploy, weights, image_dims=(10, 10), raw_scale=255.0, channel_swap=(2, 1, 0))
    np.testing.assert_allclose(single, clf.predict([cio.load_image(paths[0])]), rtol=1e-5)

    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class{i}\n" for i in range(5)))
    out2 = tmp_path / "folder.npy"
    assert classify_tool.main([str(tmp_path / "imgs"), str(out2), "--ext", "png", "--center_only",
                               "--labels", str(labels), "--top_k", "2"] + common) == 0
    folder_scores = np.load(out2)
    assert folder_scores.shape == (3, 5)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == paths[0] and len(lines) == 3 * 3
    best = int(np.argmax(folder_scores[0]))
    assert lines[1] == f'  {folder_scores[0, best]:.4f} - "class{best}"'
    assert "Classifying 3 inputs." in captured.err and "CPU mode" in captured.err

    arr = np.stack([cio.load_image(p) for p in paths])
    np.save(tmp_path / "in.npy", arr)
    mean = tmp_path / "mean.binaryproto"
    mean.write_bytes(cio.array_to_blobproto(np.full((1, 3, 10, 10), 100.0)).SerializeToString())
    out3 = tmp_path / "npy_out.npy"
    assert classify_tool.main([str(tmp_path / "in.npy"), str(out3), "--mean_file", str(mean)] + common) == 0
    clf = Classifier(deploy, weights, image_dims=(10, 10), mean=np.full((3, 10, 10), 100.0), raw_scale=255.0,
                     channel_swap=(2, 1, 0))
    np.testing.assert_allclose(np.load(out3), clf.predict(list(arr)), rtol=1e-5)


def test_classify_tool_errors(model, tmp_path, capsys):
    deploy, weights = model
    common = ["--model_def", deploy, "--pretrained_model", weights]
    out = str(tmp_path / "o.npy")

    def run(args):
        code = classify_tool.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    code, err = run([str(tmp_path / "missing.jpg"), out] + common)
    assert code == 1 and err == f"error: {tmp_path / 'missing.jpg'}: no such image file"
    (tmp_path / "empty").mkdir()
    code, err = run([str(tmp_path / "empty"), out] + common)
    assert code == 1 and "no *.jpg images in this folder" in err
    path = _write_images(tmp_path / "imgs", 1)[0]
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    code, err = run([path, out, "--labels", str(labels)] + common)
    assert code == 1 and "2 labels but the net's output 'prob' has 5 classes" in err
    code, err = run([path, out, "--images_dim", "10"] + common)
    assert code == 1 and "--images_dim: expected 2 values" in err
    code, err = run([path, out, "--mean_file", str(tmp_path / "m.binaryproto")] + common)
    assert code == 1 and "m.binaryproto: no such mean file" in err
    assert not os.path.exists(out)


def test_classify_subprocess(model, tmp_path):
    deploy, weights = model
    path = _write_images(tmp_path / "imgs", 1)[0]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.classify", path, str(tmp_path / "o.npy"),
                           "--model_def", deploy, "--pretrained_model", weights, "--images_dim", "8,8"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "o.npy").shape == (1, 5)
