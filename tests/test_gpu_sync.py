"""What the host reads from the GPU while training, and when (docs/gpu.md, "What the host reads").

A read from the device (``.get()``, ``float(x)`` of a device array...) waits until the GPU has run
everything queued before it, so the host cannot queue the next iteration's kernels meanwhile. The
solver therefore keeps each iteration's loss and gradient sums on the device and reads them at check
points: a display, the update before a snapshot, a test pass or the end of ``step()``. These tests
count the reads on the CuPy stand-in (tests/cupy_standin.py, ``transfers()``), and check that the
NaN stop still fires, on the GPU and on the CPU.
"""
import glob
import os

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.errors import NumericalError

import cupy_standin

NET = """
name: "small"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 1 dim: 8 dim: 8 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

BLOWUP = """
name: "blowup"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "constant" value: 10 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


def solver_text(net, **fields):
    lines = [f"{k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + f"\nnet_param {{ {net} }}\n"


def make(tmp_path, net=NET, **fields):
    fields = {"base_lr": 0.05, "lr_policy": '"fixed"', "momentum": 0.9, "random_seed": 3,
              "snapshot_prefix": f'"{tmp_path}/s"', **fields}
    return caffe.get_solver(solver_text(net, **fields))


@pytest.fixture
def standin(gpu):
    if gpu != "standin":
        pytest.skip("counts transfers on the CuPy stand-in")
    cupy_standin.reset_counters()
    return cupy_standin


def reads():
    return cupy_standin.transfers()["to_host"]


def test_training_reads_nothing_between_check_points(standin, tmp_path):
    """display: 0, no tests, no snapshots: one read at the end of step(), however many iterations."""
    solver = make(tmp_path, display=0)
    solver.step(2)                               # set-up and first uploads out of the way
    counts = []
    for n in (3, 12):
        standin.reset_counters()
        solver.step(n)
        counts.append(reads())
    assert counts == [1, 1], standin.transfers()["sites"]


def test_display_reads_the_losses_once_per_display(standin, tmp_path, logs):
    """display: 4 over 12 iterations: at each display one read of the recorded losses and one of each
    output blob (Caffe's "Train net output" lines), and the read before the last update."""
    solver = make(tmp_path, display=4)
    standin.reset_counters()
    solver.step(12)
    displays = len([line for line in logs if ", loss = " in line])
    assert displays == 3
    assert reads() == displays * (1 + len(solver.net.outputs)) + 1, standin.transfers()["sites"]


def test_losses_read_late_give_the_smoothed_loss_read_every_iteration(gpu, tmp_path):
    """The smoothed loss from values read at check points is the one the host computes reading them
    every iteration (display: 1), bit for bit: the same float arithmetic in the same order."""
    smoothed = []
    for display in (1, 0):
        solver = make(tmp_path, display=display, average_loss=3)
        solver.step(7)
        smoothed.append(solver.smoothed_loss)
    assert smoothed[0] == smoothed[1] and np.isfinite(smoothed[0])


def test_losses_match_the_cpu(gpu, tmp_path):
    smoothed = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        with backend.float64_blobs():
            solver = make(tmp_path, display=0, average_loss=4)
            solver.step(6)
        smoothed.append(solver.smoothed_loss)
    assert smoothed[1] == pytest.approx(smoothed[0], rel=1e-9)


def test_net_forward_reads_only_the_outputs(standin, tmp_path):
    """pycaffe's Net.forward returns the output blobs' arrays (one read each) and does not read the
    loss separately; forward_from_to returns the loss as a float (one read), or with device_loss as
    a 0-d device array holding the same value (no read)."""
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    net = caffe.Net(str(path), caffe.TRAIN)
    net.forward()
    standin.reset_counters()
    out = net.forward()
    assert reads() == len(net.outputs) == 1 and isinstance(out["loss"], np.ndarray)
    standin.reset_counters()
    on_device = net.forward_from_to(device_loss=True)
    assert reads() == 0 and isinstance(on_device, standin.ndarray) and on_device.shape == ()
    assert float(on_device) == float(net.blobs["loss"].data.sum())
    standin.reset_counters()
    value = net.forward_from_to()
    assert reads() == 1 and isinstance(value, float) and value == float(net.blobs["loss"].data.sum())


# --- the NaN stop -------------------------------------------------------------------------------------

def snapshots(tmp_path):
    return sorted(os.path.basename(f) for f in glob.glob(f"{tmp_path}/s_iter_*"))


@pytest.mark.parametrize("mode,display", [("cpu", 0), ("gpu", 1), ("gpu", 0)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_training(gpu, tmp_path, mode, display):
    """base_lr 1e12: the loss overflows at iteration 2. The CPU stops there (it checks every
    iteration), and so does the GPU when iteration 2 is a check point (display: 1): the error names
    the layer and a snapshot of iteration 2's start is written. Without a check point until the end
    of the step (display: 0), the GPU finds it at the read before the last update: the updates in
    between were applied, so the error says where the non-finite values are now and writes nothing."""
    if mode == "cpu":
        backend.set_mode_cpu()
    solver = make(tmp_path, BLOWUP, base_lr="1e12", momentum=0, display=display)
    with pytest.raises(NumericalError) as info:
        solver.step(20)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("iteration 2: the loss is inf")
    if mode == "cpu" or display:
        assert solver.iter == 2 and "layer 'loss' (EuclideanLoss) top 'loss'" in msg
        assert snapshots(tmp_path) == ["s_iter_2.caffemodel", "s_iter_2.solverstate", "s_iter_2.solverstate.rng"]
    else:
        assert solver.iter == 19 and "(read at iteration 19:" in msg
        assert "the weights of layer 'ip' are now not finite" in msg and "no snapshot was written" in msg
        assert snapshots(tmp_path) == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_found_before_a_snapshot_writes_no_snapshot(gpu, tmp_path):
    """snapshot: 5 on the GPU: the values are read before the update that leads to the snapshot; a
    non-finite one from an earlier iteration stops training there, with no snapshot at all."""
    solver = make(tmp_path, BLOWUP, base_lr="1e12", momentum=0, display=0, snapshot=5)
    with pytest.raises(NumericalError, match=r"^iteration 2: the loss is inf \(read at iteration 4:"):
        solver.step(20)
    assert snapshots(tmp_path) == []


POISON = '''
import numpy as np
import minicaffe as caffe


class Poison(caffe.Layer):
    """Passes its bottom through; writes an infinity into its bottom's gradient at backward call K."""

    def setup(self, bottom, top):
        self.at, self.calls = int(self.param_str), 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
        if self.calls == self.at:
            bottom[0].diff[0, 0] = np.inf
        self.calls += 1
'''


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_infinite_gradient_with_a_finite_loss_names_the_parameter(gpu, tmp_path, monkeypatch, mode):
    """The gradient sums are kept with the losses: read late, the first non-finite one still names the
    parameter and the iteration it came from."""
    if mode == "cpu":
        backend.set_mode_cpu()
    (tmp_path / "poison_gpu_sync.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    # conv1 -> poison -> pool1: the infinity goes straight into conv1's top gradient
    net = NET.replace('bottom: "conv1" top: "pool1"', 'bottom: "poisoned" top: "pool1"').replace(
        'layer { name: "pool1"', 'layer { name: "poison" type: "Python" bottom: "conv1" top: "poisoned" '
        'python_param { module: "poison_gpu_sync" layer: "Poison" param_str: "3" } }\nlayer { name: "pool1"')
    solver = make(tmp_path, net, display=0)
    with pytest.raises(NumericalError, match=r"^iteration 3: the loss is finite but the gradient of layer "
                                             r"'conv1' parameter 0 is not") as info:
        solver.step(6)
    if mode == "cpu":
        assert snapshots(tmp_path) == ["s_iter_3.caffemodel", "s_iter_3.solverstate", "s_iter_3.solverstate.rng"]
    else:
        assert "(read at iteration 5:" in str(info.value) and snapshots(tmp_path) == []


# --- memory: blobs and buffers reused across iterations ---------------------------------------------

def test_training_reuses_device_memory_across_iterations(standin, tmp_path):
    """After the first iterations, training asks the memory pool for nothing new: the pool's total
    stays the same (tests/cupy_standin.py models CuPy's pool, reusing freed blocks of the same size),
    the parameters, their gradients and the solver history keep their device buffers, and the explicit
    allocation calls are a fixed handful per iteration: the softmax loss's per-pass temporaries (its
    probabilities and the per-position loss and count), which the pool serves from blocks freed by
    the iteration before. Temporaries of CuPy expressions are not counted as calls; the pool's
    total covers them."""
    solver = make(tmp_path, display=0)
    solver.step(3)
    pool = standin.get_default_memory_pool()

    def buffers():
        blobs = solver.net.learnable_params + solver.history
        return [b.xdata.data.ptr for b in blobs] + [b.xdiff.data.ptr for b in solver.net.learnable_params]
    before, total = buffers(), pool.total_bytes()
    calls = []
    for n in (4, 8):
        standin.reset_counters()
        solver.step(n)
        calls.append(standin.allocations())
    assert pool.total_bytes() == total and buffers() == before
    per_iteration = calls[0]["calls"] / 4
    assert calls[1]["calls"] == 2 * calls[0]["calls"] and per_iteration <= 3, calls[0]["by_name"]


# --- the data layers' uploads: pinned memory, a copy stream, buffers kept --------------------------

def _data_tops(solver, steps, buffers=None):
    seen = []
    for _ in range(steps):
        solver.step(1)
        if buffers is not None:
            buffers.add(solver.net.blobs["data"].xdata.data.ptr)
        seen.append((solver.net.blobs["data"].host_data.copy(), solver.net.blobs["label"].host_data.copy()))
    return seen


@pytest.mark.parametrize("kind,ring_size", [("lmdb", 5), ("images", 5), ("hdf5", 2)])
def test_batches_reach_the_gpu_through_pinned_memory(standin, tmp_path, kind, ring_size):
    """Data and ImageData (uploading from their prefetch thread) and HDF5Data (in its forward) on the
    GPU: the batches the net sees are the CPU's, bit for bit, and the training follows the CPU's;
    every upload of a batch is from pinned memory on the copy stream, into device buffers reused in
    turn, and the compute stream waits for it on the device (one wait_event per batch)."""
    from test_resume_data import close, write_solver
    path = write_solver(tmp_path, kind, "sgd", snapshot=0)
    runs = []
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        standin.reset_counters()
        solver = caffe.get_solver(path)
        solver.param.test_interval = 0
        solver.step(2)
        waits, setup = standin.cuda.Stream.null.waits, standin.transfers()
        ring = set() if mode == "gpu" else None
        runs.append((_data_tops(solver, 8, ring), [b.data.copy() for b in solver.net.learnable_params]))
        moved = standin.transfers()
        close(solver)
    (cpu_batches, cpu_weights), (gpu_batches, gpu_weights) = runs
    for (d0, l0), (d1, l1) in zip(cpu_batches, gpu_batches):
        np.testing.assert_array_equal(d1, d0)
        np.testing.assert_array_equal(l1, l0)
    for a, b in zip(cpu_weights, gpu_weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # after set-up (the parameters' first upload) every upload is a batch's, pinned and on the copy
    # stream; the thread runs ahead, so how many fall in the window is not fixed, but 10 batches of
    # two tops were consumed
    assert moved["to_device"] - setup["to_device"] == moved["to_device_pinned"] - setup["to_device_pinned"]
    assert moved["to_device_pinned"] == moved["to_device_async"] >= 2 * 10, moved
    assert standin.cuda.Stream.null.waits - waits == 8
    # 8 batches in a ring: prefetch depth 4 + the one the tops hold; 2 where the forward uploads
    assert len(ring) == ring_size


def test_prefetched_resume_on_gpu_is_bit_exact(standin, tmp_path):
    """The read positions of the batches consumed (not those uploaded ahead) go to the snapshot."""
    from test_resume_data import straight_and_resumed
    expected, resumed = straight_and_resumed(tmp_path, "lmdb", "sgd")
    for a, b in zip(expected, resumed):
        np.testing.assert_array_equal(b, a)


def test_memory_data_uploads_into_kept_buffers(standin, tmp_path):
    """MemoryData on the GPU: each batch through pinned memory on the copy stream, into one of two
    device buffers kept between batches; the values are the CPU's."""
    path = tmp_path / "net.prototxt"
    path.write_text("""
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 1 height: 3 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.5 } } }
""")
    data = np.arange(6 * 9, dtype=np.float32).reshape(6, 1, 3, 3)
    labels = np.arange(6, dtype=np.float32)
    seen = {}
    for mode in ("cpu", "gpu"):
        backend.set_mode_cpu() if mode == "cpu" else backend.set_mode_gpu()
        net = caffe.Net(str(path), caffe.TRAIN)
        net.set_input_arrays(data, labels)
        net.forward_from_to()
        standin.reset_counters()
        seen[mode], ptrs = [], set()
        for _ in range(4):
            net.forward_from_to()      # (pycaffe's forward() hands out the outputs writable: re-uploaded)
            if mode == "gpu":
                ptrs.add(net.blobs["data"].xdata.data.ptr)
            seen[mode].append((net.blobs["data"].host_data.copy(), net.blobs["label"].host_data.copy()))
        moved = standin.transfers()
    for (d0, l0), (d1, l1) in zip(seen["cpu"], seen["gpu"]):
        np.testing.assert_array_equal(d1, d0)
        np.testing.assert_array_equal(l1, l0)
    assert len(ptrs) == 2
    assert moved["to_device"] == moved["to_device_pinned"] == moved["to_device_async"] == 8, moved


def test_standin_counts_what_crosses_and_reuses_freed_blocks(standin):
    """The counters the tests above read: each explicit read and each upload once, pinned and
    stream-ordered uploads told apart; the pool model hands a freed block to the next request."""
    cp = standin
    x = cp.asarray(np.arange(4, dtype=np.float32))
    float(x.sum()), x.get(), cp.asnumpy(x), bool(x[0]), x.item(1), x.tolist()
    assert cp.transfers()["to_host"] == 6 and cp.transfers()["to_device"] == 1
    stream = cp.cuda.Stream(non_blocking=True)
    mem = cp.cuda.alloc_pinned_memory(16)
    pinned = np.frombuffer(mem, np.float32, 4)
    pinned[...] = 7
    x.set(pinned, stream=stream)
    x.set(np.zeros(4, np.float32))
    moved = cp.transfers()
    assert (moved["to_device"], moved["to_device_pinned"], moved["to_device_async"]) == (3, 1, 1)
    cp.cuda.get_current_stream().wait_event(stream.record())
    pool = cp.get_default_memory_pool()
    y = cp.empty(1000, np.float32)
    total = pool.total_bytes()
    del y
    z = cp.zeros(1000, np.float32)
    assert pool.total_bytes() == total and cp.allocations()["by_name"] == {"empty": 1, "zeros": 1}
    assert float(z.sum()) == 0
