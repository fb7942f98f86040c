"""Fusion in nets that learn: BatchNorm (batch statistics) + Scale (+ ReLU) and Eltwise SUM + ReLU,
forward and backward; Convolution + ReLU, forward; a ReLU + the MAX Pooling that reads it, backward
(ReluMaxPoolChain); sibling 1x1 Convolutions on one Split as one stacked GEMM, forward and backward
(kernels/stacked_1x1.py, whose groups this module's plan runs); a lone 1x1 Convolution on a Split's
top, backward, its data gradient added into the Split's sum (Conv1x1SplitSumChain).

Why: Kaiming He's ResNet prototxts follow every convolution with BatchNorm, Scale and (mostly) ReLU,
all three in place on the convolution's top. Run one by one, they make about nine passes through
memory forward and eight backward over each of those blobs; on ResNet-50's training iteration at
batch 8 on 2 cores that was ~450 ms of ~2 s, bandwidth-bound, not faster with more threads. Run as one
compiled kernel per channel (``compiled.batch_norm_scale_relu`` and its backward), each channel is
read from memory once and stays in cache for the other passes.

Unlike the TEST-phase fusion (kernels/fusion.py), a fused forward here leaves every layer the state
its own backward reads, as if the layers had run one by one: the BatchNorm keeps ``x − mean`` and
``1/std`` and updates its running statistics, and the Scale borrows those buffers instead of a copy
of its input (``BatchNorm.lend_normalized``, as when the layers run one by one). So the separate
layers' backward may follow a fused forward (a partial ``backward(start=, end=)``, a hook), and the
fused backward may follow the separate layers' forward: it runs whenever the Scale holds the
BatchNorm's buffers of the blob's current forward.

Blobs and params end as the separate layers leave them: the top with the same bits but for the
mean's and variance's sums (float64 here, ``einsum``'s float32 order there: float32 rounding);
the gradients with the same bits as the layers' own compiled kernels given the same forward.

Chosen when the net is built (``plan``): a BatchNorm with batch statistics, then a Scale over its
channels (axis 1, a learned scale, with or without a bias) and optionally a ReLU with no negative
slope, all three in place on one blob, with no loss weight. Run fused only when the range asked
for covers the whole chain, no pycaffe hook is set, the arrays are C-contiguous NumPy arrays and
the compiled kernels are on (``compiled.runs_on``); otherwise the layers run one by one.
``MINICAFFE_FUSION=0`` switches it off, with the TEST-phase fusion.

A ResNet block's Eltwise SUM + ReLU in place on the sum runs forward as the TEST phase's
``fusion.EltwiseReluChain`` (the sum written into the top's own array and rectified there, a chunk
at a time; the layers allocate a new top each forward and pass over it twice): neither layer's
backward reads anything but the top and its diff, which it leaves as they do. Its backward
(``EltwiseSumReluChain``) is the ReLU's gradient and the sum's in one compiled pass: the layers
one by one read the top's diff twice, write it once and write each bottom's gradient.
"""
import numpy as np

from ..core import threads
from ..proto import caffe_pb2
from . import compiled, fusion, stacked_1x1

# EltwiseSumReluChain's backward runs fused (False: the layers one by one, as before; read at each
# backward, so benchmarks/bench_engine_ab.py can compare both in one process)
SUM_RELU_BACKWARD = True

# ReluMaxPoolChain's backward runs fused (False: the layers one by one; read at each backward, for
# benchmarks/bench_engine_ab.py)
RELU_POOL_BACKWARD = True

# Conv1x1SplitSumChain's backward runs (False: the layer's own, whose data gradient the diff plan
# then adds into the Split's sum; read at each backward, for benchmarks/bench_engine_ab.py)
SPLIT_SUM_1X1_BACKWARD = True

# layer types, by their Caffe names, that make up a chain
_BATCH_NORM, _SCALE = "BatchNorm", "Scale"


