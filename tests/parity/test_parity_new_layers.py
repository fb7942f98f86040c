"""Parity of the layers added for issue 14 against BVLC Caffe itself: each layer, in a one-layer net
fed by an Input layer, runs forward (and backward from fixed top gradients) in reference pycaffe and
in minicaffe, from the same inputs and the same parameter values (Caffe's filled ones, copied over);
every top, every bottom gradient and every parameter gradient must agree. WindowData (one foreground
and one background window, so the random choice is fixed) and HDF5Output (the file it writes) too.

Uses the ``ref`` fixture of tests/parity/conftest.py when that exists; skips otherwise.
"""
import json
import os
import textwrap

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.net.network import Net
from minicaffe.proto import caffe_pb2

# Runs under the reference venv's Python with pycaffe importable.
PYCAFFE_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import caffe

    caffe.set_mode_cpu()
    for case in json.load(open(sys.argv[1])):
        net = caffe.Net(case["net"], caffe.TRAIN)
        given = np.load(case["inputs"])
        for _ in range(case["passes"]):
            for key in given.files:
                kind, name = key.split("/", 1)
                if kind == "data":
                    net.blobs[name].data[...] = given[key]
            net.forward()
        out = {}
        if case["backward"]:
            rs = np.random.RandomState(case["seed"])
            for name in case["topdiff"]:     # drawn here: the top shapes are known now
                diff = rs.uniform(-1, 1, net.blobs[name].data.shape).astype(np.float32)
                net.blobs[name].diff[...] = diff
                out["topdiff/" + name] = diff
            for blobs in net.params.values():
                for b in blobs:
                    b.diff[...] = 0
            net._backward(len(net.layers) - 1, 0)
        for name, blob in net.blobs.items():
            out["data/" + name] = blob.data.copy()
            out["diff/" + name] = blob.diff.copy()
        for name, blobs in net.params.items():
            for k, b in enumerate(blobs):
                out["pdata/%s/%d" % (name, k)] = b.data.copy()
                out["pdiff/%s/%d" % (name, k)] = b.diff.copy()
        if case.get("h5"):
            import gc
            import h5py
            del net        # Caffe's HDF5Output closes its file when the layer is destroyed
            gc.collect()
            with h5py.File(case["h5"], "r") as f:
                for name in f:
                    out["h5/" + name] = f[name][...]
        np.savez(case["out"], **out)
