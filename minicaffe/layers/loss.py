"""Softmax and the loss layers (Accuracy is with the metrics, in metrics.py).

Softmax, SoftmaxWithLoss and InfogainLoss hold the reference (``xp`` code, NumPy or CuPy;
``softmax_param.engine: CAFFE``); on a GPU they run CUDA kernels, an engine chosen at reshape
(``kernels/cuda_softmax.py``) that implements ``softmax(x, axis, out)``,
``softmax_backward(y, dy, axis, dx)`` and, for SoftmaxWithLoss, ``loss(prob, label, axis, ignore)``
(device sums of the losses and of the counted labels) and
``loss_backward(prob, label, scale, axis, ignore, dx)``.

A loss layer's top is a scalar blob (shape ``()``, Caffe's 0-axis blob). Backward scales the
gradient by ``top[0].xdiff``, where the net has put the loss weight, so the bottom gets
``loss_weight * d(loss)/d(bottom)`` as in Caffe. Labels are never back-propagated.
"""
import logging

import numpy as np

from ..core import threads
from ..errors import ShapeError
from ..kernels import cuda_softmax, cudnn_softmax, engines  # noqa: F401  (importing registers the engines)
from ..proto import caffe_pb2
from ..core.layer import Layer, register
from ..core.numeric import element_count
from .shape import canonical_axis

# the modules whose import registers the engines of the softmax layers (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_softmax,)

log = logging.getLogger("minicaffe")

_Norm = caffe_pb2.LossParameter
FLT_MIN = float(np.finfo(np.float32).tiny)   # Caffe clamps probabilities at FLT_MIN before log
LOG_THRESHOLD = 1e-20                        # Caffe's kLOG_THRESHOLD (Infogain, MultinomialLogistic)


