"""Softmax and the softmax loss on the GPU: one kernel per pass, no host round trip.

Why: the array code (``layers/loss.py``) is five launches for a softmax and a dozen for the loss,
and reads the valid-label count back to the host every forward. Here one thread owns one position
``(outer o, inner i)`` and loops over the classes (reads ``x[o, :, i]``, stride ``inner``):

* ``softmax``: ``y = exp(x - max) / sum(exp(x - max))``, in place allowed (each position is read
  whole before it is written);
* ``softmax_backward``: ``dx = (dy - sum(dy * y)) * y`` (in place allowed);
* ``softmax_loss``: per position ``-log(max(p[label], FLT_MIN))`` and 1, or 0 and 0 for an ignored
  label; the sums (loss, count) stay on the device, so VALID normalisation needs no host read;
* ``softmax_loss_backward``: ``dx = (p - [c == label]) * scale``, 0 at ignored positions, with
  ``scale = loss_weight / normaliser`` read from a device scalar.

Labels are truncated to integers as Caffe's ``static_cast<int>``; they are validated by the layer
before the kernel runs (on the host copy when it is current, so that costs no device sync).

Registered as the ``cuda`` engine of Softmax, SoftmaxWithLoss and InfogainLoss (``CudaSoftmax``).
"""
import numpy as np

from ..core import backend
from . import _cuda, emulation, engines

SOFTMAX = "minicaffe_softmax_fwd"
SOFTMAX_BACKWARD = "minicaffe_softmax_bwd"
LOSS = "minicaffe_softmax_loss_fwd"
LOSS_BACKWARD = "minicaffe_softmax_loss_bwd"

FLT_MIN = float(np.finfo(np.float32).tiny)

_POS = r'''
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long o = idx / inner, i = idx % inner;
        const long long base = o * C * inner + i;'''

_SOFTMAX_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* x, __T__* y, long long total, long long C, long long inner) {''' + _POS + r'''
        __T__ m = x[base];
        for (long long c = 1; c < C; ++c) m = max(m, x[base + c * inner]);
        __T__ sum = 0;
        for (long long c = 0; c < C; ++c) {
            const __T__ e = exp(x[base + c * inner] - m);
            y[base + c * inner] = e;
            sum += e;
        }
        for (long long c = 0; c < C; ++c) y[base + c * inner] /= sum;
    }
}
'''

_SOFTMAX_BWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* y, const __T__* dy, __T__* dx, long long total, long long C,
                                    long long inner) {''' + _POS + r'''
        __T__ dot = 0;
        for (long long c = 0; c < C; ++c) dot += dy[base + c * inner] * y[base + c * inner];
        for (long long c = 0; c < C; ++c) dx[base + c * inner] = (dy[base + c * inner] - dot) * y[base + c * inner];
    }
}
'''

