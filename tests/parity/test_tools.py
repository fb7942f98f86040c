"""convert_imageset and compute_image_mean against BVLC Caffe's own binaries, on the same images and
list file (shuffle off): the same keys in the same order and the same Datum bytes, and the same mean.

Datums are compared byte for byte; only an image that both engines re-encoded with OpenCV (``--encoded``
with a resize or another ``--encode_type``) may differ in its compressed bytes, which depend on the
libpng/libjpeg each OpenCV was built with, and is then compared decoded (same label, size and pixels).
"""
import lmdb
import numpy as np
import pytest

from minicaffe.proto import caffe_pb2

SIZES = [(9, 11), (12, 8), (10, 10), (7, 13), (11, 9), (8, 8)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Color and gray PNG and JPEG files of several sizes, and a list file naming them with labels."""
    import cv2
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(3)
    lines = []
    for i, (h, w) in enumerate(SIZES):
        gray = i % 3 == 2
        img = rng.randint(0, 256, size=(h, w) if gray else (h, w, 3)).astype(np.uint8)
        name = f"img{i}.{'jpg' if i % 2 else 'png'}"
        assert cv2.imwrite(str(root / name), img)
        lines.append(f"{name} {i % 4}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


def read_db(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


def decoded(value):
    """(label, channels, height, width, encoded, pixels) of a Datum, decoding an encoded one with OpenCV."""
    import cv2
    d = caffe_pb2.Datum.FromString(value)
    if d.encoded:
        pixels = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        pixels = np.frombuffer(d.data, np.uint8)
    return d.label, d.channels, d.height, d.width, d.encoded, pixels


FLAGSETS = {
    "raw": [],
    "raw_gray": ["--gray"],
    "raw_resize": ["--resize_height=10", "--resize_width=12"],
    "raw_gray_resize": ["--gray", "--resize_height=6", "--resize_width=5"],
    "encoded": ["--encoded"],
    "encoded_png": ["--encoded", "--encode_type=png"],
    "encoded_resize": ["--encoded", "--resize_height=10", "--resize_width=12"],
    "encoded_gray": ["--encoded", "--gray"],
}

@pytest.mark.parametrize("flags", sorted(FLAGSETS))
def test_convert_imageset_matches_caffe(ref, images, tmp_path, flags):
    from minicaffe.tools import convert_imageset
    args = FLAGSETS[flags] + ["--backend=lmdb"]
    root, listfile = str(images) + "/", str(images / "list.txt")
    ref.run("convert_imageset", *args, root, listfile, tmp_path / "caffe_db")
    assert convert_imageset.main(args + ["--jobs=1", root, listfile, str(tmp_path / "mini_db")]) == 0
    theirs, mine = read_db(tmp_path / "caffe_db"), read_db(tmp_path / "mini_db")
    assert [k for k, _ in mine] == [k for k, _ in theirs]
    for (key, a), (_, b) in zip(mine, theirs):
        if a == b:
            continue
        # only an image both engines re-encoded may differ, and only in its compressed bytes
        da, db = decoded(a), decoded(b)
        assert da[4] and db[4], f"{key}: Datum bytes differ from Caffe's"
        assert da[:4] == db[:4] and da[5].shape == db[5].shape, \
            f"{key}: {da[:4]} {da[5].shape} vs Caffe's {db[:4]} {db[5].shape}"
        lossy = key.endswith(b".jpg") and "--encode_type=png" not in FLAGSETS[flags]
        tol = 2 if lossy else 0        # libjpeg versions may round a re-encoded JPEG differently
        assert np.abs(da[5].astype(int) - db[5]).max() <= tol, f"{key}: decoded pixels differ from Caffe's"


@pytest.mark.parametrize("flags", ["raw", "raw_gray"])
def test_compute_image_mean_matches_caffe(ref, images, tmp_path, flags):
    from minicaffe.tools import compute_image_mean, convert_imageset
    args = FLAGSETS[flags] + ["--resize_height=8", "--resize_width=9"]
    root, listfile = str(images) + "/", str(images / "list.txt")
    assert convert_imageset.main(args + ["--jobs=1", root, listfile, str(tmp_path / "db")]) == 0
    ref.run("compute_image_mean", "--backend=lmdb", tmp_path / "db", tmp_path / "caffe_mean.binaryproto")
    assert compute_image_mean.main([str(tmp_path / "db"), str(tmp_path / "mini_mean.binaryproto")]) == 0
    theirs = caffe_pb2.BlobProto.FromString((tmp_path / "caffe_mean.binaryproto").read_bytes())
    mine = caffe_pb2.BlobProto.FromString((tmp_path / "mini_mean.binaryproto").read_bytes())
    assert list(mine.shape.dim) == list(theirs.shape.dim)
    assert (mine.num, mine.channels, mine.height, mine.width) == \
        (theirs.num, theirs.channels, theirs.height, theirs.width)
    np.testing.assert_allclose(np.asarray(mine.data), np.asarray(theirs.data), rtol=1e-6, atol=0)
