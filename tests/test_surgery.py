"""Net surgery: FC -> convolution (VGG dense evaluation), dense score averaging, init_from."""
import re

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.errors import NetError, ShapeError, WeightsError
from minicaffe.surgery import (convert_fc_to_conv, dense_scores, init_from, net_definition,
                               parse_mapping, strip_splits, vgg_init_mapping)

FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.2 }'

# conv (no padding, so a window of a larger image sees exactly what a crop would) + pool + fc + fc
VGGISH = f"""
name: "vggish"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 3 dim: 2 dim: 10 dim: 10 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 4 kernel_size: 3 {FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6"
        inner_product_param {{ num_output: 7 {FILL} }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }}
layer {{ name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
        inner_product_param {{ num_output: 5 {FILL} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }}
"""


def _vggish(text=VGGISH, phase=caffe.TEST):
    return caffe.Net(text, phase)


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- FC -> convolution ---------------------------------------------------------------------------

def test_converted_net_gives_the_same_scores_at_the_training_size():
    net = _vggish()
    x = _x((3, 2, 10, 10))
    ref = net.forward(data=x)["prob"].copy()
    conv = convert_fc_to_conv(net)
    out = conv.forward(data=x)["prob"]
    assert out.shape == (3, 5, 1, 1)
    np.testing.assert_allclose(out[:, :, 0, 0], ref, atol=1e-5)
    # layer/blob names as Caffe's net-surgery notebook, the rest untouched
    assert conv.layer_dict["fc6-conv"].type == "Convolution"
    assert conv.layer_dict["fc7-conv"].type == "Convolution"
    assert "fc6" not in conv.layer_dict and "fc6-conv" in conv.blobs
    assert conv.bottom_names["relu6"] == ["fc6-conv"] and conv.top_names["relu6"] == ["fc6-conv"]
    assert conv.bottom_names["prob"] == ["fc7-conv"]
    assert conv.phase == caffe.TEST


