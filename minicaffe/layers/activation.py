"""Element-wise ("neuron") layers: one bottom, one top of the same shape, all usable in place.

Forward writes into the top's own buffer (``out=``), so a blob keeps its storage between
iterations. When top is bottom, the input is gone after forward; a layer whose gradient needs the
input (and cannot recover it from the output) keeps a copy of it, as Caffe's PReLU does.

Each layer's ``compute``/``gradient`` is the reference (``xp`` code, NumPy or CuPy). A faster way is
an engine chosen at reshape from ``minicaffe.kernels.engines`` (ReLU's fused CUDA kernels live in
``kernels/cuda_elementwise.py``, PReLU's and ELU's in ``kernels/cuda_activation.py``); ``relu_param``/``sigmoid_param``/``tanh_param`` ``engine: CAFFE``
keeps the reference.
"""
import math

import numpy as np

from ..core import fillers, threads
from ..core.blob import Blob
from ..core.context import Slot
from ..kernels.im2col import workspace
from ..kernels import compiled, cuda_activation, cuda_elementwise, engines
from ..core.layer import Layer, register

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_RELU_MASK = Slot("relu_mask")

# the modules whose import registers the engines of ReLU, PReLU and ELU (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_elementwise, cuda_activation)


def _leaky(xp, x, slope, y):
    """y = max(x, 0) + slope·min(x, 0), Caffe's formula (exact; much faster than ``where``)."""
    neg = xp.minimum(x, 0)
    neg *= slope
    xp.maximum(x, 0, out=y)
    y += neg


def _leaky_grad(xp, x, slope, dy, dx):
    """dx = dy·((x > 0) + slope·(x <= 0)); the factor is exactly 1 or the slope."""
    factor = xp.multiply(x <= 0, slope, dtype=dy.dtype)
    factor += x > 0
    xp.multiply(dy, factor, out=dx)


