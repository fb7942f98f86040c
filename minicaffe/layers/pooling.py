"""Pooling (MAX and AVE) with Caffe's output sizes, padding rules and argmax order.

Vectorised over all windows at once: the input is copied once into a padded array (``-inf`` for
MAX, ``0`` for AVE) large enough for every window of the ceil-rounded output, and the loop runs
only over the ``kh x kw`` offsets inside a window, each step a strided view of that array.

Caffe's rules kept here:
* output ``ceil((H + 2p - k) / s) + 1`` (``round_mode: FLOOR`` floors), minus one when ``pad > 0``
  and the last window would start in the padding (``(out - 1) s >= H + p``);
* AVE divides by the window clipped to the padded image (``min(start + k, H + p) - start``), so
  padding zeros count but the overhang of a ceil-rounded window does not;
* MAX ignores padding and keeps the first maximum in row-major window order; its optional second
  top holds the argmax as the flat index ``h * W + w``.
"""
import numpy as np

from ..backend import get_array_module
from ..errors import ShapeError
from ..im2col import column_phases, phase_shape, workspace
from ..proto import caffe_pb2
from .base import Layer, register

_PP = caffe_pb2.PoolingParameter


def _pooled_size(size, kernel, pad, stride, ceil_mode):
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register("Pooling")
class Pooling(Layer):
    """MAX or AVE pooling over 2-D windows of an (N, C, H, W) bottom."""

    exact_num_bottom = 1
    min_num_top = 1
    max_num_top = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        if param.pooling_param.pool == _PP.MAX:
            self.max_num_top = 2  # the argmax mask

    def setup(self, bottom, top):
        pp = self.param.pooling_param
        self.method = pp.pool
        if self.method == _PP.STOCHASTIC:
            raise self.error("pool: STOCHASTIC is not supported (use MAX or AVE)")
        if self.method not in (_PP.MAX, _PP.AVE):
            raise self.error(f"unknown pool method {self.method}")
        has = pp.HasField
        self.global_pooling = bool(pp.global_pooling)
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise self.error("with global_pooling: true the kernel size cannot be given")
        else:
            if has("kernel_size") and (has("kernel_h") or has("kernel_w")):
                raise self.error("give kernel_size or kernel_h and kernel_w, not both")
            if not has("kernel_size") and not (has("kernel_h") and has("kernel_w")):
                raise self.error("needs kernel_size, or both kernel_h and kernel_w (or global_pooling)")
        if has("pad") and (has("pad_h") or has("pad_w")) or has("pad_h") != has("pad_w"):
            raise self.error("give pad, or both pad_h and pad_w, not both forms")
        if has("stride") and (has("stride_h") or has("stride_w")) or has("stride_h") != has("stride_w"):
            raise self.error("give stride, or both stride_h and stride_w, not both forms")
        if has("kernel_size"):
            self.kh = self.kw = int(pp.kernel_size)
        else:
            self.kh, self.kw = int(pp.kernel_h), int(pp.kernel_w)
        if has("pad_h"):
            self.ph, self.pw = int(pp.pad_h), int(pp.pad_w)
        else:
            self.ph = self.pw = int(pp.pad)
        if has("stride_h"):
            self.sh, self.sw = int(pp.stride_h), int(pp.stride_w)
        else:
            self.sh = self.sw = int(pp.stride)
        if self.sh <= 0 or self.sw <= 0:
            raise self.error(f"stride must be positive, got {self.sh}x{self.sw}")
        if self.global_pooling:
            if self.ph or self.pw or self.sh != 1 or self.sw != 1:
                raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed")
        else:
            if self.kh <= 0 or self.kw <= 0:
                raise self.error(f"kernel size must be positive, got {self.kh}x{self.kw}")
            if self.ph >= self.kh or self.pw >= self.kw:
                raise self.error(f"pad {self.ph}x{self.pw} must be smaller than the kernel {self.kh}x{self.kw}")
        self.ceil_mode = pp.round_mode == _PP.CEIL
        self._off = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), got shape {shape}",
                             ShapeError)
        n, c, h, w = shape
        if self.global_pooling:
            self.kh, self.kw = h, w
        oh = _pooled_size(h, self.kh, self.ph, self.sh, self.ceil_mode)
        ow = _pooled_size(w, self.kw, self.pw, self.sw, self.ceil_mode)
        if oh <= 0 or ow <= 0:
            raise self.error(f"kernel {self.kh}x{self.kw} larger than padded input "
                             f"{h + 2 * self.ph}x{w + 2 * self.pw}", ShapeError)
        self.out_hw = (oh, ow)
        # the whole-image case (global pooling, or a kernel the size of an unpadded input)
        self.whole = (self.kh == h and self.kw == w and self.ph == 0 and self.pw == 0)
        for t in top:
            t.reshape(n, c, oh, ow)

    # --- helpers -----------------------------------------------------------------------------
    def _phase_shape(self, n, c, h, w):
        """Shape of the padded array in "phase" layout (N, C, Hp, sw, ceil(Wp / sw)).

        Padded column ``q*sw + r`` is stored at ``[..., r, q]``, so the element at window offset
        (i, j) of every window is a view whose innermost axis is contiguous (a plain strided
        view of a row with stride ``sw`` defeats vectorisation and costs ~10x).
        """
        oh, ow = self.out_hw
        hp = max((oh - 1) * self.sh + self.kh, h + self.ph)
        wp = max((ow - 1) * self.sw + self.kw, w + self.pw)
        return (n, c, hp) + phase_shape(self.sw, wp)

    def _window(self, arr, i, j):
        """The element at window offset (i, j) of every window: a view (N, C, oh, ow)."""
        oh, ow = self.out_hw
        q = j // self.sw
        return arr[:, :, i:i + self.sh * (oh - 1) + 1:self.sh, j % self.sw, q:q + ow]

    def _pad(self, x, fill):
        """``x`` padded with ``fill`` (and extended for ceil-rounded windows), in phase layout."""
        n, c, h, w = x.shape
        buf = workspace(self.xp, self._phase_shape(n, c, h, w), x.dtype, "pool_pad")
        buf.fill(fill)
        for r, w0, q0, cnt in column_phases(self.sw, self.pw, w):
            if cnt:
                buf[:, :, self.ph:self.ph + h, r, q0:q0 + cnt] = x[:, :, :, w0::self.sw]
        return buf

    def _unpad(self, acc, dx):
        """The inverse of ``_pad``: copy the real image out of a phase-layout array into ``dx``."""
        h, w = dx.shape[2:]
        for r, w0, q0, cnt in column_phases(self.sw, self.pw, w):
            if cnt:
                dx[:, :, :, w0::self.sw] = acc[:, :, self.ph:self.ph + h, r, q0:q0 + cnt]

    def _ave_divisor(self, h, w, dtype):
        """Window sizes clipped to the padded image (not to the real one), as Caffe counts them."""
        xp = self.xp
        oh, ow = self.out_hw
        hs = np.arange(oh) * self.sh - self.ph
        ws = np.arange(ow) * self.sw - self.pw
        sh = np.minimum(hs + self.kh, h + self.ph) - hs
        sw = np.minimum(ws + self.kw, w + self.pw) - ws
        return xp.asarray(np.outer(sh, sw).astype(dtype))

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata
        n, c, h, w = x.shape
        y = top[0].xdata
        if self.method == _PP.AVE:
            if self.whole:
                y[...] = x.reshape(n, c, h * w).mean(axis=2).reshape(y.shape)
                return
            xpad = self._pad(x, 0)
            y.fill(0)
            for i in range(self.kh):
                for j in range(self.kw):
                    y += self._window(xpad, i, j)
            y /= self._ave_divisor(h, w, x.dtype)
            return
        # MAX
        if self.whole:
            flat = x.reshape(n, c, h * w)
            arg = flat.argmax(axis=2)      # first maximum, row-major: Caffe's choice
            y[...] = xp.take_along_axis(flat, arg[:, :, None], axis=2).reshape(y.shape)
            self._off = arg.astype(xp.int32).reshape(y.shape)
            mask = self._off
        else:
            xpad = self._pad(x, -np.inf)
            if self._off is None or self._off.shape != y.shape or get_array_module(self._off) is not xp:
                self._off = xp.empty(y.shape, dtype=xp.int32)
            off = self._off
            # start at the first real pixel of each window (so an all -inf window still points
            # inside the image), then keep strictly larger values in row-major order: every real
            # pixel of a window has a code >= that of its first real pixel
            oh, ow = self.out_hw
            i0 = np.maximum(self.ph - np.arange(oh) * self.sh, 0)
            j0 = np.maximum(self.pw - np.arange(ow) * self.sw, 0)
            off[...] = xp.asarray((i0[:, None] * self.kw + j0[None, :]).astype(np.int32))
            y.fill(-np.inf)
            gt = workspace(xp, y.shape, np.bool_, "pool_gt")
            code = workspace(xp, y.shape, np.int32, "pool_code")
            # Branch-free: the offset code grows along the loop, so "the last offset where the
            # value grew strictly" is a running maximum of gt * code.
            for i in range(self.kh):
                for j in range(self.kw):
                    v = self._window(xpad, i, j)
                    xp.greater(v, y, out=gt)
                    xp.maximum(y, v, out=y)
                    xp.multiply(gt, i * self.kw + j, out=code)
                    xp.maximum(off, code, out=off)
            mask = None
        if len(top) > 1:
            if mask is None:
                oh, ow = self.out_hw
                hbase = xp.asarray((np.arange(oh) * self.sh - self.ph)[:, None].astype(np.int32))
                wbase = xp.asarray((np.arange(ow) * self.sw - self.pw)[None, :].astype(np.int32))
                mask = (hbase + off // self.kw) * w + wbase + off % self.kw
            top[1].xdata[...] = mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = top[0].xdiff
        n, c, h, w = bottom[0].shape
        dx = bottom[0].xdiff
        if self.whole:
            if self.method == _PP.AVE:
                dx[...] = (dy / (h * w)).reshape(n, c, 1, 1)
            else:
                dx.fill(0)
                flat = dx.reshape(n * c, h * w)
                flat[xp.arange(n * c), self._off.reshape(-1)] = dy.reshape(-1)
            return
        acc = workspace(xp, self._phase_shape(n, c, h, w), dy.dtype, "pool_pad")
        acc.fill(0)
        if self.method == _PP.AVE:
            g = dy / self._ave_divisor(h, w, dy.dtype)
            for i in range(self.kh):
                for j in range(self.kw):
                    win = self._window(acc, i, j)
                    win += g
        else:
            off = self._off
            hit = workspace(xp, dy.shape, np.bool_, "pool_gt")
            part = workspace(xp, dy.shape, dy.dtype, "pool_part")
            for i in range(self.kh):
                for j in range(self.kw):
                    xp.equal(off, i * self.kw + j, out=hit)
                    xp.multiply(dy, hit, out=part)
                    win = self._window(acc, i, j)
                    win += part
        self._unpad(acc, dx)
