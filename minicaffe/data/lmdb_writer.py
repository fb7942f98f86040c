"""Batched LMDB writing for the tools that build databases (convert_imageset, extract_features).

Records are committed in transactions of ``commit_every`` records, as Caffe's tools commit every
1000, or sooner once ``commit_bytes`` are pending so that large records do not pile up in memory.
The map starts small and doubles whenever a transaction finds it full: LMDB aborts that
transaction, so it is simply redone in the larger map and no record is lost or written twice.
"""
import lmdb

from .batched_writer import BatchedWriter


class BatchedLMDBWriter(BatchedWriter):
    def __init__(self, path, map_size=1 << 28, commit_every=1000, commit_bytes=None, **lmdb_options):
        super().__init__(path, commit_every, commit_bytes)
        self.env = lmdb.open(path, map_size=map_size, subdir=True, meminit=False, **lmdb_options)

    def commit(self):
        if not self.pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.cursor().putmulti(self.pending, dupdata=False, overwrite=True)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self.pending, self.pending_bytes = [], 0

    def finish(self):
        """Commit what is pending, flush to disk and close."""
        self.commit()
        self.env.sync(True)
        self.env.close()
        self.env = None

    def abort(self):
        """Close without committing what is pending (the caller removes the database)."""
        if self.env is not None:
            try:
                self.env.close()
            except lmdb.Error:
                pass
            self.env = None
