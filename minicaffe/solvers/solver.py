"""The training loop: Caffe's ``Solver``/``SGDSolver`` (src/caffe/solver.cpp, solvers/sgd_solver.cpp).

A solver reads a SolverParameter, builds the train net and the test nets (which share the train
net's weights), and runs Caffe's ``Step``: forward/backward ``iter_size`` times, log, update with the
solver type's rule (``updates.py``) at the rate of the ``lr_policy`` (``lr_policy.py``), test every
``test_interval``, snapshot every ``snapshot`` iterations. The log lines are worded as Caffe's, so
Caffe's and minicaffe's log parsers read them.

Beyond Caffe: snapshots are written atomically; resuming is bit-exact (the host random generator's
state goes to a ``.solverstate.rng`` sidecar, with the solver type, the GPU generator's position and
the read positions of the data layers that report one (``data_position()``/``restore_data_position()``;
layers with only ``restore_position(n)``, or sidecars without positions, are told how many records the
train/test nets had read); a NaN or infinite loss stops training with a ``NumericalError`` naming the
iteration and the first layer holding a non-finite value, after a snapshot of the last good weights; a
data layer failing to read (a ``DataError``) stops training the same way, after a snapshot of the state
before that iteration. The snapshot folder is checked at start-up (a final and a NaN-stop snapshot are
written whatever ``snapshot`` says), and a run holds an advisory lock on ``<snapshot_prefix>.lock`` so
two runs cannot overwrite each other's snapshots.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import signal
import socket
import threading
import time
from typing import Callable

import numpy as np

from ..core import backend
from ..core.blob import Blob
from ..core.context import solver_rank
from ..deps import require
from ..errors import DataError, MinicaffeError, NumericalError, SolverError, did_you_mean
from ..fileio import atomic_open, atomic_write
from ..net.network import Net, blobproto_to_array, blobproto_shape, in_file
from ..proto import caffe_pb2
from ..formats.prototxt import caffe_text, load_net_param, load_solver_param, prototxt_path, read_binary_file
from ..formats.wire import _field, blobproto_bytes
from . import updates
from .lr_policy import POLICIES, learning_rate

try:
    import fcntl
except ImportError:     # not on Windows: no lock there
    fcntl = None

NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
SIGNAL_EFFECTS = (STOP, SNAPSHOT, NONE)

_ENUM_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta", caffe_pb2.SolverParameter.ADAM: "Adam",
}


def _log():
    from ..tools.common import get_logger
    return get_logger()


def _fmt(x):
    """A number as C++'s default ostream prints it (6 significant digits, %g style)."""
    return f"{float(x):.6g}"


# --- reading solver definitions ------------------------------------------------------------------

def read_solver_param(source: str | os.PathLike | caffe_pb2.SolverParameter
                      ) -> tuple[caffe_pb2.SolverParameter, str | None]:
    """A SolverParameter from a path, prototxt text or a message, upgraded as Caffe's
    ``ReadSolverParamsFromTextFileOrDie``: the old ``solver_type`` enum becomes ``type``; a missing
    ``snapshot_prefix`` becomes the solver file's path without extension, a directory gets the file's
    stem appended. Returns ``(param, solver_file or None)``."""
    path = None
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
    else:
        path = prototxt_path(source)
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(load_solver_param(source))
    upgrade_solver_param(param, path)
    if param.lr_policy and param.lr_policy not in POLICIES:
        # a typo is reported as the file is read, before the nets are built (minutes for a big one)
        raise SolverError(f"{path or '<solver>'}: unknown learning rate policy '{param.lr_policy}'"
                          f"{did_you_mean(param.lr_policy, POLICIES)}; known: {', '.join(POLICIES)}")
    return param, path


def upgrade_solver_param(param, path=None):
    """Caffe's solver upgrades, in place (see ``read_solver_param``)."""
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError(f"{path or '<solver>'}: give either the old 'solver_type' (enum) or 'type' "
                              f"(string), not both")
        param.type = _ENUM_TYPES.get(param.solver_type, str(param.solver_type))
        param.ClearField("solver_type")
    if path is not None:
        if not param.HasField("snapshot_prefix"):
            param.snapshot_prefix = os.path.splitext(path)[0]
        elif os.path.isdir(param.snapshot_prefix):
            stem = os.path.splitext(os.path.basename(path))[0]
            param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
    return param


def solver_class(type_name, where="<solver>"):
    """The Solver subclass for a solver ``type`` string (Caffe's names, case as Caffe spells them)."""
    cls = SOLVER_CLASSES.get(type_name)
    if cls is None:
        known = ", ".join(SOLVER_CLASSES)
        raise SolverError(f"{where}: unknown solver type '{type_name}'; known types: {known}")
    return cls


def get_solver(source: str | os.PathLike | caffe_pb2.SolverParameter,
               solver_file: str | os.PathLike | None = None) -> Solver:
    """pycaffe's ``caffe.get_solver``: the solver class that the file's ``type`` (or ``solver_type``) names."""
    param, path = read_solver_param(source)
    cls = solver_class(param.type, path or "<solver>")
    return cls(param, solver_file=solver_file or path)


# --- signals (Caffe's SignalHandler) ---------------------------------------------------------------

class SignalHandler:
    """SIGINT/SIGHUP only set flags; the solver asks ``check()`` once per iteration and acts on the
    configured effect (``stop``, ``snapshot`` or ``none``), as Caffe's SignalHandler/ActionCallback.

    Use as a context manager around training; the previous handlers come back on exit.
    """

    def __init__(self, sigint_effect=STOP, sighup_effect=SNAPSHOT):
        for name, value in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if value not in SIGNAL_EFFECTS:
                raise SolverError(f"invalid signal effect '{value}' for {name} (use stop, snapshot or none)")
        self.sigint_effect, self.sighup_effect = sigint_effect, sighup_effect
        self._got = {"INT": False, "HUP": False}
        self._old = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._got["INT"] = True
        elif hasattr(signal, "SIGHUP") and signum == signal.SIGHUP:
            self._got["HUP"] = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
            for s in sigs:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def check(self):
        """The requested action since the last call (SIGHUP first, as Caffe), then forget the signal."""
        if self._got["HUP"]:
            self._got["HUP"] = False
            return self.sighup_effect
        if self._got["INT"]:
            self._got["INT"] = False
            return self.sigint_effect
        return NONE

    __call__ = check


