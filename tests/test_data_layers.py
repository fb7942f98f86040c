"""Data, ImageData, MemoryData and HDF5Data layers; LMDB reading, sharding and prefetching."""
import gc
import os
import threading

import cv2
import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.data import (LMDBSource, Prefetcher, array_to_datum, encode_datum, iterate_lmdb,
                            set_solver_rank)
from minicaffe.errors import DataError, MinicaffeError, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import make_layer

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_db(path, arrays, labels=None, encoded=None):
    """An LMDB of Datums with Caffe-style keys; ``encoded`` = 'png'/'jpg' stores compressed images."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, arr in enumerate(arrays):
            label = i if labels is None else labels[i]
            d = encode_datum(arr, label, encoded) if encoded else array_to_datum(arr, label)
            txn.put(b"%08d_img%d.png" % (i, i), d.SerializeToString())
    env.close()
    return str(path)


def images(n, c=3, h=4, w=5, seed=0):
    return [a for a in np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)]


def data_layer(source, batch, phase=TEST, extra="", num_top=2, prefetch=None):
    pf = f" prefetch: {prefetch}" if prefetch is not None else ""
    text = f'name: "data" type: "Data" data_param {{ source: "{source}" batch_size: {batch} backend: LMDB{pf} }} {extra}'
    return make_layer(text, [], num_top=num_top, phase=phase)


def run(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


@pytest.fixture(autouse=True)
def _reset_rank():
    yield
    set_solver_rank(0, 1)


# --- Data ---------------------------------------------------------------------------------------------

def test_data_layer_reads_records_in_key_order_and_cycles(tmp_path):
    arrs = images(5)
    db = make_db(tmp_path / "db", arrs, labels=[10, 11, 12, 13, 14])
    layer, bottom, top = data_layer(db, 3)
    assert top[0].shape == (3, 3, 4, 5) and top[1].shape == (3,)
    seen_labels = []
    for expect in ([0, 1, 2], [3, 4, 0], [1, 2, 3]):
        data, labels = run(layer, bottom, top)
        np.testing.assert_array_equal(data, np.stack([arrs[i] for i in expect]))
        seen_labels.append(labels.tolist())
    assert seen_labels == [[10, 11, 12], [13, 14, 10], [11, 12, 13]]
    layer.close()


def test_data_layer_one_top_and_synchronous_prefetch(tmp_path):
    arrs = images(4)
    db = make_db(tmp_path / "db", arrs)
    a, ba, ta = data_layer(db, 2, num_top=1, prefetch=0)
    b, bb, tb = data_layer(db, 2, num_top=1, prefetch=4)
    for _ in range(3):
        np.testing.assert_array_equal(run(a, ba, ta)[0], run(b, bb, tb)[0])
    b.close()


def test_data_layer_transform_matches_hand_computation(tmp_path):
    arrs = images(2, h=6, w=6)
    db = make_db(tmp_path / "db", arrs)
    layer, bottom, top = data_layer(db, 2, extra="transform_param { crop_size: 4 mean_value: 5 scale: 0.25 }")
    assert top[0].shape == (2, 3, 4, 4)
    data, _ = run(layer, bottom, top)
    expect = (np.stack(arrs)[:, :, 1:5, 1:5].astype(np.float32) - 5) * 0.25
    np.testing.assert_allclose(data, expect, atol=1e-6)


def test_data_layer_encoded_png_and_jpg_match_opencv(tmp_path):
    arrs = images(3, h=8, w=9, seed=4)
    db = make_db(tmp_path / "png", arrs, encoded="png")
    data, _ = run(*data_layer(db, 3))
    np.testing.assert_array_equal(data, np.stack(arrs))            # PNG is lossless
    db = make_db(tmp_path / "jpg", arrs, encoded="jpg")
    data, _ = run(*data_layer(db, 3))
    expect = []
    for _, v in iterate_lmdb(db):      # shares the open environment (LMDB allows one per process)
        d = caffe_pb2.Datum.FromString(v)
        expect.append(cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED).transpose(2, 0, 1))
    np.testing.assert_array_equal(data, np.stack(expect))


def test_data_layer_scale_jitter_on_raw_and_encoded(tmp_path):
    arrs = images(4, h=12, w=16, seed=2)
    for enc in (None, "png"):
        db = make_db(tmp_path / f"db{enc}", arrs, encoded=enc)
        layer, bottom, top = data_layer(db, 4, TRAIN, extra="transform_param { crop_size: 6 mirror: true "
                                                             "scale_jitter { min_side: 8 max_side: 12 } }")
        assert top[0].shape == (4, 3, 6, 6)
        data, labels = run(layer, bottom, top)
        assert data.shape == (4, 3, 6, 6) and labels.tolist() == [0, 1, 2, 3]
        layer.close()


def test_rand_skip_starts_at_a_seeded_offset(tmp_path):
    arrs = images(10, h=2, w=2)
    db = make_db(tmp_path / "db", arrs)
    firsts = set()
    for seed in range(8):
        backend.set_random_seed(seed)
        layer, bottom, top = make_layer(f'type: "Data" data_param {{ source: "{db}" batch_size: 1 backend: LMDB '
                                        f'rand_skip: 10 }}', [], num_top=2, phase=TEST)
        first = int(run(layer, bottom, top)[1][0])
        backend.set_random_seed(seed)
        again, b2, t2 = make_layer(f'type: "Data" data_param {{ source: "{db}" batch_size: 1 backend: LMDB '
                                   f'rand_skip: 10 }}', [], num_top=2, phase=TEST)
        assert int(run(again, b2, t2)[1][0]) == first                  # same seed, same skip
        second = int(run(layer, bottom, top)[1][0])
        assert second == (first + 1) % 10                               # then in key order
        firsts.add(first)
        layer.close()
        again.close()
    assert len(firsts) > 1


def test_sharding_is_disjoint_and_covering(tmp_path):
    n, world = 12, 3
    db = make_db(tmp_path / "db", images(n, h=1, w=1))
    seen = []
    for rank in range(world):
        set_solver_rank(rank, world)
        layer, bottom, top = data_layer(db, 2, TRAIN)
        labels = np.concatenate([run(layer, bottom, top)[1] for _ in range(n // world // 2)])
        assert all(int(x) % world == rank for x in labels)
        seen.append(labels.astype(int).tolist())
        layer.close()
    flat = sorted(x for s in seen for x in s)
    assert flat == list(range(n))
    # at TEST every worker reads everything
    set_solver_rank(1, world)
    layer, bottom, top = data_layer(db, 4, TEST)
    assert run(layer, bottom, top)[1].tolist() == [0, 1, 2, 3]
    layer.close()


def test_lmdb_source_sharding_and_peek(tmp_path):
    db = make_db(tmp_path / "db", images(5, h=1, w=1))
    srcs = [LMDBSource(db, r, 2) for r in range(2)]
    assert srcs[1].peek()[0].startswith(b"00000001")
    got = [[int(s.next()[0][:8]) for _ in range(5)] for s in srcs]
    # the stream continues across the wrap: 0 2 4 | 1 3 ... for rank 0, 1 3 | 0 2 4 ... for rank 1
    assert got == [[0, 2, 4, 1, 3], [1, 3, 0, 2, 4]]
    assert srcs[0].epochs == 1
    for s in srcs:
        s.close()


def _other_process(db, code):
    """Run ``code`` with ``env`` = the LMDB at ``db`` opened for writing, in another process (LMDB allows
    one environment per database and process, and the point is a writer that is not this reader)."""
    import subprocess
    import sys
    prog = f"import lmdb\nenv = lmdb.open({str(db)!r})\nwith env.begin(write=True) as txn:\n    {code}\nenv.close()\n"
    subprocess.run([sys.executable, "-c", prog], check=True, timeout=60)


def test_lmdb_reader_sees_another_process_writes_at_the_next_pass(tmp_path, logs, monkeypatch):
    """The reader keeps a consistent snapshot within a pass, takes the new contents at the wrap, and
    after a renewal goes on from the next key when the one under its cursor was removed."""
    db = make_db(tmp_path / "db", images(5, h=1, w=1))
    src = LMDBSource(db)
    keys = lambda n: [src.next()[0][:8].decode() for _ in range(n)]   # noqa: E731
    assert keys(3) == ["00000000", "00000001", "00000002"]
    _other_process(db, 'txn.put(b"00000009_new", b"x"); txn.delete(b"00000004_img4.png")')
    assert keys(2) == ["00000003", "00000004"]            # the pass started before the write
    assert keys(5) == ["00000000", "00000001", "00000002", "00000003", "00000009"]
    assert any("was changed by another process during the run" in m for m in logs)
    monkeypatch.setattr("minicaffe.data.lmdb_source.RENEW_EVERY", 1)
    assert keys(1) == ["00000000"]                        # the cursor is now on 00000001
    _other_process(db, 'txn.delete(b"00000001_img1.png"); txn.delete(b"00000002_img2.png")')
    assert keys(3) == ["00000001", "00000003", "00000009"]  # 1 was read before the renewal
    src.close()


def test_lmdb_reader_does_not_pin_old_pages(tmp_path, monkeypatch):
    """A registered read transaction keeps the pages of its snapshot from reuse. Held for the whole
    run, it makes a writer's database grow with every rewrite (here about 30x); renewed every few
    records it lets the writer reuse them, so the file stays a few times the data."""
    monkeypatch.setattr("minicaffe.data.lmdb_source.RENEW_EVERY", 5)
    db = make_db(tmp_path / "db", images(200, h=16, w=16))
    src = LMDBSource(db)
    start = src.env.info()["last_pgno"]
    for _ in range(6):
        for _ in range(10):
            src.next()
        _other_process(db, "for k, v in list(txn.cursor()):\n        txn.put(k, bytes(reversed(v)))")
        _other_process(db, "for k, v in list(txn.cursor()):\n        txn.put(k, bytes(reversed(v)))")
    assert src.env.info()["last_pgno"] < 8 * start, (src.env.info()["last_pgno"], start)
    src.close()


def test_lmdb_lock_file_unusable_reads_without_and_says_so(tmp_path, logs, monkeypatch):
    """Where the lock file cannot be used (read-only media, no permission) the database is read
    without it (Caffe's ALLOW_LMDB_NOLOCK), and the log says another process must not write it."""
    db = make_db(tmp_path / "db", images(2, h=1, w=1))
    real = lmdb.open
    calls = []

    def no_lock_file(path, **kw):
        calls.append(kw.get("lock", True))
        if kw.get("lock", True):
            raise lmdb.Error(f"{path}: Permission denied")
        return real(path, **kw)
    monkeypatch.setattr(lmdb, "open", no_lock_file)
    with LMDBSource(db) as src:
        assert src.next()[0].startswith(b"00000000")
    assert calls == [True, False]
    assert any("cannot use the LMDB lock file" in m and "no other process may write" in m for m in logs)


def test_lmdb_source_opens_with_the_lock_file(tmp_path, monkeypatch):
    db = make_db(tmp_path / "db", images(2, h=1, w=1))
    real, calls = lmdb.open, []
    monkeypatch.setattr(lmdb, "open", lambda path, **kw: calls.append(kw.get("lock", True)) or real(path, **kw))
    with LMDBSource(db) as src:
        src.next()
    assert calls == [True]


def test_data_layer_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"layer 'data': .*nowhere: no such LMDB database"):
        data_layer(tmp_path / "nowhere", 1)             # backend: LMDB (tests/test_leveldb.py: unset)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: not an LMDB database"):
        data_layer(tmp_path / "plain", 1)
    (tmp_path / "afile").write_bytes(b"x" * 100)
    with pytest.raises(DataError, match=r"afile: not an LMDB database"):
        data_layer(tmp_path / "afile", 1)
    empty = tmp_path / "empty"
    lmdb.open(str(empty)).close()
    with pytest.raises(DataError, match=r"empty: the database is empty"):
        data_layer(empty, 1)
    db = make_db(tmp_path / "db", images(2))
    ldb = tmp_path / "leveldb"          # looks like a LevelDB but its files are damaged
    ldb.mkdir()
    (ldb / "CURRENT").write_text("MANIFEST-000001\n")
    (ldb / "MANIFEST-000001").write_bytes(b"")
    with pytest.raises(DataError, match=r"leveldb: (not a readable LevelDB database \(Corruption: |LevelDB databases need)"):
        make_layer(f'type: "Data" data_param {{ source: "{ldb}" batch_size: 1 }}', [], 2, TEST)
    with pytest.raises(NetError, match=r"batch_size must be positive"):
        make_layer(f'type: "Data" data_param {{ source: "{db}" backend: LMDB }}', [], 2, TEST)


