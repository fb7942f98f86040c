"""Layers that move data without arithmetic on it: Split, Concat, Slice, Flatten, Reshape, Silence,
Crop, Tile, Reduction (ArgMax, which ranks scores, is with Accuracy in metrics.py).

Split, Flatten and Reshape share the bottom's array with the top (as Caffe's ShareData does): no
copy, and the top sees later in-place writes to the bottom. Layers that produce new values write
into the top's own buffer so storage is reused between iterations.

On NumPy arrays the big copies (Concat, Slice and Crop both ways) and Split's sum of diffs run on
the kernels' thread pool (``core/threads.py``): each chunk copies or adds its own part with the same
operations, so results are the same bits at any thread count.
"""
import numpy as np

from ..errors import ShapeError
from ..proto import caffe_pb2
from ..core import threads
from ..core.layer import Layer, register
from ..core.numeric import element_count


def canonical_axis(layer, axis, num_axes, what="axis"):
    """Caffe's CanonicalAxisIndex: -1 is the last axis; anything outside [-n, n) is an error."""
    axis = int(axis)
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"{what} {axis} is out of range for a {num_axes}-D blob "
                          f"(valid: {-num_axes} to {num_axes - 1})")
    return axis + num_axes if axis < 0 else axis


def _no_in_place(layer, bottom, top):
    for t in top:
        if any(t is b for b in bottom):
            raise layer.error("does not allow in-place computation (top and bottom are the same blob)")


def _overlap(xp, a, b):
    """Whether two arrays may share memory (then a gradient cannot be written over the other)."""
    return bool(xp.may_share_memory(a, b))


def _as3(a, axis):
    """A C-contiguous ``a`` viewed as (outer, width, inner) around ``axis`` (a view: writes reach ``a``)."""
    s = a.shape
    return a.reshape(element_count(s[:axis]), s[axis], element_count(s[axis + 1:]))


def parallel_copy(dst, src):
    """``dst[...] = src`` (arrays of one shape, views of bigger ones allowed) on the thread pool for
    NumPy arrays of at least ``threads.MIN_FLAT_ELEMENTS``: split over the first axis, or over the
    second when there are fewer images than threads (FCN's one-image crops). Exact: the same bits."""
    if not (isinstance(dst, np.ndarray) and isinstance(src, np.ndarray)) or dst.ndim == 0 or \
            dst.size < threads.MIN_FLAT_ELEMENTS:
        dst[...] = src
        return
    axis = 0 if dst.ndim == 1 or dst.shape[0] >= threads.size() else 1
    lead = (slice(None),) * axis
    threads.parallel_for(dst.shape[axis], lambda i0, i1: np.copyto(
        dst[lead + (slice(i0, i1),)], src[lead + (slice(i0, i1),)]), work=2 * dst.size)


def copy_parts(dst, axis, parts):
    """Copies between ``dst`` and the pieces of it along ``axis``: ``parts`` is a list of
    ``(start, array, into_dst)``: ``dst[..., start:start + n, ...] = array`` when ``into_dst``, else
    ``array[...] = dst[..., start:start + n, ...]``. Returns False (nothing done) unless every array is
    a C-contiguous NumPy array; the caller then copies as before (CuPy arrays: one kernel each).

    Why split this way: Concat's forward and backward, and Slice's, copy every element of big maps
    (GoogLeNet's inception concats, each forward and backward). With several images (``outer``, the
    axes before ``axis``) a chunk copies all pieces of its images; with fewer images than threads,
    each piece is split along ``axis`` instead. A copy is exact, so any split gives the same bits."""
    arrays = [dst] + [a for _, a, _ in parts]
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
        return False
    d3 = _as3(dst, axis)
    pieces = []
    for start, a, into_dst in parts:
        a3 = _as3(a, axis)
        d = d3[:, start:start + a3.shape[1]]
        pieces.append((d, a3) if into_dst else (a3, d))
    outer = d3.shape[0]
    total = sum(a.size for _, a, _ in parts)
    if total < threads.MIN_FLAT_ELEMENTS:     # a copy in cache is faster than handing it to a thread
        for to, frm in pieces:
            np.copyto(to, frm)
        return True
    work = 2 * total
    if outer >= threads.size():
        def by_images(o0, o1):
            for to, frm in pieces:
                np.copyto(to[o0:o1], frm[o0:o1])
        threads.parallel_for(outer, by_images, work=work)
    else:
        for to, frm in pieces:
            threads.parallel_for(to.shape[1], lambda c0, c1, to=to, frm=frm:
                                 np.copyto(to[:, c0:c1], frm[:, c0:c1]), work=2 * to.size)
    return True


