"""A solver's backward pass keeps activation gradients only while they are live, in shared buffers,
and sums a Split's tops into its bottom as they arrive (minicaffe/net/diff_plan.py): the same
gradients and training as Caffe's per-top diffs, less memory, and pycaffe's own backward unchanged."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.net import diff_plan

# "x" feeds three layers (one of them with an in-place ReLU after it on its split top), "h" two,
# and one layer takes two split tops of different blobs: ranges that meet and ranges that do not
NET = """
name: "splits"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 6 dim: 5 } shape { dim: 6 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "x" type: "InnerProduct" bottom: "data" top: "x"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu_x" type: "ReLU" bottom: "x" top: "x_relu" }
layer { name: "h" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "h_relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "b" type: "InnerProduct" bottom: "h" top: "b"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "h" bottom: "x_relu" top: "sum" }
layer { name: "out" type: "InnerProduct" bottom: "sum" top: "out"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }
"""


def _solver(float64=False):
    text = ('type: "SGD" momentum: 0.9 base_lr: 0.05 lr_policy: "fixed" weight_decay: 0.001 '
            f'random_seed: 3 display: 0 net_param {{ {NET} }}')
    return caffe.get_solver(text)


def _grads(net):
    return {name: [b.diff.copy() for b in blobs] for name, blobs in net.params.items()}


def test_the_plan_shares_buffers_only_between_gradients_that_are_never_live_together():
    net = _solver().net
    plan = diff_plan.DiffPlan(net)
    assert len(plan.splits) == 2                  # x (three users) and h (two)
    name = {id(b): n for n, b in net.blobs.items()}
    planned = {name[id(b)] for b in plan.slot_of}
    assert {n for n in net.blobs if "_split_" in n} <= planned
    # net input data, the label (no gradient) and the loss (seeded at its layer) keep their own
    assert not planned & {"data", "label", "loss"}
    # a split top is live over its own users only: x's third top feeds h alone (layer 5)
    top = net.blobs["x_x_0_split_2"]
    assert plan.span_of[top] == (5, 5)
    # each Split's first-arriving top writes into its bottom's buffer: the one whose user comes
    # last in the net (x's third, into h; h's second, into sum), live inside the bottom's span
    assert {name[id(t)] for t in plan.aliased.values()} == {"x_x_0_split_2", "h_h_relu_0_split_1"}
    aliased = {id(t) for t in plan.aliased.values()}
    for s, t in plan.aliased.items():
        bottom = plan.splits[s][1]
        assert plan.slot_of[t] == plan.slot_of[bottom]
        lo, hi = plan.span_of[bottom]
        assert lo <= plan.span_of[t][0] <= plan.span_of[t][1] <= hi
    # otherwise two diffs in one buffer are never live at one layer
    by_slot = {}
    for b, k in plan.slot_of.items():
        if id(b) in aliased:
            continue
        by_slot.setdefault((k, b.dtype), []).append(plan.span_of[b])
    for spans in by_slot.values():
        spans.sort()
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans
    assert len(by_slot) < len(plan.slot_of)        # and some do share


def test_solver_gradients_match_the_per_top_sum():
    """One solver pass (shared) against pycaffe's backward (Caffe's per-top diffs) on the same net
    and data: every parameter gradient and every non-split blob's diff agree (summing order: the
    last bit at most for the three-way split)."""
    solver = _solver()
    net = solver.net
    net.forward()
    data = net.blobs["data"].data.copy()
    net.clear_param_diffs()
    net.backward()
    want = _grads(net)
    want_x = net.blobs["x"].diff.copy()

    # the same forward values (DummyData refills: put the first draw back), then the solver's pass
    net.clear_param_diffs()
    net.blobs["data"].data[...] = data
    net.forward_from_to(start=1)
    net.backward_from_to(share_diffs=True)
    got = _grads(net)
    for name in want:
        for a, b in zip(got[name], want[name]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(net.blobs["x"].diff, want_x, rtol=1e-6, atol=1e-7)
    assert net._shared_diffs.in_use

    # pycaffe's backward again: per-top diffs come back, each its own array, the sums Caffe's
    net.clear_param_diffs()
    net.backward()
    assert not net._shared_diffs.in_use
    again = _grads(net)
    for name in want:
        for a, b in zip(again[name], want[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    tops = [b for n, b in net.blobs.items() if "_split_" in n]
    assert len({id(t.diff) for t in tops}) == len(tops)


def test_the_first_arriving_top_is_written_into_the_bottom_with_the_same_bits(monkeypatch):
    """Each Split's first-arriving top writes its gradient into the bottom's own buffer, so a solver
    pass adds the other tops and copies none (three adds for x's three tops and h's two, against
    five sums with a copy each for the first), with every gradient's bits as with the copies."""
    from minicaffe.layers import shape
    calls = []
    orig = shape.Split.sum_into
    monkeypatch.setattr(shape.Split, "sum_into", lambda self, out, diffs: calls.append(len(diffs)) or
                        orig(self, out, diffs))

    def one_pass(alias):
        monkeypatch.setattr(diff_plan, "ALIAS_FIRST_TOP", alias)
        solver = _solver()
        net = solver.net
        net.forward()
        calls.clear()
        net.clear_param_diffs()
        net.backward_from_to(share_diffs=True)
        return sorted(calls), _grads(net), net.blobs["x"].diff.copy()

    got_calls, got, got_x = one_pass(True)
    want_calls, want, want_x = one_pass(False)
    assert got_calls == [2, 2, 2] and want_calls == [1, 1, 2, 2, 2]
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            assert a.tobytes() == b.tobytes(), name
    assert got_x.tobytes() == want_x.tobytes() and np.abs(got_x).max() > 0


