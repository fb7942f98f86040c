"""The compiled (Numba) kernels against their NumPy twins: the same bits, on one and two threads."""
import contextlib
import dataclasses

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.core import backend, context, threads
from minicaffe.kernels import compiled
from minicaffe.proto import caffe_pb2
from minicaffe.solvers import updates

pytest.importorskip("numba")


@pytest.fixture
def switches(monkeypatch):
    """``switches(compiled=..., threads=...)``: the context's switches for the rest of the test."""
    ctx = context.current()
    saved = ctx.switches
    monkeypatch.setattr(threads, "MIN_FLAT_ELEMENTS", 0)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(threads, "FLAT_BLOCK", 64)

    def set_(**kw):
        ctx.switches = dataclasses.replace(saved, **kw)
    yield set_
    ctx.switches = saved


def _steps(solver_type, extra, dtype, grads, w0):
    param = text_format.Parse(f'type: "{solver_type}" base_lr: 0.01 {extra}', caffe_pb2.SolverParameter())
    rule = getattr(updates, solver_type)(param)
    w = w0.copy()
    hist = [np.zeros_like(w) for _ in range(rule.history_sets)]
    scratch = [np.empty_like(w) for _ in range(1 + rule.scratch)]
    decay = updates.f32(param.weight_decay)
    out = []
    for it, g0 in enumerate(grads):
        g = g0.copy()
        updates.parameter_step(rule, w, g, hist, scratch, param.iter_size, decay,
                               param.regularization_type, updates.f32(0.01 * (it + 1)), it)
        out += [w.copy(), g.copy()] + [h.copy() for h in hist]
    return out


def _values(dtype, shape, seed):
    """Random values with the awkward ones mixed in: signed zeros, tiny, huge, exact halves."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    flat[::97] = -0.0
    flat[1::97] = 0.0
    flat[2::89] *= dtype(1e-30)
    flat[3::83] *= dtype(1e30)
    flat[4::79] = dtype(0.5)
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("solver_type, extra", [
    ("SGD", "momentum: 0.9 weight_decay: 0.0005"),
    ("SGD", "momentum: 0.9"),
    ("SGD", "momentum: 0.95 weight_decay: 0.001 iter_size: 3"),
    ("Nesterov", "momentum: 0.9 weight_decay: 0.0005"),
    ("Nesterov", "momentum: 0.8 iter_size: 2"),
])
@pytest.mark.parametrize("pool", [1, 2])
def test_update_rules_match_their_numpy_twin(solver_type, extra, dtype, pool, switches):
    """Three steps on 10007 parameters: weights, update values and history bit for bit the NumPy
    body's, including signed zeros (a skipped decay must not turn -0.0 into +0.0)."""
    w0 = _values(dtype, (10007,), 1)
    grads = [_values(dtype, (10007,), 2 + k) for k in range(3)]
    switches(compiled=False, threads=str(pool))
    want = _steps(solver_type, extra, dtype, grads, w0)
    switches(compiled=True, threads=str(pool))
    assert compiled.enabled()
    got = _steps(solver_type, extra, dtype, grads, w0)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == dtype and a.tobytes() == b.tobytes(), (solver_type, extra)


def test_compiled_path_is_taken_and_can_be_switched_off(switches, monkeypatch):
    """SGD with L2 runs the kernel; L1, the adaptive rules and MINICAFFE_COMPILED=0 run NumPy."""
    param = caffe_pb2.SolverParameter(momentum=0.9)
    sgd, adam = updates.SGD(param), updates.Adam(param)
    switches(compiled=True)
    assert updates._compiled_kernel(sgd, "L2", np.dtype(np.float32)) is compiled.get(compiled.sgd_step)
    assert updates._compiled_kernel(sgd, None, np.dtype(np.float64)) is not None
    assert updates._compiled_kernel(sgd, "L1", np.dtype(np.float32)) is None
    assert updates._compiled_kernel(adam, "L2", np.dtype(np.float32)) is None
    assert updates._compiled_kernel(sgd, "L2", np.dtype(np.float16)) is None
    switches(compiled=False)
    assert not compiled.enabled()
    assert updates._compiled_kernel(sgd, "L2", np.dtype(np.float32)) is None


def test_switch_reads_the_environment():
    assert context.Switches.from_environ({}).compiled
    assert not context.Switches.from_environ({context.COMPILED_VAR: "0"}).compiled
    assert context.Switches.from_environ({context.COMPILED_VAR: "1"}).compiled


