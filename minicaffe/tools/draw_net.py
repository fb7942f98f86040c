"""draw_net: draw a net definition as an image (Caffe's python/draw_net.py).

    draw_net MODEL.prototxt OUT.png [--rankdir AUTO|LR|TB|BT|RL] [--phase TRAIN|TEST|ALL]
             [--display_lrm] [--shapes [--input_shape [BLOB=]N,C,H,W ...]] [--dpi N] [--palette]

``.dot``/``.gv``/``.raw`` outputs are Graphviz source and need nothing else; image formats need
Graphviz's ``dot`` program. The default layout, AUTO, keeps small nets in Caffe's left-to-right row
and draws deep ones top to bottom in side-by-side columns (GoogLeNet: 4183×5688 pixels instead of
Caffe's 25784×1395); LR/TB/BT/RL draw exactly as Caffe's script. ``--shapes`` builds the net to
write each blob's shape and each layer's parameter count on the picture: Input and DummyData
layers give their shapes, layers reading a data source need ``--input_shape`` (or their source).
"""
import argparse

from ..pycaffe import draw
from ..formats.prototxt import load_net_param
from ..proto import caffe_pb2
from .argparsing import ArgumentParser
from .common import run_main


def build_parser():
    parser = ArgumentParser(prog="draw_net", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input_net_proto_file", help="input network prototxt file")
    parser.add_argument("output_image_file", help="output file; its extension names the format "
                        "(.png, .svg, .pdf, ... via Graphviz; .dot/.raw for Graphviz source)")
    parser.add_argument("--rankdir", default="AUTO", type=str.upper, choices=["AUTO", "LR", "TB", "BT", "RL"],
                        help="direction of the layout: LR/RL horizontal, TB/BT vertical (as Caffe); AUTO: "
                             "LR for small nets, top-to-bottom columns for deep ones")
    parser.add_argument("--phase", default="ALL", choices=["TRAIN", "TEST", "ALL"],
                        help="draw the layers of this phase only; ALL draws every layer")
    parser.add_argument("--display_lrm", action="store_true",
                        help="show the non-zero lr_mult of Convolution/Deconvolution/InnerProduct layers")
    parser.add_argument("--shapes", action="store_true",
                        help="build the net (TEST phase unless --phase TRAIN) and show blob shapes and "
                             "parameter counts")
    parser.add_argument("--input_shape", action="append", default=[], metavar="[BLOB=]N,C,H,W",
                        help="with --shapes: the shape of a data layer's top (repeat for several); "
                             "without BLOB=, the first top of every data layer; labels get (N,)")
    parser.add_argument("--dpi", type=float, help="resolution of bitmap images (Graphviz: 96)")
    parser.add_argument("--palette", action="store_true",
                        help="a 256-colour PNG without anti-aliasing (Graphviz's gd renderer): smaller files")
    return parser


@run_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    net = load_net_param(args.input_net_proto_file)
    phase = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}[args.phase]
    if args.input_shape and not args.shapes:
        raise draw.DrawError("--input_shape is for --shapes (it sets the shapes the net is built with)")
    shapes = counts = None
    if args.shapes:
        shapes, counts = draw.net_shapes(net, phase, draw.parse_input_shapes(args.input_shape))
    print(f"Drawing net to {args.output_image_file}")
    draw.draw_net_to_file(net, args.output_image_file, args.rankdir, phase, args.display_lrm, shapes, counts,
                          args.dpi, args.palette)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
