"""draw_net: draw a net definition as an image (Caffe's python/draw_net.py).

    draw_net MODEL.prototxt OUT.png [--rankdir LR|TB|BT|RL] [--phase TRAIN|TEST|ALL] [--display_lrm]

``.dot``/``.gv``/``.raw`` outputs are Graphviz source and need nothing else; image formats need
Graphviz's ``dot`` program.
"""
import argparse

from .. import draw
from ..prototxt import load_net_param
from ..proto import caffe_pb2
from .common import run_main


def build_parser():
    parser = argparse.ArgumentParser(prog="draw_net", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input_net_proto_file", help="input network prototxt file")
    parser.add_argument("output_image_file", help="output file; its extension names the format "
                        "(.png, .svg, .pdf, ... via Graphviz; .dot/.raw for Graphviz source)")
    parser.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"],
                        help="direction of the layout: LR/RL horizontal, TB/BT vertical")
    parser.add_argument("--phase", default="ALL", choices=["TRAIN", "TEST", "ALL"],
                        help="draw the layers of this phase only; ALL draws every layer")
    parser.add_argument("--display_lrm", action="store_true",
                        help="show the non-zero lr_mult of Convolution/Deconvolution/InnerProduct layers")
    return parser


@run_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    net = load_net_param(args.input_net_proto_file)
    phase = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}[args.phase]
    print(f"Drawing net to {args.output_image_file}")
    draw.draw_net_to_file(net, args.output_image_file, args.rankdir, phase, args.display_lrm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
