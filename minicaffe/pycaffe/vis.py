"""``caffe.vis``: the pictures Caffe's notebooks draw by hand, as functions (and the ``visualize`` tool).

Caffe's classification notebook builds its figures in a dozen lines of matplotlib each: the mean
image, the first layer's filters tiled into a square (``vis_square``), a layer's feature maps for an
image, the top-k predictions. Here each is two functions: one returning the picture as an array
(NumPy only, so scripts can compose their own figures), and a ``plot_*`` one writing a titled PNG.
``plot_layer_times`` draws ``minicaffe time --plot``. The PNGs are drawn with matplotlib's Agg
canvas (no display, pyplot's global state untouched); matplotlib is the optional ``plot`` extra,
and a missing one is a one-line error.
"""
import io
import math
import os

import numpy as np

from ..data.transformer import load_mean
from ..errors import DataError
from ..fileio import atomic_write


# --- arrays (no matplotlib) ----------------------------------------------------------------------

def normalize(data):
    """``data`` scaled to [0, 1] over all its values (a constant array gives zeros, not NaN)."""
    data = np.asarray(data, dtype=np.float32)
    lo, hi = float(np.min(data)), float(np.max(data))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError("cannot draw an array holding NaN or infinity")
    return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)


def vis_square(data, padsize=1, padval=1.0):
    """Caffe's ``vis_square``: N×H×W (grey) or N×H×W×3 (colour) tiles, normalised together to
    [0, 1], laid out in a grid of ceil(sqrt(N)) columns with ``padsize`` pixels of ``padval``
    between them (white by default, so dark filters stay visible at the edges). Returns the grid."""
    data = normalize(data)      # (NaN padding stays NaN: feature_maps draws it as white gaps)
    if data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[3] != 3) or len(data) == 0:
        raise DataError(f"vis_square: need N×H×W or N×H×W×3 tiles, got shape {data.shape}")
    n = int(math.ceil(math.sqrt(data.shape[0])))
    rows = int(math.ceil(data.shape[0] / n))
    padding = ((0, n * rows - data.shape[0]), (0, padsize), (0, padsize)) + ((0, 0),) * (data.ndim - 3)
    data = np.pad(data, padding, mode="constant", constant_values=padval)
    data = data.reshape((rows, n) + data.shape[1:])
    data = data.transpose((0, 2, 1, 3) + tuple(range(4, data.ndim)))
    data = data.reshape((rows * data.shape[1], n * data.shape[3]) + data.shape[4:])
    return data[:-padsize, :-padsize] if padsize else data


def mean_image(mean, channel_swap=(2, 1, 0)):
    """A mean (C×H×W array, or the path of a ``mean.binaryproto``/``.npy``) as an H×W×3 RGB or H×W
    grey image in [0, 1]. Caffe means are BGR, hence the default ``channel_swap``."""
    if isinstance(mean, (str, os.PathLike)):
        mean = load_mean(mean)
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.shape[0] not in (1, 3):
        raise DataError(f"a mean image must be 1×H×W or 3×H×W, this one is {mean.shape}")
    if mean.shape[0] == 1:
        return normalize(mean[0])
    if channel_swap is not None:
        mean = mean[list(channel_swap)]
    return normalize(mean.transpose(1, 2, 0))


def filters_grid(net, layer=None, channel_swap=(2, 1, 0), max_tiles=256):
    """The weights of ``layer`` (default: the first layer with a 4-d weight blob) tiled with
    ``vis_square``: with 3 input channels each filter is one colour tile (BGR weights shown RGB),
    otherwise each input channel of each filter is a grey tile (at most ``max_tiles``).
    Returns (grid, layer name, weight shape)."""
    layer = layer or _first_conv(net)
    if layer not in net.params or not net.params[layer]:
        raise DataError(f"layer '{layer}' has no weights (layers with weights: "
                        f"{', '.join(n for n, p in net.params.items() if p) or 'none'})")
    w = np.asarray(net.params[layer][0].data, dtype=np.float32)
    if w.ndim == 2:                                 # an InnerProduct: each row as a square-ish tile
        side = int(math.isqrt(w.shape[1]))
        if side * side != w.shape[1]:
            raise DataError(f"layer '{layer}': weights {w.shape} are not filters (not 4-d, rows not square)")
        w = w.reshape(w.shape[0], 1, side, side)
    if w.ndim != 4:
        raise DataError(f"layer '{layer}': weights of shape {w.shape} are not N×C×H×W filters")
    if w.shape[1] == 3:
        tiles = w[:, list(channel_swap) if channel_swap is not None else [0, 1, 2]].transpose(0, 2, 3, 1)
    else:
        tiles = w.reshape(-1, w.shape[2], w.shape[3])
    return vis_square(tiles[:max_tiles]), layer, w.shape


def feature_maps(net, layer, max_tiles=256):
    """The first image's channels of blob ``layer`` (after a forward pass) tiled with ``vis_square``;
    a 1-d blob (an InnerProduct output) is returned as its values. Returns (array, blob shape)."""
    if layer not in net.blobs:
        raise DataError(f"no blob named '{layer}' (blobs: {', '.join(net.blobs)})")
    feat = np.asarray(net.blobs[layer].data, dtype=np.float32)
    shape = feat.shape
    feat = feat[0]
    if feat.ndim == 3:     # NaN gaps: drawn white, apart from the colour map of the values
        return vis_square(feat[:max_tiles], padval=np.nan), shape
    return feat.reshape(-1), shape


def _first_conv(net):
    for name, blobs in net.params.items():
        if blobs and np.ndim(blobs[0].data) == 4:
            return name
    raise DataError("the net has no layer with 4-d (convolution) weights; name one with --layer")


