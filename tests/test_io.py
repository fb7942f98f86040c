"""caffe.io: BlobProto/Datum conversion (checked against bytes built from Caffe's field numbers),
image loading, resizing, 10-crop oversampling and the Transformer."""
import struct

import cv2
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import io as cio
from minicaffe.errors import DataError, MinicaffeError, ParseError
from minicaffe.proto import caffe_pb2


def _varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _packed_floats(field, values):
    body = struct.pack(f"<{len(values)}f", *values)
    return _varint(field << 3 | 2) + _varint(len(body)) + body


# --- BlobProto ------------------------------------------------------------------------------------

def test_blobproto_legacy_fields_from_raw_bytes():
    # num=1 (field 1), channels=2 (2), height=1 (3), width=3 (4), data packed floats (5)
    raw = b"\x08\x01\x10\x02\x18\x01\x20\x03" + _packed_floats(5, [0, 1, 2, 3, 4, 5])
    blob = caffe_pb2.BlobProto.FromString(raw)
    arr = cio.blobproto_to_array(blob)
    assert arr.shape == (1, 2, 1, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr.ravel(), np.arange(6))


def test_array_to_blobproto_writes_caffe_field_numbers():
    arr = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    raw = cio.array_to_blobproto(arr, diff=arr * 2).SerializeToString()
    shape = b"\x0a\x02\x01\x03"                        # BlobShape.dim (1) packed int64: 1, 3
    expected_data = _packed_floats(5, [1.5, -2.0, 3.25])
    expected_diff = _packed_floats(6, [3.0, -4.0, 6.5])
    assert (b"\x3a" + _varint(len(shape)) + shape) in raw      # shape is field 7
    assert expected_data in raw and expected_diff in raw
    back = caffe_pb2.BlobProto.FromString(raw)
    np.testing.assert_array_equal(cio.blobproto_to_array(back), arr)
    np.testing.assert_array_equal(cio.blobproto_to_array(back, return_diff=True), arr * 2)


def test_blobproto_shapes_scalars_doubles_and_errors():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([123.0])
    assert cio.blobproto_to_array(blob).shape == () and cio.blobproto_to_array(blob) == 123
    blob = caffe_pb2.BlobProto()
    blob.data.extend(np.zeros(100).tolist())
    with pytest.raises(ValueError, match=r"100 data values but its shape \(\) needs 1"):
        cio.blobproto_to_array(blob)
    blob.shape.dim.extend([10, 10])
    assert cio.blobproto_to_array(blob).shape == (10, 10)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2])
    blob.double_data.extend([1e-300, 2.0])
    arr = cio.blobproto_to_array(blob)
    assert arr.dtype == np.float64 and arr[0] == 1e-300
    with pytest.raises(MinicaffeError, match="diff shape"):
        cio.array_to_blobproto(np.zeros(3), diff=np.zeros(4))


def test_blobprotovector_round_trip_and_bad_bytes():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2, 2, 1), np.float32)]
    data = cio.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(data, bytes)
    back = cio.blobprotovector_str_to_arraylist(data)
    assert len(back) == 2
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ParseError, match="BlobProtoVector"):
        cio.blobprotovector_str_to_arraylist(b"\xff\xff\xff")


# --- Datum --------------------------------------------------------------------------------------

def test_datum_round_trips():
    img = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    d = cio.array_to_datum(img, label=7)
    assert (d.channels, d.height, d.width, d.label) == (2, 3, 4, 7) and d.data == img.tobytes()
    np.testing.assert_array_equal(cio.datum_to_array(d), img)
    f = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    d = cio.array_to_datum(f)
    assert len(d.float_data) == 24 and not d.data
    np.testing.assert_allclose(cio.datum_to_array(d), f)
    # not setting the label makes a smaller record (pycaffe's check)
    assert len(cio.array_to_datum(img, label=1).SerializeToString()) > \
        len(cio.array_to_datum(img).SerializeToString())
    with pytest.raises(DataError, match="3-d"):
        cio.array_to_datum(np.zeros((3, 3)))


# --- mean files ---------------------------------------------------------------------------------

