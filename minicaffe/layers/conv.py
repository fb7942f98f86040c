"""Convolution and Deconvolution: im2col + one GEMM per group for a whole batch (or chunk of it).

Both layers share one engine that knows a convolution in its "forward" orientation
(input ``cin`` channels -> output ``cout`` channels, weights ``cout x cin/group x kh x kw``):

* ``engine.forward``  computes ``y = conv(x, w)`` and/or the weight gradient ``dw += rows(g) col(x)^T``;
* ``engine.backward`` computes ``dx = conv^T(dy, w)`` (GEMM + col2im) and/or the weight gradient.

Convolution uses them as they are; Deconvolution is the transpose (its forward is the
convolution's data gradient, its data gradient the convolution's forward), exactly as Caffe's
``DeconvolutionLayer`` reuses ``BaseConvolutionLayer`` with the dimensions reversed. A 1x1 kernel
with no padding skips im2col in the forward (a batched matrix product straight on the blob, or,
strided on the CPU over maps of ``DIRECT_1X1_MIN_COLUMNS`` positions or more, on its gathered
strided view) and, with stride 1, col2im in the backward.
On the CPU the forward over wide maps runs a band of output rows at a time (``COL_BAND_ELEMENTS``
in ``im2col``), so the column matrix is read from cache; over narrow maps the column matrix puts
the batch axis last (``BATCH_LAST_MAX_WIDTH``), so im2col and col2im move long runs. The CPU
forward of a wide-enough 3x3 stride-1 convolution uses Winograd F(2x2, 3x3) instead (``winograd``).

Only 1-D and 2-D spatial convolutions are supported (a 1-D one runs as 2-D with height 1).
"""
import numpy as np

from ..core import backend, fillers
from ..kernels import winograd
from ..core.blob import Blob
from ..errors import ShapeError
from ..proto import caffe_pb2
from ..kernels import im2col as _im2col
from ..kernels.im2col import (ConvGeometry, col2im, col2im_batch_last, im2col, im2col_batch_last, im2col_rows,
                      images_per_chunk, padded_source, workspace)
from ..core.layer import Layer, register


