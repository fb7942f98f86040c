"""Caffe's parameter update rules (``src/caffe/solvers/*.cpp``), written once for NumPy and CuPy.

Every function works in place on arrays of the current array module (``blob.xdiff``/``blob.xdata``)
and never copies to the host, except ``global_l2_norm``, which returns one float (Caffe logs it).
The gradient array ``g`` goes in and comes out holding the *update value*; the solver then applies
``w -= g``, as Caffe's ``Net::Update``. Scratch arrays are passed in so a step allocates nothing.

Scalars are kept as Python floats rounded to float32, so float32 arrays stay float32 (NumPy's and
CuPy's "weak" Python scalars) and the arithmetic matches Caffe's ``Dtype`` arithmetic.

The order of operations and roundings is Caffe's CPU code, step for step. Where Caffe calls
``caffe_axpy``/``caffe_cpu_axpby`` (BLAS ``saxpy``, after ``sscal`` for axpby), the product and sum are
rounded once, as OpenBLAS's FMA kernels do on every x86-64 CPU since 2013: ``fused_axpy`` reproduces
that. Rounding the product first instead differs from Caffe in the last bit of ~2% of the elements each
step, which the adaptive rules (AdaGrad, RMSProp) and near-zero regularised weights then amplify.
"""
import math

import numpy as np

from ..core import backend, threads
from ..core.numeric import f32
from ..errors import SolverError
from ..kernels import compiled, cuda_updates


def _on_gpu(g):
    """A device array: the rule runs as one fused kernel (``minicaffe.kernels.cuda_updates``)."""
    return not isinstance(g, np.ndarray)


def fused_axpy(a, x, y):
    """``y = a·x + y`` with one rounding, in place (a fused multiply-add, as Caffe's BLAS ``saxpy``).

    The product of two float32 values is exact in float64, so the float64 sum rounded to float32 is the
    FMA's result (the sum's own float64 rounding can only matter at an exact float32 tie, about 2^-29 of
    the time). ``a``: a float32-valued Python float.
    """
    xp = backend.get_array_module(y)
    if xp is not np or y.size <= _BLOCK or not (x.flags.c_contiguous and y.flags.c_contiguous):
        wide = x.astype(xp.float64)
        wide *= a
        wide += y
        y[...] = wide
        return
    # on the CPU, in cache-sized blocks through one float64 buffer: no full-size temporary
    xs, ys = x.reshape(-1), y.reshape(-1)
    buf = np.empty(_BLOCK, np.float64)
    for start in range(0, ys.size, _BLOCK):
        xb, yb = xs[start:start + _BLOCK], ys[start:start + _BLOCK]
        wide = buf[:yb.size]
        np.multiply(xb, a, out=wide, dtype=np.float64)
        np.add(wide, yb, out=wide)
        np.copyto(yb, wide, casting="same_kind")


_BLOCK = 1 << 15      # float64 elements: a 256 KiB buffer that stays in cache


# --- gradient preparation (SGDSolver::Normalize, Regularize, ClipGradients) ----------------------

def normalize(g, iter_size):
    """Average gradients accumulated over ``iter_size`` forward/backward passes."""
    if iter_size != 1:
        g *= f32(1.0 / iter_size)


def regularize(w, g, local_decay, regularization_type, scratch):
    """Add the weight-decay gradient: L2 ``decay·w``, L1 ``decay·sign(w)`` (Caffe's ``caffe_axpy``:
    fused, so L2's product is not rounded on its own; L1's ``±decay`` is exact either way)."""
    if not local_decay:
        return
    xp = backend.get_array_module(g)
    if regularization_type == "L2":
        fused_axpy(local_decay, w, g)
        return
    if regularization_type == "L1":
        xp.sign(w, out=scratch)
        scratch *= local_decay
    else:
        raise SolverError(f"unknown regularization_type '{regularization_type}' (use L2 or L1)")
    g += scratch


def global_l2_norm(diffs):
    """The L2 norm of all arrays together, as one host float (one device sync)."""
    if not diffs:
        return 0.0
    xp = backend.get_array_module(diffs[0])
    total = None
    for g in diffs:
        flat = g.ravel()
        part = xp.dot(flat, flat)
        total = part if total is None else total + part
    return math.sqrt(float(total))


