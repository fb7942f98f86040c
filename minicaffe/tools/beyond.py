"""The papers' evaluation and net-surgery methods as commands (wired into ``minicaffe`` by cli.py).

- ``fully_convolutional``: FC layers -> convolutions (VGG dense evaluation), writes a prototxt and
  a caffemodel;
- ``init_from``: initialise a (deeper) net from layers of a trained (shallower) one, VGG's recipe;
- ``evaluate``: top-1/top-5 error of one net or an ensemble, with single, 10, 144 or 150 crops
  and/or dense evaluation, on a Caffe list file (deploy nets) or on a train_val net's TEST Data
  layer. ``minicaffe test`` runs the same code (``run_evaluation``) when given --crops, --scales,
  --dense, --list or several models.

Each subcommand is a thin shell over ``minicaffe.surgery`` / ``minicaffe.multicrop`` functions
(``evaluate`` over ``multicrop.evaluate_images``, the one evaluation pipeline, with the papers'
rule: softmax probabilities averaged over crops, dense evaluation and models).
"""
import os
import sys

import numpy as np
from google.protobuf import text_format

from ..core import backend
from ..formats.datum import join_root, read_image_list
from ..deps import import_cv2
from ..errors import DataError, MinicaffeError
from ..fileio import atomic_write
from ..methods.multicrop import (Preprocessor, default_scales, evaluate_images, net_crop_size,
                                 topk_error)
from ..net.network import Net
from ..proto import caffe_pb2
from ..methods.surgery import convert_fc_to_conv, init_from, net_definition, parse_mapping, vgg_init_mapping
from .argparsing import ArgumentParser
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
    cv2 = import_cv2("evaluate")
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
    """``evaluate``: deploy nets on a list file, or train_val nets on their TEST data layer."""
    if args.gpu is not None:
        backend.set_mode_gpu()
        backend.set_device(args.gpu)
    run_evaluation(args)
    return 0


def pair_models(models, weights):
    """[(model, weights)] from repeated --model/--weights flags; one model with several weights is
    that architecture trained several times (an ensemble of snapshots or seeds)."""
    models, weights = list(models or []), list(weights or [])
    if len(models) == 1 and len(weights) > 1:
        models = models * len(weights)
    if len(models) != len(weights):
        raise MinicaffeError(f"give one --weights per --model ({len(models)} models, {len(weights)} weights)")
    return list(zip(models, weights))


def _feeds_the_net(lp):
    """A layer that makes the net's input (a data layer, an Input, or a Python layer with no bottom):
    the deploy net replaces it with one Input. Data layers are known by their class's traits."""
    from ..core.layer import layer_class
    cls = layer_class(lp.type)
    if cls is not None and (cls.is_data_source or cls.is_net_input):
        return True
    return lp.type == "Python" and not lp.bottom


def deploy_from_data_layer(model, level=0, stages=()):
    """A train_val definition's TEST net as a deploy net: (deploy NetParameter, data layer).

    The first ``Data`` layer becomes an Input of its crop size (the stored size when it does not
    crop); layers that read the label, and whatever depends only on them (losses, accuracies), go.
    """
    from ..formats.prototxt import filter_net, load_net_param, make_state
    param = filter_net(load_net_param(model), make_state(caffe_pb2.TEST, level, stages))
    data = next((lp for lp in param.layer if lp.type == "Data"), None)
    if data is None:
        raise MinicaffeError(f"{model}: the TEST net has no Data layer to read images from; give a deploy "
                             f"net and --list")
    if not data.data_param.source:
        raise MinicaffeError(f"{model}: layer '{data.name}' has no data_param source")
    first = _first_datum_image(data)
    crop = int(data.transform_param.crop_size)
    shape = (1, first.shape[0]) + ((crop, crop) if crop else first.shape[1:])
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    gone = set(data.top[1:])
    for lp in param.layer:
        if lp is data:
            inp = out.layer.add()
            inp.name, inp.type = lp.name, "Input"
            inp.top.append(lp.top[0])
            inp.input_param.shape.add().dim.extend(shape)
        elif _feeds_the_net(lp) or any(b in gone for b in lp.bottom):
            gone.update(lp.top)
        else:
            out.layer.add().CopyFrom(lp)
    return out, data


