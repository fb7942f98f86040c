"""``minicaffe train|test|time|device_query``: Caffe's flags, log lines and one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.proto import caffe_pb2
from minicaffe.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """
name: "clinet"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
"""

SOLVER = """
net: "net.prototxt"
test_iter: 2
test_interval: 4
base_lr: 0.1
lr_policy: "fixed"
momentum: 0.9
display: 2
max_iter: 4
snapshot: 4
snapshot_prefix: "snaps/cli"
random_seed: 1
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    (tmp_path / "snaps").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_writes_caffe_log_lines_and_snapshots(work, logs):
    assert cli.main(["train", "--solver=solver.prototxt"]) == 0
    text = "\n".join(logs)
    for line in ["Use CPU.", "Starting Optimization", "Solving clinet", "Iteration 0, Testing net (#0)",
                 "Iteration 0, lr = 0.1", "    Train net output #0: loss = ", "Iteration 4, loss = ",
                 "Snapshotting to binary proto file snaps/cli_iter_4.caffemodel",
                 "Snapshotting solver state to binary proto file snaps/cli_iter_4.solverstate",
                 "Iteration 4, Testing net (#0)", "    Test net output #0: accuracy = ", "Optimization Done."]:
        assert line in text, line
    assert os.path.exists("snaps/cli_iter_4.caffemodel")


def test_train_resume_and_finetune(work, logs):
    assert cli.main(["train", "-solver", "solver.prototxt", "--iterations", "2"]) == 0
    assert os.path.exists("snaps/cli_iter_2.solverstate")
    assert cli.main(["train", "--solver", "solver.prototxt", "--snapshot", "snaps/cli_iter_2.solverstate"]) == 0
    assert "Resuming from snaps/cli_iter_2.solverstate" in logs
    state = caffe_pb2.SolverState.FromString(open("snaps/cli_iter_4.solverstate", "rb").read())
    assert state.iter == 4
    logs.clear()
    assert cli.main(["train", "--solver=solver.prototxt", "--weights=snaps/cli_iter_2.caffemodel"]) == 0
    assert "Finetuning from snaps/cli_iter_2.caffemodel" in logs


def test_train_level_and_stage_reach_the_train_net(work, logs):
    (work / "net.prototxt").write_text(NET.replace(
        'top: "accuracy" include { phase: TEST }', 'top: "accuracy" include { stage: "extra" }'))
    assert cli.main(["train", "--solver=solver.prototxt", "--stage=extra,more", "--level=2",
                     "--iterations=2"]) == 0
    assert any("    Train net output #0: accuracy = " in m for m in logs)