@register("Split")
class Split(Layer):
    """One bottom shown as several tops (the net inserts it where a blob feeds several layers).

    Tops share the bottom's data; backward sums the tops' diffs into the bottom's diff."""

    exact_num_bottom = 1
    min_num_top = 1
    is_split = True
    tops_view_bottom = True

    def reshape(self, bottom, top):
        _no_in_place(self, bottom, top)
        for t in top:
            t.reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].xdata
        for t in top:
            t.xdata = x

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diffs = [t.xdiff for t in top]
        out = bottom[0].xdiff
        if any(_overlap(self.xp, out, d) for d in diffs):
            grad = diffs[0].copy()
            for d in diffs[1:]:
                grad += d
            bottom[0].xdiff = grad
            return
        # summed straight into the bottom's own diff: no new array per iteration
        self.sum_into(out, diffs)

    def sum_into(self, out, diffs):
        """``out = diffs[0] + diffs[1] + ...`` (``out`` may be ``diffs[0]``: an addition in place), on
        the thread pool in flat chunks (each element's sum in the same order: the same bits at any
        thread count). Also how a solver's backward adds each top's gradient as it arrives
        (net/diff_plan.py)."""
        flat = threads.flat_views(out, *diffs)
        if flat is None:
            self._sum_into(out, diffs)
            return
        threads.parallel_flat(out.size, lambda a, b: self._sum_into(
            flat[0][a:b], [f[a:b] for f in flat[1:]]), work=out.size * (1 + len(diffs)))

    def _sum_into(self, out, diffs):
        """``out = diffs[0] + diffs[1] + ...``, added left to right."""
        if len(diffs) == 1:
            self.xp.copyto(out, diffs[0])
        else:
            self.xp.add(diffs[0], diffs[1], out=out)
        for d in diffs[2:]:
            out += d


@register("Concat")
class Concat(Layer):
    """Joins bottoms along ``concat_param.axis`` (or legacy ``concat_dim``); other axes must match."""

    min_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("concat_param: give either axis or concat_dim, not both")

    def _axis(self, num_axes):
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            # concat_dim is unsigned and legacy: no negative indexing
            if p.concat_dim >= num_axes:
                raise self.error(f"concat_dim {p.concat_dim} is out of range for a {num_axes}-D blob")
            return int(p.concat_dim)
        return canonical_axis(self, p.axis, num_axes)

    def reshape(self, bottom, top):
        first = bottom[0].shape
        self.axis = axis = self._axis(len(first))
        out = list(first)
        for i, b in enumerate(bottom[1:], 1):
            s = b.shape
            if len(s) != len(first) or any(s[j] != first[j] for j in range(len(s)) if j != axis):
                raise self.error(f"bottom[{i}] shape {s} does not match bottom[0] shape {first} "
                                 f"on the axes other than the concat axis {axis}", ShapeError)
            out[axis] += s[axis]
        top[0].reshape(out)

    def forward(self, bottom, top):
        if len(bottom) == 1:
            top[0].xdata = bottom[0].xdata
            return
        out = top[0].xdata
        starts = self._starts(bottom)
        if copy_parts(out, self.axis, [(s, b.xdata, True) for s, b in zip(starts, bottom)]):
            return
        lead = (slice(None),) * self.axis
        for s, b in zip(starts, bottom):
            out[lead + (slice(s, s + b.shape[self.axis]),)] = b.xdata

    def _starts(self, bottom):
        """Where each bottom starts along the concat axis of the top."""
        out, start = [], 0
        for b in bottom:
            out.append(start)
            start += b.shape[self.axis]
        return out

    def backward(self, top, propagate_down, bottom):
        dy = top[0].xdiff
        lead = (slice(None),) * self.axis
        copies = []
        for i, (start, b) in enumerate(zip(self._starts(bottom), bottom)):
            if not propagate_down[i]:
                continue
            part = dy[lead + (slice(start, start + b.shape[self.axis]),)]
            out = b.xdiff
            if _overlap(self.xp, out, dy):
                b.xdiff = self.xp.ascontiguousarray(part)
            else:
                copies.append((start, out, part))   # the bottom's own diff: no new array per iteration
        if copies and not copy_parts(dy, self.axis, [(s, out, False) for s, out, _ in copies]):
            for _, out, part in copies:
                self.xp.copyto(out, part)


