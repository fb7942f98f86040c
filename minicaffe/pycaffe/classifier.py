"""pycaffe's ``caffe.Classifier``: a Net that classifies images by resizing, cropping (centre or
10 crops) and averaging the output over the crops; plus the papers' evaluation schemes.

Crops come from ``crops(image, crop_dims, scheme)``, a small registry of schemes ("10": pycaffe's
corners + centre + mirrors, "center": one centre crop, "144"/"150": GoogLeNet's and VGG's), all
built on the one crop implementation in ``minicaffe.methods.multicrop``; ``register_crop_scheme``
adds more and ``predict(..., scheme=name)`` uses them. ``predict(..., scheme="144"|"150",
scales=..., dense=True)`` runs the papers' multi-scale evaluation on the original images
(``multicrop.classifier_predict``).

Every route averages by one rule, Caffe's: the mean of the net's output over the crops
(``average="output"``, what BVLC's ``Classifier.predict`` does); ``average="softmax"`` is the VGG
paper's mean of softmax probabilities, the rule of ``MultiCropClassifier`` and of the ``evaluate``
command. On a net ending in Softmax they agree.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from . import io as caffe_io
from ..errors import DataError, MinicaffeError
from ..methods import multicrop
from ..net.network import Net
from ..proto import caffe_pb2

# --- crop schemes -----------------------------------------------------------------------------
# A scheme maps an N×H×W×K float32 batch and (h, w) to an N×n×h×w×K array: n crops per image.


def _ten_crops(batch, crop_dims):
    n = batch.shape[0]
    crops = caffe_io.oversample(batch, crop_dims)
    return crops.reshape((n, 10) + crops.shape[1:])


def _center_crop(batch, crop_dims):
    H, W = batch.shape[1:3]
    ch, cw = (int(d) for d in crop_dims)
    if ch > H or cw > W:
        raise DataError(f"centre crop {ch}×{cw} does not fit in images of {H}×{W}")
    return multicrop.extract_batch_crops(batch, multicrop.center_crop((H, W), (ch, cw)), (ch, cw))


def _papers_scheme(name):
    """GoogLeNet's '144' or VGG's '150' at the default scales for the crop size, as a scheme."""
    def scheme(batch, crop_dims):
        crop = tuple(int(v) for v in crop_dims)
        return multicrop.extract_batch_crops(batch, multicrop.make_crops(name, batch.shape[1:3], crop), crop)
    scheme.__name__ = f"scheme_{name}"
    return scheme


CROP_SCHEMES = {"10": _ten_crops, "center": _center_crop, "144": _papers_scheme("144"),
                "150": _papers_scheme("150")}


def register_crop_scheme(name: str, fn: Callable[[np.ndarray, tuple[int, int]], np.ndarray]) -> None:
    """Add a crop scheme: ``fn(batch N×H×W×K, (h, w)) -> N×n×h×w×K``."""
    CROP_SCHEMES[str(name)] = fn


def crops(image: np.ndarray, crop_dims: Sequence[int], scheme: str = "10") -> np.ndarray:
    """The crops of one H×W×K image (→ n×h×w×K) or of an N×H×W×K batch (→ (N·n)×h×w×K, image 0's
    crops first), by the named scheme."""
    if scheme not in CROP_SCHEMES:
        raise MinicaffeError(f"unknown crop scheme '{scheme}' (known: {', '.join(sorted(CROP_SCHEMES))})")
    arr = np.asarray(image, dtype=np.float32)
    single = arr.ndim == 3
    batch = arr[np.newaxis] if single else arr
    if batch.ndim != 4:
        raise DataError(f"crops: need an H×W×K image or an N×H×W×K batch, got shape {arr.shape}")
    out = CROP_SCHEMES[scheme](batch, crop_dims)
    return out[0] if single else out.reshape((-1,) + out.shape[2:])


def _input_transformer(net: Net, who: str, what: str, mean: np.ndarray | None,
                       input_scale: float | None, raw_scale: float | None,
                       channel_swap: Sequence[int] | None) -> tuple[tuple[int, ...], caffe_io.Transformer]:
    """The N×C×H×W shape of ``net``'s first input and a ``Transformer`` for it, set up as pycaffe's
    Classifier and Detector both do (transpose H×W×K → K×H×W always; mean, scales and channel swap
    where given). ``who`` (the class) and ``what`` (what it feeds) name them in the errors."""
    if not net.inputs:
        raise MinicaffeError(f"{who}: net '{net.name}' has no Input layer to feed {what} to")
    in_ = net.inputs[0]
    shape = net.blobs[in_].data.shape
    if len(shape) != 4:
        raise MinicaffeError(f"{who}: input '{in_}' has shape {shape}; {what} need N×C×H×W")
    transformer = caffe_io.Transformer({in_: shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return shape, transformer


class Classifier(Net):
    """A TEST-phase Net with pre-processing for its first input.

    ``image_dims`` is the size images are resized to before cropping (default: the input size, i.e.
    one whole-image crop); ``mean``, ``input_scale``, ``raw_scale`` and ``channel_swap`` configure the
    ``Transformer`` as in pycaffe (transpose H×W×K → K×H×W is always set).

    Only the net's outputs are read, so blobs whose lifetimes do not overlap share memory
    (``Net.share_blob_memory``): reading another blob's ``data`` after ``predict`` (features from
    ``fc7``) raises a NetError naming it; ``share_memory=False`` keeps every blob, or
    ``clf.share_blob_memory(keep=['fc7'])`` just that one.
    """

    def __init__(self, model_file: str | os.PathLike, pretrained_file: str | os.PathLike,
                 image_dims: Sequence[int] | None = None, mean: np.ndarray | None = None,
                 input_scale: float | None = None, raw_scale: float | None = None,
                 channel_swap: Sequence[int] | None = None, share_memory: bool = True) -> None:
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file, share_memory=share_memory)
        shape, self.transformer = _input_transformer(self, "Classifier", "images", mean, input_scale,
                                                    raw_scale, channel_swap)
        self.crop_dims = np.array(shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = np.array([int(d) for d in image_dims])
        if (self.image_dims < self.crop_dims).any():
            raise MinicaffeError(f"Classifier: image_dims {tuple(self.image_dims.tolist())} are smaller "
                                 f"than the net's input {tuple(self.crop_dims.tolist())}")

    def predict(self, inputs: Sequence[np.ndarray] | np.ndarray, oversample: bool = True,
                scheme: str | None = None, scales: Sequence[int] | None = None, dense: bool = False,
                flip: bool = True, average: str = multicrop.AVERAGE_OUTPUT) -> np.ndarray:
        """Class scores for each H×W×K image: N×classes, the net's output averaged over the crops
        (Caffe's rule; ``average="softmax"`` averages softmax probabilities instead, the VGG paper's).

        ``oversample=True`` averages pycaffe's 10 crops, ``False`` takes the centre crop;
        ``scheme`` names any registered crop scheme instead.

        The papers' evaluation: ``scheme="144"`` (GoogLeNet) or ``"150"`` (VGG) rescales each
        original image (aspect kept) to each of ``scales`` (default: the papers' ratios to the crop
        size); ``scales=[S]`` with '10'/'center' crops from the image with shorter side S instead of
        the ``image_dims`` warp; ``dense=True`` adds VGG's dense evaluation (the net made fully
        convolutional, the output map averaged, with the mirrored image when ``flip``), averaged
        with the crops, or alone with ``scheme="none"`` (``multicrop.classifier_predict``).
        """
        if len(inputs) == 0:
            raise DataError("Classifier.predict: no images given")
        multicrop.check_average(average)
        if dense or scales or str(scheme) in ("144", "150", "none"):
            return multicrop.classifier_predict(self, inputs, oversample, scheme, scales, dense, flip, average)
        channels = {np.shape(im)[2] if np.ndim(im) == 3 else None for im in inputs}
        if len(channels) != 1 or None in channels:
            raise DataError("Classifier.predict: images must be H×W×K arrays with one number of channels")
        k = channels.pop()
        h, w = (int(d) for d in self.image_dims)
        batch = np.empty((len(inputs), h, w, k), dtype=np.float32)
        for ix, im in enumerate(inputs):
            batch[ix] = caffe_io.resize_image(im, (h, w))
        cropped = crops(batch, self.crop_dims, scheme or ("10" if oversample else "center"))
        caffe_in = self.transformer.preprocess_batch(self.inputs[0], cropped)
        return multicrop.evaluate_batch(self, caffe_in, len(cropped) // len(inputs), self.outputs[0],
                                        average=average)


class MultiCropClassifier(Classifier):
    """``Classifier`` whose predictions average softmax probabilities over the crops (the VGG paper's
    rule, ``average="softmax"``) for every scheme, '10' and 'center' included; kept for scripts
    written against the earlier name (it lived in ``minicaffe.multicrop``)."""

    def predict(self, inputs: Sequence[np.ndarray] | np.ndarray, oversample: bool = True,
                scheme: str | None = None, scales: Sequence[int] | None = None, dense: bool = False,
                flip: bool = True, average: str = multicrop.AVERAGE_SOFTMAX) -> np.ndarray:
        """``Classifier.predict`` with the softmax rule by default."""
        return super().predict(inputs, oversample, scheme, scales, dense, flip, average)


# --- labels and top-k, for the classify tool and scripts ---------------------------------------

def load_labels(path: str | os.PathLike) -> list[str]:
    """One label per line (e.g. synset_words.txt: 'n01440764 tench, Tinca tinca'); blank lines kept
    out only at the end, so line i is class i."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as exc:
        raise DataError(f"{path}: cannot read labels: {exc.strerror or exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: the labels file is empty")
    return lines


def top_k(predictions: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` best classes per row, best first: (N×k ints, N×k scores)."""
    scores = np.asarray(predictions).reshape(len(predictions), -1)
    k = max(1, min(int(k), scores.shape[1]))
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, axis=1)


__all__ = ["Classifier", "MultiCropClassifier", "crops", "register_crop_scheme", "CROP_SCHEMES", "load_labels", "top_k"]
