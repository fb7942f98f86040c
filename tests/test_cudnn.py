"""The cuDNN binding (minicaffe/kernels/cudnn.py) and engine (kernels/cudnn_conv.py) against the
emulated library (tests/cudnn_standin.py): the declared C signatures, status errors, the algorithm
choice (deterministic first, within the workspace limit), the math-type policy, descriptors freed,
and the emulation's own refusals and arithmetic. The engine-vs-reference cases for every shape are
in tests/test_conv_engines.py (the ``cudnn`` engine is one of its GPU engines)."""
import ctypes
import gc

import numpy as np
import pytest

import cudnn_standin
from minicaffe.core import backend, context
from minicaffe.kernels import cudnn, engines
from minicaffe.layers.conv import ReferenceConvolution
from minicaffe.testing import forward, make_layer


def _fake_only(gpu):
    """The tests that look inside the library run on the emulation only (the CuPy stand-in)."""
    if gpu != "standin":
        pytest.skip("inspects the emulated cuDNN; a real GPU runs the real library")
    return context.current().cudnn


def _perf(algo, status=0, memory=0, determinism=cudnn.DETERMINISTIC):
    p = cudnn.AlgoPerf()
    p.algo, p.status, p.memory, p.determinism = algo, status, memory, determinism
    return p


# --- the binding --------------------------------------------------------------------------------------
def test_every_declared_signature_matches_the_headers():
    """The binding's argtypes/restype, checked against the C signatures typed from the cuDNN 9 headers."""
    lib = cudnn.Library(cudnn_standin.FakeCudnn())
    assert set(cudnn.SIGNATURES) <= set(cudnn_standin.C_SIGNATURES)
    for name in cudnn.SIGNATURES:
        getattr(lib.raw, name).check()
    assert ctypes.sizeof(cudnn.AlgoPerf) == 48


def test_a_wrong_declaration_is_refused_before_the_call():
    lib = cudnn.Library(cudnn_standin.FakeCudnn())
    fn = lib.raw.cudnnSetConvolutionGroupCount
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with pytest.raises(AssertionError, match=r"parameter 1 is 'int' in the header"):
        fn(ctypes.c_void_p(1), 2)
    fn.argtypes = [ctypes.c_void_p]
    with pytest.raises(AssertionError, match=r"1 argtypes declared, the header has 2"):
        fn(ctypes.c_void_p(1))
    version = lib.raw.cudnnGetVersion
    version.restype = ctypes.c_int
    with pytest.raises(AssertionError, match=r"returns 'size_t'"):
        version()


def test_a_failed_call_names_the_function_and_cudnns_text():
    lib = cudnn.Library(cudnn_standin.FakeCudnn())
    d = lib.descriptor("Tensor")
    with pytest.raises(RuntimeError, match=r"^cudnnSetTensor4dDescriptor failed: CUDNN_STATUS_BAD_PARAM "
                                           r"\(cudnnStatus_t 2000\)$"):
        lib.call("cudnnSetTensor4dDescriptor", d.ptr, cudnn.TENSOR_NCHW, cudnn.DATA_FLOAT, 0, 1, 1, 1)


def test_descriptors_are_destroyed_with_their_owner():
    fake = cudnn_standin.FakeCudnn()
    lib = cudnn.Library(fake)
    ds = [lib.descriptor(kind) for kind in ("Tensor", "Filter", "Convolution")]
    assert fake.live() == 3
    del ds
    gc.collect()
    assert fake.live() == 0


def test_pick_algorithm_takes_the_first_deterministic_one_within_the_limit():
    perfs = [_perf(0, determinism=cudnn.NON_DETERMINISTIC),           # fastest, but not reproducible
             _perf(4, memory=1 << 30),                                 # over the limit
             _perf(6, status=cudnn.STATUS_NOT_SUPPORTED),              # not for this shape
             _perf(1, memory=1000), _perf(2)]
    assert cudnn.pick_algorithm(perfs, limit=1 << 20) == 1
    assert cudnn.pick_algorithm(perfs, limit=1 << 30) == 4
    assert cudnn.pick_algorithm(perfs, limit=0) == 2
    assert cudnn.pick_algorithm(perfs[:3], limit=0) is None