# --- snapshots: fast BlobProto encoding ---------------------------------------------------------

def solverstate_bytes(iteration, learned_net, current_step, histories):
    """A serialized SolverState (Caffe's field numbers: iter 1, learned_net 2, history 3, current_step 4),
    byte-identical to protobuf's own serialization of the same message."""
    head = caffe_pb2.SolverState(iter=int(iteration), learned_net=learned_net).SerializeToString()
    tail = caffe_pb2.SolverState(current_step=int(current_step)).SerializeToString()
    return head + b"".join(_field(3, blobproto_bytes(h)) for h in histories) + tail


# --- where snapshots go: the folder check and the run lock ---------------------------------------

def check_snapshot_dir(prefix, where):
    """SolverError unless the folder of ``prefix`` exists and is writable. Checked at start-up whatever
    ``snapshot`` says: Caffe's ``snapshot_after_train`` (default true) writes a final snapshot, and a
    NaN stop writes one, so a bad folder would otherwise be found only after all the training."""
    directory = os.path.dirname(prefix) or "."
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise SolverError(f"{where}: cannot write to snapshot prefix '{prefix}'; make sure that the directory "
                          f"'{directory}' exists and is writable (the final and NaN-stop snapshots go there "
                          f"even with snapshot: 0)")


def lock_path(prefix):
    """The lock file of a snapshot prefix: ``<prefix>.lock`` (``minicaffe.lock`` in the folder when the
    prefix names only a folder)."""
    return prefix + ".lock" if os.path.basename(prefix) else os.path.join(prefix or ".", "minicaffe.lock")


_LOCK_MARK = "minicaffe training run"
_held_locks = {}        # lock file (real path) -> [fd, number of holders in this process, pid]


@atexit.register
def _remove_held_lock_files():
    """At exit (an uncaught error included) remove the lock files this process still holds; the kernel
    drops the flocks itself, and a file left by a killed process does not block the next run."""
    for key, (fd, _, pid) in list(_held_locks.items()):
        _held_locks.pop(key, None)
        try:      # a forked child inherits the table, not the lock: leave its parent's file alone
            if pid == os.getpid() and os.path.samestat(os.fstat(fd), os.stat(key)):
                os.unlink(key)
            os.close(fd)
        except OSError:
            pass


