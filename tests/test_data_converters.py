"""convert_mnist_data and convert_cifar_data: Caffe's keys and Datums from tiny generated IDX/CIFAR files,
the checks on bad input, and byte-identical records to Caffe's own converters where it is built."""
import importlib.util
import os
import struct

import numpy as np
import pytest

from minicaffe.data.db import db_kind, iterate_db
from minicaffe.proto import caffe_pb2
from minicaffe.testing import make_layer
from minicaffe.tools import convert_cifar_data as ccd
from minicaffe.tools import convert_mnist_data as cmd

from reference_bins import reference_tool, run_reference

BACKENDS = ["lmdb", pytest.param("leveldb", marks=pytest.mark.skipif(
    importlib.util.find_spec("plyvel") is None, reason="plyvel not installed (the leveldb extra)"))]


def write_idx(folder, n=5, rows=4, cols=3, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8) if labels is None else np.asarray(labels, np.uint8)
    img, lab = folder / "images-idx3-ubyte", folder / "labels-idx1-ubyte"
    img.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + pixels.tobytes())
    lab.write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return str(img), str(lab), pixels, labels


def write_cifar(folder, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    sets = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        sets[name] = (labels, pixels)
    return str(folder), sets


def datums(path, backend):
    return [(k, caffe_pb2.Datum.FromString(v)) for k, v in iterate_db(path, backend)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_keys_and_datums(tmp_path, backend, log_text):
    img, lab, pixels, labels = write_idx(tmp_path)
    out = tmp_path / f"mnist_{backend}"
    assert cmd.main([f"--backend={backend}", img, lab, str(out)]) == 0
    assert db_kind(out) == backend
    recs = datums(out, backend)
    assert [k for k, _ in recs] == [b"%08d" % i for i in range(5)]
    for (_, d), p, label in zip(recs, pixels, labels):
        assert (d.channels, d.height, d.width, d.label) == (1, 4, 3, label) and d.data == p.tobytes()
        assert not d.HasField("encoded") and not d.float_data
    text = log_text.getvalue()
    assert "A total of 5 items." in text and "Rows: 4 Cols: 3" in text and "Processed 5 files." in text
    # and the Data layer reads it (backend left unset for LevelDB: Caffe's default)
    be = "" if backend == "leveldb" else " backend: LMDB"
    layer, bottom, top = make_layer(f'type: "Data" data_param {{ source: "{out}" batch_size: 5{be} }}', [], 2,
                                    caffe_pb2.TEST)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data[:, 0], pixels)
    np.testing.assert_array_equal(top[1].data, labels)
    layer.close()


def test_mnist_label_is_a_signed_char_as_caffe_reads_it(tmp_path):
    img, lab, _, _ = write_idx(tmp_path, n=2, labels=[3, 200])
    assert cmd.main([img, lab, str(tmp_path / "db")]) == 0
    assert [d.label for _, d in datums(tmp_path / "db", "lmdb")] == [3, 200 - 256]


def test_mnist_bad_input_one_line_and_nothing_written(tmp_path, capsys):
    img, lab, _, _ = write_idx(tmp_path, n=3)
    out = tmp_path / "db"
    data = open(img, "rb").read()
    bad = tmp_path / "bad"
    cases = [
        (data[:-1], lab, "bytes, but 3 images of 4x3 need 52"),
        (struct.pack(">IIII", 2049, 3, 4, 3) + data[16:], lab, "incorrect image file magic 2049"),
        (data[:10], lab, "too short for an IDX image file header"),
    ]
    for content, labels, message in cases:
        bad.write_bytes(content)
        assert cmd.main([str(bad), labels, str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}") and message in err, err
    assert cmd.main([img, img, str(out)]) == 1
    assert "incorrect label file magic 2051" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    _, lab5, _, _ = write_idx(other, n=5)
    assert cmd.main([img, lab5, str(out)]) == 1
    err = capsys.readouterr().err
    assert "has 3 items but" in err and "has 5 labels" in err
    assert cmd.main(["--backend=bdb", img, lab, str(out)]) == 1
    assert "unknown database backend 'bdb'" in capsys.readouterr().err
    assert cmd.main([img, str(tmp_path / "none"), str(out)]) == 1
    assert "none: unable to open file" in capsys.readouterr().err
    assert cmd.main([img, lab]) == 1 and "Usage:" in capsys.readouterr().err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    out.mkdir()
    assert cmd.main([img, lab, str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_train_and_test_databases(tmp_path, backend, log_text):
    src, sets = write_cifar(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    assert ccd.main([src, str(out), backend]) == 0
    assert sorted(os.listdir(out)) == [f"cifar10_test_{backend}", f"cifar10_train_{backend}"]
    train = datums(out / f"cifar10_train_{backend}", backend)
    test = datums(out / f"cifar10_test_{backend}", backend)
    assert [k for k, _ in train] == [b"%05d" % i for i in range(15)]
    assert [k for k, _ in test] == [b"%05d" % i for i in range(3)]
    expect = [(lab, pix) for i in range(1, 6) for lab, pix in zip(*sets[f"data_batch_{i}.bin"])]
    for (_, d), (label, pixels) in zip(train, expect):
        assert (d.channels, d.height, d.width, d.label) == (3, 32, 32, label) and d.data == pixels.tobytes()
    assert [d.label for _, d in test] == list(sets["test_batch.bin"][0])
    text = log_text.getvalue()
    assert "Writing Training data" in text and "Training Batch 5" in text and "Writing Testing data" in text


def test_cifar_bad_input(tmp_path, capsys):
    src, _ = write_cifar(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with open(os.path.join(src, "data_batch_3.bin"), "ab") as f:
        f.write(b"xx")
    assert ccd.main([src, str(out), "lmdb"]) == 1
    assert "data_batch_3.bin: 9221 bytes is not a whole number of CIFAR-10 records" in capsys.readouterr().err
    assert os.listdir(out) == []
    os.remove(os.path.join(src, "test_batch.bin"))
    assert ccd.main([src, str(out), "lmdb"]) == 1
    assert "test_batch.bin: unable to open the batch file" in capsys.readouterr().err
    assert ccd.main([src, str(tmp_path / "nowhere"), "lmdb"]) == 1
    assert "nowhere: the output folder does not exist" in capsys.readouterr().err
    assert ccd.main([src, str(out), "hdf5"]) == 1
    assert "unknown database backend 'hdf5'" in capsys.readouterr().err
    assert ccd.main([src, str(out)]) == 1 and "Usage:" in capsys.readouterr().err


# --- against Caffe's own converters ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_records_are_byte_identical_to_caffes(tmp_path, backend):
    img, lab, _, _ = write_idx(tmp_path, n=1003, rows=28, cols=28, seed=4)   # one commit boundary crossed
    theirs, ours = tmp_path / "caffe_db", tmp_path / "our_db"
    run_reference("convert_mnist_data", f"--backend={backend}", img, lab, theirs, env={"GLOG_minloglevel": "2"})
    assert cmd.main([f"--backend={backend}", img, lab, str(ours)]) == 0
    assert list(iterate_db(ours, backend)) == list(iterate_db(theirs, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_records_are_byte_identical_to_caffes(tmp_path, backend):
    # Caffe's tool reads exactly 10000 records per batch file, so the files are full size (180 MB)
    reference_tool("convert_cifar_data")
    src, _ = write_cifar(tmp_path / "in", per_batch=10000)
    (tmp_path / "caffe").mkdir()
    (tmp_path / "ours").mkdir()
    run_reference("convert_cifar_data", src, tmp_path / "caffe", backend, env={"GLOG_minloglevel": "2"})
    assert ccd.main([src, str(tmp_path / "ours"), backend]) == 0
    for part in ("train", "test"):
        name = f"cifar10_{part}_{backend}"
        a, b = iterate_db(tmp_path / "ours" / name, backend), iterate_db(tmp_path / "caffe" / name, backend)
        assert all(x == y for x, y in zip(a, b))
        assert sum(1 for _ in iterate_db(tmp_path / "ours" / name, backend)) == (50000 if part == "train" else 10000)
