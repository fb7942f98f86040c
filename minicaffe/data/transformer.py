"""Caffe's DataTransformer: what ``transform_param`` does to every image a data layer produces.

Order, as Caffe's data_transformer.cpp:

1. crop ``crop_size`` × ``crop_size``: a random window at TRAIN, the centre window at TEST
   (offset ``(H - crop_size) // 2``);
2. mirror (``mirror: true``): flip left-right with probability 1/2, at TRAIN and TEST alike (Caffe
   draws the flip whenever ``mirror`` is set);
3. subtract the mean: ``mean_file`` (a BlobProto the size of the *uncropped* image, cropped with the
   same offsets as the image, before the flip) or ``mean_value`` (one value, or one per channel);
4. multiply by ``scale``.

Encoded records are decoded with OpenCV, in colour with ``force_color``, in grayscale with
``force_gray``, else as stored.

minicaffe extensions (``TransformationParameter`` fields >= 1000 in proto/caffe.proto):

* ``scale_jitter { min_side max_side }`` (field 1000): VGG's multi-scale training. Before cropping,
  each image is resized (``cv2.resize``, INTER_LINEAR) so its smaller side is ``S``, with ``S`` an
  integer drawn uniformly from ``[min_side, max_side]`` per image at TRAIN (fixed when equal) and
  ``S = round((min_side + max_side) / 2)`` at TEST; the other side keeps the aspect ratio. Needs
  ``crop_size <= min_side``; a ``mean_file`` cannot be used with it (the images have no fixed size:
  use ``mean_value``).
* ``color_shift { sigma pca_file }`` (field 1001): AlexNet's PCA colour augmentation, TRAIN only.
  ``pca_file`` is a BlobProtoVector: blob 0 the eigenvalues ``λ`` (3,), blob 1 the eigenvectors
  ``p_i`` as the columns of a 3×3 matrix, of the covariance of pixel values (0–255 scale, the
  channel order of the data, i.e. BGR) as ``compute_image_mean --pca`` writes them. Per image
  ``α ~ N(0, σ²)`` (3 values) and ``Σ_i α_i √λ_i p_i`` is added to every pixel before ``scale``.
  AlexNet writes the weight as ``α_i λ_i``; taking the eigenvalues of the pixel covariance, the
  square root is what keeps the shift in pixel units: the shift is then distributed as
  ``N(0, σ² Σ)``, a colour change ``σ`` times the spread of the data's colours (σ = 0.1 → 10 %).

Randomness comes from a generator seeded from ``backend.rng()`` when the transformer is built (as
Caffe seeds each transformer's RNG from ``caffe_rng_rand()``), so ``set_random_seed`` before the net
is built makes runs repeat exactly, even though batches are prepared in a background thread.
"""
import logging
import os

import numpy as np

from ..core import backend, threads
from ..errors import DataError, NetError
from ..proto import caffe_pb2
from ..formats.datum import chw_to_hwc, opencv, datum_to_array, hwc_to_chw

log = logging.getLogger("minicaffe")

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def read_blobproto_file(path, what="mean_file", message=caffe_pb2.BlobProto):
    """Parse a binary BlobProto(Vector) file; errors name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    msg = message()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:  # DecodeError
        raise DataError(f"{path}: {what} is not a binary {message.__name__} ({exc})") from None
    from ..formats.prototxt import wrong_type_fields
    clash = wrong_type_fields(msg)
    if clash:
        raise DataError(f"{path}: {what} is not a binary {message.__name__}: {clash} (another kind of file?)")
    return msg


def blobproto_values(bp):
    """A BlobProto's data as float32 with its shape (``shape`` or legacy num/channels/height/width)."""
    values = np.asarray(bp.double_data if len(bp.double_data) else bp.data, np.float32)
    if bp.HasField("shape"):
        shape = tuple(int(d) for d in bp.shape.dim)
    elif any(bp.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (bp.num, bp.channels, bp.height, bp.width)
    else:
        shape = (values.size,)
    count = 1
    for d in shape:             # Python integers: crafted dims cannot wrap round to the value count
        count *= d
    if any(d < 0 for d in shape):
        raise DataError(f"BlobProto shape {shape} has a negative dimension")
    if count != values.size:
        raise DataError(f"BlobProto has {values.size} values for shape {shape}")
    return values.reshape(shape)


def load_mean_file(path):
    """A mean BlobProto (1×C×H×W or C×H×W) as a C×H×W float32 array."""
    try:
        mean = blobproto_values(read_blobproto_file(path, "mean_file"))
    except DataError as exc:
        msg = str(exc)
        raise DataError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if not mean.size:
        raise DataError(f"{path}: mean_file holds no values (not a mean image?)")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"{path}: mean_file has shape {mean.shape}, expected 1xCxHxW")
    return np.ascontiguousarray(mean)