def clip_gradients(diffs, clip):
    """Scale every gradient by ``clip / norm`` when the global norm exceeds ``clip`` (``clip < 0``: off).

    Returns ``(norm, scale)`` when clipping happened, else None.
    """
    if clip < 0:
        return None
    norm = f32(global_l2_norm(diffs))
    if norm > clip:
        scale = f32(clip / norm)
        for g in diffs:
            g *= scale
        return norm, scale
    return None


# --- one parameter's whole step (CPU) --------------------------------------------------------------

# parameter_step runs its passes on blocks of this many elements (each thread on its chunk's blocks
# in turn): a rule's 4-8 passes then read and write arrays that are still in cache, where whole-array
# passes went to memory every time. Measured (benchmarks/bench_threads.py's SGD step with L2 decay
# on VGG-16 fc6's 103M weights, 2 cores): 243 -> 196 ms on two threads, 381 -> 286 ms on one; 64K
# and larger blocks were slower (213-249 ms), smaller ones pay more Python calls per element.
UPDATE_BLOCK = 1 << 15

def parameter_step(rule, w, g, hist, scratch, iter_size, local_decay, regularization_type, local_rate, it,
                   clear_diff=False):
    """``SGDSolver::ApplyUpdate``'s body for one parameter: normalise, regularise, compute the update
    value into ``g`` (``rule``), ``w -= g``. ``scratch``: regularisation's temporary, then the rule's.
    With ``clear_diff``, where the compiled one-pass step runs, ``g`` is left zero instead of
    holding the update value (the next iteration's ClearParamDiffs, done in the same pass); returns
    whether it was.

    Every step is element by element, so on NumPy arrays (all C-contiguous) it runs on the thread pool
    in flat chunks, each chunk the very same operations on its slices: bit-identical at any thread
    count. Elsewhere (CuPy arrays the fused kernel did not take, strided arrays) it runs whole."""
    def body(w, g, hist, scratch):
        normalize(g, iter_size)
        if local_decay:
            regularize(w, g, local_decay, regularization_type, scratch[0])
        rule.compute(g, hist, scratch[1:], local_rate, it)
        w -= g

    flat = threads.flat_views(w, g, *hist, *scratch)
    if flat is None:
        body(w, g, hist, scratch)
        return False
    kernel = _compiled_kernel(rule, regularization_type if local_decay else None, g.dtype)
    if kernel is not None:
        normalize_ = iter_size != 1
        scale = f32(1.0 / iter_size) if normalize_ else 1.0
        fw, fg, fh = flat[0], flat[1], flat[2]
        clear = bool(clear_diff)
        threads.parallel_flat(g.size, lambda a, b: kernel(fw, fg, fh, a, b, normalize_, scale,
                                                          float(local_decay), float(local_rate),
                                                          float(rule.momentum), clear),
                              work=g.size * 3)
        return clear
    k = len(hist)

    def chunk(a, b):
        for s in range(a, b, UPDATE_BLOCK):
            part = [f[s:min(b, s + UPDATE_BLOCK)] for f in flat]
            body(part[0], part[1], part[2:2 + k], part[2 + k:])
    threads.parallel_flat(g.size, chunk, work=g.size * len(flat))
    return False


_COMPILED_RULES = {"SGD": compiled.sgd_step, "Nesterov": compiled.nesterov_step}


def _compiled_kernel(rule, regularization, dtype):
    """The compiled one-pass step (kernels/compiled.py) for this rule, or None: SGD and Nesterov
    (every BVLC model's solver) with L2 or no decay, float32 or float64, when the compiled kernels
    are enabled. Why: the NumPy body is 8-13 passes over each parameter; VGG-16's SGD step on 2
    cores took 330 ms of a 2.5 s iteration, fc6's alone 232-288 ms against 79 ms compiled (same
    bits)."""
    fn = _COMPILED_RULES.get(rule.type)
    if fn is None or regularization not in (None, "L2") or dtype not in (np.float32, np.float64) \
            or not compiled.enabled():
        return None
    return compiled.get(fn)


# --- one launch for every parameter (GPU) --------------------------------------------------------

