"""Layers that pick rows by index: BatchReindex (gather along the batch axis), Filter (keep the
items a selector marks) and Embed (a lookup table, the first layer of word models).

Indices arrive as float blobs, as in Caffe, and are read as Caffe's ``static_cast<int>`` reads
them (truncation toward zero). Bad indices are one-line errors naming the layer: Caffe aborts
on them (CHECK) or, in release builds, reads out of bounds (Embed's DCHECK).

Gradients that several rows add into one (a repeated index) go through :func:`scatter_add`,
which sums in index order on NumPy (``np.add.at``) and uses ``cupy.add.at`` on CuPy (``cupyx.scatter_add``
before CuPy 13).
"""
import numpy as np

from ..core import fillers
from ..core.blob import Blob
from ..errors import ShapeError
from ..core.layer import Layer, register


def scatter_add(xp, target, indices, values):
    """``target[indices[i]] += values[i]`` for every i, repeated indices summed (unbuffered)."""
    if xp is np or hasattr(xp.add, "at"):      # CuPy 13+: ``cupy.add.at`` (cupyx.scatter_add is deprecated)
        xp.add.at(target, indices, values)
    else:
        import cupyx
        cupyx.scatter_add(target, indices, values)


def read_indices(layer, blob, limit, what):
    """Integer indices from a float blob (truncated like Caffe's cast), each checked to be in
    ``[0, limit)``; the first bad one is reported with its position."""
    xp = layer.xp
    raw = blob.xdata.reshape(-1)
    idx = xp.trunc(raw)
    bad = (idx < 0) | (idx >= limit) | ~xp.isfinite(raw)
    if bool(bad.any()):
        pos = int(xp.argmax(bad))
        value = float(raw[pos])
        raise layer.error(f"{what} {value:g} at position {pos} is out of range [0, {limit})")
    return idx.astype(np.int64)


@register("BatchReindex")
class BatchReindex(Layer):
    """top[i] = bottom[0][permut[i]] for the 1-D index blob ``permut`` (bottom[1]); indices may
    repeat or be left out, so the top has as many items as there are indices. The gradient sums
    back into the selected items; the indices get none."""

    exact_num_bottom = 2
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        # not to the indices (Caffe allows it and then aborts in backward)
        return bottom_index == 0

    def reshape(self, bottom, top):
        if len(bottom[1].shape) != 1:
            raise self.error(f"the index blob (bottom[1]) must have 1 axis, got shape {bottom[1].shape}",
                             ShapeError)
        top[0].reshape((bottom[1].shape[0],) + tuple(bottom[0].shape[1:]))

    def forward(self, bottom, top):
        self.index = read_indices(self, bottom[1], bottom[0].shape[0], "index")
        if top[0].count == 0:
            return
        top[0].xdata = bottom[0].xdata[self.index]

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot back-propagate to the indices (bottom[1])")
        if not propagate_down[0]:
            return
        xp = self.xp
        grad = xp.zeros(bottom[0].shape, dtype=top[0].xdiff.dtype)
        if top[0].count:
            scatter_add(xp, grad, self.index, top[0].xdiff)
        bottom[0].xdiff = grad


