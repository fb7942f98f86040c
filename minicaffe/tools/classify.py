"""classify: classify images with a trained net (Caffe's python/classify.py), saving the scores.

    classify INPUT OUTPUT.npy --model_def deploy.prototxt --pretrained_model net.caffemodel
             [--center_only] [--images_dim 256,256] [--mean_file mean.binaryproto|mean.npy]
             [--raw_scale 255] [--channel_swap 2,1,0] [--input_scale S] [--ext jpg]
             [--labels synset_words.txt --top_k 5] [--gpu]

INPUT is an image, a folder of images (``*.EXT``), or a ``.npy`` array of N×H×W×K images.
Scores (N×classes) go to OUTPUT as ``.npy``; with ``--labels`` the top-k labels of each image are
printed too. Progress goes to stderr, results to stdout.
"""
import argparse
import glob
import os
import sys
import time

import numpy as np

from .. import backend
from .. import io as caffe_io
from ..classifier import Classifier, load_labels, top_k
from ..errors import DataError, MinicaffeError
from ..fileio import atomic_open
from .common import run_main


def _ints(text, what, count=None):
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MinicaffeError(f"--{what}: expected comma-separated integers, got '{text}'") from None
    if count is not None and len(values) != count:
        raise MinicaffeError(f"--{what}: expected {count} values, got '{text}'")
    return values


def build_parser():
    p = argparse.ArgumentParser(prog="classify", description=__doc__.split("\n")[0])
    p.add_argument("input_file", help="input image, directory, or .npy (N×H×W×K)")
    p.add_argument("output_file", help="output .npy file of class scores")
    p.add_argument("--model_def", required=True, help="model definition (deploy prototxt)")
    p.add_argument("--pretrained_model", required=True, help="trained weights (.caffemodel or .h5)")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (CuPy)")
    p.add_argument("--center_only", action="store_true",
                   help="score the centre crop alone instead of averaging 10 crops (default)")
    p.add_argument("--images_dim", default="256,256",
                   help="'height,width' images are resized to before cropping")
    p.add_argument("--mean_file", default="",
                   help="mean to subtract: mean.binaryproto or a C×H×W .npy ('' for none)")
    p.add_argument("--input_scale", type=float, help="multiply inputs by this after the mean")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="multiply [0,1] images by this before the mean")
    p.add_argument("--channel_swap", default="2,1,0",
                   help="channel order; the default turns RGB into Caffe's BGR ('' for none)")
    p.add_argument("--ext", default="jpg", help="image extension to take from a directory")
    p.add_argument("--labels", help="labels file, one per line (line i = class i); prints top-k")
    p.add_argument("--top_k", type=int, default=5, help="how many labels to print per image")
    return p


def load_inputs(path, ext):
    """(names, list of H×W×K images) from an image, a folder of *.ext, or a .npy array."""
    path = os.path.expanduser(path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read .npy: {exc}") from None
        if arr.ndim == 3:
            arr = arr[np.newaxis]
        if arr.ndim != 4:
            raise DataError(f"{path}: expected N×H×W×K images, got shape {arr.shape}")
        return [f"{path}[{i}]" for i in range(len(arr))], list(arr)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*." + ext.lstrip("."))))
        if not files:
            raise DataError(f"{path}: no *.{ext.lstrip('.')} images in this folder (see --ext)")
        return files, [caffe_io.load_image(f) for f in files]
    return [path], [caffe_io.load_image(path)]


@run_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    log = sys.stderr
    image_dims = _ints(args.images_dim, "images_dim", 2)
    channel_swap = _ints(args.channel_swap, "channel_swap") if args.channel_swap else None
    mean = caffe_io.load_mean(args.mean_file) if args.mean_file else None
    labels = load_labels(args.labels) if args.labels else None

    if args.gpu:
        backend.set_mode_gpu()
        print("GPU mode", file=log)
    else:
        backend.set_mode_cpu()
        print("CPU mode", file=log)

    classifier = Classifier(args.model_def, args.pretrained_model, image_dims=image_dims, mean=mean,
                            input_scale=args.input_scale, raw_scale=args.raw_scale,
                            channel_swap=channel_swap)
    if labels is not None:
        out_shape = classifier.blobs[classifier.outputs[0]].shape
        classes = int(np.prod(out_shape[1:]))
        if classes != len(labels):
            raise MinicaffeError(f"{args.labels}: {len(labels)} labels but the net's output "
                                 f"'{classifier.outputs[0]}' has {classes} classes")
    print(f"Loading {'folder' if os.path.isdir(args.input_file) else 'file'}: {args.input_file}", file=log)
    names, inputs = load_inputs(args.input_file, args.ext)
    print(f"Classifying {len(inputs)} inputs.", file=log)
    start = time.time()
    predictions = classifier.predict(inputs, not args.center_only)
    print(f"Done in {time.time() - start:.2f} s.", file=log)

    output = args.output_file if args.output_file.endswith(".npy") else args.output_file + ".npy"
    print(f"Saving results into {output}", file=log)
    try:
        with atomic_open(output, "wb") as f:
            np.save(f, predictions)
    except OSError as exc:
        raise MinicaffeError(f"{output}: cannot write: {exc.strerror or exc}") from None

    if labels is not None:
        idx, best = top_k(predictions, args.top_k)
        for name, row_idx, row_score in zip(names, idx, best):
            print(name)
            for i, s in zip(row_idx, row_score):
                print(f"  {s:.4f} - \"{labels[i]}\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
