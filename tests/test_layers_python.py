"""type: "Python" layers written as for pycaffe."""
import sys
import textwrap

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import NetError
from minicaffe.layers import Layer
from minicaffe.testing import TEST, TRAIN, check_gradient, forward, make_layer

USER_MODULE = '''
try:
    import minicaffe as caffe
    caffe.Layer
except AttributeError:          # before the package front exports Layer
    from minicaffe import layers as caffe


class Scale(caffe.Layer):
    """y = k x with k from param_str (default 2)."""

    def setup(self, bottom, top):
        if len(bottom) != 1:
            raise Exception("needs one bottom")
        self.k = float(self.param_str) if self.param_str else 2.0
        self.seen_phase = self.phase
        self.blobs.add_blob(3)
        self.blobs[0].data[...] = [1, 2, 3]

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * top[0].diff


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        raise ValueError("user bug in setup")

    def reshape(self, bottom, top):
        pass


class NotALayer(object):
    pass
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module with Python layers in tmp_path, importable under a fresh name."""
    name = f"user_layers_{abs(hash(str(tmp_path))) % 10 ** 8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def python_layer(module, cls, param_str=None, name="py"):
    ps = f' param_str: "{param_str}"' if param_str is not None else ""
    return f'name: "{name}" type: "Python" python_param {{ module: "{module}" layer: "{cls}"{ps} }}'


def test_forward_backward_and_attributes(user_module):
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    layer, bottom, top = make_layer(python_layer(user_module, "Scale"), [x], phase=TEST)
    assert isinstance(layer, Layer) and type(layer).__name__ == "Scale"
    assert layer.type == "Python" and layer.name == "py"
    assert layer.param_str == "" and layer.phase == TEST and layer.seen_phase == TEST
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, 2 * x)
    top[0].diff[...] = np.ones((2, 3))
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.full((2, 3), 2.0))
    # pycaffe's self.blobs.add_blob
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, [1, 2, 3])


def test_param_str_and_phase(user_module):
    layer, bottom, top = make_layer(python_layer(user_module, "Scale", "0.5"), [np.ones((4,))], phase=TRAIN)
    assert layer.param_str == "0.5" and layer.phase == TRAIN
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, np.full(4, 0.5))


def test_gradient(user_module):
    check_gradient(python_layer(user_module, "Scale", "3"), [np.random.RandomState(0).randn(2, 3)],
                   check_params=False)


def test_missing_module_names_layer_module_class_and_reason():
    with pytest.raises(NetError) as info:
        make_layer(python_layer("no_such_module_xyz", "Thing", name="mine"), [np.ones(2)])
    msg = str(info.value)
    assert "'mine'" in msg and "no_such_module_xyz" in msg and "Thing" in msg
    assert "No module named" in msg


def test_missing_class(user_module):
    with pytest.raises(NetError, match=f"'py'.*{user_module}.*has no class 'Nope'"):
        make_layer(python_layer(user_module, "Nope"), [np.ones(2)])


def test_class_must_subclass_layer(user_module):
    with pytest.raises(NetError, match="'NotALayer'.*not a subclass of caffe.Layer"):
        make_layer(python_layer(user_module, "NotALayer"), [np.ones(2)])


def test_missing_python_param_fields():
    with pytest.raises(NetError, match="needs both 'module' and 'layer'"):
        make_layer('type: "Python" python_param { module: "x" }', [np.ones(2)])


def test_user_exception_propagates_unchanged(user_module):
    with pytest.raises(ValueError, match="user bug in setup"):
        make_layer(python_layer(user_module, "Broken"), [np.ones(2)])


def test_current_directory_is_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    name = "cwd_only_layers_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    try:
        layer, bottom, top = make_layer(python_layer(name, "Scale"), [np.ones(3)])
        assert sys.path[0] == str(tmp_path)
        (y,) = forward(layer, bottom, top)
        np.testing.assert_array_equal(y, np.full(3, 2.0))
    finally:
        sys.modules.pop(name, None)


def test_python_layer_in_gpu_mode(gpu, user_module):
    x = np.random.RandomState(1).randn(2, 3)
    layer, bottom, top = make_layer(python_layer(user_module, "Scale"), [x])
    forward(layer, bottom, top)
    np.testing.assert_allclose(top[0].data, 2 * x, rtol=1e-6)
    # what the next (device) layer sees
    np.testing.assert_allclose(backend.to_host(top[0].xdata), 2 * x, rtol=1e-6)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(backend.to_host(bottom[0].xdiff), np.full((2, 3), 2.0))


# --- refusing Python layers (issue 11, item 23) --------------------------------------------------

BESIDE_MODULE = USER_MODULE + '''
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported.marker"), "w") as f:
    f.write("this module ran")
'''

BESIDE_NET = """name: "downloaded"
layer { name: "data" type: "DummyData" top: "data"
  dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 1 } } }
layer { name: "scale" type: "Python" bottom: "data" top: "scaled"
  python_param { module: "beside_layers" layer: "Scale" } }
"""


@pytest.fixture
def downloaded(tmp_path):
    """A prototxt with the module of its Python layer beside it; importing that module leaves a
    marker file."""
    (tmp_path / "beside_layers.py").write_text(textwrap.dedent(BESIDE_MODULE))
    (tmp_path / "net.prototxt").write_text(BESIDE_NET)
    return tmp_path


def _time_command(where, extra=(), refuse_variable=""):
    """``minicaffe time`` of ``where``/net.prototxt, run from ``where``, with
    $MINICAFFE_NO_PYTHON_LAYERS set to ``refuse_variable``."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MINICAFFE_NO_PYTHON_LAYERS=refuse_variable)
    return subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "time", "--model", "net.prototxt",
                           "--iterations", "1", *extra], cwd=where, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_no_python_layers_refuses_before_importing_the_module(downloaded, how):
    """``minicaffe time`` from the directory of a downloaded prototxt: with --no-python-layers (or
    MINICAFFE_NO_PYTHON_LAYERS=1) the module beside it is not imported (no marker), and the command
    fails with one line naming the layer and the module."""
    if how == "flag":
        proc = _time_command(downloaded, ["--no-python-layers"])
    else:
        proc = _time_command(downloaded, refuse_variable="1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "layer 'scale' (Python)" in lines[-1], proc.stderr[-2000:]
    assert "module 'beside_layers'" in lines[-1] and "refused" in lines[-1]
    assert sum("error:" in line for line in lines) == 1
    assert not (downloaded / "imported.marker").exists()


def test_without_the_flag_the_module_beside_the_prototxt_runs_as_in_caffe(downloaded):
    proc = _time_command(downloaded, refuse_variable="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "*** Benchmark ends ***" in proc.stderr
    assert (downloaded / "imported.marker").read_text() == "this module ran"


def test_refusal_is_the_library_setting_too(env_switch, downloaded, monkeypatch):
    """From Python: ``refuse_python_layers()`` (and the variable) refuse the layer in ``Net``; the
    setting can be put back."""
    from minicaffe import Net
    from minicaffe.layers.python_layer import REFUSE_VAR, refuse_python_layers
    monkeypatch.chdir(downloaded)
    env_switch(REFUSE_VAR, None)
    previous = refuse_python_layers(True)
    try:
        with pytest.raises(NetError, match="layer 'scale' \\(Python\\): Python layers are refused"):
            Net("net.prototxt", TEST)
    finally:
        refuse_python_layers(previous)
    env_switch(REFUSE_VAR, "1")
    with pytest.raises(NetError, match="module 'beside_layers'"):
        Net("net.prototxt", TEST)
    assert "beside_layers" not in sys.modules and not (downloaded / "imported.marker").exists()
