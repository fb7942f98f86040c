"""upgrade_net_proto_text/_binary and upgrade_solver_proto_text against Caffe's own tools: the same
input gives the same output file, byte for byte (Caffe's C++ text format, floats included), and the
same exit status.

The inputs: V0 and V1 nets written here to cover every field the V0 → V1 → current upgrade moves
(padding layers, data-layer transform fields, net inputs, a V0 field with no place, which makes both
tools exit 1), the released VGG-16 deploy net in V1 format from models/, the V0 and V1 nets embedded in
Caffe's own src/caffe/test/test_upgrade_proto.cpp (read from the reference's source tree when it is
there), current-format files (left as they are, but rewritten in C++'s float style), and solvers.
"""
import os
import re
import subprocess

import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.tools import upgrade

from .reference import ROOT

V0_NET = """
name: "v0net"
input: "extra"
input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4
force_backward: true
layers { layer { name: "data" type: "data" source: "train_db" meanfile: "mean.binaryproto"
                 batchsize: 16 cropsize: 24 mirror: true scale: 0.00390625 rand_skip: 7 }
         top: "data" top: "label" }
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 8 kernelsize: 5 stride: 2 group: 1 biasterm: false
                 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 }
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "pad2" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 }
         bottom: "pool1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 weight_filler { type: "xavier" } }
         bottom: "norm1" top: "fc" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "fc" top: "fc" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "fc" bottom: "fc" top: "cat" }
layers { layer { name: "sig" type: "sigmoid" } bottom: "cat" top: "sig" }
layers { layer { name: "th" type: "tanh" } bottom: "sig" top: "th" }
layers { layer { name: "b" type: "bnll" } bottom: "th" top: "b" }
layers { layer { name: "flat" type: "flatten" } bottom: "b" top: "flat" }
layers { layer { name: "prob" type: "softmax" } bottom: "flat" top: "prob" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" top: "loss" }
layers { layer { name: "acc" type: "accuracy" } bottom: "fc" bottom: "label" top: "acc" }
layers { layer { name: "out" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" } }
         bottom: "fc" bottom: "label" }
layers { layer { name: "img" type: "images" source: "list.txt" batchsize: 2 shuffle_images: true
                 new_height: 32 new_width: 30 rand_skip: 1 } top: "img" top: "img_label" }
layers { layer { name: "win" type: "window_data" source: "windows.txt" batchsize: 4 det_fg_threshold: 0.6
                 det_bg_threshold: 0.4 det_fg_fraction: 0.3 det_context_pad: 16 det_crop_mode: "square" }
         top: "win" top: "win_label" }
layers { layer { name: "h5" type: "hdf5_data" source: "h5.txt" batchsize: 3 } top: "h5" }
layers { layer { name: "info" type: "infogain_loss" source: "H.binaryproto" }
         bottom: "fc" bottom: "label" top: "info" }
layers { layer { name: "eu" type: "euclidean_loss" } bottom: "fc" bottom: "fc" top: "eu" }
layers { layer { name: "mlr" type: "multinomial_logistic_loss" } bottom: "prob" bottom: "label" top: "mlr" }
layers { layer { name: "sp" type: "split" } bottom: "label" top: "l1" top: "l2" }
layers { layer { name: "i2c" type: "im2col" } bottom: "data" top: "cols" }
"""

V1_NET = """
name: "v1net"
input: "aux"
input_shape { dim: 2 dim: 5 }
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 4 scale: 0.5 mean_file: "m.binaryproto" crop_size: 8 mirror: true }
  include { phase: TRAIN } }
layers { name: "data" type: DATA top: "data" top: "label" data_param { source: "test_db" batch_size: 2 }
  include { phase: TEST stage: "val" } exclude { min_level: 2 } }
layers { name: "imgs" type: IMAGE_DATA top: "imgs" top: "il" image_data_param { source: "l.txt" batch_size: 1 } }
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2 weight_decay: 1
  weight_decay: 0 param: "shared_w" blob_share_mode: PERMISSIVE
  convolution_param { num_output: 3 pad: 1 kernel_size: 3 weight_filler { type: "msra" } } }
layers { name: "conv_b" type: CONVOLUTION bottom: "data" top: "conv_b" param: "shared_w"
  convolution_param { num_output: 3 pad: 1 kernel_size: 3 } }
layers { name: "sum" type: ELTWISE bottom: "conv" bottom: "conv_b" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.123456789 } }
layers { name: "relu" type: RELU bottom: "sum" top: "sum" relu_param { negative_slope: 0.1 } }
layers { name: "pool" type: POOLING bottom: "sum" top: "pool" pooling_param { pool: MAX kernel_size: 2 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "pool" top: "ip" inner_product_param { num_output: 10 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" loss_weight: 2
  loss_param { ignore_label: 255 } }
layers { name: "acc" type: ACCURACY bottom: "ip" bottom: "label" top: "acc" accuracy_param { top_k: 5 } }
layers { name: "pw" type: POWER bottom: "ip" top: "pw" power_param { power: 2 scale: 1e-08 shift: 100000000 } }
layers { name: "none" bottom: "ip" top: "none" }
"""

CURRENT_NET = """
name: "current-\u00e9"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } param { lr_mult: 1 }
  param { lr_mult: 1 decay_mult: 1 } }
layer { name: "sc" type: "Scale" bottom: "x" top: "y" scale_param { filler { value: 0.3 } bias_term: true } }
"""

