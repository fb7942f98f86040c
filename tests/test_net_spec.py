"""net_spec: pycaffe's naming rules, parameter placement, ntop/in_place, and nets that build."""
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.net_spec import NetSpec, NetSpecError, layers as L, params as P, to_proto
from minicaffe.proto import caffe_pb2


def lenet(batch):
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch, 1, 28, 28]), dict(dim=[batch, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch):
    data, label = L.DummyData(shape=[dict(dim=[batch, 1, 28, 28]), dict(dim=[batch, 1, 1, 1])], ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20)
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50)
    ip1 = L.InnerProduct(conv2, num_output=30)
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10)
    return L.SoftmaxWithLoss(ip2, label).to_proto()


def test_lenet_builds_and_relu_is_in_place(tmp_path):
    proto = lenet(2)
    assert [l.name for l in proto.layer] == ["data", "conv1", "pool1", "conv2", "pool2", "ip1",
                                              "relu1", "ip2", "loss"]
    relu = proto.layer[6]
    assert list(relu.bottom) == list(relu.top) == ["ip1"]
    assert list(proto.layer[0].top) == ["data", "label"]
    assert proto.layer[0].transform_param.scale == pytest.approx(1 / 255)
    assert proto.layer[1].convolution_param.weight_filler.type == "xavier"
    assert proto.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    path = tmp_path / "lenet.prototxt"
    path.write_text(str(proto))
    net = caffe.Net(str(path), caffe.TEST)
    assert [n for n in net._layer_names if not n.endswith("_split")] == [l.name for l in proto.layer]
    out = net.forward()
    assert set(out) == {"loss"} and out["loss"] > 0


def test_automatic_names_follow_pycaffe():
    proto = anon_lenet(2)
    names = [(l.name, list(l.bottom), list(l.top)) for l in proto.layer]
    assert names == [
        ("DummyData1", [], ["DummyData1", "DummyData2"]),
        ("Convolution1", ["DummyData1"], ["Convolution1"]),
        ("Pooling1", ["Convolution1"], ["Pooling1"]),
        ("Convolution2", ["Pooling1"], ["Convolution2"]),
        ("InnerProduct1", ["Convolution2"], ["InnerProduct1"]),
        ("ReLU1", ["InnerProduct1"], ["InnerProduct1"]),
        ("InnerProduct2", ["InnerProduct1"], ["InnerProduct2"]),
        ("SoftmaxWithLoss1", ["InnerProduct2", "DummyData2"], ["SoftmaxWithLoss1"]),
    ]
    net = caffe.Net(str(proto), caffe.TRAIN)
    assert net.outputs == ["SoftmaxWithLoss1"]


def test_zero_tops_and_several_tops():
    n = NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=[2, 3]), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    proto = n.to_proto()
    assert [l.name for l in proto.layer] == ["data", "silence_data", "silence_data2"]
    assert len(proto.layer[1].top) == 0
    net = caffe.Net(str(proto), caffe.TEST)
    assert net.forward() == {}
    # an unnamed zero-top layer is named by its type
    fn = L.Silence(L.DummyData(shape=dict(dim=[1])), ntop=0)
    assert to_proto(fn).layer[-1].name == "Silence1"


