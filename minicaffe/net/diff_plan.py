"""A solver's backward pass keeps activation gradients only while they are needed, in shared buffers.

Why: Caffe keeps every blob's diff for the whole net (pycaffe users read them after ``backward()``),
and so do minicaffe's nets. A solver step reads none of them afterwards: a blob's gradient is
written by the backward of the layer that consumes it and read by the backward of the layer that
made it, and is dead after that. On ResNet-50's training net at batch 8 the diffs were 845 MB of its
2.6 GB; PyTorch's autograd frees each gradient once it is used. So in a solver's pass
(``Net.backward_from_to(share_diffs=True)``) gradients whose index ranges of layers do not meet
share buffers, and the peak holds only what is live at one time.

Where one blob feeds several layers, the net has a Split whose tops each get a gradient that the
Split sums at the end; all of them live together until then (four inception branches: four copies).
Here each top's gradient is added into the Split's bottom right after the backward of the last layer
that writes it (its lowest-index user), so it is live over its own users only. The top whose
gradient arrives first is not copied in: its diff is the bottom's buffer (``aliased``), so its
users write the sum's first term in place (ResNet-50 at batch 8, 2 cores: the backward 783 -> 763
ms, bench_engine_ab.py --set diff_plan.ALIAS_FIRST_TOP=0). The sum then runs in
backward order (t_k + ... + t_0 against Caffe's t_0 + ... + t_k: the same value for two tops,
possibly the last bit apart for three or more).

A blob takes part when every read of its diff in the pass follows a write: its first user in
backward order (the highest-index layer taking it as a bottom) is not an in-place layer on it and
propagates down to it, it carries no loss weight (a loss top is seeded at its own layer), and no
Flatten/Reshape makes another blob's diff a view of it. The rest keep their own diffs, as do net
inputs and every parameter. After a shared pass, activation and split-top diffs hold whatever their
buffer held last; ``release`` gives them private storage back before a pass that keeps them
(pycaffe's ``Net.backward``).
"""
from collections import defaultdict

from ..core import backend

# a Split's first-arriving top shares its bottom's buffer (False: every top has its own, and the first
# one is copied into the bottom; read when a net makes its plan, so benchmarks/bench_engine_ab.py can
# compare both in one process)
ALIAS_FIRST_TOP = True


