"""InnerProduct (fully connected): ``y = x W^T + b`` over the axes from ``axis`` on, flattened.

The bottom is seen as ``M x K`` with ``M`` the product of the axes before ``axis`` and ``K`` the
product of the rest; the top is ``bottom.shape[:axis] + (num_output,)``. The weight is
``num_output x K``, or ``K x num_output`` with ``transpose: true`` (Caffe's layout either way, so
caffemodels load as they are).
"""
import numpy as np

from ..core import blas, fillers, threads
from ..core.blob import Blob
from ..errors import ShapeError
from ..core.context import Slot
from ..kernels import compiled
from ..kernels.im2col import workspace
from ..core.layer import Layer, register

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_WGRAD = Slot("wgrad")


# Rows of a weight gradient computed per step: ``dw += a @ b`` in bands keeps the temporary small
# (fc6 of VGG would otherwise allocate, page in and free a 400 MB array every iteration).
WGRAD_BAND_ELEMENTS = 1 << 22

# the compiled few-rows kernels run up to this many rows (forward, backward), on weights of at
# least this many values (see _rows_pay)
ROWS_KERNEL_MAX_M = 8
ROWS_KERNEL_BACKWARD_MAX_M = 6
ROWS_KERNEL_MIN_WEIGHTS = 1 << 20


