"""Wire/text compatibility of minicaffe's caffe.proto with BVLC Caffe.

The byte strings here are assembled by hand from Caffe's field numbers rather
than produced by protobuf, so a renumbered or retyped field shows up as a
mismatch instead of silently round-tripping through our own schema.
"""

import importlib.util
import os
import struct

import pytest
from google.protobuf import descriptor as _d
from google.protobuf import text_format

from minicaffe.proto import caffe_pb2 as pb
from minicaffe.proto import is_packed, is_repeated, is_required

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Minimal protobuf wire encoder (just enough for the tests)
# ---------------------------------------------------------------------------

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(n):
    if n < 0:  # negative int32/int64 go out as 10-byte two's complement
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field, wire):
    return varint((field << 3) | wire)


def f_varint(field, n):
    return tag(field, VARINT) + varint(n)


def f_bytes(field, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return tag(field, LEN) + varint(len(data)) + data


def f_float(field, x):
    return tag(field, I32) + struct.pack("<f", x)


def f_packed_floats(field, xs):
    return f_bytes(field, struct.pack("<%df" % len(xs), *xs))


def f_packed_doubles(field, xs):
    return f_bytes(field, struct.pack("<%dd" % len(xs), *xs))


def f_packed_varints(field, ns):
    return f_bytes(field, b"".join(varint(n) for n in ns))


def parse(cls, data):
    msg = cls()
    msg.ParseFromString(data)
    return msg


# ---------------------------------------------------------------------------
# Generated module is current
# ---------------------------------------------------------------------------

def test_generated_module_is_current():
    pytest.importorskip("grpc_tools.protoc")
    spec = importlib.util.spec_from_file_location(
        "gen_proto", os.path.join(ROOT, "scripts", "gen_proto.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.check() == 0, "run: python scripts/gen_proto.py"


# ---------------------------------------------------------------------------
# Binary format against hand-built bytes
# ---------------------------------------------------------------------------

def test_blobproto_shape_and_packed_data():
    data = [1.5, -2.0, 0.25, 3.0, 0.0, -7.125]
    # Serialized order is by field number: data(5), diff(6), shape(7), double_data(8).
    raw = (f_packed_floats(5, data)
           + f_packed_floats(6, [0.5])
           + f_bytes(7, f_packed_varints(1, [2, 3]))
           + f_packed_doubles(8, [1e-300]))
    b = parse(pb.BlobProto, raw)
    assert list(b.shape.dim) == [2, 3]
    assert list(b.data) == data
    assert list(b.diff) == [0.5]
    assert list(b.double_data) == [1e-300]
    assert not b.HasField("num")

    ours = pb.BlobProto()
    ours.shape.dim.extend([2, 3])
    ours.data.extend(data)
    ours.diff.append(0.5)
    ours.double_data.append(1e-300)
    assert ours.SerializeToString() == raw


def test_blobproto_unpacked_floats_also_parse():
    # Writers are free to emit repeated scalars unpacked; parsers must accept.
    raw = f_float(5, 1.0) + f_float(5, 2.0)
    assert list(parse(pb.BlobProto, raw).data) == [1.0, 2.0]


def test_blobproto_legacy_4d():
    raw = (f_varint(1, 2) + f_varint(2, 3) + f_varint(3, 4) + f_varint(4, 5)
           + f_packed_floats(5, [0.0] * 3))
    b = parse(pb.BlobProto, raw)
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 5)
    assert not b.HasField("shape")
    assert len(b.data) == 3

    ours = pb.BlobProto(num=2, channels=3, height=4, width=5, data=[0.0] * 3)
    assert ours.SerializeToString() == raw


def test_blobshape_large_int64_dim():
    raw = f_packed_varints(1, [1 << 33, 1])
    assert list(parse(pb.BlobShape, raw).dim) == [1 << 33, 1]
    assert pb.BlobShape(dim=[1 << 33, 1]).SerializeToString() == raw


def test_blobprotovector():
    inner = f_packed_floats(5, [4.0])
    raw = f_bytes(1, inner) + f_bytes(1, inner)
    v = parse(pb.BlobProtoVector, raw)
    assert [list(b.data) for b in v.blobs] == [[4.0], [4.0]]
    assert v.SerializeToString() == raw


def test_datum():
    pixels = bytes(range(6))
    raw = (f_varint(1, 1) + f_varint(2, 2) + f_varint(3, 3)
           + f_bytes(4, pixels) + f_varint(5, 7)
           # float_data is not declared packed in Caffe: one tag per value.
           + f_float(6, 0.5) + f_float(6, -1.0)
           + f_varint(7, 1))
    d = parse(pb.Datum, raw)
    assert (d.channels, d.height, d.width) == (1, 2, 3)
    assert d.data == pixels
    assert d.label == 7
    assert list(d.float_data) == [0.5, -1.0]
    assert d.encoded is True

    ours = pb.Datum(channels=1, height=2, width=3, data=pixels, label=7,
                    float_data=[0.5, -1.0], encoded=True)
    assert ours.SerializeToString() == raw


def test_datum_negative_label():
    raw = f_varint(5, -1)
    assert len(raw) == 11  # tag + 10-byte varint, as Caffe's C++ writes it
    assert parse(pb.Datum, raw).label == -1
    assert pb.Datum(label=-1).SerializeToString() == raw


def test_netparameter_current_layers():
    # BlobProto fields in number order: data(5) then shape(7).
    blob = f_packed_floats(5, [1.0, 2.0]) + f_bytes(7, f_packed_varints(1, [2]))
    layer = f_bytes(1, "fc8") + f_bytes(2, "InnerProduct") + f_bytes(7, blob)
    raw = f_bytes(1, "CaffeNet") + f_bytes(100, layer)
    assert raw[len(f_bytes(1, "CaffeNet")):][:2] == b"\xa2\x06"  # tag of field 100

    n = parse(pb.NetParameter, raw)
    assert n.name == "CaffeNet"
    assert len(n.layer) == 1 and len(n.layers) == 0
    lp = n.layer[0]
    assert (lp.name, lp.type) == ("fc8", "InnerProduct")
    assert list(lp.blobs[0].shape.dim) == [2]
    assert list(lp.blobs[0].data) == [1.0, 2.0]

    ours = pb.NetParameter(name="CaffeNet")
    ol = ours.layer.add(name="fc8", type="InnerProduct")
    ob = ol.blobs.add(data=[1.0, 2.0])
    ob.shape.dim.append(2)
    assert ours.SerializeToString() == raw


def test_netparameter_v1_layers():
    blob = f_varint(1, 1) + f_varint(2, 1) + f_varint(3, 1) + f_varint(4, 2) \
        + f_packed_floats(5, [0.1, 0.2])
    layer = (f_bytes(2, "data") + f_bytes(3, "conv1") + f_bytes(4, "conv1")
             + f_varint(5, 4)               # type: CONVOLUTION
             + f_bytes(6, blob)
             + f_float(7, 1.0) + f_float(7, 2.0)   # blobs_lr
             + f_float(8, 1.0) + f_float(8, 0.0)   # weight_decay
             + f_bytes(10, f_varint(1, 96)))       # convolution_param.num_output
    raw = f_bytes(1, "LegacyNet") + f_bytes(2, layer) + f_bytes(3, "data") \
        + f_varint(4, 10) + f_varint(4, 3)
    n = parse(pb.NetParameter, raw)
    assert n.name == "LegacyNet"
    assert list(n.input) == ["data"] and list(n.input_dim) == [10, 3]
    assert len(n.layers) == 1 and len(n.layer) == 0
    v1 = n.layers[0]
    assert v1.name == "conv1"
    assert v1.type == pb.V1LayerParameter.CONVOLUTION
    assert list(v1.bottom) == ["data"] and list(v1.top) == ["conv1"]
    assert v1.blobs[0].width == 2
    assert list(v1.blobs_lr) == [1.0, 2.0]
    assert list(v1.weight_decay) == [1.0, 0.0]
    assert v1.convolution_param.num_output == 96

    ours = pb.NetParameter(name="LegacyNet", input=["data"], input_dim=[10, 3])
    ol = ours.layers.add(bottom=["data"], top=["conv1"], name="conv1",
                         type=pb.V1LayerParameter.CONVOLUTION,
                         blobs_lr=[1.0, 2.0], weight_decay=[1.0, 0.0])
    ol.blobs.add(num=1, channels=1, height=1, width=2, data=[0.1, 0.2])
    ol.convolution_param.num_output = 96
    assert ours.SerializeToString() == raw


def test_v0_layer_nested_in_v1():
    v0 = f_bytes(1, "pool1") + f_bytes(2, "pool") + f_varint(8, 3) + f_varint(11, 1)
    raw = f_bytes(2, f_bytes(1, v0))  # NetParameter.layers[0].layer
    n = parse(pb.NetParameter, raw)
    old = n.layers[0].layer
    assert (old.name, old.type, old.kernelsize) == ("pool1", "pool", 3)
    assert old.pool == pb.V0LayerParameter.AVE
    assert n.SerializeToString() == raw


def test_solverstate():
    hist = f_packed_floats(5, [0.5, -0.5])
    raw = (f_varint(1, 45000) + f_bytes(2, "snap_iter_45000.caffemodel")
           + f_bytes(3, hist) + f_bytes(3, hist) + f_varint(4, 2))
    s = parse(pb.SolverState, raw)
    assert s.iter == 45000
    assert s.learned_net == "snap_iter_45000.caffemodel"
    assert len(s.history) == 2 and list(s.history[1].data) == [0.5, -0.5]
    assert s.current_step == 2

    ours = pb.SolverState(iter=45000, learned_net="snap_iter_45000.caffemodel",
                          current_step=2)
    ours.history.add(data=[0.5, -0.5])
    ours.history.add(data=[0.5, -0.5])
    assert ours.SerializeToString() == raw


def test_solver_negative_int64_seed():
    raw = f_varint(20, -1)
    assert parse(pb.SolverParameter, raw).random_seed == -1
    assert pb.SolverParameter(random_seed=-1).SerializeToString() == raw


def test_unknown_fields_survive_roundtrip():
    # A field number nobody defines (e.g. from a fork of Caffe) is kept.
    raw = f_bytes(1, "x") + f_varint(9999, 5)
    assert parse(pb.LayerParameter, raw).SerializeToString() == raw


# ---------------------------------------------------------------------------
# Text format
# ---------------------------------------------------------------------------

V1_VGG = """
name: "VGG"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 224
input_dim: 224
layers {
  bottom: "data"
  top: "conv1_1"
  name: "conv1_1"
  type: CONVOLUTION
  convolution_param { num_output: 64 pad: 1 kernel_size: 3 }
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
}
layers { bottom: "conv1_1" top: "conv1_1" name: "relu1_1" type: RELU }
layers {
  bottom: "conv1_1" top: "pool1" name: "pool1" type: POOLING
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
"""


def test_text_v1_vgg():
    n = text_format.Merge(V1_VGG, pb.NetParameter())
    assert n.name == "VGG"
    assert list(n.input) == ["data"]
    assert list(n.input_dim) == [10, 3, 224, 224]
    c = n.layers[0]
    assert c.type == pb.V1LayerParameter.CONVOLUTION
    assert c.convolution_param.num_output == 64
    assert list(c.convolution_param.pad) == [1]
    assert list(c.convolution_param.kernel_size) == [3]
    assert list(c.blobs_lr) == [1.0, 2.0]
    assert list(c.weight_decay) == [1.0, 0.0]
    assert n.layers[1].type == pb.V1LayerParameter.RELU
    p = n.layers[2].pooling_param
    assert p.pool == pb.PoolingParameter.MAX
    assert (p.kernel_size, p.stride) == (2, 2)
    # Text round trip.
    again = text_format.Merge(text_format.MessageToString(n), pb.NetParameter())
    assert again == n


def test_text_current_layer():
    text = """
    name: "net"
    layer {
      name: "data" type: "Data" top: "data" top: "label"
      include { phase: TRAIN }
      transform_param {
        mirror: true crop_size: 224
        mean_value: 104 mean_value: 117 mean_value: 123
      }
      data_param { source: "train_lmdb" batch_size: 64 backend: LMDB }
    }
    layer {
      name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      param { lr_mult: 1 decay_mult: 1 }
      param { lr_mult: 2 decay_mult: 0 }
      convolution_param {
        num_output: 96 kernel_size: 11 stride: 4
        weight_filler { type: "gaussian" std: 0.01 }
        bias_filler { type: "constant" value: 0 }
      }
    }
    layer {
      name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label"
      top: "loss" loss_weight: 1 propagate_down: true propagate_down: false
      exclude { phase: TEST stage: "deploy" }
      loss_param { ignore_label: 255 normalization: VALID }
    }
    """
    n = text_format.Merge(text, pb.NetParameter())
    d = n.layer[0]
    assert d.include[0].phase == pb.TRAIN
    t = d.transform_param
    assert t.mirror is True and t.crop_size == 224
    assert list(t.mean_value) == [104.0, 117.0, 123.0]
    assert t.scale == 1.0 and not t.HasField("scale")  # Caffe default
    assert d.data_param.backend == pb.DataParameter.LMDB

    c = n.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in c.param] == [(1, 1), (2, 0)]
    assert c.convolution_param.weight_filler.type == "gaussian"
    assert c.convolution_param.weight_filler.std == pytest.approx(0.01)
    assert c.convolution_param.bias_term is True  # default
    assert c.convolution_param.group == 1          # default

    loss = n.layer[2]
    assert list(loss.loss_weight) == [1.0]
    assert list(loss.propagate_down) == [True, False]
    assert loss.exclude[0].phase == pb.TEST
    assert list(loss.exclude[0].stage) == ["deploy"]
    assert loss.loss_param.ignore_label == 255
    assert loss.loss_param.normalization == pb.LossParameter.VALID


def test_text_solver():
    text = """
    net: "train_val.prototxt"
    test_iter: 1000 test_interval: 1000
    base_lr: 0.01 lr_policy: "step" gamma: 0.1
    stepsize: 100000 stepvalue: 10 stepvalue: 20
    momentum: 0.9 weight_decay: 0.0005
    max_iter: 450000 snapshot: 10000 snapshot_prefix: "caffenet"
    solver_mode: GPU type: "Adam"
    solver_type: ADAM
    """
    s = text_format.Merge(text, pb.SolverParameter())
    assert s.net == "train_val.prototxt"
    assert s.lr_policy == "step"
    assert list(s.stepvalue) == [10, 20]
    assert s.solver_mode == pb.SolverParameter.GPU
    assert s.type == "Adam"
    assert s.solver_type == pb.SolverParameter.ADAM
    assert s.base_lr == pytest.approx(0.01)
    # Caffe's defaults for untouched fields.
    e = pb.SolverParameter()
    assert e.type == "SGD"
    assert e.solver_mode == pb.SolverParameter.GPU
    assert e.random_seed == -1
    assert e.regularization_type == "L2"
    assert e.snapshot_format == pb.SolverParameter.BINARYPROTO
    assert e.delta == pytest.approx(1e-8)
    assert e.momentum2 == pytest.approx(0.999)
    assert e.rms_decay == pytest.approx(0.99)
    assert e.clip_gradients == -1
    assert e.average_loss == 1 and e.iter_size == 1
    assert e.test_initialization is True and e.snapshot_after_train is True


def test_text_extensions():
    text = """
    mirror: true
    scale_jitter { min_side: 256 max_side: 512 }
    color_shift { pca_file: "pca.binaryproto" }
    """
    t = text_format.Merge(text, pb.TransformationParameter())
    assert (t.scale_jitter.min_side, t.scale_jitter.max_side) == (256, 512)
    assert t.color_shift.sigma == pytest.approx(0.1)  # default
    assert t.color_shift.pca_file == "pca.binaryproto"
    # Field 1000, wire type 2 -> tag 8002 as varint.
    raw = f_bytes(1000, f_varint(1, 256) + f_varint(2, 512))
    assert pb.TransformationParameter(
        scale_jitter=pb.ScaleJitterParameter(min_side=256, max_side=512)
    ).SerializeToString() == raw


# ---------------------------------------------------------------------------
# Enum numbers and field numbers, written down from Caffe's caffe.proto
# ---------------------------------------------------------------------------

ENUMS = [
    # (enum full name, value name, number)
    ("caffe.Phase", "TRAIN", 0),
    ("caffe.Phase", "TEST", 1),
    ("caffe.PoolingParameter.PoolMethod", "MAX", 0),
    ("caffe.PoolingParameter.PoolMethod", "AVE", 1),
    ("caffe.PoolingParameter.PoolMethod", "STOCHASTIC", 2),
    ("caffe.PoolingParameter.RoundMode", "CEIL", 0),
    ("caffe.PoolingParameter.RoundMode", "FLOOR", 1),
    ("caffe.V1LayerParameter.LayerType", "NONE", 0),
    ("caffe.V1LayerParameter.LayerType", "ACCURACY", 1),
    ("caffe.V1LayerParameter.LayerType", "CONCAT", 3),
    ("caffe.V1LayerParameter.LayerType", "CONVOLUTION", 4),
    ("caffe.V1LayerParameter.LayerType", "DATA", 5),
    ("caffe.V1LayerParameter.LayerType", "DROPOUT", 6),
    ("caffe.V1LayerParameter.LayerType", "FLATTEN", 8),
    ("caffe.V1LayerParameter.LayerType", "IMAGE_DATA", 12),
    ("caffe.V1LayerParameter.LayerType", "INNER_PRODUCT", 14),
    ("caffe.V1LayerParameter.LayerType", "LRN", 15),
    ("caffe.V1LayerParameter.LayerType", "POOLING", 17),
    ("caffe.V1LayerParameter.LayerType", "RELU", 18),
    ("caffe.V1LayerParameter.LayerType", "SOFTMAX", 20),
    ("caffe.V1LayerParameter.LayerType", "SOFTMAX_LOSS", 21),
    ("caffe.V1LayerParameter.LayerType", "SPLIT", 22),
    ("caffe.V1LayerParameter.LayerType", "ELTWISE", 25),
    ("caffe.V1LayerParameter.LayerType", "DUMMY_DATA", 32),
    ("caffe.V1LayerParameter.LayerType", "ABSVAL", 35),
    ("caffe.V1LayerParameter.LayerType", "DECONVOLUTION", 39),
    ("caffe.V1LayerParameter.DimCheckMode", "PERMISSIVE", 1),
    ("caffe.V0LayerParameter.PoolMethod", "STOCHASTIC", 2),
    ("caffe.ParamSpec.DimCheckMode", "STRICT", 0),
    ("caffe.ParamSpec.DimCheckMode", "PERMISSIVE", 1),
    ("caffe.FillerParameter.VarianceNorm", "FAN_IN", 0),
    ("caffe.FillerParameter.VarianceNorm", "FAN_OUT", 1),
    ("caffe.FillerParameter.VarianceNorm", "AVERAGE", 2),
    ("caffe.SolverParameter.SolverMode", "CPU", 0),
    ("caffe.SolverParameter.SolverMode", "GPU", 1),
    ("caffe.SolverParameter.SnapshotFormat", "HDF5", 0),
    ("caffe.SolverParameter.SnapshotFormat", "BINARYPROTO", 1),
    ("caffe.SolverParameter.SolverType", "SGD", 0),
    ("caffe.SolverParameter.SolverType", "NESTEROV", 1),
    ("caffe.SolverParameter.SolverType", "ADAGRAD", 2),
    ("caffe.SolverParameter.SolverType", "RMSPROP", 3),
    ("caffe.SolverParameter.SolverType", "ADADELTA", 4),
    ("caffe.SolverParameter.SolverType", "ADAM", 5),
    ("caffe.LossParameter.NormalizationMode", "FULL", 0),
    ("caffe.LossParameter.NormalizationMode", "VALID", 1),
    ("caffe.LossParameter.NormalizationMode", "BATCH_SIZE", 2),
    ("caffe.LossParameter.NormalizationMode", "NONE", 3),
    ("caffe.EltwiseParameter.EltwiseOp", "PROD", 0),
    ("caffe.EltwiseParameter.EltwiseOp", "SUM", 1),
    ("caffe.EltwiseParameter.EltwiseOp", "MAX", 2),
    ("caffe.LRNParameter.NormRegion", "ACROSS_CHANNELS", 0),
    ("caffe.LRNParameter.NormRegion", "WITHIN_CHANNEL", 1),
    ("caffe.ReductionParameter.ReductionOp", "SUM", 1),
    ("caffe.ReductionParameter.ReductionOp", "MEAN", 4),
    ("caffe.HingeLossParameter.Norm", "L1", 1),
    ("caffe.HingeLossParameter.Norm", "L2", 2),
    ("caffe.DataParameter.DB", "LEVELDB", 0),
    ("caffe.DataParameter.DB", "LMDB", 1),
    ("caffe.ConvolutionParameter.Engine", "CUDNN", 2),
]


def test_enum_numbers():
    pool = pb.DESCRIPTOR.pool
    for full, name, number in ENUMS:
        enum = pool.FindEnumTypeByName(full)
        assert enum.values_by_name[name].number == number, (full, name)
    # Spot-check the Python-level accessors too.
    assert (pb.TRAIN, pb.TEST) == (0, 1)
    assert pb.PoolingParameter.STOCHASTIC == 2
    assert pb.V1LayerParameter.SOFTMAX_LOSS == 21


FIELDS = [
    # (message, field, number)
    ("BlobShape", "dim", 1),
    ("BlobProto", "num", 1), ("BlobProto", "channels", 2),
    ("BlobProto", "height", 3), ("BlobProto", "width", 4),
    ("BlobProto", "data", 5), ("BlobProto", "diff", 6),
    ("BlobProto", "shape", 7), ("BlobProto", "double_data", 8),
    ("BlobProto", "double_diff", 9),
    ("BlobProtoVector", "blobs", 1),
    ("Datum", "channels", 1), ("Datum", "height", 2), ("Datum", "width", 3),
    ("Datum", "data", 4), ("Datum", "label", 5), ("Datum", "float_data", 6),
    ("Datum", "encoded", 7),
    ("FillerParameter", "type", 1), ("FillerParameter", "value", 2),
    ("FillerParameter", "min", 3), ("FillerParameter", "max", 4),
    ("FillerParameter", "mean", 5), ("FillerParameter", "std", 6),
    ("FillerParameter", "sparse", 7), ("FillerParameter", "variance_norm", 8),
    ("NetParameter", "name", 1), ("NetParameter", "layers", 2),
    ("NetParameter", "input", 3), ("NetParameter", "input_dim", 4),
    ("NetParameter", "force_backward", 5), ("NetParameter", "state", 6),
    ("NetParameter", "debug_info", 7), ("NetParameter", "input_shape", 8),
    ("NetParameter", "layer", 100),
    ("SolverParameter", "train_net", 1), ("SolverParameter", "test_net", 2),
    ("SolverParameter", "test_iter", 3), ("SolverParameter", "test_interval", 4),
    ("SolverParameter", "base_lr", 5), ("SolverParameter", "display", 6),
    ("SolverParameter", "max_iter", 7), ("SolverParameter", "lr_policy", 8),
    ("SolverParameter", "gamma", 9), ("SolverParameter", "power", 10),
    ("SolverParameter", "momentum", 11), ("SolverParameter", "weight_decay", 12),
    ("SolverParameter", "stepsize", 13), ("SolverParameter", "snapshot", 14),
    ("SolverParameter", "snapshot_prefix", 15),
    ("SolverParameter", "snapshot_diff", 16),
    ("SolverParameter", "solver_mode", 17), ("SolverParameter", "device_id", 18),
    ("SolverParameter", "test_compute_loss", 19),
    ("SolverParameter", "random_seed", 20),
    ("SolverParameter", "train_net_param", 21),
    ("SolverParameter", "test_net_param", 22),
    ("SolverParameter", "debug_info", 23), ("SolverParameter", "net", 24),
    ("SolverParameter", "net_param", 25), ("SolverParameter", "train_state", 26),
    ("SolverParameter", "test_state", 27),
    ("SolverParameter", "snapshot_after_train", 28),
    ("SolverParameter", "regularization_type", 29),
    ("SolverParameter", "solver_type", 30), ("SolverParameter", "delta", 31),
    ("SolverParameter", "test_initialization", 32),
    ("SolverParameter", "average_loss", 33), ("SolverParameter", "stepvalue", 34),
    ("SolverParameter", "clip_gradients", 35), ("SolverParameter", "iter_size", 36),
    ("SolverParameter", "snapshot_format", 37), ("SolverParameter", "rms_decay", 38),
    ("SolverParameter", "momentum2", 39), ("SolverParameter", "type", 40),
    ("SolverParameter", "layer_wise_reduce", 41), ("SolverParameter", "weights", 42),
    ("SolverState", "iter", 1), ("SolverState", "learned_net", 2),
    ("SolverState", "history", 3), ("SolverState", "current_step", 4),
    ("NetState", "phase", 1), ("NetState", "level", 2), ("NetState", "stage", 3),
    ("NetStateRule", "phase", 1), ("NetStateRule", "min_level", 2),
    ("NetStateRule", "max_level", 3), ("NetStateRule", "stage", 4),
    ("NetStateRule", "not_stage", 5),
    ("ParamSpec", "name", 1), ("ParamSpec", "share_mode", 2),
    ("ParamSpec", "lr_mult", 3), ("ParamSpec", "decay_mult", 4),
    ("LayerParameter", "name", 1), ("LayerParameter", "type", 2),
    ("LayerParameter", "bottom", 3), ("LayerParameter", "top", 4),
    ("LayerParameter", "loss_weight", 5), ("LayerParameter", "param", 6),
    ("LayerParameter", "blobs", 7), ("LayerParameter", "include", 8),
    ("LayerParameter", "exclude", 9), ("LayerParameter", "phase", 10),
    ("LayerParameter", "propagate_down", 11),
    ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "loss_param", 101),
    ("LayerParameter", "accuracy_param", 102),
    ("LayerParameter", "argmax_param", 103),
    ("LayerParameter", "concat_param", 104),
    ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "data_param", 107),
    ("LayerParameter", "dropout_param", 108),
    ("LayerParameter", "dummy_data_param", 109),
    ("LayerParameter", "eltwise_param", 110),
    ("LayerParameter", "hdf5_data_param", 112),
    ("LayerParameter", "image_data_param", 115),
    ("LayerParameter", "inner_product_param", 117),
    ("LayerParameter", "lrn_param", 118),
    ("LayerParameter", "memory_data_param", 119),
    ("LayerParameter", "pooling_param", 121),
    ("LayerParameter", "power_param", 122),
    ("LayerParameter", "relu_param", 123),
    ("LayerParameter", "softmax_param", 125),
    ("LayerParameter", "slice_param", 126),
    ("LayerParameter", "python_param", 130),
    ("LayerParameter", "prelu_param", 131),
    ("LayerParameter", "reshape_param", 133),
    ("LayerParameter", "flatten_param", 135),
    ("LayerParameter", "batch_norm_param", 139),
    ("LayerParameter", "bias_param", 141),
    ("LayerParameter", "scale_param", 142),
    ("LayerParameter", "input_param", 143),
    ("LayerParameter", "crop_param", 144),
    ("LayerParameter", "clip_param", 148),
    ("TransformationParameter", "scale", 1),
    ("TransformationParameter", "mirror", 2),
    ("TransformationParameter", "crop_size", 3),
    ("TransformationParameter", "mean_file", 4),
    ("TransformationParameter", "mean_value", 5),
    ("TransformationParameter", "force_color", 6),
    ("TransformationParameter", "force_gray", 7),
    ("LossParameter", "ignore_label", 1), ("LossParameter", "normalize", 2),
    ("LossParameter", "normalization", 3),
    ("ConvolutionParameter", "num_output", 1),
    ("ConvolutionParameter", "bias_term", 2), ("ConvolutionParameter", "pad", 3),
    ("ConvolutionParameter", "kernel_size", 4), ("ConvolutionParameter", "group", 5),
    ("ConvolutionParameter", "stride", 6),
    ("ConvolutionParameter", "weight_filler", 7),
    ("ConvolutionParameter", "bias_filler", 8),
    ("ConvolutionParameter", "pad_h", 9), ("ConvolutionParameter", "pad_w", 10),
    ("ConvolutionParameter", "kernel_h", 11), ("ConvolutionParameter", "kernel_w", 12),
    ("ConvolutionParameter", "stride_h", 13), ("ConvolutionParameter", "stride_w", 14),
    ("ConvolutionParameter", "engine", 15), ("ConvolutionParameter", "axis", 16),
    ("ConvolutionParameter", "force_nd_im2col", 17),
    ("ConvolutionParameter", "dilation", 18),
    ("PoolingParameter", "pool", 1), ("PoolingParameter", "kernel_size", 2),
    ("PoolingParameter", "stride", 3), ("PoolingParameter", "pad", 4),
    ("PoolingParameter", "kernel_h", 5), ("PoolingParameter", "kernel_w", 6),
    ("PoolingParameter", "stride_h", 7), ("PoolingParameter", "stride_w", 8),
    ("PoolingParameter", "pad_h", 9), ("PoolingParameter", "pad_w", 10),
    ("PoolingParameter", "engine", 11), ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "round_mode", 13),
    ("InnerProductParameter", "num_output", 1),
    ("InnerProductParameter", "bias_term", 2),
    ("InnerProductParameter", "weight_filler", 3),
    ("InnerProductParameter", "bias_filler", 4),
    ("InnerProductParameter", "axis", 5), ("InnerProductParameter", "transpose", 6),
    ("DataParameter", "source", 1), ("DataParameter", "batch_size", 4),
    ("DataParameter", "backend", 8),
    ("DropoutParameter", "dropout_ratio", 1),
    ("LRNParameter", "local_size", 1), ("LRNParameter", "alpha", 2),
    ("LRNParameter", "beta", 3), ("LRNParameter", "norm_region", 4),
    ("LRNParameter", "k", 5),
    ("ReLUParameter", "negative_slope", 1),
    ("PythonParameter", "module", 1), ("PythonParameter", "layer", 2),
    ("PythonParameter", "param_str", 3),
    ("PReLUParameter", "filler", 1), ("PReLUParameter", "channel_shared", 2),
    ("V1LayerParameter", "layer", 1), ("V1LayerParameter", "bottom", 2),
    ("V1LayerParameter", "top", 3), ("V1LayerParameter", "name", 4),
    ("V1LayerParameter", "type", 5), ("V1LayerParameter", "blobs", 6),
    ("V1LayerParameter", "blobs_lr", 7), ("V1LayerParameter", "weight_decay", 8),
    ("V1LayerParameter", "concat_param", 9),
    ("V1LayerParameter", "convolution_param", 10),
    ("V1LayerParameter", "data_param", 11),
    ("V1LayerParameter", "dropout_param", 12),
    ("V1LayerParameter", "inner_product_param", 17),
    ("V1LayerParameter", "lrn_param", 18),
    ("V1LayerParameter", "pooling_param", 19),
    ("V1LayerParameter", "include", 32), ("V1LayerParameter", "exclude", 33),
    ("V1LayerParameter", "loss_weight", 35),
    ("V1LayerParameter", "transform_param", 36),
    ("V1LayerParameter", "loss_param", 42),
    ("V1LayerParameter", "param", 1001),
    ("V1LayerParameter", "blob_share_mode", 1002),
    ("V0LayerParameter", "name", 1), ("V0LayerParameter", "type", 2),
    ("V0LayerParameter", "num_output", 3), ("V0LayerParameter", "biasterm", 4),
    ("V0LayerParameter", "kernelsize", 8), ("V0LayerParameter", "pool", 11),
    ("V0LayerParameter", "k", 22), ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "det_context_pad", 58),
    ("V0LayerParameter", "hdf5_output_param", 1001),
]

