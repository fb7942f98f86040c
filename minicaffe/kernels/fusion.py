"""Inference-time layer fusion for TEST nets on the CPU, as OpenCV's dnn module does.

Chosen once, when a TEST-phase ``Net`` is built (``plan``), and switched off with
``MINICAFFE_FUSION=0`` (read at build time, for comparisons). Three patterns are fused:

* **Convolution + BatchNorm (global statistics) + Scale + ReLU**, any non-empty run of the last
  three, each in place on the convolution's top (how Caffe's ResNet prototxts are written). The
  BatchNorm and Scale become one per-output-channel factor and bias (``y = conv(x, w)·a + b`` with
  ``a = γ/√(var+eps)``, ``b = (bias − mean)·a + β``), applied with the ReLU in one epilogue pass
  over the convolution's output (``image_epilogue``; an engine computing an image at a time runs it
  right after that image's GEMM, while the output is in cache): one GEMM and one pass instead of
  the seven or so passes over the activations of the separate layers (BatchNorm's subtract /
  scale / copy, Scale's saved input / multiply / add, ReLU).
* **Convolution chain + Eltwise SUM (+ ReLU)** (``ConvSumChain``): a ResNet block's last
  convolution and its shortcut, the sum and ReLU in the same epilogue.
* **Eltwise SUM + ReLU** in place on the sum: the sum written into the top's own array (no new
  array per forward) and rectified there.

What pycaffe sees stays Caffe's:

* blobs: every blob a chain touches ends up with the value the last layer writing it writes, as
  without fusion (to float rounding: the factors are applied as one product and one sum, ~1e-6
  relative); a chain is fused only when no later layer writes its blobs or the convolution's
  bottom, and only when ``forward(start=, end=)`` covers the whole chain.
* params: ``net.params`` are never touched, and no weights are folded or copied: the convolution
  runs on its own weights and the factors go into the epilogue. The factors are remade whenever a
  BatchNorm / Scale parameter or the bias changed (compared with copies of those, a few thousand
  values), so a user (or a solver sharing the weights with this test net) changing params between
  forwards gets the new params.
* backward: the separate layers keep state for their gradient (BatchNorm its normalised input,
  Scale a copy of its input), which a fused forward does not fill. The first ``backward`` on a net
  whose forward ran fused chains re-runs those chains unfused (from the convolution's bottom, which
  no later layer writes) and switches fusion off for that net: a net used for gradients (saliency,
  deep dream) is then an ordinary unfused net.

GPU arrays are left to the separate layers (their kernels already run one pass each).
"""
import numpy as np

from ..core import context as _context
from ..core import threads
from ..proto import caffe_pb2
from . import compiled

ENV = _context.FUSION_VAR    # read once into the context's switches


def enabled():
    """Fusion is on unless ``MINICAFFE_FUSION=0``."""
    return _context.switches().fusion


class _Chain:
    """Consecutive layers ``first..last`` run as one."""

    def __init__(self, first, last):
        self.first, self.last = first, last


