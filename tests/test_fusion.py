"""Inference-time fusion (minicaffe/kernels/fusion.py): Convolution+BatchNorm+Scale+ReLU and Eltwise SUM+ReLU
in TEST nets give the unfused results, leave params alone, follow param changes, and keep backward
right."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.kernels import fusion

# one projection bottleneck and one identity block, He's layout (BN/Scale/ReLU in place on conv tops)
BLOCKS = """
name: "resblocks"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 8 dim: 10 dim: 10 } } }
""" + "".join("""
layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}"
  convolution_param {{ num_output: {o} kernel_size: {k} pad: {p} stride: {s} bias_term: {bias}
    weight_filler {{ type: "gaussian" std: 0.2 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "bn_{n}" type: "BatchNorm" bottom: "{n}" top: "{n}" batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "scale_{n}" type: "Scale" bottom: "{n}" top: "{n}" scale_param {{ bias_term: true
    filler {{ type: "uniform" min: 0.5 max: 1.5 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
{relu}""".format(n=n, b=b, o=o, k=k, p=p, s=s, bias=bias,
                 relu=f'layer {{ name: "relu_{n}" type: "ReLU" bottom: "{n}" top: "{n}" }}' if r else "")
                 for n, b, o, k, p, s, bias, r in [
                     ("a_branch1", "data", 16, 1, 0, 2, "false", False),
                     ("a_branch2a", "data", 4, 1, 0, 2, "false", True),
                     ("a_branch2b", "a_branch2a", 4, 3, 1, 1, "true", True),
                     ("a_branch2c", "a_branch2b", 16, 1, 0, 1, "false", False)]) + """
layer { name: "res_a" type: "Eltwise" bottom: "a_branch1" bottom: "a_branch2c" top: "res_a" }
layer { name: "res_a_relu" type: "ReLU" bottom: "res_a" top: "res_a" }
layer { name: "b_conv" type: "Convolution" bottom: "res_a" top: "b_conv"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "b_relu" type: "ReLU" bottom: "b_conv" top: "b_conv" }
layer { name: "res_b" type: "Eltwise" bottom: "res_a" bottom: "b_conv" top: "res_b" eltwise_param { coeff: 1 coeff: 0.5 } }
layer { name: "res_b_relu" type: "ReLU" bottom: "res_b" top: "res_b" }
layer { name: "fc" type: "InnerProduct" bottom: "res_b" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
"""


def _net(tmp_path, env_switch, fused=True, source=None):
    env_switch(fusion.ENV, "1" if fused else "0")
    path = tmp_path / "blocks.prototxt"
    path.write_text(BLOCKS)
    net = caffe.Net(str(path), caffe.TEST)
    if source is not None:
        net.copy_from_proto(source.to_proto())
    else:
        rng = np.random.default_rng(3)
        for layer in net.layers:
            if layer.type == "BatchNorm":     # statistics as a trained net has them (factor != 1)
                c = layer.blobs[0].count
                layer.blobs[0].data[...] = 2.0 * rng.standard_normal(c)
                layer.blobs[1].data[...] = 2.0 * rng.uniform(0.2, 2.0, c)
                layer.blobs[2].data[...] = 2.0
    return net


@pytest.fixture
def nets(tmp_path, env_switch):
    fused = _net(tmp_path, env_switch, True)
    plain = _net(tmp_path, env_switch, False, source=fused)
    x = np.random.default_rng(0).standard_normal(fused.blobs["data"].shape).astype(np.float32)
    return fused, plain, x


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_blocks_match_unfused_in_every_blob(nets):
    fused, plain, x = nets
    assert plain._fusion is None
    kinds = sorted(type(ch).__name__ for ch in fused._fusion.chains.values())
    # a_branch2c's chain takes in the shortcut's Eltwise and its ReLU; res_b's coefficients are not 1
    assert kinds == ["ConvChain"] * 4 + ["ConvSumChain", "EltwiseReluChain"]
    fused.forward(data=x)
    plain.forward(data=x)
    assert len(fused._fusion.ran) == 6
    for name in plain.blobs:
        _close(fused.blobs[name].data, plain.blobs[name].data)
    assert float(np.abs(plain.blobs["fc"].data).max()) > 0.1


def test_params_stay_the_originals_and_changes_are_used(nets):
    fused, plain, x = nets
    before = {k: [b.data.copy() for b in v] for k, v in fused.params.items()}
    fused.forward(data=x)
    fused.forward(data=x)
    for k, v in fused.params.items():
        for a, b in zip(before[k], v):
            assert np.array_equal(a, b.data)
    # pycaffe-style surgery between forwards: the next forward uses the new values
    for net in (fused, plain):
        net.params["a_branch2b"][0].data[...] *= -0.5
        net.params["bn_a_branch2c"][0].data[...] += 1.0
        net.params["scale_a_branch1"][1].data[...] = 0.3
        net.params["b_conv"][1].data[...] = -0.2
        net.forward(data=x)
    for name in plain.blobs:
        _close(fused.blobs[name].data, plain.blobs[name].data)


def test_partial_forward_runs_a_cut_chain_unfused(nets):
    fused, plain, x = nets
    fused.blobs["data"].data[...] = x
    plain.blobs["data"].data[...] = x
    fused.forward(end="scale_a_branch2a")       # stops inside a chain: no ReLU applied
    plain.forward(end="scale_a_branch2a")
    _close(fused.blobs["a_branch2a"].data, plain.blobs["a_branch2a"].data)
    assert (plain.blobs["a_branch2a"].data < 0).any()
    fused.forward(start="relu_a_branch2a")
    plain.forward(start="relu_a_branch2a")
    _close(fused.blobs["fc"].data, plain.blobs["fc"].data)


def test_backward_after_fused_forward_gives_unfused_gradients(nets):
    fused, plain, x = nets
    dy = np.random.default_rng(1).standard_normal(fused.blobs["fc"].shape).astype(np.float32)
    for net in (fused, plain):
        net.forward(data=x)
        net.backward(fc=dy)
    assert fused._fusion is None         # a net used for gradients runs unfused from then on
    _close(fused.blobs["data"].diff, plain.blobs["data"].diff)
    for k in plain.params:
        for a, b in zip(fused.params[k], plain.params[k]):
            _close(a.diff, b.diff)
    for name in plain.blobs:
        _close(fused.blobs[name].data, plain.blobs[name].data)


def test_train_nets_and_switched_off_nets_are_not_fused(tmp_path, env_switch):
    path = tmp_path / "blocks.prototxt"
    path.write_text(BLOCKS)
    assert caffe.Net(str(path), caffe.TRAIN)._fusion is None
    env_switch(fusion.ENV, "0")
    assert caffe.Net(str(path), caffe.TEST)._fusion is None


def test_timings_name_the_convolution_of_a_fused_chain(nets):
    fused, _, x = nets
    fused.blobs["data"].data[...] = x
    timings = {}
    fused.forward_from_to(timings=timings)
    names = {fused._layer_names[i] for i in timings}
    assert "a_branch2b" in names and "bn_a_branch2b" not in names and "relu_a_branch2b" not in names


def test_no_copy_of_the_weights_is_kept(nets):
    """The folded weights are made in one shared scratch buffer at each forward: a chain keeps only
    its per-channel factors and copies of the small parameters they came from, never an array the
    size of its convolution's weights (those copies were a third of ResNet-50's inference memory)."""
    fused, plain, x = nets
    fused.forward(data=x)
    for first, ch in fused._fusion.chains.items():
        if not isinstance(ch, fusion.ConvChain) or (ch.bn is None and ch.scale is None):
            continue
        cout = fused.layers[first].blobs[0].shape[0]
        kept = [a for a in list(ch._sources) + list(ch._factors) if a is not None]
        assert kept and all(a.size in (1, cout) for a in kept), [a.shape for a in kept]   # 1: BatchNorm factor
    # the weights held by the scratch are the last chain's fold, and a second forward is the same
    y = fused.blobs["fc"].data.copy()
    fused.forward(data=x)
    np.testing.assert_array_equal(fused.blobs["fc"].data, y)


def test_forward_only_nets_allocate_no_gradients(nets):
    """A blob's diff is made on first use (as Caffe's SyncedMemory): an inference forward never
    touches one, so no gradient memory is taken; a read of ``diff`` gives zeros of the blob's shape."""
    fused, plain, x = nets
    plain.forward(data=x)
    blobs = list(plain.blobs.values()) + [b for v in plain.params.values() for b in v]
    assert not any(b._diff.allocated for b in blobs)
    w = plain.params["b_conv"][0]
    assert w.diff.shape == w.shape and not w.diff.any()
    assert w._diff.allocated


SUM_NET = """
name: "sum"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 3 dim: 6 dim: 5 dim: 5 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 6 kernel_size: {k} pad: {p} stride: 1
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.3 }} }} }}
{conv_relu}
layer {{ name: "sum" type: "Eltwise" {bottoms} top: "sum" }}
{sum_relu}
layer {{ name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param {{ pool: AVE global_pooling: true }} }}
"""


@pytest.mark.parametrize("compiled_on", ["1", "0"])
@pytest.mark.parametrize("kernel, conv_relu, order, sum_relu", [
    (1, False, "conv_first", True), (1, True, "data_first", True), (1, True, "conv_first", False),
    (3, False, "data_first", True)])
def test_convolution_sum_chain_gives_the_separate_layers_bits(tmp_path, env_switch, kernel, conv_relu, order,
                                                              sum_relu, compiled_on):
    """Convolution (+ ReLU) + Eltwise SUM (+ ReLU) as one ConvSumChain: every blob (the convolution's
    own top too) holds the bits of the separate layers, the compiled epilogue or its NumPy twin, a 1x1
    engine finishing image by image or a 3x3 one after the whole forward. Without BatchNorm/Scale the
    weights are the layer's own, so nothing rounds differently."""
    from minicaffe.core import context
    env_switch(context.COMPILED_VAR, compiled_on)
    text = SUM_NET.format(
        k=kernel, p=kernel // 2,
        conv_relu='layer { name: "r1" type: "ReLU" bottom: "conv" top: "conv" }' if conv_relu else "",
        bottoms='bottom: "conv" bottom: "data"' if order == "conv_first" else 'bottom: "data" bottom: "conv"',
        sum_relu='layer { name: "r2" type: "ReLU" bottom: "sum" top: "sum" }' if sum_relu else "")
    path = tmp_path / "sum.prototxt"
    path.write_text(text)
    x = np.random.default_rng(5).standard_normal((3, 6, 5, 5)).astype(np.float32)
    x.reshape(-1)[::17] = -0.0
    got = []
    for on in ("1", "0"):
        env_switch(fusion.ENV, on)
        net = caffe.Net(str(path), caffe.TEST)
        if got:
            net.copy_from_proto(got[0][0].to_proto())
        net.forward(data=x)
        got.append((net, {k: b.data.copy() for k, b in net.blobs.items()}))
    (fused, a), (plain, b) = got
    assert [type(ch).__name__ for ch in fused._fusion.chains.values()] == ["ConvSumChain"]
    assert list(fused._fusion.ran) == list(fused._fusion.chains)
    for name in b:
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name
    assert (b["conv"] < 0).any() != conv_relu and (b["sum"] < 0).any() != sum_relu


def test_sum_chain_with_shared_memory_runs_fused(tmp_path, env_switch):
    """With blob memory shared (inference as OpenCV runs it), the Eltwise's top never gets the memory
    of the convolution's bottom (the plan keeps a chain's blobs live over the whole chain), so the
    chain runs fused and gives the unshared net's output."""
    env_switch(fusion.ENV, "1")
    path = tmp_path / "blocks.prototxt"
    path.write_text(BLOCKS.replace("force_backward: true", ""))
    x = np.random.default_rng(0).standard_normal((2, 8, 10, 10)).astype(np.float32)
    nets = [caffe.Net(str(path), caffe.TEST, share_memory=share) for share in (True, False)]
    nets[1].copy_from_proto(nets[0].to_proto())
    for net in nets:
        net.forward(data=x)
    assert any(type(ch).__name__ == "ConvSumChain" for ch in nets[0]._fusion.ran.values())
    np.testing.assert_array_equal(nets[0].blobs["fc"].data, nets[1].blobs["fc"].data)
