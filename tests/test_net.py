"""Net-level behaviour: whole-net gradients through splits, in-place layers and loss weights."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.errors import NetError

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 5 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "act" type: "TanH" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "ip1" bottom: "ip2" top: "sum" }
layer { name: "loss" type: "EuclideanLoss" bottom: "sum" bottom: "target" top: "loss" loss_weight: 2 }
layer { name: "aux" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "aux" loss_weight: 0.5 }
"""


def _net(tmp_path, text=NET):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TRAIN)


def test_split_inserted_with_caffes_names(tmp_path):
    net = _net(tmp_path)
    # ip1 (after the in-place TanH) feeds ip2, sum and aux: one Split with three outputs
    assert "ip1_act_0_split" in net.layer_dict
    assert net.layer_dict["ip1_act_0_split"].type == "Split"
    assert net.top_names["ip1_act_0_split"] == [f"ip1_act_0_split_{k}" for k in range(3)]
    # target is used by both losses
    assert "target_data_1_split" in net.layer_dict


def test_whole_net_gradient_matches_finite_differences(tmp_path):
    with backend.float64_blobs():
        net = _net(tmp_path)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=(3, 4))
    net.blobs["target"].data[...] = rng.normal(size=(3, 5))

    def loss():
        return net.forward_from_to()

    net.clear_param_diffs()
    net.forward_backward()
    checks = [(net.params["ip1"][0], net.params["ip1"][0].diff.copy()),
              (net.params["ip1"][1], net.params["ip1"][1].diff.copy()),
              (net.params["ip2"][0], net.params["ip2"][0].diff.copy())]
    eps = 1e-6
    for blob, grad in checks:
        flat = blob.data.reshape(-1)
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            plus = loss()
            flat[i] = orig - eps
            minus = loss()
            flat[i] = orig
            np.testing.assert_allclose(grad.reshape(-1)[i], (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_forward_returns_weighted_loss_sum(tmp_path):
    net = _net(tmp_path)
    net.blobs["data"].data[...] = 1.0
    total = net.forward_from_to()
    expected = 2 * float(net.blobs["loss"].data) + 0.5 * float(net.blobs["aux"].data)
    assert total == pytest.approx(expected, rel=1e-6)


def test_layers_without_loss_are_left_out_of_backward(tmp_path):
    text = NET + 'layer { name: "side" type: "InnerProduct" bottom: "data" top: "side" ' \
                 'inner_product_param { num_output: 2 } }\n'
    net = _net(tmp_path, text)
    idx = net._layer_names.index("side")
    assert not net._layer_need_backward[idx]
    assert "side" in net.outputs


def test_lr_mult_zero_everywhere_skips_backward(tmp_path):
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            param { lr_mult: 0 } param { lr_mult: 0 } inner_product_param { num_output: 2 } }
    layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "ip" top: "loss" }
    """
    net = _net(tmp_path, text)
    assert not net._layer_need_backward[net._layer_names.index("ip")]
    assert net._layer_need_backward[net._layer_names.index("ip2")]


def test_phase_and_stage_rules(tmp_path):
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "train_only" type: "ReLU" bottom: "data" top: "a" include { phase: TRAIN } }
    layer { name: "test_only" type: "ReLU" bottom: "data" top: "b" include { phase: TEST } }
    layer { name: "deep" type: "ReLU" bottom: "data" top: "c" include { min_level: 2 } }
    layer { name: "staged" type: "ReLU" bottom: "data" top: "d" include { stage: "deploy" } }
    layer { name: "not_staged" type: "ReLU" bottom: "data" top: "e" exclude { stage: "deploy" } }
    """
    path = tmp_path / "rules.prototxt"
    path.write_text(text)
    train = caffe.Net(str(path), caffe.TRAIN)
    def real(net):
        return {n for n, l in net.layer_dict.items() if l.type != "Split"}
    assert real(train) == {"data", "train_only", "not_staged"}
    test = caffe.Net(str(path), caffe.TEST, level=2, stages=["deploy"])
    assert real(test) == {"data", "test_only", "deep", "staged"}


def test_unknown_layer_type_names_layer_and_near_match(tmp_path):
    text = 'layer { name: "c1" type: "Convolutoin" }'
    with pytest.raises(NetError, match=r"layer 'c1'.*unknown layer type 'Convolutoin'.*'Convolution'"):
        _net(tmp_path, text)


def test_missing_bottom_is_named(tmp_path):
    text = 'layer { name: "r" type: "ReLU" bottom: "nothing" top: "r" }'
    with pytest.raises(NetError, match=r"layer 'r'.*bottom 'nothing' is not produced"):
        _net(tmp_path, text)


DUPLICATES = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 3
        weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3
        weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "b" bottom: "data" top: "l2" }
layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "data" top: "l2b" loss_weight: 0 }
"""


def test_duplicate_layer_names_are_legal_as_in_caffe(tmp_path):
    """Caffe's Net::Init never checks layer names for uniqueness (examples/mnist/mnist_autoencoder has
    two layers named "loss"): name-keyed views hold the last such layer (pycaffe's OrderedDict(zip)),
    forward(start=name) and copy_from/share_with (Caffe's linear search) use the first."""
    net = _net(tmp_path, DUPLICATES)
    names = [n for n in net._layer_names if not n.endswith("_split")]
    assert names == ["data", "ip", "ip", "loss", "loss"]
    assert [n for n in net.layer_dict if not n.endswith("_split")] == ["data", "ip", "loss"]
    ip1, ip2 = [i for i, n in enumerate(net._layer_names) if n == "ip"]
    assert net.layer_dict["ip"] is net.layers[ip2] and net.params["ip"][0] is net.layers[ip2].blobs[0]
    assert net.top_names["loss"] == ["l2b"]
    ran = []
    net.before_forward(ran.append)
    net.forward(start="ip")
    assert ran == list(range(ip1, len(net.layers)))
    # a weights file with one layer "ip" loads into the first "ip" only (CopyTrainedLayersFrom)
    w = np.arange(9, dtype=np.float32).reshape(3, 3)
    src = caffe.Net(str(_write(tmp_path, "one.prototxt", DUPLICATES.replace('name: "ip" type: "InnerProduct" '
                                                                             'bottom: "a"', 'name: "ip2" type: '
                                                                             '"InnerProduct" bottom: "a"'))),
                    caffe.TEST)
    src.params["ip"][0].data[...] = w
    src.save(str(tmp_path / "one.caffemodel"))
    before = net.layers[ip2].blobs[0].data.copy()
    net.copy_from(str(tmp_path / "one.caffemodel"))
    np.testing.assert_array_equal(net.layers[ip1].blobs[0].data, w)
    np.testing.assert_array_equal(net.layers[ip2].blobs[0].data, before)
    other = _net(tmp_path, DUPLICATES)
    other.share_with(src)
    assert other.layers[ip1].blobs[0] is src.layer_dict["ip"].blobs[0]
    assert other.layers[ip2].blobs[0] is not src.layer_dict["ip"].blobs[0]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_save_and_copy_from_round_trip(tmp_path):
    net = _net(tmp_path)
    net.save(str(tmp_path / "w.caffemodel"))
    other = _net(tmp_path)
    other.copy_from(str(tmp_path / "w.caffemodel"))
    for name in net.params:
        for a, b in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind
