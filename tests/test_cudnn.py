"""The cuDNN binding (minicaffe/kernels/cudnn.py) and engines (kernels/cudnn_conv.py, cudnn_softmax,
cudnn_pooling, cudnn_lrn) against the emulated library (tests/cudnn_standin.py): the declared C
signatures, status errors, the algorithm choice (deterministic first, within the workspace limit),
the math-type policy, descriptors freed, where the pooling and LRN engines apply, and the
emulation's own refusals and arithmetic. The engine-vs-reference cases for every shape are in
tests/test_conv_engines.py (convolution) and tests/test_engines.py (the others)."""
import ctypes
import gc
import logging

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
    ds = [lib.descriptor(kind) for kind in ("Tensor", "Filter", "Convolution", "Pooling", "LRN")]
    assert fake.live() == 5
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
    # nothing in the limit: the deterministic, successful one needing the least workspace
    assert cudnn.least_workspace_algorithm(perfs[:2]) == (4, 1 << 30)
    assert cudnn.least_workspace_algorithm(perfs) == (2, 0)
    assert cudnn.least_workspace_algorithm(perfs[:1] + perfs[2:3]) is None


@pytest.mark.parametrize("gib,want_mib", [(80, 2560), (4, 256), (256, 4096), (None, 256)])
def test_default_workspace_limit_is_a_32nd_of_the_device_within_bounds(monkeypatch, gib, want_mib):
    """1/32 of the device's memory (an H200's 141 GB gives the 4 GiB cap), never under 256 MiB, and
    the floor where no device answers."""
    class Runtime:
        @staticmethod
        def getDevice():
            return 0

        @staticmethod
        def getDeviceProperties(i):
            if gib is None:
                raise RuntimeError("no CUDA device")
            return {"totalGlobalMem": gib << 30}

    class Cupy:
        class cuda:
            runtime = Runtime

    monkeypatch.setattr(cudnn, "_device_memory", {})
    monkeypatch.setattr(backend, "import_cupy", lambda: Cupy)
    assert cudnn.default_workspace_limit() == want_mib << 20


def test_workspace_limit_from_the_environment(env_switch):
    assert cudnn.workspace_limit() == cudnn.default_workspace_limit()
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
                                        (0, {"fwd": 0, "bwd_data": 1, "bwd_filter": 1})])
def test_algorithms_are_deterministic_and_fit_the_workspace(gpu, limit, want, caplog):
    """The emulation ranks FFT (big workspace) and the non-deterministic algorithms first: the engine
    takes the first deterministic one in the limit, runs it, and its numbers are the reference's."""
    fake = _fake_only(gpu)
    layer, bottom, top = _conv_layer()
    engines.force(layer, "cudnn", **({} if limit is None else {"workspace_limit": limit}))
    with caplog.at_level(logging.WARNING, logger="minicaffe"):
        _train_pass(layer, bottom, top)
    over = [r.getMessage() for r in caplog.records if "fits the" in r.getMessage()]
    if limit == 0:
        # every deterministic weight-gradient algorithm needs a workspace: the least one runs, with a warning
        assert len(over) == 1 and over[0].startswith("cuDNN: no deterministic bwd_filter algorithm of a "
                                                     "convolution (2x4x7x6 -> "), over
        assert "MINICAFFE_CUDNN_WORKSPACE_MB" in over[0]
    else:
        assert not over
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


def test_plans_per_batch_size_and_one_workspace_for_every_convolution(gpu):
    fake = _fake_only(gpu)
    layer, bottom, top = _conv_layer()
    other, other_bottom, other_top = _conv_layer()
    engine = layer.engine
    _train_pass(layer, bottom, top)
    need = max(max(p.workspace.values()) for p in engine._plans.values())
    assert need > 0                              # the fake's first-ranked algorithms want scratch
    first = engine._workspace(need)[1].value
    _train_pass(other, other_bottom, other_top)
    _train_pass(layer, bottom, top)
    # the same buffer for the next call of this layer and for another layer: not one per engine
    assert engine._workspace(need)[1].value == first == other.engine._workspace(need)[1].value
    first = None
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


