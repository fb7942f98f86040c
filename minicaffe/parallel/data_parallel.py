"""Data-parallel training: Caffe's multi-GPU ``NCCL``/``P2PSync`` on MPI (mpi4py) or NCCL (CuPy).

N workers, one process each, run the same solver. Every worker forwards and backwards its own batch
(the solver's batch size is per worker, as in Caffe), the parameter gradients are summed over the
workers and scaled by 1/N (Caffe's ``caffe_gpu_scal(..., 1 / solver_count)``), and every worker
then applies the same update to the same weights, so the weights stay identical without ever being
sent again. Only the root worker (rank 0) tests, logs the display lines and writes snapshots.
All workers start from the root's weights and solver state (broadcast when the solver is wrapped
and after a restore). The LMDB ``Data`` layer of worker ``r`` keeps the records ``i`` with
``i % N == r`` (Caffe's ``DataLayer::Skip``), so an epoch sees every record once: see
``set_solver_rank`` in ``minicaffe.core.context``.

The solver is not patched: ``ParallelSolver`` gives it an ``AllReduceSync``, its gradient
synchronisation strategy (``Solver.set_gradient_sync``, ``minicaffe.solvers.sync``), which the
solver calls at defined points of each forward/backward pass.

Overlap: the gradients are packed into buckets (about ``bucket_mb`` MB each, filled in reverse
layer order; the blobs' ``diff`` arrays become views of the bucket buffers, as Caffe's
``apply_buffers`` does, so nothing is copied), and a non-blocking all-reduce of a bucket starts as
soon as the backward of the lowest layer owning one of its parameters is done; the update waits
for all of them. ``layer_wise_reduce: false`` in the solver turns the overlap off (one reduction of
every bucket after the whole backward), as in Caffe.

Set-up check: before the first broadcast, the workers exchange a SHA-256 of their solver parameters,
train net as built and layer blob shapes (``check_same_setup``); when they differ, every worker
raises ``WorkersDisagree`` with one line naming each differing field and both values, so a worker
started with another solver or net file stops the job at once instead of training other weights,
waiting forever, or failing in MPI with a truncated message.

Communicators differ only in how they move bytes; everything else is shared:

* ``MPIComm``: ``Iallreduce`` through mpi4py, between processes on one machine or many; GPU arrays
  are staged through host memory. MPI progresses a non-blocking collective only inside MPI calls,
  so the reducer polls (``Testall``) after every layer's backward.
* ``NCCLComm``: ``cupy.cuda.nccl`` on a side stream that waits for the compute stream with an event;
  the update waits for the side stream on the device, not on the host.
* ``LocalComm``: a world of one (no communication), for tests and single-process runs.

Processes, not threads (Caffe used one thread per GPU): layers are Python code that holds the GIL
while it drives NumPy or launches CUDA kernels, so N threads would take turns instead of running
side by side. One process per worker has its own interpreter, CUDA context and data prefetch threads.

Entry points: ``mpirun -np N minicaffe train --solver S`` (CPU, or ``--gpu`` for one GPU each by local
rank) and ``minicaffe train --solver S --gpu 0,1`` / ``--gpu all`` (one process per GPU, NCCL). From
Python::

    from minicaffe.parallel import data_parallel as parallel
    comm = parallel.setup_worker()                 # MPIComm under mpirun; before building the solver
    solver = parallel.ParallelSolver(caffe.get_solver("solver.prototxt"), comm)
    solver.solve()                                 # or solver.restore(path); solver.step(n)
"""
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from ..core import backend
from ..core import context as _context
from ..core.context import solver_count, solver_rank
from ..core.context import set_solver_rank as _set_rank_and_count
from ..errors import MinicaffeError, SolverError
from ..proto import is_repeated
from ..solvers.sync import NO_SYNC, GradientSync
from ..core.terminal import debug_enabled, get_logger, print_error

DEFAULT_BUCKET_MB = 25.0

# The launch variables (MINICAFFE_NCCL_UID/RANK/SIZE set by ``spawn_gpu_workers``, MINICAFFE_COMM,
# MINICAFFE_BUCKET_MB, the MPI launchers' world size) are read once into the context's switches.
NCCL_UID_VAR, NCCL_RANK_VAR, NCCL_SIZE_VAR = _context.NCCL_UID_VAR, _context.NCCL_RANK_VAR, _context.NCCL_SIZE_VAR
COMM_VAR = _context.COMM_VAR        # "mpi" or "nccl": which library GPU workers under mpirun use
BUCKET_VAR = _context.BUCKET_VAR    # gradient bucket size for ParallelSolvers built without bucket_mb

_ACTIONS = ("none", "stop", "snapshot")
_multiprocess = {"on": False}


# --- where am I? --------------------------------------------------------------------------------

def mpi_world_size(environ=None):
    """The number of processes an MPI launcher started (1 when not started by one), from the
    launcher's environment variables (this process's, as read at start-up, or ``environ``), without
    initialising MPI."""
    if environ is None:
        return _context.switches().mpi_world_size
    return _context.mpi_world_size_in(environ)