@register("Slice")
class Slice(Layer):
    """Cuts the bottom along ``slice_param.axis`` (or legacy ``slice_dim``) at ``slice_point``s,
    or into equal parts when no points are given."""

    exact_num_bottom = 1
    min_num_top = 1

    def setup(self, bottom, top):
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("slice_param: give either axis or slice_dim, not both")
        self.points = [int(s) for s in p.slice_point]
        if self.points and len(self.points) != len(top) - 1:
            raise self.error(f"{len(self.points)} slice_point(s) given for {len(top)} tops: "
                             f"need exactly one fewer than the number of tops")

    def reshape(self, bottom, top):
        p = self.param.slice_param
        shape = bottom[0].shape
        if p.HasField("slice_dim"):
            if p.slice_dim >= len(shape):
                raise self.error(f"slice_dim {p.slice_dim} is out of range for a {len(shape)}-D blob")
            axis = int(p.slice_dim)
        else:
            axis = canonical_axis(self, p.axis, len(shape))
        self.axis = axis
        size = shape[axis]
        if self.points:
            bounds = [0] + self.points + [size]
            sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            if any(s <= 0 for s in sizes):
                raise self.error(f"slice points {self.points} must increase strictly and stay inside "
                                 f"(0, {size}) on axis {axis} of bottom shape {shape}", ShapeError)
        else:
            if size % len(top):
                raise self.error(f"{len(top)} tops do not evenly divide axis {axis} (size {size}) of "
                                 f"bottom shape {shape}", ShapeError)
            sizes = [size // len(top)] * len(top)
        self.sizes = sizes
        for t, s in zip(top, sizes):
            t.reshape(shape[:axis] + (s,) + shape[axis + 1:])

    def forward(self, bottom, top):
        x = bottom[0].xdata
        if len(top) == 1:
            top[0].xdata = x
            return
        # copies, not views: a layer working in place on one top must not change the bottom
        if copy_parts(x, self.axis, [(s, t.xdata, False) for s, t in zip(self._starts(), top)]):
            return
        lead = (slice(None),) * self.axis
        for t, s, n in zip(top, self._starts(), self.sizes):
            t.xdata[...] = x[lead + (slice(s, s + n),)]

    def _starts(self):
        """Where each top starts along the slice axis of the bottom."""
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            bottom[0].xdiff = top[0].xdiff.copy()
            return
        diffs = [t.xdiff for t in top]
        out = bottom[0].xdiff
        # into the bottom's own diff (no new array per iteration) unless it shares memory with a top's
        if out.shape == bottom[0].shape and not any(_overlap(self.xp, out, d) for d in diffs) and \
                copy_parts(out, self.axis, [(s, d, True) for s, d in zip(self._starts(), diffs)]):
            return
        bottom[0].xdiff = self.xp.concatenate(diffs, axis=self.axis)


@register("Flatten")
class Flatten(Layer):
    """Merges axes ``axis``..``end_axis`` into one; the top shares the bottom's data."""

    tops_view_bottom = True

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        _no_in_place(self, bottom, top)
        p = self.param.flatten_param
        shape = bottom[0].shape
        start = canonical_axis(self, p.axis, len(shape))
        end = canonical_axis(self, p.end_axis, len(shape), "end_axis")
        if end < start:
            raise self.error(f"end_axis {p.end_axis} comes before axis {p.axis} for bottom shape {shape}")
        top[0].reshape(shape[:start] + (element_count(shape[start:end + 1]),) + shape[end + 1:])

    def forward(self, bottom, top):
        top[0].xdata = bottom[0].xdata.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].xdiff = top[0].xdiff.reshape(bottom[0].shape)


