"""Local response normalisation (AlexNet, GoogLeNet), both of Caffe's regions.

ACROSS_CHANNELS: ``scale = k + alpha/size · Σ x²`` over ``size`` channels centred on c (zero padded),
WITHIN_CHANNEL: ``scale = 1 + alpha/size² · Σ x²`` over a size×size window (zero padded; Caffe
builds it from an average pooling whose divisor is always size², and its shift is 1, not k).
Both give ``y = x · scale^(−beta)``.

This file is the reference (``xp`` code, NumPy or CuPy; ``lrn_param.engine: CAFFE``). The window
sums add ``size`` shifted slices of one zero-padded buffer: a handful of whole-array additions, with
none of the cancellation a running (cumulative) sum suffers in float32. On a GPU, ACROSS_CHANNELS
runs as one kernel a pass, an engine chosen at reshape (``kernels/cuda_lrn.py``), or through cuDNN
where it is installed (``kernels/cudnn_lrn.py``). On the CPU with the compiled kernels on,
ACROSS_CHANNELS with beta 0.75, 0.5 or 1 runs as one compiled pass per image each way
(``compiled.lrn_across_forward``/``_backward``: the same bits as these passes).
"""

import numpy as np

from ..core import context, threads
from ..errors import ShapeError
from ..kernels import compiled, cuda_lrn, cudnn_lrn, engines
from ..proto import caffe_pb2
from ..core.layer import Layer, register

# the modules whose import registers the engines of LRN (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_lrn, cudnn_lrn)

# The scratch slots a forward-only net's LRN takes from the layer frames (core/context.py
# Workspaces.layer_frames) instead of keeping buffers of its own: private to this module, so that
# no other layer's slot of the same name lands on them within a layer's frame.
_FRAME_SLOTS = {name: context.Slot(f"LRN {name}") for name in ("pad", "rows", "pad_w")}


