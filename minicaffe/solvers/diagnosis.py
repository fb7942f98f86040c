"""Numerical diagnosis: where a NaN or an infinity first appears in a net.

The solver checks every iteration that the loss and the parameter gradients are finite (one device
sync each, cheap); only when one is not does it look for the first layer holding a non-finite value,
so that the ``NumericalError`` that stops training names a layer instead of just "loss = nan".
"""
from __future__ import annotations

import math

import numpy as np

from ..core import backend


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
    for (name, k), b in zip(net.learnable_param_names, params):
        if not _finite(b.xdiff):
            return f"layer '{name}' parameter {k}"
    return None


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
