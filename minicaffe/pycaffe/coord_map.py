"""pycaffe's ``caffe.coord_map``: how spatial coordinates move through net_spec layers, so FCN-style
nets can ``crop`` an upsampled score map back onto the input grid.

A map is ``(axis, scale, shift)``: output coordinate ``y = scale·x + shift`` for the spatial axes
after ``axis``; ``(None, 1, 0)`` is the identity of pointwise layers. Convolution-like layers give
``(axis, 1/stride, (pad − (k_eff − 1)/2)/stride)``, deconvolution the inverse shape
``(axis, stride, (k_eff − 1)/2 − pad)``, Crop ``(axis − 1, 1, −offset)``.
"""
import numpy as np

from ..errors import MinicaffeError
from .net_spec import layers as L

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log",
                       "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split",
                       "TanH", "Threshold"]


class CoordMapError(MinicaffeError, RuntimeError):
    """Two tops whose coordinates cannot be related (also a RuntimeError, as pycaffe raised)."""


class AxisMismatchException(CoordMapError):
    """Maps on different axes cannot be composed."""


class UndefinedMapException(Exception):
    """A layer with no coordinate mapping (the graph walk stops there)."""


class CropError(CoordMapError, AssertionError):
    """A crop that cannot be made (scale mismatch, negative or fractional offset)."""


def _spatial(params, name, legacy):
    h, w = f"{legacy}_h", f"{legacy}_w"
    if h in params or w in params:
        return np.array([params.get(h, 1 if legacy != "pad" else 0),
                         params.get(w, 1 if legacy != "pad" else 0)], dtype=np.float64)
    default = 0 if name == "pad" else 1
    return np.array(params.get(name, default), ndmin=1, dtype=np.float64)


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution/Deconvolution/Pooling/Im2col."""
    params = fn.params.get("convolution_param") or fn.params.get("pooling_param") or fn.params
    if params.get("global_pooling"):
        raise UndefinedMapException
    axis = params.get("axis", 1)
    if "kernel_size" not in params and "kernel_h" not in params:
        raise CoordMapError(f"{fn.type_name} layer has no kernel_size to map coordinates with")
    ks = _spatial(params, "kernel_size", "kernel")
    dilation = np.array(params.get("dilation", 1), ndmin=1, dtype=np.float64)
    stride, extent, pad = np.broadcast_arrays(_spatial(params, "stride", "stride"), (ks - 1) * dilation + 1,
                                              _spatial(params, "pad", "pad"))
    return axis, stride, extent, pad


def crop_params(fn):
    """(axis, offset) of a Crop layer, with Caffe's defaults (axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The (axis, scale, shift) map from a layer's bottom coordinates to its top coordinates."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, ks, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (ks - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, ks, pad = conv_params(fn)
        return axis, stride, (ks - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset
    raise UndefinedMapException


def compose(base_map, next_map):
    """Apply ``base_map`` then ``next_map``: scales multiply, the next shift is scaled by the base."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        ax = ax2
    elif ax2 is None or ax1 == ax2:
        ax = ax1
    else:
        raise AxisMismatchException(f"cannot compose coordinate maps on axes {ax1} and {ax2}")
    return ax, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back from top to bottom coordinates."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mappable_bottoms(top):
    # Crop's second bottom only gives the reference size: its coordinates do not flow through
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def coord_map_from_to(top_from, top_to):
    """The map from ``top_from``'s coordinates to ``top_to``'s, through their nearest common ancestor."""
    from_maps = {top_from: (None, 1, 0)}
    frontier = [top_from]
    while frontier:
        top = frontier.pop()
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            if bottom not in from_maps:      # a DAG reaches some tops twice; their maps agree
                from_maps[bottom] = compose(from_maps[top], step)
                frontier.append(bottom)

    to_maps = {top_to: (None, 1, 0)}
    frontier = [top_to]
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            if bottom not in to_maps:
                to_maps[bottom] = compose(to_maps[top], step)
                frontier.append(bottom)
    raise CoordMapError(f"cannot map coordinates between {top_from.fn.type_name} and "
                        f"{top_to.fn.type_name} tops: they are not connected by spatial layers")


def crop(top_from, top_to):
    """A Crop layer cutting ``top_from`` to ``top_to``'s extent, with the offset the map implies."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (a == 1).all():
        raise CropError(f"crop: scale mismatch between the tops (scale {a.tolist()}); "
                        "strides up and down do not cancel")
    if not (b <= 0).all():
        raise CropError(f"crop: cannot crop a negative offset ({(-b).tolist()}); the top to crop is "
                        "smaller than the reference")
    if not (np.round(b) == b).all():
        raise CropError(f"crop: offset {(-b).tolist()} is not a whole number of pixels")
    axis = 2 if ax is None else int(ax) + 1      # None: only pointwise layers between them
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=axis, offset=[int(v) for v in -np.round(b)]))


__all__ = ["coord_map_from_to", "crop", "coord_map", "compose", "inverse", "conv_params",
           "crop_params", "CoordMapError", "CropError", "AxisMismatchException",
           "UndefinedMapException", "PASS_THROUGH_LAYERS"]