class ConvChain(_Chain):
    """Convolution (+ BatchNorm) (+ Scale) (+ ReLU), the others in place on the convolution's top.

    The fold is a per-output-channel factor ``a`` and bias ``b``: both small, kept between forwards
    and remade only when a BatchNorm / Scale parameter or the convolution's bias changed (compared
    with copies of those, a few thousand values), applied in the convolution's epilogue. Folding
    ``a`` into the weights instead (``w·a``) cost a multiply over every convolution's weights at
    each forward (19 ms of ResNet-50's ~550 at batch 10 on 2 cores), or, to keep the folded
    weights, a second and third copy of them (180 MB on ResNet-50)."""

    def __init__(self, first, last, bn, scale, relu):
        super().__init__(first, last)
        self.bn, self.scale, self.relu = bn, scale, relu
        self._sources = None         # copies of the small parameters the factors were made from
        self._factors = None         # (a, bias or None): a float32 (cout, 1, ..., 1)

    def _source_arrays(self, net):
        conv = net.layers[self.first]
        arrays = [conv.blobs[1].xdata] if conv.bias_term else []
        if self.bn is not None:
            arrays += [b.xdata for b in net.layers[self.bn].blobs]
        if self.scale is not None:
            arrays += [b.xdata for b in net.layers[self.scale].blobs]
        return arrays

    def factors(self, net):
        """(a, bias or None): ``y = conv(x, w)·a + bias`` per output channel is the chain's
        Convolution + BatchNorm + Scale; remade when one of their small parameters changed."""
        arrays = self._source_arrays(net)
        if self._sources is not None and len(self._sources) == len(arrays) and all(
                s.shape == a.shape and np.array_equal(s, a) for s, a in zip(self._sources, arrays)):
            return self._factors
        conv = net.layers[self.first]
        w = conv.blobs[0].xdata
        cout = w.shape[0]
        # per-output-channel y = conv(x)·a + b, in float64 then rounded once
        a = np.ones(cout)
        b = (conv.blobs[1].xdata.astype(np.float64) if conv.bias_term else np.zeros(cout))
        if self.bn is not None:
            bn = net.layers[self.bn]
            f = float(bn.blobs[2].xdata.reshape(-1)[0])
            f = 0.0 if f == 0 else 1.0 / f
            mean = bn.blobs[0].xdata.reshape(-1).astype(np.float64) * f
            var = bn.blobs[1].xdata.reshape(-1).astype(np.float64) * f
            inv = 1.0 / np.sqrt(var + bn.eps)
            a, b = a * inv, (b - mean) * inv
        if self.scale is not None:
            sc = net.layers[self.scale]
            gamma = sc.blobs[0].xdata.reshape(-1).astype(np.float64)
            a, b = a * gamma, b * gamma
            if sc.bias_index is not None:
                b = b + sc.blobs[sc.bias_index].xdata.reshape(-1)
        self._factors = (a.astype(w.dtype).reshape((cout,) + (1,) * (w.ndim - 1)), b.astype(w.dtype))
        self._sources = [s.copy() for s in arrays]
        return self._factors

    def epilogue_factors(self, net):
        """(scale or None, bias or None): per output channel, ``y = conv(x, w)·scale + bias`` is the
        chain's Convolution + BatchNorm + Scale (its own weights ``w``)."""
        conv = net.layers[self.first]
        if self.bn is None and self.scale is None:
            # nothing to fold (Convolution + ReLU): the layer's own bias
            return None, (conv.blobs[1].xdata if conv.bias_term else None)
        a, bias = self.factors(net)
        return a.reshape(-1), bias

    def run(self, net):
        conv = net.layers[self.first]
        x = net.bottom_vecs[self.first][0].xdata
        if not isinstance(x, np.ndarray):
            return False
        for li in range(self.first, self.last + 1):
            net.layers[li].reshape(net.bottom_vecs[li], net.top_vecs[li])
        y4 = conv.top_4d(net.top_vecs[self.first][0].xdata)
        finish = self._epilogue(net, x, y4)
        if finish is False:
            return False
        # the engine the layer chose at reshape, with the chain's epilogue
        conv.convolve(conv.bottom_4d(x), conv.blobs[0].xdata, y4, finish)
        return True

    def _epilogue(self, net, x, y4):
        """The convolution's epilogue (``image_epilogue``: the factors, bias and ReLU), or False when
        the chain cannot run fused this time (the layers then run one by one)."""
        scale, bias = self.epilogue_factors(net)
        return image_epilogue(y4, bias, self.relu is not None, scale=scale)


