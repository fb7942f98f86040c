"""Convolution, Deconvolution and Im2col: what Caffe computes, once, in plain ``xp`` code.

``ReferenceConvolution`` is Caffe's arithmetic for one convolution in its forward orientation
(input ``cin`` channels -> output ``cout`` channels, weights ``cout x cin/group x kh x kw``): the
column matrix of the whole batch (``reference_columns``, every kernel offset a strided slice of
the zero-padded input) times the weights, one GEMM per group; the data gradient is the transposed
GEMM summed back onto the image (``reference_uncolumns``), the weight gradient the GEMM of the
output gradient with the columns. It is correct for every shape, stride, pad, dilation and group,
on NumPy and CuPy alike, and it is what ``engine: CAFFE`` runs.

Convolution uses it as it is; Deconvolution is the transpose (its forward is the convolution's
data gradient, its data gradient the convolution's forward), exactly as Caffe's
``DeconvolutionLayer`` reuses ``BaseConvolutionLayer`` with the dimensions reversed.

How a shape is computed fast (Winograd, a direct 1x1 GEMM, im2col in bands or with the batch axis
last, the CUDA im2col kernels) is not this file's business: ``minicaffe.kernels.conv_engines``
registers those engines, and ``reshape`` picks one per shape and device (``engines.choose``,
honouring ``convolution_param.engine``). Every engine computes what the reference computes
(tests/test_conv_engines.py).

Only 1-D and 2-D spatial convolutions are supported (a 1-D one runs as 2-D with height 1).
"""
import numpy as np

from ..core import backend, fillers
from ..core.blob import Blob
from ..errors import ShapeError
from ..kernels import engines, fusion
from ..kernels.conv_engines import ConvShape       # importing it registers the engines
from ..kernels.im2col import ConvGeometry
from ..core.layer import Layer, register


