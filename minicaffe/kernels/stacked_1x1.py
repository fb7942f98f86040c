"""Sibling 1x1 convolutions that read one blob, run as one stacked GEMM in nets that learn.

Why: a GoogLeNet inception module starts with three 1x1 convolutions on the module's input (the
1x1 branch and the 3x3 and 5x5 branches' reductions), each a thin GEMM of its own: 16 outputs for
inception_3a's 5x5_reduce. Their forward reads the input three times; their backward runs three
weight-gradient GEMMs over it, three data-gradient GEMMs (inner dimension 64, 96, 16) and the
Split's sum of their three gradients. Their weights stacked into one matrix (176 rows for 3a),
each image takes one GEMM forward, and backward one weight-gradient GEMM and one data-gradient
GEMM whose result is already the sum, with the image's input and stacked gradient in cache.
GoogLeNet's TRAIN net at batch 16 on 2 cores, one process, with / without
(benchmarks/bench_engine_ab.py --set stacked_1x1.STACKED=0): forward 451 / 463 ms, backward
670 / 726; against ``caffe time``, modules 3a-4e's three layers 0.84x Caffe's (1.01x one by one).

How it fits a net whose layers still run one by one (``plan`` finds the groups; the net runs them
as train-fusion chains, kernels/train_fusion.py):

* forward: the group's first member (the lowest layer index, the *head*) computes every member's
  top when the forward's range reaches the last member and its ReLU (``Group.reach``): an image's
  stacked GEMM into a scratch matrix, then each member's rows copied into its top with its bias
  and, where an in-place ReLU follows the member, rectified (the Convolution + ReLU chain's
  epilogue). The other members (the *tails*) then do nothing when their turn comes. A layer
  between them cannot write a tail's top (a layer reading a top comes after the layer making it)
  nor its bottom: the net refuses an in-place layer on a split top, and ``plan`` leaves out a
  Split whose top a Reshape or Flatten views (an in-place layer on the view would write the
  Split's data). So that is what their own forward would have written, to the GEMM's rounding.
* backward, in a solver's pass (the one ``Solver.step`` and ``minicaffe time`` run: the Split
  adds its tops' gradients into its bottom as they arrive, net/diff_plan.py), runs from the last
  layer down: each tail, at its turn, takes its bias gradient and leaves the rest to the head
  (``defer``), its split top marked as giving the Split nothing (``Net.withhold_bottom_gradient``).
  The head then runs the stacked weight and data gradients for itself and the tails that deferred
  to it, and adds the data gradient, the sum of theirs, straight into the Split's sum
  (``Net.bottom_gradient_target``; written, where it is the first to arrive). The tails' top diffs
  must still be there at the head's turn: the diff plan keeps them live down to the head
  (``TrainFusion.late_diff_reads``). Other backward passes (pycaffe's ``Net.backward``, which keeps
  every split top's own diff) run the members one by one.

What pycaffe sees: tops and, in a solver's pass, parameter gradients and the Split's sum as the
layers one by one give them, to the GEMMs' rounding (the stacked GEMM is blocked otherwise).

Members: Convolutions with a 1x1 kernel, stride 1, no padding, one group, that take one top of the
same Split each, no loss weight, one dtype, on maps of ``MIN_COLUMNS`` positions when the net is
built. Run stacked only when every member's engine is the direct 1x1 GEMM at this shape, a map
still has ``MIN_COLUMNS`` positions, the arrays are C-contiguous
NumPy arrays, the net shares no blob memory, no pycaffe hook is set (the net then runs no chains)
and the net does not check finiteness (it would read the withheld diffs); otherwise each member
runs as before. ``STACKED`` (read at each forward and backward) switches it off, so that
benchmarks/bench_engine_ab.py can compare both ways in one process.
"""
import numpy as np

from ..core import blas, context
from ..proto import caffe_pb2
from . import compiled, fusion
from .conv_engines import WGRAD_BY_IMAGE_PARTS
from .im2col import workspace

# run groups stacked (False: each member as before)
STACKED = True
# the fewest output positions an image for which a group runs stacked: the weight gradient runs an
# image a GEMM, as Gemm1x1Conv._weight_grad_by_image does from WGRAD_BY_IMAGE_MIN_COLUMNS on
MIN_COLUMNS = 196

