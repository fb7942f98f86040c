"""pycaffe names that ordinary scripts use, beyond Net.forward/backward and the solvers' step: the
Net hooks and underscore views of _caffe.cpp, blob_loss_weights, set_input_arrays, the Net keywords,
Solver.share_weights and the solver class hierarchy, Timer, NCCL/has_nccl, init_log/log, Detector,
`from caffe import *`, and caffe.io.resize_image's values. Where BVLC Caffe's pycaffe is built (see
/work/shared/reference-caffe), the results are compared with it in a subprocess."""
import json
import logging
import os
import subprocess
import textwrap

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import io as cio
from minicaffe.errors import MinicaffeError, NetError

REF_BASE = os.environ.get("MINICAFFE_REFERENCE_BASE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minicaffe-reference-caffe")
REF_PYTHON = os.path.join(REF_BASE, "venv", "bin", "python")
REF_PATH = os.path.join(REF_BASE, "install", "python")


def reference(script, tmp_path, *args):
    """Run ``script`` with BVLC's pycaffe (its own venv, as /work/shared/reference-caffe says); skip
    where it is not built. Returns the script's stdout."""
    if not (os.path.exists(REF_PYTHON) and os.path.exists(os.path.join(REF_PATH, "caffe", "_caffe.so"))):
        pytest.skip("BVLC's pycaffe is not built (bash /work/shared/reference-caffe/build.sh)")
    path = tmp_path / "ref_script.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=REF_PATH, GLOG_minloglevel="2")
    proc = subprocess.run([REF_PYTHON, str(path)] + [str(a) for a in args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


NET = """
name: "views"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 5 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" }
layer { name: "aux" type: "EuclideanLoss" bottom: "ip1" bottom: "ip1" top: "aux" loss_weight: 0.5 }
"""

VIEWS_SCRIPT = """
import json, sys
import numpy as np
import caffe
net = caffe.Net(sys.argv[1], caffe.TRAIN)
log = []
net.before_forward(lambda i: log.append(["bf", i]))
net.after_forward(lambda i: log.append(["af", i]))
net.before_backward(lambda i: log.append(["bb", i]))
net.after_backward(lambda i: log.append(["ab", i]))
net.blobs["data"].data[...] = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
net.blobs["label"].data[...] = [0, 1, 2, 1]
net.forward()
net.backward()
net._forward(1, 2)
net._backward(3, 1)
print(json.dumps({
    "blob_names": list(net._blob_names), "layer_names": list(net._layer_names),
    "inputs": list(net._inputs), "outputs": list(net._outputs),
    "top_ids": [list(net._top_ids(i)) for i in range(len(net.layers))],
    "bottom_ids": [list(net._bottom_ids(i)) for i in range(len(net.layers))],
    "loss_weights": [float(w) for w in net._blob_loss_weights],
    "loss_weight_keys": list(net.blob_loss_weights), "n_blobs": len(net._blobs), "log": log,
    "top_names": {k: list(v) for k, v in net.top_names.items()},
}))
"""


def _views(net):
    log = []
    net.before_forward(lambda i: log.append(["bf", i]))
    net.after_forward(lambda i: log.append(["af", i]))
    net.before_backward(lambda i: log.append(["bb", i]))
    net.after_backward(lambda i: log.append(["ab", i]))
    net.blobs["data"].data[...] = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    net.blobs["label"].data[...] = [0, 1, 2, 1]
    net.forward()
    net.backward()
    net._forward(1, 2)
    net._backward(3, 1)
    return {
        "blob_names": list(net._blob_names), "layer_names": list(net._layer_names),
        "inputs": list(net._inputs), "outputs": list(net._outputs),
        "top_ids": [list(net._top_ids(i)) for i in range(len(net.layers))],
        "bottom_ids": [list(net._bottom_ids(i)) for i in range(len(net.layers))],
        "loss_weights": [float(w) for w in net._blob_loss_weights],
        "loss_weight_keys": list(net.blob_loss_weights), "n_blobs": len(net._blobs), "log": log,
        "top_names": {k: list(v) for k, v in net.top_names.items()},
    }


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return path


def test_hooks_and_underscore_views(net_file):
    net = caffe.Net(network_file=str(net_file), phase=caffe.TRAIN)
    got = _views(net)
    n = len(net.layers)
    # Caffe runs the hooks around every layer of the range, backward ones even where a layer
    # needs no backward (the Input layer, Accuracy)
    fwd = [[k, i] for i in range(n) for k in ("bf", "af")]
    bwd = [[k, i] for i in reversed(range(n)) for k in ("bb", "ab")]
    assert got["log"] == fwd + bwd + [["bf", 1], ["af", 1], ["bf", 2], ["af", 2]] + \
        [[k, i] for i in (3, 2, 1) for k in ("bb", "ab")]
    names = got["blob_names"]
    assert got["n_blobs"] == len(names) and [names[i] for i in got["inputs"]] == ["data", "label"]
    assert [names[i] for i in got["outputs"]] == net.outputs
    for i, lp in enumerate(net.param.layer):
        assert [names[j] for j in got["top_ids"][i]] == list(lp.top)
        assert [names[j] for j in got["bottom_ids"][i]] == list(lp.bottom)
    weights = dict(zip(got["loss_weight_keys"], got["loss_weights"]))
    assert weights["loss"] == 1.0 and weights["aux"] == 0.5 and weights["acc"] == 0.0 and weights["ip2"] == 0.0
    with pytest.raises(NetError, match="outside net 'views'"):
        net._forward(0, n)


def test_views_and_hooks_match_bvlc(net_file, tmp_path):
    want = json.loads(reference(VIEWS_SCRIPT, tmp_path, net_file))
    got = _views(caffe.Net(str(net_file), caffe.TRAIN))
    assert got == want


def test_net_keywords_and_legacy_forms(net_file, tmp_path):
    net = caffe.Net(str(net_file), caffe.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    for other in (caffe.Net(network_file=str(net_file), phase=caffe.TEST, weights=str(weights)),
                  caffe.Net(str(net_file), str(weights), caffe.TEST),
                  caffe.Net(str(net_file), caffe.TEST, weights=str(weights))):
        np.testing.assert_array_equal(other.params["ip1"][0].data, net.params["ip1"][0].data)
    with pytest.raises(TypeError, match="needs a network"):
        caffe.Net(phase=caffe.TEST)


MEMORY_NET = """
layer { name: "md" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "s" type: "Silence" bottom: "label" }
"""


def test_set_input_arrays_feeds_memory_data(tmp_path):
    path = tmp_path / "mem.prototxt"
    path.write_text(MEMORY_NET)
    net = caffe.Net(str(path), caffe.TEST)
    data = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([5, 6, 7, 8], dtype=np.float32)          # 1-d labels are fine, as in pycaffe
    net.set_input_arrays(data, labels)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2])
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), labels[:2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), labels[2:])
    with pytest.raises(MinicaffeError, match="multiple of batch size"):
        net.set_input_arrays(data[:3], labels[:3])
    other = caffe.Net(str(tmp_path / "mem.prototxt"), caffe.TEST)
    other_path = tmp_path / "plain.prototxt"
    other_path.write_text(NET)
    with pytest.raises(NetError, match="first layer is a MemoryDataLayer"):
        caffe.Net(str(other_path), caffe.TEST).set_input_arrays(data, labels)
    assert other.layers[0].type == "MemoryData"


