"""Pooling's CPU engine: MAX backward as one argmax scatter per block of planes.

Why: the reference backward (``layers/pooling.py``) routes each gradient to its argmax with one
masked pass per window offset (``kh * kw`` passes over the whole batch). Here the argmax codes of
the forward become flat bottom indices and one ``np.add.at`` per block adds every output's gradient
at its argmax, in output order: Caffe's loop, so overlapping windows sum in Caffe's order. The
forward is the reference's (it keeps the argmax codes this backward reads).

``np.add.at`` is a fast unbuffered scatter-add from NumPy 1.25 on (about 1.5 ns an element); before,
it is ~50x slower than the per-offset passes, so the engine does not apply there. The blocks are
split over the kernels' thread pool (``core/threads.py``); each writes only its own planes. But
``np.add.at`` holds the GIL, so the blocks ran one after the other: with the compiled kernels on, the
same scatter is a compiled loop over planes (``compiled.max_pool_scatter``, the same bits), which
runs in parallel (ResNet-50's pool1 backward at batch 8, 2 cores: 6.4 -> 2.7 ms).
"""
import numpy as np

from ..proto import caffe_pb2
from . import compiled, engines
from ..core import threads
from ..core.context import Slot
from .im2col import workspace

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_SCATTER_CODE, _SCATTER_INDEX = Slot("pool_scatter_code"), Slot("pool_scatter_idx")

# Outputs per block of the scatter (their indices, gradients and the bottom rows they hit stay in cache).
SCATTER_BLOCK_OUTPUTS = 1 << 16

FAST_ADD_AT = np.lib.NumpyVersion(np.__version__) >= "1.25.0"


class ScatterMaxPooling:
    """The scatter plan of one bottom shape: ``table[code]`` = the flat offset of window offset
    code ``i * kw + j`` from its window's top-left corner, ``base`` = each window's top-left corner
    (which may lie in the padding; the argmax never does) in a block of ``rows`` planes."""

    def __init__(self, layer):
        self.layer = layer
        n, c, h, w = layer.bottom_shape
        oh, ow = layer.out_hw
        self.rows = max(1, min(n * c, SCATTER_BLOCK_OUTPUTS // (oh * ow)))
        codes = np.arange(layer.kh * layer.kw)
        self.table = ((codes // layer.kw) * w + codes % layer.kw).astype(np.intp)
        corner = (np.arange(oh)[:, None] * layer.sh - layer.ph) * w + np.arange(ow) * layer.sw - layer.pw
        self.base = (np.arange(self.rows)[:, None, None] * (h * w) + corner).astype(np.intp)

    def pool_forward(self, x, y, mask):
        self.layer.pool_forward(x, y, mask)

    def pool_backward(self, x, dy, dx, relu=False):
        """dx = each output's gradient added at its argmax, in output order. ``relu``: the
        gradient of a ReLU in place on ``x`` too, zero where ``x <= 0`` (``compiled.max_pool_scatter``;
        callers check ``relu_applies`` first)."""
        layer = self.layer
        if not dx.flags.c_contiguous:
            layer.pool_backward(x, dy, dx)
            if relu:
                dx[x <= 0] = 0
            return
        n, c, h, w = dx.shape
        m, (oh, ow) = n * c, layer.out_hw
        codes = layer.argmax_offsets(x)                    # (m, 1, oh, ow)
        if compiled.runs_on(dx, dy, x):
            # one compiled loop per block of planes, without the GIL (compiled.max_pool_scatter)
            kernel = compiled.get(compiled.max_pool_scatter)
            dy3, dx2, x2 = dy.reshape(m, oh, ow), dx.reshape(m, h * w), x.reshape(m, h * w)
            threads.parallel_for(m, lambda p0, p1: kernel(
                dy3, codes, self.table, dx2, w, layer.sh, layer.sw, layer.ph, layer.pw, x2, relu, p0, p1),
                work=dy.size + dx.size * (2 if relu else 1))
            return
        dyf = dy.reshape(m, oh * ow)
        dxf = dx.reshape(m, h * w)
        xf = x.reshape(m, h * w)
        dx.fill(0)
        blocks = -(-m // self.rows)

        def scatter(k0, k1):       # blocks k0..k1-1 (each writes its own planes of dx), on one thread
            code_buf = workspace(np, self.base.shape, np.intp, _SCATTER_CODE)
            idx = workspace(np, self.base.shape, np.intp, _SCATTER_INDEX)
            for b0 in range(k0 * self.rows, min(m, k1 * self.rows), self.rows):
                b1 = min(m, b0 + self.rows)
                k = b1 - b0
                code, blk = code_buf[:k], idx[:k]
                code[...] = codes[b0:b1].reshape(k, oh, ow)
                # the codes are in range: 'wrap' skips the bounds check that makes take 2x slower
                np.take(self.table, code, out=blk, mode="wrap")
                blk += self.base[:k]
                np.add.at(dxf[b0:b1].reshape(-1), blk.reshape(-1), dyf[b0:b1].reshape(-1))
                if relu:
                    np.copyto(dxf[b0:b1], 0, where=xf[b0:b1] <= 0)
        threads.parallel_for(blocks, scatter, work=dy.size)

    def relu_applies(self, x, dx):
        """Whether ``pool_backward`` can take ``relu`` for these arrays (a plain C-contiguous ``x`` of
        ``dx``'s shape)."""
        return isinstance(x, np.ndarray) and x.shape == dx.shape and x.flags.c_contiguous

def _scatter_applies(layer):
    return FAST_ADD_AT and layer.method == caffe_pb2.PoolingParameter.MAX and not layer.whole


engines.register(engines.Engine("Pooling", "scatter", build=ScatterMaxPooling, devices=("cpu",),
                                applies=_scatter_applies, priority=10))