# --- PNGs (matplotlib) ---------------------------------------------------------------------------

def _figure(width, height, dpi):
    from ..deps import require
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "drawing pictures").FigureCanvasAgg
    Figure = require("matplotlib.figure", "drawing pictures").Figure
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path):
    """Write ``fig`` in the format of ``path``'s extension, atomically (never a partial image)."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1][1:].lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise DataError(f"{path}: unsupported image type '.{fmt}' (use .png, .svg or .pdf)")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write(path, buf.getvalue())
    return path


def _image_figure(image, title, path, dpi=100, cmap="gray", colorbar=False, max_inches=8.0):
    """One image, upscaled without smoothing (a 5×5 filter stays 25 crisp squares), with a title."""
    h, w = image.shape[:2]
    scale = max_inches / max(h, w)
    fig = _figure(max(w * scale, 3.0) + (1.0 if colorbar else 0.0), h * scale + 0.6, dpi)
    ax = fig.add_subplot(1, 1, 1)
    if image.ndim == 2:
        import matplotlib
        cmap = matplotlib.colormaps[cmap].with_extremes(bad="white")
        image = np.ma.masked_invalid(image)
    shown = ax.imshow(image, cmap=None if image.ndim == 3 else cmap, interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mean(mean, path, title=None, channel_swap=(2, 1, 0), dpi=100):
    """The mean image (array or mean file), as the notebook's ``plt.imshow(mean)``."""
    image = mean_image(mean, channel_swap)
    if title is None:
        name = os.path.basename(os.fspath(mean)) if isinstance(mean, (str, os.PathLike)) else "mean"
        title = f"{name} ({image.shape[1]}×{image.shape[0]})"
    return _image_figure(image, title, path, dpi, max_inches=6.0)


def plot_filters(net, path, layer=None, channel_swap=(2, 1, 0), dpi=100):
    """The filters of ``layer`` (default: the first convolution) as one grid."""
    grid, layer, shape = filters_grid(net, layer, channel_swap)
    dims = "×".join(str(d) for d in shape)
    return _image_figure(grid, f"{layer} filters ({dims})", path, dpi)


def plot_feature_maps(net, layer, path, dpi=100):
    """``layer``'s output for the first image: channels tiled, or a bar per value for a 1-d blob."""
    values, shape = feature_maps(net, layer)
    dims = "×".join(str(d) for d in shape[1:])
    if values.ndim == 1:
        fig = _figure(8, 3.5, dpi)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(np.arange(len(values)), values, width=1.0, color="#4C72B0")
        ax.set_title(f"{layer} ({dims})")
        ax.set_xlabel("unit")
        ax.set_xlim(-0.5, len(values) - 0.5)
        fig.tight_layout()
        return save_figure(fig, path)
    return _image_figure(values, f"{layer} feature maps ({dims})", path, dpi, cmap="viridis")


def plot_top_k(probs, path, labels=None, k=5, title=None, dpi=100):
    """The ``k`` highest scores of one prediction as horizontal bars, best on top, named by
    ``labels`` (a list, or class indices when None)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if probs.size == 0:
        raise DataError("no scores to plot")
    if labels is not None and len(labels) != probs.size:
        raise DataError(f"{len(labels)} labels for {probs.size} scores")
    k = max(1, min(int(k), probs.size))
    idx = np.argsort(-probs, kind="stable")[:k]
    names = [_short(labels[i]) if labels is not None else f"class {i}" for i in idx]
    fig = _figure(8, 0.45 * k + 1.2, dpi)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(k)
    ax.barh(y, probs[idx], color="#4C72B0")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    top = float(np.max(probs[idx]))
    for yi, p in zip(y, probs[idx]):
        ax.text(p, yi, f" {p:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, max(top * 1.15, 1e-6) if top > 0 else 1.0)
    ax.set_xlabel("score")
    ax.set_title(title or f"top-{k} predictions")
    fig.tight_layout()
    return save_figure(fig, path)


def _short(label, width=40):
    """'n01440764 tench, Tinca tinca' → 'tench, Tinca tinca' (synset ids dropped), cut to ``width``."""
    parts = label.split(" ", 1)
    if len(parts) == 2 and len(parts[0]) == 9 and parts[0][0] == "n" and parts[0][1:].isdigit():
        label = parts[1]
    return label if len(label) <= width else label[:width - 1] + "…"


def plot_layer_times(rows, path, title=None, dpi=100):
    """``minicaffe time --plot``: a forward and a backward bar per layer, in net order from the top.

    ``rows`` are (layer name, layer type, forward ms, backward ms), as the time command prints them.
    The title gives the per-iteration totals (the sums of the bars).
    """
    rows = list(rows)
    if not rows:
        raise DataError("no layers to plot")
    names = [f"{name} ({kind})" for name, kind, _, _ in rows]
    fwd = np.array([r[2] for r in rows], dtype=np.float64)
    bwd = np.array([r[3] for r in rows], dtype=np.float64)
    n = len(rows)
    fig = _figure(9, min(0.28 * n + 1.4, 120.0), dpi)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    ax.barh(y - 0.2, fwd, height=0.4, label="forward", color="#4C72B0")
    ax.barh(y + 0.2, bwd, height=0.4, label="backward", color="#DD8452")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)                  # net order, first layer on top
    ax.set_xlabel("ms per iteration")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    total = f"forward {fwd.sum():.3g} ms + backward {bwd.sum():.3g} ms = {fwd.sum() + bwd.sum():.3g} ms"
    ax.set_title(f"{title}\n{total}" if title else total)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["normalize", "vis_square", "mean_image", "filters_grid", "feature_maps", "save_figure",
           "plot_mean", "plot_filters", "plot_feature_maps", "plot_top_k", "plot_layer_times"]
