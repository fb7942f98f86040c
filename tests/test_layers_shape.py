"""Split, Concat, Slice, Flatten, Reshape, Silence, Crop, ArgMax, Tile, Reduction and Eltwise."""
import itertools

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError, ShapeError
from minicaffe.testing import check_gradient, forward, make_layer

RS = np.random.RandomState(7)


def randn(*shape):
    return RS.standard_normal(shape)


def run(text, bottoms, num_top=1, top_diffs=None, propagate=None):
    """Forward then backward once; returns (layer, bottom, top)."""
    layer, bottom, top = make_layer(text, bottoms, num_top)
    forward(layer, bottom, top)
    for t, d in zip(top, top_diffs or []):
        t.diff[...] = d
    layer.backward(top, propagate or [True] * len(bottom), bottom)
    return layer, bottom, top


def cpu_gpu_agree(text, bottoms, num_top=1, propagate=None):
    """Forward and backward in both modes give the same tops and bottom diffs."""
    out = []
    for gpu in (False, True):
        backend.set_mode_gpu() if gpu else backend.set_mode_cpu()
        layer, bottom, top = make_layer(text, bottoms, num_top)
        forward(layer, bottom, top)
        rs = np.random.RandomState(3)
        for t in top:
            t.diff[...] = rs.uniform(-1, 1, t.shape)
        prop = propagate or [True] * len(bottom)
        layer.backward(top, prop, bottom)
        out.append([t.data.copy() for t in top] + [b.diff.copy() for b, p in zip(bottom, prop) if p])
    backend.set_mode_cpu()
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- Split -------------------------------------------------------------------------------------
def test_split_shares_data_and_sums_diffs():
    x = randn(2, 3, 4)
    diffs = [randn(2, 3, 4) for _ in range(3)]
    _, bottom, top = run('type: "Split"', [x], num_top=3, top_diffs=diffs)
    for t in top:
        np.testing.assert_array_equal(t.data, x.astype(np.float32))
    # shared, not copied: a later in-place change of the bottom shows in every top
    bottom[0].data[0, 0, 0] = 42
    assert all(t.data[0, 0, 0] == 42 for t in top)
    np.testing.assert_allclose(bottom[0].diff, sum(diffs).astype(np.float32), rtol=1e-6)


def test_split_gradient_three_tops():
    check_gradient('type: "Split"', [randn(2, 3, 2)], num_top=3)


def test_split_in_place_is_an_error():
    with pytest.raises(NetError, match="test_layer.*in-place"):
        make_layer('type: "Split"', [randn(2, 2)], in_place=True)


# --- Concat ------------------------------------------------------------------------------------
def naive_concat(arrays, axis):
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = np.zeros(shape)
    pos = 0
    for a in arrays:
        for k in range(a.shape[axis]):
            src = [slice(None)] * a.ndim
            dst = [slice(None)] * a.ndim
            src[axis], dst[axis] = k, pos
            out[tuple(dst)] = a[tuple(src)]
            pos += 1
    return out


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_concat_matches_naive(axis):
    shapes = {0: [(1, 3, 4), (2, 3, 4), (3, 3, 4)], 1: [(2, 1, 4), (2, 3, 4), (2, 2, 4)],
              2: [(2, 3, 1), (2, 3, 2), (2, 3, 5)], -1: [(2, 3, 1), (2, 3, 2), (2, 3, 5)]}[axis]
    xs = [randn(*s) for s in shapes]
    layer, bottom, top = make_layer(f'type: "Concat" concat_param {{ axis: {axis} }}', xs)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_concat(xs, axis % 3), rtol=1e-6)


def test_concat_legacy_concat_dim_and_default_axis():
    xs = [randn(2, 3, 2), randn(2, 1, 2)]
    layer, bottom, top = make_layer('type: "Concat" concat_param { concat_dim: 1 }', xs)
    (a,) = forward(layer, bottom, top)
    layer, bottom, top = make_layer('type: "Concat"', xs)   # default axis 1
    (b,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 4, 2)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_concat_gradient(axis):
    shapes = [[2, 3, 2, 2], [2, 3, 2, 2]]
    shapes[1][axis] = 1
    check_gradient(f'type: "Concat" concat_param {{ axis: {axis} }}', [randn(*s) for s in shapes])


def test_concat_mismatch_names_layer_and_shapes():
    with pytest.raises(ShapeError) as info:
        make_layer('name: "cat" type: "Concat"', [randn(2, 3, 4), randn(2, 3, 5)])
    msg = str(info.value)
    assert "'cat'" in msg and "(2, 3, 5)" in msg and "(2, 3, 4)" in msg


