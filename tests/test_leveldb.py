"""LevelDB, Caffe's default backend: reading (Data layer, sharding, read position), writing (the
tools), the backend default and the other-kind fallback, and databases written by Caffe itself."""
import logging
import os

import cv2
import lmdb
import numpy as np
import pytest

from minicaffe.data import array_to_datum, set_solver_rank
from minicaffe.data.db import db_kind, iterate_db, open_source
from minicaffe.errors import DataError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import make_layer
from minicaffe.tools import compute_image_mean as cim
from minicaffe.tools import convert_imageset as ci

from reference_bins import run_reference

plyvel = pytest.importorskip("plyvel")

from minicaffe.data.leveldb_source import LevelDBSource  # noqa: E402
from minicaffe.data.leveldb_writer import BatchedLevelDBWriter  # noqa: E402

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def images(n, c=3, h=4, w=5, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def records(n):
    return [(b"%08d_img%d.png" % (i, i), array_to_datum(a, 10 + i).SerializeToString())
            for i, a in enumerate(images(n))]


def make_leveldb(path, recs, commit_every=1000):
    w = BatchedLevelDBWriter(str(path), commit_every=commit_every)
    for k, v in recs:
        w.put(k, v)
    w.finish()
    return str(path)


def make_lmdb(path, recs):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in recs:
            txn.put(k, v)
    env.close()
    return str(path)


@pytest.fixture(autouse=True)
def _reset_rank():
    yield
    set_solver_rank(0, 1)


def data_layer(source, batch, backend="", phase=TEST):
    be = f" backend: {backend}" if backend else ""
    return make_layer(f'name: "data" type: "Data" data_param {{ source: "{source}" batch_size: {batch}{be} }}',
                      [], 2, phase)


def forward(layer, bottom, top):
    layer.forward(bottom, top)
    return top[0].data.copy(), top[1].data.copy()


# --- writer and reader -----------------------------------------------------------------------------------

def test_writer_round_trip_in_key_order_with_batched_commits(tmp_path):
    recs = records(7)
    db = make_leveldb(tmp_path / "ldb", recs[::-1], commit_every=3)     # put out of order
    assert db_kind(db) == "leveldb"
    assert list(iterate_db(db, "leveldb")) == recs
    with LevelDBSource(db) as src:
        assert len(src) == 7
        got = [src.next() for _ in range(9)]
        assert got == recs + recs[:2] and src.epochs == 1


def test_writer_refuses_an_existing_database(tmp_path):
    db = make_leveldb(tmp_path / "ldb", records(2))
    with pytest.raises(OSError, match="cannot create the LevelDB"):
        BatchedLevelDBWriter(db)


def test_data_layer_reads_leveldb_as_it_reads_lmdb(tmp_path):
    recs = records(5)
    ldb = make_leveldb(tmp_path / "ldb", recs)
    mdb = make_lmdb(tmp_path / "mdb", recs)
    a, ba, ta = data_layer(ldb, 3, "LEVELDB")
    b, bb, tb = data_layer(mdb, 3, "LMDB")
    for _ in range(4):                  # across the wrap at the end
        da, la = forward(a, ba, ta)
        db_, lb = forward(b, bb, tb)
        np.testing.assert_array_equal(da, db_)
        np.testing.assert_array_equal(la, lb)
    assert ta[0].shape == (3, 3, 4, 5)
    a.close()
    b.close()


def test_sharding_is_the_same_as_lmdb(tmp_path):
    recs = records(7)
    ldb = make_leveldb(tmp_path / "ldb", recs)
    mdb = make_lmdb(tmp_path / "mdb", recs)
    for rank in range(3):
        with open_source(ldb, "leveldb", rank, 3) as a, open_source(mdb, "lmdb", rank, 3) as b:
            assert type(a).__name__ == "LevelDBSource" and type(b).__name__ == "LMDBSource"
            assert [a.next()[0] for _ in range(6)] == [b.next()[0] for _ in range(6)]
    # through the Data layer at TRAIN: two workers see disjoint records covering the database
    seen = []
    for rank in range(2):
        set_solver_rank(rank, 2)
        layer, bottom, top = data_layer(ldb, 2, "LEVELDB", TRAIN)
        seen.append([int(x) for x in forward(layer, bottom, top)[1]] + [int(x) for x in forward(layer, bottom, top)[1]])
        layer.close()
    assert seen == [[10, 12, 14, 16], [11, 13, 15, 10]]


def test_read_position_and_skip(tmp_path):
    recs = records(5)
    ldb = make_leveldb(tmp_path / "ldb", recs)
    with LevelDBSource(ldb) as src:
        for _ in range(3):
            src.next()
        state = src.state()
        after = [src.next() for _ in range(4)]
        src.restore(state)
        assert [src.next() for _ in range(4)] == after
        src.skip_records(6)                         # six records from the start: one wrap, then 1
        assert src.next() == recs[1] and src.epochs == 1
        src.restore(None)
        assert src.next() == recs[0]


def test_two_readers_of_one_leveldb_share_the_handle(tmp_path):
    # LevelDB's LOCK admits one open per process: the second reader must not fail on it
    ldb = make_leveldb(tmp_path / "ldb", records(3))
    a, ba, ta = data_layer(ldb, 2, "LEVELDB")
    b, bb, tb = data_layer(ldb, 2, "LEVELDB")
    np.testing.assert_array_equal(forward(a, ba, ta)[0], forward(b, bb, tb)[0])
    a.close()
    b.close()
    assert list(iterate_db(ldb, "leveldb"))     # closed again: the tools can open it


# --- the backend setting ---------------------------------------------------------------------------------

def test_unset_backend_is_leveldb_and_an_lmdb_path_is_read_with_a_warning(tmp_path, caplog):
    recs = records(3)
    ldb = make_leveldb(tmp_path / "ldb", recs)
    mdb = make_lmdb(tmp_path / "mdb", recs)
    with caplog.at_level(logging.WARNING, logger="minicaffe"):
        layer, bottom, top = data_layer(ldb, 3)               # Caffe's default: no warning
        assert isinstance(layer.source, LevelDBSource)
        layer.close()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        layer, bottom, top = data_layer(mdb, 3)
        np.testing.assert_array_equal(forward(layer, bottom, top)[1], [10, 11, 12])
        layer.close()
    assert any("backend is LEVELDB (Caffe's default when backend is not set) but the path holds an LMDB"
               in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minicaffe"):
        layer, bottom, top = data_layer(ldb, 3, "LMDB")       # named LMDB, holds a LevelDB
        np.testing.assert_array_equal(forward(layer, bottom, top)[1], [10, 11, 12])
        layer.close()
    assert any("backend is LMDB but the path holds a LEVELDB database; reading it as LEVELDB"
               in r.getMessage() for r in caplog.records)


def test_missing_and_bad_databases_name_the_backend(tmp_path):
    with pytest.raises(DataError, match=r"layer 'data': .*nowhere: no such LevelDB database \(backend is "
                                        r"not set: Caffe's default is LEVELDB\)"):
        data_layer(tmp_path / "nowhere", 1)
    with pytest.raises(DataError, match=r"nowhere: no such LMDB database$"):
        data_layer(tmp_path / "nowhere", 1, "LMDB")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: not a LevelDB database"):
        data_layer(tmp_path / "plain", 1, "LEVELDB")
    empty = tmp_path / "empty"
    plyvel.DB(str(empty), create_if_missing=True).close()
    with pytest.raises(DataError, match=r"empty: the database is empty"):
        data_layer(empty, 1, "LEVELDB")


HOLD = """
import sys, plyvel
db = plyvel.DB(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
db.close()
"""


def test_a_leveldb_held_by_another_process_is_read_from_a_snapshot(tmp_path, caplog):
    # LevelDB admits one process per database: a second mpirun worker reading the same training
    # set must still work. It reads a snapshot (hard links), removed again on close.
    import subprocess
    import sys
    recs = records(3)
    ldb = make_leveldb(tmp_path / "ldb", recs)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ldb], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING, logger="minicaffe"):
            layer, bottom, top = data_layer(ldb, 3, "LEVELDB")
            np.testing.assert_array_equal(forward(layer, bottom, top)[1], [10, 11, 12])
            assert [n for n in os.listdir(tmp_path) if n.endswith(".snapshot")]
            layer.close()
        assert any("in use by another process; reading a snapshot" in r.getMessage() for r in caplog.records)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".snapshot")]
    finally:
        holder.communicate("", timeout=30)
    assert list(iterate_db(ldb, "leveldb")) == recs         # the original is untouched