''')


def rand(shape, seed, lo=-1.0, hi=1.0):
    return np.random.RandomState(seed).uniform(lo, hi, shape)


def _cont(t, n):
    c = np.ones((t, n))
    c[0] = 0
    c[2, n - 1] = 0
    return c


FILL = 'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'

# (id, layer text, [(bottom name, array)], [top names], bottoms whose gradient is compared,
#  backward?, forward passes)
CASES = [
    ("clip", 'type: "Clip" clip_param { min: -0.4 max: 0.6 }', [("x", rand((2, 3, 4, 5), 1))], ["y"], ["x"],
     True, 1),
    ("swish", 'type: "Swish" swish_param { beta: 1.7 }', [("x", rand((2, 3, 4), 2, -4, 4))], ["y"], ["x"],
     True, 1),
    ("threshold", 'type: "Threshold" threshold_param { threshold: 0.2 }', [("x", rand((3, 7), 3))], ["y"], [],
     False, 1),
    ("mvn", 'type: "MVN"', [("x", rand((2, 3, 4, 5), 4, -1, 3))], ["y"], ["x"], True, 1),
    ("mvn_across", 'type: "MVN" mvn_param { across_channels: true eps: 0.01 }', [("x", rand((2, 3, 4, 5), 5))],
     ["y"], ["x"], True, 1),
    ("mvn_mean_only", 'type: "MVN" mvn_param { normalize_variance: false }', [("x", rand((2, 3, 5), 6))], ["y"],
     ["x"], True, 1),
    ("contrastive", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 1.2 }',
     [("a", rand((6, 4), 7)), ("b", rand((6, 4), 8)), ("sim", np.array([1, 0, 0, 1, 0, 0.]))], ["loss"],
     ["a", "b"], True, 1),
    ("contrastive_legacy", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 2 legacy_version: true }',
     [("a", rand((6, 4, 1, 1), 9)), ("b", rand((6, 4, 1, 1), 10)), ("sim", np.array([1, 0, 0, 1, 0, 0.]))],
     ["loss"], ["a", "b"], True, 1),
    ("batch_reindex", 'type: "BatchReindex"', [("x", rand((5, 2, 3), 11)), ("idx", np.array([4, 0, 4, 2, 2, 1.]))],
     ["y"], ["x"], True, 1),
    ("filter", 'type: "Filter"', [("a", rand((5, 3, 2), 12)), ("b", rand((5, 4), 13)),
                                  ("sel", np.array([1, 0, 0, 1, 1.]))], ["ta", "tb"], ["a", "b"], True, 1),
    ("embed", f'type: "Embed" embed_param {{ num_output: 3 input_dim: 6 {FILL} }}',
     [("idx", np.array([[0, 5, 2], [2, 2, 1]], np.float64))], ["y"], [], True, 1),
    ("parameter", 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], ["p"], [], True, 1),
    ("im2col", 'type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }', [("x", rand((2, 3, 6, 5), 14))],
     ["y"], ["x"], True, 1),
    ("im2col_dilated", 'type: "Im2col" convolution_param { kernel_h: 2 kernel_w: 3 dilation: 2 }',
     [("x", rand((2, 2, 7, 8), 15))], ["y"], ["x"], True, 1),
    ("spp_max", 'type: "SPP" spp_param { pyramid_height: 3 }', [("x", rand((2, 3, 9, 7), 16))], ["y"], ["x"],
     True, 1),
    ("spp_ave", 'type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [("x", rand((2, 3, 6, 7), 17))], ["y"],
     ["x"], True, 1),
    ("spp_one_level", 'type: "SPP" spp_param { pyramid_height: 1 }', [("x", rand((2, 3, 5, 4), 18))], ["y"], ["x"],
     True, 1),
    ("lstm_unit", 'type: "LSTMUnit"', [("c_prev", rand((1, 3, 4), 19, -2, 2)), ("gates", rand((1, 3, 16), 20, -2, 2)),
                                       ("cont", np.array([[1, 0, 1.]]))], ["c", "h"], ["c_prev", "gates"], True, 1),
    ("lstm", f'type: "LSTM" recurrent_param {{ num_output: 4 {FILL} }}',
     [("x", rand((4, 3, 2, 3), 21)), ("cont", _cont(4, 3))], ["h"], ["x"], True, 1),
    ("lstm_static", f'type: "LSTM" recurrent_param {{ num_output: 4 {FILL} }}',
     [("x", rand((4, 3, 5), 22)), ("cont", _cont(4, 3)), ("xs", rand((3, 2), 23))], ["h"], ["x", "xs"], True, 1),
    ("lstm_carried_state", f'type: "LSTM" recurrent_param {{ num_output: 4 {FILL} }}',
     [("x", rand((3, 2, 5), 24)), ("cont", np.ones((3, 2)))], ["h"], ["x"], True, 2),
    ("lstm_expose", f'type: "LSTM" recurrent_param {{ num_output: 3 expose_hidden: true {FILL} }}',
     [("x", rand((3, 2, 5), 25)), ("cont", np.ones((3, 2))), ("h0", rand((1, 2, 3), 26)), ("c0", rand((1, 2, 3), 27))],
     ["h", "hT", "cT"], ["x"], True, 1),
    ("rnn", f'type: "RNN" recurrent_param {{ num_output: 4 {FILL} }}',
     [("x", rand((4, 3, 5), 28)), ("cont", _cont(4, 3))], ["o"], ["x"], True, 1),
    ("rnn_static_carried", f'type: "RNN" recurrent_param {{ num_output: 4 {FILL} }}',
     [("x", rand((4, 3, 5), 29)), ("cont", np.ones((4, 3))), ("xs", rand((3, 2, 2), 30))], ["o"], ["x", "xs"],
     True, 2),
    ("rnn_expose", f'type: "RNN" recurrent_param {{ num_output: 3 expose_hidden: true {FILL} }}',
     [("x", rand((3, 2, 5), 31)), ("cont", np.ones((3, 2))), ("h0", rand((1, 2, 3), 32))], ["o", "hT"], ["x"],
     True, 1),
]


# Caffe lets force_backward reach the index/selector bottoms of these layers and then aborts; their
# nets instead pass the bottoms that get a gradient through a learnable identity (a Scale by 1).
NO_FORCE = {"batch_reindex", "filter", "embed", "parameter"}


def _net_text(case_id, layer, bottoms, tops, grads, backward):
    lines = [f'name: "{case_id}"']
    force = backward and case_id not in NO_FORCE
    if force:
        lines.append("force_backward: true")
    via_scale = set() if force or not backward else set(grads)
    if bottoms:
        shapes = " ".join("shape { %s }" % " ".join(f"dim: {d}" for d in arr.shape) for _, arr in bottoms)
        lines.append('layer { name: "input" type: "Input" %s input_param { %s } }'
                     % (" ".join(f'top: "{n}_in"' if n in via_scale else f'top: "{n}"' for n, _ in bottoms), shapes))
    for n in sorted(via_scale):
        lines.append(f'layer {{ name: "{n}_identity" type: "Scale" bottom: "{n}_in" top: "{n}" '
                     'scale_param { axis: 0 num_axes: 0 filler { type: "constant" value: 1 } } }')
    lines.append('layer { name: "L" %s %s %s }' % (layer, " ".join(f'bottom: "{n}"' for n, _ in bottoms),
                                                   " ".join(f'top: "{t}"' for t in tops)))
    return "\n".join(lines) + "\n"


def _feed_name(case_id, name, grads, backward):
    """The input blob that receives a bottom's values (its Scale's input where there is one)."""
    return f"{name}_in" if backward and case_id in NO_FORCE and name in grads else name


@pytest.fixture
def reference(request):
    try:
        return request.getfixturevalue("ref")
    except pytest.FixtureLookupError:
        pytest.skip("no reference Caffe fixture (tests/parity/conftest.py)")


def _run_reference(ref, tmp_path, cases):
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(cases))
    script = tmp_path / "dump.py"
    script.write_text(PYCAFFE_SCRIPT)
    ref.pycaffe(script, listing, cwd=tmp_path, timeout=600)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not b.size:
        return 0.0
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(a - b).max()) / scale


def test_new_layers_match_caffe(reference, tmp_path):
    cases, prepared = [], []
    for seed, (case_id, layer, bottoms, tops, grads, backward, passes) in enumerate(CASES):
        net_path = tmp_path / f"{case_id}.prototxt"
        net_path.write_text(_net_text(case_id, layer, bottoms, tops, grads, backward))
        inputs = {f"data/{_feed_name(case_id, n, grads, backward)}": np.asarray(a, np.float32) for n, a in bottoms}
        prepared.append((case_id, net_path, inputs, tops, grads, backward, passes))
        # random top gradients for every top but a loss (its gradient is its loss weight)
        cases.append({"net": str(net_path), "inputs": str(tmp_path / f"{case_id}_in.npz"),
                      "out": str(tmp_path / f"{case_id}_out.npz"), "backward": backward, "passes": passes,
                      "seed": seed, "topdiff": [t for t in tops if t != "loss"]})
        np.savez(cases[-1]["inputs"], **inputs)
    _run_reference(reference, tmp_path, cases)

    failures = []
    for case, (case_id, net_path, inputs, tops, grads, backward, passes) in zip(cases, prepared):
        theirs = dict(np.load(case["out"]))
        net = Net(str(net_path), caffe_pb2.TRAIN)
        for name, blobs in net.params.items():
            for k, b in enumerate(blobs):
                b.data[...] = theirs[f"pdata/{name}/{k}"]
        for _ in range(passes):
            for key, arr in inputs.items():
                kind, name = key.split("/", 1)
                if kind == "data":
                    net.blobs[name].data[...] = arr
            net.forward()
        if backward:
            net.clear_param_diffs()
            for key, arr in theirs.items():
                kind, name = key.split("/", 1)
                if kind == "topdiff":
                    net.blobs[name].diff[...] = arr
            net.backward_from_to()
        checks = [(f"top {t}", net.blobs[t].data, theirs[f"data/{t}"]) for t in tops]
        checks += [(f"bottom {g} diff", net.blobs[g].diff, theirs[f"diff/{g}"]) for g in grads]
        if backward:
            checks += [(f"param {name}/{k} diff", b.diff, theirs[f"pdiff/{name}/{k}"])
                       for name, blobs in net.params.items() for k, b in enumerate(blobs)]
        for what, mine, ref_arr in checks:
            r = _rel(mine, ref_arr)
            if not r <= 1e-5:
                failures.append(f"{case_id}: {what} differs by {r:.3g} (relative)")
    assert not failures, "\n".join(failures)


def test_window_data_and_hdf5_output_match_caffe(reference, tmp_path):
    cv2 = pytest.importorskip("cv2")
    rs = np.random.RandomState(5)
    for i, (h, w) in enumerate([(40, 50), (36, 30)]):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), rs.randint(0, 256, (h, w, 3)).astype(np.uint8))
    # image 0: one foreground window; image 1: one background window, one ignored (between thresholds)
    (tmp_path / "windows.txt").write_text(
        "# 0\nim0.png\n3\n40\n50\n1\n2 0.8 5 6 30 33\n"
        "# 1\nim1.png\n3\n36\n30\n2\n1 0.1 2 3 20 34\n1 0.4 0 0 10 10\n")
    h5_path = tmp_path / "out.h5"
    variants = {   # (transform_param, more window_data_param)
        "warp": ("crop_size: 12 mean_value: 100 mean_value: 120 mean_value: 90", ""),
        "context": ("crop_size: 16", "context_pad: 3"),
        "square": ("crop_size: 14 mean_value: 50", 'crop_mode: "square" context_pad: 2'),
    }
    cases, nets = [], {}
    for name, (transform, extra) in variants.items():
        text = ('name: "w" layer { name: "win" type: "WindowData" top: "data" top: "label" '
                f'window_data_param {{ source: "{tmp_path / "windows.txt"}" root_folder: "{tmp_path}/" '
                f'batch_size: 4 fg_fraction: 0.5 scale: 0.5 bg_threshold: 0.3 {extra} }} transform_param {{ {transform} }} }}')
        path = tmp_path / f"win_{name}.prototxt"
        path.write_text(text)
        nets[name] = path
        np.savez(tmp_path / f"win_{name}_in.npz", **{"unused/none": np.zeros(1)})
        cases.append({"net": str(path), "inputs": str(tmp_path / f"win_{name}_in.npz"),
                      "out": str(tmp_path / f"win_{name}_out.npz"), "backward": False, "passes": 1,
                      "seed": 0, "topdiff": []})
    data, label = rand((3, 2, 2), 40), np.array([1, 0, 2.])
    h5_net = tmp_path / "h5.prototxt"
    h5_net.write_text(_net_text("h5", f'type: "HDF5Output" hdf5_output_param {{ file_name: "{h5_path}" }}',
                                [("d", data), ("l", label)], [], [], False))
    np.savez(tmp_path / "h5_in.npz", **{"data/d": data.astype(np.float32), "data/l": label.astype(np.float32)})
    cases.append({"net": str(h5_net), "inputs": str(tmp_path / "h5_in.npz"), "out": str(tmp_path / "h5_out.npz"),
                  "backward": False, "passes": 1, "seed": 0, "topdiff": [], "h5": str(h5_path)})
    _run_reference(reference, tmp_path, cases)

    for name, path in nets.items():
        theirs = np.load(tmp_path / f"win_{name}_out.npz")
        backend.set_random_seed(1)
        net = Net(str(path), caffe_pb2.TRAIN)
        net.forward()
        np.testing.assert_array_equal(net.blobs["label"].data, theirs["data/label"])
        # OpenCV versions might round a bilinear sample differently: allow one grey level (x scale 0.5)
        # in a few places
        diff = np.abs(net.blobs["data"].data - theirs["data/data"])
        assert diff.max() <= 0.5 + 1e-6, (name, diff.max())
        assert np.mean(diff > 0) < 0.02, (name, np.mean(diff > 0))
    theirs = np.load(tmp_path / "h5_out.npz")
    os.unlink(h5_path)
    net = Net(str(h5_net), caffe_pb2.TRAIN)
    net.blobs["d"].data[...] = data
    net.blobs["l"].data[...] = label
    net.forward()
    import h5py
    with h5py.File(h5_path, "r") as f:
        assert sorted(f) == ["data", "label"]
        for key in ("data", "label"):
            assert f[key].dtype == theirs[f"h5/{key}"].dtype
            np.testing.assert_array_equal(f[key][...], theirs[f"h5/{key}"])
