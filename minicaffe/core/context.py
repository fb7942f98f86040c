"""The one context: everything a minicaffe process decides once and many parts read.

Caffe keeps its run-time state in one per-thread ``Caffe`` singleton (mode, device, random
generators, solver rank and count). minicaffe keeps it in one ``Context`` object too, instead of
module globals scattered over the backend, a data module and the kernels, for three reasons: a
reader sees in one place every piece of state that changes what a net computes; a snapshot can save
all of the randomness (host and device generators) because both live side by side; and nothing deep
inside a forward pass reads the process environment (the switches are read once, here, so a
variable set half-way through a run does not change it half-way, and a test says which value it
wants instead of racing the environment).

What it holds, and who reads it:

* ``mode``, ``device``, ``cupy``, ``cudnn`` and ``dtype``: the array backend (``cudnn``: the library
  ``kernels/cudnn.py`` opened, or why it could not). ``core/backend.py``'s functions
  (``set_mode_gpu``, ``xp()``, ``float64_blobs`` ...) are views on them; every layer and blob asks
  ``backend.xp()``.
* ``rng``, ``seed`` and the device generator (``gpu_seed``, ``gpu_draws``): fillers, dropout, data
  layers and transformers draw from them (``backend.rng()``, ``backend.gpu_random_sample``); the
  solver saves both in a snapshot's ``.rng`` sidecar (``host``/``gpu``) and puts them back on resume.
* ``rank`` and ``world``: Caffe's solver rank and count. Data layers read their shard with them, the
  solver seeds ``random_seed + rank`` and only rank 0 tests and snapshots; ``minicaffe.parallel``
  sets them (``setup_worker``, pycaffe's ``set_solver_rank``/``set_solver_count``).
* ``workspaces``: the scratch buffers of the kernels (im2col's column matrix, Winograd's tiles,
  pooling's index codes), reached through ``kernels.im2col.workspace``.
* ``switches``: the ``MINICAFFE_*`` environment variables, parsed once (``Switches``): the net
  (``check_nan``, ``fusion``), the Winograd kernel (``winograd``), blobs (``max_blob_bytes``), Python
  layers (``no_python_layers``), the commands (``debug``, ``no_progress``) and data-parallel
  launching (``comm``, ``bucket_mb``, the NCCL worker variables, the MPI world size), the size of
  the kernels' thread pool (``threads``, ``blas_threads``, ``blas_spin``: ``core/threads.py``), the
  cuDNN engines (``cudnn``, ``cudnn_workspace_mb``, and CuPy's ``CUPY_TF32`` as ``tf32``).

One context per process (``current()``): minicaffe runs one process per worker, never one thread per
GPU (see ``minicaffe.parallel``), so the rank is the process's. Scratch buffers are still kept per
thread, since prefetching threads and user threads may run kernels at the same time.

The environment is read when this module is imported. A program (or a test) that changes a
``MINICAFFE_*`` variable afterwards calls ``reload_environment()``; ``Context.from_environment(env)``
builds a fresh context from any mapping, and ``set_current(ctx)`` installs one. Nothing else in
minicaffe reads ``os.environ`` for these switches.

One variable is also *written* here, once, before NumPy loads: OpenBLAS's ``OPENBLAS_THREAD_TIMEOUT``.
By default OpenBLAS's idle threads spin for ~0.1 s after every GEMM, which holds every core through
a whole net (a GEMM comes every few milliseconds), so the kernels' thread pool could not use them
(``core/threads.py``). When minicaffe is imported before NumPy (the ``minicaffe`` commands always
are) and the user has not set the variable, OpenBLAS is loaded with the shortest spin (4), which
makes the pool worth its threads: training 9-11% and inference 6-9% faster on 2 cores (measured in
docs/performance.md). The variable is taken out of the environment again once NumPy has loaded, so
programs minicaffe starts (BVLC Caffe in the benchmarks, workers) see the user's environment; the
switches remember the value OpenBLAS was loaded with (``blas_spin``). Where NumPy was imported
first, nothing is changed and the pool keeps to what the user's OpenBLAS does.
"""
import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field

# what OpenBLAS was given at load by minicaffe (None: nothing; the user's value, or NumPy came first)
SHORT_BLAS_SPIN_DEFAULT = "4"
_BLAS_SPIN_GIVEN = None
if "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
    _BLAS_SPIN_GIVEN = os.environ["OPENBLAS_THREAD_TIMEOUT"] = SHORT_BLAS_SPIN_DEFAULT

