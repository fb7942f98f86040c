"""Scale in place right after a BatchNorm keeps no copy of its input (layers/normalization.py,
Scale.link_producer): its backward recomputes the normalised values from the BatchNorm's own
buffers. Every gradient must keep the bits of the copying way, which a net with a pycaffe hook
still takes (a hook could change the blob between the two layers), and the partial passes of
pycaffe must fall back to the copy, or keep the buffer the Scale still needs."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.layers import normalization
from minicaffe.layers.normalization import _Normalized, _channel_mean
from minicaffe.errors import MinicaffeError
from minicaffe.proto import caffe_pb2
from minicaffe.formats.prototxt import parse_text

from test_threads import _at_one_and_two_threads, _spy_threads, pool_size  # noqa: F401 (fixture)

NET = """
name: "bn_scale"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 24 dim: 20 } shape { dim: 2 dim: 5 dim: 24 dim: 20 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 7 kernel_size: 3 pad: 1
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 5 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2"
  scale_param { filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "scale3" type: "Scale" bottom: "bn2" top: "bn2"
  scale_param { filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "bn2" bottom: "target" top: "loss" }
"""


def _nets(text=NET, dtype=np.float32):
    """The net twice with the same weights and inputs: ``shared`` as it runs, ``copying`` with a
    no-op pycaffe hook, which makes every Scale keep its copy as before."""
    param = parse_text(text, caffe_pb2.NetParameter())
    shared = caffe.Net(param, caffe.TRAIN)
    copying = caffe.Net(param, caffe.TRAIN)
    copying.before_forward(lambda li: None)
    rng = np.random.default_rng(7)
    for a, b in zip(shared.layers, copying.layers):
        for x, y in zip(a.blobs, b.blobs):
            if a.type != "BatchNorm":       # the same weights in every call (fillers draw anew)
                x.data[...] = rng.standard_normal(x.shape) * 0.4 + (1 if a.type == "Scale" else 0)
            y.data[...] = x.data
    for name in shared.inputs:
        v = rng.standard_normal(shared.blobs[name].shape) * 2 + 0.5
        shared.blobs[name].data[...] = v
        copying.blobs[name].data[...] = v
    return shared, copying


def _state(net):
    """Every blob's data and diff, and every layer's parameters and their diffs, as copies."""
    out = {}
    for name, blob in net.blobs.items():
        out[f"{name} data"] = blob.data.copy()
        out[f"{name} diff"] = blob.diff.copy()
    for li, layer in enumerate(net.layers):
        for k, b in enumerate(layer.blobs):
            out[f"{net._layer_names[li]}[{k}] data"] = b.data.copy()
            out[f"{net._layer_names[li]}[{k}] diff"] = b.diff.copy()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _iteration(net):
    net.clear_param_diffs()
    net.forward()
    net.backward()


def test_only_a_scale_in_place_on_the_batchnorms_top_is_linked():
    """scale1 (in place on bn1's in-place top) and scale2 (in place on bn2's own top) read their
    BatchNorm; scale3 follows a Scale, not a BatchNorm, and keeps its copy."""
    shared, copying = _nets()
    _iteration(shared)
    _iteration(copying)
    layers = shared.layer_dict
    assert layers["scale1"]._saved_input is None and layers["scale1"]._normalized is not None
    assert layers["scale2"]._saved_input is None and layers["scale2"]._normalized is not None
    assert layers["scale3"]._saved_input is not None and layers["scale3"]._normalized is None
    for name in ("scale1", "scale2", "scale3"):
        assert copying.layer_dict[name]._saved_input is not None, name
        assert copying.layer_dict[name]._normalized is None, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_iterations_keep_every_bit(dtype):
    """Two training iterations (the second reuses and releases the BatchNorms' buffers): every
    blob, diff, parameter and parameter diff has the bits of the copying way."""
    from minicaffe.core import backend
    import contextlib
    with backend.float64_blobs() if dtype == np.float64 else contextlib.nullcontext():
        shared, copying = _nets()
        for _ in range(2):
            _iteration(shared)
            _iteration(copying)
            _assert_same(_state(shared), _state(copying))
        assert shared.blobs["conv1"].data.dtype == dtype


def test_bits_at_one_and_two_threads(pool_size, monkeypatch):  # noqa: F811 (fixture)
    """Split over the pool, the recomputed sums keep their order: the copying net's bits at one
    thread and at two."""
    def run():
        shared, copying = _nets()
        _iteration(shared)
        _iteration(copying)
        _assert_same(_state(shared), _state(copying))
        return _state(shared)
    one, two = _at_one_and_two_threads(run, pool_size, monkeypatch)
    _assert_same(one, two)


@pytest.mark.parametrize("shape", [(2, 10, None), (1, 7, None), (3, 3, 50), (2, 1, 40), (4, 2, 9)])
def test_channel_sums_in_blocks_are_the_whole_arrays_bits(shape):
    """The sums of dy·(centred·inv_std) taken a block of channels at a time (blocks of 3, 3 and 4
    channels where ``inner`` is left to fill a block of NORMALIZED_BLOCK_ELEMENTS with 3) equal, to
    the bit, the einsum over the normalised array written out whole, over any channel range."""
    n, c, inner = shape
    if inner is None:
        inner = normalization.NORMALIZED_BLOCK_ELEMENTS // (3 * n)
    rng = np.random.default_rng(1)
    centred = rng.standard_normal((n, c, inner)).astype(np.float32) * 3
    inv_std = (rng.random(c) + 0.25).astype(np.float32)
    dy = rng.standard_normal((n, c, inner)).astype(np.float32)
    y = centred * inv_std.reshape(1, c, 1)
    ranges = [(0, c)] + ([(0, c // 2), (c // 2, c)] if c >= 4 else [])
    for d0, d1 in ranges:
        want = _channel_mean(np, dy[:, d0:d1], y[:, d0:d1], divide=False)
        got = np.empty(d1 - d0, np.float32)
        _Normalized(centred, inv_std).channel_sums(dy[:, d0:d1], d0, d1, got)
        np.testing.assert_array_equal(got, want, err_msg=f"channels {d0}..{d1}")


def test_forward_starting_at_the_scale_copies_its_input():
    """forward(start='scale1'): bn1's forward did not run just before on this data (the blob could
    hold anything now), so scale1 copies its input as before, and the gradients are the copying
    net's."""
    shared, copying = _nets()
    for net in (shared, copying):
        net.forward(end="bn1")
        net.blobs["conv1"].data[...] *= 1.5       # what a user may do between partial passes
        net.forward(start="scale1")
        net.backward()
    scale1 = shared.layer_dict["scale1"]
    assert scale1._saved_input is not None and scale1._normalized is None
    assert shared.layer_dict["scale2"]._normalized is not None
    _assert_same(_state(shared), _state(copying))


def test_a_batchnorm_run_again_before_the_backward_keeps_the_lent_buffer():
    """Forward, then bn1's forward alone on other data, then backward: scale1's gradient still
    comes from its own forward's input (bn1 wrote a new buffer instead of overwriting the lent
    one), as with the copy."""
    shared, copying = _nets()
    for net in (shared, copying):
        net.forward()
        net.blobs["conv1"].data[...] = np.random.default_rng(3).standard_normal(
            net.blobs["conv1"].shape)
        net.forward(start="bn1", end="bn1")
        net.backward()
    _assert_same(_state(shared), _state(copying))


def test_a_second_backward_reads_the_same_buffers():
    """Two backward passes after one forward (the parameter diffs add up): the released buffer is
    still intact for the second."""
    shared, copying = _nets()
    for net in (shared, copying):
        net.forward()
        net.backward()
        net.backward()
    _assert_same(_state(shared), _state(copying))


def test_a_backward_after_the_batchnorm_overwrote_the_buffer_is_one_line():
    """Forward, backward, bn1's forward alone, backward again: the buffer scale1 read was released
    at the first backward and bn1 overwrote it, so the second backward names the layers and what
    to do instead of computing a gradient from other values."""
    shared, _ = _nets()
    shared.forward()
    shared.backward()
    shared.forward(start="bn1", end="bn1")
    with pytest.raises(MinicaffeError, match=r"scale1.*BatchNorm 'bn1'.*forward again") as info:
        shared.backward()
    assert "\n" not in str(info.value)


def test_a_scale_that_copies_reuses_its_buffer():
    """A Scale that keeps a copy (not after a BatchNorm) writes each forward's copy into the last
    one's array: one copy held, not two while the new one is written."""
    shared, _ = _nets()
    scale3 = shared.layer_dict["scale3"]
    _iteration(shared)
    first = scale3._saved_input
    _iteration(shared)
    assert scale3._saved_input is first
    scale2 = shared.layer_dict["scale2"]
    want = _normalized_output(scale2) * scale2.blobs[0].data.reshape(1, -1, 1)   # scale3's input
    np.testing.assert_array_equal(first, want.reshape(first.shape))


def _normalized_output(scale):
    """The BatchNorm output that a linked Scale read, recomputed from the BatchNorm's buffers."""
    _, centred, inv_std, _ = scale._normalized
    return centred * inv_std.reshape(1, -1, 1)