def softmax(xp, x, axis, out):
    """Numerically stable softmax of ``x`` along ``axis`` written into ``out`` (may be ``x``)."""
    m = x.max(axis=axis, keepdims=True)
    xp.subtract(x, m, out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def by_positions(outer, inner, fn, work):
    """``fn(rows, cols)`` (two slices) over parts of an (outer, classes, inner) layout on the thread
    pool: ranges of ``outer`` when there are at least as many as threads, else ranges of ``inner``
    starting at multiples of ``threads.FLAT_BLOCK`` (one image of an FCN's per-pixel softmax). Inline
    under ``threads.MIN_FLAT_ELEMENTS`` of ``work``.

    Why it keeps the bits: every value of a softmax (and of its gradient) depends only on its own
    position's column of classes; a part holds whole columns, and a column's max and sum run over the
    same elements in the same order as in the whole array's reduction."""
    if work < threads.MIN_FLAT_ELEMENTS:
        fn(slice(None), slice(None))
    elif outer >= threads.size():
        threads.parallel_for(outer, lambda o0, o1: fn(slice(o0, o1), slice(None)), work=work)
    else:
        # the last part takes the remainder: a part one position wide would have NumPy sum its
        # classes pairwise (the only run left), where wider parts add them one after the other
        block = threads.FLAT_BLOCK
        blocks = max(1, inner // block)
        threads.parallel_for(blocks, lambda b0, b1: fn(
            slice(None), slice(b0 * block, inner if b1 == blocks else b1 * block)), work=work)


def _as3(arrays, axis):
    """C-contiguous NumPy ``arrays`` (one shape) viewed as (outer, classes, inner) around ``axis``,
    else None (CuPy arrays, strided views: the caller works on them whole)."""
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
        return None
    s = arrays[0].shape
    shape = (element_count(s[:axis]), s[axis], element_count(s[axis + 1:]))
    return [a.reshape(shape) for a in arrays]


def normalizer(mode, outer, inner, valid_count):
    """Caffe's get_normalizer, including its max(1, ·) guard (a batch of only ignored labels
    gives loss 0, not a division by zero)."""
    if mode == _Norm.FULL:
        n = outer * inner
    elif mode == _Norm.VALID:
        n = outer * inner if valid_count is None else valid_count
    elif mode == _Norm.BATCH_SIZE:
        n = outer
    elif mode == _Norm.NONE:
        n = 1
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    return float(max(1, n))


def _ignore_label(param):
    return int(param.ignore_label) if param.HasField("ignore_label") else None


def read_labels(layer, blob, shape, num_classes, ignore):
    """Integer labels of ``blob`` (truncated like Caffe's static_cast) viewed as ``shape``.

    Returns ``(safe, valid)``: ``safe`` has ignored entries replaced by 0 so it can index,
    ``valid`` is the mask of counted entries (None when there is no ignore_label). A label outside
    [0, num_classes) that is not the ignore_label is an error naming it."""
    xp = layer.xp
    lab = blob.xdata.reshape(shape).astype(xp.int64)
    bad = (lab < 0) | (lab >= num_classes)
    valid = None
    if ignore is not None:
        valid = lab != ignore
        bad &= valid
    if bool(bad.any()):
        raise _label_error(layer, int(lab[bad].ravel()[0]), num_classes, ignore)
    safe = lab if valid is None else xp.where(valid, lab, 0)
    return safe, valid


def _label_error(layer, first, num_classes, ignore):
    hint = f" and is not the ignore_label {ignore}" if ignore is not None else ""
    return layer.error(f"label {first} is out of range [0, {num_classes}){hint}")


def check_labels(layer, blob, num_classes, ignore):
    """``read_labels``'s range check alone, on the host copy when that is current (labels come from
    a data layer on the host: no device sync), else on the device (one sync)."""
    if not blob.host_is_current():
        read_labels(layer, blob, (blob.count,), num_classes, ignore)
        return
    lab = blob.host_data.reshape(-1).astype(np.int64)
    bad = (lab < 0) | (lab >= num_classes)
    if ignore is not None:
        bad &= lab != ignore
    if bad.any():
        raise _label_error(layer, int(lab[bad][0]), num_classes, ignore)


class LossLayer(Layer):
    """Two bottoms (predictions, labels/targets), a scalar top; labels get no gradient."""

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    auto_top_blobs = True    # Caffe's AutoTopBlobs: the net may add the top when none is named

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def reshape(self, bottom, top):
        a, b = bottom[0].shape, bottom[1].shape
        if (a[:1] or (1,)) != (b[:1] or (1,)):
            raise self.error(f"the predictions {a} and the labels {b} must have the same first "
                             f"dimension", ShapeError)
        top[0].reshape(())

    def no_label_grad(self, propagate_down, label_bottoms=(1,)):
        for i in label_bottoms:
            if i < len(propagate_down) and propagate_down[i]:
                raise self.error(f"cannot back-propagate to bottom[{i}] (the labels)")


class _SoftmaxEngines:
    """The reference softmax and the engine slot shared by the softmax layers (their engines
    implement the methods named in the module docstring)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)   # its own methods: the reference
        self.engine = None

    def choose_engine(self, bottom):
        self.engine = self.engine_slot.get(self, tuple(bottom[0].shape))

    def softmax(self, x, axis, out):
        v = _as3((x, out), axis)
        if v is None:
            return softmax(self.xp, x, axis, out)
        x3, out3 = v
        by_positions(x3.shape[0], x3.shape[2], lambda r, c: softmax(np, x3[r, :, c], 1, out3[r, :, c]),
                     work=x.size * 4)
        return out

    def softmax_backward(self, y, dy, axis, dx):
        v = _as3((y, dy, dx), axis)
        if v is None:
            return self._softmax_backward(y, dy, axis, dx)
        y3, dy3, dx3 = v
        by_positions(y3.shape[0], y3.shape[2],
                     lambda r, c: self._softmax_backward(y3[r, :, c], dy3[r, :, c], 1, dx3[r, :, c]),
                     work=y.size * 4)
        return dx

    def _softmax_backward(self, y, dy, axis, dx):
        """``dx = (dy - Σ dy·y)·y`` along ``axis``; ``dx`` may be ``dy`` (read first)."""
        dot = (dy * y).sum(axis=axis, keepdims=True)
        dx[...] = (dy - dot) * y
        return dx


@register("Softmax")
class Softmax(_SoftmaxEngines, Layer):
    """exp(x - max) / sum along ``softmax_param.axis`` (default 1); usable in place."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True   # backward reads only the output

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self, self.param.softmax_param.axis, len(bottom[0].shape))
        top[0].reshape(bottom[0].shape)
        self.choose_engine(bottom)

    def forward(self, bottom, top):
        self.choose_engine(bottom)      # the same, unless the mode changed
        self.engine.softmax(bottom[0].xdata, self.axis, top[0].xdata)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # written in place: dy may be the bottom's diff
        self.engine.softmax_backward(top[0].xdata, top[0].xdiff, self.axis, bottom[0].xdiff)


class _SoftmaxLoss(_SoftmaxEngines, LossLayer):
    """Shared by SoftmaxWithLoss and InfogainLoss: the probabilities and the label layout."""

    min_num_top = 1
    max_num_top = 2
    exact_num_top = None

    def __init__(self, param, phase):
        super().__init__(param, phase)
        # what forward keeps for backward: the probabilities, the labels (ignored ones as 0), the
        # mask of counted labels (None without ignore_label) and the normaliser
        self.prob = self.labels = self.valid = self.norm = None

    def softmax_axis(self):
        return self.param.softmax_param.axis

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.softmax_axis(), len(shape))
        self.outer = element_count(shape[:self.axis])
        self.inner = element_count(shape[self.axis + 1:])
        self.classes = shape[self.axis]
        if bottom[1].count != self.outer * self.inner:
            raise self.error(f"{bottom[1].count} labels {bottom[1].shape} for predictions {shape}: with "
                             f"axis {self.axis} there must be {self.outer * self.inner} "
                             f"(every axis but the class axis)", ShapeError)
        if len(top) > 1:
            top[1].reshape(shape)
        self.choose_engine(bottom)

    def probabilities(self, bottom, top):
        x = bottom[0].xdata
        self.prob = self.engine.softmax(x, self.axis, self.xp.empty_like(x))
        if len(top) > 1:
            top[1].xdata = self.prob
        return self.prob.reshape(self.outer, self.classes, self.inner)


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_SoftmaxLoss):
    """Multinomial logistic loss of the softmax of bottom[0] for integer labels bottom[1].

    ``loss_param``: ``ignore_label`` (those entries add nothing and are not counted) and
    ``normalization`` VALID (default: divide by the counted labels) / FULL / BATCH_SIZE / NONE; the
    legacy ``normalize: false`` means BATCH_SIZE. Optional top[1]: the probabilities."""

    def setup(self, bottom, top):
        log.info("Creating layer %s", self.name)     # Caffe's inner Softmax layer, made by the factory
        lp = self.param.loss_param
        self.ignore = _ignore_label(lp)
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.norm_mode = _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
        else:
            self.norm_mode = lp.normalization

    def forward(self, bottom, top):
        self.choose_engine(bottom)      # the same, unless the mode changed
        if self.engine is not self:
            self._forward_engine(bottom, top)
            return
        xp = self.xp
        prob = self.probabilities(bottom, top)
        safe, valid = read_labels(self, bottom[1], (self.outer, self.inner), self.classes, self.ignore)
        p = xp.take_along_axis(prob, safe[:, None, :], axis=1)[:, 0, :]
        logp = xp.log(xp.maximum(p, FLT_MIN))
        if valid is not None:
            logp *= valid
            count = int(valid.sum())
        else:
            count = None
        self.labels, self.valid = safe, valid
        self.norm = normalizer(self.norm_mode, self.outer, self.inner, count)
        top[0].xdata[...] = -logp.sum() / self.norm

    def _forward_engine(self, bottom, top):
        """An engine's loss and count stay on the device (no host read, unlike the reference's
        label mask); the labels are range-checked on their host copy where that is current."""
        check_labels(self, bottom[1], self.classes, self.ignore)
        self.probabilities(bottom, top)
        loss, count = self.engine.loss(self.prob, bottom[1].xdata, self.axis, self.ignore)
        if self.ignore is not None and self.norm_mode == _Norm.VALID:
            self.norm = self.xp.maximum(count, 1)          # a device scalar
        else:
            self.norm = normalizer(self.norm_mode, self.outer, self.inner, None)
        top[0].xdata[...] = loss / self.norm

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        if self.engine is not self:
            self.engine.loss_backward(self.prob, bottom[1].xdata, top[0].xdiff / self.norm, self.axis,
                                    self.ignore, bottom[0].xdiff)
            return
        xp = self.xp
        prob = self.prob.reshape(self.outer, self.classes, self.inner)
        grad = xp.empty_like(prob)
        scale = top[0].xdiff / self.norm

        def part(r, c):
            # the gradient at positions [r, :, c]: the same operations as on the whole array
            g = grad[r, :, c]
            g[...] = prob[r, :, c]
            labels = self.labels[r, c]
            g[xp.arange(labels.shape[0])[:, None], labels, xp.arange(labels.shape[1])[None, :]] -= 1
            if self.valid is not None:
                g *= self.valid[r, None, c]
            g *= scale
        if isinstance(grad, np.ndarray):
            by_positions(self.outer, self.inner, part, work=grad.size * 3)
        else:
            part(slice(None), slice(None))
        bottom[0].xdiff = grad.reshape(bottom[0].shape)


