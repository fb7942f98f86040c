"""GPU mode against CPU mode: every layer type, a net, solver steps, exact resume, a CLI train.

Without a GPU these run on the strict CuPy stand-in (tests/cupy_standin.py), so code that would
break on CuPy (implicit host conversion, NumPy operands, NumPy-only names) fails in CI; on a
machine with a GPU the same tests run on real CuPy (tests/conftest.py, the ``gpu`` fixture).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.core.layer import _REGISTRY as LAYER_REGISTRY
from minicaffe.testing import TEST, TRAIN, make_layer
from minicaffe.tools import cli

import cupy_standin

HERE = os.path.dirname(os.path.abspath(__file__))


def rnd(*shape, seed=0, low=-1.0, high=1.0):
    return np.random.RandomState(seed).uniform(low, high, shape)


def labels(n, classes, seed=1):
    return np.random.RandomState(seed).randint(0, classes, n).astype(np.float64)


X = rnd(2, 3, 6, 5)
GAUSS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 }'

# (layer prototxt, bottoms, number of tops, which bottoms get gradients, phase)
CASES = {
    "Split": ('type: "Split"', [X], 2, None, TRAIN),
    "Concat": ('type: "Concat" concat_param { axis: 1 }', [X, rnd(2, 2, 6, 5, seed=2)], 1, None, TRAIN),
    "Slice": ('type: "Slice" slice_param { axis: 1 slice_point: 1 }', [X], 2, None, TRAIN),
    "Flatten": ('type: "Flatten"', [X], 1, None, TRAIN),
    "Reshape": ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [X], 1, None, TRAIN),
    "Silence": ('type: "Silence"', [X], 0, None, TRAIN),
    "Crop": ('type: "Crop" crop_param { axis: 2 offset: 1 }', [X, np.zeros((2, 3, 4, 3))], 1,
             [True, False], TRAIN),
    "ArgMax": ('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true axis: 1 }', [X], 1, [False], TRAIN),
    "Tile": ('type: "Tile" tile_param { axis: 1 tiles: 2 }', [X], 1, None, TRAIN),
    "Reduction": ('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 }', [X], 1, None,
                  TRAIN),
    "InnerProduct": (f'type: "InnerProduct" inner_product_param {{ num_output: 4 {GAUSS} }}', [X], 1, None,
                     TRAIN),
    "Pooling": ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [X], 2,
                None, TRAIN),
    "LRN": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }', [X], 1, None, TRAIN),
    "Convolution": (f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 '
                    f'{GAUSS} }}', [X], 1, None, TRAIN),
    "Deconvolution": (f'type: "Deconvolution" convolution_param {{ num_output: 2 kernel_size: 3 stride: 2 '
                      f'{GAUSS} }}', [X], 1, None, TRAIN),
    "ReLU": ('type: "ReLU" relu_param { negative_slope: 0.1 }', [X], 1, None, TRAIN),
    "PReLU": ('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.3 } }', [X], 1, None, TRAIN),
    "Sigmoid": ('type: "Sigmoid"', [X], 1, None, TRAIN),
    "TanH": ('type: "TanH"', [X], 1, None, TRAIN),
    "AbsVal": ('type: "AbsVal"', [X], 1, None, TRAIN),
    "BNLL": ('type: "BNLL"', [X], 1, None, TRAIN),
    "ELU": ('type: "ELU" elu_param { alpha: 0.7 }', [X], 1, None, TRAIN),
    "Power": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 2 }', [X], 1, None, TRAIN),
    "Exp": ('type: "Exp" exp_param { base: 2 scale: 0.5 }', [X], 1, None, TRAIN),
    "Log": ('type: "Log" log_param { shift: 2 }', [X], 1, None, TRAIN),
    "BatchNorm": ('type: "BatchNorm"', [X], 1, None, TRAIN),
    "Bias": ('type: "Bias" bias_param { filler { type: "gaussian" std: 0.3 } }', [X], 1, None, TRAIN),
    "Scale": ('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" std: 0.3 } '
              'bias_filler { type: "gaussian" std: 0.3 } }', [X], 1, None, TRAIN),
    "Eltwise": ('type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }',
                [X, rnd(2, 3, 6, 5, seed=3)], 1, None, TRAIN),
    "Softmax": ('type: "Softmax"', [X], 1, None, TRAIN),
    "SoftmaxWithLoss": ('type: "SoftmaxWithLoss"', [rnd(4, 5), labels(4, 5)], 1, [True, False], TRAIN),
    "InfogainLoss": ('type: "InfogainLoss"', [rnd(4, 3, low=0.05), labels(4, 3), rnd(3, 3, seed=4, low=0.0)],
                     1, [True, False, False], TRAIN),
    "EuclideanLoss": ('type: "EuclideanLoss"', [rnd(4, 3), rnd(4, 3, seed=5)], 1, None, TRAIN),
    "SigmoidCrossEntropyLoss": ('type: "SigmoidCrossEntropyLoss"', [rnd(4, 3), rnd(4, 3, seed=6, low=0.0)],
                                1, [True, False], TRAIN),
    "HingeLoss": ('type: "HingeLoss" hinge_loss_param { norm: L2 }', [rnd(4, 5), labels(4, 5)], 1,
                  [True, False], TRAIN),
    "MultinomialLogisticLoss": ('type: "MultinomialLogisticLoss"', [rnd(4, 5, low=0.05), labels(4, 5)], 1,
                                [True, False], TRAIN),
    "Accuracy": ('type: "Accuracy" accuracy_param { top_k: 2 }', [rnd(6, 5), labels(6, 5)], 1,
                 [False, False], TEST),
    "Dropout": ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [X], 1, None, TEST),
    "Input": ('type: "Input" input_param { shape { dim: 2 dim: 3 } }', [], 1, [], TRAIN),
    "DummyData": ('type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                  'data_filler { type: "uniform" min: -1 max: 2 } }', [], 1, [], TRAIN),
    # the layers of issue 14
    "Clip": ('type: "Clip" clip_param { min: -0.4 max: 0.6 }', [X], 1, None, TRAIN),
    "Swish": ('type: "Swish" swish_param { beta: 1.5 }', [X], 1, None, TRAIN),
    "Threshold": ('type: "Threshold" threshold_param { threshold: 0.2 }', [X], 1, [False], TRAIN),
    "MVN": ('type: "MVN" mvn_param { across_channels: true }', [X], 1, None, TRAIN),
    "ContrastiveLoss": ('type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 }',
                        [rnd(6, 4), rnd(6, 4, seed=7), np.array([1, 0, 0, 1, 0, 0.])], 1, [True, True, False],
                        TRAIN),
    "BatchReindex": ('type: "BatchReindex"', [X, np.array([1, 0, 1.])], 1, [True, False], TRAIN),
    "Filter": ('type: "Filter"', [X, rnd(2, 4, seed=8), np.array([0, 1.])], 2, [True, True, False], TRAIN),
    "Embed": (f'type: "Embed" embed_param {{ num_output: 3 input_dim: 5 {GAUSS} }}',
              [np.array([[0, 4, 2], [2, 2, 1.]])], 1, [False], TRAIN),
    "Parameter": ('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], 1, [], TRAIN),
    "Im2col": ('type: "Im2col" convolution_param { kernel_size: 3 pad: 1 stride: 2 }', [X], 1, None, TRAIN),
    "SPP": ('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [X], 1, None, TRAIN),
    "LSTMUnit": ('type: "LSTMUnit"', [rnd(1, 3, 4), rnd(1, 3, 16, seed=9, low=-2, high=2), np.array([[1, 0, 1.]])],
                 2, [True, True, False], TRAIN),
    "LSTM": (f'type: "LSTM" recurrent_param {{ num_output: 4 {GAUSS} }}',
             [rnd(3, 2, 5), np.array([[0, 0], [1, 1], [1, 0.]]), rnd(2, 3, seed=10)], 1, [True, False, True],
             TRAIN),
    "RNN": (f'type: "RNN" recurrent_param {{ num_output: 4 expose_hidden: true {GAUSS} }}',
            [rnd(3, 2, 5), np.array([[0, 0], [1, 1], [1, 0.]]), rnd(1, 2, 4, seed=11)], 2, [True, False, True],
            TRAIN),
}
# layer types left out here, and where their GPU mode is covered instead
NOT_HERE = {
    "Data": "reads an LMDB/LevelDB: test_cli_train_on_gpu trains from a DummyData net; data layers fill host blobs",
    "ImageData": "reads image files (host); same as Data",
    "MemoryData": "host arrays handed in by the caller; same as Data",
    "HDF5Data": "reads HDF5 files (host); same as Data",
    "Python": "user code: tests/test_layers_python.py::test_python_layer_in_gpu_mode",
    "WindowData": "reads image files (host); same as Data",
    "HDF5Output": "writes host copies of its bottoms to a file: no device arithmetic",
}


def test_every_layer_type_has_a_gpu_case():
    assert set(CASES) | set(NOT_HERE) == set(LAYER_REGISTRY), \
        "a layer type has no CPU-vs-GPU case: add it to CASES (or say where it is covered in NOT_HERE)"


def run_layer(text, bottoms, num_top, propagate, phase):
    """Forward and backward in float64; tops, bottom diffs and parameter diffs as host arrays."""
    backend.set_random_seed(11)
    with backend.float64_blobs():
        layer, bottom, top = make_layer(f'name: "l" {text}', bottoms, num_top, phase)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        rs = np.random.RandomState(9)
        for t in top:
            t.diff[...] = rs.uniform(-1, 1, t.shape)
        prop = [True] * len(bottom) if propagate is None else propagate
        for b in bottom:
            b.diff[...] = 0
        layer.backward(top, prop, bottom)
    out = [t.data.copy() for t in top]
    out += [b.diff.copy() for b, p in zip(bottom, prop) if p]
    out += [p.diff.copy() for p in layer.blobs]
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
def test_layer_gpu_matches_cpu(gpu, kind):
    text, bottoms, num_top, propagate, phase = CASES[kind]
    backend.set_mode_cpu()
    want = run_layer(text, bottoms, num_top, propagate, phase)
    backend.set_mode_gpu()
    got = run_layer(text, bottoms, num_top, propagate, phase)
    assert len(got) == len(want) and want
    for i, (a, b) in enumerate(zip(want, got)):
        np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-9, err_msg=f"{kind}: output {i}")


def test_dropout_train_on_gpu_keeps_the_mask_for_backward(gpu):
    backend.set_mode_gpu()
    layer, bottom, top = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.25 }',
                                    [np.ones((64, 50))], 1, TRAIN)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.03
    top[0].diff[...] = 2.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 2.0 * y)


def test_seed_set_before_gpu_mode_repeats_gpu_dropout(gpu):
    """Regression: set_random_seed() in CPU mode and then set_mode_gpu() left CuPy unseeded."""
    masks = []
    for _ in range(2):
        backend.set_mode_cpu()
        backend.set_random_seed(42)
        backend.set_mode_gpu()
        layer, bottom, top = make_layer('type: "Dropout"', [np.ones((8, 40))], 1, TRAIN)
        layer.forward(bottom, top)
        masks.append(top[0].data.copy())
    np.testing.assert_array_equal(masks[0], masks[1])
    assert (masks[0] == 0).any() and (masks[0] != 0).any()


LENET_ISH = """
name: "small"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 1 dim: 12 dim: 12 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 3 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
NO_DROPOUT = LENET_ISH.replace('type: "Dropout"', 'type: "ReLU"').replace(
    " dropout_param { dropout_ratio: 0.5 }", "")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_net_forward_backward_gpu_matches_cpu(gpu, tmp_path):
    proto = write(tmp_path, "net.prototxt", NO_DROPOUT)
    results = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        backend.set_random_seed(5)
        with backend.float64_blobs():
            net = caffe.Net(proto, caffe.TRAIN)
            loss = net.forward()["loss"]
            net.backward()
        results.append([np.array(loss)] + [b.diff.copy() for v in net.params.values() for b in v])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-10)


