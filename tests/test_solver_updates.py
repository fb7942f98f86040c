"""Caffe's update rules, by hand: a one-parameter problem whose gradient is known exactly.

The test layer ``_TestQuadLoss`` holds one learnable vector ``w`` and outputs
``0.5·Σ(w − c)²``, so the gradient is ``w − c`` and every rule can be followed with scalar
arithmetic, independently of the array code in ``minicaffe/solvers/updates.py``.
"""
import math

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.errors import SolverError
from minicaffe.core import layer as layer_base
from minicaffe.core.layer import Layer
from minicaffe.solvers import solver_class, updates


class QuadLoss(Layer):
    """loss = 0.5·Σ(w − c)²; python_param.param_str = "w0 w1 ...|c0 c1 ..."."""

    exact_num_bottom = 0
    exact_num_top = 1
    is_loss = True

    def setup(self, bottom, top):
        w0, c = self.param.python_param.param_str.split("|")
        w0 = np.array(w0.split(), np.float32)
        self.c = np.array(c.split(), np.float32)
        self.blobs = [caffe.Blob(w0.shape)]
        self.blobs[0].data[...] = w0

    def reshape(self, bottom, top):
        top[0].reshape(())

    def forward(self, bottom, top):
        d = self.blobs[0].xdata - self.xp.asarray(self.c)
        top[0].xdata[...] = 0.5 * (d * d).sum()

    def backward(self, top, propagate_down, bottom):
        if self.need_param_grad(0):
            self.blobs[0].xdiff += top[0].xdiff * (self.blobs[0].xdata - self.xp.asarray(self.c))


QuadLoss.type = "_TestQuadLoss"


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The test-only layer type exists for this module's tests only (other tests see a clean registry)."""
    layer_base._REGISTRY["_TestQuadLoss"] = QuadLoss
    yield
    layer_base._REGISTRY.pop("_TestQuadLoss", None)


def make_solver(kind="SGD", w0=(1.0,), c=(0.0,), param_spec="", **fields):
    lines = "\n".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in fields.items())
    lines = lines.replace("'", '"')
    text = f"""
type: "{kind}"
{lines}
net_param {{
  name: "quad"
  layer {{ name: "quad" type: "_TestQuadLoss" top: "loss" {param_spec}
           python_param {{ param_str: "{' '.join(map(str, w0))}|{' '.join(map(str, c))}" }} }}
}}
"""
    return caffe.get_solver(text)


def w_of(solver):
    return solver.net.params["quad"][0].data.copy()


def run(solver, n):
    out = []
    for _ in range(n):
        solver.step(1)
        out.append(w_of(solver))
    return out


# --- SGD, momentum ------------------------------------------------------------------------------

def test_sgd_momentum_by_hand():
    s = make_solver("SGD", base_lr=0.1, momentum=0.9, lr_policy="fixed")
    ws = run(s, 3)
    # w=1, c=0: v=0.1 → w=0.9; v=0.09+0.09=0.18 → 0.72; v=0.162+0.072=0.234 → 0.486
    np.testing.assert_allclose([w[0] for w in ws], [0.9, 0.72, 0.486], rtol=1e-6)
    np.testing.assert_allclose(s.history[0].data, [0.234], rtol=1e-6)
    assert s.iter == 3


def test_sgd_elementwise_with_target():
    s = make_solver("SGD", w0=(1.0, -2.0), c=(0.5, 0.5), base_lr=0.5, lr_policy="fixed")
    (w1,) = run(s, 1)
    np.testing.assert_allclose(w1, [1 - 0.5 * 0.5, -2 - 0.5 * -2.5], rtol=1e-6)


def test_nesterov_by_hand():
    s = make_solver("Nesterov", base_lr=0.1, momentum=0.9, lr_policy="fixed")
    ws = run(s, 3)
    # v' = m v + lr g; step = (1+m) v' − m v
    # it0: g=1, v'=0.1, step=0.19 → 0.81
    # it1: g=0.81, v'=0.171, step=1.9·0.171 − 0.09 = 0.2349 → 0.5751
    # it2: g=0.5751, v'=0.21141, step=1.9·0.21141 − 0.1539 = 0.247779 → 0.327321
    np.testing.assert_allclose([w[0] for w in ws], [0.81, 0.5751, 0.327321], rtol=1e-5)