# --- the tools ---------------------------------------------------------------------------------------

def make_set(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        cv2.imwrite(str(folder / f"i{i}.png"), rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    (folder / "list.txt").write_text("".join(f"i{i}.png {i}\n" for i in range(n)))
    return str(folder) + "/", str(folder / "list.txt")


def test_convert_imageset_and_compute_image_mean_with_leveldb(tmp_path):
    root, lst = make_set(tmp_path / "imgs")
    ldb, mdb = tmp_path / "ldb", tmp_path / "mdb"
    assert ci.main(["--backend=leveldb", "--jobs=1", root, lst, str(ldb)]) == 0
    assert ci.main(["--jobs=1", root, lst, str(mdb)]) == 0
    assert db_kind(ldb) == "leveldb" and db_kind(mdb) == "lmdb"
    assert list(iterate_db(ldb, "leveldb")) == list(iterate_db(mdb, "lmdb"))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    m1 = cim.compute_image_mean(str(ldb), str(tmp_path / "l.binaryproto"), backend="leveldb")
    m2 = cim.compute_image_mean(str(mdb), str(tmp_path / "m.binaryproto"))
    np.testing.assert_array_equal(m1["mean"], m2["mean"])
    assert (tmp_path / "l.binaryproto").read_bytes() == (tmp_path / "m.binaryproto").read_bytes()


def test_overwrite_replaces_a_leveldb_and_refuses_a_folder_that_only_looks_like_one(tmp_path, capsys):
    """--overwrite replaces only a database: a LevelDB directory is one (the merge of LevelDB writing
    with the LMDB-only check refused it); a folder with a CURRENT file and a user's file is not."""
    root, lst = make_set(tmp_path / "imgs")
    ldb = tmp_path / "ldb"
    assert ci.main(["--backend=leveldb", "--jobs=1", root, lst, str(ldb)]) == 0
    before = list(iterate_db(ldb, "leveldb"))
    assert ci.main(["--backend=leveldb", "--jobs=1", "--overwrite", root, lst, str(ldb)]) == 0
    assert list(iterate_db(ldb, "leveldb")) == before
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "CURRENT").write_text("MANIFEST-000001\n")
    (fake / "MANIFEST-000001").write_text("")
    (fake / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert ci.main(["--backend=leveldb", "--jobs=1", "--overwrite", root, lst, str(fake)]) == 1
    assert "not an LMDB or LevelDB database" in capsys.readouterr().err
    assert (fake / "notes.txt").read_text() == "mine"


def test_extract_features_writes_leveldb(tmp_path):
    from minicaffe.tools import extract_features as ef
    import minicaffe as caffe
    proto = tmp_path / "n.prototxt"
    proto.write_text('layer { name: "data" type: "DummyData" top: "data" dummy_data_param { '
                     'shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } } }')
    weights = tmp_path / "n.caffemodel"
    caffe.Net(str(proto), caffe.TEST).save(str(weights))
    out = tmp_path / "feat"
    assert ef.main([str(weights), str(proto), "data", str(out), "2", "leveldb"]) == 0
    keys = [k for k, _ in iterate_db(out, "leveldb")]
    assert db_kind(out) == "leveldb" and keys == [b"%010d" % i for i in range(4)]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".feat")] == []


