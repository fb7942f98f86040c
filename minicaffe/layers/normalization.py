"""BatchNorm (statistics only, as in Caffe) and the Scale and Bias layers that usually follow it.

BatchNorm's ``normalize``/``normalize_backward`` and Scale's ``scale_forward``/``scale_backward``
are the reference (``xp`` code); on the GPU an engine with the same methods does each in one or two
kernel launches (``kernels/cuda_normalization.py``), chosen at reshape (``kernels/engines.py``).
"""
import logging
import weakref

import numpy as np

from ..core import backend, context, fillers, threads
from ..core.blob import Blob
from ..errors import ShapeError
from ..kernels import compiled, cuda_normalization, engines
from ..proto import caffe_pb2
from ..core.layer import Layer, register

log = logging.getLogger("minicaffe")

# the modules whose import registers the engines of BatchNorm and Scale (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_normalization,)


def _channels_shape(shape, channels):
    """(N, C, spatial): Caffe's BatchNorm treats axis 1 as channels (1 for a 1-axis blob)."""
    n = shape[0]
    rest = 1
    for d in shape:
        rest *= d
    return (n, channels, rest // max(n * channels, 1))


def _by_channels(channels, arrays, fn, work):
    """``fn(c0, c1)`` over contiguous ranges of the channel axis (axis 1 of (N, C, S) arrays) on the
    thread pool when ``arrays`` are all NumPy arrays, else one call ``fn(0, channels)``.

    Each chunk does the whole pass for its channels, per-channel sums included: a channel's sum runs
    over the same elements with the same strides as the whole array's reduction, so it adds in the
    same order and every result is bit-identical at any thread count.

    A chunk holds two channels at least. Why: NumPy merges the axes of a one-channel (N, 1, S) chunk
    into one run of N·S values and sums it pairwise, where with two channels or more it adds the N
    images' partial sums one after the other: another order, other bits (seen with 5 channels on 3
    threads, chunks of 2, 2 and 1). So the pool gets pairs of channels, the last one taking the odd
    channel, and fewer than 4 channels run whole."""
    if all(isinstance(a, np.ndarray) for a in arrays if a is not None) and channels >= 4:
        pairs = channels // 2
        threads.parallel_for(pairs, lambda p0, p1: fn(2 * p0, channels if p1 == pairs else 2 * p1),
                             work=work)
    else:
        fn(0, channels)


def _channel_mean(xp, a, b=None, divide=True):
    """Per-channel means (sums with ``divide=False``) over axes 0 and 2 of (N, k, S) arrays, of
    ``a`` or of ``a·b``.

    On NumPy through ``einsum``: it sums a row's products as it reads them, where ``(a * b).mean()``
    wrote and re-read a temporary as big as the input, and it adds faster than ``add.reduce`` over
    these strided views (8x256x56x56 float32 on this project's 2-core machine: 0.8 against 1.5 ms
    for the sum, 1.4 against 3.7 for the sum of squares). Its order of addition is another one (the
    float32 tolerances of the parity tests take it), and it is the same for a channel whatever the
    width of the chunk it is in (two channels at least, _by_channels), so the bits stay the same at
    any thread count. Other backends keep the plain reductions."""
    if xp is np:
        total = np.einsum("nks->k", a) if b is None else np.einsum("nks,nks->k", a, b)
        return total / (a.shape[0] * a.shape[2]) if divide else total
    v = a if b is None else a * b
    return v.mean(axis=(0, 2)) if divide else v.sum(axis=(0, 2))


def _out_view(blob, which, shape):
    """The blob's data or diff reshaped to ``shape`` as a view, so writes land in the blob.

    Another layer may have stored a non-contiguous array there (reshaping that would copy and
    lose the writes): then the blob gets a contiguous copy first.
    """
    arr = getattr(blob, which)
    if not arr.flags.c_contiguous:
        arr = backend.xp().ascontiguousarray(arr)
        setattr(blob, which, arr)
    return arr.reshape(shape)


@register("BatchNorm")
class BatchNorm(Layer):
    """y = (x − mean) / sqrt(var + eps) per channel (axis 1), no learned scale or shift.

    Blobs exactly as Caffe stores them: [0] running sum of means, [1] running sum of (unbiased)
    variances, [2] the 1-element sum of weights; the estimates are blob / factor. They are written
    in forward, never by the solver (``fixed_params``; Caffe forces lr_mult 0 on them).
    Normalising uses the biased batch variance; the running variance adds it times m/(m−1).
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True   # backward reads only its own copy of x − mean
    fixed_params = True

    def __init__(self, param, phase):
        super().__init__(param, phase)
        # engines implement normalize / normalize_backward; this layer's own are the reference
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)
        self.engine = None

    def setup(self, bottom, top):
        p = self.param.batch_norm_param
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        shape = bottom[0].shape
        if len(shape) < 1:
            raise self.error("bottom must have at least 1 axis", ShapeError)
        self.channels = shape[1] if len(shape) > 1 else 1
        if not self.blobs:
            self.blobs = [Blob((self.channels,), name=f"{self.name}.mean"),
                          Blob((self.channels,), name=f"{self.name}.variance"),
                          Blob((1,), name=f"{self.name}.scale_factor")]
        # counts, not shapes: old caffemodels store these as 1x1x1xC
        counts = [b.count for b in self.blobs]
        if counts != [self.channels, self.channels, 1]:
            raise self.error(f"needs 3 blobs (mean, variance, factor) of {self.channels}, "
                             f"{self.channels} and 1 values, got {counts}", ShapeError)
        # Caffe pins the statistics' learning rate at 0 and rejects any other setting.
        for i in range(3):
            if i < len(self.param.param):
                if self.param.param[i].lr_mult != 0:
                    raise self.error(f"param {{ lr_mult: {self.param.param[i].lr_mult:g} }}: the "
                                     "batch statistics are not learnable; lr_mult must be 0")
            else:
                self.param.param.add().lr_mult = 0.0
        self._x_centred = None
        self._inv_std = None
        # what a Scale right after this layer reads instead of a copy of its input (Scale.forward)
        self._serial = 0            # forwards so far
        self._wrote = None          # weak reference to the top array the last forward wrote (CPU reference)
        self._lent = False          # a Scale reads _x_centred in its backward, which has not run yet

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        channels = shape[1] if len(shape) > 1 else 1
        if channels != self.channels:
            raise self.error(f"bottom has {channels} channels but the layer was set up with "
                             f"{self.channels}", ShapeError)
        top[0].reshape(shape)
        self.engine = self.engine_slot.get(self, tuple(shape))

    def forward(self, bottom, top):
        shape3 = _channels_shape(bottom[0].shape, self.channels)
        x3 = bottom[0].xdata.reshape(shape3)
        self.engine = self.engine_slot.get(self, tuple(bottom[0].shape))   # the same, unless the mode changed
        self.engine.normalize(x3, _out_view(top[0], "xdata", shape3))
        self._serial += 1
        out = top[0].xdata
        self._wrote = weakref.ref(out) if self.engine is self and isinstance(out, np.ndarray) else None

    def lend_normalized(self, x, shape):
        """``(x − mean, 1/std, serial)`` as the last forward kept them, when ``x`` is the very top
        array that forward wrote (so ``x`` = (x − mean)·(1/std), multiplied per channel as here) and
        the buffer has ``shape``; else None. The buffer is then lent: until ``release_normalized``,
        the next forward writes a new buffer instead of overwriting this one (a partial pass that
        runs this layer again before the borrower's backward). CPU reference only: a GPU engine
        keeps its own buffers."""
        ref = self._wrote
        buf = self._x_centred
        if self.engine is not self or ref is None or ref() is not x or buf is None or \
                buf.shape != tuple(shape) or buf.dtype != x.dtype:
            return None
        self._lent = True
        return buf, self._inv_std, self._serial

    def release_normalized(self, centred):
        """The borrower of ``centred`` has read it: the next forward may overwrite it again."""
        if self._x_centred is centred:
            self._lent = False

    def normalized_intact(self, centred, serial):
        """Whether a buffer lent at forward ``serial`` still holds what it held then: it does unless a
        later forward overwrote it after it was released (forward, backward, this layer's forward
        alone, then the borrower's backward again)."""
        return serial == self._serial or self._x_centred is not centred

    def normalize(self, x3, y3):
        """The reference forward: normalise ``x3`` (N, C, S) into ``y3`` (they may share memory)."""
        if not self.use_global_stats and compiled.runs_on(x3, y3):
            # the kernel that runs BatchNorm + Scale + ReLU fused (forward_fused), here without the
            # other two: a fused chain and these layers one by one give the same bits
            self._normalize_compiled(x3, y3, None, None, False)
            return
        xp = self.xp
        x = x3
        c = self.channels
        if self.use_global_stats and xp is not np:
            # GPU: the factor stays on the device (reading it back would sync every forward)
            f = self.blobs[2].xdata.reshape(-1)[:1]
            zero = f == 0
            f = xp.where(zero, 0, 1 / xp.where(zero, 1, f)).astype(x.dtype)
            mean = self.blobs[0].xdata * f
            var = self.blobs[1].xdata * f
        elif self.use_global_stats:
            f = float(self.blobs[2].xdata.reshape(-1)[0])
            f = 0.0 if f == 0 else 1.0 / f
            mean = self.blobs[0].xdata * f
            var = self.blobs[1].xdata * f
        if self.use_global_stats:
            mean, var = mean.reshape(c), var.reshape(c)     # old caffemodels store them as 1x1x1xC
        else:
            m = x3.shape[0] * x3.shape[2]
            mean = xp.empty(c, dtype=x.dtype)
            var = xp.empty(c, dtype=x.dtype)
        batch = not self.use_global_stats
        buf = self._centred_buffer(x3)
        inv_std = xp.empty(c, dtype=x.dtype)

        def part(c0, c1):
            # every step per channel: the statistics, x − mean, 1/std, the scaling and the copy out
            xs, bs, k = x3[:, c0:c1], buf[:, c0:c1], c1 - c0
            if batch:
                mean[c0:c1] = _channel_mean(xp, xs)
            xp.subtract(xs, mean[c0:c1].reshape(1, k, 1), out=bs)
            if batch:
                var[c0:c1] = _channel_mean(xp, bs, bs)
            inv = xp.sqrt(var[c0:c1] + self.eps)
            xp.reciprocal(inv, out=inv)
            inv_std[c0:c1] = inv
            # the buffer keeps x − mean (later in-place layers, Scale and ReLU, overwrite the top);
            # the backward scales it by 1/std where it needs the normalised values, so the output
            # is written straight from it (no pass scaling the buffer, no copy of it)
            xp.multiply(bs, inv.reshape(1, k, 1), out=y3[:, c0:c1])
        _by_channels(c, (x3, y3, buf), part, work=x3.size * 3)
        if batch:
            self.update_running_stats(mean, var, m)
        self._x_centred, self._inv_std = buf, inv_std

    def _centred_buffer(self, x3):
        """Where the forward writes x − mean, kept for the backward: the last forward's buffer, or a
        new one while a Scale still has to read that (lend_normalized)."""
        buf = self._x_centred
        if buf is None or buf.shape != x3.shape or buf.dtype != x3.dtype or \
                not isinstance(buf, type(x3)) or self._lent:
            buf = self.xp.empty_like(x3)
        self._lent = False
        return buf

    def _normalize_compiled(self, x3, y3, scale, bias, relu):
        """The forward with batch statistics as one compiled kernel per channel
        (compiled.batch_norm_scale_relu), then ``·scale + bias`` (each may be None) and ReLU."""
        c = self.channels
        buf = self._centred_buffer(x3)
        mean, var, inv_std = (np.empty(c, x3.dtype) for _ in range(3))
        kernel = compiled.get(compiled.batch_norm_scale_relu)
        s = inv_std if scale is None else scale
        b = inv_std if bias is None else bias
        threads.parallel_for(c, lambda c0, c1: kernel(
            x3, buf, y3, s, b, scale is not None, bias is not None, relu, self.eps, mean, var, inv_std,
            c0, c1), work=x3.size * 4)
        self.update_running_stats(mean, var, x3.shape[0] * x3.shape[2])
        self._x_centred, self._inv_std = buf, inv_std

    def forward_fused(self, x, scale, bias, relu):
        """This layer's forward in place over the NumPy array ``x``, then a Scale's ``·scale + bias``
        per channel (``bias`` may be None) and, when ``relu``, ReLU's: BatchNorm + Scale + ReLU in
        place on one blob as one kernel (kernels/train_fusion.py). The layer's state is what its
        forward leaves; False, with nothing done, unless this layer uses batch statistics on the
        CPU and the arrays suit the compiled kernels."""
        # (x contiguous: reshaped, a non-contiguous array would be a copy and the writes lost)
        if self.engine is not self or self.use_global_stats or \
                not compiled.runs_on(x, scale, *(() if bias is None else (bias,))) or \
                scale.size != self.channels or (bias is not None and bias.size != self.channels):
            return False
        x3 = x.reshape(_channels_shape(x.shape, self.channels))
        self._normalize_compiled(x3, x3, scale, bias, relu)
        self._serial += 1
        self._wrote = weakref.ref(x)
        return True

    def holds(self, centred, inv_std, serial):
        """Whether the buffers a Scale borrowed at forward ``serial`` are this layer's current ones,
        intact, on its CPU reference path with batch statistics: what its own backward would read."""
        return (self.engine is self and not self.use_global_stats and centred is self._x_centred
                and inv_std is self._inv_std and self.normalized_intact(centred, serial))

    def update_running_stats(self, mean, var, m):
        """Caffe's running sums after a forward with batch statistics over ``m`` values a channel:
        each blob decays by the moving-average fraction, then adds this batch's mean, its variance
        made unbiased (× m/(m−1)), and 1 to the weights' sum (also kernels/train_fusion.py)."""
        maf = self.moving_average_fraction
        stats = self.blobs
        stats[2].xdata = stats[2].xdata * maf + 1
        stats[0].xdata = stats[0].xdata * maf + mean
        correction = m / (m - 1) if m > 1 else 1.0
        stats[1].xdata = stats[1].xdata * maf + var * correction

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        shape3 = _channels_shape(top[0].shape, self.channels)
        dy = top[0].xdiff.reshape(shape3)
        self.engine.normalize_backward(dy, _out_view(bottom[0], "xdiff", shape3))

    def normalize_backward(self, dy, dx):
        """The reference gradient on (N, C, S) arrays (``dx`` may be ``dy``). Global stats:
        dx = dy/std. Batch stats: dx = (dy − mean(dy) − mean(dy·y)·y)/std, with y = (x − mean)/std
        from the kept x − mean: mean(dy·y) = mean(dy·(x − mean))/std."""
        xp = self.xp
        centred = self._x_centred
        if not self.use_global_stats and _compiled_backward_runs(dy, dx, centred, self._inv_std):
            kernel = compiled.get(compiled.batch_norm_backward)
            _by_channels(self.channels, (dy, dx, centred),
                         lambda c0, c1: kernel(dy, centred, self._inv_std, dx, c0, c1), work=dy.size * 3)
            return

        def part(c0, c1):
            # per channel: a chunk reads its channels of dy before writing them in dx
            k = c1 - c0
            inv_std = self._inv_std[c0:c1].reshape(1, k, 1)
            dyc, dxc = dy[:, c0:c1], dx[:, c0:c1]
            if self.use_global_stats:
                xp.multiply(dyc, inv_std, out=dxc)
                return
            cc = centred[:, c0:c1]
            mean_dy = _channel_mean(xp, dyc).reshape(1, k, 1)
            mean_dy_y = _channel_mean(xp, dyc, cc).reshape(1, k, 1) * inv_std
            t = cc * (mean_dy_y * inv_std)      # y·mean(dy·y)
            t += mean_dy
            xp.subtract(dyc, t, out=dxc)
            dxc *= inv_std
        _by_channels(self.channels, (dy, dx, centred), part, work=dy.size * 3)


def _compiled_scale_backward_runs(dy, x, s, dx):
    """Whether Scale's gradient runs the compiled one-pass kernel (compiled.scale_backward): the
    kernels on, NumPy (outer, C, inner) arrays of one float dtype, C-contiguous (the input ``x`` an
    array or a BatchNorm's ``_Normalized`` buffers)."""
    src = x.centred if isinstance(x, _Normalized) else x
    arrays = [a for a in (dy, src, dx, s) if a is not None]
    if isinstance(x, _Normalized):
        arrays.append(x.inv_std)
    return compiled.runs_on(*arrays)


def _compiled_backward_runs(dy, dx, centred, inv_std):
    """Whether BatchNorm's gradient runs the compiled two-pass kernel (compiled.batch_norm_backward):
    the kernels on, NumPy arrays of one float dtype, (N, C, S) C-contiguous. Measured on 2 cores,
    ms, kernel / NumPy passes: 8x256x56x56 5.1 / 10.2, 8x512x28x28 2.5 / 5.5, 8x1024x14x14 1.3 / 2.9."""
    return compiled.runs_on(dy, dx, centred, inv_std)


def _canonical_axis(layer, axis, ndim):
    if not -ndim <= axis < ndim:
        raise layer.error(f"axis {axis} is out of range for a bottom with {ndim} axes", ShapeError)
    return axis + ndim if axis < 0 else axis


def _param_shape(layer, what, bottom_shape, axis, num_axes):
    """The learned blob's shape: ``num_axes`` axes of bottom[0] from ``axis`` (−1: to the end)."""
    ndim = len(bottom_shape)
    axis = _canonical_axis(layer, axis, ndim)
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                          f"got {num_axes}")
    if num_axes >= 0 and axis + num_axes > ndim:
        raise layer.error(f"{what} blob's shape extends past bottom[0]'s shape {bottom_shape} "
                          f"(axis {axis} + num_axes {num_axes} > {ndim} axes)", ShapeError)
    end = ndim if num_axes == -1 else axis + num_axes
    return tuple(bottom_shape[axis:end])


def _broadcast_dims(layer, what, bottom_shape, operand_shape, axis):
    """(outer, dim, inner) so that bottom reshaped to them meets the operand as (1, dim, 1)."""
    ndim = len(bottom_shape)
    k = len(operand_shape)
    axis = 0 if k == 0 else _canonical_axis(layer, axis, ndim)
    if axis + k > ndim or tuple(bottom_shape[axis:axis + k]) != tuple(operand_shape):
        raise layer.error(f"{what} shape {tuple(operand_shape)} does not match bottom[0] shape "
                          f"{tuple(bottom_shape)} from axis {axis}", ShapeError)
    outer = 1
    for s in bottom_shape[:axis]:
        outer *= s
    dim = 1
    for s in operand_shape:
        dim *= s
    inner = 1
    for s in bottom_shape[axis + k:]:
        inner *= s
    return outer, dim, inner


def _make_blob(layer, name, shape, filler):
    blob = Blob(shape, name=f"{layer.name}.{name}")
    blob.data[...] = fillers.fill(filler, shape, dtype=blob.dtype, layer=layer.name)
    return blob


@register("Bias")
class Bias(Layer):
    """y = x + b, b broadcast along ``axis`` (a learned blob, or bottom[1])."""

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    allows_in_place = True   # the gradients need no input values

    def setup(self, bottom, top):
        p = self.param.bias_param
        if len(bottom) == 1 and not self.blobs:
            shape = _param_shape(self, "bias", bottom[0].shape, p.axis, p.num_axes)
            self.blobs = [_make_blob(self, "bias", shape, p.filler)]

    def reshape(self, bottom, top):
        b = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, "bias", bottom[0].shape, b.shape,
                                    self.param.bias_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        b = (bottom[1] if len(bottom) > 1 else self.blobs[0]).xdata
        outer, dim, inner = self.dims
        x = bottom[0].xdata.reshape(outer, dim, inner)
        self.xp.add(x, b.reshape(1, dim, 1), out=_out_view(top[0], "xdata", (outer, dim, inner)))

    def backward(self, top, propagate_down, bottom):
        dy = top[0].xdiff
        outer, dim, inner = self.dims
        if len(bottom) > 1:
            if propagate_down[1]:
                bottom[1].xdiff = dy.reshape(outer, dim, inner).sum(axis=(0, 2))
        elif self.need_param_grad(0):
            self.blobs[0].xdiff += dy.reshape(outer, dim, inner).sum(axis=(0, 2)).reshape(
                self.blobs[0].shape)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].xdiff[...] = dy


# Scale's backward recomputes a BatchNorm's output in blocks of channels of about this many elements
# (_Normalized), in a scratch buffer of each thread
NORMALIZED_BLOCK_ELEMENTS = 1 << 20
_X_NORM = context.Slot("scale_x_norm")
_X_NORM_ROWS = context.Slot("scale_x_norm_rows")


class _Normalized:
    """A BatchNorm's output as its forward computed it, ``centred·inv_std`` per channel, standing
    for the copy of its input that an in-place Scale would keep (Scale.forward): the per-channel
    sums that read it recompute it a block of channels at a time.

    Bit-identical to reading the copy: the same float32 products of the same operands give the same
    values, and ``_channel_mean``'s einsum adds a channel's products in the same order whatever the
    width of the block, two channels or more (as _by_channels relies on); a block is at least two
    channels wide unless the whole range is narrower, as it was then."""

    def __init__(self, centred, inv_std):
        self.centred, self.inv_std = centred, inv_std

    def channel_sums(self, dy, d0, d1, out):
        """``out[:] = Σ dy·x`` per channel over the channels d0..d1 (``dy``: those channels only)."""
        n, _, inner = self.centred.shape
        width = max(2, NORMALIZED_BLOCK_ELEMENTS // max(n * inner, 1))
        workspaces = context.current().workspaces
        dtype = self.centred.dtype
        b0 = d0
        while b0 < d1:
            b1 = d1 if d1 - b0 < width + 2 else b0 + width    # the last block takes the rest
            k = b1 - b0
            x = workspaces.get(np, (n, k, inner), dtype, _X_NORM)
            # 1/std spelt out along the rows first: NumPy multiplies two contiguous rows about 1.5x
            # as fast as a row by a broadcast value (the same products: 8x256x56² block by block,
            # 3.3 -> 2.2 ms on this project's machine), and the rows are an image's worth, not N
            rows = workspaces.get(np, (1, k, inner), dtype, _X_NORM_ROWS)
            rows[...] = self.inv_std[b0:b1].reshape(1, k, 1)
            np.multiply(self.centred[:, b0:b1], rows, out=x)
            out[b0 - d0:b1 - d0] = _channel_mean(np, dy[:, b0 - d0:b1 - d0], x, divide=False)
            b0 = b1

    def materialize(self):
        return self.centred * self.inv_std.reshape(1, -1, 1)


@register("Scale")
class Scale(Layer):
    """y = x · s (+ b with ``bias_term``), s broadcast along ``axis``: a learned blob (filler
    default 1) or bottom[1]. In place, the input is kept for the gradient of s: a copy, or, right
    after the BatchNorm that wrote it, nothing (its backward recomputes it from what the BatchNorm
    keeps; ``link_producer``)."""

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    allows_in_place = True   # forward keeps its input for the scale's gradient (a copy, or link_producer)

    def __init__(self, param, phase):
        super().__init__(param, phase)
        # engines implement scale_forward / scale_backward; this layer's own are the reference
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)
        self.engine = None
        self._producer = None       # the BatchNorm whose top this layer scales in place (link_producer)

    def setup(self, bottom, top):
        p = self.param.scale_param
        if len(bottom) == 1 and not self.blobs:
            shape = _param_shape(self, "scale", bottom[0].shape, p.axis, p.num_axes)
            filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(
                type="constant", value=1.0)
            self.blobs.append(_make_blob(self, "scale", shape, filler))
        want = (1 if len(bottom) == 1 else 0) + (1 if p.bias_term else 0)
        if p.bias_term:
            log.info("Creating layer %s", self.name)     # Caffe's inner Bias layer, made by the factory
        if p.bias_term and len(self.blobs) == want - 1:
            # Caffe's rule: the bias takes bottom[1]'s axes when the scale is a bottom
            num_axes = len(bottom[1].shape) if len(bottom) > 1 else p.num_axes
            shape = _param_shape(self, "bias", bottom[0].shape, p.axis, num_axes)
            self.blobs.append(_make_blob(self, "bias", shape, p.bias_filler))
        if len(self.blobs) != want:
            raise self.error(f"expects {want} parameter blob(s) with {len(bottom)} bottom(s) and "
                             f"bias_term {str(p.bias_term).lower()}, got {len(self.blobs)}")
        self.bias_index = len(self.blobs) - 1 if p.bias_term else None
        self.num_bottoms = len(bottom)     # the GPU engine takes a learned scale only
        self._saved_input = None
        self._normalized = None     # (BatchNorm, x − mean, 1/std, its forward's serial) instead of a copy

    def link_producer(self, producer, producer_top, bottom, top):
        """In place on the top of the BatchNorm just before it (Kaiming He's ResNets: every
        convolution is followed by BatchNorm → Scale → ReLU on one blob): the input is that layer's
        output, which it computed from the ``x − mean`` and ``1/std`` it keeps for its own backward.
        The copy of the input would hold every such blob once more in TRAIN (ResNet-50 at batch 8:
        53 copies, 323 MB)."""
        self._producer = producer if (isinstance(producer, BatchNorm) and len(bottom) == 1
                                      and top[0] is bottom[0] and producer_top[0] is bottom[0]) \
            else None
        return self._producer is not None

    def after_fused_forward(self, producer, x):
        """The state this layer's forward leaves, in place after BatchNorm ``producer``, when that
        layer's ``forward_fused`` did this layer's work: it borrows the BatchNorm's buffers for its
        backward (when its scale learns) instead of keeping a copy of ``x``."""
        self._release()
        self._saved_input = None
        self.producer_ran = False
        if self.need_param_grad(0):
            lent = producer.lend_normalized(x, self.dims)
            self._normalized = None if lent is None else (producer,) + lent

    def backward_fused(self, producer, dy, y, relu):
        """ReLU's backward (when ``relu``; ``y`` its output), then this layer's and BatchNorm
        ``producer``'s, all in place on one blob whose diff is ``dy``: one compiled kernel
        (compiled.batch_norm_scale_relu_backward; kernels/train_fusion.py), the same bits as the
        three layers' backward one by one. False, with nothing done, unless this layer holds the
        BatchNorm's current buffers (``BatchNorm.holds``) and the arrays suit the kernels."""
        normalized = self._normalized
        if normalized is None or normalized[0] is not producer or not self.need_param_grad(0) \
                or self.engine is not self or not producer.holds(*normalized[1:]):
            return False
        _, centred, inv_std, _ = normalized
        scale = self.blobs[0]
        s = scale.xdata.reshape(-1)
        # (dy contiguous: reshaped, a non-contiguous diff would be a copy and the writes lost)
        if dy.shape != y.shape or dy.size != centred.size or s.size != centred.shape[1] or \
                not compiled.runs_on(dy, y, centred, inv_std, s):
            return False
        dy3, y3 = dy.reshape(centred.shape), y.reshape(centred.shape)
        c = centred.shape[1]
        want_bias = self.bias_index is not None and self.need_param_grad(self.bias_index)
        gb = np.empty(c if want_bias else 0, dy.dtype)
        gs = np.empty(c, dy.dtype)
        kernel = compiled.get(compiled.batch_norm_scale_relu_backward)
        threads.parallel_for(c, lambda c0, c1: kernel(
            dy3, y3, centred, inv_std, s, relu, dy3, gb, gs, want_bias, c0, c1), work=dy.size * 4)
        self._scale_grads(scale, False, gb if want_bias else None, gs)
        producer.release_normalized(centred)
        return True

    def _release(self):
        if self._normalized is not None:
            self._normalized[0].release_normalized(self._normalized[1])
            self._normalized = None

    def reshape(self, bottom, top):
        p = self.param.scale_param
        s = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, "scale", bottom[0].shape, s.shape, p.axis)
        if self.bias_index is not None:
            bias = self.blobs[self.bias_index]
            if _broadcast_dims(self, "bias", bottom[0].shape, bias.shape, p.axis) != self.dims:
                raise self.error(f"bias shape {bias.shape} does not match scale shape {s.shape}",
                                 ShapeError)
        top[0].reshape(bottom[0].shape)
        outer, dim, inner = self.dims
        # Caffe's ScaleLayer::Backward_cpu writes a learned scale's diff instead of adding to it in two
        # shapes, where it uses that diff as its scratch space: a scale as big as the input, and one
        # image (outer 1) with a scale vector over maps (dim > 1, inner > 1). Only iter_size > 1 (or
        # two backward passes without clearing) can see it; matched so such runs train as Caffe's do.
        self.scale_diff_overwrites = outer * inner == 1 or (outer == 1 and dim > 1 and inner > 1)
        self.engine = self.engine_slot.get(self, (tuple(bottom[0].shape), len(bottom)))

    def _scale_blob(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def forward(self, bottom, top):
        self.engine = self.engine_slot.get(self, (tuple(bottom[0].shape), len(bottom)))
        x3 = bottom[0].xdata.reshape(self.dims)
        keep = top[0] is bottom[0] and (len(bottom) > 1 or self.need_param_grad(0))
        b = None if self.bias_index is None else self.blobs[self.bias_index].xdata
        self._release()
        producer = self._producer
        if keep and self.producer_ran and producer is not None and self.engine is self:
            # the BatchNorm's forward ran just before on this blob (the net says so, the BatchNorm
            # checks the array): read its buffers in backward instead of copying the input
            lent = producer.lend_normalized(bottom[0].xdata, self.dims)
            if lent is not None:
                self._normalized = (producer,) + lent
                keep = False
        self.producer_ran = False
        self._saved_input = self.engine.scale_forward(x3, self._scale_blob(bottom).xdata, b,
                                                      _out_view(top[0], "xdata", self.dims), keep)

    def scale_forward(self, x3, s, b, y3, keep_input):
        """The reference forward on (outer, dim, inner) arrays: ``y3 = x3·s (+ b)`` (``y3`` may be
        ``x3``); returns a copy of the input when ``keep_input`` (in place, for the scale's gradient):
        into the last forward's copy where it fits, whose backward has read it (a new array each
        time held both at once while it was written)."""
        saved = self._saved_input if keep_input else None
        if keep_input and (saved is None or saved.shape != x3.shape or saved.dtype != x3.dtype
                           or not isinstance(saved, type(x3))):
            saved = self.xp.empty_like(x3)
        dim = self.dims[1]
        s = s.reshape(dim)
        b = None if b is None else b.reshape(dim)

        def part(d0, d1):
            k = d1 - d0
            xc, yc = x3[:, d0:d1], y3[:, d0:d1]
            if saved is not None:
                saved[:, d0:d1] = xc
            self.xp.multiply(xc, s[d0:d1].reshape(1, k, 1), out=yc)
            if b is not None:
                yc += b[d0:d1].reshape(1, k, 1)
        _by_channels(dim, (x3, y3), part, work=x3.size * (3 if keep_input else 2))
        return saved

    def backward(self, top, propagate_down, bottom):
        dy = top[0].xdiff.reshape(self.dims)
        want_bias = self.bias_index is not None and self.need_param_grad(self.bias_index)
        scale = self._scale_blob(bottom)
        as_bottom = len(bottom) > 1
        x = None
        normalized = self._normalized
        if normalized is not None and not as_bottom and self.need_param_grad(0):
            bn, centred, inv_std, serial = normalized
            if not bn.normalized_intact(centred, serial):
                raise self.error(f"in place after BatchNorm '{bn.name}', which ran forward again "
                                 "since this layer's forward: run this layer's forward again first")
            x = _Normalized(centred, inv_std)
            if self.engine is not self:     # the mode changed since the forward
                x = x.materialize()
        elif (as_bottom and propagate_down[1]) or (not as_bottom and self.need_param_grad(0)):
            x = self._saved_input
            if x is None:
                if top[0] is bottom[0]:
                    raise self.error("in place: the input was not kept in forward because no "
                                     "gradient for the scale was asked for then")
                x = bottom[0].xdata
            x = x.reshape(self.dims)
        dx = _out_view(bottom[0], "xdiff", self.dims) if propagate_down[0] else None
        self.engine.scale_backward(dy, x, scale, as_bottom, want_bias, dx)
        if normalized is not None:      # read: the BatchNorm may overwrite it from its next forward on
            normalized[0].release_normalized(normalized[1])

    def scale_backward(self, dy, x, scale, as_bottom, want_bias, dx):
        """The reference gradient on (outer, dim, inner) arrays: the bias's (accumulated), the
        scale's when ``x`` is given (accumulated into a learned blob, written into bottom[1]'s diff),
        and ``dx = dy·s`` when ``dx`` is given (it may be ``dy``). A learned scale's diff is written,
        not added to, where Caffe writes it (``scale_diff_overwrites``). ``x`` may be a
        ``_Normalized`` (a BatchNorm's buffers) instead of an array."""
        xp = self.xp
        dim = self.dims[1]
        gb = xp.empty(dim, dtype=dy.dtype) if want_bias else None
        gs = xp.empty(dim, dtype=dy.dtype) if x is not None else None
        s = scale.xdata.reshape(dim)
        normalized = x if isinstance(x, _Normalized) else None
        if xp is np and _compiled_scale_backward_runs(dy, x, s, dx):
            # one compiled pass per channel block (compiled.scale_backward)
            src = normalized.centred if normalized is not None else (x if x is not None else dy)
            inv = normalized.inv_std if normalized is not None else np.ones(dim, dy.dtype)
            kernel = compiled.get(compiled.scale_backward)
            none = np.empty(0, dy.dtype)
            _by_channels(dim, (dy, src, dx), lambda d0, d1: kernel(
                dy, src, inv, s, dy if dx is None else dx, none if gb is None else gb,
                none if gs is None else gs, gb is not None, gs is not None, dx is not None, d0, d1),
                work=dy.size * 3)
            self._scale_grads(scale, as_bottom, gb, gs)
            return

        def part(d0, d1):
            # per channel: the sums read dy before dx (which may be dy) is written
            dyc = dy[:, d0:d1]
            if gb is not None:
                gb[d0:d1] = _channel_mean(xp, dyc, divide=False)
            if normalized is not None:
                normalized.channel_sums(dyc, d0, d1, gs[d0:d1])
            elif gs is not None:
                gs[d0:d1] = _channel_mean(xp, dyc, x[:, d0:d1], divide=False)
            if dx is not None:
                xp.multiply(dyc, s[d0:d1].reshape(1, d1 - d0, 1), out=dx[:, d0:d1])
        _by_channels(dim, (dy, x if normalized is None else normalized.centred, dx), part,
                     work=dy.size * 3)
        self._scale_grads(scale, as_bottom, gb, gs)

    def _scale_grads(self, scale, as_bottom, gb, gs):
        """Add (or write) the bias's and the scale's per-channel gradients into their diffs."""
        if gb is not None:
            bias = self.blobs[self.bias_index]
            bias.xdiff += gb.reshape(bias.shape)
        if gs is not None:
            g = gs.reshape(scale.shape)
            if as_bottom or self.scale_diff_overwrites:
                scale.xdiff = g
            else:
                scale.xdiff += g


# MVN's passes run over blocks of rows of about this many elements (see MVN._by_rows)
MVN_BLOCK_ELEMENTS = 1 << 16


@register("MVN")
class MVN(Layer):
    """Mean-variance normalisation: subtracts the mean of each (image, channel) — or of each image
    with ``across_channels`` — and, with ``normalize_variance`` (the default), divides by
    ``sqrt(var) + eps`` (eps added to the standard deviation, not the variance, as Caffe does).

    The top has Caffe's legacy 4-D shape (num, channels, height, width) whatever the bottom's axis
    count (1 to 4). The gradient is Caffe's: (dy − mean(dy) − y·mean(dy·y)) / (sqrt(var) + eps),
    which reads only the top, so MVN also works in place."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)

    def reshape(self, bottom, top):
        b = bottom[0]
        if len(b.shape) > 4:
            raise self.error(f"bottom must have at most 4 axes (num, channels, height, width), got "
                             f"shape {b.shape}", ShapeError)
        if top[0] is not b:   # in place the blob keeps its own shape (and its values)
            top[0].reshape(b.num, b.channels, b.height, b.width)
        self.rows = b.num if self.across_channels else b.num * b.channels

    def _by_rows(self, fn, size, passes):
        """``fn(r0, r1)`` over ranges of rows: on the thread pool for NumPy arrays of at least
        ``threads.MIN_FLAT_ELEMENTS``, else one call. Each row's mean is NumPy's pairwise sum over
        that row alone, the same however the rows are grouped: the same bits at any thread count."""
        if self.xp is not np:
            fn(0, self.rows)
            return
        # within a chunk, blocks of rows of about MVN_BLOCK_ELEMENTS: the temporaries stay in cache,
        # and two threads do not page in fresh chunk-sized temporaries at once (page faults serialise)
        per = max(1, MVN_BLOCK_ELEMENTS // max(1, size // max(1, self.rows)))

        def blocks(r0, r1):
            for b0 in range(r0, r1, per):
                fn(b0, min(r1, b0 + per))
        if size >= threads.MIN_FLAT_ELEMENTS:
            threads.parallel_for(self.rows, blocks, work=size * passes)
        else:
            blocks(0, self.rows)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata.reshape(self.rows, -1)
        centred = xp.empty(x.shape, dtype=x.dtype)
        std = xp.empty((self.rows, 1), dtype=x.dtype) if self.normalize_variance else None

        def part(r0, r1):
            xr, c = x[r0:r1], centred[r0:r1]
            xp.subtract(xr, xr.mean(axis=1, keepdims=True), out=c)
            if std is not None:
                sd = xp.sqrt((c * c).mean(axis=1, keepdims=True))
                sd += self.eps
                std[r0:r1] = sd
                c /= sd
        self._by_rows(part, x.size, 3)
        self._std = std
        top[0].xdata = centred.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = top[0].xdiff.reshape(self.rows, -1)
        y = top[0].xdata.reshape(self.rows, -1) if self.normalize_variance else None
        grad = xp.empty(dy.shape, dtype=dy.dtype)

        def part(r0, r1):
            d, g = dy[r0:r1], grad[r0:r1]
            xp.subtract(d, d.mean(axis=1, keepdims=True), out=g)
            if y is not None:
                yr = y[r0:r1]
                g -= yr * (d * yr).mean(axis=1, keepdims=True)
                g /= self._std[r0:r1]
        self._by_rows(part, dy.size, 4)
        bottom[0].xdiff = grad.reshape(bottom[0].shape)
