"""Read-only LevelDB access, the twin of :mod:`minicaffe.data.lmdb_source`: Caffe's default
``data_param.backend`` and the format of many older data sets (the MNIST/CIFAR examples of 2014-15).

LevelDB goes through plyvel (``pip install minicaffe[leveldb]``), which ships its own libleveldb with
snappy, the compression Caffe's LevelDB uses. The reader has the interface of ``LMDBSource``
(``next``/``peek``/``close``, ``state``/``fits``/``restore``/``skip_records``), the same key order, wrap
at the end and the same rank sharding (stream position ``i`` kept when ``i % world_size == rank``), so
the Data layer and its prefetch thread use either source alike.

A LevelDB directory holds a ``LOCK`` that one process at a time may take, so, as with LMDB, one
handle per database is shared by every reader in this process (counted). A read iterator works on the
snapshot taken when it was created; the reader makes a new one at each pass over the end so a long
run sees records another tool added meanwhile (a LevelDB cannot be opened by a second process while
one has it open, so this only matters within one process).
"""
import logging
import os

from ..errors import DataError
from .record_source import RecordSource, SharedHandles

log = logging.getLogger("minicaffe")

try:
    import plyvel
except ImportError:  # the 'leveldb' extra is optional
    plyvel = None


def _plyvel():
    if plyvel is None:
        from ..deps import require
        return require("plyvel", "a LevelDB database", DataError)
    return plyvel


def is_leveldb(path):
    """A LevelDB directory: ``CURRENT`` and a ``MANIFEST-*`` file."""
    path = os.fspath(path)
    try:
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, "CURRENT")) and \
            any(n.startswith("MANIFEST-") for n in os.listdir(path))
    except OSError:
        return False


def _message(exc):
    """plyvel's message text (it carries LevelDB's status as bytes)."""
    arg = exc.args[0] if len(exc.args) == 1 else exc
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    return " ".join(text.split())


def _open_db(path):
    pv = _plyvel()
    if not os.path.exists(path):
        raise DataError(f"{path}: no such LevelDB database")
    if not is_leveldb(path):
        raise DataError(f"{path}: not a LevelDB database (a LevelDB is a directory with CURRENT and "
                        f"MANIFEST-* files)")
    try:
        # Caffe's reading options (db_leveldb.cpp): 64 KiB blocks, at most 100 open files
        return pv.DB(path, create_if_missing=False, block_size=65536, max_open_files=100)
    except pv.IOError as exc:
        msg = _message(exc)
        if "lock" in msg.lower():
            return _open_snapshot(path, msg)
        raise DataError(f"{path}: cannot open the LevelDB ({msg})") from None
    except pv.Error as exc:
        raise DataError(f"{path}: not a readable LevelDB database ({_message(exc)})") from None


_SNAPSHOTS = {}             # id(plyvel.DB) -> the temporary directory it reads


