"""Checkpoints: the snapshot files of a training run and reading them back.

A snapshot is Caffe's pair, ``<prefix>_iter_N.caffemodel`` and ``.solverstate`` (BINARYPROTO), or
``.caffemodel.h5`` and ``.solverstate.h5`` (HDF5), each written atomically (``minicaffe.fileio``),
plus minicaffe's ``.solverstate.rng`` sidecar: the host random generator's state, the GPU
generator's position, the solver type and the data layers' read positions, which make resuming
bit-exact (Caffe's states record none of them). The sidecar is written before the state, so a
``.solverstate`` that exists always has its weights and its sidecar beside it.

Also here: the check of the snapshot folder at start-up and ``SnapshotLock``, the advisory lock on
``<snapshot_prefix>.lock`` that keeps two runs from overwriting each other's snapshots.

The ``Solver`` decides when to snapshot and what goes in; this module knows the files.
"""
from __future__ import annotations

import atexit
import json
import os
import socket

import numpy as np

from ..core import backend
from ..deps import require
from ..errors import SolverError
from ..fileio import atomic_open, atomic_write
from ..formats.prototxt import read_binary_file
from ..formats.wire import blobproto_bytes, length_delimited
from ..core.terminal import get_logger
from ..net.network import blobproto_shape, blobproto_to_array
from ..proto import caffe_pb2

try:
    import fcntl
except ImportError:     # not on Windows: no lock there
    fcntl = None

SIDECAR_FORMAT = "minicaffe solver RNG state 1"


def _log():
    return get_logger()


# --- the solver state: BINARYPROTO (fast BlobProto encoding) and HDF5 ----------------------------

def solverstate_bytes(iteration, learned_net, current_step, histories):
    """A serialized SolverState (Caffe's field numbers: iter 1, learned_net 2, history 3, current_step 4),
    byte-identical to protobuf's own serialization of the same message."""
    head = caffe_pb2.SolverState(iter=int(iteration), learned_net=learned_net).SerializeToString()
    tail = caffe_pb2.SolverState(current_step=int(current_step)).SerializeToString()
    return head + b"".join(length_delimited(3, blobproto_bytes(h)) for h in histories) + tail


def write_solver_state(path, iteration, learned_net, current_step, histories, hdf5):
    """The solver state file ``path`` (atomically): iteration, the weights file's name, the learning
    rate step and the history arrays (host arrays, in the solver's order), in either format."""
    if not hdf5:
        atomic_write(path, solverstate_bytes(iteration, learned_net, current_step, histories))
        return
    import h5py
    with atomic_open(path, "wb") as f:
        with h5py.File(f, "w") as h5:
            h5.create_dataset("iter", data=np.array([iteration], dtype=np.int32))
            h5.create_dataset("learned_net", data=np.bytes_(learned_net.encode()))
            h5.create_dataset("current_step", data=np.array([current_step], dtype=np.int32))
            group = h5.create_group("history")
            for i, h in enumerate(histories):
                group.create_dataset(str(i), data=h)


def read_solver_state(path):
    """``(iteration, learned_net or None, current_step, [(shape, array), ...])`` of a ``.solverstate``
    or ``.solverstate.h5`` (by its extension); SolverError naming the file when it is not one."""
    if path.endswith(".h5"):
        return _read_state_hdf5(path)
    state = read_binary_file(path, caffe_pb2.SolverState())
    if not state.HasField("iter"):   # every solver state records its iteration
        raise SolverError(f"{path}: not a .solverstate (it has no iteration number; a .caffemodel "
                          f"or another file given where a solver state is expected?)")
    learned = state.learned_net if state.HasField("learned_net") else None
    hist = [(blobproto_shape(bp), blobproto_to_array(bp)) for bp in state.history]
    return state.iter, learned, state.current_step, hist


def _read_state_hdf5(path):
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