def test_training_with_shared_split_diffs_matches_per_top_diffs(monkeypatch, iters=3):
    """Whole solver steps, shared against per-top diffs (the plan switched off): the same weights."""
    shared = _solver()
    shared.step(iters)
    plain = _solver()
    orig = plain.net.backward_from_to
    monkeypatch.setattr(plain.net, "backward_from_to",
                        lambda *a, share_diffs=False, **k: orig(*a, **k))
    plain.step(iters)
    for name, blobs in plain.net.params.items():
        for a, b in zip(shared.net.params[name], blobs):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_split_whose_top_carries_a_loss_weight_keeps_its_own_backward():
    """The loss blob (an explicit loss_weight) also feeds two layers: Caffe's split takes the loss
    weight onto its first top, whose diff is seeded at the Split's own step, so that Split is left
    out of the plan."""
    text = NET.replace('top: "loss" }', 'top: "loss" loss_weight: 1 }') + ''.join(f'layer {{ name: "p{k}" type: "Power" bottom: "loss" top: "p{k}" '
                         f'power_param {{ scale: {k} }} loss_weight: 0.5 }}' for k in (2, 3))
    solver = caffe.get_solver('type: "SGD" base_lr: 0.01 lr_policy: "fixed" display: 0 '
                              f'net_param {{ {text} }}')
    net = solver.net
    plan = diff_plan.DiffPlan(net)
    loss_split = [s for s, layer in enumerate(net.layers)
                  if getattr(layer, "is_split", False) and net._bottom[s][0] is net.blobs["loss"]]
    assert len(loss_split) == 1 and any(net._loss_weights[loss_split[0]])
    assert loss_split[0] not in plan.splits and len(plan.splits) == 2
    solver.step(2)
    assert np.isfinite(net.blobs["loss"].data).all()


def test_gpu_training_with_shared_diffs_matches_per_top_diffs(gpu, monkeypatch):
    """The same on the GPU (device buffers; Eltwise's and the Split's device paths)."""
    test_training_with_shared_split_diffs_matches_per_top_diffs(monkeypatch)


def _model_solver_step(directory, share, batch):
    """One SGD step of ``models/<directory>/train_val.prototxt`` (its data layer an Input of random
    images and labels), with the shared-gradient pass or Caffe's per-top diffs; the update values."""
    import os

    from minicaffe.formats.prototxt import filter_net, load_net_param, make_state
    from minicaffe.proto import caffe_pb2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    param = filter_net(load_net_param(os.path.join(root, "models", directory, "train_val.prototxt")),
                       make_state(caffe_pb2.TRAIN))
    net = caffe_pb2.NetParameter(name=param.name)
    for lp in param.layer:
        if lp.type == "Data":
            data = net.layer.add(name=lp.name, type="Input", top=lp.top[:2])
            data.input_param.shape.add().dim.extend([batch, 3, 224, 224])
            data.input_param.shape.add().dim.extend([batch])
        elif lp.type != "Accuracy":
            net.layer.add().CopyFrom(lp)
    sp = caffe_pb2.SolverParameter(net_param=net, base_lr=0.01, momentum=0.9, lr_policy="fixed",
                                   random_seed=5, display=0)
    solver = caffe.SGDSolver(sp)
    rng = np.random.default_rng(1)
    solver.net.blobs["data"].data[...] = rng.standard_normal((batch, 3, 224, 224))
    solver.net.blobs["label"].data[...] = rng.integers(0, 1000, batch)
    if not share:
        orig = solver.net.backward_from_to
        solver.net.backward_from_to = lambda *a, share_diffs=False, **k: orig(*a, **k)
    solver.step(1)
    return {n: [p.diff.copy() for p in ps] for n, ps in solver.net.params.items()}


def _assert_same_updates(directory, batch):
    got, want = _model_solver_step(directory, True, batch), _model_solver_step(directory, False, batch)
    assert got.keys() == want.keys()
    for name in want:
        for a, b in zip(got[name], want[name]):
            scale = float(np.abs(b).max()) or 1.0
            np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-5, err_msg=name)


def test_googlenet_step_matches_per_top_diffs():
    """GoogLeNet's TRAIN net (four-way splits into Concat branches, auxiliary losses with loss
    weights, dropout): the same update values as with Caffe's per-top diffs, to float32 rounding
    (the splits' sums run in another order)."""
    _assert_same_updates("googlenet", 1)


@pytest.mark.slow
def test_resnet50_step_matches_per_top_diffs():
    """ResNet-50's TRAIN net (shortcut splits, Eltwise, BatchNorm + Scale in place)."""
    _assert_same_updates("resnet50", 2)