def test_workspace_limit_from_the_environment(env_switch):
    assert cudnn.workspace_limit() == cudnn.DEFAULT_WORKSPACE_MB << 20
    env_switch("MINICAFFE_CUDNN_WORKSPACE_MB", "1.5")
    assert cudnn.workspace_limit() == 3 << 19
    env_switch("MINICAFFE_CUDNN_WORKSPACE_MB", "lots")
    with pytest.raises(Exception, match=r"^MINICAFFE_CUDNN_WORKSPACE_MB='lots' is not a number"):
        cudnn.workspace_limit()


def test_available_says_why_not_and_never_raises():
    assert cudnn.available() == (False, "not in GPU mode")


def test_alpha_and_beta_follow_the_data_type():
    assert isinstance(cudnn.scalar(np.float32, 1.0), ctypes.c_float)
    assert isinstance(cudnn.scalar(np.float64, 1.0), ctypes.c_double)


# --- the engine on the emulation ---------------------------------------------------------------------
CONV = ('name: "conv" type: "Convolution" convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 '
        'weight_filler { type: "gaussian" std: 0.5 } }')


def _conv_layer(dtype=np.float32, shape=(2, 4, 7, 6), text=CONV):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if dtype == np.float64:
        with backend.float64_blobs():
            return make_layer(text, [x])
    return make_layer(text, [x])


def _train_pass(layer, bottom, top):
    y = forward(layer, bottom, top)[0]
    top[0].diff[...] = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    layer.backward(top, [True], bottom)
    return y


@pytest.mark.parametrize("limit,want", [(None, {"fwd": 4, "bwd_data": 3, "bwd_filter": 2}),
                                        (4096, {"fwd": 1, "bwd_data": 1, "bwd_filter": 1}),
                                        (0, {"fwd": 0, "bwd_data": 1, "bwd_filter": None})])
def test_algorithms_are_deterministic_and_fit_the_workspace(gpu, limit, want):
    """The emulation ranks FFT (big workspace) and the non-deterministic algorithms first: the engine
    takes the first deterministic one in the limit, runs it, and its numbers are the reference's."""
    fake = _fake_only(gpu)
    layer, bottom, top = _conv_layer()
    if want["bwd_filter"] is None:     # every deterministic weight-gradient algorithm needs a workspace
        engines.force(layer, "cudnn", workspace_limit=limit)
        with pytest.raises(RuntimeError, match=r"no deterministic bwd_filter algorithm within a 0 byte workspace"):
            layer.reshape(bottom, top)
        return
    engines.force(layer, "cudnn", **({} if limit is None else {"workspace_limit": limit}))
    _train_pass(layer, bottom, top)
    assert layer.engine_slot.name == "cudnn"
    chosen = {k: a for k, (a, _) in layer.engine.algorithms().items()}
    assert chosen == want
    ran = {name: algo for name, algo in fake.calls}
    assert ran == {"cudnnConvolutionForward": want["fwd"], "cudnnConvolutionBackwardData": want["bwd_data"],
                   "cudnnConvolutionBackwardFilter": want["bwd_filter"]}


def test_float32_runs_fma_math_unless_cupy_tf32_is_on(gpu, env_switch):
    fake = _fake_only(gpu)

    def math_of(dtype):
        layer = _conv_layer(dtype)[0]
        assert layer.engine_slot.name == "cudnn"
        (plan,) = layer.engine._plans.values()
        return fake.convs[plan.conv.ptr.value]["math"]

    assert math_of(np.float32) == cudnn.FMA_MATH
    assert math_of(np.float64) == cudnn.DEFAULT_MATH
    env_switch("CUPY_TF32", "1")
    assert math_of(np.float32) == cudnn.DEFAULT_MATH


def test_float32_matches_the_reference_within_rounding(gpu):
    layer, bottom, top = _conv_layer()
    assert layer.engine_name == ("cudnn" if cudnn.available()[0] else layer.engine_name)
    y = forward(layer, bottom, top)[0]
    x64, w64 = bottom[0].data.astype(np.float64), layer.blobs[0].data.astype(np.float64)
    want = np.empty(y.shape)
    ReferenceConvolution(layer.conv).forward(x64, w64, y=want)
    want += layer.blobs[1].data.astype(np.float64).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_plans_per_batch_size_and_the_workspace_grows_once(gpu):
    fake = _fake_only(gpu)
    layer, bottom, top = _conv_layer()
    engine = layer.engine
    _train_pass(layer, bottom, top)
    first = engine._ws
    _train_pass(layer, bottom, top)
    assert engine._ws is first
    bottom[0].reshape(3, 4, 7, 6)
    layer.reshape(bottom, top)
    assert layer.engine is not engine          # a new shape: a new engine (the slot rebuilds)
    n_before = fake.live()
    del engine, first
    gc.collect()
    assert fake.live() < n_before               # the old engine's descriptors went with it