def launched_as_worker(environ=None):
    """True in a process that ``mpirun -np N`` (N > 1) or ``spawn_gpu_workers`` started."""
    if environ is None:
        return _context.switches().nccl_uid is not None or mpi_world_size() > 1
    return NCCL_UID_VAR in environ or mpi_world_size(environ) > 1


def _mpi():
    from ..deps import require
    return require("mpi4py.MPI", "training over MPI")


def _nccl():
    cp = backend.import_cupy()
    try:
        from cupy.cuda import nccl
    except ImportError:
        nccl = None
    if nccl is None or not getattr(nccl, "available", True):
        raise MinicaffeError("multi-GPU training needs NCCL in CuPy (cupy.cuda.nccl); install a CuPy "
                             "wheel with NCCL (pip install minicaffe[gpu]) or the nccl library")
    del cp
    return nccl


def nccl_available():
    """True when CuPy imports, sees a GPU and has its NCCL bindings."""
    if not backend.gpu_available():
        return False
    try:
        _nccl()
    except MinicaffeError:
        return False
    return True


# --- communicators --------------------------------------------------------------------------------

class _Done:
    """A reduction that finished when it was started."""

    def wait(self):
        return None


class Communicator:
    """What data-parallel training needs from a collective library. Subclasses: ``LocalComm``,
    ``MPIComm``, ``NCCLComm``.

    ``allreduce_start(buf, scale)`` starts summing ``buf`` (a 1-d array of the current mode) over all
    workers in place and returns a handle whose ``wait()`` leaves ``scale`` times the sum in ``buf``;
    every worker must start the same reductions in the same order. ``broadcast(buf)`` copies the
    root's array into everyone's (blocking); ``broadcast_int`` does it for one integer.
    """

    name = "local"
    rank, size, local_rank = 0, 1, 0

    def allreduce_start(self, buf, scale=1.0):
        raise NotImplementedError

    def progress(self):
        """Let outstanding reductions advance (MPI moves non-blocking collectives only inside calls)."""

    def broadcast(self, buf, root=0):
        raise NotImplementedError

    def broadcast_int(self, value, root=0):
        raise NotImplementedError

    def barrier(self):
        """Wait until every worker got here."""

    def allgather_bytes(self, data):
        """Every worker's ``data`` (bytes), in rank order, on every worker (blocking). Built from
        broadcasts, one per rank, so any communicator has it; meant for a few small messages at
        start-up (the set-up check), not for training traffic."""
        out = []
        for root in range(self.size):
            n = self.broadcast_int(len(data) if root == self.rank else 0, root=root)
            buf = np.frombuffer(bytes(data), np.uint8).copy() if root == self.rank else np.zeros(n, np.uint8)
            if n:
                self.broadcast(buf, root=root)
            out.append(buf.tobytes())
        return out

    def abort(self, code=1):
        """End every worker of the job now (after an error on one of them, the others would wait
        forever in the next collective)."""
        os._exit(code)

    def close(self):
        """Free the library's resources (the communicator cannot be used afterwards)."""

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class LocalComm(Communicator):
    """A world of one process: reductions only apply the scale. Same interface as the others, so a
    single process can run ``ParallelSolver`` (and the tests can check it changes nothing)."""

    def allreduce_start(self, buf, scale=1.0):
        if scale != 1.0:
            buf *= buf.dtype.type(scale)
        return _Done()

    def broadcast(self, buf, root=0):
        return buf

    def broadcast_int(self, value, root=0):
        return int(value)

    def allgather_bytes(self, data):
        return [bytes(data)]


class _MPIPending:
    __slots__ = ("comm", "req", "buf", "host", "scale")

    def __init__(self, comm, req, buf, host, scale):
        self.comm, self.req, self.buf, self.host, self.scale = comm, req, buf, host, scale

    def wait(self):
        self.req.Wait()
        self.comm._forget(self.req)
        if self.host is not self.buf:
            self.buf.set(self.host)        # back to the device (GPU arrays under MPI)
        if self.scale != 1.0:
            self.buf *= self.buf.dtype.type(self.scale)


class MPIComm(Communicator):
    """Collectives over MPI (mpi4py), between processes of one machine or many (``mpirun -np N``,
    with ``--hostfile`` for several machines). ``comm`` defaults to ``MPI.COMM_WORLD``. CuPy arrays
    are reduced through host copies (no CUDA-aware MPI is assumed)."""

    name = "mpi"

    def __init__(self, comm=None):
        self.MPI = _mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)   # workers on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._outstanding = []
        self._staging = {}

    def _host(self, buf, fill=True):
        if isinstance(buf, np.ndarray):
            return buf
        entry = self._staging.get(id(buf))
        if entry is None or entry[0] is not buf:
            entry = (buf, np.empty(buf.shape, buf.dtype))
            self._staging[id(buf)] = entry
        if fill:
            buf.get(out=entry[1])
        return entry[1]

    def allreduce_start(self, buf, scale=1.0):
        host = self._host(buf)
        req = self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        self._outstanding.append(req)
        return _MPIPending(self, req, buf, host, scale)

    def _forget(self, req):
        try:
            self._outstanding.remove(req)
        except ValueError:
            pass

    def progress(self):
        if self._outstanding:
            self.MPI.Request.Testall(self._outstanding)

    def broadcast(self, buf, root=0):
        host = self._host(buf)
        self.comm.Bcast(host, root=root)
        if host is not buf:
            buf.set(host)
        return buf

    def broadcast_int(self, value, root=0):
        arr = np.array([int(value)], dtype=np.int64)
        self.comm.Bcast(arr, root=root)
        return int(arr[0])

    def barrier(self):
        self.comm.Barrier()

    def allgather_bytes(self, data):
        return [bytes(d) for d in self.comm.allgather(bytes(data))]

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self):
        self._staging.clear()


