"""``type: "Python"`` layers: a user class, written as for pycaffe, built from ``python_param``.

Users write, as with pycaffe::

    import minicaffe as caffe            # or: import caffe

    class Double(caffe.Layer):
        def setup(self, bottom, top): self.k = float(self.param_str or 2)
        def reshape(self, bottom, top): top[0].reshape(*bottom[0].shape)
        def forward(self, bottom, top): top[0].data[...] = self.k * bottom[0].data
        def backward(self, top, propagate_down, bottom):
            if propagate_down[0]: bottom[0].diff[...] = self.k * top[0].diff

``caffe.Layer`` is minicaffe's own ``Layer``, so the user's object IS the layer the net runs: no
wrapper. Python layers use the NumPy-facing ``.data`` / ``.diff`` (synced from and to the device
in GPU mode, as Caffe's PythonLayer runs on the CPU).

How the registry builds it: "Python" is registered to :class:`PythonLayer`, whose ``__new__``
imports ``python_param.module``, takes its class ``python_param.layer`` and returns an instance of
that class (Python then skips ``PythonLayer.__init__``, the object not being a PythonLayer). Like
pycaffe, the user's class should not need its own ``__init__``: set-up belongs in ``setup``.
Before ``setup`` it gets ``param_str``, ``phase`` (``caffe.TRAIN``/``caffe.TEST``), ``name``,
``param`` (the LayerParameter), ``type == "Python"`` and ``blobs`` with pycaffe's
``self.blobs.add_blob(*shape)``.

Trust: importing ``python_param.module`` runs that module's code, and the current directory goes
first on ``sys.path`` (as with Caffe, whose pycaffe users keep their layers beside the model). So
building a net from a downloaded prototxt, from its directory, runs the Python files that came with
it. ``refuse_python_layers()`` (the CLI's ``--no-python-layers``) or $MINICAFFE_NO_PYTHON_LAYERS=1
makes every Python layer a one-line error naming the layer and module, before anything is imported.
"""
import importlib
import os
import sys

from ..core import context as _context
from ..core.blob import Blob
from ..errors import NetError
from ..core.layer import Layer, register


class BlobVec(list):
    """A layer's learnable blobs as pycaffe shows them: a list with ``add_blob(*shape)``."""

    def add_blob(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        self.append(Blob(shape))
        return self[-1]


REFUSE_VAR = _context.NO_PYTHON_LAYERS_VAR    # read once into the context's switches
_REFUSED = {"on": False}


def refuse_python_layers(on=True):
    """Refuse (``on``) or allow again ``type: "Python"`` layers in the nets built from now on in this
    process; returns the previous setting. $MINICAFFE_NO_PYTHON_LAYERS (not '' or '0') refuses them
    whatever this says, and reaches child processes too."""
    previous = _REFUSED["on"]
    _REFUSED["on"] = bool(on)
    return previous


def python_layers_refused():
    return _REFUSED["on"] or _context.switches().no_python_layers


def _fail(param, message):
    return NetError(message, param.name, "Python")


def load_layer_class(param):
    """The class named by ``param.python_param`` (importing its module), or a NetError saying why not.

    The current directory goes first on ``sys.path`` when missing there, since pycaffe users keep
    their layer modules next to the model and run from that directory."""
    pp = param.python_param
    module_name, class_name = pp.module, pp.layer
    if python_layers_refused():         # before sys.path is touched or anything imported
        raise _fail(param, f"Python layers are refused (--no-python-layers or ${REFUSE_VAR}): not importing "
                           f"module '{module_name}' for class '{class_name}'")
    if not module_name or not class_name:
        raise _fail(param, "python_param needs both 'module' and 'layer' "
                           f"(got module '{module_name}', layer '{class_name}')")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _fail(param, f"cannot import module '{module_name}' for Python layer class "
                           f"'{class_name}': {exc}") from exc
    cls = getattr(module, class_name, None)
    where = getattr(module, "__file__", None) or module_name
    if cls is None:
        raise _fail(param, f"module '{module_name}' ({where}) has no class '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise _fail(param, f"'{class_name}' in module '{module_name}' ({where}) is not a subclass of "
                           "caffe.Layer (minicaffe.Layer)")
    return cls


@register("Python")
class PythonLayer(Layer):
    """Factory for Python layers: ``PythonLayer(param, phase)`` is an instance of the user's class.

    The user's class inherits from ``Layer`` and so has every step and helper the net calls. A class
    that subclasses PythonLayer itself is built normally."""

    def __new__(cls, param, phase):
        if cls is not PythonLayer:
            return super().__new__(cls)
        user_cls = load_layer_class(param)
        obj = user_cls(param, phase)
        obj.type = "Python"
        obj.param_str = param.python_param.param_str
        obj.share_in_parallel = bool(param.python_param.share_in_parallel)
        obj.phase = phase
        obj.name = param.name
        obj.param = param
        obj.blobs = BlobVec(obj.blobs)
        if not any("allows_in_place" in vars(c) for c in user_cls.__mro__ if c is not Layer):
            # Caffe runs any Python layer in place when asked: its correctness is the user's code's
            obj.allows_in_place = True
        return obj

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.param_str = param.python_param.param_str
        self.share_in_parallel = bool(param.python_param.share_in_parallel)
        self.blobs = BlobVec(self.blobs)