# --- the emulation's refusals ----------------------------------------------------------------------------
def _bound():
    fake = cudnn_standin.FakeCudnn()
    return fake, cudnn.Library(fake)


def test_emulation_refuses_unset_descriptors_and_mismatched_types():
    fake, lib = _bound()
    x, w, c = lib.descriptor("Tensor"), lib.descriptor("Filter"), lib.descriptor("Convolution")
    out = [ctypes.c_int() for _ in range(4)]
    args = [c.ptr, x.ptr, w.ptr, *[ctypes.byref(o) for o in out]]
    assert lib.try_call("cudnnGetConvolution2dForwardOutputDim", *args) == cudnn.STATUS_BAD_PARAM
    lib.call("cudnnSetTensor4dDescriptor", x.ptr, cudnn.TENSOR_NCHW, cudnn.DATA_FLOAT, 2, 4, 7, 6)
    lib.call("cudnnSetFilter4dDescriptor", w.ptr, cudnn.DATA_FLOAT, cudnn.TENSOR_NCHW, 6, 2, 3, 3)
    lib.call("cudnnSetConvolution2dDescriptor", c.ptr, 1, 1, 1, 1, 1, 1, cudnn.CROSS_CORRELATION,
             cudnn.DATA_FLOAT)
    assert lib.try_call("cudnnGetConvolution2dForwardOutputDim", *args) == cudnn.STATUS_BAD_PARAM  # 2 * 1 groups != 4
    lib.call("cudnnSetConvolutionGroupCount", c.ptr, 2)
    lib.call("cudnnGetConvolution2dForwardOutputDim", *args)
    assert [o.value for o in out] == [2, 6, 7, 6]
    # float data with a double compute type: cuDNN has no such convolution
    y = lib.descriptor("Tensor")
    lib.call("cudnnSetTensor4dDescriptor", y.ptr, cudnn.TENSOR_NCHW, cudnn.DATA_FLOAT, 2, 6, 7, 6)
    lib.call("cudnnSetConvolution2dDescriptor", c.ptr, 1, 1, 1, 1, 1, 1, cudnn.CROSS_CORRELATION,
             cudnn.DATA_DOUBLE)
    size = ctypes.c_size_t()
    assert lib.try_call("cudnnGetConvolutionForwardWorkspaceSize", None, x.ptr, w.ptr, c.ptr, y.ptr, 0,
                        ctypes.byref(size)) == cudnn.STATUS_BAD_PARAM          # no handle
    h = ctypes.c_void_p()
    lib.call("cudnnCreate", ctypes.byref(h))
    assert lib.try_call("cudnnGetConvolutionForwardWorkspaceSize", h, x.ptr, w.ptr, c.ptr, y.ptr, 0,
                        ctypes.byref(size)) == cudnn.STATUS_NOT_SUPPORTED


def test_emulation_refuses_a_short_workspace_and_a_null_one(gpu):
    _fake_only(gpu)
    cp = backend.import_cupy()
    layer, bottom, top = _conv_layer()
    engine = layer.engine
    plan = engine.plan(2, np.float32)
    need = plan.workspace["fwd"]
    assert need > 0
    x, w, y = bottom[0].xdata, layer.blobs[0].xdata, top[0].xdata
    one, zero = ctypes.c_float(1), ctypes.c_float(0)
    small = cp.empty(need - 1, dtype=np.uint8)
    for ws, size in ((cudnn.pointer(small), need - 1), (ctypes.c_void_p(None), need)):
        status = engine.lib.try_call(
            "cudnnConvolutionForward", engine.lib.handle(cp.cuda.get_current_stream().ptr), ctypes.byref(one),
            plan.x.ptr, cudnn.pointer(x), plan.w.ptr, cudnn.pointer(w), plan.conv.ptr, plan.algo["fwd"], ws, size,
            ctypes.byref(zero), plan.y.ptr, cudnn.pointer(y))
        assert status != cudnn.STATUS_SUCCESS