import numpy as np  # noqa: E402  (after the OpenBLAS setting above, which OpenBLAS reads as it loads)

if _BLAS_SPIN_GIVEN is not None:
    os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)    # children get the user's environment

# the variables, by name (tests and the worker launcher use the names)
FUSION_VAR = "MINICAFFE_FUSION"
WINOGRAD_VAR = "MINICAFFE_WINOGRAD"
CHECK_NAN_VAR = "MINICAFFE_CHECK_NAN"
MAX_BLOB_BYTES_VAR = "MINICAFFE_MAX_BLOB_BYTES"
DEBUG_VAR = "MINICAFFE_DEBUG"
NO_PROGRESS_VAR = "MINICAFFE_NO_PROGRESS"
NO_PYTHON_LAYERS_VAR = "MINICAFFE_NO_PYTHON_LAYERS"
COMM_VAR = "MINICAFFE_COMM"            # "mpi" or "nccl": which library GPU workers under mpirun use
BUCKET_VAR = "MINICAFFE_BUCKET_MB"     # gradient bucket size for ParallelSolvers built without bucket_mb
THREADS_VAR = "MINICAFFE_THREADS"      # threads of the kernels' pool (core/threads.py)
COMPILED_VAR = "MINICAFFE_COMPILED"    # 0: the NumPy passes instead of the compiled kernels (kernels/compiled.py)
MKL_VAR = "MINICAFFE_MKL"              # 0: NumPy's BLAS for the CPU GEMMs even where the mkl package is installed (core/mkl.py)
CUDNN_VAR = "MINICAFFE_CUDNN"          # 0: never choose the cuDNN engines (comparisons, a broken cuDNN)
CUDNN_WORKSPACE_VAR = "MINICAFFE_CUDNN_WORKSPACE_MB"   # the largest cuDNN workspace an algorithm may use
# CuPy's own TF32 switch: the cuDNN engine follows it, so convolutions and GEMMs round alike
TF32_VAR = "CUPY_TF32"
# the BLAS libraries' own thread-count variables: the pool's default size is theirs
BLAS_THREADS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# how long OpenBLAS's idle threads spin (2^n cycles) before sleeping: read by OpenBLAS at load, and
# here to know whether a second thread of the kernels' pool would find a free core (core/threads.py)
BLAS_SPIN_VAR = "OPENBLAS_THREAD_TIMEOUT"
# set by ``parallel.spawn_gpu_workers`` for the processes it starts
NCCL_UID_VAR, NCCL_RANK_VAR, NCCL_SIZE_VAR = "MINICAFFE_NCCL_UID", "MINICAFFE_NCCL_RANK", "MINICAFFE_NCCL_SIZE"
# set by an MPI launcher in every process it starts (Open MPI, MPICH/Intel MPI, MVAPICH)
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag(environ, name):
    """On unless unset, empty or '0' (the opt-in switches)."""
    return environ.get(name, "") not in ("", "0")


def _not_off(environ, name):
    """On unless exactly '0' (the opt-out switches: fusion, Winograd)."""
    return environ.get(name, "1") != "0"