def reference(kind, w, g_of, n, lr=0.1, m=0.9, m2=0.999, delta=1e-8, rms=0.99):
    """The rules in scalar float64 arithmetic, written from the papers/Caffe formulas."""
    h1 = h2 = 0.0
    out = []
    for it in range(n):
        g = g_of(w)
        if kind == "AdaGrad":
            h1 += g * g
            step = lr * g / (math.sqrt(h1) + delta)
        elif kind == "RMSProp":
            h1 = rms * h1 + (1 - rms) * g * g
            step = lr * g / (math.sqrt(h1) + delta)
        elif kind == "AdaDelta":
            h1 = m * h1 + (1 - m) * g * g
            u = g * math.sqrt((h2 + delta) / (h1 + delta))
            h2 = m * h2 + (1 - m) * u * u
            step = lr * u
        elif kind == "Adam":
            t = it + 1
            h1 = m * h1 + (1 - m) * g          # first moment
            h2 = m2 * h2 + (1 - m2) * g * g    # second moment
            step = lr * math.sqrt(1 - m2 ** t) / (1 - m ** t) * h1 / (math.sqrt(h2) + delta)
        w = w - step
        out.append(w)
    return out


def test_adagrad_accumulates_squares():
    s = make_solver("AdaGrad", base_lr=0.1, lr_policy="fixed")
    ws = run(s, 3)
    # it0: h=1, step 0.1 → 0.9; it1: h=1.81, step 0.09/1.34536 = 0.066896 → 0.833104
    assert ws[0][0] == pytest.approx(0.9, rel=1e-6)
    assert ws[1][0] == pytest.approx(0.9 - 0.09 / math.sqrt(1.81), rel=1e-6)
    np.testing.assert_allclose([w[0] for w in ws], reference("AdaGrad", 1.0, lambda w: w, 3), rtol=1e-5)
    np.testing.assert_allclose(s.history[0].data, [1 + 0.81 + ws[1][0] ** 2], rtol=1e-5)


def test_rmsprop():
    s = make_solver("RMSProp", base_lr=0.01, rms_decay=0.98, lr_policy="fixed")
    ws = run(s, 3)
    # it0: h = 0.02·1, step = 0.01/√0.02 = 0.0707107
    assert ws[0][0] == pytest.approx(1 - 0.01 / math.sqrt(0.02), rel=1e-6)
    np.testing.assert_allclose([w[0] for w in ws], reference("RMSProp", 1.0, lambda w: w, 3, lr=0.01, rms=0.98),
                               rtol=1e-5)


def test_adadelta_two_histories():
    s = make_solver("AdaDelta", base_lr=1.0, momentum=0.95, delta=1e-6, lr_policy="fixed")
    ws = run(s, 3)
    # it0: h1 = 0.05, u = √(1e-6/(0.05+1e-6)) = 0.00447209, h2 = 0.05·u²
    u0 = math.sqrt(1e-6 / (0.05 + 1e-6))
    assert ws[0][0] == pytest.approx(1 - u0, rel=1e-6)
    np.testing.assert_allclose([w[0] for w in ws],
                               reference("AdaDelta", 1.0, lambda w: w, 3, lr=1.0, m=0.95, delta=1e-6), rtol=1e-5)
    assert len(s.history) == 2            # Caffe's layout: [h1 of each param..., h2 of each param...]
    # the second history is the decayed mean of squared updates (lr not included)
    g0 = 1.0
    h2_0 = 0.05 * (g0 * u0) ** 2
    s2 = make_solver("AdaDelta", base_lr=1.0, momentum=0.95, delta=1e-6, lr_policy="fixed")
    s2.step(1)
    np.testing.assert_allclose(s2.history[1].data, [h2_0], rtol=1e-5)
    np.testing.assert_allclose(s2.history[0].data, [0.05], rtol=1e-6)


