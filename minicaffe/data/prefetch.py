"""Caffe's prefetching: a background thread prepares the next batches while the net computes.

Reading a record, decoding a JPEG (cv2.imdecode), resizing and the array work of the transform all
release the GIL for most of their time, so one thread overlaps the I/O and decoding with the
forward/backward pass the way Caffe's InternalThread does. The thread fills a queue of ``depth``
batches (``data_param.prefetch``, default 4); the layer takes one per forward.

The thread is a daemon and holds no reference to the layer (only to the loader callable), so a net
that is dropped can be collected; ``close()`` stops the thread. An exception in the thread is passed
through the queue and raised again in the consumer, with its message, on the next ``get()``.

On the GPU the batches go to the device from the thread as well (``DeviceUploader``): copied into
pinned host memory and uploaded on a copy stream of their own, so the upload of the next batch runs
while the current one computes, and the compute stream waits for it only where the layer hands it on.
"""
import os
import queue
import threading
import weakref

import numpy as np

from ..core import backend
from ..errors import DataError, MinicaffeError

_STOP_POLL = 0.05


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


def _run(load, q, stop):
    """The thread body (a function, not a method, so the thread keeps no Prefetcher alive)."""
    while not stop.is_set():
        try:
            item = load()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            item = _Failure(exc)
        while not stop.is_set():
            try:
                q.put(item, timeout=_STOP_POLL)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return


class Prefetcher:
    """Run ``load()`` (which returns one batch) ahead of the consumer in a daemon thread.

    ``depth`` batches are kept ready; ``depth=0`` loads synchronously in ``get()`` (no thread), which
    is handy for debugging. ``name`` (the layer) goes into wrapped error messages.
    """

    def __init__(self, load, depth=4, name="", start=True):
        self._load = load
        self.depth = int(depth)
        self.name = name
        self._queue = None
        self._stop = threading.Event()
        self._thread = None
        self._failure = None
        if start:
            self.start()

    def start(self):
        if self.depth <= 0 or self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=_run, args=(self._load, self._queue, self._stop),
                                        name=f"prefetch-{self.name}" if self.name else "prefetch", daemon=True)
        self._thread.start()
        # stop the thread when the Prefetcher is garbage collected without close()
        weakref.finalize(self, _stop_thread, self._stop, self._thread)

    def get(self):
        """The next batch; re-raises an error from the loader (once more on every later call)."""
        if self._failure is not None:
            self._raise(self._failure)
        if self.depth <= 0:
            try:
                return self._load()
            except BaseException as exc:  # noqa: BLE001
                self._failure = exc
                self._raise(exc)
        if self._thread is None:
            raise DataError(f"{self._where()}prefetcher is closed")
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise DataError(f"{self._where()}prefetch thread stopped") from None
        if isinstance(item, _Failure):
            self._failure = item.exc
            self._raise(item.exc)
        return item

    def _where(self):
        return f"layer '{self.name}': " if self.name else ""

    def _raise(self, exc):
        if isinstance(exc, (MinicaffeError, OSError, KeyboardInterrupt, MemoryError)):
            raise exc
        raise DataError(f"{self._where()}loading a batch failed: {type(exc).__name__}: {exc}") from exc

    def close(self, timeout=5.0):
        """Stop the thread and drop the prepared batches. Returns False when the thread is still
        busy after ``timeout`` seconds (then what it reads must not be closed under it)."""
        stopped = True
        if self._thread is not None:
            _stop_thread(self._stop, self._thread, timeout)
            stopped = not self._thread.is_alive()
            self._thread = None
            self._queue = None
        self._stop.set()
        return stopped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Slot:
    """One batch's place in the ring: pinned host arrays, device arrays, and the events that say when
    the copy from the pinned arrays is done (``copied``) and when the compute stream has finished
    with the device arrays (``released``); ``free``: the consumer gave it back."""

    __slots__ = ("pinned", "dev", "copied", "released", "free")

    def __init__(self):
        self.pinned = self.dev = self.copied = self.released = None
        self.free = threading.Event()
        self.free.set()