def test_test_prints_batches_and_means(work, logs):
    assert cli.main(["train", "--solver=solver.prototxt"]) == 0
    logs.clear()
    assert cli.main(["test", "--model=net.prototxt", "--weights=snaps/cli_iter_4.caffemodel",
                     "--iterations=3"]) == 0
    batch_lines = [m for m in logs if m.startswith("Batch ")]
    assert len(batch_lines) == 6 and batch_lines[0].startswith("Batch 0, accuracy = ")
    acc = [float(m.split(" = ")[1]) for m in batch_lines if "accuracy" in m]
    losses = [float(m.split(" = ")[1]) for m in batch_lines if ", loss = " in m]
    mean_acc = [m for m in logs if m.startswith("accuracy = ")]
    mean_loss = [m for m in logs if m.startswith("loss = ")]
    assert float(mean_acc[0].split(" = ")[1]) == pytest.approx(np.mean(acc), rel=1e-5)
    assert float(mean_loss[0].split(" = ")[1].split()[0]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert mean_loss[0].endswith(" loss)") and "(* 1 = " in mean_loss[0]
    assert any(m.startswith("Loss: ") for m in logs)


def test_time_prints_per_layer_lines_and_a_table(work, logs, capsys):
    assert cli.main(["time", "--model", "net.prototxt", "--iterations", "2"]) == 0
    text = "\n".join(logs)
    for name in ("data", "ip", "loss"):
        assert f"{name:>10}\tforward: " in text and f"{name:>10}\tbackward: " in text
    for line in ("Average Forward pass: ", "Average Backward pass: ", "Average Forward-Backward: ",
                 "Total Time: ", "*** Benchmark ends ***", "Iteration: 2 forward-backward time: "):
        assert line in text
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["layer", "type"]
    assert [row.split()[0] for row in table[1:4]] == ["data", "ip", "loss"]
    assert table[2].split()[1] == "InnerProduct"


def test_time_phase_test_builds_the_test_net(work, logs, capsys):
    assert cli.main(["time", "--model=net.prototxt", "--iterations=1", "--phase=TEST"]) == 0
    assert "       acc\tforward: " in "\n".join(logs)


DEPLOY = """
name: "deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def test_time_runs_every_layers_backward_on_a_deploy_net(work, logs, capsys, monkeypatch):
    """Caffe's ``time`` calls Backward on every layer even when no loss makes it "needed", so a deploy
    net's backward figures are real work, not ~0 ms; bottoms are propagated only where the net would."""
    from minicaffe.layers.conv import Convolution
    from minicaffe.layers.inner_product import InnerProduct
    calls = []
    for cls in (Convolution, InnerProduct):
        def counted(self, top, propagate_down, bottom, _orig=cls.backward):
            calls.append((self.name, list(propagate_down)))
            return _orig(self, top, propagate_down, bottom)
        monkeypatch.setattr(cls, "backward", counted)
    (work / "deploy.prototxt").write_text(DEPLOY)
    assert cli.main(["time", "--model=deploy.prototxt", "--iterations=3"]) == 0
    # the untimed warm-up runs the pass the loop times, so it and the 3 timed passes reach every layer
    assert calls.count(("conv", [False])) == 4 and calls.count(("ip", [False])) == 4
    assert len(calls) == 8


@pytest.mark.skipif(backend.gpu_available(), reason="a CUDA device is present")
def test_device_query_without_gpu_fails_cleanly(capsys):
    assert cli.main(["device_query"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: device_query: no CUDA device is visible (CuPy is not installed or there is no GPU)"]


@pytest.mark.skipif(backend.gpu_available(), reason="a CUDA device is present")
def test_gpu_flag_without_device_is_one_line(work, capsys):
    assert cli.main(["train", "--solver=solver.prototxt", "--gpu=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu 0: no CUDA device is visible")


@pytest.mark.skipif(backend.gpu_available(), reason="a CUDA device is present")
def test_solver_mode_gpu_in_file_falls_back_to_cpu(work, logs):
    (work / "solver.prototxt").write_text(SOLVER + "solver_mode: GPU\n")
    assert cli.main(["train", "--solver=solver.prototxt", "--iterations=1"]) == 0
    assert any("solver_mode: GPU" in m and "using the CPU" in m for m in logs)


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 1
    assert "commands:" in capsys.readouterr().err


def test_device_query_with_gpu(gpu, logs):
    assert cli.main(["device_query", "--gpu", "0"]) == 0
    assert any(m.startswith("Name:") for m in logs)


@pytest.mark.parametrize("argv,message", [
    (["train"], "train: need a solver definition (--solver)"),
    (["train", "--solver=solver.prototxt", "--snapshot=a", "--weights=b"], "not both"),
    (["train", "--solver=solver.prototxt", "--sigint_effect=halt"], "invalid signal effect 'halt'"),
    (["train", "--solver=missing.prototxt"], "missing.prototxt: no such file"),
    (["test", "--model=net.prototxt"], "need model weights"),
    (["time", "--model=net.prototxt", "--phase=VAL"], '--phase must be "TRAIN" or "TEST"'),
    (["brew"], "unknown command 'brew'"),
    (["train", "--solver=solver.prototxt", "--snapshot=snaps/none.solverstate"], "no such solver state"),
])
def test_errors_are_one_line(work, capsys, argv, message):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_solver_pointing_at_a_missing_net(work, capsys):
    (work / "solver.prototxt").write_text(SOLVER.replace("net.prototxt", "other.prototxt"))
    assert cli.main(["train", "--solver=solver.prototxt"]) == 1
    err = capsys.readouterr().err
    assert "net 'other.prototxt' not found" in err


def test_module_runs_end_to_end(work):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "train", "-solver=solver.prototxt"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "] Iteration 2 (" in proc.stderr and "Optimization Done." in proc.stderr
    assert os.path.exists("snaps/cli_iter_4.solverstate")
    bad = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "train"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: train: need a solver definition (--solver)"


def test_error_line_is_last_and_whole_while_a_prefetch_thread_logs(tmp_path):
    """Issue 11 item 19: the Data layer's prefetch thread logs 'Restarting data prefetching' for every
    pass over a one-record database (batch 2000: 2000 lines a batch) while the main thread fails on
    the next layer. With stderr a pipe, the error line must be a line of its own and the last one:
    no log line inside it, none after it."""
    import lmdb
    from minicaffe.data import array_to_datum
    env = lmdb.open(str(tmp_path / "one"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"0", array_to_datum(np.zeros((1, 4, 4), np.uint8), 0).SerializeToString())
    env.close()
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Data" top: "data" top: "label"\n'
        '  data_param { source: "one" batch_size: 2000 backend: LMDB } }\n'
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
        '  convolution_param { num_output: 1 kernel_size: 9 } }\n')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(2):          # before the fix, log lines followed the error line in every run tried
        proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "time", "--model", "net.prototxt"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1
        assert "Restarting data prefetching from start." in proc.stderr       # the thread did log
        assert lines[-1].startswith("error: ") and "kernel 9x9 larger than" in lines[-1], lines[-3:]
        assert [line for line in lines if "error:" in line] == [lines[-1]]


# --- issue 11: nothing lost ------------------------------------------------------------------------

def test_missing_snapshot_folder_is_refused_at_start_even_with_snapshot_0(work, capsys, logs):
    """Caffe's snapshot_after_train (default true) writes a final snapshot whatever 'snapshot' says: a
    missing folder used to be found only after training to max_iter."""
    (work / "solver.prototxt").write_text(SOLVER.replace("snapshot: 4", "snapshot: 0")
                                          .replace('"snaps/cli"', '"gone/cli"'))
    assert cli.main(["train", "--solver=solver.prototxt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: solver.prototxt: cannot write to snapshot prefix 'gone/cli'; make sure that the "
                   "directory 'gone' exists and is writable (the final and NaN-stop snapshots go there even "
                   "with snapshot: 0)"]
    assert not any(m.startswith("Iteration") for m in logs)


def test_test_iter_0_tests_no_batches_as_caffe(work, capsys, logs):
    """Caffe runs a test net with test_iter 0 on no batches and prints no output lines; this was a
    KeyError traceback."""
    (work / "solver.prototxt").write_text(SOLVER.replace("test_iter: 2", "test_iter: 0"))
    assert cli.main(["train", "--solver=solver.prototxt"]) == 0
    assert "Iteration 4, Testing net (#0)" in logs and not any("Test net output" in m for m in logs)
    assert any("test_iter is 0 for test net #0" in m for m in logs)
    assert "Traceback" not in capsys.readouterr().err


HOLD_LOCK = """
import sys
from minicaffe.solvers.solver import SnapshotLock
SnapshotLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()      # hold it until the test kills us
"""


def test_second_run_with_the_same_prefix_is_refused(work, capsys, logs):
    """Two trainers with one snapshot_prefix used to overwrite each other's snapshots silently."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, "snaps/cli"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["train", "--solver=solver.prototxt"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: solver.prototxt: snapshot_prefix 'snaps/cli' is in "
                                                   f"use by another training run (pid {holder.pid} on host ")
        assert "lock file snaps/cli.lock" in err[0]
        assert not any(m.startswith("Solving") for m in logs)        # refused before anything ran
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdin.close()
        holder.stdout.close()
    # the holder was killed and left its lock file: a stale file (no flock held) does not block,
    # and the run that took it over removes it when done
    assert os.path.exists("snaps/cli.lock")
    assert cli.main(["train", "--solver=solver.prototxt"]) == 0
    assert not os.path.exists("snaps/cli.lock")


def test_lock_is_released_when_the_run_fails(work, capsys):
    (work / "solver.prototxt").write_text(SOLVER.replace("net.prototxt", "other.prototxt"))
    assert cli.main(["train", "--solver=solver.prototxt"]) == 1
    assert "net 'other.prototxt' not found" in capsys.readouterr().err
    assert os.listdir("snaps") == []
