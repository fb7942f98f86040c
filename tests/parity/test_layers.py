"""Layer forward/backward parity with BVLC Caffe: small random nets (force_backward) run once forward and
once backward by pycaffe (in a subprocess, tests/parity/pycaffe_dump.py) and by minicaffe, on the same
.caffemodel and inputs; every blob's data and diff and every parameter's data and gradient must agree
within 1e-5 relative (max |mine - Caffe's| / max |Caffe's|, per array).

All cases go to one pycaffe process, so Caffe is loaded once for the module.
"""
import json
import os

import numpy as np
import pytest

from minicaffe.proto import caffe_pb2

from .reference import rel_diff

TOL = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))

G = 'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 0.1 }'

# name -> (inputs {blob: (shape, kind)}, layers). kind: normal | positive | label:N | prob | binary | info:N
CASES = {
    "conv": ({"x": ((2, 4, 7, 7), "normal")}, f"""
layer {{ name: "c1" type: "Convolution" bottom: "x" top: "c1"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 {G} }} }}
layer {{ name: "c2" type: "Convolution" bottom: "x" top: "c2"
  convolution_param {{ num_output: 3 kernel_h: 3 kernel_w: 2 dilation: 2 {G} }} }}
layer {{ name: "c3" type: "Convolution" bottom: "x" top: "c3"
  convolution_param {{ num_output: 5 kernel_size: 1 bias_term: false {G} }} }}"""),
    "deconv": ({"x": ((2, 4, 5, 5), "normal")}, f"""
layer {{ name: "d1" type: "Deconvolution" bottom: "x" top: "d1"
  convolution_param {{ num_output: 3 kernel_size: 4 stride: 2 pad: 1 {G} }} }}
layer {{ name: "d2" type: "Deconvolution" bottom: "x" top: "d2"
  convolution_param {{ num_output: 4 kernel_size: 3 group: 2 {G} }} }}"""),
    "inner_product": ({"x": ((3, 2, 3, 4), "normal")}, f"""
layer {{ name: "ip1" type: "InnerProduct" bottom: "x" top: "ip1" inner_product_param {{ num_output: 7 {G} }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "x" top: "ip2"
  inner_product_param {{ num_output: 5 axis: 2 transpose: true {G} }} }}"""),
    "pooling": ({"x": ((2, 3, 7, 6), "normal")}, """
layer { name: "max" type: "Pooling" bottom: "x" top: "max" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "maxpad" type: "Pooling" bottom: "x" top: "maxpad"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "ave" type: "Pooling" bottom: "x" top: "ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "glob" type: "Pooling" bottom: "x" top: "glob" pooling_param { pool: AVE global_pooling: true } }"""),
    "activations": ({"x": ((2, 3, 4, 5), "normal"), "p": ((2, 3, 4, 5), "positive")}, """
layer { name: "relu" type: "ReLU" bottom: "x" top: "relu" relu_param { negative_slope: 0.1 } }
layer { name: "prelu" type: "PReLU" bottom: "x" top: "prelu" }
layer { name: "prelu_shared" type: "PReLU" bottom: "x" top: "prelu_shared" prelu_param { channel_shared: true } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "x" top: "sigmoid" }
layer { name: "tanh" type: "TanH" bottom: "x" top: "tanh" }
layer { name: "elu" type: "ELU" bottom: "x" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "absval" type: "AbsVal" bottom: "x" top: "absval" }
layer { name: "bnll" type: "BNLL" bottom: "x" top: "bnll" }
layer { name: "exp" type: "Exp" bottom: "x" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.1 } }
layer { name: "power" type: "Power" bottom: "p" top: "power" power_param { power: 1.5 scale: 2 shift: 0.1 } }
layer { name: "log" type: "Log" bottom: "p" top: "log" log_param { scale: 1.5 shift: 0.2 } }
layer { name: "inplace" type: "ReLU" bottom: "log" top: "log" }"""),
    "softmax_lrn": ({"x": ((2, 6, 4, 4), "normal")}, """
layer { name: "softmax" type: "Softmax" bottom: "x" top: "softmax" }
layer { name: "softmax1" type: "Softmax" bottom: "x" top: "softmax1" softmax_param { axis: 2 } }
layer { name: "lrn" type: "LRN" bottom: "x" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layer { name: "lrnw" type: "LRN" bottom: "x" top: "lrnw"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }"""),
    "normalization": ({"x": ((4, 3, 3, 2), "normal"), "y": ((3, 3), "normal")}, """
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" }
layer { name: "scale" type: "Scale" bottom: "bn" top: "scale" scale_param { bias_term: true } }
layer { name: "scale2" type: "Scale" bottom: "x" bottom: "y" top: "scale2" }
layer { name: "bias" type: "Bias" bottom: "x" top: "bias" }
layer { name: "bias2" type: "Bias" bottom: "x" bottom: "y" top: "bias2" }
layer { name: "bn_global" type: "BatchNorm" bottom: "x" top: "bn_global" batch_norm_param { use_global_stats: true } }
layer { name: "bn_eps" type: "BatchNorm" bottom: "x" top: "bn_eps"
  batch_norm_param { eps: 0.01 moving_average_fraction: 0.9 } }"""),
    "shape": ({"x": ((2, 4, 3, 4), "normal"), "y": ((2, 4, 3, 4), "normal"), "s": ((2, 2, 2, 3), "normal")}, """
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "y" top: "sum" eltwise_param { operation: SUM coeff: 2 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "x" bottom: "y" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "x" bottom: "y" top: "max" eltwise_param { operation: MAX } }
layer { name: "concat" type: "Concat" bottom: "x" bottom: "y" top: "concat" concat_param { axis: 2 } }
layer { name: "slice" type: "Slice" bottom: "x" top: "sl1" top: "sl2" slice_param { axis: 1 slice_point: 1 } }
layer { name: "flatten" type: "Flatten" bottom: "x" top: "flatten" }
layer { name: "reshape" type: "Reshape" bottom: "y" top: "reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "crop" type: "Crop" bottom: "x" bottom: "s" top: "crop" crop_param { axis: 2 offset: 1 offset: 0 } }
layer { name: "tile" type: "Tile" bottom: "y" top: "tile" tile_param { axis: 1 tiles: 3 } }
layer { name: "rsum" type: "Reduction" bottom: "x" top: "rsum" reduction_param { axis: 1 } }
layer { name: "rasum" type: "Reduction" bottom: "x" top: "rasum" reduction_param { operation: ASUM axis: 2 coeff: 0.5 } }
layer { name: "rsumsq" type: "Reduction" bottom: "x" top: "rsumsq" reduction_param { operation: SUMSQ } }
layer { name: "rmean" type: "Reduction" bottom: "y" top: "rmean" reduction_param { operation: MEAN axis: 3 } }
layer { name: "split" type: "Split" bottom: "y" top: "y1" top: "y2" }
layer { name: "silence" type: "Silence" bottom: "y2" }
layer { name: "flatten2" type: "Flatten" bottom: "y1" top: "flatten2" flatten_param { axis: 2 } }"""),
    "losses": ({"x": ((6, 5), "normal"), "label": ((6,), "label:5"), "t": ((6, 5), "normal"),
                "b": ((6, 5), "binary"), "prob": ((6, 5), "prob")}, """
layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "softmax_loss" }
layer { name: "softmax_ignore" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "softmax_ignore"
  loss_param { ignore_label: 2 normalization: VALID } loss_weight: 0.5 }
layer { name: "softmax_batch" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "softmax_batch"
  loss_param { normalization: BATCH_SIZE } }
layer { name: "euclid" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "euclid" loss_weight: 2 }
layer { name: "sigce" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "b" top: "sigce" }
layer { name: "hinge" type: "HingeLoss" bottom: "x" bottom: "label" top: "hinge" }
layer { name: "hinge2" type: "HingeLoss" bottom: "x" bottom: "label" top: "hinge2" hinge_loss_param { norm: L2 } }
layer { name: "mlogistic" type: "MultinomialLogisticLoss" bottom: "prob" bottom: "label" top: "mlogistic" }
"""),
    # no gradient (Caffe's Backward is NOT_IMPLEMENTED): forward only, so no force_backward here
    "no_gradient": ({"x": ((6, 5), "normal"), "label": ((6,), "label:5"), "y": ((2, 3, 4), "normal")}, """
layer { name: "accuracy" type: "Accuracy" bottom: "x" bottom: "label" top: "accuracy" }
layer { name: "accuracy2" type: "Accuracy" bottom: "x" bottom: "label" top: "accuracy2" accuracy_param { top_k: 2 } }
layer { name: "argmax" type: "ArgMax" bottom: "y" top: "argmax" argmax_param { top_k: 2 out_max_val: true } }
layer { name: "argmax2" type: "ArgMax" bottom: "y" top: "argmax2" argmax_param { axis: 1 } }"""),
    # Caffe aborts when forced to back-propagate into the infogain matrix: a learnable Scale in front
    # makes the first bottom need a gradient instead
    "infogain": ({"x": ((4, 3), "prob"), "label": ((4,), "label:3"), "H": ((1, 1, 3, 3), "positive")}, """
layer { name: "sx" type: "Scale" bottom: "x" top: "sx" scale_param { axis: 0 } }
layer { name: "infogain" type: "InfogainLoss" bottom: "sx" bottom: "label" bottom: "H" top: "infogain" }"""),
}