def _accumulate_product(xp, a, b, out):
    """``out += a @ b``: one GEMM with beta = 1 in NumPy's OpenBLAS (``blas.add_product``), or
    through a reused scratch band of rows where that cannot run (NumPy's matmul cannot
    accumulate)."""
    if xp is np and blas.add_product(a, b, out):
        return
    rows = max(1, min(out.shape[0], WGRAD_BAND_ELEMENTS // max(out.shape[1], 1)))
    for r0 in range(0, out.shape[0], rows):
        r1 = min(out.shape[0], r0 + rows)
        tmp = workspace(xp, (r1 - r0, out.shape[1]), out.dtype, _WGRAD)
        blas.matmul(a[r0:r1], b, out=tmp)
        _add_into(out[r0:r1], tmp)


def _add_into(out, tmp):
    """``out += tmp``, on the kernels' thread pool in flat chunks for contiguous NumPy arrays: the
    accumulation reads and writes every weight gradient value (VGG's fc6: 103M a backward), and an
    element's sum is the same whichever thread adds it."""
    flat = threads.flat_views(out, tmp)
    if flat is None:
        out += tmp
        return
    o, t = flat
    threads.parallel_flat(o.size, lambda a, b: np.add(o[a:b], t[a:b], out=o[a:b]), work=3 * o.size)


def _weights_first_pays(m, k):
    """Whether OpenBLAS computes ``x @ W^T`` faster as ``(W @ x^T)^T`` (then copied out; the output
    is only ``m`` rows): measured at two threads, it is 1.3-3x faster for ``m`` up to 32 on
    CaffeNet's and VGG's fc6/fc7/fc8 shapes (4096x9216 at m=10: 28 -> 19 ms; 4096x4096: 13 -> 8 ms),
    and no faster on VGG's fc6 (K = 25088) at m=32."""
    return m <= 16 or k <= 16384


def _data_grad_weights_first_pays(m, k):
    """Whether the data gradient ``dy @ W`` runs as ``(W^T @ dy^T)^T``, as the forward does: where
    ``_weights_first_pays``, and only in NumPy's OpenBLAS before 0.3.31 (``blas.gemm_library``).
    Measured on 2 cores, ms, dy @ W / weights first: OpenBLAS 0.3.29 (NumPy 2.2) CaffeNet's fc6 at
    batch 32 39.7 / 29.7, fc7 15.9 / 13.4; OpenBLAS 0.3.31 (NumPy 2.4) 22.3 / 22.8 and 7.9 / 10.3;
    MKL 20.9 / 30.5 and 6.3 / 8.8 (the forward's weights first stays faster in all three: fc6 17.9,
    17.9, 11.5 against 21.6, 19.4, 15.0)."""
    lib, version = blas.gemm_library()
    return lib == "openblas" and version is not None and version < (0, 3, 31) and _weights_first_pays(m, k)


def _rows_pay(x, w, y, most=None):
    """Whether the compiled few-rows products run (``compiled.inner_product_rows`` forward,
    ``inner_product_rows_backward`` for both gradients, ``y`` then the top's gradient): 2 to
    ``most`` rows (ROWS_KERNEL_MAX_M by default), weights of ROWS_KERNEL_MIN_WEIGHTS values or
    more, float32/64 C-contiguous arrays of one dtype, the kernels on. Measured on 2 cores (Intel
    Xeon), ms, kernel / BLAS (the weight gradient through ``blas.add_product``), forward and
    backward: VGG's fc6 (4096 x 25088) at 4 rows 15.1 / 33.2 and 52 / 98, at 6 28 / 39 and 104 /
    124, at 8 28 / 33 and 120 / 106, at 12 43 / 39 and 195 / 115; CaffeNet's fc6 (4096 x 9216)
    at 4 rows 5.2 / 11.4 and 20 / 37, at 8 10.1 / 12.7 and 40 / 38; 4096 x 4096 at 6 rows 3.2 /
    5.8 and 14 / 19. At 1 row BLAS's own (GEMV) is as fast forward and faster backward (52 / 41);
    on small weights BLAS is faster (500 x 800 at 2 rows 0.13 / 0.04 and 0.36 / 0.19)."""
    most = ROWS_KERNEL_MAX_M if most is None else most
    return 2 <= x.shape[0] <= most and w.size >= ROWS_KERNEL_MIN_WEIGHTS and compiled.runs_on(x, w, y)


@register("InnerProduct")
class InnerProduct(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def _axis(self, ndim):
        axis = int(self.param.inner_product_param.axis)
        if not -ndim <= axis < ndim:
            raise self.error(f"axis {axis} out of range for a {ndim}-D bottom", ShapeError)
        return axis % ndim

    def setup(self, bottom, top):
        ip = self.param.inner_product_param
        self.num_output = int(ip.num_output)
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        self.bias_term = bool(ip.bias_term)
        self.transpose = bool(ip.transpose)
        shape = bottom[0].shape
        axis = self._axis(len(shape))
        k = 1
        for s in shape[axis:]:
            k *= s
        self.param_propagate_down = [True] * (1 + self.bias_term)
        if self.blobs:
            return  # given (shared or preloaded): reshape checks they fit
        wshape = (k, self.num_output) if self.transpose else (self.num_output, k)
        w = Blob(wshape)
        w.data[...] = fillers.fill(ip.weight_filler, wshape, dtype=w.dtype, layer=self.name)
        self.blobs.append(w)
        if self.bias_term:
            b = Blob((self.num_output,))
            b.data[...] = fillers.fill(ip.bias_filler, (self.num_output,), dtype=b.dtype, layer=self.name)
            self.blobs.append(b)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        axis = self._axis(len(shape))
        m = 1
        for s in shape[:axis]:
            m *= s
        k = 1
        for s in shape[axis:]:
            k *= s
        wshape = tuple(self.blobs[0].shape)
        want = (k, self.num_output) if self.transpose else (self.num_output, k)
        if wshape != want:
            layout = "K x num_output" if self.transpose else "num_output x K"
            raise self.error(f"input {shape} flattened from axis {axis} has K={k} features, but the weight "
                             f"shape is {wshape} (expected {want}, {layout})", ShapeError)
        if self.bias_term and (len(self.blobs) < 2 or self.blobs[1].count != self.num_output):
            got = tuple(self.blobs[1].shape) if len(self.blobs) > 1 else "missing"
            raise self.error(f"bias shape {got} does not match num_output {self.num_output}", ShapeError)
        self.m, self.k = m, k
        top[0].reshape(tuple(shape[:axis]) + (self.num_output,))

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].xdata.reshape(self.m, self.k)
        w = self.blobs[0].xdata
        y = top[0].xdata.reshape(self.m, self.num_output)
        if xp is np and not self.transpose and _rows_pay(x, w, y):
            kernel = compiled.get(compiled.inner_product_rows)
            threads.parallel_for(self.num_output, lambda o0, o1: kernel(w, x, y, o0, o1), work=w.size)
        elif xp is np and not self.transpose and _weights_first_pays(self.m, self.k):
            np.copyto(y, blas.matmul(w, x.T).T)
        else:
            blas.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].xdata.reshape(1, -1)

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        dy = top[0].xdiff.reshape(self.m, self.num_output)
        w = self.blobs[0].xdata
        x = bottom[0].xdata.reshape(self.m, self.k)
        dw = self.blobs[0].xdiff if self.need_param_grad(0) else None
        dx = bottom[0].xdiff.reshape(self.m, self.k) if propagate_down[0] else None
        wanted = [a for a in (dw, dx) if a is not None]
        if xp is np and not self.transpose and wanted and _rows_pay(x, w, dy, ROWS_KERNEL_BACKWARD_MAX_M) \
                and compiled.runs_on(x, *wanted):
            # one pass over the weights for both gradients (compiled.inner_product_rows_backward);
            # w and x stand in for a gradient not wanted (the kernel does not touch it)
            kernel = compiled.get(compiled.inner_product_rows_backward)
            dw_, dx_ = (w if dw is None else dw), (x if dx is None else dx)
            threads.parallel_for(self.k, lambda j0, j1: kernel(
                w, x, dy, dw_, dx_, dw is not None, dx is not None, j0, j1), work=3 * w.size)
            self._bias_grad(dy)
            return
        if dw is not None:
            if self.transpose:
                _accumulate_product(xp, x.T, dy, dw)
            else:
                _accumulate_product(xp, dy.T, x, dw)
        self._bias_grad(dy)
        if dx is not None:
            if xp is np and not self.transpose and _data_grad_weights_first_pays(self.m, self.k):
                np.copyto(dx, blas.matmul(w.T, dy.T).T)
            else:
                blas.matmul(dy, w.T if self.transpose else w, out=dx)

    def _bias_grad(self, dy):
        if self.bias_term and self.need_param_grad(1):
            self.blobs[1].xdiff += dy.sum(axis=0).reshape(self.blobs[1].shape)
