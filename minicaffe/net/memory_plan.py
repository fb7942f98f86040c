"""Blob memory shared between blobs of a forward-only net whose lifetimes do not overlap.

A TEST net without backward needs a blob's values only from the layer that writes it to the last
layer that reads it; after that its memory can hold a later blob. This is what OpenCV's dnn module
does, and it is most of the difference in inference memory (a CaffeNet or VGG keeps every
activation of a forward pass otherwise, although at most a few are needed at once).

``plan(net, keep)`` works it out from the net's layer order alone (nothing is allocated, so tests
can check it on any net):

* blobs that are views of one another form one *group*: an in-place layer's top is its bottom (the
  same Blob), and a layer with ``tops_view_bottom`` (Split, Flatten, Reshape) makes its tops views
  of its bottom, so they must live in the same memory for as long as any of them is used;
* a group is live from the first layer that writes or reads one of its blobs to the last one
  (over the whole of a fused chain that uses it: kernels/fusion.py runs a chain's layers as one);
* groups that must outlive the forward pass are *pinned* to memory of their own: the net's inputs
  (the user fills them before ``forward``) and the tops of layers without bottoms, the net's
  outputs, and the blobs the caller names in ``keep``;
* the other groups, largest first, each go into the first buffer none of whose groups is live at
  the same time (a register allocator's greedy colouring of the interval graph); a buffer is as
  large as its first, largest group.

``share(net, keep)`` applies a plan: it allocates the buffers and moves every blob's data into one
(core/blob.py's ``SharedBuffer``). A blob whose buffer a later blob has overwritten raises a NetError
naming it when its ``data`` is read after ``forward``, instead of giving another blob's values.

Workspaces (the im2col column matrix and the other ``context.Slot`` scratch buffers) are not
blobs and are not planned here: while a net with an applied plan runs forward (``Net``), its
thread's host scratch comes from one arena cut anew for each layer (core/context.py's
``Workspaces.layer_frames``), so the scratch held is the most one layer uses, not the sum of every
slot's largest; LRN takes its padded buffers from there too (layers/lrn.py). The first forward of each applied plan also hands the memory it freed back to the
OS (``context.trim_heap``; ``MemoryPlan.trimmed``).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..core.blob import SharedBuffer
from ..errors import NetError
from ..proto import caffe_pb2

KEEP_HINT = ("pass keep=['{name}'] to Net.share_blob_memory (or build the Net without share_memory) "
             "to read it after forward")


class Group:
    """Blobs that are one array (in place or views); ``first..last``: the layers that use them."""

    __slots__ = ("blobs", "first", "last", "count", "pinned", "buffer")

    def __init__(self):
        self.blobs, self.first, self.last, self.count, self.pinned, self.buffer = [], None, None, 0, False, None

    def overlaps(self, other):
        return self.first <= other.last and other.first <= self.last

    @property
    def names(self):
        return [b.name for b in self.blobs]


class MemoryPlan:
    """Which buffer each blob group uses: ``groups`` (all of them), ``buffers`` (one list of groups
    per shared buffer, largest first), ``keep`` (the names asked for). Byte counts for reports and
    tests: ``private_bytes`` (every blob its own memory), ``planned_bytes`` (what the plan holds)."""

    def __init__(self, groups, buffers, keep, itemsize, layers=()):
        self.groups, self.buffers, self.keep, self.itemsize = groups, buffers, tuple(keep), itemsize
        self.layers = list(layers)
        self.shared = None      # the SharedBuffers once applied, parallel to the groups' buffers
        self.trimmed = False    # whether a forward since it was applied gave freed memory back (Net)

    @property
    def private_bytes(self):
        return sum(g.count for g in self.groups) * self.itemsize

    @property
    def planned_bytes(self):
        return (sum(max(g.count for g in members) for members in self.buffers)
                + sum(g.count for g in self.groups if g.pinned)) * self.itemsize

    def stale(self):
        """True when a blob no longer uses its planned buffer (a reshape gave it private storage)
        or its shape no longer fits."""
        if self.shared is None:
            return True
        for g in self.groups:
            for b in g.blobs:
                if b.buffer is not g.buffer or b.count > g.buffer.array.size:
                    return True
        return False

    def apply(self):
        """Allocate the buffers and move every blob's data into its own (values dropped, except
        those of pinned blobs: the user may have filled an input before the plan was made)."""
        dtype = None
        for g in self.groups:
            dtype = g.blobs[0].dtype
            break
        for members in self.buffers:
            size = max(g.count for g in members)
            buf = SharedBuffer(size, dtype, members[0].blobs[0].name, KEEP_HINT)
            for g in members:
                g.buffer = buf
        for g in self.groups:
            if g.pinned:
                g.buffer = SharedBuffer(g.count, dtype, g.blobs[0].name, KEEP_HINT)
            for b in g.blobs:
                b.use_buffer(g.buffer, group=g, keep_values=g.pinned)
        self.shared = [members[0].buffer for members in self.buffers]
        for layer in self.layers:
            layer.forward_only = True       # no backward runs: layers may keep less (core/layer.py)
        return self

    def release(self):
        """Give every blob private storage again (values kept: nothing is overwritten any more)."""
        for g in self.groups:
            for b in g.blobs:
                if b.buffer is g.buffer:
                    try:
                        values = b.host_data.copy()
                    except NetError:
                        values = None
                    b.use_buffer(None)
                    if values is not None:
                        b.xdata = values
        for layer in self.layers:
            layer.forward_only = False
        self.shared = None


def can_share(net) -> bool:
    """Whether ``net`` runs forward only (TEST phase, no force_backward), so sharing is allowed."""
    return net.phase == caffe_pb2.TEST and not getattr(net.param, "force_backward", False)


def check_shareable(net):
    """NetError unless ``net`` runs forward only: sharing drops values a backward pass would read."""
    if net.phase != caffe_pb2.TEST:
        raise NetError(f"net '{net.name}': blob memory can only be shared in a TEST net (backward needs "
                       f"every blob's values)")
    if getattr(net.param, "force_backward", False):
        raise NetError(f"net '{net.name}': blob memory cannot be shared with force_backward: true "
                       f"(backward needs every blob's values)")


def plan(net, keep: Iterable[str] = ()) -> MemoryPlan:
    """The MemoryPlan of ``net`` (see the module docstring); nothing is allocated."""
    keep = list(keep or ())
    for name in keep:
        if name not in net.blobs:
            raise NetError(f"keep: no blob named '{name}' in net '{net.name}'")
    layers, bottoms, tops = net.layers, net.bottom_vecs, net.top_vecs
    # union-find over blobs (by identity) for views
    parent = {}

    def find(b):
        k = id(b)
        parent.setdefault(k, (k, b))
        while parent[k][0] != k:
            k = parent[k][0]
        return k

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = (rb, parent[ra][1])

    blobs = {}
    for li in range(len(layers)):
        for b in list(bottoms[li]) + list(tops[li]):
            blobs.setdefault(id(b), b)
            find(b)
        if getattr(layers[li], "tops_view_bottom", False) and bottoms[li]:
            for t in tops[li]:
                if t.count == bottoms[li][0].count:
                    union(t, bottoms[li][0])
    for b in net.blobs.values():
        blobs.setdefault(id(b), b)
        find(b)
    groups = {}
    for k, b in blobs.items():
        g = groups.setdefault(find(b), Group())
        g.blobs.append(b)
        g.count = max(g.count, b.count)
    written = set()
    for li in range(len(layers)):
        for b in list(bottoms[li]) + list(tops[li]):
            g = groups[find(b)]
            g.first = li if g.first is None else g.first
            g.last = li
        for t in tops[li]:
            written.add(id(t))
            if not bottoms[li]:
                groups[find(t)].pinned = True      # an input or generated data: filled outside the plan
    # a fused chain (kernels/fusion.py) runs its layers as one: every blob it reads or writes is live
    # over the whole chain (a ConvSumChain writes the Eltwise's top while it still reads the
    # convolution's bottom)
    fused = getattr(net, "_fusion", None)
    for ch in (fused.chains.values() if fused is not None else ()):
        for li in range(ch.first, ch.last + 1):
            for b in list(bottoms[li]) + list(tops[li]):
                g = groups[find(b)]
                g.first, g.last = min(g.first, ch.first), max(g.last, ch.last)
    held = set(net.inputs) | set(net.outputs) | set(keep)
    for k, b in blobs.items():
        g = groups[find(b)]
        if b.name in held or id(b) not in written or g.first is None:
            g.pinned = True
    ordered = [g for g in groups.values()]
    shareable = sorted((g for g in ordered if not g.pinned), key=lambda g: (-g.count, g.first))
    buffers = []
    for g in shareable:
        for members in buffers:
            if not any(g.overlaps(o) for o in members):
                members.append(g)
                break
        else:
            buffers.append([g])
    itemsize = np.dtype(next(iter(blobs.values())).dtype).itemsize if blobs else 4
    return MemoryPlan(ordered, buffers, keep, itemsize, layers)


def share(net, keep: Iterable[str] = ()) -> MemoryPlan:
    """Plan and apply blob memory sharing on a forward-only ``net``; returns the applied plan."""
    check_shareable(net)
    return plan(net, keep).apply()
