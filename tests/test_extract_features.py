"""extract_features: per-image features as Datums in new LMDBs, keyed %010d, read back against a forward pass."""
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.proto import caffe_pb2
from minicaffe.tools import extract_features as ef

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DummyData draws new gaussian images at every forward, so each batch differs
FEATURE_NET = """
name: "feat"
layer { name: "data" type: "DummyData" top: "data"
        dummy_data_param { shape { dim: 3 dim: 2 dim: 5 dim: 5 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: -0.2 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

# the same layers fed by an Input layer, to recompute the features from the stored images
CHECK_NET = FEATURE_NET.replace(
    'type: "DummyData" top: "data"\n        dummy_data_param { shape { dim: 3 dim: 2 dim: 5 dim: 5 } '
    'data_filler { type: "gaussian" std: 1 } }',
    'type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 5 dim: 5 } }')


@pytest.fixture
def model(tmp_path):
    proto = tmp_path / "feat.prototxt"
    proto.write_text(FEATURE_NET)
    weights = tmp_path / "feat.caffemodel"
    caffe.Net(str(proto), caffe.TEST).save(str(weights))
    check = tmp_path / "check.prototxt"
    check.write_text(CHECK_NET)
    return str(proto), str(weights), str(check)


def _read_db(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        items = [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    return items


def _features(items):
    return np.stack([np.asarray(d.float_data, np.float32).reshape(d.channels, d.height, d.width)
                     for _, d in items])


def test_round_trip_against_forward_pass(tmp_path, model):
    proto, weights, check = model
    dbs = [str(tmp_path / n) for n in ("data_db", "conv_db", "ip_db")]
    assert ef.main([weights, proto, "data,conv,ip", ",".join(dbs), "4", "lmdb"]) == 0
    data, conv, ip = (_read_db(p) for p in dbs)
    for items in (data, conv, ip):
        assert [k for k, _ in items] == ["%010d" % i for i in range(12)]     # 4 batches x 3 images
        assert all(not d.HasField("data") and not d.HasField("label") for _, d in items)
    assert (data[0][1].channels, data[0][1].height, data[0][1].width) == (2, 5, 5)
    assert (conv[0][1].channels, conv[0][1].height, conv[0][1].width) == (4, 3, 3)
    assert (ip[0][1].channels, ip[0][1].height, ip[0][1].width) == (6, 1, 1)   # N x D blob: D x 1 x 1

    images = _features(data)
    assert not np.allclose(images[:3], images[3:6])          # every batch is new data
    net = caffe.Net(check, weights, caffe.TEST)
    for b in range(4):
        out = net.forward(data=images[3 * b:3 * b + 3])
        np.testing.assert_allclose(_features(conv[3 * b:3 * b + 3]), net.blobs["conv"].data, rtol=1e-5, atol=1e-6)
        # "ip" is read after the in-place ReLU, as Caffe reads it after a whole forward pass
        expected_ip = net.blobs["ip"].data.reshape(3, 6, 1, 1)
        np.testing.assert_allclose(_features(ip[3 * b:3 * b + 3]), expected_ip, rtol=1e-5, atol=1e-6)
        assert (expected_ip >= 0).all() and "prob" in out
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_datum_bytes_match_caffe_field_numbers():
    """channels 1, height 2, width 3 as varints, then float_data 6 unpacked (tag 0x35 + float32)."""
    feats = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)          # two images, D = 2
    values = ef.feature_datums(feats)
    body = b"".join(b"\x35" + np.float32(v).tobytes() for v in feats[1])
    assert values[1] == b"\x08\x02\x10\x01\x18\x01" + body
    assert ef.legacy_shape((7,)) == (7, 1, 1, 1) and ef.legacy_shape((2, 3, 4)) == (2, 3, 4, 1)
    scalar = ef.feature_datums(np.float32(0.5))                         # a 0-d blob (e.g. a loss)
    assert len(scalar) == 1 and caffe_pb2.Datum.FromString(scalar[0]).float_data[0] == 0.5


def test_existing_db_is_refused(tmp_path, model, capsys):
    proto, weights, _ = model
    existing = tmp_path / "ip_db"
    existing.mkdir()
    assert ef.main([weights, proto, "ip", str(existing), "1", "lmdb"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ip_db: already exists" in err
    assert os.listdir(existing) == []


def test_argument_errors(tmp_path, model, capsys):
    proto, weights, _ = model
    db = str(tmp_path / "db")
    cases = [
        (["ip,conv", db], "2 feature blob name(s) but 1 dataset name(s)"),
        (["fc7", db], "unknown feature blob name 'fc7'"),
        (["ip", db, "0"], "NUM_BATCHES must be at least 1"),
        (["ip", db, "x"], "NUM_BATCHES must be an integer"),
        (["ip", db, "1", "hdf5"], "db_type 'hdf5' is not supported; use lmdb or leveldb"),
        (["ip", db, "1", "lmdb", "TPU"], "expected CPU or GPU after DB_TYPE"),
        (["ip,conv", f"{db},{db}"], "the dataset names must differ"),
        (["ip", str(tmp_path / "no" / "db")], "does not exist"),
    ]
    for args, message in cases:
        full = [weights, proto] + args + ["1", "lmdb"][len(args) - 2:]
        assert ef.main(full) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(db)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_missing_weights_and_model(tmp_path, model, capsys):
    proto, weights, _ = model
    assert ef.main([str(tmp_path / "none.caffemodel"), proto, "ip", str(tmp_path / "db"), "1", "lmdb"]) == 1
    assert "none.caffemodel" in capsys.readouterr().err
    assert ef.main([weights, str(tmp_path / "none.prototxt"), "ip", str(tmp_path / "db"), "1", "lmdb"]) == 1
    assert "none.prototxt" in capsys.readouterr().err


def test_failure_midway_leaves_nothing(tmp_path, model, monkeypatch):
    proto, weights, _ = model
    net = caffe.Net(proto, weights, caffe.TEST)
    calls = {"n": 0}
    real = net.forward_from_to

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(net, "forward_from_to", flaky)
    with pytest.raises(KeyboardInterrupt):
        ef.extract_features(net, ["ip"], [str(tmp_path / "db")], 5)
    assert os.listdir(tmp_path) == [n for n in os.listdir(tmp_path) if not n.startswith(".db.")]
    assert not os.path.exists(tmp_path / "db")


def test_commits_in_chunks_and_grows_the_map(tmp_path, model, monkeypatch):
    proto, weights, _ = model
    monkeypatch.setattr(ef, "COMMIT_EVERY", 4)
    monkeypatch.setattr(ef, "_INITIAL_MAP_SIZE", 32 * 1024)        # too small: must grow while writing
    built = []

    class Spy(ef.LmdbBuilder):
        def finish(self):
            built.append(self.writer.env.info()["map_size"])
            super().finish()

    monkeypatch.setattr(ef, "LmdbBuilder", Spy)
    net = caffe.Net(proto, weights, caffe.TEST)
    assert ef.extract_features(net, ["data"], [str(tmp_path / "db")], 30) == [90]
    assert built[0] > 32 * 1024
    items = _read_db(str(tmp_path / "db"))
    assert [k for k, _ in items] == ["%010d" % i for i in range(90)]


def test_caffe_style_gpu_argument(tmp_path, model, monkeypatch):
    proto, weights, _ = model
    chosen = {}
    monkeypatch.setattr(ef.backend, "set_device", lambda i: chosen.setdefault("device", i))
    monkeypatch.setattr(ef.backend, "set_mode_gpu", lambda: chosen.setdefault("gpu", True))
    assert ef.main([weights, proto, "ip", str(tmp_path / "a"), "1", "lmdb", "GPU", "1"]) == 0
    assert chosen == {"device": 1, "gpu": True}
    chosen.clear()
    assert ef.main([weights, proto, "ip", str(tmp_path / "b"), "1", "lmdb", "--gpu", "2"]) == 0
    assert chosen == {"device": 2, "gpu": True}
    chosen.clear()
    assert ef.main([weights, proto, "ip", str(tmp_path / "c"), "1", "lmdb", "CPU"]) == 0
    assert chosen == {}


def test_on_gpu_matches_cpu(tmp_path, model, gpu):
    proto, weights, check = model
    assert ef.main([weights, proto, "data,ip", f"{tmp_path / 'd'},{tmp_path / 'i'}", "2", "lmdb"]) == 0
    caffe.set_mode_cpu()
    images = _features(_read_db(str(tmp_path / "d")))
    net = caffe.Net(check, weights, caffe.TEST)
    net.forward(data=images[:3])
    np.testing.assert_allclose(_features(_read_db(str(tmp_path / "i")))[:3], net.blobs["ip"].data.reshape(3, 6, 1, 1),
                               rtol=1e-4, atol=1e-5)


def test_softmax_outputs_on_cpu_argument(tmp_path, model, capsys):
    proto, weights, _ = model
    assert ef.main([weights, proto, "prob", str(tmp_path / "prob_db"), "2", "lmdb", "CPU"]) == 0
    probs = _features(_read_db(str(tmp_path / "prob_db")))
    assert probs.shape == (6, 6, 1, 1)
    np.testing.assert_allclose(probs.sum(axis=1).ravel(), 1, rtol=1e-5)


LMDB_NET = """
name: "lmdbfeat"
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "SOURCE" batch_size: 2 backend: LMDB }
        transform_param { scale: 0.5 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
"""


def test_lmdb_data_source_in_key_order(tmp_path):
    """Caffe's usual set-up: a Data layer over an image LMDB; 3 batches of 2 from 5 records wrap around."""
    from minicaffe.formats.datum import array_to_datum
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (5, 1, 4, 3), dtype=np.uint8)
    src = str(tmp_path / "images_lmdb")
    env = lmdb.open(src, map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            txn.put(b"%08d_img%d.png" % (i, i), array_to_datum(img, label=i).SerializeToString())
    env.close()
    proto = tmp_path / "net.prototxt"
    proto.write_text(LMDB_NET.replace("SOURCE", src))
    weights = str(tmp_path / "w.caffemodel")
    caffe.Net(str(proto), caffe.TEST).save(weights)
    res = subprocess.run([sys.executable, "-m", "minicaffe.tools.extract_features", weights, str(proto),
                          "data,ip,label", f"{tmp_path / 'd'},{tmp_path / 'i'},{tmp_path / 'l'}", "3", "lmdb"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Successfully extracted the features!" in res.stderr
    order = [0, 1, 2, 3, 4, 0]
    expected = images[order].astype(np.float32) * 0.5
    data = _features(_read_db(str(tmp_path / "d")))
    np.testing.assert_array_equal(data, expected)
    labels = _read_db(str(tmp_path / "l"))
    assert [d.float_data[0] for _, d in labels] == order
    assert (labels[0][1].channels, labels[0][1].height, labels[0][1].width) == (1, 1, 1)
    net = caffe.Net(str(proto), weights, caffe.TEST)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    ip = _features(_read_db(str(tmp_path / "i"))).reshape(6, 3)
    np.testing.assert_allclose(ip, expected.reshape(6, -1) @ w.T + b, rtol=1e-5, atol=1e-6)