def test_bad_record_error_names_key_and_repeats(tmp_path):
    db = make_db(tmp_path / "db", images(3))
    env = lmdb.open(db)
    with env.begin(write=True) as txn:
        txn.put(b"00000001_img1.png", b"garbage that is no Datum")
    env.close()
    layer, bottom, top = data_layer(db, 1)
    run(layer, bottom, top)
    for _ in range(2):
        with pytest.raises(DataError, match=r"layer 'data': .*db: record '00000001_img1.png': not a Datum"):
            run(layer, bottom, top)
    layer.close()


def test_batch_of_mixed_sizes_names_the_record(tmp_path):
    arrs = images(2) + images(1, h=6, w=6)
    db = make_db(tmp_path / "db", arrs)
    layer, bottom, top = data_layer(db, 3)
    with pytest.raises(DataError, match=r"record '00000002_img2.png': image 3x6x6 .* batch is 3x4x5"):
        run(layer, bottom, top)


def test_train_is_reproducible_with_a_seed(tmp_path):
    db = make_db(tmp_path / "db", images(6, h=8, w=8))
    extra = "transform_param { crop_size: 5 mirror: true }"
    outs = []
    for seed in (5, 5, 6):
        backend.set_random_seed(seed)
        layer, bottom, top = data_layer(db, 3, TRAIN, extra)
        outs.append(np.concatenate([run(layer, bottom, top)[0] for _ in range(4)]))
        layer.close()
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_prefetch_thread_stops_on_close_and_on_collection(tmp_path):
    db = make_db(tmp_path / "db", images(3))
    before = threading.active_count()
    layer, bottom, top = data_layer(db, 1)
    run(layer, bottom, top)
    assert threading.active_count() == before + 1
    layer.close()
    assert threading.active_count() == before
    layer, bottom, top = data_layer(db, 1)
    del layer, bottom, top
    gc.collect()
    for _ in range(100):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() == before


