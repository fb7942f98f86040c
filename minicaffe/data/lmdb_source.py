"""Read-only LMDB access for the data layers and tools: records in key order, cycling at the end
(as Caffe's DataLayer), with Caffe's multi-GPU sharding.

Sharding: the stream of records a reader walks through is numbered 0, 1, 2, ... (continuing across
the wrap at the end of the database); the worker of rank ``r`` out of ``n`` keeps record ``i`` when
``i % n == r``, exactly as Caffe's ``DataLayer::Skip`` with ``solver_rank``/``solver_count``. So the
workers see disjoint records that together cover the database. The rank and count a data layer
uses come from :func:`set_solver_rank` (thread-local, like Caffe's per-thread ``Caffe`` singleton)
and apply at TRAIN only: at TEST every worker reads everything, as in Caffe.

LevelDB is read by :mod:`minicaffe.data.leveldb_source`; :mod:`minicaffe.data.db` picks the reader.
"""
import logging
import os
import threading

from ..errors import DataError

try:
    import lmdb
except ImportError:  # pragma: no cover - lmdb is a hard dependency
    lmdb = None

log = logging.getLogger("minicaffe")

_solver = threading.local()


def set_solver_rank(rank, count):
    """Caffe's ``Caffe::set_solver_rank``/``set_solver_count`` for the current thread: data layers
    built afterwards in this thread read only their share (``i % count == rank``) at TRAIN."""
    rank, count = int(rank), int(count)
    if count < 1 or not 0 <= rank < count:
        raise DataError(f"solver rank {rank} is not in [0, {count})")
    _solver.rank, _solver.count = rank, count


def solver_rank():
    return getattr(_solver, "rank", 0)


def solver_count():
    return getattr(_solver, "count", 1)


def _lmdb():
    if lmdb is None:  # pragma: no cover
        raise DataError("LMDB databases need the lmdb package: pip install lmdb")
    return lmdb


def _is_leveldb(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "CURRENT")) and \
        any(n.startswith("MANIFEST-") for n in os.listdir(path))


def leveldb_error(path):
    return DataError(f"{path}: is a LevelDB, not an LMDB (read it with backend: LEVELDB)")


def check_backend(path, backend=None):
    """Refuse an unknown backend name, and LEVELDB where plyvel is missing. ``backend`` is a
    DataParameter.DB value, a string, or None (= LMDB)."""
    if backend is None:
        return
    from .db import check_write_backend
    check_write_backend(path, backend)


_ENVS = {}                  # realpath -> [Environment, users]
_ENVS_LOCK = threading.Lock()


def _open_env(path):
    lm = _lmdb()
    if not os.path.exists(path):
        raise DataError(f"{path}: no such LMDB database")
    subdir = os.path.isdir(path)
    if subdir and not os.path.exists(os.path.join(path, "data.mdb")):
        if _is_leveldb(path):
            raise leveldb_error(path)
        raise DataError(f"{path}: not an LMDB database (the directory has no data.mdb)")
    try:
        return lm.open(path, readonly=True, lock=False, subdir=subdir, create=False, max_dbs=0)
    except lm.Error as exc:
        raise DataError(f"{path}: not an LMDB database ({' '.join(str(exc).split())})") from None


def open_lmdb(path):
    """Open an LMDB (a directory with data.mdb, or a single file) read-only without a lock file, so
    read-only media and several readers work; errors name the path and say what is wrong.

    LMDB allows one open Environment per database and process, so the environment is shared by all
    readers of the same path in this process (counted; call :func:`close_lmdb` once per open)."""
    path = os.fspath(path)
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(real)
        if entry is None:
            entry = _ENVS[real] = [_open_env(path), 0]
        entry[1] += 1
        return entry[0]


def close_lmdb(env):
    """Release an environment from :func:`open_lmdb`; the last user closes it."""
    with _ENVS_LOCK:
        for real, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _ENVS[real]
                    env.close()
                return
    env.close()


def count_records(path):
    env = open_lmdb(path)
    try:
        return env.stat()["entries"]
    finally:
        close_lmdb(env)


def iterate_lmdb(path):
    """Every (key, value) of an LMDB once, in key order (bytes). For tools that scan a database."""
    env = open_lmdb(path)
    try:
        with env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                yield key, value
    finally:
        close_lmdb(env)


class LMDBSource:
    """An endless reader over an LMDB: ``next()`` returns (key bytes, value bytes) in key order and
    starts again from the first record after the last one.

    ``rand_skip``: skip ``rng.integers(rand_skip)`` records at the start (Caffe's deprecated
    rand_skip, so workers started together do not read the same records). ``rank``/``world_size``:
    keep only stream positions ``i`` with ``i % world_size == rank``.

    Not thread-safe: one thread uses a source at a time (the prefetch thread, after set-up).
    """

    def __init__(self, path, rank=0, world_size=1, rand_skip=0, rng=None):
        self.path = os.fspath(path)
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"{self.path}: shard rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.env = open_lmdb(self.path)
        self.entries = self.env.stat()["entries"]
        if self.entries == 0:
            close_lmdb(self.env)
            raise DataError(f"{self.path}: the database is empty")
        self.skip = 0
        if rand_skip:
            if rng is None:
                from .. import backend
                rng = backend.rng()
            self.skip = int(rng.integers(int(rand_skip)))
            log.info("Skipping first %d data points.", self.skip)
        self.offset = 0        # stream position of the record under the cursor
        self.epochs = 0        # how many times the reader went past the last record
        self._txn = None
        self._cursor = None
        self._peeked = None

    def __len__(self):
        return self.entries

    def _open_cursor(self):
        # created lazily so the thread that reads also opens the read transaction
        self._txn = self.env.begin(buffers=False)
        self._cursor = self._txn.cursor()
        self._cursor.first()
        for _ in range(self.skip % self.entries):
            self._step()

    def _step(self):
        if not self._cursor.next():
            self._cursor.first()
            self.epochs += 1
            log.info("Restarting data prefetching from start.")

    def next(self):
        """The next (key, value) this worker keeps."""
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        if self._cursor is None:
            self._open_cursor()
        while self.offset % self.world_size != self.rank:
            self._step()
            self.offset += 1
        item = (self._cursor.key(), self._cursor.value())
        self._step()
        self.offset += 1
        return item

    __next__ = next

    def __iter__(self):
        return self

    def peek(self):
        """The record ``next()`` will return, without consuming it (for shape inference at set-up)."""
        if self._peeked is None:
            self._peeked = self.next()
        return self._peeked

    def close(self):
        if self._txn is not None:
            try:
                self._txn.abort()
            except Exception:  # noqa: BLE001 - closing must not fail
                pass
            self._txn = self._cursor = None
        if self.env is not None:
            close_lmdb(self.env)
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