def test_concat_axis_and_concat_dim_together_is_an_error():
    with pytest.raises(NetError, match="either axis or concat_dim"):
        make_layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [randn(2, 2), randn(2, 2)])


def test_concat_partial_propagate_down():
    xs = [randn(2, 2), randn(2, 3)]
    dy = randn(2, 5)
    _, bottom, _ = run('type: "Concat"', xs, top_diffs=[dy], propagate=[False, True])
    np.testing.assert_allclose(bottom[1].diff, dy[:, 2:].astype(np.float32))
    assert not bottom[0].diff.any()


# --- Slice -------------------------------------------------------------------------------------
def test_slice_points_and_round_trip_with_concat():
    x = randn(2, 7, 3)
    layer, bottom, top = make_layer('type: "Slice" slice_param { axis: 1 slice_point: 2 slice_point: 3 }',
                                    [x], num_top=3)
    parts = forward(layer, bottom, top)
    assert [p.shape for p in parts] == [(2, 2, 3), (2, 1, 3), (2, 4, 3)]
    for p, (a, b) in zip(parts, [(0, 2), (2, 3), (3, 7)]):
        np.testing.assert_array_equal(p, x[:, a:b].astype(np.float32))
    layer, bottom, top = make_layer('type: "Concat"', parts)
    (back,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(back, x.astype(np.float32))


def test_slice_equal_parts_and_legacy_slice_dim():
    x = randn(6, 4)
    layer, bottom, top = make_layer('type: "Slice" slice_param { slice_dim: 0 }', [x], num_top=3)
    parts = forward(layer, bottom, top)
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, x[2 * i:2 * i + 2].astype(np.float32))


def test_slice_top_is_a_copy():
    layer, bottom, top = make_layer('type: "Slice" slice_param { axis: 0 }', [randn(4, 2)], num_top=2)
    forward(layer, bottom, top)
    before = bottom[0].data.copy()
    top[0].data[...] = 99      # what an in-place consumer of the top would do
    np.testing.assert_array_equal(bottom[0].data, before)


@pytest.mark.parametrize("param,num_top", [("axis: 1 slice_point: 1 slice_point: 3", 3),
                                           ("axis: -1", 2), ("axis: 0 slice_point: 1", 2)])
def test_slice_gradient(param, num_top):
    check_gradient(f'type: "Slice" slice_param {{ {param} }}', [randn(2, 4, 2)], num_top=num_top)


@pytest.mark.parametrize("param,num_top,match", [
    ("axis: 1 slice_point: 2", 3, "slice_point"),
    ("axis: 1 slice_point: 3 slice_point: 2", 3, "increase strictly"),
    ("axis: 1 slice_point: 5", 2, "increase strictly"),
    ("axis: 1", 3, "evenly divide"),
])
def test_slice_errors(param, num_top, match):
    with pytest.raises(NetError, match=f"test_layer.*{match}"):
        make_layer(f'type: "Slice" slice_param {{ {param} }}', [randn(2, 4)], num_top=num_top)


# --- Flatten and Reshape --------------------------------------------------------------------------
@pytest.mark.parametrize("param,shape", [("", (2, 60)), ("flatten_param { axis: 2 }", (2, 3, 20)),
                                         ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
                                         ("flatten_param { axis: 0 end_axis: -2 }", (24, 5))])
