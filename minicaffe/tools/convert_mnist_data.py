"""convert_mnist_data: MNIST's IDX files -> an LMDB or LevelDB of Datums, as Caffe's example tool.

    convert_mnist_data [--backend lmdb|leveldb] INPUT_IMAGE_FILE INPUT_LABEL_FILE OUTPUT_DB

The records are those Caffe's ``examples/mnist/convert_mnist_data`` writes, byte for byte: key
``%08d`` (the item's index), a Datum with channels 1, height/width the IDX rows/cols, the raw uint8
pixels and the label (a signed char, as Caffe reads it). Commits every 1000 records.

Unlike Caffe's tool, which reads past the end of a short file without noticing, the files are checked
first (magic numbers 2051/2049, equal item counts, sizes that hold every item), and the database is
built under a temporary name and renamed into place once complete.
"""
import os
import struct
import sys

import numpy as np

from ..data.db import NewDatabase
from ..errors import DataError
from ..proto import caffe_pb2
from .common import get_logger, run_main
from .gflags import parse_command

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
COMMIT_EVERY = 1000

USAGE = """This script converts the MNIST dataset to
the lmdb/leveldb format used by Caffe to load data.
Usage:
    convert_mnist_data [FLAGS] input_image_file input_label_file output_db_file
The MNIST dataset could be downloaded at
    http://yann.lecun.com/exdb/mnist/
You should gunzip them after downloading."""

FLAGS = {"backend": (str, "lmdb", "The backend for storing the result")}


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{path}: unable to open file ({exc.strerror or exc})") from None


def read_idx(image_file, label_file):
    """(images N×rows×cols uint8, labels N int) from MNIST's big-endian IDX files, checked."""
    images, labels = _read(image_file), _read(label_file)
    if len(images) < 16:
        raise DataError(f"{image_file}: too short for an IDX image file header ({len(images)} bytes)")
    if len(labels) < 8:
        raise DataError(f"{label_file}: too short for an IDX label file header ({len(labels)} bytes)")
    magic, num, rows, cols = struct.unpack(">IIII", images[:16])
    if magic != IMAGE_MAGIC:
        raise DataError(f"{image_file}: incorrect image file magic {magic} (an IDX image file has {IMAGE_MAGIC})")
    lmagic, nlabels = struct.unpack(">II", labels[:8])
    if lmagic != LABEL_MAGIC:
        raise DataError(f"{label_file}: incorrect label file magic {lmagic} (an IDX label file has {LABEL_MAGIC})")
    if num != nlabels:
        raise DataError(f"{image_file} has {num} items but {label_file} has {nlabels} labels")
    need = 16 + num * rows * cols
    if len(images) < need:
        raise DataError(f"{image_file}: {len(images)} bytes, but {num} images of {rows}x{cols} need {need}")
    if len(labels) < 8 + num:
        raise DataError(f"{label_file}: {len(labels)} bytes, but {num} labels need {8 + num}")
    pixels = np.frombuffer(images, np.uint8, num * rows * cols, 16).reshape(num, rows, cols)
    # Caffe reads the label into a char: signed on the x86 and ARM Linux builds it is run on
    return pixels, np.frombuffer(labels, np.int8, num, 8).astype(int), rows, cols


def mnist_datum(pixels, label):
    """The Datum Caffe writes for one image (rows×cols uint8) and label."""
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = 1, pixels.shape[0], pixels.shape[1]
    d.data = pixels.tobytes()
    d.label = int(label)
    return d


def convert_dataset(image_file, label_file, db_path, backend="lmdb", log=None):
    """Write the MNIST items of the two IDX files to a new database; returns the number written."""
    log = log or get_logger()
    pixels, labels, rows, cols = read_idx(image_file, label_file)
    db = NewDatabase(db_path, backend, commit_every=COMMIT_EVERY)
    try:
        log.info("A total of %d items.", len(labels))
        log.info("Rows: %d Cols: %d", rows, cols)
        for i in range(len(labels)):
            db.put(b"%08d" % i, mnist_datum(pixels[i], labels[i]).SerializeToString())
        db.finish()
    except BaseException:
        db.abort()
        raise
    log.info("Processed %d files.", db.count)
    return db.count


@run_main
def main(argv=None):
    parsed = parse_command(sys.argv[1:] if argv is None else argv, FLAGS, USAGE, range(3, 4))
    if isinstance(parsed, int):
        return parsed
    flags, args = parsed
    convert_dataset(args[0], args[1], os.fspath(args[2]), flags["backend"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
