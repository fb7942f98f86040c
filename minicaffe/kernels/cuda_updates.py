"""The solvers' update rules on the GPU: one launch per solver step over all parameters.

Why: the array code in ``solvers/updates.py`` is 4-12 separate passes (one launch each) over every
parameter and its history per iteration, plus one for ``w -= update`` and up to four for weight
decay; GoogLeNet has 116 parameter blobs, so a step was ~700 launches. Two forms:

* One fused ``ElementwiseKernel`` per parameter (``sgd`` ... ``adam``): the rule alone, on one
  parameter's arrays. Each reads and writes every array once.
* One multi-tensor ``RawKernel`` per step and float type (``multi_step``): every parameter's
  gradient normalisation (``iter_size``), weight decay (L2 or L1, ``decay_mult`` per parameter), the
  rule (``lr_mult`` per parameter) and ``w -= update``, for all parameters at once. It takes a device
  table of pointers (weights, gradient, history per parameter) and their element offsets; each
  thread finds its parameter by binary search in the offsets. The table is uploaded only when a
  blob's device array moved (``MultiStepPlan``), so a step moves nothing to the device.

The arithmetic is the CPU code's, operation for operation, in the parameters' float type; the rule's
expression is the very text of the per-parameter kernel. Both forms are compiled with
``--fmad=false`` (``NO_CONTRACTION``): left to itself NVRTC contracts ``a*b + c`` into a fused
multiply-add wherever the surrounding code lets it, and the two kernels' surroundings differ, so on
an H200 Adam and AdaDelta came out one ulp apart between the forms. Where the per-parameter path
rounds a result to memory between two launches (the ``iter_size`` scaling, L1's ``sign(w)·decay``,
``w − update``), the multi-tensor kernel also uses the ``__fmul_rn``/``__fsub_rn`` intrinsics.
The kernel's own locals end in ``_`` where a rule's scalar could share the name (RMSProp's
``decay`` once read the weight decay there).
Weight decay is done as the per-parameter path does it on the device: L2 in double, rounded once to
the float type (``fused_axpy``), L1 as ``g + sign(w)·decay``. ``g`` comes in
as the gradient and leaves holding the update value, as there.
"""
import ctypes

import numpy as np

from . import _cuda, emulation

SGD = "minicaffe_sgd_update"
NESTEROV = "minicaffe_nesterov_update"
ADAGRAD = "minicaffe_adagrad_update"
RMSPROP = "minicaffe_rmsprop_update"
ADADELTA = "minicaffe_adadelta_update"
ADAM = "minicaffe_adam_update"

NO_CONTRACTION = ("--fmad=false",)     # the compile options of every kernel here (module docstring)

# name: (scalar inputs, in-place arrays, body)
_KERNELS = {
    SGD: ("__D__ lr, __D__ mom", "__D__ g, __D__ h",
          "h = h * mom + g * lr; g = h;"),
    NESTEROV: ("__D__ lr, __D__ mom, __D__ onep, __D__ negm", "__D__ g, __D__ h",
               "__T__ old = h; h = h * mom + g * lr; g = h * onep + old * negm;"),
    ADAGRAD: ("__D__ lr, __D__ delta", "__D__ g, __D__ h",
              "h = h + g * g; g = (g / (sqrt(h) + delta)) * lr;"),
    RMSPROP: ("__D__ lr, __D__ delta, __D__ decay, __D__ onem", "__D__ g, __D__ h",
              "h = h * decay + (g * g) * onem; g = (g / (sqrt(h) + delta)) * lr;"),
    ADADELTA: ("__D__ lr, __D__ delta, __D__ mom, __D__ onem", "__D__ g, __D__ h1, __D__ h2",
               "h1 = h1 * mom + (g * g) * onem; "
               "__T__ gu = g * sqrt((h2 + delta) / (h1 + delta)); "
               "h2 = h2 * mom + (gu * gu) * onem; g = gu * lr;"),
    ADAM: ("__D__ lr, __D__ delta, __D__ b1, __D__ oneb1, __D__ b2, __D__ oneb2",
           "__D__ g, __D__ m, __D__ v",
           "m = m * b1 + g * oneb1; v = v * b2 + (g * g) * oneb2; g = (m / (sqrt(v) + delta)) * lr;"),
}


