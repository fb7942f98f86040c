"""Every lr_policy against Caffe's formula (sgd_solver.cpp GetLearningRate) at several iterations."""
import math

import numpy as np
import pytest

from minicaffe.errors import SolverError
from minicaffe.proto import caffe_pb2
from minicaffe.solvers.lr_policy import get_learning_rate, learning_rate


def sp(**kw):
    stepvalue = kw.pop("stepvalue", ())
    p = caffe_pb2.SolverParameter(**kw)
    p.stepvalue.extend(stepvalue)
    return p


def f(x):
    return float(np.float32(x))


ITERS = [0, 1, 7, 99, 100, 101, 250, 999]


def test_fixed():
    p = sp(lr_policy="fixed", base_lr=0.01)
    for it in ITERS:
        assert learning_rate(p, it) == (f(0.01), 0)


def test_step_and_its_current_step():
    p = sp(lr_policy="step", base_lr=0.01, gamma=0.1, stepsize=100)
    for it in ITERS:
        rate, step = learning_rate(p, it)
        assert step == it // 100
        assert rate == pytest.approx(f(0.01) * f(0.1) ** (it // 100), rel=1e-6)
    assert learning_rate(p, 99)[0] == f(0.01)
    assert learning_rate(p, 100)[0] == pytest.approx(1e-3, rel=1e-6)


def test_exp():
    p = sp(lr_policy="exp", base_lr=0.1, gamma=0.99)
    for it in ITERS:
        assert learning_rate(p, it)[0] == pytest.approx(f(0.1) * f(0.99) ** it, rel=1e-6)


def test_inv_lenet_values():
    # LeNet's solver: base_lr 0.01, gamma 1e-4, power 0.75
    p = sp(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75)
    for it in ITERS + [10000]:
        assert learning_rate(p, it)[0] == pytest.approx(f(0.01) * (1 + f(1e-4) * it) ** -f(0.75), rel=1e-6)
    assert learning_rate(p, 10000)[0] == pytest.approx(0.01 * 2 ** -0.75, rel=1e-6)


def test_multistep_tracks_current_step_like_caffe():
    p = sp(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[3, 5, 9])
    step, seen = 0, []
    for it in range(12):
        rate, step = learning_rate(p, it, step)
        seen.append((rate, step))
    expect_steps = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [s for _, s in seen] == expect_steps
    assert [r for r, _ in seen] == [0.5 ** s for s in expect_steps]
    # Caffe advances at most one step a call: resuming at 10 with a stale step of 0 catches up slowly
    assert learning_rate(p, 10, 0) == (0.5, 1)
    assert learning_rate(p, 10, 1) == (0.25, 2)


def test_poly():
    p = sp(lr_policy="poly", base_lr=0.01, power=0.5, max_iter=1000)
    for it in ITERS + [1000]:
        # Caffe: Dtype(1) - Dtype(iter) / Dtype(max_iter), in float32
        remaining = np.float32(1) - np.float32(it) / np.float32(1000)
        assert learning_rate(p, it)[0] == pytest.approx(f(0.01) * float(remaining) ** 0.5, rel=1e-6, abs=1e-12)
        assert learning_rate(p, it)[0] == pytest.approx(0.01 * (1 - it / 1000) ** 0.5, rel=1e-4)
    assert learning_rate(p, 1000)[0] == 0.0


def test_sigmoid():
    p = sp(lr_policy="sigmoid", base_lr=0.1, gamma=0.01, stepsize=500)
    for it in ITERS:
        want = f(0.1) / (1 + math.exp(-f(0.01) * (it - 500)))
        assert learning_rate(p, it)[0] == pytest.approx(want, rel=1e-6)
    assert learning_rate(p, 500)[0] == pytest.approx(0.05, rel=1e-6)


def test_inv_poly_sigmoid_round_every_step_in_float32_like_caffe():
    """Caffe evaluates inv, poly and sigmoid in float: ``gamma * iter``, ``1 + ...``, ``powf``/``expf``
    and the products are each rounded to float32. Rounding only the final double result differs in the
    last bit at some iterations, and every weight update with it (tests/parity checks against Caffe)."""
    F = np.float32

    def powf(x, y):
        return F(math.pow(float(x), float(y)))         # a correctly rounded powf, as glibc's

    cases = {
        "inv": (sp(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75),
                lambda it: F(0.01) * powf(F(1) + F(1e-4) * F(it), -F(0.75)),
                lambda it: F(f(0.01) * math.pow(1.0 + f(1e-4) * it, -f(0.75)))),
        "poly": (sp(lr_policy="poly", base_lr=0.01, power=0.5, max_iter=300),
                 lambda it: F(0.01) * powf(F(1) - F(it) / F(300), F(0.5)),
                 lambda it: F(f(0.01) * math.pow(f(F(1) - F(it) / F(300)), f(0.5)))),
        "sigmoid": (sp(lr_policy="sigmoid", base_lr=0.1, gamma=0.05, stepsize=100),
                    lambda it: F(0.1) * (F(1) / (F(1) + F(math.exp(-F(0.05) * (F(it) - F(100)))))),
                    lambda it: F(f(0.1) / (1 + math.exp(-f(0.05) * (it - 100))))),
    }
    for name, (param, caffes, rounded_once) in cases.items():
        differs = 0
        for it in range(300):
            got = learning_rate(param, it)[0]
            assert got == float(caffes(it)), (name, it)
            differs += got != float(rounded_once(it))
        assert differs, f"{name}: no iteration where rounding once would differ; the check proves nothing"


def test_rate_is_float32_rounded():
    p = sp(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75)
    r = learning_rate(p, 12345)[0]
    assert r == float(np.float32(r))


def test_get_learning_rate_does_not_advance_multistep():
    p = sp(lr_policy="multistep", base_lr=1.0, gamma=0.1, stepvalue=[2])
    assert get_learning_rate(p, 5, 0) == pytest.approx(0.1)
    assert get_learning_rate(p, 1, 0) == 1.0


def test_exp_overflow_is_inf_not_a_crash():
    p = sp(lr_policy="exp", base_lr=1.0, gamma=10.0)
    assert learning_rate(p, 10 ** 6)[0] == float("inf")


@pytest.mark.parametrize("policy", ["cosine", "Step", ""])
def test_unknown_policy_names_it(policy):
    with pytest.raises(SolverError) as e:
        learning_rate(sp(lr_policy=policy, base_lr=0.1), 0)
    assert f"'{policy}'" in str(e.value)
    assert "multistep" in str(e.value)   # the known ones are listed


@pytest.mark.parametrize("policy,field", [("step", "stepsize"), ("sigmoid", "stepsize"), ("poly", "max_iter")])
def test_missing_field_is_named(policy, field):
    with pytest.raises(SolverError, match=field):
        learning_rate(sp(lr_policy=policy, base_lr=0.1, gamma=0.5), 3)


def test_negative_gamma_rejected():
    with pytest.raises(SolverError, match="gamma"):
        learning_rate(sp(lr_policy="exp", base_lr=0.1, gamma=-1), 3)
