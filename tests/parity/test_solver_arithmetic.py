"""The solvers' arithmetic against BVLC Caffe, bit for bit, on a net whose gradient both engines compute
exactly: ``loss = ½·Σ(s·1 + b − 0.3)²`` over two identical rows, with learnable vectors s and b. Every
gradient element is one subtraction, so whatever differs between the engines after N iterations comes
from the update rules, the learning-rate policy, regularisation, clipping or iter_size, never from
summation order in a layer.

On a real net a one-bit difference per step is amplified (RMSProp's and AdaGrad's per-element scaling
turns float32 noise in small gradients into whole-step differences), so this is where a rounding-order
mismatch is visible: after 40 iterations at most 1% of the elements may differ at all and
none by more than 1e-6 relative. What is left is rare: glibc's powf(x, 0.5) against sqrt, and the
summation order of the dot product behind clip_gradients.

Caffe's axpy/axpby are OpenBLAS's FMA kernels on every x86-64 CPU since 2013; on a CPU without FMA the
reference itself would round differently and this test would say so.
"""
import itertools
import os

import numpy as np
import pytest

from . import common
from .reference import rel_diff

K = 400
NET = f"""
name: "exact"
layer {{ name: "one" type: "DummyData" top: "one" top: "target"
  dummy_data_param {{ shape {{ dim: 2 dim: {K} }} shape {{ dim: 2 dim: {K} }}
    data_filler {{ type: "constant" value: 1 }} data_filler {{ type: "constant" value: 0.3 }} }} }}
layer {{ name: "scale" type: "Scale" bottom: "one" top: "s"
  scale_param {{ filler {{ type: "gaussian" std: 1 }} bias_term: true bias_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "target" top: "loss" }}
"""

CASES = [
    ("SGD", "inv", "L2", None, 1), ("SGD", "step", "L1", None, 2), ("SGD", "sigmoid", "L2", 1.0, 1),
    ("Nesterov", "poly", "L2", None, 1), ("Nesterov", "exp", "L1", 1.0, 2),
    ("AdaGrad", "fixed", "L2", None, 1), ("AdaGrad", "multistep", "L1", 1.0, 2),
    ("RMSProp", "inv", "L2", None, 1), ("RMSProp", "fixed", "L1", 1.0, 1),
    ("AdaDelta", "step", "L2", None, 2), ("AdaDelta", "fixed", "L1", 1.0, 1),
    ("Adam", "inv", "L2", None, 1), ("Adam", "poly", "L1", 1.0, 2),
]
GRID = list(itertools.product(sorted(common.SOLVER_PARAMS), sorted(common.LR_POLICIES), ("L2", "L1"),
                              (None, 1.0), (1, 2)))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    from minicaffe.core import backend
    from minicaffe.net.network import Net
    from minicaffe.proto import caffe_pb2
    d = str(tmp_path_factory.mktemp("exact"))
    with open(os.path.join(d, "net.prototxt"), "w") as f:
        f.write(NET)
    backend.set_random_seed(11)
    Net(os.path.join(d, "net.prototxt"), caffe_pb2.TRAIN).save(os.path.join(d, "init.caffemodel"))
    return d


def _id(case):
    return "-".join(str(x) for x in case)


def run_case(ref, exact, tmp_path, case, iters):
    solver, policy, reg, clip, iter_size = case
    work = str(tmp_path)
    with open(os.path.join(exact, "net.prototxt")) as f:
        open(os.path.join(work, "net.prototxt"), "w").write(f.read())
    init = os.path.join(exact, "init.caffemodel")
    out = {}
    for engine in ("caffe", "mini"):
        text = common.solver_text(solver, policy, reg, clip, iter_size, max_iter=iters, prefix=engine,
                                  decay=0.05)
        path = common.write_solver(work, f"{engine}.prototxt", text)
        (common.train_caffe(ref, work, path, weights=init) if engine == "caffe"
         else common.train_minicaffe(work, path, weights=init))
        out[engine] = common.weights(os.path.join(work, f"{engine}_iter_{iters}.caffemodel"))
    mine, theirs = out["mini"], out["caffe"]
    unequal = sum(int(np.sum(mine[k] != theirs[k])) for k in theirs)
    worst = max(rel_diff(mine[k], theirs[k]) for k in theirs)
    assert unequal <= 0.01 * 2 * K and worst <= 1e-6, \
        f"{_id(case)}: {unequal} of {2 * K} weights differ from Caffe's after {iters} iterations " \
        f"(largest {worst:.3g} relative)"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_solver_arithmetic_is_caffes(ref, exact, tmp_path, case):
    run_case(ref, exact, tmp_path, case, 40)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=_id)
def test_solver_arithmetic_grid_after_40_iterations(ref, exact, tmp_path, case):
    run_case(ref, exact, tmp_path, case, 40)