class ConvSumChain(ConvChain):
    """A ConvChain whose convolution's top is then summed with another blob by an Eltwise SUM (both
    coefficients 1), + ReLU in place on the sum: the last convolution of a ResNet block and the
    block's shortcut. The epilogue of each image (while the GEMM's output is in cache) applies the
    factors and bias in the convolution's own top, then writes ``max(top + other, 0)`` into the
    Eltwise's top: both blobs hold what the separate layers write, and the Eltwise's two whole-array passes
    over three arrays and the ReLU's pass are gone (ResNet-50 batch 10: 49 ms of Eltwise on 2 cores).

    The Eltwise's top is written while the convolution runs, so it must not share memory with the
    convolution's bottom or the other summand; the memory plan keeps the chain's blobs live over the
    whole chain (net/memory_plan.py), and ``run`` falls back to the separate layers if they do."""

    def __init__(self, first, last, bn, scale, relu, eltwise, other, sum_relu):
        super().__init__(first, last, bn, scale, relu)
        self.eltwise, self.other, self.sum_relu = eltwise, other, sum_relu

    def _epilogue(self, net, x, y4):
        r = net.bottom_vecs[self.eltwise][self.other].xdata
        y = net.top_vecs[self.first][0].xdata
        out = net.top_vecs[self.eltwise][0].xdata
        if not isinstance(r, np.ndarray) or r.shape != y.shape or np.may_share_memory(out, x) \
                or np.may_share_memory(out, r) or np.may_share_memory(out, y):
            return False
        scale, bias = self.epilogue_factors(net)
        return image_epilogue(y4, bias, self.relu is not None, residual=r.reshape(y4.shape),
                              out=out.reshape(y4.shape), sum_relu=self.sum_relu is not None, scale=scale)


class EltwiseReluChain(_Chain):
    """Eltwise SUM + ReLU in place on its top."""

    def run(self, net):
        layer = net.layers[self.first]
        bottom, top = net.bottom_vecs[self.first], net.top_vecs[self.first]
        xs = [b.xdata for b in bottom]
        if not all(isinstance(x, np.ndarray) for x in xs):
            return False
        layer.reshape(bottom, top)
        net.layers[self.last].reshape(net.bottom_vecs[self.last], net.top_vecs[self.last])
        out = top[0].xdata

        def sum_relu(out, xs):
            # the Eltwise layer's own sum, then ReLU's clip
            layer.forward_into(np, xs, out)
            np.maximum(out, 0, out=out)
        flat = threads.flat_views(out, *xs)
        if flat is None:
            sum_relu(out, xs)
            return True
        if layer.op == caffe_pb2.EltwiseParameter.SUM and len(xs) == 2 and tuple(layer.coeffs) == (1.0, 1.0):
            # two bottoms, plain sum: out = max(x0 + x1, 0) as a convolution's residual epilogue
            # does it (image_epilogue, on each flat chunk): one compiled pass, each element read and
            # written once, where the passes below copy, add and clip (the top read and written
            # three times); the same bits (a + b == b + a, and the kernel clips as NumPy's maximum)
            f_out, f0, f1 = flat

            def chunk(a, b):
                image_epilogue(f0[a:b].reshape(1, 1, -1), None, False, residual=f1[a:b].reshape(1, 1, -1),
                               out=f_out[a:b].reshape(1, 1, -1), sum_relu=True)(0, 1)
            threads.parallel_flat(out.size, chunk, work=out.size * 3)
            return True
        # in flat chunks on the pool, each chunk summed and clipped while it is in cache (the
        # same operations per element as the whole-array passes)
        threads.parallel_flat(out.size, lambda a, b: sum_relu(flat[0][a:b], [f[a:b] for f in flat[1:]]),
                              work=out.size * (len(xs) + 2))
        return True


