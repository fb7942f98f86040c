"""NumPy references for minicaffe's custom CuPy kernels, keyed by kernel name.

Why: CI has no GPU. The test suite's CuPy stand-in (tests/cupy_standin.py) runs the GPU code
paths on NumPy, and a custom kernel (``cupy.RawKernel``, ``cupy.ElementwiseKernel``,
``cupy.ReductionKernel``) can only run there if a NumPy function computes the same thing. Each
kernel module registers that function here under the kernel's ``name``; the stand-in refuses a
kernel with no reference, clearly, instead of guessing.

Contract (what the stand-in calls):
- RawKernel ``name``: ``REFERENCES[name](grid, block, args, shared_mem=0)``; ``args`` is the tuple
  the kernel is launched with (arrays in, arrays written in place, scalars), exactly as on CuPy.
- ElementwiseKernel / ReductionKernel ``name``: ``REFERENCES[name](*args, **kwargs)`` with the
  kernel call's arguments; it returns what the CuPy kernel call returns (the output array or a
  tuple of them) and fills any output arrays passed in.
"""

REFERENCES = {}


def reference(name):
    """Decorator: register ``fn`` as the NumPy emulation of the CuPy kernel called ``name``."""
    def register(fn):
        if name in REFERENCES and REFERENCES[name] is not fn:
            raise ValueError(f"kernel reference {name!r} registered twice")
        REFERENCES[name] = fn
        return fn
    return register