def _open_snapshot(path, why):
    """Open a LevelDB another process holds (LevelDB admits one process per database, and has no
    read-only mode: several ``mpirun`` workers reading one training set would fail otherwise).
    The table files, which LevelDB never changes once written, are hard-linked (copied where links
    are impossible) into a temporary directory with copies of the small manifest and log files,
    and that snapshot is opened; it is removed when the reader closes."""
    import shutil
    import tempfile
    pv = _plyvel()
    parent = os.path.dirname(os.path.abspath(path))
    for attempt in range(3):    # the holder may compact (delete tables) while the snapshot is made
        try:
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".snapshot",
                                   dir=parent if os.access(parent, os.W_OK) else None)
        except OSError as exc:
            raise DataError(f"{path}: the LevelDB is in use by another process ({why}) and no snapshot "
                            f"of it can be made ({exc.strerror or exc})") from None
        try:
            for name in os.listdir(path):
                if name == "LOCK" or name.startswith("LOG"):
                    continue
                src, dst = os.path.join(path, name), os.path.join(tmp, name)
                if name.endswith((".ldb", ".sst")):
                    try:
                        os.link(src, dst)
                        continue
                    except OSError:
                        pass
                shutil.copyfile(src, dst)
            db = pv.DB(tmp, create_if_missing=False, block_size=65536, max_open_files=100)
        except (OSError, pv.Error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if attempt == 2:
                raise DataError(f"{path}: the LevelDB is in use by another process ({why}) and a "
                                f"snapshot of it could not be opened ({_message(exc)})") from None
            continue
        log.warning("%s: the LevelDB is in use by another process; reading a snapshot of it", path)
        _SNAPSHOTS[id(db)] = tmp
        return db


def _close(db):
    db.close()
    tmp = _SNAPSHOTS.pop(id(db), None)
    if tmp is not None:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


_DBS = SharedHandles(lambda path: _open_db(path), lambda db: _close(db))   # looked up per call


def open_leveldb(path):
    """Open a LevelDB for reading, shared by every reader of the same path in this process (call
    :func:`close_leveldb` once per open). Errors name the path and say what is wrong."""
    return _DBS.open(path)


def close_leveldb(db):
    """Release a handle from :func:`open_leveldb`; the last user closes it (and frees the LOCK)."""
    _DBS.close(db)


def _read_error(path, exc):
    return DataError(f"{path}: reading the LevelDB failed ({_message(exc)}); is it damaged?")


def iterate_leveldb(path):
    """Every (key, value) of a LevelDB once, in key order (bytes). For tools that scan a database."""
    pv = _plyvel()
    db = open_leveldb(path)
    try:
        try:
            for key, value in db.iterator():
                yield key, value
        except pv.Error as exc:
            raise _read_error(path, exc) from None
    finally:
        close_leveldb(db)


def count_leveldb(path):
    """The number of records (LevelDB keeps no count: the keys are walked once)."""
    pv = _plyvel()
    db = open_leveldb(path)
    try:
        return sum(1 for _ in db.iterator(include_value=False))
    except pv.Error as exc:
        raise _read_error(path, exc) from None
    finally:
        close_leveldb(db)


class LevelDBSource(RecordSource):
    """An endless reader over a LevelDB, with the interface and semantics of ``LMDBSource`` (both are
    :class:`~minicaffe.data.record_source.RecordSource`): ``next()`` returns (key bytes, value bytes)
    in key order and starts again from the first record after the last one; ``rand_skip`` skips
    ``rng.integers(rand_skip)`` records at the start; ``rank``/``world_size`` keep only stream
    positions ``i`` with ``i % world_size == rank``.

    Not thread-safe: one thread uses a source at a time (the prefetch thread, after set-up).
    """

    def __init__(self, path, rank=0, world_size=1, rand_skip=0, rng=None):
        super().__init__(path, rank, world_size, rand_skip, rng)
        self._entries = None
        self._it = None
        self._cur = None       # (key, value) under the cursor

    def _open(self):
        self.db = open_leveldb(self.path)
        try:
            first = next(self.db.iterator(include_value=False), None)
        except _plyvel().Error as exc:
            close_leveldb(self.db)
            raise _read_error(self.path, exc) from None
        if first is None:
            close_leveldb(self.db)
            self.db = None
            raise DataError(f"{self.path}: the database is empty")

    def _db_error(self):
        return _plyvel().Error

    def _error(self, exc):
        return _read_error(self.path, exc)

    @property
    def entries(self):
        """Number of records (counted once, on first use: LevelDB has no record count)."""
        if self._entries is None:
            self._entries = sum(1 for _ in self.db.iterator(include_value=False))
        return self._entries

    # -- the cursor: an iterator plus the record it is on --
    def _start_at(self, key=None):
        """Put the cursor on ``key`` (or the next key after it, if gone), or on the first record."""
        self._it = self.db.iterator() if key is None else self.db.iterator(start=key)
        self._cur = next(self._it, None)
        if self._cur is None:
            if key is None:
                raise DataError(f"{self.path}: the database became empty during the run")
            self._wrap()

    def _positioned(self):
        return self._cur is not None

    def _current(self):
        return self._cur

    def _current_key(self):
        return self._cur[0]

    def _first(self):
        self._start_at(None)     # a new iterator: each pass reads the newest contents

    def _skip_steps(self):
        """All of rand_skip, each pass over the end counted (a record count would cost a walk)."""
        return self.skip

    def _step(self):
        self._cur = next(self._it, None)
        if self._cur is None:
            self._wrap()

    def _seek(self, key):
        self._start_at(key)

    def _skip_to(self, offset, stream):
        self.offset, self.epochs = offset, 0
        self._start_at(None)
        self.epochs = stream // self.entries
        for _ in range(stream % self.entries):
            self._cur = next(self._it, None)

    def close(self):
        self._it = self._cur = self._peeked = None
        if self.db is not None:
            close_leveldb(self.db)
            self.db = None
