"""Solvers: the training loop (solver.py), Caffe's update rules (updates.py), lr policies (lr_policy.py)."""
from .lr_policy import get_learning_rate, learning_rate
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver, SGDSolver,
                     SignalHandler, Solver, get_solver, read_solver_param)

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver", "read_solver_param", "SignalHandler", "learning_rate",
           "get_learning_rate"]
