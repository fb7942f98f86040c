"""BVLC Caffe's shipped example nets that use the issue-14 layers, built from their own prototxt text
(tests/data/caffe_examples, BSD-2 copies) and run forward and backward on small synthetic inputs:
the siamese MNIST net (ContrastiveLoss, shared weights) and the PASCAL detection fine-tuning net
(WindowData). Caffe ships no LSTM example net (LRCN lives outside BVLC's tree), so an LRCN-style
captioning net (Embed -> LSTM with a static image feature -> InnerProduct -> SoftmaxWithLoss) is
written here and trained for a few steps."""
import math
import os

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.net.network import Net
from minicaffe.formats.prototxt import load_net_param
from minicaffe.proto import caffe_pb2

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "caffe_examples")


def _replace_data_layers(param, make_input):
    """The net with its data layers (both phases) replaced by one Input layer."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    added = False
    for layer in param.layer:
        if layer.type in ("Data", "WindowData"):
            if not added:
                out.layer.add().CopyFrom(make_input(layer))
                added = True
            continue
        out.layer.add().CopyFrom(layer)
    return out


def test_siamese_train_test_net_trains_with_contrastive_loss():
    param = load_net_param(os.path.join(EXAMPLES, "siamese", "mnist_siamese_train_test.prototxt"))
    n = 6

    def make_input(layer):
        inp = caffe_pb2.LayerParameter(name="pair_data", type="Input")
        inp.top.extend(["pair_data", "sim"])
        inp.input_param.shape.add().dim.extend([n, 2, 28, 28])
        inp.input_param.shape.add().dim.extend([n])
        return inp

    backend.set_random_seed(1)
    net = Net(_replace_data_layers(param, make_input), caffe_pb2.TRAIN)
    rs = np.random.RandomState(0)
    net.blobs["pair_data"].data[...] = rs.uniform(0, 1, (n, 2, 28, 28))
    sim = np.array([1, 0, 1, 0, 0, 1], np.float32)
    net.blobs["sim"].data[...] = sim
    # the two branches share every parameter by name: one set of blobs for both
    assert net.params["conv1"][0] is net.params["conv1_p"][0]
    assert net.params["feat"][1] is net.params["feat_p"][1]
    loss = net.forward_backward()
    a, b = net.blobs["feat"].data.astype(np.float64), net.blobs["feat_p"].data.astype(np.float64)
    assert a.shape == (n, 2)
    d = np.sqrt(((a - b) ** 2).sum(axis=1))
    expect = np.where(sim == 1, d ** 2, np.maximum(1.0 - d, 0) ** 2).sum() / n / 2   # margin 1
    assert math.isclose(loss, expect, rel_tol=1e-4)
    grads = {name: float(np.abs(blob.diff).sum()) for name, blob in zip(net._learnable_names, net.learnable_params)}
    assert all(g > 0 for (layer, k), g in grads.items() if k == 0)
    # a bias shared by both branches after the last ReLU shifts both features alike, which no distance
    # sees: its two gradients cancel exactly
    assert grads[("ip2", 1)] == 0 and grads[("feat", 1)] == 0 and grads[("ip1", 1)] > 0
    # a few SGD steps lower the loss on this batch
    for _ in range(3):
        net.clear_param_diffs()
        net.forward_backward()
        for blob in net.learnable_params:
            blob.data[...] -= 0.05 * blob.diff
    assert net.forward_backward() < loss
    test_net = Net(_replace_data_layers(param, make_input), caffe_pb2.TEST)
    assert "loss" in test_net.blobs


def test_siamese_deploy_net_embeds_digits_in_two_dimensions():
    net = Net(os.path.join(EXAMPLES, "siamese", "mnist_siamese.prototxt"), caffe_pb2.TEST)
    assert net.blobs["data"].shape == (10000, 1, 28, 28)
    net.blobs["data"].reshape(3, 1, 28, 28)
    net.reshape()
    net.blobs["data"].data[...] = np.random.RandomState(2).uniform(0, 1, (3, 1, 28, 28))
    out = net.forward()
    assert out["feat"].shape == (3, 2) and np.all(np.isfinite(out["feat"]))


@pytest.mark.slow   # CaffeNet at 227 x 227: a few seconds
def test_pascal_detection_finetune_net_runs_on_windows(tmp_path):
    cv2 = pytest.importorskip("cv2")
    param = load_net_param(os.path.join(EXAMPLES, "finetune_pascal_detection", "pascal_finetune_trainval_test.prototxt"))
    rs = np.random.RandomState(3)
    lines = []
    for i in range(2):
        h, w = 60 + 10 * i, 80
        cv2.imwrite(str(tmp_path / f"img{i}.jpg"), rs.randint(0, 256, (h, w, 3)).astype(np.uint8))
        lines += [f"# {i}", f"img{i}.jpg", "3", str(h), str(w), "3",
                  f"{i + 1} 0.8 10 5 50 40", "0 0.1 0 0 30 30", f"{i + 3} 0.6 20 20 70 {h - 1}"]
    (tmp_path / "windows.txt").write_text("\n".join(lines) + "\n")
    mean = caffe_pb2.BlobProto()
    mean.num, mean.channels, mean.height, mean.width = 1, 3, 256, 256
    mean.data.extend(np.full(3 * 256 * 256, 110.0, np.float32))
    (tmp_path / "mean.binaryproto").write_bytes(mean.SerializeToString())
    for layer in param.layer:
        if layer.type == "WindowData":
            layer.window_data_param.source = str(tmp_path / "windows.txt")
            layer.window_data_param.root_folder = str(tmp_path) + "/"
            layer.window_data_param.batch_size = 4
            layer.transform_param.mean_file = str(tmp_path / "mean.binaryproto")
    backend.set_random_seed(4)
    net = Net(param, caffe_pb2.TRAIN)
    assert net.blobs["data"].shape == (4, 3, 227, 227)
    loss = net.forward_backward()
    labels = net.blobs["label"].data
    assert list(labels[:3]) == [0, 0, 0] and labels[3] in (1, 2, 3, 4)   # fg_fraction 0.25 of 4
    assert math.isfinite(loss) and loss > 0
    assert float(np.abs(net.params["conv1"][0].diff).sum()) > 0
    assert net.params["fc8_pascal"][0].shape == (21, 4096)


LRCN_STYLE = """
name: "lrcn_style_captioner"
layer { name: "input" type: "Input" top: "words" top: "cont" top: "image_feature" top: "target"
  input_param { shape { dim: 6 dim: 4 } shape { dim: 6 dim: 4 } shape { dim: 4 dim: 5 } shape { dim: 6 dim: 4 } } }
