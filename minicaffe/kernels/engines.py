"""One table of engines: which implementation computes a layer, chosen once per shape.

A layer's own ``forward``/``backward`` code is the *reference*: plain ``xp`` code that says what Caffe
computes. An engine is a faster way of computing the same thing for some shapes on some devices
(im2col + GEMM, Winograd, a custom CUDA kernel, cuDNN). Caffe picks its engine in the layer factory
from the ``engine:`` field; minicaffe picks from this table at ``reshape``, because the best engine
depends on the shape (Winograd pays only on large 3x3 layers, the batch-last GEMM only on narrow ones).

    register(Engine("Convolution", "winograd", devices=("cpu",), priority=30,
                    applies=lambda layer: ..., build=WinogradConv))

    engine = engines.choose(layer)      # in Layer.reshape; None means "run the reference"

How the choice is made:
- ``engine: CAFFE`` in the layer's parameter picks the reference (Caffe's own code); ``engine: CUDNN``
  picks an engine registered with ``cudnn=True`` and fails, naming the layer, where none applies (Caffe
  refuses CUDNN in a build without cuDNN the same way); ``DEFAULT`` picks the highest-priority engine
  whose ``applies(layer)`` holds for the current device and shape.
- Tests ask for one engine by name (``choose(layer, name="winograd")``) and compare it with the reference
  on the same input, so every engine of every layer is checked without touching module constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core import backend
from ..errors import NetError

REFERENCE = "caffe"       # the name of a layer's own code in reports and test ids


@dataclass(frozen=True)
class Engine:
    """A way of computing one layer type.

    ``applies(layer)`` is called at reshape, with the layer's shape fields set, and says whether this
    engine computes exactly the reference's result for that shape (and pays off, for DEFAULT choice).
    ``build(layer)`` returns the object the layer calls (whatever interface that layer type defines for
    its engines); it is rebuilt when the shape changes."""
    layer_type: str
    name: str
    build: Callable[[Any], Any]
    devices: Tuple[str, ...] = ("cpu",)
    applies: Callable[[Any], bool] = field(default=lambda layer: True)
    priority: int = 0
    cudnn: bool = False


_TABLE: Dict[str, List[Engine]] = {}


def register(engine: Engine) -> Engine:
    entries = _TABLE.setdefault(engine.layer_type, [])
    if any(e.name == engine.name for e in entries):
        raise RuntimeError(f"engine {engine.name} registered twice for {engine.layer_type}")
    entries.append(engine)
    entries.sort(key=lambda e: -e.priority)
    return engine


def engines_for(layer_type: str, device: Optional[str] = None) -> List[Engine]:
    """The registered engines of a layer type (on one device if given), best first."""
    return [e for e in _TABLE.get(layer_type, []) if device is None or device in e.devices]


def names(layer_type: str, device: Optional[str] = None) -> List[str]:
    """Engine names for test parametrisation: the reference first, then every registered engine."""
    return [REFERENCE] + [e.name for e in engines_for(layer_type, device)]


def current_device() -> str:
    return "gpu" if backend.mode() == "gpu" else "cpu"


def requested(layer) -> int:
    """The layer's ``engine:`` field (0 DEFAULT, 1 CAFFE, 2 CUDNN), for the types that have one."""
    for field_name in ("convolution_param", "pooling_param", "lrn_param", "relu_param", "sigmoid_param",
                       "tanh_param", "softmax_param"):
        if layer.param.HasField(field_name):
            sub = getattr(layer.param, field_name)
            return int(getattr(sub, "engine", 0))
    return 0


def choose(layer, name: Optional[str] = None) -> Optional[Engine]:
    """The engine to run ``layer`` with at its current shape, or None for the reference.

    ``name`` forces one engine (tests, benchmarks); it must exist and apply to this shape."""
    device = current_device()
    candidates = engines_for(layer.type, device)
    if name is not None:
        if name == REFERENCE:
            return None
        for e in candidates:
            if e.name == name:
                if not e.applies(layer):
                    raise NetError(f"engine {name} does not apply to this shape", layer.name, layer.type)
                return e
        raise NetError(f"no engine {name!r} on {device} (have: {', '.join(names(layer.type, device))})",
                       layer.name, layer.type)
    want = requested(layer)
    if want == 1:          # CAFFE: the reference
        return None
    if want == 2:          # CUDNN
        for e in candidates:
            if e.cudnn and e.applies(layer):
                return e
        raise NetError("engine: CUDNN was asked for, but cuDNN cannot run this layer here "
                       f"(mode {device}; install minicaffe[cudnn] and use the GPU, or use engine: CAFFE)",
                       layer.name, layer.type)
    for e in candidates:
        if e.applies(layer):
            return e
    return None
