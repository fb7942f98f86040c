"""The training loop: nets from solver files, testing, logging, snapshots, exact resume, NaN stops,
signals. Tiny nets (InnerProduct + SoftmaxWithLoss) fed by DummyData or by a test-only array layer."""
import os
import signal

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe import fileio
from minicaffe.errors import MinicaffeError, NumericalError, ParseError, SolverError
from minicaffe.core import layer as layer_base
from minicaffe.core.layer import Layer
from minicaffe.proto import caffe_pb2
from minicaffe.solvers import solver as solver_mod


# --- a data layer over a NumPy array, with the restore_position hook ---------------------------------

DATASETS = {}


class ArrayData(Layer):
    """Serves rows of DATASETS[param_str] = (x, y) in order, batch = data_param.batch_size."""

    exact_num_bottom = 0
    exact_num_top = 2
    positions = []      # every restore_position call, for the tests

    def setup(self, bottom, top):
        self.x, self.y = DATASETS[self.param.python_param.param_str]
        self.batch = self.param.data_param.batch_size
        self.cursor = 0
        top[0].reshape((self.batch,) + self.x.shape[1:])
        top[1].reshape((self.batch,))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        idx = (self.cursor + np.arange(self.batch)) % len(self.x)
        self.cursor = (self.cursor + self.batch) % len(self.x)
        top[0].data[...] = self.x[idx]
        top[1].data[...] = self.y[idx]

    def restore_position(self, records):
        ArrayData.positions.append((self.name, self.phase, records))
        self.cursor = records % len(self.x)


ArrayData.type = "_TestArrayData"


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The test-only layer type exists for this module's tests only (other tests see a clean registry)."""
    layer_base._REGISTRY["_TestArrayData"] = ArrayData
    yield
    layer_base._REGISTRY.pop("_TestArrayData", None)


def two_class_data(n=64, d=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32) + (2.0 * y - 1)[:, None] * 1.5
    return x.astype(np.float32), y.astype(np.float32)


DATASETS["two"] = two_class_data()


def array_net(batch=8, dropout=False, name="two", test_batch=None):
    drop = 'layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.4 } }' \
        if dropout else ""
    test_batch = test_batch or batch
    return f"""
name: "arraynet"
layer {{ name: "data" type: "_TestArrayData" top: "data" top: "label" include {{ phase: TRAIN }}
        python_param {{ param_str: "{name}" }} data_param {{ batch_size: {batch} }} }}
layer {{ name: "data" type: "_TestArrayData" top: "data" top: "label" include {{ phase: TEST }}
        python_param {{ param_str: "{name}" }} data_param {{ batch_size: {test_batch} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param {{ num_output: 6 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
{drop}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


DUMMY_NET = """
name: "dummy"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 6 dim: 5 } shape { dim: 6 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.2 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def solver_text(net, **fields):
    body = []
    for k, v in fields.items():
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, str):
                body.append(f'{k}: "{item}"')
            else:
                body.append(f"{k}: {str(item).lower() if isinstance(item, bool) else item}")
    return "\n".join(body) + f"\nnet_param {{ {net} }}\n"


def make(net=None, **fields):
    fields.setdefault("base_lr", 0.1)
    fields.setdefault("lr_policy", "fixed")
    return caffe.get_solver(solver_text(net or array_net(), **fields))


def weights(solver):
    return {k: [b.data.copy() for b in v] for k, v in solver.net.params.items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))


# --- building -------------------------------------------------------------------------------------

def test_train_and_test_nets_from_net_param():
    s = make(test_iter=[2, 3], test_interval=5)
    assert isinstance(s, caffe.SGDSolver) and s.type == "SGD"
    assert s.net.phase == caffe.TRAIN
    assert len(s.test_nets) == 2 and all(n.phase == caffe.TEST for n in s.test_nets)
    assert "acc" in s.test_nets[0].layer_dict and "acc" not in s.net.layer_dict
    # test nets share the train net's weights (same Blob objects)
    assert s.test_nets[1].params["ip1"][0] is s.net.params["ip1"][0]
    assert s.param.test_iter == [2, 3]


def test_test_net_param_and_states():
    text = solver_text(array_net(), base_lr=0.1, lr_policy="fixed", test_iter=[1, 1], test_interval=1)
    text += f"test_net_param {{ {array_net()} }}\n"
    text += 'test_state { stage: "x" } test_state { level: 2 }\n'
    text += 'train_state { level: 3 }\n'
    s = caffe.get_solver(text)
    assert len(s.test_nets) == 2
    assert s.net.param.state.level == 3
    assert list(s.test_nets[0].param.state.stage) == ["x"]
    assert s.test_nets[1].param.state.level == 2


