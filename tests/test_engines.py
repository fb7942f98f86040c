"""Every engine of every layer against that layer's reference (``minicaffe.kernels.engines``).

One table, ``CASES``: layer type -> shape cases. For each registered engine of a type and each case
where the engine applies, forward and backward run in float64 with the engine picked by name
(``engines.force``: ``engines.choose(layer, name=...)`` through the layer's engine slot) and with the reference
(``engines.REFERENCE``), on the same input, and must agree to rounding. CPU engines run on NumPy,
GPU engines through the ``gpu`` fixture (real CuPy, or the CuPy stand-in that runs each kernel's
NumPy reference). Adding an engine adds its tests; adding a layer type with engines needs its cases
here (``test_every_engine_type_has_cases`` says so). The ``engine:`` field: CAFFE runs the reference
even where an engine would apply, CUDNN is refused in one line naming the layer.
"""
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.core.layer import layer_type_list
from minicaffe.errors import NetError
from minicaffe.kernels import cudnn, engines
from minicaffe.testing import TEST, TRAIN, make_layer

# the convolution family's engines are tested with its own layer tests for now
NOT_HERE = ("Convolution", "Deconvolution", "Im2col")
RTOL, ATOL = 1e-10, 1e-12


def _normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def _ties(*shape):
    """Small integers: many ties, where the argmax / winner rules show."""
    return lambda rng: rng.integers(-2, 2, shape).astype(np.float64)


def _with_zeros(*shape):
    def make(rng):
        x = rng.standard_normal(shape)
        x.reshape(-1)[::5] = 0.0           # ReLU's gradient at 0 is the slope
        return x
    return make


def _labels(shape, classes, ignore=None):
    def make(rng):
        lab = rng.integers(0, classes, shape).astype(np.float64)
        if ignore is not None:
            lab.reshape(-1)[::3] = ignore
        return lab
    return make


def _BN_STATS(channels, factor=2.5):
    """BatchNorm's stored blobs: sums of means and variances, and their weight."""
    return [_normal(channels), lambda rng: np.abs(rng.standard_normal(channels)) + 0.1,
            lambda rng: np.array([factor])]


def _matrix(classes):
    return lambda rng: rng.uniform(0, 1, (classes, classes))


@dataclass
class Case:
    text: str                                      # the layer's parameters after its type
    bottoms: List[Callable]                        # rng -> array, one per bottom
    num_top: int = 1
    phase: int = TRAIN
    in_place: bool = False
    propagate: Optional[Tuple[bool, ...]] = None   # default: every bottom
    tags: Tuple[str, ...] = field(default=())
    blobs: Optional[List[Callable]] = None         # rng -> array, the layer's parameter blobs' values

    def __str__(self):
        return self.text


