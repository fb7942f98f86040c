"""BatchNorm (batch statistics) + Scale (+ ReLU) fused in nets that learn (kernels/train_fusion.py).

The fused forward and backward must leave every blob, parameter and diff with the bits the layers
give one by one (a net with a pycaffe hook runs them so), at any thread count, and must fall back to
the layers wherever the chain cannot run whole."""
import dataclasses

import numpy as np
import pytest

from minicaffe.core import context
from minicaffe.kernels import compiled, train_fusion

from test_threads import _at_one_and_two_threads, pool_size  # noqa: F401 (fixture)
from test_scale_after_batchnorm import _assert_same, _state, _nets as _net_pair

pytest.importorskip("numba")

NET = """
name: "bn_chains"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 3 dim: 3 dim: 12 dim: 10 } shape { dim: 3 dim: 6 dim: 12 dim: 10 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
  scale_param { filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv2" top: "bn3" }
layer { name: "scale3" type: "Scale" bottom: "bn3" top: "bn3"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "relu3" type: "ReLU" bottom: "bn3" top: "bn3" }
layer { name: "loss" type: "EuclideanLoss" bottom: "bn3" bottom: "target" top: "loss" }
"""


def _nets(text=NET):
    """The net twice with the same weights and inputs (test_scale_after_batchnorm's pair): ``fused``
    as it runs, ``layers`` with no-op pycaffe hooks on forward and backward, which make every layer
    run alone."""
    fused, layers = _net_pair(text)
    layers.before_backward(lambda li: None)
    return fused, layers


def _count_fused(monkeypatch, chain=train_fusion.BatchNormScaleChain):
    """How many forwards and backwards of ``chain``'s kind ran fused (its run methods returned True)."""
    counts = {"forward": 0, "backward": 0}
    run, run_backward = getattr(chain, "run", None), chain.run_backward

    def spy(which, fn):
        def wrapped(self, net):
            done = fn(self, net)
            counts[which] += bool(done)
            return done
        return wrapped
    if run is not None:         # a backward-only chain has no forward
        monkeypatch.setattr(chain, "run", spy("forward", run))
    monkeypatch.setattr(chain, "run_backward", spy("backward", run_backward))
    return counts


def _iterations(net, n=2):
    for _ in range(n):
        net.clear_param_diffs()
        net.forward()
        net.backward()


def test_the_chains_are_the_in_place_batchnorm_scale_runs():
    """bn1+scale1+relu1 and bn2+scale2 are in place on their convolution's top; bn3 writes a top of
    its own, so bn3, scale3 and relu3 run as layers."""
    fused, _ = _nets()
    chains = sorted((c.first, c.last) for c in fused._train_fusion.chains.values())
    names = fused._layer_names
    assert [(names[a], names[b]) for a, b in chains] == [("bn1", "relu1"), ("bn2", "scale2")]


@pytest.mark.parametrize("share_diffs,hw", [(False, (12, 10)), (True, (12, 10)), (False, (7, 5))])
def test_fused_chains_keep_every_bit_of_the_layers_run_alone(share_diffs, hw, pool_size, monkeypatch):  # noqa: F811
    """Two iterations (running statistics and parameter diffs carried over), at one thread and two:
    every blob's data and diff and every parameter and its diff have the bits of the same net run
    layer by layer, and both chains ran fused both ways. (7x5: rows of 35 values, which no vector
    width divides: the row sums' tails, compiled.ROW_HELPERS.)"""
    text = NET.replace("dim: 12 dim: 10", f"dim: {hw[0]} dim: {hw[1]}")

    def run():
        fused, layers = _nets(text)
        counts = _count_fused(monkeypatch)
        for net in (fused, layers):
            for _ in range(2):
                net.clear_param_diffs()
                net.forward()
                net.backward_from_to(share_diffs=share_diffs)
        assert counts == {"forward": 4, "backward": 4}
        if not share_diffs:     # a solver's pass leaves activation diffs in shared buffers
            _assert_same(_state(fused), _state(layers))
        return [b.diff.copy() for b in fused.layers[1].blobs] + [fused.blobs["conv1"].data.copy()] + \
            [b.diff.copy() for layer in fused.layers for b in layer.blobs if layer.type == "Scale"]
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    for a, b in zip(one, two, strict=True):
        assert a.tobytes() == b.tobytes()
    assert np.abs(one[-1]).max() > 1e-3