class BatchNormScaleChain:
    """Layers ``first`` (BatchNorm), ``first + 1`` (Scale) and ``last`` (ReLU, or the Scale when
    there is none), in place on one blob."""

    def __init__(self, first, last):
        self.first, self.last = first, last
        self.relu = last == first + 2

    # --- forward ---------------------------------------------------------------------------------
    def run(self, net):
        """The chain's forward as one kernel (BatchNorm.forward_fused); False (nothing done) when it
        cannot run fused."""
        bn, sc = net.layers[self.first], net.layers[self.first + 1]
        blob = net.top_vecs[self.first][0]
        if not isinstance(blob.xdata, np.ndarray):
            return False
        for li in range(self.first, self.last + 1):
            net.layers[li].reshape(net.bottom_vecs[li], net.top_vecs[li])
        x = blob.xdata
        if sc.engine is not sc or sc.dims[1] != bn.channels:
            return False
        s = sc.blobs[0].xdata.reshape(-1)
        b = sc.blobs[sc.bias_index].xdata.reshape(-1) if sc.bias_index is not None else None
        if not bn.forward_fused(x, s, b, self.relu):
            return False
        sc.after_fused_forward(bn, x)
        return True

    # --- backward --------------------------------------------------------------------------------
    def run_backward(self, net):
        """The chain's backward as one kernel (Scale.backward_fused); False (nothing done) when it
        cannot run fused: a layer does not propagate down, the Scale holds no buffers of the
        BatchNorm's current forward (it kept a copy of its input, or its scale does not learn, or
        the BatchNorm ran again alone), or the arrays do not fit."""
        need = net.bottom_need_backward
        if not all(need[li][0] for li in range(self.first, self.last + 1)):
            return False
        blob = net.top_vecs[self.first][0]
        dy, y = blob.xdiff, blob.xdata
        if not isinstance(dy, np.ndarray):
            return False
        return net.layers[self.first + 1].backward_fused(net.layers[self.first], dy, y, self.relu)


class EltwiseSumReluChain(fusion.EltwiseReluChain):
    """Eltwise SUM (layer ``first``) + ReLU in place on its top (``last``): the forward as in the
    TEST phase, and a backward that is both layers' in one pass.

    One compiled loop (``compiled.eltwise_sum_relu_backward``) over flat chunks on the kernels'
    pool: per element the ReLU's gradient ``dy · (y > 0)``, then each bottom's gradient from it as
    the Eltwise writes it (a copy, or ``· coeff``), with the layers' bits. The
    top's diff gets the rectified gradient as the ReLU leaves it, except in a solver's pass where
    that diff lives in a shared buffer (net/diff_plan.py) and nothing reads it after this layer:
    then it is not written at all. So a ResNet block's top is read twice from memory (its diff and
    its data) and each bottom's gradient written once, against the separate layers' three reads
    and two writes of the top plus the bottoms' writes. On ResNet-50 at batch 8 (2 cores) the
    blocks' ReLU and Eltwise backward took 63 ms, fused 49, and the whole backward 780 -> 754 ms
    (medians of 9, both ways in one process: benchmarks/bench_engine_ab.py --set
    train_fusion.SUM_RELU_BACKWARD=0)."""

    def run_backward(self, net):
        """The chain's backward; False (nothing done) where the layers must run one by one: a layer
        that does not propagate down to the sum, more than two bottoms to give a gradient, arrays
        the compiled kernel does not take, or the kernels off (the layers are its NumPy twin)."""
        first, last = self.first, self.last
        bneed = net.bottom_need_backward
        wanted = [i for i, w in enumerate(bneed[first]) if w]
        if not (SUM_RELU_BACKWARD and bneed[last][0] and 1 <= len(wanted) <= 2):
            return False
        eltwise = net.layers[first]
        blob, bottoms = net.top_vecs[first][0], net.bottom_vecs[first]
        dy, y = blob.xdiff, blob.xdata
        if not isinstance(dy, np.ndarray):
            return False
        grads = [eltwise.grad_buffer(bottoms[i], blob) for i in wanted]
        if not compiled.runs_on(dy, y, *grads):
            return False
        keep_dy = net.check_finite or not net.diff_is_transient(blob)
        flat = [a.reshape(-1) for a in (dy, y, *grads)]
        fdy, fy, g0 = flat[:3]
        g1 = flat[3] if len(grads) == 2 else g0
        c0 = eltwise.coeffs[wanted[0]]
        c1 = eltwise.coeffs[wanted[1]] if len(grads) == 2 else 1.0
        kernel = compiled.get(compiled.eltwise_sum_relu_backward)
        threads.parallel_flat(fdy.size, lambda a, b: kernel(fdy, fy, g0, c0, g1, c1, len(grads) == 2,
                                                            keep_dy, a, b),
                              work=fdy.size * (2 + len(grads)))
        for i, g in zip(wanted, grads):
            bottoms[i].xdiff = g
        return True