def solver_file(tmp_path, net_text, **extra):
    net = write(tmp_path, "train.prototxt", net_text)
    lines = [f'net: "{net}"', "base_lr: 0.05", 'lr_policy: "fixed"', "momentum: 0.9", "weight_decay: 0.001",
             "random_seed: 3", f'snapshot_prefix: "{tmp_path}/s"'] + [f"{k}: {v}" for k, v in extra.items()]
    return write(tmp_path, "solver.prototxt", "\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_solver_steps_gpu_match_cpu(gpu, tmp_path, kind):
    weights = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        solver = caffe.get_solver(solver_file(tmp_path, NO_DROPOUT, type=f'"{kind}"'))
        solver.step(3)
        weights.append([b.data.copy() for v in solver.net.params.values() for b in v])
    for a, b in zip(*weights):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_resume_on_gpu_is_bit_exact_with_dropout(gpu, tmp_path):
    """Regression: the GPU generator's state was not in the snapshot, so exact resume was CPU-only."""
    path = solver_file(tmp_path, LENET_ISH, max_iter=6, snapshot=3)
    full = caffe.get_solver(path)
    full.solve()
    side = json.loads(open(f"{tmp_path}/s_iter_3.solverstate.rng").read())
    assert side["gpu"]["draws"] == 3
    backend.set_random_seed(999)        # whatever happened in between
    resumed = caffe.get_solver(path)
    resumed.solve(f"{tmp_path}/s_iter_3.solverstate")
    for name in full.net.params:
        for x, y in zip(full.net.params[name], resumed.net.params[name]):
            np.testing.assert_array_equal(x.data, y.data)


def test_cli_train_on_gpu(gpu, tmp_path, monkeypatch, logs):
    path = solver_file(tmp_path, LENET_ISH, max_iter=4, snapshot=4, display=2)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", f"--solver={path}", "--gpu=0"]) == 0
    text = "\n".join(logs)
    assert "Use CPU." not in text and "Iteration 4, loss = " in text
    assert os.path.exists(tmp_path / "s_iter_4.caffemodel")


# --- the stand-in itself: it must refuse what CuPy refuses ------------------------------------------

@pytest.fixture
def standin(gpu):
    if gpu != "standin":
        pytest.skip("real CuPy is running the GPU tests")
    return cupy_standin


def test_standin_refuses_what_cupy_refuses(standin):
    import cupy
    a = cupy.arange(6, dtype=np.float32).reshape(2, 3)
    assert cupy is standin and not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    for bad in (lambda: a + np.ones(3), lambda: np.ones(3) * a, lambda: cupy.exp(np.ones(3)),
                lambda: cupy.add([1.0], a), lambda: cupy.concatenate([a, np.ones((1, 3))])):
        with pytest.raises(TypeError, match="Unsupported type"):
            bad()
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        a[0] = np.zeros(3)
    s, e = a.sum(), a[1, 2]
    assert type(s) is cupy.ndarray and s.shape == () and float(s) == 15.0
    assert type(e) is cupy.ndarray and e.shape == () and int(e) == 5
    assert isinstance(a.get(), np.ndarray) and cupy.asnumpy(a).tolist() == a.tolist()
    for name in ("errstate", "seterr"):
        assert not hasattr(cupy, name)
    assert not hasattr(cupy.lib.stride_tricks, "sliding_window_view")
    cupy.add.at(a, cupy.asarray([0, 0]), 1.0)
    assert a.get()[0, 0] == 2.0


def test_standin_kernels_run_their_reference_or_say_there_is_none(standin):
    from minicaffe.kernels import emulation

    @emulation.reference("standin_test_scale")
    def scale(grid, block, args, shared_mem=0):
        x, y, n, s = args
        y[:n] = x[:n] * s
    try:
        code = 'extern "C" __global__ void standin_test_scale(const float* x, float* y, int n, float s) {}'
        k = standin.RawKernel(code, "standin_test_scale")
        x = standin.arange(5, dtype=np.float32)
        y = standin.zeros(5, dtype=np.float32)
        k((1,), (32,), (x, y, np.int32(5), np.float32(2)))
        assert y.get().tolist() == [0, 2, 4, 6, 8]
        with pytest.raises(TypeError, match="64-bit"):
            k((1,), (32,), (x, y, 5, np.float32(2)))
        with pytest.raises(TypeError, match="host memory"):
            k((1,), (32,), (x.get(), y, np.int32(5), np.float32(2)))
    finally:
        del emulation.REFERENCES["standin_test_scale"]
    with pytest.raises(NotImplementedError, match="'no_such_kernel' has no NumPy reference"):
        standin.ElementwiseKernel("T x", "T y", "y = x", "no_such_kernel")(standin.zeros(2))


def test_ci_fails_when_every_gpu_test_skips(tmp_path):
    env = dict(os.environ, CI="true", MINICAFFE_NO_STANDIN="1")
    env.pop("MINICAFFE_GPU_SKIP_OK", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           os.path.join(HERE, "test_gpu_mode.py") + "::test_dropout_train_on_gpu_keeps_the_mask_for_backward"]
    if backend.gpu_available():
        pytest.skip("a real GPU runs the GPU tests here")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "GPU-mode tests were skipped" in run.stdout, run.stdout[-2000:]
    env["MINICAFFE_GPU_SKIP_OK"] = "no GPU on this runner"
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and "accepted" in run.stdout, run.stdout[-2000:]