_NCCL_TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32",
               "int64": "NCCL_INT64"}


class _NCCLPending:
    __slots__ = ("done",)

    def __init__(self, done):
        self.done = done

    def wait(self):
        # the compute stream waits on the device for the reduction; the host goes on
        backend.import_cupy().cuda.get_current_stream().wait_event(self.done)


def new_nccl_uid():
    """A fresh NCCL unique id as a hex string (to hand to every worker). The process that makes it
    hosts NCCL's bootstrap and must live until every worker has built its communicator."""
    uid = _nccl().get_unique_id()
    raw = bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(int(v) % 256 for v in uid)
    return raw.hex()


def _nccl_communicator(nccl, size, uid_hex, rank):
    raw = bytes.fromhex(uid_hex)
    try:                    # CuPy >= 13 takes the id as bytes, older CuPy as a tuple of signed chars
        return nccl.NcclCommunicator(size, raw, rank)
    except TypeError:
        return nccl.NcclCommunicator(size, tuple(b - 256 if b > 127 else b for b in raw), rank)


class NCCLComm(Communicator):
    """Collectives over NCCL between GPUs (``cupy.cuda.nccl``), one GPU per process: ``uid`` from
    ``new_nccl_uid()`` (the same on every worker), this worker's ``rank`` of ``size``. The current
    CUDA device is this worker's. Reductions run on a side stream that waits for the compute stream
    with an event, so the backward of lower layers goes on while upper layers' gradients travel.
    ``host_comm``: an ``MPIComm`` that bootstrapped the id (used for ``abort`` and the local rank)."""

    name = "nccl"

    def __init__(self, uid, rank, size, host_comm=None):
        self.cp = backend.import_cupy()
        self.nccl = _nccl()
        self.rank, self.size = int(rank), int(size)
        self.host_comm = host_comm
        self.local_rank = host_comm.local_rank if host_comm is not None else self.rank
        self.comm = _nccl_communicator(self.nccl, self.size, uid, self.rank)
        self.stream = self.cp.cuda.Stream(non_blocking=True)

    def _type(self, arr):
        name = _NCCL_TYPES.get(str(arr.dtype))
        if name is None:
            raise SolverError(f"NCCL cannot reduce arrays of type {arr.dtype}")
        return getattr(self.nccl, name)

    def _device(self, buf):
        if isinstance(buf, np.ndarray):
            raise SolverError("NCCL reduces GPU arrays: run in GPU mode (--gpu, or caffe.set_mode_gpu() "
                              "before building the solver)")
        return buf

    def _after_compute(self):
        ready = self.cp.cuda.Event(disable_timing=True)
        ready.record(self.cp.cuda.get_current_stream())
        self.stream.wait_event(ready)

    def allreduce_start(self, buf, scale=1.0):
        self._device(buf)
        self._after_compute()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf), self.nccl.NCCL_SUM,
                            self.stream.ptr)
        if scale != 1.0:
            with self.stream:
                buf *= buf.dtype.type(scale)
        done = self.cp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return _NCCLPending(done)

    def broadcast(self, buf, root=0):
        if isinstance(buf, np.ndarray):
            dev = self.cp.asarray(buf)
            self.broadcast(dev, root)
            buf[...] = dev.get()
            return buf
        self._after_compute()
        self.comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, self.stream.ptr)
        self.stream.synchronize()
        return buf

    def broadcast_int(self, value, root=0):
        arr = self.cp.asarray(np.array([int(value)], dtype=np.int64))
        self.broadcast(arr, root)
        return int(arr.get()[0])

    def barrier(self):
        self.broadcast_int(0)

    def abort(self, code=1):
        if self.host_comm is not None:
            self.host_comm.abort(code)
        try:
            self.comm.abort()
        finally:
            os._exit(code)

    def close(self):
        self.stream.synchronize()
        self.comm.destroy()


def communicator(kind=None):
    """The communicator of this process, from the way it was started: an ``NCCLComm`` in a process
    of ``spawn_gpu_workers``; under ``mpirun -np N`` (N > 1) an ``MPIComm``, or in GPU mode an
    ``NCCLComm`` whose id rank 0 made and MPI broadcast (``kind`` or $MINICAFFE_COMM = 'mpi' keeps
    MPI); otherwise a ``LocalComm``. In GPU mode, select this worker's device first."""
    env = _context.switches()
    kind = kind or env.comm
    if kind not in (None, "mpi", "nccl", "local"):
        raise MinicaffeError(f"unknown communicator '{kind}' (use mpi, nccl or local)")
    if env.nccl_uid is not None:
        try:
            rank, size = int(env.nccl_rank), int(env.nccl_size)
        except (TypeError, ValueError):
            raise MinicaffeError(f"{NCCL_UID_VAR} is set but {NCCL_RANK_VAR}/{NCCL_SIZE_VAR} are not "
                                 f"integers") from None
        return NCCLComm(env.nccl_uid, rank, size)
    if kind == "local" or (kind is None and mpi_world_size() <= 1):
        return LocalComm()
    mpi = MPIComm()
    if kind == "nccl" or (kind is None and backend.is_gpu() and nccl_available()):
        uid = mpi.comm.bcast(new_nccl_uid() if mpi.rank == 0 else None, root=0)
        return NCCLComm(uid, mpi.rank, mpi.size, host_comm=mpi)
    return mpi


