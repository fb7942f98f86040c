"""Ensembles and the evaluate / fully_convolutional / init_from commands, end to end on tiny nets."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import backend
from minicaffe.multicrop import Preprocessor, evaluate_crops, topk_error
from minicaffe.tools import beyond
from minicaffe.tools.beyond import evaluate_images, read_list_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILL = 'weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "gaussian" std: 0.2 }'
NET = f"""name: "small"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 {FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6" inner_product_param {{ num_output: 8 {FILL} }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param {{ num_output: 6 {FILL} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }}
"""


@pytest.fixture
def setup(tmp_path):
    """Two models (different seeds), six 10x12 PNG images and a list file."""
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(NET)
    weights = []
    for seed in (1, 2):
        backend.set_random_seed(seed)
        path = tmp_path / f"m{seed}.caffemodel"
        caffe.Net(str(proto), caffe.TEST).save(str(path))
        weights.append(str(path))
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
        lines.append(f"{i}.png {i % 6}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    return tmp_path, str(proto), weights


def _images(tmp_path):
    return [cv2.imread(str(tmp_path / "img" / f"{i}.png")).astype(np.float32) for i in range(6)]


def test_ensemble_is_the_mean_of_the_models_softmax(setup):
    tmp_path, proto, weights = setup
    nets = [caffe.Net(proto, caffe.TEST, weights=w) for w in weights]
    images = _images(tmp_path)
    pre = Preprocessor(mean=[100, 110, 120], input_scale=0.01)
    for scheme in ("1", "10", "150"):
        both = evaluate_images(nets, images, scheme, preprocess=pre, scales=[8, 10, 12] if scheme == "150" else None)
        single = [evaluate_images([n], images, scheme, preprocess=pre,
                                  scales=[8, 10, 12] if scheme == "150" else None) for n in nets]
        np.testing.assert_allclose(both, 0.5 * (single[0] + single[1]), atol=1e-6)
        assert not np.allclose(single[0], single[1])
    # the centre crop by hand: softmax of each model's output on the 8x8 centre, averaged
    by_hand = []
    for net in nets:
        x = np.stack([im[1:9, 2:10] for im in images]).transpose(0, 3, 1, 2)
        x = (x - np.array([100, 110, 120], np.float32).reshape(1, 3, 1, 1)) * 0.01
        net.blobs["data"].reshape(x.shape)
        net.reshape()
        by_hand.append(net.forward(data=x)["prob"].copy())
    np.testing.assert_allclose(evaluate_images(nets, images, "1", preprocess=pre), np.mean(by_hand, axis=0),
                               atol=1e-6)


def test_dense_plus_crops_per_model_then_models(setup):
    tmp_path, proto, weights = setup
    nets = [caffe.Net(proto, caffe.TEST, weights=w) for w in weights]
    images = _images(tmp_path)[:2]
    both = evaluate_images(nets, images, "10", dense=True)
    dense = evaluate_images(nets, images, None, dense=True)
    crops = evaluate_images(nets, images, "10")
    np.testing.assert_allclose(both, 0.5 * (dense + crops), atol=1e-6)


def _run(argv, capsys):
    code = beyond.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_command_prints_the_papers_numbers(setup, capsys):
    tmp_path, proto, weights = setup
    argv = ["evaluate", "--model", proto, "--weights", weights[0], "--model", proto, "--weights", weights[1],
            "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path / "img"), "--crops", "10",
            "--mean_value", "100,110,120", "--input_scale", "0.01", "--predictions", str(tmp_path / "p.txt")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    nets = [caffe.Net(proto, caffe.TEST, weights=w) for w in weights]
    probs = evaluate_images(nets, _images(tmp_path), "10", preprocess=Preprocessor([100, 110, 120], 0.01))
    labels = np.arange(6) % 6
    assert f"top-1 error = {100 * topk_error(probs, labels, 1):.2f}%" in out
    assert f"top-5 error = {100 * topk_error(probs, labels, 5):.2f}%" in out
    assert "6 images with 2 models: 10 crops" in err
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("0.png\t0\t")


def test_evaluate_command_errors_are_one_line(setup, capsys):
    tmp_path, proto, weights = setup
    base = ["evaluate", "--model", proto, "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path / "img")]
    code, _, err = _run(base + ["--weights", weights[0], "--weights", weights[1]], capsys)
    assert code == 1 and err.strip() == "error: give one --weights per --model (1 models, 2 weights)"
    (tmp_path / "bad.txt").write_text("0.png 0\n1.png one\n")
    code, _, err = _run(["evaluate", "--model", proto, "--weights", weights[0], "--list",
                         str(tmp_path / "bad.txt")], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'bad.txt'}:2: label 'one' is not an integer"
    code, _, err = _run(base + ["--weights", weights[0], "--root", str(tmp_path)], capsys)
    assert code == 1 and err.splitlines()[-1] == f"error: {tmp_path / '0.png'}: cannot read image: No such file " \
                                                 f"or directory"
    code, _, err = _run(base + ["--weights", weights[0], "--crops", "150", "--scales", "4"], capsys)
    assert code == 1 and "150-crop at scale 4: a 8x8 crop does not fit" in err
    code, _, err = _run(base + ["--weights", weights[0], "--mean_value", "1,2"], capsys)
    assert code == 1 and "--mean_value: 2 values for 3 channels" in err
    (tmp_path / "img" / "0.png").write_text("not a png")
    code, _, err = _run(base + ["--weights", weights[0]], capsys)
    assert code == 1 and err.splitlines()[-1] == f"error: {tmp_path / 'img' / '0.png'}: cannot decode as an image"


def test_read_list_file_splits_at_the_last_space(tmp_path):
    (tmp_path / "l.txt").write_text("a b.png 3\n\nc.png 1\n")
    assert read_list_file(tmp_path / "l.txt") == [("a b.png", 3), ("c.png", 1)]


def test_fully_convolutional_command_writes_an_equivalent_net(setup, capsys):
    tmp_path, proto, weights = setup
    out_prefix = str(tmp_path / "fc")
    code, out, err = _run(["fully_convolutional", "--model", proto, "--weights", weights[0], "--output",
                           out_prefix, "--input_size", "12,16"], capsys)
    assert code == 0, err
    assert "fc6 (InnerProduct 8x64) -> fc6-conv (Convolution 8x4x4x4)" in out
    conv = caffe.Net(out_prefix + ".prototxt", caffe.TEST, weights=out_prefix + ".caffemodel")
    assert conv.blobs["data"].shape == (1, 3, 12, 16)
    net = caffe.Net(proto, caffe.TEST, weights=weights[0])
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ref = net.forward(data=x)["prob"]
    conv.blobs["data"].reshape(1, 3, 8, 8)
    conv.reshape()
    np.testing.assert_allclose(conv.forward(data=x)["prob"][:, :, 0, 0], ref, atol=1e-5)


def test_init_from_command_prints_the_mapping(setup, capsys):
    tmp_path, proto, weights = setup
    deeper = NET.replace('name: "small"', 'name: "deeper"').replace(
        'layer { name: "relu1"',
        'layer { name: "conv1b" type: "Convolution" bottom: "conv1" top: "conv1" '
        'convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "relu1"')
    (tmp_path / "deeper.prototxt").write_text(deeper)
    out_model = str(tmp_path / "init.caffemodel")
    code, out, err = _run(["init_from", "--model", str(tmp_path / "deeper.prototxt"), "--from",
                           f"{proto},{weights[0]}", "--map", "conv1:conv1,fc7:fc7", "--output", out_model,
                           "--seed", "3"], capsys)
    assert code == 0, err
    assert "conv1 <- conv1  (4x3x3x3, 4)" in out and "fc7   <- fc7  (6x8, 6)" in out
    assert "kept their fillers: conv1b, fc6" in out
    net = caffe.Net(str(tmp_path / "deeper.prototxt"), caffe.TEST, weights=out_model)
    src = caffe.Net(proto, caffe.TEST, weights=weights[0])
    np.testing.assert_array_equal(net.params["conv1"][0].data, src.params["conv1"][0].data)
    np.testing.assert_array_equal(net.params["fc7"][1].data, src.params["fc7"][1].data)
    code, _, err = _run(["init_from", "--model", str(tmp_path / "deeper.prototxt"), "--from", proto,
                         "--output", out_model], capsys)
    assert code == 1 and "--from expects A.prototxt,A.caffemodel" in err
    code, _, err = _run(["init_from", "--model", str(tmp_path / "deeper.prototxt"), "--from",
                         f"{proto},{weights[0]}", "--map", "conv1b:fc6", "--output", out_model], capsys)
    assert code == 1 and "source layer 'fc6' has 2 parameter blobs" not in err
    assert "cannot copy param 0 of source layer 'fc6' (8, 64) into target layer 'conv1b' (4, 4, 3, 3)" in err


def test_evaluate_runs_as_a_module(setup):
    tmp_path, proto, weights = setup
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "minicaffe.tools.beyond", "evaluate", "--model", proto,
                          "--weights", weights[0], "--list", str(tmp_path / "list.txt"), "--root",
                          str(tmp_path / "img"), "--dense", "--crops", "144", "--scales", "8,9,10,11"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "top-1 error = " in res.stdout and "top-5 error = " in res.stdout
    assert "144 crops at scales 8,9,10,11 + dense at scales 8,9,10,11 + flip" in res.stderr


def test_vgg_methods_example_tiny(tmp_path):
    """examples/vgg_methods/run.py --tiny: data -> LMDB -> two trainings (fixed S, scale jitter) ->
    every evaluation setting -> the markdown table. About 30 s of CPU; proves the pipeline only."""
    pytest.importorskip("sklearn")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "vgg_methods", "run.py"), "--tiny",
                          "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| training |"))
    assert header.split(" | ")[1:] == ["centre crop", "10 crops", "144 crops", "150 crops", "dense, 1 scale",
                                       "dense, 3 scales", "dense + 150 crops |"]
    rows = [line for line in lines if line.startswith("| ") and line[2].isalpha() and "training" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| fixed S = 40", "| jittered S ∈ [32, 48]", "| ensemble of both"]
    for row in rows:
        values = [float(v) for v in row.strip("| ").split(" | ")[1:]]
        assert len(values) == 7 and all(0 <= v <= 100 for v in values)
    assert "on 8 held-out digits" in res.stdout
    assert (tmp_path / "vgg_digits_jitter.caffemodel").exists() and (tmp_path / "results.md").exists()
