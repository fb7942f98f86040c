"""An ordinary pycaffe script runs unchanged with ``import minicaffe as caffe``, and the Net engine
behaves as Caffe's: automatic splits, in-place layers, loss weights, propagate_down, shared
parameters, backward pruning, V1 nets, and one-line errors."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import minicaffe as caffe
from minicaffe.errors import MinicaffeError, NetError, ParseError, WeightsError

LENET = """
name: "LeNetLike"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3
          weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 8 weight_filler { type: "xavier" }
          bias_filler { type: "constant" value: 0.05 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


@pytest.fixture
def lenet(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET)
    return str(path)


def reference_forward(net, x):
    """LeNetLike in float64 NumPy with the net's weights: the numbers every step must give."""
    w1, b1 = (p.data.astype(np.float64) for p in net.params["conv1"])
    win = sliding_window_view(x, (3, 3), axis=(2, 3))                  # N,1,10,10,3,3
    conv = np.einsum("nchwij,ocij->nohw", win, w1) + b1[None, :, None, None]
    n, c, h, w = conv.shape
    pool = conv.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    wa, ba = (p.data.astype(np.float64) for p in net.params["ip1"])
    ip1 = np.maximum(pool.reshape(n, -1) @ wa.T + ba, 0)
    wb, bb = (p.data.astype(np.float64) for p in net.params["ip2"])
    ip2 = ip1 @ wb.T + bb
    e = np.exp(ip2 - ip2.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_pycaffe_script(lenet, tmp_path):
    caffe.set_mode_cpu()
    net = caffe.Net(lenet, caffe.TEST)
    assert caffe.TRAIN == 0 and caffe.TEST == 1

    # structure, as pycaffe exposes it
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net._layer_names) == ["data", "conv1", "pool1", "ip1", "relu1", "ip2", "prob"]
    assert [l.type for l in net.layers] == ["Input", "Convolution", "Pooling", "InnerProduct", "ReLU",
                                            "InnerProduct", "Softmax"]
    assert list(net.layer_dict) == list(net._layer_names)
    assert net.layer_dict["conv1"] is net.layers[1]
    assert list(net.blobs) == ["data", "conv1", "pool1", "ip1", "ip2", "prob"]   # relu1 is in place
    assert net.top_names["relu1"] == ["ip1"] and net.bottom_names["relu1"] == ["ip1"]
    assert net.bottom_names["data"] == [] and net.top_names["prob"] == ["prob"]
    assert list(net.params) == ["conv1", "ip1", "ip2"]
    assert net.params["conv1"][0].data.shape == (4, 1, 3, 3)
    assert net.params["conv1"][1].data.shape == (4,)
    assert net.params["ip1"][0].data.shape == (8, 100)
    assert net.blobs["pool1"].data.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(net.params["conv1"][1].data, 0.1)

    # forward by assignment, and by keyword
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()
    assert set(out) == {"prob"} and out["prob"].shape == (2, 3)
    np.testing.assert_allclose(out["prob"], reference_forward(net, x.astype(np.float64)), rtol=1e-4, atol=1e-6)
    x2 = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(net.forward(data=x2)["prob"], reference_forward(net, x2.astype(np.float64)),
                               rtol=1e-4, atol=1e-6)

    # partial forward returns the end layer's tops
    part = net.forward(start="conv1", end="ip1")
    assert set(part) == {"ip1"}

    # reshape the input, then the net
    net.blobs["data"].reshape(5, 1, 12, 12)
    net.reshape()
    assert net.blobs["prob"].data.shape == (5, 3) and net.blobs["conv1"].data.shape == (5, 4, 10, 10)
    x5 = rng.standard_normal((5, 1, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(net.forward(data=x5)["prob"], reference_forward(net, x5.astype(np.float64)),
                               rtol=1e-4, atol=1e-6)

    # forward_all over a count that is not a multiple of the batch (5)
    big = rng.standard_normal((12, 1, 12, 12)).astype(np.float32)
    all_out = net.forward_all(data=big)
    assert all_out["prob"].shape == (12, 3)
    np.testing.assert_allclose(all_out["prob"], reference_forward(net, big.astype(np.float64)),
                               rtol=1e-4, atol=1e-6)

    # save, and load back both ways
    weights = str(tmp_path / "lenet.caffemodel")
    net.save(weights)
    net2 = caffe.Net(lenet, weights, caffe.TEST)
    net3 = caffe.Net(lenet, caffe.TEST, weights=weights)
    net4 = caffe.Net(lenet, caffe.TEST)
    net4.copy_from(weights)
    for other in (net2, net3, net4):
        for name in net.params:
            for a, b in zip(net.params[name], other.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
    net2.blobs["data"].data[...] = x5[:2]
    np.testing.assert_allclose(net2.forward()["prob"], reference_forward(net, x5[:2].astype(np.float64)),
                               rtol=1e-4, atol=1e-6)

    # the rest of the pycaffe surface
    types = caffe.layer_type_list()
    assert {"Convolution", "Pooling", "InnerProduct", "ReLU", "Softmax", "Input"} <= set(types)
    assert types == sorted(types)
    p = caffe.proto.caffe_pb2.NetParameter()
    p.name = "x"
    assert caffe.proto.caffe_pb2.LayerParameter(type="ReLU").type == "ReLU"


def test_backward_with_force_backward_matches_numerical_gradient(lenet):
    net = caffe.Net(lenet, caffe.TEST)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    net.forward(data=x)
    top_diff = rng.standard_normal((2, 3)).astype(np.float32)
    grads = net.backward(**{net.outputs[0]: top_diff})
    assert set(grads) == {"data"} and grads["data"].shape == x.shape
    # d/dx of sum(prob · top_diff), by central differences on the float64 reference
    x64 = x.astype(np.float64)
    eps = 1e-4
    for idx in [(0, 0, 3, 4), (1, 0, 7, 7), (0, 0, 11, 0), (1, 0, 5, 9)]:
        plus, minus = x64.copy(), x64.copy()
        plus[idx] += eps
        minus[idx] -= eps
        num = ((reference_forward(net, plus) - reference_forward(net, minus)) * top_diff).sum() / (2 * eps)
        assert grads["data"][idx] == pytest.approx(num, rel=2e-2, abs=1e-5)
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


def test_transformer_feeds_an_image(lenet, tmp_path):
    cv2 = pytest.importorskip("cv2")
    img_path = str(tmp_path / "digit.png")
    cv2.imwrite(img_path, (np.arange(20 * 16).reshape(20, 16) % 256).astype(np.uint8))
    net = caffe.Net(lenet, caffe.TEST)
    image = caffe.io.load_image(img_path, color=False)
    assert image.shape == (20, 16, 1) and image.max() <= 1.0
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_raw_scale("data", 255)
    transformer.set_mean("data", np.array([128.0]))
    transformer.set_input_scale("data", 1 / 128.)
    net.blobs["data"].data[...] = transformer.preprocess("data", image)
    prob = net.forward()["prob"]
    want = (caffe.io.resize_image(image, (12, 12))[:, :, 0] * 255 - 128) / 128
    np.testing.assert_allclose(net.blobs["data"].data[1, 0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)


STAGED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "always" type: "InnerProduct" bottom: "data" top: "always" inner_product_param { num_output: 2 } }
layer { name: "deploy_only" type: "InnerProduct" bottom: "data" top: "deploy_only"
        include { stage: "deploy" } inner_product_param { num_output: 2 } }
layer { name: "level1" type: "InnerProduct" bottom: "data" top: "level1"
        include { min_level: 1 } inner_product_param { num_output: 2 } }
layer { name: "train_only" type: "InnerProduct" bottom: "data" top: "train_only"
        include { phase: TRAIN } inner_product_param { num_output: 2 } }
layer { name: "not_deploy" type: "InnerProduct" bottom: "data" top: "not_deploy"
        exclude { stage: "deploy" } inner_product_param { num_output: 2 } }
"""


def test_phase_level_stage_rules_and_weights_keyword(tmp_path):
    path = tmp_path / "staged.prototxt"
    path.write_text(STAGED)
    def real_layers(net):
        return [n for n, l in zip(net._layer_names, net.layers) if l.type != "Split"]
    base = caffe.Net(str(path), caffe.TEST)
    assert real_layers(base) == ["data", "always", "not_deploy"]
    weights = str(tmp_path / "w.caffemodel")
    full = caffe.Net(str(path), caffe.TRAIN, level=1, stages=["deploy"])
    assert real_layers(full) == ["data", "always", "deploy_only", "level1", "train_only"]
    full.save(weights)
    again = caffe.Net(str(path), caffe.TRAIN, weights=weights, level=1, stages=["deploy"])
    for name in full.params:
        np.testing.assert_array_equal(again.params[name][0].data, full.params[name][0].data)
    assert real_layers(caffe.Net(str(path), caffe.TEST, level=1)) == ["data", "always", "level1", "not_deploy"]


# --- engine behaviours -----------------------------------------------------------------------------

SPLIT = """
force_backward: true
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "b" type: "InnerProduct" bottom: "data" top: "b"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
"""


def test_automatic_split_names_and_summed_gradients():
    net = caffe.Net(SPLIT, caffe.TRAIN)
    assert net._layer_names == ["input", "data_input_0_split", "a", "b"]
    assert net.layers[1].type == "Split"
    assert net.top_names["data_input_0_split"] == ["data_input_0_split_0", "data_input_0_split_1"]
    assert net.bottom_names["a"] == ["data_input_0_split_0"]
    assert net.bottom_names["b"] == ["data_input_0_split_1"]
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    net.forward(data=x)
    da = np.ones((2, 2), np.float32)
    db = np.full((2, 2), 2.0, np.float32)
    grads = net.backward(a=da, b=db)
    wa, wb = net.params["a"][0].data, net.params["b"][0].data
    np.testing.assert_allclose(grads["data"], da @ wa + db @ wb, rtol=1e-5)
    # a split is only an engine detail: the saved model has no Split layer
    assert [l.type for l in net.to_proto().layer] == ["Input", "InnerProduct", "InnerProduct"]


def test_in_place_layers_share_the_blob():
    net = caffe.Net("""
layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
layer { name: "scale" type: "Power" bottom: "x" top: "x" power_param { scale: 3 } }
""", caffe.TEST)
    assert list(net.blobs) == ["x"]
    out = net.forward(x=np.array([[-1, 2, -3, 4]], np.float32))
    np.testing.assert_array_equal(out["x"], [[0, 6, 0, 12]])


def test_loss_weight_on_a_non_loss_layer():
    net = caffe.Net("""
layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" loss_weight: 2
        inner_product_param { num_output: 1 weight_filler { type: "constant" value: 0.5 } } }
""", caffe.TRAIN)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    net.blobs["x"].data[...] = x
    loss = net.forward_backward()
    assert loss == pytest.approx(2 * (0.5 * x.sum()))               # weighted sum of the top
    np.testing.assert_allclose(net.blobs["ip"].diff, 2.0)
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * x.sum(0, keepdims=True))


def test_propagate_down_false_stops_the_bottom_gradient_only():
    """propagate_down: false leaves the bottom's diff alone, so the layers below it skip backward too,
    while the layer's own parameters still learn (Caffe's Net::Init, without force_backward)."""
    text = """
layer { name: "input" type: "Input" top: "x" top: "target" input_param { shape { dim: 2 dim: 3 }
        shape { dim: 2 dim: 2 } } }
layer { name: "ip0" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "h" top: "ip" propagate_down: %s
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss"
        propagate_down: true propagate_down: false }
"""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    target = rng.standard_normal((2, 2)).astype(np.float32)
    results = {}
    for flag in ("true", "false"):
        net = caffe.Net(text % flag, caffe.TRAIN)
        net.forward(x=x, target=target)
        net.blobs["h"].diff[...] = 7                         # marker: must be left alone when false
        net.backward()
        results[flag] = {k: v.copy() for k, v in (("h", net.blobs["h"].diff), ("ip0", net.params["ip0"][0].diff),
                                                   ("ip", net.params["ip"][0].diff), ("w", net.params["ip"][0].data),
                                                   ("h_data", net.blobs["h"].data), ("dip", net.blobs["ip"].diff))}
    on, off = results["true"], results["false"]
    np.testing.assert_allclose(on["h"], on["dip"] @ on["w"], rtol=1e-5)
    assert np.abs(on["ip0"]).sum() > 0
    np.testing.assert_array_equal(off["h"], 7)
    np.testing.assert_array_equal(off["ip0"], 0)
    np.testing.assert_allclose(off["ip"], off["dip"].T @ off["h_data"], rtol=1e-5)
    assert np.abs(off["ip"]).sum() > 0


def test_shared_parameters_accumulate_into_one_blob():
    net = caffe.Net("""
force_backward: true
layer { name: "input" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "b" type: "InnerProduct" bottom: "y" top: "b" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
""", caffe.TRAIN)
    assert net.params["a"][0] is net.params["b"][0] and net.params["a"][1] is net.params["b"][1]
    assert len(net.learnable_params) == 2
    rng = np.random.default_rng(4)
    x, y = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    net.forward(x=x, y=y)
    net.clear_param_diffs()
    da, db = (rng.standard_normal((2, 2)).astype(np.float32) for _ in range(2))
    net.backward(a=da, b=db)
    np.testing.assert_allclose(net.params["a"][0].diff, da.T @ x + db.T @ y, rtol=1e-5)
    np.testing.assert_allclose(net.params["a"][1].diff, da.sum(0) + db.sum(0), rtol=1e-5)


def test_lr_mult_zero_layer_skipped_in_backward():
    net = caffe.Net("""
layer { name: "input" type: "Input" top: "x" top: "label" input_param { shape { dim: 2 dim: 3 }
        shape { dim: 2 } } }
layer { name: "frozen" type: "InnerProduct" bottom: "x" top: "f" param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "top" type: "InnerProduct" bottom: "f" top: "t"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "t" bottom: "label" top: "loss" }
""", caffe.TRAIN)
    calls = []
    for layer in net.layers:
        original = layer.backward

        def spy(top, propagate_down, bottom, _name=layer.name, _orig=original):
            calls.append(_name)
            return _orig(top, propagate_down, bottom)
        layer.backward = spy
    net.blobs["x"].data[...] = np.random.default_rng(5).standard_normal((2, 3))
    net.blobs["label"].data[...] = [0, 2]
    net.forward()
    net.backward()
    assert "frozen" not in calls and "top" in calls and "loss" in calls
    assert np.abs(net.params["frozen"][0].diff).sum() == 0
    assert np.abs(net.params["top"][0].diff).sum() > 0


V1_DEPLOY = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 6 input_dim: 6
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
         weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool" top: "fc" inner_product_param { num_output: 4
         weight_filler { type: "gaussian" std: 1 } } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""

CURRENT_DEPLOY = """
name: "v1"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" param { lr_mult: 1 decay_mult: 1 }
        param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 4
        weight_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_v1_prototxt_equals_current_format(tmp_path):
    v1_path, cur_path = tmp_path / "v1.prototxt", tmp_path / "cur.prototxt"
    v1_path.write_text(V1_DEPLOY)
    cur_path.write_text(CURRENT_DEPLOY)
    v1 = caffe.Net(str(v1_path), caffe.TEST)
    cur = caffe.Net(str(cur_path), caffe.TEST)
    assert v1._layer_names == cur._layer_names
    assert [l.type for l in v1.layers] == [l.type for l in cur.layers]
    assert {k: b.data.shape for k, b in v1.blobs.items()} == {k: b.data.shape for k, b in cur.blobs.items()}
    assert v1.params_lr == cur.params_lr == [1, 2, 1, 1]
    assert v1.params_weight_decay == cur.params_weight_decay == [1, 0, 1, 1]
    assert v1.param == cur.param
    weights = str(tmp_path / "w.caffemodel")
    cur.save(weights)
    v1.copy_from(weights)
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(v1.forward(data=x)["prob"], cur.forward(data=x)["prob"])


# --- one-line errors --------------------------------------------------------------------------

def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_error_unknown_layer_type(tmp_path):
    with pytest.raises(NetError) as exc:
        caffe.Net('layer { name: "c1" type: "Convolutoin" }', caffe.TEST)
    text = _one_line(exc)
    assert "'c1'" in text and "'Convolutoin'" in text and "did you mean 'Convolution'" in text


def test_error_bottom_not_produced():
    with pytest.raises(NetError) as exc:
        caffe.Net("""
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "dta" top: "ip" inner_product_param { num_output: 1 } }
""", caffe.TEST)
    text = _one_line(exc)
    assert "layer 'ip' (InnerProduct)" in text and "bottom 'dta' is not produced" in text


def test_error_wrong_field_has_file_line_col(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer {\n  name: "ip"\n  type: "InnerProduct"\n  inner_product_param { num_outptu: 3 }\n}\n')
    with pytest.raises(ParseError) as exc:
        caffe.Net(str(path), caffe.TEST)
    text = _one_line(exc)
    assert text.startswith(f"{path}:4:") and "num_outptu" in text


def test_error_weights_that_do_not_fit(lenet, tmp_path):
    other = tmp_path / "other.prototxt"
    other.write_text(LENET.replace("num_output: 8", "num_output: 6"))
    weights = str(tmp_path / "other.caffemodel")
    caffe.Net(str(other), caffe.TEST).save(weights)
    with pytest.raises(WeightsError) as exc:
        caffe.Net(lenet, weights, caffe.TEST)
    text = _one_line(exc)
    assert "other.caffemodel" in text and "layer 'ip1'" in text
    assert "(6, 100)" in text and "(8, 100)" in text
    with pytest.raises(MinicaffeError, match="missing.caffemodel"):
        caffe.Net(lenet, str(tmp_path / "missing.caffemodel"), caffe.TEST)


def test_caffe_layers_and_params_are_net_spec():
    """``from caffe import layers as L`` must give net_spec's layer factory, as in pycaffe."""
    from minicaffe import net_spec
    assert caffe.layers is net_spec.layers and caffe.params is net_spec.params
    assert caffe.NetSpec is net_spec.NetSpec and caffe.to_proto is net_spec.to_proto
    from minicaffe import layers as L, params as P
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.pool = L.Pooling(n.data, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    net = caffe.Net(str(n.to_proto()), caffe.TEST)
    assert net.blobs["pool"].data.shape == (1, 1, 2, 2)
    from minicaffe.classifier import Classifier
    assert caffe.Classifier is Classifier