def mpi_world_size_in(environ):
    """The number of processes an MPI launcher started (1 when not started by one), from its
    variables in ``environ``, without initialising MPI."""
    for var in MPI_SIZE_VARS:
        value = environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class Switches:
    """The ``MINICAFFE_*`` environment switches, read once. Values that a user may mistype
    (``max_blob_bytes``, ``bucket_mb``, the NCCL rank/size) stay text: their reader validates them
    when it needs them and raises its one-line error there, as before."""

    fusion: bool = True                 # MINICAFFE_FUSION=0: TEST nets run their layers unfused
    winograd: bool = True               # MINICAFFE_WINOGRAD=0: no Winograd 3x3 forward (comparisons)
    check_nan: bool = False             # MINICAFFE_CHECK_NAN=1: every layer's output checked for NaN/inf
    max_blob_bytes: str = None          # MINICAFFE_MAX_BLOB_BYTES: the largest blob (default: physical memory)
    debug: bool = False                 # MINICAFFE_DEBUG=1: commands print tracebacks
    no_progress: bool = False           # MINICAFFE_NO_PROGRESS=1: no progress bars
    no_python_layers: bool = False      # MINICAFFE_NO_PYTHON_LAYERS=1: refuse type "Python"
    comm: str = None                    # MINICAFFE_COMM
    bucket_mb: str = None               # MINICAFFE_BUCKET_MB
    nccl_uid: str = None                # MINICAFFE_NCCL_UID/RANK/SIZE (spawn_gpu_workers' children)
    nccl_rank: str = None
    nccl_size: str = None
    mpi_world_size: int = 1             # OMPI_COMM_WORLD_SIZE, PMI_SIZE or MV2_COMM_WORLD_SIZE
    threads: str = None                 # MINICAFFE_THREADS: the kernels' thread pool (core/threads.py)
    compiled: bool = True               # MINICAFFE_COMPILED=0: no Numba kernels (kernels/compiled.py)
    mkl: bool = True                    # MINICAFFE_MKL=0: no MKL GEMMs (core/mkl.py)
    blas_threads: str = None            # OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, else MKL_NUM_THREADS
    blas_spin: str = None               # OPENBLAS_THREAD_TIMEOUT
    cudnn: bool = True                  # MINICAFFE_CUDNN=0: the cuDNN engines are never chosen
    cudnn_workspace_mb: str = None      # MINICAFFE_CUDNN_WORKSPACE_MB (default: kernels/cudnn.py)
    tf32: bool = False                  # CUPY_TF32=1: float32 convolutions may use TF32 tensor cores
    glog: dict = field(default_factory=dict)   # GLOG_minloglevel/logtostderr/log_dir, as Caffe's tools read them

    @classmethod
    def from_environ(cls, environ=None):
        env = os.environ if environ is None else environ
        return cls(fusion=_not_off(env, FUSION_VAR), winograd=_not_off(env, WINOGRAD_VAR),
                   check_nan=_flag(env, CHECK_NAN_VAR), max_blob_bytes=env.get(MAX_BLOB_BYTES_VAR) or None,
                   debug=_flag(env, DEBUG_VAR), no_progress=_flag(env, NO_PROGRESS_VAR),
                   no_python_layers=_flag(env, NO_PYTHON_LAYERS_VAR), comm=env.get(COMM_VAR) or None,
                   bucket_mb=env.get(BUCKET_VAR) or None, nccl_uid=env.get(NCCL_UID_VAR),
                   nccl_rank=env.get(NCCL_RANK_VAR), nccl_size=env.get(NCCL_SIZE_VAR),
                   mpi_world_size=mpi_world_size_in(env), threads=env.get(THREADS_VAR) or None,
                   compiled=_not_off(env, COMPILED_VAR), mkl=_not_off(env, MKL_VAR),
                   blas_threads=next((env[v] for v in BLAS_THREADS_VARS if env.get(v)), None),
                   blas_spin=env.get(BLAS_SPIN_VAR) or (_BLAS_SPIN_GIVEN if environ is None else None), cudnn=_not_off(env, CUDNN_VAR),
                   cudnn_workspace_mb=env.get(CUDNN_WORKSPACE_VAR) or None, tf32=_flag(env, TF32_VAR),
                   glog={k: env[k] for k in ("GLOG_minloglevel", "GLOG_logtostderr", "GLOG_log_dir") if k in env})


