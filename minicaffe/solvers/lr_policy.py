"""Learning-rate policies: pure functions of the solver parameters and the iteration, as Caffe's
``SGDSolver::GetLearningRate``.

``multistep`` is the one policy with memory: Caffe advances ``current_step`` by at most one per call
(when ``iter >= stepvalue[current_step]``) and saves it in the SolverState. Here that memory is an
argument and a return value, so the functions stay pure: ``learning_rate(param, it, step) -> (lr, step)``.
The arithmetic follows Caffe's C++ to the rounding: ``step``, ``exp`` and ``multistep`` call
``pow(float, int)``, which C++ evaluates in double, rounded to float32 once at the end; ``inv``, ``poly``
and ``sigmoid`` work in float32 throughout (``powf``/``expf`` on float operands, every product and sum
rounded), so each intermediate is rounded here too. Off by one bit, the rate moves every weight update
by one bit, and a run drifts from Caffe's.
"""
import math

import numpy as np

from ..core.numeric import f32
from ..errors import SolverError, did_you_mean

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _need(cond, message):
    if not cond:
        raise SolverError(message)


def learning_rate(param, it, current_step=0):
    """The learning rate at iteration ``it`` and the (possibly advanced) ``current_step``.

    ``param`` is a ``SolverParameter``; errors (unknown policy, a missing stepsize...) are SolverErrors
    naming the policy and the field. Overflow gives inf, as C's ``pow`` would.
    """
    try:
        return _learning_rate(param, it, current_step)
    except OverflowError:
        return float("inf"), current_step if param.lr_policy != "step" else int(it) // param.stepsize


def _learning_rate(param, it, current_step):
    policy = param.lr_policy
    base = f32(param.base_lr)
    gamma = f32(param.gamma)
    power = f32(param.power)
    it = int(it)
    if policy == "fixed":
        rate = base
    elif policy == "step":
        _need(param.stepsize > 0, f"lr_policy 'step' needs stepsize > 0 (got {param.stepsize})")
        _need(gamma >= 0, f"lr_policy 'step' needs gamma >= 0 (got {gamma:g})")
        current_step = it // param.stepsize
        rate = base * math.pow(gamma, current_step)
    elif policy == "exp":
        _need(gamma >= 0, f"lr_policy 'exp' needs gamma >= 0 (got {gamma:g})")
        rate = base * math.pow(gamma, it)
    elif policy == "inv":
        _need(gamma >= 0, f"lr_policy 'inv' needs gamma >= 0 (got {gamma:g})")
        rate = f32(base * f32(math.pow(f32(1.0 + f32(gamma * f32(it))), -power)))
    elif policy == "multistep":
        values = list(param.stepvalue)
        if current_step < len(values) and it >= values[current_step]:
            current_step += 1
        _need(gamma >= 0, f"lr_policy 'multistep' needs gamma >= 0 (got {gamma:g})")
        rate = base * math.pow(gamma, current_step)
    elif policy == "poly":
        _need(param.max_iter > 0, f"lr_policy 'poly' needs max_iter > 0 (got {param.max_iter})")
        frac = f32(np.float32(it) / np.float32(param.max_iter))
        remaining = f32(1.0 - frac)
        if remaining < 0 and power != int(power):
            rate = float("nan")       # as C's pow: a negative base to a fractional power
        elif remaining == 0 and power < 0:
            rate = float("inf")
        else:
            rate = base * f32(math.pow(remaining, power))
    elif policy == "sigmoid":
        _need(gamma >= 0, f"lr_policy 'sigmoid' needs gamma >= 0 (got {gamma:g})")
        _need(param.stepsize > 0, f"lr_policy 'sigmoid' needs stepsize > 0 (got {param.stepsize})")
        z = f32(-gamma * f32(f32(it) - f32(param.stepsize)))
        e = f32(math.exp(z)) if z < 700 else float("inf")     # expf overflows to inf above ~88.7
        rate = base * f32(1.0 / f32(1.0 + e))
    else:
        shown = f"'{policy}'" if policy else "'' (lr_policy is not set)"
        raise SolverError(f"unknown learning rate policy {shown}{did_you_mean(policy, POLICIES)}; "
                          f"known: {', '.join(POLICIES)}")
    return f32(rate), current_step


def get_learning_rate(param, it, current_step=0):
    """Just the rate (``current_step`` not advanced): for displays and the pycaffe ``solver.lr``."""
    return learning_rate(param, it, current_step)[0]

