"""pycaffe's ``caffe.io``: BlobProto/Datum ↔ array conversion, image loading, resizing, 10-crop
oversampling and the ``Transformer`` that turns H×W×K images into the C×H×W arrays a net takes.

Images are read with OpenCV (no scikit-image), but the conventions are pycaffe's: ``load_image``
gives RGB float32 in [0, 1], H×W×K; ``Transformer`` defaults to doing nothing but resizing, and
``set_transpose``/``set_channel_swap``/``set_raw_scale``/``set_mean``/``set_input_scale`` add steps
in that order.
"""
import os

import numpy as np

# the Datum codec lives with the data pipeline; pycaffe's names for it are re-exported here
from .data.datum import array_to_datum, datum_to_array  # noqa: F401
from .errors import DataError, MinicaffeError
from .proto import caffe_pb2


class TransformerError(MinicaffeError, ValueError):
    """A Transformer setting or input that does not fit the net input (also a ValueError, as in pycaffe)."""


class BlobProtoError(MinicaffeError, ValueError):
    """A BlobProto whose values do not fill its shape (also a ValueError, as in pycaffe)."""


# --- proto / datum / ndarray conversion ------------------------------------------------------

def _blobproto_shape(blob):
    # the legacy 4-D fields win when any of them is set, as in pycaffe and Caffe's FromProto
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def blobproto_to_array(blob, return_diff=False):
    """The data (or, with ``return_diff``, the diff) of a BlobProto as an array of its shape.

    Float values come back float32, ``double_data``/``double_diff`` float64. A BlobProto with no
    shape at all holds a scalar (shape ``()``), as in pycaffe.
    """
    if return_diff:
        double, single = blob.double_diff, blob.diff
    else:
        double, single = blob.double_data, blob.data
    if len(double):
        values = np.array(double, dtype=np.float64)
    else:
        values = np.array(single, dtype=np.float32)
    shape = tuple(int(d) for d in _blobproto_shape(blob))
    if any(d < 0 for d in shape):
        raise BlobProtoError(f"BlobProto shape {shape} has a negative dimension")
    count = 1
    for d in shape:             # Python integers: crafted dims cannot wrap round to the value count
        count *= d
    if values.size != count:
        what = "diff" if return_diff else "data"
        raise BlobProtoError(f"BlobProto has {values.size} {what} values but its shape {shape} "
                             f"needs {count}")
    return values.reshape(shape)


def array_to_blobproto(arr, diff=None):
    """A BlobProto with ``shape`` and float data (and diff) from an N-d array."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(np.float32, copy=False).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise BlobProtoError(f"array_to_blobproto: diff shape {diff.shape} differs from data "
                                 f"shape {arr.shape}")
        blob.diff.extend(diff.astype(np.float32, copy=False).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    """Serialized BlobProtoVector bytes holding each array of the list."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data):
    """The arrays of serialized BlobProtoVector bytes."""
    from .prototxt import parse_binary
    vec = parse_binary(data, caffe_pb2.BlobProtoVector(), "<BlobProtoVector bytes>")
    return [blobproto_to_array(b) for b in vec.blobs]


