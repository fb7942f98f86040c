"""Softmax, SoftmaxWithLoss, Accuracy and the other loss layers."""
import math

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError, ShapeError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import check_gradient, forward, make_layer

RS = np.random.RandomState(11)
FLT_MIN = float(np.finfo(np.float32).tiny)


def randn(*shape):
    return RS.standard_normal(shape)


def loss_of(text, bottoms, num_top=1):
    layer, bottom, top = make_layer(text, bottoms, num_top)
    outs = forward(layer, bottom, top)
    assert top[0].shape == ()
    return float(outs[0]), layer, bottom, top


def backward_scores(layer, bottom, top, loss_weight=1.0):
    top[0].diff[...] = loss_weight
    layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
    return bottom[0].diff.copy()


# --- Softmax -----------------------------------------------------------------------------------
def naive_softmax(x, axis):
    x = np.moveaxis(x, axis, -1)
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        out[idx] = [v / s for v in e]
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis", [1, 0, 2, -1])
def test_softmax_matches_loops(axis):
    x = randn(2, 4, 3)
    layer, bottom, top = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [x])
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_softmax(x, axis), rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 88.0]])
    layer, bottom, top = make_layer('type: "Softmax"', [x])
    (y,) = forward(layer, bottom, top)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0], [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_gradient(axis):
    check_gradient(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [randn(2, 3, 2, 2)])


def test_softmax_in_place_matches_out_of_place():
    x = randn(3, 5)
    dy = randn(3, 5)
    results = []
    for in_place in (False, True):
        layer, bottom, top = make_layer('type: "Softmax"', [x], in_place=in_place)
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


# --- SoftmaxWithLoss -----------------------------------------------------------------------------
NORMS = {"FULL": caffe_pb2.LossParameter.FULL, "VALID": caffe_pb2.LossParameter.VALID,
         "BATCH_SIZE": caffe_pb2.LossParameter.BATCH_SIZE, "NONE": caffe_pb2.LossParameter.NONE}


def naive_softmax_loss(x, labels, axis, ignore, mode):
    outer = int(np.prod(x.shape[:axis]))
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    labels = labels.ravel()
    loss, count = 0.0, 0
    for r in range(rows.shape[0]):
        lab = int(labels[r])
        if ignore is not None and lab == ignore:
            continue
        m = max(rows[r])
        s = sum(math.exp(v - m) for v in rows[r])
        loss -= math.log(max(math.exp(rows[r][lab] - m) / s, FLT_MIN))
        count += 1
    norm = {"FULL": rows.shape[0], "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return loss / max(1, norm)


def labels_with_ignored(shape, classes, ignore=None):
    lab = RS.randint(0, classes, size=shape).astype(np.float64)
    if ignore is not None:
        lab.flat[::3] = ignore
    return lab


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 2, -1])
def test_softmax_loss_matches_loops(mode, ignore):
    x = randn(3, 4, 2, 2)
    lab = labels_with_ignored((3, 1, 2, 2), 4, ignore)
    ign = f"ignore_label: {ignore}" if ignore is not None else ""
    text = f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} {ign} }}'
    loss, *_ = loss_of(text, [x, lab])
    assert loss == pytest.approx(naive_softmax_loss(x, lab, 1, ignore, mode), rel=1e-5)


def test_softmax_loss_default_is_valid_and_legacy_normalize():
    x = randn(4, 5)
    lab = labels_with_ignored((4,), 5, ignore=3)
    default, *_ = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 3 }', [x, lab])
    assert default == pytest.approx(naive_softmax_loss(x, lab, 1, 3, "VALID"), rel=1e-5)
    legacy_false, *_ = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 3 normalize: false }',
                               [x, lab])
    assert legacy_false == pytest.approx(naive_softmax_loss(x, lab, 1, 3, "BATCH_SIZE"), rel=1e-5)
    legacy_true, *_ = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 3 normalize: true }',
                              [x, lab])
    assert legacy_true == pytest.approx(default, rel=1e-6)
    # an explicit normalization wins over the legacy flag
    both, *_ = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 3 normalize: false '
                       'normalization: FULL }', [x, lab])
    assert both == pytest.approx(naive_softmax_loss(x, lab, 1, 3, "FULL"), rel=1e-5)


