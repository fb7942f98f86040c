"""The array-module switch: NumPy on CPU, CuPy on GPU, one global mode as in Caffe.

Layers ask ``backend.xp()`` for the module and write array code that runs on either.
"""
import numpy as np

_state = {"mode": "cpu", "device": 0, "cupy": None}
_dtype = {"dtype": np.float32}
_rng = {"gen": np.random.default_rng(), "seed": None}


def _import_cupy():
    if _state["cupy"] is None:
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - depends on the machine
            from .errors import MinicaffeError
            raise MinicaffeError("GPU mode needs CuPy: pip install minicaffe[gpu]") from exc
        _state["cupy"] = cupy
    return _state["cupy"]


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def set_mode_cpu():
    _state["mode"] = "cpu"


def set_mode_gpu():
    cp = _import_cupy()
    if not gpu_available():
        from .errors import MinicaffeError
        raise MinicaffeError("set_mode_gpu: no CUDA device is visible to CuPy")
    cp.cuda.Device(_state["device"]).use()
    _state["mode"] = "gpu"


def set_device(device_id):
    _state["device"] = int(device_id)
    if _state["mode"] == "gpu":
        _import_cupy().cuda.Device(int(device_id)).use()


def mode():
    return _state["mode"]


def is_gpu():
    return _state["mode"] == "gpu"


def xp():
    """The array module of the current mode."""
    return _state["cupy"] if _state["mode"] == "gpu" else np


def to_host(arr):
    """A NumPy view/copy of a NumPy or CuPy array."""
    if isinstance(arr, np.ndarray):
        return arr
    return arr.get()


def to_device(arr):
    """The array in the current mode's module (no copy on CPU)."""
    if _state["mode"] == "gpu":
        return _state["cupy"].asarray(arr)
    return to_host(arr)


def get_array_module(arr):
    if isinstance(arr, np.ndarray):
        return np
    return _import_cupy().get_array_module(arr)


def set_random_seed(seed):
    """Seed every random choice minicaffe makes (fillers, dropout, data transforms, shuffles)."""
    _rng["seed"] = int(seed)
    _rng["gen"] = np.random.default_rng(int(seed))
    if _state["cupy"] is not None and _state["mode"] == "gpu":
        _state["cupy"].random.seed(int(seed))


def rng():
    """The one host random generator shared by fillers, dropout masks and transforms."""
    return _rng["gen"]


def dtype():
    """The float type new blobs get: float32, or float64 inside ``float64_blobs()`` (gradient checks)."""
    return _dtype["dtype"]


class float64_blobs:
    """Context manager: blobs created inside are float64, for numerical gradient checks."""

    def __enter__(self):
        self._old = _dtype["dtype"]
        _dtype["dtype"] = np.float64

    def __exit__(self, *exc):
        _dtype["dtype"] = self._old
