"""Input and DummyData."""
import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError
from minicaffe.testing import forward, make_layer


def test_input_one_shape_per_top_or_shared():
    layer, bottom, top = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } '
                                    'shape { dim: 4 } }', [], num_top=2)
    assert top[0].shape == (2, 3) and top[1].shape == (4,)
    layer, bottom, top = make_layer('type: "Input" input_param { shape { dim: 1 dim: 3 dim: 5 dim: 5 } }',
                                    [], num_top=3)
    assert all(t.shape == (1, 3, 5, 5) for t in top)


def test_input_keeps_user_data_and_user_shape():
    layer, bottom, top = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } }', [])
    top[0].data[...] = 7
    forward(layer, bottom, top)
    assert (top[0].data == 7).all()
    top[0].reshape(5, 3)              # as net.blobs['data'].reshape(...) then net.reshape()
    layer.reshape(bottom, top)
    assert top[0].shape == (5, 3)


def test_input_shape_count_error():
    with pytest.raises(NetError, match="'in'.*2 shapes for 3 tops"):
        make_layer('name: "in" type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } }', [], num_top=3)


def test_input_takes_no_bottom():
    with pytest.raises(NetError, match="exactly 0 bottom"):
        make_layer('type: "Input" input_param { shape { dim: 1 } }', [np.zeros(1)])


def test_dummy_data_default_is_zeros_and_constant_is_filled_once():
    layer, bottom, top = make_layer('type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                                    'data_filler { type: "constant" value: 1.5 } }', [])
    assert top[0].shape == (2, 3)
    assert (top[0].data == 1.5).all()
    top[0].data[0, 0] = -4           # constant fillers do not refill at forward (Caffe's refill_)
    forward(layer, bottom, top)
    assert top[0].data[0, 0] == -4
    layer, bottom, top = make_layer('type: "DummyData" dummy_data_param { shape { dim: 4 } }', [])
    (y,) = forward(layer, bottom, top)
    assert not y.any()


def test_dummy_data_random_filler_refills_every_forward():
    layer, bottom, top = make_layer('type: "DummyData" dummy_data_param { shape { dim: 50 } '
                                    'data_filler { type: "uniform" min: 2 max: 3 } }', [])
    a = forward(layer, bottom, top)[0]
    b = forward(layer, bottom, top)[0]
    assert ((a >= 2) & (a <= 3)).all() and ((b >= 2) & (b <= 3)).all()
    assert not np.array_equal(a, b)
    assert top[0].data.dtype == np.float32


def test_dummy_data_is_reproducible_with_the_seed():
    text = 'type: "DummyData" dummy_data_param { shape { dim: 10 } data_filler { type: "gaussian" } }'
    runs = []
    for _ in range(2):
        backend.set_random_seed(5)
        layer, bottom, top = make_layer(text, [])
        runs.append(forward(layer, bottom, top)[0])
    np.testing.assert_array_equal(*runs)


def test_dummy_data_legacy_dims_and_per_top_fillers():
    layer, bottom, top = make_layer(
        'type: "DummyData" dummy_data_param { num: 2 num: 3 channels: 4 height: 1 width: 5 '
        'data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 2 } }',
        [], num_top=2)
    assert top[0].shape == (2, 4, 1, 5) and top[1].shape == (3, 4, 1, 5)
    assert (top[0].data == 1).all() and (top[1].data == 2).all()


@pytest.mark.parametrize("param,num_top,match", [
    ("shape { dim: 1 } num: 1", 1, "not both"),
    ("num: 1 num: 2 channels: 1 height: 1 width: 1", 3, "'num' once"),
    ("shape { dim: 1 } shape { dim: 2 }", 3, "'shape' once"),
    ("shape { dim: 1 } data_filler { } data_filler { }", 3, "data_filler"),
])
def test_dummy_data_errors(param, num_top, match):
    with pytest.raises(NetError, match=f"'dd'.*{match}"):
        make_layer(f'name: "dd" type: "DummyData" dummy_data_param {{ {param} }}', [], num_top=num_top)


def test_dummy_data_on_gpu(gpu):
    layer, bottom, top = make_layer('type: "DummyData" dummy_data_param { shape { dim: 3 } '
                                    'data_filler { type: "gaussian" } }', [])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (3,) and y.dtype == np.float32
    assert top[0].xdata.shape == (3,)