def _vgg_shaped(channels=(4, 4, 6, 6, 8), fc=16, classes=10):
    """VGG-16's layout at 224x224 with few channels: five conv+pool stages leave 7x7 maps, then
    fc6, fc7 (with ReLU and dropout) and fc8."""
    fill = 'weight_filler { type: "xavier" } bias_filler { type: "gaussian" std: 0.1 }'
    layers = ['layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 224 dim: 224 } } }']
    bottom = "data"
    for i, c in enumerate(channels, 1):
        layers.append(f'layer {{ name: "conv{i}_1" type: "Convolution" bottom: "{bottom}" top: "conv{i}_1" '
                      f'convolution_param {{ num_output: {c} kernel_size: 3 pad: 1 {fill} }} }}')
        layers.append(f'layer {{ name: "relu{i}_1" type: "ReLU" bottom: "conv{i}_1" top: "conv{i}_1" }}')
        layers.append(f'layer {{ name: "pool{i}" type: "Pooling" bottom: "conv{i}_1" top: "pool{i}" '
                      f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}')
        bottom = f"pool{i}"
    for name, n in (("fc6", fc), ("fc7", fc), ("fc8", classes)):
        layers.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                      f'inner_product_param {{ num_output: {n} {fill} }} }}')
        if name != "fc8":
            layers.append(f'layer {{ name: "relu{name[2]}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            layers.append(f'layer {{ name: "drop{name[2]}" type: "Dropout" bottom: "{name}" top: "{name}" }}')
        bottom = name
    layers.append('layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }')
    return 'name: "vgg_shaped"\n' + "\n".join(layers)


def test_vgg_shaped_net_at_224_converts_fc6_to_a_7x7_convolution_with_the_same_scores():
    backend.set_random_seed(5)
    net = caffe.Net(_vgg_shaped(), caffe.TEST)
    x = _x((2, 3, 224, 224), seed=7)
    ref_prob = net.forward(data=x)["prob"].copy()
    ref_scores = net.blobs["fc8"].data.copy()
    conv = caffe.convert_fc_to_conv(net)          # the package-level name the docs use
    assert conv.params["fc6-conv"][0].data.shape == (16, 8, 7, 7)
    assert conv.params["fc7-conv"][0].data.shape == (16, 16, 1, 1)
    assert conv.params["fc8-conv"][0].data.shape == (10, 16, 1, 1)
    out = conv.forward(data=x)["prob"]
    assert out.shape == (2, 10, 1, 1)
    np.testing.assert_allclose(out[:, :, 0, 0], ref_prob, atol=1e-5)
    np.testing.assert_allclose(conv.blobs["fc8-conv"].data[:, :, 0, 0], ref_scores, rtol=1e-5, atol=1e-5)
    # any larger input now works: 256x256 is an 8x8 pool5 map, so a 2x2 score map
    conv.blobs["data"].reshape(1, 3, 256, 256)
    conv.reshape()
    assert conv.forward(data=_x((1, 3, 256, 256)))["prob"].shape == (1, 10, 2, 2)


def test_weights_are_reshaped_not_changed():
    net = _vggish()
    conv = convert_fc_to_conv(net)
    w6, b6 = net.params["fc6"][0].data, net.params["fc6"][1].data
    assert conv.params["fc6-conv"][0].data.shape == (7, 4, 4, 4)          # C×H×W of pool1
    np.testing.assert_array_equal(conv.params["fc6-conv"][0].data.reshape(7, -1), w6)
    np.testing.assert_array_equal(conv.params["fc6-conv"][1].data, b6)
    assert conv.params["fc7-conv"][0].data.shape == (5, 7, 1, 1)
    np.testing.assert_array_equal(conv.params["fc7-conv"][0].data[:, :, 0, 0], net.params["fc7"][0].data)
    np.testing.assert_array_equal(conv.params["conv1"][0].data, net.params["conv1"][0].data)
    # a copy: changing the converted net leaves the original alone
    conv.params["conv1"][0].data[...] = 0
    assert np.abs(net.params["conv1"][0].data).sum() > 0


def test_larger_input_gives_a_score_map_whose_average_is_the_sliding_window_average():
    net = _vggish()
    conv = convert_fc_to_conv(net, input_shape=(1, 2, 16, 16))
    img = _x((1, 2, 16, 16), seed=3)
    conv.forward(data=img)
    score_map = conv.blobs["prob"].data.copy()
    assert score_map.shape == (1, 5, 4, 4)            # conv 14 -> pool 7 -> 4x4 kernel -> 4x4
    # position (i, j) is the original net on the 10x10 window at (2i, 2j) (pool stride 2)
    windows = np.stack([img[0, :, 2 * i:2 * i + 10, 2 * j:2 * j + 10] for i in range(4) for j in range(4)])
    net.blobs["data"].reshape(windows.shape)
    net.reshape()
    per_window = net.forward(data=windows)["prob"]
    np.testing.assert_allclose(score_map[0].reshape(5, 16).T, per_window, atol=1e-5)
    # dense_scores averages the map spatially
    np.testing.assert_allclose(dense_scores(conv, img)[0], per_window.mean(axis=0), atol=1e-6)
    # flip=True also averages the mirrored image's map
    flipped = img[..., ::-1].copy()
    np.testing.assert_allclose(dense_scores(conv, img, flip=True)[0],
                               0.5 * (dense_scores(conv, img)[0] + dense_scores(conv, flipped)[0]), atol=1e-6)


def test_dense_scores_reshapes_for_any_size_and_batch():
    conv = convert_fc_to_conv(_vggish())
    a = dense_scores(conv, _x((2, 2, 12, 14)), flip=True)
    b = dense_scores(conv, _x((1, 2, 20, 10)))
    assert a.shape == (2, 5) and b.shape == (1, 5)
    np.testing.assert_allclose(a.sum(axis=1), 1, atol=1e-5)     # averaged posteriors


def test_dense_scores_softmax_option_for_nets_ending_in_scores():
    text = VGGISH.replace('layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }', "")
    conv = convert_fc_to_conv(_vggish(text))
    img = _x((1, 2, 14, 14))
    raw = dense_scores(conv, img)
    score_map = conv.blobs["fc7-conv"].data.copy()
    assert score_map.shape == (1, 5, 3, 3)
    smax = dense_scores(conv, img, softmax=True)
    e = np.exp(score_map - score_map.max(axis=1, keepdims=True))
    np.testing.assert_allclose(smax[0], (e / e.sum(axis=1, keepdims=True)).mean(axis=(2, 3))[0], atol=1e-6)
    np.testing.assert_allclose(raw[0], score_map.mean(axis=(2, 3))[0], atol=1e-6)


def test_transposed_inner_product_converts_exactly():
    text = VGGISH.replace("num_output: 7", "num_output: 7 transpose: true")
    net = _vggish(text)
    x = _x((3, 2, 10, 10))
    ref = net.forward(data=x)["prob"].copy()
    conv = convert_fc_to_conv(net)
    np.testing.assert_allclose(conv.forward(data=x)["prob"][:, :, 0, 0], ref, atol=1e-5)


def test_input_shape_forms():
    net = _vggish()
    assert convert_fc_to_conv(net, (24, 20)).blobs["data"].shape == (3, 2, 24, 20)
    assert convert_fc_to_conv(net, (1, 2, 12, 12)).blobs["data"].shape == (1, 2, 12, 12)
    with pytest.raises(ShapeError, match="layer 'data'.*input_shape \\(5, 5, 5\\)"):
        convert_fc_to_conv(net, (5, 5, 5))


def test_v1_deploy_with_input_dim_converts():
    v1 = """name: "v1" input: "data" input_dim: 1 input_dim: 1 input_dim: 6 input_dim: 6
    layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
             convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
    layers { name: "fc6" type: INNER_PRODUCT bottom: "conv1" top: "fc6"
             inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
    layers { name: "prob" type: SOFTMAX bottom: "fc6" top: "prob" }"""
    net = caffe.Net(v1, caffe.TEST)
    x = _x((1, 1, 6, 6))
    ref = net.forward(data=x)["prob"].copy()
    conv = convert_fc_to_conv(net, (9, 9))
    assert conv.blobs["data"].shape == (1, 1, 9, 9)
    assert conv.params["fc6-conv"][0].data.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(dense_scores(conv, x), ref, atol=1e-5)


def test_written_definition_round_trips():
    net = _vggish()
    conv = convert_fc_to_conv(net)
    text = text_format.MessageToString(net_definition(conv))
    assert "Split" not in text and "state" not in text
    again = caffe.Net(text, caffe.TEST)
    again.copy_from_proto(conv.to_proto())
    x = _x((3, 2, 10, 10))
    np.testing.assert_array_equal(again.forward(data=x)["prob"], conv.forward(data=x)["prob"])


def test_strip_splits_restores_the_users_bottoms():
    text = VGGISH + 'layer { name: "side" type: "Softmax" bottom: "fc7" top: "side" }'
    net = _vggish(text)
    assert any(lp.type == "Split" for lp in net.param.layer)
    stripped = strip_splits(net.param)
    assert not any(lp.type == "Split" for lp in stripped.layer)
    by_name = {lp.name: lp for lp in stripped.layer}
    assert list(by_name["prob"].bottom) == ["fc7"] and list(by_name["side"].bottom) == ["fc7"]
    # and conversion works through the split
    conv = convert_fc_to_conv(net)
    x = _x((3, 2, 10, 10))
    ref = net.forward(data=x)
    out = conv.forward(data=x)
    np.testing.assert_allclose(out["side"][:, :, 0, 0], ref["side"], atol=1e-5)


def test_conversion_errors_name_the_net_or_layer():
    flat = """name: "flat"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }"""
    with pytest.raises(NetError, match="net 'flat': no InnerProduct layer reads a 4-D"):
        convert_fc_to_conv(caffe.Net(flat, caffe.TEST))
    axis2 = VGGISH.replace("num_output: 7", "num_output: 7 axis: 2")
    with pytest.raises(NetError, match="layer 'fc6' \\(InnerProduct\\).*axis is 2"):
        convert_fc_to_conv(_vggish(axis2))
    dummy = VGGISH.replace('type: "Input" top: "data" input_param',
                           'type: "DummyData" top: "data" dummy_data_param')
    with pytest.raises(NetError, match="needs a deploy net with an Input layer"):
        convert_fc_to_conv(_vggish(dummy), (12, 12))


# --- init_from -------------------------------------------------------------------------------------

def _conv(name, bottom, n):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 {FILL} }} }}\n')


