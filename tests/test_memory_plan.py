"""Blob memory sharing for forward-only nets (minicaffe/net/memory_plan.py, Net.share_blob_memory):
every model in models/ computes the same values bit for bit with and without it, every layer's tops
included; the plan never gives two blobs that are live at once the same buffer (the models and
random DAG-shaped nets from NetSpec); it holds less memory; a read of a reused blob raises a NetError
naming it; keep=, reshape, and TRAIN / force_backward / backward are refused."""
import glob
import os
import sys

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.errors import NetError
from minicaffe.formats.prototxt import load_net_param
from minicaffe.net import memory_plan
from minicaffe.net_spec import NetSpec, layers as L, params as P
from minicaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "models", "**", "deploy.prototxt"),
                                                              recursive=True))


def small_deploy(path):
    """The deploy net at batch 2 on small images, its convolutions a quarter as wide and its fully
    connected layers at most 64 wide (the layer graph, which is what the plan depends on, is the
    model's; the fully connected layers take their input size from their bottom; a 7x7 final
    pooling becomes global), so that a whole model runs in about a second."""
    param = load_net_param(os.path.join(ROOT, path))
    side = 67 if any(lp.convolution_param.kernel_size[:1] == [11] for lp in param.layer) else 32
    for lp in param.layer:
        if lp.type == "Input":
            for shape in lp.input_param.shape:
                shape.dim[0] = 2
                if len(shape.dim) == 4:
                    shape.dim[2] = shape.dim[3] = side if shape.dim[1] != 1 else shape.dim[2]
        if lp.type == "Convolution":
            lp.convolution_param.num_output = max(1, lp.convolution_param.num_output // 4)
        if lp.type == "InnerProduct":
            lp.inner_product_param.num_output = min(64, lp.inner_product_param.num_output)
        if lp.type == "Pooling" and lp.pooling_param.kernel_size >= 7:
            lp.pooling_param.global_pooling = True
            lp.pooling_param.ClearField("kernel_size")
    return param


def random_params(net, seed=0):
    """Weights and BatchNorm statistics that keep activations away from zero, so a wrong value shows."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for k, blob in enumerate(layer.blobs):
            if layer.type == "BatchNorm":
                blob.data[...] = (rng.uniform(-0.1, 0.1, blob.shape) if k == 0 else
                                  rng.uniform(0.5, 1.5, blob.shape) if k == 1 else 1.0)
            elif k == 0 and blob.count > 1:
                fan_in = blob.count // blob.shape[0]
                blob.data[...] = rng.standard_normal(blob.shape) * np.sqrt(2.0 / fan_in)
            else:
                blob.data[...] = rng.uniform(0.5, 1.0, blob.shape) if layer.type == "Scale" else \
                    0.05 * rng.standard_normal(blob.shape)


def pair(param, keep=()):
    """The same TEST net twice, weights shared: plain, and with blob memory shared."""
    caffe.set_random_seed(1)
    plain = caffe.Net(param, caffe.TEST)
    random_params(plain)
    shared = caffe.Net(param, caffe.TEST)
    shared.share_with(plain)
    shared.share_blob_memory(keep=keep)
    return plain, shared


def feed(net, seed=5):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32) for name in net.inputs}


def record_tops(net, poison=False):
    """Hooks that copy every layer's tops right after it runs; with ``poison`` the tops a layer
    writes (not in place, not views of its bottom) are filled with NaN before it runs, so a layer
    that read a buffer's earlier contents would show."""
    seen = []

    def before(li):
        layer, bottoms = net.layers[li], net.bottom_vecs[li]
        if poison and bottoms and not layer.tops_view_bottom:     # an Input layer writes nothing
            for t in net.top_vecs[li]:
                if all(t is not b for b in bottoms) and t.buffer is not None:
                    t.xdata[...] = np.nan

    def after(li):
        seen.append([(t.name, t.data.copy()) for t in net.top_vecs[li]])
    net.before_forward(before)
    net.after_forward(after)
    return seen


def assert_no_live_overlap(plan):
    for members in plan.buffers:
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                assert a.last < b.first or b.last < a.first, (a.names, b.names)
    pinned = [g for g in plan.groups if g.pinned]
    assert not any(g in members for g in pinned for members in plan.buffers)


@pytest.mark.parametrize("path", MODELS)
def test_models_identical_with_shared_memory(path):
    param = small_deploy(path)
    plain, shared = pair(param)
    x = feed(plain)
    a, b = plain.forward(**x), shared.forward(**x)       # fused where the net fuses
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
        assert np.ptp(a[name]) > 0, name                 # a live output, not a constant
    # every layer's tops, unfused (hooks), with the shared net's fresh tops poisoned first
    seen_a, seen_b = record_tops(plain), record_tops(shared, poison=True)
    plain.forward(**x)
    shared.forward(**x)
    assert [[n for n, _ in tops] for tops in seen_a] == [[n for n, _ in tops] for tops in seen_b]
    for tops_a, tops_b in zip(seen_a, seen_b):
        for (name, va), (_, vb) in zip(tops_a, tops_b):
            assert np.array_equal(va, vb), name
    plan = shared.memory_plan
    assert_no_live_overlap(plan)
    assert plan.planned_bytes < plan.private_bytes
    # Split, Flatten and Reshape tops are views in their bottom's buffer, not copies
    for layer, bottoms, tops in zip(shared.layers, shared.bottom_vecs, shared.top_vecs):
        if layer.tops_view_bottom:
            assert all(t.buffer is bottoms[0].buffer for t in tops), layer.name
    # the buffers really are fewer bytes than the blobs' own memory would be
    distinct = {id(g.buffer): g.buffer.nbytes for g in plan.groups}
    assert sum(distinct.values()) == plan.planned_bytes


def random_dag(seed):
    """A small net of random shape: convolutions, in-place ReLUs, pooling, branches joined by Concat
    or Eltwise, a Flatten or Reshape, blobs read by several later layers (so Splits), a Dropout
    and a Softmax."""
    rng = np.random.default_rng(seed)
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 12, 12]))
    live = [n.data]             # tops of 4-D blobs of 6 channels or 3 (the input)
    chans = {id(n.data): 3}
    for i in range(int(rng.integers(4, 9))):
        kind = rng.choice(["conv", "conv", "relu", "concat", "eltwise", "pool"])
        src = live[int(rng.integers(len(live)))]
        if kind == "relu" or (kind in ("concat", "eltwise") and len(live) < 2):
            top = L.Convolution(src, num_output=6, kernel_size=3, pad=1, weight_filler=dict(type="xavier"),
                                bias_filler=dict(type="gaussian", std=0.1))
            setattr(n, f"c{i}", top)
            setattr(n, f"r{i}", L.ReLU(top, in_place=True))
        elif kind == "conv":
            top = L.Convolution(src, num_output=6, kernel_size=1, weight_filler=dict(type="xavier"))
            setattr(n, f"c{i}", top)
        elif kind == "pool":
            top = L.Pooling(src, kernel_size=3, stride=1, pad=1, pool=P.Pooling.MAX)
            setattr(n, f"p{i}", top)
            chans[id(top)] = chans[id(src)]
            live.append(top)
            continue
        else:
            other = [b for b in live if b is not src]
            peer = other[int(rng.integers(len(other)))]
            if kind == "eltwise" and chans[id(src)] == chans[id(peer)]:
                top = L.Eltwise(src, peer)
                setattr(n, f"e{i}", top)
                chans[id(top)] = chans[id(src)]
            else:
                top = L.Concat(src, peer)
                setattr(n, f"cat{i}", top)
                chans[id(top)] = chans[id(src)] + chans[id(peer)]
            live.append(top)
            continue
        chans[id(top)] = 6
        live.append(top)
    last = live[-1]
    n.flat = L.Flatten(last) if rng.random() < 0.5 else L.Reshape(last, shape=dict(dim=[0, -1]))
    n.drop = L.Dropout(n.flat, dropout_ratio=0.5, in_place=True)
    n.fc = L.InnerProduct(n.drop, num_output=5, weight_filler=dict(type="xavier"))
    n.prob = L.Softmax(n.fc)
    return n.to_proto()