def test_partial_passes_run_the_layers_and_keep_the_bits(monkeypatch):
    """A forward or backward range that cuts a chain runs its layers one by one; a fused forward
    then a backward in pieces, and a forward in pieces then a whole backward, give the layers' bits."""
    counts = _count_fused(monkeypatch)
    fused, layers = _nets()
    for net in (fused, layers):
        net.forward()
        net.backward(start="loss", end="scale2")     # cuts bn2+scale2 after its Scale
        net.backward(start="bn2")
    _assert_same(_state(fused), _state(layers))
    assert counts == {"forward": 2, "backward": 1}     # bn1's chain backward ran whole
    fused, layers = _nets()
    for net in (fused, layers):
        net.forward(end="scale1")                       # bn1's chain cut before its ReLU
        net.forward(start="relu1")
        net.backward()
    _assert_same(_state(fused), _state(layers))


def test_a_batchnorm_run_again_alone_makes_the_backward_run_the_layers(monkeypatch):
    """After bn1's forward alone on other values, bn1's gradient reads its new buffers and scale1's
    its old ones (as the layers do): the chain's backward is not fused."""
    fused, layers = _nets()
    counts = _count_fused(monkeypatch)
    for net in (fused, layers):
        net.forward()
        net.blobs["conv1"].data[...] = np.random.default_rng(3).standard_normal(net.blobs["conv1"].shape)
        net.forward(start="bn1", end="bn1")
        net.backward()
    assert counts == {"forward": 2, "backward": 1}      # the fused net's; bn2's chain backward only
    _assert_same(_state(fused), _state(layers))


def test_a_scale_that_does_not_learn_falls_back_to_the_layers(monkeypatch):
    """scale1 with lr_mult 0 keeps no buffers of the BatchNorm: the chain's forward runs fused (the
    same bits), its backward as layers."""
    text = NET.replace('layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"',
                       'layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" '
                       'param { lr_mult: 0 } param { lr_mult: 0 }')
    counts = _count_fused(monkeypatch)
    fused, layers = _nets(text)
    _iterations(fused)
    _iterations(layers)
    assert counts == {"forward": 4, "backward": 2}
    _assert_same(_state(fused), _state(layers))


def test_without_compiled_kernels_the_layers_run(monkeypatch):
    """With the compiled kernels off the chains run as layers (their NumPy passes), and agree with
    the fused chains to float32 rounding."""
    counts = _count_fused(monkeypatch)
    fused, _ = _nets()
    _iterations(fused)
    ctx = context.current()
    saved = ctx.switches
    ctx.switches = dataclasses.replace(saved, compiled=False)
    try:
        numpy_net, _ = _nets()
        _iterations(numpy_net)
    finally:
        ctx.switches = saved
    assert counts == {"forward": 4, "backward": 4}
    a, b = _state(fused), _state(numpy_net)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_fusion_switched_off_plans_no_chain():
    ctx = context.current()
    saved = ctx.switches
    ctx.switches = dataclasses.replace(saved, fusion=False)
    try:
        fused, _ = _nets()
    finally:
        ctx.switches = saved
    assert fused._train_fusion is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_forward_kernel_against_the_formula_and_any_split_of_channels(dtype):
    """compiled.batch_norm_scale_relu against BatchNorm + Scale + ReLU in float64, in place and
    not, and the same bits however the channels are split."""
    rng = np.random.default_rng(8)
    x = (3 * rng.standard_normal((4, 6, 35)) + 2).astype(dtype)
    s, b = rng.uniform(0.5, 1.5, 6).astype(dtype), rng.standard_normal(6).astype(dtype)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    want = np.maximum((x64 - mean) / np.sqrt(var + 1e-5) * s[None, :, None] + b[None, :, None], 0)
    kernel = compiled.get(compiled.batch_norm_scale_relu)
    outs = []
    for splits, in_place in [((0, 6), True), ((0, 1, 4, 6), False)]:
        xin = x.copy()
        y = xin if in_place else np.empty_like(x)
        centred, stats = np.empty_like(x), [np.empty(6, dtype) for _ in range(3)]
        for c0, c1 in zip(splits, splits[1:]):
            kernel(xin, centred, y, s, b, True, True, True, 1e-5, *stats, c0, c1)
        outs.append([y, centred] + stats)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(stats[0], mean.reshape(6), rtol=tol)
        np.testing.assert_allclose(stats[1], var.reshape(6), rtol=tol)
    for a, b_ in zip(*outs):
        assert a.tobytes() == b_.tobytes()
    assert (outs[0][0] == 0).any() and (outs[0][0] > 0).any()


