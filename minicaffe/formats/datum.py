"""Records and images: Caffe's ``Datum`` to and from arrays, and image files read the way Caffe reads them.

A Datum holds one example: raw ``data`` bytes (uint8, C×H×W, BGR for colour images), or ``float_data``,
or, with ``encoded`` set, the bytes of a JPEG/PNG file that OpenCV decodes. Arrays here are always
C×H×W; images straight from OpenCV are H×W×C (BGR) and are turned around with :func:`hwc_to_chw`.

Every error is a :class:`DataError` naming the database (or list file) and the record key (or line),
so a bad record among millions can be found.
"""
import os

import numpy as np

from ..deps import import_cv2
from ..errors import DataError
from ..proto import caffe_pb2

try:  # OpenCV is a hard dependency, but keep `import minicaffe` working where it is broken
    import cv2
except ImportError:  # pragma: no cover - depends on the machine
    cv2 = None


def opencv():
    """The cv2 module, or a one-line DataError saying why it does not import."""
    if cv2 is None:  # pragma: no cover - says why (not installed, or two OpenCV wheels in one cv2)
        return import_cv2("reading images", DataError)
    return cv2


def _where(where):
    return f"{where}: " if where else ""


def record_where(db_path, key):
    """The 'where' prefix used for a database record: ``<db>: record '<key>'``."""
    if isinstance(key, (bytes, bytearray)):
        key = key.decode("utf-8", "replace")
    return f"{db_path}: record '{key}'"


# --- Datum <-> bytes ---------------------------------------------------------------------------

def parse_datum(value, where=None):
    """Parse serialized bytes into a Datum; anything that is not one is a DataError naming ``where``."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(bytes(value))
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise DataError(f"{_where(where)}not a Datum ({exc})") from None
    if not datum.HasField("data") and not len(datum.float_data):
        raise DataError(f"{_where(where)}not a Datum (no data or float_data field)")
    return datum


# --- Datum <-> arrays --------------------------------------------------------------------------

def hwc_to_chw(img):
    """OpenCV's H×W(×C) image as a C×H×W view (no copy)."""
    if img.ndim == 2:
        return img[None]
    return img.transpose(2, 0, 1)


def chw_to_hwc(arr):
    """A C×H×W array as the H×W×C (or H×W for one channel) layout OpenCV functions take."""
    if arr.shape[0] == 1:
        return arr[0]
    return arr.transpose(1, 2, 0)


def decode_image(buf, force_color=False, force_gray=False, where=None):
    """Decode JPEG/PNG/... bytes with OpenCV into a C×H×W uint8 array.

    As Caffe: ``force_color`` decodes as 3-channel BGR, ``force_gray`` as 1 channel, neither keeps
    the file's own channels (``IMREAD_UNCHANGED``, Caffe's DecodeDatumToCVMatNative).
    """
    cv = opencv()
    if force_color and force_gray:
        raise DataError(f"{_where(where)}cannot set both force_color and force_gray")
    flag = cv.IMREAD_COLOR if force_color else cv.IMREAD_GRAYSCALE if force_gray else cv.IMREAD_UNCHANGED
    img = cv.imdecode(np.frombuffer(buf, np.uint8), flag) if len(buf) else None
    if img is None:
        raise DataError(f"{_where(where)}encoded data ({len(buf)} bytes) is not an image OpenCV can decode")
    if img.dtype != np.uint8:
        raise DataError(f"{_where(where)}image has {img.dtype} pixels; only 8-bit images are supported")
    return hwc_to_chw(img)


def datum_to_array(datum, force_color=False, force_gray=False, where=None):
    """The example in a Datum as a C×H×W array: uint8 for ``data``/encoded records, float32 for
    ``float_data``. Raw arrays are read-only views of the record's bytes (no copy)."""
    if datum.encoded:
        return decode_image(datum.data, force_color, force_gray, where)
    c, h, w = int(datum.channels), int(datum.height), int(datum.width)
    size = c * h * w
    if c <= 0 or h <= 0 or w <= 0:
        raise DataError(f"{_where(where)}Datum has shape {c}x{h}x{w} (channels/height/width must be positive)")
    if len(datum.data):
        if len(datum.data) != size:
            raise DataError(f"{_where(where)}data has {len(datum.data)} bytes, but channels x height x width "
                            f"= {c}x{h}x{w} = {size}")
        return np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
    if len(datum.float_data):
        if len(datum.float_data) != size:
            raise DataError(f"{_where(where)}float_data has {len(datum.float_data)} values, but channels x "
                            f"height x width = {c}x{h}x{w} = {size}")
        return np.asarray(datum.float_data, np.float32).reshape(c, h, w)
    raise DataError(f"{_where(where)}Datum has neither data nor float_data")


