"""compute_image_mean: the mean image of an LMDB (or LevelDB) of Datums, as a BlobProto (1×C×H×W) for ``mean_file``.

    compute_image_mean [--backend lmdb|leveldb] [--pca] [--pca_file PATH] INPUT_DB [OUTPUT_FILE]

Streams over the records once, summing in float64 (encoded records are decoded as stored, as
Caffe's DecodeDatumNative), writes the mean atomically and prints Caffe's per-channel lines
``mean_value channel [c]: v`` (the numbers to put in ``mean_value`` instead of a mean file).

``--pca`` (minicaffe extension) also accumulates the 3×3 covariance of pixel colours over every
pixel of every image (channel order of the data, i.e. BGR; 0–255 scale) and writes its eigenvalues
(blob 0, shape (3,), largest first) and eigenvectors (blob 1, 3×3, one per column) as a
BlobProtoVector: ``<OUTPUT_FILE stem>_pca.binaryproto`` beside the mean, or ``--pca_file PATH``.
That file is what ``transform_param { color_shift { pca_file } }`` reads.
"""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from ..formats.datum import datum_to_array, parse_datum, record_where
from ..data.db import count_db, iterate_db, resolve_backend
from ..data.lmdb_source import check_backend
from ..errors import DataError
from ..fileio import atomic_write
from ..proto import caffe_pb2
from .common import ProgressBar, get_logger, run_main
from .gflags import parse_command

USAGE = """Compute the mean_image of a set of images given by a lmdb
Usage:
    compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]
"""

FLAGS = {
    "backend": (str, "lmdb", "The backend {leveldb, lmdb} containing the images"),
    "pca": (bool, False, "Also write the eigenvalues/eigenvectors of the pixel colour covariance"),
    "pca_file": (str, "", "Where --pca writes (default: <OUTPUT_FILE stem>_pca.binaryproto)"),
}

LOG_EVERY = 10000


def default_pca_path(output_file):
    stem, _ = os.path.splitext(output_file)
    return f"{stem}_pca.binaryproto"


class _ColorStats:
    """Streaming first and second moments of pixel colours (float64, shifted for accuracy)."""

    def __init__(self, channels):
        self.c = channels
        self.shift = None
        self.s1 = np.zeros(channels)
        self.s2 = np.zeros((channels, channels))
        self.n = 0

    def add(self, arr):
        x = arr.reshape(self.c, -1).astype(np.float64)
        if self.shift is None:   # centre on the first image's colour so the sums stay small
            self.shift = x.mean(axis=1)
        x -= self.shift[:, None]
        self.s1 += x.sum(axis=1)
        self.s2 += x @ x.T
        self.n += x.shape[1]

    def covariance(self):
        m = self.s1 / self.n
        return self.s2 / self.n - np.outer(m, m)


def compute_image_mean(input_db: str | os.PathLike, output_file: str | os.PathLike | None = None,
                       backend: str = "lmdb", pca: bool = False, pca_file: str | os.PathLike | None = None,
                       logger: logging.Logger | None = None) -> dict[str, np.ndarray]:
    """Mean of the records of ``input_db`` (C×H×W float64); with ``pca`` also (eigenvalues,
    eigenvectors, covariance) of the pixel colours. Writes the files named (atomically)."""
    log = logger or get_logger()
    input_db = os.fspath(input_db)
    check_backend(input_db, backend)
    backend = resolve_backend(input_db, backend)     # the other kind of database is read, with a warning
    if pca and not (output_file or pca_file):
        raise DataError("--pca needs OUTPUT_FILE or --pca_file to know where to write")
    total = count_db(input_db, backend)
    if total == 0:
        raise DataError(f"{input_db}: the database is empty")
    acc = None
    stats = None
    shape = first_key = None
    count = 0
    decoded = False
    with ProgressBar(total=total, unit="rec") as bar:
        for key, value in iterate_db(input_db, backend):
            where = record_where(input_db, key)
            datum = parse_datum(value, where)
            if datum.encoded and not decoded:
                log.info("Decoding Datum")
                decoded = True
            arr = datum_to_array(datum, where=where)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                # one NaN makes the whole mean NaN, and every net that subtracts it trains on NaN
                bad = arr[~np.isfinite(arr)][0]
                raise DataError(f"{where}: float_data holds {'NaN' if np.isnan(bad) else 'Inf'} "
                                f"(at {np.count_nonzero(~np.isfinite(arr))} of {arr.size} values); "
                                f"no mean written")
            if acc is None:
                shape, first_key = arr.shape, key.decode("utf-8", "replace")
                acc = np.zeros(shape, np.float64)
                log.info("Starting iteration")
                if pca:
                    if shape[0] != 3:
                        raise DataError(f"{where}: --pca needs 3-channel images, the records have {shape[0]}")
                    stats = _ColorStats(shape[0])
            elif arr.shape != shape:
                raise DataError(f"{where}: size {'x'.join(map(str, arr.shape))} (CxHxW) differs from the first "
                                f"record '{first_key}' ({'x'.join(map(str, shape))}); all images must have "
                                f"one size (convert_imageset --resize_height/--resize_width)")
            acc += arr
            if stats is not None:
                stats.add(arr)
            count += 1
            bar.update()
            if count % LOG_EVERY == 0:
                log.info("Processed %d files.", count)
    if count % LOG_EVERY != 0:
        log.info("Processed %d files.", count)
    mean = acc / count

    if output_file:
        blob = caffe_pb2.BlobProto(num=1, channels=shape[0], height=shape[1], width=shape[2])
        blob.data.extend(mean.astype(np.float32).ravel().tolist())
        log.info("Write to %s", output_file)
        atomic_write(output_file, blob.SerializeToString())
    log.info("Number of channels: %d", shape[0])
    for c, v in enumerate(mean.reshape(shape[0], -1).mean(axis=1)):
        log.info("mean_value channel [%d]: %g", c, v)

    result = {"mean": mean, "count": count}
    if stats is not None:
        cov = stats.covariance()
        lam, vecs = np.linalg.eigh(cov)
        order = np.argsort(lam)[::-1]
        lam, vecs = np.clip(lam[order], 0, None), vecs[:, order]
        path = pca_file or default_pca_path(output_file)
        vec = caffe_pb2.BlobProtoVector()
        for arr in (lam, vecs):
            bp = vec.blobs.add()
            bp.shape.dim.extend(arr.shape)
            bp.data.extend(arr.astype(np.float32).ravel().tolist())
        log.info("Write colour PCA to %s", path)
        atomic_write(path, vec.SerializeToString())
        log.info("PCA eigenvalues: %s", " ".join(f"{v:g}" for v in lam))
        result.update(eigenvalues=lam, eigenvectors=vecs, covariance=cov)
    return result


@run_main
def main(argv=None):
    parsed = parse_command(sys.argv[1:] if argv is None else argv, FLAGS, USAGE, range(1, 3))
    if isinstance(parsed, int):
        return parsed
    flags, args = parsed
    compute_image_mean(args[0], args[1] if len(args) > 1 else None, backend=flags["backend"],
                       pca=flags["pca"], pca_file=flags["pca_file"] or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
