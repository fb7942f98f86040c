"""Dropout: "inverted" dropout as Caffe does it, so nothing changes between TRAIN and TEST nets."""
import numpy as np

from ..core import backend, threads
from ..proto import caffe_pb2
from ..core.layer import Layer, register


@register("Dropout")
class Dropout(Layer):
    """TRAIN: keep each unit with probability 1 − p and scale kept units by 1/(1 − p);
    TEST: the identity. The mask (already scaled) is kept for backward, so in place works."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True   # backward needs only the mask

    def setup(self, bottom, top):
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.mask = None

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def _train(self):
        return self.phase != caffe_pb2.TEST

    def _draw_mask(self, shape, dtype):
        """The scaled mask: 1/(1 − p) where a unit is kept (probability 1 − p), else 0."""
        xp = self.xp
        if backend.is_gpu():
            keep = backend.gpu_random_sample(shape, dtype) >= self.ratio
        else:
            # Caffe's test on 32 random bits, u >= p·2³²: three times faster than drawing floats
            count = 1
            for d in shape:
                count *= d
            keep = (self._draw_bits(count) >= self._limit()).reshape(shape)
        mask = self._mask_buffer(shape, dtype, type(keep))
        return xp.multiply(keep, self.scale, out=mask, dtype=dtype)

    def _draw_bits(self, count):
        """``count`` random 32-bit words from the host stream (Caffe draws one per unit)."""
        return backend.rng().bit_generator.random_raw((count + 1) // 2).view(np.uint32)[:count]

    def _limit(self):
        """Caffe's test on 32 random bits: a unit is kept where its bits are >= this."""
        return np.uint32(min(int(self.ratio * 2.0 ** 32), 2 ** 32 - 1))

    def _mask_buffer(self, shape, dtype, kind):
        """The mask's array of the last forward when it fits, else a new one (kept between calls)."""
        mask = self.mask
        if mask is None or mask.shape != tuple(shape) or mask.dtype != dtype or not isinstance(mask, kind):
            mask = self.xp.empty(shape, dtype=dtype)
        return mask

    def forward(self, bottom, top):
        x = bottom[0].xdata
        if not self._train():
            if top[0] is not bottom[0]:
                top[0].xdata[...] = x
            return
        y = top[0].xdata
        if backend.is_gpu() or threads.flat_views(x, y) is None:
            self.mask = self._draw_mask(x.shape, x.dtype)
            self.xp.multiply(x, self.mask, out=y)
            return
        # NumPy: the bits are drawn whole (one stream), then the test, the scaling and the product
        # run on flat chunks over the thread pool: the same arithmetic, so the same bits
        bits = self._draw_bits(x.size)
        mask = self._mask_buffer(x.shape, x.dtype, np.ndarray)
        xf, yf, mf = threads.flat_views(x, y, mask)
        limit = self._limit()

        def part(a, b):
            np.multiply(bits[a:b] >= limit, self.scale, out=mf[a:b], dtype=x.dtype)
            np.multiply(xf[a:b], mf[a:b], out=yf[a:b])
        threads.parallel_flat(x.size, part, work=x.size * 4)
        self.mask = mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].xdiff
        if not self._train():
            if top[0] is not bottom[0]:
                bottom[0].xdiff[...] = dy
            return
        dx = bottom[0].xdiff
        flat = threads.flat_views(dy, self.mask, dx)
        if flat is None:
            self.xp.multiply(dy, self.mask, out=dx)
            return
        fd, fm, fx = flat
        threads.parallel_flat(dy.size, lambda a, b: np.multiply(fd[a:b], fm[a:b], out=fx[a:b]),
                              work=dy.size * 3)