def test_softmax_loss_other_axis():
    x = randn(2, 3, 4)
    lab = RS.randint(0, 4, size=(2, 3)).astype(np.float64)
    loss, *_ = loss_of('type: "SoftmaxWithLoss" softmax_param { axis: 2 }', [x, lab])
    assert loss == pytest.approx(naive_softmax_loss(x, lab, 2, None, "VALID"), rel=1e-5)
    check_gradient('type: "SoftmaxWithLoss" softmax_param { axis: -1 }', [x, lab], check_bottom=[0])


def test_softmax_loss_second_top_is_probabilities():
    x = randn(3, 4)
    lab = RS.randint(0, 4, size=(3,)).astype(np.float64)
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss"', [x, lab], num_top=2)
    loss, prob = forward(layer, bottom, top)
    np.testing.assert_allclose(prob, naive_softmax(x, 1), rtol=1e-5)


@pytest.mark.parametrize("param", ["", "loss_param { ignore_label: 1 }",
                                   "loss_param { ignore_label: 0 normalization: FULL }",
                                   "loss_param { normalization: BATCH_SIZE }",
                                   "loss_param { ignore_label: 2 normalization: NONE }"])
def test_softmax_loss_gradient(param):
    x = randn(2, 3, 2, 2)
    lab = RS.randint(0, 3, size=(2, 1, 2, 2)).astype(np.float64)
    check_gradient(f'type: "SoftmaxWithLoss" {param}', [x, lab], check_bottom=[0])


def test_softmax_loss_gradient_is_scaled_by_loss_weight():
    x = randn(3, 4)
    lab = RS.randint(0, 4, size=(3,)).astype(np.float64)
    _, layer, bottom, top = loss_of('type: "SoftmaxWithLoss"', [x, lab])
    g1 = backward_scores(layer, bottom, top, 1.0)
    g3 = backward_scores(layer, bottom, top, 3.0)
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-6)
    # hand formula: (softmax - onehot) / N
    onehot = np.eye(4)[lab.astype(int)]
    np.testing.assert_allclose(g1, (naive_softmax(x, 1) - onehot) / 3, rtol=1e-5, atol=1e-7)


def test_softmax_loss_all_ignored_gives_zero_not_nan():
    x = randn(2, 3)
    lab = np.array([1.0, 1.0])
    loss, layer, bottom, top = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }', [x, lab])
    assert loss == 0.0
    assert not backward_scores(layer, bottom, top).any()


@pytest.mark.parametrize("labels,param,bad", [([0, 5], "", 5), ([-1, 0], "", -1),
                                              ([0, 7], "loss_param { ignore_label: 255 }", 7)])
def test_softmax_loss_label_out_of_range(labels, param, bad):
    with pytest.raises(NetError, match=rf"'sm'.*label {bad} is out of range \[0, 5\)"):
        loss_of(f'name: "sm" type: "SoftmaxWithLoss" {param}', [randn(2, 5), np.array(labels, float)])


def test_softmax_loss_ignore_label_outside_range_is_fine():
    loss, *_ = loss_of('type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }',
                       [randn(2, 5), np.array([255.0, 1.0])])
    assert np.isfinite(loss)


def test_softmax_loss_label_count_mismatch():
    with pytest.raises(ShapeError, match="labels"):
        make_layer('type: "SoftmaxWithLoss"', [randn(2, 3, 2), np.zeros((2, 3))])