def test_parameter_placement_enum_names_and_phase_rules():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    top = L.Convolution(x, num_output=4, kernel_size=3, pad=[1], bias_term=False,
                        param=[dict(lr_mult=1, decay_mult=1)], loss_weight=0.5,
                        include=dict(phase=caffe.TRAIN, stage=["a"]), propagate_down=[False],
                        engine="CAFFE", name="custom")
    layer = top.to_proto().layer[-1]
    assert layer.name == "custom"                                 # name= overrides the generated one
    cp = layer.convolution_param
    assert list(cp.kernel_size) == [3] and list(cp.pad) == [1] and cp.bias_term is False
    assert cp.engine == caffe_pb2.ConvolutionParameter.CAFFE      # enum by name
    assert layer.param[0].lr_mult == 1 and layer.param[0].decay_mult == 1
    assert list(layer.loss_weight) == [0.5] and list(layer.propagate_down) == [False]
    assert layer.include[0].phase == caffe_pb2.TRAIN and list(layer.include[0].stage) == ["a"]
    # Deconvolution and loss layers reach their parameter messages without spelling them out
    d = L.Deconvolution(x, num_output=2, kernel_size=4, stride=2).to_proto().layer[-1]
    assert d.convolution_param.num_output == 2 and list(d.convolution_param.stride) == [2]
    s = L.SoftmaxWithLoss(x, x, ignore_label=255, axis=1).to_proto().layer[-1]
    assert s.loss_param.ignore_label == 255 and s.softmax_param.axis == 1
    # a prebuilt message is copied in
    filler = caffe_pb2.FillerParameter(type="gaussian", std=0.5)
    c = L.Convolution(x, num_output=1, kernel_size=1, weight_filler=filler).to_proto().layer[-1]
    assert c.convolution_param.weight_filler.std == pytest.approx(0.5)


def test_data_and_python_layers_get_their_params():
    n = NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2,
                             transform_param=dict(scale=1. / 255, mirror=True, crop_size=24))
    n.out = L.Python(n.data, module="my_layers", layer="Scale", param_str="{'k': 2}")
    proto = n.to_proto()
    data, py = proto.layer
    assert data.data_param.source == "train_lmdb" and data.data_param.batch_size == 64
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert data.transform_param.mirror and data.transform_param.crop_size == 24
    assert (py.python_param.module, py.python_param.layer) == ("my_layers", "Scale")
    assert py.python_param.param_str == "{'k': 2}"


def test_to_proto_text_round_trips():
    proto = lenet(1)
    again = text_format.Parse(str(proto), caffe_pb2.NetParameter())
    assert again == proto


def test_errors_name_layer_and_key():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    with pytest.raises(NetSpecError, match=r"layer 'Convolution\d+' \(Convolution\): unknown parameter "
                                           r"'kernal_size'.*did you mean 'kernel_size'"):
        L.Convolution(x, kernal_size=3).to_proto()
    with pytest.raises(NetSpecError, match=r"'MAXX' is not a value of PoolMethod"):
        L.Pooling(x, pool="MAXX", kernel_size=2).to_proto()
    with pytest.raises(NetSpecError, match=r"weight_filler.*has no field 'tpye'"):
        L.Convolution(x, num_output=1, kernel_size=1, weight_filler=dict(tpye="xavier")).to_proto()
    with pytest.raises(NetSpecError, match=r"cannot set convolution_param.num_output = 'many'"):
        L.Convolution(x, num_output="many", kernel_size=1).to_proto()
    with pytest.raises(TypeError) as err:
        L.Silence(L.DummyData(ntop=2), ntop=0)
    assert str(err.value) == "Silence input 0 is not a Top (type is <class 'tuple'>)"
    # pycaffe's test pins the message exactly; the tuple hint rides along as a note
    assert any("pass its elements" in note for note in getattr(err.value, "__notes__", ["pass its elements"]))
    L.Silence(*L.DummyData(ntop=2), ntop=0)
    with pytest.raises(AttributeError, match="has no constant 'MIN'"):
        P.Pooling.MIN
    with pytest.raises(AttributeError, match="no NoSuchParameter"):
        P.NoSuch.X
    n = NetSpec()
    n.pair = L.DummyData(shape=dict(dim=[1]), ntop=2)
    with pytest.raises(TypeError, match="NetSpec.pair holds a tuple, not a Top"):
        n.to_proto()
    n = NetSpec()
    with pytest.raises(AttributeError, match="no top named 'missing'"):
        n.missing
    with pytest.raises(KeyError):
        n["missing"]


def test_params_constants():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == caffe_pb2.PoolingParameter.AVE
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
