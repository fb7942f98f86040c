"""Ensembles and the evaluate / fully_convolutional / init_from commands, end to end on tiny nets."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.multicrop import Preprocessor, topk_error
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


def _run(argv, capsys, main=None):
    """(exit status, stdout, stderr) of a command's main (beyond's unless given)."""
    code = (main or beyond.main)(argv)
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
    code, _, err = _run(base + ["--model", proto] + ["--weights", weights[0]] * 3, capsys)
    assert code == 1 and err.strip() == "error: give one --weights per --model (2 models, 3 weights)"
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
    # conv1b gets a top of its own: a Convolution cannot run in place (its weight gradient needs its input)
    deeper = NET.replace('name: "small"', 'name: "deeper"').replace(
        'bottom: "conv1" top: "conv1" }', 'bottom: "conv1b" top: "conv1b" }').replace(
        'bottom: "conv1" top: "pool1"', 'bottom: "conv1b" top: "pool1"').replace(
        'layer { name: "relu1"',
        'layer { name: "conv1b" type: "Convolution" bottom: "conv1" top: "conv1b" '
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


# --- the same through `minicaffe test` --------------------------------------------------------------

TRAIN_VAL = NET.replace(
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }',
    'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }\n'
    '  transform_param { crop_size: 8 mean_value: 100 mean_value: 110 mean_value: 120 scale: 0.01 }\n'
    '  data_param { source: "LMDB" batch_size: 2 backend: LMDB } }').replace(
    'layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }',
    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc7" bottom: "label" top: "loss" }\n'
    'layer { name: "acc" type: "Accuracy" bottom: "fc7" bottom: "label" top: "accuracy" }')


@pytest.fixture(scope="module", autouse=True)
def _logger_outside_capsys():
    """The minicaffe logger binds sys.stderr when first made: make it before capsys swaps that
    stream, or later tests would log to capsys' closed stream."""
    from minicaffe.tools.common import get_logger
    get_logger()


def _cli(argv, capsys):
    from minicaffe.tools import cli
    return _run(argv, capsys, main=cli.main)


def test_minicaffe_test_with_crops_and_an_ensemble_of_deploy_nets(setup, capsys):
    tmp_path, proto, weights = setup
    argv = ["test", "--model", proto, "--weights", weights[0], "--model", proto, "--weights", weights[1],
            "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path / "img"), "--crops", "150",
            "--scales", "8,10,12", "--mean_value", "100,110,120", "--input_scale", "0.01"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    nets = [caffe.Net(proto, caffe.TEST, weights=w) for w in weights]
    probs = evaluate_images(nets, _images(tmp_path), "150", scales=[8, 10, 12],
                            preprocess=Preprocessor([100, 110, 120], 0.01))
    assert f"top-1 error = {100 * topk_error(probs, np.arange(6), 1):.2f}%" in out
    assert f"top-5 error = {100 * topk_error(probs, np.arange(6), 5):.2f}%" in out
    assert "6 images with 2 models: 150 crops at scales 8,10,12" in err
    # one --model with several --weights: the same architecture trained twice
    code, out2, _ = _cli(argv[:5] + argv[7:], capsys)
    assert code == 0 and out2 == out


def test_minicaffe_test_reads_a_train_val_nets_data_layer(setup, capsys):
    """Without --list: images, labels, mean and scale from the TEST Data layer; the loss and accuracy
    layers (they read the label) are dropped and the Data layer becomes an Input of its crop size."""
    from minicaffe.tools.convert_imageset import convert_imageset
    tmp_path, proto, weights = setup
    db = tmp_path / "lmdb"
    convert_imageset(str(tmp_path / "img") + "/", str(tmp_path / "list.txt"), str(db))
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL.replace("LMDB", str(db), 1))
    code, out, err = _cli(["test", "--model", str(tmp_path / "train_val.prototxt"), "--weights", weights[0],
                           "--crops", "10", "--dense"], capsys)
    assert code == 0, err
    net = caffe.Net(proto, caffe.TEST, weights=weights[0])
    probs = evaluate_images([net], _images(tmp_path), "10", dense=True, preprocess=Preprocessor([100, 110, 120], 0.01))
    assert f"top-1 error = {100 * topk_error(probs, np.arange(6), 1):.2f}%" in out
    assert "6 images with 1 model: 10 crops + dense + flip" in err
    code, _, err = _cli(["test", "--model", str(tmp_path / "train_val.prototxt"), "--weights", weights[0],
                         "--crops", "10", "--mean_value", "1"], capsys)
    assert code == 1 and "come from the Data layer's transform_param" in err
    code, _, err = _cli(["test", "--model", proto, "--weights", weights[0], "--crops", "10"], capsys)
    assert code == 1 and err.strip().endswith("the TEST net has no Data layer to read images from; give a "
                                              "deploy net and --list")
    code, _, err = _cli(["test", "--model", proto, "--weights", weights[0], "--crops", "10", "--iterations", "3"],
                        capsys)
    assert code == 1 and "use --limit (images)" in err


def test_beyond_commands_run_from_the_minicaffe_cli(setup, capsys):
    tmp_path, proto, weights = setup
    code, out, err = _cli(["fully_convolutional", "--model", proto, "--weights", weights[0], "--output",
                           str(tmp_path / "fc")], capsys)
    assert code == 0, err
    assert "fc7 (InnerProduct 6x8) -> fc7-conv (Convolution 6x8x1x1)" in out
    code, out, err = _cli(["evaluate", "--model", proto, "--weights", weights[0], "--list",
                           str(tmp_path / "list.txt"), "--root", str(tmp_path / "img")], capsys)
    assert code == 0 and "top-5 error = " in out, err
    code, out, err = _cli(["init_from", "--model", proto], capsys)   # one line, exit 1 as every error
    assert code == 1 and "required: --from, --output" in err and len(err.strip().splitlines()) == 1
