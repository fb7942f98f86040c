"""The papers' evaluation and net-surgery methods as commands (wired into ``minicaffe`` by cli.py).

- ``fully_convolutional``: FC layers -> convolutions (VGG dense evaluation), writes a prototxt and
  a caffemodel;
- ``init_from``: initialise a (deeper) net from layers of a trained (shallower) one, VGG's recipe;
- ``evaluate``: top-1/top-5 error of one net or an ensemble on a Caffe list file, with single,
  10, 144 or 150 crops and/or dense evaluation.

Each subcommand is a thin shell over ``minicaffe.surgery`` / ``minicaffe.multicrop`` functions,
and over ``evaluate_images`` here, which scripts can call directly.
"""
import argparse
import os
import sys

import numpy as np
from google.protobuf import text_format

from .. import backend
from ..data.datum import join_root, read_image_list
from ..errors import DataError, MinicaffeError
from ..fileio import atomic_write
from ..multicrop import (Preprocessor, combine, default_scales, evaluate_crops, evaluate_dense,
                         net_crop_size, topk_error)
from ..net import Net
from ..proto import caffe_pb2
from ..surgery import convert_fc_to_conv, init_from, net_definition, parse_mapping, vgg_init_mapping
from .common import ProgressBar, run_main


# --- helpers -----------------------------------------------------------------------------------

def _ints(text, what, count=None):
    try:
        vals = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise MinicaffeError(f"{what}: expected comma-separated integers, got '{text}'") from None
    if count is not None and len(vals) != count:
        raise MinicaffeError(f"{what}: expected {count} integers, got '{text}'")
    if any(v <= 0 for v in vals):
        raise MinicaffeError(f"{what}: values must be positive, got '{text}'")
    return vals


def _floats(texts, what):
    vals = []
    for text in texts:
        for v in str(text).split(","):
            if v.strip():
                try:
                    vals.append(float(v))
                except ValueError:
                    raise MinicaffeError(f"{what}: '{v.strip()}' is not a number") from None
    return vals


def read_list_file(path):
    """A Caffe list file (``<relative path> <integer label>`` a line, as convert_imageset reads) as
    [(path, label)]."""
    items = [(name, label) for name, label, _ in read_image_list(os.fspath(path))]
    if not items:
        raise DataError(f"{path}: the list file has no images")
    return items


def load_image_bgr(path, channels):
    """An image as Caffe's data layers see it: H×W×C float32, BGR order, values 0-255."""
    import cv2
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image: {exc.strerror or exc}") from None
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(raw, flag) if raw.size else None
    if img is None:
        raise DataError(f"{path}: cannot decode as an image")
    if img.ndim == 2:
        img = img[:, :, None]
    return img.astype(np.float32)


def _describe(scheme, scales, dense, crop):
    parts = []
    if scheme:
        n = {"1": 1, "center": 1, "10": 10, "144": 144, "150": 150}[scheme]
        sc = scales or (default_scales(scheme, crop) if scheme in ("144", "150") else None)
        parts.append(f"{n} crop{'s' if n > 1 else ''}" + (f" at scales {','.join(map(str, sc))}" if sc else ""))
    if dense:
        parts.append("dense" + (f" at scales {','.join(map(str, scales))}" if scales else "") + " + flip")
    return " + ".join(parts)


# --- library-level evaluation ---------------------------------------------------------------------

def evaluate_images(nets, images, scheme="center", scales=None, dense=False, preprocess=None,
                    image_size=None, progress=None):
    """Class probabilities (N×K) of images (H×W×C arrays or zero-argument loaders), averaged over
    each net's crops (and dense evaluation when ``dense``) and then over the nets (an ensemble).

    ``scheme``: 'center', '10', '144', '150' or None (dense only).
    """
    if not scheme and not dense:
        raise MinicaffeError("nothing to evaluate: give a crop scheme and/or dense evaluation")
    crops = [net_crop_size(net) for net in nets]
    conv_nets = [convert_fc_to_conv(net) for net in nets] if dense else [None] * len(nets)
    out = []
    for image in images:
        img = image() if callable(image) else image
        per_model = []
        for net, crop, conv in zip(nets, crops, conv_nets):
            parts = []
            if scheme:
                parts.append(evaluate_crops(net, img, scheme, scales, preprocess=preprocess, crop_size=crop,
                                            image_size=image_size))
            if dense:
                parts.append(evaluate_dense(conv, img, scales, preprocess, flip=True))
            per_model.append(combine(*parts))
        if len({len(p) for p in per_model}) != 1:
            raise MinicaffeError(f"the ensemble's nets predict different numbers of classes: "
                                 f"{[len(p) for p in per_model]}")
        out.append(combine(*per_model))
        if progress is not None:
            progress.update()
    return np.asarray(out)