# --- set-up (Caffe's set_solver_count / set_solver_rank / set_multiprocess) ----------------------

def setup_worker(comm=None, quiet_workers=True):
    """Make this process worker ``comm.rank`` of ``comm.size`` and return the communicator (built by
    ``communicator()`` when not given). Call it before building the solver: data layers built
    afterwards read only their shard, the solver seeds ``random_seed + rank`` and, on workers,
    builds no test nets. ``quiet_workers``: workers log warnings and errors only (Caffe logs
    through the root solver)."""
    comm = communicator() if comm is None else comm
    _set_rank_and_count(comm.rank, comm.size)
    _multiprocess["on"] = comm.size > 1
    if quiet_workers and comm.rank != 0:
        get_logger().setLevel(logging.WARNING)
    return comm


def set_solver_count(count):
    """pycaffe's ``caffe.set_solver_count``: how many workers train together."""
    count = int(count)
    _set_rank_and_count(solver_rank() if solver_rank() < count else 0, count)


def set_solver_rank(rank):
    """pycaffe's ``caffe.set_solver_rank``: this process's worker index (after ``set_solver_count``)."""
    _set_rank_and_count(int(rank), solver_count())


def set_multiprocess(on):
    """pycaffe's ``caffe.set_multiprocess``. minicaffe always runs one process per worker, so this
    only records the flag (see ``multiprocess()``)."""
    _multiprocess["on"] = bool(on)


def multiprocess():
    return _multiprocess["on"]


# --- gradient buckets ------------------------------------------------------------------------------

class _Bucket:
    """A flat buffer holding the gradients of some parameters; their blobs' diffs are views of it."""

    def __init__(self, blobs, ready_layer, xp):
        self.blobs, self.ready_layer, self.xp = list(blobs), ready_layer, xp
        self.count = sum(b.count for b in self.blobs)
        self.flat = xp.zeros(self.count, dtype=self.blobs[0].dtype)
        self.views = []
        offset = 0
        for b in self.blobs:
            view = self.flat[offset:offset + b.count].reshape(b.shape)
            offset += b.count
            self.views.append(view)
        self.attach()

    @property
    def nbytes(self):
        return self.count * self.flat.dtype.itemsize

    def attach(self):
        """Make every blob's diff our view again, keeping its values (a layer or a user may have
        replaced the array instead of accumulating into it)."""
        for b, view in zip(self.blobs, self.views):
            diff = b.xdiff
            if diff is not view:
                view[...] = diff
                b.xdiff = view


class GradientReducer:
    """The parameter gradients of ``net`` in buckets of about ``bucket_bytes``, filled in reverse
    layer order, each all-reduced (scaled by 1/N) as soon as the layers owning it are done.

    A parameter is final once the backward of the lowest layer using it has run (shared
    parameters collect gradients from several layers), so that layer's index is when its bucket
    may start. Use: ``begin()``, then ``layer_done(i)`` after the backward of each layer i from the
    top down, then ``finish()``. ``comm_s``/``wait_s`` add up the seconds spent starting/polling and
    waiting for the reductions.
    """

    def __init__(self, net, comm, bucket_bytes=DEFAULT_BUCKET_MB * 2 ** 20):
        self.net, self.comm = net, comm
        self.bucket_bytes = max(int(bucket_bytes), 1)
        self.scale = 1.0 / comm.size
        self.comm_s = self.wait_s = 0.0
        self._pending = []
        self._build()

    def _build(self):
        params = self.net.learnable_params
        index = {id(b): i for i, b in enumerate(params)}
        ready = [None] * len(params)
        for li, layer in enumerate(self.net.layers):
            for b in layer.blobs:
                i = index.get(id(b))
                if i is not None and ready[i] is None:
                    ready[i] = li
        order = sorted((i for i in range(len(params)) if ready[i] is not None), key=lambda i: (-ready[i], i))
        xp = backend.xp()
        self.xp = xp
        groups, current, size = [], [], 0
        for i in order:
            current.append(i)
            size += params[i].count * np.dtype(params[i].dtype).itemsize
            if size >= self.bucket_bytes:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        self.buckets = [_Bucket([params[i] for i in g], min(ready[i] for i in g), xp) for g in groups]
        self._by_layer = {}
        for bucket in self.buckets:
            self._by_layer.setdefault(bucket.ready_layer, []).append(bucket)

    @property
    def nbytes(self):
        """Bytes all-reduced per iteration (the gradients of every learnable parameter)."""
        return sum(b.nbytes for b in self.buckets)

    def begin(self):
        if backend.xp() is not self.xp:       # the mode changed since the buckets were made
            self._build()
        self._pending = []

    def layer_done(self, layer_index):
        buckets = self._by_layer.get(layer_index)
        if not buckets and not self._pending:
            return
        t0 = time.perf_counter()
        for bucket in buckets or ():
            bucket.attach()
            self._pending.append(self.comm.allreduce_start(bucket.flat, self.scale))
        if self._pending:
            self.comm.progress()
        self.comm_s += time.perf_counter() - t0

    def finish(self):
        t0 = time.perf_counter()
        for pending in self._pending:
            pending.wait()
        self._pending = []
        self.wait_s += time.perf_counter() - t0

    def reduce_all(self):
        """Reduce every bucket now (no overlap): after a plain backward."""
        self.begin()
        for li in sorted(self._by_layer, reverse=True):
            self.layer_done(li)
        self.finish()