class Slot:
    """A private workspace slot: keyed by this object's identity, so no other owner can reach its
    buffer by picking the same name (string slots are shared on purpose: every convolution's column
    matrix is the one "col" buffer)."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Slot({self.name!r})"


class Workspaces:
    """Scratch buffers: one growing buffer per (device, dtype, slot) and thread, so a net of many
    convolutions allocates its big column buffer once. A slot is a string (shared by every owner that
    names it) or a ``Slot`` (private to its owner).

    Inside ``layer_frames()`` (a forward-only net's forward, net/network.py) host scratch comes
    from one arena per thread instead, cut anew for each layer (``_Frame``): the slots one layer
    uses lie side by side, and the next layer's lie over them. Per-slot buffers hold the sum over
    slots of each slot's largest use (every engine's scratch at once: 69 MB on GoogLeNet at batch
    10); the arena holds the largest that any one layer uses at once (33 MB). Slots outside a frame,
    on the GPU, and on other threads (the kernels' pool) keep their per-slot buffers."""

    def __init__(self):
        self._local = threading.local()

    def get(self, xp, shape, dtype, slot):
        """A scratch array of ``shape``; its contents are garbage and stay valid only until the next
        request of the same slot (callers copy results out before returning), and inside
        ``layer_frames`` at most until the next layer starts."""
        size = 1
        for s in shape:
            size *= int(s)
        if xp is np:
            frames = getattr(self._local, "frames", None)
            if frames:
                return frames[-1].get(shape, size, dtype, slot)
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        key = ("cpu" if xp is np else f"gpu{xp.cuda.Device().id}", np.dtype(dtype).str, slot)
        buf = bufs.get(key)
        if buf is None or buf.size < size:
            buf = bufs[key] = xp.empty(max(size, 1), dtype=dtype)
        return buf[:size].reshape(shape)

    def framed(self):
        """Whether this thread runs inside ``layer_frames`` now: host scratch from ``get`` then lies
        in the frame and lasts only until the next layer starts (layers that would otherwise keep
        buffers of their own between calls take it from there instead: layers/lrn.py)."""
        return bool(getattr(self._local, "frames", None))

    @contextlib.contextmanager
    def layer_frames(self):
        """Host scratch of this thread from its arena while the block runs; the caller calls the
        yielded frame's ``next_layer()`` before each layer. Nested blocks (a Python layer running
        another net) get an arena of their own, so the outer layer's scratch is left alone."""
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = []
        arenas = getattr(self._local, "arenas", None)
        if arenas is None:
            arenas = self._local.arenas = []
        depth = len(frames)
        if len(arenas) <= depth:
            arenas.append(np.empty(0, np.uint8))
        frame = _Frame(arenas[depth])
        frames.append(frame)
        try:
            yield frame
        finally:
            frames.pop()
            arenas[depth] = frame.arena        # kept (grown) for the next forward

    def clear(self):
        """Drop this thread's buffers (e.g. before measuring memory)."""
        self._local.bufs = {}
        self._local.arenas = []


_ALIGN = 64     # bytes: each slot of a frame starts on a cache line

def _aligned_bytes(n):
    """``n`` bytes starting on an _ALIGN boundary (NumPy aligns to 16)."""
    raw = np.empty(n + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + n]


_LIBC = []      # glibc's handle once looked up (None where there is none)


def trim_heap():
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``); False where the C
    library has none. Building a net and its first forward free a lot (the caffemodel's bytes and
    parsed message, the blobs' private arrays a memory plan replaces, grown scratch); glibc keeps
    such memory mapped, counted in the process's resident set, once its dynamic mmap threshold
    has risen past those sizes (any large array freed raises it), so the freed memory of a
    ResNet-50 or GoogLeNet inference net stays resident (~80 MB on GoogLeNet at batch 10)."""
    if not _LIBC:
        try:
            import ctypes
            lib = ctypes.CDLL("libc.so.6")
            _LIBC.append(lib.malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0](0)
    return True


class _Frame:
    """One layer's scratch in an arena: slots are cut one after another from offset 0 (a slot asked
    again, no larger, gets its place back); ``next_layer`` starts over. An arena too small is
    replaced by a larger one for the rest of the frame (the arrays handed out from the old one keep
    it alive until their callers let go); after the first forward it fits every layer."""

    __slots__ = ("arena", "top", "slots", "grew")

    def __init__(self, arena):
        self.arena, self.top, self.slots, self.grew = arena, 0, {}, False

    def next_layer(self):
        self.top, self.slots = 0, {}

    def get(self, shape, size, dtype, slot):
        dtype = np.dtype(dtype)
        nbytes = size * dtype.itemsize
        key = (dtype.str, slot)
        place = self.slots.get(key)
        if place is None or place[1] < nbytes:
            span = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
            end = self.top + span
            if end > self.arena.size:
                self.arena = _aligned_bytes(max(end, self.arena.size + self.arena.size // 4))
                self.grew = True
            place = self.slots[key] = (self.top, span, self.arena)
            self.top = end
        off, _, arena = place
        return arena[off:off + nbytes].view(dtype).reshape(shape)


def _fresh_seed():
    """A 63-bit seed from the OS's entropy."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(eq=False)