def test_adadelta_uses_the_learning_rate_too():
    a = make_solver("AdaDelta", base_lr=1.0, momentum=0.95, delta=1e-6, lr_policy="fixed")
    b = make_solver("AdaDelta", base_lr=0.5, momentum=0.95, delta=1e-6, lr_policy="fixed")
    a.step(1)
    b.step(1)
    np.testing.assert_allclose(1 - w_of(b), 0.5 * (1 - w_of(a)), rtol=1e-4)  # w ≈ 1: float32 ulp


def test_adam_bias_correction():
    s = make_solver("Adam", base_lr=0.001, momentum=0.9, momentum2=0.999, delta=1e-8, lr_policy="fixed")
    ws = run(s, 3)
    # first step: m = 0.1, v = 0.001, corrected lr = 0.001·√0.001/0.1, step = that · 0.1/√0.001 = 0.001
    assert ws[0][0] == pytest.approx(1 - 0.001, rel=1e-5)
    np.testing.assert_allclose([w[0] for w in ws],
                               reference("Adam", 1.0, lambda w: w, 3, lr=0.001, m=0.9, m2=0.999), rtol=1e-6)
    np.testing.assert_allclose(s.history[0].data, [0.1 * 0.9 * 0.9 + 0.1 * 0.9 * ws[0][0] + 0.1 * ws[1][0]],
                               rtol=1e-5)


# --- regularisation, multipliers, normalisation, clipping -----------------------------------------

def test_l2_weight_decay_with_decay_and_lr_mult():
    s = make_solver("SGD", w0=(2.0,), c=(1.0,), base_lr=0.1, weight_decay=0.1, lr_policy="fixed",
                    param_spec="param { lr_mult: 2 decay_mult: 3 }")
    ws = run(s, 2)
    # local_rate = 0.2, local_decay = 0.3: g = (w − 1) + 0.3 w
    w = 2.0
    for got in ws:
        w = w - 0.2 * ((w - 1) + 0.3 * w)
        assert got[0] == pytest.approx(w, rel=1e-6)


def test_l1_weight_decay_uses_the_sign():
    s = make_solver("SGD", w0=(2.0, -3.0), c=(2.0, -3.0), base_lr=0.5, weight_decay=0.1,
                    regularization_type="L1", lr_policy="fixed")
    (w1,) = run(s, 1)
    # gradient 0 at the target; only the L1 term: 0.5·0.1·sign(w)
    np.testing.assert_allclose(w1, [2.0 - 0.05, -3.0 + 0.05], rtol=1e-6)


def test_lr_mult_zero_freezes_and_decay_mult_zero_skips_decay():
    s = make_solver("SGD", w0=(2.0,), c=(0.0,), base_lr=0.1, weight_decay=1.0, lr_policy="fixed",
                    param_spec="param { lr_mult: 0 }")
    s.step(2)
    assert w_of(s)[0] == 2.0
    s = make_solver("SGD", w0=(2.0,), c=(0.0,), base_lr=0.1, weight_decay=1.0, lr_policy="fixed",
                    param_spec="param { decay_mult: 0 }")
    s.step(1)
    assert w_of(s)[0] == pytest.approx(2.0 - 0.1 * 2.0)


def test_iter_size_normalises_accumulated_gradients():
    a = make_solver("SGD", w0=(1.0, 3.0), base_lr=0.1, momentum=0.5, lr_policy="fixed", c=(0.0, 0.0))
    b = make_solver("SGD", w0=(1.0, 3.0), base_lr=0.1, momentum=0.5, lr_policy="fixed", c=(0.0, 0.0),
                    iter_size=3)
    a.step(3)
    b.step(3)
    np.testing.assert_allclose(w_of(a), w_of(b), rtol=1e-6)