CASES = {
    "Pooling": [
        Case("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", [_normal(2, 3, 7, 6)], num_top=2),
        Case("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", [_ties(2, 3, 7, 8)]),
        # inference: the forward skips the argmax, the backward recomputes it
        Case("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", [_normal(2, 2, 9, 8)], phase=TEST),
        Case("pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1 }",
             [_ties(2, 2, 5, 7)], num_top=2),
        Case("pooling_param { pool: MAX kernel_size: 3 stride: 3 round_mode: FLOOR }", [_normal(1, 2, 10, 11)]),
        Case("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", [_normal(2, 3, 6, 6)]),
        Case("pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 2 }", [_normal(1, 2, 4, 5)]),
        Case("pooling_param { pool: MAX global_pooling: true }", [_normal(2, 3, 5, 4)], num_top=2),
        Case("pooling_param { pool: AVE global_pooling: true }", [_normal(2, 3, 5, 4)]),
        # shapes where Caffe's ceil-rounded size equals cuDNN's floor (the cudnn engine applies):
        # exact strides, padded and not; the clip case (the last ceil window would start in the
        # padding: 5 + 2 - 2 = 5 rows, ceil 4 windows less one = floor 3), global MAX, inference
        Case("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", [_normal(2, 3, 9, 7)]),
        Case("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", [_normal(2, 3, 7, 9)]),
        Case("pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }", [_normal(1, 2, 5, 5)]),
        Case("pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }", [_normal(1, 2, 5, 7)], phase=TEST),
        Case("pooling_param { pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 }", [_normal(2, 2, 6, 5)]),
        Case("pooling_param { pool: MAX global_pooling: true }", [_normal(2, 3, 5, 4)]),
    ],
    "LRN": [
        Case("lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }", [_normal(2, 7, 3, 4)]),
        Case("lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 }", [_normal(1, 2, 3, 3)]),
        Case("lrn_param { local_size: 1 alpha: 0.5 beta: 0.02 k: 0.00002 }", [_normal(1, 3, 2, 2)]),
        Case("lrn_param { local_size: 15 alpha: 0.1 beta: 1.5 k: 1 }", [_normal(1, 9, 2, 3)]),
        # outside cuDNN's lrnN range: the CUDA engine only
        Case("lrn_param { local_size: 17 alpha: 0.1 beta: 0.75 }", [_normal(1, 4, 2, 2)]),
        Case("lrn_param { local_size: 3 alpha: 0.2 beta: 0.75 norm_region: WITHIN_CHANNEL }",
             [_normal(2, 3, 5, 4)]),
    ],
    "ReLU": [
        Case("relu_param { negative_slope: 0 }", [_with_zeros(2, 3, 4, 5)]),
        Case("relu_param { negative_slope: 0.1 }", [_with_zeros(3, 7)]),
        Case("relu_param { negative_slope: 0 }", [_with_zeros(2, 3, 4)], in_place=True),
        Case("relu_param { negative_slope: -0.5 }", [_with_zeros(2, 3, 4)], in_place=True),
    ],
    "PReLU": [
        Case("", [_with_zeros(2, 3, 4, 5)], blobs=[_normal(3)]),
        Case("", [_with_zeros(2, 3, 4)], in_place=True, blobs=[_normal(3)]),
        Case("prelu_param { channel_shared: true }", [_with_zeros(3, 4, 5)], blobs=[_normal(1)]),
        Case("prelu_param { channel_shared: true }", [_with_zeros(2, 3)], in_place=True, blobs=[_normal(1)]),
        Case("", [_with_zeros(600, 2)], blobs=[_normal(2)]),                # more values than a block
    ],
    "ELU": [
        Case("elu_param { alpha: 0.7 }", [_with_zeros(2, 3, 4, 5)]),
        Case("elu_param { alpha: 1 }", [_with_zeros(3, 7)], in_place=True),
        Case("elu_param { alpha: -0.5 }", [_with_zeros(2, 3, 4)], in_place=True),
    ],
    "Eltwise": [
        Case("eltwise_param { operation: SUM coeff: 2 coeff: -0.5 }", [_normal(2, 3, 4), _normal(2, 3, 4)]),
        Case("eltwise_param { operation: PROD }", [_normal(2, 5), _normal(2, 5)]),
        Case("eltwise_param { operation: PROD }", [_normal(3, 4), _normal(3, 4)], in_place=True),
        Case("eltwise_param { operation: MAX }", [_ties(2, 3, 4), _ties(2, 3, 4)]),
        Case("eltwise_param { operation: SUM }", [_normal(2, 3), _normal(2, 3), _normal(2, 3)]),
        Case("eltwise_param { operation: MAX }", [_ties(4, 5), _ties(4, 5), _ties(4, 5)]),
    ],
    "Softmax": [
        Case("softmax_param { axis: 1 }", [_normal(2, 5, 3)]),
        Case("softmax_param { axis: -1 }", [_normal(3, 4)]),
        Case("softmax_param { axis: 1 }", [_normal(2, 4)], in_place=True),
    ],
    "SoftmaxWithLoss": [
        Case("", [_normal(4, 5), _labels((4,), 5)], propagate=(True, False)),
        Case("loss_param { ignore_label: 1 normalization: VALID }", [_normal(2, 4, 3), _labels((2, 3), 4, 1)],
             num_top=2, propagate=(True, False)),
        Case("loss_param { normalization: FULL } softmax_param { axis: 2 }",
             [_normal(2, 3, 4), _labels((2, 3), 4)], propagate=(True, False)),
        Case("loss_param { ignore_label: 2 normalization: BATCH_SIZE }", [_normal(5, 3), _labels((5,), 3, 2)],
             propagate=(True, False)),
    ],
    "BatchNorm": [
        Case("", [_normal(3, 4, 5, 6)], blobs=_BN_STATS(4)),                # batch statistics
        Case("", [_normal(5, 3)], in_place=True, blobs=_BN_STATS(3)),       # 2-D: one value a channel
        Case("batch_norm_param { moving_average_fraction: 0.9 eps: 0.01 }", [_normal(2, 3, 7)],
             blobs=_BN_STATS(3)),
        Case("", [_normal(2, 3, 4, 4)], phase=TEST, blobs=_BN_STATS(3)),   # global statistics
        Case("batch_norm_param { use_global_stats: true }", [_normal(2, 5, 3, 3)], in_place=True,
             blobs=_BN_STATS(5, factor=0.0)),                              # factor 0: estimates 0
        Case("", [_normal(300, 2)], blobs=_BN_STATS(2)),                   # more values than a block
    ],
    "Scale": [
        Case("", [_normal(2, 3, 4, 5)], blobs=[_normal(3)]),
        Case("scale_param { bias_term: true }", [_normal(2, 3, 4, 5)], in_place=True,
             blobs=[_normal(3), _normal(3)]),
        Case("scale_param { bias_term: true }", [_normal(4, 6)], blobs=[_normal(6), _normal(6)]),
        Case("scale_param { axis: 0 num_axes: 2 }", [_normal(2, 3, 5)], in_place=True, blobs=[_normal(2, 3)]),
        Case("scale_param { axis: 0 num_axes: -1 }", [_normal(2, 3)], blobs=[_normal(2, 3)]),  # Caffe writes the diff
        Case("scale_param { axis: 1 }", [_normal(2, 3, 4), _normal(3)]),   # scale as a bottom: the reference
    ],
    "InfogainLoss": [
        Case("", [_normal(4, 3), _labels((4,), 3), _matrix(3)], propagate=(True, False, False)),
        Case("loss_param { ignore_label: 0 }", [_normal(2, 4, 3), _labels((2, 3), 4, 0), _matrix(4)],
             num_top=2, propagate=(True, False, False)),
    ],
}

