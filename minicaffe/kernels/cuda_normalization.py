"""BatchNorm and Scale on the GPU: per-channel reductions in one launch, the rest element-wise.

Why: the layers' array code (``layers/normalization.py``) is a dozen passes over the blob per
forward or backward (two means, a subtraction, a square, a reciprocal, a copy, the moving-average
updates as separate small launches...). Here:

* A per-channel reduction is one ``RawKernel`` launch with one block per channel: every thread
  sums a fixed stride of the channel's ``N·S`` values in double, then the block adds the partial
  sums in a fixed tree in shared memory. The block size is fixed (``BLOCK``), so the order of the
  additions, and the result, is the same on every run and every GPU: deterministic, unlike atomics.
* BatchNorm training forward: the statistics kernel computes the batch mean and the (biased)
  variance in two passes over the channel (the variance of ``x − mean``, as the CPU code does),
  ``1/sqrt(var + eps)``, and updates the three stored blobs with Caffe's moving average (blob 2
  accumulates the factor: ``f = f·maf + 1``; the variance is stored times ``m/(m−1)``); one
  element-wise kernel then writes the normalised values to the top and to the copy kept for the
  gradient. 2 launches. With global statistics, one element-wise kernel that reads the mean and
  variance estimates (blob / factor, 0 when the factor is 0) per element. 1 launch.
* BatchNorm backward: batch statistics, one reduction of ``dy`` and ``dy·y`` per channel and one
  element-wise ``(dy − mean(dy) − mean(dy·y)·y)/std``; global statistics, one ``dy/std``.
* Scale with a learned scale (one bottom; any ``axis``/``num_axes``, as ``(outer, dim, inner)``):
  forward ``y = x·s (+ b)`` in one kernel (which also keeps the input when the layer runs in place
  and the scale's gradient is needed); backward one reduction adding ``Σ dy·x`` and ``Σ dy`` to the
  parameter diffs (accumulated, as Caffe's Scale and Bias do with learned blobs) and one
  ``dx = dy·s``. A scale given as bottom[1] keeps the layer's own code.

The float arithmetic is the CPU code's in the blobs' float type, except that sums are accumulated
in double and (on the GPU) ``a·b + c`` may be contracted to one fused multiply-add.
"""
import numpy as np

from . import _cuda, emulation, engines

BN_STATS = "minicaffe_bn_stats"
BN_NORMALIZE = "minicaffe_bn_normalize"
BN_GLOBAL = "minicaffe_bn_global"
BN_GRAD_SUMS = "minicaffe_bn_grad_sums"
BN_BACKWARD = "minicaffe_bn_backward"
BN_GLOBAL_BACKWARD = "minicaffe_bn_global_backward"
SCALE_FORWARD = "minicaffe_scale_fwd"
SCALE_FORWARD_SAVE = "minicaffe_scale_fwd_save"
SCALE_PARAM_GRAD = "minicaffe_scale_param_grad"
SCALE_BACKWARD = "minicaffe_scale_bwd"

BLOCK = 512     # threads per reduction block: fixed, so the summation order never changes

# The reduction core shared by the per-channel kernels: thread t of block c walks the channel's
# values k = t, t + BLOCK, ... (value k at ((k / inner) * dim + c) * inner + k % inner), the block
# then folds its BLOCK partial sums pairwise in shared memory.
_CHANNEL = """
  const long long c = blockIdx.x;
  const long long m = outer * inner;
"""
_CHANNEL_LOOP = """
  for (long long k = threadIdx.x; k < m; k += blockDim.x) {
    const long long o = k / inner;
    const long long idx = (o * dim + c) * inner + (k - o * inner);
"""
_FOLD = """
__device__ void __NAME___fold(double* s) {
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
}
"""

