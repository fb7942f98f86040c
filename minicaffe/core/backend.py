"""The array-module switch: NumPy on CPU, CuPy on GPU, one global mode as in Caffe.

Layers ask ``backend.xp()`` for the module and write array code that runs on either.
"""
import numpy as np

_state = {"mode": "cpu", "device": 0, "cupy": None}
_dtype = {"dtype": np.float32}
_rng = {"gen": np.random.default_rng(), "seed": None, "gpu_seed": None, "gpu_draws": 0, "gpu_rs": None}


def _import_cupy():
    if _state["cupy"] is None:
        from ..deps import require
        _state["cupy"] = require("cupy", "GPU mode")
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
        from ..errors import MinicaffeError
        raise MinicaffeError("set_mode_gpu: no CUDA device is visible to CuPy")
    cp.cuda.Device(_state["device"]).use()
    _state["mode"] = "gpu"
    if _rng["seed"] is not None:
        # a seed set before the switch (set_random_seed, then set_mode_gpu) also seeds CuPy's own
        # generator, for user code (Python layers) that draws from cupy.random directly
        cp.random.seed(_rng["seed"])


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
    """Seed every random choice minicaffe makes (fillers, dropout, data transforms, shuffles), on the
    host and on the GPU, whichever mode is current now or later."""
    _rng["seed"] = int(seed)
    _rng["gen"] = np.random.default_rng(int(seed))
    _rng["gpu_seed"], _rng["gpu_draws"] = int(seed) % 2 ** 63, 0
    if _state["cupy"] is not None and _state["mode"] == "gpu":
        _state["cupy"].random.seed(int(seed))


def gpu_random_sample(shape, dtype):
    """Uniform [0, 1) numbers on the GPU (dropout masks), reproducible and resumable.

    Why not ``cupy.random`` directly: a cuRAND generator's position cannot be read back, so a
    snapshot could not record it and resuming would draw different masks. Instead draw ``n`` comes
    from a Philox generator (cheap to seed) seeded with a hash of (seed, n): the whole GPU random
    state is the pair ``gpu_random_state()`` returns, which the solver's ``.rng`` sidecar keeps."""
    cp = _state["cupy"]
    if _rng["gpu_seed"] is None:
        _rng["gpu_seed"] = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    rs = _rng["gpu_rs"]
    if rs is None or rs[0] is not cp:
        rs = (cp, cp.random.RandomState(0, method=cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10))
        _rng["gpu_rs"] = rs
    draw_seed = np.random.SeedSequence([_rng["gpu_seed"], _rng["gpu_draws"]]).generate_state(1, np.uint64)[0]
    rs[1].seed(int(draw_seed >> np.uint64(1)))
    _rng["gpu_draws"] += 1
    return rs[1].random_sample(shape, dtype=dtype)


def gpu_random_state():
    """The GPU generator's state, JSON-ready: {"seed": s, "draws": n} (see ``gpu_random_sample``)."""
    return {"seed": _rng["gpu_seed"], "draws": _rng["gpu_draws"]}


def set_gpu_random_state(state):
    _rng["gpu_seed"] = None if state["seed"] is None else int(state["seed"])
    _rng["gpu_draws"] = int(state["draws"])


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