def test_test_iter_count_must_match():
    text = (f"base_lr: 0.1\ntest_iter: 1\ntest_interval: 1\ntrain_net_param {{ {array_net()} }}\n"
            f"test_net_param {{ {array_net()} }}\ntest_net_param {{ {array_net()} }}\n")
    with pytest.raises(SolverError, match=r"test_iter must be given for each test net \(2 test net"):
        caffe.get_solver(text)


def test_test_interval_needed_with_test_nets():
    with pytest.raises(SolverError, match="test_interval"):
        make(test_iter=[1])


def test_no_train_net_is_an_error():
    with pytest.raises(SolverError, match="net, net_param, train_net, train_net_param"):
        caffe.get_solver('base_lr: 0.1')


def test_dispatch_by_type_and_old_enum():
    assert type(make(type="Adam")) is caffe.AdamSolver
    s = caffe.get_solver("solver_type: NESTEROV\n" + solver_text(array_net(), base_lr=0.1, lr_policy="fixed"))
    assert type(s) is caffe.NesterovSolver and s.param.type == "Nesterov"
    assert type(caffe.Solver(solver_text(array_net(), type="RMSProp", base_lr=0.1))) is caffe.RMSPropSolver
    with pytest.raises(SolverError, match="not both"):
        caffe.get_solver("solver_type: ADAM\n" + solver_text(array_net(), type="Adam"))


def test_unknown_type_is_named():
    with pytest.raises(SolverError, match="unknown solver type 'Adamm'.*Adam"):
        make(type="Adamm")