def fused_step(rule, params, diffs, history, lr_mults, decay_mults, rate, it, param):
    """The whole per-parameter loop of ``SGDSolver::ApplyUpdate`` after clipping (normalise,
    regularise, compute the update, ``w -= update``) as one kernel launch per float type, on the GPU
    (``cuda_updates.multi_step``). Same arithmetic as the loop, element for element, so a run gives
    the same bits either way (and an exact resume stays exact).

    ``history``: the solver's history blobs (set k of parameter i at ``k·len(params) + i``);
    ``param``: the SolverParameter. Returns False, having done nothing, where the loop must run: on
    the CPU, with an unknown regularization_type (the loop names it), or arrays the kernel cannot
    take (not contiguous, history of another float type).
    """
    if not diffs or not all(_on_gpu(g) for g in diffs):
        return False
    weight_decay = f32(param.weight_decay)
    decays = [f32(weight_decay * f32(m)) for m in decay_mults]
    if any(decays) and param.regularization_type not in ("L1", "L2"):
        return False
    n = len(params)
    groups = {}
    for i, blob in enumerate(params):
        g = diffs[i]
        if g.size == 0:
            continue
        row = (blob.xdata, g) + tuple(history[k * n + i].xdata for k in range(rule.history_sets))
        if any(a.dtype != g.dtype or not a.flags.c_contiguous for a in row):
            return False
        groups.setdefault(g.dtype, []).append((row, f32(lr_mults[i]), decays[i]))
    correction = None
    if rule.type == "Adam":
        step = it + 1
        correction = f32(math.sqrt(1.0 - math.pow(rule.momentum2, step)) / (1.0 - math.pow(rule.momentum, step)))
    plans = rule._multi_step_plans
    for dtype, members in groups.items():
        rows, lrs, decs = zip(*members)
        plan = plans.setdefault(dtype, cuda_updates.MultiStepPlan())
        cuda_updates.multi_step(rule, plan, list(rows), lrs, decs, rate, correction,
                                f32(1.0 / param.iter_size) if param.iter_size != 1 else None,
                                param.regularization_type == "L1")
    return True


# --- the update rules (ComputeUpdateValue) -----------------------------------------------------

class UpdateRule:
    """One solver type's ComputeUpdateValue. ``history_sets``: history blobs per parameter (Caffe keeps
    set k of parameter i at ``history[k * num_params + i]``); ``scratch``: temporaries per parameter."""

    type = None
    history_sets = 1
    scratch = 1

    def __init__(self, param):
        self.momentum = f32(param.momentum)
        self.momentum2 = f32(param.momentum2)
        self.delta = f32(param.delta)
        self.rms_decay = f32(param.rms_decay)
        self._multi_step_plans = {}     # dtype -> cuda_updates.MultiStepPlan (fused_step's tables)
        self.check(param)

    def check(self, param):
        """Caffe's constructor sanity checks for this solver type."""

    def compute(self, g, hist, tmp, local_rate, it):
        """Turn the gradient ``g`` into the update value in place; ``hist``/``tmp``: this parameter's
        history and scratch arrays; ``it``: the iteration (before its increment)."""
        raise NotImplementedError


class SGD(UpdateRule):
    """``v = momentum·v + lr·g``; the update is ``v`` (``momentum·v`` rounded, then a fused ``+ lr·g``)."""

    type = "SGD"
    scratch = 0

    def compute(self, g, hist, tmp, local_rate, it):
        if _on_gpu(g):
            return cuda_updates.sgd(self, g, hist, local_rate)
        xp = backend.get_array_module(g)
        h = hist[0]
        h *= self.momentum
        fused_axpy(local_rate, g, h)
        xp.copyto(g, h)


class Nesterov(UpdateRule):
    """``v' = momentum·v + lr·g``; the update is ``(1+momentum)·v' − momentum·v``."""

    type = "Nesterov"

    def compute(self, g, hist, tmp, local_rate, it):
        if _on_gpu(g):
            return cuda_updates.nesterov(self, g, hist, local_rate)
        xp = backend.get_array_module(g)
        h, old = hist[0], tmp[0]
        m = self.momentum
        xp.copyto(old, h)
        h *= m
        fused_axpy(local_rate, g, h)
        old *= -m
        fused_axpy(f32(1.0 + m), h, old)
        xp.copyto(g, old)


