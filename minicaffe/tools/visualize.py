"""visualize: the pictures of Caffe's classification notebook, from the command line.

    visualize mean MEAN.binaryproto OUT.png
    visualize filters --model deploy.prototxt --weights net.caffemodel [--layer conv1] OUT.png
    visualize features --model ... --weights ... --image cat.jpg --layer conv1 OUT.png
    visualize predictions --model ... --weights ... --image cat.jpg [--labels synset_words.txt] OUT.png

``features`` and ``predictions`` pre-process the image as ``classify`` does (centre crop,
``--mean_file``, ``--raw_scale``, ``--channel_swap``). Also ``minicaffe visualize ...``. The
functions behind it are in ``minicaffe.vis`` (``caffe.vis``).
"""
import argparse
import os
import sys

import numpy as np

from ..pycaffe import vis
from ..errors import MinicaffeError
from .argparsing import ArgumentParser
from .common import run_main


def _net_options(p, image):
    p.add_argument("--model", required=True, help="model definition (deploy prototxt)")
    p.add_argument("--weights", required=True, help="trained weights (.caffemodel or .h5)")
    if image:
        p.add_argument("--image", required=True, help="the image to run through the net")
        p.add_argument("--mean_file", default="", help="mean to subtract (mean.binaryproto or C×H×W .npy)")
        p.add_argument("--raw_scale", type=float, default=255.0,
                       help="multiply [0,1] images by this before the mean")
        p.add_argument("--input_scale", type=float, help="multiply inputs by this after the mean")
        p.add_argument("--channel_swap", default="2,1,0",
                       help="channel order; the default turns RGB into Caffe's BGR ('' for none)")


def build_parser():
    p = ArgumentParser(prog="visualize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="picture", required=True, metavar="{mean,filters,features,predictions}")
    m = sub.add_parser("mean", help="the mean image of a mean.binaryproto (or C×H×W .npy)")
    m.add_argument("mean_file")
    f = sub.add_parser("filters", help="a layer's filters as one grid (Caffe's vis_square)")
    _net_options(f, image=False)
    f.add_argument("--layer", help="the layer (default: the first convolution)")
    r = sub.add_parser("features", help="a layer's feature maps for an image")
    _net_options(r, image=True)
    r.add_argument("--layer", required=True, help="the blob to show (e.g. conv1)")
    t = sub.add_parser("predictions", help="the top-k predictions for an image as bars")
    _net_options(t, image=True)
    t.add_argument("--labels", help="labels file, one per line (line i = class i), e.g. synset_words.txt")
    t.add_argument("--top_k", type=int, default=5)
    for s in (m, f, r, t):
        s.add_argument("output", metavar="OUT.png", help="the picture to write (.png, .svg, .pdf)")
        s.add_argument("--dpi", type=int, default=100)
        s.add_argument("--swap_rgb", default="2,1,0",
                       help="channel order that turns the net's BGR into RGB for display ('' to keep)")
    return p


def _ints(text, flag):
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MinicaffeError(f"--{flag}: expected comma-separated integers, got '{text}'") from None


def _run_image(args):
    """A Classifier with the image forwarded (centre crop); returns (net, scores of the output)."""
    from ..pycaffe import io as caffe_io
    from ..pycaffe.classifier import Classifier
    mean = caffe_io.load_mean(args.mean_file) if args.mean_file else None
    # the pictures read intermediate blobs (features of --layer): every blob keeps its values
    net = Classifier(args.model, args.weights, mean=mean, input_scale=args.input_scale,
                     raw_scale=args.raw_scale, channel_swap=_ints(args.channel_swap, "channel_swap"),
                     share_memory=False)
    channels = net.blobs[net.inputs[0]].data.shape[1]
    image = caffe_io.load_image(args.image, color=channels != 1)
    scores = net.predict([image], oversample=False)
    return net, scores[0]


@run_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    swap = _ints(args.swap_rgb, "swap_rgb")
    if args.picture == "mean":
        vis.plot_mean(args.mean_file, args.output, channel_swap=swap, dpi=args.dpi)
    elif args.picture == "filters":
        from ..net.network import Net
        from ..proto import caffe_pb2
        net = Net(args.model, caffe_pb2.TEST, weights=args.weights)
        vis.plot_filters(net, args.output, args.layer, channel_swap=swap, dpi=args.dpi)
    elif args.picture == "features":
        net, _ = _run_image(args)
        vis.plot_feature_maps(net, args.layer, args.output, dpi=args.dpi)
    else:
        net, scores = _run_image(args)
        labels = None
        if args.labels:
            from ..pycaffe.classifier import load_labels
            labels = load_labels(args.labels)
            if len(labels) != np.size(scores):
                raise MinicaffeError(f"{args.labels}: {len(labels)} labels but the net's output "
                                     f"'{net.outputs[0]}' has {np.size(scores)} classes")
        vis.plot_top_k(scores, args.output, labels, args.top_k,
                       title=f"{net.name or 'net'}: top-{args.top_k} for {os.path.basename(args.image)}", dpi=args.dpi)
    print(f"Wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
