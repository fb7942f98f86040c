"""What the solver and resume parity tests share: a tiny LeNet-like net, its LMDB and initial weights, and
one function per engine that trains it from a solver description.

The net is chosen so that 1e-5 after 40 iterations measures the solvers, not chaos. Both engines'
gradients differ by float32 summation order (~1e-7 relative), and three things turn that into whole-step
differences: a weight that lands within that noise of 0 under L1 (its sign(w) flips), which dead ReLU units
make common (their weights' only gradient is the L1 term, so they oscillate around 0); AdaGrad/RMSProp
scaling a gradient that is ~0 by cancellation up to a full step (so delta is 1e-4 here, not 1e-8); and
max-pooling ties in flat image regions. Hence TanH instead of ReLU, noisy images, and that delta; the
bit-for-bit check of the update arithmetic itself is test_solver_arithmetic.py.
"""
import os

import numpy as np

from minicaffe.proto import caffe_pb2

from .reference import caffemodel_params

BATCH = 8
RECORDS = 32            # 4 batches: after any multiple of 4 iterations both data layers are back at key 0

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 }
  data_param { source: "%(db)s" batch_size: %(batch)d backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3
    weight_filler { type: "xavier" } bias_filler { type: "gaussian" std: 0.05 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 16
    weight_filler { type: "xavier" } bias_filler { type: "gaussian" std: 0.05 } } }
layer { name: "tanh1" type: "TanH" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10
    weight_filler { type: "xavier" } bias_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

# per solver type: the hyper-parameters LeNet's example solvers use, scaled for a tiny net
SOLVER_PARAMS = {
    "SGD": "base_lr: 0.05\nmomentum: 0.9\n",
    "Nesterov": "base_lr: 0.05\nmomentum: 0.9\n",
    "AdaGrad": "base_lr: 0.02\ndelta: 1e-4\n",
    "RMSProp": "base_lr: 0.005\nrms_decay: 0.98\ndelta: 1e-4\n",
    "AdaDelta": "base_lr: 1.0\nmomentum: 0.95\ndelta: 1e-6\n",
    "Adam": "base_lr: 0.005\nmomentum: 0.9\nmomentum2: 0.999\n",
}

LR_POLICIES = {
    "fixed": "",
    "step": "gamma: 0.5\nstepsize: 7\n",
    "multistep": "gamma: 0.5\nstepvalue: 5\nstepvalue: 13\n",
    "exp": "gamma: 0.97\n",
    "inv": "gamma: 0.01\npower: 0.75\n",
    "poly": "power: 2\n",
    "sigmoid": "gamma: 0.2\nstepsize: 10\n",
}


def write_lmdb(path, records=RECORDS, seed=0):
    """A small 1x12x12 uint8 LMDB with labels 0-9, written with the lmdb module and minicaffe's Datum
    (the same bytes convert_imageset writes for raw images; both engines then read this one file)."""
    import lmdb
    from minicaffe.formats.datum import array_to_datum
    rng = np.random.RandomState(seed)
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(records):
            label = i % 10
            img = rng.randint(0, 200, size=(1, 12, 12))
            img[0, label, :] += 56                 # something learnable, and no flat region: equal
            img = img.astype(np.uint8)             # inputs would tie in max pooling, chaotically
            txn.put(b"%08d" % i, array_to_datum(img, label).SerializeToString())
    env.close()


def write_net(workdir, db):
    path = os.path.join(workdir, "net.prototxt")
    with open(path, "w") as f:
        f.write(NET % {"db": db, "batch": BATCH})
    return path


def write_initial_weights(workdir, net_path, seed=7):
    """Initial weights drawn by minicaffe's fillers and saved as a .caffemodel both engines load."""
    from minicaffe.core import backend
    from minicaffe.net.network import Net
    backend.set_random_seed(seed)
    net = Net(net_path, caffe_pb2.TRAIN)
    out = os.path.join(workdir, "init.caffemodel")
    net.save(out)
    return out


def solver_text(solver_type, policy="fixed", reg="L2", clip=None, iter_size=1, max_iter=40,
                prefix="out", snapshot=0, fmt=None, decay=5e-4):
    text = f'net: "net.prototxt"\ntype: "{solver_type}"\n' + SOLVER_PARAMS[solver_type]
    text += f'lr_policy: "{policy}"\n' + LR_POLICIES[policy]
    text += f'weight_decay: {decay}\nregularization_type: "{reg}"\n'
    if clip is not None:
        text += f"clip_gradients: {clip}\n"
    text += f"iter_size: {iter_size}\nmax_iter: {max_iter}\ndisplay: 0\nrandom_seed: 1\n"
    text += f'snapshot: {snapshot}\nsnapshot_prefix: "{prefix}"\nsolver_mode: CPU\n'
    if fmt:
        text += f"snapshot_format: {fmt}\n"
    return text


def write_solver(workdir, name, text):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def train_caffe(ref, workdir, solver, weights=None, snapshot=None):
    args = ["train", f"--solver={solver}"]
    if weights:
        args.append(f"--weights={weights}")
    if snapshot:
        args.append(f"--snapshot={snapshot}")
    ref.run("caffe", *args, cwd=workdir)


def train_minicaffe(workdir, solver, weights=None, snapshot=None):
    from minicaffe.tools import cli
    args = ["train", f"--solver={solver}"]
    if weights:
        args.append(f"--weights={weights}")
    if snapshot:
        args.append(f"--snapshot={snapshot}")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert cli.main(args) == 0
    finally:
        os.chdir(cwd)


def weights(path):
    return caffemodel_params(path)
