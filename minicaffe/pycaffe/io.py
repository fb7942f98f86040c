"""pycaffe's ``caffe.io``: BlobProto/Datum ↔ array conversion, image loading, resizing, 10-crop
oversampling and the ``Transformer`` that turns H×W×K images into the C×H×W arrays a net takes.

Images are read with OpenCV (no scikit-image, no SciPy), but the conventions are pycaffe's: ``load_image``
gives RGB float32 in [0, 1], H×W×K; ``Transformer`` defaults to doing nothing but resizing, and
``set_transpose``/``set_channel_swap``/``set_raw_scale``/``set_mean``/``set_input_scale`` add steps
in that order.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

# the Datum codec and the mean loader live with the data pipeline; pycaffe's names are re-exported here
from ..data.transformer import load_mean  # noqa: F401
from ..formats.datum import array_to_datum, datum_to_array  # noqa: F401
from ..deps import import_cv2
from ..errors import DataError, MinicaffeError
from ..methods import multicrop
from ..proto import caffe_pb2
from .vis import vis_square  # noqa: F401  (the notebooks' grid of filters; the pictures: caffe.vis)


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


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
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


def array_to_blobproto(arr: ArrayLike, diff: ArrayLike | None = None) -> caffe_pb2.BlobProto:
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


def arraylist_to_blobprotovector_str(arraylist: Sequence[ArrayLike]) -> bytes:
    """Serialized BlobProtoVector bytes holding each array of the list."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """The arrays of serialized BlobProtoVector bytes."""
    from ..formats.prototxt import parse_binary
    vec = parse_binary(data, caffe_pb2.BlobProtoVector(), "<BlobProtoVector bytes>")
    return [blobproto_to_array(b) for b in vec.blobs]


# --- image I/O --------------------------------------------------------------------------------

# scikit-image's rgb2gray weights, which pycaffe's load_image(color=False) used
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def load_image(filename: str | os.PathLike, color: bool = True) -> np.ndarray:
    """An image as float32 in [0, 1], H×W×3 RGB (``color=True``) or H×W×1 intensity.

    Grey images are repeated to 3 channels when ``color``; an alpha channel is dropped; 16-bit
    images are scaled by 1/65535. Raises DataError naming the file when it cannot be read.
    """
    cv2 = import_cv2("load_image", DataError)
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


def resize_image(im: ArrayLike, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H×W×K array to ``new_dims`` = (height, width) with spline interpolation of order
    ``interp_order`` (0 nearest, 1 linear (default), 2–5 B-splines); float32 out.

    The result is pycaffe's, value for value: Caffe resizes 1- and 3-channel images with
    scikit-image's ``resize`` after scaling them to [0, 1] (anti-aliasing with a Gaussian when
    shrinking, pixel-centre alignment, zeros beyond the border, clipped to the input's range) and
    other channel counts with SciPy's ``ndimage.zoom`` (corner alignment, mirrored spline border).
    Both are reproduced here in NumPy, so neither package is needed (see ``_spline_zoom``). A
    constant 1- or 3-channel image comes back constant, as in Caffe.
    """
    im = np.asarray(im)
    if im.ndim != 3:
        raise DataError(f"resize_image needs an H×W×K array, got shape {im.shape}")
    h, w = (int(d) for d in new_dims)
    if h <= 0 or w <= 0:
        raise DataError(f"resize_image: new dimensions must be positive, got {(h, w)}")
    if interp_order not in range(6):
        raise DataError(f"resize_image: interp_order must be 0..5, got {interp_order}")
    if im.size == 0:
        raise DataError(f"resize_image: the image is empty (shape {im.shape})")
    if im.dtype == np.bool_ or not np.issubdtype(im.dtype, np.number):
        im = im.astype(np.float32)
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if not im_max > im_min:
            return np.full((h, w, im.shape[-1]), im_min, dtype=np.float32)
        im_std = (im - im_min) / (im_max - im_min)
        resized = _skimage_resize(im_std, (h, w), interp_order)
        return (resized * (im_max - im_min) + im_min).astype(np.float32)
    if (h, w) == im.shape[:2]:
        return im.astype(np.float32)
    out = _spline_zoom(im, (h, w), interp_order, grid=False)
    if np.issubdtype(im.dtype, np.integer):
        # SciPy writes zoom's result in the input's type: rounded and clipped to its range
        info = np.iinfo(im.dtype)
        out = np.clip(np.floor(out + 0.5), info.min, info.max)
    return out.astype(np.float32)