_BN_STATS_SRC = _FOLD + """
extern "C" __global__ void __NAME__(const __T__* x, long long outer, long long dim, long long inner,
    __T__ eps, __T__ maf, __T__ correction, long long update,
    __T__* mean_out, __T__* inv_std_out, __T__* run_mean, __T__* run_var, __T__* run_factor) {
  __shared__ double s[%(block)d];
  double acc = 0.0;
""" % {"block": BLOCK} + _CHANNEL + _CHANNEL_LOOP + """
    acc += (double)x[idx];
  }
  s[threadIdx.x] = acc;
  __syncthreads();
  __NAME___fold(s);
  const __T__ mean = (__T__)(s[0] / (double)m);
  __syncthreads();
  acc = 0.0;
""" + _CHANNEL_LOOP + """
    const __T__ d = x[idx] - mean;
    acc += (double)(d * d);
  }
  s[threadIdx.x] = acc;
  __syncthreads();
  __NAME___fold(s);
  if (threadIdx.x == 0) {
    const __T__ var = (__T__)(s[0] / (double)m);
    mean_out[c] = mean;
    inv_std_out[c] = (__T__)1 / sqrt(var + eps);
    if (update) {
      run_mean[c] = run_mean[c] * maf + mean;
      run_var[c] = run_var[c] * maf + var * correction;
      if (c == 0) run_factor[0] = run_factor[0] * maf + (__T__)1;
    }
  }
}
"""

_BN_GRAD_SUMS_SRC = _FOLD + """
extern "C" __global__ void __NAME__(const __T__* dy, const __T__* y, long long outer, long long dim,
    long long inner, __T__* mean_dy, __T__* mean_dy_y) {
  __shared__ double s[%(block)d];
  __shared__ double t[%(block)d];
  double a = 0.0, b = 0.0;
""" % {"block": BLOCK} + _CHANNEL + _CHANNEL_LOOP + """
    a += (double)dy[idx];
    b += (double)(dy[idx] * y[idx]);
  }
  s[threadIdx.x] = a;
  t[threadIdx.x] = b;
  __syncthreads();
  __NAME___fold(s);
  __NAME___fold(t);
  if (threadIdx.x == 0) {
    mean_dy[c] = (__T__)(s[0] / (double)m);
    mean_dy_y[c] = (__T__)(t[0] / (double)m);
  }
}
"""

_SCALE_PARAM_GRAD_SRC = _FOLD + """
extern "C" __global__ void __NAME__(const __T__* dy, const __T__* x, long long outer, long long dim,
    long long inner, long long do_scale, long long do_bias, __T__* scale_diff, __T__* bias_diff) {
  __shared__ double s[%(block)d];
  __shared__ double t[%(block)d];
  double a = 0.0, b = 0.0;
""" % {"block": BLOCK} + _CHANNEL + _CHANNEL_LOOP + """
    if (do_scale) a += (double)(dy[idx] * x[idx]);
    if (do_bias) b += (double)dy[idx];
  }
  s[threadIdx.x] = a;
  t[threadIdx.x] = b;
  __syncthreads();
  __NAME___fold(s);
  __NAME___fold(t);
  if (threadIdx.x == 0) {
    if (do_scale) scale_diff[c] = scale_diff[c] + (__T__)s[0];
    if (do_bias) bias_diff[c] = bias_diff[c] + (__T__)t[0];
  }
}
"""