def test_flatten_shapes_and_values(param, shape):
    x = randn(2, 3, 4, 5)
    layer, bottom, top = make_layer(f'type: "Flatten" {param}', [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == shape
    np.testing.assert_array_equal(y.ravel(), x.astype(np.float32).ravel())


def test_flatten_gradient_and_in_place_error():
    check_gradient('type: "Flatten"', [randn(2, 3, 2)])
    with pytest.raises(NetError, match="in-place"):
        make_layer('type: "Flatten"', [randn(2, 3)], in_place=True)


RESHAPE_CASES = [
    # Caffe's test_reshape_layer.cpp, on a 2 x 3 x 6 x 5 bottom
    ("shape { dim: 0 dim: -1 dim: 1 dim: 1 }", (2, 3, 6, 5), (2, 90, 1, 1)),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5), (2, 3, 6, 5)),
    ("shape { dim: 0 dim: 3 dim: 10 dim: -1 }", (2, 3, 6, 5), (2, 3, 10, 3)),
    ("axis: 1 shape { dim: 3 dim: 10 dim: -1 }", (2, 3, 6, 5), (2, 3, 10, 3)),
    ("axis: 0 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 6, 5), (1, 1, 1, 2, 3, 6, 5)),
    ("axis: 2 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 6, 5), (2, 3, 1, 1, 1, 6, 5)),
    ("axis: -1 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 6, 5), (2, 3, 6, 5, 1, 1, 1)),
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 3, 6, 5), (2, 18, 5)),
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (2, 3, 6, 5), (6, 2, 3, 5)),
    # caffe.proto's examples on a 2 x 8 bottom
    ("shape { dim: 2 dim: 2 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 8), (2, 2, 4)),
    ("axis: 1 shape { dim: 2 dim: 4 }", (2, 8), (2, 2, 4)),
    ("num_axes: 1 shape { dim: 1 dim: 2 }", (2, 8), (1, 2, 8)),
    ("num_axes: 0 shape { dim: 1 }", (2, 8), (1, 2, 8)),
    ("axis: 1 num_axes: 0 shape { dim: 1 }", (2, 8), (2, 1, 8)),
]


@pytest.mark.parametrize("param,bshape,tshape", RESHAPE_CASES)
def test_reshape_caffe_rules(param, bshape, tshape):
    x = randn(*bshape)
    layer, bottom, top = make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == tshape
    np.testing.assert_array_equal(y.ravel(), x.astype(np.float32).ravel())


def test_reshape_follows_a_new_bottom_shape():
    layer, bottom, top = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
                                    [randn(2, 3, 4)])
    bottom[0].reshape(5, 2, 2)
    bottom[0].data[...] = randn(5, 2, 2)
    (y,) = forward(layer, bottom, top)
    assert y.shape == (5, 4)
    np.testing.assert_array_equal(y.ravel(), bottom[0].data.ravel())


def test_reshape_gradient():
    check_gradient('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }', [randn(2, 3, 2)])


@pytest.mark.parametrize("param,match", [
    ("shape { dim: 5 dim: 5 }", "has 25 elements but bottom shape"),
    ("shape { dim: -1 dim: 7 }", "not divisible"),
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "no axis 3 to copy"),
    ("axis: 4 shape { dim: 1 }", "out of range"),
])
def test_reshape_errors(param, match):
    with pytest.raises(NetError, match=f"test_layer.*{match}"):
        make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [randn(2, 3, 4)])


def test_reshape_count_mismatch_is_a_shape_error():
    with pytest.raises(ShapeError, match="24"):
        make_layer('type: "Reshape" reshape_param { shape { dim: 5 } }', [randn(2, 3, 4)])


# --- Silence -----------------------------------------------------------------------------------
def test_silence_zeroes_bottom_diffs():
    layer, bottom, top = make_layer('type: "Silence"', [randn(2, 3), randn(4)], num_top=0)
    bottom[0].diff[...] = 5
    bottom[1].diff[...] = 5
    layer.forward(bottom, top)
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].diff.any()
    assert (bottom[1].diff == 5).all()


# --- Crop --------------------------------------------------------------------------------------
def naive_crop(x, shape, offsets):
    out = np.zeros(shape)
    for idx in itertools.product(*[range(s) for s in shape]):
        out[idx] = x[tuple(i + o for i, o in zip(idx, offsets))]
    return out


@pytest.mark.parametrize("param,ref_shape,offsets", [
    ("", (2, 4, 3, 3), (0, 0, 0, 0)),
    ("crop_param { offset: 1 }", (2, 4, 3, 3), (0, 0, 1, 1)),
    ("crop_param { axis: 2 offset: 1 offset: 2 }", (2, 4, 3, 3), (0, 0, 1, 2)),
    ("crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }", (2, 2, 5, 3), (0, 1, 0, 2)),
    ("crop_param { axis: -1 offset: 3 }", (9, 9, 9, 3), (0, 0, 0, 3)),
])
def test_crop_matches_naive(param, ref_shape, offsets):
    x = randn(2, 4, 5, 6)
    axis = 2 if "axis" not in param else int(param.split("axis: ")[1].split()[0]) % 4
    want = tuple(x.shape[i] if i < axis else ref_shape[i] for i in range(4))
    layer, bottom, top = make_layer(f'type: "Crop" {param}', [x, np.zeros(ref_shape)])
    (y,) = forward(layer, bottom, top)
    assert y.shape == want
    np.testing.assert_allclose(y, naive_crop(x, want, offsets), rtol=1e-6)


@pytest.mark.parametrize("param", ["crop_param { offset: 1 }", "crop_param { axis: 1 offset: 0 offset: 1 offset: 2 }"])
def test_crop_gradient(param):
    check_gradient(f'type: "Crop" {param}', [randn(2, 3, 4, 5), np.zeros((2, 2, 3, 3))], check_bottom=[0])


