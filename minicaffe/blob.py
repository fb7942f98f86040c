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
import numpy as np

from . import backend

HOST, DEVICE, SYNCED = "host", "device", "both"


class _Synced:
    """One array that may live on the host, the device, or both; copies only when the other side reads."""

    __slots__ = ("host", "dev", "head")

    def __init__(self, shape, dtype):
        self.host = np.zeros(shape, dtype=dtype)
        self.dev = None
        self.head = HOST  # where the newest values are; "both" when in sync

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
            self.host = np.asarray(backend.to_host(arr), dtype=self.host.dtype)
            self.dev, self.head = None, HOST
        else:
            self.dev, self.head = arr, DEVICE

    @property
    def shape(self):
        return (self.dev if self.head == DEVICE else self.host).shape


def _read_only(arr):
    view = arr.view()
    view.flags.writeable = False
    return view


class Blob:
    """Caffe's Blob: ``data`` and ``diff`` of one shape."""

    def __init__(self, shape=(), name=""):
        self.name = name
        self.dtype = backend.dtype()
        self._shape = tuple(int(s) for s in shape)
        self._data = _Synced(self._shape, self.dtype)
        self._diff = _Synced(self._shape, self.dtype)

    # --- shape -----------------------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    def reshape(self, *shape):
        """Change the shape; storage is kept when the shape is unchanged (so buffers are reused)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            from .errors import ShapeError
            raise ShapeError(f"blob '{self.name}': negative dimension in shape {shape}")
        if shape != self._shape:
            self._shape = shape
            self._data = _Synced(shape, self.dtype)
            self._diff = _Synced(shape, self.dtype)

    def reshape_like(self, other):
        self.reshape(other.shape)

    @property
    def count(self):
        return int(np.prod(self._shape, dtype=np.int64))

    def count_from(self, axis):
        return int(np.prod(self._shape[axis:], dtype=np.int64))

    def _legacy(self, i):
        # Caffe's num/channels/height/width: the first four axes, 1 where missing
        return self._shape[i] if len(self._shape) > i else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    # --- user-facing (NumPy) -----------------------------------------------------------------
    @property
    def data(self):
        return self._data.host_array()

    @data.setter
    def data(self, value):
        self._assign(self._data, value)

    @property
    def diff(self):
        return self._diff.host_array()

    @diff.setter
    def diff(self, value):
        self._assign(self._diff, value)

    @property
    def host_data(self):
        """``data`` for reading on the host (engine code): synced, device copy kept valid, read-only."""
        return _read_only(self._data.host_array(write=False))

    @property
    def host_diff(self):
        """``diff`` for reading on the host: see ``host_data``."""
        return _read_only(self._diff.host_array(write=False))

    def host_is_current(self):
        """Whether ``host_data`` needs no copy from the device (engine code that can check on
        the host for free, e.g. label ranges)."""
        return self._data.head != DEVICE

    def _assign(self, synced, value):
        arr = synced.host_array()
        arr[...] = backend.to_host(value) if not np.isscalar(value) else value

    # --- layer-facing (current array module) ---------------------------------------------------
    @property
    def xdata(self):
        return self._data.dev_array()

    @xdata.setter
    def xdata(self, arr):
        self._set_x(self._data, arr)

    @property
    def xdiff(self):
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

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self._shape})"