# element-wise: (inputs, outputs, body); ``i`` is the flat index, the channel (i / inner) % dim
_CH = "const long long c = (i / inner) % dim;"
_FACTOR = "const __T__ f0 = run_factor[0]; const __T__ f = f0 == (__T__)0 ? (__T__)0 : (__T__)1 / f0;"
_ELEMENTWISE = {
    BN_NORMALIZE: ("__D__ x, raw __D__ mean, raw __D__ inv_std, int64 dim, int64 inner", "__D__ y, __D__ xn",
                   _CH + " const __T__ v = (x - mean[c]) * inv_std[c]; xn = v; y = v;"),
    # the estimates as the CPU code forms them: f = factor == 0 ? 0 : 1/factor, mean·f, var·f
    BN_GLOBAL: ("__D__ x, raw __D__ run_mean, raw __D__ run_var, raw __D__ run_factor, __D__ eps, "
                "int64 dim, int64 inner", "__D__ y",
                _CH + _FACTOR + " const __T__ inv = (__T__)1 / sqrt(run_var[c] * f + eps);"
                " y = (x - run_mean[c] * f) * inv;"),
    BN_BACKWARD: ("__D__ dy, __D__ y, raw __D__ mean_dy, raw __D__ mean_dy_y, raw __D__ inv_std, "
                  "int64 dim, int64 inner", "__D__ dx",
                  _CH + " dx = (dy - (y * mean_dy_y[c] + mean_dy[c])) * inv_std[c];"),
    BN_GLOBAL_BACKWARD: ("__D__ dy, raw __D__ run_var, raw __D__ run_factor, __D__ eps, int64 dim, int64 inner",
                         "__D__ dx",
                         _CH + _FACTOR + " dx = dy * ((__T__)1 / sqrt(run_var[c] * f + eps));"),
    SCALE_FORWARD: ("__D__ x, raw __D__ s, raw __D__ b, int64 has_bias, int64 dim, int64 inner", "__D__ y",
                    _CH + " const __T__ v = x * s[c]; y = has_bias ? v + b[c] : v;"),
    SCALE_FORWARD_SAVE: ("__D__ x, raw __D__ s, raw __D__ b, int64 has_bias, int64 dim, int64 inner",
                         "__D__ y, __D__ saved",
                         _CH + " const __T__ xv = x; const __T__ v = xv * s[c]; saved = xv;"
                         " y = has_bias ? v + b[c] : v;"),
    SCALE_BACKWARD: ("__D__ dy, raw __D__ s, int64 dim, int64 inner", "__D__ dx", _CH + " dx = dy * s[c];"),
}
_RAW = {BN_STATS: _BN_STATS_SRC, BN_GRAD_SUMS: _BN_GRAD_SUMS_SRC, SCALE_PARAM_GRAD: _SCALE_PARAM_GRAD_SRC}


def _ew(name, dtype):
    return _cuda.elementwise_kernel(name, *_ELEMENTWISE[name], dtype)


def _per_channel(name, dtype, dim, *args):
    """One block per channel (``dim`` blocks of ``BLOCK`` threads)."""
    if dim <= 0:
        return
    _cuda.raw_kernel(name, _RAW[name], dtype)((int(dim),), (BLOCK,), args)


# --- the kernel wrappers (arrays of the current module; (outer, dim, inner) = the blob as 3 axes) ----

def bn_stats(x3, eps, maf, correction, update, mean, inv_std, run_mean, run_var, run_factor):
    outer, dim, inner = x3.shape
    dt = x3.dtype
    _per_channel(BN_STATS, dt, dim, x3, *_cuda.i64(outer, dim, inner), *_cuda.scalars(dt, eps, maf, correction),
                 np.int64(bool(update)), mean, inv_std, run_mean, run_var, run_factor)


def bn_normalize(x3, mean, inv_std, y3, xn3):
    _, dim, inner = x3.shape
    _ew(BN_NORMALIZE, x3.dtype)(x3, mean, inv_std, *_cuda.i64(dim, inner), y3, xn3)


def bn_global(x3, run_mean, run_var, run_factor, eps, y3):
    _, dim, inner = x3.shape
    _ew(BN_GLOBAL, x3.dtype)(x3, run_mean, run_var, run_factor, *_cuda.scalars(x3.dtype, eps),
                             *_cuda.i64(dim, inner), y3)


def bn_grad_sums(dy3, y3, mean_dy, mean_dy_y):
    outer, dim, inner = dy3.shape
    _per_channel(BN_GRAD_SUMS, dy3.dtype, dim, dy3, y3, *_cuda.i64(outer, dim, inner), mean_dy, mean_dy_y)