def test_get_before_enabled_compiles(monkeypatch):
    """``get`` as the first call into the module (Numba not yet imported by ``enabled``) returns the
    compiled kernel: the import takes the module's lock, which ``get`` must not be holding then."""
    import threading
    monkeypatch.setattr(compiled, "_state", {"numba": None, "tried": False, "compiled": {}})
    got = []
    t = threading.Thread(target=lambda: got.append(compiled.get(compiled.sgd_step)), daemon=True)
    t.start()
    t.join(timeout=60)
    assert got and got[0] is compiled.get(compiled.sgd_step)
    w = np.ones(8, np.float32)
    g, h = np.full(8, 2.0, np.float32), np.zeros(8, np.float32)
    got[0](w, g, h, 0, 8, False, 1.0, 0.0, 0.5, 0.9, False)
    assert np.array_equal(h, np.full(8, 1.0, np.float32)) and np.array_equal(w, np.zeros(8, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_helpers_sum_in_float64_to_rounding(dtype):
    """The row sums BatchNorm's and Scale's kernels call (compiled.ROW_HELPERS, vectorised with
    'reassoc'): against exact sums (math.fsum) of the same rounded products, for every length up to
    40 (the vector loop's tails) and a long row of values of mixed sign and size."""
    import math
    compiled.get(compiled.batch_norm_backward)          # compiles the helpers too
    rng = np.random.default_rng(5)
    for n in list(range(41)) + [3137]:
        a = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        s = dtype(0.37)
        prod, scaled = a * b, a * (b * s)        # rounded to the dtype, as the helpers round them
        out = np.empty_like(a)
        mu = dtype(0.25)
        centred = a - mu
        wide = centred.astype(np.float64)
        for got, want, scale in ((compiled._row_sum(a), math.fsum(a.astype(np.float64)), np.abs(a).sum()),
                                 (compiled._row_dot(a, b), math.fsum(prod.astype(np.float64)), np.abs(prod).sum()),
                                 (compiled._row_scaled_dot(a, b, s), math.fsum(scaled.astype(np.float64)),
                                  np.abs(scaled).sum()),
                                 (compiled._row_centre(a, mu, out), math.fsum(wide * wide), (wide * wide).sum())):
            assert abs(got - want) <= 1e-12 * max(float(scale), 1e-30), (n, got, want)
        assert np.array_equal(out, centred)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, pad, extent, channels", [
    ((3, 5, 7, 9), (1, 1), (9, 11), None),          # a 3x3 layer's source: pad 1, the tiles' extent past it
    ((2, 4, 6, 6), (0, 0), (8, 8), None),           # a gradient's source: no pad, zeros past the edge
    ((1, 3, 5, 5), (2, 2), (12, 10), None),         # one image: split over its rows alone
    ((4, 10, 9, 9), (2, 1), (14, 13), (5, 10)),     # one group's channels of a blob (strided images)
])
def test_channels_last_source_matches_its_numpy_twin(shape, pad, extent, channels, dtype, switches):
    """``compiled.channels_last_source`` against ``winograd._source_channels_last``'s own path: the
    same bits (a copy), at one and two threads, with the padding zeroed even where the buffer held
    other values before."""
    from minicaffe.kernels import winograd
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    if channels is not None:
        x = x[:, channels[0]:channels[1]]
    got = {}
    for on in (False, True):
        for size in (1, 2):
            switches(compiled=on, threads=str(size))
            winograd._source_channels_last(np.full_like(x, 7.0), *pad, *extent)     # the buffer dirty
            got[on, size] = winograd._source_channels_last(x, *pad, *extent).copy()
    want = got[False, 1]
    assert want.shape == (x.shape[0],) + extent + (x.shape[1],)
    assert np.array_equal(want[:, pad[0]:pad[0] + x.shape[2], pad[1]:pad[1] + x.shape[3]], x.transpose(0, 2, 3, 1))
    for key, value in got.items():
        assert np.array_equal(value, want), key