RESIDUAL = """
name: "residual"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 9 dim: 8 } shape { dim: 2 dim: 6 dim: 9 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "loss" type: "EuclideanLoss" bottom: "sum" bottom: "target" top: "loss" }
"""


def _spy_sum_relu(monkeypatch):
    """How many Eltwise SUM + ReLU forwards and backwards ran fused."""
    return _count_fused(monkeypatch, train_fusion.EltwiseSumReluChain)


@pytest.mark.parametrize("share_diffs,coeff", [(False, None), (True, None), (False, "coeff: 1 coeff: -0.5"),
                                               (True, "coeff: 0.75 coeff: 1")])
def test_a_residual_sum_and_relu_run_fused_with_the_layers_bits(share_diffs, coeff, pool_size, monkeypatch):  # noqa: F811
    """A ResNet block's Eltwise SUM + ReLU in place on the sum runs as one chain, forward (the sum
    into the top's own array, rectified there) and backward (the ReLU's gradient and the sum's in
    one compiled pass): over two iterations, at one thread and two, every parameter diff has the
    bits of the layers run one by one, and so does every blob and diff where the pass keeps them
    (not a solver's shared pass). With unit and other coefficients."""
    text = RESIDUAL if coeff is None else RESIDUAL.replace(
        'top: "sum" }', f'top: "sum" eltwise_param {{ {coeff} }} }}')

    def run():
        counts = _spy_sum_relu(monkeypatch)
        fused, layers = _nets(text)
        names = fused._layer_names
        assert sorted((names[c.first], names[c.last]) for c in fused._train_fusion.chains.values()) == \
            [("bn1", "relu1"), ("bn2", "scale2"), ("sum", "relu_sum")]
        top = fused.blobs["sum"].data
        for net in (fused, layers):
            for _ in range(2):
                net.clear_param_diffs()
                net.forward()
                net.backward_from_to(share_diffs=share_diffs)
        assert counts == {"forward": 2, "backward": 2} and fused.blobs["sum"].data is top
        assert (top == 0).any() and (top > 0).any()
        if not share_diffs:
            _assert_same(_state(fused), _state(layers))
        out = []
        for name in ("conv1", "scale1", "conv2", "scale2"):
            for a, b in zip(fused.params[name], layers.params[name], strict=True):
                assert a.diff.tobytes() == b.diff.tobytes(), name
                out.append(a.diff.copy())
        assert np.abs(out[0]).max() > 1e-3
        return out
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    for a, b in zip(one, two, strict=True):
        assert a.tobytes() == b.tobytes()