def test_unknown_field_has_line_and_column(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.1\nmomentum: 0.9\nlearning_rate: 3\n')
    with pytest.raises(ParseError) as e:
        caffe.get_solver(str(path))
    assert f"{path}:3:" in str(e.value) and "learning_rate" in str(e.value)


def test_missing_solver_file():
    with pytest.raises(MinicaffeError, match="nope_solver.prototxt"):
        caffe.get_solver("nope_solver.prototxt")


# --- paths -------------------------------------------------------------------------------------------

def test_net_path_relative_to_cwd_first_then_solver_dir(tmp_path, monkeypatch, logs):
    sub = tmp_path / "models"
    sub.mkdir()
    (sub / "net.prototxt").write_text(array_net().replace("num_output: 6", "num_output: 7"))
    (sub / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    monkeypatch.chdir(tmp_path)
    s = caffe.get_solver("models/solver.prototxt")
    assert s.net.params["ip1"][0].shape == (7, 4)         # found beside the solver file
    assert any(str(sub / "net.prototxt") in m and "beside the solver file" in m for m in logs)
    # a file of that name in the working directory wins, as in Caffe
    (tmp_path / "net.prototxt").write_text(array_net().replace("num_output: 6", "num_output: 5"))
    s = caffe.get_solver("models/solver.prototxt")
    assert s.net.params["ip1"][0].shape == (5, 4)
    # snapshot_prefix defaults to the solver path without its extension (Caffe's upgrade)
    assert s.param.snapshot_prefix == os.path.join("models", "solver")


def test_missing_net_file_names_field_and_paths(tmp_path, monkeypatch):
    (tmp_path / "solver.prototxt").write_text('train_net: "gone.prototxt"\nbase_lr: 0.1\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SolverError) as e:
        caffe.get_solver("solver.prototxt")
    msg = str(e.value)
    assert "train_net 'gone.prototxt' not found" in msg and str(tmp_path / "gone.prototxt") in msg


def test_snapshot_prefix_directory_gets_solver_stem(tmp_path, monkeypatch):
    (tmp_path / "snaps").mkdir()
    (tmp_path / "lenet_solver.prototxt").write_text(solver_text(array_net(), snapshot_prefix="snaps"))
    monkeypatch.chdir(tmp_path)
    s = caffe.get_solver("lenet_solver.prototxt")
    assert s.param.snapshot_prefix == os.path.join("snaps", "lenet_solver")


def test_unwritable_snapshot_prefix(tmp_path):
    with pytest.raises(SolverError, match="cannot write to snapshot prefix"):
        make(snapshot=10, snapshot_prefix=str(tmp_path / "no" / "such" / "dir" / "x"))


# --- the loop -------------------------------------------------------------------------------------

def test_loss_falls_and_test_accuracy_rises(tmp_path, logs):
    s = make(base_lr=0.2, momentum=0.9, max_iter=60, test_iter=[8], test_interval=60, display=20,
             snapshot_prefix=str(tmp_path / "two"), random_seed=5)
    s.solve()
    losses = [float(m.split("loss = ")[1]) for m in logs if m.startswith("Iteration ") and "iter/s" in m]
    assert losses[0] > 0.3 and losses[-1] < losses[0] / 3
    assert s.test_scores[0]["accuracy"] > 0.95
    assert s.iter == 60
    assert "Optimization Done." in logs


def test_caffe_log_lines(tmp_path, logs):
    s = make(base_lr=0.1, max_iter=4, display=2, test_iter=[2], test_interval=2, test_compute_loss=True,
             snapshot=2, snapshot_prefix=str(tmp_path / "s"))
    s.solve()
    text = "\n".join(logs)
    for line in ["Solving arraynet", "Learning Rate Policy: fixed", "Iteration 0, Testing net (#0)",
                 "    Test net output #0: accuracy = ", "    Test net output #1: loss = ",  # sorted, as Caffe
                 "Iteration 0, lr = 0.1", "    Train net output #0: loss = ",
                 f"Snapshotting to binary proto file {tmp_path / 's'}_iter_2.caffemodel",
                 f"Snapshotting solver state to binary proto file {tmp_path / 's'}_iter_2.solverstate",
                 "Iteration 4, loss = ", "Iteration 4, Testing net (#0)", "Test loss: ", "Optimization Done."]:
        assert line in text, line
    assert any(m.startswith("Iteration 2 (") and "iter/s" in m and "s/2 iters), loss = " in m for m in logs)
    # the loss output line carries Caffe's loss-weight note
    assert any(m.startswith("    Test net output #1: loss = ") and "(* 1 = " in m and m.endswith(" loss)")
               for m in logs)


def test_test_outputs_are_means_over_test_iter():
    DATASETS["four"] = (np.arange(16, dtype=np.float32).reshape(4, 4), np.array([0, 1, 1, 0], np.float32))
    s = make(array_net(batch=2, name="four", test_batch=1), test_iter=[4], test_interval=100)
    # accuracy over the whole 4-record set (batch 1, 4 iterations) = mean of per-batch accuracies
    scores = s.test(0)
    net = s.test_nets[0]
    accs = []
    for _ in range(4):
        net.forward()
        accs.append(float(net.blobs["accuracy"].data))
    assert scores["accuracy"] == pytest.approx(np.mean(accs))


def test_average_loss_smooths_the_displayed_loss(logs):
    s = make(average_loss=3, display=1, base_lr=0.0)
    raw = []
    s.add_callback(lambda: None, lambda: raw.append(float(s.net.blobs["loss"].data)))
    s.step(5)
    shown = [float(m.split("loss = ")[1]) for m in logs if m.startswith("Iteration ") and "iter/s" in m]
    want = [np.mean(raw[max(0, i - 2):i + 1]) for i in range(5)]
    np.testing.assert_allclose(shown, want, rtol=1e-5)


def test_iter_size_equals_a_bigger_batch():
    backend.set_random_seed(7)
    a = make(array_net(batch=16), momentum=0.9, weight_decay=0.01, random_seed=11)
    b = make(array_net(batch=8), momentum=0.9, weight_decay=0.01, random_seed=11, iter_size=2)
    assert same(weights(a), weights(b))
    a.step(5)
    b.step(5)
    for k in weights(a):
        for x, y in zip(weights(a)[k], weights(b)[k]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights():
    a = make(DUMMY_NET, random_seed=42, momentum=0.9)
    a.step(4)
    b = make(DUMMY_NET, random_seed=42, momentum=0.9)
    b.step(4)
    c = make(DUMMY_NET, random_seed=43, momentum=0.9)
    c.step(4)
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def test_callbacks_and_python_api():
    s = make(base_lr=0.1)
    calls = []
    s.add_callback(lambda: calls.append(("start", s.iter)), lambda: calls.append(("grad", s.iter)))
    s.step(2)
    assert calls == [("start", 0), ("grad", 0), ("start", 1), ("grad", 1)]
    assert s.iter == 2 and s.lr == pytest.approx(0.1)
    before = weights(s)
    s.net.clear_param_diffs()
    s.net.forward_backward()
    s.apply_update()
    assert s.iter == 3 and not same(before, weights(s))


# --- snapshots ------------------------------------------------------------------------------------

def test_snapshot_files_have_caffe_names_and_parse(tmp_path):
    prefix = str(tmp_path / "net")
    s = make(momentum=0.9, snapshot_prefix=prefix, type="Adam")
    s.step(3)
    model, state_path = s.snapshot()
    assert model == prefix + "_iter_3.caffemodel" and state_path == prefix + "_iter_3.solverstate"
    net_param = caffe_pb2.NetParameter.FromString(open(model, "rb").read())
    assert [l.name for l in net_param.layer if l.blobs] == ["ip1", "ip2"]
    state = caffe_pb2.SolverState.FromString(open(state_path, "rb").read())
    assert state.iter == 3 and state.learned_net == model and state.current_step == 0
    n = len(s.net.learnable_params)
    assert len(state.history) == 2 * n             # Adam: m for every param, then v for every param
    np.testing.assert_array_equal(np.asarray(state.history[n].data).reshape(tuple(state.history[n].shape.dim)),
                                  s.history[n].data)
    s.close()                                      # gives back the snapshot prefix's lock file
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in
                                                  [model, state_path, state_path + ".rng"])


def test_solverstate_bytes_equal_protobufs():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    st = caffe_pb2.SolverState(iter=5, learned_net="x.caffemodel", current_step=2)
    for arr in (a, a[:1]):
        bp = st.history.add()
        bp.shape.dim.extend(arr.shape)
        bp.data.extend(arr.ravel().tolist())
    assert solver_mod.solverstate_bytes(5, "x.caffemodel", 2, [a, a[:1]]) == st.SerializeToString()


def test_failed_snapshot_leaves_previous_files_untouched(tmp_path, monkeypatch):
    prefix = str(tmp_path / "net")
    s = make(momentum=0.9, snapshot_prefix=prefix)
    s.step(1)
    s.snapshot()
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    s.step(1)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(MinicaffeError, match="No space left on device"):
        s.snapshot()
    monkeypatch.undo()
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before            # nothing new, nothing changed, no temp files left


def test_snapshot_and_after_train_schedule(tmp_path):
    prefix = str(tmp_path / "p")
    make(max_iter=5, snapshot=2, snapshot_prefix=prefix).solve()
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".caffemodel"))
    assert names == ["p_iter_2.caffemodel", "p_iter_4.caffemodel", "p_iter_5.caffemodel"]
    for f in os.listdir(tmp_path):
        os.unlink(tmp_path / f)
    make(max_iter=4, snapshot=2, snapshot_prefix=prefix, snapshot_after_train=False).solve()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".caffemodel")) == \
        ["p_iter_2.caffemodel", "p_iter_4.caffemodel"]


