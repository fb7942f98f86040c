"""Compiling and launching minicaffe's CUDA kernels (CuPy), one place for the launch bookkeeping.

Why one helper: every kernel here is written once as a template over the float type and compiled
lazily per dtype under its own name (``<base>_f32`` / ``<base>_f64``), so a layer in float32 and a
gradient check in float64 run the same code. Every RawKernel uses a grid-stride loop over ``total``
elements, so any grid size is correct; ``launch`` picks one large enough to fill the GPU and
passes integers as ``long long`` (``np.int64``) and floats in the kernel's float type, exactly
the types the kernel signatures declare (CuPy passes a bare Python int as ``long long`` too, but a
bare float as ``double``, which a ``float`` parameter would misread).
"""
import numpy as np

from ..core import backend

BLOCK = 256
MAX_GRID = 1 << 16      # grid-stride loops: more blocks than this gain nothing

_CTYPES = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}
_cache = {}


def _cupy():
    """The CuPy module (the tests swap in an emulation here to run the references)."""
    return backend.import_cupy()


def suffix(dtype):
    return _CTYPES[np.dtype(dtype)][1]


def names(base):
    """Every compiled name of a kernel: the names its NumPy reference is registered under."""
    return [f"{base}_{s}" for _, s in _CTYPES.values()]


def raw_kernel(base, template, dtype, options=()):
    """The RawKernel ``<base>_<f32|f64>`` compiled from ``template`` (``__T__`` = the C float
    type, ``__NAME__`` = the kernel name) with NVRTC ``options``, built on first use and cached."""
    ctype, sfx = _CTYPES[np.dtype(dtype)]
    name = f"{base}_{sfx}"
    cp = _cupy()
    key = (id(cp), name)
    kern = _cache.get(key)
    if kern is None:
        src = template.replace("__T__", ctype).replace("__NAME__", name)
        kern = _cache[key] = cp.RawKernel(src, name, options=tuple(options))
    return kern


def elementwise_kernel(base, in_params, out_params, operation, dtype, options=()):
    """The ElementwiseKernel ``<base>_<f32|f64>``: in the parameter lists ``__D__`` is the dtype
    name (``float32``; a bare ``float`` would mean NumPy's float64 there), in the body ``__T__`` is
    the C type. Output parameters passed in are updated in place. ``options``: NVRTC options.
    Built on first use, cached."""
    ctype, sfx = _CTYPES[np.dtype(dtype)]
    dname = np.dtype(dtype).name
    name = f"{base}_{sfx}"
    cp = _cupy()
    key = (id(cp), name)
    kern = _cache.get(key)
    if kern is None:
        kern = _cache[key] = cp.ElementwiseKernel(in_params.replace("__D__", dname),
                                                  out_params.replace("__D__", dname),
                                                  operation.replace("__T__", ctype), name,
                                                  options=tuple(options))
    return kern


def scalars(dtype, *values):
    """``values`` as scalars of the arrays' float type (the kernels' ``__D__`` parameters)."""
    t = np.dtype(dtype).type
    return tuple(t(v) for v in values)


def grid_for(total):
    return max(1, min(-(-int(total) // BLOCK), MAX_GRID))


def launch(kernel, total, *args):
    """Run ``kernel`` over ``total`` elements: args ``(..., total as long long, ...)`` are the
    caller's; ints become ``np.int64`` and floats ``np.float32``/``np.float64`` by ``float_type``."""
    if total <= 0:
        return
    kernel((grid_for(total),), (BLOCK,), args)


def i64(*values):
    return tuple(np.int64(v) for v in values)


def contiguous(xp, arr):
    """``arr`` itself when C-contiguous (kernels index flat memory), else a contiguous copy."""
    return arr if arr.flags.c_contiguous else xp.ascontiguousarray(arr)