def _first_datum_image(data_layer):
    for image, _ in data_layer_images(data_layer, limit=1):
        return image
    raise DataError(f"{data_layer.data_param.source}: the database is empty")


def data_layer_images(data_layer, limit=None):
    """(C×H×W array, label) of each record of a Data layer's LMDB or LevelDB, at its stored size, in
    key order."""
    from ..formats.datum import datum_to_array, parse_datum, record_where
    from ..data.db import iterate_db
    source = data_layer.data_param.source
    tp = data_layer.transform_param
    for i, (key, value) in enumerate(iterate_db(source, data_layer.data_param.backend)):
        if limit is not None and i >= limit:
            return
        where = record_where(source, key)
        datum = parse_datum(value, where)
        yield datum_to_array(datum, tp.force_color, tp.force_gray, where), int(datum.label)


def data_layer_preprocessor(data_layer):
    """The TEST transform_param as crop preprocessing: mean (a mean_file reduced to its channel
    means: crops come from several positions and scales) and then scale."""
    tp = data_layer.transform_param
    mean = None
    if tp.HasField("mean_file"):
        from ..pycaffe.io import load_mean
        mean = load_mean(tp.mean_file)
    elif len(tp.mean_value):
        mean = np.asarray(tp.mean_value, np.float32)
    return Preprocessor(mean=mean, input_scale=float(tp.scale) if tp.scale != 1 else None)


def run_evaluation(args):
    """Top-1/top-5 error of ``args.model``/``args.weights`` (lists) with crops, dense and ensembles.

    With ``args.list`` the models are deploy nets fed the list's images; without it they are
    train_val nets and the images, labels, mean and scale come from the first model's TEST-phase
    Data layer (the images at their stored size: ``convert_imageset`` without resizing keeps room
    for crops at several scales).
    """
    pairs = pair_models(args.model, args.weights)
    level, stages = getattr(args, "level", 0) or 0, getattr(args, "stages", None) or ()
    if args.list:
        nets = [Net(m, caffe_pb2.TEST, weights=w, level=level, stages=stages) for m, w in pairs]
        data_layer = None
    else:
        nets, data_layer = [], None
        for m, w in pairs:
            deploy, layer = deploy_from_data_layer(m, level, stages)
            data_layer = data_layer or layer
            nets.append(Net(deploy, caffe_pb2.TEST, weights=w))
    channels = {net.blobs[net.inputs[0]].shape[1] if net.inputs else None for net in nets}
    if None in channels:
        raise MinicaffeError("with --list the models must be deploy nets (with an Input layer); leave out "
                             "--list to read a train_val net's TEST Data layer")
    if len(channels) != 1:
        raise MinicaffeError(f"the ensemble's nets take different numbers of channels: {sorted(channels)}")
    nch = channels.pop()
    scheme = args.crops or (None if args.dense else "1")
    scales = _ints(args.scales, "--scales") if args.scales else None
    if data_layer is not None and (args.mean_file or args.mean_value or args.raw_scale or args.input_scale
                                   or args.channel_swap):
        raise MinicaffeError("the mean and scale come from the Data layer's transform_param; --mean_file, "
                             "--mean_value, --raw_scale, --input_scale and --channel_swap go with --list")
    preprocess = data_layer_preprocessor(data_layer) if data_layer is not None else _list_preprocessor(args, nch)
    image_size = _ints(args.image_dims, "--image_dims", 2) if args.image_dims else None
    if data_layer is not None:
        records = list(data_layer_images(data_layer, args.limit))
        images = [np.ascontiguousarray(img.transpose(1, 2, 0), np.float32) for img, _ in records]
        labels = np.array([label for _, label in records])
        names = [f"#{i}" for i in range(len(records))]
        source = data_layer.data_param.source
    else:
        items = read_list_file(args.list)
        if args.limit:
            items = items[:args.limit]
        images = [(lambda p=join_root(args.root, name): load_image_bgr(p, nch)) for name, _ in items]
        labels = np.array([label for _, label in items])
        names = [name for name, _ in items]
        source = args.list
    if not len(labels):
        raise DataError(f"{source}: no images to evaluate")
    crop = net_crop_size(nets[0])
    print(f"evaluating {len(labels)} images with {len(nets)} model{'s' if len(nets) > 1 else ''}: "
          f"{_describe(scheme, scales, args.dense, crop)}", file=sys.stderr)
    with ProgressBar(len(labels), unit="img") as bar:
        probs = evaluate_images(nets, images, scheme, scales, args.dense, preprocess, image_size, bar)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise DataError(f"{source}: label {labels.max() if labels.max() >= 0 else labels.min()} but the net "
                        f"has {probs.shape[1]} classes")
    if args.predictions:
        class_names = None
        if args.labels:
            from ..pycaffe.classifier import load_labels
            class_names = load_labels(args.labels)
        show = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
        lines = []
        for name, label, p in zip(names, labels, probs):
            top = np.argsort(-p, kind="stable")[:5]
            lines.append(f"{name}\t{show(label)}\t" + "\t".join(f"{show(c)}:{p[c]:.4f}" for c in top) + "\n")
        atomic_write(args.predictions, "".join(lines))
    top1, top5 = topk_error(probs, labels, 1), topk_error(probs, labels, 5)
    print(f"top-1 error = {100 * top1:.2f}%")
    print(f"top-5 error = {100 * top5:.2f}%")
    return {"probs": probs, "labels": labels, "top1": top1, "top5": top5}