_OUT = context.Slot("stacked_1x1.out")       # an image's stacked output (per thread)
_DY = context.Slot("stacked_1x1.dy")         # an image's stacked top gradient (per thread)
_W = context.Slot("stacked_1x1.w")           # the stacked weights
_PARTS = context.Slot("stacked_1x1.parts")   # the weight gradient's partial sums


class Group:
    """Member layer indices ``members`` (ascending: ``members[0]`` is the head) and, per member,
    its own Convolution + ReLU chain or None (``own``: what it runs when the group does not, from
    train_fusion's plan), whence the index of the in-place ReLU after it or None (``relus``)."""

    def __init__(self, members, own):
        self.members, self.own = list(members), list(own)
        self.relus = [None if ch is None else ch.last for ch in self.own]
        self.head = self.members[0]
        # the forward's last layer (a tail's ReLU, or the tail): a stacked forward must reach it
        self.reach = max(r if r is not None else m for m, r in zip(self.members, self.relus))
        self.pending = set()        # tails whose top the head's forward computed this pass
        self.deferred = set()       # tails whose gradients the head's backward is to compute

    def chains(self):
        """The forward chains (one a member: the head's computes the group) and the backward
        entries (one a member)."""
        fwd = [HeadChain(self) if k == 0 else TailChain(self, k) for k in range(len(self.members))]
        bwd = [MemberBackward(self, k) for k in range(len(self.members))]
        return fwd, bwd

    # --- when a group runs stacked -----------------------------------------------------------------
    def _arrays_fit(self, net, ks, diffs):
        """The members ``ks``'s engines, map size and arrays allow the stacked path (the bottoms
        one array, the tops' data, or diffs when ``diffs``, C-contiguous NumPy arrays of one dtype)."""
        if not STACKED or net.check_finite or net.memory_plan is not None:
            return False
        x = net.bottom_vecs[self.head][0].xdata
        if type(x) is not np.ndarray or not x.flags.c_contiguous or x.dtype not in (np.float32, np.float64):
            return False
        for k in ks:
            li = self.members[k]
            layer = net.layers[li]
            if layer.engine_name != "gemm_1x1" or layer.conv.columns < MIN_COLUMNS:
                return False
            if net.bottom_vecs[li][0].xdata is not x or layer.blobs[0].xdata.dtype != x.dtype:
                return False
            top = net.top_vecs[li][0]
            arr = top.xdiff if diffs else top.xdata
            if type(arr) is not np.ndarray or not arr.flags.c_contiguous or arr.dtype != x.dtype:
                return False
        return True

    def _weights(self, net, ks):
        """The members ``ks``'s weights as one (rows, channels) matrix, made at each call (the
        solver changes them between passes; a few hundred KB)."""
        layers = [net.layers[self.members[k]] for k in ks]
        rows = sum(layer.num_output for layer in layers)
        cin = layers[0].channels
        w = workspace(np, (rows, cin), layers[0].blobs[0].xdata.dtype, _W)
        o = 0
        for layer in layers:
            w[o:o + layer.num_output] = layer.blobs[0].xdata.reshape(layer.num_output, cin)
            o += layer.num_output
        return w

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, net):
        """Every member's top (its ReLU applied where it has one), from one GEMM an image; False
        (nothing computed) where the group cannot run stacked."""
        for m, r in zip(self.members, self.relus):
            for li in (m,) if r is None else (m, r):
                net.layers[li].reshape(net.bottom_vecs[li], net.top_vecs[li])
        ks = range(len(self.members))
        if not self._arrays_fit(net, ks, diffs=False):
            return False
        head = net.layers[self.head]
        x = net.bottom_vecs[self.head][0].xdata
        num, cin, cols = head.num, head.channels, head.conv.columns
        x3 = x.reshape(num, cin, cols)
        w = self._weights(net, ks)
        parts, o = [], 0
        for k in ks:
            layer = net.layers[self.members[k]]
            c = layer.num_output
            bias = layer.blobs[1].xdata.reshape(c) if layer.bias_term else None
            top = net.top_vecs[self.members[k]][0].xdata.reshape(num, c, cols)
            parts.append((o, c, top, bias, self.relus[k] is not None))
            o += c

        def images(i0, i1):
            y = workspace(np, w.shape[:1] + (cols,), x.dtype, _OUT)      # this thread's own
            for i in range(i0, i1):
                blas.matmul(w, x3[i], out=y)
                for o, c, top, bias, relu in parts:
                    copy_rows(y[o:o + c], bias, relu, top[i])
        # the images side by side on the pool, BLAS at one thread each (core/blas.py)
        blas.parallel_gemms(num, images)
        return True

    # --- backward ------------------------------------------------------------------------------------
    def _backward_fits(self, net, k):
        """Member ``k`` may run its backward in the head's stacked one: both need backward, and
        propagate to their bottoms alike."""
        li = self.members[k]
        need = net.layer_need_backward
        bneed = net.bottom_need_backward
        return need[li] and need[self.head] and bneed[li][0] == bneed[self.head][0] \
            and self._arrays_fit(net, (0, k), diffs=True)

    def defer(self, net, k):
        """Tail ``k``'s backward: its bias gradient now, the rest left to the head; False (nothing
        done) where it must run its own."""
        li = self.members[k]
        if not self._backward_fits(net, k) or not net.withhold_bottom_gradient(li):
            return False
        layer = net.layers[li]
        if layer.bias_term and layer.need_param_grad(1):
            layer.bias_grad(layer.top_4d(net.top_vecs[li][0].xdiff))
        self.deferred.add(k)
        return True

    def backward(self, net):
        """The head's backward, stacked with the tails that deferred to it: each member's weight
        gradient from one GEMM an image, the data gradient (the sum of theirs) added into the
        Split's sum. False (nothing done) when no tail deferred: the head runs its own."""
        ks = [0] + sorted(self.deferred)
        self.deferred.clear()
        if len(ks) == 1:
            return False
        # the tails deferred after testing the head too (``_backward_fits``): it runs stacked now
        head = net.layers[self.head]
        x = net.bottom_vecs[self.head][0].xdata
        num, cin, cols = head.num, head.channels, head.conv.columns
        x3 = x.reshape(num, cin, cols)
        layers = [net.layers[self.members[k]] for k in ks]
        if head.bias_term and head.need_param_grad(1):
            head.bias_grad(head.top_4d(net.top_vecs[self.head][0].xdiff))
        dys, o = [], 0
        for k, layer in zip(ks, layers):
            dys.append((o, layer.num_output,
                        net.top_vecs[self.members[k]][0].xdiff.reshape(num, layer.num_output, cols)))
            o += layer.num_output
        w = self._weights(net, ks)
        wt = w.T
        want_dw = [layer.need_param_grad(0) for layer in layers]
        dx3, add_dx = None, False
        if net.bottom_need_backward[self.head][0]:
            # in a solver's pass, straight into the Split's sum (no pass adding it in afterwards)
            target = net.bottom_gradient_target(self.head)
            dx, add_dx = target if target is not None else (net.bottom_vecs[self.head][0].xdiff, False)
            dx3 = dx.reshape(num, cin, cols)
        n_parts = min(num, WGRAD_BY_IMAGE_PARTS)
        bounds = [num * p // n_parts for p in range(n_parts + 1)]
        partial = None
        if any(want_dw):
            partial = workspace(np, (n_parts,) + w.shape, x.dtype, _PARTS)
            partial.fill(0)

        def run(p0, p1):
            dy = workspace(np, (w.shape[0], cols), x.dtype, _DY)        # this thread's own
            for p in range(p0, p1):
                for i in range(bounds[p], bounds[p + 1]):
                    for o, c, d in dys:
                        np.copyto(dy[o:o + c], d[i])
                    if partial is not None and not blas.add_product(dy, x3[i].T, partial[p]):
                        partial[p] += dy @ x3[i].T
                    if dx3 is None:
                        continue
                    if not add_dx:
                        blas.matmul(wt, dy, out=dx3[i])
                    elif not blas.add_product(wt, dy, dx3[i]):
                        dx3[i] += wt @ dy
        # fixed groups of images side by side (BLAS at one thread each), each into its own partial
        # weight gradient, added in order after: the sums' order is set by the batch, not the threads
        blas.parallel_gemms(n_parts, run)
        if partial is not None:
            for (o, c, _), layer, want in zip(dys, layers, want_dw):
                if want:
                    dw = layer.blobs[0].xdiff.reshape(c, cin)
                    for p in range(n_parts):
                        dw += partial[p, o:o + c]
        return True


def copy_rows(y, bias, relu, out):
    """``out = y + bias`` per row (``bias`` None: a copy), then ``max(out, 0)`` when ``relu``, for
    (C, P) arrays: compiled.epilogue_copy where the kernels take the arrays (each element read and
    written once, in cache), else its NumPy twin's passes (the same bits)."""
    if compiled.runs_on(y, out) and (bias is None or (bias.dtype == y.dtype and bias.flags.c_contiguous)):
        b = bias if bias is not None else np.zeros(y.shape[0], y.dtype)
        compiled.get(compiled.epilogue_copy)(y, b, bias is not None, relu, out)
        return
    if bias is not None:
        np.add(y, bias.reshape(-1, 1), out=out)
    else:
        np.copyto(out, y)
    if relu:
        np.maximum(out, 0, out=out)


class HeadChain:
    """The head's forward chain (the head and its ReLU): the whole group's forward when the range
    reaches every member, else the head's own Convolution + ReLU chain."""

    def __init__(self, group):
        self.group = group
        self.first = group.head
        self.last = group.relus[0] if group.relus[0] is not None else group.head
        self.alone = group.own[0]

    def for_range(self, end):
        return self if self.group.reach <= end else self.alone

    def run(self, net):
        g = self.group
        g.pending.clear()
        g.deferred.clear()
        if g.forward(net):
            g.pending.update(range(1, len(g.members)))
            return True
        return self.alone is not None and self.alone.run(net)


class TailChain:
    """A tail's forward chain (the tail and its ReLU): nothing when the head computed its top this
    pass, else its own Convolution + ReLU chain."""

    def __init__(self, group, k):
        self.group, self.k = group, k
        self.first = group.members[k]
        self.last = group.relus[k] if group.relus[k] is not None else self.first
        self.alone = group.own[k]

    def run(self, net):
        if self.k in self.group.pending:
            self.group.pending.discard(self.k)
            return True
        return self.alone is not None and self.alone.run(net)


class MemberBackward:
    """A member's backward entry (the member alone; its ReLU runs its own backward before): a
    tail defers to the head, the head runs the stacked backward."""

    def __init__(self, group, k):
        self.group, self.k = group, k
        self.first = self.last = group.members[k]

    def for_range(self, end):
        """A tail defers only when the backward reaches the head."""
        return self if self.k == 0 or self.group.head >= end else None

    def run_backward(self, net):
        if self.k == 0:
            return self.group.backward(net)
        return self.group.defer(net, self.k)


def _member(net, li):
    """Whether layer ``li`` can be a member: a 1x1 Convolution, stride 1, no padding, one group,
    that takes one bottom and makes one top of its own, no loss weight on it."""
    if not fusion._plain_conv(net, li) or not fusion._no_loss(net, li, li):
        return False
    layer = net.layers[li]
    g = layer.geom
    return (layer.num_spatial == 2 and (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw) == (1, 1, 1, 1, 0, 0)
            and layer.group == 1)


def plan(net, own_chain):
    """The groups of a built TRAIN-phase net: for each Split, the members among the layers reading
    its tops, where there are two or more (one dtype) on maps of MIN_COLUMNS positions at the
    net's shape as built (a net reshaped larger later keeps its members one by one), and no layer
    reading a top is a view of it (Reshape, Flatten: ``tops_view_bottom``). TEST nets are left to
    kernels/fusion.py. ``own_chain(net, li)``: member ``li``'s own Convolution + ReLU chain, or
    None (train_fusion's, which the member runs when its group does not)."""
    if net.phase != caffe_pb2.TRAIN:
        return []
    groups = []
    reader = {}
    for li, bottoms in enumerate(net.bottom_vecs):
        for b in bottoms:
            reader.setdefault(id(b), []).append(li)
    for s, layer in enumerate(net.layers):
        if not getattr(layer, "is_split", False):
            continue
        members, viewed = [], False
        for t in net.top_vecs[s]:
            users = reader.get(id(t), [])
            if len(users) == 1 and _member(net, users[0]):
                members.append(users[0])
            viewed |= any(getattr(net.layers[u], "tops_view_bottom", False) for u in users)
        if viewed:
            continue
        members.sort()
        dtypes = {net.layers[m].blobs[0].xdata.dtype for m in members}
        # maps below MIN_COLUMNS at the shape the net was built with are not planned: the diff plan
        # would keep the tails' top diffs live for nothing (the run-time tests still apply)
        if len(members) >= 2 and len(dtypes) == 1 and net.layers[members[0]].conv.columns >= MIN_COLUMNS:
            groups.append(Group(members, [own_chain(net, m) for m in members]))
    return groups