SOLVER_OLD = """
net: "net.prototxt"
solver_type: ADAGRAD
base_lr: 0.123456789
delta: 1e-08
weight_decay: 1
lr_policy: "multistep"
stepvalue: 100 stepvalue: 200
gamma: 0.1
max_iter: 300
snapshot_prefix: "snap"
"""

SOLVER_CURRENT = 'net: "n.prototxt"\ntype: "Adam"\nbase_lr: 1.0\nmomentum2: 0.999\nclip_gradients: 35.5\n'

BAD_V0 = """
name: "bad"
input: "x"
layers { layer { name: "relu" type: "relu" num_output: 3 } bottom: "x" top: "y" }
"""


def embedded_nets(ref):
    """{name: text} of the V0/V1 nets in Caffe's test_upgrade_proto.cpp (the inputs of its tests)."""
    path = os.path.join(os.path.dirname(ref.prefix), "src", "src", "caffe", "test", "test_upgrade_proto.cpp")
    if not os.path.exists(path):
        return {}
    src = open(path).read()
    nets = {}
    for test in re.finditer(r"TEST_F\((\w+), (\w+)\)(.*?)(?=TEST_F\(|\Z)", src, re.S):
        for lit in re.finditer(r"const string& (\w+) =\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+);", test.group(3)):
            text = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", lit.group(2))).replace('\\"', '"')
            if "layers {" in text and not lit.group(1).startswith("expected_output"):
                nets[f"{test.group(1)}.{test.group(2)}.{lit.group(1)}"] = text
    return nets


def run_both(ref, tool, src_text, tmp_path, binary=False):
    """((exit status, output bytes) of Caffe's tool, the same of minicaffe's) on one input file."""
    src = tmp_path / ("in.caffemodel" if binary else "in.prototxt")
    if binary:
        src.write_bytes(src_text)
    else:
        src.write_text(src_text)
    results = []
    for engine in ("caffe", "minicaffe"):
        out = tmp_path / f"{engine}.out"
        if engine == "caffe":
            proc = subprocess.run([ref.bin(tool), str(src), str(out)], capture_output=True, env=ref.env(),
                                  timeout=60)
            code, why = proc.returncode, proc.stderr[-2000:]
        else:           # in this process: the same main() the upgrade_* commands run
            main = {"upgrade_net_proto_text": upgrade.main_net_text,
                    "upgrade_net_proto_binary": upgrade.main_net_binary,
                    "upgrade_solver_proto_text": upgrade.main_solver_text}[tool]
            code, why = main([str(src), str(out)]), ""
        assert out.exists(), f"{engine} {tool} wrote nothing ({code}): {why}"
        results.append((code, out.read_bytes()))
    return results


def assert_same(theirs, mine):
    assert mine[0] == theirs[0], f"exit status {mine[0]}, Caffe's {theirs[0]}"
    if mine[1] != theirs[1]:
        import difflib
        diff = difflib.unified_diff(theirs[1].decode(errors="replace").splitlines(),
                                    mine[1].decode(errors="replace").splitlines(), "caffe", "minicaffe",
                                    lineterm="")
        pytest.fail("output differs from Caffe's:\n" + "\n".join(diff))


@pytest.mark.parametrize("name", ["V0_NET", "V1_NET", "CURRENT_NET", "BAD_V0", "vgg16"])
def test_net_text_upgrade_as_caffe(ref, tmp_path, name):
    if name == "vgg16":
        text = open(os.path.join(ROOT, "models", "vgg", "vgg_d", "deploy.prototxt")).read()
    else:
        text = globals()[name]
    theirs, mine = run_both(ref, "upgrade_net_proto_text", text, tmp_path)
    assert_same(theirs, mine)
    assert mine[0] == (1 if name == "BAD_V0" else 0)


def test_caffes_own_upgrade_test_nets(ref, tmp_path):
    nets = embedded_nets(ref)
    if not nets:
        pytest.skip("the reference's source tree (src/caffe/test/test_upgrade_proto.cpp) is not there")
    assert len(nets) >= 6, sorted(nets)
    for name, text in sorted(nets.items()):
        d = tmp_path / name
        d.mkdir()
        theirs, mine = run_both(ref, "upgrade_net_proto_text", text, d)
        assert_same(theirs, mine)


@pytest.mark.parametrize("text", [SOLVER_OLD, SOLVER_CURRENT], ids=["solver_type", "current"])
def test_solver_text_upgrade_as_caffe(ref, tmp_path, text):
    theirs, mine = run_both(ref, "upgrade_solver_proto_text", text, tmp_path)
    assert_same(theirs, mine)


def test_net_binary_upgrade_as_caffe(ref, tmp_path):
    """A V1 caffemodel with legacy 4-d blobs: the same bytes out."""
    from google.protobuf import text_format
    net = text_format.Parse(V1_NET, caffe_pb2.NetParameter())
    conv = net.layers[3]
    w = conv.blobs.add(num=3, channels=1, height=3, width=3)
    w.data.extend([0.1 * i for i in range(27)])
    conv.blobs.add(num=1, channels=1, height=1, width=3).data.extend([0.5, -0.25, 1e-7])
    theirs, mine = run_both(ref, "upgrade_net_proto_binary", net.SerializeToString(), tmp_path, binary=True)
    assert mine[0] == theirs[0]
    assert caffe_pb2.NetParameter.FromString(mine[1]) == caffe_pb2.NetParameter.FromString(theirs[1])
    assert mine[1] == theirs[1]