def _skimage_resize(image, dims, order):
    """scikit-image's ``resize(image, dims, order, mode='constant')`` with its defaults (anti-aliasing
    when shrinking, clip to the input's range) for a float H×W×K image, in the image's dtype."""
    dtype = image.dtype if image.dtype in (np.float32, np.float64) else np.float64
    image = image.astype(dtype, copy=False)
    if tuple(dims) == image.shape[:2]:
        return image.copy()
    sigmas = (0.0, 0.0)
    if any(d < n for d, n in zip(dims, image.shape[:2])):
        factors = np.array(image.shape[:2], dtype=np.float64) / np.array(dims, dtype=np.float64)
        sigmas = tuple(float(v) for v in np.maximum(0, (factors - 1) / 2))
    out = _spline_zoom(image, dims, order, grid=True, sigmas=sigmas).astype(dtype)
    return np.clip(out, image.min(), image.max())


def _gaussian_kernel(sigma):
    """SciPy's ``gaussian_filter1d`` weights (truncate 4): None when sigma is 0."""
    if sigma <= 1e-15:
        return None
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * x * x)
    return kernel / kernel.sum()


def _correlate_axis0(a, kernel):
    """``a`` correlated with ``kernel`` along axis 0, zeros beyond the border (SciPy's 'grid-constant')."""
    radius = len(kernel) // 2
    pad = np.zeros((radius,) + a.shape[1:])
    padded = np.concatenate([pad, a, pad])
    out = np.zeros(a.shape)
    for j, k in enumerate(kernel):
        out += k * padded[j:j + a.shape[0]]
    return out


# B-spline poles of orders 2..5 (Unser, "Splines: a perfect fit for signal and image processing", 1999)
_SPLINE_POLES = {
    2: (np.sqrt(8.0) - 3.0,),
    3: (np.sqrt(3.0) - 2.0,),
    4: (np.sqrt(664.0 - np.sqrt(438976.0)) + np.sqrt(304.0) - 19.0,
        np.sqrt(664.0 + np.sqrt(438976.0)) - np.sqrt(304.0) - 19.0),
    5: (np.sqrt(67.5 - np.sqrt(4436.25)) + np.sqrt(26.25) - 6.5,
        np.sqrt(67.5 + np.sqrt(4436.25)) - np.sqrt(26.25) - 6.5),
}


def _spline_zoom(image, dims, order, grid, sigmas=(0.0, 0.0)):
    """SciPy's ``ndimage.zoom`` of the two spatial axes of an H×W×K image, in float64, after an
    optional Gaussian blur (``sigmas``, scikit-image's anti-aliasing). Every step is linear and acts
    along one axis, so each axis is blurred, spline-filtered and resampled in turn (rows first,
    then the fewer columns) rather than blurring the full image twice.

    ``grid=True`` is scikit-image's call (``grid_mode=True, mode='grid-constant'``): output pixel
    ``o`` samples input coordinate ``(o + 0.5)·n/m − 0.5`` and the image is zero beyond its border
    (SciPy pads 12 zeros before the spline prefilter). ``grid=False`` is pycaffe's own call for other
    channel counts (``mode='constant'``): ``o·(n−1)/(m−1)``, the spline mirrored at the border."""
    a = image.astype(np.float64)
    for axis in (0, 1):
        b = np.moveaxis(a, axis, 0)
        n, m = b.shape[0], dims[axis]
        kernel = _gaussian_kernel(sigmas[axis])
        if order <= 1:
            b = _resample_axis0(b, n, m, order, grid, 0, kernel)
        else:
            if kernel is not None:
                b = _correlate_axis0(b, kernel)
            npad = 12 if grid else 0
            if npad:
                b = np.pad(b, ((npad, npad),) + ((0, 0),) * (b.ndim - 1))
            b = _resample_axis0(_spline_coefficients(np.array(b, dtype=np.float64), order), n, m, order, grid, npad)
        a = np.moveaxis(b, 0, axis)
    return a