# --- the set-up check -----------------------------------------------------------------------------

class WorkersDisagree(SolverError):
    """The workers were started with different solvers or nets. Every worker raises it at the same
    point with the same message (they all compare the same gathered descriptions), so none is left
    waiting in a collective and the job ends without an MPI abort."""


# Solver fields left out of the comparison: each worker's own GPU, and where the train net came from
# (the net as built is compared instead, so the same net in two files, or inline, agrees).
_PER_WORKER_FIELDS = ("device_id", "net", "net_param", "train_net", "train_net_param")
_MAX_REPORTED = 4


def setup_description(solver):
    """What must be the same on every worker, as bytes: the solver parameters (less the fields of
    ``_PER_WORKER_FIELDS``), the train net as built (filtered by phase and state) and the shape of
    every layer blob (shapes can depend on the data, e.g. the image size of an LMDB)."""
    import json
    from ..proto import caffe_pb2
    param = caffe_pb2.SolverParameter()
    param.CopyFrom(solver.param)
    for name in _PER_WORKER_FIELDS:
        param.ClearField(name)
    net = solver.net
    shapes = [[name, i, [int(d) for d in b.shape]]
              for name, layer in zip(net.layer_names, net.layers) for i, b in enumerate(layer.blobs)]
    return json.dumps({
        "solver": param.SerializeToString(deterministic=True).hex(),
        "net": net.param.SerializeToString(deterministic=True).hex(),
        "shapes": shapes,
        "file": getattr(solver, "solver_file", None) or "",
    }, sort_keys=True).encode()


def check_same_setup(solver, comm):
    """Stop every worker together, naming what differs, when they were not started with the same
    solver and net. Without it a different ``base_lr`` silently trains different weights, a different
    ``max_iter`` leaves the workers that finish first waiting forever in a collective, and a different
    net breaks the first broadcast (``MPI_ERR_TRUNCATE``). The workers first exchange a SHA-256 of
    ``setup_description`` (32 bytes each); only when those differ do they exchange the descriptions
    themselves and compare them field by field. Differences of presence alone (a field set to its
    default on one worker, left out on the other) do not count."""
    import hashlib
    if comm.size <= 1:
        return
    mine = setup_description(solver)
    digests = comm.allgather_bytes(hashlib.sha256(mine).digest())
    if all(d == digests[0] for d in digests):
        return
    message = setup_differences(comm.allgather_bytes(mine))
    if message:
        raise WorkersDisagree(message)


def setup_differences(descriptions):
    """One line saying how the workers' ``setup_description`` differ from rank 0's, or '' when they
    agree (same effective values)."""
    import json
    from ..proto import caffe_pb2
    decoded = [json.loads(d.decode()) for d in descriptions]

    def parsed(entry):
        solver, net = caffe_pb2.SolverParameter(), caffe_pb2.NetParameter()
        solver.ParseFromString(bytes.fromhex(entry["solver"]))
        net.ParseFromString(bytes.fromhex(entry["net"]))
        return solver, net

    root_solver, root_net = parsed(decoded[0])
    items, files = [], {}
    for rank, entry in enumerate(decoded[1:], start=1):
        solver, net = parsed(entry)
        found = _differences(root_solver, solver, "") + _differences(root_net, net, "net ")
        if not found:
            found = _shape_differences(decoded[0]["shapes"], entry["shapes"])
        for path, at_root, here in found:
            items.append(f"rank {rank} has {path}: {here}, rank 0 has {path}: {at_root}")
        if found:
            files[rank] = entry["file"]
    if not items:
        return ""
    shown = "; ".join(items[:_MAX_REPORTED])
    if len(items) > _MAX_REPORTED:
        shown += f"; and {len(items) - _MAX_REPORTED} more"
    where = ", ".join(f"rank {r}: {f}" for r, f in [(0, decoded[0]["file"])] + sorted(files.items()) if f)
    return (f"the workers were started with different solver or net definitions"
            f"{f' ({where})' if where else ''}: {shown}")


