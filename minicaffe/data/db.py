"""One entry point for both database kinds Caffe reads and writes: LMDB and LevelDB.

Caffe picks the kind by name only (``data_param.backend``, default LEVELDB; the tools' ``--backend``,
default lmdb) and fails on a database of the other kind. minicaffe looks at what the path holds: where
it is the other kind than the one named, it is opened as what it is and a warning says so (prototxt
files that leave ``backend`` unset, Caffe's LEVELDB, but point at an LMDB, are common and worked in
earlier minicaffe releases, which read LMDB only).
"""
import logging
import os

from ..errors import DataError
from . import leveldb_source, lmdb_source

log = logging.getLogger("minicaffe")

LMDB, LEVELDB = "lmdb", "leveldb"
_PROTO_NAMES = {0: LEVELDB, 1: LMDB}        # caffe.proto DataParameter.DB


def backend_name(backend, where=""):
    """'lmdb' or 'leveldb' for a DataParameter.DB value or a name (any case); else a DataError."""
    if backend is None:
        return LEVELDB
    if isinstance(backend, str):
        name = backend.lower()
    else:
        name = _PROTO_NAMES.get(int(backend), str(backend))
    if name not in (LMDB, LEVELDB):
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}unknown database backend '{backend}' (use lmdb or leveldb)")
    return name


def db_kind(path):
    """'lmdb', 'leveldb' or None for what ``path`` holds."""
    path = os.fspath(path)
    if leveldb_source.is_leveldb(path):
        return LEVELDB
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb")):
        return LMDB
    if os.path.isfile(path):        # an LMDB made with subdir=False; anything else fails on opening
        return LMDB
    return None


def resolve_backend(path, backend, default_used=False):
    """The kind to open ``path`` as: what it holds where that differs from ``backend`` (logged as a
    warning), else ``backend``. ``default_used``: the backend was not set and is Caffe's default."""
    wanted = backend_name(backend, os.fspath(path))
    held = db_kind(path)
    if held is None or held == wanted:
        return wanted
    why = " (Caffe's default when backend is not set)" if default_used else ""
    log.warning("%s: backend is %s%s but the path holds a%s %s database; reading it as %s",
                os.fspath(path), wanted.upper(), why, "n" if held == LMDB else "", held.upper(), held.upper())
    return held


def open_source(path, backend=None, rank=0, world_size=1, rand_skip=0, rng=None, default_used=False):
    """An endless reader (``LMDBSource`` or ``LevelDBSource``) over the database at ``path``."""
    kind = resolve_backend(path, backend, default_used)
    if not os.path.exists(os.fspath(path)):
        unset = " (backend is not set: Caffe's default is LEVELDB)" if default_used else ""
        raise DataError(f"{os.fspath(path)}: no such {'LevelDB' if kind == LEVELDB else 'LMDB'} database{unset}")
    cls = leveldb_source.LevelDBSource if kind == LEVELDB else lmdb_source.LMDBSource
    source = cls(path, rank, world_size, rand_skip, rng)
    log.info("Opened %s %s", kind, os.fspath(path))        # Caffe's db::Open line
    return source


def iterate_db(path, backend=None):
    """Every (key, value) of the database once, in key order."""
    if resolve_backend(path, backend) == LEVELDB:
        return leveldb_source.iterate_leveldb(path)
    return lmdb_source.iterate_lmdb(path)


def count_db(path, backend=None):
    if resolve_backend(path, backend) == LEVELDB:
        return leveldb_source.count_leveldb(path)
    return lmdb_source.count_records(path)


def check_write_backend(path, backend):
    """The kind a tool is asked to write (``--backend``), refused early when unknown or when
    LevelDB is asked for and plyvel is missing."""
    name = backend_name(backend, os.fspath(path))
    if name == LEVELDB:
        leveldb_source._plyvel()
    return name


def open_writer(backend, path, **options):
    """A batched writer (put/commit/finish/abort) creating a new database at ``path``. ``options``
    are BatchedLMDBWriter's; the LevelDB writer takes ``commit_every``/``commit_bytes`` of them."""
    if backend_name(backend, os.fspath(path)) == LEVELDB:
        from .leveldb_writer import BatchedLevelDBWriter
        return BatchedLevelDBWriter(path, **options)
    from .lmdb_writer import BatchedLMDBWriter
    return BatchedLMDBWriter(path, **options)


class NewDatabase:
    """A new database built under a hidden temporary name beside ``path`` and renamed to ``path`` by
    :meth:`finish` once complete, so nothing partial ever has the final name (what Caffe's converters
    leave after a crash is a half-written database). An existing ``path`` is refused, as Caffe's
    ``db::NEW`` mode refuses it. ``put`` batches records into commits of ``commit_every``.

    A tool whose errors should name it overrides ``EXISTS`` and ``APPEARED`` (the ends of the two
    messages about a database at the final name)."""

    EXISTS = "a new database is written only under a new name"
    APPEARED = "writing; the new database is left in"

    def __init__(self, path, backend, commit_every=1000, commit_bytes=64 << 20, map_size=64 << 20):
        import shutil
        import tempfile
        self._rmtree = shutil.rmtree
        self.path = os.fspath(path)
        self.backend = check_write_backend(self.path, backend)
        if os.path.lexists(self.path):
            raise DataError(f"{self.path}: already exists; {self.EXISTS} (remove it or choose another name)")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise DataError(f"{self.path}: the directory {parent} does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".partial", dir=parent)
        try:
            self.writer = open_writer(self.backend, self.tmp, map_size=map_size, commit_every=commit_every,
                                      commit_bytes=commit_bytes)
        except BaseException:
            self._rmtree(self.tmp, ignore_errors=True)
            raise
        self.count = 0
        log.info("Opened %s %s", self.backend, self.path)

    def put(self, key, value):
        self.writer.put(key, value)
        self.count += 1

    def finish(self):
        self.writer.finish()
        if os.path.lexists(self.path):
            raise DataError(f"{self.path}: appeared while {self.APPEARED} {self.tmp}")
        os.rename(self.tmp, self.path)
        self.tmp = None

    def abort(self):
        """Drop the unfinished database (only the temporary directory this object made)."""
        self.writer.abort()
        if self.tmp is not None:
            self._rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