def test_clip_gradients_scales_by_the_global_norm(logs):
    s = make_solver("SGD", w0=(3.0, 4.0), c=(0.0, 0.0), base_lr=1.0, clip_gradients=1.0, lr_policy="fixed")
    s.step(1)
    # gradient (3, 4) has norm 5 > 1: scaled by 0.2 → (0.6, 0.8)
    np.testing.assert_allclose(w_of(s), [2.4, 3.2], rtol=1e-6)
    assert any("Gradient clipping: scaling down gradients (L2 norm 5 > 1) by scale factor 0.2" in m
               for m in logs)
    # below the threshold nothing changes
    s = make_solver("SGD", w0=(0.3, 0.4), c=(0.0, 0.0), base_lr=1.0, clip_gradients=1.0, lr_policy="fixed")
    s.step(1)
    np.testing.assert_allclose(w_of(s), [0.0, 0.0], atol=1e-7)


def test_lr_policy_drives_the_rate():
    s = make_solver("SGD", base_lr=0.1, lr_policy="step", gamma=0.5, stepsize=1)
    ws = run(s, 2)
    assert ws[0][0] == pytest.approx(0.9, rel=1e-6)          # lr 0.1
    assert ws[1][0] == pytest.approx(0.9 - 0.05 * 0.9, rel=1e-6)   # lr 0.05
    assert s.current_step == 1


# --- the pure functions and their guards ----------------------------------------------------------

def test_pure_functions_keep_float32_and_work_in_place():
    g = np.array([3.0, 4.0], np.float32)
    h = np.zeros(2, np.float32)
    rule = updates.SGD(caffe.proto.caffe_pb2.SolverParameter(momentum=0.9))
    rule.compute(g, [h], [], 0.1, 0)
    assert g.dtype == np.float32 and h.dtype == np.float32
    np.testing.assert_allclose(g, [0.3, 0.4], rtol=1e-6)
    w = np.array([1.0, -1.0], np.float32)
    g = np.zeros(2, np.float32)
    updates.regularize(w, g, 0.5, "L2", np.empty(2, np.float32))
    np.testing.assert_allclose(g, [0.5, -0.5])
    updates.normalize(g, 2)
    np.testing.assert_allclose(g, [0.25, -0.25])
    assert updates.global_l2_norm([np.array([3.0], np.float32), np.array([4.0], np.float32)]) == 5.0
    assert updates.clip_gradients([np.array([3.0], np.float32)], -1) is None


def _fused(a, x, y):
    """``a·x + y`` rounded once: the exact float32 product summed in float64, then rounded to float32."""
    return (np.float64(a) * x.astype(np.float64) + y.astype(np.float64)).astype(np.float32)


def test_axpy_steps_round_once_as_caffes_blas():
    """Caffe's caffe_axpy and caffe_cpu_axpby end in OpenBLAS's saxpy, a fused multiply-add on x86-64:
    ``decay·w``, ``lr·g`` and ``(1 − β)·g²`` are not rounded on their own before the sum. Rounding them
    first differs in the last bit of ~2% of the elements each step, and AdaGrad/RMSProp amplify that."""
    P = caffe.proto.caffe_pb2.SolverParameter
    rng = np.random.default_rng(1)
    w, g, h = rng.normal(size=(3, 4096)).astype(np.float32)
    decay, lr = updates.f32(5e-4), updates.f32(0.01)

    got = g.copy()
    updates.regularize(w, got, decay, "L2", np.empty_like(g))
    assert np.array_equal(got, _fused(decay, w, g))
    assert not np.array_equal(got, g + np.float32(decay) * w)       # the two roundings do differ here

    sgd_g, sgd_h = g.copy(), h.copy()
    updates.SGD(P(momentum=0.9)).compute(sgd_g, [sgd_h], [], lr, 0)
    want = _fused(lr, g, h * np.float32(0.9))
    assert np.array_equal(sgd_h, want) and np.array_equal(sgd_g, want)

    nes_g, nes_h = g.copy(), h.copy()
    updates.Nesterov(P(momentum=0.9)).compute(nes_g, [nes_h], [np.empty_like(g)], lr, 0)
    new_h = _fused(lr, g, h * np.float32(0.9))
    assert np.array_equal(nes_g, _fused(updates.f32(1.9), new_h, h * np.float32(-0.9)))

    hist = np.abs(h)
    rms_g, rms_h = g.copy(), hist.copy()
    updates.RMSProp(P(rms_decay=0.98, delta=1e-8)).compute(rms_g, [rms_h], [np.empty_like(g)], lr, 0)
    assert np.array_equal(rms_h, _fused(updates.f32(1 - np.float32(0.98)), g * g, hist * np.float32(0.98)))

    m, v = h.copy(), hist.copy()
    updates.Adam(P(momentum=0.9, momentum2=0.999, delta=1e-8)).compute(g.copy(), [m, v], [np.empty_like(g)], lr, 0)
    assert np.array_equal(m, _fused(updates.f32(1 - np.float32(0.9)), g, h * np.float32(0.9)))
    assert np.array_equal(v, _fused(updates.f32(1 - np.float32(0.999)), g * g, hist * np.float32(0.999)))