@pytest.mark.parametrize("layer_type,bottoms", [
    ("SoftmaxWithLoss", [randn(2, 3), np.array([0.0, 1.0])]),
    ("SigmoidCrossEntropyLoss", [randn(2, 3), RS.uniform(0, 1, (2, 3))]),
    ("HingeLoss", [randn(2, 3), np.array([0.0, 1.0])]),
    ("MultinomialLogisticLoss", [RS.uniform(0.1, 1, (2, 3)), np.array([0.0, 1.0])]),
])
def test_losses_refuse_to_backpropagate_to_labels(layer_type, bottoms):
    _, layer, bottom, top = loss_of(f'name: "L" type: "{layer_type}"', bottoms)
    assert layer.is_loss
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    top[0].diff[...] = 1
    with pytest.raises(NetError, match="'L'.*labels"):
        layer.backward(top, [True, True], bottom)


# --- Accuracy ----------------------------------------------------------------------------------
def naive_accuracy(scores, labels, k, ignore=None):
    """Caffe's count: correct when fewer than k OTHER classes score >= the true class."""
    hits = n = 0
    for row, lab in zip(scores, labels):
        lab = int(lab)
        if ignore is not None and lab == ignore:
            continue
        others = sum(1 for c, v in enumerate(row) if c != lab and v >= row[lab])
        hits += others < k
        n += 1
    return hits / n if n else 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_accuracy_top_k_with_ties(k):
    scores = RS.randint(0, 3, size=(20, 5)).astype(np.float64)   # ties everywhere
    labels = RS.randint(0, 5, size=(20,)).astype(np.float64)
    layer, bottom, top = make_layer(f'type: "Accuracy" accuracy_param {{ top_k: {k} }}', [scores, labels])
    (acc,) = forward(layer, bottom, top)
    assert acc.shape == ()
    assert float(acc) == pytest.approx(naive_accuracy(scores, labels, k), rel=1e-6)


def test_accuracy_tie_with_true_class_counts_against_it():
    scores = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    labels = np.array([0.0, 0.0])
    layer, bottom, top = make_layer('type: "Accuracy"', [scores, labels])
    (acc,) = forward(layer, bottom, top)
    assert float(acc) == 0.5


def test_accuracy_ignore_label_per_class_and_spatial_axis():
    scores = randn(2, 4, 3)            # N x C x H, class axis 1
    labels = RS.randint(0, 4, size=(2, 3)).astype(np.float64)
    labels[0, 0] = -1
    layer, bottom, top = make_layer('type: "Accuracy" accuracy_param { ignore_label: -1 }',
                                    [scores, labels], num_top=2)
    acc, per_class = forward(layer, bottom, top)
    rows = np.moveaxis(scores, 1, -1).reshape(-1, 4)
    flat = labels.ravel()
    assert float(acc) == pytest.approx(naive_accuracy(rows, flat, 1, ignore=-1), rel=1e-6)
    assert per_class.shape == (4,)
    for c in range(4):
        sel = flat == c
        want = naive_accuracy(rows[sel], flat[sel], 1) if sel.any() else 0.0
        assert per_class[c] == pytest.approx(want, rel=1e-6)


def test_accuracy_errors():
    with pytest.raises(NetError, match="top_k 4"):
        make_layer('type: "Accuracy" accuracy_param { top_k: 4 }', [randn(2, 3), np.zeros(2)])
    layer, bottom, top = make_layer('name: "acc" type: "Accuracy"', [randn(2, 3), np.array([0.0, 3.0])])
    with pytest.raises(NetError, match="'acc'.*label 3"):
        forward(layer, bottom, top)
    with pytest.raises(NetError, match="no gradient"):
        layer.backward(top, [True, False], bottom)


# --- EuclideanLoss -----------------------------------------------------------------------------
def test_euclidean_loss_value_and_gradient_both_bottoms():
    a, b = randn(3, 2, 2), randn(3, 4)
    loss, layer, bottom, top = loss_of('type: "EuclideanLoss"', [a, b])
    ref = sum((x - y) ** 2 for x, y in zip(a.ravel(), b.ravel())) / (2 * 3)
    assert loss == pytest.approx(ref, rel=1e-5)
    assert layer.allow_force_backward(1)
    check_gradient('type: "EuclideanLoss"', [a, b])