def _text(fd, value):
    """A field value as the prototxt would spell it (floats as the float32 they are)."""
    if fd.type == fd.TYPE_MESSAGE:
        from google.protobuf import text_format
        text = text_format.MessageToString(value, as_one_line=True).strip()
        text = "{ " + text + " }" if text else "{ }"
        return text if len(text) <= 80 else text[:77] + "..."
    if fd.type == fd.TYPE_ENUM:
        entry = fd.enum_type.values_by_number.get(value)
        return entry.name if entry is not None else str(value)
    if fd.type == fd.TYPE_FLOAT:
        return format(value, ".7g")
    if fd.type == fd.TYPE_BOOL:
        return "true" if value else "false"
    if fd.type == fd.TYPE_STRING:
        return '"' + value.replace('"', '\\"') + '"'
    return str(value)


def _differences(a, b, path):
    """``(field path, value in a, value in b)`` for every field whose effective value differs (an
    unset field counts as its default), descending into messages. Repeated messages with unique
    names (layers) are matched by name."""
    out = []
    fields = {fd.number: fd for fd, _ in a.ListFields()}
    fields.update({fd.number: fd for fd, _ in b.ListFields()})
    for number in sorted(fields):
        fd = fields[number]
        name = path + fd.name
        va, vb = getattr(a, fd.name), getattr(b, fd.name)
        if is_repeated(fd):
            if fd.type == fd.TYPE_MESSAGE:
                out += _repeated_differences(fd, list(va), list(vb), name)
            elif list(va) != list(vb):
                out.append((name, "[" + ", ".join(_text(fd, v) for v in va) + "]",
                            "[" + ", ".join(_text(fd, v) for v in vb) + "]"))
        elif fd.type == fd.TYPE_MESSAGE:
            out += _differences(va, vb, name + ".")
        elif va != vb:
            out.append((name, _text(fd, va), _text(fd, vb)))
    return out


def _repeated_differences(fd, va, vb, name):
    keyed = "name" in fd.message_type.fields_by_name
    names_a = [m.name for m in va] if keyed else []
    names_b = [m.name for m in vb] if keyed else []
    if keyed and all(names_a) and all(names_b) and len(set(names_a)) == len(names_a) \
            and len(set(names_b)) == len(names_b):
        by_a, by_b = dict(zip(names_a, va)), dict(zip(names_b, vb))
        out = []
        for n in names_a + [n for n in names_b if n not in by_a]:
            if getattr(by_a.get(n), "type", "") == "Split" or getattr(by_b.get(n), "type", "") == "Split":
                continue        # inserted by the net for a blob used twice: follows from the others
            where = f'{name}["{n}"]'
            if n not in by_b:
                out.append((where, _text(fd, by_a[n]), "(none)"))
            elif n not in by_a:
                out.append((where, "(none)", _text(fd, by_b[n])))
            else:
                out += _differences(by_a[n], by_b[n], where + ".")
        if not out and names_a != names_b:
            out.append((f"{name} order", "[" + ", ".join(names_a) + "]", "[" + ", ".join(names_b) + "]"))
        return out
    out = []
    if len(va) != len(vb):
        out.append((f"{name} count", str(len(va)), str(len(vb))))
    for i, (ma, mb) in enumerate(zip(va, vb)):
        out += _differences(ma, mb, f"{name}[{i}].")
    return out


def _shape_differences(shapes_a, shapes_b):
    """Layer blob shapes that differ although the nets' definitions agree (the data differs)."""
    a = {(n, i): tuple(s) for n, i, s in shapes_a}
    b = {(n, i): tuple(s) for n, i, s in shapes_b}
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            show = lambda s: "(none)" if s is None else "(" + ", ".join(map(str, s)) + ")"  # noqa: E731
            out.append((f'net layer["{key[0]}"] blob {key[1]} shape', show(a.get(key)), show(b.get(key))))
    return out


# --- the solver wrapper ---------------------------------------------------------------------------

def _bucket_mb(value):
    """``value``, else $MINICAFFE_BUCKET_MB (tuning without code: the command line has no flag for it),
    else ``DEFAULT_BUCKET_MB``."""
    if value is None:
        value = _context.switches().bucket_mb or DEFAULT_BUCKET_MB
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise MinicaffeError(f"gradient bucket size (bucket_mb or ${BUCKET_VAR}) must be a positive number "
                             f"of MB, got {value!r}")
    return mb


