"""Datum records against bytes built by hand from Caffe's field numbers, and image list files.

Datum (caffe.proto): channels 1, height 2, width 3, data 4 (bytes), label 5, float_data 6 (repeated
float, proto2 so not packed), encoded 7.
"""
import struct

import cv2
import numpy as np
import pytest

from minicaffe.data import (array_to_datum, datum_to_array, encode_datum, join_root, parse_datum,
                            read_image_list)
from minicaffe.formats.datum import cv_image_to_datum_bytes
from minicaffe.errors import DataError
from minicaffe.proto import caffe_pb2
from minicaffe.tools.convert_imageset import make_record


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def f_varint(field, n):
    return varint(field << 3) + varint(n)


def f_bytes(field, data):
    return varint((field << 3) | 2) + varint(len(data)) + data


def f_float(field, x):
    return varint((field << 3) | 5) + struct.pack("<f", x)


def raw_datum_bytes(c, h, w, data, label=None, encoded_false=False):
    out = f_varint(1, c) + f_varint(2, h) + f_varint(3, w) + f_bytes(4, data)
    if label is not None:
        out += f_varint(5, label)
    if encoded_false:
        out += f_varint(7, 0)
    return out


def test_raw_datum_from_caffe_bytes_decodes_chw():
    arr = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 7
    blob = raw_datum_bytes(2, 2, 3, arr.tobytes(), label=9)
    datum = parse_datum(blob, "db: record 'k'")
    assert datum.label == 9
    out = datum_to_array(datum)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, arr)


def test_array_to_datum_serialises_like_caffe():
    arr = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    assert array_to_datum(arr, label=300).SerializeToString() == raw_datum_bytes(3, 4, 5, arr.tobytes(), 300)
    # no label given: no label field, as pycaffe's array_to_datum
    assert array_to_datum(arr).SerializeToString() == raw_datum_bytes(3, 4, 5, arr.tobytes())


def test_float_datum_matches_caffe_bytes_both_ways():
    arr = np.array([0.5, -1.25, 3.0, 7.75], np.float32).reshape(1, 2, 2)
    blob = f_varint(1, 1) + f_varint(2, 2) + f_varint(3, 2) + f_varint(5, 4) + \
        b"".join(f_float(6, float(x)) for x in arr.ravel())
    datum = parse_datum(blob)
    out = datum_to_array(datum)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)
    # our serialisation puts fields in number order: 1 2 3 5 6 6 6 6
    ours = array_to_datum(arr, label=4).SerializeToString()
    assert ours == blob


def test_convert_imageset_record_is_caffe_cvmattodatum_bytes(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, img)
    payload, shape = make_record(path, 3)
    # Caffe's CVMatToDatum sets encoded=false explicitly and stores C×H×W BGR
    assert payload == raw_datum_bytes(3, 4, 5, img.transpose(2, 0, 1).tobytes(), label=3, encoded_false=True)
    assert shape == (3, 4, 5)


@pytest.mark.parametrize("shape,label", [((4, 5, 3), 3), ((300, 2), -7), ((1, 200, 4), 2 ** 31 - 1)])
def test_fast_record_serialisation_equals_protobuf(shape, label):
    img = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    d = caffe_pb2.Datum(channels=chw.shape[0], height=chw.shape[1], width=chw.shape[2],
                        data=np.ascontiguousarray(chw).tobytes(), label=label, encoded=False)
    assert cv_image_to_datum_bytes(img, label) == d.SerializeToString()


def test_encoded_datum_decodes_with_opencv(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", img)
    png = png.tobytes()
    blob = f_bytes(4, png) + f_varint(5, 1) + f_varint(7, 1)      # what Caffe's ReadFileToDatum writes
    datum = parse_datum(blob)
    assert encode_datum(png, label=1).SerializeToString() == blob
    np.testing.assert_array_equal(datum_to_array(datum), img.transpose(2, 0, 1))
    gray = datum_to_array(datum, force_gray=True)
    assert gray.shape == (1, 6, 7)
    np.testing.assert_array_equal(gray[0], cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE))
    # a gray PNG decodes natively to 1 channel, to 3 with force_color
    ok, gpng = cv2.imencode(".png", img[:, :, 0])
    gd = encode_datum(gpng.tobytes())
    assert datum_to_array(gd).shape == (1, 6, 7)
    col = datum_to_array(gd, force_color=True)
    assert col.shape == (3, 6, 7)
    np.testing.assert_array_equal(col[0], img[:, :, 0])


def test_encode_datum_from_array_roundtrips_png():
    arr = np.random.default_rng(3).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    datum = encode_datum(arr, label=2, encode_type="png")
    assert datum.encoded and datum.label == 2 and not datum.HasField("channels")
    np.testing.assert_array_equal(datum_to_array(datum), arr)


def test_not_a_datum_names_db_and_key():
    with pytest.raises(DataError, match=r"train_lmdb: record '00000003_a.jpg': not a Datum"):
        parse_datum(b"not a datum at all", "train_lmdb: record '00000003_a.jpg'")
    with pytest.raises(DataError, match="not a Datum"):
        parse_datum(f_varint(1, 3), "db: record 'k'")     # parses, but holds no pixels


def test_data_length_mismatch_names_sizes():
    datum = parse_datum(raw_datum_bytes(3, 2, 2, b"\x00" * 11))
    with pytest.raises(DataError, match=r"db: record 'k': data has 11 bytes, but .* 3x2x2 = 12"):
        datum_to_array(datum, where="db: record 'k'")
    fd = array_to_datum(np.zeros((1, 2, 2), np.float32))
    fd.height = 3
    with pytest.raises(DataError, match="float_data has 4 values"):
        datum_to_array(fd)


def test_encoded_garbage_is_reported():
    datum = encode_datum(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"db: record 'x': encoded data \(\d+ bytes\) is not an image"):
        datum_to_array(datum, where="db: record 'x'")
    with pytest.raises(DataError, match="both force_color and force_gray"):
        datum_to_array(datum, force_color=True, force_gray=True)


def test_array_to_datum_needs_3d():
    with pytest.raises(DataError, match="3-d"):
        array_to_datum(np.zeros((4, 4), np.uint8))


def test_read_image_list_paths_with_spaces_and_errors(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("dir one/a b.jpg 3\n\n  c.png\t7  \r\n")
    assert read_image_list(str(lst)) == [("dir one/a b.jpg", 3, 1), ("c.png", 7, 3)]
    lst.write_text("a.jpg 1\nb.jpg\n")
    with pytest.raises(DataError, match=r"list.txt:2: .*no label"):
        read_image_list(str(lst))
    lst.write_text("a.jpg 1\nb.jpg 1\nc.jpg cat\n")
    with pytest.raises(DataError, match=r"list.txt:3: label 'cat' is not an integer"):
        read_image_list(str(lst))
    with pytest.raises(DataError, match="missing.txt: list file not found"):
        read_image_list(str(tmp_path / "missing.txt"))


def test_join_root_is_caffe_concatenation():
    assert join_root("/data/train/", "n01/x.JPEG") == "/data/train/n01/x.JPEG"
    assert join_root("/data/train", "x.JPEG") == "/data/train/x.JPEG"
    assert join_root("", "rel/x.png") == "rel/x.png"