def image_epilogue(y4, bias, relu, residual=None, out=None, sum_relu=False, scale=None):
    """``finish(i0, i1)``: images ``i0..i1`` of a convolution's (N, C, H, W) NumPy output ``y4`` get
    ``·= scale`` and ``+= bias`` per channel, then ``max(·, 0)`` when ``relu``; with ``residual``,
    then ``out = y4 + residual`` (an Eltwise SUM's top), rectified when ``sum_relu``. None when there
    is nothing to do. Why per image: an engine that computes an image at a time
    (Gemm1x1Conv.forward_images) calls it right after the image's GEMM, while the image's output is
    still in cache, and the compiled kernel (kernels/compiled.py) reads and writes each element
    once. The NumPy twin runs the same operations per element as whole-image passes (a + b == b + a,
    so the Eltwise's order does not matter), and so do the kernels: the same bits either way."""
    if bias is None and scale is None and not relu and residual is None:
        return None
    n, c = y4.shape[:2]
    y3 = y4.reshape(n, c, -1)
    r3 = None if residual is None else residual.reshape(n, c, -1)
    o3 = None if out is None else out.reshape(n, c, -1)
    arrays = [y3] + ([] if r3 is None else [r3, o3])
    factors = [f for f in (bias, scale) if f is not None]
    if compiled.runs_on(*arrays) and all(f.dtype == y3.dtype for f in factors):
        zeros = np.zeros(c, y3.dtype)
        b1 = zeros if bias is None else np.ascontiguousarray(bias.reshape(c))
        a1 = zeros if scale is None else np.ascontiguousarray(scale.reshape(c))
        has_bias, has_scale = bias is not None, scale is not None
        kernel = compiled.get(compiled.convolution_epilogue)
        summed = r3 is not None
        r_or_y, o_or_y = (r3, o3) if summed else (y3, y3)

        def finish(i0, i1):
            for i in range(i0, i1):
                kernel(y3[i], a1, has_scale, b1, has_bias, relu, r_or_y[i], o_or_y[i], summed, sum_relu)
        return finish
    b2 = None if bias is None else bias.reshape(c, 1)
    a2 = None if scale is None else scale.reshape(c, 1)

    def finish(i0, i1):
        for i in range(i0, i1):
            yi = y3[i]
            if a2 is not None:
                np.multiply(yi, a2, out=yi)
            if b2 is not None:
                np.add(yi, b2, out=yi)
            if relu:
                np.maximum(yi, 0, out=yi)
            if r3 is not None:
                oi = np.add(yi, r3[i], out=o3[i])
                if sum_relu:
                    np.maximum(oi, 0, out=oi)
    return finish


def bias_relu(y4, bias, relu):
    """``y4 += bias`` per channel, then ``max(y4, 0)`` when ``relu``, on an (N, C, H, W) NumPy array:
    image by image over the kernels' pool, each image's passes while it is in cache (one
    thread's two whole-array passes took 7.0 ms on ResNet's 10x256x56x56, 5.6 this way at two
    threads; 5.4 and 2.4 at 10x512x28x28). Per element the same operations, so the same bits."""
    finish = image_epilogue(y4, bias, relu)
    if finish is not None:
        threads.parallel_for(y4.shape[0], finish, work=y4.size * ((bias is not None) + relu))


class Fusion:
    """The chains of one net (by first layer index) and those run fused since the last backward."""

    def __init__(self, chains):
        self.chains = {ch.first: ch for ch in chains}
        self.ran = {}

    def __len__(self):
        return len(self.chains)

    def chain_at(self, li, end):
        ch = self.chains.get(li)
        return ch if ch is not None and ch.last <= end else None

    def unfuse(self, net):
        """Re-run the fused chains layer by layer (forward order), so the layers hold the state
        their backward needs."""
        for first in sorted(self.ran):
            ch = self.ran[first]
            for li in range(ch.first, ch.last + 1):
                layer, bottom, top = net.layers[li], net.bottom_vecs[li], net.top_vecs[li]
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
        self.ran = {}


def _in_place_on(net, li, blob):
    return (len(net.bottom_vecs[li]) == 1 and len(net.top_vecs[li]) == 1 and net.bottom_vecs[li][0] is blob
            and net.top_vecs[li][0] is blob)


def _written_after(net, last, blob):
    return any(t is blob for tops in net.top_vecs[last + 1:] for t in tops)


def _plain_relu(layer):
    return layer.type == "ReLU" and layer.param.relu_param.negative_slope == 0


def _no_loss(net, first, last):
    weights = net.layer_loss_weights
    return not any(w for li in range(first, last + 1) for w in weights[li])


def _plain_conv(net, li):
    """Whether layer ``li`` is a Convolution a chain can start with: one bottom, one top of its own,
    channels on axis 1."""
    conv = net.layers[li]
    return (conv.type == "Convolution" and len(net.bottom_vecs[li]) == 1 and len(net.top_vecs[li]) == 1
            and conv.axis == 1 and net.bottom_vecs[li][0] is not net.top_vecs[li][0])


