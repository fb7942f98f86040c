"""compute_image_mean: the mean BlobProto, Caffe's per-channel lines, and the colour PCA extension."""

import os

import lmdb
import numpy as np
import pytest

from minicaffe.data import array_to_datum, encode_datum, load_mean_file, load_pca_file
from minicaffe.errors import DataError
from minicaffe.proto import caffe_pb2
from minicaffe.tools import compute_image_mean as cim


def make_db(path, arrays, encoded=None):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, arr in enumerate(arrays):
            d = encode_datum(arr, i, encoded) if encoded else array_to_datum(arr, i)
            txn.put(b"%08d_%d.png" % (i, i), d.SerializeToString())
    env.close()
    return str(path)


def test_mean_matches_numpy_and_prints_channel_means(tmp_path, log_text):
    arrs = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    db = make_db(tmp_path / "db", arrs)
    out = tmp_path / "mean.binaryproto"
    assert cim.main([db, str(out)]) == 0
    bp = caffe_pb2.BlobProto.FromString(out.read_bytes())
    assert (bp.num, bp.channels, bp.height, bp.width) == (1, 3, 5, 4)      # Caffe's legacy 4-d fields
    mean = load_mean_file(str(out))
    np.testing.assert_allclose(mean, arrs.astype(np.float64).mean(axis=0), atol=1e-5)
    text = log_text.getvalue()
    for c in range(3):
        assert f"mean_value channel [{c}]: {arrs[:, c].astype(np.float64).mean():g}" in text
    assert "Number of channels: 3" in text and "Processed 7 files." in text


def test_encoded_records_give_the_same_mean(tmp_path):
    arrs = np.random.default_rng(1).integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    raw = cim.compute_image_mean(make_db(tmp_path / "raw", arrs))
    enc = cim.compute_image_mean(make_db(tmp_path / "png", arrs, "png"))
    np.testing.assert_allclose(raw["mean"], enc["mean"], atol=1e-9)
    assert raw["count"] == 4


def test_float_records(tmp_path):
    arrs = np.random.default_rng(2).normal(size=(5, 1, 2, 3)).astype(np.float32)
    res = cim.compute_image_mean(make_db(tmp_path / "db", arrs))
    np.testing.assert_allclose(res["mean"], arrs.astype(np.float64).mean(axis=0), atol=1e-6)


def test_size_mismatch_names_the_key(tmp_path, capsys):
    arrs = [np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8), np.zeros((3, 5, 4), np.uint8)]
    db = make_db(tmp_path / "db", arrs)
    assert cim.main([db, str(tmp_path / "m.binaryproto")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "record '00000002_2.png': size 3x5x4" in err and "'00000000_0.png' (3x4x4)" in err
    assert not (tmp_path / "m.binaryproto").exists()


def test_pca_covariance_on_synthetic_colours(tmp_path):
    rng = np.random.default_rng(3)
    true_cov = np.array([[400.0, 120.0, 30.0], [120.0, 300.0, -50.0], [30.0, -50.0, 200.0]])
    pix = rng.multivariate_normal([120, 110, 100], true_cov, size=6 * 16 * 16)
    arrs = np.clip(np.rint(pix), 0, 255).astype(np.uint8).reshape(6, 16, 16, 3).transpose(0, 3, 1, 2)
    db = make_db(tmp_path / "db", arrs)
    out = tmp_path / "mean.binaryproto"
    assert cim.main(["--pca", db, str(out)]) == 0
    lam, vecs = load_pca_file(str(tmp_path / "mean_pca.binaryproto"))
    flat = arrs.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    expect = np.cov(flat, bias=True)
    got = (vecs * lam) @ vecs.T
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(lam) <= 0)                                      # largest first
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-5)
    # --pca_file puts it elsewhere
    assert cim.main(["--pca", "--pca_file", str(tmp_path / "eig.bin"), db]) == 0
    assert np.allclose(load_pca_file(str(tmp_path / "eig.bin"))[0], lam)


def test_errors(tmp_path, capsys):
    assert cim.main([str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such LMDB database" in capsys.readouterr().err
    lmdb.open(str(tmp_path / "empty")).close()
    assert cim.main([str(tmp_path / "empty")]) == 1
    assert "empty: the database is empty" in capsys.readouterr().err
    db = make_db(tmp_path / "db", [np.zeros((1, 2, 2), np.uint8)])
    assert cim.main(["--pca", db]) == 1
    assert "--pca needs OUTPUT_FILE or --pca_file" in capsys.readouterr().err
    assert cim.main(["--pca", db, str(tmp_path / "m.binaryproto")]) == 1
    assert "--pca needs 3-channel images" in capsys.readouterr().err
    assert cim.main(["--backend", "bdb", db]) == 1
    assert "unknown database backend 'bdb' (use lmdb or leveldb)" in capsys.readouterr().err
    with pytest.raises(DataError, match="not an LMDB"):
        (tmp_path / "plain").mkdir()
        cim.compute_image_mean(str(tmp_path / "plain"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_record_is_refused_naming_the_key(tmp_path, capsys, bad):
    """A float_data record holding NaN made a NaN mean and exit 0: refused in one line, nothing written."""
    arrs = np.random.default_rng(3).normal(size=(3, 1, 2, 3)).astype(np.float32)
    arrs[1, 0, 1, 2] = bad
    db = make_db(tmp_path / "db", arrs)
    out = tmp_path / "mean.binaryproto"
    assert cim.main([db, str(out)]) == 1
    err = capsys.readouterr().err
    name = "NaN" if np.isnan(bad) else "Inf"
    assert err.strip().splitlines() == [f"error: {db}: record '00000001_1.png': float_data holds {name} "
                                        f"(at 1 of 6 values); no mean written"]
    assert sorted(os.listdir(tmp_path)) == ["db"]