_LOSS_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* prob, const __T__* label, __T__* loss, __T__* count,
                                    long long total, long long C, long long inner, long long has_ignore,
                                    long long ignore, __T__ floor_p) {''' + _POS + r'''
        const long long lab = (long long)label[idx];
        if (has_ignore && lab == ignore) {
            loss[idx] = 0;
            count[idx] = 0;
        } else {
            loss[idx] = -log(max(prob[base + lab * inner], floor_p));
            count[idx] = 1;
        }
    }
}
'''

_LOSS_BWD_SRC = r'''
extern "C" __global__ void __NAME__(const __T__* prob, const __T__* label, const __T__* scale, __T__* dx,
                                    long long total, long long C, long long inner, long long has_ignore,
                                    long long ignore) {''' + _POS + r'''
        const long long lab = (long long)label[idx];
        const bool skip = has_ignore && lab == ignore;
        const __T__ s = scale[0];
        for (long long c = 0; c < C; ++c) {
            const long long k = base + c * inner;
            dx[k] = skip ? (__T__)0 : (prob[k] - (c == lab ? (__T__)1 : (__T__)0)) * s;
        }
    }
}
'''


def layout(shape, axis):
    """(outer, classes, inner) of a softmax over ``axis`` of ``shape`` (the cuDNN engine's view too)."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, int(shape[axis]), inner


def softmax(x, axis, out):
    """``out`` = softmax of ``x`` along ``axis`` (``out`` may be ``x``); returns ``out``."""
    outer, c, inner = layout(x.shape, axis)
    kern = _cuda.raw_kernel(SOFTMAX, _SOFTMAX_SRC, x.dtype)
    _cuda.launch(kern, outer * inner, x, out, *_cuda.i64(outer * inner, c, inner))
    return out


def softmax_backward(y, dy, axis, dx):
    outer, c, inner = layout(y.shape, axis)
    kern = _cuda.raw_kernel(SOFTMAX_BACKWARD, _SOFTMAX_BWD_SRC, y.dtype)
    _cuda.launch(kern, outer * inner, y, dy, dx, *_cuda.i64(outer * inner, c, inner))
    return dx


def softmax_loss(prob, label, axis, ignore):
    """(sum of the per-position losses, number of counted positions): two device scalars."""
    xp = backend.get_array_module(prob)
    outer, c, inner = layout(prob.shape, axis)
    label = _cuda.contiguous(xp, label.astype(prob.dtype, copy=False))
    loss = xp.empty(outer * inner, prob.dtype)
    count = xp.empty(outer * inner, prob.dtype)
    kern = _cuda.raw_kernel(LOSS, _LOSS_SRC, prob.dtype)
    _cuda.launch(kern, outer * inner, prob, label, loss, count,
                 *_cuda.i64(outer * inner, c, inner, ignore is not None, ignore or 0),
                 prob.dtype.type(FLT_MIN))
    return loss.sum(), count.sum()


def softmax_loss_backward(prob, label, scale, axis, ignore, dx):
    """``dx`` = (p - onehot(label)) * scale[0] (0 where the label is ignored)."""
    xp = backend.get_array_module(prob)
    outer, c, inner = layout(prob.shape, axis)
    label = _cuda.contiguous(xp, label.astype(prob.dtype, copy=False))
    scale = xp.ascontiguousarray(scale, dtype=prob.dtype).reshape(1)
    kern = _cuda.raw_kernel(LOSS_BACKWARD, _LOSS_BWD_SRC, prob.dtype)
    _cuda.launch(kern, outer * inner, prob, label, scale, dx,
                 *_cuda.i64(outer * inner, c, inner, ignore is not None, ignore or 0))
    return dx


class CudaSoftmax:
    """The GPU engine of Softmax, SoftmaxWithLoss and InfogainLoss (its softmax only): stateless,
    the kernels above as methods, the interface those layers call their engine through."""

    def __init__(self, layer):
        pass

    softmax = staticmethod(softmax)
    softmax_backward = staticmethod(softmax_backward)
    loss = staticmethod(softmax_loss)
    loss_backward = staticmethod(softmax_loss_backward)


for _type in ("Softmax", "SoftmaxWithLoss", "InfogainLoss"):
    engines.register(engines.Engine(_type, "cuda", build=CudaSoftmax, devices=("gpu",), priority=20))


# --- NumPy references ------------------------------------------------------------------------

def _view(arr, total, c, inner):
    return arr.reshape(int(total) // int(inner), int(c), int(inner))


def _ref_softmax(grid, block, args, shared_mem=0):
    x, y, total, c, inner = args
    xs, ys = _view(x, total, c, inner), _view(y, total, c, inner)
    e = np.exp(xs - xs.max(axis=1, keepdims=True))
    ys[...] = e / e.sum(axis=1, keepdims=True)


def _ref_softmax_bwd(grid, block, args, shared_mem=0):
    y, dy, dx, total, c, inner = args
    ys, dys = _view(y, total, c, inner), _view(dy, total, c, inner)
    dot = (dys * ys).sum(axis=1, keepdims=True)
    _view(dx, total, c, inner)[...] = (dys - dot) * ys


def _labels(label, total, inner, has_ignore, ignore):
    lab = np.trunc(label.reshape(int(total) // int(inner), int(inner))).astype(np.int64)
    skip = (lab == int(ignore)) if has_ignore else np.zeros(lab.shape, bool)
    return lab, skip


def _ref_loss(grid, block, args, shared_mem=0):
    prob, label, loss, count, total, c, inner, has_ignore, ignore, floor_p = args
    p = _view(prob, total, c, inner)
    lab, skip = _labels(label, total, inner, has_ignore, ignore)
    picked = np.take_along_axis(p, np.where(skip, 0, lab)[:, None, :], axis=1)[:, 0, :]
    per = -np.log(np.maximum(picked, p.dtype.type(floor_p)))
    loss.reshape(lab.shape)[...] = np.where(skip, 0, per)
    count.reshape(lab.shape)[...] = ~skip


def _ref_loss_bwd(grid, block, args, shared_mem=0):
    prob, label, scale, dx, total, c, inner, has_ignore, ignore = args
    p = _view(prob, total, c, inner)
    lab, skip = _labels(label, total, inner, has_ignore, ignore)
    onehot = np.arange(int(c))[None, :, None] == lab[:, None, :]
    g = (p - onehot.astype(p.dtype)) * scale.reshape(-1)[0]
    _view(dx, total, c, inner)[...] = np.where(skip[:, None, :], 0, g)


for _base, _fn in ((SOFTMAX, _ref_softmax), (SOFTMAX_BACKWARD, _ref_softmax_bwd), (LOSS, _ref_loss),
                   (LOSS_BACKWARD, _ref_loss_bwd)):
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)