class ReluMaxPoolChain:
    """A plain ReLU in place on a blob (layer ``first``) whose one reader is a MAX Pooling (``last``,
    the next layer): the backward of both as the pool's argmax scatter, adding each output's
    gradient only where the ReLU's output is positive (``Pooling.backward_through_relu``), and no
    pass of the ReLU's own. Backward only: the forwards are the layers' (the ReLU's is
    already in its Convolution's epilogue, ``_conv_relu_chain``).

    Why: the ReLU's backward reads the blob's diff and data and writes the diff, three passes over
    the largest blobs of the nets whose first layers are Convolution, ReLU, MAX Pooling (CaffeNet's
    conv1, 32x96x55x55; GoogLeNet's conv1, 16x64x112x112, 7.6 ms of its backward alone; VGG-16's
    conv1_2); the scatter touches the blob's diff anyway. Same values as the layers one by one,
    but for the sign of a zero: the ReLU multiplies a negative sum by 0 and leaves -0.0."""

    def __init__(self, first, last):
        self.first, self.last = first, last

    def run_backward(self, net):
        """Both layers' backward; False (nothing done) where they must run one by one: a layer
        that does not propagate down, a pool engine other than the argmax scatter, arrays it does
        not take."""
        need = net.bottom_need_backward
        if not (RELU_POOL_BACKWARD and need[self.first][0] and need[self.last][0]):
            return False
        last = self.last
        return net.layers[last].backward_through_relu(net.top_vecs[last], net.bottom_vecs[last])


class Conv1x1SplitSumChain:
    """A 1x1 stride-1 Convolution reading one top of a Split, in a solver's pass
    (net/diff_plan.py): its backward adds its data gradient straight into the Split's sum
    (``Network.bottom_gradient_target``), an image's GEMM at a time with BLAS adding (beta = 1),
    instead of writing the split top's own diff for the plan to add in afterwards, a pass that reads
    both and writes the sum. ResNet's identity blocks: every branch2a. As a stacked 1x1 group's head
    does (kernels/stacked_1x1.py), for a layer with no siblings to stack. Backward only, one layer.

    Measured alone (2 cores, 8 images, the weight and data gradients and the add, ms; written then
    added / added by the GEMM): 256 -> 64 on 56x56 9.4 / 7.5, 512 -> 128 on 28x28 7.1 / 6.3,
    1024 -> 256 on 14x14 6.8 / 6.2, 2048 -> 512 on 7x7 8.7 / 8.1."""

    def __init__(self, li):
        self.first = self.last = li

    def run_backward(self, net):
        """The layer's backward into the Split's sum; False (nothing done) where it runs its own: it
        needs no backward or gives its bottom none, the switch is off, the net checks finiteness (it
        would read the split top's diff, not written), the engine at this shape cannot add, or the
        pass shares no diffs."""
        li = self.first
        layer = net.layers[li]
        if not (SPLIT_SUM_1X1_BACKWARD and net.layer_need_backward[li] and net.bottom_need_backward[li][0]
                and not net.check_finite and layer.adds_data_gradient()):
            return False
        target = net.bottom_gradient_target(li)
        if target is None:
            return False
        dx, add = target
        layer.backward_into(net.top_vecs[li], net.bottom_vecs[li], dx, add)
        return True