class NeuronLayer(Layer):
    """Shared plumbing: shape, the in-place input copy, and the propagate_down check."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True   # forward keeps a copy of the input when backward needs it

    def __init__(self, param, phase):
        super().__init__(param, phase)
        # engines implement compute(x, y) and gradient(x, y, dy, dx); this layer's own are the reference
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)   # its own methods: the reference
        self.engine = None
        self._saved_input = None

    def backward_needs_input(self):
        """True when backward must read the bottom data (so an in-place forward keeps a copy)."""
        return False

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        self.engine = self.engine_slot.get(self, tuple(bottom[0].shape))

    def forward(self, bottom, top):
        x = bottom[0].xdata
        self._saved_input = None
        if top[0] is bottom[0] and self.backward_needs_input():
            self._saved_input = x.copy()
        self.engine = self.engine_slot.get(self, tuple(x.shape))   # the same, unless the mode changed
        self._split(self.engine.compute, x, top[0].xdata)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        self._split(self.engine.gradient, self.input_data(bottom), top[0].xdata, top[0].xdiff,
                    bottom[0].xdiff)

    # The reference's pass is element by element (each output element from the same elements of the
    # inputs, scalar parameters only), so it runs on the thread pool in flat chunks, each chunk the
    # very same ufuncs on its slices: bit-identical at any thread count. False where a layer's pass
    # is not (PReLU's per-channel slope broadcasts over the shape; Swish keeps its sigmoid whole).
    elementwise = True

    def _split(self, fn, *arrays):
        """``fn(*arrays)``, on the thread pool in flat chunks where it is the reference's element-wise
        pass over contiguous NumPy arrays, else whole (engines, GPU arrays, strided views)."""
        flat = threads.flat_views(*arrays) if self.elementwise and self.engine is self else None
        if flat is None:
            fn(*arrays)
            return
        threads.parallel_flat(flat[0].size, lambda a, b: fn(*(f[a:b] for f in flat)),
                              work=flat[0].size * len(flat))

    def input_data(self, bottom):
        return self._saved_input if self._saved_input is not None else bottom[0].xdata

    # subclasses: y[...] = f(x); dx[...] = dy * f'(x). `dx` may be `dy` itself (in place) and
    # `y` may be `x`: read everything needed before writing.
    def compute(self, x, y):
        raise NotImplementedError

    def gradient(self, x, y, dy, dx):
        raise NotImplementedError


@register("ReLU")
class ReLU(NeuronLayer):
    """max(x, 0) + negative_slope * min(x, 0); the gradient at 0 is the negative slope (Caffe)."""

    def setup(self, bottom, top):
        self.slope = float(self.param.relu_param.negative_slope)

    def backward_needs_input(self):
        # with slope >= 0, y > 0 exactly where x > 0, so the output tells the sign
        return self.slope < 0

    def compute(self, x, y):
        if self.slope == 0:
            self.xp.maximum(x, 0, out=y)
        else:
            _leaky(self.xp, x, self.slope, y)

    def gradient(self, x, y, dy, dx):
        # in place with slope >= 0, x here is the output, whose sign is the input's
        if self.slope == 0 and compiled.runs_on(x, dy, dx):
            # one pass, the same bits as the mask and the multiply below (its twin)
            compiled.get(compiled.relu_backward)(x.reshape(-1), dy.reshape(-1), dx.reshape(-1), 0, x.size)
        elif self.slope == 0:
            positive = workspace(self.xp, x.shape, bool, _RELU_MASK)   # no new array per call
            self.xp.greater(x, 0, out=positive)
            self.xp.multiply(dy, positive, out=dx)
        else:
            _leaky_grad(self.xp, x, self.slope, dy, dx)


@register("PReLU")
class PReLU(NeuronLayer):
    """ReLU with a learned negative slope per channel (axis 1) or one shared by all channels."""

    elementwise = False     # the slope broadcasts per channel, and backward is its own

    def setup(self, bottom, top):
        p = self.param.prelu_param
        if len(bottom[0].shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        self.channel_shared = bool(p.channel_shared)
        channels = bottom[0].shape[1]
        shape = () if self.channel_shared else (channels,)
        if not self.blobs:
            if p.HasField("filler"):
                filler = p.filler
            else:
                filler = type(p.filler)(type="constant", value=0.25)
            blob = Blob(shape, name=f"{self.name}.slope")
            blob.data[...] = fillers.fill(filler, shape, dtype=blob.dtype, layer=self.name)
            self.blobs = [blob]
        count = self.blobs[0].count
        if self.channel_shared and count != 1:
            raise self.error(f"slope blob has {count} values but channel_shared needs 1")
        if not self.channel_shared and count != channels:
            raise self.error(f"slope blob has {count} values but bottom has {channels} channels")

    def reshape(self, bottom, top):
        if len(bottom[0].shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        super().reshape(bottom, top)

    def backward_needs_input(self):
        return True

    def _by_channels(self, arrays, fn, work):
        """``fn(c0, c1, views)`` over ranges of channels, ``views`` the (N, C, S) views of
        ``arrays`` (None ones stay None): on the thread pool for C-contiguous NumPy arrays, else one
        call over every channel (CuPy arrays, strided views)."""
        shape = arrays[0].shape
        n, c = shape[0], shape[1]
        if all(a is None or (isinstance(a, np.ndarray) and a.flags.c_contiguous) for a in arrays):
            views = [None if a is None else a.reshape(n, c, -1) for a in arrays]
            threads.parallel_for(c, lambda c0, c1: fn(c0, c1, views), work=work)
        else:
            fn(0, c, [None if a is None else a.reshape(n, c, -1) for a in arrays])

    def _slope3(self):
        """The slope broadcastable against (N, C, S) views: (1, C, 1), or a scalar when shared."""
        s = self.blobs[0].xdata
        return s.reshape(()) if self.channel_shared else s.reshape(1, -1, 1)

    def _part(self, s, c0, c1):
        return s if self.channel_shared else s[:, c0:c1]

    def compute(self, x, y):
        # element by element with the channel's slope: split over channels, the same bits
        s = self._slope3()
        self._by_channels((x, y), lambda c0, c1, v: _leaky(
            self.xp, v[0][:, c0:c1], self._part(s, c0, c1), v[1][:, c0:c1]), work=2 * x.size)

    def backward(self, top, propagate_down, bottom):
        self.engine.prelu_gradient(self.input_data(bottom), top[0].xdiff,
                                   self.blobs[0].xdiff if self.need_param_grad(0) else None,
                                   bottom[0].xdiff if propagate_down[0] else None)

    def prelu_gradient(self, x, dy, slope_diff, dx):
        """The reference gradient: ``slope_diff += Σ min(x, 0)·dy`` (per channel, or over all
        with ``channel_shared``) and ``dx``; either may be None (not wanted). ``dx`` may be ``dy``.

        Split over channels on the thread pool. The products ``min(x, 0)·dy`` go into a
        (C, N·S) buffer, each channel a contiguous row, and a channel's sum is its row's sum (NumPy's
        pairwise order over the row): the same order whichever channels a thread holds, so the
        gradient has the same bits at any thread count. With ``channel_shared`` the sum of the whole
        buffer is taken after every chunk ended, on one thread."""
        xp = self.xp
        n, c = x.shape[0], x.shape[1]
        s = self._slope3()
        neg = None if slope_diff is None else xp.empty((c, n, x.size // max(n * c, 1)), dtype=dy.dtype)
        g = None if slope_diff is None or self.channel_shared else xp.empty(c, dtype=dy.dtype)

        def part(c0, c1, v):
            x3, dy3, dx3 = v
            xc, dyc = x3[:, c0:c1], dy3[:, c0:c1]
            # the slope gradient first: in place, writing dx overwrites dy
            if neg is not None:
                rows = neg[c0:c1].transpose(1, 0, 2)        # (N, k, S) view of the channels' rows
                xp.minimum(xc, 0, out=rows)
                rows *= dyc
                if g is not None:
                    g[c0:c1] = neg[c0:c1].reshape(c1 - c0, -1).sum(axis=1)
            if dx3 is not None:
                _leaky_grad(xp, xc, self._part(s, c0, c1), dyc, dx3[:, c0:c1])
        self._by_channels((x, dy, dx), part, work=(3 if dx is not None else 2) * x.size)
        if slope_diff is not None:
            total = neg.sum() if self.channel_shared else g
            slope_diff += total.reshape(slope_diff.shape)


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """1 / (1 + e^-x), computed as 0.5·tanh(x/2) + 0.5 (Caffe's form: no overflow)."""

    def compute(self, x, y):
        xp = self.xp
        xp.multiply(x, 0.5, out=y)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def gradient(self, x, y, dy, dx):
        dx[...] = dy * y * (1 - y)


@register("TanH")
class TanH(NeuronLayer):
    def compute(self, x, y):
        self.xp.tanh(x, out=y)

    def gradient(self, x, y, dy, dx):
        dx[...] = dy * (1 - y * y)


@register("AbsVal")
class AbsVal(NeuronLayer):
    """|x|; gradient sign(x) (0 at 0). Caffe forbids in place; here in place keeps a copy."""

    def backward_needs_input(self):
        return True

    def compute(self, x, y):
        self.xp.abs(x, out=y)

    def gradient(self, x, y, dy, dx):
        dx[...] = dy * self.xp.sign(x)


@register("BNLL")
class BNLL(NeuronLayer):
    """log(1 + e^x) (softplus), as max(x, 0) + log1p(e^−|x|): no overflow, exact for large |x|.

    The gradient is the sigmoid, e/(1 + e) with e = exp(min(x, 50)) as Caffe has it (relatively
    exact far into the negative side, where 1 − e^−y computed from the output is not)."""

    def backward_needs_input(self):
        return True

    def compute(self, x, y):
        xp = self.xp
        t = xp.abs(x)
        t *= -1
        xp.exp(t, out=t)
        xp.log1p(t, out=t)
        xp.maximum(x, 0, out=y)
        y += t

    def gradient(self, x, y, dy, dx):
        xp = self.xp
        e = xp.minimum(x, 50.0)
        xp.exp(e, out=e)
        d = e + 1
        e /= d
        xp.multiply(dy, e, out=dx)


@register("ELU")
class ELU(NeuronLayer):
    """max(x, 0) + alpha·(e^min(x, 0) − 1); gradient alpha + y on the negative side (Caffe)."""

    def setup(self, bottom, top):
        self.alpha = float(self.param.elu_param.alpha)

    def backward_needs_input(self):
        # with alpha >= 0 the output is > 0 exactly where x > 0
        return self.alpha < 0

    def compute(self, x, y):
        # Caffe's form, exp(min(x, 0)) − 1: expm1 would be a little more exact near 0 but is
        # several times slower in NumPy
        xp = self.xp
        neg = xp.minimum(x, 0)
        xp.exp(neg, out=neg)
        neg -= 1
        neg *= self.alpha
        xp.maximum(x, 0, out=y)
        y += neg

    def gradient(self, x, y, dy, dx):
        # dy·((x > 0) + (alpha + y)·(x <= 0)); in place with alpha >= 0, x here is the output,
        # whose sign is the input's
        xp = self.xp
        factor = y + self.alpha
        factor *= x <= 0
        factor += x > 0
        xp.multiply(dy, factor, out=dx)


@register("Power")
class Power(NeuronLayer):
    """(shift + scale·x)^power with Caffe's special cases: power·scale == 0 gives the constant
    1 (power 0) or shift^power and a zero gradient; power 1 is affine."""

    def setup(self, bottom, top):
        p = self.param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = self.power * self.scale

    def backward_needs_input(self):
        return self.diff_scale != 0 and self.power != 1

    def _base(self, x, out=None):
        xp = self.xp
        if self.scale != 1:
            out = xp.multiply(x, self.scale, out=out)
        elif out is None:
            out = x.copy()
        elif out is not x:
            out[...] = x
        if self.shift != 0:
            out += self.shift
        return out

    def compute(self, x, y):
        if self.diff_scale == 0:
            y[...] = 1.0 if self.power == 0 else _real_pow(self.shift, self.power)
            return
        self._base(x, out=y)
        if self.power == 2:
            y *= y
        elif self.power != 1:
            self.xp.power(y, self.power, out=y)

    def gradient(self, x, y, dy, dx):
        if self.diff_scale == 0:
            dx[...] = 0
            return
        if self.power == 1:
            self.xp.multiply(dy, self.diff_scale, out=dx)
            return
        base = self._base(x)
        if self.power != 2:
            # the derivative itself rather than Caffe's y / base, which is 0/0 where base is 0
            self.xp.power(base, self.power - 1, out=base)
        base *= self.diff_scale
        self.xp.multiply(dy, base, out=dx)


def _real_pow(a, b):
    """a**b as C's pow gives it: NaN for a negative base with a fractional power, inf for 0**-b."""
    try:
        r = a ** b
    except ZeroDivisionError:
        return math.inf
    return math.nan if isinstance(r, complex) else float(r)


def _log_base(layer, base):
    """ln(base), with Caffe's convention that base -1 means e; other bases must be > 0 and != 1."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}")
    return math.log(base)


@register("Exp")
class Exp(NeuronLayer):
    """base^(shift + scale·x), computed as e^(shift·ln base) · e^(scale·ln base · x)."""

    def setup(self, bottom, top):
        p = self.param.exp_param
        log_base = _log_base(self, float(p.base))
        self.inner_scale = log_base * float(p.scale)
        try:
            self.outer_scale = math.exp(float(p.shift) * log_base)
        except OverflowError:       # Caffe's pow(base, shift) overflows to inf in float, it does not fail
            self.outer_scale = math.inf

    def compute(self, x, y):
        xp = self.xp
        if self.inner_scale == 1:
            xp.exp(x, out=y)
        else:
            xp.multiply(x, self.inner_scale, out=y)
            xp.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self.outer_scale

    def gradient(self, x, y, dy, dx):
        if self.inner_scale == 1:
            self.xp.multiply(dy, y, out=dx)
        else:
            dx[...] = dy * y * self.inner_scale


@register("Log")
class Log(NeuronLayer):
    """log_base(shift + scale·x); base -1 means e."""

    def setup(self, bottom, top):
        p = self.param.log_param
        log_base = _log_base(self, float(p.base))
        if log_base == 0:
            raise self.error("base 1 has no logarithm (1/ln(1) is infinite)")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)
        self.backward_num_scale = self.scale / log_base

    def backward_needs_input(self):
        return True

    def _inner(self, x, out):
        xp = self.xp
        if self.scale != 1:
            xp.multiply(x, self.scale, out=out)
        elif out is not x:
            out[...] = x
        if self.shift != 0:
            out += self.shift
        return out

    def compute(self, x, y):
        self.xp.log(self._inner(x, y), out=y)
        if self.base_scale != 1:
            y *= self.base_scale

    def gradient(self, x, y, dy, dx):
        inner = self._inner(x, self.xp.empty_like(x))
        dx[...] = dy * self.backward_num_scale / inner


@register("Clip")
class Clip(NeuronLayer):
    """min(max(x, clip_param.min), clip_param.max); the gradient passes where min <= x <= max
    (both ends included, as Caffe has it) and is 0 outside."""

    def setup(self, bottom, top):
        p = self.param.clip_param
        self.lo, self.hi = float(p.min), float(p.max)

    def backward_needs_input(self):
        # a clipped output equal to the bound cannot tell an input on the bound from one beyond it
        return True

    def compute(self, x, y):
        self.xp.clip(x, self.lo, self.hi, out=y)

    def gradient(self, x, y, dy, dx):
        inside = (x >= self.lo) & (x <= self.hi)
        self.xp.multiply(dy, inside, out=dx)


@register("Swish")
class Swish(NeuronLayer):
    """x · sigmoid(beta · x). The sigmoid of the forward pass is kept for the gradient,
    dy · (beta·y + s·(1 − beta·y)), Caffe's form (it needs only the output and s, so in place works)."""

    elementwise = False     # compute keeps the whole sigmoid for gradient

    def setup(self, bottom, top):
        self.beta = float(self.param.swish_param.beta)

    def compute(self, x, y):
        xp = self.xp
        s = xp.multiply(x, 0.5 * self.beta)
        xp.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        self._sigmoid = s
        xp.multiply(x, s, out=y)

    def gradient(self, x, y, dy, dx):
        by = y * self.beta
        factor = 1 - by
        factor *= self._sigmoid
        factor += by
        self.xp.multiply(dy, factor, out=dx)


@register("Threshold")
class Threshold(NeuronLayer):
    """1 where x > threshold_param.threshold, else 0. It has no gradient: Caffe aborts if a net
    asks it to back-propagate, here that is an error naming the layer."""

    def setup(self, bottom, top):
        self.threshold = float(self.param.threshold_param.threshold)

    def compute(self, x, y):
        self.xp.greater(x, self.threshold, out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down and propagate_down[0]:
            raise self.error("Threshold has no gradient: it cannot back-propagate")