def test_euclidean_loss_shape_error():
    with pytest.raises(ShapeError, match="same size per example"):
        make_layer('type: "EuclideanLoss"', [randn(2, 3), randn(2, 4)])


# --- SigmoidCrossEntropyLoss ---------------------------------------------------------------------
def naive_sigmoid_ce(x, t, ignore=None):
    loss, count = 0.0, 0
    for v, tv in zip(x.ravel(), t.ravel()):
        if ignore is not None and int(tv) == ignore:
            continue
        p = 1.0 / (1.0 + math.exp(-v))
        loss -= tv * math.log(p) + (1 - tv) * math.log(1 - p)
        count += 1
    return loss, count


def test_sigmoid_ce_default_divides_by_batch():
    x, t = randn(3, 4), RS.uniform(0, 1, (3, 4))
    loss, *_ = loss_of('type: "SigmoidCrossEntropyLoss"', [x, t])
    assert loss == pytest.approx(naive_sigmoid_ce(x, t)[0] / 3, rel=1e-5)


def test_sigmoid_ce_ignore_label_valid_and_stability():
    x = np.array([[30.0, -30.0, 0.3], [2.0, -1.0, 0.0]])
    t = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    loss, *_ = loss_of('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalization: VALID }',
                       [x, t])
    ref, count = naive_sigmoid_ce(x, t, ignore=-1)
    assert count == 5
    assert loss == pytest.approx(ref / 5, rel=1e-5)
    big, *_ = loss_of('type: "SigmoidCrossEntropyLoss"', [np.array([[200.0, -200.0]]), np.array([[0.0, 1.0]])])
    assert big == pytest.approx(400.0, rel=1e-6)


@pytest.mark.parametrize("param", ["", "loss_param { ignore_label: -1 normalization: VALID }",
                                   "loss_param { normalization: FULL }"])
def test_sigmoid_ce_gradient(param):
    t = RS.uniform(0, 1, (2, 3, 2))
    t[0, 0, 0] = -1
    check_gradient(f'type: "SigmoidCrossEntropyLoss" {param}', [randn(2, 3, 2), t], check_bottom=[0])


# --- HingeLoss ---------------------------------------------------------------------------------
def away_from_kinks(*shape):
    x = RS.uniform(-2, 2, shape)
    x[np.abs(np.abs(x) - 1) < 0.05] += 0.2
    return x


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss_value_and_gradient(norm):
    x = away_from_kinks(4, 3)
    lab = RS.randint(0, 3, size=(4,)).astype(np.float64)
    loss, *_ = loss_of(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, lab])
    ref = 0.0
    for i in range(4):
        for j in range(3):
            m = max(0.0, 1 + (-x[i, j] if j == int(lab[i]) else x[i, j]))
            ref += m if norm == "L1" else m * m
    assert loss == pytest.approx(ref / 4, rel=1e-5)
    check_gradient(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, lab], check_bottom=[0])


# --- InfogainLoss ------------------------------------------------------------------------------
def test_infogain_with_identity_equals_softmax_loss(tmp_path):
    x = randn(4, 3)
    lab = RS.randint(0, 3, size=(4,)).astype(np.float64)
    ref, *_ = loss_of('type: "SoftmaxWithLoss"', [x, lab])
    got, *_ = loss_of('type: "InfogainLoss"', [x, lab, np.eye(3)])
    assert got == pytest.approx(ref, rel=1e-5)
    # the same matrix from a binary BlobProto file
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, 1, 3, 3])
    proto.data.extend(np.eye(3).ravel().tolist())
    path = tmp_path / "H.binaryproto"
    path.write_bytes(proto.SerializeToString())
    from_file, *_ = loss_of(f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}', [x, lab])
    assert from_file == pytest.approx(ref, rel=1e-5)