@register("InfogainLoss")
class InfogainLoss(_SoftmaxLoss):
    """SoftmaxWithLoss generalised by an infogain matrix H (C x C): loss = -sum_l H[label, l] log p_l.

    H comes from bottom[2] or from ``infogain_loss_param.source`` (a binary BlobProto);
    ``infogain_loss_param.axis`` is the class axis; ``loss_param`` as SoftmaxWithLoss (except the
    deprecated ``normalize``, which Caffe rejects here)."""

    exact_num_bottom = None
    min_num_bottom = 2
    max_num_bottom = 3

    def softmax_axis(self):
        return self.param.infogain_loss_param.axis

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom, top):
        log.info("Creating layer %s", self.name)     # Caffe's inner Softmax layer, made by the factory
        lp = self.param.loss_param
        self.ignore = _ignore_label(lp)
        if lp.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss: use normalization")
        self.norm_mode = lp.normalization
        self.H_source = None
        if len(bottom) < 3:
            ip = self.param.infogain_loss_param
            if not ip.HasField("source"):
                raise self.error("needs the infogain matrix: a third bottom or infogain_loss_param.source")
            self.H_source = _read_blob_proto(self, ip.source)

    def _matrix(self, bottom):
        H = bottom[2].xdata if len(bottom) > 2 else self.xp.asarray(self.H_source)
        return H.reshape(self.classes, self.classes).astype(bottom[0].xdata.dtype, copy=False)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        H = bottom[2] if len(bottom) > 2 else self.H_source
        size = H.count if len(bottom) > 2 else H.size
        if size != self.classes * self.classes:
            raise self.error(f"the infogain matrix has {size} values; {self.classes} classes need "
                             f"{self.classes}x{self.classes}", ShapeError)

    def forward(self, bottom, top):
        xp = self.xp
        prob = self.probabilities(bottom, top)
        safe, valid = read_labels(self, bottom[1], (self.outer, self.inner), self.classes, self.ignore)
        H = self._matrix(bottom)
        rows = H[safe]                                         # outer x inner x C
        logp = xp.log(xp.maximum(prob, LOG_THRESHOLD))          # outer x C x inner
        per = (rows.transpose(0, 2, 1) * logp).sum(axis=1)    # outer x inner
        if valid is not None:
            per *= valid
            count = int(valid.sum())
        else:
            count = None
        self.labels, self.valid = safe, valid
        self.norm = normalizer(self.norm_mode, self.outer, self.inner, count)
        top[0].xdata[...] = -per.sum() / self.norm

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down, (1, 2))
        if not propagate_down[0]:
            return
        H = self._matrix(bottom)
        prob = self.prob.reshape(self.outer, self.classes, self.inner)
        row_sums = H.sum(axis=1)[self.labels]                   # outer x inner
        grad = prob * row_sums[:, None, :] - H[self.labels].transpose(0, 2, 1)
        if self.valid is not None:
            grad *= self.valid[:, None, :]
        grad *= top[0].xdiff / self.norm
        bottom[0].xdiff = grad.reshape(bottom[0].shape)