class TrainFusion:
    """The chains of one net, by first layer index (forward) and, for those with a fused backward,
    by last (backward); ``backward_only``: entries that have a backward of their own but join
    another chain's forward (stacked_1x1's members: the forward chain is the member and its ReLU,
    the backward the member alone, after the ReLU's own)."""

    def __init__(self, chains, backward_only=(), groups=()):
        self.chains = {ch.first: ch for ch in chains}
        self.by_last = {ch.last: ch for ch in list(chains) + list(backward_only) if hasattr(ch, "run_backward")}
        self.groups = list(groups)

    def __len__(self):
        return len(self.chains)

    def chain_at(self, li, end):
        """The chain starting at layer ``li`` when a forward up to ``end`` covers it (a chain with
        ``for_range`` says what it runs over that range)."""
        ch = self.chains.get(li)
        if ch is not None and hasattr(ch, "for_range"):
            ch = ch.for_range(end)
        return ch if ch is not None and ch.last <= end else None

    def backward_chain_at(self, li, end):
        """The chain ending at layer ``li`` when a backward down to ``end`` covers it."""
        ch = self.by_last.get(li)
        if ch is not None and hasattr(ch, "for_range"):
            ch = ch.for_range(end)
        return ch if ch is not None and ch.first >= end else None

    def late_diff_reads(self, net):
        """(blob, layer index): blobs whose diff a backward reads at a lower layer index than its
        own layers do, as a stacked group's head reads its tails' top diffs (net/diff_plan.py keeps
        those diffs live down to there)."""
        return [(net.top_vecs[m][0], g.head) for g in self.groups for m in g.members[1:]]


def _chain(net, li):
    bn = net.layers[li]
    if bn.type != _BATCH_NORM or bn.use_global_stats or li + 1 >= len(net.layers):
        return None
    blob = net.top_vecs[li][0]
    if not fusion._in_place_on(net, li, blob):
        return None
    sc = net.layers[li + 1]
    if sc.type != _SCALE or not fusion._in_place_on(net, li + 1, blob) or len(sc.blobs) < 1:
        return None
    p = sc.param.scale_param
    ndim = len(blob.shape)
    if ndim < 2 or (p.axis + ndim if p.axis < 0 else p.axis) != 1 or p.num_axes != 1 \
            or sc.blobs[0].count != bn.channels:
        return None
    last = li + 1
    if li + 2 < len(net.layers) and fusion._plain_relu(net.layers[li + 2]) \
            and fusion._in_place_on(net, li + 2, blob):
        last = li + 2
    if not fusion._no_loss(net, li, last):
        return None
    return BatchNormScaleChain(li, last)


def _conv_relu_chain(net, li):
    """A Convolution and a plain ReLU in place on its top, no loss on either: the TEST phase's
    ``fusion.ConvChain`` with nothing to fold, forward only. The ReLU is applied in the pass that
    adds the bias, image by image while the image is in cache, instead of as a pass of its own over
    the whole top; neither layer's backward reads anything the separate forwards would have left
    otherwise (the convolution reads its bottom, the ReLU its top), and the top has the same bits
    (``fusion.image_epilogue``'s kernels are the separate passes' twins)."""
    if not fusion._plain_conv(net, li) or li + 1 >= len(net.layers):
        return None
    blob = net.top_vecs[li][0]
    if not (fusion._plain_relu(net.layers[li + 1]) and fusion._in_place_on(net, li + 1, blob)
            and fusion._no_loss(net, li, li + 1)):
        return None
    return fusion.ConvChain(li, li + 1, None, None, li + 1)


def _eltwise_sum_relu_chain(net, li):
    """The TEST phase's Eltwise SUM + ReLU chain, with the backward of EltwiseSumReluChain."""
    ch = fusion._eltwise_chain(net, li)
    return None if ch is None else EltwiseSumReluChain(ch.first, ch.last)


