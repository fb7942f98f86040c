"""upgrade_net_proto_text / _binary and upgrade_solver_proto_text: Caffe's V1 → current upgrade."""
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.proto import caffe_pb2
from minicaffe.tools import upgrade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a VGG-shaped V1 net, small enough to build: legacy input fields, blobs_lr/weight_decay, V1 enums
V1_NET = """
name: "TinyVGG"
input: "data"
input_dim: 2
input_dim: 3
input_dim: 8
input_dim: 8
layers {
  bottom: "data" top: "conv1_1" name: "conv1_1" type: CONVOLUTION
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 pad: 1 kernel_size: 3
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } }
}
layers { bottom: "conv1_1" top: "conv1_1" name: "relu1_1" type: RELU }
layers { bottom: "conv1_1" top: "pool1" name: "pool1" type: POOLING
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers {
  bottom: "pool1" top: "fc6" name: "fc6" type: INNER_PRODUCT
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } }
}
layers { bottom: "fc6" top: "fc6" name: "relu6" type: RELU }
layers { bottom: "fc6" top: "fc6" name: "drop6" type: DROPOUT dropout_param { dropout_ratio: 0.5 } }
layers { bottom: "fc6" top: "prob" name: "prob" type: SOFTMAX }
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _read_net(path):
    return text_format.Parse(open(path).read(), caffe_pb2.NetParameter())


def test_text_upgrade_gives_current_format(tmp_path, capsys):
    src = _write(tmp_path, "v1.prototxt", V1_NET)
    out = str(tmp_path / "new.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    net = _read_net(out)
    assert net.name == "TinyVGG"
    assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
    assert [l.type for l in net.layer] == ["Input", "Convolution", "ReLU", "Pooling", "InnerProduct",
                                           "ReLU", "Dropout", "Softmax"]
    inp = net.layer[0]
    assert inp.name == "input" and list(inp.top) == ["data"]
    assert list(inp.input_param.shape[0].dim) == [2, 3, 8, 8]
    conv = net.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 4 and list(conv.convolution_param.kernel_size) == [3]
    assert net.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    text = open(out).read()
    assert 'type: "Convolution"' in text and "lr_mult: 2" in text.replace("2.0", "2")
    assert "layers {" not in text and "blobs_lr" not in text
    assert "Wrote upgraded NetParameter text proto to" in capsys.readouterr().err


def test_upgraded_text_builds_the_same_net(tmp_path):
    src = _write(tmp_path, "v1.prototxt", V1_NET)
    out = str(tmp_path / "new.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    old = caffe.Net(src, caffe.TEST)
    new = caffe.Net(out, caffe.TEST)
    assert old._layer_names == new._layer_names
    assert [l.type for l in old.layers] == [l.type for l in new.layers]
    assert {k: b.shape for k, b in old.blobs.items()} == {k: b.shape for k, b in new.blobs.items()}
    assert old.params_lr == new.params_lr == [1, 2, 1, 2]
    assert old.params_weight_decay == new.params_weight_decay == [1, 0, 1, 0]
    for name, blobs in old.params.items():
        for a, b in zip(blobs, new.params[name]):
            b.data[...] = a.data
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(old.forward(data=x)["prob"], new.forward(data=x)["prob"])


def test_text_upgrade_of_released_vgg16_deploy(tmp_path):
    src = os.path.join(ROOT, "models", "vgg", "vgg_d", "deploy.prototxt")
    out = str(tmp_path / "vgg16.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    net = _read_net(out)
    types = [l.type for l in net.layer]
    assert types[0] == "Input" and list(net.layer[0].input_param.shape[0].dim) == [10, 3, 224, 224]
    assert types.count("Convolution") == 13 and types.count("InnerProduct") == 3
    assert types[-1] == "Softmax" and len(net.layers) == 0
    # upgrading the result again changes nothing and says so
    again = str(tmp_path / "again.prototxt")
    assert upgrade.main_net_text([out, again]) == 0
    assert open(again).read() == open(out).read()


def test_current_format_is_left_alone(tmp_path, capsys):
    text = 'name: "n" layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }'
    src = _write(tmp_path, "cur.prototxt", text)
    out = str(tmp_path / "out.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    assert _read_net(out) == text_format.Parse(text, caffe_pb2.NetParameter())
    assert "File already in latest proto format" in capsys.readouterr().err


def test_in_place_upgrade_and_data_transform_fields(tmp_path):
    text = """
    layers { name: "data" type: DATA top: "data" top: "label"
             data_param { source: "db" batch_size: 4 scale: 0.5 mean_file: "m.binaryproto" crop_size: 3 mirror: true }
             include { phase: TRAIN } }
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "data" bottom: "label" top: "loss" }
    """
    src = _write(tmp_path, "net.prototxt", text)
    assert upgrade.main_net_text([src, src]) == 0        # same file: written atomically
    net = _read_net(src)
    data = net.layer[0]
    assert data.type == "Data" and net.layer[1].type == "SoftmaxWithLoss"
    assert data.transform_param.scale == 0.5 and data.transform_param.mean_file == "m.binaryproto"
    assert data.transform_param.crop_size == 3 and data.transform_param.mirror
    assert not data.data_param.HasField("scale") and not data.data_param.HasField("crop_size")
    assert data.data_param.source == "db" and data.include[0].phase == caffe_pb2.TRAIN
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_batch_norm_with_three_params_is_frozen(tmp_path):
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
            param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 1 } }
    """
    src = _write(tmp_path, "bn.prototxt", text)
    out = str(tmp_path / "out.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    bn = _read_net(out).layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in bn.param] == [(0, 0)] * 3


def _v1_caffemodel(rng):
    """A V1 caffemodel as old Caffe wrote it: bare input name, V1 layers, 4-d legacy blob shapes."""
    net = caffe_pb2.NetParameter(name="TinyVGG")
    net.input.append("data")
    weights = {}
    for name, typ, shapes in (("conv1_1", caffe_pb2.V1LayerParameter.CONVOLUTION, [(4, 3, 3, 3), (1, 1, 1, 4)]),
                              ("relu1_1", caffe_pb2.V1LayerParameter.RELU, []),
                              ("fc6", caffe_pb2.V1LayerParameter.INNER_PRODUCT, [(1, 1, 5, 64), (1, 1, 1, 5)])):
        layer = net.layers.add(name=name, type=typ)
        for shape in shapes:
            arr = rng.standard_normal(shape).astype(np.float32)
            weights.setdefault(name, []).append(arr)
            bp = layer.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
            bp.data.extend(arr.ravel().tolist())
    return net, weights


def test_binary_upgrade_keeps_legacy_blobs_and_loads(tmp_path, capsys):
    rng = np.random.default_rng(3)
    v1, weights = _v1_caffemodel(rng)
    src = tmp_path / "old.caffemodel"
    src.write_bytes(v1.SerializeToString())
    out = str(tmp_path / "new.caffemodel")
    assert upgrade.main_net_binary([str(src), out]) == 0
    err = capsys.readouterr().err
    assert "dropped net input name(s) data" in err and "Wrote upgraded NetParameter binary proto" in err
    new = caffe_pb2.NetParameter.FromString(open(out, "rb").read())
    assert len(new.layers) == 0 and len(new.input) == 0
    assert [(l.name, l.type) for l in new.layer] == [("conv1_1", "Convolution"), ("relu1_1", "ReLU"),
                                                     ("fc6", "InnerProduct")]
    bp = new.layer[0].blobs[0]
    assert (bp.num, bp.channels, bp.height, bp.width) == (4, 3, 3, 3) and not bp.HasField("shape")
    np.testing.assert_array_equal(np.asarray(bp.data, np.float32), weights["conv1_1"][0].ravel())

    proto = _write(tmp_path, "v1.prototxt", V1_NET)
    net = caffe.Net(proto, caffe.TEST)
    net.copy_from(out)
    np.testing.assert_array_equal(net.params["conv1_1"][0].data, weights["conv1_1"][0])
    np.testing.assert_array_equal(net.params["conv1_1"][1].data, weights["conv1_1"][1].ravel())
    np.testing.assert_array_equal(net.params["fc6"][0].data, weights["fc6"][0].reshape(5, 64))


def test_solver_type_enum_becomes_type_string(tmp_path):
    for enum, name in (("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
                       ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")):
        src = _write(tmp_path, "solver.prototxt",
                     f'net: "train_val.prototxt"\nbase_lr: 0.01\nsolver_type: {enum}\nmomentum: 0.9\n')
        out = str(tmp_path / "new.prototxt")
        assert upgrade.main_solver_text([src, out]) == 0
        solver = text_format.Parse(open(out).read(), caffe_pb2.SolverParameter())
        assert solver.type == name and not solver.HasField("solver_type")
        assert solver.net == "train_val.prototxt" and solver.base_lr == pytest.approx(0.01)
        assert "solver_type" not in open(out).read()


def test_solver_upgrade_embedded_net_and_noop(tmp_path, capsys):
    src = _write(tmp_path, "s.prototxt", 'type: "Adam"\nnet_param { layers { name: "r" type: RELU bottom: "x" '
                                         'top: "x" } input: "x" input_dim: 1 input_dim: 1 input_dim: 1 '
                                         'input_dim: 1 }\n')
    out = str(tmp_path / "o.prototxt")
    assert upgrade.main_solver_text([src, out]) == 0
    solver = text_format.Parse(open(out).read(), caffe_pb2.SolverParameter())
    assert [l.type for l in solver.net_param.layer] == ["Input", "ReLU"] and solver.type == "Adam"
    capsys.readouterr()
    assert upgrade.main_solver_text([out, out]) == 0
    assert "File already in latest proto format" in capsys.readouterr().err


def test_solver_with_both_type_fields_is_refused(tmp_path, capsys):
    src = _write(tmp_path, "s.prototxt", 'type: "Adam"\nsolver_type: SGD\n')
    assert upgrade.main_solver_text([src, str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "s.prototxt" in err and "solver_type (SGD)" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("tool", [upgrade.main_net_text, upgrade.main_net_binary, upgrade.main_solver_text])
def test_missing_input_file(tmp_path, capsys, tool):
    missing = str(tmp_path / "nope.prototxt")
    assert tool([missing, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.prototxt" in err and "no such file" in err
    assert "\n" not in err


def test_unparsable_text_names_line_and_column(tmp_path, capsys):
    src = _write(tmp_path, "bad.prototxt", 'name: "x"\nlayers {\n  name: "a"\n  type: CONVOLUTON\n}\n')
    assert upgrade.main_net_text([src, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "bad.prototxt:4:" in err and "CONVOLUTON" in err
    assert not os.path.exists(tmp_path / "out")


def test_binary_tool_rejects_text_and_empty_input(tmp_path, capsys):
    src = _write(tmp_path, "net.prototxt", V1_NET)
    assert upgrade.main_net_binary([src, str(tmp_path / "out")]) == 1
    assert "net.prototxt" in capsys.readouterr().err
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    assert upgrade.main_net_binary([str(empty), str(tmp_path / "out")]) == 1
    assert "empty.caffemodel: holds no layers" in capsys.readouterr().err


V0_NET = """
name: "old"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 blobs_lr: 1 blobs_lr: 2
                 weight_filler { type: "gaussian" std: 0.1 } } bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 5 } bottom: "pool1" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""


def test_v0_net_is_upgraded_as_caffe(tmp_path, capsys):
    """Caffe's V0 upgrade: the padding layer folded into the conv it feeds, fields to their params,
    then V1 → current and the inputs to an Input layer; the result builds and runs."""
    src = _write(tmp_path, "v0.prototxt", V0_NET)
    out = str(tmp_path / "new.prototxt")
    assert upgrade.main_net_text([src, out]) == 0
    net = _read_net(out)
    assert [(l.name, l.type) for l in net.layer] == [("input", "Input"), ("conv1", "Convolution"),
                                                     ("pool1", "Pooling"), ("fc", "InnerProduct"),
                                                     ("prob", "Softmax")]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"] and list(conv.convolution_param.pad) == [2]
    assert list(conv.convolution_param.kernel_size) == [3] and list(conv.convolution_param.stride) == [2]
    assert [p.lr_mult for p in conv.param] == [1, 2] and conv.convolution_param.weight_filler.std == \
        pytest.approx(0.1)
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert "lr_mult: 1\n" in open(out).read()           # written as Caffe's C++ writes floats
    result = caffe.Net(out, caffe.TEST).forward(data=np.ones((1, 3, 9, 9), np.float32))
    assert result["prob"].shape == (1, 5)
    # a net loads straight from the V0 file too
    assert caffe.Net(src, caffe.TEST)._layer_names == ["input", "conv1", "pool1", "fc", "prob"]


def test_v0_field_without_a_place_is_dropped_and_exits_1(tmp_path, capsys):
    src = _write(tmp_path, "v0.prototxt", V0_NET.replace('type: "softmax"', 'type: "softmax" num_output: 3'))
    out = tmp_path / "out"
    assert upgrade.main_net_text([src, str(out)]) == 1
    assert out.exists() and "num_output" not in out.read_text().split('name: "prob"')[1]
    assert "the upgrade dropped 1 field(s)" in capsys.readouterr().err


def test_v0_unknown_type_is_one_clear_line(tmp_path, capsys):
    src = _write(tmp_path, "v0.prototxt", 'layers { layer { name: "x" type: "warp" } }')
    assert upgrade.main_net_text([src, str(tmp_path / "out")]) == 1
    assert "layer 'x': unknown V0 layer type 'warp'" in capsys.readouterr().err


def test_command_line_entry(tmp_path):
    src = _write(tmp_path, "v1.prototxt", V1_NET)
    out = str(tmp_path / "new.prototxt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "minicaffe.tools.upgrade", "net_text", src, out],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert _read_net(out).layer[1].type == "Convolution"
    assert upgrade.main(["net_txt", src, out]) == 2                # unknown sub-command: usage