def _pow_into(xp, s, beta, out, tmp):
    """out = s^beta, with square roots for the usual betas (much faster than a general power);
    ``tmp`` is scratch of the same shape."""
    if beta == 0.75:
        xp.sqrt(s, out=out)
        xp.sqrt(out, out=tmp)
        out *= tmp
    elif beta == 0.5:
        xp.sqrt(s, out=out)
    elif beta == 1:
        xp.copyto(out, s)
    else:
        xp.power(s, beta, out=out)
    return out


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
        self._scratch = None        # this call's buffers from the layer frame, by name (_frame_scratch)
        self.bottom_shape = None
        self.scale = self.scale_pow = None      # the forward's scale and scale^beta, for backward
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)   # its own methods: the reference
        self.engine = None

    def reshape(self, bottom, top):
        """Engines implement ``lrn_forward(x, y)`` and ``lrn_backward(x, y, dy, dx)``; the layer's
        own methods of those names are the reference."""
        if len(bottom[0].shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), got shape "
                             f"{bottom[0].shape}", ShapeError)
        top[0].reshape(bottom[0].shape)
        self.bottom_shape = tuple(bottom[0].shape)      # for the engines' ``applies``
        self.engine = self.engine_slot.get(self, tuple(bottom[0].shape))

    # --- window sums -------------------------------------------------------------------------
    def buffer(self, name, shape, dtype, zeros=False):
        """A per-layer array kept between calls (same shape, type and array module: reused); engines
        keep theirs here too. During a call that took its buffers from the layer frame
        (``_frame_scratch``), those of the names it took come from there."""
        scratch = self._scratch
        if scratch is not None and name in scratch:
            return scratch[name]
        xp = self.xp
        key = (name, tuple(shape), dtype, xp.__name__)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 8:
                self._buffers.clear()
            buf = self._buffers[key] = (xp.zeros if zeros else xp.empty)(shape, dtype=dtype)
        return buf

    def _padded(self, shape, axis, dtype, slot="pad", images=slice(None)):
        """A buffer ``size - 1`` longer along ``axis`` whose zero border is never written, and its
        interior (the view callers fill); ``images``: the part of the batch (axis 0) wanted."""
        pshape = list(shape)
        pshape[axis] += self.size - 1
        pad = self.buffer(slot, pshape, dtype, zeros=True)[images]
        return pad, self._part(pad, axis, self.pre, shape[axis])

    def _slots(self, shape):
        """(name, shape, zeros) of every buffer the reference's passes use for a ``shape`` batch."""
        def padded(axis):
            p = list(shape)
            p[axis] += self.size - 1
            return tuple(p)
        # a net that runs no backward (shared blob memory) keeps neither the scale nor its power
        out = [] if self.forward_only else [("scale", shape, False), ("pow", shape, False)]
        if self.within:
            return out + [("pad", padded(2), True), ("rows", shape, False), ("pad_w", padded(3), True)]
        return out + [("pad", padded(1), True)]

    def _per_images(self, x, fn, work):
        """``fn(images)`` (a slice of the batch) over the thread pool in chunks of whole images on
        NumPy arrays, else once for the whole batch. Images are independent (every window lies in
        one image), and each chunk uses its own images' part of the whole-batch buffers, all made
        here first (or taken from the layer frame: ``_frame_scratch``): no chunk adds to (or clears)
        the buffer table while another reads it, and the frame is only asked on the calling thread
        (the pool's threads have no frame)."""
        shape = tuple(x.shape)
        slots = self._slots(shape)
        self._scratch = self._frame_scratch(x, slots)
        if self._scratch is None:
            keys = [(n, tuple(sh), x.dtype, self.xp.__name__) for n, sh, _ in slots]
            missing = [k for k in keys if k not in self._buffers]
            if missing and len(self._buffers) + len(missing) > 8:
                self._buffers.clear()
            for name, sh, zeros in slots:
                self.buffer(name, sh, x.dtype, zeros)
        try:
            if not isinstance(x, np.ndarray):
                fn(slice(None))
                return
            threads.parallel_for(shape[0], lambda n0, n1: fn(slice(n0, n1)), work=work)
        finally:
            self._scratch = None

    def _frame_scratch(self, x, slots):
        """The buffers of ``slots`` from this thread's layer frame, by name, when a forward-only
        net runs its layers in frames (net/network.py forward_from_to) on NumPy arrays; else None
        (the layer keeps its own). Frame memory is shared with every other layer's scratch, so the
        padded buffers' zero border is cleared here on each call: ``size - 1`` rows or columns per
        image, against the whole buffer a zeroed allocation writes. GoogLeNet's two LRN layers kept
        32 MB of their own at batch 10 for that border."""
        if not (self.forward_only and isinstance(x, np.ndarray)):
            return None
        workspaces = context.current().workspaces
        if not workspaces.framed():
            return None
        if self._buffers:       # those of a forward outside frames (before the plan was applied)
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] not in _FRAME_SLOTS}
        scratch = {}
        for name, shape, zeros in slots:
            buf = workspaces.get(np, shape, x.dtype, _FRAME_SLOTS[name])
            if zeros and self.pre:
                axis = 3 if name == "pad_w" else 2 if self.within else 1
                self._part(buf, axis, 0, self.pre)[...] = 0
                self._part(buf, axis, buf.shape[axis] - self.pre, self.pre)[...] = 0
            scratch[name] = buf
        return scratch

    @staticmethod
    def _part(pad, axis, lo, n):
        index = [slice(None)] * pad.ndim
        index[axis] = slice(lo, lo + n)
        return pad[tuple(index)]

    def _sum_padded(self, pad, axis, n, out):
        """out = Σ over offsets −pre..pre along ``axis`` of the padded array (zero outside)."""
        xp = self.xp
        if self.size == 1:
            xp.copyto(out, self._part(pad, axis, 0, n))
            return out
        xp.add(self._part(pad, axis, 0, n), self._part(pad, axis, 1, n), out=out)
        for o in range(2, self.size):
            out += self._part(pad, axis, o, n)
        return out

    def _window_sum(self, fill, shape, dtype, out, images=slice(None)):
        """out = the window sums of the array that ``fill(view)`` writes into ``view``; ``shape``:
        the whole batch's, ``images``: the part of it this call does (``out`` and the view are
        that part)."""
        if self.within:
            pad, inner = self._padded(shape, 2, dtype, images=images)
            fill(inner)
            rows = self.buffer("rows", shape, dtype)[images]
            self._sum_padded(pad, 2, shape[2], rows)
            pad, inner = self._padded(shape, 3, dtype, "pad_w", images)
            self.xp.copyto(inner, rows)
            return self._sum_padded(pad, 3, shape[3], out)
        pad, inner = self._padded(shape, 1, dtype, images=images)
        fill(inner)
        return self._sum_padded(pad, 1, shape[1], out)

    # --- forward / backward --------------------------------------------------------------------
    def forward(self, bottom, top):
        self.engine = self.engine_slot.get(self, tuple(bottom[0].shape))   # the same, unless the mode changed
        self.engine.lrn_forward(bottom[0].xdata, top[0].xdata)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        self.engine.lrn_backward(bottom[0].xdata, top[0].xdata, top[0].xdiff, bottom[0].xdiff)

    def lrn_forward(self, x, y):
        """scale = shift + sum_scale · Σ x²; y = x / scale^beta. Everything lands in buffers kept
        between iterations: the squares go straight into the padded buffer, no temporaries. On
        NumPy arrays, in chunks of images over the thread pool. A net that runs no backward (shared
        blob memory) keeps neither the scale nor its power: both are worked out in the top itself,
        with the same operations, so the same values."""
        keep = not self.forward_only
        if not keep:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] not in ("scale", "pow")}
        if not self._compiled_forward(x, y, keep):
            self._per_images(x, lambda images: self._forward_images(x, y, images, keep), work=x.size * 6)
        if keep:
            self.scale = self.buffer("scale", x.shape, x.dtype)
            self.scale_pow = self.buffer("pow", x.shape, x.dtype)
        else:
            self.scale = self.scale_pow = None

    def _forward_images(self, x, y, images, keep):
        xp = self.xp
        shape, dtype = x.shape, x.dtype
        xs = x[images]
        scale = self.buffer("scale", shape, dtype)[images] if keep else y[images]
        self._window_sum(lambda view: xp.multiply(xs, xs, out=view), shape, dtype, scale, images)
        scale *= self.sum_scale
        scale += self.shift
        # the padded buffer's interior is free again: scratch for the power
        tmp = self._padded(shape, 3 if self.within else 1, dtype, "pad_w" if self.within else "pad", images)[1]
        if keep:
            scale_pow = _pow_into(xp, scale, self.beta, self.buffer("pow", shape, dtype)[images], tmp)
            xp.divide(xs, scale_pow, out=y[images])
        else:
            _pow_into(xp, scale, self.beta, scale, tmp)
            xp.divide(xs, scale, out=scale)          # scale is this chunk of y

    def lrn_backward(self, x, y, dy, dx):
        """dx_i = dy_i·scale_i^(−β) − (2αβ/n)·x_i·Σ_{j: i in window(j)} dy_j·y_j/scale_j,
        n = size or size²; windows are symmetric, so that sum is one more window sum. On NumPy
        arrays, in chunks of images over the thread pool."""
        if self.scale is None:
            raise self.error("backward needs a forward pass that kept its scale (run forward again "
                             "after unshare_blob_memory())")
        if not self._compiled_backward(x, y, dy, dx):
            self._per_images(dy, lambda images: self._backward_images(x, y, dy, dx, images), work=dy.size * 8)

    # --- ACROSS_CHANNELS as compiled kernels -------------------------------------------------------
    def _beta_kind(self):
        """The power ``compiled.lrn_across_forward`` takes as the passes do (0: beta 0.75, 1: 0.5,
        2: 1), or None for another beta (its np.power is not reproduced bit for bit there)."""
        return {0.75: 0, 0.5: 1, 1.0: 2}.get(self.beta)

    def _compiled_forward(self, x, y, keep):
        """ACROSS_CHANNELS' forward as one compiled pass per image (compiled.lrn_across_forward, the
        same bits as the passes): False, with nothing done, for WITHIN_CHANNEL, another beta, or
        arrays the kernels do not take. 2 cores, medians, compiled / passes, ms: GoogLeNet's
        conv2/norm2 (16x192x56x56) forward 8.5 / 21.5, backward 9.1 / 21.0; CaffeNet's norm1
        (32x96x27x27) 2.9 / 4.8 and 2.9 / 3.8."""
        kind = self._beta_kind()
        if self.within or kind is None or not compiled.runs_on(x, y):
            return False
        n, c = x.shape[:2]
        shape3 = (n, c, int(np.prod(x.shape[2:])))
        scale = self.buffer("scale", x.shape, x.dtype) if keep else y
        pw = self.buffer("pow", x.shape, x.dtype) if keep else y
        x3, y3, s3, p3 = (a.reshape(shape3) for a in (x, y, scale, pw))
        kernel = compiled.get(compiled.lrn_across_forward)
        threads.parallel_for(n, lambda n0, n1: kernel(x3, s3, p3, y3, self.size, self.sum_scale, self.shift,
                                                      kind, keep, n0, n1), work=x.size * 6)
        return True

    def _compiled_backward(self, x, y, dy, dx):
        """ACROSS_CHANNELS' backward as one compiled pass per image (compiled.lrn_across_backward,
        the same bits as the passes); False, with nothing done, where the forward's kernel would not
        run or the arrays do not suit it."""
        if self.within or self._beta_kind() is None or \
                not compiled.runs_on(x, y, dy, dx, self.scale, self.scale_pow):
            return False
        n, c = x.shape[:2]
        shape3 = (n, c, int(np.prod(x.shape[2:])))
        x3, y3, dy3, dx3, s3, p3 = (a.reshape(shape3) for a in (x, y, dy, dx, self.scale, self.scale_pow))
        coeff = 2.0 * self.beta * self.sum_scale
        kernel = compiled.get(compiled.lrn_across_backward)
        threads.parallel_for(n, lambda n0, n1: kernel(x3, y3, dy3, s3, p3, dx3, self.size, coeff, n0, n1),
                             work=dy.size * 8)
        return True

    def _backward_images(self, x, y, dy, dx, images):
        xp = self.xp
        shape, dtype = dy.shape, dy.dtype
        dys, dxs, scale = dy[images], dx[images], self.scale[images]

        def ratio(view):
            xp.multiply(dys, y[images], out=view)
            view /= scale
        # the window sum is built in dx itself, then the padded buffer's free interior holds dy/scale^β
        acc = self._window_sum(ratio, shape, dtype, dxs, images)
        acc *= x[images]
        acc *= 2.0 * self.beta * self.sum_scale
        first = self._padded(shape, 3 if self.within else 1, dtype, "pad_w" if self.within else "pad", images)[1]
        xp.divide(dys, self.scale_pow[images], out=first)
        xp.subtract(first, acc, out=dxs)