# --- Pooling ------------------------------------------------------------------------------------------
def _caffe_pool_reference(text, x):
    """The Pooling layer's own code (engine: CAFFE) on the CPU: forward and its geometry."""
    # errstate: with pad 0 a ceil-rounded window can start past the image (H 3, kernel 2, stride 3):
    # Caffe divides 0 by a 0-size window there, and so does the reference (NaN, as in Caffe)
    with backend.float64_blobs(), np.errstate(invalid="ignore"):
        layer, bottom, top = make_layer(text, [x])
        return forward(layer, bottom, top)[0].copy(), layer


def test_pooling_applies_exactly_where_cudnns_windows_are_caffes():
    """Over every small geometry (H, kernel, stride, pad < kernel, both roundings): the engine's
    ``computes`` holds exactly where cuDNN's floor-rounded output (its AVERAGE_COUNT_INCLUDE_PADDING
    and MAX, computed by the emulation from cuDNN's definitions) has Caffe's shape, and there it has
    Caffe's values (the AVE divisor included). Elsewhere the shapes differ."""
    from minicaffe.kernels import cudnn_pooling
    rng = np.random.default_rng(6)
    applied = rejected = 0
    for h in range(1, 8):
        x = rng.standard_normal((1, 2, h, 9))
        for k in range(1, min(h, 4) + 1):
            for s in (1, 2, 3):
                for p in range(k):
                    for rounding in ("CEIL", "FLOOR"):
                        for method, mode in (("AVE", 1), ("MAX", 3)):
                            text = (f'type: "Pooling" pooling_param {{ pool: {method} kernel_h: {k} kernel_w: 3 '
                                    f'stride_h: {s} stride_w: 2 pad_h: {p} pad_w: 1 round_mode: {rounding} }}')
                            want, layer = _caffe_pool_reference(text, x)
                            desc = {"mode": mode, "window": (k, 3), "pad": (p, 1), "stride": (s, 2)}
                            out_hw = (cudnn_pooling.floor_size(h, k, p, s), cudnn_pooling.floor_size(9, 3, 1, 2))
                            same_shape = tuple(want.shape[2:]) == out_hw
                            assert cudnn_pooling.computes(layer) == same_shape, text
                            if same_shape:
                                got = cudnn_standin.pool_forward(desc, x, out_hw)
                                np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14, err_msg=text)
                                applied += 1
                            else:
                                rejected += 1
    assert applied > 100 and rejected > 50


def _pool_layer(text, x, phase=None):
    kwargs = {} if phase is None else {"phase": phase}
    with backend.float64_blobs():
        return make_layer(text, [x], **kwargs)


def _pool_pass(layer, bottom, top, dy, change_top=None):
    with backend.float64_blobs():
        y = forward(layer, bottom, top)[0].copy()
        if change_top is not None:
            top[0].data[...] = change_top(top[0].data)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        return y, bottom[0].diff.copy()


POOL_MAX = 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 engine: CUDNN }'


def test_pooling_engine_cudnn_runs_deterministic_max_and_include_padding_ave(gpu):
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    x = np.random.default_rng(7).standard_normal((2, 3, 7, 9))
    for method, mode in (("MAX", cudnn.POOLING_MAX_DETERMINISTIC), ("AVE", cudnn.POOLING_AVERAGE_COUNT_INCLUDE_PADDING)):
        layer, bottom, top = _pool_layer(POOL_MAX.replace("MAX", method), x)
        assert layer.engine_slot.name == "cudnn"
        if gpu == "standin":
            fake = context.current().cudnn
            fake.calls.clear()
            _pool_pass(layer, bottom, top, np.ones((2, 3, 4, 5)))
            assert fake.calls == [("cudnnPoolingForward", mode), ("cudnnPoolingBackward", mode)]


