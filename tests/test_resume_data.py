"""Bit-exact resume with real data layers: Data (LMDB, also sharded), ImageData (shuffled) and HDF5Data
(shuffled, two files), prefetching on. Train N iterations straight, and train k, snapshot, resume from
the .solverstate to N: the weights must be identical, for SGD with momentum, Adam and iter_size 2.

The data are small enough that every run passes the end of its data several times (so reshuffles and
wrap-arounds fall between the snapshot and the end), and the transforms draw random crops and mirrors
(so the transformer's generator, which the prefetch thread advances ahead of the net, must be saved
as of the batches consumed)."""
import json
import os

import cv2
import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.data import array_to_datum, set_solver_rank
from minicaffe.errors import MinicaffeError

N_ITER, K_ITER = 11, 4
RECORDS = 13            # not a multiple of any batch: every epoch starts mid-batch


@pytest.fixture(autouse=True)
def _reset_rank():
    yield
    set_solver_rank(0, 1)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 6, 6), dtype=np.uint8)


def make_lmdb(path):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, arr in enumerate(_images(RECORDS)):
            txn.put(b"%08d" % i, array_to_datum(arr, i % 3).SerializeToString())
    env.close()
    return str(path)


def make_image_list(folder):
    lines = []
    for i, arr in enumerate(_images(RECORDS, seed=1)):
        name = f"im{i}.png"
        cv2.imwrite(str(folder / name), np.ascontiguousarray(arr.transpose(1, 2, 0)))
        lines.append(f"{name} {i % 3}\n")
    (folder / "list.txt").write_text("".join(lines))
    return str(folder / "list.txt")


def make_hdf5(folder):
    import h5py
    rng = np.random.default_rng(2)
    names = []
    for f, rows in enumerate((7, 6)):
        path = folder / f"part{f}.h5"
        with h5py.File(path, "w") as h5:
            h5["data"] = rng.normal(size=(rows, 3, 4, 4)).astype(np.float32)
            h5["label"] = rng.integers(0, 3, rows).astype(np.float32)
        names.append(str(path))
    (folder / "h5.txt").write_text("\n".join(names) + "\n")
    return str(folder / "h5.txt")


TRANSFORM = "transform_param { crop_size: 4 mirror: true scale: 0.004 }"


def data_layers(kind, folder):
    """A TRAIN and a TEST data layer of ``kind`` (prefetching at its default depth)."""
    if kind == "lmdb":
        src = make_lmdb(folder / "db")
        train = f'type: "Data" data_param {{ source: "{src}" batch_size: 3 backend: LMDB }} {TRANSFORM}'
        test = f'type: "Data" data_param {{ source: "{src}" batch_size: 2 backend: LMDB }} {TRANSFORM}'
    elif kind == "images":
        src = make_image_list(folder)
        param = f'source: "{src}" root_folder: "{folder}/" shuffle: true'
        train = f'type: "ImageData" image_data_param {{ {param} batch_size: 3 }} {TRANSFORM}'
        test = f'type: "ImageData" image_data_param {{ {param} batch_size: 2 }} {TRANSFORM}'
    else:
        src = make_hdf5(folder)
        train = f'type: "HDF5Data" hdf5_data_param {{ source: "{src}" batch_size: 3 shuffle: true }}'
        test = f'type: "HDF5Data" hdf5_data_param {{ source: "{src}" batch_size: 2 shuffle: true }}'
    return train, test