@pytest.mark.parametrize("mode", [cudnn.CONVOLUTION, cudnn.CROSS_CORRELATION])
def test_emulation_arithmetic_against_direct_sums(mode):
    """The emulation's three convolutions, against a direct sum written from cuDNN's definitions."""
    rng = np.random.default_rng(3)
    conv = {"group": 2, "pad": (1, 0), "stride": (2, 1), "dilation": (1, 2), "mode": mode}
    x, w = rng.standard_normal((2, 4, 6, 7)), rng.standard_normal((6, 2, 3, 2))
    oh, ow = (6 + 2 - 3) // 2 + 1, (7 - 3) // 1 + 1
    y = cudnn_standin.conv_forward(conv, x, w, (oh, ow))
    want = np.zeros_like(y)
    wf = w[..., ::-1, ::-1] if mode == cudnn.CONVOLUTION else w
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    for n in range(2):
        for k in range(6):
            g = k // 3
            for p in range(oh):
                for q in range(ow):
                    want[n, k, p, q] = sum(wf[k, c, i, j] * xp[n, g * 2 + c, p * 2 + i, q + 2 * j]
                                           for c in range(2) for i in range(3) for j in range(2))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    # the adjoints: <conv(x), dy> = <x, bwd_data(dy)> and = <w, bwd_filter(x, dy)>
    dy = rng.standard_normal(y.shape)
    dx = cudnn_standin.conv_backward_data(conv, dy, w, (6, 7))
    dw = cudnn_standin.conv_backward_filter(conv, x, dy, w.shape)
    np.testing.assert_allclose(np.vdot(y, dy), np.vdot(x, dx), rtol=1e-12)
    np.testing.assert_allclose(np.vdot(y, dy), np.vdot(w, dw), rtol=1e-12)


def test_a_library_that_cannot_make_a_handle_is_not_used(gpu):
    """cuDNN installed but unusable (a driver too old for it): said once, and the CuPy engine runs."""
    fake = _fake_only(gpu)
    fake.cudnnCreate.impl = lambda addr: cudnn_standin.NOT_INITIALIZED
    ok, why = cudnn.available()
    assert not ok and why.endswith("unusable here: cudnnCreate failed: CUDNN_STATUS_NOT_INITIALIZED "
                                   "(cudnnStatus_t 1001)")
    assert _conv_layer()[0].engine_name == "cuda_im2col"


# --- Softmax ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis,shape", [(1, (2, 5, 3, 4)), (2, (2, 3, 4, 5)), (-1, (3, 6))])
def test_softmax_through_cudnn_on_any_axis_matches_the_reference(gpu, axis, shape):
    """Any axis is cuDNN's channel mode on (outer, classes, inner, 1); ``engine: CUDNN`` asks for it."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    text = f'type: "Softmax" softmax_param {{ axis: {axis} engine: CUDNN }}'
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    with backend.float64_blobs():
        layer, bottom, top = make_layer(text, [x])
        assert layer.engine_slot.name == "cudnn"
        y = forward(layer, bottom, top)[0]
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        dx = bottom[0].diff.copy()
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    want = e / e.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, (dy - (dy * want).sum(axis=axis, keepdims=True)) * want, rtol=1e-10,
                               atol=1e-14)
    if gpu == "standin":
        assert [c for c in context.current().cudnn.calls] == [("cudnnSoftmaxForward", cudnn.SOFTMAX_ACCURATE),
                                                              ("cudnnSoftmaxBackward", cudnn.SOFTMAX_ACCURATE)]


def test_softmax_default_on_gpu_is_cudnn_and_falls_back_without_it(gpu):
    x = np.zeros((2, 4), np.float32)
    layer = make_layer('type: "Softmax"', [x])[0]
    assert layer.engine_slot.name == ("cudnn" if cudnn.available()[0] else "cuda")
    context.current().cudnn = cudnn.Missing("removed by the test")
    try:
        assert make_layer('type: "Softmax"', [x])[0].engine_slot.name == "cuda"
    finally:
        context.current().cudnn = None if gpu == "cupy" else cudnn_standin.FakeCudnn()
