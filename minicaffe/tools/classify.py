"""classify: classify images with a trained net (Caffe's python/classify.py), saving the scores.

    classify INPUT OUTPUT.npy --model_def deploy.prototxt --pretrained_model net.caffemodel
             [--center_only] [--images_dim 256,256] [--mean_file mean.binaryproto|mean.npy]
             [--raw_scale 255] [--channel_swap 2,1,0] [--input_scale S] [--ext jpg]
             [--labels synset_words.txt --top_k 5] [--gpu]

INPUT is an image, a folder of images (``*.EXT``), or a ``.npy`` array of N×H×W×K images.
Scores (N×classes) go to OUTPUT as ``.npy``; with ``--labels`` the top-k labels of each image are
printed too. Progress goes to stderr, results to stdout.
"""
import os
import sys
import time

import numpy as np

from ..core import backend
from ..pycaffe import io as caffe_io
from ..pycaffe.classifier import Classifier, load_labels, top_k
from ..errors import DataError, MinicaffeError
from ..fileio import atomic_open
from .argparsing import ArgumentParser
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
    p = ArgumentParser(prog="classify", description=__doc__.split("\n")[0])
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
        # case-insensitive: ImageNet's files are ``*.JPEG`` and the default is ``jpg``; so are the
        # pairs jpg/jpeg (one format, two spellings)
        wanted = ext.lstrip(".").lower()
        same = {wanted} | ({"jpg", "jpeg"} if wanted in ("jpg", "jpeg") else set())
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1][1:].lower() in same
                       and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise DataError(f"{path}: no *.{ext.lstrip('.')} images in this folder (see --ext)")
        return files, [caffe_io.load_image(f) for f in files]
    return [path], [caffe_io.load_image(path)]


def _layer_is(lp, trait):
    """Whether the registered class of ``lp.type`` declares ``trait`` (core/layer.py's class traits)."""
    from ..core.layer import layer_class
    cls = layer_class(lp.type)
    return bool(cls is not None and getattr(cls, trait))


def _refuse_train_val(model_def):
    """A train_val net (data layers reading a database, a loss) given where classify needs the deploy
    net: one line naming the file and the deploy net, instead of an error about the database its data
    layer cannot open or a missing Input layer."""
    from ..formats.prototxt import load_net_param
    param = load_net_param(model_def)
    if any(_layer_is(lp, "is_net_input") for lp in param.layer):
        return
    data = [lp for lp in param.layer if _layer_is(lp, "is_data_source")]
    if not data:
        return
    folder = os.path.dirname(model_def)
    deploy = [f for f in sorted(os.listdir(folder or ".")) if "deploy" in f and f.endswith(".prototxt")]
    suggestion = (f"e.g. {os.path.join(folder, deploy[0])}" if deploy
                  else "a deploy.prototxt: the same layers with an Input layer instead of the data layers "
                       "and no loss")
    raise MinicaffeError(f"{model_def}: a train/test net (its {data[0].type} layer '{data[0].name}' reads "
                         f"training data); classify needs the deploy net, {suggestion}")


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

    _refuse_train_val(args.model_def)
    classifier = Classifier(args.model_def, args.pretrained_model, image_dims=image_dims, mean=None,
                            input_scale=args.input_scale, raw_scale=args.raw_scale,
                            channel_swap=channel_swap)
    if mean is not None:
        in_ = classifier.inputs[0]
        channels = classifier.blobs[in_].data.shape[1]
        if mean.shape[0] != channels:
            kind = {1: "grey (1-channel)", 3: "colour (3-channel)"}.get(mean.shape[0], f"{mean.shape[0]}-channel")
            raise MinicaffeError(f"{args.mean_file}: a {kind} mean, but input '{in_}' of {args.model_def} "
                                 f"has {channels} channels; use the mean of images like the net's (a "
                                 f"{'colour' if channels == 3 else f'{channels}-channel'} mean)")
        classifier.transformer.set_mean(in_, mean)     # set here, after the check that names the file
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