def test_prefetcher_reraises_with_message():
    calls = []

    def load():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("bad pixel in record 7")
        return len(calls)

    p = Prefetcher(load, depth=2, name="data")
    assert p.get() == 1
    with pytest.raises(DataError, match=r"layer 'data': loading a batch failed: ValueError: bad pixel in record 7"):
        p.get()
    with pytest.raises(DataError, match="bad pixel"):
        p.get()
    p.close()

    def fail():
        raise DataError("db: record 'x': broken")

    p = Prefetcher(fail, depth=1)
    with pytest.raises(DataError, match="^db: record 'x': broken$"):
        p.get()
    p.close()


def test_data_layer_in_a_net(tmp_path):
    db = make_db(tmp_path / "db", images(4, c=1, h=3, w=3))
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'''
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{db}" batch_size: 2 backend: LMDB }} transform_param {{ scale: 0.5 }} }}
layer {{ name: "silence" type: "Silence" bottom: "label" }}
''')
    net = caffe.Net(str(proto), caffe.TEST)
    out = net.forward()
    assert net.blobs["data"].data.shape == (2, 1, 3, 3)
    assert out["data"].max() <= 127.5
    for layer in net.layers:
        if hasattr(layer, "close"):
            layer.close()


# --- ImageData ---------------------------------------------------------------------------------------