def _relu_max_pool_chain(net, li):
    """A plain ReLU in place on its blob, no loss, and next the blob's one reader, a MAX Pooling
    (not global) with one top and nothing writing the blob after it: ReluMaxPoolChain."""
    if li + 1 >= len(net.layers) or not fusion._plain_relu(net.layers[li]):
        return None
    blob = net.top_vecs[li][0]
    pool = net.layers[li + 1]
    if not (fusion._in_place_on(net, li, blob) and pool.type == "Pooling"
            and pool.method == caffe_pb2.PoolingParameter.MAX and not pool.whole
            and len(net.bottom_vecs[li + 1]) == 1 and net.bottom_vecs[li + 1][0] is blob
            and len(net.top_vecs[li + 1]) == 1 and fusion._no_loss(net, li, li + 1)
            and not fusion._written_after(net, li + 1, blob)):
        return None
    if any(blob is b for bottoms in net.bottom_vecs[li + 2:] for b in bottoms):
        return None
    return ReluMaxPoolChain(li, li + 1)


def _split_sum_1x1_chain(net, li, split_tops):
    """A Convolution with one bottom, a top of a Split (its id in ``split_tops``), and a 1x1
    stride-1 kernel without padding in one group: Conv1x1SplitSumChain (whether its engine can add
    is asked at each backward)."""
    if not fusion._plain_conv(net, li) or id(net.bottom_vecs[li][0]) not in split_tops:
        return None
    conv = net.layers[li]
    g = conv.geom
    if conv.num_spatial != 2 or (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, conv.group) != (1, 1, 1, 1, 0, 0, 1, 1, 1):
        return None
    return Conv1x1SplitSumChain(li)


def plan(net):
    """The TrainFusion of a built net (any phase: a BatchNorm with batch statistics, an Eltwise SUM +
    ReLU and a Convolution + ReLU are what it fuses; stacked 1x1 groups in TRAIN nets only), or
    None when there is nothing to fuse or fusion is switched off."""
    if not fusion.enabled():
        return None
    # sibling 1x1 convolutions on one Split, stacked (kernels/stacked_1x1.py): each member's forward
    # chain (with its ReLU) and backward entry
    groups = stacked_1x1.plan(net, _conv_relu_chain)
    stacked, backward_only = {}, []
    for g in groups:
        fwd, bwd = g.chains()
        stacked.update((ch.first, ch) for ch in fwd)
        backward_only += bwd
    # an Eltwise SUM + ReLU in place on its top keeps no state for its backward (the sum's gradient
    # reads the top's diff, the ReLU's the top): the TEST-phase chain's forward, and one backward
    # a Convolution + ReLU: the ReLU in the convolution's epilogue, forward only (_conv_relu_chain)
    chains = fusion.scan_chains(net, lambda li: stacked.get(li) or _chain(net, li) or _conv_relu_chain(net, li)
                                or _eltwise_sum_relu_chain(net, li))
    # a ReLU whose gradient the next layer's MAX pooling scatter applies (ReluMaxPoolChain), where
    # the ReLU is not the end of another chain's backward (a BatchNorm + Scale + ReLU's)
    ends = {ch.last for ch in list(chains) + backward_only if hasattr(ch, "run_backward")}
    for li in range(len(net.layers)):
        ch = _relu_max_pool_chain(net, li) if li not in ends else None
        if ch is not None:
            backward_only.append(ch)
    # a 1x1 convolution on a Split's top (no stacked group's member): its data gradient added into
    # the Split's sum (Conv1x1SplitSumChain)
    ends = {ch.last for ch in list(chains) + backward_only if hasattr(ch, "run_backward")}
    split_tops = {id(t) for li, layer in enumerate(net.layers) if getattr(layer, "is_split", False)
                  for t in net.top_vecs[li]}
    for li in range(len(net.layers)):
        ch = _split_sum_1x1_chain(net, li, split_tops) if li not in ends else None
        if ch is not None:
            backward_only.append(ch)
    return TrainFusion(chains, backward_only, groups) if chains or backward_only else None
