"""pycaffe's module names (``caffe.io``, ``caffe.classifier``, ``caffe.net_spec``...) for modules that live in
minicaffe's packages (``minicaffe.pycaffe.io``, ``minicaffe.methods.multicrop``...).

``import minicaffe.io`` and ``from minicaffe.io import Transformer`` must keep working for pycaffe scripts,
and the name must give the *same* module object as the package path (a second copy would hold its own
state and defeat monkeypatching). A meta-path finder does that lazily: the alias is resolved only when
imported, so ``import minicaffe`` stays quick.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

ALIASES = {
    "minicaffe.io": "minicaffe.pycaffe.io",
    "minicaffe.classifier": "minicaffe.pycaffe.classifier",
    "minicaffe.detector": "minicaffe.pycaffe.detector",
    "minicaffe.net_spec": "minicaffe.pycaffe.net_spec",
    "minicaffe.draw": "minicaffe.pycaffe.draw",
    "minicaffe.coord_map": "minicaffe.pycaffe.coord_map",
    "minicaffe.vis": "minicaffe.pycaffe.vis",
    "minicaffe.multicrop": "minicaffe.methods.multicrop",
    "minicaffe.surgery": "minicaffe.methods.surgery",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass          # the target module ran when create_module imported it


class AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(ALIASES[fullname]))


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
