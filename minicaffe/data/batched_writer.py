"""The batching both database writers share (:class:`~minicaffe.data.lmdb_writer.BatchedLMDBWriter`,
:class:`~minicaffe.data.leveldb_writer.BatchedLevelDBWriter`): records are held back and written in
one transaction or write batch every ``commit_every`` records, as Caffe's tools commit every 1000, or
sooner once ``commit_bytes`` of keys and values are pending so that large records do not pile up in
memory. The rule lives here once so the two backends commit at the same points.
"""


class BatchedWriter:
    """Collects ``put`` records in ``pending`` and calls the subclass's ``commit()`` (which writes
    them and empties ``pending``) whenever a batch is full."""

    def __init__(self, path, commit_every=1000, commit_bytes=None):
        self.path = path
        self.commit_every, self.commit_bytes = commit_every, commit_bytes
        self.pending, self.pending_bytes = [], 0

    def put(self, key, value):
        self.pending.append((key, value))
        self.pending_bytes += len(key) + len(value)
        if len(self.pending) >= self.commit_every or \
                (self.commit_bytes is not None and self.pending_bytes >= self.commit_bytes):
            self.commit()

    def commit(self):  # pragma: no cover - every writer has its own
        raise NotImplementedError
