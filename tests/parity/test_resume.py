"""Resuming across engines: a .solverstate written by Caffe and resumed by minicaffe, and one written by
minicaffe and resumed by Caffe, end on the weights of Caffe's uninterrupted run (within 1e-5 relative).

The snapshot falls on an epoch boundary of the LMDB (32 records, batch 8, 4 or 8 iterations): neither
engine's .solverstate holds a data position, so both data layers start again at the first record.
"""
import os
import shutil

import pytest

from . import common
from .reference import assert_close

TOL = 1e-5
HALF = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_resume"))
    db = os.path.join(d, "db")
    common.write_lmdb(db)
    net = common.write_net(d, db)
    init = common.write_initial_weights(d, net)
    return d, net, init


CASES = [("SGD", "multistep", None), ("Nesterov", "fixed", None), ("AdaDelta", "fixed", None),
         ("Adam", "step", None), ("Adam", "fixed", "HDF5"), ("RMSProp", "inv", "HDF5")]


@pytest.mark.parametrize("solver,policy,fmt", CASES, ids=[f"{s}-{p}-{f or 'BINARYPROTO'}" for s, p, f in CASES])
def test_resume_across_engines(ref, tiny, tmp_path, solver, policy, fmt):
    src, _, init = tiny
    work = str(tmp_path)
    shutil.copy(os.path.join(src, "net.prototxt"), work)
    ext = "caffemodel.h5" if fmt == "HDF5" else "caffemodel"
    state_ext = "solverstate.h5" if fmt == "HDF5" else "solverstate"

    def solver_file(name, prefix, max_iter):
        text = common.solver_text(solver, policy, max_iter=max_iter, prefix=prefix, snapshot=HALF, fmt=fmt)
        return common.write_solver(work, name, text)

    # Caffe, uninterrupted, with a snapshot half way
    common.train_caffe(ref, work, solver_file("caffe.prototxt", "caffe", 2 * HALF), weights=init)
    theirs = common.weights(_model(work, f"caffe_iter_{2 * HALF}", ext))

    # minicaffe resumes Caffe's half-way state
    common.train_minicaffe(work, solver_file("mini_resume.prototxt", "mini_from_caffe", 2 * HALF),
                           snapshot=f"caffe_iter_{HALF}.{state_ext}")
    mine = common.weights(_model(work, f"mini_from_caffe_iter_{2 * HALF}", ext))
    assert_close(mine, theirs, TOL, f"{solver}: minicaffe resuming Caffe's .{state_ext}")

    # minicaffe trains the first half; Caffe resumes minicaffe's state
    common.train_minicaffe(work, solver_file("mini.prototxt", "mini", HALF), weights=init)
    common.train_caffe(ref, work, solver_file("caffe_resume.prototxt", "caffe_from_mini", 2 * HALF),
                       snapshot=f"mini_iter_{HALF}.{state_ext}")
    resumed = common.weights(_model(work, f"caffe_from_mini_iter_{2 * HALF}", ext))
    assert_close(resumed, theirs, TOL, f"{solver}: Caffe resuming minicaffe's .{state_ext}")


def _model(work, stem, ext):
    return os.path.join(work, f"{stem}.caffemodel") if ext == "caffemodel" else \
        _h5_to_caffemodel(work, f"{stem}.{ext}")


def _h5_to_caffemodel(work, name):
    """An HDF5 snapshot's weights rewritten as a .caffemodel so both formats compare the same way."""
    import h5py
    from minicaffe.proto import caffe_pb2
    net = caffe_pb2.NetParameter()
    with h5py.File(os.path.join(work, name), "r") as f:
        data = f["data"]
        for lname in data:
            layer = net.layer.add(name=lname)
            for k in sorted(data[lname], key=int):
                layer.blobs.add().data.extend(data[lname][k][()].ravel().tolist())
    out = os.path.join(work, name + ".caffemodel")
    with open(out, "wb") as fo:
        fo.write(net.SerializeToString())
    return out