class SnapshotLock:
    """An advisory ``flock`` on ``<snapshot_prefix>.lock`` for the length of a training run, so that a
    second run with the same prefix is refused at start (naming the first one's pid and host) instead
    of overwriting its snapshots. The kernel drops the flock when the process ends however it ends, so
    a lock file left by a killed run (no flock held) does not block; minicaffe removes only lock files
    it wrote (they start with "minicaffe training run"). Re-entrant within one process: nested
    ``solve``/``step``/``snapshot`` calls and several solvers of one process share the lock.
    Use as a context manager."""

    def __init__(self, prefix, where="<solver>"):
        self.prefix, self.where = prefix, where
        self.path = lock_path(prefix)
        self._key = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        if self._key is not None or fcntl is None:
            return self
        check_snapshot_dir(self.prefix, self.where)
        key = os.path.join(os.path.realpath(os.path.dirname(self.path) or "."), os.path.basename(self.path))
        held = _held_locks.get(key)
        if held is not None:
            held[1] += 1
            self._key = key
            return self
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise SolverError(f"{self.where}: cannot create the lock file {self.path}: "
                                  f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _lock_owner(fd)
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise SolverError(
                        f"{self.where}: snapshot_prefix '{self.prefix}' is in use by another training run "
                        f"({owner}, lock file {self.path}); wait for it to end or give this run another "
                        f"snapshot_prefix") from None
                _log().warning("%s: cannot lock %s (%s): another run with this snapshot_prefix would not be "
                               "noticed", self.where, self.path, exc.strerror or exc)
                return self
            try:     # removed by its last holder between our open and our flock? then take a fresh one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            text = _read_fd(fd)
            if text and not text.startswith(_LOCK_MARK):
                os.close(fd)
                raise SolverError(f"{self.where}: {self.path} exists and is not a minicaffe lock file; move it "
                                  f"away or give this run another snapshot_prefix")
            mine = f"{_LOCK_MARK}: pid {os.getpid()} on host {socket.gethostname()}\n".encode()
            os.pwrite(fd, mine, 0)      # then cut to length: ext4 flushes at close a file truncated to 0
            os.ftruncate(fd, len(mine))
            _held_locks[key] = [fd, 1, os.getpid()]
            self._key = key
            return self
        raise SolverError(f"{self.where}: could not take the lock file {self.path} (it keeps being replaced)")

    def release(self):
        key, self._key = self._key, None
        held = _held_locks.get(key) if key is not None else None
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _held_locks[key]
        fd = held[0]
        try:      # unlink before close: the file is still ours (the flock keeps others out). By its
            # absolute path (the key): the working directory may have changed since it was taken
            if held[2] == os.getpid() and os.path.samestat(os.fstat(fd), os.stat(key)):
                os.unlink(key)
        except OSError:
            pass
        os.close(fd)


def _read_fd(fd, limit=4096):
    try:
        return os.pread(fd, limit, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _lock_owner(fd):
    """"pid N on host H" from a lock file's text, as its holder wrote it."""
    text = _read_fd(fd).strip()
    if text.startswith(_LOCK_MARK + ": "):
        return text[len(_LOCK_MARK) + 2:].splitlines()[0]
    return "another process"


# --- the solver -------------------------------------------------------------------------------------

class Solver:
    """Caffe's Solver with pycaffe's surface: ``net``, ``test_nets``, ``iter``, ``param``, ``step(n)``,
    ``solve(resume_file=None)``, ``snapshot()``, ``restore(path)``, ``apply_update()``,
    ``add_callback(on_start, on_gradients)``.

    ``Solver(path_or_param)`` picks the subclass from the solver's ``type``; the subclasses
    (``SGDSolver``...) use their own rule whatever the file says, as pycaffe's do.
    """

    rule_class = None

    def __new__(cls, *args, **kwargs):
        if cls is Solver:
            source = args[0] if args else kwargs.get("param_or_path")
            param, path = read_solver_param(source)
            cls = solver_class(param.type, path or "<solver>")
        return super().__new__(cls)

    def __init__(self, param_or_path: str | os.PathLike | caffe_pb2.SolverParameter,
                 solver_file: str | os.PathLike | None = None) -> None:
        param, path = read_solver_param(param_or_path)
        self.solver_file = os.fspath(solver_file) if solver_file is not None else path
        self._net_files = {}     # net file as the solver names it -> the path it was read from
        self.param = param
        self.log = _log()
        self.log.info("Initializing solver from parameters: \n%s", caffe_text(param, utf8=True).rstrip())
        self._check_param()
        if param.type != self.type and param.HasField("type"):
            self.log.warning("%s: the solver says type '%s', but %s was asked for: using %s updates",
                             self._where(), param.type, type(self).__name__, self.type)
        self.rule = self.rule_class(param)
        if param.random_seed >= 0:
            # Caffe seeds worker r of a data-parallel run with random_seed + r (own dropout masks)
            backend.set_random_seed(param.random_seed + solver_rank())
        self._init_train_net()
        if solver_rank() == 0:
            self._init_test_nets()
        else:
            self.test_nets = []     # only the root solver tests (Caffe builds no test nets on workers)
        self.log.info("Solver scaffolding done.")
        self.iter = 0
        self.current_step = 0
        self._callbacks = []
        self._parallel = None       # a minicaffe.parallel.ParallelSolver when training data-parallel
        self._action_function = None
        self._requested_early_exit = False
        self._losses, self.smoothed_loss = [], 0.0
        self.test_scores = {}
        self._scratch = {}
        self._progress = None
        self._lock = None           # the snapshot prefix's SnapshotLock, while this solver holds it
        self.history = [Blob(p.shape, name=f"history[{k}][{i}]")
                        for k in range(self.rule.history_sets)
                        for i, p in enumerate(self.net.learnable_params)]

    # --- set-up ---------------------------------------------------------------------------------
    @property
    def type(self) -> str:
        """The solver type as Caffe spells it ("SGD", "Nesterov", "Adam"...)."""
        return self.rule_class.type

    def _where(self):
        return self.solver_file or "<solver>"

    def _check_param(self):
        p = self.param
        where = self._where()
        if p.average_loss < 1:
            raise SolverError(f"{where}: average_loss should be >= 1 (got {p.average_loss})")
        if p.iter_size < 1:
            raise SolverError(f"{where}: iter_size should be >= 1 (got {p.iter_size})")
        try:   # a misspelt lr_policy or a missing stepsize fails now, not at the first update (an
            if p.lr_policy:   # unset one fails at the first update, as in Caffe)
                learning_rate(p, 0, 0)
        except SolverError as exc:
            raise SolverError(f"{where}: {exc}") from None
        if p.weight_decay and p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"{where}: unknown regularization_type '{p.regularization_type}' (use L2 or L1)")
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            require("h5py", f"{where}: snapshot_format HDF5 (or use BINARYPROTO)", SolverError)
        if p.snapshot and not p.HasField("snapshot_prefix"):
            raise SolverError(f"{where}: snapshot is given but snapshot_prefix is not")
        # With periodic snapshots the folder must be there now (Caffe's CheckSnapshotWritePermissions).
        # Without them it is checked when training starts (solve(), minicaffe train), since the final
        # (snapshot_after_train) and NaN-stop snapshots need it; a pycaffe loop of step() that never
        # snapshots works without it, as in Caffe. Only the root writes snapshots.
        if solver_rank() == 0 and p.snapshot:
            check_snapshot_dir(p.snapshot_prefix, where)
        for i, n in enumerate(p.test_iter):
            if n <= 0:     # Caffe tests on no batches and prints no output lines; say so once
                self.log.warning("%s: test_iter is %d for test net #%d: it will be run on no batches (no test "
                                 "output lines)", where, n, i)

    def _resolve(self, field, value):
        """A path from the solver: as given (relative to the working directory, as Caffe), else relative
        to the solver file's directory; SolverError naming the field and the paths tried."""
        tried = [value]
        if os.path.exists(value):
            return value
        if self.solver_file and not os.path.isabs(value):
            alt = os.path.join(os.path.dirname(os.path.abspath(self.solver_file)), value)
            tried.append(alt)
            if os.path.exists(alt):
                self.log.info("%s '%s' is not in the working directory; using %s (beside the solver file)",
                              field, value, alt)
                return alt
        from ..core import shipped  # a documented path (models/lenet/...): the copy minicaffe ships
        found = shipped.resolve(value, field)
        if found != value:
            return found
        raise SolverError(f"{self._where()}: {field} '{value}' not found (tried {', '.join(tried)})")

    def _read_net(self, field, value):
        path = self._resolve(field, value)
        self._net_files[value] = path
        return load_net_param(path)

    def _net_source(self, field, value):
        """What a net error should name: the net's file, or the solver's field holding it."""
        if field.endswith("_param"):
            return f"{self._where()}: {field}"
        return self._net_files.get(value, value)

    def _init_train_net(self):
        p = self.param
        fields = ("net", "net_param", "train_net", "train_net_param")
        given = [f for f in fields if p.HasField(f)]
        if not given:
            raise SolverError(f"{self._where()}: the solver must name a train net with one of: "
                              f"{', '.join(fields)}")
        if len(given) > 1:
            raise SolverError(f"{self._where()}: give only one of {', '.join(fields)} for the train net "
                              f"(found {', '.join(given)})")
        field = given[0]
        if field.endswith("_param"):
            self.log.info("Creating training net specified in %s.", field)
            net_param = load_net_param(getattr(p, field))
        else:
            self.log.info("Creating training net from %s file: %s", field, getattr(p, field))
            net_param = self._read_net(field, getattr(p, field))
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        try:
            self.net = Net(net_param, state.phase)
        except MinicaffeError as exc:
            raise in_file(exc, self._net_source(field, getattr(p, field)))
        self._load_weights(self.net)

    def _init_test_nets(self):
        p = self.param
        where = self._where()
        if p.HasField("net") and p.HasField("net_param"):
            raise SolverError(f"{where}: give either net or net_param, not both")
        generic = p.HasField("net") or p.HasField("net_param")
        specific = len(p.test_net_param) + len(p.test_net)
        n_iter = len(p.test_iter)
        if generic and n_iter < specific or not generic and n_iter != specific:
            raise SolverError(f"{where}: test_iter must be given for each test net ({specific} test "
                              f"net(s), {n_iter} test_iter value(s))")
        count = specific + (n_iter - specific)
        if len(p.test_state) and len(p.test_state) != count:
            raise SolverError(f"{where}: test_state must be left out or given once per test net "
                              f"({count} test nets, {len(p.test_state)} test_state entries)")
        if count and p.test_interval <= 0:
            raise SolverError(f"{where}: {count} test net(s) but test_interval is {p.test_interval}; "
                              f"set test_interval > 0 (or drop test_iter)")
        sources = []
        for tp in p.test_net_param:
            sources.append(("test_net_param", load_net_param(tp)))
        for name in p.test_net:
            sources.append((f"test_net file: {name}", self._read_net("test_net", name)))
        for _ in range(count - len(sources)):
            if p.HasField("net_param"):
                sources.append(("net_param", load_net_param(p.net_param)))
            else:
                sources.append((f"net file: {p.net}", self._read_net("net", p.net)))
        self.test_nets = []
        for i, (desc, net_param) in enumerate(sources):
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            state.MergeFrom(net_param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            self.log.info("Creating test net (#%d) specified by %s", i, desc)
            try:
                net = Net(net_param, state.phase)
            except MinicaffeError as exc:
                field, _, value = desc.partition(" file: ")
                raise in_file(exc, self._net_source(field if value else desc, value))
            self._load_weights(net)
            net.share_with(self.net)
            self.test_nets.append(net)

    def _load_weights(self, net):
        for entry in self.param.weights:
            for name in entry.split(","):
                name = name.strip()
                if name:
                    self.log.info("Finetuning from %s", name)
                    net.copy_from(self._resolve("weights", name))

    # --- pycaffe surface ----------------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], object],
                     on_gradients: Callable[[], object] | None = None) -> None:
        """Call ``on_start()`` before each iteration's forward/backward and ``on_gradients()`` before its
        update (pycaffe's ``Solver.add_callback``). ``add_callback(nccl)`` with a ``caffe.NCCL`` is
        pycaffe's other form; that object wired the reduction in when it was made, so nothing is added."""
        if on_gradients is None:
            if getattr(on_start, "_minicaffe_nccl", False):
                return
            raise TypeError("add_callback(on_start, on_gradients) takes two callables (or one caffe.NCCL)")
        self._callbacks.append((on_start, on_gradients))

    def set_action_function(self, fn: Callable[[], str]) -> None:
        """``fn()`` → 'none' | 'stop' | 'snapshot', asked once per iteration (e.g. a SignalHandler)."""
        self._action_function = fn

    def _requested_action(self):
        if self._action_function is None:
            return NONE
        action = self._action_function()
        return action if action in (STOP, SNAPSHOT) else NONE

    def share_weights(self, net: Net) -> None:
        """pycaffe's Solver.share_weights(net): ``net`` uses this solver's training weights (by layer
        name, as Net.share_with), so it sees every update without copying."""
        net.share_with(self.net)

    @property
    def lr(self) -> float:
        """The learning rate the next update will use (pycaffe's ``SGDSolver.lr``)."""
        return learning_rate(self.param, self.iter, self.current_step)[0]

    @property
    def is_root(self) -> bool:
        """True unless this is a worker of rank > 0 in data-parallel training (Caffe's root_solver):
        only the root solver tests, logs the display lines and writes snapshots."""
        return self._parallel is None or self._parallel.rank == 0

    def _agree(self, action):
        """The root's value of a flag or action, on every rank (all ranks must stop or snapshot at the
        same iteration or the collectives would hang)."""
        return action if self._parallel is None else self._parallel.agree(action)

    # --- the loop ---------------------------------------------------------------------------------
    def _hold_lock(self, required=True):
        """Take the snapshot prefix's lock (``SnapshotLock``) unless held; the root solver only. True if
        this call took it. ``solve`` gives back what it took when it ends (errors included); a lock taken
        by ``step``/``snapshot`` is held until ``close()``, until the solver is freed, or to the process's
        end, so a pycaffe loop of ``step(1)`` is one run for the lock (and pays for it once). Not
        ``required`` (``step``): where the prefix's folder is missing or unwritable nothing is taken, so
        a pycaffe loop that never snapshots runs there as in Caffe (a snapshot then names the folder)."""
        if self._lock is not None or not self.is_root or solver_rank() != 0:
            return False
        if not required:
            try:
                check_snapshot_dir(self.param.snapshot_prefix, self._where())
            except SolverError:
                return False
        self._lock = SnapshotLock(self.param.snapshot_prefix, self._where()).acquire()
        return True

    def close(self) -> None:
        """Give back the snapshot prefix's lock (if this solver holds it); the solver stays usable."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __del__(self):
        try:
            self.close()
        except Exception:     # interpreter shutdown: the kernel drops the flock anyway
            pass

    def solve(self, resume_file: str | os.PathLike | None = None) -> None:
        """Train to ``max_iter`` (Caffe's Solver::Solve), optionally resuming from a .solverstate.
        The snapshot prefix stays locked for the whole run (see ``SnapshotLock``)."""
        took = self._hold_lock()
        try:
            self._solve(resume_file)
        finally:
            if took:
                self.close()

    def _solve(self, resume_file):
        p = self.param
        self.log.info("Solving %s", self.net.name)
        self.log.info("Learning Rate Policy: %s", p.lr_policy)
        self._requested_early_exit = False
        if resume_file:
            self.log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self._requested_early_exit:
            self.log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_from_to()
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            self.log.info("Iteration %d, loss = %s", self.iter, _fmt(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0 and self.is_root:
            self.test_all()
        self.log.info("Optimization Done.")

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Solver::Step), holding the snapshot prefix's lock."""
        self._hold_lock(required=False)
        self._step(iters)

    def _step(self, iters):
        p = self.param
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self._losses, self.smoothed_loss = [], 0.0
        last_time, last_iter = time.perf_counter(), self.iter
        from ..tools.progress import ProgressBar
        self._progress = ProgressBar(total=max(stop_iter - start_iter, 0), unit="iter", desc="train",
                                     enabled=None if self.is_root else False)
        try:
            while self.iter < stop_iter:
                # the generator's state now belongs with this iteration's weights: a failure snapshot uses it
                self._iter_rng = (self.iter, backend.rng().bit_generator.state, backend.gpu_random_state(),
                                  self._data_positions())
                self.net.clear_param_diffs()
                if p.test_interval and self.iter % p.test_interval == 0 and \
                        (self.iter > 0 or p.test_initialization):
                    if self.is_root:
                        self.test_all()
                    if self._agree(self._requested_early_exit):
                        self._requested_early_exit = True
                        break
                for on_start, _ in self._callbacks:
                    on_start()
                display = p.display and self.iter % p.display == 0
                loss = 0.0
                for k in range(p.iter_size):
                    try:
                        part = self.net.forward_backward() if self._parallel is None else \
                            self._parallel.forward_backward(last=k == p.iter_size - 1)
                    except NumericalError as exc:      # check mode (Net.check_finite) found the layer
                        self._numerical_failure(detail=str(exc))
                    except DataError as exc:           # unreadable data: save the iteration's start state
                        self._numerical_failure(data_error=exc)
                    if not math.isfinite(part):
                        self._numerical_failure(part)
                    loss += part
                bad = non_finite_gradient(self.net)
                if bad:
                    self._numerical_failure(detail=f"the loss is finite but the gradient of {bad} is not")
                loss /= p.iter_size
                self._update_smoothed_loss(loss, start_iter, p.average_loss)
                if display:
                    now = time.perf_counter()
                    lapse = now - last_time
                    per_s = (self.iter - last_iter) / (lapse if lapse else 1)
                    self._info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, _fmt(per_s),
                               _fmt(lapse), p.display, _fmt(self.smoothed_loss))
                    last_time, last_iter = now, self.iter
                    for line in self._output_lines(self.net, "Train"):
                        self._info("%s", line)
                for _, on_gradients in self._callbacks:
                    on_gradients()
                self.apply_update()
                request = self._agree(self._requested_action())
                if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                    self.snapshot()
                self._progress.update()
                if request == STOP:
                    self._requested_early_exit = True
                    break
        finally:
            self._progress.close()
            self._progress = None

    def _info(self, fmt, *args):
        """A log line that does not land in the middle of the progress bar's line (root solver only)."""
        if not self.is_root:
            return
        self.log.info(fmt, *args, stacklevel=2)

    def _update_smoothed_loss(self, loss, start_iter, average_loss):
        """The mean of the last ``average_loss`` losses, updated as Caffe's UpdateSmoothedLoss."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    @staticmethod
    def _blob_loss_weights(net):
        weights = {}
        for lp, ws in zip(net.param.layer, net._loss_weights):
            for name, w in zip(lp.top, ws):
                if w:
                    weights[name] = w
        return weights

    def _output_lines(self, net, kind, values=None):
        """Caffe's ``    Train net output #k: name = v (* w = v·w loss)`` lines (one per output element)."""
        weights = self._blob_loss_weights(net)
        lines, k = [], 0
        for name in sorted(net.outputs):      # Caffe's net outputs come from a std::set: sorted by name
            vals = np.ravel(values[name] if values is not None else net.blobs[name].host_data)
            w = weights.get(name, 0.0)
            for v in vals:
                extra = f" (* {_fmt(w)} = {_fmt(w * v)} loss)" if w else ""
                lines.append(f"    {kind} net output #{k}: {name} = {_fmt(v)}{extra}")
                k += 1
        return lines

    def apply_update(self) -> None:
        """One update from the accumulated gradients (SGDSolver::ApplyUpdate); advances ``iter``."""
        p = self.param
        before = self.current_step
        rate, self.current_step = learning_rate(p, self.iter, self.current_step)
        if p.lr_policy == "multistep" and self.current_step != before:
            self._info("MultiStep Status: Iteration %d, step = %d", self.iter, self.current_step)
        if p.display and self.iter % p.display == 0:
            self._info("Iteration %d, lr = %s", self.iter, _fmt(rate))
        params = self.net.learnable_params
        diffs = [b.xdiff for b in params]
        clipped = updates.clip_gradients(diffs, p.clip_gradients)
        if clipped:
            self._info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                       _fmt(clipped[0]), _fmt(p.clip_gradients), _fmt(clipped[1]))
        n = len(params)
        lr_mults, decay_mults = self.net.params_lr, self.net.params_weight_decay
        weight_decay = updates.f32(p.weight_decay)
        for i, blob in enumerate(params):
            g = diffs[i]
            scratch = self._scratch_for(i, g)
            updates.normalize(g, p.iter_size)
            local_decay = updates.f32(weight_decay * updates.f32(decay_mults[i]))
            if local_decay:
                updates.regularize(blob.xdata, g, local_decay, p.regularization_type, scratch[0])
            local_rate = updates.f32(rate * updates.f32(lr_mults[i]))
            hist = [self.history[k * n + i].xdata for k in range(self.rule.history_sets)]
            self.rule.compute(g, hist, scratch[1:], local_rate, self.iter)
            w = blob.xdata
            w -= g
        self.iter += 1

    def _scratch_for(self, i, g):
        """Temporaries for parameter ``i`` (regularisation + the rule's), kept between iterations."""
        need = 1 + self.rule.scratch
        xp = backend.get_array_module(g)
        have = self._scratch.get(i)
        if have is None or have[0].shape != g.shape or have[0].dtype != g.dtype or \
                backend.get_array_module(have[0]) is not xp:
            have = [xp.empty_like(g) for _ in range(need)]
            self._scratch[i] = have
        return have

    # --- testing ---------------------------------------------------------------------------------
    def test_all(self) -> None:
        """Run every test net in turn (Caffe's ``TestAll``), stopping early when a stop was requested."""
        for i in range(len(self.test_nets)):
            if self._requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> dict[str, float | np.ndarray] | None:
        """Run test net ``test_net_id`` for its ``test_iter`` batches and log the mean outputs
        (Caffe's Solver::Test); the means are kept in ``self.test_scores[test_net_id]``."""
        p = self.param
        self._info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_with(self.net)
        n = p.test_iter[test_net_id]
        sums, loss = None, 0.0
        from ..tools.progress import ProgressBar
        # a bar for the test pass too: a long test_iter is otherwise minutes without a line
        with ProgressBar(total=n, unit="batch", desc=f"test #{test_net_id}", leave=False,
                         enabled=None if self.is_root else False) as bar:
            for _ in range(n):
                request = self._requested_action()
                while request != NONE:
                    if request == SNAPSHOT:
                        self.snapshot()
                    elif request == STOP:
                        self._requested_early_exit = True
                    request = self._requested_action()
                if self._requested_early_exit:
                    break
                try:
                    iter_loss = net.forward_from_to()
                except NumericalError as exc:
                    self._numerical_failure(detail=f"test net #{test_net_id}: {exc}")
                if p.test_compute_loss:
                    loss += iter_loss
                # accumulate on the device; one copy to the host at the end
                if sums is None:
                    sums = {name: net.blobs[name].xdata.astype(np.float64) for name in sorted(net.outputs)}
                else:
                    for name in net.outputs:
                        sums[name] += net.blobs[name].xdata
                bar.update()
        if self._requested_early_exit:
            self._info("Test interrupted.")
            return None
        if sums is None:      # test_iter 0: as Caffe, no batches and so no output lines
            self.test_scores[test_net_id] = {}
            return self.test_scores[test_net_id]
        if p.test_compute_loss:
            self._info("Test loss: %s", _fmt(loss / n))
        means = {name: backend.to_host(s) / n for name, s in sums.items()}
        for line in self._output_lines(net, "Test", means):
            self._info("%s", line)
        # a 1-element output of any shape (pyloss.py reshapes its loss to (1,)) is a float score
        self.test_scores[test_net_id] = {name: (float(np.ravel(m)[0]) if np.size(m) == 1 else m)
                                         for name, m in means.items()}
        return self.test_scores[test_net_id]

    # --- NaN / Inf --------------------------------------------------------------------------------
    def _numerical_failure(self, loss=None, detail=None, data_error=None):
        """Stop training on a NaN/infinity: snapshot the state this iteration started from (weights,
        history, the random generator and the data read positions as they were before its forward
        pass; nothing was updated) and raise a NumericalError naming the iteration and where the value
        appeared. With ``data_error`` (a data layer could not read) the same, raising a DataError."""
        if data_error is not None:
            self._rewind_to_iteration_start()
            try:
                files = self.snapshot()
            except (MinicaffeError, OSError) as exc:    # the data error stays the message's subject
                raise DataError(f"iteration {self.iter}: {data_error}; no snapshot could be written either: "
                                f"{exc}") from None
            finally:
                self._saved_positions = None
            raise DataError(f"iteration {self.iter}: {data_error}; the state before this iteration was "
                            f"saved to {files[0]} and {files[1]}") from None
        what = detail or f"the loss is {loss}; first non-finite values in {first_non_finite(self.net) or 'no layer (?)'}"
        bad = [name for name, b in zip(self.net._learnable_names, self.net.learnable_params)
               if not _finite(b.xdata)]
        if bad:   # only an update that overflowed gets here (non-finite gradients stop before it)
            raise NumericalError(
                f"iteration {self.iter}: {what}; the weights of layer '{bad[0][0]}' are themselves not finite "
                f"(the last update overflowed), so no snapshot was written: resume from an earlier one with a "
                f"lower base_lr or clip_gradients")
        self._rewind_to_iteration_start()
        try:
            files = self.snapshot()
        except (MinicaffeError, OSError) as exc:    # the non-finite value stays the message's subject
            raise NumericalError(f"iteration {self.iter}: {what}; no snapshot could be written either: "
                                 f"{exc}") from None
        finally:
            self._saved_positions = None
        raise NumericalError(
            f"iteration {self.iter}: {what}; the last good state was saved to {files[0]} and {files[1]} "
            f"(try a lower base_lr or clip_gradients)")

    def _rewind_to_iteration_start(self):
        """Put the generators (host and GPU) back to where this iteration started and have the next
        snapshot record the data read positions of that moment: a failure snapshot then resumes
        into the same iteration exactly."""
        start = getattr(self, "_iter_rng", None)
        if start is not None and start[0] == self.iter:
            backend.rng().bit_generator.state = start[1]
            backend.set_gpu_random_state(start[2])
            self._saved_positions = start[3]

    # --- snapshots --------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        """``<snapshot_prefix>_iter_<iter><extension>``, Caffe's snapshot file naming."""
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_N.caffemodel`` (or ``.caffemodel.h5``) and ``.solverstate`` (``.h5``),
        each atomically, plus the ``.rng`` sidecar that makes resuming bit-exact. Returns the paths.
        A data-parallel worker of rank > 0 writes nothing (weights and history are the same on every
        rank: the root writes them) and returns the root's paths."""
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        if not self.is_root:
            ext = (".caffemodel.h5", ".solverstate.h5") if hdf5 else (".caffemodel", ".solverstate")
            return tuple(self.snapshot_filename(e) for e in ext)
        self._hold_lock()
        return self._snapshot(hdf5)

    def _snapshot(self, hdf5):
        if hdf5:
            model = self.snapshot_filename(".caffemodel.h5")
            self._info("Snapshotting to HDF5 file %s", model)
            self.net.save_hdf5(model)
            state = self.snapshot_filename(".solverstate.h5")
            self._write_rng_state(state)
            self._info("Snapshotting solver state to HDF5 file %s", state)
            self._write_state_hdf5(state, model)
        else:
            model = self.snapshot_filename(".caffemodel")
            self._info("Snapshotting to binary proto file %s", model)
            self.net.save(model)
            state = self.snapshot_filename(".solverstate")
            self._write_rng_state(state)
            self._info("Snapshotting solver state to binary proto file %s", state)
            atomic_write(state, solverstate_bytes(self.iter, model, self.current_step,
                                                  [h.host_data for h in self.history]))
        return model, state

    def _write_rng_state(self, state):
        """The ``.rng`` sidecar (the host generator's state, the iteration and the solver type; Caffe's
        solver states record no type, so a state of another type with as many history blobs would be
        taken silently) goes before the solver state: a .solverstate that exists (each file is written
        atomically, the state last) always has its weights and its sidecar beside it."""
        atomic_write(state + ".rng", json.dumps(self._rng_state(), sort_keys=True))

    def _rng_state(self):
        # "data" and "gpu" were added later: readers of the first sidecars ignore them, and the absence
        # of "data" means "replay the read positions from the iteration count" (restore_position)
        data = getattr(self, "_saved_positions", None) or self._data_positions()
        return {"format": "minicaffe solver RNG state 1", "iter": self.iter, "type": self.type,
                "host": backend.rng().bit_generator.state, "gpu": backend.gpu_random_state(), "data": data}

    def _data_positions(self):
        """{"train": {layer: position}, "test": [{layer: position}, ...]} of the layers that report one."""
        return {"train": self.net.data_positions(), "test": [net.data_positions() for net in self.test_nets]}

    def _write_state_hdf5(self, path, model):
        import h5py
        with atomic_open(path, "wb") as f:
            with h5py.File(f, "w") as h5:
                h5.create_dataset("iter", data=np.array([self.iter], dtype=np.int32))
                h5.create_dataset("learned_net", data=np.bytes_(model.encode()))
                h5.create_dataset("current_step", data=np.array([self.current_step], dtype=np.int32))
                group = h5.create_group("history")
                for i, h in enumerate(self.history):
                    group.create_dataset(str(i), data=h.host_data)

    def restore(self, path: str | os.PathLike) -> None:
        """Load a ``.solverstate`` (or ``.solverstate.h5``): iteration, weights, history, current_step;
        then the RNG sidecar and the data layers' read positions, so training continues exactly.

        Everything is checked before anything changes (the state, its history blobs against this
        solver and net, the sidecar's solver type and iteration, the learned net's file; weights that
        fail half-way through loading are put back), so a refused restore leaves the solver as it was."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise SolverError(f"{path}: no such solver state file")
        if path.endswith(".h5"):
            it, learned, step, hist = self._read_state_hdf5(path)
        else:
            state = read_binary_file(path, caffe_pb2.SolverState())
            if not state.HasField("iter"):   # every solver state records its iteration
                raise SolverError(f"{path}: not a .solverstate (it has no iteration number; a .caffemodel "
                                  f"or another file given where a solver state is expected?)")
            it, step = state.iter, state.current_step
            learned = state.learned_net if state.HasField("learned_net") else None
            hist = [(blobproto_shape(bp), blobproto_to_array(bp)) for bp in state.history]
        sidecar = self._read_rng_sidecar(path, it)
        self._check_history(path, hist, sidecar is not None and "type" in sidecar)
        weights_file = self._find_learned_net(learned, path) if learned else None
        # all checked: now change things
        if weights_file:
            self._copy_weights_or_roll_back(weights_file)
        for (_, arr), blob in zip(hist, self.history):
            blob.data[...] = arr.reshape(blob.shape)
        self.iter, self.current_step = int(it), int(step)
        if sidecar is not None:
            backend.rng().bit_generator.state = sidecar["host"]
            if "gpu" in sidecar:   # GPU dropout masks (sidecars before this field: host state only)
                backend.set_gpu_random_state(sidecar["gpu"])
        self._restore_data_positions(sidecar.get("data") if sidecar is not None and
                                     isinstance(sidecar.get("data"), dict) else None)
        self.log.info("%s solver: restored iteration %d from %s", self.type, self.iter, path)

    def _check_history(self, path, hist, type_known):
        """The state's history blobs must be as many as this solver keeps for this net, each of its
        parameter's size. Without a recorded solver type (Caffe's own states) a count that fits also
        fits the other types with as many history sets per parameter: warn."""
        n_params = len(self.net.learnable_params)
        if len(hist) != len(self.history):
            fits = ""
            if n_params and len(hist) % n_params == 0:
                sets = len(hist) // n_params
                types = [t for t, rule in updates.RULES.items() if rule.history_sets == sets]
                if types:
                    fits = f"; {sets} per parameter is what {' or '.join(types)} keeps"
            raise SolverError(f"{path}: holds {len(hist)} history blobs, but the {self.type} solver keeps "
                              f"{len(self.history)} for this net{fits} (another solver type or net?)")
        for i, ((_, arr), blob) in enumerate(zip(hist, self.history)):
            if arr.size != blob.count:
                raise SolverError(f"{path}: history blob {i} has shape {tuple(arr.shape)}, the net's "
                                  f"parameter has {blob.shape}")
        if not type_known and n_params:
            alike = [t for t, rule in updates.RULES.items() if rule.history_sets == self.rule.history_sets]
            self.log.warning("%s: the solver state does not record its solver type (Caffe's never do); its "
                             "%d history blob(s) per parameter fit %s alike: make sure a %s solver wrote it",
                             path, self.rule.history_sets, ", ".join(alike), self.type)

    def _copy_weights_or_roll_back(self, weights_file):
        """``net.copy_from``, with the weights put back if it fails part-way (a layer that does not fit
        after others were already copied)."""
        saved = [(blob, blob.xdata.copy()) for layer in self.net.layers for blob in layer.blobs]
        try:
            self.net.copy_from(weights_file)
        except BaseException:
            for blob, data in saved:
                blob.xdata[...] = data
            raise

    def _read_state_hdf5(self, path):
        h5py = require("h5py", f"{path}: reading an HDF5 solver state", SolverError)
        try:
            h5 = h5py.File(path, "r")
        except OSError as exc:
            raise SolverError(f"{path}: cannot read HDF5 solver state: {exc}") from None
        with h5:
            try:
                it = int(np.asarray(h5["iter"]).ravel()[0])
                learned = None
                if "learned_net" in h5:
                    raw = np.asarray(h5["learned_net"]).item()
                    learned = (raw.decode() if isinstance(raw, bytes) else str(raw)).rstrip("\0")
                step = int(np.asarray(h5["current_step"]).ravel()[0]) if "current_step" in h5 else 0
                group = h5["history"]
                hist = [(group[str(i)].shape, np.asarray(group[str(i)])) for i in range(len(group))]
            except KeyError as exc:
                raise SolverError(f"{path}: not a solver state: missing {exc}") from None
        return it, learned, step, hist

    def _find_learned_net(self, learned, state_path):
        if os.path.exists(learned):
            return learned
        alt = os.path.join(os.path.dirname(os.path.abspath(state_path)), os.path.basename(learned))
        if os.path.exists(alt):
            self.log.info("learned_net %s not found; using %s (beside the solver state)", learned, alt)
            return alt
        raise SolverError(f"{state_path}: learned_net '{learned}' not found (tried {learned}, {alt})")

    def _read_rng_sidecar(self, path, iteration):
        """The ``.rng`` sidecar of solver state ``path``, checked (it must be minicaffe's, for this
        solver type and for the state's ``iteration``, with a generator state that loads), or None with
        a warning when there is none (Caffe's states, or a sidecar that was not copied along)."""
        side = path + ".rng"
        if not os.path.exists(side):
            self.log.warning("%s: no RNG state (%s); random layers will not replay the interrupted run "
                             "exactly", path, side)
            return None
        try:
            with open(side, encoding="utf-8") as f:
                data = json.load(f)
        except RecursionError:
            raise SolverError(f"{side}: unreadable RNG state: nested too deeply (not a minicaffe "
                              f"sidecar)") from None
        except (OSError, ValueError) as exc:
            raise SolverError(f"{side}: unreadable RNG state: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("host"), dict) or \
                not isinstance(data.get("iter"), int) or not isinstance(data.get("type", ""), str):
            raise SolverError(f"{side}: unreadable RNG state: not a minicaffe sidecar (want an object with "
                              f"'iter', 'type' and 'host')")
        if "type" in data and data["type"] != self.type:
            raise SolverError(f"{path}: written by the {data['type']} solver (so says {side}), but this is the "
                              f"{self.type} solver: their history blobs mean different things")
        if data["iter"] != int(iteration):
            raise SolverError(f"{side}: RNG state of iteration {data['iter']}, but {path} is at iteration "
                              f"{iteration} (a sidecar from another snapshot?)")
        gpu = data.get("gpu")
        if gpu is not None and not (isinstance(gpu, dict) and isinstance(gpu.get("draws"), int) and
                                    (gpu.get("seed") is None or isinstance(gpu.get("seed"), int))):
            raise SolverError(f"{side}: unreadable RNG state: 'gpu' must be an object with an integer "
                              f"'draws' and an integer or null 'seed'")
        try:      # a generator state that does not load is refused now, before anything changes
            type(backend.rng().bit_generator)().state = data["host"]
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise SolverError(f"{side}: unreadable RNG state: {exc}") from None
        return data

    def _restore_data_positions(self, saved=None):
        """Put the data layers back where the snapshot's run was: at their saved read positions
        (``saved``, from the sidecar), else tell layers with ``restore_position(n)`` how many records
        their net has read so far."""
        p = self.param
        saved = saved or {}
        tests_saved = saved.get("test") if isinstance(saved.get("test"), list) else []
        self.net.restore_data_positions(self.iter * p.iter_size, saved.get("train"))
        if p.test_interval > 0 and self.iter > 0:
            tests = -(-self.iter // p.test_interval) - (0 if p.test_initialization else 1)
        else:
            tests = 0
        for i, net in enumerate(self.test_nets):
            net.restore_data_positions(tests * p.test_iter[i], tests_saved[i] if i < len(tests_saved) else None)


def _finite(arr):
    """All values finite? One float64 sum: it cannot overflow for float32 data, and NaN/inf propagate."""
    return math.isfinite(float(arr.sum(dtype=np.float64)))


def non_finite_gradient(net):
    """"layer 'x' parameter k" for the first learnable parameter whose gradient holds a NaN or an
    infinity, else None. Cheap enough to run every iteration (one device sync)."""
    params = net.learnable_params
    if not params:
        return None
    total = sum(b.xdiff.sum(dtype=np.float64) for b in params)
    if math.isfinite(float(total)):
        return None
    for (name, k), b in zip(net._learnable_names, params):
        if not _finite(b.xdiff):
            return f"layer '{name}' parameter {k}"
    return None


def first_non_finite(net):
    """'layer 'x' (Type) top 'b'' (or 'parameter k') for the first layer in forward order whose
    parameters or tops hold a NaN or an infinity; None if all are finite."""
    for name, layer, tops in zip(net._layer_names, net.layers, net._top):
        xp = backend.xp()
        for k, blob in enumerate(layer.blobs):
            if not bool(xp.isfinite(blob.xdata).all()):
                return f"layer '{name}' ({layer.type}) parameter {k}"
        for blob in tops:
            if not bool(xp.isfinite(blob.xdata).all()):
                return f"layer '{name}' ({layer.type}) top '{blob.name}'"
    return None


class SGDSolver(Solver):
    # pycaffe's other solvers derive from SGDSolver (they are SGD with another update rule), so
    # isinstance(solver, caffe.SGDSolver) holds for each of them, as it does there
    rule_class = updates.SGD


class NesterovSolver(SGDSolver):
    rule_class = updates.Nesterov


class AdaGradSolver(SGDSolver):
    rule_class = updates.AdaGrad


class RMSPropSolver(SGDSolver):
    rule_class = updates.RMSProp


class AdaDeltaSolver(SGDSolver):
    rule_class = updates.AdaDelta


class AdamSolver(SGDSolver):
    rule_class = updates.Adam


SOLVER_CLASSES = {cls.rule_class.type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver,
                                                       RMSPropSolver, AdaDeltaSolver, AdamSolver)}