def test_a_residual_sum_that_needs_no_gradient_runs_the_layers(monkeypatch):
    """Where neither of the sum's bottoms needs a gradient (net inputs, no force_backward) the
    chain's backward leaves the layers to run (they skip it): every diff as theirs."""
    text = """
name: "inputs_sum"
layer { name: "data" type: "Input" top: "a" top: "b" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } shape { dim: 2 dim: 3 dim: 4 dim: 5 }
                shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "loss" type: "EuclideanLoss" bottom: "sum" bottom: "target" top: "loss" }
"""
    counts = _spy_sum_relu(monkeypatch)
    fused, layers = _nets(text)
    for net in (fused, layers):
        net.forward()
        net.backward()
    assert counts == {"forward": 1, "backward": 0}
    _assert_same(_state(fused), _state(layers))


def test_minicaffe_time_runs_the_chains_backward_fused(monkeypatch):
    """``minicaffe time`` calls each layer's backward itself (Caffe's loop): where a chain ends it
    runs the chain's backward fused instead (``Net.fused_backward_at``), timed on its last layer, with
    the gradients of the layers one by one."""
    from minicaffe.tools import cli
    counts = _count_fused(monkeypatch)
    fused, layers = _nets()
    assert fused.fused_backward_at(list(fused._layer_names).index("relu1")) is None   # no forward yet
    fused.forward()
    layers.forward()
    timings = {}
    cli._backward_every_layer(fused, timings)
    layers.backward()
    names = list(fused._layer_names)
    assert counts["backward"] == 2
    assert names.index("relu1") in timings and names.index("bn1") not in timings
    for name in ("conv1", "scale1", "conv2", "scale2", "scale3"):
        for a, b in zip(fused.params[name], layers.params[name]):
            np.testing.assert_array_equal(a.diff, b.diff, err_msg=name)


CONV_RELU = """
name: "conv_relu"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 9 dim: 8 } shape { dim: 2 dim: 5 dim: 4 dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 5 kernel_size: 3 stride: 2 bias_term: false
                      weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "relu2" }
layer { name: "loss" type: "EuclideanLoss" bottom: "relu2" bottom: "target" top: "loss" }
"""


def test_a_convolution_and_its_in_place_relu_run_fused_with_the_layers_bits(monkeypatch):
    """Convolution + ReLU in place on its top is a forward-only chain, the ReLU applied with the
    bias image by image: every bit as the layers give it over two iterations. A ReLU into a top of
    its own (relu2) stays a layer."""
    from minicaffe.kernels import fusion
    ran = []
    run = fusion.ConvChain.run
    monkeypatch.setattr(fusion.ConvChain, "run", lambda self, net: ran.append(1) or run(self, net))
    fused, layers = _nets(CONV_RELU)
    names = fused._layer_names
    assert sorted((names[c.first], names[c.last]) for c in fused._train_fusion.chains.values()) == \
        [("conv1", "relu1")]
    _iterations(fused)
    _iterations(layers)
    assert len(ran) == 2
    _assert_same(_state(fused), _state(layers))
    top = fused.blobs["conv1"].data
    assert (top == 0).any() and (top > 0).any()


RELU_POOL = """
name: "relu_pool"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 11 dim: 9 } shape { dim: 2 dim: 4 dim: 5 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 5 kernel_size: 3 pad: 1
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
layer { name: "relu_p" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "pool2" type: "Pooling" bottom: "pool1" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "pool2" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool3" type: "Pooling" bottom: "conv2" top: "pool3"
  pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "pool3" bottom: "target" top: "loss" }
"""


def _relu_pool_chains(net):
    names = net._layer_names
    return sorted((names[c.first], names[c.last]) for c in net._train_fusion.by_last.values()
                  if isinstance(c, train_fusion.ReluMaxPoolChain))


