"""The solvers' update rules on the GPU: one fused ElementwiseKernel per parameter and step.

Why: the array code in ``solvers/updates.py`` is 4-12 separate passes (one launch each) over every
parameter and its history per iteration; each kernel here reads and writes every array once. The
arithmetic is the CPU code's, operation for operation, in the parameters' float type (a GPU may
contract ``a*b + c`` into one fused multiply-add, so results can differ from the CPU's in the last
bit). ``g`` comes in as the gradient and leaves holding the update value, as there.
"""
import numpy as np

from . import _cuda, emulation

SGD = "minicaffe_sgd_update"
NESTEROV = "minicaffe_nesterov_update"
ADAGRAD = "minicaffe_adagrad_update"
RMSPROP = "minicaffe_rmsprop_update"
ADADELTA = "minicaffe_adadelta_update"
ADAM = "minicaffe_adam_update"

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
    kern = _cuda.elementwise_kernel(name, ins, outs, body, arrays[0].dtype)
    kern(*_cuda.scalars(arrays[0].dtype, *scalars), *arrays)


def sgd(rule, g, hist, local_rate):
    _run(SGD, (local_rate, rule.momentum), (g, hist[0]))


def nesterov(rule, g, hist, local_rate):
    m = rule.momentum
    _run(NESTEROV, (local_rate, m, np.float32(1.0 + m), -m), (g, hist[0]))


def adagrad(rule, g, hist, local_rate):
    _run(ADAGRAD, (local_rate, rule.delta), (g, hist[0]))


def rmsprop(rule, g, hist, local_rate):
    _run(RMSPROP, (local_rate, rule.delta, rule.rms_decay, np.float32(1.0 - rule.rms_decay)), (g, hist[0]))


def adadelta(rule, g, hist, local_rate):
    m = rule.momentum
    _run(ADADELTA, (local_rate, rule.delta, m, np.float32(1.0 - m)), (g, hist[0], hist[1]))


def adam(rule, g, hist, rate):
    """``rate``: the learning rate times Adam's bias correction, as the CPU code folds them."""
    b1, b2 = rule.momentum, rule.momentum2
    _run(ADAM, (rate, rule.delta, b1, np.float32(1.0 - b1), b2, np.float32(1.0 - b2)), (g, hist[0], hist[1]))


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
