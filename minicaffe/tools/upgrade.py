"""Caffe's upgrade_net_proto_text, upgrade_net_proto_binary and upgrade_solver_proto_text.

Each reads a definition in an old format, brings it to the current one the way Caffe 1.0's
``UpgradeNetAsNeeded`` / ``UpgradeSolverAsNeeded`` do, and writes it back (atomically, so INPUT and
OUTPUT may be the same file). What the net upgrade does, in Caffe's order:

* V0 ``layers { layer { type: "conv" num_output: 96 kernelsize: 11 } }`` (2014 and older) → V1:
  "padding" layers folded into the conv/pool layer they feed, each V0 field moved to its V1 param;
  a field the layer type has no place for is dropped with a warning, and the tool then exits 1
  (after writing the output), as Caffe's does;
* the deprecated transform fields of V1 data layers (scale, mean_file, crop_size, mirror) →
  ``transform_param``;
* V1 ``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 }`` → ``layer { type: "Convolution"
  param { lr_mult: 1 decay_mult: 1 } }``; learned blobs are kept exactly as stored (a V1
  caffemodel's num/channels/height/width blobs stay legacy-shaped, which every reader accepts);
* ``input:`` + ``input_dim``/``input_shape`` → an ``Input`` layer named "input" placed first; bare
  ``input:`` names without any shape (what Caffe wrote into caffemodels before late 2015) are
  dropped, as Caffe does;
* BatchNorm layers that still declare three ``param`` specs get lr_mult 0 and decay_mult 0.

The text is written as Caffe's C++ writes it (``lr_mult: 1``, not Python's ``1.0``), so the output
is the same file Caffe's tool writes. The solver upgrade turns the deprecated ``solver_type`` enum
into the ``type`` string; as an extension, net definitions embedded in the solver (``net_param``,
``train_net_param``, ``test_net_param``) get the net upgrade too, and transform fields in a
current-format data layer's own param are moved as well (Caffe leaves them there, unused).
"""
from __future__ import annotations

import sys

from ..errors import ParseError, SolverError
from ..fileio import atomic_write
from ..proto import caffe_pb2
from ..formats.prototxt import caffe_text, is_old_batch_norm, read_binary_file, read_text_file, upgrade_net
from ..solvers.params import SOLVER_TYPE_NAMES  # Caffe's UpgradeSolverType, one table
from .argparsing import ArgumentParser
from .common import get_logger, run_main

_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


# --- library functions ------------------------------------------------------------------------

def net_upgrade_reasons(param):
    """What in ``param`` is out of date (empty when it is in the current format): Caffe's NetNeedsUpgrade."""
    reasons = []
    if any(l.HasField("layer") for l in param.layers):
        reasons.append("V0 layer definitions")
    elif len(param.layers):
        reasons.append("V1 'layers' definitions")
    for layer in list(param.layers) + list(param.layer):
        for name in ("data_param", "image_data_param", "window_data_param"):
            if layer.HasField(name) and any(getattr(layer, name).HasField(f) for f in _TRANSFORM_FIELDS):
                reasons.append(f"deprecated transformation fields in '{layer.name}'")
                break
    if len(param.input):
        reasons.append("net input fields")
    if any(is_old_batch_norm(l) for l in param.layer):
        reasons.append("BatchNorm layers with three param specs")
    return reasons


def upgrade_net_param(param: caffe_pb2.NetParameter, path: str | None = None,
                      problems: list[str] | None = None) -> list[str]:
    """Bring a NetParameter (text or caffemodel) to the current format in place; returns warnings.
    What Caffe reports as upgrade problems (V0 fields without a place) go to ``problems``."""
    if not len(param.layer) and not len(param.layers):
        raise ParseError("holds no layers (not a net definition?)", path)
    warnings = []
    if len(param.input) and not len(param.input_dim) and not len(param.input_shape):
        # legacy caffemodels name their inputs without shapes; Caffe simply drops the names
        # (upgrade_net drops them after the V0 upgrade, which still needs them)
        warnings.append(f"dropped net input name(s) {', '.join(param.input)} that have no shape "
                        "(input_dim/input_shape), as Caffe does")
    upgrade_net(param, path, problems)
    return warnings