def _pool(name, bottom):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')


def _fc(name, bottom, n):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {n} {FILL} }} }}\n')


def _vgg_like(convs_per_block, name):
    """A tiny VGG: blocks of 3x3 convs named conv<b>_<i>, pools, then fc6, fc7, fc8."""
    text = f'name: "{name}"\nlayer {{ name: "data" type: "Input" top: "data" ' \
           f'input_param {{ shape {{ dim: 1 dim: 1 dim: 8 dim: 8 }} }} }}\n'
    bottom, width = "data", 2
    for b, n in enumerate(convs_per_block, 1):
        for i in range(1, n + 1):
            text += _conv(f"conv{b}_{i}", bottom, width * b)
            bottom = f"conv{b}_{i}"
        text += _pool(f"pool{b}", bottom)
        bottom = f"pool{b}"
    text += _fc("fc6", bottom, 6) + _fc("fc7", "fc6", 6) + _fc("fc8", "fc7", 3)
    return text


A = _vgg_like([1, 1, 2], "A")        # conv1_1, conv2_1, conv3_1, conv3_2 (as VGG A's first four)
D = _vgg_like([2, 2, 3], "D")        # conv1_1, conv1_2, conv2_1, conv2_2, conv3_1, conv3_2, conv3_3


def test_default_mapping_is_vggs_recipe_by_name():
    a, d = caffe.Net(A, caffe.TEST), caffe.Net(D, caffe.TEST)
    assert vgg_init_mapping(d, a) == {n: n for n in ["conv1_1", "conv2_1", "conv3_1", "conv3_2",
                                                    "fc6", "fc7", "fc8"]}