def reference_columns(x, geom, out_hw):
    """The column matrix of ``x`` (N, C, H, W): (N, C·kh·kw, oh·ow), rows channel-major then kernel
    row then kernel column (Caffe's im2col order); ``col[n, (c, i, j), (y, x)] = x_padded[n, c,
    y·sh + i·dh, x·sw + j·dw]``, zero where the window reaches into the padding."""
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    g = geom
    oh, ow = out_hw
    padded = xp.zeros((n, c, h + 2 * g.ph, w + 2 * g.pw), x.dtype)
    padded[:, :, g.ph:g.ph + h, g.pw:g.pw + w] = x
    col = xp.empty((n, c, g.kh, g.kw, oh, ow), x.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            y0, x0 = i * g.dh, j * g.dw
            col[:, :, i, j] = padded[:, :, y0:y0 + g.sh * (oh - 1) + 1:g.sh, x0:x0 + g.sw * (ow - 1) + 1:g.sw]
    return col.reshape(n, c * g.kh * g.kw, oh * ow)


def reference_uncolumns(col, geom, in_hw, out):
    """The adjoint of ``reference_columns`` (Caffe's col2im): each column entry added back at the
    image position it was read from, padding dropped; ``out`` (N, C, H, W) is overwritten."""
    xp = backend.get_array_module(col)
    n, c = out.shape[:2]
    h, w = in_hw
    g = geom
    oh = (h + 2 * g.ph - (g.dh * (g.kh - 1) + 1)) // g.sh + 1
    ow = (w + 2 * g.pw - (g.dw * (g.kw - 1) + 1)) // g.sw + 1
    col6 = col.reshape(n, c, g.kh, g.kw, oh, ow)
    acc = xp.zeros((n, c, h + 2 * g.ph, w + 2 * g.pw), col.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            y0, x0 = i * g.dh, j * g.dw
            acc[:, :, y0:y0 + g.sh * (oh - 1) + 1:g.sh, x0:x0 + g.sw * (ow - 1) + 1:g.sw] += col6[:, :, i, j]
    out[...] = acc[:, :, g.ph:g.ph + h, g.pw:g.pw + w]
    return out


class ReferenceConvolution:
    """Caffe's convolution for one ``ConvShape``, with the engines' two calls (see
    ``minicaffe.kernels.conv_engines``): ``forward`` gives ``y = conv(x, w)`` and/or adds the weight
    gradient for output gradient ``grad_src``; ``backward`` gives ``dx = conv^T(dy, w)`` and/or adds
    the weight gradient. Plain and whole-batch: the column matrix of every image at once."""

    def __init__(self, shape):
        self.s = shape

    def _groups(self):
        s = self.s
        for g in range(s.group):
            yield slice(g * s.og, (g + 1) * s.og), slice(g * s.kg, (g + 1) * s.kg)

    def _weight_grad(self, xp, grad, x, dw):
        """dw[o, k] += sum over images and positions of grad[n, o, l] * col(x)[n, k, l], per group."""
        s = self.s
        num = x.shape[0]
        col = reference_columns(x, s.geom, s.out_hw)
        g3 = grad.reshape(num, s.cout, s.columns)
        dw2 = dw.reshape(s.cout, s.kg)
        for go, gk in self._groups():
            dw2[go] += xp.matmul(g3[:, go], col[:, gk].transpose(0, 2, 1)).sum(axis=0)

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        xp = backend.get_array_module(x)
        s = self.s
        if y is not None:
            col = reference_columns(x, s.geom, s.out_hw)
            w2 = w.reshape(s.cout, s.kg)
            y3 = y.reshape(x.shape[0], s.cout, s.columns)
            for go, gk in self._groups():
                y3[:, go] = xp.matmul(w2[go], col[:, gk])
        if dw is not None:
            self._weight_grad(xp, grad_src, x, dw)

    def backward(self, dy, w, dx=None, x=None, dw=None):
        xp = backend.get_array_module(dy)
        s = self.s
        num = dy.shape[0]
        if dx is not None:
            w2 = w.reshape(s.cout, s.kg)
            dy3 = dy.reshape(num, s.cout, s.columns)
            dcol = xp.empty((num, s.cin * s.geom.kh * s.geom.kw, s.columns), dy.dtype)
            for go, gk in self._groups():
                dcol[:, gk] = xp.matmul(w2[go].T, dy3[:, go])
            reference_uncolumns(dcol, s.geom, s.in_hw, dx)
        if dw is not None:
            self._weight_grad(xp, dy, x, dw)


def _canonical_axis(layer, axis, ndim):
    if not -ndim <= axis < ndim:
        raise layer.error(f"axis {axis} out of range for a {ndim}-D bottom")
    return axis % ndim


def _spatial_values(layer, cp, name, num_spatial, default):
    """Caffe's rule for pad/stride/dilation/kernel_size: given once, once per axis, or (h, w) pair."""
    values = list(getattr(cp, name))
    h_name, w_name = {"kernel_size": ("kernel_h", "kernel_w"), "pad": ("pad_h", "pad_w"),
                      "stride": ("stride_h", "stride_w")}.get(name, (None, None))
    if h_name and (cp.HasField(h_name) or cp.HasField(w_name)):
        if num_spatial != 2:
            raise layer.error(f"{h_name} & {w_name} can only be used for 2-D convolution")
        if values:
            raise layer.error(f"give either {name} or {h_name}/{w_name}, not both")
        if name == "kernel_size" and not (cp.HasField(h_name) and cp.HasField(w_name)):
            raise layer.error("a non-square kernel needs both kernel_h and kernel_w")
        return [int(getattr(cp, h_name)), int(getattr(cp, w_name))]
    if not values:
        if default is None:
            raise layer.error(f"{name} is required")
        return [default] * num_spatial
    if len(values) == 1:
        return [int(values[0])] * num_spatial
    if len(values) != num_spatial:
        raise layer.error(f"{name} must be given once or once per spatial axis "
                          f"({len(values)} values for {num_spatial} spatial axes)")
    return [int(v) for v in values]


class _BaseConvolution(Layer):
    """Parameter parsing, weight creation and shape checks shared by (De)Convolution."""

    min_num_bottom = 1
    min_num_top = 1
    reverse = False   # Deconvolution: conv input/output swapped

    def setup(self, bottom, top):
        if len(bottom) != len(top):
            raise self.error(f"needs as many tops as bottoms, got {len(bottom)} bottoms and {len(top)} tops")
        cp = self.param.convolution_param
        shape = bottom[0].shape
        self.axis = _canonical_axis(self, cp.axis, len(shape))
        self.num_spatial = len(shape) - self.axis - 1
        if self.num_spatial not in (1, 2):
            raise self.error(f"only 1-D and 2-D convolution is supported; bottom shape {shape} with "
                             f"axis {self.axis} has {self.num_spatial} spatial axes")
        ns = self.num_spatial
        kernel = _spatial_values(self, cp, "kernel_size", ns, None)
        stride = _spatial_values(self, cp, "stride", ns, 1)
        pad = _spatial_values(self, cp, "pad", ns, 0)
        dilation = _spatial_values(self, cp, "dilation", ns, 1)
        for what, vals in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
            if min(vals) <= 0:
                raise self.error(f"{what} must be positive, got {vals}")
        if ns == 1:  # run as 2-D with a trivial height axis
            kernel, stride, pad, dilation = [1] + kernel, [1] + stride, [0] + pad, [1] + dilation
        self.geom = ConvGeometry(kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1],
                                 dilation[0], dilation[1])
        self.channels = shape[self.axis]
        self.num_output = int(cp.num_output)
        self.group = int(cp.group)
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.group <= 0:
            raise self.error("group must be positive")
        if self.channels % self.group:
            raise self.error(f"input channels {self.channels} not divisible by group {self.group}")
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} not divisible by group {self.group}")
        if self.reverse:
            self.conv_out, self.conv_in = self.channels, self.num_output
        else:
            self.conv_out, self.conv_in = self.num_output, self.channels
        kshape = [self.geom.kh, self.geom.kw] if ns == 2 else [self.geom.kw]
        weight_shape = tuple([self.conv_out, self.conv_in // self.group] + kshape)
        self.bias_term = bool(cp.bias_term)
        bias_shape = (self.num_output,)
        if self.blobs:
            want = 1 + self.bias_term
            if len(self.blobs) != want:
                raise self.error(f"expected {want} parameter blobs, got {len(self.blobs)}")
            if tuple(self.blobs[0].shape) != weight_shape:
                raise self.error(f"weight shape {tuple(self.blobs[0].shape)} does not match the expected "
                                 f"{weight_shape}", ShapeError)
            if self.bias_term and tuple(self.blobs[1].shape) != bias_shape:
                raise self.error(f"bias shape {tuple(self.blobs[1].shape)} does not match the expected "
                                 f"{bias_shape}", ShapeError)
        else:
            w = Blob(weight_shape)
            w.data[...] = fillers.fill(cp.weight_filler, weight_shape, dtype=w.dtype, layer=self.name)
            self.blobs.append(w)
            if self.bias_term:
                b = Blob(bias_shape)
                b.data[...] = fillers.fill(cp.bias_filler, bias_shape, dtype=b.dtype, layer=self.name)
                self.blobs.append(b)
        self.param_propagate_down = [True] * len(self.blobs)
        self.engine_slot = engines.EngineSlot(reference=lambda layer: ReferenceConvolution(layer.conv))

    def _spatial_hw(self, shape):
        sp = shape[self.axis + 1:]
        return (1, sp[0]) if self.num_spatial == 1 else (sp[0], sp[1])

    def _check_weights(self):
        g = self.geom
        expect = (self.conv_out, self.conv_in // self.group)
        got = tuple(self.blobs[0].shape)
        if got[:2] != expect or int(self.blobs[0].count) != expect[0] * expect[1] * g.kh * g.kw:
            raise self.error(f"weight shape {got} does not fit {self.channels} input channels, "
                             f"num_output {self.num_output}, group {self.group}, kernel {g.kh}x{g.kw}",
                             ShapeError)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom must keep {self.axis + 1 + self.num_spatial} axes, got shape {shape}",
                             ShapeError)
        if shape[self.axis] != self.channels:
            raise self.error(f"bottom has {shape[self.axis]} channels but the layer was set up for "
                             f"{self.channels}", ShapeError)
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error(f"all bottoms must have one shape: bottom[0] {shape} vs bottom[{i}] {b.shape}",
                                 ShapeError)
        self._check_weights()
        self.num = 1
        for s in shape[:self.axis]:
            self.num *= s
        in_hw = self._spatial_hw(shape)
        out_hw = self._output_hw(in_hw)
        top_spatial = list(out_hw) if self.num_spatial == 2 else [out_hw[1]]
        top_shape = tuple(shape[:self.axis]) + (self.num_output,) + tuple(top_spatial)
        for t in top:
            t.reshape(top_shape)
        self.bottom_hw, self.top_hw = in_hw, out_hw
        if self.reverse:
            self.conv = ConvShape(self.geom, self.group, self.num_output, self.channels, out_hw, in_hw, self.num)
        else:
            self.conv = ConvShape(self.geom, self.group, self.channels, self.num_output, in_hw, out_hw, self.num)
        self._conv_key = self.conv.key()
        self.engine = self.engine_slot.get(self, self._conv_key)

    @property
    def engine_name(self):
        """The name of the engine this layer runs at its current shape ("caffe": the reference)."""
        return self.engine_slot.name

    def _engine(self):
        """The engine for the current shape, re-chosen only if the mode changed since ``reshape``."""
        self.engine = self.engine_slot.get(self, self._conv_key)
        return self.engine

    def _hw_text(self, hw):
        return f"{hw[0]}x{hw[1]}" if self.num_spatial == 2 else f"{hw[1]}"

    # 4-D views (num, C, H, W) of blob arrays
    def bottom_4d(self, arr):
        return arr.reshape(self.num, self.channels, *self.bottom_hw)

    def top_4d(self, arr):
        return arr.reshape(self.num, self.num_output, *self.top_hw)

    def _add_bias(self, y4):
        b = self.blobs[1].xdata
        if isinstance(y4, np.ndarray) and y4.flags.c_contiguous:
            fusion.bias_relu(y4, b, False)      # image by image on the kernels' pool
        else:
            y4 += b.reshape(1, -1, 1, 1)

    def bias_grad(self, dy4):
        """The bias's gradient of the top gradient ``dy4`` (num, C, H, W) added into its diff (also
        what a stacked 1x1 group runs for each member: kernels/stacked_1x1.py)."""
        self.blobs[1].xdiff += dy4.sum(axis=(0, 2, 3))

    # Convolution runs the engine forward and back; Deconvolution the other way round (its forward is
    # the convolution's data gradient), so the loops below are shared and only these two differ.
    def convolve(self, x, w, out, finish=None):
        """``out[...]`` = this layer's forward of ``x`` with weights ``w``, no bias (4-D arrays
        (num, C, H, W)); inference-time fusion calls it with the layer's weights and its epilogue
        ``finish(i0, i1)`` for images ``i0..i1`` of ``out`` (kernels/fusion.py), which an engine
        may run image by image as it goes."""
        raise NotImplementedError

    def _run_transposed(self, dy, w, dx, x, dw):
        raise NotImplementedError

    def forward(self, bottom, top):
        w = self.blobs[0].xdata
        for b, t in zip(bottom, top):
            y = self.top_4d(t.xdata)
            self.convolve(self.bottom_4d(b.xdata), w, y)
            if self.bias_term:
                self._add_bias(y)

    def backward(self, top, propagate_down, bottom):
        w = self.blobs[0].xdata
        dw = self.blobs[0].xdiff if self.need_param_grad(0) else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self.top_4d(t.xdiff)
            if self.bias_term and self.need_param_grad(1):
                self.bias_grad(dy)
            dx = self.bottom_4d(b.xdiff) if propagate_down[i] else None
            if dx is None and dw is None:
                continue
            self._run_transposed(dy, w, dx, self.bottom_4d(b.xdata), dw)


@register("Convolution")
class Convolution(_BaseConvolution):
    """Caffe's Convolution: output ``floor((H + 2p - (d(k-1)+1)) / s) + 1`` per spatial axis."""

    def _output_hw(self, in_hw):
        g = self.geom
        eh, ew = g.extent()
        hp, wp = in_hw[0] + 2 * g.ph, in_hw[1] + 2 * g.pw
        if eh > hp or ew > wp:
            dil = f" with dilation {g.dh}x{g.dw} (extent {eh}x{ew})" if (g.dh, g.dw) != (1, 1) else ""
            if self.num_spatial == 1:
                dil = f" with dilation {g.dw} (extent {ew})" if g.dw != 1 else ""
                raise self.error(f"kernel {g.kw}{dil} larger than padded input {wp}", ShapeError)
            raise self.error(f"kernel {g.kh}x{g.kw}{dil} larger than padded input {hp}x{wp}", ShapeError)
        return g.out_size(*in_hw)

    def convolve(self, x, w, out, finish=None):
        engine = self._engine()
        if finish is None:
            engine.forward(x, w, y=out)
        elif hasattr(engine, "forward_images"):
            engine.forward_images(x, w, out, finish)
        else:
            engine.forward(x, w, y=out)
            finish(0, out.shape[0])

    def _run_transposed(self, dy, w, dx, x, dw):
        self._engine().backward(dy, w, dx=dx, x=x, dw=dw)

    def adds_data_gradient(self):
        """Whether ``backward_into`` can add the data gradient into another array: the engine at
        this shape does (a 1x1 stride-1 layer's, kernels/conv_engines.Gemm1x1Conv)."""
        engine = self._engine()
        return hasattr(engine, "adds_data_gradient") and engine.adds_data_gradient()

    def backward_into(self, top, bottom, dx, add):
        """This layer's backward with its bottom's gradient written into ``dx`` (``add`` False) or
        added into it (``add`` True), an array of the bottom's shape, instead of the bottom's own
        diff: a Split's sum in a solver's pass (kernels/train_fusion.Conv1x1SplitSumChain). Only
        where ``adds_data_gradient``."""
        w = self.blobs[0].xdata
        dw = self.blobs[0].xdiff if self.need_param_grad(0) else None
        dy = self.top_4d(top[0].xdiff)
        if self.bias_term and self.need_param_grad(1):
            self.bias_grad(dy)
        self._engine().backward(dy, w, dx=self.bottom_4d(dx), x=self.bottom_4d(bottom[0].xdata), dw=dw,
                                add_dx=add)


@register("Deconvolution")
class Deconvolution(_BaseConvolution):
    """The transpose of Convolution: output ``s(H-1) + d(k-1)+1 - 2p``; weights ``C x num_output/group x kh x kw``."""

    reverse = True

    def _output_hw(self, in_hw):
        g = self.geom
        eh, ew = g.extent()
        oh = g.sh * (in_hw[0] - 1) + eh - 2 * g.ph
        ow = g.sw * (in_hw[1] - 1) + ew - 2 * g.pw
        if oh <= 0 or ow <= 0:
            raise self.error(f"output size {self._hw_text((oh, ow))} is not positive (input "
                             f"{self._hw_text(in_hw)}, kernel {g.kh}x{g.kw}, stride {g.sh}x{g.sw}, "
                             f"pad {g.ph}x{g.pw})", ShapeError)
        return oh, ow

    def convolve(self, x, w, out, finish=None):
        self._engine().backward(x, w, dx=out)
        if finish is not None:
            finish(0, out.shape[0])

    def _run_transposed(self, dy, w, dx, x, dw):
        self._engine().forward(dy, w, y=dx, grad_src=x, dw=dw)


@register("Im2col")
class Im2col(Layer):
    """The column matrix a convolution multiplies, as a blob: (N, C, H, W) becomes
    (N, C·kh·kw, oh, ow), channel-major then kernel row then kernel column (Caffe's im2col order),
    from ``convolution_param``'s kernel, stride, pad and dilation (num_output is not used). The
    gradient sums the columns back onto the image (col2im). 2-D, channel axis 1 only. The reference
    is ``reference_columns``; the engines (``conv_engines``) run the faster im2col kernels."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        cp = self.param.convolution_param
        shape = bottom[0].shape
        axis = _canonical_axis(self, cp.axis, len(shape))
        if axis != 1 or len(shape) != 4:
            raise self.error(f"only 2-D im2col over (N, C, H, W) with axis 1 is supported, got bottom "
                             f"shape {shape} with axis {axis}")
        kernel = _spatial_values(self, cp, "kernel_size", 2, None)
        stride = _spatial_values(self, cp, "stride", 2, 1)
        pad = _spatial_values(self, cp, "pad", 2, 0)
        dilation = _spatial_values(self, cp, "dilation", 2, 1)
        for what, vals in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
            if min(vals) <= 0:
                raise self.error(f"{what} must be positive, got {vals}")
        self.geom = ConvGeometry(kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1],
                                 dilation[0], dilation[1])
        self.engine_slot = engines.EngineSlot(reference=lambda layer: _ReferenceIm2col(layer.geom, layer.out_hw))

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (N, C, H, W), got shape {shape}", ShapeError)
        n, c, h, w = shape
        oh, ow = self.geom.out_size(h, w)
        if oh <= 0 or ow <= 0:
            raise self.error(f"kernel extent {self.geom.extent()} does not fit the padded input "
                             f"{h + 2 * self.geom.ph}x{w + 2 * self.geom.pw}", ShapeError)
        self.out_hw = (oh, ow)
        top[0].reshape(n, c * self.geom.kh * self.geom.kw, oh, ow)
        self._shape_key = tuple(shape)
        self.engine = self.engine_slot.get(self, self._shape_key)

    @property
    def engine_name(self):
        return self.engine_slot.name

    def forward(self, bottom, top):
        self.engine = self.engine_slot.get(self, self._shape_key)
        top[0].xdata = self.engine.forward(bottom[0].xdata)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        self.engine = self.engine_slot.get(self, self._shape_key)
        dx = self.xp.empty(bottom[0].shape, dtype=top[0].xdiff.dtype)
        self.engine.backward(top[0].xdiff, dx)
        bottom[0].xdiff = dx


class _ReferenceIm2col:
    """The Im2col layer's reference: ``reference_columns`` as a blob and ``reference_uncolumns``."""

    def __init__(self, geom, out_hw):
        self.geom, self.out_hw = geom, out_hw

    def forward(self, x):
        return reference_columns(x, self.geom, self.out_hw).reshape(x.shape[0], -1, *self.out_hw)

    def backward(self, dy, dx):
        n = dx.shape[0]
        return reference_uncolumns(dy.reshape(n, -1, self.out_hw[0] * self.out_hw[1]), self.geom,
                                   dx.shape[2:], dx)