def test_solver_hierarchy_and_share_weights(net_file, tmp_path):
    for name in ("NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"):
        assert issubclass(getattr(caffe, name), caffe.SGDSolver), name
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(f'net: "{net_file}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\n'
                           f'snapshot_prefix: "{tmp_path}/snap"\nsolver_mode: CPU\n')
    solver = caffe.get_solver(str(solver_path))
    net = caffe.Net(str(net_file), caffe.TEST)
    solver.share_weights(net)
    assert net.params["ip1"][0] is solver.net.params["ip1"][0]
    net.blobs["data"].data[...] = 1
    solver.net.blobs["data"].data[...] = 1
    solver.net.blobs["label"].data[...] = 0
    before = net.params["ip2"][0].data.copy()
    solver.step(1)
    assert not np.array_equal(net.params["ip2"][0].data, before)     # the shared net sees the update


def test_star_import_timer_logging_and_nccl(logs):
    ns = {}
    exec("from minicaffe import *", ns)
    for name in ("io", "Net", "SGDSolver", "AdamSolver", "get_solver", "Classifier", "Detector", "Timer",
                 "NCCL", "has_nccl", "init_log", "log", "layers", "params", "NetSpec", "to_proto", "TRAIN",
                 "TEST", "set_mode_cpu", "layer_type_list", "set_solver_count", "solver_rank", "__version__"):
        assert name in ns, name
    assert ns["io"] is cio and ns["Detector"] is caffe.detector.Detector
    t = caffe.Timer()
    assert t.ms == 0.0                    # never started: 0, as Caffe (with its warning)
    t.start()
    sum(range(10000))
    assert t.ms > 0 and not t._running   # reading ms stops a running timer, as Caffe's MilliSeconds
    first = t.ms
    assert t.ms == first
    assert caffe.has_nccl() in (True, False)
    if not caffe.has_nccl():
        with pytest.raises(MinicaffeError):
            caffe.NCCL.new_uid()
    logger = logging.getLogger("minicaffe")
    level, propagate = logger.level, logger.propagate
    try:
        caffe.init_log(0)
        caffe.log("hello from pycaffe")
        caffe.init_log(2)
        caffe.log("not shown")
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
    assert "hello from pycaffe" in logs and "not shown" not in logs