NO_FORCE_BACKWARD = {"no_gradient", "infogain"}

# Caffe's Net::Backward adds into parameter diffs and never clears them (the solver does, once per
# iteration, so iter_size > 1 sums its passes there): these cases run forward + backward TWICE on both
# sides, so a layer that overwrites a parameter diff where Caffe adds (or adds where Caffe overwrites:
# Caffe's Scale writes its scale diff when the scale is as big as the input, and when there is one
# image (outer dimension 1) with a per-channel scale over a map) differs by a factor of two.
TWO_PASSES = {
    "param_diffs_two_passes": ({"x": ((2, 3, 4, 5), "normal"), "x1": ((1, 3, 4, 5), "normal"),
                                "v": ((2, 6), "normal")}, f"""
layer {{ name: "conv" type: "Convolution" bottom: "x" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 group: 1 {G} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "v" top: "ip" inner_product_param {{ num_output: 3 {G} }} }}
layer {{ name: "prelu" type: "PReLU" bottom: "x" top: "prelu" }}
layer {{ name: "bias" type: "Bias" bottom: "x" top: "bias" }}
layer {{ name: "scale_n" type: "Scale" bottom: "x" top: "scale_n" scale_param {{ bias_term: true }} }}
layer {{ name: "scale_one" type: "Scale" bottom: "x1" top: "scale_one" scale_param {{ bias_term: true }} }}
layer {{ name: "scale_one_shared" type: "Scale" bottom: "x1" top: "scale_one_shared"
  scale_param {{ axis: 0 num_axes: 0 }} }}
layer {{ name: "scale_elt" type: "Scale" bottom: "x" top: "scale_elt" scale_param {{ axis: 0 num_axes: -1 }} }}
layer {{ name: "scale_vec" type: "Scale" bottom: "v" top: "scale_vec" }}
layer {{ name: "scale_row" type: "Scale" bottom: "v" top: "scale_row" scale_param {{ axis: 0 num_axes: 1 }} }}"""),
}