def load_mean(path):
    """A mean as a C×H×W float32 array, from a ``mean.binaryproto`` (BlobProto) or a ``.npy`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such mean file")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot read mean .npy: {exc}") from None
    else:
        from .data.transformer import load_mean_file
        arr = load_mean_file(path)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.size == 0:
        raise DataError(f"{path}: a mean must be C×H×W (or 1×C×H×W), this one is {arr.shape}")
    return arr


# --- image I/O --------------------------------------------------------------------------------

# scikit-image's rgb2gray weights, which pycaffe's load_image(color=False) used
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def load_image(filename, color=True):
    """An image as float32 in [0, 1], H×W×3 RGB (``color=True``) or H×W×1 intensity.

    Grey images are repeated to 3 channels when ``color``; an alpha channel is dropped; 16-bit
    images are scaled by 1/65535. Raises DataError naming the file when it cannot be read.
    """
    import cv2
    filename = os.fspath(filename)
    if not os.path.exists(filename):
        raise DataError(f"{filename}: no such image file")
    if os.path.isdir(filename):
        raise DataError(f"{filename}: is a directory, not an image")
    try:
        raw = np.fromfile(filename, dtype=np.uint8)   # works for any path encoding, unlike imread
    except OSError as exc:
        raise DataError(f"{filename}: cannot read: {exc.strerror or exc}") from None
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise DataError(f"{filename}: cannot decode as an image (not an image, or a format OpenCV "
                        "cannot read)")
    img = _to_unit_float(img)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 3:
        img = img[:, :, ::-1]                          # OpenCV's BGR -> RGB
    if color and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif not color and img.shape[2] == 3:
        img = (img @ _GRAY_WEIGHTS)[:, :, np.newaxis]
    return np.ascontiguousarray(img, dtype=np.float32)


def _to_unit_float(img):
    if img.dtype == np.uint8:
        return img.astype(np.float32) * np.float32(1 / 255)
    if img.dtype == np.uint16:
        return img.astype(np.float32) * np.float32(1 / 65535)
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    return img.astype(np.float32)


_INTERP = {0: "INTER_NEAREST", 1: "INTER_LINEAR", 2: "INTER_CUBIC", 3: "INTER_CUBIC",
           4: "INTER_LANCZOS4", 5: "INTER_LANCZOS4"}


def resize_image(im, new_dims, interp_order=1):
    """Resize an H×W×K array to ``new_dims`` = (height, width), any K, float32 out.

    ``interp_order`` follows pycaffe/scikit-image: 0 nearest, 1 bilinear (default), 2–3 bicubic,
    4–5 Lanczos (OpenCV's nearest equivalents).
    """
    import cv2
    im = np.asarray(im)
    if im.ndim != 3:
        raise DataError(f"resize_image needs an H×W×K array, got shape {im.shape}")
    h, w = (int(d) for d in new_dims)
    if h <= 0 or w <= 0:
        raise DataError(f"resize_image: new dimensions must be positive, got {(h, w)}")
    if interp_order not in _INTERP:
        raise DataError(f"resize_image: interp_order must be 0..5, got {interp_order}")
    im = im.astype(np.float32, copy=False)
    if im.shape[:2] == (h, w):
        return im.copy()
    if im.size and im.min() == im.max():
        # a constant image stays constant (and needs no interpolation at all)
        return np.full((h, w, im.shape[2]), im.flat[0], dtype=np.float32)
    flag = getattr(cv2, _INTERP[interp_order])
    out = np.empty((h, w, im.shape[2]), dtype=np.float32)
    step = 128                                  # OpenCV 5 takes at most 128 channels at once
    for c in range(0, im.shape[2], step):
        part = cv2.resize(np.ascontiguousarray(im[:, :, c:c + step]), (w, h), interpolation=flag)
        out[:, :, c:c + step] = part.reshape(h, w, -1)
    return out


def _as_batch(images):
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    images = list(images)
    if not images:
        raise DataError("no images given")
    shapes = {np.shape(im) for im in images}
    if len(shapes) != 1:
        raise DataError(f"images must all have one shape to be cropped together, got {sorted(shapes)}")
    batch = np.stack([np.asarray(im) for im in images])
    if batch.ndim != 4:
        raise DataError(f"images must be H×W×K arrays, got shape {batch.shape[1:]}")
    return batch


def center_crop_box(im_dims, crop_dims):
    """(top, left) of pycaffe's centre crop: ``center ∓ crop/2``, truncated to integers."""
    im_dims = np.asarray(im_dims[:2], dtype=np.float64)
    crop_dims = np.asarray(crop_dims, dtype=np.float64)
    return tuple(int(v) for v in im_dims / 2.0 - crop_dims / 2.0)


def oversample(images, crop_dims):
    """pycaffe's 10 crops per image: the four corners (top-left, top-right, bottom-left,
    bottom-right) and the centre, then the same five mirrored left-right.

    ``images`` is an iterable of H×W×K arrays of one shape (or an N×H×W×K array); returns a
    (10·N)×h×w×K float32 array, the ten crops of image 0 first.
    """
    batch = _as_batch(images)
    n, H, W, K = batch.shape
    ch, cw = (int(d) for d in crop_dims)
    if ch > H or cw > W or ch <= 0 or cw <= 0:
        raise DataError(f"oversample: crop {ch}×{cw} does not fit in images of {H}×{W}")
    cy, cx = center_crop_box((H, W), (ch, cw))
    boxes = [(0, 0), (0, W - cw), (H - ch, 0), (H - ch, W - cw), (cy, cx)]
    crops = np.empty((n, 10, ch, cw, K), dtype=np.float32)
    for i, (y, x) in enumerate(boxes):
        crops[:, i] = batch[:, y:y + ch, x:x + cw, :]
    crops[:, 5:] = crops[:, :5, :, ::-1, :]
    return crops.reshape(n * 10, ch, cw, K)


# --- pre-processing ---------------------------------------------------------------------------

class Transformer:
    """Turns H×W×K images into the C×H×W arrays of a net input, as pycaffe's ``caffe.io.Transformer``.

    ``inputs`` maps each input blob name to its shape (N, C, H, W), e.g.
    ``{'data': net.blobs['data'].data.shape}``. ``preprocess`` does, in order: float32, resize to
    the input's H×W, transpose, channel swap, ×raw_scale, −mean, ×input_scale; ``deprocess`` undoes it.
    """

    def __init__(self, inputs):
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in dict(inputs).items()}
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check_input(self, in_, who):
        if in_ not in self.inputs:
            raise TransformerError(f"Transformer.{who}: '{in_}' is not one of the net inputs "
                                   f"({', '.join(self.inputs) or 'none'})")

    # --- the steps ----------------------------------------------------------------------
    def preprocess(self, in_, data):
        """One H'×W'×K array → one C×H×W float32 array for input ``in_`` (the input is not modified)."""
        self._check_input(in_, "preprocess")
        data = np.asarray(data)
        in_dims = self.inputs[in_][2:]
        out = data.astype(np.float32)                 # always a copy: the caller's array stays intact
        if out.ndim == 3 and len(in_dims) == 2 and out.shape[:2] != in_dims:
            out = resize_image(out, in_dims)
        return self._apply(in_, out, batch=False)

    def preprocess_batch(self, in_, data):
        """N×H×W×K (already of the input's size) → N×C×H×W, vectorised; a minicaffe addition."""
        self._check_input(in_, "preprocess_batch")
        data = np.asarray(data)
        in_dims = self.inputs[in_][2:]
        if data.ndim == 4 and len(in_dims) == 2 and data.shape[1:3] != in_dims:
            data = np.stack([resize_image(im, in_dims) for im in data])
        return self._apply(in_, data.astype(np.float32), batch=True)

    def _apply(self, in_, x, batch):
        off = 1 if batch else 0
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if transpose is not None:
            if len(transpose) != x.ndim - off:
                raise TransformerError(f"Transformer.preprocess('{in_}'): transpose order {tuple(transpose)} "
                                       f"does not fit data of shape {x.shape[off:]}")
            x = x.transpose(tuple(range(off)) + tuple(int(t) + off for t in transpose))
        if channel_swap is not None:
            if x.shape[off] != len(channel_swap):
                raise TransformerError(f"Transformer.preprocess('{in_}'): channel swap {tuple(channel_swap)} "
                                       f"needs {len(channel_swap)} channels on axis 0, data has shape "
                                       f"{x.shape[off:]} (set_transpose first?)")
            x = np.take(x, channel_swap, axis=off)
        if raw_scale is not None:
            x *= np.float32(raw_scale)
        if mean is not None:
            try:
                x -= mean
            except ValueError:
                raise TransformerError(f"Transformer.preprocess('{in_}'): mean of shape {mean.shape} does not "
                                       f"fit data of shape {x.shape[off:]} (set_transpose first?)") from None
        if input_scale is not None:
            x *= np.float32(input_scale)
        return np.ascontiguousarray(x)

    def deprocess(self, in_, data):
        """Invert ``preprocess``: C×H×W (or 1×C×H×W) → H×W×K, scaled and ordered as before."""
        self._check_input(in_, "deprocess")
        x = np.array(data, dtype=np.float32).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            x /= np.float32(input_scale)
        if mean is not None:
            x += mean
        if raw_scale is not None:
            x /= np.float32(raw_scale)
        if channel_swap is not None:
            x = x[np.argsort(channel_swap)]
        if transpose is not None:
            x = x.transpose(np.argsort(transpose))
        return x

    # --- settings -----------------------------------------------------------------------
    def set_transpose(self, in_, order):
        """Axis order applied to each image, e.g. (2, 0, 1) turns H×W×K into K×H×W."""
        self._check_input(in_, "set_transpose")
        order = tuple(int(o) for o in order)
        ndim = len(self.inputs[in_]) - 1
        if len(order) != ndim or sorted(order) != list(range(ndim)):
            raise TransformerError(f"Transformer.set_transpose('{in_}'): order {order} must be a permutation "
                                   f"of {ndim} axes (input shape {self.inputs[in_]})")
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """Channel order taken after the transpose, e.g. (2, 1, 0) turns RGB into Caffe's BGR."""
        self._check_input(in_, "set_channel_swap")
        order = tuple(int(o) for o in order)
        channels = self.inputs[in_][1]
        if len(order) != channels:
            raise TransformerError(f"Transformer.set_channel_swap('{in_}'): order {order} has {len(order)} "
                                   f"entries but the input has {channels} channels")
        if any(o < 0 or o >= channels for o in order):
            raise TransformerError(f"Transformer.set_channel_swap('{in_}'): order {order} names a channel "
                                   f"outside 0..{channels - 1}")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Multiply the raw image (before the mean), e.g. 255 for models trained on [0, 255] pixels."""
        self._check_input(in_, "set_raw_scale")
        self.raw_scale[in_] = float(scale)

    def set_mean(self, in_, mean):
        """Mean to subtract: per channel (C values) or a full C×H×W (or H×W) image.

        A full mean of another size is resized to the input's H×W, as pycaffe does.
        """
        self._check_input(in_, "set_mean")
        mean = np.asarray(mean, dtype=np.float32)
        shape = self.inputs[in_]
        channels = shape[1] if len(shape) > 1 else None
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise TransformerError(f"Transformer.set_mean('{in_}'): mean has {mean.shape[0]} channel "
                                       f"values but the input has {channels} channels")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if mean.ndim == 4 and mean.shape[0] == 1:
                mean = mean[0]
            if mean.ndim == 2:
                mean = mean[np.newaxis]
            if mean.ndim != 3:
                raise TransformerError(f"Transformer.set_mean('{in_}'): mean must be C values, H×W or C×H×W, "
                                       f"got shape {mean.shape}")
            if mean.shape[0] != channels:
                raise TransformerError(f"Transformer.set_mean('{in_}'): mean has {mean.shape[0]} channels "
                                       f"but the input has {channels}")
            if mean.shape[1:] != shape[2:]:
                mean = resize_image(mean.transpose(1, 2, 0), shape[2:]).transpose(2, 0, 1)
        self.mean[in_] = np.ascontiguousarray(mean)

    def set_input_scale(self, in_, scale):
        """Multiply after the mean subtraction (e.g. 0.017 for std-normalised models)."""
        self._check_input(in_, "set_input_scale")
        self.input_scale[in_] = float(scale)


__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array", "load_mean",
           "load_image", "resize_image", "oversample", "center_crop_box", "Transformer",
           "TransformerError", "BlobProtoError"]

from .vis import vis_square  # noqa: E402,F401  (the notebooks' grid of filters; the pictures: caffe.vis)