# --- exact resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_resume_is_bit_exact_with_dropout_and_random_data(tmp_path, kind):
    prefix = str(tmp_path / "d")
    fields = dict(type=kind, base_lr=0.05, momentum=0.9, weight_decay=0.001, random_seed=3,
                  max_iter=9, snapshot=5, snapshot_prefix=prefix, lr_policy="multistep",
                  stepvalue=[2, 7], gamma=0.5)
    full = make(DUMMY_NET, **fields)
    full.solve()
    backend.set_random_seed(12345)          # whatever happened in between
    resumed = make(DUMMY_NET, **fields)
    resumed.solve(prefix + "_iter_5.solverstate")
    assert resumed.iter == 9
    assert resumed.current_step == full.current_step == 2
    assert same(weights(full), weights(resumed))
    for x, y in zip(full.history, resumed.history):
        assert np.array_equal(x.data, y.data)


def test_resume_tells_data_layers_their_position(tmp_path):
    prefix = str(tmp_path / "a")
    fields = dict(base_lr=0.1, momentum=0.9, max_iter=7, snapshot=3, snapshot_prefix=prefix, random_seed=1,
                  iter_size=2, test_iter=[2], test_interval=2)
    full = make(array_net(batch=5, dropout=True, test_batch=3), **fields)
    full.solve()
    ArrayData.positions.clear()
    resumed = make(array_net(batch=5, dropout=True, test_batch=3), **fields)
    resumed.solve(prefix + "_iter_3.solverstate")
    # train: 3 iterations × iter_size 2 × batch 5; test: tests at 0 and 2 × test_iter 2 × batch 3
    assert ("data", caffe.TRAIN, 30) in ArrayData.positions
    assert ("data", caffe.TEST, 12) in ArrayData.positions
    assert same(weights(full), weights(resumed))


