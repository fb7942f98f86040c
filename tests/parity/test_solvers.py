"""Every solver type against BVLC Caffe: the same tiny net, LMDB and initial .caffemodel, trained by
``caffe train`` and ``minicaffe train``; the final weights must agree within 1e-5 (relative).

CI runs a representative set (each solver type, every lr_policy, L1 and L2, clipping and iter_size at
least once each); ``--runslow`` adds the full grid at the issue's 40 iterations.
"""
import itertools
import os

import pytest

from . import common
from .reference import assert_close

TOL = 1e-5
CI_ITERS = 40

# (solver type, lr_policy, regularization, clip_gradients, iter_size)
REPRESENTATIVE = [
    ("SGD", "step", "L2", None, 1),
    ("SGD", "inv", "L1", None, 1),
    ("SGD", "multistep", "L2", 0.5, 2),
    ("Nesterov", "exp", "L2", None, 1),
    ("Nesterov", "poly", "L1", 1.0, 1),
    ("AdaGrad", "fixed", "L2", None, 1),
    ("AdaGrad", "fixed", "L1", None, 2),
    ("RMSProp", "fixed", "L2", None, 1),
    ("RMSProp", "sigmoid", "L2", 0.5, 1),
    ("AdaDelta", "fixed", "L2", None, 1),
    ("AdaDelta", "step", "L1", 1.0, 2),
    ("Adam", "fixed", "L2", None, 1),
    ("Adam", "poly", "L1", 0.5, 2),
]

# A grid case whose trajectories part at a tie, not at a difference in the solver: at iteration 39,
# two outputs of conv1's fourth filter in one 2x2 pooling window (image 3, window (6, 8)) are equal
# in Caffe's float32 sums and one ulp apart in minicaffe's (1.2e-7 at -0.8647; the GEMMs add in other
# orders). MAX pooling then routes that window's gradient to another pixel, the filter's nine weight
# gradients differ by that pixel's share, and Adam's normalised step carries it on: the weights
# agree to 9e-8 through iteration 38 and that filter's part by ~1e-5 from 39 on, nothing else.
TIE_AT_ITERATION_39 = ("Adam", "inv", "L1", 0.5, 1)

FULL_GRID = [pytest.param(case, marks=pytest.mark.xfail(reason="a MAX pooling tie broken by a one-ulp "
                                                         "difference at iteration 39 (TIE_AT_ITERATION_39)"))
             if case == TIE_AT_ITERATION_39 else case
             for case in itertools.product(sorted(common.SOLVER_PARAMS), sorted(common.LR_POLICIES),
                                           ("L2", "L1"), (None, 0.5), (1, 2))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared LMDB, net and initial weights (one set for the module)."""
    d = str(tmp_path_factory.mktemp("tiny"))
    db = os.path.join(d, "db")
    common.write_lmdb(db)
    net = common.write_net(d, db)
    init = common.write_initial_weights(d, net)
    return d, net, init


def _case_id(case):
    solver, policy, reg, clip, iter_size = case
    return f"{solver}-{policy}-{reg}-clip{clip}-iter{iter_size}"


def train_both(ref, tiny, tmp_path, case, iters):
    """Train the case with both engines from the same files; returns (minicaffe's, Caffe's) weights."""
    src, _, init = tiny
    solver, policy, reg, clip, iter_size = case
    work = str(tmp_path)
    with open(os.path.join(src, "net.prototxt")) as f:
        open(os.path.join(work, "net.prototxt"), "w").write(f.read())
    out = {}
    for engine in ("caffe", "mini"):
        text = common.solver_text(solver, policy, reg, clip, iter_size, max_iter=iters, prefix=engine)
        path = common.write_solver(work, f"solver_{engine}.prototxt", text)
        if engine == "caffe":
            common.train_caffe(ref, work, path, weights=init)
        else:
            common.train_minicaffe(work, path, weights=init)
        out[engine] = common.weights(os.path.join(work, f"{engine}_iter_{iters}.caffemodel"))
    return out["mini"], out["caffe"]


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_case_id)
def test_solver_matches_caffe(ref, tiny, tmp_path, case):
    mine, theirs = train_both(ref, tiny, tmp_path, case, CI_ITERS)
    assert_close(mine, theirs, TOL, f"{_case_id(case)} after {CI_ITERS} iterations")


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_GRID, ids=_case_id)
def test_solver_grid_matches_caffe_after_40_iterations(ref, tiny, tmp_path, case):
    mine, theirs = train_both(ref, tiny, tmp_path, case, 40)
    assert_close(mine, theirs, TOL, f"{_case_id(case)} after 40 iterations")
