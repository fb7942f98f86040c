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
- Tests ask for one engine by name (``choose(layer, name="winograd")``, or ``force(layer, name)`` on a
  layer that keeps an ``EngineSlot``) and compare it with the reference on the same input, so every
  engine of every layer is checked without touching module constants. A forced engine need only
  ``computes(layer)``: it may run where it is correct but does not pay (Winograd on 3 channels), so the
  tests reach every engine on small shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core import backend
from ..errors import NetError
from ..proto import is_repeated

REFERENCE = "caffe"       # the name of a layer's own code in reports and test ids


@dataclass(frozen=True)
class Engine:
    """A way of computing one layer type.

    ``applies(layer)`` is called at reshape, with the layer's shape fields set, and says whether this
    engine computes exactly the reference's result for that shape (and pays off, for DEFAULT choice).
    ``computes(layer)``, when given, is the weaker test a forced engine (``choose(layer, name=...)``)
    must pass: the engine is correct for this shape, whether or not it pays; by default ``applies``.
    ``build(layer)`` returns the object the layer calls (whatever interface that layer type defines for
    its engines); it is rebuilt when the shape changes. A forced engine may be built with options
    (``build(layer, **options)``: tuning knobs such as a tiny band, for tests of ragged edges)."""
    layer_type: str
    name: str
    build: Callable[[Any], Any]
    devices: Tuple[str, ...] = ("cpu",)
    applies: Callable[[Any], bool] = field(default=lambda layer: True)
    priority: int = 0
    cudnn: bool = False
    computes: Optional[Callable[[Any], bool]] = None

    def runs_on(self, layer) -> bool:
        """Whether a forced choice of this engine is correct for ``layer``'s current shape."""
        return (self.computes or self.applies)(layer)


_TABLE: Dict[str, List[Engine]] = {}

# how to say why cuDNN cannot run now ("" when it can): the cuDNN binding (kernels/cudnn.py) registers
# it when imported, which every cuDNN engine's module does; this table stays generic
_CUDNN_REASON: List[Callable[[], str]] = []


def explain_cudnn(reason: Callable[[], str]) -> None:
    """Register ``reason()``: why cuDNN cannot run now, or "" (for ``engine: CUDNN``'s error)."""
    _CUDNN_REASON[:] = [reason]


def _why_no_cudnn(layer, device: str) -> str:
    """Why ``engine: CUDNN`` cannot be honoured for ``layer``: no cuDNN engine for its type, cuDNN
    itself unavailable (the binding's reason), or cuDNN present but not computing this shape."""
    if not any(e.cudnn for e in engines_for(layer.type)):
        return f"minicaffe has no cuDNN engine for {layer.type}"
    why = _CUDNN_REASON[0]() if _CUDNN_REASON else ""
    if why:
        return " ".join(str(why).split())           # one line, whatever the loader said
    if not any(e.cudnn for e in engines_for(layer.type, device)):
        return f"no cuDNN engine for {layer.type} on {device}"
    return "cuDNN does not compute Caffe's result for this layer's shape or parameters"


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


# types whose parameter message has an ``engine:`` field that Caffe's layer factory never reads (Im2col
# shares convolution_param with Convolution): ``engine: CUDNN`` there is not an error in Caffe
_ENGINE_FIELD_IGNORED = frozenset({"Im2col"})


def requested(layer) -> int:
    """The layer's ``engine:`` field (0 DEFAULT, 1 CAFFE, 2 CUDNN), read from whichever of its
    ``*_param`` messages has one (caffe.proto says which: a new parameter with an ``engine`` field is
    honoured without a list to update here)."""
    if layer.type in _ENGINE_FIELD_IGNORED:
        return 0
    for desc, value in layer.param.ListFields():
        if desc.message_type is not None and not is_repeated(desc) \
                and "engine" in desc.message_type.fields_by_name:
            return int(value.engine)
    return 0


def choose(layer, name: Optional[str] = None) -> Optional[Engine]:
    """The engine to run ``layer`` with at its current shape, or None for the reference.

    ``name`` forces one engine (tests, benchmarks); it must exist and compute this shape (``runs_on``)."""
    device = current_device()
    candidates = engines_for(layer.type, device)
    if name is not None:
        if name == REFERENCE:
            return None
        for e in candidates:
            if e.name == name:
                if not e.runs_on(layer):
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
        raise NetError(f"engine: CUDNN was asked for, but cuDNN cannot run this layer here: "
                       f"{_why_no_cudnn(layer, device)} (mode {device}; install minicaffe[cudnn] and use "
                       "the GPU, or use engine: CAFFE)", layer.name, layer.type)
    for e in candidates:
        if e.applies(layer):
            return e
    return None


class EngineSlot:
    """What a layer keeps: the engine built for its current shape and device, rebuilt when either
    changes, and the reference built the same way when the choice is None.

        self.engine_slot = engines.EngineSlot(reference=lambda layer: MyReference(layer))  # setup
        self.engine = self.engine_slot.get(self, shape_key)                                # reshape

    ``get`` is cheap when nothing changed (one tuple compare), so a layer may call it again in
    ``forward``/``backward`` as a guard against a mode switch since its last reshape."""

    def __init__(self, reference: Callable[[Any], Any]):
        self.reference = reference
        self.forced: Optional[str] = None
        self.options: Dict[str, Any] = {}
        self.name: str = REFERENCE
        self.impl: Any = None
        self._key: Any = None

    def get(self, layer, shape_key) -> Any:
        key = (shape_key, current_device(), self.forced)
        if key != self._key:
            chosen = choose(layer, self.forced)
            if chosen is None:
                self.impl, self.name = self.reference(layer), REFERENCE
            else:
                self.impl = chosen.build(layer, **self.options) if self.options else chosen.build(layer)
                self.name = chosen.name
            self._key = key
        return self.impl

    def force(self, name: Optional[str], **options) -> None:
        """Run ``name`` (``REFERENCE`` for the layer's own code; None: back to the normal choice) from
        the next ``get`` on, built with ``options``."""
        self.forced, self.options, self._key = name, dict(options), None


def force(layer, name: Optional[str], **options) -> None:
    """Make ``layer`` (one keeping an ``engine_slot``) run engine ``name`` from its next reshape on;
    for tests and benchmarks. The choice is checked then (``choose(layer, name)``)."""
    slot = getattr(layer, "engine_slot", None)
    if slot is None:
        raise TypeError(f"{layer.type} layers keep no engine slot")
    slot.force(name, **options)