def _conv_chain(net, li):
    if not _plain_conv(net, li):
        return None
    conv = net.layers[li]
    blob = net.top_vecs[li][0]
    channels = conv.num_output
    bn = scale = relu = None
    j = li + 1
    n = len(net.layers)
    if j < n and net.layers[j].type == "BatchNorm" and _in_place_on(net, j, blob) \
            and net.layers[j].use_global_stats:
        bn, j = j, j + 1
    if j < n and net.layers[j].type == "Scale" and _in_place_on(net, j, blob):
        sc = net.layers[j]
        p = sc.param.scale_param
        if p.axis in (1, -3) and p.num_axes == 1 and sc.blobs and sc.blobs[0].count == channels:
            scale, j = j, j + 1
    if j < n and _plain_relu(net.layers[j]) and _in_place_on(net, j, blob):
        relu, j = j, j + 1
    if _written_after(net, li, net.bottom_vecs[li][0]):
        return None
    summed = _sum_after(net, li, j, blob)
    if summed is not None:
        return ConvSumChain(li, summed[2], bn, scale, relu, j, summed[0], summed[1])
    last = j - 1
    if last == li or not _no_loss(net, li, last) or _written_after(net, last, blob):
        return None
    return ConvChain(li, last, bn, scale, relu)


def _sum_after(net, li, j, blob):
    """(other bottom's index, ReLU or None, last layer) when layer ``j``, just after the convolution
    ``li``'s in-place layers, is an Eltwise SUM of its top ``blob`` and one other blob, coefficients
    1, into a blob of its own (+ a ReLU in place on it), with no loss and nothing written again
    afterwards; else None (see ConvSumChain)."""
    if j >= len(net.layers):
        return None
    layer, bottoms, tops = net.layers[j], net.bottom_vecs[j], net.top_vecs[j]
    if layer.type != "Eltwise" or layer.op != caffe_pb2.EltwiseParameter.SUM or len(bottoms) != 2 \
            or len(tops) != 1 or any(c != 1.0 for c in layer.coeffs):
        return None
    if sum(b is blob for b in bottoms) != 1 or any(b is tops[0] for b in bottoms):
        return None
    other = 1 if bottoms[0] is blob else 0
    relu = j + 1 if j + 1 < len(net.layers) and _plain_relu(net.layers[j + 1]) \
        and _in_place_on(net, j + 1, tops[0]) else None
    last = j if relu is None else relu
    if not _no_loss(net, li, last) or any(_written_after(net, j, b) for b in bottoms) \
            or _written_after(net, last, tops[0]):
        return None
    return other, relu, last


def _eltwise_chain(net, li):
    layer = net.layers[li]
    if layer.type != "Eltwise" or layer.op != caffe_pb2.EltwiseParameter.SUM or len(net.top_vecs[li]) != 1:
        return None
    blob = net.top_vecs[li][0]
    if any(b is blob for b in net.bottom_vecs[li]) or li + 1 >= len(net.layers):
        return None
    if not (_plain_relu(net.layers[li + 1]) and _in_place_on(net, li + 1, blob)):
        return None
    if not _no_loss(net, li, li + 1):
        return None
    return EltwiseReluChain(li, li + 1)


def plan(net):
    """The Fusion of a built TEST net, or None when there is nothing to fuse or it is switched off."""
    if net.phase != caffe_pb2.TEST or not enabled():
        return None
    chains = scan_chains(net, lambda li: _conv_chain(net, li) or _eltwise_chain(net, li))
    return Fusion(chains) if chains else None


def scan_chains(net, find):
    """The chains ``find(li)`` returns (a chain starting at layer ``li``, or None), the layers scanned
    in order and each scan resumed after the last chain's last layer: chains never overlap."""
    chains = []
    li = 0
    while li < len(net.layers):
        ch = find(li)
        if ch is not None:
            chains.append(ch)
            li = ch.last + 1
        else:
            li += 1
    return chains