def _spline_coefficients(c, order):
    """B-spline interpolation coefficients along axis 0 of ``c`` (float64, changed in place): the
    recursive causal/anti-causal filters of each pole with a mirror-symmetric border."""
    n = c.shape[0]
    if n == 1:
        return c
    poles = _SPLINE_POLES[order]
    gain = 1.0
    for z in poles:
        gain *= (1.0 - z) * (1.0 - 1.0 / z)
    c *= gain
    for z in poles:
        zn1 = z ** (n - 1)
        k = np.arange(1, n - 1)
        weights = z ** k
        init = c[0] + zn1 * c[n - 1]
        if n > 2:
            init = init + np.tensordot(weights, c[1:n - 1] + zn1 * c[n - 2:0:-1], axes=(0, 0))
        c[0] = init / (1.0 - zn1 * zn1)
        for i in range(1, n):
            c[i] += z * c[i - 1]
        c[n - 1] = (z * c[n - 2] + c[n - 1]) * z / (z * z - 1.0)
        for i in range(n - 2, -1, -1):
            c[i] = z * (c[i + 1] - c[i])
    return c


def _bspline(x, order):
    """The centred B-spline of ``order`` at ``x`` (order >= 1)."""
    x = np.abs(x)
    half = (order + 1) / 2.0
    out = np.zeros_like(x)
    for k in range(order + 2):
        v = np.maximum(x + half - k, 0.0)
        out += (-1) ** k * math.comb(order + 1, k) * v ** order
    out /= math.factorial(order)
    return np.where(x < half, out, 0.0)