def check_history(path, hist, history, solver_type, history_sets, sets_by_type, n_params, type_known, log):
    """The state's history blobs (``hist``, from ``read_solver_state``) must be as many as the solver
    keeps (``history``, its blobs) for this net, each of its parameter's size. Without a recorded
    solver type (Caffe's own states) a count that fits also fits the other types with as many
    history sets per parameter: warn. ``sets_by_type``: solver type -> history sets per parameter."""
    if len(hist) != len(history):
        fits = ""
        if n_params and len(hist) % n_params == 0:
            sets = len(hist) // n_params
            types = [t for t, n in sets_by_type.items() if n == sets]
            if types:
                fits = f"; {sets} per parameter is what {' or '.join(types)} keeps"
        raise SolverError(f"{path}: holds {len(hist)} history blobs, but the {solver_type} solver keeps "
                          f"{len(history)} for this net{fits} (another solver type or net?)")
    for i, ((_, arr), blob) in enumerate(zip(hist, history)):
        if arr.size != blob.count:
            raise SolverError(f"{path}: history blob {i} has shape {tuple(arr.shape)}, the net's "
                              f"parameter has {blob.shape}")
    if not type_known and n_params:
        alike = [t for t, n in sets_by_type.items() if n == history_sets]
        log.warning("%s: the solver state does not record its solver type (Caffe's never do); its "
                    "%d history blob(s) per parameter fit %s alike: make sure a %s solver wrote it",
                    path, history_sets, ", ".join(alike), solver_type)


# --- the weights a state names ---------------------------------------------------------------------

def find_learned_net(learned, state_path, log):
    """The weights file a solver state names: as written, else beside the state (a snapshot folder
    that was moved or copied)."""
    if os.path.exists(learned):
        return learned
    alt = os.path.join(os.path.dirname(os.path.abspath(state_path)), os.path.basename(learned))
    if os.path.exists(alt):
        log.info("learned_net %s not found; using %s (beside the solver state)", learned, alt)
        return alt
    raise SolverError(f"{state_path}: learned_net '{learned}' not found (tried {learned}, {alt})")


def copy_weights_or_roll_back(net, weights_file):
    """``net.copy_from``, with the weights put back if it fails part-way (a layer that does not fit
    after others were already copied)."""
    saved = [(blob, blob.xdata.copy()) for layer in net.layers for blob in layer.blobs]
    try:
        net.copy_from(weights_file)
    except BaseException:
        for blob, data in saved:
            blob.xdata[...] = data
        raise


# --- the .rng sidecar --------------------------------------------------------------------------------

def rng_sidecar(iteration, solver_type, data_positions):
    """The sidecar's content now: the generators' states (host and GPU), the iteration, the solver
    type and ``data_positions`` ({"train": {...}, "test": [{...}, ...]})."""
    # "data" and "gpu" were added later: readers of the first sidecars ignore them, and the absence
    # of "data" means "replay the read positions from the iteration count" (restore_position)
    return {"format": SIDECAR_FORMAT, "iter": iteration, "type": solver_type,
            "host": backend.rng().bit_generator.state, "gpu": backend.gpu_random_state(), "data": data_positions}


def write_rng_sidecar(state_path, sidecar):
    """The ``.rng`` sidecar of solver state ``state_path`` (the host generator's state, the iteration
    and the solver type; Caffe's solver states record no type, so a state of another type with as
    many history blobs would be taken silently). Written before the solver state: a .solverstate
    that exists (each file is written atomically, the state last) always has its weights and its
    sidecar beside it."""
    atomic_write(state_path + ".rng", json.dumps(sidecar, sort_keys=True))


def read_rng_sidecar(path, iteration, solver_type, log):
    """The ``.rng`` sidecar of solver state ``path``, checked (it must be minicaffe's, for this
    solver type and for the state's ``iteration``, with a generator state that loads), or None with
    a warning when there is none (Caffe's states, or a sidecar that was not copied along)."""
    side = path + ".rng"
    if not os.path.exists(side):
        log.warning("%s: no RNG state (%s); random layers will not replay the interrupted run "
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
    if "type" in data and data["type"] != solver_type:
        raise SolverError(f"{path}: written by the {data['type']} solver (so says {side}), but this is the "
                          f"{solver_type} solver: their history blobs mean different things")
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


def restore_generators(sidecar):
    """Put the random generators where a (checked) sidecar says."""
    backend.rng().bit_generator.state = sidecar["host"]
    if "gpu" in sidecar:   # GPU dropout masks (sidecars before this field: host state only)
        backend.set_gpu_random_state(sidecar["gpu"])


def saved_data_positions(sidecar):
    """The data read positions a sidecar holds, or None (no sidecar, or one from before they were
    recorded: the positions are then replayed from the iteration count)."""
    if sidecar is None or not isinstance(sidecar.get("data"), dict):
        return None
    return sidecar["data"]


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