def test_warm_up_loads_every_kernel_and_follows_the_switch(switches):
    switches(compiled=True)
    assert compiled.warm_up()
    for fn in (compiled.sgd_step, compiled.nesterov_step, compiled.winograd6_input, compiled.winograd4_output,
               compiled.space_to_depth_source, compiled.channels_last_source, compiled.relu_backward,
               compiled.winograd2x5_output, compiled.winograd2x5_gradient_tiles,
               compiled.winograd4_gradient_tiles, compiled.winograd4_gradient_tiles_cl,
               compiled.winograd3x5_gradient_tiles_cl,
               compiled.winograd_filter_gradient,
               compiled.convolution_epilogue, compiled.inner_product_rows, compiled.inner_product_rows_backward):
        assert compiled.get(fn).signatures       # compiled (or loaded) for float32
    switches(compiled=False)
    assert not compiled.warm_up()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("has_bias, relu, summed, sum_relu", [
    (True, True, False, False), (True, False, False, False), (False, True, False, False),
    (True, False, True, True), (True, True, True, False), (False, False, True, True),
    (False, False, True, False)])     # has_bias: with a per-channel scale too
def test_convolution_epilogues_match_their_numpy_twin(has_bias, relu, summed, sum_relu, dtype, switches):
    """fusion.image_epilogue's kernels against its NumPy twin (the separate layers' passes): the
    same bits, NaN and signed zeros included (ReLU is NumPy's maximum(v, 0): -0.0 becomes +0.0)."""
    from minicaffe.kernels import fusion
    shape = (3, 5, 4, 7)
    y0 = _values(dtype, shape, 1)
    y0.reshape(-1)[5::61] = np.nan
    r = _values(dtype, shape, 2)
    r.reshape(-1)[::53] = -0.0
    bias = _values(dtype, (5,), 3) if has_bias else None
    scale = _values(dtype, (5,), 4) if has_bias else None      # BatchNorm/Scale's factor, with a bias
    got = {}
    for on in (True, False):
        switches(compiled=on)
        y, out = y0.copy(), np.full(shape, 7, dtype)
        kw = dict(residual=r, out=out, sum_relu=sum_relu) if summed else {}
        finish = fusion.image_epilogue(y, bias, relu, scale=scale, **kw)
        with np.errstate(over="ignore"):        # the huge test values overflow to inf: on purpose
            finish(0, 1)
            finish(1, 3)
        got[on] = (y, out)
    for a, b in zip(got[True], got[False]):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    y, out = got[False]
    if summed:
        assert np.isnan(out).any() and (out != 7).all()
    if relu or (summed and sum_relu):
        assert not np.signbit(out if summed and sum_relu else y)[~np.isnan(out if summed and sum_relu else y)].any()


