"""Counting the device kernels a piece of GPU code launches, on the CuPy stand-in.

Why: the custom kernels exist to cut launches (each is a trip through memory and ~5 µs of launch
cost on a real GPU); a test that counts them keeps a later edit from quietly going back to dozens of
small CuPy calls. On the stand-in every CuPy call that would launch at least one kernel on a GPU
is counted once: ufunc calls (operators included), reductions and other routines, copies
(``copy``, ``astype``, ``fill``, slice assignment, ``copyto``, ``zeros``...), and each custom
``RawKernel``/``ElementwiseKernel`` launch under its name. Views (``reshape``, ``transpose``...)
and allocations (``empty``, ``empty_like``) launch nothing and are not counted; host-to-device copies are counted
apart (``"<upload>"``). A real CuPy routine may launch more than one kernel, so the counts are a
lower bound for the array code and exact for the custom kernels.

    with count_launches() as launches:
        layer.forward(bottom, top)
    assert launches.total() == 2, launches
"""
import collections
import contextlib

import cupy_standin as cs

_NO_LAUNCH = frozenset("empty_like reshape ravel squeeze swapaxes transpose expand_dims moveaxis broadcast_to rollaxis "
                   "atleast_1d atleast_2d atleast_3d broadcast_arrays may_share_memory shares_memory "
                   "split array_split hsplit vsplit dsplit diagonal".split())
_METHODS = ("all any argmax argmin argpartition argsort clip conj conjugate cumprod cumsum max mean min "
            "nonzero partition prod ptp put repeat round sort std sum take trace var compress choose "
            "flatten copy astype fill").split()
_CREATORS = ("zeros", "ones", "full", "arange", "linspace", "logspace", "eye", "identity", "tri", "indices")


class Launches(collections.Counter):
    def total(self, uploads=False):
        return sum(v for k, v in self.items() if uploads or k != "<upload>")


@contextlib.contextmanager
def count_launches():
    """Count launches (by name) while the block runs; the stand-in is restored afterwards."""
    seen = Launches()
    patches = []

    def patch(owner, name, label):
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            seen[label] += 1
            return orig(*args, **kwargs)
        patches.append((owner, name, orig))
        setattr(owner, name, counted)

    for name in ("__call__", "reduce", "accumulate", "outer", "at"):
        orig = getattr(cs._Ufunc, name)

        def counted(self, *args, _orig=orig, _kind=name, **kwargs):
            seen[self.__name__ if _kind == "__call__" else f"{self.__name__}.{_kind}"] += 1
            return _orig(self, *args, **kwargs)
        patches.append((cs._Ufunc, name, orig))
        setattr(cs._Ufunc, name, counted)
    for name in _METHODS:
        patch(cs.ndarray, name, f".{name}")
    orig_setitem = cs.ndarray.__setitem__

    def setitem(self, index, value):
        seen["<setitem>"] += 1
        return orig_setitem(self, index, value)
    patches.append((cs.ndarray, "__setitem__", orig_setitem))
    cs.ndarray.__setitem__ = setitem
    for name, fn in list(cs._FUNCTIONS.items()):
        if name not in _NO_LAUNCH and not isinstance(fn, cs._Ufunc) and getattr(cs, name, None) is fn:
            patch(cs, name, name)
    for name in _CREATORS:
        patch(cs, name, name)
    for name in ("asarray", "array", "asanyarray", "ascontiguousarray"):
        orig = getattr(cs, name)

        def moved(a, *args, _orig=orig, _name=name, **kwargs):
            if not isinstance(a, cs.ndarray):
                seen["<upload>"] += 1
            elif _name in ("array", "ascontiguousarray") and (_name == "array" or not a.flags.c_contiguous):
                seen[_name] += 1
            return _orig(a, *args, **kwargs)
        patches.append((cs, name, orig))
        setattr(cs, name, moved)
    for cls in (cs.RawKernel, cs.ElementwiseKernel):
        orig = cls.__call__

        def launched(self, *args, _orig=orig, **kwargs):
            seen[self.name] += 1
            return _orig(self, *args, **kwargs)
        patches.append((cls, "__call__", orig))
        cls.__call__ = launched
    try:
        yield seen
    finally:
        for owner, name, orig in reversed(patches):
            setattr(owner, name, orig)


def by_kind(launches):
    """``(custom kernels, other calls)``: the names starting ``minicaffe_`` are ours."""
    ours = sum(v for k, v in launches.items() if k.startswith("minicaffe_"))
    return ours, launches.total() - ours