def _inputs_layer(inputs):
    shapes = "".join(" shape { " + " ".join(f"dim: {d}" for d in shape) + " }" for shape, _ in inputs.values())
    tops = " ".join(f'top: "{name}"' for name in inputs)
    return f'layer {{ name: "input" type: "Input" {tops} input_param {{{shapes} }} }}'


def _make_input(rng, shape, kind):
    if kind == "normal":
        return rng.randn(*shape).astype(np.float32)
    if kind == "positive":
        return (np.abs(rng.randn(*shape)) + 0.2).astype(np.float32)
    if kind == "binary":
        return (rng.rand(*shape) > 0.5).astype(np.float32)
    if kind == "prob":
        e = np.exp(rng.randn(*shape))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if kind.startswith("label:"):
        return rng.randint(0, int(kind.split(":")[1]), size=shape).astype(np.float32)
    raise ValueError(kind)


def _prepare(workdir, name, inputs, layers, seed):
    """Write the case's net, random weights (.caffemodel) and inputs/top diffs (.npz); returns the paths
    and the minicaffe Net."""
    from minicaffe.net.network import Net
    rng = np.random.RandomState(seed)
    net_path = os.path.join(workdir, f"{name}.prototxt")
    with open(net_path, "w") as f:
        force = "" if name in NO_FORCE_BACKWARD else "force_backward: true\n"
        f.write(f'name: "{name}"\n{force}{_inputs_layer(inputs)}\n{layers}\n')
    net = Net(net_path, caffe_pb2.TRAIN)
    for lname, blobs in net.params.items():
        for blob in blobs:
            values = rng.randn(*blob.data.shape)
            if net.layer_dict[lname].type == "BatchNorm":
                values = np.abs(values) + 0.5
            blob.data[...] = np.asarray(values, np.float32)
    weights = os.path.join(workdir, f"{name}.caffemodel")
    net.save(weights)
    given = {f"data/{k}": _make_input(rng, shape, kind) for k, (shape, kind) in inputs.items()}
    loss_tops = {top for lp, ws in zip(net.param.layer, net._loss_weights) for top, w in zip(lp.top, ws) if w}
    for out in net.outputs:
        if out not in loss_tops:
            given[f"topdiff/{out}"] = np.asarray(rng.randn(*net.blobs[out].data.shape), np.float32)
    inputs_path = os.path.join(workdir, f"{name}_in.npz")
    np.savez(inputs_path, **given)
    return net_path, weights, inputs_path