# the field that carries a layer type's engine: (Caffe's), and one case to try it with
ENGINE_FIELD = {
    "Pooling": ("pooling_param", CASES["Pooling"][0]),
    "LRN": ("lrn_param", CASES["LRN"][0]),
    "ReLU": ("relu_param", CASES["ReLU"][0]),
    "Sigmoid": ("sigmoid_param", Case("", [_normal(2, 3)])),
    "TanH": ("tanh_param", Case("", [_normal(2, 3)])),
    "Softmax": ("softmax_param", CASES["Softmax"][0]),
    "SoftmaxWithLoss": ("softmax_param", CASES["SoftmaxWithLoss"][0]),
}


def _arrays(case, seed=3):
    rng = np.random.default_rng(seed)
    return [make(rng) for make in case.bottoms]


def _build(layer_type, case, extra=""):
    """The layer of ``case`` in the current mode, float64, with bottoms from a fixed seed, its
    parameter blobs set from ``case.blobs`` and their diffs nonzero (gradients accumulate)."""
    text = f'type: "{layer_type}" {case.text} {extra}'
    layer, bottom, top = make_layer(text, _arrays(case), case.num_top, case.phase, case.in_place)
    rng = np.random.default_rng(5)
    for k, blob in enumerate(layer.blobs):
        if case.blobs is not None:
            blob.data[...] = np.reshape(case.blobs[k](rng), blob.shape)
        blob.diff[...] = rng.standard_normal(blob.shape)
    return layer, bottom, top


def run(layer_type, case, engine, extra=""):
    """forward + backward with the engine named ``engine`` (None: what the layer chooses itself);
    returns (the engine that ran, tops, bottom diffs, parameter blobs' data and diffs) as NumPy
    arrays."""
    with backend.float64_blobs():
        layer, bottom, top = _build(layer_type, case, extra)
        engines.force(layer, engine)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        tops = [t.data.copy() for t in top]
        rng = np.random.default_rng(11)
        for t in top:
            t.diff[...] = rng.standard_normal(t.shape)
        propagate = list(case.propagate or [True] * len(bottom))
        layer.backward(top, propagate, bottom)
        diffs = [b.diff.copy() for b, p in zip(bottom, propagate) if p]
        params = [b.data.copy() for b in layer.blobs] + [b.diff.copy() for b in layer.blobs]
        return layer.engine_slot.name, tops, diffs, params


def _applies(layer_type, case, engine):
    """Does ``engine`` compute ``case``'s layer (built on the CPU: ``runs_on`` reads only shapes
    and parameters)?"""
    with backend.float64_blobs():
        layer, _, _ = _build(layer_type, case)
    return engine.runs_on(layer)


