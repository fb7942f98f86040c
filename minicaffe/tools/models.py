"""``minicaffe models``: the model prototxts shipped with minicaffe (``models/`` of the source tree,
``minicaffe/_shipped/models`` of an installed wheel; see ``minicaffe.core.shipped``).

    minicaffe models                     list the models and their files
    minicaffe models copy lenet DIR      copy models/lenet/* to DIR/models/lenet/
    minicaffe models path [RELPATH]      print where the shipped files are (e.g. proto/caffe.proto)

The copy keeps the ``models/<name>/`` folders so that the paths inside the files (``net:``,
``snapshot_prefix:``) work when training is started from DIR. Paths such as
``models/lenet/solver.prototxt`` given to ``minicaffe train``/``test``/``time`` that do not exist in
the working directory are read from the shipped copy without copying anything.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core import shipped
from ..errors import MinicaffeError
from .argparsing import ArgumentParser
from .common import run_main


def list_models(out=None) -> None:
    """Print each shipped model folder with its files."""
    out = out or sys.stdout
    entries = shipped.models()
    if not entries:
        raise MinicaffeError("no shipped models found (this minicaffe was installed without its data files)")
    for name, files in entries:
        out.write(f"models/{name}: {' '.join(files)}\n")
    out.write(f"(shipped in {shipped.root()})\n")


@run_main
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="minicaffe models", description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[2:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="list the shipped models (the default)")
    cp = sub.add_parser("copy", help="copy a shipped model's files into DIR/models/<name>/")
    cp.add_argument("name", help="model folder: lenet, caffenet, vgg/vgg_a (or vgg_a)...")
    cp.add_argument("dest", help="folder to copy into (made if missing)")
    pp = sub.add_parser("path", help="print the folder of the shipped files, or of one of them")
    pp.add_argument("relpath", nargs="?", default="", help="e.g. proto/caffe.proto, tools/create_imagenet.sh")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.action in (None, "list"):
        list_models()
    elif args.action == "copy":
        for path in shipped.copy_model(args.name, args.dest):
            print(path)
    else:
        if not args.relpath:
            base = shipped.root()
            if base is None:
                raise MinicaffeError("no shipped files found (this minicaffe was installed without them)")
            print(base)
        else:
            found = shipped.path(args.relpath)
            if found is None:
                raise MinicaffeError(f"'{args.relpath}' is not a shipped file (they are under "
                                     f"{', '.join(f + '/' for f in shipped.FOLDERS)})")
            print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