def _run_minicaffe(net_path, weights, inputs_path, passes=1):
    from minicaffe.net.network import Net
    net = Net(net_path, weights, caffe_pb2.TRAIN)
    given = np.load(inputs_path)
    for _ in range(passes):
        for key in given.files:
            kind, name = key.split("/", 1)
            if kind == "data":
                net.blobs[name].data[...] = given[key]
        net.forward()
        for key in given.files:
            kind, name = key.split("/", 1)
            if kind == "topdiff":
                net.blobs[name].diff[...] = given[key]
        net.backward()
    out = {}
    for name, blob in net.blobs.items():
        out[f"data/{name}"] = blob.data.copy()
        out[f"diff/{name}"] = blob.diff.copy()
    for name, blobs in net.params.items():
        for k, blob in enumerate(blobs):
            out[f"pdata/{name}/{k}"] = blob.data.copy()
            out[f"pdiff/{name}/{k}"] = blob.diff.copy()
    return out


@pytest.fixture(scope="module")
def caffe_results(ref, tmp_path_factory):
    """Every case prepared, and run once through pycaffe: {case: (paths, Caffe's arrays)}."""
    work = str(tmp_path_factory.mktemp("layers"))
    cases, jobs = {}, []
    for i, (name, (inputs, layers)) in enumerate(sorted({**CASES, **TWO_PASSES}.items())):
        paths = _prepare(work, name, inputs, layers, seed=100 + i)
        out = os.path.join(work, f"{name}_caffe.npz")
        jobs.append({"net": paths[0], "weights": paths[1], "inputs": paths[2], "out": out,
                     "passes": 2 if name in TWO_PASSES else 1})
        cases[name] = (paths, out)
    with open(os.path.join(work, "cases.json"), "w") as f:
        json.dump(jobs, f)
    ref.pycaffe(os.path.join(HERE, "pycaffe_dump.py"), os.path.join(work, "cases.json"), cwd=work)
    return {name: (paths, dict(np.load(out))) for name, (paths, out) in cases.items()}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(TWO_PASSES))
def test_layer_forward_backward_matches_caffe(caffe_results, case):
    paths, theirs = caffe_results[case]
    mine = _run_minicaffe(*paths, passes=2 if case in TWO_PASSES else 1)
    assert sorted(mine) == sorted(theirs), sorted(set(mine) ^ set(theirs))
    bad = []
    inputs = {**CASES, **TWO_PASSES}[case][0]
    for key in sorted(theirs):
        if case in NO_FORCE_BACKWARD and key.startswith("diff/") and key[5:] in inputs:
            continue      # no gradient is defined there; Caffe's Scale uses that diff as scratch space
        if np.shape(mine[key]) != np.shape(theirs[key]):
            bad.append(f"{key}: shape {np.shape(mine[key])} vs Caffe's {np.shape(theirs[key])}")
            continue
        r = rel_diff(mine[key], theirs[key])
        if not r <= TOL:
            bad.append(f"{key}: {r:.3g}")
    assert not bad, f"{case}: differs from Caffe beyond {TOL:g} (relative): " + "; ".join(bad)
