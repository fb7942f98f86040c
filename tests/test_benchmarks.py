"""Smoke tests for benchmarks/: the scripts run end to end on a tiny setting, so they do not rot.

The numbers themselves are not checked (they depend on the machine); what is checked is that every
framework that is installed produced a timing, that PyTorch and OpenCV read minicaffe's net and
weights and agree with its output, and that the layer benchmark prints its table.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_nets_quick_minicaffe_only(tmp_path):
    out_json = tmp_path / "res.json"
    out = _run("bench_nets.py", "--quick", "--frameworks", "minicaffe", "--json", str(out_json))
    assert "lenet" in out
    import json
    res = json.loads(out_json.read_text())
    for mode in ("train", "infer"):
        mc = res[f"lenet/{mode}"]["minicaffe"]
        assert "error" not in mc, mc
        assert len(mc["times"]) == 1 and mc["times"][0] > 0
        names = [row[0] for row in mc["layers"]]
        assert "conv1" in names and "ip2" in names
    # the deploy net reproduces the output saved by the prepare step exactly
    assert res["lenet/infer"]["minicaffe"]["max_diff"] == 0.0


def test_bench_nets_runs_minicaffe_in_the_python_given(tmp_path):
    """``--minicaffe-python`` runs minicaffe's workers in that interpreter (here a wrapper that
    records its calls before it runs this one) and names it; one without NumPy is refused."""
    record = tmp_path / "calls"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = _run("bench_nets.py", "--quick", "--frameworks", "minicaffe", "--modes", "infer",
               "--minicaffe-python", str(wrapper))
    assert f"minicaffe's workers: {wrapper}" in out and "lenet" in out
    calls = record.read_text().splitlines()
    assert any("--worker minicaffe" in c for c in calls)
    assert not any("--worker prepare" in c for c in calls)
    bad = tmp_path / "nonumpy"
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_nets.py"), "--quick", "--frameworks",
                           "minicaffe", "--minicaffe-python", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--minicaffe-python" in proc.stderr and "NumPy" in proc.stderr


def test_bench_nets_scaling_times_one_thread_beside_the_default(tmp_path):
    """``--scaling`` runs minicaffe again at one thread after each row and prints the speed-up."""
    out_json = tmp_path / "res.json"
    out = _run("bench_nets.py", "--quick", "--frameworks", "minicaffe", "--modes", "infer", "--threads", "2",
               "--scaling", "--json", str(out_json))
    import json
    row = json.loads(out_json.read_text())["lenet/infer"]
    one = row["minicaffe_1thread"]
    assert "error" not in one and one["times"][0] > 0
    speedup = one["times"][0] / row["minicaffe"]["times"][0]
    assert f"1 -> 2 threads: {speedup:.2f}x" in out


def test_bench_nets_rounds_run_each_framework_again_and_keep_every_iteration(tmp_path):
    """``--rounds 2`` runs each framework twice, in turn: the row holds both rounds' iterations (the
    best counts), the highest peak, and says how many rounds it merged; a failed round is dropped."""
    out_json = tmp_path / "res.json"
    out = _run("bench_nets.py", "--quick", "--frameworks", "minicaffe", "--modes", "infer", "--rounds", "2",
               "--json", str(out_json))
    import json
    mc = json.loads(out_json.read_text())["lenet/infer"]["minicaffe"]
    assert mc["rounds"] == 2 and len(mc["times"]) == 2 and len(mc["cpu"]) == 2
    assert "in each of 2 rounds" in out
    merge = _load("bench_nets").merge_rounds
    got = merge([{"times": [3.0], "cpu": [3.5], "peak_mb": 10, "pool": 2}, {"error": "boom"},
                 {"times": [2.0, 4.0], "cpu": [2.5, 4.5], "peak_mb": 12}])
    assert got["times"] == [3.0, 2.0, 4.0] and got["cpu"] == [3.5, 2.5, 4.5]
    assert got["peak_mb"] == 12 and got["rounds"] == 2 and got["pool"] == 2
    assert merge([{"error": "boom"}, {"error": "again"}]) == {"error": "boom"}


@pytest.mark.skipif("MINICAFFE_THREADS" in os.environ or "OPENBLAS_THREAD_TIMEOUT" in os.environ,
                    reason="the pool's size is set from the environment")
def test_bench_nets_minicaffe_worker_imports_minicaffe_first(tmp_path):
    """The minicaffe worker imports minicaffe before NumPy, as the ``minicaffe`` commands do, so its
    kernels' pool has the two threads asked for; ``--numpy-first`` measures a script that imports
    NumPy first: OpenBLAS keeps its long idle spin and the pool one thread."""
    import json
    pools = {}
    for first in ([], ["--numpy-first"]):
        out_json = tmp_path / f"res{len(first)}.json"
        _run("bench_nets.py", "--quick", "--frameworks", "minicaffe", "--modes", "infer", "--threads", "2",
             *first, "--json", str(out_json))
        pools[bool(first)] = json.loads(out_json.read_text())["lenet/infer"]["minicaffe"]["pool"]
    assert pools == {False: 2, True: 1}


def test_bench_nets_quick_with_references(tmp_path):
    pytest.importorskip("torch")
    out_json = tmp_path / "res.json"
    out = _run("bench_nets.py", "--quick", "--json", str(out_json))
    import json
    res = json.loads(out_json.read_text())
    assert "ratio" in out
    train, infer = res["lenet/train"], res["lenet/infer"]
    assert "error" not in train["torch"], train["torch"]
    assert "error" not in infer["torch"], infer["torch"]
    # the same architecture with the same weights: the same probabilities
    assert infer["torch"]["max_diff"] < 1e-4
    bench = _load("bench_nets")
    if bench.available("opencv"):
        assert "error" not in infer["opencv"], infer["opencv"]
        assert infer["opencv"]["max_diff"] < 1e-4   # OpenCV read minicaffe's prototxt and caffemodel


def test_bench_layers_tiny():
    out = _run("bench_layers.py", "--only", "3a/,softmax", "--batch", "1", "--repeat", "1",
               "--gemm-size", "256", "--no-torch")
    assert "GFLOP/s" in out
    for name in ("gnet 3a/1x1", "gnet 3a/3x3", "gnet 3a/5x5", "gnet 3a/pool", "softmax 1000"):
        assert name in out
    assert "vgg conv3_2" not in out


def test_bench_layers_engines_side_by_side():
    """--engines times each convolution once per engine in the same run, DEFAULT's choice marked."""
    out = _run("bench_layers.py", "--only", "3a/5x5", "--batch", "1", "--repeat", "1", "--gemm-size", "128",
               "--no-torch", "--engines", "default,im2col_channels_last", "--median")
    assert "median of 1, wall clock" in out
    assert "gnet 3a/5x5 16->32 28² [im2col*]" in out        # 784 positions at batch 1: im2col
    assert "gnet 3a/5x5 16->32 28² [im2col_channels_last]" in out