def test_restore_finds_learned_net_beside_the_state(tmp_path):
    first = tmp_path / "one"
    first.mkdir()
    s = make(snapshot_prefix=str(first / "m"), momentum=0.9)
    s.step(2)
    s.snapshot()
    moved = tmp_path / "moved"
    os.rename(first, moved)
    t = make(momentum=0.9)
    t.restore(str(moved / "m_iter_2.solverstate"))
    assert t.iter == 2 and same(weights(s), weights(t))


def test_restore_errors(tmp_path):
    s = make(snapshot_prefix=str(tmp_path / "m"))
    s.step(1)
    _, state = s.snapshot()
    with pytest.raises(SolverError, match="written by the SGD solver .*but this is the Adam solver"):
        make(type="Adam").restore(state)
    os.rename(state + ".rng", state + ".rng.away")      # Caffe's states: no sidecar, so no type
    with pytest.raises(SolverError, match="holds 4 history blobs.*Adam solver keeps 8.*1 per parameter is "
                                          "what SGD or Nesterov or AdaGrad or RMSProp keeps"):
        make(type="Adam").restore(state)
    os.rename(state + ".rng.away", state + ".rng")
    with pytest.raises(SolverError, match="no such solver state"):
        s.restore(str(tmp_path / "none.solverstate"))
    (tmp_path / "junk.solverstate").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ParseError, match="junk.solverstate"):
        s.restore(str(tmp_path / "junk.solverstate"))


def test_restore_without_rng_sidecar_warns(tmp_path, logs):
    s = make(snapshot_prefix=str(tmp_path / "m"))
    s.step(1)
    _, state = s.snapshot()
    os.unlink(state + ".rng")
    t = make()
    t.restore(state)
    assert t.iter == 1 and any("no RNG state" in m for m in logs)


def test_hdf5_snapshot_and_restore(tmp_path):
    pytest.importorskip("h5py")
    prefix = str(tmp_path / "h")
    fields = dict(momentum=0.9, snapshot_prefix=prefix, random_seed=2, base_lr=0.1, lr_policy="fixed")
    text = "snapshot_format: HDF5\n" + solver_text(DUMMY_NET, **fields)
    s = caffe.get_solver(text)
    s.step(3)
    model, state = s.snapshot()
    assert model.endswith("h_iter_3.caffemodel.h5") and state.endswith("h_iter_3.solverstate.h5")
    s.step(2)
    t = caffe.get_solver(text)
    t.restore(state)
    t.step(2)
    assert t.iter == 5 and same(weights(s), weights(t))


# --- NaN / Inf ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_with_iteration_layer_and_snapshot(tmp_path):
    prefix = str(tmp_path / "nan")
    net = """
name: "blowup"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "constant" value: 10 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""
    s = caffe.get_solver(solver_text(net, base_lr=1e12, lr_policy="fixed", snapshot_prefix=prefix))
    with pytest.raises(NumericalError) as e:
        s.step(20)
    msg = str(e.value)
    it = s.iter
    # weights ~1e28 after two updates: ip stays finite, the squared error overflows float32 first
    assert it == 2
    assert "iteration 2: the loss is inf" in msg and "layer 'loss' (EuclideanLoss) top 'loss'" in msg
    model = f"{prefix}_iter_{it}.caffemodel"
    assert model in msg and os.path.exists(model) and os.path.exists(f"{prefix}_iter_{it}.solverstate")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_stop_in_a_step_loop_without_a_snapshot_folder_names_both(tmp_path):
    """A pycaffe step() loop may run without a snapshot folder (as in Caffe); a NaN stop there cannot
    write its snapshot, and the error says both things instead of hiding the NaN behind the folder."""
    net = """
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "constant" value: 10 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""
    s = caffe.get_solver(solver_text(net, base_lr=1e12, lr_policy="fixed",
                                     snapshot_prefix=str(tmp_path / "gone" / "nan")))
    with pytest.raises(NumericalError, match=r"iteration 2: the loss is inf.*no snapshot could be written "
                                             r"either: .*cannot write to snapshot prefix '.*gone/nan'"):
        s.step(20)


