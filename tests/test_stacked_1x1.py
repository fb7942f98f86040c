"""Sibling 1x1 convolutions on one Split run as one stacked GEMM in nets that learn
(minicaffe/kernels/stacked_1x1.py): the same tops, parameter gradients and bottom gradient as the
layers one by one, in pycaffe's backward, a solver's pass, partial ranges and ``minicaffe time``."""
import numpy as np
import pytest

import dataclasses

import minicaffe as caffe
from minicaffe.core import context
from minicaffe.kernels import compiled, stacked_1x1

# an inception-like module on 14x14 maps (196 positions: stacked_1x1.MIN_COLUMNS): "stem" feeds three
# 1x1 members (b1 with a ReLU in place, b2 without a bias or ReLU, b3 with a ReLU and frozen weights)
# and a pooling branch, which is not a member
NET = """
name: "module"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 3 dim: 6 dim: 14 dim: 14 } shape { dim: 3 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 4.999 } } }
layer { name: "stem" type: "Convolution" bottom: "data" top: "stem"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "stem_relu" type: "ReLU" bottom: "stem" top: "stem" }
layer { name: "b1" type: "Convolution" bottom: "stem" top: "b1"
  convolution_param { num_output: 5 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: -0.05 } } }
layer { name: "b1_relu" type: "ReLU" bottom: "b1" top: "b1" }
layer { name: "b2" type: "Convolution" bottom: "stem" top: "b2"
  convolution_param { num_output: 3 kernel_size: 1 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "b2c" type: "Convolution" bottom: "b2" top: "b2c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "pool" type: "Pooling" bottom: "stem" top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "pp" type: "Convolution" bottom: "pool" top: "pp"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "b3" type: "Convolution" bottom: "stem" top: "b3"
  param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: 0.02 } } }
layer { name: "b3_relu" type: "ReLU" bottom: "b3" top: "b3" }
layer { name: "cat" type: "Concat" bottom: "b1" bottom: "b2c" bottom: "pp" bottom: "b3" top: "cat" }
layer { name: "ip" type: "InnerProduct" bottom: "cat" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture
def runs(monkeypatch):
    """How often the group's stacked forward and backward ran (returned True)."""
    counts = {"forward": 0, "backward": 0}
    for what in counts:
        original = getattr(stacked_1x1.Group, what)

        def spy(self, net, _original=original, _what=what):
            done = _original(self, net)
            counts[_what] += bool(done)
            return done
        monkeypatch.setattr(stacked_1x1.Group, what, spy)
    return counts


@pytest.fixture
def switches():
    """``switches(compiled=...)``: the context's switches for the rest of the test."""
    ctx = context.current()
    saved = ctx.switches
    yield lambda **kw: setattr(ctx, "switches", dataclasses.replace(saved, **kw))
    ctx.switches = saved


def _net(tmp_path, text=NET):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    caffe.set_random_seed(7)
    return caffe.Net(str(path), caffe.TRAIN)


def _pass(net, stacked, monkeypatch, share=False, start=None, end=0):
    """One forward and backward with the group stacked or not; every blob's data, the diffs pycaffe
    keeps (none of split tops: the Split sums them) and the parameter diffs."""
    monkeypatch.setattr(stacked_1x1, "STACKED", stacked)
    caffe.set_random_seed(11)           # DummyData draws new values each forward
    for layer in net.layers:
        for b in layer.blobs:
            b.diff[...] = 0
    net.forward_from_to()
    net.backward_from_to(start, end, share_diffs=share)
    data = {n: b.data.copy() for n, b in net.blobs.items()}
    diffs = {n: b.diff.copy() for n, b in net.blobs.items() if "_split_" not in n}
    params = {n: [b.diff.copy() for b in blobs] for n, blobs in net.params.items()}
    return data, diffs, params


def _assert_close(got, want):
    for name in want:
        for a, b in zip(np.atleast_1d(got[name]) if not isinstance(got[name], list) else got[name],
                        np.atleast_1d(want[name]) if not isinstance(want[name], list) else want[name]):
            scale = float(np.abs(b).max()) or 1.0
            np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=2e-6, err_msg=name)


def test_the_plan_groups_the_one_by_one_convolutions_on_one_split(tmp_path):
    net = _net(tmp_path)
    groups = net._train_fusion.groups
    assert len(groups) == 1
    names = net.layer_names
    g = groups[0]
    assert [names[m] for m in g.members] == ["b1", "b2", "b3"]
    assert [None if r is None else names[r] for r in g.relus] == ["b1_relu", None, "b3_relu"]
    # a Split whose top a Reshape views is left out: an in-place layer on the view, between the
    # members, would write the data the tails read
    viewed = NET.replace('layer { name: "pool" type: "Pooling" bottom: "stem"',
                         'layer { name: "view" type: "Reshape" bottom: "stem" top: "sv" '
                         'reshape_param { shape { dim: 0 dim: -1 } } }\n'
                         'layer { name: "sv_relu" type: "ReLU" bottom: "sv" top: "sv" }\n'
                         'layer { name: "sv_loss" type: "EuclideanLoss" bottom: "sv" bottom: "sv" top: "l2" }\n'
                         'layer { name: "pool" type: "Pooling" bottom: "stem"')
    other = _net(tmp_path, viewed)
    assert "view" in other.layer_names
    assert other._train_fusion is None or not other._train_fusion.groups
    # a TEST net is left to the inference fusion
    path = tmp_path / "net.prototxt"
    assert not caffe.Net(str(path), caffe.TEST)._train_fusion or \
        not caffe.Net(str(path), caffe.TEST)._train_fusion.groups


