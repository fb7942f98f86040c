"""Batched LevelDB writing, the twin of :class:`minicaffe.data.lmdb_writer.BatchedLMDBWriter`.

Records go to LevelDB in write batches of ``commit_every`` records (Caffe's tools commit every 1000),
or sooner once ``commit_bytes`` are pending. The database is created with Caffe's options
(db_leveldb.cpp: 64 KiB blocks, a 256 MiB write buffer, at most 100 open files; it must not exist yet).
The caller writes under a temporary name and renames the finished directory into place, as for LMDB.

plyvel's errors come out as ``OSError`` (with the path), so the tools' ``except (lmdb.Error, OSError)``
handling of write failures covers both backends.
"""
from .batched_writer import BatchedWriter
from .leveldb_source import _message, _plyvel


class BatchedLevelDBWriter(BatchedWriter):
    def __init__(self, path, commit_every=1000, commit_bytes=None, **_lmdb_options):
        pv = _plyvel()
        super().__init__(path, commit_every, commit_bytes)
        try:
            self.db = pv.DB(path, create_if_missing=True, error_if_exists=True, block_size=65536,
                            write_buffer_size=256 << 20, max_open_files=100)
        except pv.Error as exc:
            raise OSError(f"cannot create the LevelDB ({_message(exc)})") from None

    def commit(self, sync=False):
        if not self.pending and not sync:
            return
        pv = _plyvel()
        try:
            with self.db.write_batch(sync=sync) as batch:
                for key, value in self.pending:
                    batch.put(key, value)
        except pv.Error as exc:
            raise OSError(f"writing the LevelDB failed ({_message(exc)})") from None
        self.pending, self.pending_bytes = [], 0

    def finish(self):
        """Commit what is pending, flush to disk (a synced batch, so the log reaches the disk before
        the caller renames the directory into place) and close."""
        pv = _plyvel()
        self.commit(sync=True)
        try:
            self.db.close()
        except pv.Error as exc:
            raise OSError(f"closing the LevelDB failed ({_message(exc)})") from None
        self.db = None

    def abort(self):
        """Close without committing what is pending (the caller removes the database)."""
        if self.db is not None:
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                pass
            self.db = None