def test_first_non_finite_names_the_top():
    s = make()
    s.net.forward()
    assert solver_mod.first_non_finite(s.net) is None
    s.net.blobs["ip2"].data[0, 0] = np.nan
    assert solver_mod.first_non_finite(s.net) == "layer 'ip2' (InnerProduct) top 'ip2'"
    s.net.params["ip1"][1].data[0] = np.inf
    assert solver_mod.first_non_finite(s.net) == "layer 'ip1' (InnerProduct) parameter 1"


# --- signals -------------------------------------------------------------------------------------------

def test_sigint_stop_snapshots_and_stops(tmp_path, logs):
    prefix = str(tmp_path / "sig")
    s = make(max_iter=50, snapshot_prefix=prefix)

    def at_start():
        if s.iter == 3:
            os.kill(os.getpid(), signal.SIGINT)
    s.add_callback(at_start, lambda: None)
    with solver_mod.SignalHandler(sigint_effect="stop", sighup_effect="snapshot") as handler:
        s.set_action_function(handler.check)
        s.solve()
    assert s.iter == 4
    assert os.path.exists(prefix + "_iter_4.caffemodel")
    assert "Optimization stopped early." in logs and "Optimization Done." not in logs
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_sighup_snapshot_keeps_training(tmp_path):
    prefix = str(tmp_path / "hup")
    s = make(max_iter=6, snapshot_prefix=prefix, snapshot_after_train=False)
    s.add_callback(lambda: s.iter == 2 and os.kill(os.getpid(), signal.SIGHUP), lambda: None)
    with solver_mod.SignalHandler("stop", "snapshot") as handler:
        s.set_action_function(handler.check)
        s.solve()
    assert s.iter == 6
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".caffemodel")) == ["hup_iter_3.caffemodel"]


def test_bad_signal_effect():
    with pytest.raises(SolverError, match="invalid signal effect 'halt'"):
        solver_mod.SignalHandler("halt")


# --- issue 11: nothing lost ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_stop_needs_a_writable_folder_checked_at_start(tmp_path):
    """With snapshot: 0 and no final snapshot, a NaN stop still writes one: its folder is checked when
    training starts (solve), not when the NaN comes; with periodic snapshots, when the solver is built
    (Caffe's CheckSnapshotWritePermissions)."""
    missing = str(tmp_path / "gone" / "nan")
    folder = r"cannot write to snapshot prefix '.*gone/nan'; make sure that the directory '.*gone' exists"
    with pytest.raises(SolverError, match=folder):
        make(snapshot_prefix=missing, snapshot=5)
    s = make(snapshot_prefix=missing, snapshot_after_train=False, max_iter=3)
    with pytest.raises(SolverError, match=folder):
        s.solve()
    assert s.iter == 0                      # refused before the first iteration


def test_pycaffe_step_without_a_snapshot_folder_runs_as_in_caffe(tmp_path):
    """Caffe's pycaffe builds a solver with snapshot: 0 and steps it whatever the snapshot folder: a
    loop of step() that never snapshots must not need the folder (nor leave a lock file anywhere);
    a snapshot asked for then names the folder."""
    s = make(snapshot_prefix=str(tmp_path / "gone" / "x"))
    s.step(2)
    assert s.iter == 2 and not (tmp_path / "gone").exists()
    with pytest.raises(SolverError, match=r"cannot write to snapshot prefix '.*gone/x'"):
        s.snapshot()


@pytest.mark.parametrize("wrote,reads", [("Nesterov", "SGD"), ("SGD", "Nesterov"), ("AdaDelta", "Adam"),
                                         ("AdaGrad", "RMSProp")])
def test_state_of_another_solver_type_is_refused(tmp_path, wrote, reads):
    """Caffe's bug #5581: these pairs keep as many history blobs, so the state used to be taken silently."""
    momentum = {"SGD": 0.9, "Nesterov": 0.9, "Adam": 0.9, "AdaDelta": 0.9, "AdaGrad": 0, "RMSProp": 0}
    s = make(type=wrote, snapshot_prefix=str(tmp_path / "m"), momentum=momentum[wrote])
    s.step(1)
    _, state = s.snapshot()
    other = make(type=reads, momentum=momentum[reads])
    with pytest.raises(SolverError, match=f"written by the {wrote} solver \\(so says .*m_iter_1.solverstate.rng"
                                          f"\\), but this is the {reads} solver"):
        other.restore(state)