@register("Reshape")
class Reshape(Layer):
    """Caffe's reshape rules: in ``reshape_param.shape`` a 0 copies the bottom's axis at that place and
    a single -1 is inferred; ``axis``/``num_axes`` select the range of bottom axes replaced."""

    tops_view_bottom = True

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        _no_in_place(self, bottom, top)
        p = self.param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.copy_axes = [i for i, d in enumerate(self.dims) if d == 0]
        inferred = [i for i, d in enumerate(self.dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"new shape {self.dims} contains more than one -1; at most one dimension "
                             f"can be inferred")
        bad = [d for d in self.dims if d < -1]
        if bad:
            raise self.error(f"new shape {self.dims} contains {bad[0]}: dimensions must be >= -1")
        self.inferred_axis = inferred[0] if inferred else None
        if p.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all, got {p.num_axes}")

    def reshape(self, bottom, top):
        p = self.param.reshape_param
        shape = bottom[0].shape
        n = len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"axis {p.axis} is out of range for a {n}-D bottom {shape}")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"axis + num_axes = {end} is out of range for a {n}-D bottom {shape}")
        new = list(shape[:start]) + list(self.dims) + list(shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"new shape {self.dims} has a 0 at position {i} but bottom {shape} "
                                 f"has no axis {start + i} to copy")
            new[start + i] = shape[start + i]
        count = element_count(shape)
        if self.inferred_axis is not None:
            known = element_count(d for j, d in enumerate(new) if j != start + self.inferred_axis)
            if known == 0 or count % known:
                raise self.error(f"bottom count {count} (shape {shape}) is not divisible by the "
                                 f"product {known} of the given dimensions {self.dims}", ShapeError)
            new[start + self.inferred_axis] = count // known
        if element_count(new) != count:
            raise self.error(f"top shape {tuple(new)} has {element_count(new)} elements but bottom shape "
                             f"{shape} has {count}", ShapeError)
        top[0].reshape(new)

    def forward(self, bottom, top):
        top[0].xdata = bottom[0].xdata.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].xdiff = top[0].xdiff.reshape(bottom[0].shape)


@register("Silence")
class Silence(Layer):
    """Swallows its bottoms (so they are not reported as net outputs); gradient zero."""

    min_num_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.xdiff = self.xp.zeros(b.shape, dtype=b.xdata.dtype)


