"""Blob: an N-d float32 array with its gradient, synced between host and device like Caffe's SyncedMemory.

Three accessors, three promises (the rule that keeps a GPU net from copying whole blobs back and forth):

* ``blob.data`` / ``blob.diff`` (pycaffe's surface) are NumPy arrays the user may WRITE through
  (``net.blobs['data'].data[...] = img``). A write into a returned array cannot be seen, so, as in
  Caffe's pycaffe (which hands out ``mutable_cpu_data()``), getting one syncs the host copy and marks
  it the newest: the next device use uploads it again. Correct for every way of writing.
* ``blob.host_data`` / ``blob.host_diff`` are for engine code that only READS on the host (display
  lines, snapshots, tools): Caffe's ``cpu_data()``. The host copy is synced and the device copy stays
  valid (both SYNCED), so the next layer reads the device copy without an upload. The arrays are
  read-only views, so a write by mistake raises instead of being silently lost.
* ``blob.xdata`` / ``blob.xdiff`` (layers) are arrays of the current array module (NumPy on CPU,
  CuPy on GPU); they never force a copy to the host. Layers may write into them, so the device copy
  becomes the newest.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from . import backend
from . import context as _context
from ..errors import AllocationError, NetError, ShapeError

HOST, DEVICE, SYNCED = "host", "device", "both"


class _Synced:
    """One array that may live on the host, the device, or both; copies only when the other side reads.

    ``lazy``: the host array is made (zeros) on first use, as Caffe's SyncedMemory allocates on
    first access. Blobs make their diff lazily: an inference net never touches a gradient, and an
    eager ``np.zeros`` is resident memory whenever the allocator hands out recycled pages (it
    clears them), e.g. every parameter's diff after the fillers' temporaries were freed: about
    100 MB on ResNet-50."""

    __slots__ = ("_host", "dev", "head", "_spec")

    def __init__(self, shape, dtype, name="", lazy=False):
        self._spec = (tuple(shape), np.dtype(dtype), name)
        self._host = None if lazy else _zeros(shape, dtype, name)
        self.dev = None
        self.head = HOST  # where the newest values are; "both" when in sync

    @property
    def host(self):
        if self._host is None:
            self._host = _zeros(*self._spec)
        return self._host

    @host.setter
    def host(self, arr):
        self._host = arr

    @property
    def allocated(self):
        """Whether the host array exists (made, set, or brought from the device)."""
        return self._host is not None

    def host_array(self, write=True):
        """The host copy, synced from the device when that is newer. ``write`` (the pycaffe
        surface): the caller may write into it, so it becomes the newest copy; otherwise both
        copies stay valid."""
        if self.head == DEVICE:
            self.host = backend.to_host(self.dev)
            self.head = SYNCED
        if write and self.dev is not None:
            self.head = HOST
        return self.host

    def dev_array(self):
        if not backend.is_gpu():
            if self.head == DEVICE:
                self.host = backend.to_host(self.dev)
            self.head, self.dev = HOST, None
            return self.host
        if self.head == HOST or self.dev is None:
            self.dev = backend.to_device(self.host)
        # layers may write into it: the device copy becomes the newest
        self.head = DEVICE
        return self.dev

    def set(self, arr):
        if isinstance(arr, np.ndarray) or not backend.is_gpu():
            self.host = np.asarray(backend.to_host(arr), dtype=self._spec[1])
            self.dev, self.head = None, HOST
        else:
            self.dev, self.head = arr, DEVICE

    @property
    def shape(self):
        if self.head == DEVICE:
            return self.dev.shape
        return self._spec[0] if self._host is None else self._host.shape

    def claim(self):
        """Private storage: nothing to take over (see ``_Pooled.claim``)."""


def _read_only(arr):
    view = arr.view()
    view.flags.writeable = False
    return view


class Blob:
    """Caffe's Blob: ``data`` and ``diff`` of one shape."""

    def __init__(self, shape: Sequence[int] = (), name: str = "") -> None:
        self.name = name
        self.dtype = backend.dtype()
        self._shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self._shape):
            raise ShapeError(f"blob '{name}': negative dimension in shape {self._shape}")
        self._data = _Synced(self._shape, self.dtype, name)
        self._diff = _Synced(self._shape, self.dtype, name, lazy=True)

    # --- shape -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The dimensions, a tuple of ints (Caffe's ``shape()``)."""
        return self._shape

    def reshape(self, *shape: int | Sequence[int]) -> None:
        """Change the shape; storage is kept when the shape is unchanged (so buffers are reused)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"blob '{self.name}': negative dimension in shape {shape}")
        if shape != self._shape:
            data = _Synced(shape, self.dtype, self.name)
            diff = _Synced(shape, self.dtype, self.name, lazy=True)
            self._shape, self._data, self._diff = shape, data, diff

    def private_diff(self) -> None:
        """Give the diff its own storage again (zeros, made on first use), after it was set to a
        view of a buffer other blobs share (net/diff_plan.py)."""
        self._diff = _Synced(self._shape, self.dtype, self.name, lazy=True)

    def reshape_like(self, other: Blob) -> None:
        """Take ``other``'s shape (Caffe's ``ReshapeLike``)."""
        self.reshape(other.shape)

    @property
    def count(self) -> int:
        """The number of values: the product of the dimensions (1 for a scalar blob of shape ())."""
        n = 1
        for d in self._shape:
            n *= d
        return n

    def count_from(self, axis: int) -> int:
        """The product of the dimensions from ``axis`` on (Caffe's ``count(axis)``)."""
        n = 1
        for d in self._shape[axis:]:
            n *= d
        return n

    def _legacy(self, i):
        # Caffe's num/channels/height/width: the first four axes, 1 where missing
        return self._shape[i] if len(self._shape) > i else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    # --- user-facing (NumPy) -----------------------------------------------------------------
    @property
    def data(self) -> np.ndarray:
        """The values as a writable NumPy array (pycaffe's ``blob.data``); on GPU, brought to the host
        first, and writes through it reach the device before the next layer runs."""
        return self._data.host_array()

    @data.setter
    def data(self, value):
        self._assign(self._data, value)

    @property
    def diff(self) -> np.ndarray:
        """The gradients as a writable NumPy array (pycaffe's ``blob.diff``); see ``data``."""
        return self._diff.host_array()

    @diff.setter
    def diff(self, value):
        self._assign(self._diff, value)

    @property
    def host_data(self) -> np.ndarray:
        """``data`` for reading on the host (engine code): synced, device copy kept valid, read-only."""
        return _read_only(self._data.host_array(write=False))

    @property
    def host_diff(self) -> np.ndarray:
        """``diff`` for reading on the host: see ``host_data``."""
        return _read_only(self._diff.host_array(write=False))

    def host_is_current(self) -> bool:
        """Whether ``host_data`` needs no copy from the device (engine code that can check on
        the host for free, e.g. label ranges)."""
        return self._data.head != DEVICE

    def _assign(self, synced, value):
        synced.claim()          # a whole-blob assignment writes it: fine even over a reused buffer
        arr = synced.host_array()
        arr[...] = backend.to_host(value) if not np.isscalar(value) else value

    # --- layer-facing (current array module) ---------------------------------------------------
    @property
    def xdata(self) -> Any:
        """The values in the current array module (NumPy on CPU, CuPy on GPU), for layer code."""
        return self._data.dev_array()

    @xdata.setter
    def xdata(self, arr):
        self._set_x(self._data, arr)

    @property
    def xdiff(self) -> Any:
        """The gradients in the current array module, for layer code; see ``xdata``."""
        return self._diff.dev_array()

    @xdiff.setter
    def xdiff(self, arr):
        self._set_x(self._diff, arr)

    def _set_x(self, synced, arr):
        if tuple(arr.shape) != self._shape:
            arr = arr.reshape(self._shape)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if not arr.flags.c_contiguous:
            # layers write through reshaped views of their tops: those must not be silent copies
            arr = backend.get_array_module(arr).ascontiguousarray(arr)
        synced.set(arr)

    # --- memory shared between blobs of an inference net (net/memory_plan.py) -----------------
    def use_buffer(self, buffer: SharedBuffer | None, group: object = None, keep_values: bool = False) -> None:
        """Keep this blob's data in ``buffer`` (a prefix of it, in this blob's shape) from now on, or
        in private storage again when ``buffer`` is None. ``group``: blobs that are views of one
        another (a Split's tops and its bottom) pass the same object, so that any of them may be read
        while the buffer holds their values. The values held so far are dropped unless
        ``keep_values`` (a net input the user filled before the plan was remade). The diff is left
        alone: a forward-only net never writes it, so its pages are never touched. A later reshape
        to another shape gives the blob private storage again."""
        old = self._data
        if buffer is None:
            self._data = _Synced(self._shape, self.dtype, self.name)
        else:
            self._data = _Pooled(buffer, self, group)
        if keep_values and old.shape == self._shape:
            try:
                values = old.host_array(write=False)
            except NetError:        # its buffer holds another blob's values: nothing to keep
                return
            self._data.set(np.array(values, copy=True))

    @property
    def buffer(self) -> SharedBuffer | None:
        """The SharedBuffer holding this blob's data, or None for private storage."""
        return getattr(self._data, "buffer", None)

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self._shape})"