class Context:
    """See the module docstring. Build one with ``Context.from_environment()``; the process's is
    ``current()``."""

    switches: Switches = field(default_factory=Switches)
    mode: str = "cpu"
    device: int = 0
    cupy: object = None                 # the CuPy module once imported (tests install a stand-in)
    cudnn: object = None                # the cuDNN library once opened (kernels/cudnn.py; tests install an emulation)
    dtype: type = np.float32
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    seed: int = None                    # the last set_random_seed, None if never seeded
    # The device generator: draw n of gpu_random_sample comes from a Philox stream seeded with a
    # hash of (gpu_seed, n), so (gpu_seed, gpu_draws) is its whole state. The seed is drawn now even
    # in an unseeded run, so that a snapshot taken before the first draw still records it.
    gpu_seed: int = field(default_factory=_fresh_seed)
    gpu_draws: int = 0
    rank: int = 0
    world: int = 1
    workspaces: Workspaces = field(default_factory=Workspaces)
    _cupy_seed_pending: int = None      # a seed for cupy.random not yet given to it (CPU mode)
    _gpu_rs: tuple = None               # (cupy module, its Philox RandomState), made on first draw

    @classmethod
    def from_environment(cls, environ=None):
        """A fresh context (CPU mode, unseeded, rank 0 of 1) with the switches of ``environ``
        (default ``os.environ``)."""
        return cls(switches=Switches.from_environ(environ))

    # --- random generators ------------------------------------------------------------------------
    def set_random_seed(self, seed):
        """Seed the host generator and the device generator; CuPy's own ``cupy.random`` (which user
        code such as Python layers may draw from) gets the seed now in GPU mode, else at the next
        ``set_mode_gpu`` (once: switching modes later does not restart its stream)."""
        seed = int(seed)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.gpu_seed, self.gpu_draws = seed % 2 ** 63, 0
        if self.cupy is not None and self.mode == "gpu":
            self.cupy.random.seed(seed)
            self._cupy_seed_pending = None
        else:
            self._cupy_seed_pending = seed

    def gpu_random_sample(self, shape, dtype):
        """Uniform [0, 1) numbers from the device generator (see ``backend.gpu_random_sample``)."""
        cp = self.cupy
        if self.gpu_seed is None:        # a sidecar from before the seed was always set said null
            self.gpu_seed = _fresh_seed()
        rs = self._gpu_rs
        if rs is None or rs[0] is not cp:
            rs = self._gpu_rs = (cp, cp.random.RandomState(0, method=cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10))
        draw_seed = np.random.SeedSequence([self.gpu_seed, self.gpu_draws]).generate_state(1, np.uint64)[0]
        rs[1].seed(int(draw_seed >> np.uint64(1)))
        self.gpu_draws += 1
        return rs[1].random_sample(shape, dtype=dtype)

    def gpu_random_state(self):
        return {"seed": self.gpu_seed, "draws": self.gpu_draws}

    def set_gpu_random_state(self, state):
        self.gpu_seed = None if state["seed"] is None else int(state["seed"])
        self.gpu_draws = int(state["draws"])

    # --- workers -----------------------------------------------------------------------------------
    def set_solver_rank(self, rank, count):
        from ..errors import DataError
        rank, count = int(rank), int(count)
        if count < 1 or not 0 <= rank < count:
            raise DataError(f"solver rank {rank} is not in [0, {count})")
        self.rank, self.world = rank, count


_CURRENT = Context.from_environment()


def current():
    """The process's context."""
    return _CURRENT


def set_current(ctx):
    """Make ``ctx`` the process's context; returns the one it replaces (tests that want a fresh,
    unseeded context put the old one back afterwards)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, ctx
    return previous


def reload_environment(environ=None):
    """Read the ``MINICAFFE_*`` switches again (from ``environ``, default ``os.environ``) into the
    current context, for a program or test that changed them after start-up; returns the switches
    they replace."""
    previous = _CURRENT.switches
    _CURRENT.switches = Switches.from_environ(environ)
    return previous


def switches():
    """The current context's environment switches."""
    return _CURRENT.switches


def child_environment(**extra):
    """This process's environment plus ``extra``: what a worker process is started with."""
    env = dict(os.environ)
    env.update(extra)
    return env


# Caffe's Caffe::solver_rank / solver_count, as views on the current context (pycaffe's spellings are
# in minicaffe.parallel; minicaffe.data re-exports these for the data layers' users).

def set_solver_rank(rank, count):
    """Caffe's ``set_solver_rank``/``set_solver_count`` at once: data layers built afterwards read
    only their share (``i % count == rank``) at TRAIN; a DataError unless ``0 <= rank < count``."""
    _CURRENT.set_solver_rank(rank, count)


def solver_rank():
    return _CURRENT.rank


def solver_count():
    return _CURRENT.world
