"""How many kernels the GPU engines launch, counted on the CuPy stand-in (tests/standin_launches.py).

Why: the custom kernels exist to replace dozens of small CuPy calls with one or two launches; these
counts are the promise in docs/gpu.md's table, kept from quietly regressing. They count launches of
the engine a layer chooses by default in GPU mode; the reference's count is printed beside it in the
failure message, for the table. Skipped on a real GPU (the counter patches the stand-in).
"""
import numpy as np
import pytest

from minicaffe.kernels import engines
from minicaffe.testing import TEST, TRAIN, make_layer


@pytest.fixture
def standin(gpu):
    if gpu != "standin":
        pytest.skip("counts launches on the CuPy stand-in")
    from standin_launches import count_launches
    return count_launches


def _pass_counts(count_launches, text, engine=None, phase=TRAIN, in_place=False, shape=(4, 8, 5, 6)):
    """(forward, backward) launches of one layer, after a warm-up pass (buffers allocated)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    layer, bottom, top = make_layer(text, [x], 1, phase, in_place)
    if engine is not None:
        engines.force(layer, engine)
        layer.reshape(bottom, top)
    for _ in range(2):
        with count_launches() as fwd:
            layer.forward(bottom, top)
        top[0].xdiff[...] = 0.5
        with count_launches() as bwd:
            layer.backward(top, [True], bottom)
    return fwd, bwd


# (layer, forward launches, backward launches) with the default (GPU) engine
LAYERS = [
    ('type: "BatchNorm"', TRAIN, False, 2, 2),
    ('type: "BatchNorm"', TEST, False, 1, 1),
    ('type: "BatchNorm" batch_norm_param { use_global_stats: true }', TRAIN, True, 1, 1),
    ('type: "Scale"', TRAIN, False, 1, 2),
    ('type: "Scale" scale_param { bias_term: true }', TRAIN, True, 1, 2),
    ('type: "PReLU"', TRAIN, False, 1, 2),
    ('type: "PReLU" prelu_param { channel_shared: true }', TRAIN, False, 1, 2),
    ('type: "ELU"', TRAIN, False, 1, 1),
]


@pytest.mark.parametrize("text,phase,in_place,fwd,bwd", LAYERS)
def test_layer_launches(standin, text, phase, in_place, fwd, bwd):
    got = _pass_counts(standin, text, phase=phase, in_place=in_place)
    ref = _pass_counts(standin, text, engine=engines.REFERENCE, phase=phase, in_place=in_place)
    what = (f"{text}: engine {got[0].total()}/{got[1].total()} launches ({dict(got[0])} / {dict(got[1])}), "
            f"reference {ref[0].total()}/{ref[1].total()}")
    assert (got[0].total(), got[1].total()) == (fwd, bwd), what
    assert got[0].total() + got[1].total() < ref[0].total() + ref[1].total(), what
    assert got[0].total(uploads=True) == got[0].total() and got[1].total(uploads=True) == got[1].total(), \
        f"{what}: a host-to-device copy inside a pass"


STEP_NET = """
name: "step"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _step_launches(count_launches, spec, fused, monkeypatch):
    import minicaffe as caffe
    from minicaffe.solvers import updates
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(updates, "fused_step", lambda *a, **k: False)
        solver = caffe.get_solver(f'{spec} base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.001 display: 0 '
                                  f'net_param {{ {STEP_NET} }}')
        solver.step(2)                               # tables built, scratch allocated
        solver.net.forward()
        solver.net.backward()
        with count_launches() as launches:
            solver.apply_update()
    return launches


@pytest.mark.parametrize("spec", ['type: "SGD" momentum: 0.9', 'type: "Nesterov" momentum: 0.9',
                                  'type: "AdaGrad"', 'type: "RMSProp" rms_decay: 0.9',
                                  'type: "AdaDelta" momentum: 0.9', 'type: "Adam"',
                                  'type: "SGD" momentum: 0.9 iter_size: 2 regularization_type: "L1"'])
def test_a_solver_step_is_one_launch(standin, monkeypatch, spec):
    """Four parameter blobs, two with weight decay: one launch for all of them, no upload."""
    got = _step_launches(standin, spec, True, monkeypatch)
    loop = _step_launches(standin, spec, False, monkeypatch)
    what = f"{spec}: one-launch step {dict(got)}; per-parameter step {loop.total()} launches {dict(loop)}"
    assert got.total(uploads=True) == 1, what
    assert loop.total() >= 8, what