def format_bytes(n):
    """``n`` bytes for a message: the exact number, and GiB/TiB/... when it is large."""
    for unit, size in (("EiB", 2 ** 60), ("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def memory_limit():
    """The most bytes one blob may ask for: this machine's physical memory (MINICAFFE_MAX_BLOB_BYTES
    overrides it). A blob larger than that can never be used, and on Linux a lazily committed
    allocation would otherwise "succeed" and end later in the OOM killer instead of a message."""
    env = _context._CURRENT.switches.max_blob_bytes
    if env:
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 63 - 1


def _zeros(shape, dtype, name):
    """np.zeros(shape), or an AllocationError naming the blob and the bytes asked for (worked out in
    Python integers first, so a product of dimensions that overflows int64 is caught too)."""
    count = 1
    for d in shape:
        count *= d
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes > memory_limit():
        raise AllocationError(f"blob '{name}' of shape {shape} would need {format_bytes(nbytes)}, more "
                              f"than this machine's memory ({format_bytes(memory_limit())})")
    try:
        return np.zeros(shape, dtype=dtype)
    except (MemoryError, ValueError) as exc:
        raise AllocationError(f"cannot allocate {format_bytes(nbytes)} for blob '{name}' of shape "
                              f"{shape}: {exc}") from None


class SharedBuffer:
    """Flat host memory that several blobs of an inference net take turns in (blobs whose lifetimes
    do not overlap; net/memory_plan.py decides which). ``owner`` is the member whose values it holds
    now: the last one a layer wrote or read through ``xdata``, or the user assigned to. ``keep_hint``
    is what the error message of a read of an overwritten member tells the user to do."""

    __slots__ = ("array", "owner", "members", "keep_hint")

    def __init__(self, count, dtype, name="", keep_hint=""):
        self.array = _zeros((int(count),), dtype, name)
        self.owner = None
        self.members = []
        self.keep_hint = keep_hint

    @property
    def nbytes(self):
        return self.array.nbytes


def _later(a, b):
    """Whether group ``a`` is used only after group ``b`` (both with ``first``/``last`` layer
    indices, as net/memory_plan.py's groups; anything else is never later)."""
    first, last = getattr(a, "first", None), getattr(b, "last", None)
    return first is not None and last is not None and first > last


class _Pooled:
    """A blob's data kept in a SharedBuffer: the same interface as _Synced.

    Layers write a top either into ``xdata`` or by assigning a new array; the latter is copied into
    the buffer (unless it already is this blob's view, as when a Split or Flatten top was planned
    into its bottom's buffer), so that no blob ever keeps a view of another blob's buffer past that
    blob's lifetime. Reads through ``host_array`` (pycaffe's ``blob.data``) of a member whose values
    another member has replaced raise a NetError naming the blob instead of returning those values.
    On a GPU the device copy is the blob's own (sharing covers host memory)."""

    __slots__ = ("buffer", "view", "dev", "head", "name", "group")

    def __init__(self, buffer, blob, group=None):
        count = blob.count
        if count > buffer.array.size:
            raise ValueError(f"blob '{blob.name}' ({count} values) does not fit its shared buffer "
                             f"({buffer.array.size} values)")
        self.buffer, self.name = buffer, blob.name
        self.view = buffer.array[:count].reshape(blob.shape)
        self.dev = None
        self.head = HOST
        self.group = self if group is None else group
        buffer.members.append(blob.name)

    def claim(self):
        self.buffer.owner = self

    def _check(self):
        """Reads and writes through ``host_array`` take the buffer over, except a read of a blob
        whose values a blob later in the net's order has replaced: that one raises. (Reading or
        writing a blob whose buffer an EARLIER blob used last is how a Python layer writes its
        top, or a user sets an intermediate blob for ``forward(start=...)``.)"""
        owner = self.buffer.owner
        if owner is not None and owner.group is not self.group and _later(owner.group, self.group):
            raise NetError(f"blob '{self.name}' shares memory with blob '{owner.name}', which a later layer "
                           f"wrote (shared blob memory): {self.buffer.keep_hint.format(name=self.name)}")
        self.buffer.owner = self

    def host_array(self, write=True):
        self._check()
        if self.head == DEVICE:
            self.view[...] = backend.to_host(self.dev)
            self.head = SYNCED
        if write and self.dev is not None:
            self.head = HOST
        return self.view

    def dev_array(self):
        self.buffer.owner = self
        if not backend.is_gpu():
            if self.head == DEVICE:
                self.view[...] = backend.to_host(self.dev)
            self.head, self.dev = HOST, None
            return self.view
        if self.head == HOST or self.dev is None:
            self.dev = backend.to_device(self.view)
        self.head = DEVICE
        return self.dev

    def set(self, arr):
        self.buffer.owner = self
        if isinstance(arr, np.ndarray) or not backend.is_gpu():
            arr = backend.to_host(arr)
            if not (arr.shape == self.view.shape and arr.__array_interface__["data"][0]
                    == self.view.__array_interface__["data"][0]):
                np.copyto(self.view, arr.reshape(self.view.shape), casting="same_kind")
            self.dev, self.head = None, HOST
        else:
            self.dev, self.head = arr, DEVICE

    @property
    def shape(self):
        return self.view.shape


class _SyncedView:
    """Another blob's _Synced seen through a different shape of the same count (reshapes are views:
    the owner's arrays are C-contiguous), so reads and writes reach the owner's storage."""

    __slots__ = ("synced", "shape", "owner_shape")

    def __init__(self, synced, shape, owner_shape):
        self.synced, self.shape, self.owner_shape = synced, shape, owner_shape

    def host_array(self, *args, **kwargs):
        return self.synced.host_array(*args, **kwargs).reshape(self.shape)

    def dev_array(self, *args, **kwargs):
        return self.synced.dev_array(*args, **kwargs).reshape(self.shape)

    def set(self, arr, *args, **kwargs):
        self.synced.set(arr.reshape(self.owner_shape), *args, **kwargs)

    def claim(self):
        self.synced.claim()


class SharedBlob(Blob):
    """A blob of its own shape over another blob's data AND diff: Caffe's ShareData + ShareDiff, used
    for parameters shared with ``share_mode: PERMISSIVE`` between blobs of equal count but different
    shape. Gradients written here accumulate in the owner's diff; the solver's update of the owner is
    seen here. Its shape is fixed (it has no storage of its own to reshape)."""

    def __init__(self, owner, shape, name=""):
        shape = tuple(int(s) for s in shape)
        self.owner = owner
        self.name = name
        self.dtype = owner.dtype
        self._shape = shape
        if self.count != owner.count:
            raise ShapeError(f"blob '{name}': cannot share the {owner.count} values of '{owner.name}' "
                             f"{owner.shape} as shape {shape}")

    @property
    def _data(self):
        return _SyncedView(self.owner._data, self._shape, self.owner.shape)

    @property
    def _diff(self):
        return _SyncedView(self.owner._diff, self._shape, self.owner.shape)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        if shape != self._shape:
            raise ShapeError(f"blob '{self.name}' shares the storage of '{self.owner.name}' and cannot "
                             f"be reshaped from {self._shape} to {shape}")
