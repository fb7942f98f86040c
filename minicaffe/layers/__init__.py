"""Every layer module in this package registers its classes on import."""
import importlib
import pkgutil

from ..core.layer import Layer, create_layer, layer_type_list, register  # noqa: F401

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