def test_state_without_type_warns_where_the_count_is_ambiguous(tmp_path, logs):
    s = make(type="Nesterov", snapshot_prefix=str(tmp_path / "m"), momentum=0.9)
    s.step(1)
    _, state = s.snapshot()
    os.unlink(state + ".rng")          # as Caffe's own solver states: no record of the type
    t = make(momentum=0.9)
    t.restore(state)
    assert any("does not record its solver type" in m and "fit SGD, Nesterov, AdaGrad, RMSProp alike" in m
               for m in logs)


def test_refused_restore_changes_nothing(tmp_path):
    """A refused restore used to have replaced the net's weights already (the history count was checked
    after loading the learned net)."""
    s = make(snapshot_prefix=str(tmp_path / "m"), momentum=0.9)
    s.step(3)
    _, state = s.snapshot()
    os.unlink(state + ".rng")
    t = make(type="Adam", random_seed=7)
    t.step(1)
    before = weights(t)
    with pytest.raises(SolverError, match="holds 4 history blobs"):
        t.restore(state)
    assert t.iter == 1 and same(weights(t), before)


def test_restore_puts_weights_back_when_the_learned_net_fails_half_way(tmp_path):
    """History that fits, but a learned net whose first layer fits and second does not."""
    s = make(snapshot_prefix=str(tmp_path / "m"), momentum=0.9)
    s.step(1)
    _, state = s.snapshot()
    other = make(array_net().replace("num_output: 2", "num_output: 5"), snapshot_prefix=str(tmp_path / "o"))
    other_model, _ = other.snapshot()
    raw = solver_mod.solverstate_bytes(1, other_model, 0, [h.data for h in s.history])
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(raw)
    t = make(momentum=0.9, random_seed=9)
    before = weights(t)
    with pytest.raises(MinicaffeError, match="o_iter_0.caffemodel"):
        t.restore(str(bad))
    assert t.iter == 0 and same(weights(t), before)


def test_sidecar_of_another_iteration_or_nested_too_deeply_is_one_line(tmp_path):
    s = make(snapshot_prefix=str(tmp_path / "m"))
    s.step(2)
    _, state2 = s.snapshot()
    s.step(1)
    _, state3 = s.snapshot()
    os.replace(state3 + ".rng", state2 + ".rng")       # the sidecar of iteration 3 beside iteration 2
    t = make(random_seed=4)
    before = weights(t)
    with pytest.raises(SolverError, match=r"m_iter_2\.solverstate\.rng: RNG state of iteration 3, but .*"
                                          r"m_iter_2\.solverstate is at iteration 2"):
        t.restore(state2)
    with open(state2 + ".rng", "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.raises(SolverError, match=r"m_iter_2\.solverstate\.rng: unreadable RNG state: nested too deeply"):
        t.restore(state2)
    assert t.iter == 0 and same(weights(t), before)


def test_lock_file_is_removed_after_the_working_directory_changed(tmp_path, monkeypatch):
    """A solver without snapshot_prefix locks ./minicaffe.lock; released after a chdir, the file was
    looked up by its relative name in the new directory and left behind in the old one."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    s = make(max_iter=3)
    s.step(1)
    assert (first / "minicaffe.lock").exists()
    monkeypatch.chdir(second)
    s.close()
    assert not (first / "minicaffe.lock").exists() and not os.listdir(second)


def test_prefix_lock_is_shared_in_process_released_and_spares_foreign_files(tmp_path):
    prefix = str(tmp_path / "p")
    s = make(snapshot_prefix=prefix, max_iter=3)
    with solver_mod.SnapshotLock(prefix):
        with open(prefix + ".lock") as f:
            assert f.read().startswith(f"minicaffe training run: pid {os.getpid()} on host ")
        s.step(1)                     # the same process: shared, not refused
    assert os.path.exists(prefix + ".lock")       # step() holds it for the solver's life...
    s.close()
    assert not os.path.exists(prefix + ".lock")   # ...or until close()

    def fail():
        raise RuntimeError("boom")
    s.add_callback(fail, lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        s.solve()                     # solve() gives its lock back however it ends
    assert not os.path.exists(prefix + ".lock")
    with open(prefix + ".lock", "w") as f:
        f.write("somebody else's file\n")
    with pytest.raises(SolverError, match=r"p\.lock exists and is not a minicaffe lock file"):
        make(snapshot_prefix=prefix).step(1)
    with open(prefix + ".lock") as f:
        assert f.read() == "somebody else's file\n"