def test_crop_that_does_not_fit_is_an_error():
    with pytest.raises(ShapeError, match="test_layer.*axis 3.*offset 2"):
        make_layer('type: "Crop" crop_param { offset: 2 }', [randn(1, 1, 5, 5), np.zeros((1, 1, 3, 4))])


def test_crop_wrong_offset_count_is_an_error():
    with pytest.raises(NetError, match="2 offsets"):
        make_layer('type: "Crop" crop_param { axis: 1 offset: 1 offset: 1 }',
                   [randn(1, 3, 5, 5), np.zeros((1, 1, 3, 3))])


# --- ArgMax ------------------------------------------------------------------------------------
def caffe_order(values):
    """Indices by std::greater on (value, index) pairs: larger value, then larger index, first."""
    return [i for _, i in sorted(((v, i) for i, v in enumerate(values)), reverse=True)]


@pytest.mark.parametrize("top_k,out_max_val", [(1, False), (3, False), (2, True)])
def test_argmax_per_instance(top_k, out_max_val):
    x = RS.randint(0, 4, size=(3, 2, 3)).astype(np.float64)   # many ties
    layer, bottom, top = make_layer(
        f'type: "ArgMax" argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}', [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (3, 2 if out_max_val else 1, top_k)
    for n in range(3):
        flat = x[n].ravel()
        order = caffe_order(flat)[:top_k]
        np.testing.assert_array_equal(y[n, 0], order)
        if out_max_val:
            np.testing.assert_array_equal(y[n, 1], flat[order])
        # without ties the order is np.argsort's, descending
        if len(set(flat)) == len(flat):
            np.testing.assert_array_equal(y[n, 0], np.argsort(-flat)[:top_k])


def test_argmax_distinct_values_agree_with_argsort():
    x = randn(4, 10)
    layer, bottom, top = make_layer('type: "ArgMax" argmax_param { top_k: 3 }', [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (4, 1, 3)
    np.testing.assert_array_equal(y[:, 0, :], np.argsort(-x, axis=1)[:, :3])


@pytest.mark.parametrize("axis,out_max_val", [(1, False), (1, True), (0, False), (-1, True)])
def test_argmax_along_axis(axis, out_max_val):
    x = RS.randint(0, 3, size=(2, 4, 3)).astype(np.float64)
    layer, bottom, top = make_layer(
        f'type: "ArgMax" argmax_param {{ axis: {axis} top_k: 2 out_max_val: {str(out_max_val).lower()} }}',
        [x])
    (y,) = forward(layer, bottom, top)
    ax = axis % 3
    expected_shape = list(x.shape)
    expected_shape[ax] = 2
    assert y.shape == tuple(expected_shape)
    moved_x = np.moveaxis(x, ax, -1)
    moved_y = np.moveaxis(y, ax, -1)
    for idx in itertools.product(*[range(s) for s in moved_x.shape[:-1]]):
        order = caffe_order(moved_x[idx])[:2]
        want = moved_x[idx][order] if out_max_val else order
        np.testing.assert_array_equal(moved_y[idx], want)


def test_argmax_small_bottom_gets_three_axes_and_top_k_check():
    layer, bottom, top = make_layer('type: "ArgMax"', [randn(5, 4)])
    assert top[0].shape == (5, 1, 1)
    with pytest.raises(NetError, match="top_k 9"):
        make_layer('type: "ArgMax" argmax_param { top_k: 9 }', [randn(5, 4)])


# --- Tile and Reduction ------------------------------------------------------------------------
@pytest.mark.parametrize("axis,tiles", [(0, 2), (1, 3), (-1, 2)])
def test_tile_matches_np_tile_and_gradient(axis, tiles):
    x = randn(2, 3, 2)
    layer, bottom, top = make_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x])
    (y,) = forward(layer, bottom, top)
    reps = [1, 1, 1]
    reps[axis] = tiles
    np.testing.assert_allclose(y, np.tile(x, reps), rtol=1e-6)
    check_gradient(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x])


def test_tile_needs_tiles():
    with pytest.raises(NetError, match="tiles"):
        make_layer('type: "Tile"', [randn(2, 2)])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction(op, axis):
    x = randn(2, 3, 4)
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: 0.5 }}'
    layer, bottom, top = make_layer(text, [x])
    (y,) = forward(layer, bottom, top)
    ax = axis % 3
    flat = x.reshape(int(np.prod(x.shape[:ax])), -1)
    ref = {"SUM": flat.sum(1), "ASUM": np.abs(flat).sum(1), "SUMSQ": (flat ** 2).sum(1),
           "MEAN": flat.mean(1)}[op] * 0.5
    assert y.shape == x.shape[:ax]
    np.testing.assert_allclose(y.ravel(), ref, rtol=1e-5)
    check_gradient(text, [x])