def test_torch_translation_matches_caffe_semantics():
    """The PyTorch twin used as the reference computes what minicaffe computes, layer types of
    all four benchmark nets included (ceil-mode pooling, LRN, grouped conv, concat, dropout)."""
    torch = pytest.importorskip("torch")
    import numpy as np

    import minicaffe as caffe
    from minicaffe.net.network import blobproto_to_array
    bench = _load("bench_nets")
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 13 dim: 13 } } }
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
            convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2
                                weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
    layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
    layer { name: "n1" type: "LRN" bottom: "c1" top: "n1" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 } }
    layer { name: "p1" type: "Pooling" bottom: "n1" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "b1" type: "Convolution" bottom: "p1" top: "b1"
            convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "xavier" } } }
    layer { name: "b2" type: "Pooling" bottom: "p1" top: "b2" pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
    layer { name: "cat" type: "Concat" bottom: "b1" bottom: "b2" top: "cat" }
    layer { name: "d" type: "Dropout" bottom: "cat" top: "cat" dropout_param { dropout_ratio: 0.5 } }
    layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc"
            inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
    layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
    """
    from minicaffe.formats.prototxt import load_net_param
    param = load_net_param(text)
    net = caffe.Net(param, caffe.TEST)
    x = np.random.default_rng(0).standard_normal((2, 4, 13, 13)).astype(np.float32)
    ref = net.forward(data=x)["prob"]
    weights = {}
    for layer in net.to_proto().layer:
        if len(layer.blobs):
            weights[layer.name] = [blobproto_to_array(b) for b in layer.blobs]
    model = bench.build_torch(param, weights).eval()
    with torch.no_grad():
        _, blobs = model({"data": torch.from_numpy(x)})
    np.testing.assert_allclose(blobs["prob"].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_default_batches_are_the_issue_targets():
    """Issue 15's targets are at these batches: inference 10 (VGG-16 2), training CaffeNet 32,
    GoogLeNet 16, ResNet-50 8, VGG-16 4; every net, ResNet-50 included, runs both modes."""
    bench = _load("bench_nets")
    want = {"caffenet": (32, 10), "googlenet": (16, 10), "resnet50": (8, 10), "vgg16": (4, 2)}
    for net, (train, infer) in want.items():
        assert (bench.default_batch(net, "train"), bench.default_batch(net, "infer")) == (train, infer)
        assert os.path.exists(os.path.join(ROOT, bench.NETS[net][0], "train_val.prototxt"))


def test_resnet50_train_val_is_generated_and_names_the_deploy_layers():
    """models/resnet50's train_val.prototxt is what make_deploy.py writes (no drift), holds the
    deploy's parameter layers under the same names (a caffemodel moves between them), and its
    BatchNorms follow the phase (no use_global_stats), as a Caffe user training ResNet writes it."""
    spec = importlib.util.spec_from_file_location("make_deploy", os.path.join(ROOT, "models", "resnet50",
                                                                             "make_deploy.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from minicaffe.formats.prototxt import filter_net, load_net_param, make_state
    from minicaffe.proto import caffe_pb2
    path = os.path.join(ROOT, "models", "resnet50", "train_val.prototxt")
    with open(path) as f:
        assert f.read() == str(gen.resnet50_train_val())
    with open(os.path.join(ROOT, "models", "resnet50", "deploy.prototxt")) as f:
        assert f.read() == str(gen.resnet50())
    train = filter_net(load_net_param(path), make_state(caffe_pb2.TRAIN))
    test = filter_net(load_net_param(path), make_state(caffe_pb2.TEST))
    deploy = load_net_param(os.path.join(ROOT, "models", "resnet50", "deploy.prototxt"))
    learned = ("Convolution", "BatchNorm", "Scale", "InnerProduct")
    names = [lp.name for lp in deploy.layer if lp.type in learned]
    assert len(names) == 53 * 3 + 1
    assert [lp.name for lp in train.layer if lp.type in learned] == names
    assert [lp.type for lp in train.layer][-1] == "SoftmaxWithLoss"
    assert sorted(lp.type for lp in test.layer if lp.type == "Accuracy") == ["Accuracy"] * 2
    assert not any(lp.batch_norm_param.HasField("use_global_stats") for lp in train.layer)


def test_torch_batchnorm_trains_as_caffe_train_phase():
    """The PyTorch twin of a BatchNorm + Scale in TRAIN: batch statistics, as Caffe's BatchNorm
    without use_global_stats, and the Scale's gamma/beta among the parameters the optimiser
    updates; the loss and the Scale's gradient match minicaffe's."""
    torch = pytest.importorskip("torch")
    import numpy as np

    import minicaffe as caffe
    from minicaffe.formats.prototxt import load_net_param
    from minicaffe.net.network import blobproto_to_array
    bench = _load("bench_nets")
    text = """
    layer { name: "data" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
    layer { name: "c" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 5 kernel_size: 3 bias_term: false weight_filler { type: "msra" } } }
    layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
    layer { name: "sc" type: "Scale" bottom: "c" top: "c"
            scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
    layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
    layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc"
            inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
    """
    param = load_net_param(text)
    caffe.set_random_seed(2)
    net = caffe.Net(param, caffe.TRAIN)
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal((4, 3, 6, 6))).astype(np.float32)   # far from zero mean
    y = np.array([0, 2, 1, 2], np.float32)
    loss = float(net.forward(data=x, label=y)["loss"])
    net.backward()
    weights = {layer.name: [blobproto_to_array(b) for b in layer.blobs]
               for layer in net.to_proto().layer if len(layer.blobs)}
    model = bench.build_torch(param, weights).train()
    learned = {id(t) for t, _, _ in model.param_mults}
    bn = model.mods["bn"]
    assert id(bn.weight) in learned and id(bn.bias) in learned
    out, _ = model({"data": torch.from_numpy(x), "label": torch.from_numpy(y)})
    out.backward()
    np.testing.assert_allclose(float(out.detach()), loss, rtol=1e-4)
    np.testing.assert_allclose(bn.weight.grad.numpy(), net.params["sc"][0].diff.reshape(-1), rtol=1e-3, atol=1e-5)


def test_bench_normalization_ab_tiny():
    """The A/B of BatchNorm/Scale against another revision's file runs; against this checkout's own
    file both sides give the same bits."""
    own = os.path.join(ROOT, "minicaffe", "layers", "normalization.py")
    out = _run("bench_normalization_ab.py", "--old", own, "--batch", "2", "--rounds", "1",
               "--shapes", "6x5x5,4x3x3")
    rows = [line for line in out.splitlines() if line.startswith("| 2x")]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows), out


def test_bench_engine_ab_runs_and_names_an_unknown_constant():
    """The script runs end to end on LeNet (whose 5x5 layers no Winograd threshold moves, so only
    the whole passes' rows print); a constant no engine module has is a one-line error."""
    out = _run("bench_engine_ab.py", "--net", "lenet", "--batch", "2", "--rounds", "1",
               "--set", "WINOGRAD_WEIGHT_GRAD_MIN_TILES=1")
    assert "| whole backward |" in out and "| whole forward |" in out
    # minicaffe loads before NumPy there, so its kernels' pool has the threads a minicaffe command
    # gets (imported after NumPy, the pool had one thread and every A/B measured one core's engines)
    env = dict(os.environ, PYTHONPATH=ROOT)
    expected = subprocess.run([sys.executable, "-c", "import minicaffe; from minicaffe.core import threads; "
                               "print(threads.size())"], capture_output=True, text=True,
                              env=env, timeout=600).stdout.split()[-1]
    assert f"kernels' pool of {expected} threads" in out, out
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_engine_ab.py"), "--net", "lenet",
                           "--set", "NO_SUCH_CONSTANT=1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "NO_SUCH_CONSTANT" in proc.stderr.strip().splitlines()[-1]


def test_bench_caffe_sorts_layers_into_kinds_and_works_out_the_budget():
    """``bench_caffe.py --by-kind``: a layer's kind comes from its type and kernel geometry (the
    forms a prototxt may give them in), a layer the prototxt does not name (an inserted Split) is
    "everything else", and the last line's budget is 0.5x Caffe's total less the GEMM kinds'
    minicaffe time."""
    from google.protobuf import text_format
    from minicaffe.proto import caffe_pb2
    bench = _load("bench_caffe")
    param = text_format.Parse("""
        layer { name: "c1" type: "Convolution" convolution_param { kernel_size: 7 stride: 2 } }
        layer { name: "r1" type: "ReLU" }
        layer { name: "a" type: "Convolution" convolution_param { kernel_size: 1 } }
        layer { name: "a2" type: "Convolution" convolution_param { kernel_size: 1 stride: 2 } }
        layer { name: "b" type: "Convolution" convolution_param { kernel_size: 3 pad: 1 } }
        layer { name: "b2" type: "Convolution" convolution_param { kernel_h: 5 kernel_w: 5 stride_h: 1 } }
        layer { name: "b3" type: "Convolution" convolution_param { kernel_size: 3 stride: 2 } }
        layer { name: "b4" type: "Convolution" convolution_param { kernel_h: 1 kernel_w: 3 } }
        layer { name: "fc" type: "InnerProduct" }
    """, caffe_pb2.NetParameter())
    kinds = {lp.name: bench.kind_of(lp) for lp in param.layer}
    one, wino, other, ip, rest = bench.KINDS
    assert kinds == {"c1": other, "r1": rest, "a": one, "a2": one, "b": wino, "b2": wino, "b3": other,
                     "b4": other, "fc": ip}
    ref = {"c1": 10.0, "r1": 2.0, "a": 20.0, "a2": 5.0, "b": 40.0, "b2": 8.0, "fc": 15.0}
    mc = {"c1": 9.0, "r1": 1.0, "a": 21.0, "b": 18.0, "fc": 16.0, "x_split": 0.5}
    sums = bench.by_kind(param, ref, mc)
    assert sums[one] == (25.0, 21.0) and sums[wino] == (48.0, 18.0) and sums[other] == (10.0, 9.0)
    assert sums[ip] == (15.0, 16.0) and sums[rest] == (2.0, 1.5)
    lines = bench.kind_lines(sums)
    assert len(lines) == 1 + len(bench.KINDS) + 1
    # 0.5 * 100 - (21 + 16) = 13 ms for the rest, against Caffe's 60 and minicaffe's 28.5
    assert "would have 13.0 ms (0.22x Caffe's 60.0); they take 28.5 (0.47x)" in lines[-1]


def test_bench_caffe_reads_both_tools_per_layer_lines():
    """The per-layer lines of ``caffe time`` and ``minicaffe time`` (glog prefixes, tabs, names with
    slashes) give each layer's forward + backward; the averages' lines do not count as layers."""
    bench = _load("bench_caffe")
    text = ("I1128 03:04:07.0 20114 caffe.cpp:403]      conv1\tforward: 19.5 ms.\n"
            "I1128 03:04:07.0 20114 caffe.cpp:406]      conv1\tbackward: 22.25 ms.\n"
            "I1128 03:04:07.0 20114 cli.py:433] inception_3a/1x1\tforward: 1e-3 ms.\n"
            "I1128 03:04:07.0 20114 cli.py:437] Average Forward pass: 392.5 ms.\n"
            "I1128 03:04:07.0 20114 cli.py:439] Average Forward-Backward: 1109.7 ms.\n")
    assert bench.layer_times(text) == {"conv1": 41.75, "inception_3a/1x1": 1e-3}
