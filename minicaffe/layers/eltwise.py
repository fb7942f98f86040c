"""Eltwise: element-wise PROD, SUM (with per-bottom coefficients) or MAX of bottoms of one shape.

This file is the reference (``xp`` code, NumPy or CuPy); on a GPU, two bottoms run as one fused
kernel, an engine chosen at reshape (``kernels/cuda_elementwise.py``).
"""
import numpy as np

from ..core import threads
from ..errors import ShapeError
from ..kernels import cuda_elementwise, engines
from ..proto import caffe_pb2
from ..core.layer import Layer, register

# the modules whose import registers the engines of Eltwise (minicaffe.kernels.engines)
ENGINE_MODULES = (cuda_elementwise,)

_Op = caffe_pb2.EltwiseParameter


@register("Eltwise")
class Eltwise(Layer):
    """PROD, SUM (default; ``coeff`` per bottom) or MAX.

    MAX sends the gradient to the bottom that won, with Caffe's tie rule: between bottom 0 and
    bottom 1 a tie goes to bottom 1 (its test is ``a > b``), and a later bottom takes over only when
    strictly larger. PROD's gradient is the product of the other bottoms with ``stable_prod_grad``
    (default), else top / bottom as Caffe's fast path (wrong where a bottom is 0)."""

    min_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.eltwise_param
        self.op = p.operation
        if self.op not in (_Op.PROD, _Op.SUM, _Op.MAX):
            raise self.error(f"unknown eltwise operation {self.op}")
        if len(p.coeff) not in (0, len(bottom)):
            raise self.error(f"eltwise_param gives {len(p.coeff)} coeff(s) for {len(bottom)} bottoms: "
                             f"give one per bottom or none")
        if self.op == _Op.PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only for operation SUM, not PROD")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self.num_bottoms = len(bottom)
        self.mask = None          # MAX: the index of the winning bottom per element, for backward
        self.saved0 = None        # PROD in place: bottom[0]'s values before the top replaced them
        self.engine_slot = engines.EngineSlot(reference=lambda layer: layer)   # its own methods: the reference
        self.engine = None

    def reshape(self, bottom, top):
        first = bottom[0].shape
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != first:
                raise self.error(f"bottom[{i}] shape {b.shape} differs from bottom[0] shape {first}",
                                 ShapeError)
        top[0].reshape(first)
        self.engine = self.engine_slot.get(self, tuple(first))

    def forward(self, bottom, top):
        """Engines implement ``forward(xs) -> (out, mask)``: a NEW array (so in place, where top is
        bottom[0], the bottoms stay intact while it is computed) and MAX's winner mask (else None).
        The backward is the reference's."""
        xs = [b.xdata for b in bottom]
        # in place, bottom[0]'s values are replaced by the output: PROD's gradient still needs them
        # (the old array survives because the top gets a new array below)
        self.saved0 = xs[0] if top[0] is bottom[0] and self.op == _Op.PROD else None
        self.engine = self.engine_slot.get(self, tuple(xs[0].shape))   # the same, unless the mode changed
        out, self.mask = self.engine.forward_arrays(xs)
        top[0].xdata = out

    def forward_arrays(self, xs):
        """The reference: (the result, as a new array; MAX's winner mask or None)."""
        xp = self.xp
        out = xp.empty(xs[0].shape, xs[0].dtype)
        mask = xp.empty(xs[0].shape, xp.int32) if self.op == _Op.MAX else None
        flat = threads.flat_views(*xs)
        if flat is None:
            self.forward_into(xp, xs, out, mask)
            return out, mask
        # NumPy: the same operations on flat chunks, over the thread pool (bit-identical)
        outs = threads.flat_views(out) + ([] if mask is None else threads.flat_views(mask))
        threads.parallel_flat(out.size, lambda a, b: self.forward_into(
            np, [f[a:b] for f in flat], *(o[a:b] for o in outs)), work=out.size * (len(xs) + len(outs)))
        return out, mask

    def forward_into(self, xp, xs, out, mask=None):
        """The arithmetic of the forward, element for element, into ``out`` (and MAX's ``mask``);
        also the sum of the fused Eltwise SUM + ReLU (kernels/fusion.py)."""
        if self.op == _Op.PROD:
            xp.multiply(xs[0], xs[1], out=out)
            for x in xs[2:]:
                out *= x
        elif self.op == _Op.SUM:
            if self.coeffs[0] != 1.0:
                xp.multiply(xs[0], self.coeffs[0], out=out)
            else:
                xp.copyto(out, xs[0])
            for c, x in zip(self.coeffs[1:], xs[1:]):
                if c == 1.0:
                    out += x
                else:
                    out += c * x
        else:
            take_a = xs[0] > xs[1]
            out[...] = xp.where(take_a, xs[0], xs[1])
            mask[...] = xp.where(take_a, 0, 1)
            for k, x in enumerate(xs[2:], 2):
                better = x > out
                xp.copyto(out, x, where=better)
                mask[better] = k

    def _grad_into(self, i, xs, y, dy, mask, g):
        """The reference gradient of bottom ``i`` (backward's arithmetic) into ``g``."""
        if self.op == _Op.PROD:
            if self.stable_prod_grad:
                others = [xs[j] for j in range(len(xs)) if j != i]
                np.multiply(others[0], dy, out=g)
                for o in others[1:]:
                    g *= o
            else:
                np.divide(y, xs[i], out=g)
                g *= dy
        elif self.op == _Op.SUM:
            if self.coeffs[i] != 1.0:
                np.multiply(dy, self.coeffs[i], out=g)
            else:
                np.copyto(g, dy)
        else:
            g[...] = 0
            np.copyto(g, dy, where=mask == i)

    @staticmethod
    def grad_buffer(blob, top):
        """Where bottom ``blob``'s gradient is written: its own diff when that is a separate
        C-contiguous array of its own (a solver pass gives it a shared buffer: net/diff_plan.py),
        else a new array (in place, the bottom's diff is the top's, which every gradient reads)."""
        d = blob.xdiff
        dy = top.xdiff
        if d.flags.c_contiguous and d.shape == dy.shape and not np.may_share_memory(d, dy):
            return d
        return np.empty_like(dy)

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        wanted = [i for i in range(len(bottom)) if propagate_down[i]]
        xs = [b.xdata for b in bottom]
        if self.saved0 is not None:
            xs[0] = self.saved0
        flat = threads.flat_views(top[0].xdiff, top[0].xdata, *xs,
                                  *([] if self.mask is None else [self.mask]))
        if flat is not None and wanted:
            # NumPy: every wanted gradient in one pass over flat chunks on the thread pool
            dy, y, fx = flat[0], flat[1], flat[2:2 + len(xs)]
            fmask = flat[-1] if self.mask is not None else None
            grads = {i: self.grad_buffer(bottom[i], top[0]) for i in wanted}
            fg = {i: g.reshape(-1) for i, g in grads.items()}

            def part(a, b):
                xa = [x[a:b] for x in fx]
                for i in wanted:
                    self._grad_into(i, xa, y[a:b], dy[a:b], None if fmask is None else fmask[a:b], fg[i][a:b])
            threads.parallel_flat(dy.size, part, work=dy.size * (2 + len(wanted)))
            for i, g in grads.items():
                bottom[i].xdiff = g
            return
        dy = top[0].xdiff
        y = top[0].xdata
        grads = {}
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == _Op.PROD:
                xs = [b.xdata for b in bottom]
                if self.saved0 is not None:
                    xs[0] = self.saved0
                if self.stable_prod_grad:
                    others = [xs[j] for j in range(len(bottom)) if j != i]
                    g = others[0] * dy
                    for o in others[1:]:
                        g *= o
                else:
                    g = y / xs[i] * dy
            elif self.op == _Op.SUM:
                g = dy * self.coeffs[i] if self.coeffs[i] != 1.0 else dy.copy()
            else:
                g = xp.where(self.mask == i, dy, xp.zeros((), dtype=dy.dtype))
            grads[i] = g
        # assign after all are computed: in place, bottom[0]'s diff is the top's diff
        for i, g in grads.items():
            bottom[i].xdiff = g