class AllReduceSync(GradientSync):
    """The data-parallel gradient synchronisation strategy (``minicaffe.solvers.sync``): after each
    worker's backward the parameter gradients are all-reduced over ``comm`` and scaled by 1/N, so
    every worker applies the same update. MPI or NCCL is the communicator it is given (``MPIComm``,
    ``NCCLComm``; ``LocalComm`` for a world of one).

    The loss of each pass is all-reduced too (the solver records, logs and checks the mean over the
    workers). On the last of the solver's ``iter_size`` passes, with ``overlap``, the solver runs the
    backward layer by layer and a bucket's reduction starts as soon as the layers owning it are done
    (``GradientReducer``); without, every bucket is reduced after the whole backward.
    ``stats``/``reducer`` count the passes and the seconds (``communication_share``)."""

    def __init__(self, net, comm, bucket_bytes=DEFAULT_BUCKET_MB * 2 ** 20, overlap=True):
        self.comm = comm
        self.name, self.rank, self.size = comm.name, comm.rank, comm.size
        self.layer_wise = bool(overlap)
        self.reducer = GradientReducer(net, comm, bucket_bytes)
        self._loss = backend.xp().zeros(1, dtype=np.float64)
        self._loss_pending = None
        self._t0 = 0.0
        self.stats = {"passes": 0, "forward_backward_s": 0.0}

    def before_forward(self, last):
        self._t0 = time.perf_counter()

    def after_forward(self, loss, last):
        self._loss[0] = loss
        self._loss_pending = self.comm.allreduce_start(self._loss, 1.0 / self.size)
        if last and self.layer_wise:
            self.reducer.begin()

    def after_layer_backward(self, layer_index):
        self.reducer.layer_done(layer_index)

    def after_backward(self, loss, last):
        if last:
            if self.layer_wise:
                self.reducer.finish()
            else:
                self.reducer.reduce_all()
        pending, self._loss_pending = self._loss_pending, None
        pending.wait()
        # on the GPU the mean stays a device scalar (a copy: the buffer is reused next pass), read by
        # the solver at its check points like a single GPU's loss; on the CPU a float, checked at once
        mean = self._loss[0].copy() if backend.is_gpu() else float(self._loss[0])
        self.stats["passes"] += 1
        self.stats["forward_backward_s"] += time.perf_counter() - self._t0
        return mean

    def agree(self, value):
        """The root's value of a flag (bool) or a solver action ('none', 'stop', 'snapshot')."""
        if isinstance(value, (bool, np.bool_)):
            return bool(self.comm.broadcast_int(int(bool(value))))
        if value not in _ACTIONS:
            raise SolverError(f"cannot agree on {value!r}: expected a bool or one of {', '.join(_ACTIONS)}")
        return _ACTIONS[self.comm.broadcast_int(_ACTIONS.index(value))]

    def communication_share(self):
        """Seconds in all-reduce calls and waits / seconds of forward-backward, so far."""
        total = self.stats["forward_backward_s"]
        return (self.reducer.comm_s + self.reducer.wait_s) / total if total else 0.0

    def __repr__(self):
        return f"<AllReduceSync over {self.comm!r}>"


class ParallelSolver:
    """One worker of synchronous data-parallel training around a ``Solver`` (Caffe's ``NCCL`` +
    ``Solver`` pair). Every worker wraps its own solver, built from the same solver file after
    ``setup_worker(comm)``, and calls the same methods (``solve``, ``step``, ``restore``).

    On wrapping, the root's weights, solver history and iteration are broadcast to every worker, and
    the solver is given an ``AllReduceSync`` (``solver.set_gradient_sync``): each training pass then
    forwards/backwards the worker's own batch and all-reduces the gradients (overlapped with backward
    unless the solver says ``layer_wise_reduce: false``); the loss the solver sees (and logs, and
    checks for NaN) is the mean over the workers. Other attributes (``net``, ``iter``, ``param``,
    ``test_nets``, ``snapshot`` ...) are the wrapped solver's.

    ``comm``: default ``communicator()`` (MPI under mpirun, else a world of one). ``bucket_mb``:
    gradient bucket size, default $MINICAFFE_BUCKET_MB or 25 (larger: fewer reductions, each paying
    the latency once; smaller: reductions start earlier in the backward). ``overlap``: default the
    solver's ``layer_wise_reduce``.
    """

    def __init__(self, solver, comm=None, bucket_mb=None, overlap=None):
        if isinstance(solver, ParallelSolver):
            raise SolverError("this solver is already wrapped in a ParallelSolver")
        if solver.gradient_sync is not NO_SYNC:
            raise SolverError(f"this solver already belongs to a ParallelSolver (it synchronises its "
                              f"gradients with {solver.gradient_sync!r})")
        comm = communicator() if comm is None else comm
        if (solver_rank(), solver_count()) != (comm.rank, comm.size):
            raise SolverError(
                f"the solver was built as worker {solver_rank()} of {solver_count()}, but the communicator "
                f"is rank {comm.rank} of {comm.size}: call minicaffe.parallel.setup_worker(comm) before "
                f"building the solver, so its data layers read their own shard")
        self.solver, self.comm = solver, comm
        self.rank, self.size = comm.rank, comm.size
        self.overlap = bool(solver.param.layer_wise_reduce if overlap is None else overlap)
        self.sync = AllReduceSync(solver.net, comm, _bucket_mb(bucket_mb) * 2 ** 20, self.overlap)
        self.reducer, self.stats = self.sync.reducer, self.sync.stats
        check_same_setup(solver, comm)       # before the first broadcast, which a different net breaks
        solver.set_gradient_sync(self.sync)
        self.broadcast_state()

    # --- delegation -----------------------------------------------------------------------------
    def __getattr__(self, name):
        if name == "solver":          # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.solver, name)

    def __repr__(self):
        return f"<ParallelSolver {type(self.solver).__name__} over {self.comm!r}>"

    @property
    def is_root(self):
        return self.rank == 0

    def agree(self, value):
        """The root's value of a flag (bool) or a solver action ('none', 'stop', 'snapshot')."""
        return self.sync.agree(value)

    # --- state ----------------------------------------------------------------------------------
    def _state_blobs(self):
        seen, blobs = set(), []
        for layer in self.solver.net.layers:
            for b in layer.blobs:
                if id(b) not in seen:
                    seen.add(id(b))
                    blobs.append(b)
        return blobs + list(self.solver.history)

    def broadcast_state(self):
        """Copy the root's weights (every layer blob), solver history, iteration and learning-rate
        step to every worker; a worker whose iteration changed repositions its data layers."""
        s = self.solver
        for blob in self._state_blobs():
            self.comm.broadcast(blob.xdata.reshape(-1))
        it = self.comm.broadcast_int(s.iter)
        s.current_step = self.comm.broadcast_int(s.current_step)
        if it != s.iter:
            s.iter = it
            s.restore_data_positions()

    def restore(self, path):
        """Resume from a ``.solverstate``: the root reads it (the file need only exist where the root
        runs) and broadcasts weights, history and iteration. Works whatever the number of workers
        that wrote it. Workers > 0 draw a random stream of their own from (random_seed, iter, rank)."""
        error = None
        if self.rank == 0:
            try:
                self.solver.restore(path)
            except MinicaffeError as exc:
                error = exc
        if not self.agree(error is None):
            raise error if error is not None else SolverError(
                f"{path}: the root worker (rank 0) could not restore this solver state (see its error)")
        self.broadcast_state()
        if self.rank != 0:
            seed = self.solver.param.random_seed
            entropy = [seed, self.solver.iter, self.rank] if seed >= 0 else None
            ss = np.random.SeedSequence(entropy)
            backend.set_random_seed(int(ss.generate_state(1)[0]))

    def solve(self, resume_file=None):
        if resume_file:
            self.restore(resume_file)
        return self.solver.solve()

    def step(self, iters):
        return self.solver.step(iters)

    def communication_share(self):
        """Seconds in all-reduce calls and waits / seconds of forward-backward, so far."""
        return self.sync.communication_share()

    def close(self):
        """Detach from the solver (it trains alone again); the communicator stays open."""
        if self.solver.gradient_sync is self.sync:
            self.solver.set_gradient_sync(None)


