"""convert_cifar_data: CIFAR-10's binary batches -> cifar10_train_<db_type> and cifar10_test_<db_type>.

    convert_cifar_data INPUT_FOLDER OUTPUT_FOLDER DB_TYPE        (DB_TYPE: lmdb or leveldb)

As Caffe's ``examples/cifar10/convert_cifar_data``: the training set is ``data_batch_1.bin`` ...
``data_batch_5.bin`` in that order, the test set ``test_batch.bin``; each record of 1 label byte and
3072 pixel bytes (3×32×32, planes R, G, B as stored) becomes a Datum with channels 3, height/width 32,
the pixels as they are and the label, keyed ``%05d`` (position over all batches of the set).

Caffe reads 10000 records from every batch file whatever its size; here a batch file must hold a whole
number of records and all of them are converted (so small test files work), and a file of another size
is refused naming it. Both databases are built under temporary names and renamed into place only when
both are complete; existing ones are refused (Caffe's ``db::NEW``).
"""
import os
import sys

import numpy as np

from ..data.db import NewDatabase, check_write_backend
from ..errors import DataError
from ..proto import caffe_pb2
from .common import get_logger, run_main

SIZE = 32
IMAGE_BYTES = 3 * SIZE * SIZE
RECORD_BYTES = 1 + IMAGE_BYTES
TRAIN_BATCHES = 5
CAFFE_BATCH_SIZE = 10000

USAGE = """This script converts the CIFAR dataset to the leveldb format used
by caffe to perform classification.
Usage:
    convert_cifar_data input_folder output_folder db_type
Where the input folder should contain the binary batch files.
The CIFAR dataset could be downloaded at
    http://www.cs.toronto.edu/~kriz/cifar.html
You should gunzip them after downloading."""


def read_batch(path):
    """(labels N int, pixels N×3072 uint8) of one CIFAR-10 binary batch file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: unable to open the batch file ({exc.strerror or exc})") from None
    if not raw or len(raw) % RECORD_BYTES:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of CIFAR-10 records "
                        f"({RECORD_BYTES} bytes each: a label byte and 3x32x32 pixels)")
    arr = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    # Caffe reads the label byte into a char (signed)
    return arr[:, 0].view(np.int8).astype(int), arr[:, 1:]


def cifar_datum(pixels, label):
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = 3, SIZE, SIZE
    d.label = int(label)
    d.data = pixels.tobytes()
    return d


def _write(db, files, log, train):
    index = 0
    for n, path in enumerate(files):
        if train:
            log.info("Training Batch %d", n + 1)
        labels, pixels = read_batch(path)
        if len(labels) != CAFFE_BATCH_SIZE:
            log.warning("%s: %d records (Caffe's tool reads %d per batch file)", path, len(labels),
                        CAFFE_BATCH_SIZE)
        for label, image in zip(labels, pixels):
            db.put(b"%05d" % index, cifar_datum(image, label).SerializeToString())
            index += 1


def convert_dataset(input_folder, output_folder, db_type, log=None):
    """Write the training and test databases; returns their record counts."""
    log = log or get_logger()
    db_type = check_write_backend(output_folder, db_type)
    if not os.path.isdir(output_folder):
        raise DataError(f"{output_folder}: the output folder does not exist")
    train_files = [os.path.join(input_folder, f"data_batch_{i + 1}.bin") for i in range(TRAIN_BATCHES)]
    test_files = [os.path.join(input_folder, "test_batch.bin")]
    for path in train_files + test_files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: unable to open the batch file (no such file)")
    targets = [os.path.join(output_folder, f"cifar10_{part}_{db_type}") for part in ("train", "test")]
    for target in targets:
        if os.path.lexists(target):
            raise DataError(f"{target}: already exists; remove it or choose another output folder")
    dbs = []
    try:
        log.info("Writing Training data")
        dbs.append(NewDatabase(targets[0], db_type))
        _write(dbs[0], train_files, log, True)
        log.info("Writing Testing data")
        dbs.append(NewDatabase(targets[1], db_type))
        _write(dbs[1], test_files, log, False)
        for db in dbs:
            db.finish()
    except BaseException:
        for db in dbs:
            db.abort()
        raise
    return [db.count for db in dbs]


@run_main
def main(argv=None):
    args = [a for a in (sys.argv[1:] if argv is None else argv)]
    if args and args[0] in ("-h", "--help", "-help", "--helpfull"):
        print(USAGE)
        return 0
    if len(args) != 3:
        print(USAGE, file=sys.stderr)
        return 1
    convert_dataset(args[0], args[1], args[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
