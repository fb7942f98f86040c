"""The one solver registry: Caffe's solver type names ("SGD", "Nesterov", "AdaGrad", "RMSProp",
"AdaDelta", "Adam") -> the Solver class that trains with that update rule.

``get_solver`` (pycaffe's ``caffe.get_solver``), ``Solver(path)``, ``minicaffe train`` and the
checks of a resumed solver state all look types up here. A solver class registers itself with
``@register_solver`` (solver.py registers Caffe's six); its ``rule_class`` (updates.py) names the
type and says how many history blobs per parameter it keeps.
"""
from __future__ import annotations

from ..errors import SolverError

SOLVER_CLASSES = {}     # type name -> Solver subclass, in registration order


def register_solver(cls):
    """Class decorator: make ``cls`` the solver of its update rule's type."""
    SOLVER_CLASSES[cls.rule_class.type] = cls
    return cls


def solver_class(type_name, where="<solver>"):
    """The Solver subclass for a solver ``type`` string (Caffe's names, case as Caffe spells them)."""
    cls = SOLVER_CLASSES.get(type_name)
    if cls is None:
        known = ", ".join(SOLVER_CLASSES)
        raise SolverError(f"{where}: unknown solver type '{type_name}'; known types: {known}")
    return cls


def history_sets_by_type():
    """Solver type -> history blobs kept per learnable parameter (what a solver state holds)."""
    return {name: cls.rule_class.history_sets for name, cls in SOLVER_CLASSES.items()}

