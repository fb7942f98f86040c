"""Parity with BVLC Caffe for the five layer types tests/parity/test_layers.py cannot cover with one fixed
forward/backward pass: Dropout (random masks), HDF5Data, ImageData and MemoryData (they read files or
arrays, batch after batch) and Python (a user module). Each case is a small net run by reference pycaffe
(one subprocess for the module, PYCAFFE_SCRIPT below) and by minicaffe on the same files: several forwards,
every blob's data recorded after each, then (where the case has top diffs) one backward and every diff.

The data layers and the Python layer must agree exactly. Dropout's masks come from different random
generators, so for it only what is deterministic is compared: TEST is the identity (exact), and in TRAIN
every top value is 0 or bottom·1/(1 − ratio) in float32, the kept fraction is about 1 − ratio, and the
bottom diff is the top diff times that same scale exactly where the top was kept, 0 elsewhere.
"""
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from minicaffe.proto import caffe_pb2

# Runs under the reference venv's Python with pycaffe importable.
PYCAFFE_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import caffe
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    caffe.set_mode_cpu()
    cases = json.load(open(sys.argv[1]))
    for case in cases:
        if case.get("pypath"):
            sys.path.insert(0, case["pypath"])
    for case in cases:
        out = {}
        if case.get("parse_only"):       # does Caffe's NetParameter accept this text?
            try:
                text_format.Merge(open(case["net"]).read(), caffe_pb2.NetParameter())
                out["parsed"] = np.array(1)
            except text_format.ParseError:
                out["parsed"] = np.array(0)
            np.savez(case["out"], **out)
            continue
        net = caffe.Net(case["net"], caffe.TRAIN if case["phase"] == "TRAIN" else caffe.TEST)
        given = np.load(case["inputs"]) if case.get("inputs") else None
        if case.get("memory"):
            mem = np.load(case["memory"])
            data, labels = mem["data"], mem["labels"]
            net.set_input_arrays(data, labels)
        for it in range(case["passes"]):
            if given is not None:
                for key in given.files:
                    kind, name = key.split("/", 1)
                    if kind == "data":
                        net.blobs[name].data[...] = given[key]
            net.forward()
            for name, blob in net.blobs.items():
                out["%d/data/%s" % (it, name)] = blob.data.copy()
        if case.get("backward"):
            for key in given.files:
                kind, name = key.split("/", 1)
                if kind == "topdiff":
                    net.blobs[name].diff[...] = given[key]
            net._backward(len(net.layers) - 1, 0)
            for name, blob in net.blobs.items():
                out["diff/" + name] = blob.diff.copy()
        np.savez(case["out"], **out)
''')

PY_MODULE = "minicaffe_parity_pylayer"
PY_MODULE_TEXT = '''
import numpy as np
try:
    import caffe                     # the reference's pycaffe
except ImportError:
    import minicaffe as caffe        # minicaffe, as its users write it


class ScaledPair(caffe.Layer):
    """a = k·x + phase, b = x·y, with k from param_str: param_str, phase, two bottoms, two tops and a
    backward that honours propagate_down."""

    def setup(self, bottom, top):
        if len(bottom) != 2 or len(top) != 2:
            raise Exception("ScaledPair needs two bottoms and two tops")
        self.k = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        top[1].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data + self.phase
        top[1].data[...] = bottom[0].data * bottom[1].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * top[0].diff + bottom[1].data * top[1].diff
        if propagate_down[1]:
            bottom[1].diff[...] = bottom[0].data * top[1].diff
