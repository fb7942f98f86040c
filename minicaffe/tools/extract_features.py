"""Caffe's extract_features: run a trained net in TEST phase and store blobs as Datum features in LMDBs
or LevelDBs.

    extract_features WEIGHTS MODEL BLOB[,BLOB...] DB[,DB...] NUM_BATCHES lmdb|leveldb [CPU|GPU [DEVICE]] [--gpu N]

Every forward pass (the net's own data layer supplies the images) adds one Datum per image and
blob to that blob's database, keyed ``%010d`` from 0 in extraction order, exactly as Caffe writes
them: ``float_data`` holds the image's values and channels/height/width are the blob's legacy
shape (an N×D blob gives D×1×1). Each database is built under a hidden temporary name beside its
target and renamed once complete, so an interrupted run leaves no half-written database; an
existing database is never overwritten. LevelDB needs plyvel (the ``leveldb`` extra).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..core import backend
from ..formats.datum import array_to_datum
from ..data.db import NewDatabase, check_write_backend
from ..errors import DataError, MinicaffeError, NetError, did_you_mean
from .argparsing import ArgumentParser
from .common import ProgressBar, get_logger, run_main

if TYPE_CHECKING:
    from ..net.network import Net

COMMIT_EVERY = 1000                 # records per transaction, as Caffe
_COMMIT_BYTES = 64 << 20            # ... or fewer when records are large
_INITIAL_MAP_SIZE = 64 << 20        # grows by doubling; LMDB needs a map size up front


def legacy_shape(shape):
    """Caffe's num/channels/height/width of a blob shape (missing axes count as 1; at most 4 axes)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > 4:
        raise ValueError(f"{len(shape)} axes")
    return shape + (1,) * (4 - len(shape))


_SPLIT_BLOB = re.compile(r"_split_\d+$")


def feature_datums(blob_data):
    """One serialized Datum per image of a blob's N×... array, shaped as Caffe's extract_features."""
    arr = np.asarray(blob_data, dtype=np.float32)
    num, c, h, w = legacy_shape(arr.shape)
    per_image = arr.reshape(num, c, h, w)
    return [array_to_datum(per_image[n]).SerializeToString() for n in range(num)]


class LmdbBuilder(NewDatabase):
    """Writes a new LMDB (or LevelDB) under a temporary name next to ``path``; ``finish()`` renames it
    into place. :class:`~minicaffe.data.db.NewDatabase` with extract_features' batch sizes and its
    name in the messages."""

    EXISTS = "extract_features writes new databases only"
    APPEARED = "extracting; the features are left in"

    def __init__(self, path, db_type="lmdb"):
        super().__init__(path, db_type, commit_every=COMMIT_EVERY, commit_bytes=_COMMIT_BYTES,
                         map_size=_INITIAL_MAP_SIZE)


def extract_features(net: Net, blob_names: Sequence[str], db_paths: Sequence[str], num_batches: int,
                     log: logging.Logger | None = None, progress: bool = False,
                     db_type: str = "lmdb") -> list[int]:
    """Run ``net`` forward ``num_batches`` times; store each blob's per-image features in its database
    (``db_type`` lmdb or leveldb).

    Returns the number of records written to each database.
    """
    if len(blob_names) != len(db_paths):
        raise DataError(f"{len(blob_names)} feature blob name(s) but {len(db_paths)} dataset name(s); "
                        "the numbers must be equal")
    if len(set(os.path.abspath(p) for p in db_paths)) != len(db_paths):
        raise DataError(f"the dataset names must differ: {', '.join(db_paths)}")
    end = -1
    for name in blob_names:
        if name not in net.blobs:
            # the blobs the net's inserted Split layers write (``x_layer_0_split_1``) are not choices
            # a user would make, and they bury the real ones
            shown = [b for b in net.blobs if not _SPLIT_BLOB.search(b)]
            raise NetError(f"unknown feature blob name '{name}' in the network{did_you_mean(name, shown)} "
                           f"(blobs: {', '.join(shown)})")
        if len(net.blobs[name].shape) > 4:
            raise NetError(f"feature blob '{name}' has shape {net.blobs[name].shape}; a Datum holds at most "
                           "N×C×H×W")
        # the last layer that writes the blob (in-place layers such as ReLU included), as after a full pass
        end = max(end, max(i for i, lname in enumerate(net.layer_names) if name in net.top_names[lname]))
    builders = []
    try:
        for path in db_paths:
            if log:
                log.info("Opening dataset %s", path)
            builders.append(LmdbBuilder(path, db_type))
        if log:
            log.info("Extracting Features")
        bar = ProgressBar(num_batches, unit="batch", enabled=None if progress else False)
        for _ in range(num_batches):
            net.forward_from_to(0, end)
            for name, builder in zip(blob_names, builders):
                for value in feature_datums(net.blobs[name].host_data):
                    builder.put(b"%010d" % builder.count, value)
                    if log and builder.count % COMMIT_EVERY == 0:
                        log.info("Extracted features of %d query images for feature blob %s", builder.count, name)
            bar.update()
        bar.close()
        for name, builder in zip(blob_names, builders):
            builder.finish()
            if log:
                log.info("Extracted features of %d query images for feature blob %s", builder.count, name)
        return [b.count for b in builders]
    except BaseException:
        for builder in builders:
            builder.abort()
        raise