# --- subcommands ----------------------------------------------------------------------------------

def cmd_fully_convolutional(args):
    net = Net(args.model, caffe_pb2.TEST, weights=args.weights)
    shape = _ints(args.input_size, "--input_size", 2) if args.input_size else None
    conv = convert_fc_to_conv(net, shape)
    for lp in net.param.layer:
        if lp.type == "InnerProduct":
            new = conv.layer_dict[lp.name + "-conv"]
            print(f"{lp.name} (InnerProduct {'x'.join(map(str, net.layer_dict[lp.name].blobs[0].shape))}) -> "
                  f"{lp.name}-conv (Convolution {'x'.join(map(str, new.blobs[0].shape))})")
    proto_path, model_path = args.output + ".prototxt", args.output + ".caffemodel"
    atomic_write(proto_path, text_format.MessageToString(net_definition(conv)))
    conv.save(model_path)
    print(f"wrote {proto_path} and {model_path}")
    return 0


def cmd_init_from(args):
    src_model, sep, src_weights = args.source.partition(",")
    if not sep or not src_model or not src_weights:
        raise MinicaffeError(f"--from expects A.prototxt,A.caffemodel, got '{args.source}'")
    if args.seed is not None:
        backend.set_random_seed(args.seed)
    target = Net(args.model, caffe_pb2.TEST)
    source = Net(src_model, caffe_pb2.TEST, weights=src_weights)
    mapping = parse_mapping(args.map) if args.map else vgg_init_mapping(target, source)
    copied = init_from(target, source, mapping)
    width = max(len(t) for t, _, _ in copied)
    for tname, sname, shapes in copied:
        dims = ", ".join("x".join(map(str, s)) for s in shapes)
        print(f"{tname:<{width}} <- {sname}  ({dims})")
    kept = [lp.name for lp, layer in zip(target.param.layer, target.layers)
            if layer.blobs and lp.name not in {t for t, _, _ in copied}]
    if kept:
        print(f"kept their fillers: {', '.join(kept)}")
    target.save(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_evaluate(args):
    if len(args.model) != len(args.weights):
        raise MinicaffeError(f"give one --weights per --model ({len(args.model)} models, "
                             f"{len(args.weights)} weights)")
    if args.gpu is not None:
        backend.set_mode_gpu()
        backend.set_device(args.gpu)
    nets = [Net(m, caffe_pb2.TEST, weights=w) for m, w in zip(args.model, args.weights)]
    channels = {net.blobs[net.inputs[0]].shape[1] if net.inputs else None for net in nets}
    if None in channels:
        raise MinicaffeError("evaluate needs deploy nets (with an Input layer)")
    if len(channels) != 1:
        raise MinicaffeError(f"the ensemble's nets take different numbers of channels: {sorted(channels)}")
    nch = channels.pop()
    scheme = args.crops or (None if args.dense else "1")
    scales = _ints(args.scales, "--scales") if args.scales else None
    mean = None
    if args.mean_file and args.mean_value:
        raise MinicaffeError("give --mean_file or --mean_value, not both")
    if args.mean_file:
        from ..io import load_mean
        mean = load_mean(args.mean_file)
    elif args.mean_value:
        mean = np.asarray(_floats(args.mean_value, "--mean_value"), np.float32)
        if mean.size not in (1, nch):
            raise MinicaffeError(f"--mean_value: {mean.size} values for {nch} channels")
    swap = _ints_any(args.channel_swap, "--channel_swap") if args.channel_swap else None
    preprocess = Preprocessor(mean=mean, input_scale=args.input_scale, raw_scale=args.raw_scale,
                              channel_swap=swap)
    image_size = _ints(args.image_dims, "--image_dims", 2) if args.image_dims else None
    items = read_list_file(args.list)
    if args.limit:
        items = items[:args.limit]
    names = None
    if args.labels:
        from ..classifier import load_labels
        names = load_labels(args.labels)
    loaders = [(lambda p=join_root(args.root, name): load_image_bgr(p, nch)) for name, _ in items]
    labels = np.array([label for _, label in items])
    crop = net_crop_size(nets[0])
    print(f"evaluating {len(items)} images with {len(nets)} model{'s' if len(nets) > 1 else ''}: "
          f"{_describe(scheme, scales, args.dense, crop)}", file=sys.stderr)
    with ProgressBar(len(items), unit="img") as bar:
        probs = evaluate_images(nets, loaders, scheme, scales, args.dense, preprocess, image_size, bar)
    if labels.max() >= probs.shape[1]:
        raise DataError(f"{args.list}: label {labels.max()} but the net has {probs.shape[1]} classes")
    if args.predictions:
        lines = []
        for (name, label), p in zip(items, probs):
            top = np.argsort(-p, kind="stable")[:5]
            show = (lambda c: names[c] if names and c < len(names) else str(c))
            lines.append(f"{name}\t{show(label)}\t" + "\t".join(f"{show(c)}:{p[c]:.4f}" for c in top) + "\n")
        atomic_write(args.predictions, "".join(lines))
    print(f"top-1 error = {100 * topk_error(probs, labels, 1):.2f}%")
    print(f"top-5 error = {100 * topk_error(probs, labels, 5):.2f}%")
    return 0


def _ints_any(text, what):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MinicaffeError(f"{what}: expected comma-separated integers, got '{text}'") from None


# --- argument parsing -----------------------------------------------------------------------------

def add_subcommands(subparsers):
    """Register fully_convolutional, init_from and evaluate; each sets ``args.run(args) -> code``."""
    p = subparsers.add_parser("fully_convolutional", help="turn FC layers into convolutions (VGG dense "
                              "evaluation)", description=cmd_fully_convolutional.__doc__ or
                              "FC layers -> H×W and 1×1 convolutions, weights reshaped.")
    p.add_argument("--model", required=True, help="deploy prototxt")
    p.add_argument("--weights", required=True, help="caffemodel")
    p.add_argument("--output", required=True, help="OUT_PREFIX: writes OUT_PREFIX.prototxt and .caffemodel")
    p.add_argument("--input_size", help="H,W of the new net's input (default: unchanged)")
    p.set_defaults(run=cmd_fully_convolutional)

    p = subparsers.add_parser("init_from", help="initialise a net from layers of a trained one (VGG's "
                              "deeper-from-shallower recipe)",
                              description="Copy mapped layers of a trained net into a new net; unmapped "
                              "layers keep their fillers. Use deploy prototxts (layer names as in "
                              "train_val); train with --weights OUTPUT.")
    p.add_argument("--model", required=True, help="prototxt of the net to initialise")
    p.add_argument("--from", dest="source", required=True, help="A.prototxt,A.caffemodel")
    p.add_argument("--map", help="target:source,... layer pairs (default: the first 4 conv and last 3 "
                   "FC layers of the source, by name, as the VGG paper)")
    p.add_argument("--output", required=True, help="caffemodel to write")
    p.add_argument("--seed", type=int, help="random seed for the fillers of unmapped layers")
    p.set_defaults(run=cmd_init_from)

    p = subparsers.add_parser("evaluate", help="top-1/top-5 error with multi-crop, dense and ensembles",
                              description="Evaluate deploy nets on a Caffe list file; softmax averaged "
                              "over crops, dense evaluation and models.")
    p.add_argument("--model", action="append", required=True, help="deploy prototxt (repeat for an ensemble)")
    p.add_argument("--weights", action="append", required=True, help="caffemodel (one per --model)")
    p.add_argument("--list", required=True, help="list file: '<image> <label>' a line")
    p.add_argument("--root", default="", help="folder the list's paths are relative to")
    p.add_argument("--crops", choices=["1", "10", "144", "150"],
                   help="1 centre crop (default), 10 (AlexNet), 144 (GoogLeNet), 150 (VGG)")
    p.add_argument("--scales", help="shorter-side sizes, e.g. 256,384,512 (144/150 default: the papers' "
                   "ratios to the crop size; 1/10: one value)")
    p.add_argument("--dense", action="store_true", help="VGG dense evaluation (+ flip), averaged with "
                   "the crops when --crops is given")
    p.add_argument("--image_dims", help="H,W to resize images to before 1/10 crops (pycaffe Classifier)")
    p.add_argument("--mean_value", action="append", help="per-channel mean, e.g. 104,117,123 (BGR)")
    p.add_argument("--mean_file", help="mean.binaryproto (reduced to its channel means)")
    p.add_argument("--raw_scale", type=float, help="multiply raw 0-255 pixels before the mean")
    p.add_argument("--input_scale", type=float, help="multiply after the mean (transform_param scale)")
    p.add_argument("--channel_swap", help="channel order, e.g. 2,1,0 for nets trained on RGB")
    p.add_argument("--labels", help="class names, one a line (used in --predictions)")
    p.add_argument("--predictions", help="write '<image> <label> <top-5 class:prob>' lines here")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--gpu", type=int, help="GPU id")
    p.set_defaults(run=cmd_evaluate)
    return subparsers


@run_main
def main(argv=None):
    """``python -m minicaffe.tools.beyond <subcommand> ...``: the same commands outside the CLI."""
    parser = argparse.ArgumentParser(prog="minicaffe", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