def _read_blob_proto(layer, path):
    """A host array from a binary BlobProto file (shape, or legacy num/channels/height/width)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise layer.error(f"cannot read the infogain matrix '{path}': {exc.strerror or exc}") from None
    proto = caffe_pb2.BlobProto()
    try:
        proto.ParseFromString(raw)
    except Exception as exc:
        raise layer.error(f"'{path}' is not a binary BlobProto: {exc}") from None
    values = proto.double_data if len(proto.double_data) else proto.data
    return np.asarray(values, dtype=np.float64)


@register("EuclideanLoss")
class EuclideanLoss(LossLayer):
    """sum((a - b)^2) / (2 N); gradients go to both bottoms (either may be learned)."""

    def allow_force_backward(self, bottom_index):
        return True

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_from(1) != bottom[1].count_from(1):
            raise self.error(f"bottoms {bottom[0].shape} and {bottom[1].shape} must have the same "
                             f"size per example", ShapeError)

    def forward(self, bottom, top):
        self.diff = bottom[0].xdata - bottom[1].xdata.reshape(bottom[0].shape)
        num = bottom[0].shape[0] if bottom[0].shape else 1
        top[0].xdata[...] = (self.diff * self.diff).sum() / num / 2.0

    def backward(self, top, propagate_down, bottom):
        grads = {}
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                num = bottom[i].shape[0] if bottom[i].shape else 1
                grads[i] = self.diff * (top[0].xdiff * (sign / num))
        for i, g in grads.items():
            bottom[i].xdiff = g.reshape(bottom[i].shape)


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """Cross-entropy of sigmoid(bottom[0]) against targets bottom[1] in [0, 1], computed stably.

    ``loss_param``: ``ignore_label`` (targets equal to it after int truncation are skipped) and
    ``normalization``; when neither ``normalization`` nor ``normalize`` is given Caffe divides by
    the batch size here (BATCH_SIZE), not by the valid count."""

    def setup(self, bottom, top):
        lp = self.param.loss_param
        self.ignore = _ignore_label(lp)
        if lp.HasField("normalization"):
            self.norm_mode = lp.normalization
        elif lp.HasField("normalize"):
            self.norm_mode = _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
        else:
            self.norm_mode = _Norm.BATCH_SIZE

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"predictions {bottom[0].shape} and targets {bottom[1].shape} must have "
                             f"the same count", ShapeError)
        self.outer = bottom[0].shape[0] if bottom[0].shape else 1
        self.inner = bottom[0].count_from(1)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata
        t = bottom[1].xdata.reshape(x.shape)
        pos = (x >= 0).astype(x.dtype)
        # -[x (t - [x>=0]) - log(1 + exp(x - 2 x [x>=0]))], i.e. log(1 + e^-|x|) with the sign split
        loss = xp.log1p(xp.exp(-xp.abs(x))) - x * (t - pos)
        self.valid = None
        count = None
        if self.ignore is not None:
            self.valid = t.astype(xp.int64) != self.ignore
            loss *= self.valid
            count = int(self.valid.sum())
        self.norm = normalizer(self.norm_mode, self.outer, self.inner, count)
        top[0].xdata[...] = loss.sum() / self.norm

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        xp = self.xp
        x = bottom[0].xdata
        sig = xp.tanh(x * 0.5) * 0.5 + 0.5    # sigmoid without overflow
        grad = sig - bottom[1].xdata.reshape(x.shape)
        if self.valid is not None:
            grad *= self.valid
        grad *= top[0].xdiff / self.norm
        bottom[0].xdiff = grad


@register("HingeLoss")
class HingeLoss(LossLayer):
    """One-vs-all hinge: sum over classes of max(0, 1 - s_j x_j) with s_j = +1 for the true class,
    -1 otherwise, summed (L1) or squared and summed (L2), divided by N."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.num = bottom[0].shape[0] if bottom[0].shape else 1
        self.dim = bottom[0].count // max(self.num, 1)
        if bottom[1].count != self.num:
            raise self.error(f"needs one label per example: {bottom[1].count} labels {bottom[1].shape} "
                             f"for {self.num} examples", ShapeError)
        self.l2 = self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2

    def forward(self, bottom, top):
        xp = self.xp
        labels, _ = read_labels(self, bottom[1], (self.num,), self.dim, None)
        margin = bottom[0].xdata.reshape(self.num, self.dim).copy()
        rows = xp.arange(self.num)
        margin[rows, labels] *= -1
        margin += 1
        xp.maximum(margin, 0, out=margin)
        # the gradient's sign pattern: the true class enters with -x
        margin[rows, labels] *= -1
        self.signed = margin
        total = (margin * margin).sum() if self.l2 else xp.abs(margin).sum()
        top[0].xdata[...] = total / self.num

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        xp = self.xp
        if self.l2:
            grad = self.signed * (top[0].xdiff * (2.0 / self.num))
        else:
            grad = xp.sign(self.signed) * (top[0].xdiff / self.num)
        bottom[0].xdiff = grad.reshape(bottom[0].shape)


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LossLayer):
    """-log p[label] / N for probabilities p given directly (p clamped at 1e-20 as Caffe)."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        lb = bottom[1]
        if (lb.channels, lb.height, lb.width) != (1, 1, 1):
            raise self.error(f"the labels must be N x 1 x 1 x 1, got {lb.shape}", ShapeError)
        self.num = bottom[0].shape[0] if bottom[0].shape else 1
        self.dim = bottom[0].count // max(self.num, 1)

    def forward(self, bottom, top):
        xp = self.xp
        labels, _ = read_labels(self, bottom[1], (self.num,), self.dim, None)
        p = bottom[0].xdata.reshape(self.num, self.dim)[xp.arange(self.num), labels]
        self.labels, self.p = labels, xp.maximum(p, LOG_THRESHOLD)
        top[0].xdata[...] = -xp.log(self.p).sum() / self.num

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        xp = self.xp
        grad = xp.zeros((self.num, self.dim), dtype=bottom[0].xdata.dtype)
        grad[xp.arange(self.num), self.labels] = -(top[0].xdiff / self.num) / self.p
        bottom[0].xdiff = grad.reshape(bottom[0].shape)


@register("ContrastiveLoss")
class ContrastiveLoss(LossLayer):
    """Hadsell et al.'s loss over pairs (a, b) with a similarity label y (1 similar, 0 not):
    sum(y·d² + (1 − y)·max(margin − d, 0)²) / (2N), d the Euclidean distance of a row pair;
    ``legacy_version`` uses max(margin − d², 0) for dissimilar pairs instead. Labels are read as
    integers (any non-zero value after truncation counts as similar), as Caffe does.

    Bottoms are (N, C) or (N, C, 1, 1); the gradient for a dissimilar pair divides by d + 1e-4
    (Caffe's guard against d = 0), so both bottoms may be learned; the labels get none."""

    exact_num_bottom = 3

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def setup(self, bottom, top):
        a, b, y = bottom
        if a.channels != b.channels:
            raise self.error(f"bottoms 0 and 1 must have the same channels, got {a.shape} and {b.shape}",
                             ShapeError)
        for i, blob in enumerate((a, b)):
            if blob.height != 1 or blob.width != 1:
                raise self.error(f"bottom[{i}] must be (N, C) or (N, C, 1, 1), got {blob.shape}",
                                 ShapeError)
        if y.channels != 1 or y.height != 1 or y.width != 1:
            raise self.error(f"bottom[2] (the similarity labels) must hold one value per pair, got "
                             f"shape {y.shape}", ShapeError)
        p = self.param.contrastive_loss_param
        self.margin, self.legacy = float(p.margin), bool(p.legacy_version)

    def reshape(self, bottom, top):
        a, b, y = bottom
        if not (a.num == b.num == y.num) or a.count != b.count:
            raise self.error(f"bottoms {a.shape}, {b.shape} and {y.shape} must hold the same number of "
                             f"pairs", ShapeError)
        top[0].reshape(())

    def _similar(self, bottom):
        # Caffe's static_cast<int>: truncation toward zero, then non-zero means "similar"
        return self.xp.trunc(bottom[2].xdata.reshape(-1)) != 0

    def forward(self, bottom, top):
        xp = self.xp
        n = bottom[0].num
        self.diff = bottom[0].xdata.reshape(n, -1) - bottom[1].xdata.reshape(n, -1)
        self.dist_sq = (self.diff * self.diff).sum(axis=1)
        similar = self._similar(bottom)
        if self.legacy:
            dissimilar = xp.maximum(self.margin - self.dist_sq, 0)
        else:
            dissimilar = xp.maximum(self.margin - xp.sqrt(self.dist_sq), 0)
            dissimilar *= dissimilar
        per_pair = xp.where(similar, self.dist_sq, dissimilar)
        top[0].xdata[...] = per_pair.sum() / n / 2.0

    def backward(self, top, propagate_down, bottom):
        self.no_label_grad(propagate_down, label_bottoms=(2,))
        xp = self.xp
        n = bottom[0].num
        similar = self._similar(bottom)
        if self.legacy:
            mdist = self.margin - self.dist_sq
            coeff = -xp.ones_like(mdist)
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = self.margin - dist
            coeff = -mdist / (dist + 1e-4)
        coeff = xp.where(similar, 1.0, xp.where(mdist > 0, coeff, 0.0)).astype(self.diff.dtype)
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].xdiff.reshape(()) * (sign / n)
                bottom[i].xdiff = (self.diff * (coeff * alpha)[:, None]).reshape(bottom[i].shape)
