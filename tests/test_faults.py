"""Faults while training or writing: NaN/Inf in a blob, SIGKILL at random moments (also in the middle
of writing a snapshot or of an LMDB commit), a full disk and a read-only directory. What must hold:
a clear one-line message naming where, nothing partial under a final file name, earlier snapshots
untouched, and the latest complete snapshot resumes to the weights of an uninterrupted run.

The kill suites run 5 kills each in CI and 50 with ``--runslow`` (MINICAFFE_KILLS=N for any other
count; MINICAFFE_FAULT_REPORT=path appends what each suite survived)."""
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import fileio
from minicaffe.errors import MinicaffeError, NumericalError
from minicaffe.net.network import TRAIN, Net
from minicaffe.proto import caffe_pb2
from minicaffe.formats.prototxt import read_binary_file
from minicaffe.tools import cli
from minicaffe.tools.convert_imageset import _recover_interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_CLI = "import sys; from minicaffe.tools.cli import main; sys.exit(main())"

# ``minicaffe train`` whose atomic_write pauses 3 ms halfway through every file it writes, so that a
# kill at a random moment often lands mid-write. The pause is this test's own fake (the real writer
# has no hook for it): atomic_write looks atomic_open up in minicaffe.fileio at each call, so
# replacing that name reaches every caller.
SLOW_WRITE_CLI = """
import contextlib, sys, time
import minicaffe.fileio as fileio
real_open = fileio.atomic_open

class HalfwayPause:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        half = len(data) // 2
        self.f.write(data[:half])
        self.f.flush()
        time.sleep(0.003)
        return self.f.write(data[half:])
    def __getattr__(self, name):
        return getattr(self.f, name)

@contextlib.contextmanager
def slow_open(path, mode="wb"):
    with real_open(path, mode) as f:
        yield HalfwayPause(f)

fileio.atomic_open = slow_open
from minicaffe.tools.cli import main
sys.exit(main())
"""

# DummyData draws new Gaussian data every iteration from the solver's generator, so resuming the same
# run needs the weights, the momentum history and the generator's state all restored exactly
NET = """name: "faultnet"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 6 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "{net}"
base_lr: 0.05
momentum: 0.9
lr_policy: "fixed"
max_iter: {max_iter}
snapshot: {snapshot}
snapshot_prefix: "{prefix}"
random_seed: 7
"""
MAX_ITER = 30


def kill_budget(request):
    env = os.environ.get("MINICAFFE_KILLS")
    if env:
        return int(env)
    return 50 if request.config.getoption("--runslow") else 5