def _run(name, scalars, arrays):
    ins, outs, body = _KERNELS[name]
    kern = _cuda.elementwise_kernel(name, ins, outs, body, arrays[0].dtype, NO_CONTRACTION)
    kern(*_cuda.scalars(arrays[0].dtype, *scalars), *arrays)


def rule_scalars(rule):
    """The kernel's scalars after the learning rate, for ``rule`` (an ``UpdateRule``)."""
    kind = rule.type
    if kind == "SGD":
        return (rule.momentum,)
    if kind == "Nesterov":
        m = rule.momentum
        return (m, np.float32(1.0 + m), -m)
    if kind == "AdaGrad":
        return (rule.delta,)
    if kind == "RMSProp":
        return (rule.delta, rule.rms_decay, np.float32(1.0 - rule.rms_decay))
    if kind == "AdaDelta":
        m = rule.momentum
        return (rule.delta, m, np.float32(1.0 - m))
    b1, b2 = rule.momentum, rule.momentum2
    return (rule.delta, b1, np.float32(1.0 - b1), b2, np.float32(1.0 - b2))


KERNEL_OF = {"SGD": SGD, "Nesterov": NESTEROV, "AdaGrad": ADAGRAD, "RMSProp": RMSPROP, "AdaDelta": ADADELTA,
             "Adam": ADAM}


def _one(rule, g, hist, local_rate):
    _run(KERNEL_OF[rule.type], (local_rate,) + rule_scalars(rule), (g, *hist))


def sgd(rule, g, hist, local_rate):
    _one(rule, g, hist, local_rate)


def nesterov(rule, g, hist, local_rate):
    _one(rule, g, hist, local_rate)


def adagrad(rule, g, hist, local_rate):
    _one(rule, g, hist, local_rate)


def rmsprop(rule, g, hist, local_rate):
    _one(rule, g, hist, local_rate)


def adadelta(rule, g, hist, local_rate):
    _one(rule, g, hist, local_rate)


def adam(rule, g, hist, rate):
    """``rate``: the learning rate times Adam's bias correction, as the CPU code folds them."""
    _one(rule, g, hist, rate)


# --- one launch for every parameter ---------------------------------------------------------------

MULTI = "minicaffe_multi_step"
MAX_SCALARS = 5      # the most rule scalars after the learning rate (Adam's)


def _multi_src(kernel):
    """The multi-tensor kernel of one rule: per element, the CPU path's preparation of the gradient,
    then the per-parameter kernel's body verbatim on local copies, then the write-back and ``w -= g``."""
    ins, outs, body = _KERNELS[kernel]
    scalars = [p.split()[1] for p in ins.split(",")][1:]          # after lr
    arrays = [p.split()[1] for p in outs.split(",")]              # g, then the history
    k = 2 + len(arrays) - 1                                       # pointers per parameter: w, g, history
    decl = " ".join(f"const __T__ {n} = s{j};" for j, n in enumerate(scalars))
    load = " ".join(f"__T__* const {n}_p = (__T__*)ptrs[p * {k} + {j + 2}]; __T__ {n} = {n}_p[e];"
                    for j, n in enumerate(arrays[1:]))
    store = " ".join(f"{n}_p[e] = {n};" for n in arrays[1:])
    sparams = ", ".join(f"__T__ s{j}" for j in range(MAX_SCALARS))
    return f"""
// rounded operations the compiler may not fuse with their neighbours (the per-parameter path does
// them in separate launches, each result rounded to memory)
__device__ __forceinline__ __T__ __NAME___mul(__T__ a, __T__ b) {{
  return sizeof(__T__) == 4 ? (__T__)__fmul_rn((float)a, (float)b) : (__T__)__dmul_rn((double)a, (double)b);
}}
__device__ __forceinline__ __T__ __NAME___sub(__T__ a, __T__ b) {{
  return sizeof(__T__) == 4 ? (__T__)__fsub_rn((float)a, (float)b) : (__T__)__dsub_rn((double)a, (double)b);
}}
extern "C" __global__ void __NAME__(const unsigned long long* ptrs, const long long* offsets,
    const float* lr_mults, const float* decays, long long nparams, long long total, double rate,
    double correction, long long use_correction, __T__ iter_scale, long long normalize, long long l1,
    {sparams}) {{
  {decl}
  long long p = 0;
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total;
       j += (long long)blockDim.x * gridDim.x) {{
    if (j < offsets[p] || j >= offsets[p + 1]) {{
      long long lo = 0, hi = nparams - 1;
      while (lo < hi) {{
        const long long mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= j) lo = mid; else hi = mid - 1;
      }}
      p = lo;
    }}
    const long long e = j - offsets[p];
    __T__* const w_p = (__T__*)ptrs[p * {k}];
    __T__* const g_p = (__T__*)ptrs[p * {k} + 1];
    __T__ g = g_p[e];
    if (normalize) g = __NAME___mul(g, iter_scale);
    const float wdecay_ = decays[p];
    if (wdecay_ != 0.0f) {{
      const __T__ wv = w_p[e];
      if (l1) {{
        __T__ sg = wv > (__T__)0 ? (__T__)1 : (wv < (__T__)0 ? (__T__)-1 : (wv == wv ? (__T__)0 : wv));
        sg = __NAME___mul(sg, (__T__)wdecay_);
        g = g + sg;
      }} else {{
        g = (__T__)__dadd_rn(__dmul_rn((double)wv, (double)wdecay_), (double)g);
      }}
    }}
    __T__ lr = (__T__)(float)(rate * (double)lr_mults[p]);
    if (use_correction) lr = (__T__)(float)((double)lr * correction);
    {load}
    {{ {body} }}
    {store}
    g_p[e] = g;
    w_p[e] = __NAME___sub(w_p[e], g);
  }}
}}
"""