layer { name: "embed" type: "Embed" bottom: "words" top: "embedded"
  embed_param { num_output: 8 input_dim: 7 bias_term: false weight_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "lstm" type: "LSTM" bottom: "embedded" bottom: "cont" bottom: "image_feature" top: "lstm"
  recurrent_param { num_output: 12 weight_filler { type: "uniform" min: -0.5 max: 0.5 }
                    bias_filler { type: "constant" value: 0 } } }
layer { name: "predict" type: "InnerProduct" bottom: "lstm" top: "predict"
  inner_product_param { num_output: 7 axis: 2 weight_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "predict" bottom: "target" top: "loss"
  loss_param { ignore_label: -1 } softmax_param { axis: 2 } }
"""


def test_lrcn_style_lstm_net_learns_to_predict_the_next_word():
    backend.set_random_seed(5)
    net = Net(LRCN_STYLE, caffe_pb2.TRAIN)
    rs = np.random.RandomState(6)
    t_steps, n = 6, 4
    words = np.zeros((t_steps, n))
    targets = np.zeros((t_steps, n))
    for s in range(n):
        seq = [(s + k) % 6 + 1 for k in range(t_steps + 1)]     # a counting sequence per stream
        words[:, s], targets[:, s] = seq[:-1], seq[1:]
    targets[-1, 0] = -1                                           # ignored position
    cont = np.ones((t_steps, n))
    cont[0] = 0
    net.blobs["words"].data[...] = words
    net.blobs["cont"].data[...] = cont
    net.blobs["image_feature"].data[...] = rs.uniform(-1, 1, (n, 5))
    net.blobs["target"].data[...] = targets
    assert [b.shape for b in net.params["lstm"]] == [(48, 8), (48,), (48, 5), (48, 12)]
    first = net.forward_backward()
    assert math.isclose(first, math.log(7), rel_tol=0.1)       # near uniform at the start
    for _ in range(100):
        net.clear_param_diffs()
        net.forward_backward()
        for blob in net.learnable_params:
            blob.data[...] -= 1.0 * blob.diff
    assert net.forward_backward() < 0.1 * first


def test_loss_layer_without_a_top_gets_an_automatic_one():
    """Caffe's AutoTopBlobs (the PASCAL net's loss layer names no top): the loss still counts, the
    backward pass still runs, and the unnamed top is not a net output."""
    text = """
    layer { name: "input" type: "Input" top: "x" top: "label" input_param { shape { dim: 3 dim: 4 } shape { dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }
    """
    net = Net(text, caffe_pb2.TRAIN)
    net.blobs["x"].data[...] = np.random.RandomState(7).randn(3, 4)
    net.blobs["label"].data[...] = [0, 3, 4]
    loss = net.forward_backward()
    logits = net.blobs["ip"].data.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert math.isclose(loss, -logp[[0, 1, 2], [0, 3, 4]].mean(), rel_tol=1e-5)
    assert float(np.abs(net.params["ip"][0].diff).sum()) > 0
    assert net.outputs == []
