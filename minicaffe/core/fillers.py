"""Caffe's weight fillers, drawn from the one seeded generator in ``backend.rng()``."""
import numpy as np

from . import backend
from ..errors import NetError


def _fans(shape):
    # Caffe: fan_in = count / shape[0], fan_out = count / shape[1]
    count = int(np.prod(shape))
    fan_in = count // shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_scale(filler, shape):
    fan_in, fan_out = _fans(shape)
    norm = filler.variance_norm
    vn = type(filler).VarianceNorm if hasattr(type(filler), "VarianceNorm") else None
    if vn is not None and norm == vn.Value("AVERAGE"):
        return (fan_in + fan_out) / 2.0
    if vn is not None and norm == vn.Value("FAN_OUT"):
        return fan_out
    return fan_in


def fill(filler, shape, dtype=None, layer=None):
    """A host array of ``shape`` filled as ``filler`` (a FillerParameter) says."""
    dtype = dtype or backend.dtype()
    rng = backend.rng()
    shape = tuple(int(s) for s in shape)
    kind = filler.type or "constant"
    if kind == "constant":
        out = np.full(shape, filler.value, dtype=np.float64)
    elif kind == "uniform":
        out = rng.uniform(filler.min, filler.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(filler.mean, filler.std, size=shape)
        if filler.sparse >= 0:
            # keep each weight with probability sparse / num_outputs (Caffe: per input, on average
            # `sparse` non-zero weights)
            num_outputs = shape[0] if len(shape) > 0 else 1
            keep = rng.random(shape) < min(1.0, filler.sparse / max(num_outputs, 1))
            out = out * keep
    elif kind == "positive_unitball":
        out = rng.random(shape)
        rows = shape[0] if shape else 1
        flat = out.reshape(rows, -1)
        flat /= flat.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        limit = np.sqrt(3.0 / _variance_scale(filler, shape))
        out = rng.uniform(-limit, limit, size=shape)
    elif kind == "msra":
        std = np.sqrt(2.0 / _variance_scale(filler, shape))
        out = rng.normal(0.0, std, size=shape)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise NetError(f"bilinear filler needs a square 4-D kernel, got {shape}", layer)
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        x = np.arange(k)
        w1 = 1 - np.abs(x / f - c)
        out = np.broadcast_to(np.outer(w1, w1), shape).copy()
    else:
        raise NetError(f"unknown filler type '{kind}' (constant, uniform, gaussian, positive_unitball, "
                       "xavier, msra, bilinear)", layer)
    return np.asarray(out, dtype=dtype)