def write_images(folder, arrs, names, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for arr, name in zip(arrs, names):
        cv2.imwrite(str(folder / (name + ext)), arr.transpose(1, 2, 0))


def image_layer(params, phase=TEST, extra=""):
    return make_layer(f'name: "img" type: "ImageData" image_data_param {{ {params} }} {extra}', [], 2, phase)


def test_image_data_with_spaces_in_paths(tmp_path):
    arrs = images(3, h=5, w=6)
    write_images(tmp_path / "my images", arrs, ["a b", "c", "d  e"])
    lst = tmp_path / "list.txt"
    lst.write_text("my images/a b.png 4\nmy images/c.png 5\n\nmy images/d  e.png 6\n")
    layer, bottom, top = image_layer(f'source: "{lst}" root_folder: "{tmp_path}/" batch_size: 2')
    assert top[0].shape == (2, 3, 5, 6)
    d1, l1 = run(layer, bottom, top)
    d2, l2 = run(layer, bottom, top)
    np.testing.assert_array_equal(d1, np.stack(arrs[:2]))
    np.testing.assert_array_equal(d2, np.stack([arrs[2], arrs[0]]))
    assert l1.tolist() == [4, 5] and l2.tolist() == [6, 4]
    layer.close()


def test_image_data_resize_gray_and_shuffle(tmp_path):
    arrs = images(6, h=10, w=12, seed=3)
    write_images(tmp_path, arrs, [f"i{k}" for k in range(6)])
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"i{k}.png {k}\n" for k in range(6)))
    layer, bottom, top = image_layer(f'source: "{lst}" root_folder: "{tmp_path}" batch_size: 6 new_height: 4 '
                                     f'new_width: 5 is_color: false shuffle: true')
    data, labels = run(layer, bottom, top)
    assert data.shape == (6, 1, 4, 5)
    assert sorted(labels.tolist()) == list(range(6))
    for d, lab in zip(data, labels.astype(int)):
        gray = cv2.imread(str(tmp_path / f"i{lab}.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(d[0], cv2.resize(gray, (5, 4), interpolation=cv2.INTER_LINEAR))
    layer.close()


def test_image_data_errors_name_list_file_and_line(tmp_path):
    write_images(tmp_path, images(1), ["ok"])
    lst = tmp_path / "list.txt"
    lst.write_text("ok.png 1\nok.png one\n")
    with pytest.raises(DataError, match=r"layer 'img': .*list.txt:2: label 'one' is not an integer"):
        image_layer(f'source: "{lst}" root_folder: "{tmp_path}/" batch_size: 1')
    lst.write_text("ok.png 1\nmissing.png 2\n")
    layer, bottom, top = image_layer(f'source: "{lst}" root_folder: "{tmp_path}/" batch_size: 1')
    run(layer, bottom, top)
    with pytest.raises(DataError, match=r"layer 'img': .*list.txt:2: could not read image .*missing.png"):
        run(layer, bottom, top)
    layer.close()
    with pytest.raises(NetError, match="new_height and new_width must be set together"):
        image_layer(f'source: "{lst}" batch_size: 1 new_height: 4')
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt: the list file has no images"):
        image_layer(f'source: "{tmp_path / "empty.txt"}" batch_size: 1')


# --- MemoryData --------------------------------------------------------------------------------------

def memory_layer():
    return make_layer('name: "mem" type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 height: 2 '
                      'width: 3 }', [], 2, TEST)


def test_memory_data_serves_batches_and_wraps():
    layer, bottom, top = memory_layer()
    data = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([1, 2, 3, 4], np.float32)
    layer.set_input_arrays(data, labels)
    for start in (0, 2, 0):
        d, lab = run(layer, bottom, top)
        np.testing.assert_array_equal(d, data[start:start + 2])
        np.testing.assert_array_equal(lab, labels[start:start + 2].reshape(2, 1, 1, 1))   # Caffe's shape
    layer.set_input_arrays(data, labels.reshape(4, 1, 1, 1))             # pycaffe's 4-d labels
    np.testing.assert_array_equal(run(layer, bottom, top)[1].ravel(), [1, 2])


def test_memory_data_errors_name_layer():
    layer, bottom, top = memory_layer()
    with pytest.raises(NetError, match=r"layer 'mem' \(MemoryData\): MemoryData needs data: call "
                                       r"net.set_input_arrays"):
        run(layer, bottom, top)
    good = np.zeros((4, 1, 2, 3), np.float32)
    lab = np.zeros(4, np.float32)
    with pytest.raises(NetError, match="data array must be float32, got float64"):
        layer.set_input_arrays(good.astype(np.float64), lab)
    with pytest.raises(NetError, match="data array must be C contiguous"):
        layer.set_input_arrays(np.zeros((4, 1, 3, 2), np.float32).transpose(0, 1, 3, 2), lab)
    with pytest.raises(NetError, match=r"data array has shape \(4, 1, 3, 2\), expected Nx1x2x3"):
        layer.set_input_arrays(np.zeros((4, 1, 3, 2), np.float32), lab)
    with pytest.raises(NetError, match="must be a multiple of batch size 2, got 3"):
        layer.set_input_arrays(good[:3], lab[:3])
    with pytest.raises(NetError, match="same first dimension"):
        layer.set_input_arrays(good, lab[:2])
    with pytest.raises(NetError, match="labels array must be float32"):
        layer.set_input_arrays(good, lab.astype(np.int64))
    with pytest.raises(NetError, match="must be specified and positive"):
        make_layer('type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 }', [], 2, TEST)


def test_memory_data_add_mat_vector_transforms():
    layer, bottom, top = make_layer('type: "MemoryData" memory_data_param { batch_size: 1 channels: 3 height: 2 '
                                    'width: 2 } transform_param { crop_size: 2 scale: 2 }', [], 2, TEST)
    mat = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    layer.add_mat_vector([mat], [7])
    d, lab = run(layer, bottom, top)
    np.testing.assert_array_equal(d[0], mat[1:3, 1:3].transpose(2, 0, 1).astype(np.float32) * 2)
    assert lab.ravel().tolist() == [7]


# --- HDF5Data ----------------------------------------------------------------------------------------

def test_hdf5_data_reads_files_in_order_and_wraps(tmp_path):
    h5py = pytest.importorskip("h5py")
    rows = []
    for k, n in enumerate((3, 2)):
        data = np.arange(n * 2 * 3, dtype=np.float64).reshape(n, 2, 3) + 100 * k
        label = np.arange(n, dtype=np.int32) + 10 * k
        with h5py.File(tmp_path / f"f{k}.h5", "w") as f:
            f["data"] = data
            f["label"] = label
        rows += [(d, lab) for d, lab in zip(data, label)]
    lst = tmp_path / "list.txt"
    lst.write_text("f0.h5\nf1.h5\n")            # relative to the list file
    layer, bottom, top = make_layer(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
                                    f'source: "{lst}" batch_size: 4 }}', [], 2, TRAIN)
    assert top[0].shape == (4, 2, 3) and top[1].shape == (4,)
    order = [0, 1, 2, 3, 4, 0, 1, 2]
    d1, l1 = run(layer, bottom, top)
    d2, l2 = run(layer, bottom, top)
    np.testing.assert_array_equal(np.concatenate([d1, d2]), np.stack([rows[i][0] for i in order]))
    assert np.concatenate([l1, l2]).tolist() == [rows[i][1] for i in order]


def test_hdf5_data_shuffle_covers_and_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(6, dtype=np.float32).reshape(6, 1)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'a.h5'}\n")
    layer, bottom, top = make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{lst}" '
                                    f'batch_size: 6 shuffle: true }}', [], 1, TRAIN)
    assert sorted(run(layer, bottom, top)[0].ravel().tolist()) == list(range(6))
    with pytest.raises(DataError, match=r"a.h5: no dataset 'label'"):
        make_layer(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{lst}" '
                   f'batch_size: 2 }}', [], 2, TRAIN)
    with pytest.raises(NetError, match="does not transform data"):
        make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{lst}" batch_size: 2 }} '
                   f'transform_param {{ scale: 2 }}', [], 1, TRAIN)
    with pytest.raises(DataError, match="nolist.txt: HDF5 list file not found"):
        make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{tmp_path / "nolist.txt"}" '
                   f'batch_size: 2 }}', [], 1, TRAIN)


def test_hdf5_data_without_h5py_says_so(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "h5py":
            raise ImportError("no h5py")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    lst = tmp_path / "list.txt"
    lst.write_text("a.h5\n")
    with pytest.raises(MinicaffeError, match=r"HDF5Data needs h5py: pip install 'minicaffe\[hdf5\]'"):
        make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{lst}" batch_size: 2 }}',
                   [], 1, TRAIN)


def test_data_layers_have_no_backward(tmp_path):
    db = make_db(tmp_path / "db", images(2))
    layer, bottom, top = data_layer(db, 1)
    assert layer.allow_force_backward(0) is False
    layer.backward(top, [], bottom)      # nothing to do, nothing raised
    layer.close()
    assert os.path.isdir(db)
