"""The small pieces of pycaffe's ``_caffe`` module beyond Net and the solvers: ``Timer``, ``NCCL``,
``has_nccl``, ``init_log`` and ``log``. Scripts written for BVLC Caffe call them (``python/train.py``
uses NCCL and Timer), so ``import minicaffe as caffe`` must have them with the same behaviour.

As in Caffe, ``caffe.pycaffe`` also names ``Net`` and the solver classes (loaded on first use)."""
import logging
import time

from ..core import backend

__all__ = ["Timer", "NCCL", "has_nccl", "init_log", "log", "Net", "SGDSolver", "NesterovSolver",
           "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]


class Timer:
    """Caffe's Timer: ``start()``, ``stop()``, ``ms`` (milliseconds between them; reading ``ms`` while
    running stops it first, and reading before any ``start()`` gives 0, as Caffe's MilliSeconds).
    In GPU mode the device is synchronized at start and stop, so queued kernels are counted where
    they run rather than where they were launched (Caffe times with CUDA events for the same reason)."""

    def __init__(self):
        self._t0 = self._t1 = 0.0
        self._running = False
        self._has_run = False

    def start(self):
        if not self._running:
            backend.synchronize()
            self._t0 = time.perf_counter()
            self._running = True
            self._has_run = True

    def stop(self):
        if self._running:
            backend.synchronize()
            self._t1 = time.perf_counter()
            self._running = False

    @property
    def ms(self):
        if not self._has_run:
            _logger().warning("Timer has never been run before reading time.")
            return 0.0
        if self._running:
            self.stop()
        return (self._t1 - self._t0) * 1000.0

    @property
    def seconds(self):
        return self.ms / 1000.0




def has_nccl():
    """True when multi-GPU NCCL training can run here (CuPy with its NCCL bindings and a GPU), the
    question Caffe's ``has_nccl`` answers for its build."""
    from ..parallel import data_parallel as parallel
    return parallel.nccl_available()


class NCCL:
    """pycaffe's ``caffe.NCCL(solver, uid)`` for one-process-per-GPU training as in Caffe's
    ``python/train.py``: every process calls ``set_solver_count``/``set_solver_rank`` and builds its
    solver, then ``nccl = caffe.NCCL(solver, uid)`` with the ``uid`` rank 0 made by
    ``NCCL.new_uid()``, ``nccl.bcast()``, ``solver.add_callback(nccl)`` and (with
    ``layer_wise_reduce``) ``solver.net.after_backward(nccl)``; then ``solver.step(n)`` trains on
    every GPU with the gradients summed between them.

    Here the object wires the solver into minicaffe's data-parallel solver
    (``minicaffe.parallel.ParallelSolver`` over an ``NCCLComm``) when it is made, so registering it
    as a callback or an after_backward hook is accepted and adds nothing: the reduction, overlapped
    with backward per the solver's ``layer_wise_reduce``, already runs inside ``solver.step``."""

    installs_gradient_sync = True      # Solver.add_callback(nccl) then adds nothing: the sync is installed

    def __init__(self, solver, uid):
        from ..parallel import data_parallel as parallel
        from ..core.context import solver_count, solver_rank
        uid_hex = uid.hex() if isinstance(uid, (bytes, bytearray)) else str(uid)
        comm = parallel.NCCLComm(uid_hex, solver_rank(), solver_count())
        self.solver = solver
        self.parallel = parallel.ParallelSolver(solver, comm)     # broadcasts the root's weights

    @staticmethod
    def new_uid():
        """A fresh NCCL unique id (bytes, as pycaffe under Python 3) to give every process."""
        from ..parallel import data_parallel as parallel
        return bytes.fromhex(parallel.new_nccl_uid())

    def bcast(self):
        """Copy rank 0's weights and solver state to every process (Caffe's NCCL::Broadcast)."""
        self.parallel.broadcast_state()

    def __call__(self, *args):
        # as a Net.after_backward hook: the ParallelSolver already reduces after each layer's backward
        return None


def init_log(level=None, stderr=None):
    """pycaffe's ``caffe.init_log([level[, stderr]])``: start Caffe-style logging to stderr;
    ``level`` is glog's minloglevel (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL), as ``GLOG_minloglevel``.
    ``stderr`` is accepted for pycaffe's signature; minicaffe always logs to stderr and writes no
    glog files under /tmp."""
    logger = _logger()
    if level is not None:
        level = int(level)
        logger.setLevel({0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}.get(level, logging.CRITICAL)
                        if level >= 0 else logging.INFO)
    del stderr
    return None


def log(message):
    """pycaffe's ``caffe.log(s)``: one INFO line in Caffe's log format."""
    _logger().info("%s", message)


def _logger():
    from ..core.terminal import get_logger
    return get_logger()


def __getattr__(name):
    if name == "Net":
        from ..net.network import Net
        return Net
    if name in __all__:
        from .. import solvers
        return getattr(solvers, name)
    raise AttributeError(f"module 'minicaffe.pycaffe' has no attribute {name!r}")