DETECT_NET = """
name: "det"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def detector_files(tmp_path):
    import cv2
    model = tmp_path / "det.prototxt"
    model.write_text(DETECT_NET)
    caffe.set_random_seed(3)
    weights = tmp_path / "det.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    rng = np.random.default_rng(0)
    images = []
    for k in range(2):
        path = tmp_path / f"im{k}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (20, 24, 3)).astype(np.uint8))
        images.append(path)
    return model, weights, images


def test_detector_windows_and_context_pad(detector_files):
    model, weights, images = detector_files
    det = caffe.Detector(str(model), str(weights), mean=np.array([10.0, 20.0, 30.0]), raw_scale=255,
                         channel_swap=(2, 1, 0))
    windows = [(str(images[0]), [(0, 0, 8, 8), (5, 6, 17, 20)]), (str(images[1]), [(2, 3, 10, 9)])]
    dets = det.detect_windows(windows)
    assert [d["filename"] for d in dets] == [str(images[0])] * 2 + [str(images[1])]
    assert [tuple(d["window"]) for d in dets] == [(0, 0, 8, 8), (5, 6, 17, 20), (2, 3, 10, 9)]
    # each prediction is the net's output on that window, warped and pre-processed
    im = cio.load_image(str(images[0]))
    x = det.transformer.preprocess("data", im[5:17, 6:20])
    np.testing.assert_allclose(dets[1]["prediction"], det.forward_all(data=x[np.newaxis])["prob"][0], rtol=1e-5)

    # context padding (R-CNN): crop size 8, pad 2 doubles the window; inside the image no mean shows
    padded = caffe.Detector(str(model), str(weights), mean=np.array([10.0, 20.0, 30.0]), raw_scale=255,
                            channel_swap=(2, 1, 0), context_pad=2)
    np.testing.assert_allclose(padded.crop(im, np.array([10, 10, 13, 13])), im[8:16, 8:16], rtol=1e-6)
    # at the corner the grown box (-2, -2, 6, 6) leaves the image: a 2-pixel border of the mean,
    # taken back to image space (channel order undone, / raw_scale)
    crop = padded.crop(im, np.array([0, 0, 3, 3]))
    assert crop.shape == (8, 8, 3)
    np.testing.assert_allclose(crop[:2, :, :], np.broadcast_to(np.array([30, 20, 10]) / 255.0, (2, 8, 3)),
                               rtol=1e-6)
    np.testing.assert_allclose(crop[2:, 2:], im[0:6, 0:6], rtol=1e-6)


def test_detector_matches_bvlc(detector_files, tmp_path):
    model, weights, images = detector_files
    windows = [[str(images[0]), [[0, 0, 8, 8], [5, 6, 17, 20]]], [str(images[1]), [[2, 3, 10, 9]]]]
    script = """
    import json, sys
    import numpy as np
    import caffe
    det = caffe.Detector(sys.argv[1], sys.argv[2], mean=np.array([10.0, 20.0, 30.0]), raw_scale=255,
                         channel_swap=(2, 1, 0))
    dets = det.detect_windows(json.loads(sys.argv[3]))
    print(json.dumps([d["prediction"].tolist() for d in dets]))
    """
    want = np.array(json.loads(reference(script, tmp_path, model, weights, json.dumps(windows))))
    det = caffe.Detector(str(model), str(weights), mean=np.array([10.0, 20.0, 30.0]), raw_scale=255,
                         channel_swap=(2, 1, 0))
    got = np.array([d["prediction"] for d in det.detect_windows(windows)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


RESIZE_SCRIPT = """
import sys
import numpy as np
import caffe.io
cases = np.load(sys.argv[1])
out = {}
for key in cases.files:
    if key.startswith("im_"):
        h, w, order = (int(v) for v in cases["arg_" + key[3:]])
        out["out_" + key[3:]] = caffe.io.resize_image(cases[key], (h, w), interp_order=order)
