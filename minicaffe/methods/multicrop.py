"""Multi-crop evaluation as the AlexNet, GoogLeNet and VGG papers did it, plus dense + multi-crop.

A scheme is a list of ``Crop(y0, x0, y1, x1, flip, size)``: the box is in the coordinates of the
image resized to ``size`` = (H, W); a box larger than the crop is resized to the crop size (the
GoogLeNet "whole square"); ``flip`` mirrors the crop horizontally. Schemes are plain data, so a
test can check every box and a user can build their own.

- ``alexnet_10``: 4 corners + centre, then the same 5 mirrored (pycaffe's ``oversample`` order);
- ``googlenet_144``: shorter side resized to 256, 288, 320, 352; left/centre/right squares (top/
  centre/bottom for portrait images); in each, 4 corners + centre + the square itself resized;
  all mirrored: 4 × 3 × 6 × 2 = 144;
- ``vgg_150``: for each of 3 scales Q, a 5×5 regular grid of crops over the image with shorter
  side Q, and their mirrors: 5 × 5 × 2 × 3 = 150.

Every scheme lists its unmirrored crops first and then the same crops mirrored, in that order.
Crops are taken from images in pycaffe's layout (H×W×C floats, as ``caffe.io.load_image`` or
``cv2.imread`` give); a ``Preprocessor`` (pycaffe Transformer's steps) turns them into net input.
This is the one crop implementation: pycaffe's ``caffe.io.oversample`` and ``caffe.Classifier``'s
crop schemes are built on ``alexnet_10``/``center_crop``/``make_crops`` and ``extract_crops``.

Evaluation is one pipeline: crops -> preprocessing -> forward in batches -> the average over each
image's crops (``average_crops``) -> the mean with dense evaluation and over an ensemble's models
(``combine``). The average follows one of two named rules:

- ``average="output"`` (``AVERAGE_OUTPUT``), Caffe's: the mean of the net's output as it is, what
  pycaffe's ``Classifier.predict`` does; ``caffe.Classifier`` uses it for every scheme;
- ``average="softmax"`` (``AVERAGE_SOFTMAX``), the VGG paper's: the mean of soft-max class
  posteriors (a softmax over each crop's scores first, unless the net already ends in Softmax).
  The papers' methods here (``evaluate_crops``, ``evaluate_dense``, ``evaluate_images`` and the
  ``evaluate`` command) use it by default, on purpose.

On a net that ends in a Softmax layer (every deploy net of the model zoo) the two rules agree.
"""
import collections

import numpy as np

from ..deps import import_cv2
from ..errors import DataError, MinicaffeError, NetError, ShapeError
from .surgery import _softmax, convert_fc_to_conv, dense_scores, forward_batch

Crop = collections.namedtuple("Crop", "y0 x0 y1 x1 flip size")

SCHEMES = ("center", "10", "144", "150")
GOOGLENET_SCALES = (256, 288, 320, 352)
VGG_SCALES = (256, 384, 512)