def _list_preprocessor(args, nch):
    mean = None
    if args.mean_file and args.mean_value:
        raise MinicaffeError("give --mean_file or --mean_value, not both")
    if args.mean_file:
        from ..pycaffe.io import load_mean
        mean = load_mean(args.mean_file)
    elif args.mean_value:
        mean = np.asarray(_floats(args.mean_value, "--mean_value"), np.float32)
        if mean.size not in (1, nch):
            raise MinicaffeError(f"--mean_value: {mean.size} values for {nch} channels")
    swap = _ints_any(args.channel_swap, "--channel_swap") if args.channel_swap else None
    return Preprocessor(mean=mean, input_scale=args.input_scale, raw_scale=args.raw_scale, channel_swap=swap)


def _ints_any(text, what):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MinicaffeError(f"{what}: expected comma-separated integers, got '{text}'") from None


# --- argument parsing -----------------------------------------------------------------------------

EVALUATION_FLAGS = ("list", "root", "crops", "scales", "dense", "image_dims", "mean_value", "mean_file",
                    "raw_scale", "input_scale", "channel_swap", "labels", "predictions", "limit")


def add_evaluation_options(p):
    """The flags of ``evaluate``, shared with ``minicaffe test`` (all optional)."""
    p.add_argument("--list", help="list file ('<image> <label>' a line) for deploy nets; without it the "
                   "images come from the (train_val) model's TEST Data layer")
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
    return p


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
                              description="Evaluate nets on a Caffe list file (deploy nets) or on a train_val "
                              "net's TEST Data layer; softmax averaged over crops, dense evaluation and models.")
    p.add_argument("--model", action="append", required=True, help="prototxt (repeat for an ensemble)")
    p.add_argument("--weights", action="append", required=True, help="caffemodel (one per --model)")
    add_evaluation_options(p)
    p.add_argument("--gpu", type=int, help="GPU id")
    p.set_defaults(run=cmd_evaluate)
    return subparsers


@run_main
def main(argv=None):
    """``python -m minicaffe.tools.beyond <subcommand> ...``: the same commands outside the CLI."""
    parser = ArgumentParser(prog="minicaffe", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