def load_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean as a C×H×W float32 array, from a ``mean.binaryproto`` (BlobProto) or a ``.npy`` file:
    pycaffe's ``caffe.io.load_mean`` (re-exported there), kept here with ``load_mean_file`` so that
    ``caffe.io`` and ``caffe.vis`` both import it from below instead of from each other."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such mean file")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot read mean .npy: {exc}") from None
    else:
        arr = load_mean_file(path)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.size == 0:
        raise DataError(f"{path}: a mean must be C×H×W (or 1×C×H×W), this one is {arr.shape}")
    return arr


def load_pca_file(path):
    """Eigenvalues (3,) and eigenvectors (3×3, columns) from a BlobProtoVector (compute_image_mean --pca)."""
    vec = read_blobproto_file(path, "pca_file", caffe_pb2.BlobProtoVector)
    if len(vec.blobs) < 2:
        raise DataError(f"{path}: pca_file has {len(vec.blobs)} blobs, expected 2 (eigenvalues, eigenvectors)")
    try:
        lam = blobproto_values(vec.blobs[0]).astype(np.float64).reshape(-1)
        vecs = blobproto_values(vec.blobs[1]).astype(np.float64)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if lam.shape != (3,) or vecs.size != 9:
        raise DataError(f"{path}: pca_file holds eigenvalues of shape {lam.shape} and eigenvectors of "
                        f"{vecs.size} values; expected (3,) and 3x3")
    if np.any(lam < -1e-6 * max(1.0, float(np.abs(lam).max()))):
        raise DataError(f"{path}: pca_file has negative eigenvalues {lam.tolist()}")
    return np.clip(lam, 0, None), vecs.reshape(3, 3)


def _shape_str(shape):
    return "x".join(str(int(s)) for s in shape)


