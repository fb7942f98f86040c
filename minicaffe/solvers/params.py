"""Reading a solver definition: a SolverParameter from a path, prototxt text or a message, Caffe's
upgrades of old solver files (the ``solver_type`` enum, a missing or folder ``snapshot_prefix``), and
the checks of its fields that can be made before any net is built.

Errors name the solver file and the field (``SolverError``), raised here, where the definition
enters, so a typo costs no net construction (minutes for a big net).
"""
from __future__ import annotations

import os

from ..deps import require
from ..errors import SolverError, did_you_mean
from ..formats.prototxt import load_solver_param, prototxt_path
from ..proto import caffe_pb2
from .checkpoint import check_snapshot_dir
from .lr_policy import POLICIES, learning_rate

# Caffe's UpgradeSolverType: the old ``solver_type`` enum value -> the ``type`` string
SOLVER_TYPE_NAMES = {
    caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta", caffe_pb2.SolverParameter.ADAM: "Adam",
}


def read_solver_param(source: str | os.PathLike | caffe_pb2.SolverParameter
                      ) -> tuple[caffe_pb2.SolverParameter, str | None]:
    """A SolverParameter from a path, prototxt text or a message, upgraded as Caffe's
    ``ReadSolverParamsFromTextFileOrDie``: the old ``solver_type`` enum becomes ``type``; a missing
    ``snapshot_prefix`` becomes the solver file's path without extension, a directory gets the file's
    stem appended. Returns ``(param, solver_file or None)``."""
    path = None
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
    else:
        path = prototxt_path(source)
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(load_solver_param(source))
    upgrade_solver_param(param, path)
    if param.lr_policy and param.lr_policy not in POLICIES:
        # a typo is reported as the file is read, before the nets are built (minutes for a big one)
        raise SolverError(f"{path or '<solver>'}: unknown learning rate policy '{param.lr_policy}'"
                          f"{did_you_mean(param.lr_policy, POLICIES)}; known: {', '.join(POLICIES)}")
    return param, path


def upgrade_solver_param(param, path=None):
    """Caffe's solver upgrades, in place (see ``read_solver_param``)."""
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError(f"{path or '<solver>'}: give either the old 'solver_type' (enum) or 'type' "
                              f"(string), not both")
        param.type = SOLVER_TYPE_NAMES.get(param.solver_type, str(param.solver_type))
        param.ClearField("solver_type")
    if path is not None:
        if not param.HasField("snapshot_prefix"):
            param.snapshot_prefix = os.path.splitext(path)[0]
        elif os.path.isdir(param.snapshot_prefix):
            stem = os.path.splitext(os.path.basename(path))[0]
            param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
    return param


def check_solver_param(p, where, log, root=True):
    """SolverError naming ``where`` for a field that cannot work (checked when the solver is made,
    before its nets are built); a warning for test nets that will run on no batches. ``root``: this
    process writes the snapshots (the root worker of a data-parallel run, or the only one)."""
    if p.average_loss < 1:
        raise SolverError(f"{where}: average_loss should be >= 1 (got {p.average_loss})")
    if p.iter_size < 1:
        raise SolverError(f"{where}: iter_size should be >= 1 (got {p.iter_size})")
    try:   # a misspelt lr_policy or a missing stepsize fails now, not at the first update (an
        if p.lr_policy:   # unset one fails at the first update, as in Caffe)
            learning_rate(p, 0, 0)
    except SolverError as exc:
        raise SolverError(f"{where}: {exc}") from None
    if p.weight_decay and p.regularization_type not in ("L1", "L2"):
        raise SolverError(f"{where}: unknown regularization_type '{p.regularization_type}' (use L2 or L1)")
    if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        require("h5py", f"{where}: snapshot_format HDF5 (or use BINARYPROTO)", SolverError)
    if p.snapshot and not p.HasField("snapshot_prefix"):
        raise SolverError(f"{where}: snapshot is given but snapshot_prefix is not")
    # With periodic snapshots the folder must be there now (Caffe's CheckSnapshotWritePermissions).
    # Without them it is checked when training starts (solve(), minicaffe train), since the final
    # (snapshot_after_train) and NaN-stop snapshots need it; a pycaffe loop of step() that never
    # snapshots works without it, as in Caffe. Only the root writes snapshots.
    if root and p.snapshot:
        check_snapshot_dir(p.snapshot_prefix, where)
    for i, n in enumerate(p.test_iter):
        if n <= 0:     # Caffe tests on no batches and prints no output lines; say so once
            log.warning("%s: test_iter is %d for test net #%d: it will be run on no batches (no test "
                        "output lines)", where, n, i)