@pytest.mark.parametrize("m", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inner_product_rows_agree_with_blas_and_do_not_depend_on_the_thread_count(m, dtype, switches,
                                                                                   monkeypatch):
    """The InnerProduct forward at 2-8 rows (compiled.inner_product_rows, its sums reordered as
    BLAS reorders them; 37 outputs and 7 rows leave ragged groups of four): within rounding of the
    product, the same bits on one and two threads, and the layer takes it only with the kernels on
    (on weights this small only with ROWS_KERNEL_MIN_WEIGHTS lowered)."""
    import minicaffe as caffe
    from minicaffe.layers import inner_product
    monkeypatch.setattr(inner_product, "ROWS_KERNEL_MIN_WEIGHTS", 0)
    rng = np.random.default_rng(m)
    k, n_out = 300, 37
    text = f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {m} dim: {k} }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ num_output: {n_out} }} }}"""
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    got = {}
    for on, size in [(True, 1), (True, 2), (False, 2)]:
        switches(compiled=on, threads=str(size))
        net = caffe.Net(param, caffe.TEST)
        net.params["ip"][0].data[...] = w
        net.params["ip"][1].data[...] = b
        assert inner_product._rows_pay(x, w, np.empty((m, n_out), np.float32)) == on
        got[(on, size)] = net.forward(x=x)["y"].copy()
    want = x.astype(np.float64) @ w.astype(np.float64).T + b
    for y in got.values():
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got[(True, 1)].view(np.uint32), got[(True, 2)].view(np.uint32))
    # the kernel alone, in the test's dtype, against the product in float64
    switches(compiled=True)
    xd, wd = x.astype(dtype), w.astype(dtype)
    y = np.empty((m, n_out), dtype)
    compiled.get(compiled.inner_product_rows)(wd, xd, y, 0, n_out)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, xd.astype(np.float64) @ wd.astype(np.float64).T, rtol=tol, atol=tol * 30)


@pytest.mark.parametrize("m", [2, 3, 4, 6])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_inner_product_rows_backward_agrees_with_blas(m, grads, switches, monkeypatch):
    """InnerProduct's backward at 2-6 rows as one pass over the weights
    (compiled.inner_product_rows_backward; 3 and 6 rows leave a group of four ragged): the weight
    gradient added to what it held, the data gradient overwritten, either one alone (the other
    left as it was); within rounding of the BLAS twin (MINICAFFE_COMPILED=0), the same bits on one
    and two threads, over several column blocks."""
    from minicaffe.layers import inner_product
    from minicaffe.testing import make_layer
    monkeypatch.setattr(inner_product, "ROWS_KERNEL_MIN_WEIGHTS", 0)
    want_dw, want_dx = grads
    rng = np.random.default_rng(m)
    k, n_out = 4500, 19            # 4500 columns: five of the kernel's blocks, the last ragged
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    dy = rng.standard_normal((m, n_out)).astype(np.float32)
    dw0 = rng.standard_normal((n_out, k)).astype(np.float32)
    got = {}
    for on, size in [(True, 1), (True, 2), (False, 1)]:
        switches(compiled=on, threads=str(size))
        layer, bottom, top = make_layer(f'name: "ip" type: "InnerProduct" inner_product_param {{ num_output: {n_out} }}',
                                        [x], phase=caffe_pb2.TRAIN)
        layer.blobs[0].data[...] = w
        layer.blobs[0].diff[...] = dw0
        layer.param_propagate_down = [want_dw, True]
        bottom[0].diff[...] = 7.0
        top[0].diff[...] = dy
        assert inner_product._rows_pay(x, w, dy, inner_product.ROWS_KERNEL_BACKWARD_MAX_M) == on
        layer.backward(top, [want_dx], bottom)
        got[(on, size)] = (layer.blobs[0].diff.copy(), bottom[0].diff.copy())
    want_w = dw0 + dy.astype(np.float64).T @ x if want_dw else dw0
    want_x = dy.astype(np.float64) @ w if want_dx else np.full((m, k), 7.0)
    for dw, dx in got.values():
        np.testing.assert_allclose(dw, want_w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dx, want_x, rtol=1e-5, atol=1e-4)
    for a, b in zip(got[(True, 1)], got[(True, 2)]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("m", [1, 5, 9])
def test_inner_product_rows_backward_kernel_at_any_row_count(m):
    """The backward kernel itself at 1 row (three zero rows in its group of four) and past four
    (a second and third group, the weights read once a group): against float64."""
    rng = np.random.default_rng(m)
    k, n_out = 2100, 11
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    dy = rng.standard_normal((m, n_out)).astype(np.float32)
    dw0 = rng.standard_normal((n_out, k)).astype(np.float32)
    dw, dx = dw0.copy(), np.full((m, k), 7.0, np.float32)
    compiled.get(compiled.inner_product_rows_backward)(w, x, dy, dw, dx, True, True, 0, k)
    np.testing.assert_allclose(dw, dw0 + dy.astype(np.float64).T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_backward_agrees_with_its_twin_and_not_with_the_thread_count(dtype, in_place, switches):
    """BatchNorm's gradient with batch statistics: the compiled two passes (sums in float64) against
    the NumPy passes (einsum sums) to rounding, bit-identical at one and two threads, dx = dy too."""
    import minicaffe as caffe
    text = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 6 dim: 5 dim: 7 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 6 dim: 5 dim: 7 } } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "%s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "%s" bottom: "t" top: "l" }
""" % (("x", "x") if in_place else ("y", "y"))
    param = text_format.Parse("force_backward: true\n" + text, caffe_pb2.NetParameter())
    rng = np.random.default_rng(11)
    x = (3 * rng.standard_normal((3, 6, 5, 7)) + 1).astype(np.float32)
    target = rng.standard_normal((3, 6, 5, 7)).astype(np.float32)
    got = {}
    for on, size in [(True, 1), (True, 2), (False, 1)]:
        switches(compiled=on, threads=str(size))
        net = caffe.Net(param, caffe.TRAIN)
        net.forward(x=x, t=target)
        net.backward()
        got[(on, size)] = net.blobs["x"].diff.copy()
    assert np.array_equal(got[(True, 1)].view(np.uint32), got[(True, 2)].view(np.uint32))
    np.testing.assert_allclose(got[(True, 1)], got[(False, 1)], rtol=1e-4, atol=1e-6)
    assert np.abs(got[(False, 1)]).max() > 1e-3
    # the kernel alone in the test's dtype against the formula in float64
    switches(compiled=True)
    dy = rng.standard_normal((3, 6, 35)).astype(dtype)
    cc = rng.standard_normal((3, 6, 35)).astype(dtype)
    inv = rng.uniform(0.5, 2, 6).astype(dtype)
    d64, c64, i64 = (a.astype(np.float64) for a in (dy, cc, inv))
    want = (d64 - d64.mean(axis=(0, 2), keepdims=True)
            - c64 * (d64 * c64).mean(axis=(0, 2), keepdims=True) * i64[None, :, None] ** 2) * i64[None, :, None]
    dx = dy if in_place else np.empty_like(dy)
    compiled.get(compiled.batch_norm_backward)(dy, cc, inv, dx, 0, 6)
    np.testing.assert_allclose(dx, want, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("after_bn", [True, False])
def test_scale_backward_agrees_with_its_twin_and_not_with_the_thread_count(after_bn, switches):
    """Scale's gradient (compiled.scale_backward: the bias's and the scale's sums and dx in one pass),
    in place after a BatchNorm (reading its kept buffers) and alone (its saved input): the NumPy
    passes' values to rounding, bit-identical at one and two threads."""
    import minicaffe as caffe
    first = ('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }' if after_bn else
             'layer { name: "pre" type: "Power" bottom: "x" top: "x" power_param { shift: 0.5 } }')
    text = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 6 dim: 5 dim: 7 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 6 dim: 5 dim: 7 } } }