# Ours only; everything else at >= 1000 must be Caffe's own.
EXTENSIONS = {
    ("TransformationParameter", "scale_jitter", 1000),
    ("TransformationParameter", "color_shift", 1001),
}


def _all_fields():
    out = set()

    def walk(msg, prefix=""):
        name = prefix + msg.name
        for f in msg.fields:
            out.add((name, f.name, f.number))
        for sub in msg.nested_types:
            walk(sub, name + ".")

    for m in pb.DESCRIPTOR.message_types_by_name.values():
        walk(m)
    return out


def test_field_numbers_match_caffe():
    ours = _all_fields()
    missing = [f for f in FIELDS if f not in ours]
    assert not missing, missing
    assert len(FIELDS) >= 60
    assert EXTENSIONS <= ours
    caffe_high = {f for f in FIELDS if f[2] >= 1000}
    high = {f for f in ours if f[2] >= 1000}
    assert high == caffe_high | EXTENSIONS


def test_field_types_and_labels():
    L = pb.LayerParameter.DESCRIPTOR.fields_by_name
    F = _d.FieldDescriptor
    # protobuf >= 7 dropped FieldDescriptor.label, 4.21 has only it: minicaffe.proto's helpers read both
    assert is_repeated(L["param"])
    assert L["param"].message_type.full_name == "caffe.ParamSpec"
    assert L["propagate_down"].type == F.TYPE_BOOL
    assert L["phase"].enum_type.full_name == "caffe.Phase"
    assert pb.BlobShape.DESCRIPTOR.fields_by_name["dim"].type == F.TYPE_INT64
    assert pb.SolverParameter.DESCRIPTOR.fields_by_name["random_seed"].type == F.TYPE_INT64
    assert pb.ConvolutionParameter.DESCRIPTOR.fields_by_name["pad"].type == F.TYPE_UINT32
    clip = pb.ClipParameter.DESCRIPTOR.fields_by_name
    assert is_required(clip["min"]) and is_required(clip["max"])
    assert not is_repeated(L["name"]) and not is_required(L["name"])
    assert is_packed(pb.BlobProto.DESCRIPTOR.fields_by_name["data"])
    assert not is_packed(pb.Datum.DESCRIPTOR.fields_by_name["float_data"])
    v1type = pb.V1LayerParameter.DESCRIPTOR.fields_by_name["type"]
    assert v1type.enum_type.full_name == "caffe.V1LayerParameter.LayerType"
    assert pb.DESCRIPTOR.package == "caffe"
    # Defaults that layers rely on.
    assert pb.PoolingParameter().stride == 1
    assert pb.ParamSpec().lr_mult == 1.0 and pb.ParamSpec().decay_mult == 1.0
    assert pb.FillerParameter().type == "constant"
    assert pb.FillerParameter().std == 1.0
    assert pb.NetState().phase == pb.TEST
    assert pb.BatchNormParameter().eps == pytest.approx(1e-5)
    assert pb.LRNParameter().beta == 0.75
    assert pb.WindowDataParameter().crop_mode == "warp"
