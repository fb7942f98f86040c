"""Scalar arithmetic in Caffe's ``Dtype`` (float32): one helper for every module that must round as
Caffe's C++ does (the learning-rate policies, the update rules, the solver's per-parameter rates);
and the element count of a shape, which several layer families need.

Why here: both the solver's learning-rate policies and its update rules need it, and neither should
import the other for one line; ``core`` is below both.
"""
import numpy as np


def f32(x):
    """``x`` rounded to float32, as a Python float (a weak scalar that keeps float32 arrays float32).

    Overflow gives ``inf`` silently, as C's float arithmetic does."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def element_count(dims):
    """The number of elements of a shape (a product of Python ints, 1 for no axes): what the layers
    use for Caffe's ``count(start, end)`` over part of a shape."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


__all__ = ["f32", "element_count"]