def _resample_axis0(a, n, m, order, grid, npad, kernel=None):
    """Sample axis 0 (``n`` long, plus ``npad`` padding each side) of spline coefficients ``a`` at the
    ``m`` coordinates of a zoom to ``m``: taps outside the array are zero (``grid``) or mirrored.
    ``kernel`` (orders 0 and 1 only): blur with it first, evaluated only where the taps fall."""
    o = np.arange(m, dtype=np.float64)
    if grid:
        cc = (o + 0.5) * (n / m) - 0.5 + npad
    else:
        cc = o * ((n - 1) / (m - 1) if m > 1 else 1.0)
    start = np.floor(cc if order & 1 else cc + 0.5).astype(np.int64) - order // 2
    t = cc - start
    length = a.shape[0]
    bshape = (-1,) + (1,) * (a.ndim - 1)
    taps = [(0, 1.0)] if kernel is None else [(k - len(kernel) // 2, float(g)) for k, g in enumerate(kernel)]
    out = np.zeros((m,) + a.shape[1:])
    for j in range(order + 1):
        weight = np.ones(m) if order == 0 else (1.0 - np.abs(t - j) if order == 1 else _bspline(t - j, order))
        for shift, g in taps:
            idx = start + j + shift
            if grid:
                inside = (idx >= 0) & (idx < length)
                vals = a[np.clip(idx, 0, length - 1)] * inside.reshape(bshape)
            else:
                if length == 1:
                    mirrored = np.zeros_like(idx)
                else:
                    period = 2 * (length - 1)
                    mirrored = np.mod(idx, period)
                    mirrored = np.where(mirrored >= length, period - mirrored, mirrored)
                vals = a[mirrored]
            out += (g * weight).reshape(bshape) * vals
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


def center_crop_box(im_dims: Sequence[int], crop_dims: Sequence[int]) -> tuple[int, int]:
    """(top, left) of pycaffe's centre crop: ``center ∓ crop/2``, truncated to integers."""
    return multicrop.center_offsets(im_dims, crop_dims)


def oversample(images: Sequence[np.ndarray] | np.ndarray, crop_dims: Sequence[int]) -> np.ndarray:
    """pycaffe's 10 crops per image: the four corners (top-left, top-right, bottom-left,
    bottom-right) and the centre, then the same five mirrored left-right.

    ``images`` is an iterable of H×W×K arrays of one shape (or an N×H×W×K array); returns a
    (10·N)×h×w×K float32 array, the ten crops of image 0 first. The crops are
    ``multicrop.alexnet_10``'s, cut by ``multicrop.extract_batch_crops`` (the one crop implementation).
    """
    batch = _as_batch(images)
    n, H, W, K = batch.shape
    ch, cw = (int(d) for d in crop_dims)
    if ch > H or cw > W or ch <= 0 or cw <= 0:
        raise DataError(f"oversample: crop {ch}×{cw} does not fit in images of {H}×{W}")
    crops = multicrop.extract_batch_crops(batch, multicrop.alexnet_10((H, W), (ch, cw)), (ch, cw))
    return crops.reshape(n * 10, ch, cw, K)


# --- pre-processing ---------------------------------------------------------------------------

class Transformer:
    """Turns H×W×K images into the C×H×W arrays of a net input, as pycaffe's ``caffe.io.Transformer``.

    ``inputs`` maps each input blob name to its shape (N, C, H, W), e.g.
    ``{'data': net.blobs['data'].data.shape}``. ``preprocess`` does, in order: float32, resize to
    the input's H×W, transpose, channel swap, ×raw_scale, −mean, ×input_scale; ``deprocess`` undoes it.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
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
    def preprocess(self, in_: str, data: ArrayLike) -> np.ndarray:
        """One H'×W'×K array → one C×H×W float32 array for input ``in_`` (the input is not modified)."""
        self._check_input(in_, "preprocess")
        data = np.asarray(data)
        in_dims = self.inputs[in_][2:]
        out = data.astype(np.float32)                 # always a copy: the caller's array stays intact
        if out.ndim == 3 and len(in_dims) == 2 and out.shape[:2] != in_dims:
            out = resize_image(out, in_dims)
        return self._apply(in_, out, batch=False)

    def preprocess_batch(self, in_: str, data: ArrayLike) -> np.ndarray:
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

    def deprocess(self, in_: str, data: ArrayLike) -> np.ndarray:
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
    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Axis order applied to each image, e.g. (2, 0, 1) turns H×W×K into K×H×W."""
        self._check_input(in_, "set_transpose")
        order = tuple(int(o) for o in order)
        ndim = len(self.inputs[in_]) - 1
        if len(order) != ndim or sorted(order) != list(range(ndim)):
            raise TransformerError(f"Transformer.set_transpose('{in_}'): order {order} must be a permutation "
                                   f"of {ndim} axes (input shape {self.inputs[in_]})")
        self.transpose[in_] = order

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
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

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the raw image (before the mean), e.g. 255 for models trained on [0, 255] pixels."""
        self._check_input(in_, "set_raw_scale")
        self.raw_scale[in_] = float(scale)

    def set_mean(self, in_: str, mean: ArrayLike) -> None:
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

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply after the mean subtraction (e.g. 0.017 for std-normalised models)."""
        self._check_input(in_, "set_input_scale")
        self.input_scale[in_] = float(scale)


__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array", "load_mean",
           "load_image", "resize_image", "oversample", "center_crop_box", "Transformer",
           "TransformerError", "BlobProtoError"]