class _ConvEngine:
    """Batched 2-D convolution arithmetic for one geometry and one input/output size."""

    def __init__(self, geom, group, cin, cout, in_hw, out_hw):
        self.geom, self.group, self.cin, self.cout = geom, group, cin, cout
        self.in_hw, self.out_hw = in_hw, out_hw
        self.kg = cin // group * geom.kh * geom.kw     # GEMM inner size per group
        self.og = cout // group                        # output channels per group
        self.L = out_hw[0] * out_hw[1]

    def _groups(self):
        for g in range(self.group):
            yield slice(g * self.og, (g + 1) * self.og), slice(g * self.kg, (g + 1) * self.kg)

    def _chunks(self, num):
        step = images_per_chunk(self.cin * self.geom.kh * self.geom.kw * self.L, num)
        for n0 in range(0, num, step):
            yield n0, min(num, n0 + step)

    def _batch_last(self, xp, num):
        """Whether the column matrix puts the batch axis last (CPU, narrow maps: see
        ``im2col.BATCH_LAST_MAX_WIDTH``)."""
        return (xp is np and not self.geom.is_1x1 and self.geom.sw == 1
                and num >= _im2col.BATCH_LAST_MIN_NUM and self.out_hw[1] <= _im2col.BATCH_LAST_MAX_WIDTH)

    def _rows(self, xp, a, batch_last=False):
        """(n, cout, oh, ow) -> (cout, n*oh*ow), the GEMM layout of an output-side array (columns
        ordered (oh, ow, n) with ``batch_last``)."""
        n = a.shape[0]
        oh, ow = self.out_hw
        if batch_last:
            buf = workspace(xp, (self.cout, oh, ow, n), a.dtype, "rows")
            xp.copyto(buf, a.transpose(1, 2, 3, 0))
        else:
            buf = workspace(xp, (self.cout, n, oh, ow), a.dtype, "rows")
            xp.copyto(buf, a.transpose(1, 0, 2, 3))
        return buf.reshape(self.cout, n * self.L)

    def _cols(self, x, batch_last=False):
        if batch_last:
            col = im2col_batch_last(x, self.geom, self.out_hw)
        else:
            col = im2col(x, self.geom, self.out_hw)
        return col.reshape(self.cin * self.geom.kh * self.geom.kw, x.shape[0] * self.L)

    def _accumulate_wgrad(self, rows, col2, dw):
        dw2 = dw.reshape(self.cout, self.kg)
        cpu = backend.get_array_module(rows) is np
        for go, gk in self._groups():
            if cpu:
                # (col2 rows^T)^T: OpenBLAS is up to 1.4x faster this way round on small
                # layers (LeNet's conv2: 2.4 against 3.4 ms) and never slower on large ones
                dw2[go] += (col2[gk] @ rows[go].T).T
            else:
                dw2[go] += rows[go] @ col2[gk].T

    def _direct(self, xp):
        """Whether the forward GEMM runs per image straight on the blob (no column matrix, no
        transposed copy of the output): a 1x1 kernel, stride 1, no padding; on the CPU also a
        strided 1x1 kernel (the input's strided view gathered into a (N, C, oh*ow) buffer:
        ResNet's 1x1/2 projections) over maps of at least ``DIRECT_1X1_MIN_COLUMNS`` output
        positions (below, one GEMM over the whole batch's columns is faster)."""
        g = self.geom
        if g.is_1x1 or xp is not np:
            return g.is_1x1
        return (g.kh == 1 and g.kw == 1 and g.ph == 0 and g.pw == 0
                and self.L >= _im2col.DIRECT_1X1_MIN_COLUMNS)

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        """``y[...] = conv(x, w)`` when ``y`` is given; ``dw += rows(grad_src) @ cols(x)^T`` when ``dw`` is."""
        xp = backend.get_array_module(x)
        num = x.shape[0]
        w2 = w.reshape(self.cout, self.kg)
        direct = self._direct(xp)
        if y is not None and direct:
            g, src = self.geom, x
            if g.sh != 1 or g.sw != 1:
                oh, ow = self.out_hw
                src = workspace(xp, (num, self.cin, oh, ow), x.dtype, "col")
                xp.copyto(src, x[:, :, :oh * g.sh:g.sh, :ow * g.sw:g.sw])
            x3 = src.reshape(num, self.cin, self.L)
            y3 = y.reshape(num, self.cout, self.L)
            if self.group == 1:
                xp.matmul(w2, x3, out=y3)
            else:
                cg = self.cin // self.group
                for g, (go, _) in enumerate(self._groups()):
                    y3[:, go] = xp.matmul(w2[go], x3[:, g * cg:(g + 1) * cg])
        if dw is None and (y is None or direct):
            return
        if dw is None and xp is np and self._forward_bands(x, w2, y):
            return
        oh, ow = self.out_hw
        for n0, n1 in self._chunks(num):
            last = self._batch_last(xp, n1 - n0)
            col2 = self._cols(x[n0:n1], last)
            if y is not None and not direct:
                rows = workspace(xp, (self.cout, (n1 - n0) * self.L), x.dtype, "rows")
                for go, gk in self._groups():
                    xp.matmul(w2[go], col2[gk], out=rows[go])
                if last:
                    y[n0:n1] = rows.reshape(self.cout, oh, ow, n1 - n0).transpose(3, 0, 1, 2)
                else:
                    y[n0:n1] = rows.reshape(self.cout, n1 - n0, oh, ow).transpose(1, 0, 2, 3)
            if dw is not None:
                self._accumulate_wgrad(self._rows(xp, grad_src[n0:n1], last), col2, dw)

    def _forward_bands(self, x, w2, y):
        """``y[...] = conv(x, w)`` a band of output rows at a time (CPU; see ``COL_BAND_ELEMENTS``).
        False, doing nothing, when the whole column matrix is small enough anyway."""
        g, num = self.geom, x.shape[0]
        oh, ow = self.out_hw
        k = self.cin * g.kh * g.kw
        per_row = k * num * ow
        band = max(_im2col.COL_BAND_ELEMENTS // per_row, -(-_im2col.COL_BAND_MIN_COLUMNS // (num * ow)), 1)
        if ow < _im2col.COL_BAND_MIN_WIDTH or band * 2 > oh or band * per_row > _im2col.MAX_COL_ELEMENTS:
            return False
        src = padded_source(x, g)
        for y0 in range(0, oh, band):
            y1 = min(oh, y0 + band)
            cols = (y1 - y0) * ow * num
            col2 = im2col_rows(src, g, self.out_hw, y0, y1).reshape(k, cols)
            rows = workspace(np, (self.cout, cols), x.dtype, "rows")
            for go, gk in self._groups():
                np.matmul(w2[go], col2[gk], out=rows[go])
            y[:, :, y0:y1] = rows.reshape(self.cout, num, y1 - y0, ow).transpose(1, 0, 2, 3)
        return True

    def backward(self, dy, w, dx=None, x=None, dw=None):
        """``dx[...] = conv^T(dy, w)`` when ``dx`` is given; ``dw += rows(dy) @ cols(x)^T`` when ``dw`` is."""
        xp = backend.get_array_module(dy)
        num = dy.shape[0]
        w2 = w.reshape(self.cout, self.kg)
        direct = self.geom.is_1x1
        if dx is not None and direct:
            dy3 = dy.reshape(num, self.cout, self.L)
            dx3 = dx.reshape(num, self.cin, self.L)
            if self.group == 1:
                xp.matmul(w2.T, dy3, out=dx3)
            else:
                cg = self.cin // self.group
                for g, (go, _) in enumerate(self._groups()):
                    dx3[:, g * cg:(g + 1) * cg] = xp.matmul(w2[go].T, dy3[:, go])
        if dw is None and (dx is None or direct):
            return
        g = self.geom
        oh, ow = self.out_hw
        for n0, n1 in self._chunks(num):
            n = n1 - n0
            last = self._batch_last(xp, n)
            rows = self._rows(xp, dy[n0:n1], last)
            if dw is not None:
                self._accumulate_wgrad(rows, self._cols(x[n0:n1], last), dw)
            if dx is not None and not direct:
                # the column buffer is free again: the weight gradient is done with it
                shape = (self.cin, g.kh, g.kw, oh, ow, n) if last else (self.cin, g.kh, g.kw, n, oh, ow)
                dcol = workspace(xp, shape, dy.dtype, "col")
                dcol2 = dcol.reshape(self.cin * g.kh * g.kw, n * self.L)
                for go, gk in self._groups():
                    xp.matmul(w2[go].T, rows[go], out=dcol2[gk])
                if last:
                    col2im_batch_last(dcol, g, self.in_hw, out=dx[n0:n1])
                else:
                    col2im(dcol, g, self.in_hw, out=dx[n0:n1])


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
        self._winograd_cache = winograd.FilterCache()

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
            self.engine = _ConvEngine(self.geom, self.group, self.num_output, self.channels, out_hw, in_hw)
        else:
            self.engine = _ConvEngine(self.geom, self.group, self.channels, self.num_output, in_hw, out_hw)

    def _hw_text(self, hw):
        return f"{hw[0]}x{hw[1]}" if self.num_spatial == 2 else f"{hw[1]}"

    # 4-D views (num, C, H, W) of blob arrays
    def _bottom4(self, arr):
        return arr.reshape(self.num, self.channels, *self.bottom_hw)

    def _top4(self, arr):
        return arr.reshape(self.num, self.num_output, *self.top_hw)

    def _add_bias(self, y4):
        y4 += self.blobs[1].xdata.reshape(1, -1, 1, 1)

    def _bias_grad(self, dy4):
        self.blobs[1].xdiff += dy4.sum(axis=(0, 2, 3))

    # Convolution runs the engine forward and back; Deconvolution the other way round (its forward is
    # the convolution's data gradient), so the loops below are shared and only these two differ.
    def _run(self, x, w, out):
        raise NotImplementedError

    def _run_transposed(self, dy, w, dx, x, dw):
        raise NotImplementedError

    def forward(self, bottom, top):
        w = self.blobs[0].xdata
        for b, t in zip(bottom, top):
            y = self._top4(t.xdata)
            self._run(self._bottom4(b.xdata), w, y)
            if self.bias_term:
                self._add_bias(y)

    def backward(self, top, propagate_down, bottom):
        w = self.blobs[0].xdata
        dw = self.blobs[0].xdiff if self.need_param_grad(0) else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self._top4(t.xdiff)
            if self.bias_term and self.need_param_grad(1):
                self._bias_grad(dy)
            dx = self._bottom4(b.xdiff) if propagate_down[i] else None
            if dx is None and dw is None:
                continue
            self._run_transposed(dy, w, dx, self._bottom4(b.xdata), dw)


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

    def _run(self, x, w, out):
        xp = backend.get_array_module(x)
        if winograd.worthwhile(xp, self.geom, self.group, self.channels, self.top_hw):
            winograd.forward(x, w, out, self.geom.ph, self.geom.pw, u=self._winograd_filters(w))
        else:
            self.engine.forward(x, w, y=out)

    def _winograd_filters(self, w):
        """Transformed filters: kept between forwards in a TEST net, whose weights rarely change;
        redone in scratch space in a TRAIN net, whose weights change every iteration."""
        if self.phase == caffe_pb2.TRAIN:
            scratch = workspace(np, (16,) + w.shape[:2], w.dtype, "wino_filters")
            return winograd.transform_filters(w, out=scratch)
        return self._winograd_cache.get(w)

    def _run_transposed(self, dy, w, dx, x, dw):
        self.engine.backward(dy, w, dx=dx, x=x, dw=dw)


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

    def _run(self, x, w, out):
        self.engine.backward(x, w, dx=out)

    def _run_transposed(self, dy, w, dx, x, dw):
        self.engine.forward(dy, w, y=dx, grad_src=x, dw=dw)


@register("Im2col")
class Im2col(Layer):
    """The column matrix a convolution multiplies, as a blob: (N, C, H, W) becomes
    (N, C·kh·kw, oh, ow), channel-major then kernel row then kernel column (Caffe's im2col order),
    from ``convolution_param``'s kernel, stride, pad and dilation (num_output is not used). The
    gradient sums the columns back onto the image (col2im). 2-D, channel axis 1 only."""

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

    def forward(self, bottom, top):
        x = bottom[0].xdata
        n, c = x.shape[:2]
        oh, ow = self.out_hw
        col = im2col(x, self.geom, self.out_hw)            # (C, kh, kw, N, oh, ow), a workspace
        g = self.geom
        top[0].xdata = col.reshape(c * g.kh * g.kw, n, oh, ow).transpose(1, 0, 2, 3).copy()

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        n, c, h, w = bottom[0].shape
        g = self.geom
        oh, ow = self.out_hw
        dy = top[0].xdiff.reshape(n, c, g.kh, g.kw, oh, ow).transpose(1, 2, 3, 0, 4, 5)
        dx = xp.empty(bottom[0].shape, dtype=dy.dtype)
        col2im(xp.ascontiguousarray(dy), g, (h, w), dx)
        bottom[0].xdiff = dx