# --- launching -----------------------------------------------------------------------------------

def start_worker(gpus=(), kind=None):
    """For ``minicaffe train`` in a process started by ``mpirun`` or ``spawn_gpu_workers``: pick this
    worker's GPU (``gpus[local_rank % len(gpus)]``) when ``gpus`` is given, switch to GPU mode,
    build the communicator and make this process its worker. Returns ``(comm, [gpu] or [])``."""
    gpus = list(gpus)
    if _context.switches().nccl_uid is not None:
        if len(gpus) != 1:
            raise MinicaffeError(f"a worker started with {NCCL_UID_VAR} needs exactly one --gpu")
        backend.set_device(gpus[0])
        backend.set_mode_gpu()
        return setup_worker(communicator(kind)), gpus
    if gpus:
        host = MPIComm()
        gpu = gpus[host.local_rank % len(gpus)]
        backend.set_device(gpu)
        backend.set_mode_gpu()
        kind = kind or _context.switches().comm or ("nccl" if nccl_available() else "mpi")
        if kind == "nccl":
            uid = host.comm.bcast(new_nccl_uid() if host.rank == 0 else None, root=0)
            comm = NCCLComm(uid, host.rank, host.size, host_comm=host)
        else:
            comm = host
        return setup_worker(comm), [gpu]
    return setup_worker(communicator(kind or "mpi")), []


def abort_job(comm, exc):
    """After an error on one worker: print it (``error: <message>`` as the CLIs do, naming the
    worker) and end every worker, which would otherwise wait forever in the next collective."""
    if debug_enabled() or not isinstance(exc, (MinicaffeError, OSError)):
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    else:
        print_error(f"[worker {comm.rank} of {comm.size}] {exc}")
    comm.abort(1)


def spawn_gpu_workers(argv_for_gpu, gpus, python=None, poll_s=0.2):
    """Run one training process per GPU with NCCL between them (``minicaffe train --gpu 0,1``): the
    process ``r`` runs ``python -m minicaffe.tools.cli <argv_for_gpu(gpus[r])>`` with the NCCL id,
    its rank and the world size in its environment. If one fails, the others are stopped. Returns
    the exit code (0 when all succeeded). Terminal signals (Ctrl-C) reach the workers directly;
    they agree on the root's action, and this process waits for them."""
    uid = new_nccl_uid()
    procs, old = [], {}
    try:
        for rank, gpu in enumerate(gpus):
            env = _context.child_environment(**{NCCL_UID_VAR: uid, NCCL_RANK_VAR: str(rank),
                                                NCCL_SIZE_VAR: str(len(gpus))})
            cmd = [python or sys.executable, "-m", "minicaffe.tools.cli"] + list(argv_for_gpu(gpu))
            procs.append(subprocess.Popen(cmd, env=env))
        # the workers get the terminal's signals themselves; this process only waits for them
        for sig in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is not None and threading.current_thread() is threading.main_thread():
                old[sig] = signal.signal(sig, signal.SIG_IGN)
        code = 0
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc if rc > 0 else 1
                    for other in procs:
                        other.terminate()
            if procs:
                time.sleep(poll_s)
        return code
    finally:
        for p in procs:
            p.kill()
        for sig, handler in old.items():
            signal.signal(sig, handler)