def upgrade_solver_param(param: caffe_pb2.SolverParameter, path: str | None = None) -> bool:
    """Turn ``solver_type`` (enum) into ``type`` (string) in place; True if anything changed."""
    changed = False
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError(f"{path or '<solver>'}: both the old solver_type ({_enum_name(param)}) and "
                              f"the new type ('{param.type}') are given; keep only type")
        param.type = SOLVER_TYPE_NAMES[param.solver_type]
        param.ClearField("solver_type")
        changed = True
    for field in ("net_param", "train_net_param"):
        if param.HasField(field) and net_upgrade_reasons(getattr(param, field)):
            upgrade_net_param(getattr(param, field), f"{path or '<solver>'}: {field}")
            changed = True
    for i, net in enumerate(param.test_net_param):
        if net_upgrade_reasons(net):
            upgrade_net_param(net, f"{path or '<solver>'}: test_net_param[{i}]")
            changed = True
    return changed


def _enum_name(param):
    return caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)


# --- commands ---------------------------------------------------------------------------------

def _parse_args(prog, what, argv):
    parser = ArgumentParser(
        prog=prog, description=f"Upgrade a {what} to the current Caffe format (INPUT may equal OUTPUT).")
    parser.add_argument("input", metavar="INPUT")
    parser.add_argument("output", metavar="OUTPUT")
    return parser.parse_args(argv)


def _upgrade_net_file(argv, binary):
    prog = "upgrade_net_proto_binary" if binary else "upgrade_net_proto_text"
    args = _parse_args(prog, "binary net (.caffemodel)" if binary else "net prototxt", argv)
    if binary:
        param = read_binary_file(args.input, caffe_pb2.NetParameter())
    else:
        param = read_text_file(args.input, caffe_pb2.NetParameter())
    reasons = net_upgrade_reasons(param)
    problems = []
    get_logger()        # the upgrade's own lines (and problems) as glog lines, as Caffe's tool prints them
    warnings = upgrade_net_param(param, args.input, problems)
    for w in warnings:
        print(f"warning: {args.input}: {w}", file=sys.stderr)
    if reasons:
        print(f"Upgraded {args.input} ({'; '.join(reasons)})", file=sys.stderr)
    else:
        print(f"File already in latest proto format: {args.input}", file=sys.stderr)
    if binary:
        atomic_write(args.output, param.SerializeToString())
    else:
        atomic_write(args.output, caffe_text(param))
    kind = "binary" if binary else "text"
    print(f"Wrote upgraded NetParameter {kind} proto to {args.output}", file=sys.stderr)
    if problems:        # written all the same, and the exit status says so, as Caffe's tool
        print(f"error: {args.input}: the upgrade dropped {len(problems)} field(s) (logged above)",
              file=sys.stderr)
        return 1
    return 0


@run_main
def main_net_text(argv=None):
    """upgrade_net_proto_text INPUT OUTPUT"""
    return _upgrade_net_file(argv, binary=False)


@run_main
def main_net_binary(argv=None):
    """upgrade_net_proto_binary INPUT OUTPUT"""
    return _upgrade_net_file(argv, binary=True)


@run_main
def main_solver_text(argv=None):
    """upgrade_solver_proto_text INPUT OUTPUT"""
    args = _parse_args("upgrade_solver_proto_text", "solver prototxt", argv)
    param = read_text_file(args.input, caffe_pb2.SolverParameter())
    if upgrade_solver_param(param, args.input):
        print(f"Upgraded {args.input}", file=sys.stderr)
    else:
        print(f"File already in latest proto format: {args.input}", file=sys.stderr)
    atomic_write(args.output, caffe_text(param))
    print(f"Wrote upgraded SolverParameter text proto to {args.output}", file=sys.stderr)
    return 0


_COMMANDS = {"net_text": main_net_text, "net_binary": main_net_binary, "solver_text": main_solver_text}


def main(argv=None):
    """``python -m minicaffe.tools.upgrade {net_text,net_binary,solver_text} INPUT OUTPUT``"""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: python -m minicaffe.tools.upgrade {{{','.join(_COMMANDS)}}} INPUT OUTPUT",
              file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])


__all__ = ["net_upgrade_reasons", "upgrade_net_param", "upgrade_solver_param", "main_net_text",
           "main_net_binary", "main_solver_text"]

if __name__ == "__main__":
    sys.exit(main())