# --- Caffe's own LevelDB ----------------------------------------------------------------------------------

def test_caffe_written_leveldb_reads_the_same_as_ours(tmp_path):
    root, lst = make_set(tmp_path / "imgs", 5)
    theirs, ours = tmp_path / "caffe_ldb", tmp_path / "our_ldb"
    run_reference("convert_imageset", "--backend=leveldb", root, lst, theirs, env={"GLOG_minloglevel": "2"})
    assert ci.main(["--backend=leveldb", "--jobs=1", root, lst, str(ours)]) == 0
    assert list(iterate_db(theirs, "leveldb")) == list(iterate_db(ours, "leveldb"))   # byte-identical Datums
    layer, bottom, top = data_layer(theirs, 5)          # backend unset: Caffe's LEVELDB
    data, labels = forward(layer, bottom, top)
    layer.close()
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(data, np.stack([cv2.imread(f"{root}i{i}.png").transpose(2, 0, 1)
                                                  for i in range(5)]))


def test_caffe_reads_our_leveldb(tmp_path):
    root, lst = make_set(tmp_path / "imgs", 3)
    ours = tmp_path / "our_ldb"
    assert ci.main(["--backend=leveldb", "--jobs=1", root, lst, str(ours)]) == 0
    run_reference("compute_image_mean", "--backend=leveldb", ours, tmp_path / "caffe_mean.binaryproto",
                  env={"GLOG_minloglevel": "2"})
    cim.compute_image_mean(str(ours), str(tmp_path / "our_mean.binaryproto"), backend="leveldb")
    theirs = caffe_pb2.BlobProto.FromString((tmp_path / "caffe_mean.binaryproto").read_bytes())
    mine = caffe_pb2.BlobProto.FromString((tmp_path / "our_mean.binaryproto").read_bytes())
    np.testing.assert_allclose(mine.data, theirs.data, rtol=1e-6)


def test_data_layer_read_position_round_trip_on_leveldb(tmp_path):
    # the solver's resume (data_position / restore_data_position) works on a LevelDB as on an LMDB
    ldb = make_leveldb(tmp_path / "ldb", records(5))
    layer, bottom, top = data_layer(ldb, 2, "LEVELDB")
    forward(layer, bottom, top)
    pos = layer.data_position()
    after = [forward(layer, bottom, top)[1].tolist() for _ in range(3)]
    assert layer.restore_data_position(pos)
    assert [forward(layer, bottom, top)[1].tolist() for _ in range(3)] == after
    layer.restore_position(3)                      # replay: 3 records from the start
    assert forward(layer, bottom, top)[1].tolist() == [13, 14]
    layer.close()