def test_default_mapping_falls_back_to_forward_order_when_names_differ():
    renamed = re.sub(r'"conv(\d)', r'"c\1', A).replace('"fc', '"ip')
    src, d = caffe.Net(renamed, caffe.TEST), caffe.Net(D, caffe.TEST)
    assert vgg_init_mapping(d, src) == {"conv1_1": "c1_1", "conv1_2": "c2_1", "conv2_1": "c3_1",
                                        "conv2_2": "c3_2", "fc6": "ip6", "fc7": "ip7", "fc8": "ip8"}


def test_init_from_copies_mapped_layers_and_leaves_the_others_at_their_fillers():
    backend.set_random_seed(5)
    a = caffe.Net(A, caffe.TEST)
    backend.set_random_seed(9)
    d = caffe.Net(D, caffe.TEST)
    backend.set_random_seed(9)
    fresh = caffe.Net(D, caffe.TEST)            # what the fillers gave, for comparison
    copied = init_from(d, a)
    assert [(t, s) for t, s, _ in copied] == [(n, n) for n in ["conv1_1", "conv2_1", "conv3_1", "conv3_2",
                                                               "fc6", "fc7", "fc8"]]
    assert copied[0][2] == [(2, 1, 3, 3), (2,)]
    for t, s, _ in copied:
        for bt, bs in zip(d.params[t], a.params[s]):
            np.testing.assert_array_equal(bt.data, bs.data)
    for name in ["conv1_2", "conv2_2", "conv3_3"]:
        for bt, bf in zip(d.params[name], fresh.params[name]):
            np.testing.assert_array_equal(bt.data, bf.data)


def test_init_from_errors_name_both_layers_and_change_nothing():
    a, d = caffe.Net(A, caffe.TEST), caffe.Net(D, caffe.TEST)
    before = d.params["conv1_1"][0].data.copy()
    with pytest.raises(WeightsError, match="no layer 'nope' in the target net 'D' \\(mapped from 'conv1_1'\\)"):
        init_from(d, a, {"conv1_1": "conv1_1", "nope": "conv1_1"})
    with pytest.raises(WeightsError, match="no layer 'ghost' in the source net 'A' \\(mapped to 'fc6'\\)"):
        init_from(d, a, {"fc6": "ghost"})
    with pytest.raises(WeightsError, match="source layer 'conv2_1' \\(4, 2, 3, 3\\) into target layer "
                                           "'conv1_2' \\(2, 2, 3, 3\\)"):
        init_from(d, a, {"conv1_1": "conv1_1", "conv1_2": "conv2_1"})
    with pytest.raises(WeightsError, match="target layer 'pool1' has no parameters"):
        init_from(d, a, {"pool1": "conv1_1"})
    np.testing.assert_array_equal(d.params["conv1_1"][0].data, before)


def test_parse_mapping():
    assert parse_mapping("conv1_1:c1, fc6:fc6,fc7") == {"conv1_1": "c1", "fc6": "fc6", "fc7": "fc7"}
    with pytest.raises(WeightsError, match="empty layer name"):
        parse_mapping(":x")