np.savez(sys.argv[2], **out)
"""


def test_resize_image_matches_bvlc(tmp_path):
    """Every channel count, order and direction: BVLC's skimage/scipy results, to float32 rounding."""
    rng = np.random.default_rng(7)
    cases = {}
    dims = [((6, 8), (13, 5)), ((40, 30), (7, 11)), ((5, 5), (5, 9)), ((1, 9), (4, 3)), ((12, 10), (1, 1))]
    i = 0
    for (H, W), (h, w) in dims:
        for k in (1, 2, 3, 4):
            for order in range(6):
                cases[f"im_{i}"] = (rng.random((H, W, k)) * 300 - 40).astype(np.float32)
                cases[f"arg_{i}"] = np.array([h, w, order])
                i += 1
    cases[f"im_{i}"] = rng.integers(0, 256, (9, 7, 3)).astype(np.uint8)      # integers: normalised first
    cases[f"arg_{i}"] = np.array([16, 5, 1])
    np.savez(tmp_path / "in.npz", **cases)
    reference(RESIZE_SCRIPT, tmp_path, tmp_path / "in.npz", tmp_path / "out.npz")
    want = np.load(tmp_path / "out.npz")
    for j in range(i + 1):
        h, w, order = cases[f"arg_{j}"]
        got = cio.resize_image(cases[f"im_{j}"], (h, w), interp_order=int(order))
        ref = want[f"out_{j}"]
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()),
                                   err_msg=f"case {j}: {cases[f'im_{j}'].shape} -> {(h, w)}, order {order}")


SCORES_NET = """
name: "scores"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
"""


def test_classifier_averages_the_output_as_bvlc(tmp_path):
    """Caffe's averaging rule: Classifier.predict is the mean of the net's output over the crops.
    A net ending in raw scores (no Softmax) tells it from a mean of probabilities; BVLC's pycaffe
    gives the same numbers, 10 crops (40, not a multiple of the batch of 3) and centre crop."""
    model, weights = tmp_path / "scores.prototxt", tmp_path / "scores.caffemodel"
    model.write_text(SCORES_NET)
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    rng = np.random.default_rng(11)
    np.save(tmp_path / "images.npy", rng.random((4, 11, 13, 3)).astype(np.float32))
    script = """
    import json, sys
    import numpy as np
    import caffe
    clf = caffe.Classifier(sys.argv[1], sys.argv[2], image_dims=(10, 12), mean=np.array([0.2, 0.3, 0.4]),
                           raw_scale=2.0, channel_swap=(2, 1, 0))
    images = list(np.load(sys.argv[3]))
    print(json.dumps([clf.predict(images, oversample=o).tolist() for o in (True, False)]))
    """
    want = json.loads(reference(script, tmp_path, model, weights, tmp_path / "images.npy"))
    clf = caffe.Classifier(str(model), str(weights), image_dims=(10, 12), mean=np.array([0.2, 0.3, 0.4]),
                           raw_scale=2.0, channel_swap=(2, 1, 0))
    images = list(np.load(tmp_path / "images.npy"))
    for oversample, ref in zip((True, False), want):
        got = clf.predict(images, oversample=oversample)
        assert (got < 0).any()                  # raw scores, not probabilities
        np.testing.assert_allclose(got, np.array(ref), rtol=1e-4, atol=1e-5)