'''


def _input_layer(shapes):
    dims = "".join(" shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    tops = " ".join(f'top: "{n}"' for n in shapes)
    return f'layer {{ name: "input" type: "Input" {tops} input_param {{{dims} }} }}\n'


# --- files both engines read ---------------------------------------------------------------------------

def _write_h5(work):
    """Two .h5 files (5 and 4 rows; float32 N×2×3×2 data, float32 labels) and the list naming them."""
    import h5py
    rng = np.random.RandomState(3)
    names = []
    for i, n in enumerate((5, 4)):
        path = os.path.join(work, f"part{i}.h5")
        with h5py.File(path, "w") as f:
            f["data"] = rng.randn(n, 2, 3, 2).astype(np.float32)
            f["label"] = (np.arange(n) + 10 * i).astype(np.float32)
        names.append(path)
    listing = os.path.join(work, "h5.txt")
    with open(listing, "w") as f:
        f.write("\n".join(names) + "\n")
    return listing


def _write_images(work):
    """Five small images (PNG and JPEG, colour, different sizes) and their list file."""
    import cv2
    rng = np.random.RandomState(5)
    root = os.path.join(work, "img")
    os.makedirs(root, exist_ok=True)
    lines = []
    for i, (h, w, ext) in enumerate([(9, 7, "png"), (6, 8, "jpg"), (10, 10, "png"), (7, 9, "jpg"),
                                     (8, 6, "png")]):
        img = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        name = f"im{i}.{ext}"
        assert cv2.imwrite(os.path.join(root, name), img)
        lines.append(f"{name} {i + 1}")
    listing = os.path.join(work, "images.txt")
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    return root, listing


# --- the cases ---------------------------------------------------------------------------------------

def _cases(work):
    """{case: dict(net text, phase, passes, inputs {key: array} or None, backward, memory arrays)}."""
    rng = np.random.RandomState(11)
    cases = {}

    x = rng.randn(4, 5, 6, 7).astype(np.float32)          # 840 values: the kept fraction is meaningful
    dx = rng.randn(*x.shape).astype(np.float32)
    drop = (_input_layer({"x": x.shape}) +
            'layer { name: "d3" type: "Dropout" bottom: "x" top: "d3" dropout_param { dropout_ratio: 0.3 } }\n'
            'layer { name: "d5" type: "Dropout" bottom: "x" top: "d5" }\n'
            'layer { name: "d8" type: "Dropout" bottom: "x" top: "d8" dropout_param { dropout_ratio: 0.8 } }\n')
    diffs = {f"topdiff/{t}": dx * (k + 1) for k, t in enumerate(("d3", "d5", "d8"))}
    for phase in ("TRAIN", "TEST"):
        cases[f"dropout_{phase.lower()}"] = dict(
            net="force_backward: true\n" + drop, phase=phase, passes=1, backward=True,
            inputs={"data/x": x, **diffs})
    # minicaffe's proto is BVLC Caffe's: the later `scale_train` field does not exist in either
    cases["dropout_scale_train"] = dict(
        net=_input_layer({"x": (2, 3)}) + 'layer { name: "d" type: "Dropout" bottom: "x" top: "d" '
            'dropout_param { dropout_ratio: 0.5 scale_train: false } }\n', parse_only=True)

    listing = _write_h5(work)
    cases["hdf5"] = dict(
        net=f'layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{listing}" batch_size: 4 }} }}\n', phase="TRAIN", passes=5)

    root, listing = _write_images(work)
    for name, ip, tp in [
            ("image_color", "new_height: 6 new_width: 5", ""),
            ("image_gray", "new_height: 7 new_width: 4 is_color: false", ""),
            ("image_transform", "new_height: 8 new_width: 9",
             "transform_param { mean_value: 100 mean_value: 120 mean_value: 90 scale: 0.5 crop_size: 5 "
             "mirror: false }"),
            ("image_gray_transform", "new_height: 8 new_width: 8 is_color: false",
             "transform_param { mean_value: 127.5 scale: 0.25 crop_size: 6 }")]:
        cases[name] = dict(
            net=f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" {tp} '
                f'image_data_param {{ source: "{listing}" root_folder: "{root}/" batch_size: 2 {ip} '
                f'shuffle: false }} }}\n', phase="TEST", passes=4)

    cases["memory"] = dict(
        net='layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
            'memory_data_param { batch_size: 3 channels: 2 height: 3 width: 4 } }\n'
            'layer { name: "sq" type: "Power" bottom: "data" top: "sq" power_param { power: 2 } }\n',
        phase="TRAIN", passes=4,
        memory={"data": rng.randn(6, 2, 3, 4).astype(np.float32),
                "labels": np.arange(6, dtype=np.float32) + 0.5})

    a, b = rng.randn(3, 4).astype(np.float32), rng.randn(3, 4).astype(np.float32)
    for phase in ("TRAIN", "TEST"):
        cases[f"python_{phase.lower()}"] = dict(
            net="force_backward: true\n" + _input_layer({"a": a.shape, "b": b.shape}) +
                f'layer {{ name: "py" type: "Python" bottom: "a" bottom: "b" top: "s" top: "p" '
                f'python_param {{ module: "{PY_MODULE}" layer: "ScaledPair" param_str: "2.5" }} }}\n',
            phase=phase, passes=2, backward=True, pypath=work,
            inputs={"data/a": a, "data/b": b, "topdiff/s": rng.randn(3, 4).astype(np.float32),
                    "topdiff/p": rng.randn(3, 4).astype(np.float32)})
    return cases


def _write_case(work, name, case):
    """Write the case's files; returns the pycaffe job (paths) for it."""
    job = {"net": os.path.join(work, f"{name}.prototxt"), "out": os.path.join(work, f"{name}_caffe.npz")}
    with open(job["net"], "w") as f:
        f.write(f'name: "{name}"\n' + case["net"])
    if case.get("parse_only"):
        job["parse_only"] = True
        return job
    job.update(phase=case["phase"], passes=case["passes"], backward=bool(case.get("backward")))
    if case.get("inputs"):
        job["inputs"] = os.path.join(work, f"{name}_in.npz")
        np.savez(job["inputs"], **case["inputs"])
    if case.get("memory"):
        job["memory"] = os.path.join(work, f"{name}_mem.npz")
        np.savez(job["memory"], **case["memory"])
    if case.get("pypath"):
        job["pypath"] = case["pypath"]
    return job


@pytest.fixture(scope="module")
def io_cases(ref, tmp_path_factory):
    """Every case written and run once through pycaffe: {case: (job, Caffe's arrays)}."""
    work = str(tmp_path_factory.mktemp("layers_io"))
    with open(os.path.join(work, f"{PY_MODULE}.py"), "w") as f:
        f.write(PY_MODULE_TEXT)
    cases = _cases(work)
    jobs = {name: _write_case(work, name, case) for name, case in cases.items()}
    script = os.path.join(work, "run_cases.py")
    with open(script, "w") as f:
        f.write(PYCAFFE_SCRIPT)
    with open(os.path.join(work, "cases.json"), "w") as f:
        json.dump(list(jobs.values()), f)
    ref.pycaffe(script, os.path.join(work, "cases.json"), cwd=work)
    return {name: (job, dict(np.load(job["out"]))) for name, job in jobs.items()}


def _run_minicaffe(job, monkeypatch):
    """What PYCAFFE_SCRIPT does, with minicaffe's pycaffe API."""
    import minicaffe as caffe
    if job.get("pypath"):
        monkeypatch.syspath_prepend(job["pypath"])
        monkeypatch.delitem(sys.modules, PY_MODULE, raising=False)
    net = caffe.Net(job["net"], caffe.TRAIN if job["phase"] == "TRAIN" else caffe.TEST)
    given = np.load(job["inputs"]) if job.get("inputs") else None
    if job.get("memory"):
        mem = np.load(job["memory"])
        net.set_input_arrays(mem["data"], mem["labels"])
    out = {}
    try:
        for it in range(job["passes"]):
            if given is not None:
                for key in given.files:
                    kind, name = key.split("/", 1)
                    if kind == "data":
                        net.blobs[name].data[...] = given[key]
            net.forward()
            for name, blob in net.blobs.items():
                out[f"{it}/data/{name}"] = blob.data.copy()
        if job.get("backward"):
            for key in given.files:
                kind, name = key.split("/", 1)
                if kind == "topdiff":
                    net.blobs[name].diff[...] = given[key]
            net.backward()
            for name, blob in net.blobs.items():
                out[f"diff/{name}"] = blob.diff.copy()
    finally:
        for layer in net.layers:        # stop prefetch threads now, not at garbage collection
            close = getattr(layer, "close", None)
            if close:
                close()
    if job.get("pypath"):
        sys.modules.pop(PY_MODULE, None)
    return out


def _assert_identical(mine, theirs, what):
    assert sorted(mine) == sorted(theirs), (what, sorted(set(mine) ^ set(theirs)))
    bad = []
    for key in sorted(theirs):
        if np.shape(mine[key]) != np.shape(theirs[key]):
            bad.append(f"{key}: shape {np.shape(mine[key])} vs Caffe's {np.shape(theirs[key])}")
        elif not np.array_equal(np.asarray(mine[key], np.float32), theirs[key]):
            d = np.abs(np.asarray(mine[key], np.float64) - theirs[key])
            bad.append(f"{key}: {int((d > 0).sum())} values differ, by up to {d.max():.3g}")
    assert not bad, f"{what}: differs from Caffe: " + "; ".join(bad)


@pytest.mark.parametrize("case", ["hdf5", "image_color", "image_gray", "image_transform",
                                  "image_gray_transform", "memory", "python_train", "python_test",
                                  "dropout_test"])
def test_tops_and_diffs_identical_to_caffe(io_cases, monkeypatch, case):
    job, theirs = io_cases[case]
    mine = _run_minicaffe(job, monkeypatch)
    _assert_identical(mine, theirs, case)


def test_data_layers_wrap_around(io_cases):
    """The cases above do exercise wrap-around: a later batch repeats an earlier record (checked on
    Caffe's own output, so the identical-tops test covers reading past the end)."""
    _, h5 = io_cases["hdf5"]             # 9 rows in two files, 5 batches of 4: wraps after row 9
    labels = np.concatenate([h5[f"{i}/data/label"] for i in range(5)])
    np.testing.assert_array_equal(labels[:9], [0, 1, 2, 3, 4, 10, 11, 12, 13])
    np.testing.assert_array_equal(labels[9:18], labels[:9])
    _, img = io_cases["image_color"]     # 5 images, 4 batches of 2
    np.testing.assert_array_equal(np.concatenate([img[f"{i}/data/label"] for i in range(4)]),
                                  [1, 2, 3, 4, 5, 1, 2, 3])
    _, mem = io_cases["memory"]          # 6 rows, 4 batches of 3
    np.testing.assert_array_equal(mem["2/data/label"], mem["0/data/label"])


def _check_dropout_train(out, x, diffs, who):
    """Each top is 0 or x·scale (float32, exactly as Caffe rounds it), about 1 − ratio of it kept; x's
    diff is the sum over the three dropouts of top diff · scale where kept."""
    expected_dx = np.zeros_like(x)
    for top, ratio in (("d3", 0.3), ("d5", 0.5), ("d8", 0.8)):
        scale = np.float32(1.0 / (1.0 - float(np.float32(ratio))))     # Caffe: float ratio, double 1/(1-r)
        y = out[f"0/data/{top}"]
        kept = y != 0
        np.testing.assert_array_equal(y[kept], (x * scale)[kept], err_msg=f"{who} {top}: kept values")
        frac = kept.mean()
        assert abs(frac - (1 - ratio)) < 0.06, f"{who} {top}: kept {frac:.3f}, expected about {1 - ratio}"
        expected_dx += np.where(kept, diffs[f"topdiff/{top}"] * scale, np.float32(0))
    np.testing.assert_allclose(out["diff/x"], expected_dx, rtol=1e-6, atol=1e-6,
                               err_msg=f"{who}: bottom diff is not top diff × scale where kept")


def test_dropout_train_masks_behave_as_caffes(io_cases, monkeypatch):
    """TRAIN: the masks differ (different generators); everything that does not depend on them agrees."""
    job, theirs = io_cases["dropout_train"]
    mine = _run_minicaffe(job, monkeypatch)
    given = np.load(job["inputs"])
    x = given["data/x"]
    diffs = {k: given[k] for k in given.files if k.startswith("topdiff/")}
    _check_dropout_train(theirs, x, diffs, "Caffe")
    _check_dropout_train(mine, x, diffs, "minicaffe")
    assert sorted(mine) == sorted(theirs)


def test_dropout_scale_train_rejected_like_caffe(io_cases):
    """BVLC Caffe's DropoutParameter has only dropout_ratio (scale_train came later, in other forks): its
    parser refuses the field, and so does minicaffe, with one line naming it."""
    from minicaffe.errors import MinicaffeError
    from minicaffe.net.network import Net
    job, theirs = io_cases["dropout_scale_train"]
    assert int(theirs["parsed"]) == 0
    with pytest.raises(MinicaffeError, match="scale_train"):
        Net(job["net"], caffe_pb2.TEST)
