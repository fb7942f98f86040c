"""Hints where users go wrong: each mistake gives one line naming the file and what to do instead."""
import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import io as cio
from minicaffe.tools import classify as classify_tool
from minicaffe.tools import cli
from minicaffe.tools import extract_features as ef
from minicaffe.tools.common import get_logger

from test_cli import NET, SOLVER
from test_classifier import DEPLOY

# bind the log handler to the session's stderr now, not to one test's capsys stream (closed after it)
get_logger()


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    (tmp_path / "snaps").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_caffemodel_given_to_snapshot_suggests_weights(work, capsys):
    assert cli.main(["train", "--solver=solver.prototxt", "--iterations=2"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--solver=solver.prototxt", "--snapshot=snaps/cli_iter_2.caffemodel"]) == 1
    line = _error_line(capsys)
    assert "--weights snaps/cli_iter_2.caffemodel" in line and "snaps/cli_iter_2.solverstate" in line


def test_finetune_shape_mismatch_suggests_renaming_the_layer(work, capsys):
    two = NET.replace('bottom: "data" top: "ip"', 'bottom: "hid" top: "ip"').replace(
        'layer { name: "ip"', 'layer { name: "hid" type: "InnerProduct" bottom: "data" top: "hid" '
        'inner_product_param { num_output: 3 } }\nlayer { name: "ip"')
    (work / "net.prototxt").write_text(two)
    assert cli.main(["train", "--solver=solver.prototxt", "--iterations=2"]) == 0
    (work / "net3.prototxt").write_text(two.replace("num_output: 2", "num_output: 4"))
    (work / "solver3.prototxt").write_text(SOLVER.replace("net.prototxt", "net3.prototxt")
                                           .replace("snaps/cli", "snaps/ft"))
    capsys.readouterr()
    assert cli.main(["train", "--solver=solver3.prototxt", "--weights=snaps/cli_iter_2.caffemodel"]) == 1
    line = _error_line(capsys)
    assert "layer 'ip'" in line and "rename the layer" in line and "'ip_new'" in line
    # the idiom works: the renamed layer is skipped and starts from its filler
    (work / "net3.prototxt").write_text(two.replace("num_output: 2", "num_output: 4")
                                        .replace('name: "ip"', 'name: "ip_new"'))
    assert cli.main(["train", "--solver=solver3.prototxt", "--weights=snaps/cli_iter_2.caffemodel"]) == 0


def test_lr_policy_typo_is_caught_when_the_solver_is_read(work, capsys, monkeypatch):
    (work / "solver.prototxt").write_text(SOLVER.replace('"fixed"', '"stepp"'))
    from minicaffe.net import network as net_module
    built = []
    monkeypatch.setattr(net_module.Net, "__init__", lambda self, *a, **k: built.append(1) or 1 / 0)
    assert cli.main(["train", "--solver=solver.prototxt"]) == 1
    line = _error_line(capsys)
    assert line.startswith("error: solver.prototxt: unknown learning rate policy 'stepp'")
    assert "did you mean 'step'?" in line
    assert not built            # refused before any net is built, not at the first update


def test_extract_features_hides_split_blobs(tmp_path, capsys):
    # 'data' feeds two layers, so the net inserts a Split layer with *_split_* blobs
    proto = tmp_path / "f.prototxt"
    proto.write_text(DEPLOY.replace('type: "Input"', 'type: "DummyData"')
                     .replace("input_param { shape", "dummy_data_param { shape")
                     + 'layer { name: "fc2" type: "InnerProduct" bottom: "data" top: "fc2" '
                       'inner_product_param { num_output: 2 } }\n')
    weights = tmp_path / "f.caffemodel"
    net = caffe.Net(str(proto), caffe.TEST)
    assert any("_split_" in b for b in net.blobs)
    net.save(str(weights))
    assert ef.main([str(weights), str(proto), "fcc", str(tmp_path / "db"), "1", "lmdb"]) == 1
    line = _error_line(capsys)
    assert "did you mean 'fc'?" in line and "conv1" in line and "_split_" not in line


@pytest.fixture
def model(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = tmp_path / "tiny.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    return str(deploy), str(weights)


def test_classify_refuses_a_train_val_net_and_names_the_deploy_net(model, tmp_path, capsys):
    deploy, weights = model
    train_val = tmp_path / "train_val.prototxt"
    train_val.write_text(DEPLOY.replace(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 3 dim: 8 dim: 8 } } }',
        'layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "train_lmdb" '
        'batch_size: 3 backend: LMDB } }'))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    assert classify_tool.main([str(img), str(tmp_path / "o"), "--model_def", str(train_val),
                               "--pretrained_model", weights]) == 1
    line = _error_line(capsys)
    assert str(train_val) in line and "deploy net" in line and deploy in line


def test_classify_grey_mean_with_a_colour_net_names_the_file(model, tmp_path, capsys):
    deploy, weights = model
    mean = tmp_path / "grey_mean.binaryproto"
    mean.write_bytes(cio.array_to_blobproto(np.full((1, 1, 8, 8), 100.0)).SerializeToString())
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    assert classify_tool.main([str(img), str(tmp_path / "o"), "--model_def", deploy, "--pretrained_model",
                               weights, "--mean_file", str(mean), "--images_dim", "8,8"]) == 1
    line = _error_line(capsys)
    assert line.startswith(f"error: {mean}: a grey (1-channel) mean") and "3 channels" in line


def test_classify_ext_is_case_insensitive(model, tmp_path, capsys):
    deploy, weights = model
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("n01.JPEG", "n02.jpeg", "n03.Jpg", "skip.png"):
        cv2.imwrite(str(folder / name), np.full((8, 8, 3), 50, np.uint8),)
    out = tmp_path / "o.npy"
    assert classify_tool.main([str(folder), str(out), "--model_def", deploy, "--pretrained_model", weights,
                               "--images_dim", "8,8", "--center_only"]) == 0   # default --ext jpg
    assert np.load(out).shape == (3, 5)
    assert "Classifying 3 inputs." in capsys.readouterr().err