def test_pooling_engine_cudnn_is_refused_where_the_windows_differ_and_for_the_mask_top(gpu):
    """7x8 with kernel 3, stride 2, pad 1: 4 rows in both, but 8 + 2 - 3 = 7 columns give Caffe 5
    windows (ceil; the last one clipped) and cuDNN 4 (floor); and an argmax top cuDNN cannot fill."""
    x = np.zeros((1, 1, 7, 8))
    with pytest.raises(Exception, match="cuDNN does not compute Caffe's result for this layer"):
        _pool_layer(POOL_MAX, x)
    if cudnn.available()[0]:
        with backend.float64_blobs(), pytest.raises(Exception, match="cuDNN does not compute"):
            make_layer(POOL_MAX, [np.zeros((1, 1, 7, 9))], num_top=2)
        # DEFAULT falls back to the CUDA kernels there
        default = POOL_MAX.replace(" engine: CUDNN", "")
        assert _pool_layer(default, x)[0].engine_slot.name == "cuda"
        assert _pool_layer(default, np.zeros((1, 1, 7, 9)))[0].engine_slot.name == "cudnn"


def test_max_pooling_backward_survives_a_top_changed_in_place(gpu):
    """A ReLU in place after the pooling changes the top before the backward: cuDNN finds the
    winners from x and y, so the engine keeps its own y (Caffe's CuDNNPoolingLayer reads the top and
    would route no gradient where the ReLU changed it)."""
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((2, 3, 7, 9)), rng.standard_normal((2, 3, 4, 5))
    relu = lambda t: np.maximum(t, 0)     # noqa: E731
    results = {}
    for name in ("cudnn", engines.REFERENCE):
        layer, bottom, top = _pool_layer(POOL_MAX.replace(" engine: CUDNN", ""), x)
        engines.force(layer, name)
        results[name] = _pool_pass(layer, bottom, top, dy, change_top=relu)
        assert layer.engine_slot.name == name
    np.testing.assert_allclose(results["cudnn"][1], results[engines.REFERENCE][1], rtol=1e-12, atol=1e-14)
    assert np.count_nonzero(results["cudnn"][1]) == np.count_nonzero(results[engines.REFERENCE][1]) > 0


@pytest.mark.parametrize("phase", [0, 1])   # TRAIN keeps y from the forward; TEST recomputes it
def test_max_pooling_backward_without_a_forward_recomputes_y(gpu, phase):
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((1, 2, 3, 3))
    text = 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }'
    grads = {}
    for name in ("cudnn", engines.REFERENCE):
        layer, bottom, top = _pool_layer(text, x, phase=phase)
        engines.force(layer, name)
        with backend.float64_blobs():
            layer.reshape(bottom, top)
            top[0].diff[...] = dy
            layer.backward(top, [True], bottom)          # no forward since the engine was built
            grads[name] = bottom[0].diff.copy()
    np.testing.assert_allclose(grads["cudnn"], grads[engines.REFERENCE], rtol=1e-12, atol=1e-14)


def test_max_pooling_ties_go_to_the_first_maximum(gpu):
    """Caffe routes a tied window's gradient to its first maximum (row-major). The emulation does the
    same; on a real GPU this test reports cuDNN's own rule (an xfail naming it, if it differs)."""
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    x = np.random.default_rng(10).integers(-1, 2, (2, 3, 7, 9)).astype(np.float64)
    dy = np.random.default_rng(11).standard_normal((2, 3, 4, 5))
    grads = {}
    for name in ("cudnn", engines.REFERENCE):
        layer, bottom, top = _pool_layer(POOL_MAX.replace(" engine: CUDNN", ""), x)
        engines.force(layer, name)
        grads[name] = _pool_pass(layer, bottom, top, dy)
    np.testing.assert_array_equal(grads["cudnn"][0], grads[engines.REFERENCE][0])
    if gpu != "standin" and not np.allclose(grads["cudnn"][1], grads[engines.REFERENCE][1]):
        pytest.xfail("real cuDNN routes tied MAX gradients to another maximum than Caffe's first one")
    np.testing.assert_allclose(grads["cudnn"][1], grads[engines.REFERENCE][1], rtol=1e-12, atol=1e-14)


