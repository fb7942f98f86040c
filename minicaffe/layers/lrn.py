"""Local response normalisation (AlexNet, GoogLeNet), both of Caffe's regions.

ACROSS_CHANNELS: ``scale = k + alpha/size · Σ x²`` over ``size`` channels centred on c (zero padded),
WITHIN_CHANNEL: ``scale = 1 + alpha/size² · Σ x²`` over a size×size window (zero padded; Caffe
builds it from an average pooling whose divisor is always size², and its shift is 1, not k).
Both give ``y = x · scale^(−beta)``.

The window sums add ``size`` shifted slices of one zero-padded buffer: a handful of whole-array
additions, with none of the cancellation a running (cumulative) sum suffers in float32.
"""
from ..errors import ShapeError
from ..proto import caffe_pb2
from .base import Layer, register


def _neg_pow(xp, s, beta):
    """s^(−beta), with square roots for the usual betas (much faster than a general power)."""
    if beta == 0.75:
        r = xp.sqrt(s)
        r *= xp.sqrt(r)
    elif beta == 0.5:
        r = xp.sqrt(s)
    elif beta == 1:
        r = s.copy()
    else:
        return xp.power(s, -beta)
    return xp.reciprocal(r, out=r)


@register("LRN")
class LRN(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.lrn_param
        self.size = int(p.local_size)
        if self.size < 1 or self.size % 2 == 0:
            raise self.error(f"local_size must be a positive odd number, got {self.size}")
        self.pre = (self.size - 1) // 2
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.within = p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        if self.within:
            self.sum_scale, self.shift = self.alpha / (self.size * self.size), 1.0
        else:
            self.sum_scale, self.shift = self.alpha / self.size, self.k
        if top[0] is bottom[0]:
            raise self.error("LRN cannot run in place (backward needs both its input and output)")
        self._buffers = {}

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), got shape "
                             f"{bottom[0].shape}", ShapeError)
        top[0].reshape(bottom[0].shape)

    # --- window sums -------------------------------------------------------------------------
    def _padded(self, shape, dtype):
        """A zero-bordered buffer, kept between calls: only its interior is ever written."""
        xp = self.xp
        key = (shape, dtype, xp.__name__)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 4:
                self._buffers.clear()
            buf = self._buffers[key] = xp.zeros(shape, dtype=dtype)
        return buf

    def _shifted_sum(self, a, axis):
        """Σ over offsets −pre..pre of ``a`` along ``axis``, zero outside."""
        if self.size == 1:
            return a.copy()
        n = a.shape[axis]
        shape = list(a.shape)
        shape[axis] += self.size - 1
        pad = self._padded(tuple(shape), a.dtype)

        def part(lo, hi):
            index = [slice(None)] * a.ndim
            index[axis] = slice(lo, hi)
            return pad[tuple(index)]

        part(self.pre, self.pre + n)[...] = a
        out = part(0, n) + part(1, n + 1)
        for o in range(2, self.size):
            out += part(o, o + n)
        return out

    def _window_sum(self, a):
        if self.within:
            return self._shifted_sum(self._shifted_sum(a, 2), 3)
        return self._shifted_sum(a, 1)

    # --- forward / backward --------------------------------------------------------------------
    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata
        scale = self._window_sum(x * x)
        scale *= self.sum_scale
        scale += self.shift
        self._scale = scale
        self._scale_pow = _neg_pow(xp, scale, self.beta)
        xp.multiply(x, self._scale_pow, out=top[0].xdata)

    def backward(self, top, propagate_down, bottom):
        """dx_i = dy_i·scale_i^(−β) − (2αβ/n)·x_i·Σ_{j: i in window(j)} dy_j·y_j/scale_j,
        n = size or size²; windows are symmetric, so that sum is one more window sum."""
        if not propagate_down[0]:
            return
        dy = top[0].xdiff
        ratio = dy * top[0].xdata
        ratio /= self._scale
        acc = self._window_sum(ratio)
        acc *= bottom[0].xdata
        acc *= 2.0 * self.beta * self.sum_scale
        dx = bottom[0].xdiff
        self.xp.multiply(dy, self._scale_pow, out=dx)
        dx -= acc