def _pair(v, what="crop_size"):
    if np.ndim(v) == 0:
        return int(v), int(v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ShapeError(f"{what} must be one number or (height, width), got {v}")
    return v


def _hw(image_shape):
    return int(image_shape[0]), int(image_shape[1])


def rescaled_size(image_shape, side):
    """(H, W) of the image resized so its shorter side is ``side``, keeping the aspect ratio."""
    h, w = _hw(image_shape)
    if h <= w:
        return int(side), max(1, int(np.floor(w * side / h + 0.5)))
    return max(1, int(np.floor(h * side / w + 0.5))), int(side)


def _check_fits(size, crop, what):
    if size[0] < crop[0] or size[1] < crop[1]:
        raise ShapeError(f"{what}: a {crop[0]}x{crop[1]} crop does not fit in an image of "
                         f"{size[0]}x{size[1]}")


def _with_flips(crops, flips=True):
    return crops + [c._replace(flip=True) for c in crops] if flips else crops


def center_offsets(size, crop):
    """(top, left) of the centre ``crop`` = (h, w) in an image of ``size`` = (H, W, ...): (H - h) / 2
    truncated toward zero, as Caffe's TEST crop (C++ integer division) and pycaffe's
    ``center - crop / 2.0`` cast to int both compute it."""
    return tuple(int((int(n) - int(c)) / 2) for n, c in zip(tuple(size)[:2], crop))


def _corners_centre(y, x, size, side_h, side_w, crop):
    """4 corners (TL, TR, BL, BR) and the centre of the side_h×side_w region at (y, x)."""
    ch, cw = crop
    out = []
    for dy in (0, side_h - ch):
        for dx in (0, side_w - cw):
            out.append(Crop(y + dy, x + dx, y + dy + ch, x + dx + cw, False, size))
    oy, ox = center_offsets((side_h, side_w), crop)
    cy, cx = y + oy, x + ox
    out.append(Crop(cy, cx, cy + ch, cx + cw, False, size))
    return out


def _base_size(image_shape, image_size=None, side=None):
    if image_size is not None and side is not None:
        raise MinicaffeError("give image_size (resize to H×W) or side (shorter side), not both")
    if image_size is not None:
        return _pair(image_size, "image_size")
    if side is not None:
        return rescaled_size(image_shape, side)
    return _hw(image_shape)


def center_crop(image_shape, crop_size, image_size=None, side=None):
    """The single centre crop (Caffe's TEST-phase crop: offset (H - crop) // 2).

    ``image_size`` first resizes the image to H×W (pycaffe Classifier's ``image_dims``); ``side``
    resizes its shorter side instead.
    """
    crop = _pair(crop_size)
    size = _base_size(image_shape, image_size, side)
    _check_fits(size, crop, "center crop")
    y, x = center_offsets(size, crop)
    return [Crop(y, x, y + crop[0], x + crop[1], False, size)]


def alexnet_10(image_shape, crop_size, image_size=None, side=None):
    """AlexNet's 10 crops: corners TL, TR, BL, BR, centre, then those 5 mirrored.

    With ``image_size`` the image is first resized to H×W (pycaffe ``Classifier``); with ``side``
    the shorter side is resized to it and the crops come from the central side×side square (the
    AlexNet paper's 256×256 images).
    """
    crop = _pair(crop_size)
    size = _base_size(image_shape, image_size, side)
    y, x, sh, sw = 0, 0, size[0], size[1]
    if side is not None:
        s = min(size)
        y, x, sh, sw = (size[0] - s) // 2, (size[1] - s) // 2, s, s
    _check_fits((sh, sw), crop, "10-crop")
    return _with_flips(_corners_centre(y, x, size, sh, sw, crop))


def googlenet_144(image_shape, crop_size=224, scales=GOOGLENET_SCALES, flips=True):
    """GoogLeNet's 144 crops (4 scales × 3 squares × 6 crops × 2 mirrors).

    For each scale S the shorter side becomes S; the left, centre and right S×S squares (top,
    centre, bottom for portrait images) each give the 4 corner crops, the centre crop and the
    whole square (resized to the crop size by ``extract_crops``).
    """
    crop = _pair(crop_size)
    crops = []
    for s in scales:
        size = rescaled_size(image_shape, s)
        side = min(size)
        _check_fits((side, side), crop, f"144-crop at scale {s}")
        extra = max(size) - side
        for offset in (0, extra // 2, extra):
            y, x = (0, offset) if size[1] >= size[0] else (offset, 0)
            crops.extend(_corners_centre(y, x, size, side, side, crop))
            crops.append(Crop(y, x, y + side, x + side, False, size))
    return _with_flips(crops, flips)


def grid_positions(length, crop, n):
    """``n`` evenly spaced offsets from 0 to length - crop (rounded), a regular grid."""
    return [int(np.floor(v + 0.5)) for v in np.linspace(0, length - crop, n)]


def vgg_150(image_shape, crop_size=224, scales=VGG_SCALES, grid=5, flips=True):
    """VGG's multi-crop evaluation: a grid×grid regular grid per scale Q, and mirrors (150 crops).

    Ordered scale by scale (each scale's crops, then its mirrored crops), rows then columns.
    """
    crop = _pair(crop_size)
    crops = []
    for q in scales:
        size = rescaled_size(image_shape, q)
        _check_fits(size, crop, f"150-crop at scale {q}")
        ys = grid_positions(size[0], crop[0], grid)
        xs = grid_positions(size[1], crop[1], grid)
        one = [Crop(y, x, y + crop[0], x + crop[1], False, size) for y in ys for x in xs]
        crops.extend(_with_flips(one, flips))
    return crops


def default_scales(scheme, crop_size):
    """The paper's scales for '144' (256..352) or '150' (256, 384, 512), for 224 crops; for another
    crop size the same ratios to the crop (e.g. 32 -> 37, 55, 73 for '150')."""
    base = GOOGLENET_SCALES if str(scheme) == "144" else VGG_SCALES
    c = min(_pair(crop_size))
    if c == 224:
        return base
    return tuple(int(np.floor(s * c / 224 + 0.5)) for s in base)


def make_crops(scheme, image_shape, crop_size, scales=None, image_size=None):
    """The crops of a named scheme: 'center' (or '1'), '10', '144', '150'.

    ``scales``: the shorter-side sizes (default: ``default_scales``); for 'center' and '10' one
    scale is used as the shorter side, ``image_size`` instead resizes to H×W as pycaffe does.
    """
    scheme = str(scheme)
    if scheme in ("1", "center"):
        side = _single_scale(scales, scheme)
        return center_crop(image_shape, crop_size, image_size, side)
    if scheme == "10":
        side = _single_scale(scales, scheme)
        return alexnet_10(image_shape, crop_size, image_size, side)
    if scheme == "144":
        return googlenet_144(image_shape, crop_size, tuple(scales or default_scales(scheme, crop_size)))
    if scheme == "150":
        return vgg_150(image_shape, crop_size, tuple(scales or default_scales(scheme, crop_size)))
    raise MinicaffeError(f"unknown crop scheme '{scheme}' (use one of 1, 10, 144, 150)")


def _single_scale(scales, scheme):
    if not scales:
        return None
    if len(scales) != 1:
        raise MinicaffeError(f"crop scheme '{scheme}' takes one scale, got {list(scales)}")
    return int(scales[0])


def resize(image, size):
    """Bilinear resize of an H×W×C float image to ``size`` = (H, W)."""
    size = _pair(size, "size")
    if image.shape[:2] == size:
        return image
    cv2 = import_cv2("multi-crop resizing")
    out = cv2.resize(np.ascontiguousarray(image, np.float32), (size[1], size[0]),
                     interpolation=cv2.INTER_LINEAR)
    return out.reshape(size + image.shape[2:])


def _as_hwc(image):
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ShapeError(f"an image must be H×W or H×W×C, got shape {image.shape}")
    return image


def extract_crops(image, crops, crop_size):
    """The crops as an N×h×w×C float32 array (each image size is computed once)."""
    image = _as_hwc(image)
    crop = _pair(crop_size)
    out = np.empty((len(crops),) + crop + image.shape[2:], dtype=np.float32)
    resized = {}
    for i, c in enumerate(crops):
        if c.size not in resized:
            resized[c.size] = resize(image, c.size)
        patch = resized[c.size][c.y0:c.y1, c.x0:c.x1]
        if patch.shape[:2] != crop:
            patch = resize(patch, crop)
        out[i] = patch[:, ::-1] if c.flip else patch
    return out


def extract_batch_crops(batch, crops, crop_size):
    """The same crops of every image of an N×H×W×C batch (images of one size): N×n×h×w×C float32."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4:
        raise ShapeError(f"a batch of images must be N×H×W×C, got shape {batch.shape}")
    out = np.empty((len(batch), len(crops)) + _pair(crop_size) + batch.shape[3:], dtype=np.float32)
    for i, image in enumerate(batch):
        out[i] = extract_crops(image, crops, crop_size)
    return out


# --- preprocessing -------------------------------------------------------------------------------

class Preprocessor:
    """N×H×W×C crops -> N×C×H×W net input, in pycaffe Transformer's order: transpose, channel_swap,
    raw_scale, mean subtraction, input_scale.

    The mean is per channel: crops come from several scales and positions, so a mean *image*
    aligned with one crop would be wrong for the others; a C×H×W mean is reduced to its channel
    means (what pycaffe users do with ``mean.mean(1).mean(1)``).
    """

    def __init__(self, mean=None, input_scale=None, raw_scale=None, channel_swap=None):
        self.mean = None if mean is None else channel_mean(mean)
        self.input_scale = input_scale
        self.raw_scale = raw_scale
        self.channel_swap = None if channel_swap is None else list(channel_swap)

    @classmethod
    def from_transformer(cls, transformer, name):
        """The same steps as a ``caffe.io.Transformer`` set up for input ``name``."""
        def get(attr):
            return getattr(transformer, attr, {}).get(name)
        transpose = get("transpose")
        if transpose is not None and tuple(transpose) != (2, 0, 1):
            raise MinicaffeError(f"multi-crop needs H×W×C images (transpose (2, 0, 1)), the transformer "
                                 f"for '{name}' has transpose {tuple(transpose)}")
        return cls(mean=get("mean"), input_scale=get("input_scale"), raw_scale=get("raw_scale"),
                   channel_swap=get("channel_swap"))

    def __call__(self, batch):
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        x = x.transpose(0, 3, 1, 2)
        if self.channel_swap is not None:
            x = x[:, self.channel_swap]
        x = np.array(x, dtype=np.float32)          # contiguous copy we may scale in place
        if self.raw_scale is not None:
            x *= self.raw_scale
        if self.mean is not None:
            if self.mean.size not in (1, x.shape[1]):
                raise ShapeError(f"mean has {self.mean.size} channels, the images have {x.shape[1]}")
            x -= self.mean.reshape(1, -1, 1, 1)
        if self.input_scale is not None:
            x *= self.input_scale
        return x


def channel_mean(mean):
    """A scalar, per-channel vector, or C×H×W mean image -> per-channel float32 vector."""
    m = np.asarray(mean, dtype=np.float32)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3:
        m = m.reshape(m.shape[0], -1).mean(axis=1)
    return m.reshape(-1)


# --- evaluation: the one pipeline ------------------------------------------------------------------

AVERAGE_OUTPUT = "output"        # Caffe's (pycaffe Classifier.predict): the mean of the net's output
AVERAGE_SOFTMAX = "softmax"      # the VGG paper's: the mean of soft-max class posteriors
AVERAGES = (AVERAGE_OUTPUT, AVERAGE_SOFTMAX)


def check_average(average):
    """``average`` if it names a rule, else a one-line error listing the rules."""
    if average not in AVERAGES:
        raise MinicaffeError(f"unknown averaging rule '{average}' (use '{AVERAGE_OUTPUT}', Caffe's mean of "
                             f"the net's output, or '{AVERAGE_SOFTMAX}', the VGG paper's mean of softmax "
                             "probabilities)")
    return average


def output_is_probability(net, blob):
    """True when ``blob`` is produced by a Softmax layer (so no softmax is to be applied again)."""
    producer = None
    for lp in net.param.layer:
        if blob in lp.top:
            producer = lp.type
    return producer == "Softmax"


def _output_name(net, output_blob):
    name = output_blob or net.outputs[-1]
    if name not in net.blobs:
        raise NetError(f"net '{net.name}' has no blob named '{name}'")
    return name


def to_probabilities(net, scores, output_blob=None):
    """Softmax over classes unless the output already is a Softmax's."""
    if output_is_probability(net, _output_name(net, output_blob)):
        return scores
    return _softmax(scores.reshape(len(scores), -1), axis=1)


def net_crop_size(net):
    """The spatial size of the net's (first) input: the crop size it was built for."""
    if not net.inputs:
        raise NetError(f"net '{net.name}' has no Input layer (use a deploy prototxt)")
    shape = net.blobs[net.inputs[0]].shape
    if len(shape) != 4:
        raise ShapeError(f"net '{net.name}': input '{net.inputs[0]}' has shape {shape}, not N×C×H×W")
    return shape[2], shape[3]


def average_crops(outputs, per_image, average=AVERAGE_OUTPUT, is_probability=False):
    """The averaging step: (N·n)×... net outputs, each image's n crops in a row -> N×K, by the rule.

    ``'output'`` (Caffe's) averages the outputs as they are; with one crop per image they come back
    unchanged, shape and all, as pycaffe's centre-only ``predict`` returns them. ``'softmax'`` (the
    VGG paper's) averages class posteriors: a softmax over each crop's scores first, unless
    ``is_probability`` (the output blob is a Softmax's)."""
    check_average(average)
    outputs = np.asarray(outputs)
    if average == AVERAGE_SOFTMAX:
        outputs = outputs.reshape(len(outputs), -1)
        if not is_probability:
            outputs = _softmax(outputs, axis=1)
    elif per_image == 1:
        return outputs
    return outputs.reshape(len(outputs) // per_image, per_image, -1).mean(axis=1)


def forward_crops(net, x, output_blob=None, batch_size=None):
    """The output blob for the N×C×H×W net input ``x``, batch by batch.

    ``batch_size=None`` keeps the net's own batch size (pycaffe's ``forward_all``: the last batch is
    zero-padded and the net keeps its shape, as ``Classifier`` needs); a number reshapes the net's
    input to that many at a time (a deploy net of batch 1 then still runs crops 64 at a time)."""
    name = _output_name(net, output_blob)
    if batch_size is None:
        if not net.inputs:
            raise NetError(f"net '{net.name}' has no Input layer to feed (use a deploy prototxt)")
        blobs = None if name in net.outputs else [name]
        return net.forward_all(blobs=blobs, **{net.inputs[0]: x})[name]
    return np.concatenate([forward_batch(net, x[i:i + batch_size], name)
                           for i in range(0, len(x), batch_size)])


def evaluate_batch(net, x, per_image, output_blob=None, batch_size=None, average=AVERAGE_OUTPUT):
    """The pipeline after cropping and preprocessing: ``x`` holds each image's ``per_image`` crops in
    a row (N·n×C×h×w); forwarded by ``forward_crops``, averaged by ``average_crops`` -> N×K."""
    name = _output_name(net, output_blob)
    out = forward_crops(net, x, name, batch_size)
    is_probability = check_average(average) == AVERAGE_SOFTMAX and output_is_probability(net, name)
    return average_crops(out, per_image, average, is_probability)


def evaluate_crops(net, image, scheme, scales=None, output_blob=None, preprocess=None, crop_size=None,
                   image_size=None, batch_size=64, average=AVERAGE_SOFTMAX):
    """Class scores of one image averaged over the crops of ``scheme``: by default, as the papers do,
    the mean of softmax probabilities (``average="output"`` for Caffe's mean of the output).

    ``scheme``: 'center', '10', '144', '150', or a list of ``Crop``. ``crop_size`` defaults to the
    net's input size (read it before another call reshapes the net to a different size).
    """
    image = _as_hwc(image)
    crop = _pair(crop_size) if crop_size is not None else net_crop_size(net)
    crops = scheme if isinstance(scheme, list) else make_crops(scheme, image.shape, crop, scales, image_size)
    x = (preprocess or Preprocessor())(extract_crops(image, crops, crop))
    return evaluate_batch(net, x, len(crops), output_blob, batch_size, average)[0]


def evaluate_dense(conv_net, image, scales=None, preprocess=None, flip=True, output_blob=None,
                   average=AVERAGE_SOFTMAX):
    """VGG's dense evaluation of one image: the fully convolutional net applied to the whole image
    with shorter side Q for each Q in ``scales`` (the image as it is when None), the class
    posterior map spatially averaged, the mirrored image averaged in, and the scales averaged.
    With ``average="output"`` the raw output map is averaged instead of the posteriors."""
    image = _as_hwc(image)
    name = _output_name(conv_net, output_blob)
    softmax = check_average(average) == AVERAGE_SOFTMAX and not output_is_probability(conv_net, name)
    out = []
    for q in (scales or [None]):
        img = image if q is None else resize(image, rescaled_size(image.shape, q))
        x = (preprocess or Preprocessor())(img[None])
        out.append(dense_scores(conv_net, x, flip=flip, output_blob=name, softmax=softmax)[0])
    return np.mean(out, axis=0)


def combine(*probabilities):
    """VGG's dense + multi-crop combination (and model ensembles): the mean of the probability vectors."""
    probs = [np.asarray(p, dtype=np.float64) for p in probabilities if p is not None]
    if not probs:
        raise MinicaffeError("nothing to combine")
    return np.mean(probs, axis=0)


def evaluate_images(nets, images, scheme="center", scales=None, dense=False, preprocess=None,
                    image_size=None, progress=None, average=AVERAGE_SOFTMAX, crop_sizes=None,
                    dense_nets=None, flip=True, output_blob=None):
    """Class scores (N×K) of images (H×W×C arrays or zero-argument loaders): for each net, the
    average over its crops (``evaluate_crops``) and its dense evaluation when ``dense``
    (``evaluate_dense``) combined, then the mean over the nets (an ensemble). The papers' rule,
    softmax probabilities, by default; ``average="output"`` is Caffe's.

    ``scheme``: 'center', '10', '144', '150' or None (dense only). ``crop_sizes`` (one per net)
    default to each net's input size, ``dense_nets`` (one per net) to ``convert_fc_to_conv(net)``.
    ``output_blob`` names the crops' output (default: each net's last); dense evaluation reads the
    converted net's last output (its layers are renamed).
    """
    if not scheme and not dense:
        raise MinicaffeError("nothing to evaluate: give a crop scheme and/or dense evaluation")
    check_average(average)
    crops = list(crop_sizes) if crop_sizes is not None else [net_crop_size(net) for net in nets]
    if not dense:
        dense_nets = [None] * len(nets)
    elif dense_nets is None:
        dense_nets = [convert_fc_to_conv(net) for net in nets]
    out = []
    for image in images:
        img = image() if callable(image) else image
        per_model = []
        for net, crop, conv in zip(nets, crops, dense_nets):
            parts = []
            if scheme:
                parts.append(evaluate_crops(net, img, scheme, scales, output_blob, preprocess, crop,
                                            image_size, average=average))
            if dense:
                parts.append(evaluate_dense(conv, img, scales, preprocess, flip, average=average))
            per_model.append(combine(*parts))
        if len({len(p) for p in per_model}) != 1:
            raise MinicaffeError(f"the ensemble's nets predict different numbers of classes: "
                                 f"{[len(p) for p in per_model]}")
        out.append(combine(*per_model))
        if progress is not None:
            progress.update()
    return np.asarray(out)


def topk_error(probs, labels, k=1):
    """Fraction of images whose label is not among the top ``k`` classes.

    Ties count against the label, as Caffe's Accuracy layer does: an image is right when fewer
    than ``k`` other classes score at least as high as its label.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ShapeError(f"topk_error: {probs.shape} scores for {labels.shape} labels")
    if len(labels) == 0:
        raise DataError("topk_error: no images")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise MinicaffeError(f"topk_error: labels must be in [0, {probs.shape[1]}), got "
                             f"{labels.min()}..{labels.max()}")
    true = probs[np.arange(len(labels)), labels]
    better = (probs >= true[:, None]).sum(axis=1) - 1       # other classes scoring at least as high
    return float(np.mean(better >= k))


# --- pycaffe Classifier's papers' schemes ----------------------------------------------------------

def classifier_predict(clf, inputs, oversample=True, scheme=None, scales=None, dense=False, flip=True,
                       average=AVERAGE_SOFTMAX):
    """The papers' schemes for a ``caffe.Classifier`` (anything with its ``transformer``, ``inputs``,
    ``outputs``, ``crop_dims`` and ``image_dims``): N×classes scores, by the rule ``average``
    (``Classifier.predict`` passes its own, Caffe's ``"output"``).

    ``scheme=None`` is Classifier's choice ('10' with ``oversample``, else 'center'); '10' and
    'center' without ``scales`` first resize to ``image_dims`` as Classifier does, '144' and '150'
    rescale the original image (aspect kept) to each scale. ``dense=True`` adds VGG's dense
    evaluation (at ``scales``, or the image as given) averaged with the crops;
    ``scheme='none'`` with ``dense=True`` is dense evaluation alone.
    """
    if len(inputs) == 0:
        raise DataError("Classifier.predict: no images given")
    scheme = str(scheme or ("10" if oversample else "center"))
    if scheme == "none" and not dense:
        raise MinicaffeError("Classifier.predict: scheme 'none' needs dense=True")
    preprocess = Preprocessor.from_transformer(clf.transformer, clf.inputs[0])
    crop = tuple(int(v) for v in clf.crop_dims)
    image_size = tuple(int(v) for v in clf.image_dims) \
        if scheme in ("10", "center", "1") and not scales else None
    dense_nets = None
    if dense:
        if getattr(clf, "_dense_net", None) is None:   # built once per Classifier (a copy of the weights)
            clf._dense_net = convert_fc_to_conv(clf)
        dense_nets = [clf._dense_net]
    out = evaluate_images([clf], inputs, None if scheme == "none" else scheme, scales, dense, preprocess,
                          image_size, average=average, crop_sizes=[crop], dense_nets=dense_nets, flip=flip,
                          output_blob=clf.outputs[0])
    return np.asarray(out, dtype=np.float32)