def bn_backward(dy3, y3, mean_dy, mean_dy_y, inv_std, dx3):
    _, dim, inner = dy3.shape
    _ew(BN_BACKWARD, dy3.dtype)(dy3, y3, mean_dy, mean_dy_y, inv_std, *_cuda.i64(dim, inner), dx3)


def bn_global_backward(dy3, run_var, run_factor, eps, dx3):
    _, dim, inner = dy3.shape
    _ew(BN_GLOBAL_BACKWARD, dy3.dtype)(dy3, run_var, run_factor, *_cuda.scalars(dy3.dtype, eps),
                                       *_cuda.i64(dim, inner), dx3)


def scale_forward(x3, s, b, y3, saved=None):
    """``y = x·s (+ b)``; ``saved`` (optional) receives a copy of ``x`` in the same pass."""
    _, dim, inner = x3.shape
    flags = (np.int64(b is not None),) + _cuda.i64(dim, inner)
    b = s if b is None else b
    if saved is None:
        _ew(SCALE_FORWARD, x3.dtype)(x3, s, b, *flags, y3)
    else:
        _ew(SCALE_FORWARD_SAVE, x3.dtype)(x3, s, b, *flags, y3, saved)


def scale_param_grad(dy3, x3, scale_diff, bias_diff):
    """``scale_diff += Σ dy·x`` and ``bias_diff += Σ dy`` per channel (either may be None)."""
    outer, dim, inner = dy3.shape
    if scale_diff is None and bias_diff is None:
        return
    do_scale, do_bias = scale_diff is not None, bias_diff is not None
    any_diff = scale_diff if do_scale else bias_diff
    _per_channel(SCALE_PARAM_GRAD, dy3.dtype, dim, dy3, x3 if x3 is not None else dy3,
                 *_cuda.i64(outer, dim, inner, do_scale, do_bias),
                 scale_diff if do_scale else any_diff, bias_diff if do_bias else any_diff)


def scale_backward(dy3, s, dx3):
    _, dim, inner = dy3.shape
    _ew(SCALE_BACKWARD, dy3.dtype)(dy3, s, *_cuda.i64(dim, inner), dx3)


# --- the engines ------------------------------------------------------------------------------------

def _flat(arr):
    """A blob's array as 1-D: a view (blob arrays are C-contiguous, ``Blob._set_x`` sees to it),
    so the kernels write into the blob."""
    assert arr.flags.c_contiguous
    return arr.reshape(-1)


class CudaBatchNorm:
    """BatchNorm's GPU engine (``normalize``/``normalize_backward`` on (N, C, S) arrays, as the
    layer's own methods): 2 launches forward and backward with batch statistics, 1 each with
    global statistics."""

    def __init__(self, layer):
        self.layer = layer
        self._mean = self._inv_std = self._x_norm = None

    def normalize(self, x3, y3):
        layer = self.layer
        xp = layer.xp
        x3 = _cuda.contiguous(xp, x3)
        run = [_flat(b.xdata) for b in layer.blobs]
        if layer.use_global_stats:
            bn_global(x3, run[0], run[1], run[2], layer.eps, y3)
            return
        outer, c, inner = x3.shape
        m = outer * inner
        if self._mean is None or self._mean.dtype != x3.dtype:
            self._mean, self._inv_std = xp.empty(c, x3.dtype), xp.empty(c, x3.dtype)
        if self._x_norm is None or self._x_norm.dtype != x3.dtype:
            self._x_norm = xp.empty_like(x3)
        bn_stats(x3, layer.eps, layer.moving_average_fraction, m / (m - 1) if m > 1 else 1.0, True,
                 self._mean, self._inv_std, *run)
        bn_normalize(x3, self._mean, self._inv_std, y3, self._x_norm)

    def normalize_backward(self, dy3, dx3):
        layer = self.layer
        xp = layer.xp
        dy3 = _cuda.contiguous(xp, dy3)
        if layer.use_global_stats:
            bn_global_backward(dy3, _flat(layer.blobs[1].xdata), _flat(layer.blobs[2].xdata), layer.eps, dx3)
            return
        c = dy3.shape[1]
        mean_dy, mean_dy_y = xp.empty(c, dy3.dtype), xp.empty(c, dy3.dtype)
        bn_grad_sums(dy3, self._x_norm, mean_dy, mean_dy_y)
        bn_backward(dy3, self._x_norm, mean_dy, mean_dy_y, self._inv_std, dx3)


