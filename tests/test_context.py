"""The one context (minicaffe/core/context.py): switches read once, the rank, the workspaces and both
random generators in one object; GPU resume is exact even for an unseeded run (issue 12)."""
import json
import os
import re
import threading

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import data
from minicaffe.core import backend, context
from minicaffe.errors import DataError
from minicaffe.kernels import im2col

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minicaffe")


@pytest.fixture
def fresh_context():
    """A context as a new process has it (unseeded, CPU, rank 0 of 1; the same CuPy module, the
    stand-in under the ``gpu`` fixture), put back after the test."""
    ctx = context.Context.from_environment({})
    ctx.cupy = context.current().cupy
    previous = context.set_current(ctx)
    try:
        yield ctx
    finally:
        context.set_current(previous)


# --- switches: read once -------------------------------------------------------------------------

def test_switches_parse_each_variable():
    assert context.Switches.from_environ({}) == context.Switches()
    on = context.Switches.from_environ({
        "MINICAFFE_FUSION": "0", "MINICAFFE_WINOGRAD": "0", "MINICAFFE_CHECK_NAN": "1",
        "MINICAFFE_MAX_BLOB_BYTES": "4096", "MINICAFFE_DEBUG": "yes", "MINICAFFE_NO_PROGRESS": "1",
        "MINICAFFE_NO_PYTHON_LAYERS": "1", "MINICAFFE_COMM": "mpi", "MINICAFFE_BUCKET_MB": "2",
        "MINICAFFE_NCCL_UID": "ab", "MINICAFFE_NCCL_RANK": "1", "MINICAFFE_NCCL_SIZE": "2",
        "PMI_SIZE": "3"})
    assert on == context.Switches(fusion=False, winograd=False, check_nan=True, max_blob_bytes="4096",
                                  debug=True, no_progress=True, no_python_layers=True, comm="mpi",
                                  bucket_mb="2", nccl_uid="ab", nccl_rank="1", nccl_size="2",
                                  mpi_world_size=3)
    # the opt-in flags take '' and '0' as off; the opt-out ones only '0'
    off = context.Switches.from_environ({"MINICAFFE_CHECK_NAN": "0", "MINICAFFE_DEBUG": "",
                                         "MINICAFFE_FUSION": "", "MINICAFFE_WINOGRAD": "1"})
    assert (off.check_nan, off.debug, off.fusion, off.winograd) == (False, False, True, True)


def test_a_variable_set_after_start_up_counts_only_once_reloaded(tmp_path, monkeypatch):
    """The net's NaN check follows the context, not the environment of the moment."""
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 } } }')
    monkeypatch.setenv(context.CHECK_NAN_VAR, "1")
    assert not caffe.Net(str(path), caffe.TEST).check_finite
    context.reload_environment()
    assert context.switches().check_nan and caffe.Net(str(path), caffe.TEST).check_finite


def test_env_switch_fixture_sets_and_reloads(env_switch):
    env_switch(context.FUSION_VAR, "0")
    assert os.environ[context.FUSION_VAR] == "0" and not context.switches().fusion
    env_switch(context.FUSION_VAR, None)
    assert context.FUSION_VAR not in os.environ and context.switches().fusion