def _pointer(arr):
    """The device address of ``arr``'s first element (NumPy arrays: their host address)."""
    return arr.ctypes.data if isinstance(arr, np.ndarray) else arr.data.ptr


class MultiStepPlan:
    """The device tables of one group of parameters (one float type) for ``multi_step``, rebuilt
    only when an array moved or changed size or a multiplier changed (the key is compared on the
    host each step; nothing is uploaded when it matches)."""

    def __init__(self):
        self.key = None
        self.tables = None
        self.arrays = None

    def tables_for(self, xp, rows, lr_mults, decays):
        """``rows``: per parameter ``(w, g, *history)`` device arrays."""
        sizes = tuple(row[0].size for row in rows)
        key = (tuple(_pointer(a) for row in rows for a in row), sizes, tuple(lr_mults), tuple(decays))
        if key != self.key:
            offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(sizes, out=offsets[1:])
            self.tables = (xp.asarray(np.array(key[0], np.uint64)), xp.asarray(offsets),
                           xp.asarray(np.array(lr_mults, np.float32)), xp.asarray(np.array(decays, np.float32)))
            self.total = int(offsets[-1])
            self.key = key
            self.arrays = rows       # kept alive while their addresses are in the table
        return self.tables


def multi_step(rule, plan, rows, lr_mults, decays, rate, correction, iter_scale, l1):
    """One launch: for every parameter row ``(w, g, *history)`` (same float type, contiguous, none
    empty), ``g`` times ``iter_scale`` (None: ``iter_size`` 1), its weight decay ``decays[i]`` added
    (L1 if ``l1``), turned into the update by ``rule`` at ``f32(rate·lr_mults[i])`` (then
    ``f32(· correction)`` for Adam; None otherwise) and subtracted from ``w``. ``lr_mults``,
    ``decays`` and ``iter_scale`` are float32-valued; ``decays[i]`` is the local decay
    (weight_decay·decay_mult). The history arrays and ``g`` are updated in place."""
    dtype = rows[0][0].dtype
    xp = _cuda._cupy() if not isinstance(rows[0][0], np.ndarray) else np
    ptrs, offsets, lrs, decs = plan.tables_for(xp, rows, lr_mults, decays)
    kernel = KERNEL_OF[rule.type]
    scalars = list(rule_scalars(rule))
    scalars += [0.0] * (MAX_SCALARS - len(scalars))
    kern = _cuda.raw_kernel(f"{MULTI}_{kernel[len('minicaffe_'):]}", _multi_src(kernel), dtype, NO_CONTRACTION)
    _cuda.launch(kern, plan.total, ptrs, offsets, lrs, decs, *_cuda.i64(len(rows), plan.total),
                 np.float64(rate), np.float64(correction or 0.0), np.int64(correction is not None),
                 *_cuda.scalars(dtype, 1.0 if iter_scale is None else iter_scale),
                 *_cuda.i64(iter_scale is not None, bool(l1)), *_cuda.scalars(dtype, *scalars))


