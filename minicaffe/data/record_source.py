"""What the endless database readers (:class:`~minicaffe.data.lmdb_source.LMDBSource` and
:class:`~minicaffe.data.leveldb_source.LevelDBSource`) share: the read position in the stream of
records, Caffe's rank sharding and rand_skip, peeking and saving/restoring the position.

Both readers number the stream of records 0, 1, 2, ... (continuing across the wrap at the end of the
database) and keep position ``i`` when ``i % world_size == rank``, as Caffe's ``DataLayer::Skip``. The
rules for that live here once, so the two backends cannot drift apart; a backend supplies only its
cursor (open, step, wrap, seek to a key) and how its errors read.

Both also keep one open handle per database and process (:class:`SharedHandles`): LMDB allows one
Environment per database and process, and a LevelDB's LOCK admits one handle at a time.
"""
import logging
import os
import threading

from ..errors import DataError

log = logging.getLogger("minicaffe")


class SharedHandles:
    """The open handles of a backend, one per database (by real path) shared by every reader in
    this process and counted: ``open(path)`` opens it with ``opener(path)`` on first use, and
    ``close(handle)`` lets the last user close it with ``closer(handle)``; a handle that was not
    opened here is closed at once."""

    def __init__(self, opener, closer):
        self._opener, self._closer = opener, closer
        self._entries = {}          # realpath -> [handle, users]
        self._lock = threading.Lock()

    def open(self, path):
        path = os.fspath(path)
        real = os.path.realpath(path)
        with self._lock:
            entry = self._entries.get(real)
            if entry is None:
                entry = self._entries[real] = [self._opener(path), 0]
            entry[1] += 1
            return entry[0]

    def close(self, handle):
        with self._lock:
            for real, entry in list(self._entries.items()):
                if entry[0] is handle:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._entries[real]
                        self._closer(handle)
                    return
        self._closer(handle)


class RecordSource:
    """Base of an endless reader: ``next()`` returns (key bytes, value bytes) in key order and starts
    again from the first record after the last one.

    ``rand_skip``: skip ``rng.integers(rand_skip)`` records at the start (Caffe's deprecated
    rand_skip, so workers started together do not read the same records). ``rank``/``world_size``:
    keep only stream positions ``i`` with ``i % world_size == rank``.

    ``state()``/``restore(state)`` save and set the read position (stream offset and the key under
    the cursor), so a resumed run reads on from the same record.

    A subclass implements ``_open`` (open the database, refuse an empty one), ``_positioned``,
    ``_current``/``_current_key`` (the record under the cursor), ``_first`` (a new pass from the first
    record), ``_step``, ``_seek``, ``_skip_steps``, ``_skip_to``, ``_db_error`` (the backend's exception
    class), ``_error`` (the DataError for one) and ``close``.

    Not thread-safe: one thread uses a source at a time (the prefetch thread, after set-up).
    """

    def __init__(self, path, rank=0, world_size=1, rand_skip=0, rng=None):
        self.path = os.fspath(path)
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"{self.path}: shard rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self._open()
        self.skip = 0
        if rand_skip:
            if rng is None:
                from ..core import backend
                rng = backend.rng()
            self.skip = int(rng.integers(int(rand_skip)))
            log.info("Skipping first %d data points.", self.skip)
        self.offset = 0        # stream position of the record under the cursor
        self.epochs = 0        # how many times the reader went past the last record
        self._peeked = None

    def __len__(self):
        return self.entries

    # -- the cursor --
    def _wrap(self):
        self.epochs += 1
        log.info("Restarting data prefetching from start.")
        self._first()           # each pass starts on the newest committed contents

    def _open_cursor(self):
        self._first()
        for _ in range(self._skip_steps()):
            self._step()

    # -- reading --
    def next(self):
        """The next (key, value) this worker keeps."""
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        db_error = self._db_error()
        try:
            if not self._positioned():
                self._open_cursor()
            while self.offset % self.world_size != self.rank:
                self._step()
                self.offset += 1
            item = self._current()
            self._step()
            self.offset += 1
        except db_error as exc:
            raise self._error(exc) from None
        return item

    __next__ = next

    def __iter__(self):
        return self

    def peek(self):
        """The record ``next()`` will return, without consuming it (for shape inference at set-up)."""
        if self._peeked is None:
            self._peeked = self.next()
        return self._peeked

    # -- read position (for resumed runs) --
    def state(self):
        """The read position as JSON-able data: None before the first read, else the stream offset,
        passes over the end and the key of the next record under the cursor (hex)."""
        if not self._positioned():
            return None
        if self._peeked is not None:
            raise DataError(f"{self.path}: no read position while a record is peeked")  # set-up only
        return {"offset": self.offset, "epochs": self.epochs, "key": self._current_key().hex(),
                "shard": [self.rank, self.world_size]}

    def fits(self, state):
        """Was ``state`` saved by a reader of this shard? (A position in the stream of worker 0 of 2
        means nothing to a single worker: a resume with another worker count replays instead.)"""
        return state is None or list(state.get("shard", [0, 1])) == [self.rank, self.world_size]

    def restore(self, state):
        """Go back (or forward) to a position from :meth:`state` (None: the start). A key another
        process has removed since is replaced by the next one in key order."""
        self._peeked = None
        db_error = self._db_error()
        try:
            if state is None:
                self.offset = self.epochs = 0
                self._open_cursor()
                return
            try:
                offset, epochs, key = int(state["offset"]), int(state["epochs"]), bytes.fromhex(state["key"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.path}: unreadable read position {state!r} ({exc})") from None
            self.offset, self.epochs = offset, epochs
            self._seek(key)
        except db_error as exc:
            raise self._error(exc) from None

    def skip_records(self, records):
        """From the start, pass over the first ``records`` records this worker keeps, without reading
        them (at most one pass over the keys)."""
        self._peeked = None
        records = int(records)
        offset = 0 if records <= 0 else (records - 1) * self.world_size + self.rank + 1
        self._skip_to(offset, self.skip + offset)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