def test_stacked_forward_matches_the_layers_one_by_one(tmp_path, monkeypatch, runs):
    """pycaffe's forward and backward: every blob and every parameter gradient as the layers one by
    one give them. The backward keeps every split top's own diff, so it runs the members one by one."""
    net = _net(tmp_path)
    want = _pass(net, False, monkeypatch)
    assert runs == {"forward": 0, "backward": 0}
    got = _pass(net, True, monkeypatch)
    assert runs == {"forward": 1, "backward": 0}
    for a, b in zip(got, want):
        _assert_close(a, b)
    assert not got[2]["b3"][0].any()
    assert got[1]["stem"].any() and got[2]["b2"][0].any()
    split_diffs = [net.blobs[net.bottom_names[n][0]].diff for n in ("b1", "b2", "b3")]
    assert all(d.any() for d in split_diffs)


def test_a_solver_pass_adds_the_stacked_gradient_into_the_split_sum(tmp_path, monkeypatch, runs):
    """A solver's pass (shared diffs, the Split's sum made as gradients arrive): the head adds the
    members' summed gradient straight into the sum, the tails add nothing; the parameter gradients
    (which reach the stem's weights through that sum) are the per-layer ones."""
    net = _net(tmp_path)
    want = _pass(net, False, monkeypatch, share=True)[2]
    got = _pass(net, True, monkeypatch, share=True)[2]
    assert runs == {"forward": 1, "backward": 1}
    _assert_close(got, want)
    assert got["stem"][0].any() and not got["b3"][0].any()


def test_training_with_the_stacked_group_gives_the_same_weights(tmp_path, monkeypatch):
    def train(stacked):
        monkeypatch.setattr(stacked_1x1, "STACKED", stacked)
        text = ('type: "SGD" momentum: 0.9 base_lr: 0.05 lr_policy: "fixed" weight_decay: 0.001 '
                f'random_seed: 3 display: 0 net_param {{ {NET} }}')
        solver = caffe.get_solver(text)
        solver.step(4)
        return {n: [b.data.copy() for b in blobs] for n, blobs in solver.net.params.items()}
    _assert_close(train(True), train(False))


@pytest.mark.parametrize("start_layer", ["b2c", "b2", "b1"])
def test_a_backward_from_between_the_members_runs_them_one_by_one(tmp_path, monkeypatch, runs, start_layer):
    """Only a whole solver's pass sums the Split as gradients arrive: a backward that starts
    between the members runs them one by one, after the stacked forward."""
    net = _net(tmp_path)
    start = net.layer_names.index(start_layer)
    want = _pass(net, False, monkeypatch, share=True, start=start)
    got = _pass(net, True, monkeypatch, share=True, start=start)
    assert runs == {"forward": 1, "backward": 0}
    _assert_close(got[2], want[2])
    _assert_close(got[1], want[1])


def test_a_forward_that_stops_between_the_members_runs_them_one_by_one(tmp_path, monkeypatch, runs):
    net = _net(tmp_path)
    monkeypatch.setattr(stacked_1x1, "STACKED", True)
    names = net.layer_names
    net.forward_from_to(0, names.index("b2c"))
    assert runs["forward"] == 0
    net.forward_from_to(names.index("b2c") + 1)
    b3 = net.blobs["b3"].data.copy()
    net.forward_from_to(1)              # the data as it is: the stacked forward from the stem on
    assert runs["forward"] == 1
    np.testing.assert_allclose(net.blobs["b3"].data, b3, rtol=0, atol=1e-6)


def test_minicaffe_time_backward_gives_the_same_gradients(tmp_path, monkeypatch, runs):
    """``minicaffe time``'s loop (each layer's backward, the activation gradients as a solver's
    pass keeps them: the group runs stacked)."""
    from minicaffe.tools.cli import _backward_every_layer

    def grads(stacked):
        monkeypatch.setattr(stacked_1x1, "STACKED", stacked)
        net = _net(tmp_path)
        caffe.set_random_seed(11)
        net.forward_from_to()
        _backward_every_layer(net, {})
        return {n: [b.diff.copy() for b in blobs] for n, blobs in net.params.items()}
    want = grads(False)
    got = grads(True)
    assert runs["backward"] == 1
    _assert_close(got, want)


def test_check_mode_hooks_and_small_maps_run_the_layers_one_by_one(tmp_path, monkeypatch, runs):
    net = _net(tmp_path)
    net.check_finite = True
    _pass(net, True, monkeypatch)
    assert runs == {"forward": 0, "backward": 0}
    net.check_finite = False
    monkeypatch.setattr(stacked_1x1, "MIN_COLUMNS", 197)
    _pass(net, True, monkeypatch)
    assert runs == {"forward": 0, "backward": 0}
    monkeypatch.setattr(stacked_1x1, "MIN_COLUMNS", 196)
    seen = []
    net.before_forward(lambda li: seen.append(li))
    _pass(net, True, monkeypatch)
    assert runs == {"forward": 0, "backward": 0} and seen


@pytest.mark.parametrize("has_bias, relu", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_rows_kernel_gives_its_numpy_twins_bits(has_bias, relu, dtype, switches):
    rng = np.random.default_rng(3)
    y = rng.standard_normal((5, 37)).astype(dtype)
    y[1, 3], y[2, 4] = np.nan, -0.0
    bias = rng.standard_normal(5).astype(dtype) if has_bias else None
    got = {}
    for on in (True, False):
        switches(compiled=on)
        out = np.full_like(y, 7)
        stacked_1x1.copy_rows(y, bias, relu, out)
        got[on] = out
    assert np.array_equal(got[True].view(np.uint8), got[False].view(np.uint8))
    if relu:
        assert not np.signbit(got[False][~np.isnan(got[False])]).any()
    assert compiled.get(compiled.epilogue_copy).signatures