def test_pooling_float32_matches_the_reference_within_rounding(gpu):
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    rng = np.random.default_rng(12)
    x, dy = rng.standard_normal((2, 4, 9, 9)).astype(np.float32), rng.standard_normal((2, 4, 5, 5))
    for method in ("MAX", "AVE"):
        text = POOL_MAX.replace("MAX", method).replace(" engine: CUDNN", "")
        out = {}
        for name in ("cudnn", engines.REFERENCE):
            layer, bottom, top = make_layer(text, [x])
            engines.force(layer, name)
            y = forward(layer, bottom, top)[0].copy()
            top[0].diff[...] = dy
            layer.backward(top, [True], bottom)
            out[name] = (y, bottom[0].diff.copy())
            assert out[name][0].dtype == np.float32 and layer.engine_slot.name == name
        for got, want in zip(out["cudnn"], out[engines.REFERENCE]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_emulated_pooling_refuses_a_floor_mismatched_output(gpu):
    """cuDNN's output is floor-rounded: a y descriptor of Caffe's ceil size is a shape mismatch."""
    fake = _fake_only(gpu)
    lib = cudnn.Library(fake)
    pool, xd, yd = lib.descriptor("Pooling"), lib.descriptor("Tensor"), lib.descriptor("Tensor")
    lib.call("cudnnSetPooling2dDescriptor", pool.ptr, cudnn.POOLING_MAX, cudnn.NOT_PROPAGATE_NAN, 3, 3, 1, 1, 2, 2)
    lib.call("cudnnSetTensor4dDescriptor", xd.ptr, cudnn.TENSOR_NCHW, cudnn.DATA_DOUBLE, 1, 1, 7, 8)
    out = [ctypes.c_int() for _ in range(4)]
    lib.call("cudnnGetPooling2dForwardOutputDim", pool.ptr, xd.ptr, *[ctypes.byref(o) for o in out])
    assert [o.value for o in out] == [1, 1, 4, 4]              # Caffe: 4 x 5
    lib.call("cudnnSetTensor4dDescriptor", yd.ptr, cudnn.TENSOR_NCHW, cudnn.DATA_DOUBLE, 1, 1, 4, 5)
    cp = backend.import_cupy()
    x, y = cp.zeros((1, 1, 7, 8)), cp.zeros((1, 1, 4, 5))
    one, zero = ctypes.c_double(1), ctypes.c_double(0)
    status = lib.try_call("cudnnPoolingForward", lib.handle(cp.cuda.get_current_stream().ptr), pool.ptr,
                          ctypes.byref(one), xd.ptr, cudnn.pointer(x), ctypes.byref(zero), yd.ptr, cudnn.pointer(y))
    assert status == cudnn_standin.SHAPE_MISMATCH


# --- LRN ------------------------------------------------------------------------------------------------
LRN = 'type: "LRN" lrn_param {{ local_size: {n} alpha: 0.3 beta: {beta} k: {k} {extra} }}'


@pytest.mark.parametrize("n,beta,k,applies", [
    (5, 0.75, 2, True), (1, 0.75, 1, True), (15, 0.75, 1, True),
    (17, 0.75, 1, False),                    # beyond CUDNN_LRN_MAX_N
    (5, 0.01, 1, False),                     # 0.01 as a proto float is 0.0099999998 < CUDNN_LRN_MIN_BETA
    (5, 0.75, 0.00001, False),               # likewise k under CUDNN_LRN_MIN_K
    (5, 0.02, 0.00002, True)])
def test_lrn_applies_inside_cudnns_parameter_ranges(n, beta, k, applies):
    from minicaffe.kernels import cudnn_lrn
    layer = make_layer(LRN.format(n=n, beta=beta, k=k, extra=""), [np.ones((1, 3, 2, 2))])[0]
    assert cudnn_lrn.computes(layer) == applies
    within = make_layer(LRN.format(n=n, beta=beta, k=k, extra="norm_region: WITHIN_CHANNEL"),
                        [np.ones((1, 3, 4, 4))])[0]
    assert not cudnn_lrn.computes(within)


def test_lrn_engine_cudnn_and_its_fallback(gpu):
    x = np.random.default_rng(13).standard_normal((2, 7, 3, 4)).astype(np.float32)
    text = LRN.format(n=5, beta=0.75, k=2, extra="engine: CUDNN")
    if not cudnn.available()[0]:
        pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    layer, bottom, top = make_layer(text, [x])
    assert layer.engine_slot.name == "cudnn"
    dy = np.random.default_rng(14).standard_normal(x.shape)
    y = forward(layer, bottom, top)[0].copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    ref, rb, rt = make_layer(text.replace("CUDNN", "CAFFE"), [x])
    np.testing.assert_allclose(y, forward(ref, rb, rt)[0], rtol=2e-6, atol=1e-7)
    rt[0].diff[...] = dy
    ref.backward(rt, [True], rb)
    np.testing.assert_allclose(bottom[0].diff, rb[0].diff, rtol=2e-5, atol=1e-6)
    if gpu == "standin":
        names = [c[0] for c in context.current().cudnn.calls]
        assert names == ["cudnnLRNCrossChannelForward", "cudnnLRNCrossChannelBackward"]
    # outside cuDNN's range: engine: CUDNN says so, DEFAULT runs the CUDA kernels
    big = LRN.format(n=17, beta=0.75, k=2, extra="")
    with pytest.raises(Exception, match="cuDNN does not compute Caffe's result"):
        make_layer(big.replace("}", "engine: CUDNN }"), [x])
    assert make_layer(big, [x])[0].engine_slot.name == "cuda"


def test_emulated_lrn_descriptor_keeps_cudnns_ranges():
    lib = cudnn.Library(cudnn_standin.FakeCudnn())
    d = lib.descriptor("LRN")
    lib.call("cudnnSetLRNDescriptor", d.ptr, 16, 1e-4, 0.01, 1e-5)
    for bad in ((17, 1e-4, 0.75, 1.0), (0, 1e-4, 0.75, 1.0), (5, 1e-4, 0.009, 1.0), (5, 1e-4, 0.75, 9e-6)):
        assert lib.try_call("cudnnSetLRNDescriptor", d.ptr, *bad) == cudnn.STATUS_BAD_PARAM


def test_emulated_lrn_gradient_is_the_derivative_of_its_forward():
    """Central differences of the emulation's own forward, even window (asymmetric) included."""
    rng = np.random.default_rng(15)
    for n in (3, 4):
        lrn = {"n": n, "alpha": 0.7, "beta": 0.6, "k": 1.5}
        x, dy = rng.standard_normal((1, 5, 2, 1)), rng.standard_normal((1, 5, 2, 1))
        y = cudnn_standin.lrn_forward(lrn, x)
        dx = cudnn_standin.lrn_backward(lrn, x, y, dy)
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = 1e-6
            num[i] = np.vdot(dy, cudnn_standin.lrn_forward(lrn, x + e) - cudnn_standin.lrn_forward(lrn, x - e)) / 2e-6
        np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


# --- engine: CUDNN says why ---------------------------------------------------------------------------
def test_engine_cudnn_error_gives_cudnns_reason(gpu):
    context.current().cudnn = cudnn.Missing("cuDNN 9 not found (a test's reason)")
    try:
        with pytest.raises(Exception, match=r"cannot run this layer here: cuDNN 9 not found \(a test's reason\) "
                                             r"\(mode gpu;"):
            make_layer(LRN.format(n=5, beta=0.75, k=2, extra="engine: CUDNN"), [np.ones((1, 3, 2, 2))])
    finally:
        context.current().cudnn = None if gpu == "cupy" else cudnn_standin.FakeCudnn()