@pytest.mark.parametrize("share_diffs", [False, True])
def test_a_relu_and_its_max_pool_run_backward_as_one_scatter(share_diffs, pool_size, monkeypatch):  # noqa: F811
    """An in-place ReLU read by a MAX pooling (overlapping windows; padded ones, some of one
    value) runs its gradient
    in the pool's scatter: over two iterations, at one thread and two, every parameter diff has the
    bits of the layers one by one, and every blob and diff too where the pass keeps them. The
    ReLU's mask matters here: pool2 gives a nonzero gradient to argmaxes that hold a rectified
    zero, which relu_p's gradient then zeroes. A ReLU followed by AVE pooling (relu2) stays a
    layer."""
    def run():
        counts = _count_fused(monkeypatch, train_fusion.ReluMaxPoolChain)
        fused, layers = _nets(RELU_POOL)
        assert _relu_pool_chains(fused) == [("relu1", "pool1"), ("relu_p", "pool2")]
        pool2 = list(layers._layer_names).index("pool2")
        unmasked = []
        layers.after_backward(lambda li: li == pool2 and unmasked.append(layers.blobs["pool1"].diff.copy()))
        for net in (fused, layers):
            for _ in range(2):
                net.clear_param_diffs()
                net.forward()
                net.backward_from_to(share_diffs=share_diffs)
        assert counts["backward"] == 4
        assert ((unmasked[-1] != 0) & (layers.blobs["pool1"].data == 0)).any()
        if not share_diffs:
            _assert_same(_state(fused), _state(layers))
        out = []
        for name in ("conv1", "conv2"):
            for a, b in zip(fused.params[name], layers.params[name], strict=True):
                np.testing.assert_array_equal(a.diff, b.diff, err_msg=name)
                out.append(a.diff.copy())
        assert np.abs(out[0]).max() > 1e-3
        return out
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    for a, b in zip(one, two, strict=True):
        assert a.tobytes() == b.tobytes()


def test_the_relu_mask_in_the_scatter_is_its_numpy_twins():
    """``ScatterMaxPooling.pool_backward(relu=True)``: the compiled scatter and the NumPy one
    (``np.add.at``, then the mask) give the same bits, which are the pool's gradient rectified
    where the bottom is not positive."""
    from minicaffe.kernels import pooling_engines
    from minicaffe.testing import make_layer, forward
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((2, 3, 9, 8)).astype(np.float32), 0)
    layer, bottom, top = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 '
                                    'stride: 2 pad: 1 }', [x], phase=0)
    forward(layer, bottom, top)
    engine = layer.engine
    assert isinstance(engine, pooling_engines.ScatterMaxPooling) and engine.relu_applies(x, bottom[0].diff)
    dy = rng.standard_normal(top[0].shape).astype(np.float32)
    plain, compiled_dx = np.empty_like(x), np.empty_like(x)
    engine.pool_backward(x, dy, plain)
    engine.pool_backward(x, dy, compiled_dx, relu=True)
    ctx = context.current()
    saved = ctx.switches
    ctx.switches = dataclasses.replace(saved, compiled=False)
    try:
        numpy_dx = np.full_like(x, np.nan)
        engine.pool_backward(x, dy, numpy_dx, relu=True)
    finally:
        ctx.switches = saved
    assert compiled_dx.tobytes() == numpy_dx.tobytes()
    np.testing.assert_array_equal(compiled_dx, np.where(x > 0, plain, 0))
    assert ((plain != 0) & (x == 0)).any()


def test_a_relu_before_a_max_pool_that_ends_another_chain_or_has_other_readers_stays_a_layer():
    """A BatchNorm + Scale + ReLU chain's ReLU keeps that chain's backward; a ReLU whose blob a
    later layer also reads (through a Split) is not the pool's alone."""
    text = NET.replace('layer { name: "conv2"', '''layer { name: "pool1" type: "Pooling" bottom: "conv1"
  top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu_s" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "pool_s" type: "Pooling" bottom: "pool1" top: "pool_s" pooling_param { pool: MAX kernel_size: 2 } }
layer { name: "flat" type: "Flatten" bottom: "pool1" top: "flat" }
layer { name: "conv2"''')
    fused, _ = _nets(text)
    assert _relu_pool_chains(fused) == []
