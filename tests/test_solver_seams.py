"""The seams between the solver and its neighbours: the gradient synchronisation strategy a solver is
given (the points it is called at), the one solver registry, and solvers/parallel/pycaffe working
without importing the command-line tools (tools/ is the top tier)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.errors import SolverError
from minicaffe.parallel import data_parallel as parallel
from minicaffe.solvers import GradientSync, registry, solver_class, updates

NET = """
name: "seams"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def solver_text(**fields):
    fields = {"base_lr": 0.1, "lr_policy": '"fixed"', "random_seed": 3, **fields}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return text + "net_param {" + NET + "}\n"


class Recording(GradientSync):
    """A strategy that records the points the solver calls and halves the loss it hands back."""
    name = "recording"

    def __init__(self, layer_wise):
        self.layer_wise, self.calls = layer_wise, []

    def before_forward(self, last):
        self.calls.append(("before_forward", last))

    def after_forward(self, loss, last):
        self.calls.append(("after_forward", last))

    def after_layer_backward(self, layer_index):
        self.calls.append(("layer", layer_index))

    def after_backward(self, loss, last):
        self.calls.append(("after_backward", last))
        return loss / 2

    def agree(self, value):
        self.calls.append(("agree", value))
        return value


@pytest.mark.parametrize("layer_wise", [True, False])
def test_the_solver_calls_its_gradient_sync_at_the_defined_points(layer_wise):
    s = caffe.get_solver(solver_text(iter_size=2))
    sync = Recording(layer_wise)
    s.set_gradient_sync(sync)
    assert s.gradient_sync is sync
    s.step(1)
    layers = [("layer", i) for i in range(len(s.net.layers) - 1, -1, -1)] if layer_wise else []
    assert sync.calls == [("before_forward", False), ("after_forward", False), ("after_backward", False),
                          ("before_forward", True), ("after_forward", True), *layers, ("after_backward", True),
                          ("agree", "none")]
    # the loss the solver records is the strategy's (here: half of each pass's own)
    plain = caffe.get_solver(solver_text(iter_size=2))
    plain.step(1)
    assert s.smoothed_loss == pytest.approx(plain.smoothed_loss / 2, rel=1e-6)
    for p, q in zip(plain.net.learnable_params, s.net.learnable_params):
        np.testing.assert_array_equal(p.data, q.data)     # per-layer backward: the same gradients


def test_a_solver_has_one_gradient_sync_at_a_time():
    s = caffe.get_solver(solver_text())
    assert s.gradient_sync.name == "none" and s.is_root
    first = Recording(False)
    s.set_gradient_sync(first)
    with pytest.raises(SolverError, match="already synchronises"):
        s.set_gradient_sync(Recording(False))
    s.set_gradient_sync(None)
    assert s.gradient_sync.name == "none"


def test_parallel_solver_installs_its_strategy_and_close_takes_it_back():
    s = caffe.get_solver(solver_text())
    wrapped = parallel.ParallelSolver(s, parallel.LocalComm())
    assert isinstance(s.gradient_sync, parallel.AllReduceSync) and s.gradient_sync is wrapped.sync
    wrapped.step(2)
    assert wrapped.stats["passes"] == 2
    wrapped.close()
    assert s.gradient_sync.name == "none"
    s.step(1)
    assert wrapped.stats["passes"] == 2 and s.iter == 3


def test_one_registry_names_every_solver_type():
    assert list(registry.SOLVER_CLASSES) == ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]
    for name, cls in registry.SOLVER_CLASSES.items():
        assert cls.rule_class.type == name and solver_class(name) is cls
        assert getattr(caffe, cls.__name__) is cls
    assert not hasattr(updates, "RULES")
    with pytest.raises(SolverError, match="unknown solver type 'Adamw'; known types: SGD, Nesterov"):
        solver_class("Adamw", "s.prototxt")


def test_a_registered_solver_class_is_what_get_solver_builds(monkeypatch):
    class Plain(updates.SGD):
        type = "_TestPlain"

    monkeypatch.setitem(registry.SOLVER_CLASSES, "_TestPlain", None)    # removed again after the test

    @registry.register_solver
    class PlainSolver(caffe.SGDSolver):
        rule_class = Plain

    s = caffe.get_solver(solver_text(type='"_TestPlain"'))
    assert type(s) is PlainSolver and s.type == "_TestPlain"


def test_training_imports_nothing_from_the_tools(tmp_path):
    """tools/ is the top tier: training from Python (solvers, parallel, pycaffe) must not need it."""
    code = ("import sys, minicaffe as caffe\n"
            "from minicaffe.parallel import data_parallel as parallel\n"
            f"s = parallel.ParallelSolver(caffe.get_solver({solver_text(display=1)!r}), parallel.LocalComm())\n"
            "s.step(1); caffe.log('x'); caffe.Timer().ms\n"
            "print(sorted(m for m in sys.modules if m.startswith('minicaffe.tools')))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