%s
layer { name: "sc" type: "Scale" bottom: "x" top: "x" scale_param { bias_term: true
  filler { type: "uniform" min: 0.5 max: 1.5 } bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "l" }
""" % first
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    rng = np.random.default_rng(12)
    x = (2 * rng.standard_normal((3, 6, 5, 7)) + 1).astype(np.float32)
    target = rng.standard_normal((3, 6, 5, 7)).astype(np.float32)
    got, params = {}, None
    for on, size in [(True, 1), (True, 2), (False, 1)]:
        switches(compiled=on, threads=str(size))
        net = caffe.Net(param, caffe.TRAIN)
        if params is None:
            params = [b.data.copy() for b in net.params["sc"]]
        for b, v in zip(net.params["sc"], params):
            b.data[...] = v
        net.forward(x=x, t=target)
        net.backward()
        got[(on, size)] = [net.blobs["x"].diff.copy()] + [b.diff.copy() for b in net.params["sc"]]
    for a, b in zip(got[(True, 1)], got[(True, 2)]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for a, b in zip(got[(True, 1)], got[(False, 1)]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert np.abs(b).max() > 1e-3


@pytest.mark.parametrize("spec", ["kernel_size: 3 stride: 2", "kernel_size: 3 stride: 1 pad: 1",
                                  "kernel_size: 2 stride: 2", "kernel_size: 3 stride: 2 pad: 1",
                                  "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
                                  "kernel_size: 17 stride: 3 pad: 8"])     # 289 offsets: int32 codes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_forward_compiled_has_the_numpy_passes_bits(spec, dtype, switches):
    """Pooling's MAX forward through compiled.max_pool_argmax against the NumPy passes it replaces,
    TRAIN (maxima and argmax codes, and the MASK top) and TEST (maxima): the same bits, on inputs
    with ties (small integers), signed zeros, -inf (a window of nothing else) and NaN, at one
    thread and two."""
    from minicaffe.testing import make_layer
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, (2, 3, 19, 20)).astype(dtype)
    x[0, 0] = -0.0
    x[0, 1, :7, :7] = -np.inf
    x[1, 2, 5, 5] = np.nan
    x[1, 1, 0, :] = 0.0
    text = f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {spec} }}'
    runs = {}
    for on, pool in ((False, 1), (True, 1), (True, 2)):
        switches(compiled=on, threads=str(pool))
        for phase, tops in ((caffe_pb2.TRAIN, 2), (caffe_pb2.TEST, 1)):
            layer, bottom, top = make_layer(text, [x.copy()], num_top=tops, phase=phase)
            layer.forward(bottom, top)
            got = [t.data.copy() for t in top]
            if phase == caffe_pb2.TRAIN:
                got.append(np.asarray(layer._off).copy())
            runs[(on, pool, phase)] = got
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        want = runs[(False, 1, phase)]
        for key in ((True, 1, phase), (True, 2, phase)):
            for a, b in zip(want, runs[key], strict=True):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (spec, key)
    assert np.isnan(runs[(True, 1, caffe_pb2.TEST)][0]).any()


@pytest.mark.parametrize("spec", ["kernel_size: 5 stride: 3", "kernel_size: 3 stride: 2 pad: 1",
                                  "kernel_size: 2 stride: 2", "kernel_size: 3 stride: 1 pad: 1",
                                  "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ave_pool_compiled_has_the_numpy_passes_bits(spec, dtype, switches):
    """Pooling's AVE forward and backward through compiled.ave_pool_sum / ave_pool_spread against the
    NumPy passes per window offset they replace: the same bits for the top and the bottom's
    gradient (padding, ceil-rounded windows, overlapping and disjoint windows), at one thread and
    two; and the right numbers (a window's mean) against a plain loop."""
    from minicaffe.testing import make_layer
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 14, 13)).astype(dtype)
    text = f'name: "p" type: "Pooling" pooling_param {{ pool: AVE {spec} }}'
    runs = {}
    import contextlib
    from minicaffe.core import backend
    for on, pool in ((False, 1), (True, 1), (True, 2)):
        switches(compiled=on, threads=str(pool))
        with backend.float64_blobs() if dtype == np.float64 else contextlib.nullcontext():
            layer, bottom, top = make_layer(text, [x.copy()])
        assert top[0].data.dtype == dtype
        layer.forward(bottom, top)
        top[0].diff[...] = rng.standard_normal(top[0].shape) if not runs else runs[(False, 1)][2]
        layer.backward(top, [True], bottom)
        runs[(on, pool)] = (top[0].data.copy(), bottom[0].diff.copy(), top[0].diff.copy())
    for key in ((True, 1), (True, 2)):
        for a, b in zip(runs[(False, 1)][:2], runs[key][:2]):
            assert a.tobytes() == b.tobytes(), (spec, key)
    if spec == "kernel_size: 5 stride: 3":          # no padding, windows inside the image
        y = runs[(True, 2)][0]
        want = np.array([[[[x[n, c, 3 * i:3 * i + 5, 3 * j:3 * j + 5].mean() for j in range(y.shape[3])]
                           for i in range(y.shape[2])] for c in range(3)] for n in range(2)])
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("size,beta", [(5, 0.75), (3, 0.5), (1, 1.0), (5, 1.0), (7, 0.75)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lrn_across_channels_compiled_has_the_numpy_passes_bits(size, beta, dtype, switches):
    """LRN ACROSS_CHANNELS through compiled.lrn_across_forward/backward against the layer's NumPy
    passes: the same bits for the top, the bottom's gradient, the kept scale and a forward-only
    net's top, with 4 channels
    (a window of 7 wider than them), signed zeros in the gradient and a large value beside small
    ones, at one thread and two."""
    from minicaffe.testing import make_layer
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    x[0, 1, 2, 3] = 1e3
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy[1] = -0.0
    dy[2, :, 0] = 0.0
    text = (f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: 0.7 beta: {beta} k: 1.5 }}')
    runs = {}
    for on, pool in ((False, 1), (True, 1), (True, 2)):
        switches(compiled=on, threads=str(pool))
        layer, bottom, top = make_layer(text, [x.copy()])
        layer.forward(bottom, top)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        runs[(on, pool)] = [top[0].data.copy(), bottom[0].diff.copy(), np.asarray(layer.scale).copy()]
        # a forward-only net's LRN keeps neither scale nor power (through scratch rows compiled)
        layer, bottom, top = make_layer(text, [x.copy()])
        layer.forward_only = True
        layer.forward(bottom, top)
        runs[(on, pool)].append(top[0].data.copy())
    for key in ((True, 1), (True, 2)):
        for a, b in zip(runs[(False, 1)], runs[key], strict=True):
            assert a.tobytes() == b.tobytes(), key
    assert np.abs(runs[(True, 1)][1]).max() > 1e-3


def test_lrn_compiled_kernels_run_only_where_they_match(switches, monkeypatch):
    """The compiled LRN runs for ACROSS_CHANNELS with beta 0.75, 0.5 or 1; another beta and
    WITHIN_CHANNEL take the NumPy passes."""
    from minicaffe.testing import make_layer
    switches(compiled=True)
    calls = []
    real = compiled.get

    def spy(fn):
        if fn in (compiled.lrn_across_forward, compiled.lrn_across_backward):
            calls.append(fn.__name__)
        return real(fn)
    monkeypatch.setattr(compiled, "get", spy)
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 4)).astype(np.float32)
    for spec, want in (("beta: 0.75", 2), ("beta: 0.6", 0), ("beta: 0.75 norm_region: WITHIN_CHANNEL", 0)):
        calls.clear()
        layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ local_size: 3 {spec} }}', [x])
        layer.forward(bottom, top)
        layer.backward(top, [True], bottom)
        assert len(calls) == want, spec


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_the_relu_backward_kernel_matches_its_numpy_twin(in_place, dtype, switches):
    """A ReLU layer's backward with the kernels on (compiled.relu_backward) and off (the mask and
    the multiply): the same bits, NaN, infinities and signed zeros included, at one and two
    threads; and the kernel is what runs when they are on."""
    from minicaffe.testing import make_layer
    n = (4, 5, 7, 11)
    x = _values(dtype, n, 7)
    dy0 = _values(dtype, n, 8)
    dy0.reshape(-1)[3::97] = np.nan
    dy0.reshape(-1)[5::89] = -np.inf
    x.reshape(-1)[13::101] = np.nan
    got = {}
    blobs = backend.float64_blobs() if dtype == np.float64 else contextlib.nullcontext()
    for on in (False, True):
        for size in (1, 2):
            switches(compiled=on, threads=str(size))
            with blobs:
                layer, bottom, top = make_layer('name: "r" type: "ReLU"', [x.copy()], in_place=in_place)
                layer.forward(bottom, top)
                top[0].diff[...] = dy0
                with np.errstate(invalid="ignore"):
                    layer.backward(top, [True], bottom)
            assert bottom[0].diff.dtype == dtype
            got[on, size] = bottom[0].diff.copy()
    want = got[False, 1]
    with np.errstate(invalid="ignore"):
        assert want.tobytes() == (dy0 * (np.maximum(x, 0) > 0)).tobytes()
    assert np.signbit(want[(x <= 0) & (dy0 < 0)]).all()
    for key, value in got.items():
        assert value.tobytes() == want.tobytes(), key
    assert compiled.get(compiled.relu_backward).signatures


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("both, keep_dy, coeffs", [(True, True, (1.0, 1.0)), (True, False, (1.0, -0.5)),
                                                   (False, True, (0.75, 1.0)), (False, False, (1.0, 1.0)),
                                                   (False, False, (-2.5, 1.0))])
