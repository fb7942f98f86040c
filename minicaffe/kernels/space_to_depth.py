"""A strided convolution as a stride-1 one over blocks of its input (space to depth), for Winograd.

A k x k convolution of stride s reads, for output (o, p), the input rows s*o - pad + t, t < k.
Cut the padded input into s x s blocks and write t = s*ky + a (a < s): that is block row o + ky,
row a inside the block. So the convolution is a stride-1 convolution of side ``ceil(k / s)`` over
the blocks, each block's s*s values of a channel stacked as s*s channels (cin*s*s in all), with
the filters cut the same way and padded with zero taps up to s*ceil(k/s).

Why: AlexNet's and CaffeNet's first layer, 11x11 stride 4 over 3 channels, becomes a 3x3 stride-1
convolution over 48 channels, which Winograd F(4x4, 3x3) runs with 108 multiplies an output and
output channel where the columns' GEMM makes 363 (the padding of 11 to 12 taps included). The
stride-1 layer's input is made straight in the padded channels-last layout that the compiled
Winograd kernels read (``source``), one pass over the input (conv_engines.SpaceToDepthWinogradConv).
"""
from __future__ import annotations

import numpy as np

from ..core import threads
from ..core.context import Slot
from .im2col import workspace
from . import compiled

SOURCE = Slot("space_to_depth_source")
_FILTERS = Slot("space_to_depth_filters")


def side(geom):
    """The stride-1 kernel's side: ``ceil(k / s)``."""
    return -(-geom.kh // geom.sh)


def applies(geom, group):
    """Whether a layer can run this way: 2-D, square kernel and stride, stride 2 or more, no
    dilation, one group, pads under the kernel, and a 3x3 kernel once cut (the Winograd kernels'
    F(4x4, 3x3))."""
    return (group == 1 and geom.kh == geom.kw and geom.sh == geom.sw >= 2 and geom.dh == geom.dw == 1
            and geom.ph < geom.kh and geom.pw < geom.kw and side(geom) == 3)


def source(x, step, pad_h, pad_w, rows, cols, slot=SOURCE):
    """``x`` (n, cin, h, w) cut into ``step`` x ``step`` blocks after padding, channels last:
    (n, rows, cols, cin*step*step) with ``[n, i, j, (c*step + a)*step + b] = x[n, c, step*i + a -
    pad_h, step*j + b - pad_w]``, zero outside ``x``; in the workspace ``slot``, an image a chunk
    on the kernels' pool (``compiled.space_to_depth_source``), else ``source_numpy``."""
    num, cin = x.shape[:2]
    src = workspace(np, (num, rows, cols, cin * step * step), x.dtype, slot)
    if not compiled.runs_on(x, src):
        np.copyto(src, source_numpy(x, step, pad_h, pad_w, rows, cols))
        return src
    kernel = compiled.get(compiled.space_to_depth_source)
    threads.parallel_for(num, lambda n0, n1: kernel(x, src, step, pad_h, pad_w, n0, n1), work=2 * src.size)
    return src


def source_numpy(x, step, pad_h, pad_w, rows, cols):
    """``source``'s NumPy twin (and its reference): the padded input, then one transposed copy."""
    num, cin, h, w = x.shape
    full = np.zeros((num, cin, rows * step, cols * step), x.dtype)
    r1, c1 = min(h, rows * step - pad_h), min(w, cols * step - pad_w)
    full[:, :, pad_h:pad_h + r1, pad_w:pad_w + c1] = x[:, :, :r1, :c1]
    blocks = full.reshape(num, cin, rows, step, cols, step).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(num, rows, cols, cin * step * step)


def _blocks(a, step, k):
    """The (cout, cin*step*step, k, k) view of a blocked array as (cout, cin, k, step, k, step),
    whose merged last four axes are the padded (k*step)^2 taps."""
    cout = a.shape[0]
    cin = a.shape[1] // (step * step)
    return a.reshape(cout, cin, step, step, k, k).transpose(0, 1, 4, 2, 5, 3)


def filters(w, step, slot=_FILTERS):
    """The stride-1 layer's filters: ``w`` (cout, cin, kh, kw) padded with zero taps to
    ``side * step`` and cut into blocks, (cout, cin*step*step, side, side), in the workspace
    ``slot``; ``[o, (c*step + a)*step + b, ky, kx] = w[o, c, step*ky + a, step*kx + b]``."""
    cout, cin, kh, kw = w.shape
    k = -(-kh // step)
    out = workspace(np, (cout, cin * step * step, k, k), w.dtype, slot)
    padded = np.zeros((cout, cin, k * step, k * step), w.dtype)
    padded[:, :, :kh, :kw] = w
    _blocks(out, step, k)[...] = padded.reshape(cout, cin, k, step, k, step)
    return out