class AdaGrad(UpdateRule):
    """``h += g²``; the update is ``lr·g / (√h + delta)``."""

    type = "AdaGrad"

    def check(self, param):
        if param.momentum != 0:
            raise SolverError("momentum cannot be used with AdaGrad (set momentum: 0)")

    def compute(self, g, hist, tmp, local_rate, it):
        if _on_gpu(g):
            return cuda_updates.adagrad(self, g, hist, local_rate)
        xp = backend.get_array_module(g)
        h, t = hist[0], tmp[0]
        xp.multiply(g, g, out=t)
        h += t
        xp.sqrt(h, out=t)
        t += self.delta
        xp.divide(g, t, out=g)
        g *= local_rate


class RMSProp(UpdateRule):
    """``h = rms_decay·h + (1−rms_decay)·g²``; the update is ``lr·g / (√h + delta)``."""

    type = "RMSProp"

    def check(self, param):
        if param.momentum != 0:
            raise SolverError("momentum cannot be used with RMSProp (set momentum: 0)")
        if not 0 <= param.rms_decay < 1:
            raise SolverError(f"rms_decay should lie between 0 and 1 (got {param.rms_decay:g})")

    def compute(self, g, hist, tmp, local_rate, it):
        if _on_gpu(g):
            return cuda_updates.rmsprop(self, g, hist, local_rate)
        xp = backend.get_array_module(g)
        h, t = hist[0], tmp[0]
        xp.multiply(g, g, out=t)
        h *= self.rms_decay
        fused_axpy(f32(1.0 - self.rms_decay), t, h)
        xp.sqrt(h, out=t)
        t += self.delta
        xp.divide(g, t, out=g)
        g *= local_rate


class AdaDelta(UpdateRule):
    """Zeiler's AdaDelta as Caffe has it: ``h1 = m·h1 + (1−m)·g²``,
    ``u = g·√((h2 + delta)/(h1 + delta))``, ``h2 = m·h2 + (1−m)·u²``; the update is ``lr·u``
    (Caffe multiplies by the solver's learning rate too, so base_lr: 1 gives the paper's rule)."""

    type = "AdaDelta"
    history_sets = 2
    scratch = 2

    def compute(self, g, hist, tmp, local_rate, it):
        if _on_gpu(g):
            return cuda_updates.adadelta(self, g, hist, local_rate)
        xp = backend.get_array_module(g)
        h1, h2 = hist
        u, t = tmp
        m, one_m = self.momentum, f32(1.0 - self.momentum)
        xp.multiply(g, g, out=u)
        h1 *= m
        fused_axpy(one_m, u, h1)
        xp.add(h2, self.delta, out=u)
        xp.add(h1, self.delta, out=t)
        xp.divide(u, t, out=u)
        xp.sqrt(u, out=u)
        g *= u
        xp.multiply(g, g, out=u)
        h2 *= m
        fused_axpy(one_m, u, h2)
        g *= local_rate


class Adam(UpdateRule):
    """Kingma & Ba's Adam as Caffe has it: ``m = β1·m + (1−β1)·g``, ``v = β2·v + (1−β2)·g²``; the update
    is ``lr·√(1−β2^t)/(1−β1^t) · m / (√v + delta)`` with ``t = iter + 1``."""

    type = "Adam"
    history_sets = 2

    def compute(self, g, hist, tmp, local_rate, it):
        xp = backend.get_array_module(g)
        m, v = hist
        t = tmp[0]
        b1, b2 = self.momentum, self.momentum2
        step = it + 1
        correction = f32(math.sqrt(1.0 - math.pow(b2, step)) / (1.0 - math.pow(b1, step)))
        if _on_gpu(g):
            return cuda_updates.adam(self, g, hist, f32(local_rate * correction))
        m *= b1
        fused_axpy(f32(1.0 - b1), g, m)
        xp.multiply(g, g, out=t)
        v *= b2
        fused_axpy(f32(1.0 - b2), t, v)
        xp.sqrt(v, out=t)
        t += self.delta
        xp.divide(m, t, out=g)
        g *= f32(local_rate * correction)