def report(suite, **counts):
    path = os.environ.get("MINICAFFE_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(suite=suite, **counts)) + "\n")


def child_env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MINICAFFE_DEBUG", None)
    env.pop("MINICAFFE_CHECK_NAN", None)
    env.update(extra)
    return env


def write_solver(directory, name, max_iter=MAX_ITER, snapshot=1, net=NET):
    """A net and solver file in ``directory``; snapshots go to ``directory/name/s_iter_N.*``."""
    directory = str(directory)
    net_path = os.path.join(directory, "net.prototxt")
    if not os.path.exists(net_path):
        with open(net_path, "w") as f:
            f.write(net)
    snaps = os.path.join(directory, name)
    os.makedirs(snaps, exist_ok=True)
    path = os.path.join(directory, f"{name}.solver.prototxt")
    with open(path, "w") as f:
        f.write(SOLVER.format(net=net_path, max_iter=max_iter, snapshot=snapshot,
                              prefix=os.path.join(snaps, "s")))
    return path, net_path, snaps


def net_weights(net):
    return [b.data.copy() for b in net.learnable_params]


def model_weights(net_path, model):
    net = Net(net_path, TRAIN)
    net.copy_from(model)
    return net_weights(net)


SNAPSHOT_NAME = re.compile(r"^s_iter_(\d+)\.(caffemodel|solverstate|solverstate\.rng)$")
TEMP_NAME = re.compile(r"^\.s_iter_\d+\.(caffemodel|solverstate|solverstate\.rng)\..*\.tmp$")


def check_snapshot_dir(snaps, net_path):
    """Every file under a final name is complete and loads; returns (latest complete .solverstate or
    None, number of files checked, leftover temporary files)."""
    net = Net(net_path, TRAIN)
    states, checked, temps = {}, 0, 0
    for name in sorted(os.listdir(snaps)):
        path = os.path.join(snaps, name)
        m = SNAPSHOT_NAME.match(name)
        if name == "s.lock":          # the killed run's lock file: stale (no flock held), it must not block
            continue
        if not m:
            assert TEMP_NAME.match(name), f"unexpected file {name}"
            temps += 1
            continue
        n, kind = int(m.group(1)), m.group(2)
        if kind == "caffemodel":
            net.copy_from(path)
        elif kind == "solverstate":
            state = read_binary_file(path, caffe_pb2.SolverState())
            assert state.iter == n and len(state.history) == len(net.learnable_params)
            assert os.path.exists(path + ".rng") and os.path.exists(os.path.join(snaps, f"s_iter_{n}.caffemodel"))
            states[n] = path
        else:
            with open(path, encoding="utf-8") as f:
                assert json.load(f)["iter"] == n
        checked += 1
    return (states[max(states)] if states else None), checked, temps


def wait_for(path, text, proc, timeout=60):
    """Wait until ``text`` appears in the log file ``path`` (False if the process ended first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(path, encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"'{text}' did not appear in {path}")


# --- NaN / Inf ---------------------------------------------------------------------------------------

POISON_LAYER = '''
import numpy as np
import minicaffe as caffe


class Poison(caffe.Layer):
    """Passes its bottom through; at forward call number K (param_str "K" or "K backward") writes a
    NaN into its top, or into its bottom's gradient."""

    def setup(self, bottom, top):
        parts = self.param_str.split()
        self.at, self.backward_too = int(parts[0]), parts[1:] == ["backward"]
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data
        if self.calls == self.at and not self.backward_too:
            top[0].data[0, 0] = np.nan
        self.calls += 1

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
        if self.calls - 1 == self.at and self.backward_too:
            bottom[0].diff[0, 0] = np.inf
'''


def poisoned_net(at, backward=False):
    mode = f"{at} backward" if backward else str(at)
    return NET.replace('layer { name: "ip2"', f'''layer {{ name: "poison" type: "Python" bottom: "ip1" top: "poisoned"
  python_param {{ module: "poison_layer" layer: "Poison" param_str: "{mode}" }} }}
layer {{ name: "ip2"''').replace('bottom: "ip1" top: "ip2"', 'bottom: "poisoned" top: "ip2"')


@pytest.fixture
def poison_dir(env_switch, tmp_path, monkeypatch):
    (tmp_path / "poison_layer.py").write_text(POISON_LAYER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env_switch("MINICAFFE_CHECK_NAN", None)
    return tmp_path


@pytest.mark.parametrize("check_mode", [True, False], ids=["check-mode", "at-the-loss"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_stops_training_names_layer_and_iteration(env_switch, poison_dir, check_mode):
    """A NaN appearing in layer 'poison' at iteration 6: check mode stops in that layer's forward
    pass; without it the loss is NaN and the message still names the first layer holding one. The
    snapshot written is iteration 6's starting state: it loads, equals a clean run's iteration 6,
    and resumes."""
    at = 6
    if check_mode:
        env_switch("MINICAFFE_CHECK_NAN", "1")
    solver_path, net_path, snaps = write_solver(poison_dir, "nan", net=poisoned_net(at))
    solver = caffe.get_solver(solver_path)
    with pytest.raises(NumericalError) as info:
        solver.solve()
    msg = str(info.value)
    assert msg.startswith(f"iteration {at}: ")
    if check_mode:
        assert "forward pass: layer 'poison' (Python) wrote a non-finite top 'poisoned' (1 NaN" in msg
    else:
        assert "the loss is nan" in msg and "first non-finite values in layer 'poison' (Python) top" in msg
    model, state = f"{snaps}/s_iter_{at}.caffemodel", f"{snaps}/s_iter_{at}.solverstate"
    assert model in msg and os.path.exists(model) and os.path.exists(state)
    assert solver.iter == at
    env_switch("MINICAFFE_CHECK_NAN", None)

    clean_path, clean_net, _ = write_solver(poison_dir, "clean", max_iter=at, snapshot=0, net=poisoned_net(-1))
    clean = caffe.get_solver(clean_path)
    clean.solve()
    saved = model_weights(clean_net, model)
    assert all(np.array_equal(a, b) for a, b in zip(saved, net_weights(clean.net)))
    assert all(np.isfinite(a).all() for a in saved)

    resumed = caffe.get_solver(clean_path)
    resumed.param.max_iter = at + 3
    resumed.solve(resume_file=state)
    assert resumed.iter == at + 3 and all(np.isfinite(a).all() for a in net_weights(resumed.net))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_infinite_gradient_is_caught_before_the_update(env_switch, poison_dir):
    """An infinity in a gradient with a finite loss: stopped before the update spoils the weights;
    check mode names the layer whose backward pass wrote it."""
    solver_path, _, snaps = write_solver(poison_dir, "grad", net=poisoned_net(3, backward=True))
    with pytest.raises(NumericalError, match=r"^iteration 3: the loss is finite but the gradient of "
                                             r"layer 'ip1' parameter 0 is not"):
        caffe.get_solver(solver_path).solve()
    assert os.path.exists(f"{snaps}/s_iter_3.solverstate")
    env_switch("MINICAFFE_CHECK_NAN", "1")
    solver_path, _, _ = write_solver(poison_dir, "grad_check", net=poisoned_net(3, backward=True))
    with pytest.raises(NumericalError, match=r"^iteration 3: backward pass: layer 'poison' \(Python\) wrote a "
                                             r"non-finite bottom 'ip1' diff"):
        caffe.get_solver(solver_path).solve()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_through_the_command_line_is_one_line(env_switch, poison_dir, capsys):
    env_switch("MINICAFFE_CHECK_NAN", "1")
    solver_path, _, snaps = write_solver(poison_dir, "cli", net=poisoned_net(4))
    assert cli.main(["train", "--solver", solver_path]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert re.match(r"error: iteration 4: forward pass: layer 'poison' \(Python\) .*saved to \S+s_iter_4\.caffemodel",
                    err[0])
    assert os.path.exists(f"{snaps}/s_iter_4.solverstate")


# --- SIGKILL during training --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted command-line run: its final weights and how long its training took."""
    work = tmp_path_factory.mktemp("reference")
    solver_path, net_path, snaps = write_solver(work, "ref")
    log = work / "ref.log"
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE_CLI, "train", "--solver", solver_path],
                                stderr=err, env=child_env())
        assert wait_for(log, "Starting Optimization", proc)
        began = time.monotonic()
        assert proc.wait(timeout=300) == 0, log.read_text()
    end = time.monotonic()
    final = model_weights(net_path, f"{snaps}/s_iter_{MAX_ITER}.caffemodel")
    return {"weights": final, "train_s": end - began, "total_s": end - start}


def test_sigkill_during_training_loses_nothing(request, reference_run, tmp_path):
    """Kill ``minicaffe train`` (a snapshot every iteration, each write paused halfway) at random
    moments: every snapshot file left loads, and resuming the latest gives the uninterrupted weights."""
    kills = kill_budget(request)
    rng = random.Random(20261125)
    survived = mid_write = from_scratch = 0
    for trial in range(kills):
        solver_path, net_path, snaps = write_solver(tmp_path, f"kill{trial}")
        log = tmp_path / f"kill{trial}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE_CLI, "train", "--solver", solver_path],
                                    stderr=err, env=child_env())
            try:
                if wait_for(log, "Starting Optimization", proc):
                    time.sleep(rng.uniform(0, reference_run["train_s"]))
            finally:
                proc.kill()
                proc.wait()
        latest, _, temps = check_snapshot_dir(snaps, net_path)
        mid_write += temps > 0
        solver = caffe.get_solver(solver_path)
        if latest is None:
            from_scratch += 1
        solver.solve(resume_file=latest)
        assert solver.iter == MAX_ITER
        assert not os.path.exists(os.path.join(snaps, "s.lock"))      # the resumed run took it over, removed it
        for a, b in zip(net_weights(solver.net), reference_run["weights"]):
            np.testing.assert_array_equal(a, b)
        survived += 1
    report("sigkill minicaffe train", kills=kills, survived=survived, killed_mid_write=mid_write,
           resumed_from_scratch=from_scratch)
    assert survived == kills


# --- SIGKILL during convert_imageset ------------------------------------------------------------------

CONVERT = ("import sys; import minicaffe.tools.convert_imageset as c; c.COMMIT_EVERY = 40; "
           "sys.exit(c.main())")
N_IMAGES = 2000


def lmdb_records(path):
    """Number of records, each checked to be a 3x4x4 Datum."""
    from minicaffe.formats.datum import datum_to_array, parse_datum
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        n = 0
        with env.begin() as txn:
            for key, value in txn.cursor():
                assert datum_to_array(parse_datum(value, key)).shape == (3, 4, 4)
                n += 1
        return n
    finally:
        env.close()


@pytest.fixture
def image_list(tmp_path):
    import cv2
    cv2.imwrite(str(tmp_path / "img.png"), np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    (tmp_path / "list.txt").write_text("".join(f"img.png {i % 3}\n" for i in range(N_IMAGES)))
    return tmp_path


def test_sigkill_during_convert_imageset_leaves_no_partial_db(request, image_list):
    """Kill convert_imageset at random moments (commits of 40 records): DB_NAME exists only as a
    complete database; with --overwrite an existing database stays whole until the new one replaces it."""
    work = image_list
    args_ref = [str(work / "ref_db")]
    log = work / "convert.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CONVERT, "--jobs", "1", f"{work}/", str(work / "list.txt")]
                                + args_ref, stderr=err, env=child_env(), cwd=str(work))
        assert wait_for(log, "A total of", proc)
        began = time.monotonic()
        assert proc.wait(timeout=300) == 0, log.read_text()
    work_s = time.monotonic() - began
    assert lmdb_records(str(work / "ref_db")) == N_IMAGES
    print(f"convert_imageset of {N_IMAGES} images: {work_s:.2f} s after start-up")

    kills = kill_budget(request)
    rng = random.Random(7)
    complete = absent = old_kept = leftovers = 0
    for trial in range(kills):
        db = work / f"db{trial}"
        overwrite = trial % 2 == 1
        if overwrite:               # an older, complete database of 10 records is there already
            shutil.copytree(work / "ref_db", db)
            env = lmdb.open(str(db))
            with env.begin(write=True) as txn:
                keys = [k for k, _ in txn.cursor()]
                for k in keys[10:]:
                    txn.delete(k)
            env.close()
        log = work / "convert.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", CONVERT, "--jobs", "1"]
                                    + (["--overwrite"] if overwrite else [])
                                    + [f"{work}/", str(work / "list.txt"), str(db)],
                                    stderr=err, env=child_env(), cwd=str(work))
            try:
                if wait_for(log, "A total of", proc):
                    time.sleep(rng.uniform(0, work_s * 0.8))
            finally:
                proc.kill()
                proc.wait()
        if db.exists():
            n = lmdb_records(str(db))
            assert n == N_IMAGES or (overwrite and n == 10), f"trial {trial}: {n} records"
            complete += n == N_IMAGES
            old_kept += n == 10
        else:
            absent += 1
        left = [name for name in os.listdir(work) if name.startswith((f"db{trial}.tmp-", f"db{trial}.old-"))]
        leftovers += len(left)
        # the next run for this DB_NAME cleans up; a database moved aside by --overwrite comes back
        _recover_interrupted(str(db), logging.getLogger("test"))
        assert not [name for name in os.listdir(work) if name.startswith((f"db{trial}.tmp-", f"db{trial}.old-"))]
        if db.exists():
            assert lmdb_records(str(db)) in (N_IMAGES, 10)
        else:
            assert not overwrite or not any(name.startswith(f"db{trial}.old-") for name in left)
    report("sigkill convert_imageset", kills=kills, db_complete=complete, db_absent=absent,
           old_db_kept=old_kept, leftovers_cleaned_by_next_run=leftovers)
    assert complete + absent + old_kept == kills


# --- convert_imageset never deletes what it did not make (issue 11) ----------------------------------

def tree(path):
    """A file's bytes, or every file under a directory with its bytes."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), path)] = f.read()
    return out


def one_error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_overwrite_never_deletes_what_is_not_an_lmdb(image_list, tmp_path):
    """--overwrite with DB_NAME mistyped as the project folder, the image root or the list file used
    to delete it and exit 0: each is refused in one line and left byte for byte as it was."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "solver.prototxt").write_text("base_lr: 0.1\n")
    lst = str(image_list / "list.txt")
    refused = 0
    for target in (project, image_list, image_list / "list.txt"):
        before = tree(target)
        proc = subprocess.run([sys.executable, "-c", CONVERT, "--jobs", "1", "--overwrite", f"{image_list}/",
                               lst, str(target)], capture_output=True, text=True, env=child_env(), timeout=120)
        assert proc.returncode == 1
        line = one_error_line(proc.stderr)
        assert line.startswith(f"error: {target}: is a ") and "not an LMDB or LevelDB database" in line
        assert tree(target) == before
        refused += 1
    report("convert_imageset --overwrite of a non-LMDB", refused=refused, deleted=0)


def test_cleanup_after_kills_removes_only_what_it_made(request, image_list):
    """SIGKILL convert_imageset --overwrite at random moments beside a user's backup named like a
    leftover (db.old-20240101) and an unmarked db.tmp-<dead pid>: each next run (even a refused one)
    leaves those alone; the marked working directories the killed runs left are removed by the
    next run that goes ahead, and nothing else."""
    from minicaffe.tools.convert_imageset import read_marker
    work = image_list
    db = work / "db"
    dead = subprocess.Popen(["true"])
    dead.wait()
    user = {work / "db.old-20240101": "data.mdb", work / f"db.tmp-{dead.pid}": "holiday.jpg"}
    for path, name in user.items():
        path.mkdir()
        (path / name).write_bytes(os.urandom(64))
    keep = {path: tree(path) for path in user}
    log = work / "convert.log"
    empty = work / "empty.txt"
    empty.write_text("")
    kills = max(2, kill_budget(request) // 2)
    rng = random.Random(11)
    marked = 0
    for trial in range(kills):
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", CONVERT, "--jobs", "1", "--overwrite", f"{work}/",
                                     str(work / "list.txt"), str(db)], stderr=err, env=child_env())
            try:
                if wait_for(log, "A total of", proc):
                    time.sleep(rng.uniform(0, 0.4))
            finally:
                proc.kill()
                proc.wait()
        marked += sum(read_marker(str(work / n)) is not None for n in os.listdir(work)
                      if n.startswith(("db.tmp-", "db.old-")))
        # a refused run for the same DB_NAME (an empty list) touches nothing, its own leftovers neither
        before = {n: tree(work / n) for n in os.listdir(work) if n.startswith("db.")}
        proc = subprocess.run([sys.executable, "-c", CONVERT, "--jobs", "1", "--overwrite", f"{work}/",
                               str(empty), str(db)], capture_output=True, text=True, env=child_env(), timeout=120)
        assert proc.returncode == 1 and "the list file has no images" in one_error_line(proc.stderr)
        assert {n: tree(work / n) for n in os.listdir(work) if n.startswith("db.")} == before
    proc = subprocess.run([sys.executable, "-c", CONVERT, "--jobs", "1", "--overwrite", f"{work}/",
                           str(work / "list.txt"), str(db)], capture_output=True, text=True, env=child_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lmdb_records(str(db)) == N_IMAGES
    left = sorted(n for n in os.listdir(work) if n.startswith(("db.tmp-", "db.old-")))
    assert left == sorted(path.name for path in user), {n: tree(work / n) for n in left}
    assert {path: tree(path) for path in user} == keep
    report("convert_imageset clean-up after kills", kills=kills, marked_leftovers=marked,
           user_dirs_kept=len(user))


def test_sigint_during_parallel_convert_imageset(request, tmp_path):
    """Ctrl-C (SIGINT to the process group) at random moments of convert_imageset --jobs 2, while
    the decoding processes start or while they work, used to print 'error: interrupted' and hang
    until SIGKILL: it must end within seconds, non-zero, with one error line, and leave neither
    DB_NAME nor a working directory. (3000 flat 160x160 images: ~2 s of work, so every interrupt
    lands mid-run; a Ctrl-C that got lost would show as a finished run.)"""
    import cv2
    cv2.imwrite(str(tmp_path / "img.png"), np.full((160, 160, 3), 7, np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"img.png {i % 3}\n" for i in range(3000)))
    rounds = max(2, kill_budget(request) // 2)
    rng = random.Random(5)
    slowest = 0.0
    log = tmp_path / "convert.log"
    for trial in range(rounds):
        db = tmp_path / f"db{trial}"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", CONVERT, "--jobs", "2", f"{tmp_path}/",
                                     str(tmp_path / "list.txt"), str(db)], stderr=err, env=child_env(),
                                    start_new_session=True)
            try:
                # even rounds: while the pool starts; odd ones: while it decodes
                assert wait_for(log, "A total of" if trial % 2 == 0 else "Processed 40 files.", proc)
                time.sleep(rng.uniform(0, 0.3))
                os.killpg(proc.pid, signal.SIGINT)
                sent = time.monotonic()
                code = proc.wait(timeout=30)
                slowest = max(slowest, time.monotonic() - sent)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        text = log.read_text()
        assert code == 130 and one_error_line(text) == "error: interrupted", (code, text[-3000:])
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f"db{trial}")]
    report("sigint convert_imageset --jobs 2", rounds=rounds, slowest_exit_s=round(slowest, 2))
    assert slowest < 5


# --- disk full and read-only directories --------------------------------------------------------------

class _FullDisk:
    """os.fdopen whose files raise ENOSPC once ``budget`` bytes have been written in all."""

    def __init__(self, real, budget):
        self.real, self.budget = real, budget

    def __call__(self, *args, **kwargs):
        f = self.real(*args, **kwargs)
        outer = self

        class Limited:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                f.__enter__()
                return self

            def __exit__(self, *exc):
                return f.__exit__(*exc)

            def write(self, data):
                if len(data) > outer.budget:
                    f.write(data[:outer.budget])
                    outer.budget = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                outer.budget -= len(data)
                return f.write(data)
        return Limited()


def snapshot_files(snaps):
    return {name: open(os.path.join(snaps, name), "rb").read() for name in sorted(os.listdir(snaps))}


def test_disk_full_mid_snapshot_is_one_line_and_keeps_earlier_snapshots(tmp_path, monkeypatch, capsys):
    solver_path, net_path, snaps = write_solver(tmp_path, "full", max_iter=6, snapshot=2)
    assert cli.main(["train", "--solver", solver_path, "--iterations", "4"]) == 0
    before = snapshot_files(snaps)
    one_snapshot = sum(len(v) for k, v in before.items() if "_iter_2." in k)
    capsys.readouterr()
    # room for the .caffemodel of iteration 6 and half its .solverstate
    monkeypatch.setattr(fileio.os, "fdopen", _FullDisk(os.fdopen, one_snapshot // 2 + 400))
    code = cli.main(["train", "--solver", solver_path, "--snapshot", f"{snaps}/s_iter_4.solverstate"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert re.match(r"error: \S+/full/s_iter_6\.\S+: cannot write: No space left on device$", errors[0])
    after = snapshot_files(snaps)
    assert {k: v for k, v in after.items() if "_iter_6" not in k} == before     # untouched, no temp files
    assert not os.path.exists(f"{snaps}/s_iter_6.solverstate")
    check_snapshot_dir(snaps, net_path)


@contextlib.contextmanager
def tmpfs(path, size):
    """A real tmpfs of ``size`` mounted at ``path`` (root and a mount-capable sandbox only)."""
    os.makedirs(path, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_tmpfs_training_and_convert(tmp_path, image_list):
    """The real thing: a 64 KiB filesystem fills up during training and during convert_imageset."""
    with tmpfs(tmp_path / "small", "64k") as small:
        solver_path, net_path, snaps = write_solver(small, "snaps", max_iter=200, snapshot=1)
        proc = subprocess.run([sys.executable, "-c", PYTHON_CLI, "train", "--solver", solver_path],
                              capture_output=True, text=True, env=child_env(), timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr
        assert re.match(r"error: \S+/snaps/s_iter_\d+\.\S+: cannot write: No space left on device$", errors[0])
        latest, checked, temps = check_snapshot_dir(snaps, net_path)
        assert latest is not None and checked >= 3 and temps == 0

        db = os.path.join(small, "db")
        proc = subprocess.run([sys.executable, "-c", CONVERT, "--jobs", "1", f"{image_list}/",
                               str(image_list / "list.txt"), db], capture_output=True, text=True,
                              env=child_env(), timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert errors[0].startswith(f"error: {db}: ")
        assert not os.path.exists(db) and not [n for n in os.listdir(small) if n.startswith("db.tmp-")]


def test_read_only_directory(tmp_path, capsys):
    """Snapshots into a directory that turns read-only: one line, earlier snapshots untouched.
    As root chmod does not stop writes, so a read-only tmpfs is used there (skipped where there is
    no mount); as another user, chmod."""
    ro = tmp_path / "ro"
    ro.mkdir()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    with (tmpfs(ro, "1m") if root else contextlib.nullcontext(ro)):
        solver_path, net_path, snaps = write_solver(ro, "snaps", max_iter=4, snapshot=2)
        assert cli.main(["train", "--solver", solver_path, "--iterations", "2"]) == 0
        before = snapshot_files(snaps)
        capsys.readouterr()
        if root:
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        else:
            os.chmod(snaps, 0o555)
        try:
            code = cli.main(["train", "--solver", solver_path, "--snapshot", f"{snaps}/s_iter_2.solverstate"])
        finally:
            if not root:
                os.chmod(snaps, 0o755)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err
        # the solver checks the snapshot directory before it starts
        assert re.match(r"error: \S+/snaps\.solver\.prototxt: cannot write to snapshot prefix '\S+/snaps/s'; "
                        r"make sure that the directory '\S+/snaps' exists and is writable( \(.*\))?$", errors[0])
        assert snapshot_files(snaps) == before


def test_directory_unwritable_mid_run(tmp_path, monkeypatch):
    """The snapshot directory becomes unwritable while training: the snapshot fails with one message
    naming the file, and nothing changes on disk (simulated: works as root too)."""
    solver_path, net_path, snaps = write_solver(tmp_path, "perm", max_iter=6, snapshot=2)
    solver = caffe.get_solver(solver_path)
    solver.step(2)
    before = snapshot_files(snaps)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    with pytest.raises(MinicaffeError) as info:
        solver.step(2)
    monkeypatch.undo()
    assert re.fullmatch(r"\S+/perm/s_iter_4\.caffemodel: cannot write: Permission denied", str(info.value))
    assert snapshot_files(snaps) == before


def leftover(db, kind):
    """A working directory exactly as a killed run leaves it: made and marked by a process (a child
    here) that has exited since."""
    code = ("import secrets, sys; from minicaffe.tools.convert_imageset import _make_work_dir; "
            "print(_make_work_dir(sys.argv[1], sys.argv[2], secrets.token_hex(16), []))")
    out = subprocess.run([sys.executable, "-c", code, str(db), kind], capture_output=True, text=True,
                         env=child_env(), check=True, timeout=60)
    return out.stdout.strip()


def test_next_run_cleans_up_after_a_killed_one(image_list, tmp_path):
    """A run killed between the renames of --overwrite left the old database aside and the new one
    unfinished: the next run puts the old one back (so it refuses to overwrite it without the flag)
    and removes the unfinished one."""
    from minicaffe.tools.convert_imageset import WORK_DB, convert_imageset
    db = tmp_path / "db"
    old = leftover(db, "old")
    env = lmdb.open(os.path.join(old, WORK_DB))
    with env.begin(write=True) as txn:
        txn.put(b"00000000_kept", caffe_pb2.Datum(channels=3, height=4, width=4, data=bytes(48)).SerializeToString())
    env.close()
    tmp = leftover(db, "tmp")
    lmdb.open(os.path.join(tmp, WORK_DB)).close()
    with pytest.raises(MinicaffeError, match=r"db: already exists \(use --overwrite"):
        convert_imageset(f"{image_list}/", str(image_list / "list.txt"), str(db), jobs=1)
    assert lmdb_records(str(db)) == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith("db.")]


# --- another process writes the LMDB a run reads -----------------------------------------------------

LMDB_NET = """name: "lmdbnet"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} transform_param {{ scale: 0.004 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
"""

# run in another process: it must not share this process's LMDB environment (one per process)
LMDB_WRITER = """
import sys, time, lmdb, numpy as np
from minicaffe.data import array_to_datum
path, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
env = lmdb.open(path, map_size=1 << 24)
rng = np.random.default_rng(1)
def put(txn, i):
    txn.put(b"%08d" % i, array_to_datum(rng.integers(0, 256, (3, 6, 6), dtype=np.uint8), i % 3).SerializeToString())
if mode == "empty":
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(), delete=False)
elif mode == "fill":
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(int(seconds)):
            put(txn, i)
else:                   # replace, delete and append records until the time is up or stdin closes
    end = time.monotonic() + seconds
    print("writing", flush=True)
    while time.monotonic() < end:
        with env.begin(write=True) as txn:
            for _ in range(50):
                i = int(rng.integers(0, 400))
                txn.delete(b"%08d" % i) if rng.random() < 0.3 else put(txn, i)
env.close()
"""


def lmdb_writer(db, mode, arg, **kw):
    return subprocess.Popen([sys.executable, "-c", LMDB_WRITER, str(db), mode, str(arg)], env=child_env(), **kw)


def write_lmdb_solver(directory, name, db, max_iter, batch=16, snapshot=0):
    net = LMDB_NET.format(db=db, batch=batch)
    return write_solver(directory, name, max_iter=max_iter, snapshot=snapshot, net=net)


def test_training_while_another_process_writes_the_lmdb(tmp_path):
    """Another process replaces, deletes and appends records of the LMDB that ``minicaffe train``
    reads. Before, the reader (no lock file, one read transaction for the whole run) was handed pages
    the writer had recycled and liblmdb aborted the process (SIGABRT, no error line, no snapshot)."""
    db = tmp_path / "db"
    assert lmdb_writer(db, "fill", 200).wait(timeout=60) == 0
    solver_path, _, snaps = write_lmdb_solver(tmp_path, "w", db, max_iter=800)
    writer = lmdb_writer(db, "churn", 60, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        train = subprocess.run([sys.executable, "-c", PYTHON_CLI, "train", "--solver", solver_path],
                               capture_output=True, text=True, env=child_env(), timeout=300)
    finally:
        writer.kill()
        writer.wait()
    assert train.returncode == 0, train.stderr[-2000:]
    assert "was changed by another process during the run" in train.stderr
    assert os.path.exists(f"{snaps}/s_iter_800.caffemodel")


def test_lmdb_emptied_mid_run_stops_with_one_line_and_resumes_exactly(tmp_path):
    """Another process removes every record while training: the run stops with one error naming the
    database and the iteration, after a snapshot of the state that iteration started from; once the
    records are back, resuming from it gives the weights of an uninterrupted run."""
    db = tmp_path / "db"
    assert lmdb_writer(db, "fill", 13).wait(timeout=60) == 0
    solver_path, net_path, snaps = write_lmdb_solver(tmp_path, "e", db, max_iter=40, batch=3)
    reference = caffe.get_solver(solver_path)
    reference.solve()
    expected = net_weights(reference.net)
    reference.net.layers[0].close()

    solver = caffe.get_solver(solver_path)
    solver.step(2)
    assert lmdb_writer(db, "empty", 0).wait(timeout=60) == 0
    with pytest.raises(MinicaffeError) as info:
        solver.step(38)
    solver.net.layers[0].close()
    at = solver.iter
    message = str(info.value)
    assert "\n" not in message and 2 <= at < 40
    assert re.fullmatch(rf"iteration {at}: layer 'data': {re.escape(str(db))}: the database became empty during "
                        rf"the run .*; the state before this iteration was saved to \S+s_iter_{at}\.caffemodel "
                        rf"and \S+s_iter_{at}\.solverstate", message), message
    assert lmdb_writer(db, "fill", 13).wait(timeout=60) == 0
    resumed = caffe.get_solver(solver_path)
    resumed.solve(resume_file=f"{snaps}/s_iter_{at}.solverstate")
    resumed.net.layers[0].close()       # its prefetch thread must not outlive the test
    for a, b in zip(net_weights(resumed.net), expected):
        np.testing.assert_array_equal(a, b)


def test_unreadable_record_mid_run_is_one_line_with_a_snapshot(tmp_path, capsys):
    """A record that is not a Datum (here the 5th, read by iteration 1) stops ``minicaffe train`` with
    one error line naming the layer, database and key, after a snapshot of the state before it."""
    db = tmp_path / "db"
    assert lmdb_writer(db, "fill", 13).wait(timeout=60) == 0
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        txn.put(b"00000004", b"\xff not a datum")
    env.close()
    solver_path, _, snaps = write_lmdb_solver(tmp_path, "bad", db, max_iter=10, batch=3)
    assert cli.main(["train", "--solver", solver_path]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.match(rf"error: iteration 1: layer 'data': {re.escape(str(db))}.*00000004.*not a Datum.*; the state "
                    rf"before this iteration was saved to \S+s_iter_1\.caffemodel and \S+s_iter_1\.solverstate$",
                    errors[0]), errors[0]
    with open(f"{snaps}/s_iter_1.solverstate.rng", encoding="utf-8") as f:
        assert json.load(f)["data"]["train"]["data"]["source"]["offset"] == 3


def test_lmdb_on_read_only_media_is_read_and_the_log_says_without_a_lock(tmp_path, logs):
    """On a read-only file system (a real read-only tmpfs; root only) the lock file cannot be made:
    the database is read all the same, and the log says it is read without a lock."""
    from minicaffe.data import LMDBSource
    ro = tmp_path / "ro"
    with tmpfs(ro, "4m"):
        assert lmdb_writer(ro / "db", "fill", 5).wait(timeout=60) == 0
        os.remove(ro / "db" / "lock.mdb")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with LMDBSource(str(ro / "db")) as src:
            assert [src.next()[0] for _ in range(6)] == [b"%08d" % i for i in (0, 1, 2, 3, 4, 0)]
    assert any("read-only media" in m and "reading without a lock" in m for m in logs)
