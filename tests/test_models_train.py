"""The release train_val nets build against real (small) LMDBs and train: issue 3's model checks.

The nets are used as shipped; only each Data layer's ``source`` (pointed at an LMDB written here)
and ``batch_size`` (made small) are changed, so every other line of the file is exercised.
"""
import os

import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.data import array_to_datum
from minicaffe.formats.prototxt import load_net_param
from minicaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_lmdb(path, n, side=256, classes=1000, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i in range(n):
            img = rng.integers(0, 256, (channels, side, side), dtype=np.uint8)
            txn.put(b"%08d_img%d.jpg" % (i, i),
                    array_to_datum(img, int(rng.integers(classes))).SerializeToString())
    env.close()
    return str(path)


def pointed_at(model, source, batch):
    """The model's train_val NetParameter with every Data layer reading ``source`` in batches of ``batch``."""
    param = load_net_param(os.path.join(ROOT, "models", model, "train_val.prototxt"))
    data_layers = [lp for lp in param.layer if lp.type == "Data"]
    assert len(data_layers) == 2          # one TRAIN, one TEST, as shipped
    for lp in data_layers:
        lp.data_param.source = source
        lp.data_param.batch_size = batch
    return param


@pytest.fixture(scope="module")
def small_lmdb(tmp_path_factory):
    return write_lmdb(tmp_path_factory.mktemp("db") / "train_lmdb", 4)


def test_googlenet_train_val_builds_and_one_iteration_runs(small_lmdb):
    param = pointed_at("googlenet", small_lmdb, 2)
    backend.set_random_seed(3)
    test_net = caffe.Net(param, caffe.TEST)
    assert test_net.blobs["data"].data.shape == (2, 3, 224, 224)
    # TEST keeps the three accuracy heads (top-1 and top-5 per head), TRAIN only the losses
    assert {"loss1/top-1", "loss2/top-5", "loss3/top-1"} <= set(test_net.outputs)

    net = caffe.Net(param, caffe.TRAIN)
    assert set(net.outputs) == {"loss1/loss1", "loss2/loss2", "loss3/loss3"}
    assert net.blobs["inception_5b/output"].data.shape == (2, 1024, 7, 7)
    net.clear_param_diffs()
    loss = net.forward_backward()
    assert np.isfinite(loss) and loss > 0
    # the loss heads' weights 0.3/0.3/1 (the reproduction's): the total is their weighted sum
    heads = {k: float(net.blobs[k].data) for k in net.outputs}
    expected = 0.3 * heads["loss1/loss1"] + 0.3 * heads["loss2/loss2"] + heads["loss3/loss3"]
    assert loss == pytest.approx(expected, rel=1e-5)
    # every learnable parameter received a gradient, down to the first convolution
    first = net.params["conv1/7x7_s2"][0]
    assert np.abs(first.diff).sum() > 0
    assert all(np.isfinite(p.diff).all() for p in net.learnable_params)


@pytest.mark.slow
def test_vgg16_train_val_builds_in_both_phases(small_lmdb):
    param = pointed_at("vgg/vgg_d", small_lmdb, 1)
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(param, phase)
        assert net.blobs["pool5"].data.shape == (1, 512, 7, 7)
        assert net.blobs["fc8"].data.shape == (1, 1000)
        assert net.params["fc6"][0].data.shape == (4096, 25088)
    loss = net.forward()    # TEST: accuracy and loss from the LMDB's records
    assert np.isfinite(loss["loss"])


def test_label_out_of_range_names_the_loss_layer(tmp_path):
    """Labels from an LMDB made for more classes than the net has: one line naming the layer."""
    source = write_lmdb(tmp_path / "db", 2, side=28, classes=1, channels=1)
    env = lmdb.open(source, map_size=1 << 24)
    with env.begin(write=True) as txn:       # one record labelled 10 for LeNet's 10 classes
        img = np.zeros((1, 28, 28), np.uint8)
        txn.put(b"%08d_x" % 0, array_to_datum(img, 10).SerializeToString())
    env.close()
    param = pointed_at("lenet", source, 2)
    net = caffe.Net(param, caffe.TRAIN)
    with pytest.raises(caffe.errors.MinicaffeError, match=r"'loss'.*label 10 is out of range \[0, 10\)"):
        net.forward()


def test_solvers_name_the_missing_lmdb(tmp_path):
    solver = caffe_pb2.SolverParameter()
    solver.net_param.CopyFrom(pointed_at("lenet", str(tmp_path / "no_such_lmdb"), 2))
    solver.base_lr, solver.lr_policy, solver.max_iter = 0.01, "fixed", 1
    with pytest.raises(caffe.errors.MinicaffeError, match="no_such_lmdb"):
        caffe.SGDSolver(solver)