class CudaScale:
    """Scale's GPU engine for a learned scale (one bottom): ``scale_forward`` and
    ``scale_backward`` on (outer, dim, inner) arrays, as the layer's own methods."""

    def __init__(self, layer):
        self.layer = layer
        self._saved = None

    def scale_forward(self, x3, s, b, y3, keep_input):
        xp = self.layer.xp
        x3 = _cuda.contiguous(xp, x3)
        saved = None
        if keep_input:       # one buffer, reused: the backward of the last forward has read it
            saved = self._saved
            if saved is None or saved.shape != x3.shape or saved.dtype != x3.dtype:
                saved = self._saved = xp.empty_like(x3)
        scale_forward(x3, _flat(s), None if b is None else _flat(b), y3, saved)
        return saved

    def scale_backward(self, dy3, x3, scale, as_bottom, want_bias, dx3):
        layer = self.layer
        xp = layer.xp
        dy3 = _cuda.contiguous(xp, dy3)
        scale_diff = None if x3 is None else _flat(scale.xdiff)
        if scale_diff is not None and layer.scale_diff_overwrites:
            scale_diff.fill(0)       # the kernel adds; Caffe writes this diff in this shape
        bias_diff = _flat(layer.blobs[layer.bias_index].xdiff) if want_bias else None
        scale_param_grad(dy3, None if x3 is None else _cuda.contiguous(xp, x3), scale_diff, bias_diff)
        if dx3 is not None:
            scale_backward(dy3, _flat(scale.xdata), dx3)


engines.register(engines.Engine("BatchNorm", "cuda", build=CudaBatchNorm, devices=("gpu",), priority=20))
engines.register(engines.Engine("Scale", "cuda", build=CudaScale, devices=("gpu",), priority=20,
                                applies=lambda layer: layer.num_bottoms == 1))


# --- NumPy references (what the stand-in runs for each kernel name) -----------------------------------

def _geometry(args, at):
    return tuple(int(v) for v in args[at:at + 3])


def _channel_sum(a3):
    """Per-channel sums of an (outer, dim, inner) array, in double (as the kernels accumulate)."""
    return a3.astype(np.float64).sum(axis=(0, 2))


def _ref_bn_stats(grid, block, args, shared_mem=0):
    x, (outer, dim, inner) = args[0], _geometry(args, 1)
    t = x.dtype.type
    eps, maf, correction = (t(v) for v in args[4:7])
    update = int(args[7])
    mean_out, inv_std_out, run_mean, run_var, run_factor = args[8:13]
    x3 = x.reshape(outer, dim, inner)
    m = outer * inner
    mean = (_channel_sum(x3) / m).astype(x.dtype)
    d = x3 - mean.reshape(1, dim, 1)
    var = (_channel_sum(d * d) / m).astype(x.dtype)
    mean_out[...] = mean
    inv_std_out[...] = t(1) / np.sqrt(var + eps)
    if update:
        run_mean[...] = run_mean * maf + mean
        run_var[...] = run_var * maf + var * correction
        run_factor[0] = run_factor[0] * maf + t(1)


def _ref_bn_grad_sums(grid, block, args, shared_mem=0):
    dy, y, (outer, dim, inner) = args[0], args[1], _geometry(args, 2)
    mean_dy, mean_dy_y = args[5:7]
    dy3, y3 = dy.reshape(outer, dim, inner), y.reshape(outer, dim, inner)
    m = outer * inner
    mean_dy[...] = (_channel_sum(dy3) / m).astype(dy.dtype)
    mean_dy_y[...] = (_channel_sum(dy3 * y3) / m).astype(dy.dtype)