def test_unknown_regularization_is_an_error():
    with pytest.raises(SolverError, match="regularization_type 'L3'"):
        make_solver("SGD", base_lr=0.1, weight_decay=0.1, regularization_type="L3", lr_policy="fixed")


@pytest.mark.parametrize("kind,extra,msg", [
    ("AdaGrad", {"momentum": 0.9}, "momentum cannot be used with AdaGrad"),
    ("RMSProp", {"momentum": 0.9}, "momentum cannot be used with RMSProp"),
    ("RMSProp", {"rms_decay": 1.5}, "rms_decay"),
])
def test_caffe_sanity_checks(kind, extra, msg):
    with pytest.raises(SolverError, match=msg):
        make_solver(kind, base_lr=0.1, lr_policy="fixed", **extra)


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_rules_on_gpu_match_cpu(kind, gpu):
    cp = backend.xp()
    param = caffe.proto.caffe_pb2.SolverParameter(momentum=0.9 if kind not in ("AdaGrad", "RMSProp") else 0,
                                                 delta=1e-6)
    rule = solver_class(kind).rule_class(param)
    rng = np.random.default_rng(0)
    g_host = rng.normal(size=(3, 5)).astype(np.float32)
    outs = []
    for xp in (np, cp):
        g = xp.asarray(g_host.copy())
        hist = [xp.asarray(np.full((3, 5), 0.1, np.float32)) for _ in range(rule.history_sets)]
        tmp = [xp.empty_like(g) for _ in range(rule.scratch)]
        for it in range(3):
            rule.compute(g, hist, tmp, 0.01, it)
        outs.append(backend.to_host(g))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind, compiled_step", [("SGD", True), ("Nesterov", True), ("Adam", False)])
def test_a_step_of_many_iterations_clears_the_diffs_in_the_update(kind, compiled_step, monkeypatch):
    """Within one ``step(n)`` the compiled SGD/Nesterov update leaves the diffs zero, so the next
    iteration skips ClearParamDiffs (one clear per call, not one per iteration); the last update
    leaves the update values as Caffe does. The same bits as ``n`` calls of ``step(1)``, which
    clear every iteration; rules without a compiled step clear every iteration as before."""
    from minicaffe.kernels import compiled
    if compiled_step and not compiled.enabled():
        pytest.skip("the compiled kernels are off")
    fields = dict(base_lr=0.1, momentum=0.9, lr_policy="fixed", weight_decay=0.01)
    if kind == "Adam":
        fields["momentum2"] = 0.999
    solvers = [make_solver(kind, w0=(1.0, -2.0, 3.0), c=(0.5, 0.25, -1.0), **fields) for _ in range(2)]
    clears = []
    for k, s in enumerate(solvers):
        orig = s.net.clear_param_diffs
        monkeypatch.setattr(s.net, "clear_param_diffs", lambda orig=orig, k=k: clears.append(k) or orig())
    solvers[0].step(4)
    for _ in range(4):
        solvers[1].step(1)
    assert clears.count(0) == (1 if compiled_step else 4) and clears.count(1) == 4
    a, b = (s.net.params["quad"][0] for s in solvers)
    assert a.data.tobytes() == b.data.tobytes() and a.diff.tobytes() == b.diff.tobytes()
    assert solvers[0].history[0].data.tobytes() == solvers[1].history[0].data.tobytes()
    assert np.abs(a.diff).max() > 0          # the last update's values, not zeros