@pytest.mark.parametrize("seed", range(12))
def test_random_nets_plan_and_values(seed):
    param = random_dag(seed)
    plain, shared = pair(param)
    assert_no_live_overlap(shared.memory_plan)
    x = feed(plain, seed)
    seen_a, seen_b = record_tops(plain), record_tops(shared, poison=True)
    assert np.array_equal(plain.forward(**x)["prob"], shared.forward(**x)["prob"])
    for tops_a, tops_b in zip(seen_a, seen_b):
        for (name, va), (_, vb) in zip(tops_a, tops_b):
            assert np.array_equal(va, vb), name
    # the plan checked against the lifetimes seen: each blob's buffer holds only its values from the
    # layer that writes it to the last that reads it, a fused chain's layers counting as one
    plan = memory_plan.plan(shared)
    spans = {li: (ch.first, ch.last) for ch in (shared._fusion.chains.values() if shared._fusion else ())
             for li in range(ch.first, ch.last + 1)}
    for g in plan.groups:
        uses = [i for li in range(len(shared.layers))
                if any(b in shared.bottom_vecs[li] or b in shared.top_vecs[li] for b in g.blobs)
                for i in spans.get(li, (li,))]
        assert (g.first, g.last) == (min(uses), max(uses))


def chain():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv2 = L.Convolution(n.conv1, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.conv3 = L.Convolution(n.conv2, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.conv4 = L.Convolution(n.conv3, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.fc = L.InnerProduct(n.conv4, num_output=3, weight_filler=dict(type="xavier"))
    return n.to_proto()


def test_reading_a_reused_blob_raises_and_keep_allows_it():
    plain, shared = pair(chain())
    x = feed(plain)
    plain.forward(**x)
    shared.forward(**x)
    assert shared.blobs["conv1"].buffer is shared.blobs["conv3"].buffer
    with pytest.raises(NetError, match=r"blob 'conv1' shares memory with blob 'conv3'.*keep=\['conv1'\]"):
        shared.blobs["conv1"].data
    with pytest.raises(NetError, match="blob 'conv1'"):
        shared.forward(blobs=["conv1"], **x)
    # the last blob of each buffer, the input and the output read as without sharing
    for name in ("data", "conv3", "conv4", "fc"):
        assert np.array_equal(shared.blobs[name].data, plain.blobs[name].data), name
    shared.share_blob_memory(keep=["conv1"])
    out = shared.forward(blobs=["conv1"], **x)
    assert np.array_equal(out["conv1"], plain.blobs["conv1"].data)
    assert np.array_equal(out["fc"], plain.blobs["fc"].data)
    with pytest.raises(NetError, match="keep: no blob named 'nope'"):
        shared.share_blob_memory(keep=["nope"])
    # a partial forward from an intermediate blob the user sets, as pycaffe users do
    shared.blobs["conv2"].data[...] = plain.blobs["conv2"].data
    shared.forward(start="conv3")
    assert np.array_equal(shared.blobs["fc"].data, plain.blobs["fc"].data)
    shared.unshare_blob_memory()
    assert shared.memory_plan is None and shared.blobs["conv1"].buffer is None
    shared.forward(**x)
    assert np.array_equal(shared.blobs["conv1"].data, plain.blobs["conv1"].data)


def test_reshape_redoes_the_plan():
    plain, shared = pair(chain())
    before = shared.memory_plan
    for net in (plain, shared):
        net.blobs["data"].reshape(5, 3, 8, 8)
    shared.reshape()
    plain.reshape()
    after = shared.memory_plan
    assert after is not before and after.planned_bytes > before.planned_bytes
    x = feed(plain)
    assert np.array_equal(plain.forward(**x)["fc"], shared.forward(**x)["fc"])
    # a new batch set on the input alone (no net.reshape): the forward still agrees, and the next
    # one runs on a plan for the new shapes
    for net in (plain, shared):
        net.blobs["data"].reshape(3, 3, 8, 8)
    x = feed(plain, 9)
    for net in (plain, shared):
        net.blobs["data"].data[...] = x["data"]
    plain.forward()
    shared.forward()
    assert np.array_equal(plain.blobs["fc"].data, shared.blobs["fc"].data)
    assert shared.forward()["fc"].shape == (3, 3)
    assert not shared.memory_plan.stale()
    assert np.array_equal(plain.blobs["fc"].data, shared.blobs["fc"].data)


def test_only_forward_only_nets_share(tmp_path):
    proto = chain()
    train = caffe.Net(proto, caffe.TRAIN)
    with pytest.raises(NetError, match="TEST net"):
        train.share_blob_memory()
    forced = caffe_pb2.NetParameter()
    forced.CopyFrom(proto)
    forced.force_backward = True
    with pytest.raises(NetError, match="force_backward"):
        caffe.Net(forced, caffe.TEST, share_memory=True)
    net = caffe.Net(proto, caffe.TEST, share_memory=True)
    net.forward()
    with pytest.raises(NetError, match="shares blob memory"):
        net.backward()
    # a TRAIN net is left as it was: every blob has its own memory
    train.forward()
    train.backward()
    assert all(b.buffer is None for b in train.blobs.values())


def test_classifier_and_cli_test_share(tmp_path, capsys):
    from google.protobuf import text_format
    from minicaffe.tools import cli
    proto = chain()
    path = tmp_path / "deploy.prototxt"
    path.write_text(text_format.MessageToString(proto))
    plain = caffe.Net(proto, caffe.TEST)
    random_params(plain)
    weights = str(tmp_path / "w.caffemodel")
    plain.save(weights)
    image = np.random.default_rng(2).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    clf = caffe.Classifier(str(path), weights)
    assert clf.memory_plan is not None
    scores = clf.predict([image], oversample=False)
    with pytest.raises(NetError, match="keep=\\['conv1'\\]"):
        clf.blobs["conv1"].data
    keeping = caffe.Classifier(str(path), weights, share_memory=False)
    assert keeping.memory_plan is None
    assert np.array_equal(scores, keeping.predict([image], oversample=False))
    assert keeping.blobs["conv1"].data.shape == (2, 4, 8, 8)
    # `minicaffe test` shares too and prints the same scores as a net that does not
    assert cli.main(["test", f"--model={path}", f"--weights={weights}", "--iterations=1"]) == 0


PY_LAYER = '''
import minicaffe as caffe


class Twice(caffe.Layer):
    """A pycaffe-style layer: reads its bottom and writes its top through ``.data``."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        pass
'''


def test_python_layer_writes_its_top_through_data(tmp_path, monkeypatch):
    """A Python layer's top takes over a buffer an earlier blob used: writing it through ``.data``
    during forward is allowed; only a read of a blob a LATER blob overwrote raises."""
    module = f"memshare_layers_{abs(hash(str(tmp_path))) % 10 ** 8}"
    (tmp_path / f"{module}.py").write_text(PY_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    param = chain()
    conv3 = next(lp for lp in param.layer if lp.name == "conv3")
    twice = param.layer.add()
    twice.name, twice.type = "twice", "Python"
    twice.bottom.append("conv3")
    twice.top.append("twice")
    twice.python_param.module, twice.python_param.layer = module, "Twice"
    conv4 = next(lp for lp in param.layer if lp.name == "conv4")
    conv4.bottom[0] = "twice"
    # run the Python layer right after conv3 (layers are in definition order)
    layers = list(param.layer)
    del param.layer[:]
    for lp in layers[:layers.index(conv3) + 1] + [layers[-1]] + layers[layers.index(conv3) + 1:-1]:
        param.layer.add().CopyFrom(lp)
    plain, shared = pair(param)
    assert shared.blobs["twice"].buffer is shared.blobs["conv2"].buffer     # conv2 used it before
    x = feed(plain)
    assert np.array_equal(plain.forward(**x)["fc"], shared.forward(**x)["fc"])
    assert np.array_equal(shared.blobs["twice"].data, 2 * plain.blobs["conv3"].data)
    sys.modules.pop(module, None)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_keeps_no_scale_without_backward(region):
    """LRN in a sharing net works its scale out in its top (same values, no per-layer copies);
    after unshare_blob_memory and a forward, backward has what it needs again."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.norm = L.LRN(n.conv, local_size=3, alpha=1.0, beta=0.75, norm_region=getattr(P.LRN, region))
    n.fc = L.InnerProduct(n.norm, num_output=3, weight_filler=dict(type="xavier"))
    param = n.to_proto()
    param.force_backward = False
    plain, shared = pair(param)
    x = feed(plain)
    assert np.array_equal(plain.forward(**x)["fc"], shared.forward(**x)["fc"])
    lrn = shared.layer_dict["norm"]
    assert lrn.forward_only and lrn.scale is None
    assert not any(k[0] in ("scale", "pow") for k in lrn._buffers)
    shared.unshare_blob_memory()
    assert not lrn.forward_only
    with pytest.raises(NetError, match="'norm'.*forward pass"):
        lrn.backward(shared.top_vecs[2], [True], shared.bottom_vecs[2])
    shared.forward(**x)
    plain.forward(**x)
    dy = np.random.default_rng(4).standard_normal(plain.blobs["norm"].shape)
    for net in (plain, shared):
        net.blobs["norm"].diff[...] = dy
        net.layers[2].backward(net.top_vecs[2], [True], net.bottom_vecs[2])
    assert np.abs(plain.blobs["conv"].diff).max() > 0
    assert np.array_equal(plain.blobs["conv"].diff, shared.blobs["conv"].diff)


# --- scratch in layer frames (core/context.py Workspaces.layer_frames) ----------------------------

def test_layer_frames_lay_one_layers_slots_side_by_side_and_the_next_over_them():
    """Inside a frame the slots one layer asks for never overlap (and a slot asked again, no larger,
    is the same memory); the next layer's slots start over at the arena's beginning, so the arena is
    the largest one layer needs, not the sum over slots; outside a frame, and in a nested frame,
    nothing changes for the caller."""
    from minicaffe.core.context import Slot, Workspaces
    ws = Workspaces()
    a, b, c = Slot("a"), Slot("b"), Slot("c")
    with ws.layer_frames() as frame:
        for _ in range(2):          # the first layer grows the arena; the second finds it large enough
            frame.next_layer()
            x = ws.get(np, (1000,), np.float32, a)
            y = ws.get(np, (10, 30), np.float64, b)
            m = ws.get(np, (77,), np.bool_, c)
        assert not frame.grew or frame.arena.size >= 4000 + 2400 + 77
        assert x.base is y.base is m.base                   # one arena
        assert not np.shares_memory(x, y) and not np.shares_memory(x, m) and not np.shares_memory(y, m)
        assert np.shares_memory(ws.get(np, (500,), np.float32, a), x)
        assert y.flags.c_contiguous and y.dtype == np.float64 and y.ctypes.data % 64 == 0
        frame.next_layer()
        z = ws.get(np, (1500,), np.float32, c)          # the next layer reuses the first's memory
        assert np.shares_memory(z, x) and np.shares_memory(z, y)
        with ws.layer_frames() as inner:                # e.g. a Python layer running another net
            inner.next_layer()
            assert not np.shares_memory(ws.get(np, (1500,), np.float32, c), z)
        size = frame.arena.size
    assert 4000 + 2400 + 77 <= size < 2 * (4000 + 2400 + 128)
    outside = ws.get(np, (1000,), np.float32, a)
    assert not np.shares_memory(outside, x) and ws.get(np, (10,), np.float32, a).base is outside.base
    with ws.layer_frames() as again:                    # the arena is kept for the next forward
        again.next_layer()
        assert np.shares_memory(ws.get(np, (1000,), np.float32, a), x) and not again.grew


def test_shared_net_scratch_is_one_arena_no_larger_than_its_largest_layer():
    """A forward-only (shared memory) GoogLeNet keeps no per-slot scratch on the thread that runs
    it: one arena, smaller than the per-slot buffers the same forward leaves without sharing, with
    the same outputs (every model's blobs are compared bit for bit above, frames included)."""
    from minicaffe.core import context
    param = small_deploy("models/googlenet/deploy.prototxt")
    plain, shared = pair(param)
    inputs = feed(plain)
    ws = context.current().workspaces
    ws.clear()
    plain.forward(**inputs)
    slots = sum(b.nbytes for b in ws._local.bufs.values())
    ws.clear()
    shared.forward(**inputs)
    assert ws._local.bufs == {}
    arena = ws._local.arenas[0].nbytes
    assert 0 < arena < slots, (arena, slots)
    for name in shared.outputs:
        np.testing.assert_array_equal(shared.blobs[name].data, plain.blobs[name].data)


def test_first_forward_of_a_plan_gives_freed_memory_back(monkeypatch):
    """The first forward of each applied plan trims the C heap once (context.trim_heap), not every
    forward; a reshape (a new plan) trims again."""
    from minicaffe.core import context
    calls = []
    monkeypatch.setattr(context, "trim_heap", lambda: calls.append(1) or True)
    plain, shared = pair(small_deploy("models/lenet/deploy.prototxt"))
    shared.forward(**feed(shared))
    shared.forward(**feed(shared))
    assert len(calls) == 1
    shape = list(shared.blobs["data"].shape)
    shared.blobs["data"].reshape([3] + shape[1:])
    shared.reshape()
    shared.forward()
    assert len(calls) == 2


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_padded_buffers_come_from_the_layer_frames(region, monkeypatch):
    """In a sharing net LRN's padded buffers come from the layer frames, so two LRN layers use the
    same memory and keep none of their own (a plain net's LRN keeps its own, as before). Other
    layers' scratch lands there too, so the zero border is cleared on each call: an arena filled
    with NaN between forwards changes no bit of the output. (The NumPy passes: the compiled
    ACROSS_CHANNELS kernel takes no buffers, tests/test_compiled.py.)"""
    from minicaffe.core import context
    from minicaffe.kernels import compiled
    monkeypatch.setattr(compiled, "enabled", lambda: False)
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.norm = L.LRN(n.conv, local_size=5, alpha=1.0, beta=0.75, norm_region=getattr(P.LRN, region))
    n.conv2 = L.Convolution(n.norm, num_output=8, kernel_size=3, pad=1, weight_filler=dict(type="xavier"))
    n.norm2 = L.LRN(n.conv2, local_size=3, alpha=0.5, beta=0.6, k=2, norm_region=getattr(P.LRN, region))
    n.fc = L.InnerProduct(n.norm2, num_output=3, weight_filler=dict(type="xavier"))
    param = n.to_proto()
    param.force_backward = False
    plain, shared = pair(param)
    x = feed(plain)
    ws = context.current().workspaces
    pads, get = [], ws.get

    def spy(xp, shape, dtype, slot):
        out = get(xp, shape, dtype, slot)
        if getattr(slot, "name", None) == "LRN pad":
            pads.append(out)
        return out
    monkeypatch.setattr(ws, "get", spy)
    want = plain.forward(**x)["fc"].copy()
    assert pads == []                                       # no frames: the plain net's own buffers
    assert np.array_equal(shared.forward(**x)["fc"], want)
    assert len(pads) == 2 and np.shares_memory(pads[0], pads[1])
    names = ("pad", "rows", "pad_w")
    for name in ("norm", "norm2"):
        assert not any(k[0] in names for k in shared.layer_dict[name]._buffers)
        assert any(k[0] == "pad" for k in plain.layer_dict[name]._buffers)
    ws._local.arenas[0][...] = 0xFF                         # float32 NaN in every scratch byte
    assert np.array_equal(shared.forward(**x)["fc"], want)
    assert np.array_equal(plain.forward(**x)["fc"], want)
