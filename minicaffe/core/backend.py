"""The array-module switch: NumPy on CPU, CuPy on GPU, one mode per process as in Caffe.

Layers ask ``backend.xp()`` for the module and write array code that runs on either. The state these
functions read and set (mode, device, dtype, the random generators) lives in the process's
``minicaffe.core.context.Context``; this module is the view on it that layers and pycaffe
(``minicaffe.set_mode_gpu()`` ...) use.
"""
import numpy as np

from . import context as _context


def import_cupy():
    """The CuPy module (imported once into the context), or a one-line error naming the GPU extra."""
    ctx = _context.current()
    if ctx.cupy is None:
        from ..deps import require
        ctx.cupy = require("cupy", "GPU mode")
    return ctx.cupy


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def set_mode_cpu():
    _context.current().mode = "cpu"


def set_mode_gpu():
    ctx = _context.current()
    cp = import_cupy()
    if not gpu_available():
        from ..errors import MinicaffeError
        raise MinicaffeError("set_mode_gpu: no CUDA device is visible to CuPy")
    cp.cuda.Device(ctx.device).use()
    ctx.mode = "gpu"
    if ctx._cupy_seed_pending is not None:
        # a seed set before the switch (set_random_seed, then set_mode_gpu) also seeds CuPy's own
        # generator, for user code (Python layers) that draws from cupy.random directly
        cp.random.seed(ctx._cupy_seed_pending)
        ctx._cupy_seed_pending = None


def set_device(device_id):
    ctx = _context.current()
    ctx.device = int(device_id)
    if ctx.mode == "gpu":
        import_cupy().cuda.Device(int(device_id)).use()


def mode():
    return _context.current().mode


def is_gpu():
    return _context.current().mode == "gpu"


def xp():
    """The array module of the current mode."""
    ctx = _context._CURRENT
    return ctx.cupy if ctx.mode == "gpu" else np


def to_host(arr):
    """A NumPy view/copy of a NumPy or CuPy array."""
    if isinstance(arr, np.ndarray):
        return arr
    return arr.get()


def to_device(arr):
    """The array in the current mode's module (no copy on CPU)."""
    ctx = _context._CURRENT
    if ctx.mode == "gpu":
        return ctx.cupy.asarray(arr)
    return to_host(arr)


def get_array_module(arr):
    if isinstance(arr, np.ndarray):
        return np
    return import_cupy().get_array_module(arr)


def set_random_seed(seed):
    """Seed every random choice minicaffe makes (fillers, dropout, data transforms, shuffles), on the
    host and on the GPU, whichever mode is current now or later."""
    _context.current().set_random_seed(seed)


def gpu_random_sample(shape, dtype):
    """Uniform [0, 1) numbers on the GPU (dropout masks), reproducible and resumable.

    Why not ``cupy.random`` directly: a cuRAND generator's position cannot be read back, so a
    snapshot could not record it and resuming would draw different masks. Instead draw ``n`` comes
    from a Philox generator (cheap to seed) seeded with a hash of (seed, n): the whole GPU random
    state is the pair ``gpu_random_state()`` returns, which the solver's ``.rng`` sidecar keeps."""
    return _context.current().gpu_random_sample(shape, dtype)


def gpu_random_state():
    """The GPU generator's state, JSON-ready: {"seed": s, "draws": n} (see ``gpu_random_sample``)."""
    return _context.current().gpu_random_state()


def set_gpu_random_state(state):
    _context.current().set_gpu_random_state(state)


def rng():
    """The one host random generator shared by fillers, dropout masks and transforms."""
    return _context._CURRENT.rng


def dtype():
    """The float type new blobs get: float32, or float64 inside ``float64_blobs()`` (gradient checks)."""
    return _context._CURRENT.dtype


class float64_blobs:
    """Context manager: blobs created inside are float64, for numerical gradient checks."""

    def __enter__(self):
        ctx = _context.current()
        self._old = ctx.dtype
        ctx.dtype = np.float64

    def __exit__(self, *exc):
        _context.current().dtype = self._old


def synchronize():
    """Wait for the GPU's queued work (timers and ``minicaffe time`` measure finished work); nothing on
    the CPU."""
    if is_gpu():
        xp().cuda.Device().synchronize()
