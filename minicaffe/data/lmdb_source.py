"""Read-only LMDB access for the data layers and tools: records in key order, cycling at the end
(as Caffe's DataLayer), with Caffe's multi-GPU sharding.

Sharding: the stream of records a reader walks through is numbered 0, 1, 2, ... (continuing across
the wrap at the end of the database); the worker of rank ``r`` out of ``n`` keeps record ``i`` when
``i % n == r``, exactly as Caffe's ``DataLayer::Skip`` with ``solver_rank``/``solver_count``. So the
workers see disjoint records that together cover the database. The rank and count a data layer
uses come from :func:`set_solver_rank` (kept in the process's context, ``minicaffe.core.context``,
as Caffe keeps them in its ``Caffe`` singleton) and apply at TRAIN only: at TEST every worker reads
everything, as in Caffe.

LevelDB is read by :mod:`minicaffe.data.leveldb_source`; :mod:`minicaffe.data.db` picks the reader.

Another process may write a database while a run reads it. Readers therefore use LMDB's lock file (as
Caffe does): a registered read transaction keeps its pages from being reused by a writer, which
otherwise hands the reader recycled pages and liblmdb aborts the whole process. Only where the lock
file cannot be used (read-only media, no permission) is the database read without it, and the log
says so. A reader renews its transaction every ``RENEW_EVERY`` records and at each pass over the end,
so it sees a consistent snapshot between renewals and never pins old pages (which would make a
writer's database grow without bound); after a renewal it goes on from the next key.
"""
import logging
import os

from ..core import context as _context
from ..errors import DataError
from .record_source import RecordSource, SharedHandles

try:
    import lmdb
except ImportError:  # pragma: no cover - lmdb is a hard dependency
    lmdb = None

log = logging.getLogger("minicaffe")

# Caffe's solver rank and count live in the process's context; these names stay importable from here
# (and from minicaffe.data) for the data layers' users
set_solver_rank, solver_rank, solver_count = _context.set_solver_rank, _context.solver_rank, _context.solver_count


def _lmdb():
    if lmdb is None:  # pragma: no cover
        from ..deps import require
        return require("lmdb", "reading LMDB databases", DataError)
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
        env = lm.open(path, readonly=True, lock=True, subdir=subdir, create=False, max_dbs=0)
    except lm.Error as exc:
        first = " ".join(str(exc).split())
        try:   # Caffe's ALLOW_LMDB_NOLOCK: the lock file cannot be created or written here
            env = lm.open(path, readonly=True, lock=False, subdir=subdir, create=False, max_dbs=0)
        except lm.Error as exc2:
            raise DataError(f"{path}: not an LMDB database ({' '.join(str(exc2).split())})") from None
        log.warning("%s: cannot use the LMDB lock file (%s); reading without a lock, so no other process "
                    "may write this database during the run", path, first)
        return env
    lock_file = os.path.join(path, "lock.mdb") if subdir else path + "-lock"
    if not os.path.exists(lock_file):   # read-only media: liblmdb went on without a lock by itself
        log.warning("%s: no LMDB lock file and none can be made (read-only media?); reading without a lock, "
                    "so no other process may write this database during the run", path)
        return env
    try:
        env.reader_check()     # free reader slots of killed processes, which would pin old pages
    except lm.Error:  # pragma: no cover - advisory only
        pass
    return env


_ENVS = SharedHandles(lambda path: _open_env(path), lambda env: env.close())   # looked up per call


def open_lmdb(path):
    """Open an LMDB (a directory with data.mdb, or a single file) read-only, with its lock file so a
    writing process cannot recycle pages under the reader (without it where the lock file is unusable,
    e.g. read-only media); errors name the path and say what is wrong.

    LMDB allows one open Environment per database and process, so the environment is shared by all
    readers of the same path in this process (counted; call :func:`close_lmdb` once per open)."""
    return _ENVS.open(path)


def close_lmdb(env):
    """Release an environment from :func:`open_lmdb`; the last user closes it."""
    _ENVS.close(env)


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


RENEW_EVERY = 1000          # records read under one read transaction before it is renewed


class LMDBSource(RecordSource):
    """An endless reader over an LMDB (see :class:`~minicaffe.data.record_source.RecordSource` for
    the read position, sharding and rand_skip): ``next()`` returns (key bytes, value bytes) in key
    order and starts again from the first record after the last one.

    The read transaction is renewed every ``RENEW_EVERY`` records and at each pass over the end.
    Not thread-safe: one thread uses a source at a time (the prefetch thread, after set-up).
    """

    def __init__(self, path, rank=0, world_size=1, rand_skip=0, rng=None):
        super().__init__(path, rank, world_size, rand_skip, rng)
        self._txn = None
        self._cursor = None
        self._since_renew = 0
        self._txnid = None
        self._told_changed = False

    def _open(self):
        self.env = open_lmdb(self.path)
        self.entries = self.env.stat()["entries"]
        if self.entries == 0:
            close_lmdb(self.env)
            raise DataError(f"{self.path}: the database is empty")

    def _db_error(self):
        return _lmdb().Error

    def _error(self, exc):
        return DataError(f"{self.path}: reading the database failed ({' '.join(str(exc).split())}); "
                         f"was it changed or damaged by another process?")

    def _begin(self):
        """A fresh read transaction and cursor (the old one, if any, is released first)."""
        lm = _lmdb()
        if self._txn is not None:
            self._txn.abort()
            self._txn = self._cursor = None
        try:
            txn = self.env.begin(buffers=False)
        except lm.MapResizedError:   # a writer grew the map beyond ours: adopt its size
            self.env.set_mapsize(0)
            txn = self.env.begin(buffers=False)
        self._txn, self._cursor = txn, txn.cursor()
        self._since_renew = 0
        txnid = self.env.info()["last_txnid"]
        if self._txnid is not None and txnid != self._txnid and not self._told_changed:
            self._told_changed = True
            log.warning("%s was changed by another process during the run; reading on from the current "
                        "record in the new contents", self.path)
        self._txnid = txnid
        self.entries = txn.stat()["entries"]
        if self.entries == 0:
            raise DataError(f"{self.path}: the database became empty during the run "
                            f"(another process removed its records)")

    def _positioned(self):
        return self._cursor is not None

    def _current(self):
        return (self._cursor.key(), self._cursor.value())

    def _current_key(self):
        return self._cursor.key()

    def _first(self):
        self._begin()
        self._cursor.first()

    def _skip_steps(self):
        """rand_skip modulo the record count: LMDB knows its count, so whole passes are not walked."""
        return self.skip % self.entries

    def _step(self):
        if not self._cursor.next():
            self._wrap()
            return
        self._since_renew += 1
        if self._since_renew >= RENEW_EVERY:
            self._seek(self._cursor.key())

    def _seek(self, key):
        """Renew the transaction and put the cursor on ``key`` or, if it is gone, the next key."""
        self._begin()
        if not self._cursor.set_range(key):
            self._wrap()

    def _skip_to(self, offset, stream):
        """The cursor walks the keys only (LMDB has no seek by index), at most one pass."""
        lm = _lmdb()
        try:
            self._begin()
            self.offset, self.epochs = offset, stream // self.entries
            self._cursor.first()
            for _ in range(stream % self.entries):
                self._cursor.next()
        except lm.Error as exc:
            raise self._error(exc) from None

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
