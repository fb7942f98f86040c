"""Numerical diagnosis: where a NaN or an infinity first appears in a net.

The solver checks that the loss and the parameter gradients are finite: on the CPU every iteration,
on the GPU at check points (``PendingChecks`` keeps each iteration's loss and gradient sums on the
device until then; docs/gpu.md). Only when one is not does it look for the first layer holding a
non-finite value, so that the ``NumericalError`` that stops training names a layer instead of just
"loss = nan".
"""
from __future__ import annotations

import math

import numpy as np

from ..core import backend, threads


def _finite(arr):
    """All values finite? One float64 sum: it cannot overflow for float32 data, and NaN/inf propagate."""
    return math.isfinite(float(arr.sum(dtype=np.float64)))


def _screening_sum(arr):
    """A sum of ``arr`` that is NaN or infinite whenever one of its values is (and, rarely, when a
    float32 sum of finite values overflows: the caller then checks each array exactly with
    ``_finite``). On the CPU: in the array's own dtype, as partial sums over flat chunks on the
    kernels' pool. Why: the float64 sum (a cast per element) of VGG-16's 138M gradients took 90-114
    ms of every 2.5 s training iteration on one thread; this one reads them at memory speed on
    every thread."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        return arr.sum(dtype=np.float64)
    flat = arr.reshape(-1)
    parts = []

    def chunk(a, b):
        parts.append(float(np.add.reduce(flat[a:b])))   # list.append is atomic: one entry per chunk
    threads.parallel_flat(flat.size, chunk)
    return math.fsum(parts) if all(map(math.isfinite, parts)) else math.nan


def non_finite_gradient(net):
    """"layer 'x' parameter k" for the first learnable parameter whose gradient holds a NaN or an
    infinity, else None. Cheap enough to run every iteration (one device sync)."""
    params = net.learnable_params
    if not params:
        return None
    total = sum(_screening_sum(b.xdiff) for b in params)
    if math.isfinite(float(total)):
        return None
    for (name, k), b in zip(net.learnable_param_names, params):
        if not _finite(b.xdiff):
            return f"layer '{name}' parameter {k}"
    return None


class PendingChecks:
    """What the solver checks of each GPU iteration, kept on the device until a check point: row k of
    one preallocated float64 array is ``[loss, sum of parameter 0's gradient, sum of parameter 1's,
    ...]`` (a sum is NaN or infinite when any of its values is). ``take()`` brings the rows recorded
    so far to the host in one copy. The array is made once per net shape and reused, so recording
    allocates nothing; ``full`` says when it must be read before the next record."""

    capacity = 1024     # iterations between reads at most (with display: 0 and no snapshots or tests)

    def __init__(self):
        self._buf = None
        self._iters = []

    @property
    def full(self) -> bool:
        return self._buf is not None and len(self._iters) >= self._buf.shape[0]

    def record(self, net, it, loss):
        """Keep iteration ``it``'s ``loss`` (a device scalar or a float) and its gradient sums."""
        params = net.learnable_params
        xp = backend.xp()
        width = 1 + len(params)
        if self._buf is None or self._buf.shape[1] != width or backend.get_array_module(self._buf) is not xp:
            self.clear()
            self._buf = xp.empty((self.capacity, width), dtype=np.float64)
        row = self._buf[len(self._iters)]
        row[0] = loss
        for i, b in enumerate(params):
            b.xdiff.sum(dtype=np.float64, out=row[i + 1])
        self._iters.append(it)

    def take(self):
        """[(iteration, [loss, gradient sums...])] recorded since the last take, read in one copy."""
        if not self._iters:
            return []
        rows = backend.to_host(self._buf[:len(self._iters)]).tolist()
        iters, self._iters = self._iters, []
        return list(zip(iters, rows))

    def clear(self):
        """Forget what was recorded and not read (a new step() after one that raised)."""
        self._iters = []


def non_finite_weights(net):
    """The name of the first layer whose learnable weights are themselves not finite (an update
    overflowed), else None."""
    for (name, _), b in zip(net.learnable_param_names, net.learnable_params):
        if not _finite(b.xdata):
            return name
    return None


def first_non_finite(net):
    """'layer 'x' (Type) top 'b'' (or 'parameter k') for the first layer in forward order whose
    parameters or tops hold a NaN or an infinity; None if all are finite."""
    for name, layer, tops in zip(net.layer_names, net.layers, net.top_vecs):
        xp = backend.xp()
        for k, blob in enumerate(layer.blobs):
            if not bool(xp.isfinite(blob.xdata).all()):
                return f"layer '{name}' ({layer.type}) parameter {k}"
        for blob in tops:
            if not bool(xp.isfinite(blob.xdata).all()):
                return f"layer '{name}' ({layer.type}) top '{blob.name}'"
    return None


def loss_report(loss, net):
    """What a non-finite loss is reported as: its value and the first layer holding one."""
    return f"the loss is {loss}; first non-finite values in {first_non_finite(net) or 'no layer (?)'}"
