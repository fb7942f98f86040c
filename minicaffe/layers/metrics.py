"""Metrics: layers that read a net's class scores out rather than transform them. Accuracy (top-k
accuracy against labels) and ArgMax (the top-k classes themselves).

Why together, and why not with the losses or the shape layers: both rank the scores along one axis
the way Caffe does (``top_k``, ties counted as Caffe's ``>=`` and ``partial_sort`` count them), both
are read-outs with no gradient (backward refuses), and a deploy net ends in ArgMax where a TEST net
ends in Accuracy. Caffe's old headers put Accuracy with the losses (it takes labels) and ArgMax
with the common layers, but neither is minimised (loss.py) nor only moves data (shape.py).
"""
import numpy as np

from ..core.layer import Layer, register
from ..core.numeric import element_count
from ..errors import ShapeError
from .loss import read_labels
from .shape import canonical_axis


def stable_argsort(xp, a, axis):
    """Stable argsort on either module (CuPy's sort is always stable and takes no ``kind``)."""
    if xp is np:
        return np.argsort(a, axis=axis, kind="stable")
    return xp.argsort(a, axis=axis)


@register("Accuracy")
class Accuracy(Layer):
    """Top-k accuracy along ``accuracy_param.axis``; optional top[1]: accuracy per class.

    Ties count as Caffe counts them: the true class is within the top k when fewer than k other
    classes score greater than OR EQUAL to it (Caffe's ``>=`` test), so a tie with the true class
    counts against it."""

    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2

    def setup(self, bottom, top):
        ap = self.param.accuracy_param
        self.top_k = int(ap.top_k)
        self.ignore = int(ap.ignore_label) if ap.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.param.accuracy_param.axis, len(shape))
        self.outer = element_count(shape[:self.axis])
        self.inner = element_count(shape[self.axis + 1:])
        self.classes = shape[self.axis]
        if bottom[1].count != self.outer * self.inner:
            raise self.error(f"{bottom[1].count} labels {bottom[1].shape} for predictions {shape}: with "
                             f"axis {self.axis} there must be {self.outer * self.inner}", ShapeError)
        if self.top_k > self.classes:
            raise self.error(f"top_k {self.top_k} is larger than the number of classes {self.classes}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.classes,))

    def forward(self, bottom, top):
        xp = self.xp
        scores = bottom[0].xdata.reshape(self.outer, self.classes, self.inner)
        safe, valid = read_labels(self, bottom[1], (self.outer, self.inner), self.classes, self.ignore)
        true = xp.take_along_axis(scores, safe[:, None, :], axis=1)
        better = (scores >= true).sum(axis=1) - 1       # other classes scoring >= the true one
        correct = better < self.top_k
        if valid is not None:
            correct &= valid
            count = valid.sum()
        else:
            count = self.outer * self.inner
        top[0].xdata[...] = correct.sum() / xp.maximum(count, 1)
        if len(top) > 1:
            flat = safe.ravel()
            weights = None if valid is None else valid.ravel().astype(xp.float64)
            seen = xp.bincount(flat, weights=weights, minlength=self.classes)
            hit = xp.bincount(flat, weights=correct.ravel().astype(xp.float64), minlength=self.classes)
            top[1].xdata[...] = xp.where(seen > 0, hit / xp.maximum(seen, 1), 0)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no gradient: it cannot back-propagate")


@register("ArgMax")
class ArgMax(Layer):
    """Indices (and/or values) of the ``top_k`` largest entries per instance, or along ``axis``.

    Order as Caffe's partial_sort of (value, index) pairs with std::greater: larger values first,
    and among equal values the larger index first. Without ``axis`` the top is N x 1 x K (indices)
    or N x 2 x K (indices then values) padded to at least 3 axes; with ``axis`` it is the bottom's
    shape with that axis set to K, holding values if ``out_max_val`` else indices."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        if self.top_k < 1:
            raise self.error("top_k must be at least 1")
        self.axis = None
        shape = bottom[0].shape
        if p.HasField("axis"):
            self.axis = canonical_axis(self, p.axis, len(shape))
            if self.top_k > shape[self.axis]:
                raise self.error(f"top_k {self.top_k} is larger than axis {self.axis} (size "
                                 f"{shape[self.axis]}) of bottom shape {shape}")
        elif not shape:
            raise self.error("needs a bottom with a batch axis (without argmax_param.axis it takes the "
                             "top_k per instance), got a scalar", ShapeError)
        elif self.top_k > bottom[0].count_from(1):
            raise self.error(f"top_k {self.top_k} is larger than the {bottom[0].count_from(1)} values "
                             f"per instance of bottom shape {shape}")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if self.axis is not None:
            out = list(shape)
            out[self.axis] = self.top_k
        else:
            out = [1] * max(len(shape), 3)
            out[0] = shape[0]
            out[1] = 2 if self.out_max_val else 1
            out[2] = self.top_k
        top[0].reshape(out)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata
        axis = self.axis if self.axis is not None else 1
        if self.axis is None:
            x = x.reshape(x.shape[0], -1)
        n = x.shape[axis]
        # larger index first among ties: sort the reversed axis stably on -value, map back
        order = stable_argsort(xp, -xp.flip(x, axis=axis), axis)
        idx = (n - 1) - xp.take(order, xp.arange(self.top_k), axis=axis)
        if self.axis is not None:
            top[0].xdata[...] = xp.take_along_axis(x, idx, axis=axis) if self.out_max_val else idx
            return
        out = top[0].xdata.reshape(x.shape[0], -1, self.top_k)
        out[:, 0, :] = idx
        if self.out_max_val:
            out[:, 1, :] = xp.take_along_axis(x, idx, axis=1)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("ArgMax has no gradient: it cannot back-propagate")