def test_the_residual_sum_relu_backward_kernel_matches_the_layers_passes(both, keep_dy, coeffs, dtype, switches):
    """compiled.eltwise_sum_relu_backward against its twin, the ReLU's and the Eltwise's backward
    passes (activation.ReLU.gradient, Eltwise._grad_into): the same bits, NaN, infinities and
    signed zeros included (a negative gradient where y <= 0 becomes -0.0)."""
    switches(compiled=True)
    n = 1000
    dy0 = _values(dtype, (n,), 5)
    dy0[7::101] = np.nan
    dy0[9::103] = -np.inf
    y = _values(dtype, (n,), 6)
    y[11::107] = np.nan
    # the twin: ReLU's gradient in place, then the Eltwise's gradient of each bottom
    with np.errstate(invalid="ignore", over="ignore"):     # inf · 0 and the huge values: on purpose
        want_dy = dy0 * (y > 0)
        want = [want_dy * c if c != 1.0 else want_dy.copy() for c in coeffs[:1 + both]]
    dy, g0, g1 = dy0.copy(), np.full(n, 7, dtype), np.full(n, 7, dtype)
    kernel = compiled.get(compiled.eltwise_sum_relu_backward)
    for a, b in ((0, 333), (333, n)):           # two chunks, as the pool splits it
        kernel(dy, y, g0, coeffs[0], g1 if both else g0, coeffs[1], both, keep_dy, a, b)
    assert g0.tobytes() == want[0].tobytes()
    assert (g1.tobytes() == want[1].tobytes()) if both else (g1 == 7).all()
    assert dy.tobytes() == (want_dy if keep_dy else dy0).tobytes()
    assert np.signbit(want_dy[(y <= 0) & (dy0 < 0)]).all() and np.isnan(want_dy).any()