class DataTransformer:
    """Apply a TransformationParameter to C×H×W images (uint8 or float), one batch at a time.

    ``name`` is the layer's name, used in errors. ``rng``: a NumPy Generator; by default one seeded
    from ``backend.rng()`` now.
    """

    def __init__(self, param=None, phase=TRAIN, name="", rng=None):
        self.param = param if param is not None else caffe_pb2.TransformationParameter()
        self.phase = phase
        self.name = name
        self.rng = rng if rng is not None else np.random.default_rng(int(backend.rng().integers(2 ** 63)))
        p = self.param
        self.scale = float(p.scale)
        self.crop = int(p.crop_size)
        self.mirror = bool(p.mirror)
        self.force_color, self.force_gray = bool(p.force_color), bool(p.force_gray)
        if self.force_color and self.force_gray:
            raise self._config_error("cannot set both force_color and force_gray")
        if p.HasField("mean_file") and len(p.mean_value):
            raise self._config_error("cannot specify mean_file and mean_value at the same time")
        self.mean = None
        if p.HasField("mean_file"):
            log.info("Loading mean file from: %s", p.mean_file)
            try:
                self.mean = load_mean_file(p.mean_file)
            except DataError as exc:
                raise DataError(f"{self._prefix()}{exc}") from None
        self.mean_values = np.asarray(p.mean_value, np.float32) if len(p.mean_value) else None

        self.jitter = None
        if p.HasField("scale_jitter"):
            lo, hi = int(p.scale_jitter.min_side), int(p.scale_jitter.max_side)
            if lo <= 0 or hi < lo:
                raise self._config_error(f"scale_jitter needs 0 < min_side <= max_side, got min_side {lo}, "
                                         f"max_side {hi}")
            if not self.crop:
                raise self._config_error("scale_jitter needs crop_size (the rescaled images have no fixed size)")
            if self.crop > lo:
                raise self._config_error(f"crop_size {self.crop} is larger than scale_jitter min_side {lo}")
            if self.mean is not None:
                raise self._config_error("scale_jitter cannot be used with mean_file (the rescaled images "
                                         "have no fixed size); use mean_value")
            self.jitter = (lo, hi)

        self.pca = None
        self.sigma = 0.0
        if p.HasField("color_shift"):
            self.sigma = float(p.color_shift.sigma)
            if self.sigma < 0:
                raise self._config_error(f"color_shift sigma must be >= 0, got {self.sigma}")
            if not p.color_shift.pca_file:
                raise self._config_error("color_shift needs pca_file (made by compute_image_mean --pca)")
            try:
                lam, vecs = load_pca_file(p.color_shift.pca_file)
            except DataError as exc:
                raise DataError(f"{self._prefix()}{exc}") from None
            # column i scaled by sqrt(lambda_i): shift = basis @ alpha, alpha ~ N(0, sigma^2 I)
            self.pca = (vecs * np.sqrt(lam)[None, :]).astype(np.float64)
        self._warned_force = False

    # --- errors --------------------------------------------------------------------------------
    def _prefix(self):
        return f"layer '{self.name}': " if self.name else ""

    def _config_error(self, message):
        return NetError(message, self.name or None)

    def _data_error(self, message, where=None):
        loc = f"{where}: " if where else ""
        return DataError(f"{self._prefix()}{loc}{message}")

    # --- decoding ------------------------------------------------------------------------------
    def decode(self, datum, where=None):
        """A Datum as a C×H×W array, decoding encoded records with the force_color/force_gray flags."""
        if not datum.encoded and (self.force_color or self.force_gray) and not self._warned_force:
            log.warning("%sforce_color and force_gray only apply to encoded datums", self._prefix())
            self._warned_force = True
        try:
            return datum_to_array(datum, self.force_color, self.force_gray, where)
        except DataError as exc:
            raise DataError(f"{self._prefix()}{exc}") from None

    # --- shapes --------------------------------------------------------------------------------
    def _test_side(self):
        lo, hi = self.jitter
        return (lo + hi + 1) // 2

    @staticmethod
    def _resized_hw(h, w, side):
        if h <= w:
            return side, max(1, int(w * side / h + 0.5))
        return max(1, int(h * side / w + 0.5)), side

    def infer_shape(self, image, where=None):
        """The C×h×w shape ``transform`` gives for this C×H×W image (Caffe's InferBlobShape)."""
        c, h, w = image.shape
        if c <= 0:
            raise self._data_error("image has no channels", where)
        if self.crop:
            if self.jitter is None and (h < self.crop or w < self.crop):
                raise self._data_error(f"crop_size {self.crop} is larger than the image "
                                       f"{_shape_str(image.shape)} (CxHxW)", where)
            return (c, self.crop, self.crop)
        return (c, h, w)

    # --- the transform -------------------------------------------------------------------------
    def transform(self, image, where=None):
        """One C×H×W image → C×h×w float32."""
        return self.transform_batch([image], [where] if where else None)[0]

    def transform_batch(self, images, where=None, out=None):
        """A list of C×H×W images → an N×C×h×w float32 batch (``out`` is filled if given).

        ``where``: an optional list naming each image (db and key, or list file and line) for errors.
        Random choices for the whole batch are drawn at once; pixel work is array code per image
        (one copy for crop + flip, one subtraction for a mean file) and per batch (mean values,
        colour shift, scale).
        """
        n = len(images)
        if n == 0:
            raise self._data_error("no images to transform")
        wh = (lambda i: where[i]) if where else (lambda i: None)
        plan = self.plan([img.shape for img in images])
        flips, offsets, alphas = plan["flips"], plan["offsets"], plan["alphas"]
        if plan["sides"] is not None:
            images = [self._rescale(img, int(s), wh(i)) for i, (img, s) in enumerate(zip(images, plan["sides"]))]
        shape = self.infer_shape(images[0], wh(0))
        c = shape[0]
        if out is None:
            out = np.empty((n,) + shape, np.float32)
        elif out.shape != (n,) + shape:
            raise self._data_error(f"output buffer is {_shape_str(out.shape)}, the batch is "
                                   f"{_shape_str((n,) + shape)}")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise self._config_error(f"{len(self.mean_values)} mean_value(s) for {c} channels "
                                     f"(give either 1 mean_value or as many as channels)")
        # per-image, per-channel values to subtract: the mean values minus the colour shift
        offset = None
        if self.mean_values is not None:
            offset = np.repeat(np.broadcast_to(self.mean_values, (c,)).astype(np.float64)[None, :], n, 0)
        if alphas is not None:
            if c != 3:
                raise self._data_error(f"color_shift needs 3-channel images, got {c} channels", wh(0))
            shift = alphas @ self.pca.T          # (n, 3): sum_i alpha_i sqrt(lambda_i) p_i
            offset = -shift if offset is None else offset - shift
        if offset is not None:
            offset = offset.astype(np.float32)[:, :, None, None]
        scale = np.float32(self.scale)

        def one(i):
            img = images[i]
            ci, hi_, wi = img.shape
            if self.crop:
                if hi_ < self.crop or wi < self.crop:
                    raise self._data_error(f"crop_size {self.crop} is larger than the image "
                                           f"{_shape_str(img.shape)} (CxHxW)", wh(i))
                h0, w0 = int(offsets[i, 0]), int(offsets[i, 1])
                h1, w1 = h0 + self.crop, w0 + self.crop
            else:
                h0, w0, h1, w1 = 0, 0, hi_, wi
            if (ci, h1 - h0, w1 - w0) != shape:
                raise self._data_error(f"image {_shape_str(img.shape)} (CxHxW) gives "
                                       f"{_shape_str((ci, h1 - h0, w1 - w0))}, but the batch is "
                                       f"{_shape_str(shape)} (set by its first image)", wh(i))
            view = img[:, h0:h1, w0:w1]
            sub = None
            if self.mean is not None:
                if self.mean.shape != img.shape:
                    raise self._data_error(f"mean_file is {_shape_str(self.mean.shape)} but the image is "
                                           f"{_shape_str(img.shape)} (CxHxW; the mean {self.param.mean_file} "
                                           f"must match the uncropped image)", wh(i))
                sub = self.mean[:, h0:h1, w0:w1]      # the mean is cropped like the image, then both flip
                if offset is not None:
                    sub = sub + offset[i]
            elif offset is not None:
                sub = offset[i]
            if flips[i]:
                view = view[:, :, ::-1]
                if sub is not None and sub.shape[-1] > 1:
                    sub = sub[:, :, ::-1]
            # per image, while it is in cache: convert + subtract in one ufunc pass (a reversed view
            # makes that ufunc slow, so a flipped image is copied first and then subtracted)
            if sub is None:
                out[i] = view
            elif flips[i]:
                out[i] = view
                out[i] -= sub
            else:
                np.subtract(view, sub, out=out[i])
            if scale != 1:
                out[i] *= scale

        def part(i0, i1):
            for i in range(i0, i1):
                one(i)
        # images are independent and each writes only its own out[i]: over the thread pool in
        # chunks of images (a chunk stops at its first bad image and the lowest chunk's error is
        # raised, so the error still names the first bad image)
        threads.parallel_for(n, part, work=out.size * 2)
        return out

    def plan(self, shapes):
        """The random choices for a batch of images of these C×H×W shapes, drawn at once:
        ``flips`` (bool per image), ``sides`` (scale-jitter S per image, or None), ``sizes`` (H, W
        after rescaling), ``offsets`` (crop top-left (h, w); centred at TEST) and ``alphas``
        (colour-shift coefficients, or None)."""
        n, rng, train = len(shapes), self.rng, self.phase == TRAIN
        flips = rng.integers(0, 2, n).astype(bool) if self.mirror else np.zeros(n, bool)
        sides = None
        sizes = np.array([s[1:] for s in shapes], np.int64).reshape(n, 2)
        if self.jitter is not None:
            lo, hi = self.jitter
            sides = rng.integers(lo, hi + 1, n) if train else np.full(n, self._test_side())
            sizes = np.array([self._resized_hw(h, w, int(side)) if min(h, w) != side else (h, w)
                              for (h, w), side in zip(sizes, sides)], np.int64).reshape(n, 2)
        offsets = np.zeros((n, 2), np.int64)
        if self.crop:
            room = np.maximum(sizes - self.crop, 0)
            if train:
                offsets = np.floor(rng.random((n, 2)) * (room + 1)).astype(np.int64)
            else:
                offsets = room // 2
        alphas = rng.normal(0.0, self.sigma, (n, 3)) if (self.pca is not None and train) else None
        return {"flips": flips, "sides": sides, "sizes": sizes, "offsets": offsets, "alphas": alphas}

    def _rescale(self, img, side, where):
        """Resize a C×H×W image so its smaller side is ``side`` (bilinear, as cv2.resize)."""
        c, h, w = img.shape
        if min(h, w) == side:
            return img
        nh, nw = self._resized_hw(h, w, side)
        cv = opencv()
        src = chw_to_hwc(img)
        if src.dtype not in (np.uint8, np.float32):
            src = src.astype(np.float32)
        try:
            res = cv.resize(np.ascontiguousarray(src), (nw, nh), interpolation=cv.INTER_LINEAR)
        except cv.error as exc:
            raise self._data_error(f"cannot resize image {_shape_str(img.shape)} to {nh}x{nw}: "
                                   f"{str(exc).strip().splitlines()[-1]}", where) from None
        if res.ndim == 2 and c != 1:  # pragma: no cover - OpenCV keeps channels
            res = res[:, :, None]
        return hwc_to_chw(res)