def test_infogain_general_matrix_value_and_gradient():
    x = randn(3, 4)
    lab = np.array([0.0, 3.0, 1.0])
    H = RS.uniform(0, 1, (4, 4))
    loss, *_ = loss_of('type: "InfogainLoss"', [x, lab, H])
    p = naive_softmax(x, 1)
    ref = -sum(H[int(l), c] * math.log(p[i, c]) for i, l in enumerate(lab) for c in range(4)) / 3
    assert loss == pytest.approx(ref, rel=1e-5)
    check_gradient('type: "InfogainLoss" loss_param { ignore_label: 3 }', [x, lab, H], check_bottom=[0])


def test_infogain_errors(tmp_path):
    with pytest.raises(NetError, match="infogain matrix"):
        make_layer('type: "InfogainLoss"', [randn(2, 3), np.zeros(2)])
    with pytest.raises(ShapeError, match="3x3"):
        make_layer('type: "InfogainLoss"', [randn(2, 3), np.zeros(2), np.eye(2)])
    with pytest.raises(NetError, match="cannot read"):
        make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{tmp_path}/none" }}',
                   [randn(2, 3), np.zeros(2)])


# --- MultinomialLogisticLoss -----------------------------------------------------------------------
def test_multinomial_logistic_loss():
    p = RS.uniform(0.05, 1, (3, 4))
    lab = np.array([1.0, 0.0, 3.0])
    loss, *_ = loss_of('type: "MultinomialLogisticLoss"', [p, lab])
    assert loss == pytest.approx(-sum(math.log(p[i, int(l)]) for i, l in enumerate(lab)) / 3, rel=1e-5)
    check_gradient('type: "MultinomialLogisticLoss"', [p, lab], check_bottom=[0])
    with pytest.raises(ShapeError, match="N x 1 x 1 x 1"):
        make_layer('type: "MultinomialLogisticLoss"', [p, np.zeros((3, 2))])


# --- GPU agreement -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,bottoms", [
    ('type: "Softmax"', [randn(2, 4, 3)]),
    ('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }',
     [randn(2, 4, 3), RS.randint(0, 4, (2, 3)).astype(float)]),
    ('type: "EuclideanLoss"', [randn(3, 4), randn(3, 4)]),
    ('type: "SigmoidCrossEntropyLoss"', [randn(3, 4), RS.uniform(0, 1, (3, 4))]),
    ('type: "HingeLoss" hinge_loss_param { norm: L2 }', [randn(3, 4), np.array([0.0, 3.0, 1.0])]),
    ('type: "InfogainLoss"', [randn(3, 4), np.array([0.0, 3.0, 1.0]), RS.uniform(0, 1, (4, 4))]),
    ('type: "MultinomialLogisticLoss"', [RS.uniform(0.1, 1, (3, 4)), np.array([0.0, 3.0, 1.0])]),
])
def test_cpu_gpu_agree(gpu, text, bottoms):
    out = []
    for use_gpu in (False, True):
        backend.set_mode_gpu() if use_gpu else backend.set_mode_cpu()
        layer, bottom, top = make_layer(text, bottoms)
        forward(layer, bottom, top)
        top[0].diff[...] = 0.7
        prop = [True] + [False] * (len(bottom) - 1)
        layer.backward(top, prop, bottom)
        out.append((top[0].data.copy(), bottom[0].diff.copy()))
    backend.set_mode_cpu()
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_gpu_agree_accuracy(gpu):
    scores, labels = randn(6, 5), RS.randint(0, 5, (6,)).astype(float)
    res = []
    for use_gpu in (False, True):
        backend.set_mode_gpu() if use_gpu else backend.set_mode_cpu()
        layer, bottom, top = make_layer('type: "Accuracy" accuracy_param { top_k: 2 }', [scores, labels],
                                        num_top=2)
        res.append(forward(layer, bottom, top))
    backend.set_mode_cpu()
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-6)