class DeviceUploader:
    """Host batches to the GPU through a ring of ``slots`` buffers, as Caffe's prefetching layers
    push each batch to the device from their thread.

    ``upload(arrays)`` (in the prefetch thread, or in a layer's forward) copies each NumPy array into
    a pinned host buffer (``cupy.cuda.alloc_pinned_memory``, viewed with ``np.frombuffer``) and from
    there to a device buffer with ``ndarray.set(..., stream=copy stream)``, a non-blocking stream
    of its own: the copy is asynchronous and overlaps the compute stream's work. It returns the
    device arrays, an event recorded after the copies, and the slot's index. The consumer makes the
    compute stream wait for the event (``ready(event)``: no host wait) before the arrays are used,
    and gives the slot back (``release(index)``) when the next batch is taken: an event recorded on
    the compute stream then marks the end of the work that read it, and the copy stream waits for
    that event before uploading into the slot again. The host waits only before overwriting a pinned
    buffer, for the copy out of it made ``slots`` batches earlier. Buffers are kept while the batch
    shapes stay the same, so a steady run allocates nothing.
    """

    def __init__(self, slots):
        cp = backend.import_cupy()
        self._cp = cp
        self._device = cp.cuda.runtime.getDevice()
        self._ring = [_Slot() for _ in range(max(2, int(slots)))]
        self._next = 0
        self._stream = None
        self.closed = False

    def upload(self, arrays):
        """(device arrays, ready event, slot index) for ``arrays`` (NumPy); waits for a free slot."""
        cp = self._cp
        index = self._next
        slot = self._ring[index]
        while not slot.free.wait(_STOP_POLL):
            if self.closed:
                raise DataError("the device uploader was closed")
        self._next = (index + 1) % len(self._ring)
        with cp.cuda.Device(self._device):
            if self._stream is None:
                self._stream = cp.cuda.Stream(non_blocking=True)
            if slot.dev is None or [a.shape for a in slot.dev] != [a.shape for a in arrays] or \
                    [a.dtype for a in slot.dev] != [a.dtype for a in arrays]:
                slot.pinned = [_pinned(cp, a.shape, a.dtype) for a in arrays]
                slot.dev = [cp.empty(a.shape, a.dtype) for a in arrays]
                slot.copied = slot.released = None
            if slot.copied is not None:
                slot.copied.synchronize()       # the last copy out of these pinned buffers is done
            if slot.released is not None:
                self._stream.wait_event(slot.released)      # the compute stream is done with them
            for src, pin, dev in zip(arrays, slot.pinned, slot.dev):
                np.copyto(pin, src, casting="no")
                dev.set(pin, stream=self._stream)
            slot.copied = self._stream.record()
        slot.free.clear()
        return slot.dev, slot.copied, index

    def ready(self, event):
        """Make the current (compute) stream wait for an upload: a wait on the device, not the host."""
        self._cp.cuda.get_current_stream().wait_event(event)

    def release(self, index):
        """The consumer is done with slot ``index``: the work queued on the compute stream so far is
        the last to read it."""
        slot = self._ring[index]
        slot.released = self._cp.cuda.get_current_stream().record()
        slot.free.set()

    def close(self):
        self.closed = True


def _pinned(cp, shape, dtype):
    """A NumPy array over pinned (page-locked) host memory, which the GPU copies from asynchronously."""
    dtype = np.dtype(dtype)
    count = 1
    for d in shape:
        count *= int(d)
    mem = cp.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    return np.frombuffer(mem, dtype, count).reshape(shape)


def _stop_thread(stop, thread, timeout=5.0):
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout)


_POOL = {"executor": None}
_POOL_LOCK = threading.Lock()


def decode_workers():
    """Threads used to decode images of one batch in parallel (cv2.imdecode/imread release the GIL)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def parallel_map(fn, items):
    """``list(map(fn, items))``, spread over a shared pool of decode threads when that can help.
    Order is kept, so results do not depend on scheduling; the first exception is raised."""
    items = list(items)
    if len(items) < 2 or decode_workers() == 1:
        return [fn(x) for x in items]
    with _POOL_LOCK:
        if _POOL["executor"] is None:
            from concurrent.futures import ThreadPoolExecutor
            _POOL["executor"] = ThreadPoolExecutor(decode_workers(), thread_name_prefix="decode")
        pool = _POOL["executor"]
    return list(pool.map(fn, items))
