"""Scalar arithmetic in Caffe's ``Dtype`` (float32): one helper for every module that must round as
Caffe's C++ does (the learning-rate policies, the update rules, the solver's per-parameter rates).

Why here: both the solver's learning-rate policies and its update rules need it, and neither should
import the other for one line; ``core`` is below both.
"""
import numpy as np


def f32(x):
    """``x`` rounded to float32, as a Python float (a weak scalar that keeps float32 arrays float32).

    Overflow gives ``inf`` silently, as C's float arithmetic does."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


__all__ = ["f32"]