@register("Crop")
class Crop(Layer):
    """Crops bottom[0] to the size of bottom[1] on the axes from ``crop_param.axis`` on, starting at
    ``offset`` (one for all those axes, or one per axis; default 0)."""

    exact_num_bottom = 2
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0   # bottom[1] only gives a size

    def setup(self, bottom, top):
        p = self.param.crop_param
        n = len(bottom[0].shape)
        self.start_axis = canonical_axis(self, p.axis, n)
        self.offsets = [int(o) for o in p.offset]
        if len(self.offsets) > 1 and self.start_axis + len(self.offsets) != n:
            raise self.error(f"{len(self.offsets)} offsets given but {n - self.start_axis} axes are "
                             f"cropped (axis {self.start_axis} onward of a {n}-D blob)")

    def reshape(self, bottom, top):
        big, ref = bottom[0].shape, bottom[1].shape
        if len(ref) < len(big):
            raise self.error(f"bottom[1] shape {ref} has fewer axes than bottom[0] shape {big}",
                             ShapeError)
        new, index = list(big), []
        for i in range(len(big)):
            if i < self.start_axis:
                index.append(slice(None))
                continue
            off = self.offsets[0] if len(self.offsets) == 1 else (
                self.offsets[i - self.start_axis] if self.offsets else 0)
            if off + ref[i] > big[i]:
                raise self.error(f"crop on axis {i} does not fit: size {ref[i]} at offset {off} exceeds "
                                 f"{big[i]} (bottom[0] shape {big}, bottom[1] shape {ref})",
                                 ShapeError)
            new[i] = ref[i]
            index.append(slice(off, off + ref[i]))
        self.index = tuple(index)
        top[0].reshape(new)

    def forward(self, bottom, top):
        parallel_copy(top[0].xdata, bottom[0].xdata[self.index])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        grad = self.xp.zeros(bottom[0].shape, dtype=top[0].xdiff.dtype)
        parallel_copy(grad[self.index], top[0].xdiff)
        bottom[0].xdiff = grad


@register("Tile")
class Tile(Layer):
    """Repeats the bottom ``tiles`` times along ``axis`` (each block from ``axis`` on repeated whole)."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles must be given")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.tiles = int(p.tiles)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.param.tile_param.axis, len(shape))
        out = list(shape)
        out[self.axis] *= self.tiles
        self.outer = element_count(shape[:self.axis])
        self.inner = element_count(shape[self.axis:])
        top[0].reshape(out)

    def forward(self, bottom, top):
        x = bottom[0].xdata.reshape(self.outer, 1, self.inner)
        top[0].xdata.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].xdiff.reshape(self.outer, self.tiles, self.inner)
            bottom[0].xdiff = dy.sum(axis=1)


@register("Reduction")
class Reduction(Layer):
    """SUM, ASUM (sum of |x|), SUMSQ or MEAN over all axes from ``axis`` on, times ``coeff``;
    the top keeps the axes before ``axis`` (axis 0 gives a scalar)."""

    exact_num_bottom = 1
    exact_num_top = 1
    _ops = caffe_pb2.ReductionParameter

    def setup(self, bottom, top):
        self.op = self.param.reduction_param.operation

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.param.reduction_param.axis, len(shape))
        self.num = element_count(shape[:self.axis])
        self.dim = element_count(shape[self.axis:])
        self.coeff = float(self.param.reduction_param.coeff)
        if self.op == self._ops.MEAN:
            self.coeff /= self.dim if self.dim else 1
        top[0].reshape(shape[:self.axis])

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata.reshape(self.num, self.dim)
        if self.op in (self._ops.SUM, self._ops.MEAN):
            r = x.sum(axis=1)
        elif self.op == self._ops.ASUM:
            r = xp.abs(x).sum(axis=1)
        elif self.op == self._ops.SUMSQ:
            r = (x * x).sum(axis=1)
        else:
            raise self.error(f"unknown reduction operation {self.op}")
        if self.coeff != 1.0:
            r *= self.coeff
        top[0].xdata[...] = r.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = top[0].xdiff.reshape(self.num, 1) * self.coeff
        if self.op in (self._ops.SUM, self._ops.MEAN):
            x = bottom[0].xdata
            grad = xp.broadcast_to(dy, (self.num, self.dim)).astype(x.dtype)
        elif self.op == self._ops.ASUM:
            grad = xp.sign(bottom[0].xdata.reshape(self.num, self.dim)) * dy
        else:
            grad = bottom[0].xdata.reshape(self.num, self.dim) * (2 * dy)
        bottom[0].xdiff = grad.reshape(bottom[0].shape)
