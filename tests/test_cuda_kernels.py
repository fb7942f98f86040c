"""minicaffe's CUDA kernels: each NumPy reference equals the layer's CPU code, and (on a GPU) each
real kernel equals its reference.

Two halves:
* CPU (always): the kernel wrappers run with NumPy arrays while ``_cuda._cupy`` is swapped for an
  emulation that routes every RawKernel / ElementwiseKernel launch to its registered reference
  (``minicaffe.kernels.emulation``). That runs the wrappers' argument order, shapes and launch
  bookkeeping, and proves the reference computes what the layer's CPU code computes, on random
  inputs with padding, strides, dilation and odd shapes.
* GPU (the ``gpu`` fixture: real CuPy where a device is visible, i.e. the real compiled kernels;
  the suite's CuPy stand-in elsewhere, if it has one): the same wrappers on device arrays against
  the CPU result, and whole layers in GPU mode against CPU mode.
"""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.kernels import im2col as im2col_mod
from minicaffe.kernels.im2col import ConvGeometry
from minicaffe.kernels import _cuda, cuda_im2col, emulation


class _EmuKernel:
    def __init__(self, name, raw):
        if name not in emulation.REFERENCES:
            raise AssertionError(f"kernel {name!r} has no NumPy reference")
        self.name, self.raw = name, raw

    def __call__(self, *args, **kwargs):
        ref = emulation.REFERENCES[self.name]
        if self.raw:
            grid, block, kargs = args
            assert all(int(g) > 0 for g in grid) and all(0 < int(b) <= 1024 for b in block)
            for a in kargs:
                # scalars must be typed exactly as the kernel signature declares them
                assert isinstance(a, (np.ndarray, np.int64, np.float32, np.float64)), type(a)
            return ref(grid, block, kargs, **kwargs)
        return ref(*args, **kwargs)


class _EmuCupy:
    @staticmethod
    def RawKernel(src, name, **kw):
        assert f'extern "C" __global__ void {name}(' in src
        return _EmuKernel(name, raw=True)

    @staticmethod
    def ElementwiseKernel(in_params, out_params, operation, name, **kw):
        return _EmuKernel(name, raw=False)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(_cuda, "_cupy", lambda: _EmuCupy)
    _cuda._cache.clear()
    yield
    _cuda._cache.clear()


class _cpu_mode:
    """CPU mode inside a GPU-mode test (the layers' CPU code gives the expected values)."""

    def __enter__(self):
        self.was_gpu = backend.is_gpu()
        backend.set_mode_cpu()

    def __exit__(self, *exc):
        if self.was_gpu:
            backend.set_mode_gpu()


GEOMS = [
    # (N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    (2, 3, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1),
    (1, 2, 8, 5, 3, 2, 2, 1, 1, 0, 1, 1),
    (3, 1, 11, 10, 5, 3, 3, 2, 2, 1, 1, 1),
    (2, 2, 9, 9, 3, 3, 1, 2, 2, 2, 2, 2),
    (1, 4, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1),
    (2, 1, 6, 6, 2, 2, 2, 2, 0, 0, 1, 1),
]


def _geom(case):
    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    g = ConvGeometry(kh, kw, sh, sw, ph, pw, dh, dw)
    return (n, c, h, w), g, g.out_size(h, w)


@pytest.mark.parametrize("case", GEOMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_reference_matches_cpu(emulated, case, dtype):
    shape, g, ohw = _geom(case)
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    want = im2col_mod.im2col(x, g, ohw).copy()
    got = cuda_im2col.im2col(x, g, ohw, out=np.full(want.shape, np.nan, dtype))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", GEOMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_reference_matches_cpu(emulated, case, dtype):
    (n, c, h, w), g, (oh, ow) = _geom(case)
    col = np.random.default_rng(1).standard_normal((c, g.kh, g.kw, n, oh, ow)).astype(dtype)
    want = im2col_mod.col2im(col, g, (h, w), out=np.empty((n, c, h, w), dtype))
    got = np.full((n, c, h, w), np.nan, dtype)
    cuda_im2col.col2im(col, g, (h, w), out=got)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_col2im_writes_a_non_contiguous_output(emulated):
    (n, c, h, w), g, (oh, ow) = _geom(GEOMS[0])
    col = np.random.default_rng(2).standard_normal((c, g.kh, g.kw, n, oh, ow)).astype(np.float32)
    want = im2col_mod.col2im(col, g, (h, w), out=np.empty((n, c, h, w), np.float32))
    big = np.zeros((n, c, h, w + 3), np.float32)
    cuda_im2col.col2im(col, g, (h, w), out=big[..., :w])
    np.testing.assert_allclose(big[..., :w], want, rtol=1e-5, atol=1e-6)
    assert not big[..., w:].any()


# --- real kernels (GPU only) -------------------------------------------------------------------

@pytest.mark.parametrize("case", GEOMS)
def test_im2col_col2im_kernels_on_gpu(case, gpu):
    cp = backend.xp()
    (n, c, h, w), g, (oh, ow) = _geom(case)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    col = rng.standard_normal((c, g.kh, g.kw, n, oh, ow)).astype(np.float32)
    want_col = im2col_mod.im2col(x, g, (oh, ow)).copy()
    want_x = im2col_mod.col2im(col, g, (h, w), out=np.empty_like(x))
    got_col = cuda_im2col.im2col(cp.asarray(x), g, (oh, ow)).get()
    got_x = cp.empty(x.shape, cp.float32)
    cuda_im2col.col2im(cp.asarray(col), g, (h, w), out=got_x)
    np.testing.assert_array_equal(got_col, want_col)
    np.testing.assert_allclose(got_x.get(), want_x, rtol=1e-5, atol=1e-5)


# --- whole layers, GPU mode against CPU mode (GPU only) ------------------------------------------

def _run_layer(text, bottoms, gpu, params=None, num_top=1, phase=None, seed=5):
    """forward + backward of one layer; returns (tops, bottom diffs, param diffs, params) as NumPy."""
    from minicaffe.testing import TRAIN, make_layer
    was_gpu = backend.is_gpu()
    (backend.set_mode_gpu if gpu else backend.set_mode_cpu)()
    try:
        layer, bottom, top = make_layer(text, bottoms, num_top, TRAIN if phase is None else phase)
        if params is not None:
            for blob, p in zip(layer.blobs, params):
                blob.data[...] = p
        params = [b.data.copy() for b in layer.blobs]
        for b in layer.blobs:
            b.diff[...] = 0
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        tops = [t.data.copy() for t in top]
        rng = np.random.default_rng(seed)
        for t in top:
            t.diff[...] = rng.standard_normal(t.shape)
        layer.backward(top, [True] * len(bottom), bottom)
        return tops, [b.diff.copy() for b in bottom], [b.diff.copy() for b in layer.blobs], params
    finally:
        (backend.set_mode_gpu if was_gpu else backend.set_mode_cpu)()


def assert_layer_gpu_matches_cpu(text, bottoms, num_top=1, rtol=1e-4, atol=1e-5, phase=None, params=None):
    """(inside a test that takes the ``gpu`` fixture)"""
    cpu = _run_layer(text, bottoms, False, params=params, num_top=num_top, phase=phase)
    gpu = _run_layer(text, bottoms, True, params=cpu[3], num_top=num_top, phase=phase)
    for what, a, b in zip(("top", "bottom diff", "param diff"), cpu[:3], gpu[:3]):
        for k, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol, err_msg=f"{what} {k}")