def _engine_cases():
    out = []
    for layer_type in sorted(CASES):
        for engine in engines.engines_for(layer_type):
            for index, case in enumerate(CASES[layer_type]):
                if _applies(layer_type, case, engine):
                    out.append(pytest.param(layer_type, index, engine.name,
                                            id=f"{layer_type}-{engine.name}-{index}"))
    return out


def _assert_same(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what} {k}: shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what} {k}")


@pytest.mark.parametrize("layer_type,index,name", _engine_cases())
def test_engine_matches_the_reference(layer_type, index, name, request):
    case = CASES[layer_type][index]
    ran, want_tops, want_diffs, want_params = run(layer_type, case, engines.REFERENCE)
    assert ran == engines.REFERENCE
    engine = next(e for e in engines.engines_for(layer_type) if e.name == name)
    if "cpu" not in engine.devices:
        request.getfixturevalue("gpu")           # GPU mode, on CuPy or its stand-in
        if engine.cudnn and not cudnn.available()[0]:
            pytest.skip(f"no cuDNN: {cudnn.available()[1]}")
    ran, tops, diffs, params = run(layer_type, case, name)
    assert ran == name
    _assert_same(tops, want_tops, "top")
    _assert_same(diffs, want_diffs, "bottom diff")
    _assert_same(params, want_params, "parameter blob (data, then diff)")


def test_every_engine_type_has_cases():
    """Each layer type with registered engines has shape cases, and each engine applies to one."""
    with_engines = [t for t in layer_type_list() if engines.engines_for(t) and t not in NOT_HERE]
    assert with_engines, "no engines registered"
    assert sorted(with_engines) == sorted(t for t in CASES if engines.engines_for(t))
    tested = {(p.values[0], p.values[2]) for p in _engine_cases()}
    for layer_type in with_engines:
        for engine in engines.engines_for(layer_type):
            assert (layer_type, engine.name) in tested, f"{layer_type} engine {engine.name}: no case applies"


@pytest.mark.parametrize("layer_type", sorted(ENGINE_FIELD))
def test_engine_caffe_runs_the_reference_on_the_gpu(layer_type, gpu):
    """``engine: CAFFE`` keeps the layer's own code even where a GPU engine would apply; the
    default picks the best engine that does."""
    field_name, case = ENGINE_FIELD[layer_type]
    ran, tops, diffs, _ = run(layer_type, case, None, f"{field_name} {{ engine: CAFFE }}")
    assert ran == engines.REFERENCE
    default = run(layer_type, case, None)
    best = [e.name for e in engines.engines_for(layer_type, "gpu")
            if (not e.cudnn or cudnn.available()[0]) and _applies(layer_type, case, e)]
    assert default[0] == (best[0] if best else engines.REFERENCE)
    _assert_same(default[1], tops, "top")
    _assert_same(default[2], diffs, "bottom diff")


@pytest.mark.parametrize("layer_type", sorted(ENGINE_FIELD))
def test_engine_caffe_on_the_cpu_is_the_reference(layer_type):
    field_name, case = ENGINE_FIELD[layer_type]
    assert run(layer_type, case, None, f"{field_name} {{ engine: CAFFE }}")[0] == engines.REFERENCE


@pytest.mark.parametrize("layer_type", sorted(ENGINE_FIELD))
def test_engine_cudnn_is_refused_in_one_line_naming_the_layer(layer_type):
    field_name, case = ENGINE_FIELD[layer_type]
    with pytest.raises(NetError) as info:
        _build(layer_type, case, f"{field_name} {{ engine: CUDNN }}")
    message = str(info.value)
    assert "\n" not in message
    assert f"layer 'test_layer' ({layer_type})" in message and "CUDNN" in message
    if any(e.cudnn for e in engines.engines_for(layer_type)):
        assert ": not in GPU mode (mode cpu;" in message     # why: cudnn.available()'s reason
    else:
        assert f": minicaffe has no cuDNN engine for {layer_type} (mode cpu;" in message


def test_an_unknown_engine_name_is_refused_naming_the_ones_there_are():
    with pytest.raises(NetError, match=r"no engine 'nope' on cpu \(have: caffe, scatter\)"):
        run("Pooling", CASES["Pooling"][0], "nope")


def test_a_named_engine_that_does_not_apply_is_refused():
    with pytest.raises(NetError, match="engine scatter does not apply"):
        run("Pooling", CASES["Pooling"][-1], "scatter")      # AVE: no argmax to scatter
