"""The public API is typed (PEP 561: minicaffe ships py.typed) and documented: every public member
of Net has a docstring (``help(Net.reshape)`` once showed a stray code comment), and the annotations
of the public signatures name real types (they are strings under ``from __future__ import
annotations``: a typo would only show when a type checker or ``get_type_hints`` reads them)."""
import inspect
import os
import typing

import pytest

import minicaffe
from minicaffe import Blob, Net, NetSpec, io
from minicaffe.classifier import Classifier, crops, load_labels, top_k
from minicaffe.draw import draw_net, draw_net_to_file, render_dot, to_dot
from minicaffe.net_spec import Top, assign_proto, to_proto
from minicaffe.solvers.solver import Solver, get_solver, read_solver_param
from minicaffe.tools.compute_image_mean import compute_image_mean
from minicaffe.tools.extract_features import extract_features
from minicaffe.tools.parse_log import parse_log, save_csv_files, to_csv
from minicaffe.tools.plot_training_log import plot_chart
from minicaffe.tools.upgrade import upgrade_net_param, upgrade_solver_param

FUNCTIONS = [io.blobproto_to_array, io.array_to_blobproto, io.arraylist_to_blobprotovector_str,
             io.blobprotovector_str_to_arraylist, io.load_mean, io.load_image, io.resize_image,
             io.center_crop_box, io.oversample, crops, load_labels, top_k, assign_proto, to_proto,
             get_solver, read_solver_param, to_dot, render_dot, draw_net, draw_net_to_file,
             compute_image_mean, extract_features, parse_log, to_csv, save_csv_files, plot_chart,
             upgrade_net_param, upgrade_solver_param]
CLASSES = [Net, Blob, Solver, io.Transformer, Classifier, NetSpec, Top]


def _public_methods(cls):
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, property):
            if member.fget.__name__ != "<lambda>":       # Blob.num/channels/...: Caffe's legacy axes
                yield f"{cls.__name__}.{name}", member.fget
        elif inspect.isfunction(member):
            yield f"{cls.__name__}.{name}", member


def _all():
    for fn in FUNCTIONS:
        yield fn.__qualname__, fn
    for cls in CLASSES:
        yield from _public_methods(cls)


def test_py_typed_marker_ships():
    assert os.path.isfile(os.path.join(os.path.dirname(minicaffe.__file__), "py.typed"))


def test_every_public_member_of_net_has_a_docstring():
    missing = [n for n, fn in _public_methods(Net) if n != "Net.__init__" and not (fn.__doc__ or "").strip()]
    assert not missing
    assert inspect.getdoc(Net.reshape).startswith("Reshape every layer")


@pytest.mark.parametrize("name,fn", list(_all()), ids=[n for n, _ in _all()])
def test_public_signature_is_annotated(name, fn):
    sig = inspect.signature(fn)
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    for p in list(sig.parameters.values())[1 if "." in name else 0:]:
        if p.name != "self":
            assert p.annotation is not inspect.Parameter.empty, f"{name}: parameter {p.name} is not annotated"
    hints = typing.get_type_hints(fn, localns={"Net": Net})     # every name in them resolves
    assert "return" in hints