@pytest.mark.parametrize("spec", [
    "num_output: 4 kernel_size: 3 pad: 1",
    "num_output: 6 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 2",
    "num_output: 3 kernel_size: 3 dilation: 2 pad: 2 stride: 2",
])
def test_convolution_layer_on_gpu(spec, gpu):
    text = (f'type: "Convolution" convolution_param {{ {spec} weight_filler {{ type: "gaussian" std: 0.1 }} '
            f'bias_filler {{ type: "constant" value: 0.1 }} }}')
    x = np.random.default_rng(4).standard_normal((3, 4, 9, 11)).astype(np.float32)
    assert_layer_gpu_matches_cpu(text, [x])


# --- pooling ---------------------------------------------------------------------------------------

POOL_CASES = [
    ("kernel_size: 3 stride: 2 pad: 1", 6, 6),
    ("kernel_size: 3 stride: 2", 7, 8),                      # ceil rounding: overhanging windows
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1", 5, 7),
    ("kernel_size: 2 stride: 2", 8, 6),
    ("kernel_size: 3 stride: 1 pad: 2", 4, 5),
    ("kernel_size: 3 stride: 3 round_mode: FLOOR", 10, 11),
]


def _pool_cpu(method, spec, x, dy_seed=6):
    """The layer's CPU forward (top, argmax mask for MAX) and backward, and the layer itself."""
    from minicaffe.testing import make_layer
    text = f'type: "Pooling" pooling_param {{ pool: {method} {spec} }}'
    num_top = 2 if method == "MAX" else 1
    import contextlib
    with backend.float64_blobs() if x.dtype == np.float64 else contextlib.nullcontext():
        layer, bottom, top = make_layer(text, [x], num_top=num_top)
    layer.forward(bottom, top)
    dy = np.random.default_rng(dy_seed).standard_normal(top[0].shape).astype(x.dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    assert top[0].data.dtype == x.dtype
    return layer, [t.data.copy() for t in top], dy, bottom[0].diff.copy()


@pytest.mark.parametrize("spec,h,w", POOL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_references_match_cpu(emulated, spec, h, w, dtype):
    from minicaffe.kernels import cuda_pooling
    x = np.random.default_rng(7).standard_normal((2, 3, h, w)).astype(dtype)
    x[0, 0, :2, :2] = 1.5                       # ties: the first maximum must win
    layer, (y_cpu, mask_cpu), dy, dx_cpu = _pool_cpu("MAX", spec, x)
    y = np.full(y_cpu.shape, np.nan, dtype)
    mask = np.empty(y.shape, np.int32)
    cuda_pooling.max_forward(layer, x, y, mask)
    np.testing.assert_array_equal(y, y_cpu)
    np.testing.assert_array_equal(mask, mask_cpu.astype(np.int32))
    dx = np.full(x.shape, np.nan, dtype)
    cuda_pooling.max_backward(layer, dy, mask, dx)
    np.testing.assert_allclose(dx, dx_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,h,w", POOL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ave_pool_references_match_cpu(emulated, spec, h, w, dtype):
    from minicaffe.kernels import cuda_pooling
    x = np.random.default_rng(8).standard_normal((2, 3, h, w)).astype(dtype)
    layer, (y_cpu,), dy, dx_cpu = _pool_cpu("AVE", spec, x)
    y = np.full(y_cpu.shape, np.nan, dtype)
    cuda_pooling.ave_forward(layer, x, y)
    np.testing.assert_allclose(y, y_cpu, rtol=1e-6, atol=1e-6)
    dx = np.full(x.shape, np.nan, dtype)
    cuda_pooling.ave_backward(layer, dy, dx)
    np.testing.assert_allclose(dx, dx_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,h,w", POOL_CASES)
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_kernels_on_gpu(spec, h, w, method, gpu):
    cp = backend.xp()
    from minicaffe.kernels import cuda_pooling
    x = np.random.default_rng(9).standard_normal((2, 3, h, w)).astype(np.float32)
    with _cpu_mode():
        layer, tops, dy, dx_cpu = _pool_cpu(method, spec, x)
    y = cp.empty(tops[0].shape, cp.float32)
    dx = cp.empty(x.shape, cp.float32)
    if method == "MAX":
        mask = cp.empty(y.shape, cp.int32)
        cuda_pooling.max_forward(layer, cp.asarray(x), y, mask)
        np.testing.assert_array_equal(mask.get(), tops[1].astype(np.int32))
        cuda_pooling.max_backward(layer, cp.asarray(dy), mask, dx)
    else:
        cuda_pooling.ave_forward(layer, cp.asarray(x), y)
        cuda_pooling.ave_backward(layer, cp.asarray(dy), dx)
    np.testing.assert_allclose(y.get(), tops[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.get(), dx_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,spec,num_top", [
    ("MAX", "kernel_size: 3 stride: 2 pad: 1", 2),
    ("MAX", "kernel_size: 3 stride: 2", 1),
    ("AVE", "kernel_size: 3 stride: 2 pad: 1", 1),
    ("MAX", "global_pooling: true", 1),
])
def test_pooling_layer_on_gpu(method, spec, num_top, gpu):
    x = np.random.default_rng(10).standard_normal((2, 4, 9, 7)).astype(np.float32)
    text = f'type: "Pooling" pooling_param {{ pool: {method} {spec} }}'
    assert_layer_gpu_matches_cpu(text, [x], num_top=num_top)


# --- ReLU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_references_match_cpu(emulated, slope, dtype):
    from minicaffe.kernels import cuda_elementwise
    from minicaffe.layers.activation import ReLU
    from minicaffe.testing import layer_param
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5, 7)).astype(dtype)
    x[0, 0, :3] = 0.0                              # the gradient at 0 is the slope
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer = ReLU(layer_param(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}'), 0)
    layer.setup([], [])
    y_cpu, dx_cpu = np.empty_like(x), np.empty_like(x)
    layer.compute(x, y_cpu)
    layer.gradient(x, y_cpu, dy, dx_cpu)
    y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
    cuda_elementwise.relu_forward(x, layer.slope, y)      # the proto's float32 slope
    cuda_elementwise.relu_backward(x, dy, layer.slope, dx)
    np.testing.assert_array_equal(y, y_cpu)
    np.testing.assert_array_equal(dx, dx_cpu)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_relu_kernels_on_gpu(slope, gpu):
    cp = backend.xp()
    from minicaffe.kernels import cuda_elementwise
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 33)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = cp.empty(x.shape, cp.float32), cp.empty(x.shape, cp.float32)
    cuda_elementwise.relu_forward(cp.asarray(x), slope, y)
    cuda_elementwise.relu_backward(cp.asarray(x), cp.asarray(dy), slope, dx)
    np.testing.assert_allclose(y.get(), np.where(x > 0, x, x * np.float32(slope)), rtol=1e-6)
    np.testing.assert_allclose(dx.get(), np.where(x > 0, dy, dy * np.float32(slope)), rtol=1e-6)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_layer_on_gpu(slope, gpu):
    x = np.random.default_rng(13).standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert_layer_gpu_matches_cpu(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', [x])


# --- solver updates --------------------------------------------------------------------------------

UPDATE_CASES = [
    ("SGD", "momentum: 0.9"),
    ("Nesterov", "momentum: 0.9"),
    ("AdaGrad", "delta: 1e-6"),
    ("RMSProp", "rms_decay: 0.95 delta: 1e-6"),
    ("AdaDelta", "momentum: 0.95 delta: 1e-6"),
    ("Adam", "momentum: 0.9 momentum2: 0.999 delta: 1e-8"),
]


def _rule(kind, spec):
    from google.protobuf import text_format

    from minicaffe.proto import caffe_pb2
    from minicaffe.solvers import solver_class
    param = caffe_pb2.SolverParameter()
    text_format.Merge(f'type: "{kind}" {spec}', param)
    return solver_class(kind).rule_class(param)


def _update_inputs(rule, dtype, seed=14):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((5, 7)).astype(dtype)
    hist = [np.abs(rng.standard_normal(g.shape)).astype(dtype) for _ in range(rule.history_sets)]
    return g, hist


@pytest.mark.parametrize("kind,spec", UPDATE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_references_match_cpu(emulated, kind, spec, dtype):
    rule = _rule(kind, spec)
    g_cpu, h_cpu = _update_inputs(rule, dtype)
    g_ref, h_ref = _update_inputs(rule, dtype)
    tmp = [np.empty_like(g_cpu) for _ in range(rule.scratch)]
    for it in range(3):                     # a few steps: the history feeds back
        rule.compute(g_cpu, h_cpu, tmp, 0.01, it)
        _gpu_compute(rule, g_ref, h_ref, 0.01, it)
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(g_ref, g_cpu, rtol=tol, atol=tol * 1e-3)
        for a, b in zip(h_ref, h_cpu):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 1e-3)
        g_cpu[...] = g_ref[...] = np.random.default_rng(it).standard_normal(g_cpu.shape)


def _gpu_compute(rule, g, hist, rate, it):
    """The GPU branch of ``rule.compute`` on NumPy arrays: its ``_on_gpu`` test is forced true."""
    from minicaffe.solvers import updates
    orig = updates._on_gpu
    updates._on_gpu = lambda arr: True
    try:
        rule.compute(g, hist, [np.empty_like(g) for _ in range(rule.scratch)], rate, it)
    finally:
        updates._on_gpu = orig


@pytest.mark.parametrize("kind,spec", UPDATE_CASES)
def test_update_kernels_on_gpu(kind, spec, gpu):
    cp = backend.xp()
    rule = _rule(kind, spec)
    g_cpu, h_cpu = _update_inputs(rule, np.float32)
    tmp = [np.empty_like(g_cpu) for _ in range(rule.scratch)]
    g_dev = cp.asarray(g_cpu)
    h_dev = [cp.asarray(h) for h in h_cpu]
    for it in range(3):
        rule.compute(g_cpu, h_cpu, tmp, 0.01, it)
        rule.compute(g_dev, h_dev, [cp.empty_like(g_dev) for _ in range(rule.scratch)], 0.01, it)
        np.testing.assert_allclose(g_dev.get(), g_cpu, rtol=1e-5, atol=1e-7)
        for a, b in zip(h_dev, h_cpu):
            np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-7)
        g_cpu[...] = np.random.default_rng(it).standard_normal(g_cpu.shape)
        g_dev[...] = cp.asarray(g_cpu)


# --- every kernel source compiles (where the CUDA compiler is installed; no GPU needed) ------------

def _all_kernel_sources():
    """(name, CUDA source) of every kernel for both float types; ElementwiseKernels wrapped in a
    mock kernel as CuPy's generated code has them (inputs const values, outputs element references)."""
    from minicaffe.kernels import (cuda_activation, cuda_elementwise, cuda_lrn, cuda_normalization, cuda_pooling,
                                   cuda_softmax, cuda_updates)
    ctype = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
    out = []
    for dt, ct in ((np.float32, "float"), (np.float64, "double")):
        sfx = _cuda.suffix(dt)
        for base, tpl in ((cuda_im2col.IM2COL, cuda_im2col._IM2COL_SRC), (cuda_im2col.COL2IM, cuda_im2col._COL2IM_SRC),
                          (cuda_pooling.MAX_FORWARD, cuda_pooling._MAX_FWD_SRC),
                          (cuda_pooling.MAX_BACKWARD, cuda_pooling._MAX_BWD_SRC),
                          (cuda_pooling.AVE_FORWARD, cuda_pooling._AVE_FWD_SRC),
                          (cuda_pooling.AVE_BACKWARD, cuda_pooling._AVE_BWD_SRC),
                          (cuda_softmax.SOFTMAX, cuda_softmax._SOFTMAX_SRC),
                          (cuda_softmax.SOFTMAX_BACKWARD, cuda_softmax._SOFTMAX_BWD_SRC),
                          (cuda_softmax.LOSS, cuda_softmax._LOSS_SRC),
                          (cuda_softmax.LOSS_BACKWARD, cuda_softmax._LOSS_BWD_SRC),
                          (cuda_lrn.FORWARD, cuda_lrn._FWD_SRC), (cuda_lrn.BACKWARD, cuda_lrn._BWD_SRC),
                          *cuda_normalization._RAW.items(),
                          (cuda_activation.PRELU_SLOPE_GRAD, cuda_activation._PRELU_SLOPE_GRAD_SRC),
                          *((f"{cuda_updates.MULTI}_{k[len('minicaffe_'):]}", cuda_updates._multi_src(k))
                            for k in cuda_updates._KERNELS)):
            name = f"{base}_{sfx}"
            out.append((name, tpl.replace("__T__", ct).replace("__NAME__", name)))
        ew = dict(cuda_updates._KERNELS)
        ew[cuda_elementwise.RELU_FORWARD] = cuda_elementwise._RELU_FWD
        ew[cuda_elementwise.RELU_BACKWARD] = cuda_elementwise._RELU_BWD
        ew.update(cuda_elementwise._ELTWISE)
        ew.update(cuda_normalization._ELEMENTWISE)
        ew.update(cuda_activation._ELEMENTWISE)
        for base, (ins, outs, body) in ew.items():
            name = f"{base}_{sfx}"
            params, decls = [], []
            for p, const in [(p, True) for p in ins.split(",")] + [(p, False) for p in outs.split(",")]:
                words = p.replace("__D__", np.dtype(dt).name).split()
                if words[0] == "raw":            # a raw array: indexed by the body itself
                    params.append(f"const {ctype[words[1]]}* {words[2]}")
                    continue
                t, n = words
                c = ctype[t]
                params.append(f"{'const ' if const else ''}{c}* {n}_")
                decls.append(f"{'const ' if const else ''}{c}{'' if const else '&'} {n} = {n}_[i];")
            body = body.replace("__T__", ct)
            out.append((name, f'extern "C" __global__ void {name}({", ".join(params)}, long long n) {{\n'
                              f'  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;'
                              f' i += blockDim.x * gridDim.x) {{ {" ".join(decls)} {body}; }}\n}}\n'))
    return out


def test_kernel_sources_compile_with_nvcc(tmp_path):
    import shutil
    import subprocess
    if shutil.which("nvcc") is None:
        pytest.skip("no CUDA compiler (nvcc)")
    sources = _all_kernel_sources()
    assert len({name for name, _ in sources}) == len(sources)
    for name, _ in sources:
        assert name in emulation.REFERENCES, f"{name} has no NumPy reference"
    ours = {n for n in emulation.REFERENCES if n.startswith("minicaffe_")}
    assert ours <= {name for name, _ in sources}, "a kernel missing from this compile check"
    cu = tmp_path / "all.cu"
    cu.write_text("\n".join(src for _, src in sources))
    r = subprocess.run(["nvcc", "-arch=sm_90", "--ptx", "-o", str(tmp_path / "all.ptx"), str(cu)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = (tmp_path / "all.ptx").read_text()
    for name, _ in sources:
        assert f".entry {name}(" in ptx


# --- softmax and the softmax loss ------------------------------------------------------------------

SOFTMAX_SHAPES = [((4, 7), 1), ((2, 5, 3, 4), 1), ((3, 2, 6), 2), ((5, 3), 0)]


@pytest.mark.parametrize("shape,axis", SOFTMAX_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_references_match_cpu(emulated, shape, axis, dtype):
    from minicaffe.kernels import cuda_softmax
    from minicaffe.layers import loss
    rng = np.random.default_rng(15)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    want = loss.softmax(np, x, axis, np.empty_like(x))
    got = cuda_softmax.softmax(x, axis, np.full_like(x, np.nan))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    want_dx = (dy - (dy * want).sum(axis=axis, keepdims=True)) * want      # Softmax.backward's CPU code
    got_dx = cuda_softmax.softmax_backward(want, dy, axis, np.full_like(x, np.nan))
    np.testing.assert_allclose(got_dx, want_dx, rtol=tol * 10, atol=tol)
    inplace = x.copy()
    cuda_softmax.softmax(inplace, axis, inplace)
    np.testing.assert_allclose(inplace, want, rtol=tol, atol=tol)


LOSS_CASES = [
    ("", (6, 5), 1),
    ("loss_param { ignore_label: 2 }", (6, 5), 1),
    ("loss_param { ignore_label: 1 normalization: FULL }", (3, 4, 2, 3), 1),
    ("loss_param { normalization: BATCH_SIZE }", (3, 4, 2, 3), 1),
    ("loss_param { ignore_label: 0 normalization: NONE } softmax_param { axis: 2 }", (2, 3, 4), 2),
    ("loss_param { ignore_label: 3 }", (4, 4), 1),         # every label ignored: normaliser 1
]


def _loss_inputs(shape, axis, spec, seed=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    label_shape = shape[:axis] + shape[axis + 1:]
    labels = rng.integers(0, shape[axis], label_shape).astype(np.float32)
    if "ignore_label: 3" in spec:
        labels[...] = 3
    return x, labels


@pytest.mark.parametrize("spec,shape,axis", LOSS_CASES)
def test_softmax_loss_references_match_cpu(emulated, spec, shape, axis):
    from minicaffe.kernels import cuda_softmax
    from minicaffe.testing import make_layer
    x, labels = _loss_inputs(shape, axis, spec)
    layer, bottom, top = make_layer(f'type: "SoftmaxWithLoss" {spec}', [x, labels])
    layer.forward(bottom, top)
    top[0].diff[...] = 0.7                              # a loss weight
    layer.backward(top, [True, False], bottom)
    prob = layer.prob
    total, count = cuda_softmax.softmax_loss(prob, labels, axis, layer.ignore)
    from minicaffe.layers.loss import normalizer
    valid = None if layer.ignore is None else int(count)
    assert valid is None or valid == int((labels != layer.ignore).sum())
    norm = normalizer(layer.norm_mode, layer.outer, layer.inner, valid)
    np.testing.assert_allclose(total / norm, top[0].data, rtol=1e-5, atol=1e-7)
    dx = cuda_softmax.softmax_loss_backward(prob, labels, np.float32(0.7) / np.float32(norm), axis,
                                            layer.ignore, np.full_like(x, np.nan))
    np.testing.assert_allclose(dx, bottom[0].diff, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,axis", SOFTMAX_SHAPES[:3])
def test_softmax_layer_on_gpu(shape, axis, gpu):
    x = np.random.default_rng(17).standard_normal(shape).astype(np.float32)
    assert_layer_gpu_matches_cpu(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [x])


@pytest.mark.parametrize("spec,shape,axis", LOSS_CASES)
def test_softmax_loss_layer_on_gpu(spec, shape, axis, gpu):
    from minicaffe.testing import make_layer
    x, labels = _loss_inputs(shape, axis, spec)
    text = f'type: "SoftmaxWithLoss" {spec}'
    with _cpu_mode():
        layer, bottom, top = make_layer(text, [x, labels])
        layer.forward(bottom, top)
        top[0].diff[...] = 0.7
        layer.backward(top, [True, False], bottom)
        want_loss, want_dx = top[0].data.copy(), bottom[0].diff.copy()
    layer, bottom, top = make_layer(text, [x, labels], num_top=2)
    layer.forward(bottom, top)
    top[0].diff[...] = 0.7
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(top[0].data, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bottom[0].diff, want_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(top[1].data.sum(axis=axis), 1.0, rtol=1e-5)


@pytest.mark.parametrize("on_device", [False, True])
def test_softmax_loss_bad_label_on_gpu(on_device, gpu):
    from minicaffe.errors import NetError
    from minicaffe.testing import make_layer
    x = np.zeros((3, 4), np.float32)
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 9 }',
                                    [x, np.array([1, 4, 9], np.float32)])
    if on_device:
        bottom[1].xdata                  # the labels' newest copy is on the device now
        assert not bottom[1].host_is_current()
    with pytest.raises(NetError, match=r"label 4 is out of range \[0, 4\) and is not the ignore_label 9"):
        layer.forward(bottom, top)


# --- LRN across channels ---------------------------------------------------------------------------

LRN_CASES = ["local_size: 5 alpha: 0.0001 beta: 0.75", "local_size: 3 alpha: 0.5 beta: 0.6 k: 2",
             "local_size: 1 alpha: 1 beta: 1", "local_size: 7 alpha: 0.3 beta: 0.5"]


def _lrn_cpu(spec, x, seed=18):
    from minicaffe.testing import make_layer
    import contextlib
    with backend.float64_blobs() if x.dtype == np.float64 else contextlib.nullcontext():
        layer, bottom, top = make_layer(f'type: "LRN" lrn_param {{ {spec} }}', [x])
    layer.forward(bottom, top)
    dy = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return layer, top[0].data.copy(), dy, bottom[0].diff.copy()


@pytest.mark.parametrize("spec", LRN_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lrn_references_match_cpu(emulated, spec, dtype):
    from minicaffe.kernels import cuda_lrn
    x = np.random.default_rng(19).standard_normal((2, 6, 3, 5)).astype(dtype)
    layer, y_cpu, dy, dx_cpu = _lrn_cpu(spec, x)
    scale, p, y = (np.full_like(x, np.nan) for _ in range(3))
    cuda_lrn.forward(layer, x, scale, p, y)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, y_cpu, rtol=tol, atol=tol)
    dx = np.full_like(x, np.nan)
    cuda_lrn.backward(layer, x, y, dy, scale, p, dx)
    np.testing.assert_allclose(dx, dx_cpu, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("spec", LRN_CASES[:2] + ["local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL"])
def test_lrn_layer_on_gpu(spec, gpu):
    x = np.random.default_rng(20).standard_normal((2, 6, 4, 5)).astype(np.float32)
    assert_layer_gpu_matches_cpu(f'type: "LRN" lrn_param {{ {spec} }}', [x])


# --- Eltwise (two bottoms) -------------------------------------------------------------------------

ELTWISE_CASES = ["operation: SUM", "operation: SUM coeff: 0.5 coeff: -2", "operation: PROD", "operation: MAX"]


@pytest.mark.parametrize("spec", ELTWISE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eltwise_references_match_cpu(emulated, spec, dtype):
    import contextlib

    from minicaffe.kernels import cuda_elementwise
    from minicaffe.testing import make_layer
    rng = np.random.default_rng(21)
    a, b = (rng.standard_normal((3, 4, 5)).astype(dtype) for _ in range(2))
    b[0, 0] = a[0, 0]                           # ties: MAX gives them to bottom 1
    with backend.float64_blobs() if dtype == np.float64 else contextlib.nullcontext():
        layer, bottom, top = make_layer(f'type: "Eltwise" eltwise_param {{ {spec} }}', [a, b])
    layer.forward(bottom, top)
    y = np.full_like(a, np.nan)
    if "SUM" in spec:
        cuda_elementwise.eltwise_sum(a, b, layer.coeffs[0], layer.coeffs[1], y)
    elif "PROD" in spec:
        cuda_elementwise.eltwise_prod(a, b, y)
    else:
        mask = np.full(a.shape, -1, np.int32)
        cuda_elementwise.eltwise_max(a, b, y, mask)
        np.testing.assert_array_equal(mask, layer.mask)
    np.testing.assert_allclose(y, top[0].data, rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("spec", ELTWISE_CASES)
def test_eltwise_layer_on_gpu(spec, gpu):
    rng = np.random.default_rng(22)
    a, b = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2))
    assert_layer_gpu_matches_cpu(f'type: "Eltwise" eltwise_param {{ {spec} }}', [a, b])


# --- BatchNorm with global statistics: no host read of the scale factor ---------------------------

@pytest.mark.parametrize("factor", [0.0, 2.5])
def test_batchnorm_global_stats_on_gpu(factor, gpu):
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    params = [rng.standard_normal(4).astype(np.float32), np.abs(rng.standard_normal(4)).astype(np.float32),
              np.array([factor], np.float32)]
    assert_layer_gpu_matches_cpu('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [x],
                                 params=params)


# --- BatchNorm and Scale (kernels/cuda_normalization.py) --------------------------------------------

def _layer_cpu(text, x, params=None, phase=None, in_place=False, seed=24, param_diffs=True):
    """A layer's CPU forward and backward in ``x``'s float type, with its blobs set to ``params``
    and their diffs to random values (the kernels must accumulate into them); returns the layer, its
    blobs' values and diffs before, the top, dy, the bottom diff and the blobs after."""
    import contextlib

    from minicaffe.testing import TRAIN, make_layer
    rng = np.random.default_rng(seed)
    with backend.float64_blobs() if x.dtype == np.float64 else contextlib.nullcontext():
        layer, bottom, top = make_layer(text, [x], 1, TRAIN if phase is None else phase, in_place)
    for k, blob in enumerate(layer.blobs):
        if params is not None:
            blob.data[...] = params[k]
        blob.diff[...] = rng.standard_normal(blob.shape) if param_diffs else 0
    before = [b.data.copy() for b in layer.blobs], [b.diff.copy() for b in layer.blobs]
    layer.forward(bottom, top)
    y = top[0].data.copy()
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    after = [b.data.copy() for b in layer.blobs], [b.diff.copy() for b in layer.blobs]
    return layer, before, y, dy, bottom[0].diff.copy(), after


def _tol(dtype):
    return (2e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-13)


BN_SHAPES = [(4, 3, 5, 6), (7, 2), (2, 5, 3), (600, 3)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_references_match_cpu(emulated, shape, dtype):
    from minicaffe.kernels import cuda_normalization as cn
    rng = np.random.default_rng(25)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    c = shape[1]
    params = [rng.standard_normal(c), np.abs(rng.standard_normal(c)), np.array([1.7])]
    layer, (stats, _), y_cpu, dy, dx_cpu, (stats_after, _) = _layer_cpu(
        'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }', x, params)
    x3 = x.reshape(shape[0], c, -1)
    m = x3.shape[0] * x3.shape[2]
    mean, inv_std = np.full(c, np.nan, dtype), np.full(c, np.nan, dtype)
    run = [s.astype(dtype).reshape(-1) for s in stats]
    cn.bn_stats(x3, layer.eps, layer.moving_average_fraction, m / (m - 1), True, mean, inv_std, *run)
    y, xn = np.full_like(x3, np.nan), np.full_like(x3, np.nan)
    cn.bn_normalize(x3, mean, inv_std, y, xn)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(y.reshape(shape), y_cpu, rtol=rtol * 10, atol=atol * 10)
    np.testing.assert_array_equal(xn, y)
    for got, want in zip(run, stats_after):
        np.testing.assert_allclose(got, want.reshape(-1), rtol=rtol, atol=atol)
    mean_dy, mean_dy_y = np.empty(c, dtype), np.empty(c, dtype)
    dy3 = dy.reshape(x3.shape)
    cn.bn_grad_sums(dy3, xn, mean_dy, mean_dy_y)
    dx = np.full_like(x3, np.nan)
    cn.bn_backward(dy3, xn, mean_dy, mean_dy_y, inv_std, dx)
    np.testing.assert_allclose(dx.reshape(shape), dx_cpu, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("factor", [0.0, 2.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_global_references_match_cpu(emulated, factor, dtype):
    from minicaffe.kernels import cuda_normalization as cn
    rng = np.random.default_rng(26)
    shape = (3, 4, 2, 5)
    x = rng.standard_normal(shape).astype(dtype)
    params = [rng.standard_normal(4), np.abs(rng.standard_normal(4)), np.array([factor])]
    layer, (stats, _), y_cpu, dy, dx_cpu, (after, _) = _layer_cpu(
        'type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.01 }', x, params)
    for a, b in zip(stats, after):
        np.testing.assert_array_equal(a, b)            # global statistics are only read
    run = [s.astype(dtype).reshape(-1) for s in stats]
    x3 = x.reshape(3, 4, 10)
    y = np.full_like(x3, np.nan)
    cn.bn_global(x3, *run, layer.eps, y)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(y.reshape(shape), y_cpu, rtol=rtol, atol=atol)
    dx = np.full_like(x3, np.nan)
    cn.bn_global_backward(dy.reshape(x3.shape), run[1], run[2], layer.eps, dx)
    np.testing.assert_allclose(dx.reshape(shape), dx_cpu, rtol=rtol, atol=atol)


@pytest.mark.parametrize("spec", ["", "bias_term: true", "axis: 0 num_axes: 2 bias_term: true"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_references_match_cpu(emulated, spec, dtype):
    from minicaffe.kernels import cuda_normalization as cn
    rng = np.random.default_rng(27)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    layer, (params, diffs), y_cpu, dy, dx_cpu, (_, diffs_after) = _layer_cpu(
        f'type: "Scale" scale_param {{ {spec} filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }}', x)
    outer, dim, inner = layer.dims
    x3 = x.reshape(outer, dim, inner)
    bias = params[1].reshape(-1).astype(dtype) if len(params) > 1 else None
    s = params[0].reshape(-1).astype(dtype)
    y, saved = np.full_like(x3, np.nan), np.full_like(x3, np.nan)
    cn.scale_forward(x3, s, bias, y, saved)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(y.reshape(x.shape), y_cpu, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(saved, x3)
    sd = diffs[0].reshape(-1).astype(dtype)
    bd = diffs[1].reshape(-1).astype(dtype) if bias is not None else None
    dy3 = dy.reshape(x3.shape)
    if layer.scale_diff_overwrites:
        sd[...] = 0          # the kernel adds; where Caffe writes the scale diff the engine clears it
    cn.scale_param_grad(dy3, x3, sd, bd)
    np.testing.assert_allclose(sd, diffs_after[0].reshape(-1), rtol=rtol, atol=atol)   # accumulated
    if bias is not None:
        np.testing.assert_allclose(bd, diffs_after[1].reshape(-1), rtol=rtol, atol=atol)
    dx = np.full_like(x3, np.nan)
    cn.scale_backward(dy3, s, dx)
    np.testing.assert_allclose(dx.reshape(x.shape), dx_cpu, rtol=rtol, atol=atol)


# --- PReLU and ELU (kernels/cuda_activation.py) ------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 4), (400, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prelu_references_match_cpu(emulated, shared, shape, dtype):
    from minicaffe.kernels import cuda_activation as ca
    rng = np.random.default_rng(28)
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[::7] = 0.0                          # the gradient at 0 is the slope
    slope = rng.standard_normal(1 if shared else shape[1])
    layer, (params, diffs), y_cpu, dy, dx_cpu, (_, diffs_after) = _layer_cpu(
        f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}', x, [slope])
    geometry = ca.prelu_geometry(shape, shared)
    a = params[0].reshape(-1).astype(dtype)
    y = np.full_like(x, np.nan)
    ca.prelu_forward(x, a, y, geometry)
    np.testing.assert_array_equal(y, y_cpu)
    sd = diffs[0].reshape(-1).astype(dtype)
    ca.prelu_slope_grad(x, dy, sd, geometry)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(sd, diffs_after[0].reshape(-1), rtol=rtol, atol=atol)
    dx = np.full_like(x, np.nan)
    ca.prelu_backward(x, dy, a, dx, geometry)
    np.testing.assert_array_equal(dx, dx_cpu)


@pytest.mark.parametrize("alpha", [1.0, 0.3, -0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elu_references_match_cpu(emulated, alpha, dtype):
    from minicaffe.kernels import cuda_activation as ca
    rng = np.random.default_rng(29)
    x = (rng.standard_normal((3, 4, 5)) * 3).astype(dtype)
    x.reshape(-1)[::6] = 0.0
    _, _, y_cpu, dy, dx_cpu, _ = _layer_cpu(f'type: "ELU" elu_param {{ alpha: {alpha} }}', x)
    y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
    ca.elu_forward(x, np.float32(alpha), y)          # the proto's float32 alpha, as the layer has it
    np.testing.assert_array_equal(y, y_cpu)
    ca.elu_backward(x, y, dy, np.float32(alpha), dx)
    np.testing.assert_array_equal(dx, dx_cpu)


@pytest.mark.parametrize("text", [
    'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.8 }',
    'type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    'type: "PReLU" prelu_param { filler { type: "gaussian" } }',
    'type: "PReLU" prelu_param { channel_shared: true }',
    'type: "ELU" elu_param { alpha: 0.6 }',
])
def test_normalization_and_activation_layers_on_gpu(text, gpu):
    x = np.random.default_rng(30).standard_normal((3, 4, 5, 6)).astype(np.float32)
    assert_layer_gpu_matches_cpu(text, [x])


# --- the solver step as one launch (cuda_updates.multi_step) -----------------------------------------

STEP_NET = """
name: "step"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 0.3 decay_mult: 3 } param { lr_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: -0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

STEP_CASES = [
    ('type: "SGD" momentum: 0.9 weight_decay: 0.01', False),
    ('type: "SGD" momentum: 0.9 weight_decay: 0.01 regularization_type: "L1" iter_size: 2', False),
    ('type: "Nesterov" momentum: 0.95 weight_decay: 0.002 clip_gradients: 0.05', False),
    ('type: "AdaGrad" delta: 1e-6 weight_decay: 0.01', False),
    ('type: "RMSProp" rms_decay: 0.9 delta: 1e-6 weight_decay: 0.01 iter_size: 3', False),
    ('type: "AdaDelta" momentum: 0.95 delta: 1e-6 weight_decay: 0.01 regularization_type: "L1"', False),
    ('type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01', False),
    ('type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01 clip_gradients: 0.1', True),
    ('type: "SGD" momentum: 0.9 weight_decay: 0.01 lr_policy: "step" stepsize: 1 gamma: 0.3', True),
]


def _step_state(fused, spec, float64, monkeypatch, steps=3):
    import contextlib

    import minicaffe as caffe
    from minicaffe.solvers import updates
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(updates, "fused_step", lambda *a, **k: False)
        with backend.float64_blobs() if float64 else contextlib.nullcontext():
            text = (f'{spec} base_lr: 0.1 random_seed: 7 display: 0'
                    + ('' if 'lr_policy' in spec else ' lr_policy: "fixed"')
                    + f' net_param {{ {STEP_NET} }}')
            solver = caffe.get_solver(text)
            solver.step(steps)
            # pycaffe writes a weight: its next device array is a new one (the pointer table follows)
            solver.net.params["ip1"][0].data[...] *= 0.5
            solver.step(1)
    params = [b for v in solver.net.params.values() for b in v]
    return ([b.data.copy() for b in params] + [b.diff.copy() for b in params]
            + [h.data.copy() for h in solver.history])


@pytest.mark.parametrize("kernel", sorted(__import__("minicaffe.kernels.cuda_updates").kernels.cuda_updates._KERNELS))
def test_multi_step_source_declares_no_name_a_rule_uses(kernel):
    """The multi-tensor kernel pastes each rule's body into its loop: a local of the loop that shares
    a name with one of the rule's scalars or history arrays silently takes its place there (on an
    H200, RMSProp's ``decay`` read the weight decay). The stand-in runs a NumPy reference, not this
    source, so the source is checked here."""
    import re

    from minicaffe.kernels import cuda_updates
    ins, outs, body = cuda_updates._KERNELS[kernel]
    src = cuda_updates._multi_src(kernel).replace(body, "")
    rule_names = {p.split()[1] for p in (ins + "," + outs).split(",")} - {"g", "lr"}
    declared = re.findall(r"\b(?:float|double|__T__|long long)\s*\*?\s*(?:const\s+)?(\w+)\s*=", src)
    # each of the rule's names is declared once (its scalar or its loaded history value), as are g and lr
    twice = sorted(n for n in rule_names | {"g", "lr"} if declared.count(n) != 1)
    assert not twice, f"declared other than once: {twice}"
    assert cuda_updates.NO_CONTRACTION == ("--fmad=false",)


@pytest.mark.parametrize("spec,float64", STEP_CASES)
def test_one_launch_step_is_bit_identical_to_the_per_parameter_step(gpu, monkeypatch, spec, float64):
    """Weights, update values and history after a few steps: the same bits with one launch per step
    as with the per-parameter path (normalise, regularise, rule kernel, ``w -= g`` per blob)."""
    want = _step_state(False, spec, float64, monkeypatch)
    got = _step_state(True, spec, float64, monkeypatch)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(a, b, err_msg=f"array {k}")
    assert any((a != 0).any() for a in got[8:])        # the history moved (4 parameter blobs before it)


@pytest.mark.parametrize("kind,spec", UPDATE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multi_step_reference_matches_cpu(emulated, kind, spec, dtype):
    """The multi-tensor kernel's reference, run on NumPy arrays, against the CPU loop of
    ``Solver.apply_update`` (normalize, regularize, ``rule.compute``, ``w -= g``) per parameter."""
    from minicaffe.kernels import cuda_updates
    from minicaffe.solvers import updates
    rule = _rule(kind, spec)
    rng = np.random.default_rng(31)
    shapes = [(5, 7), (3,), (1,), (4, 2, 3)]
    lr_mults, decays = [1.0, 2.0, 0.5, 0.0], [updates.f32(0.01 * d) for d in (1.0, 0.0, 3.0, 1.0)]
    for l1 in (False, True):
        w = [rng.standard_normal(s).astype(dtype) for s in shapes]
        g = [rng.standard_normal(s).astype(dtype) for s in shapes]
        h = [[np.abs(rng.standard_normal(s)).astype(dtype) for s in shapes] for _ in range(rule.history_sets)]
        cw, cg, ch = [a.copy() for a in w], [a.copy() for a in g], [[a.copy() for a in hs] for hs in h]
        rate, it, iter_size = 0.05, 4, 2
        for i in range(len(shapes)):        # the CPU loop
            updates.normalize(cg[i], iter_size)
            if decays[i]:
                updates.regularize(cw[i], cg[i], decays[i], "L1" if l1 else "L2", np.empty_like(cg[i]))
            rule.compute(cg[i], [hs[i] for hs in ch], [np.empty_like(cg[i]) for _ in range(rule.scratch)],
                         updates.f32(rate * updates.f32(lr_mults[i])), it)
            cw[i] -= cg[i]
        rows = [(w[i], g[i], *(hs[i] for hs in h)) for i in range(len(shapes))]
        correction = None
        if kind == "Adam":
            import math
            correction = updates.f32(math.sqrt(1 - rule.momentum2 ** (it + 1)) / (1 - rule.momentum ** (it + 1)))
        cuda_updates.multi_step(rule, cuda_updates.MultiStepPlan(), rows, lr_mults, decays, rate, correction,
                                updates.f32(1.0 / iter_size), l1)
        tol = 1e-6 if dtype == np.float32 else 1e-13    # the CPU rounds a·x + y once (FMA), the reference twice
        for a, b in zip(w + g + [x for hs in h for x in hs], cw + cg + [x for hs in ch for x in hs]):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 0.2)