# --- NumPy references: the bodies above, in NumPy, on the arrays passed in ---------------------

def _ref(name):
    n_in = _KERNELS[name][0].count(",") + 1

    def run(*args, **kwargs):
        arrays = args[n_in:]
        dt = arrays[0].dtype.type
        s = [dt(v) for v in args[:n_in]]
        if name == SGD:
            lr, mom = s
            g, h = arrays
            h[...] = h * mom + g * lr
            g[...] = h
        elif name == NESTEROV:
            lr, mom, onep, negm = s
            g, h = arrays
            old = h.copy()
            h[...] = h * mom + g * lr
            g[...] = h * onep + old * negm
        elif name == ADAGRAD:
            lr, delta = s
            g, h = arrays
            h[...] = h + g * g
            g[...] = (g / (np.sqrt(h) + delta)) * lr
        elif name == RMSPROP:
            lr, delta, decay, onem = s
            g, h = arrays
            h[...] = h * decay + (g * g) * onem
            g[...] = (g / (np.sqrt(h) + delta)) * lr
        elif name == ADADELTA:
            lr, delta, mom, onem = s
            g, h1, h2 = arrays
            h1[...] = h1 * mom + (g * g) * onem
            gu = g * np.sqrt((h2 + delta) / (h1 + delta))
            h2[...] = h2 * mom + (gu * gu) * onem
            g[...] = gu * lr
        else:
            lr, delta, b1, oneb1, b2, oneb2 = s
            g, m, v = arrays
            m[...] = m * b1 + g * oneb1
            v[...] = v * b2 + (g * g) * oneb2
            g[...] = (m / (np.sqrt(v) + delta)) * lr
        return tuple(arrays)
    return run


for _base in _KERNELS:
    _fn = _ref(_base)
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)


def _at(ptr, size, dtype):
    """A NumPy view of ``size`` values at address ``ptr`` (the stand-in's device arrays are NumPy
    arrays, so a pointer in the kernel's table is a host address)."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * (size * dtype.itemsize)).from_address(ptr), dtype=dtype)


def _ref_multi(kernel):
    """The multi-tensor kernel in NumPy: per parameter, what the per-parameter device path does
    (``iter_size`` scaling, ``regularize`` on the device, the rule's reference, ``w -= g``)."""
    one = _ref(kernel)
    n_hist = _KERNELS[kernel][1].count(",")
    n_scalars = _KERNELS[kernel][0].count(",")

    def run(grid, block, args, shared_mem=0):
        ptrs, offsets, lrs, decays, nparams, _, rate, correction, use_correction, iter_scale, normalize, l1 = \
            args[:12]
        s = args[12:12 + n_scalars]
        dtype = np.dtype(type(iter_scale))
        t = dtype.type
        k = 2 + n_hist
        for p in range(int(nparams)):
            size = int(offsets[p + 1] - offsets[p])
            w, g, *hist = (_at(int(ptrs[p * k + j]), size, dtype) for j in range(k))
            if int(normalize):
                g *= t(iter_scale)
            decay = float(decays[p])
            if decay != 0:
                if int(l1):
                    sg = np.sign(w)
                    sg *= t(decay)
                    g += sg
                else:
                    wide = w.astype(np.float64)
                    wide *= decay
                    wide += g
                    g[...] = wide
            lr = float(np.float32(float(rate) * float(lrs[p])))
            if int(use_correction):
                lr = float(np.float32(lr * float(correction)))
            one(lr, *s, g, *hist)
            w -= g
    return run


for _base in _KERNELS:
    _fn = _ref_multi(_base)
    for _name in _cuda.names(f"{MULTI}_{_base[len('minicaffe_'):]}"):
        emulation.reference(_name)(_fn)