def test_nothing_but_the_context_reads_the_environment():
    """os.environ is read in core/context.py only (tools/ may read glog's variables for the command
    line); the file writer has no test hook left."""
    readers = []
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, PACKAGE)
        if rel.split(os.sep)[0] in ("tools", "proto"):
            continue
        for name in files:
            if not name.endswith(".py") or (rel, name) == ("core", "context.py"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read()
            if re.search(r"os\.environ|os\.getenv|getenv\(", text):
                readers.append(os.path.join(rel, name))
    assert readers == []
    with open(os.path.join(PACKAGE, "fileio.py"), encoding="utf-8") as f:
        assert "MINICAFFE_" not in f.read()


# --- solver rank and world -----------------------------------------------------------------------

def test_rank_and_world_are_the_contexts(fresh_context):
    caffe.set_solver_count(3)
    caffe.set_solver_rank(2)
    assert (fresh_context.rank, fresh_context.world) == (2, 3)
    assert (data.solver_rank(), data.solver_count(), caffe.solver_rank(), caffe.solver_count()) == (2, 3, 2, 3)
    data.set_solver_rank(0, 1)
    assert (fresh_context.rank, fresh_context.world) == (0, 1)
    with pytest.raises(DataError, match=r"solver rank 4 is not in \[0, 2\)"):
        data.set_solver_rank(4, 2)


def test_solvers_take_the_rank_from_the_context_not_a_data_module():
    for rel in ("solvers/solver.py", "parallel/data_parallel.py", "layers/data.py", "pycaffe/_caffe.py"):
        with open(os.path.join(PACKAGE, rel), encoding="utf-8") as f:
            assert "lmdb_source import" not in f.read(), rel


# --- workspaces ----------------------------------------------------------------------------------

def test_workspace_buffers_live_in_the_context(fresh_context):
    a = im2col.workspace(np, (4, 5), np.float32, "col")
    b = im2col.workspace(np, (2, 3), np.float32, "col")
    assert np.shares_memory(a, b)                       # one growing buffer per slot
    assert a.base is not None and len(fresh_context.workspaces._local.bufs) == 1
    mine, theirs = context.Slot("col"), context.Slot("col")
    x = fresh_context.workspaces.get(np, (4, 5), np.float32, mine)
    y = fresh_context.workspaces.get(np, (4, 5), np.float32, theirs)
    assert not np.shares_memory(x, y) and not np.shares_memory(x, a)    # private slots: by owner
    other = []
    t = threading.Thread(target=lambda: other.append(im2col.workspace(np, (4, 5), np.float32, "col")))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], a)            # each thread has its own buffers
    im2col.clear_workspace()
    assert not np.shares_memory(im2col.workspace(np, (4, 5), np.float32, "col"), a)


# --- random generators ---------------------------------------------------------------------------

def test_a_fresh_context_has_a_device_seed_before_any_draw(fresh_context):
    """So a snapshot taken before the first GPU dropout mask still records the device stream."""
    state = backend.gpu_random_state()
    assert isinstance(state["seed"], int) and state["draws"] == 0
    assert context.Context().gpu_seed != state["seed"]        # drawn from entropy per context


def test_cupy_generator_is_seeded_once_not_at_every_mode_switch(gpu):
    """set_random_seed in CPU mode reaches cupy.random at the next set_mode_gpu; switching modes
    afterwards continues its stream instead of restarting it (Caffe seeds once, at the call)."""
    import cupy
    cupy.random.seed(7)
    want = cupy.random.random_sample(8).get()
    backend.set_mode_cpu()
    backend.set_random_seed(7)
    backend.set_mode_gpu()
    first = cupy.random.random_sample(4).get()
    backend.set_mode_cpu()
    backend.set_mode_gpu()
    second = cupy.random.random_sample(4).get()
    np.testing.assert_array_equal(np.concatenate([first, second]), want)
    backend.set_random_seed(7)                          # in GPU mode: at once
    np.testing.assert_array_equal(cupy.random.random_sample(4).get(), want[:4])


NET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_unseeded_gpu_run_resumes_exactly_from_a_snapshot_before_any_draw(gpu, tmp_path, fresh_context):
    """Regression: the device seed was drawn at the first dropout mask, so a snapshot at iteration 0
    of an unseeded run saved {"seed": null} and the resumed run drew other masks than the original."""
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\n'
        f'max_iter: 4\nsnapshot_prefix: "{tmp_path}/s"\n')
    backend.set_mode_gpu()
    full = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    _, state = full.snapshot()                          # iteration 0: no mask drawn yet
    side = json.loads(open(state + ".rng").read())
    assert side["gpu"]["draws"] == 0 and isinstance(side["gpu"]["seed"], int)
    full.solve()
    resumed = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    resumed.solve(state)
    assert resumed.iter == full.iter == 4
    for name in full.net.params:
        for x, y in zip(full.net.params[name], resumed.net.params[name]):
            np.testing.assert_array_equal(x.data, y.data)