def write_solver(folder, kind, solver, snapshot):
    train, test = data_layers(kind, folder)
    net = f"""name: "resume"
layer {{ name: "data" {train} top: "data" top: "label" include {{ phase: TRAIN }} }}
layer {{ name: "data" {test} top: "data" top: "label" include {{ phase: TEST }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 8 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
    (folder / "net.prototxt").write_text(net)
    rules = {"sgd": 'type: "SGD" momentum: 0.9', "adam": 'type: "Adam" momentum: 0.9 momentum2: 0.999',
             "itersize2": 'type: "SGD" momentum: 0.9 iter_size: 2'}[solver]
    text = f"""net: "{folder}/net.prototxt"
{rules}
base_lr: 0.05
lr_policy: "fixed"
max_iter: {N_ITER}
test_interval: 3
test_iter: 2
snapshot: {snapshot}
snapshot_prefix: "{folder}/s"
random_seed: 5
"""
    path = folder / f"{kind}.solver.prototxt"
    path.write_text(text)
    return str(path)


def weights(solver):
    return [b.data.copy() for b in solver.net.learnable_params]


def close(*solvers):
    """Stop the prefetch threads now (other tests count threads)."""
    for solver in solvers:
        for net in [solver.net] + list(solver.test_nets):
            for layer in net.layers:
                getattr(layer, "close", lambda: None)()


def straight_and_resumed(tmp_path, kind, solver_type, rank=None, edit_sidecar=None):
    if rank is not None:
        set_solver_rank(*rank)
    path = write_solver(tmp_path, kind, solver_type, snapshot=K_ITER)
    straight = caffe.get_solver(path)
    straight.solve()
    expected = weights(straight)
    state = f"{tmp_path}/s_iter_{K_ITER}.solverstate"
    if edit_sidecar:
        edit_sidecar(state + ".rng")
    resumed = caffe.get_solver(path)
    resumed.solve(resume_file=state)
    close(straight, resumed)
    assert resumed.iter == N_ITER
    return expected, weights(resumed)


@pytest.mark.parametrize("solver_type", ["sgd", "adam", "itersize2"])
@pytest.mark.parametrize("kind", ["lmdb", "images", "hdf5"])
def test_resume_with_real_data_layers_is_bit_exact(tmp_path, kind, solver_type):
    expected, got = straight_and_resumed(tmp_path, kind, solver_type)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["lmdb", "hdf5"])
def test_resume_of_a_sharded_reader_is_bit_exact(tmp_path, kind):
    """Rank 1 of 2 reads every other record; its position is in its own stream."""
    expected, got = straight_and_resumed(tmp_path, kind, "sgd", rank=(1, 2))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_sidecar_holds_the_positions_of_the_batches_consumed(tmp_path):
    """The prefetch thread has read ahead when the snapshot is written; the position saved is that
    after the k * batch records the net took (stream offset and the key of the next record)."""
    path = write_solver(tmp_path, "lmdb", "sgd", snapshot=K_ITER)
    solver = caffe.get_solver(path)
    solver.param.max_iter = K_ITER
    solver.solve()
    close(solver)
    with open(f"{tmp_path}/s_iter_{K_ITER}.solverstate.rng", encoding="utf-8") as f:
        data = json.load(f)["data"]
    consumed = K_ITER * 3
    train = data["train"]["data"]["source"]
    assert train["offset"] == consumed and train["epochs"] == consumed // RECORDS
    assert bytes.fromhex(train["key"]) == b"%08d" % (consumed % RECORDS)
    tested = 2 * 2 * 2          # tests at iterations 0 and 3, 2 batches of 2 each
    assert data["test"][0]["data"]["source"]["offset"] == tested


@pytest.mark.parametrize("kind", ["lmdb", "images", "hdf5"])
def test_sidecar_without_positions_still_resumes(tmp_path, kind):
    """Sidecars written before positions were saved have no "data": the layers replay the records
    read so far from the start. Exact where the transform draws nothing (HDF5; others: no mirror)."""
    global TRANSFORM
    saved, TRANSFORM = TRANSFORM, "transform_param { scale: 0.004 }"

    def drop(side):
        with open(side, encoding="utf-8") as f:
            data = json.load(f)
        del data["data"]
        with open(side, "w", encoding="utf-8") as f:
            json.dump(data, f)
    try:
        expected, got = straight_and_resumed(tmp_path, kind, "sgd", edit_sidecar=drop)
    finally:
        TRANSFORM = saved
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_unreadable_position_names_the_layer(tmp_path):
    """A sidecar whose position does not fit the data (here: the list names other files) is one error."""
    path = write_solver(tmp_path, "hdf5", "sgd", snapshot=K_ITER)
    solver = caffe.get_solver(path)
    solver.param.max_iter = K_ITER
    solver.solve()
    close(solver)
    side = f"{tmp_path}/s_iter_{K_ITER}.solverstate.rng"
    with open(side, encoding="utf-8") as f:
        data = json.load(f)
    data["data"]["train"]["data"]["file_order"] = [0, 1, 2]
    with open(side, "w", encoding="utf-8") as f:
        json.dump(data, f)
    resumed = caffe.get_solver(path)
    with pytest.raises(MinicaffeError, match=r"^layer 'data'.*names 3 HDF5 files, the list has 2"):
        resumed.restore(f"{tmp_path}/s_iter_{K_ITER}.solverstate")
    close(resumed)
    assert os.path.exists(side)


@pytest.mark.parametrize("kind", ["lmdb", "images", "hdf5"])
def test_replayed_position_matches_reading(tmp_path, kind):
    """``restore_position(n)`` (older sidecars, data-parallel workers) skips whole stretches rather
    than reading: it must land where reading ``n`` records would, with shards, rand_skip and reshuffles."""
    from minicaffe.core import backend
    from minicaffe.testing import make_layer
    train, _ = data_layers(kind, tmp_path)
    train = train.replace(TRANSFORM, "")
    if kind != "hdf5":
        train = train.replace("batch_size: 3", "batch_size: 3 rand_skip: 11")
    set_solver_rank(1, 3)
    layers = []
    for _ in range(2):
        backend.set_random_seed(3)
        layers.append(make_layer(f'name: "d" {train} top: "data" top: "label"', [], num_top=2))
    (a, _, top_a), (b, _, top_b) = layers
    for _ in range(9):                  # 27 records of the shard: several passes over 13
        a.forward([], top_a)
    b.restore_position(27)
    for _ in range(4):
        a.forward([], top_a)
        b.forward([], top_b)
        for x, y in zip(top_a, top_b):
            np.testing.assert_array_equal(x.data, y.data)
    for layer in (a, b):
        getattr(layer, "close", lambda: None)()
