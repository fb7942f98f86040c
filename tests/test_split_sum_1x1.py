"""A lone 1x1 convolution on a Split's top adds its data gradient straight into the Split's sum in a
solver's pass (minicaffe/kernels/train_fusion.Conv1x1SplitSumChain): the same parameter gradients
and weights as the layer's own backward followed by the diff plan's add, and the layer's own
backward wherever the sum is not made as gradients arrive."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.kernels import train_fusion
from minicaffe.net import diff_plan

# a residual block on 10x10 maps (too small for a stacked 1x1 group): "stem" feeds the shortcut
# (the Eltwise), branch "a" (1x1 with a ReLU, then 3x3, then 1x1 back to 8 channels) and a second
# lone 1x1 "side" without a bias, concatenated after the sum
NET = """
name: "block"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 3 dim: 6 dim: 10 dim: 10 } shape { dim: 3 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 4.999 } } }
layer { name: "stem" type: "Convolution" bottom: "data" top: "stem"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "stem_relu" type: "ReLU" bottom: "stem" top: "stem" }
layer { name: "a" type: "Convolution" bottom: "stem" top: "a"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: -0.05 } } }
layer { name: "a_relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "a" top: "b"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "c" type: "Convolution" bottom: "b" top: "c"
  convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "stem" bottom: "c" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "side" type: "Convolution" bottom: "stem" top: "side"
  convolution_param { num_output: 2 kernel_size: 1 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "side" top: "cat" }
layer { name: "ip" type: "InnerProduct" bottom: "cat" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture
def runs(monkeypatch):
    """The layers whose backward the chain ran (returned True), by name."""
    ran = []
    original = train_fusion.Conv1x1SplitSumChain.run_backward

    def spy(self, net):
        done = original(self, net)
        if done:
            ran.append(net.layer_names[self.first])
        return done
    monkeypatch.setattr(train_fusion.Conv1x1SplitSumChain, "run_backward", spy)
    return ran


def _net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    caffe.set_random_seed(7)
    return caffe.Net(str(path), caffe.TRAIN)


def _pass(net, on, monkeypatch, share=True):
    """One forward and backward with the chain on or off: the parameter diffs and the stem's."""
    monkeypatch.setattr(train_fusion, "SPLIT_SUM_1X1_BACKWARD", on)
    caffe.set_random_seed(11)           # DummyData draws new values each forward
    for layer in net.layers:
        for b in layer.blobs:
            b.diff[...] = 0
    net.forward_from_to()
    net.backward_from_to(share_diffs=share)
    params = {n: [b.diff.copy() for b in blobs] for n, blobs in net.params.items()}
    return params


def _assert_close(got, want):
    for name in want:
        for a, b in zip(got[name], want[name]):
            scale = float(np.abs(b).max()) or 1.0
            np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=2e-6, err_msg=name)


def test_the_plan_takes_the_lone_1x1_convolutions_on_a_split(tmp_path):
    net = _net(tmp_path)
    chains = [ch for ch in net._train_fusion.by_last.values() if isinstance(ch, train_fusion.Conv1x1SplitSumChain)]
    assert sorted(net.layer_names[ch.first] for ch in chains) == ["a", "side"]


@pytest.mark.parametrize("alias_first,chained", [(True, ["a"]), (False, ["a", "side"])])
def test_a_solver_pass_adds_the_gradients_into_the_split_sum(tmp_path, monkeypatch, runs, alias_first, chained):
    """"side", the split top's last reader, gives the sum its first gradient: into the bottom's
    own buffer through its own backward (``ALIAS_FIRST_TOP``), else written there by the chain (not
    added: the buffer holds the last pass's values). The Eltwise's gradient is added next, and "a"
    adds its own last. The parameter gradients, the stem's reached through that sum, are the
    layers' own."""
    monkeypatch.setattr(diff_plan, "ALIAS_FIRST_TOP", alias_first)
    net = _net(tmp_path)
    want = _pass(net, False, monkeypatch)
    assert runs == []
    got = _pass(net, True, monkeypatch)
    assert sorted(runs) == chained
    _assert_close(got, want)
    again = _pass(net, True, monkeypatch)
    _assert_close(again, want)
    assert got["stem"][0].any()


def test_training_with_the_chain_gives_the_same_weights(tmp_path, monkeypatch):
    def train(on):
        monkeypatch.setattr(train_fusion, "SPLIT_SUM_1X1_BACKWARD", on)
        text = ('type: "SGD" momentum: 0.9 base_lr: 0.05 lr_policy: "fixed" weight_decay: 0.001 '
                f'random_seed: 3 display: 0 net_param {{ {NET} }}')
        solver = caffe.get_solver(text)
        solver.step(4)
        return {n: [b.data.copy() for b in blobs] for n, blobs in solver.net.params.items()}
    _assert_close(train(True), train(False))


def test_pycaffe_backward_and_check_mode_run_the_layers_own(tmp_path, monkeypatch, runs):
    """pycaffe's backward keeps every diff (no sum made as gradients arrive): the split tops' diffs
    are there; a net checking finiteness reads them, so the chain stands aside there too."""
    net = _net(tmp_path)
    want = _pass(net, False, monkeypatch, share=False)
    got = _pass(net, True, monkeypatch, share=False)
    assert runs == []
    _assert_close(got, want)
    split_tops = [net.bottom_names[n][0] for n in ("a", "side")]
    assert all("_split_" in t and net.blobs[t].diff.any() for t in split_tops)
    net.check_finite = True
    _pass(net, True, monkeypatch)
    assert runs == []