def array_to_datum(arr, label=None):
    """A Datum holding a C×H×W array: uint8 goes to ``data`` bytes, anything else to ``float_data``
    (pycaffe's caffe.io.array_to_datum)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DataError(f"array_to_datum needs a 3-d C×H×W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(np.asarray(arr, np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def _varint(n):
    if n < 0:                       # int32 fields carry negatives as 10-byte two's complement
        n += 1 << 64
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def cv_image_to_datum_bytes(img, label):
    """Caffe's CVMatToDatum + SerializeToString for an OpenCV H×W(×C) uint8 image, built directly:
    fields channels, height, width, data (C×H×W), label, encoded=false, in Caffe's order, with one
    copy of the pixels (protobuf's message path copies them three times, which dominated
    convert_imageset's per-image cost). Byte-identical to the protobuf serialization."""
    chw = hwc_to_chw(img)
    c, h, w = chw.shape
    n = c * h * w
    head = b"\x08" + _varint(c) + b"\x10" + _varint(h) + b"\x18" + _varint(w) + b"\x22" + _varint(n)
    tail = b"\x28" + _varint(int(label)) + b"\x38\x00"
    buf = bytearray(len(head) + n + len(tail))
    buf[:len(head)] = head
    np.frombuffer(buf, np.uint8, count=n, offset=len(head)).reshape(c, h, w)[...] = chw
    buf[len(head) + n:] = tail
    return bytes(buf)


def encode_datum(image, label=None, encode_type="png"):
    """An encoded Datum: ``image`` is either the bytes of an image file (stored as they are) or a
    C×H×W uint8 array compressed with OpenCV as ``encode_type`` (jpg, png, ...).

    As Caffe's ReadImageToDatum with an encoding, only ``data``, ``label`` and ``encoded`` are set.
    """
    datum = caffe_pb2.Datum(encoded=True)
    if isinstance(image, (bytes, bytearray, memoryview)):
        datum.data = bytes(image)
    else:
        datum.data = encode_image(image, encode_type)
    if label is not None:
        datum.label = int(label)
    return datum


def encode_image(arr, encode_type="png"):
    """Compress a C×H×W uint8 array (BGR channel order for colour) into image-file bytes."""
    cv = opencv()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise DataError(f"encode_image needs uint8 pixels, got {arr.dtype}")
    ext = "." + encode_type.lower().lstrip(".")
    try:
        ok, buf = cv.imencode(ext, np.ascontiguousarray(chw_to_hwc(arr)))
    except cv.error as exc:
        raise DataError(f"cannot encode image as '{encode_type}': {str(exc).strip().splitlines()[-1]}") from None
    if not ok:
        raise DataError(f"cannot encode image as '{encode_type}'")
    return buf.tobytes()


# --- image files and list files -------------------------------------------------------------------

def join_root(root, path):
    """Caffe joins ``root_folder + path`` as strings; do the same, adding the '/' a user forgot."""
    if not root or root.endswith(("/", os.sep)):
        return root + path
    return root + "/" + path


def read_image(filename, height=0, width=0, is_color=True):
    """Caffe's ReadImageToCVMat: OpenCV imread (BGR, or grayscale), resized with bilinear
    interpolation to height×width when both are positive. Returns an H×W×C (H×W for gray) uint8
    array, or None when the file is missing or not an image."""
    cv = opencv()
    img = cv.imread(filename, cv.IMREAD_COLOR if is_color else cv.IMREAD_GRAYSCALE)
    if img is None:
        return None
    if height > 0 and width > 0:
        img = cv.resize(img, (int(width), int(height)), interpolation=cv.INTER_LINEAR)
    return img


def parse_list_line(line, path, lineno):
    """One ``<image path> <integer label>`` line; the label is the last whitespace-separated field so
    paths may contain spaces. Returns (image path, label), or None for a blank line."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    parts = text.strip().rsplit(None, 1)
    if len(parts) < 2:
        raise DataError(f"{path}:{lineno}: expected '<image path> <label>', got {text.strip()!r} (no label)")
    name, label = parts
    try:
        return name, int(label)
    except ValueError:
        raise DataError(f"{path}:{lineno}: label {label!r} is not an integer") from None


def read_image_list(path):
    """A list file of ``<image path> <label>`` lines as [(image path, label, line number)]."""
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise DataError(f"{path}: list file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: list file is a directory") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read list file: {exc.strerror or exc}") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        item = parse_list_line(line, path, lineno)
        if item is not None:
            out.append((item[0], item[1], lineno))
    return out