def _parse_args(argv):
    parser = ArgumentParser(
        prog="extract_features",
        description="Extract features of the input data produced by a trained net (TEST phase) into "
                    "LMDBs or LevelDBs of Datums, one database per blob. Several blobs are extracted in one pass by "
                    "giving comma-separated blob and dataset names.",
        epilog="Caffe's trailing 'GPU [DEVICE_ID]' (or 'CPU') is accepted as well as --gpu.")
    parser.add_argument("weights", metavar="WEIGHTS", help="pretrained .caffemodel (or .h5)")
    parser.add_argument("model", metavar="MODEL", help="net prototxt with a data layer")
    parser.add_argument("blobs", metavar="BLOB[,BLOB...]")
    parser.add_argument("dbs", metavar="DB[,DB...]")
    parser.add_argument("num_batches", metavar="NUM_BATCHES")
    parser.add_argument("db_type", metavar="DB_TYPE", help="lmdb or leveldb")
    parser.add_argument("device", nargs="*", metavar="CPU|GPU [DEVICE_ID]")
    parser.add_argument("--gpu", type=int, default=None, metavar="N", help="run on GPU N")
    args = parser.parse_args(argv)
    gpu = args.gpu
    extra = list(args.device)
    if extra:
        mode = extra.pop(0).upper()
        if mode == "GPU":
            gpu = 0
            if extra:
                try:
                    gpu = int(extra.pop(0))
                except ValueError:
                    raise DataError(f"device id must be an integer, got {args.device[1]!r}") from None
        elif mode != "CPU":
            raise DataError(f"expected CPU or GPU after DB_TYPE, got {args.device[0]!r}")
        if extra:
            raise DataError(f"unexpected arguments: {' '.join(extra)}")
    if gpu is not None and gpu < 0:
        raise DataError(f"device id must be >= 0, got {gpu}")
    try:
        args.num_batches = int(args.num_batches)
    except ValueError:
        raise DataError(f"NUM_BATCHES must be an integer, got {args.num_batches!r}") from None
    if args.num_batches < 1:
        raise DataError(f"NUM_BATCHES must be at least 1, got {args.num_batches}")
    if args.db_type.lower() not in ("lmdb", "leveldb"):
        raise DataError(f"db_type '{args.db_type}' is not supported; use lmdb or leveldb")
    args.db_type = check_write_backend(args.dbs, args.db_type)
    args.gpu = gpu
    return args


@run_main
def main(argv=None):
    args = _parse_args(argv)
    log = get_logger()
    blob_names = args.blobs.split(",")
    db_paths = args.dbs.split(",")
    if len(blob_names) != len(db_paths):
        raise DataError(f"{len(blob_names)} feature blob name(s) but {len(db_paths)} dataset name(s); "
                        "the numbers must be equal")
    for path in db_paths:
        if os.path.lexists(path):
            raise DataError(f"{path}: already exists; extract_features writes new databases only")
    if args.gpu is not None:
        log.info("Using GPU, device_id=%d", args.gpu)
        backend.set_device(args.gpu)
        backend.set_mode_gpu()
    else:
        log.info("Using CPU")
        backend.set_mode_cpu()
    from ..net.network import TEST, Net
    net = Net(args.model, args.weights, TEST)
    try:
        extract_features(net, blob_names, db_paths, args.num_batches, log=log, progress=True,
                         db_type=args.db_type)
    except NetError as exc:
        raise MinicaffeError(f"{args.model}: {exc}") from None
    log.info("Successfully extracted the features!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