def test_load_mean_binaryproto_and_npy(tmp_path):
    mean = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(cio.array_to_blobproto(mean[np.newaxis]).SerializeToString())
    np.testing.assert_array_equal(cio.load_mean(path), mean)
    npy = tmp_path / "mean.npy"
    np.save(npy, mean.astype(np.float64))
    got = cio.load_mean(npy)
    assert got.dtype == np.float32 and got.shape == (3, 4, 5)
    with pytest.raises(DataError, match="nope.binaryproto: no such mean file"):
        cio.load_mean(tmp_path / "nope.binaryproto")
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(MinicaffeError, match="bad.binaryproto"):
        cio.load_mean(bad)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(5))
    with pytest.raises(DataError, match="flat.npy: a mean must be C×H×W"):
        cio.load_mean(flat)


# --- images -------------------------------------------------------------------------------------

def test_load_image_colour_gray_alpha_16bit(tmp_path):
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 255          # B, G, R
    path = str(tmp_path / "c.png")
    cv2.imwrite(path, bgr)
    img = cio.load_image(path)
    assert img.shape == (2, 3, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[0, 0], [1.0, 20 / 255, 10 / 255], rtol=1e-6)   # RGB
    gray = cio.load_image(path, color=False)
    assert gray.shape == (2, 3, 1)
    np.testing.assert_allclose(gray[0, 0, 0], 0.2125 + 0.7154 * 20 / 255 + 0.0721 * 10 / 255, rtol=1e-5)

    gpath = str(tmp_path / "g.png")
    cv2.imwrite(gpath, np.full((4, 5), 51, np.uint8))
    g3 = cio.load_image(gpath)
    assert g3.shape == (4, 5, 3)
    np.testing.assert_allclose(g3, 0.2)
    assert cio.load_image(gpath, color=False).shape == (4, 5, 1)

    apath = str(tmp_path / "a.png")
    cv2.imwrite(apath, np.dstack([bgr, np.full((2, 3), 7, np.uint8)]))
    np.testing.assert_allclose(cio.load_image(apath), img)

    wpath = str(tmp_path / "w.png")
    cv2.imwrite(wpath, np.full((2, 2), 65535, np.uint16))
    np.testing.assert_allclose(cio.load_image(wpath), 1.0)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jpg: no such image file"):
        cio.load_image(str(tmp_path / "missing.jpg"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"junk\.jpg: cannot decode as an image"):
        cio.load_image(str(junk))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: cannot decode"):
        cio.load_image(str(empty))
    with pytest.raises(DataError, match="is a directory"):
        cio.load_image(str(tmp_path))


def test_resize_image_values_and_shapes():
    # pycaffe's values (checked against BVLC's caffe.io in test_pycaffe_surface.py): 1 and 3 channels
    # go through scikit-image (pixel centres, zeros beyond the border, so the last sample is 0.75)...
    im = np.array([[0.0, 1.0]], dtype=np.float32)[:, :, np.newaxis]
    out = cio.resize_image(im, (1, 4))
    assert out.shape == (1, 4, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(cio.resize_image(im, (1, 4), interp_order=0)[0, :, 0], [0, 0, 1, 1])
    # ... other channel counts through scipy.ndimage.zoom (corners aligned)
    two = np.concatenate([im, 1 - im], axis=2)
    np.testing.assert_allclose(cio.resize_image(two, (1, 4))[0], [[0, 1], [1 / 3, 2 / 3], [2 / 3, 1 / 3], [1, 0]],
                               rtol=1e-6)
    const = np.full((5, 5, 3), 0.3, np.float32)
    np.testing.assert_allclose(cio.resize_image(const, (2, 7)), 0.3)
    # any number of channels, each resized on its own
    rng = np.random.default_rng(1)
    for k in (2, 7, 600):
        many = rng.random((6, 8, k)).astype(np.float32)
        got = cio.resize_image(many, (3, 5))
        assert got.shape == (3, 5, k)
        np.testing.assert_allclose(got[:, :, k - 2:], cio.resize_image(many[:, :, k - 2:], (3, 5)), rtol=1e-6)
    got = cio.resize_image(rng.random((6, 8, 7)).astype(np.float32), (12, 16), interp_order=3)
    assert got.shape == (12, 16, 7)
    with pytest.raises(DataError, match="H×W×K"):
        cio.resize_image(np.zeros((4, 4)), (2, 2))


def _position_image(h, w, k=1):
    y, x = np.mgrid[0:h, 0:w]
    return np.repeat((y * 1000 + x).astype(np.float32)[:, :, np.newaxis], k, axis=2)


def test_oversample_order_and_positions():
    h, w, ch, cw = 9, 11, 4, 5
    ims = [_position_image(h, w, 2), _position_image(h, w, 2) + 0.5]
    crops = cio.oversample(ims, (ch, cw))
    assert crops.shape == (20, ch, cw, 2) and crops.dtype == np.float32
    # corners TL, TR, BL, BR, then the centre: center (4.5, 5.5) - (2, 2.5) = (2.5, 3.0) → (2, 3)
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (2, 3)]
    for i, (y, x) in enumerate(corners):
        assert crops[i, 0, 0, 0] == y * 1000 + x
        np.testing.assert_array_equal(crops[i], ims[0][y:y + ch, x:x + cw])
        np.testing.assert_array_equal(crops[i + 5], ims[0][y:y + ch, x:x + cw][:, ::-1])   # mirror
        np.testing.assert_array_equal(crops[10 + i], ims[1][y:y + ch, x:x + cw])
    # an N×H×W×K array works too
    np.testing.assert_array_equal(cio.oversample(np.stack(ims), (ch, cw)), crops)
    with pytest.raises(DataError, match="does not fit"):
        cio.oversample(ims, (10, 5))


# --- Transformer ---------------------------------------------------------------------------------

def _transformer(shape=(1, 3, 4, 5)):
    t = cio.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_by_hand_and_deprocess():
    rng = np.random.default_rng(2)
    img = rng.random((4, 5, 3)).astype(np.float32)
    keep = img.copy()
    t = _transformer()
    out = t.preprocess("data", img)
    expected = (img.transpose(2, 0, 1)[::-1] * 255 - np.array([10, 20, 30])[:, None, None]) * 0.5
    assert out.shape == (3, 4, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(img, keep)                 # the caller's image is untouched
    np.testing.assert_allclose(t.deprocess("data", out[np.newaxis]), img, rtol=1e-5, atol=1e-5)
    # a batch gives the same as one by one
    batch = rng.random((3, 4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(t.preprocess_batch("data", batch),
                               np.stack([t.preprocess("data", b) for b in batch]), rtol=1e-6)


def test_transformer_resizes_inputs_and_full_means():
    t = cio.Transformer({"data": (1, 3, 4, 6)})
    t.set_transpose("data", (2, 0, 1))
    img = np.full((8, 12, 3), 0.5, np.float32)
    img[:, :, 1] = 0.25
    out = t.preprocess("data", img)
    assert out.shape == (3, 4, 6)
    np.testing.assert_allclose(out[1], 0.25)
    mean = np.zeros((3, 8, 12), np.float32)
    mean[2] = 7
    t.set_mean("data", mean)                               # resized to 4×6, as pycaffe does
    assert t.mean["data"].shape == (3, 4, 6)
    got = t.preprocess("data", img)[2]
    np.testing.assert_allclose(got[1:-1, 1:-1], 0.5 - 7, rtol=1e-6)
    # pycaffe's anti-aliasing blur sees zeros beyond the border: the mean fades there (BVLC gives
    # -5.797208 at the corners, -6.1389475 along the edges)
    np.testing.assert_allclose(got[0, [0, 1, -1]], [-5.797208, -6.1389475, -5.797208], rtol=1e-6)
    t.set_mean("data", np.ones((1, 3, 4, 6)))              # a 1×C×H×W blob mean is fine too
    assert t.mean["data"].shape == (3, 4, 6)
    g = cio.Transformer({"data": (1, 1, 2, 2)})
    g.set_mean("data", np.ones((2, 2)))                     # H×W mean for one channel
    assert g.mean["data"].shape == (1, 2, 2)


def test_transformer_errors_are_clear():
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    with pytest.raises(ValueError, match=r"'label' is not one of the net inputs \(data\)"):
        t.set_raw_scale("label", 2)
    with pytest.raises(ValueError, match="mean has 4 channel values but the input has 3 channels"):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError, match="mean has 1 channels but the input has 3"):
        t.set_mean("data", np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"order \(1, 0\) must be a permutation of 3 axes"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(ValueError, match=r"order \(1, 0\) has 2 entries but the input has 3 channels"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="outside 0..2"):
        t.set_channel_swap("data", (0, 1, 5))
    t.set_mean("data", np.zeros(3))
    with pytest.raises(ValueError, match="does not fit data of shape .*set_transpose first"):
        t.preprocess("data", np.zeros((4, 5, 3)))        # H×W×K without a transpose
    assert issubclass(cio.TransformerError, MinicaffeError)


def test_caffe_io_is_this_module():
    assert caffe.io is cio
    assert caffe.io.Transformer is cio.Transformer