@register("Filter")
class Filter(Layer):
    """Passes on the items (along axis 0) whose selector value — the last bottom, shape (N) or
    (N, 1, ...) — is non-zero; one top per other bottom. The first reshape gives the tops the full
    batch (Caffe's net set-up happens before any selector exists); later ones the selected count,
    which may be 0 (then the tops are empty and every gradient is 0). Items not selected get a zero
    gradient; the selector gets none."""

    min_num_bottom = 2
    min_num_top = 1

    def allow_force_backward(self, bottom_index):
        # not to the selector (Caffe allows it and then aborts in backward)
        return bottom_index != getattr(self, "selector_index", -1)

    def setup(self, bottom, top):
        self.selector_index = len(bottom) - 1
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per bottom except the selector: {len(bottom) - 1} tops, "
                             f"got {len(top)}")
        self._first = True

    def reshape(self, bottom, top):
        sel = bottom[-1]
        if any(d != 1 for d in sel.shape[1:]):
            raise self.error(f"the selector (last bottom) must have shape (N) or (N, 1, ...), got "
                             f"{sel.shape}", ShapeError)
        n = sel.shape[0] if sel.shape else 1
        for i, b in enumerate(bottom[:-1]):
            if (b.shape[0] if b.shape else 1) != n:
                raise self.error(f"bottom[{i}] has {b.shape[0] if b.shape else 1} items, the selector "
                                 f"has {n}", ShapeError)
        xp = self.xp
        self.indices = xp.nonzero(sel.xdata.reshape(-1) != 0)[0]
        kept = int(self.indices.size)
        if self._first:
            kept, self._first = n, False
        for b, t in zip(bottom[:-1], top):
            t.reshape((kept,) + tuple(b.shape[1:]))

    def forward(self, bottom, top):
        for b, t in zip(bottom[:-1], top):
            if t.shape[0] != self.indices.size:   # reshape was skipped after the selector changed
                t.reshape((int(self.indices.size),) + tuple(b.shape[1:]))
            if t.count:
                t.xdata = b.xdata[self.indices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            raise self.error("cannot back-propagate to the selector (the last bottom)")
        xp = self.xp
        for i, (b, t) in enumerate(zip(bottom[:-1], top)):
            if not propagate_down[i]:
                continue
            grad = xp.zeros(b.shape, dtype=b.dtype)
            if t.count:
                grad[self.indices] = t.xdiff
            b.xdiff = grad


@register("Embed")
class Embed(Layer):
    """A learned lookup table: each bottom value k (an integer in [0, input_dim)) becomes row k of
    the weight (input_dim x num_output), plus the bias (num_output) with ``bias_term``. The top
    has the bottom's shape with num_output appended. The indices get no gradient; rows used
    several times sum their gradients."""

    exact_num_bottom = 1
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        # the only bottom holds indices (Caffe allows it and then aborts in backward)
        return False

    def setup(self, bottom, top):
        p = self.param.embed_param
        self.num_output, self.input_dim = int(p.num_output), int(p.input_dim)
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = bool(p.bias_term)
        shapes = [(self.input_dim, self.num_output)] + ([(self.num_output,)] if self.bias_term else [])
        if self.blobs:
            if len(self.blobs) != len(shapes):
                raise self.error(f"expected {len(shapes)} parameter blobs, got {len(self.blobs)}")
            for blob, want in zip(self.blobs, shapes):
                if tuple(blob.shape) != want:
                    raise self.error(f"parameter shape {tuple(blob.shape)} does not match the expected "
                                     f"{want}", ShapeError)
        else:
            for shape, filler in zip(shapes, (p.weight_filler, p.bias_filler)):
                blob = Blob(shape)
                blob.data[...] = fillers.fill(filler, shape, dtype=blob.dtype, layer=self.name)
                self.blobs.append(blob)
        self.param_propagate_down = [True] * len(self.blobs)

    def reshape(self, bottom, top):
        top[0].reshape(tuple(bottom[0].shape) + (self.num_output,))

    def _indices(self, bottom):
        idx = read_indices(self, bottom[0], self.input_dim, "embed index")
        raw = bottom[0].xdata.reshape(-1)
        if bool((idx != raw).any()):
            pos = int(self.xp.argmax(idx != raw))
            raise self.error(f"embed index {float(raw[pos]):g} at position {pos} is not an integer")
        return idx

    def forward(self, bottom, top):
        self.index = self._indices(bottom)
        out = self.blobs[0].xdata[self.index]
        if self.bias_term:
            out += self.blobs[1].xdata
        top[0].xdata = out.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot back-propagate to the input (the indices)")
        dy = top[0].xdiff.reshape(-1, self.num_output)
        if self.need_param_grad(0):
            scatter_add(self.xp, self.blobs[0].xdiff, self.index, dy)
        if self.bias_term and self.need_param_grad(1):
            self.blobs[1].xdiff += dy.sum(axis=0)
