"""Solvers: the training loop (solver.py), reading solver definitions (params.py), building the
nets they name (nets.py), snapshots and resuming (checkpoint.py), NaN diagnosis (diagnosis.py),
SIGINT/SIGHUP (signals.py), the solver type registry (registry.py), gradient synchronisation
strategies (sync.py), Caffe's update rules (updates.py) and lr policies (lr_policy.py)."""
from .lr_policy import get_learning_rate, learning_rate
from .params import read_solver_param
from .registry import register_solver, solver_class
from .signals import SignalHandler
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver, SGDSolver,
                     Solver, get_solver)
from .sync import GradientSync

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver", "read_solver_param", "SignalHandler", "learning_rate",
           "get_learning_rate", "GradientSync", "solver_class", "register_solver"]
