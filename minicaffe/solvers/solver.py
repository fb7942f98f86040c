"""The training loop: Caffe's ``Solver``/``SGDSolver`` (src/caffe/solver.cpp, solvers/sgd_solver.cpp).

A solver reads a SolverParameter (params.py), builds the train net and the test nets (which share
the train net's weights), and runs Caffe's ``Step``: forward/backward ``iter_size`` times, log,
update with the solver type's rule (``updates.py``) at the rate of the ``lr_policy``
(``lr_policy.py``), test every ``test_interval``, snapshot every ``snapshot`` iterations
(checkpoint.py). The log lines are worded as Caffe's, so Caffe's and minicaffe's log parsers read them.

The solver's neighbours, each in its module: reading and checking the solver definition
(params.py), building the nets it names (nets.py), the snapshot files, the ``.rng`` sidecar and the
snapshot prefix lock (checkpoint.py), finding where a NaN appeared (diagnosis.py), SIGINT/SIGHUP
(signals.py), the type name -> class registry (registry.py) and the gradient synchronisation
strategy of data-parallel training (sync.py; ``minicaffe.parallel`` provides the all-reduce one).

Beyond Caffe: snapshots are written atomically; resuming is bit-exact (the host random generator's
state goes to a ``.solverstate.rng`` sidecar, with the solver type, the GPU generator's position and
the read positions of the data layers that report one (``data_position()``/``restore_data_position()``;
layers with only ``restore_position(n)``, or sidecars without positions, are told how many records the
train/test nets had read); a NaN or infinite loss stops training with a ``NumericalError`` naming the
iteration and the first layer holding a non-finite value, after a snapshot of the last good weights
(on the GPU the losses are read at check points instead of every iteration: a value found there after
its iteration's update has run stops training without a snapshot; see ``_read_pending``); a
data layer failing to read (a ``DataError``) stops training the same way, after a snapshot of the state
before that iteration. The snapshot folder is checked at start-up (a final and a NaN-stop snapshot are
written whatever ``snapshot`` says), and a run holds an advisory lock on ``<snapshot_prefix>.lock`` so
two runs cannot overwrite each other's snapshots.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np

from ..core import backend
from ..core.blob import Blob
from ..core.context import solver_rank     # the one import of the worker's rank in solvers/
from ..errors import DataError, MinicaffeError, NumericalError, SolverError
from ..formats.prototxt import caffe_text
from ..net.network import Net
from ..proto import caffe_pb2
from ..core.terminal import ProgressBar, get_logger
from . import checkpoint, updates
from .diagnosis import (PendingChecks, first_non_finite, loss_report, non_finite_gradient,  # noqa: F401
                        non_finite_weights)
from .lr_policy import learning_rate
from .nets import NetBuilder
from .params import check_solver_param, read_solver_param
from .registry import history_sets_by_type, register_solver, solver_class
from .signals import NONE, SNAPSHOT, STOP
from .sync import NO_SYNC, GradientSync
# importable from here as before the solver was split into these modules
from .checkpoint import SnapshotLock, check_snapshot_dir, lock_path, solverstate_bytes  # noqa: F401
from .params import upgrade_solver_param  # noqa: F401
from .registry import SOLVER_CLASSES  # noqa: F401
from .signals import SIGNAL_EFFECTS, SignalHandler  # noqa: F401


def _log():
    return get_logger()


def get_solver(source: str | os.PathLike | caffe_pb2.SolverParameter,
               solver_file: str | os.PathLike | None = None) -> Solver:
    """pycaffe's ``caffe.get_solver``: the solver class that the file's ``type`` (or ``solver_type``)
    names, from the registry (registry.py)."""
    param, path = read_solver_param(source)
    cls = solver_class(param.type, path or "<solver>")
    return cls(param, solver_file=solver_file or path)


def _fmt(x):
    """A number as C++'s default ostream prints it (6 significant digits, %g style)."""
    return f"{float(x):.6g}"


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
        self.param = param
        self.log = _log()
        self.log.info("Initializing solver from parameters: \n%s", caffe_text(param, utf8=True).rstrip())
        check_solver_param(param, self._where(), self.log, root=solver_rank() == 0)
        if param.type != self.type and param.HasField("type"):
            self.log.warning("%s: the solver says type '%s', but %s was asked for: using %s updates",
                             self._where(), param.type, type(self).__name__, self.type)
        self.rule = self.rule_class(param)
        if param.random_seed >= 0:
            # Caffe seeds worker r of a data-parallel run with random_seed + r (own dropout masks)
            backend.set_random_seed(param.random_seed + solver_rank())
        nets = NetBuilder(param, self.solver_file, self.log)
        self.net = nets.train_net()
        # only the root solver tests (Caffe builds no test nets on workers)
        self.test_nets = nets.test_nets(self.net) if solver_rank() == 0 else []
        self.log.info("Solver scaffolding done.")
        self.iter = 0
        self.current_step = 0
        self._callbacks = []
        self._sync = NO_SYNC        # how gradients are combined with other workers (set_gradient_sync)
        self._action_function = None
        self._requested_early_exit = False
        self._losses, self.smoothed_loss = [], 0.0
        self._pending = PendingChecks()     # GPU: losses and gradient sums not read yet
        self._step_start = 0
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

    # --- pycaffe surface ----------------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], object],
                     on_gradients: Callable[[], object] | None = None) -> None:
        """Call ``on_start()`` before each iteration's forward/backward and ``on_gradients()`` before its
        update (pycaffe's ``Solver.add_callback``). ``add_callback(nccl)`` with a ``caffe.NCCL`` is
        pycaffe's other form; that object wired the reduction in when it was made, so nothing is added."""
        if on_gradients is None:
            if getattr(on_start, "installs_gradient_sync", False):
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
        return self._sync.is_root

    @property
    def gradient_sync(self) -> GradientSync:
        """The gradient synchronisation strategy (sync.py): "none" unless ``set_gradient_sync``."""
        return self._sync

    def set_gradient_sync(self, sync: GradientSync | None) -> None:
        """Train as one worker of a data-parallel run: ``sync`` combines this solver's gradients with
        the other workers' at the points sync.py lists (``minicaffe.parallel.ParallelSolver`` installs
        its all-reduce strategy here). ``None`` trains alone again. A solver has one strategy at a
        time: replacing one that is not "none" by another is refused."""
        sync = NO_SYNC if sync is None else sync
        if sync is not NO_SYNC and self._sync is not NO_SYNC and sync is not self._sync:
            raise SolverError(f"this solver already synchronises its gradients ({self._sync!r}); "
                              f"set_gradient_sync(None) first")
        self._sync = sync

    def _agree(self, action):
        """The root's value of a flag or action, on every rank (all ranks must stop or snapshot at the
        same iteration or the collectives would hang)."""
        return self._sync.agree(action)

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
        self._step_start = start_iter
        self._pending.clear()
        last_time, last_iter = time.perf_counter(), self.iter
        self._progress = ProgressBar(total=max(stop_iter - start_iter, 0), unit="iter", desc="train",
                                     enabled=None if self.is_root else False)
        diffs_clear = False     # the last update left every diff zero (apply_update's clear_diffs)
        try:
            while self.iter < stop_iter:
                # the generator's state now belongs with this iteration's weights: a failure snapshot uses it
                self._iter_rng = (self.iter, backend.rng().bit_generator.state, backend.gpu_random_state(),
                                  self._data_positions())
                if not diffs_clear:
                    self.net.clear_param_diffs()
                diffs_clear = False
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
                deferred = self._deferred_checks()
                loss = 0.0
                for k in range(p.iter_size):
                    try:
                        part = self._forward_backward(last=k == p.iter_size - 1)
                    except NumericalError as exc:      # check mode (Net.check_finite) found the layer
                        self._numerical_failure(detail=str(exc))
                    except DataError as exc:           # unreadable data: save the iteration's start state
                        self._numerical_failure(data_error=exc)
                    if not deferred and not math.isfinite(part):
                        self._numerical_failure(part)
                    loss = loss + part
                if deferred:
                    # GPU: the loss and the gradients' sums stay on the device until a check point
                    self._pending.record(self.net, self.iter, loss)
                    if display or self._check_point_follows(stop_iter) or self._pending.full:
                        self._read_pending()
                else:
                    bad = non_finite_gradient(self.net)
                    if bad:
                        self._numerical_failure(detail=f"the loss is finite but the gradient of {bad} is not")
                    self._update_smoothed_loss(loss / p.iter_size, start_iter, p.average_loss)
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
                # diffs zeroed by the update, except after this step()'s last one, which leaves the
                # update values as Caffe does (what a caller reads after step()); a stop requested
                # by a signal ends the call after an earlier update, and leaves them zero
                diffs_clear = self.apply_update(clear_diffs=self.iter + 1 < stop_iter and not p.snapshot_diff)
                request = self._agree(self._requested_action())
                if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                    self.snapshot()
                self._progress.update()
                if request == STOP:
                    self._requested_early_exit = True
                    break
            self._read_pending()      # a stop request ends the loop between check points
        finally:
            self._progress.close()
            self._progress = None

    # --- what the host reads, and when (docs/gpu.md) ------------------------------------------------
    def _deferred_checks(self):
        """On the GPU the losses and the gradients' finiteness are read at check points, not every
        iteration (a read waits for the GPU to finish all queued work, so the host could not queue
        the next iteration meanwhile). On the CPU there is nothing to wait for: each iteration is
        checked as it ends. Check mode (MINICAFFE_CHECK_NAN=1) checks every layer on either."""
        return backend.is_gpu() and not self.net.check_finite

    def _check_point_follows(self, stop_iter):
        """Whether the update about to run is the last one before a check point: the end of this
        step(), a periodic snapshot, or a test pass. Reading the values before that update means a
        non-finite one found then is in the iteration whose update has not run, so it stops there
        with a snapshot of that iteration's start, as on the CPU."""
        p, nxt = self.param, self.iter + 1
        return nxt >= stop_iter or bool(p.snapshot and nxt % p.snapshot == 0) or \
            bool(p.test_interval and nxt % p.test_interval == 0)

    def _read_pending(self):
        """Bring the losses and gradient sums recorded since the last check point to the host (one
        copy), stop at the first non-finite one, and add the losses to the smoothed loss in order,
        as the CPU does iteration by iteration."""
        pending = self._pending
        rows = pending.take()
        for it, row in rows:
            loss = float(row[0])
            if not math.isfinite(loss):
                self._numerical_failure(loss, found_at=it)
            bad = [i for i, v in enumerate(row[1:]) if not math.isfinite(v)]
            if bad:
                name, k = self.net.learnable_param_names[bad[0]]
                self._numerical_failure(detail=f"the loss is finite but the gradient of layer '{name}' "
                                               f"parameter {k} is not", found_at=it)
            p = self.param
            self._update_smoothed_loss(loss / p.iter_size, self._step_start, p.average_loss, it)

    def _forward_backward(self, last):
        """One of the iteration's ``iter_size`` forward/backward passes (Caffe's ForwardBackward), with
        the gradient synchronisation's points (sync.py); ``last``: the gradients are final after it.
        Returns the loss to record (with data-parallel workers, their mean). With the strategy "none"
        this is ``net.forward_backward(device_loss=True)``."""
        net, sync = self.net, self._sync
        sync.before_forward(last)
        loss = net.forward_from_to(device_loss=True)
        sync.after_forward(loss, last)
        if last and sync.layer_wise:    # layer by layer, so that reductions overlap the backward
            for li in range(len(net.layers) - 1, -1, -1):
                net.backward_from_to(li, li)
                sync.after_layer_backward(li)
        else:
            net.backward_from_to(share_diffs=True)
        return sync.after_backward(loss, last)

    def _info(self, fmt, *args):
        """A log line that does not land in the middle of the progress bar's line (root solver only)."""
        if not self.is_root:
            return
        self.log.info(fmt, *args, stacklevel=2)

    def _update_smoothed_loss(self, loss, start_iter, average_loss, it=None):
        """The mean of the last ``average_loss`` losses, updated as Caffe's UpdateSmoothedLoss
        (``it``: the iteration the loss belongs to, when it is read later than it was computed)."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = ((self.iter if it is None else it) - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    @staticmethod
    def _blob_loss_weights(net):
        weights = {}
        for lp, ws in zip(net.param.layer, net.layer_loss_weights):
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

    def apply_update(self, clear_diffs: bool = False) -> bool:
        """One update from the accumulated gradients (SGDSolver::ApplyUpdate); advances ``iter``.

        Each parameter's diff ends holding its update value, as in Caffe. With ``clear_diffs`` the
        compiled steps (SGD, Nesterov) leave it zero instead, in the same pass, so the next
        iteration's ClearParamDiffs can be skipped: ``step`` asks for that on every iteration but
        its last (VGG-16's 553 MB of diffs took 40 ms to clear on 2 cores). Returns whether every
        diff was left zero."""
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
        if updates.fused_step(self.rule, params, diffs, self.history, lr_mults, decay_mults, rate, self.iter, p):
            self.iter += 1          # on the GPU: the loop below as one kernel launch
            return False
        cleared = bool(params)
        for i, blob in enumerate(params):
            g = diffs[i]
            scratch = self._scratch_for(i, g)
            local_decay = updates.f32(weight_decay * updates.f32(decay_mults[i]))
            local_rate = updates.f32(rate * updates.f32(lr_mults[i]))
            hist = [self.history[k * n + i].xdata for k in range(self.rule.history_sets)]
            cleared &= updates.parameter_step(self.rule, blob.xdata, g, hist, scratch, p.iter_size, local_decay,
                                              p.regularization_type, local_rate, self.iter, clear_diffs)
        self.iter += 1
        return cleared

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
                    iter_loss = net.forward_from_to(device_loss=True)    # summed on the device, read once
                except NumericalError as exc:
                    self._numerical_failure(detail=f"test net #{test_net_id}: {exc}")
                if p.test_compute_loss:
                    loss = loss + iter_loss
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
    def _numerical_failure(self, loss=None, detail=None, data_error=None, found_at=None):
        """Stop training on a NaN/infinity: snapshot the state this iteration started from (weights,
        history, the random generator and the data read positions as they were before its forward
        pass; nothing was updated) and raise a NumericalError naming the iteration and where the value
        appeared. With ``data_error`` (a data layer could not read) the same, raising a DataError.

        ``found_at``: the iteration the value belongs to, when it was read at a later check point
        (GPU). If that iteration's update has run since, its start state is gone: nothing is written
        and the error says so (``_late_failure``)."""
        if found_at is not None and found_at != self.iter:
            self._late_failure(found_at, detail or f"the loss is {loss}")
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
        what = detail or loss_report(loss, self.net)
        bad = non_finite_weights(self.net)
        if bad:   # only an update that overflowed gets here (non-finite gradients stop before it)
            raise NumericalError(
                f"iteration {self.iter}: {what}; the weights of layer '{bad}' are themselves not finite "
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

    def _late_failure(self, found_at, what):
        """A non-finite value of iteration ``found_at`` read at iteration ``self.iter``: the updates in
        between were applied, so no snapshot of a good state can be written (and none is: a snapshot
        never holds non-finite weights). The error names where the non-finite values are now."""
        bad = non_finite_weights(self.net)
        now = (f"the weights of layer '{bad}' are now not finite" if bad else
               f"first non-finite values now in {first_non_finite(self.net) or 'no layer'}")
        raise NumericalError(
            f"iteration {found_at}: {what} (read at iteration {self.iter}: on the GPU the losses are read "
            f"at displays, snapshots, tests and the end of a step); {now}; the updates since were applied, "
            f"so no snapshot was written: resume from an earlier snapshot (with a lower base_lr or "
            f"clip_gradients), or set MINICAFFE_CHECK_NAN=1 to stop in the layer that writes it")

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
        self._read_pending()        # a non-finite value not yet read stops before anything is written
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
            checkpoint.write_rng_sidecar(state, self._rng_state())
            self._info("Snapshotting solver state to HDF5 file %s", state)
        else:
            model = self.snapshot_filename(".caffemodel")
            self._info("Snapshotting to binary proto file %s", model)
            self.net.save(model)
            state = self.snapshot_filename(".solverstate")
            checkpoint.write_rng_sidecar(state, self._rng_state())
            self._info("Snapshotting solver state to binary proto file %s", state)
        checkpoint.write_solver_state(state, self.iter, model, self.current_step,
                                      [h.host_data for h in self.history], hdf5)
        return model, state

    def _rng_state(self):
        """The ``.rng`` sidecar's content: the generators now, the data read positions now (or those of
        the iteration's start, for a failure snapshot: see ``_rewind_to_iteration_start``)."""
        data = getattr(self, "_saved_positions", None) or self._data_positions()
        return checkpoint.rng_sidecar(self.iter, self.type, data)

    def _data_positions(self):
        """{"train": {layer: position}, "test": [{layer: position}, ...]} of the layers that report one."""
        return {"train": self.net.data_positions(), "test": [net.data_positions() for net in self.test_nets]}

    def restore(self, path: str | os.PathLike) -> None:
        """Load a ``.solverstate`` (or ``.solverstate.h5``): iteration, weights, history, current_step;
        then the RNG sidecar and the data layers' read positions, so training continues exactly.

        Everything is checked before anything changes (the state, its history blobs against this
        solver and net, the sidecar's solver type and iteration, the learned net's file; weights that
        fail half-way through loading are put back), so a refused restore leaves the solver as it was."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise SolverError(f"{path}: no such solver state file")
        it, learned, step, hist = checkpoint.read_solver_state(path)
        sidecar = checkpoint.read_rng_sidecar(path, it, self.type, self.log)
        checkpoint.check_history(path, hist, self.history, self.type, self.rule.history_sets,
                                 history_sets_by_type(), len(self.net.learnable_params),
                                 sidecar is not None and "type" in sidecar, self.log)
        weights_file = checkpoint.find_learned_net(learned, path, self.log) if learned else None
        # all checked: now change things
        if weights_file:
            checkpoint.copy_weights_or_roll_back(self.net, weights_file)
        for (_, arr), blob in zip(hist, self.history):
            blob.data[...] = arr.reshape(blob.shape)
        self.iter, self.current_step = int(it), int(step)
        if sidecar is not None:
            checkpoint.restore_generators(sidecar)
        self.restore_data_positions(checkpoint.saved_data_positions(sidecar))
        self.log.info("%s solver: restored iteration %d from %s", self.type, self.iter, path)

    def restore_data_positions(self, saved: dict | None = None) -> None:
        """Put the data layers back where a run at this solver's ``iter`` was: at their saved read
        positions (``saved``, from a snapshot's sidecar), else tell layers with ``restore_position(n)``
        how many records their net has read so far. ``restore`` calls it; so does a data-parallel
        worker whose iteration the root's broadcast changed."""
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


@register_solver
class SGDSolver(Solver):
    # pycaffe's other solvers derive from SGDSolver (they are SGD with another update rule), so
    # isinstance(solver, caffe.SGDSolver) holds for each of them, as it does there
    rule_class = updates.SGD


@register_solver
class NesterovSolver(SGDSolver):
    rule_class = updates.Nesterov


@register_solver
class AdaGradSolver(SGDSolver):
    rule_class = updates.AdaGrad


@register_solver
class RMSPropSolver(SGDSolver):
    rule_class = updates.RMSProp


@register_solver
class AdaDeltaSolver(SGDSolver):
    rule_class = updates.AdaDelta


@register_solver
class AdamSolver(SGDSolver):
    rule_class = updates.Adam