class DiffPlan:
    """For one net: which blobs' diffs share which buffer (``slot_of``; ``span_of``: the layer-index
    range each is live over), and the Splits whose tops' gradients are summed as they arrive
    (``splits``: split index -> (the Split, its bottom); ``after[li]``: after layer ``li``'s
    backward, the (split index, top) to add; ``aliased``: split index -> the top whose gradient
    arrives first, written into the bottom's own buffer)."""

    def __init__(self, net):
        n = len(net.layers)
        bottoms, tops = net._bottom, net._top
        need, bneed = net._layer_need_backward, net._bottom_need_backward
        as_bottom, as_top, blob_of = defaultdict(list), defaultdict(list), {}
        viewed = set()          # blobs a Flatten/Reshape ties to another blob's diff
        for li in range(n):
            layer = net.layers[li]
            for j, b in enumerate(bottoms[li]):
                as_bottom[id(b)].append((li, j))
                blob_of[id(b)] = b
            for k, t in enumerate(tops[li]):
                as_top[id(t)].append((li, k))
                blob_of[id(t)] = t
            if getattr(layer, "tops_view_bottom", False) and not getattr(layer, "is_split", False):
                viewed.update(id(b) for b in bottoms[li] + tops[li])
        weighted = {id(t) for li in range(n) for t, w in zip(tops[li], net._loss_weights[li]) if w}

        # Splits summed as their tops' gradients arrive
        self.splits, self.after = {}, {}
        first_top = {}              # split index -> the top whose gradient reaches the bottom first
        span = {}                   # blob id -> [first layer, last layer] its diff is live over
        for s in range(n):
            if not getattr(net.layers[s], "is_split", False) or any(net._loss_weights[s]):
                continue
            uses = []
            for t in tops[s]:
                users = [li for li, _ in as_bottom[id(t)]]
                if not users or id(t) in viewed:
                    break
                uses.append((min(users), max(users), t))
            else:
                b = bottoms[s][0]
                self.splits[s] = (net.layers[s], b)
                arriving = []
                for first, last, t in uses:
                    j = next(j for j, x in enumerate(bottoms[first]) if x is t)
                    if bneed[first][j]:     # else its last writer gives it no gradient: adds nothing
                        self.after.setdefault(first, []).append((s, t))
                        arriving.append((first, t))
                    span[id(t)] = [first, last]
                # the bottom is written from the first top's gradient on
                span[id(b)] = [s, max(last for _, last, _ in uses)]
                if arriving:
                    # the top whose gradient arrives first: the highest user index, and of tops
                    # arriving at one layer the first in after_layer's order
                    top_first = max(f for f, _ in arriving)
                    first_top[s] = next(t for f, t in arriving if f == top_first)

        # every other blob whose diff is written before it is read
        split_tops = {id(t) for s in self.splits for t in tops[s]}
        for key, b in blob_of.items():
            if key in split_tops:
                continue
            if not as_top[key] or key in weighted or key in viewed:
                span.pop(key, None)         # a planned Split's bottom keeps its own diff then
                continue
            made = {li for li, _ in as_top[key]}
            users = as_bottom[key]
            lo = min(made | {li for li, _ in users})
            if key in span:                 # a planned Split's bottom: from its producer on
                span[key][0] = lo
                continue
            if not users:
                continue
            first_writer, j = max(users)
            if first_writer in made or not (need[first_writer] and bneed[first_writer][j]):
                continue
            span[key] = [lo, first_writer]
        # a diff that a fused backward reads below its own layers (kernels/train_fusion.py's
        # late_diff_reads: a stacked 1x1 group's head reads its tails' top diffs) stays live to there
        fusion = getattr(net, "_train_fusion", None)
        for b, li in (fusion.late_diff_reads(net) if fusion is not None else ()):
            if id(b) in span:
                span[id(b)][0] = min(span[id(b)][0], li)
        # a Split's first-arriving top writes its gradient straight into the bottom's buffer (where
        # the bottom has one): its span lies inside the bottom's, the bottom's diff is read only
        # below the Split and the other tops are added in after it, so the copy that began the sum
        # is not needed (8x256x56x56 at ResNet-50's stage 2: a read and a write of 25.7 MB a block)
        self.aliased = {s: t for s, t in first_top.items()
                        if ALIAS_FIRST_TOP and id(self.splits[s][1]) in span}
        alias_of = {id(t): self.splits[s][1] for s, t in self.aliased.items()}
        self.span_of = {blob_of[k]: tuple(v) for k, v in span.items()}
        self.slot_of = _slots([(lo, hi, b) for b, (lo, hi) in self.span_of.items() if id(b) not in alias_of])
        for key, bottom in alias_of.items():
            self.slot_of[blob_of[key]] = self.slot_of[bottom]
        self.buffers = {}           # (slot, dtype) -> flat array
        self._count = {}
        self._alias_views = {}
        self._withheld = set()      # (layer, top) whose gradient this pass does not add (withhold)
        self.in_use = False         # the planned diffs are views of ``buffers`` (since ``begin``)

    def begin(self):
        """Before a backward pass: every planned blob's diff becomes a view of its slot's buffer."""
        xp = backend.xp()
        need = {}
        for b, slot in self.slot_of.items():
            key = (slot, b.dtype)
            need[key] = max(need.get(key, 0), b.count)
        for key, size in need.items():
            buf = self.buffers.get(key)
            if buf is None or buf.size < size or backend.get_array_module(buf) is not xp:
                self.buffers[key] = xp.empty(size, dtype=key[1])
        for b, slot in self.slot_of.items():
            b.xdiff = self.buffers[(slot, b.dtype)][:b.count].reshape(b.shape)
        # the aliased tops' diff arrays as handed out: a layer that gives its bottom a new diff
        # array instead of writing into this one (some device paths do) gets its gradient copied
        self._alias_views = {s: t.xdiff for s, t in self.aliased.items()}
        self._count = dict.fromkeys(self.splits, 0)
        self._withheld = set()
        self.in_use = True

    def summed_after(self, li, top):
        """Whether split top ``top``'s gradient is added into its Split's bottom after layer ``li``."""
        return any(t is top for _, t in self.after.get(li, ()))

    def withhold(self, li, top):
        """Layer ``li`` gives split top ``top`` (``summed_after`` it) no gradient this pass: another
        layer's backward gave the sum (Net.withhold_bottom_gradient); ``after_layer`` adds nothing
        for it."""
        self._withheld.add((li, id(top)))

    def take_target(self, li, top):
        """Where layer ``li`` may add split top ``top``'s gradient straight into the sum (its
        Split's bottom's diff), as a stacked 1x1 group's head does (kernels/stacked_1x1.py): (that
        array, False when it is the first gradient to arrive there (to be written, not added)), and
        the gradient counts as arrived (``after_layer`` adds nothing for it); None where ``top`` is
        not summed after ``li`` or its diff is the bottom's buffer already (``aliased``)."""
        for s, t in self.after.get(li, ()):
            if t is top:
                if self.aliased.get(s) is t:
                    return None
                first = self._count[s] == 0
                self._count[s] += 1
                self._withheld.add((li, id(t)))
                return self.splits[s][1].xdiff, not first
        return None

    def after_layer(self, li):
        """After layer ``li``'s backward (it ran: it needs one): add the gradients it gave split
        tops into their Splits' bottoms (the first one copied, or already there when that top's
        diff is the bottom's buffer: ``aliased``; the rest added)."""
        for s, t in self.after.get(li, ()):
            if (li, id(t)) in self._withheld:
                continue            # no gradient of its own: counts as no arrival
            split, bottom = self.splits[s]
            out = bottom.xdiff
            first = self._count[s] == 0
            self._count[s] += 1
            if first and self.aliased.get(s) is t and t.xdiff is self._alias_views[s]:
                continue            # written into the bottom's buffer already
            split.sum_into(out, [t.xdiff] if first else [out, t.xdiff])

    def split_backward(self, s):
        """The Split at ``s`` in place of its own backward: its bottom already holds the sum; with no
        gradient from any top it is zero (as the sum of untouched zero diffs was)."""
        if self._count[s] == 0:
            self.splits[s][1].xdiff.fill(0)

    def release(self):
        """Give the planned blobs private diffs again (zeros, made on first use), before a backward
        pass that keeps every diff; nothing when the last pass kept them already."""
        if self.in_use:
            for b in self.slot_of:
                b.private_diff()
            self.in_use = False


def _slots(spans):
    """Buffer numbers for diffs live over layer-index ranges [lo, hi]. Backward runs from the highest
    index down, so ranges are taken by descending ``hi``; a buffer is free for a new range once the
    range holding it ended above it (its ``lo`` > the new ``hi``). Among free buffers the one whose
    largest blob is closest in size is taken, so big and small gradients do not pile into one."""
    slot_of, free_at, size = {}, [], []
    for lo, hi, b in sorted(spans, key=lambda r: -r[1]):
        free = [k for k, busy in enumerate(free_at) if busy > hi]
        if free:
            k = min(free, key=lambda k: abs(size[k] - b.count))
            free_at[k] = lo
            size[k] = max(size[k], b.count)
        else:
            k = len(free_at)
            free_at.append(lo)
            size.append(b.count)
        slot_of[b] = k
    return slot_of