# --- Eltwise -----------------------------------------------------------------------------------
def test_eltwise_sum_prod_max_values():
    a, b, c = randn(2, 3), randn(2, 3), randn(2, 3)
    for text, ref in [('operation: SUM', a + b + c),
                      ('operation: SUM coeff: 1 coeff: -2 coeff: 0.5', a - 2 * b + 0.5 * c),
                      ('operation: PROD', a * b * c),
                      ('operation: MAX', np.maximum(np.maximum(a, b), c))]:
        layer, bottom, top = make_layer(f'type: "Eltwise" eltwise_param {{ {text} }}', [a, b, c])
        (y,) = forward(layer, bottom, top)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param", ["operation: SUM", "operation: SUM coeff: 0.5 coeff: -1 coeff: 2",
                                   "operation: PROD", "operation: PROD stable_prod_grad: false",
                                   "operation: MAX"])
def test_eltwise_gradient(param):
    xs = [RS.uniform(0.5, 2, (2, 3, 2)) * RS.choice([-1, 1], (2, 3, 2)) for _ in range(3)]
    check_gradient(f'type: "Eltwise" eltwise_param {{ {param} }}', xs)


def test_eltwise_max_ties_follow_caffe():
    # Caffe: a tie between bottom 0 and 1 goes to bottom 1; later bottoms win only when larger
    a = np.array([[1.0, 2.0, 3.0]])
    b = np.array([[1.0, 0.0, 3.0]])
    c = np.array([[1.0, 2.0, 3.0]])
    _, bottom, _ = run('type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c],
                       top_diffs=[np.array([[10.0, 20.0, 30.0]])])
    np.testing.assert_array_equal(bottom[0].diff, [[0, 20, 0]])
    np.testing.assert_array_equal(bottom[1].diff, [[10, 0, 30]])
    np.testing.assert_array_equal(bottom[2].diff, [[0, 0, 0]])


def test_eltwise_prod_in_place_gradient():
    a, b = RS.uniform(0.5, 2, (3,)), RS.uniform(0.5, 2, (3,))
    layer, bottom, top = make_layer('type: "Eltwise" eltwise_param { operation: PROD }', [a, b],
                                    in_place=True)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[0].diff, b, rtol=1e-6)
    np.testing.assert_allclose(bottom[1].diff, a, rtol=1e-6)


@pytest.mark.parametrize("text,bottoms,match", [
    ('eltwise_param { coeff: 1 }', [randn(2), randn(2)], "coeff"),
    ('eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [randn(2), randn(2)], "only for operation SUM"),
    ('', [randn(2, 3), randn(3, 2)], r"\(3, 2\) differs from bottom\[0\] shape \(2, 3\)"),
])
def test_eltwise_errors(text, bottoms, match):
    with pytest.raises(NetError, match=f"test_layer.*{match}"):
        make_layer(f'type: "Eltwise" {text}', bottoms)


# --- GPU agreement -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,shapes,num_top", [
    ('type: "Split"', [(2, 3)], 3),
    ('type: "Concat"', [(2, 3, 2), (2, 1, 2)], 1),
    ('type: "Slice" slice_param { slice_point: 1 }', [(2, 3, 2)], 2),
    ('type: "Flatten"', [(2, 3, 2)], 1),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)], 1),
    ('type: "Tile" tile_param { tiles: 2 }', [(2, 3)], 1),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 }', [(2, 3, 2)], 1),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3), (2, 3), (2, 3)], 1),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3), (2, 3)], 1),
    ('type: "Eltwise" eltwise_param { coeff: 2 coeff: -1 }', [(2, 3), (2, 3)], 1),
])
def test_cpu_gpu_agree(gpu, text, shapes, num_top):
    cpu_gpu_agree(text, [randn(*s) for s in shapes], num_top)


def test_cpu_gpu_agree_crop_argmax(gpu):
    cpu_gpu_agree('type: "Crop" crop_param { offset: 1 }', [randn(2, 2, 5, 5), np.zeros((2, 2, 3, 3))],
                  propagate=[True, False])
    x = randn(3, 8)
    backend.set_mode_cpu()
    layer, bottom, top = make_layer('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x])
    (ref,) = forward(layer, bottom, top)
    backend.set_mode_gpu()
    layer, bottom, top = make_layer('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x])
    (got,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(ref, got)
