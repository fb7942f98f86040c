"""The engine a layer runs with: chosen at every reshape, built again only when it changes.

Why a slot: ``Net.forward`` reshapes every layer before its forward, so the choice
(``engines.choose``, a few attribute reads) runs every pass, but building an engine may cost more
(a pooling scatter plan, device buffers). The slot keeps the built object while the engine, the
device and the layer's shape key stay the same.

    self.engine_slot = EngineSlot()                    # in setup
    self.impl = self.engine_slot.select(self, key)     # in reshape: None means "run the reference"

``forced`` names one engine for this layer (tests and benchmarks: ``engines.choose(layer, name=...)``
with the layer's own shape), instead of the ``engine:`` field and the priorities.
"""
from . import engines


class EngineSlot:
    def __init__(self):
        self.forced = None        # an engine name, or None: the layer's engine: field decides
        self.engine = None        # the chosen engines.Engine (None: the reference)
        self.impl = None          # what engine.build(layer) returned
        self.device = None        # the device the choice was made for
        self._built_for = None

    def select(self, layer, key=()):
        """The built engine for ``layer`` at its current shape (``key``: what the build depends on),
        or None for the layer's reference code."""
        engine = engines.choose(layer, name=self.forced)
        device = engines.current_device()
        built_for = (engine.name if engine is not None else None, device, key)
        if built_for != self._built_for:
            self.impl = engine.build(layer) if engine is not None else None
            self._built_for = built_for
        self.engine, self.device = engine, device
        return self.impl

    def check_device(self, layer):
        """An engine's backward must run on a device it was built for (its state lives there); the
        reference runs wherever ``layer.xp`` points."""
        if self.engine is not None and engines.current_device() not in self.engine.devices:
            raise layer.error(f"the mode changed from {self.device} to {engines.current_device()} "
                              f"between forward and backward: run forward again first")

    @property
    def name(self):
        """The chosen engine's name (``engines.REFERENCE`` for the layer's own code)."""
        return self.engine.name if self.engine is not None else engines.REFERENCE
