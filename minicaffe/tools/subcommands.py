"""Caffe's tools as ``minicaffe`` subcommands: ``minicaffe convert_imageset ...`` runs the same
``main(argv)`` as the ``convert_imageset`` console script. The short script names (``classify``,
``parse_log``, ``draw_net``...) are Caffe's and stay, but another package may install a command of the
same name earlier on PATH; the subcommand (or ``python -m minicaffe <tool>``) always reaches this one."""
from __future__ import annotations

import importlib
from typing import Sequence

# subcommand -> "module:function"; the console scripts in pyproject.toml name the same functions
# (tests/test_packaging.py keeps the two tables in step)
TOOLS = {
    "convert_imageset": "minicaffe.tools.convert_imageset:main",
    "compute_image_mean": "minicaffe.tools.compute_image_mean:main",
    "upgrade_net_proto_text": "minicaffe.tools.upgrade:main_net_text",
    "upgrade_net_proto_binary": "minicaffe.tools.upgrade:main_net_binary",
    "upgrade_solver_proto_text": "minicaffe.tools.upgrade:main_solver_text",
    "extract_features": "minicaffe.tools.extract_features:main",
    "draw_net": "minicaffe.tools.draw_net:main",
    "parse_log": "minicaffe.tools.parse_log:main",
    "plot_training_log": "minicaffe.tools.plot_training_log:main",
    "classify": "minicaffe.tools.classify:main",
    "visualize": "minicaffe.tools.visualize:main",
    "convert_mnist_data": "minicaffe.tools.convert_mnist_data:main",
    "convert_cifar_data": "minicaffe.tools.convert_cifar_data:main",
    "models": "minicaffe.tools.models:main",
}

USAGE = """tools (the same programs as the console scripts of these names):
  models          list the shipped model prototxts, or copy one into a folder
  """ + "\n  ".join(sorted(n for n in TOOLS if n != "models"))


def function(name: str):
    """The ``main(argv)`` of tool ``name``."""
    module, func = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), func)


def run(name: str, argv: Sequence[str]) -> int:
    """Run tool ``name`` with the arguments after its name; its exit status."""
    return function(name)(list(argv))