def _ref_scale_param_grad(grid, block, args, shared_mem=0):
    dy, x, (outer, dim, inner) = args[0], args[1], _geometry(args, 2)
    do_scale, do_bias = int(args[5]), int(args[6])
    scale_diff, bias_diff = args[7:9]
    dy3 = dy.reshape(outer, dim, inner)
    if do_scale:
        scale_diff[...] = scale_diff + _channel_sum(dy3 * x.reshape(outer, dim, inner)).astype(dy.dtype)
    if do_bias:
        bias_diff[...] = bias_diff + _channel_sum(dy3).astype(dy.dtype)


def _channel_view(a, x, dim, inner):
    """``a[c]`` broadcast against ``x`` seen as (outer, dim, inner)."""
    return a.reshape(-1)[:dim].reshape(1, dim, 1), x.reshape(-1, dim, inner)


def _ref_bn_normalize(x, mean, inv_std, dim, inner, y, xn):
    m, x3 = _channel_view(mean, x, dim, inner)
    v = (x3 - m) * inv_std.reshape(1, -1, 1)
    xn.reshape(x3.shape)[...] = v
    y.reshape(x3.shape)[...] = v
    return y, xn


def _ref_factor(run_factor):
    t = run_factor.dtype.type
    f0 = run_factor.reshape(-1)[0]
    return t(0) if f0 == 0 else t(1) / f0


def _ref_bn_global(x, run_mean, run_var, run_factor, eps, dim, inner, y):
    t = x.dtype.type
    f = _ref_factor(run_factor)
    mean, x3 = _channel_view(run_mean, x, dim, inner)
    var = run_var.reshape(1, -1, 1)
    inv = t(1) / np.sqrt(var * f + t(eps))
    y.reshape(x3.shape)[...] = (x3 - mean * f) * inv
    return y


def _ref_bn_backward(dy, y, mean_dy, mean_dy_y, inv_std, dim, inner, dx):
    mdy, dy3 = _channel_view(mean_dy, dy, dim, inner)
    y3 = y.reshape(dy3.shape)
    dx.reshape(dy3.shape)[...] = (dy3 - (y3 * mean_dy_y.reshape(1, -1, 1) + mdy)) * inv_std.reshape(1, -1, 1)
    return dx


def _ref_bn_global_backward(dy, run_var, run_factor, eps, dim, inner, dx):
    t = dy.dtype.type
    f = _ref_factor(run_factor)
    var, dy3 = _channel_view(run_var, dy, dim, inner)
    dx.reshape(dy3.shape)[...] = dy3 * (t(1) / np.sqrt(var * f + t(eps)))
    return dx


def _ref_scale_forward(x, s, b, has_bias, dim, inner, y, saved=None):
    sc, x3 = _channel_view(s, x, dim, inner)
    xv = x3.copy()
    v = xv * sc
    if saved is not None:
        saved.reshape(x3.shape)[...] = xv
    y.reshape(x3.shape)[...] = v + b.reshape(1, -1, 1) if int(has_bias) else v
    return y if saved is None else (y, saved)


def _ref_scale_backward(dy, s, dim, inner, dx):
    sc, dy3 = _channel_view(s, dy, dim, inner)
    dx.reshape(dy3.shape)[...] = dy3 * sc
    return dx


for _base, _fn in ((BN_STATS, _ref_bn_stats), (BN_GRAD_SUMS, _ref_bn_grad_sums),
                   (SCALE_PARAM_GRAD, _ref_scale_param_grad), (BN_NORMALIZE, _ref_bn_normalize),
                   (BN_GLOBAL, _ref_bn_global), (BN_BACKWARD, _ref_bn_backward),
                   (BN_GLOBAL_BACKWARD, _ref_bn_global_backward), (SCALE_FORWARD, _ref_scale_forward),
                   (SCALE_FORWARD_SAVE, _ref_scale_forward), (SCALE_BACKWARD, _ref_scale_backward)):
    for _name in _cuda.names(_base):
        emulation.reference(_name)(_fn)
