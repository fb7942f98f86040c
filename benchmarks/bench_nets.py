"""Whole-net speed and memory of minicaffe next to PyTorch (CPU) and OpenCV's dnn module.

For each net (LeNet, CaffeNet, GoogLeNet, VGG-16, ResNet-50 from ``models/``), at the batch of
issue 15's targets for each mode unless ``--batch`` overrides it (``NETS``):

* **train**: one SGD iteration (forward, backward, momentum update with weight decay, as
  ``caffe.SGDSolver.step(1)``) of the net's ``train_val.prototxt`` (TRAIN phase, its Data layer
  replaced by an Input layer of the same batch) in minicaffe, and of the same architecture in
  ``torch.nn`` (built here from the prototxt, weights copied from the same ``.caffemodel``,
  ``torch.optim.SGD`` with Caffe's lr_mult/decay_mult as parameter groups);
* **infer**: a forward pass of ``deploy.prototxt`` in minicaffe, PyTorch (``torch.no_grad``) and
  ``cv2.dnn.readNetFromCaffe(deploy, caffemodel)`` on a ``.caffemodel`` minicaffe saved (so it also
  shows OpenCV reads minicaffe's files); outputs are compared with minicaffe's.

Every (framework, net, mode) runs in its own subprocess, so peak memory is that process's own:
``VmHWM`` (peak resident set) during the timed iterations minus the resident set after imports.
Times are the best of ``--iters`` iterations after ``--warmup`` (of every round's, with
``--rounds N``: each framework runs N times, the frameworks in turn, so a burst of load on a shared
machine lands on one round of each instead of on one framework's whole run); the ratio column is
minicaffe / reference (below 1: minicaffe is faster). Where a ratio is above 1 the slowest
minicaffe layers are listed (``Net.forward_from_to(timings=...)``).

    python benchmarks/bench_nets.py                        # all nets, default batches
    python benchmarks/bench_nets.py --nets vgg16 --iters 2 --modes train
    python benchmarks/bench_nets.py --quick                # LeNet, one iteration (smoke test)
    python benchmarks/bench_nets.py --scaling              # + minicaffe at one thread, 1 -> N speed-up
    python benchmarks/bench_nets.py --scaling --rounds 2   # the same, each framework twice in turn
    python benchmarks/bench_nets.py --numpy-first          # minicaffe imported after NumPy (see below)
    python benchmarks/bench_nets.py --minicaffe-python ../venv-numpy24/bin/python   # minicaffe as installed
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The minicaffe worker imports minicaffe before NumPy, as the ``minicaffe`` commands do (and a script
# that starts with ``import minicaffe``): minicaffe then loads OpenBLAS with a short idle spin, so the
# kernels' thread pool gets the cores the GEMMs leave (``minicaffe/core/threads.py``). With
# ``--numpy-first`` it imports NumPy first, as a script that starts with ``import numpy`` does: a
# pool of one thread then, unless OPENBLAS_THREAD_TIMEOUT is set.
_WORKER = sys.argv[sys.argv.index("--worker") + 1] if "--worker" in sys.argv[:-1] else None
if _WORKER == "minicaffe" and "--numpy-first" not in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import minicaffe  # noqa: E402,F401

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

NETS = {
    # name: (model directory, {mode: default batch}, input shape without the batch); the batches
    # are issue 15's: inference 10 (VGG-16 2), training CaffeNet 32, GoogLeNet 16, ResNet-50 8,
    # VGG-16 4
    "lenet": ("models/lenet", {"train": 64, "infer": 64}, (1, 28, 28)),
    "caffenet": ("models/caffenet", {"train": 32, "infer": 10}, (3, 227, 227)),
    "googlenet": ("models/googlenet", {"train": 16, "infer": 10}, (3, 224, 224)),
    "vgg16": ("models/vgg/vgg_d", {"train": 4, "infer": 2}, (3, 224, 224)),
    "resnet50": ("models/resnet50", {"train": 8, "infer": 10}, (3, 224, 224)),
}
# nets whose weights are made here rather than by their train_val's fillers: a BatchNorm's
# statistics from a filler are zeros (variance 0), which no 50-layer net survives, so He's
# fillers are used and each BatchNorm's statistics are measured on the input (``deploy_weights``)
MEASURED_STATS = ("resnet50",)
FRAMEWORKS = ("minicaffe", "torch", "opencv")
DATA_TYPES = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData")


# --- memory ---------------------------------------------------------------------------------

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak():
    """Make VmHWM start again from the current resident set (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- net definitions --------------------------------------------------------------------------

def train_param(name, batch):
    """The TRAIN-phase net of ``train_val.prototxt`` with its data layer replaced by an Input layer."""
    from minicaffe.proto import caffe_pb2
    from minicaffe.formats.prototxt import filter_net, load_net_param, make_state
    directory, _, shape = NETS[name]
    param = load_net_param(os.path.join(ROOT, directory, "train_val.prototxt"))
    param = filter_net(param, make_state(caffe_pb2.TRAIN))
    out = caffe_pb2.NetParameter()
    out.name = param.name
    for lp in param.layer:
        if lp.type in DATA_TYPES:
            data = out.layer.add()
            data.name, data.type = lp.name, "Input"
            data.top.extend(lp.top[:2])
            data.input_param.shape.add().dim.extend((batch,) + tuple(shape))
            data.input_param.shape.add().dim.extend([batch])
        elif lp.type != "Accuracy":
            out.layer.add().CopyFrom(lp)
    return out


def deploy_param(name, batch):
    """``deploy.prototxt`` upgraded to the current format, with the batch set."""
    from minicaffe.formats.prototxt import load_net_param
    directory, _, shape = NETS[name]
    param = load_net_param(os.path.join(ROOT, directory, "deploy.prototxt"))
    for lp in param.layer:
        if lp.type == "Input":
            del lp.input_param.shape[:]
            lp.input_param.shape.add().dim.extend((batch,) + tuple(shape))
    return param


def write_text(path, param):
    from google.protobuf import text_format
    with open(path, "w") as f:
        f.write(text_format.MessageToString(param))


def inputs(name, batch, seed=0):
    _, _, shape = NETS[name]
    rng = np.random.default_rng(seed)
    classes = 10 if name == "lenet" else 1000
    data = rng.standard_normal((batch,) + tuple(shape), dtype=np.float32)
    if name == "lenet":
        data = np.abs(data) * 0.3
    labels = rng.integers(0, classes, batch).astype(np.float32)
    return data, labels


def solver_param(net_param):
    from minicaffe.proto import caffe_pb2
    sp = caffe_pb2.SolverParameter()
    sp.net_param.CopyFrom(net_param)
    sp.base_lr, sp.momentum, sp.weight_decay = 0.001, 0.9, 0.0005
    sp.lr_policy, sp.max_iter, sp.display, sp.snapshot = "fixed", 1 << 30, 0, 0
    sp.random_seed = 1
    return sp


# --- workers: each runs in its own process ------------------------------------------------------

def _loop(step, warmup, iters):
    """Wall and CPU seconds of each timed step (CPU time: all threads of this process, which
    stays meaningful when other processes share the cores), and the peak RSS in kB."""
    for _ in range(warmup):
        step()
    reset = reset_peak()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu, (_status_kb("VmHWM") if reset else None)


def _solver_loop(solver, warmup, iters):
    """``_loop`` for a training net: the timed iterations as one ``solver.step(iters)``, as
    ``minicaffe train`` runs them, each iteration timed from its start to the next one's (a solver
    callback). Why not ``step(1)`` each: within one call the update leaves the diffs zero for the
    next iteration (``Solver.apply_update``), where each call of its own clears them first, a pass
    over every parameter gradient that a training run does once."""
    solver.step(warmup)
    reset = reset_peak()
    marks = []
    solver.add_callback(lambda: marks.append((time.perf_counter(), time.process_time())), lambda: None)
    solver.step(iters)
    marks.append((time.perf_counter(), time.process_time()))
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    return times, cpu, (_status_kb("VmHWM") if reset else None)


def deploy_weights(net, data, seed=1):
    """Weights for a deploy-only net: He (MSRA) normal convolution / fc weights, Scale gamma in
    [0.5, 1) and small beta, and each BatchNorm's global statistics set to the mean and variance of
    its input on ``data`` (layer by layer), so activations keep a sensible scale through 50 layers
    and every framework computes the same, well-conditioned function."""
    rng = np.random.default_rng(seed)
    net.blobs[net.inputs[0]].data[...] = data
    done = 0            # layers before this one have run with their final weights
    for li, layer in enumerate(net.layers):
        if layer.type in ("Convolution", "InnerProduct"):
            w = layer.blobs[0].data
            w[...] = rng.standard_normal(w.shape, dtype=np.float32) * np.sqrt(2.0 / (w.size // w.shape[0]))
            if len(layer.blobs) > 1:
                layer.blobs[1].data[...] = 0.01 * rng.standard_normal(layer.blobs[1].shape, dtype=np.float32)
        elif layer.type == "Scale":
            layer.blobs[0].data[...] = rng.uniform(0.5, 1.0, layer.blobs[0].shape)
            if len(layer.blobs) > 1:
                layer.blobs[1].data[...] = 0.1 * rng.standard_normal(layer.blobs[1].shape)
        elif layer.type == "BatchNorm":
            net.forward_from_to(done, li - 1)
            done = li
            x = net._bottom[li][0].data
            layer.blobs[0].data[...] = x.mean(axis=(0, 2, 3))
            layer.blobs[1].data[...] = x.var(axis=(0, 2, 3))
            layer.blobs[2].data[...] = 1.0


def default_batch(name, mode):
    """Issue 15's batch for ``mode`` ("train" or "infer") of net ``name``."""
    return NETS[name][1][mode]


def prepare(args):
    """Build the train net (fillers), save its weights as a caffemodel and deploy prototxt, and
    minicaffe's inference output for the other frameworks to compare with."""
    import minicaffe as caffe
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)
    work = args.workdir
    dp = deploy_param(args.net, args.batch)
    write_text(os.path.join(work, "deploy.prototxt"), dp)
    data, labels = inputs(args.net, args.batch)
    tp = train_param(args.net, args.batch)
    write_text(os.path.join(work, "train.prototxt"), tp)
    if args.net in MEASURED_STATS:
        net = caffe.Net(dp, caffe.TEST)
        deploy_weights(net, data)
    else:
        net = caffe.Net(tp, caffe.TRAIN)
    net.save(os.path.join(work, "weights.caffemodel"))
    del net
    np.save(os.path.join(work, "data.npy"), data)
    np.save(os.path.join(work, "labels.npy"), labels)
    dnet = caffe.Net(os.path.join(work, "deploy.prototxt"), caffe.TEST,
                     weights=os.path.join(work, "weights.caffemodel"))
    out = dnet.forward(**{dnet.inputs[0]: data})
    np.save(os.path.join(work, "output.npy"), out[dnet.outputs[0]])
    return {}


def run_minicaffe(args):
    import minicaffe as caffe
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)
    work = args.workdir
    data, labels = np.load(os.path.join(work, "data.npy")), np.load(os.path.join(work, "labels.npy"))
    # the compiled kernels' libraries (Numba, LLVM) are imports, as torch's and cv2's are for theirs;
    # what they add to the resident set is reported on its own (compiled_mb)
    before = _status_kb("VmRSS")
    from minicaffe.kernels import compiled
    compiled.warm_up()
    base = _status_kb("VmRSS")
    res = {"compiled_mb": (base - before) / 1024.0}
    # MKL's libraries too, where the mkl package is installed (core/mkl.py): reported as mkl_mb
    from minicaffe.core import mkl
    if mkl.warm_up():
        res["mkl_mb"] = (_status_kb("VmRSS") - base) / 1024.0
        base = _status_kb("VmRSS")
    if args.mode == "train":
        from minicaffe.proto import caffe_pb2
        from minicaffe.formats.prototxt import load_net_param
        sp = solver_param(load_net_param(os.path.join(work, "train.prototxt")))
        sp.weights.append(os.path.join(work, "weights.caffemodel"))
        # the run's lock (and any snapshot) in its own folder, not the caller's: two benchmarks
        # started from one directory would otherwise refuse each other's solver
        sp.snapshot_prefix = os.path.join(work, "snapshot")
        solver = caffe.SGDSolver(sp)
        net = solver.net
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = labels
        step = None
        del caffe_pb2
    else:
        # blobs whose lifetimes do not overlap share memory (only the output is read), unless
        # --no-share-memory asks for every blob's own, for the before/after comparison
        net = caffe.Net(os.path.join(work, "deploy.prototxt"), caffe.TEST,
                        weights=os.path.join(work, "weights.caffemodel"), share_memory=not args.no_share_memory)
        net.blobs[net.inputs[0]].data[...] = data
        step = lambda: net.forward()  # noqa: E731
    times, cpu, peak = _loop(step, args.warmup, args.iters) if step is not None else \
        _solver_loop(solver, args.warmup, args.iters)
    res["times"], res["cpu"] = times, cpu
    res["peak_mb"] = None if peak is None else (peak - base) / 1024.0
    from minicaffe.core import threads
    res["pool"] = threads.size()
    if args.mode == "infer":
        ref = np.load(os.path.join(work, "output.npy"))
        res["max_diff"] = float(np.abs(net.blobs[net.outputs[0]].data - ref).max())
    # per-layer timings, after the timed loop so they do not disturb it. A training net runs one
    # untimed pass first: these passes keep every blob's diff (the solver's pass shares them,
    # net/diff_plan.py), and the first one would time their allocation and first touch (ResNet-50's
    # Eltwise backward 38 ms against 5)
    if args.mode == "train":
        net.forward()
        net.backward()
        net.clear_param_diffs()
    fwd, bwd = {}, {}
    runs = max(1, min(args.iters, 2))
    for _ in range(runs):
        net.forward_from_to(timings=fwd)
        if args.mode == "train":
            net.backward_from_to(timings=bwd)
            net.clear_param_diffs()
    res["layers"] = [(name, layer.type, fwd.get(i, 0.0) / runs, bwd.get(i, 0.0) / runs)
                     for i, (name, layer) in enumerate(zip(net._layer_names, net.layers))]
    return res


def _caffemodel_arrays(path):
    from minicaffe.net.network import blobproto_to_array
    from minicaffe.proto import caffe_pb2
    with open(path, "rb") as f:
        model = caffe_pb2.NetParameter.FromString(f.read())
    return {lp.name: [blobproto_to_array(b) for b in lp.blobs] for lp in model.layer if len(lp.blobs)}


def build_torch(param, weights):
    """A torch.nn.Module running the layers of a Caffe NetParameter in order, with the given weights.

    Supports what the benchmark nets use: Input, Convolution, ReLU, Pooling, LRN (across channels),
    InnerProduct, Dropout, Concat, Softmax, SoftmaxWithLoss, BatchNorm (global statistics), Scale,
    Eltwise SUM. ReLU runs in place where the prototxt says so (top == bottom), as Caffe does. A
    BatchNorm followed by a Scale on the same blob becomes one ``nn.BatchNorm2d`` with affine
    weights (learned, as the Scale's), as torchvision's ResNet writes it: in ``train()`` mode it
    normalises with the batch's statistics, as Caffe's BatchNorm in TRAIN without
    ``use_global_stats``; in ``eval()`` mode, and always where the prototxt sets
    ``use_global_stats: true``, with the stored ones.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from minicaffe.proto import caffe_pb2
    PP = caffe_pb2.PoolingParameter

    class FrozenBatchNorm2d(nn.BatchNorm2d):
        """``use_global_stats: true``: the stored statistics in training too."""

        def train(self, mode=True):
            return super().train(False)

    class CaffeModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleDict()
            self.steps = []
            self.param_mults = []   # (tensor, lr_mult, decay_mult)
            layers = list(param.layer)
            merged = set()     # Scale layers folded into the BatchNorm2d before them
            for i, lp in enumerate(layers):
                key = lp.name.replace("/", "_").replace(".", "_")
                fn = None
                t = lp.type
                if t == "Input" or lp.name in merged:
                    continue
                if t == "BatchNorm":
                    mean, var, factor = weights[lp.name]
                    f = 0.0 if factor.reshape(-1)[0] == 0 else 1.0 / factor.reshape(-1)[0]
                    nxt = layers[i + 1] if i + 1 < len(layers) else None
                    affine = (nxt is not None and nxt.type == "Scale" and list(nxt.bottom) == list(lp.top)
                              and len(nxt.bottom) == 1)
                    frozen = (lp.batch_norm_param.HasField("use_global_stats")
                              and lp.batch_norm_param.use_global_stats)
                    mod = (FrozenBatchNorm2d if frozen else nn.BatchNorm2d)(
                        mean.size, eps=lp.batch_norm_param.eps, affine=affine)
                    with torch.no_grad():
                        mod.running_mean.copy_(torch.from_numpy(mean.reshape(-1) * f))
                        mod.running_var.copy_(torch.from_numpy(var.reshape(-1) * f))
                        if affine:
                            merged.add(nxt.name)
                            sw = weights[nxt.name]
                            mod.weight.copy_(torch.from_numpy(sw[0].reshape(-1)))
                            if len(sw) > 1:
                                mod.bias.copy_(torch.from_numpy(sw[1].reshape(-1)))
                            else:
                                mod.bias.zero_()
                                mod.bias.requires_grad_(False)     # a Scale without bias learns none
                            # the Scale's parameters are learned, with its lr/decay multipliers
                            for k, tp in enumerate((mod.weight, mod.bias)[:len(sw)]):
                                spec = nxt.param[k] if k < len(nxt.param) else caffe_pb2.ParamSpec()
                                self.param_mults.append(
                                    (tp, spec.lr_mult if spec.HasField("lr_mult") else 1.0,
                                     spec.decay_mult if spec.HasField("decay_mult") else 1.0))
                    self.mods[key] = mod
                    self.steps.append((mod, list(lp.bottom), list(nxt.top if affine else lp.top), False))
                    continue
                if t == "Scale":
                    sw = [torch.from_numpy(a.reshape(1, -1, 1, 1)) for a in weights[lp.name]]
                    fn = (lambda ws: (lambda x: x * ws[0] + ws[1]) if len(ws) > 1 else
                          (lambda x: x * ws[0]))(sw)
                    self.steps.append((fn, list(lp.bottom), list(lp.top), False))
                    continue
                if t == "Eltwise":
                    if lp.eltwise_param.operation != caffe_pb2.EltwiseParameter.SUM or \
                            len(lp.eltwise_param.coeff):
                        raise ValueError(f"Eltwise {lp.name}: only a plain SUM has a torch translation here")
                    fn = lambda *xs: sum(xs[1:], xs[0])  # noqa: E731
                    self.steps.append((fn, list(lp.bottom), list(lp.top), False))
                    continue
                if t == "Convolution":
                    cp = lp.convolution_param
                    w = weights[lp.name][0]
                    mod = nn.Conv2d(w.shape[1] * cp.group, cp.num_output, tuple(w.shape[2:]),
                                    stride=(list(cp.stride) or [1])[0], padding=(list(cp.pad) or [0])[0],
                                    dilation=(list(cp.dilation) or [1])[0], groups=cp.group,
                                    bias=cp.bias_term)
                    fn = mod
                elif t == "InnerProduct":
                    w = weights[lp.name][0]
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=lp.inner_product_param.bias_term)
                    mod = lin
                    fn = (lambda m: lambda x: m(x.flatten(1)))(lin)
                elif t == "ReLU":
                    inplace = lp.top[0] == lp.bottom[0]
                    fn = (lambda ip: lambda x: F.relu(x, inplace=ip))(inplace)
                    mod = None
                elif t == "Dropout":
                    # not in place: torch's ReLU backward reads the output a dropout would overwrite
                    mod = nn.Dropout(lp.dropout_param.dropout_ratio)
                    fn = mod
                elif t == "Pooling":
                    pp = lp.pooling_param
                    if pp.global_pooling:
                        mod = nn.AdaptiveMaxPool2d(1) if pp.pool == PP.MAX else nn.AdaptiveAvgPool2d(1)
                    elif pp.pool == PP.MAX:
                        mod = nn.MaxPool2d(pp.kernel_size, pp.stride, pp.pad, ceil_mode=True)
                    else:
                        mod = nn.AvgPool2d(pp.kernel_size, pp.stride, pp.pad, ceil_mode=True)
                    fn = mod
                elif t == "LRN":
                    p = lp.lrn_param
                    mod = nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k)
                    fn = mod
                elif t == "Concat":
                    axis = lp.concat_param.axis
                    fn = (lambda a: lambda *xs: torch.cat(xs, a))(axis)
                    mod = None
                elif t == "Softmax":
                    fn = lambda x: F.softmax(x, dim=1)  # noqa: E731
                    mod = None
                elif t == "SoftmaxWithLoss":
                    lw = lp.loss_weight[0] if len(lp.loss_weight) else 1.0
                    fn = (lambda w: lambda x, y: w * F.cross_entropy(x, y.long()))(lw)
                    mod = None
                else:
                    raise ValueError(f"layer type {t} ({lp.name}) has no torch translation here")
                if mod is not None:
                    self.mods[key] = mod
                if lp.name in weights and mod is not None:
                    with torch.no_grad():
                        for k, (tp, arr) in enumerate(zip(mod.parameters(), weights[lp.name])):
                            tp.copy_(torch.from_numpy(arr.reshape(tuple(tp.shape))))
                            spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
                            lr = spec.lr_mult if spec.HasField("lr_mult") else 1.0
                            decay = spec.decay_mult if spec.HasField("decay_mult") else 1.0
                            self.param_mults.append((tp, lr, decay))
                self.steps.append((fn, list(lp.bottom), list(lp.top), t == "SoftmaxWithLoss"))

        def forward(self, blobs):
            loss = None
            for fn, bottoms, tops, is_loss in self.steps:
                out = fn(*[blobs[b] for b in bottoms])
                if is_loss:
                    loss = out if loss is None else loss + out
                else:
                    blobs[tops[0]] = out
            return loss, blobs

    return CaffeModule()


def run_torch(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    from minicaffe.formats.prototxt import load_net_param
    work = args.workdir
    data, labels = np.load(os.path.join(work, "data.npy")), np.load(os.path.join(work, "labels.npy"))
    base = _status_kb("VmRSS")
    weights = _caffemodel_arrays(os.path.join(work, "weights.caffemodel"))
    x = torch.from_numpy(data)
    y = torch.from_numpy(labels)
    res = {}
    if args.mode == "train":
        model = build_torch(load_net_param(os.path.join(work, "train.prototxt")), weights)
        del weights
        model.train()
        groups = [{"params": [t], "lr": 0.001 * lr, "weight_decay": 0.0005 * decay}
                  for t, lr, decay in model.param_mults]
        opt = torch.optim.SGD(groups, lr=0.001, momentum=0.9)

        def step():
            opt.zero_grad()
            loss, _ = model({"data": x, "label": y})
            loss.backward()
            opt.step()
    else:
        model = build_torch(load_net_param(os.path.join(work, "deploy.prototxt")), weights)
        del weights
        model.eval()
        in_name = next(lp.top[0] for lp in load_net_param(os.path.join(work, "deploy.prototxt")).layer
                       if lp.type == "Input")
        out_name = [None]

        def step():
            with torch.no_grad():
                _, blobs = model({in_name: x})
            out_name[0] = blobs
    times, cpu, peak = _loop(step, args.warmup, args.iters)
    res["times"], res["cpu"] = times, cpu
    res["peak_mb"] = None if peak is None else (peak - base) / 1024.0
    from minicaffe.core import threads
    res["pool"] = threads.size()
    if args.mode == "infer":
        ref = np.load(os.path.join(work, "output.npy"))
        last = model.steps[-1][2][0]
        res["max_diff"] = float(np.abs(out_name[0][last].numpy() - ref).max())
    return res


def run_opencv(args):
    import cv2
    cv2.setNumThreads(args.threads)
    work = args.workdir
    data = np.load(os.path.join(work, "data.npy"))
    base = _status_kb("VmRSS")
    net = cv2.dnn.readNetFromCaffe(os.path.join(work, "deploy.prototxt"), os.path.join(work, "weights.caffemodel"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    out = [None]

    def step():
        net.setInput(data)
        out[0] = net.forward()
    times, cpu, peak = _loop(step, args.warmup, args.iters)
    ref = np.load(os.path.join(work, "output.npy"))
    return {"times": times, "cpu": cpu, "peak_mb": None if peak is None else (peak - base) / 1024.0,
            "max_diff": float(np.abs(out[0].reshape(ref.shape) - ref).max())}


WORKERS = {"prepare": prepare, "minicaffe": run_minicaffe, "torch": run_torch, "opencv": run_opencv}


def worker_main(args):
    res = WORKERS[args.worker](args)
    print("RESULT " + json.dumps(res))
    return 0


# --- the driver -----------------------------------------------------------------------------------

def spawn(worker, net, mode, batch, workdir, args):
    python = args.minicaffe_python if worker == "minicaffe" and args.minicaffe_python else sys.executable
    cmd = [python, os.path.abspath(__file__), "--worker", worker, "--net", net, "--mode", mode,
           "--batch", str(batch), "--workdir", workdir, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.no_share_memory:
        cmd.append("--no-share-memory")
    if args.numpy_first:
        cmd.append("--numpy-first")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # the same thread count for every framework's BLAS / OpenMP pool
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


def available(framework):
    try:
        if framework == "torch":
            import torch  # noqa: F401
        elif framework == "opencv":
            import cv2
            if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
                return False
    except ImportError:
        return False
    return True


def slowest_layers(res, count):
    rows = sorted(res["layers"], key=lambda r: -(r[2] + r[3]))
    total = sum(r[2] + r[3] for r in res["layers"]) or 1.0
    lines = [f"      {'layer':28s} {'type':14s} {'fwd ms':>9s} {'bwd ms':>9s} {'share':>6s}  (mean of the runs)"]
    for name, kind, f, b in rows[:count]:
        lines.append(f"      {name:28s} {kind:14s} {1e3 * f:9.2f} {1e3 * b:9.2f} {100 * (f + b) / total:5.1f}%")
    return "\n".join(lines)


def driver(args):
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    for n in nets:
        if n not in NETS:
            print(f"error: unknown net '{n}' (known: {', '.join(NETS)})", file=sys.stderr)
            return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    frameworks = [f for f in args.frameworks.split(",") if f]
    refs = [f for f in frameworks if f != "minicaffe" and available(f)]
    missing = [f for f in frameworks if f != "minicaffe" and f not in refs]
    import minicaffe
    versions = [f"numpy {np.__version__}", f"minicaffe {minicaffe.__version__}"]
    if args.minicaffe_python:
        probe = subprocess.run([args.minicaffe_python, "-c", "import numpy; print(numpy.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            print(f"error: --minicaffe-python {args.minicaffe_python}: cannot import NumPy there", file=sys.stderr)
            return 2
        versions.insert(2, f"minicaffe's workers: {args.minicaffe_python} (numpy {probe.stdout.strip()})")
    if "torch" in refs:
        import torch
        versions.append(f"torch {torch.__version__}")
    if "opencv" in refs:
        import cv2
        versions.append(f"opencv {cv2.__version__}")
    print(f"{os.cpu_count()} cores, {args.threads} threads; {', '.join(versions)}; load average "
          f"{os.getloadavg()[0]:.1f}")
    if missing:
        print(f"(not available, skipped: {', '.join(missing)})")
    rounds = f" in each of {args.rounds} rounds (frameworks in turn)" if args.rounds > 1 else ""
    print(f"best of {args.iters} iteration(s) after {args.warmup} warm-up{rounds}; memory: peak RSS during "
          f"the iterations minus RSS after imports\n")
    header = (f"{'net':10s} {'batch':>5s} {'mode':6s} {'mc ms':>8s} {'img/s':>7s} {'cpu ms':>7s} {'MB':>6s}"
              f" | {'torch ms':>8s} {'img/s':>7s} {'cpu ms':>7s} {'MB':>6s} {'ratio':>5s} {'cpu x':>5s}"
              f" {'mem x':>5s} | {'cv ms':>7s} {'img/s':>7s} {'cpu ms':>7s} {'ratio':>5s} {'cpu x':>5s}")
    print(header)
    print("-" * len(header))
    results = {}
    pool_said = False
    for net in nets:
        with tempfile.TemporaryDirectory(prefix=f"bench_{net}_") as top:
            prepared = {}       # batch -> its work directory (the modes' batches differ)
            for mode in modes:
                batch = args.batch or default_batch(net, mode)
                if batch not in prepared:
                    work = os.path.join(top, f"batch{batch}")
                    os.mkdir(work)
                    prep = spawn("prepare", net, "infer", batch, work, args)
                    prepared[batch] = None if "error" in prep else work
                    if "error" in prep:
                        print(f"{net}: preparing batch {batch} failed: {prep['error']}")
                work = prepared[batch]
                if work is None:
                    continue
                # rounds: every framework once per round, in turn, so a burst of load on the shared
                # machine lands on one round of each rather than on one framework's whole run
                fws = ["minicaffe"] + [r for r in refs if not (r == "opencv" and mode == "train")]
                runs = {fw: [] for fw in fws}
                for _ in range(max(1, args.rounds)):
                    for fw in fws:
                        runs[fw].append(spawn(fw, net, mode, batch, work, args))
                row = {fw: merge_rounds(got) for fw, got in runs.items()}
                results[(net, mode)] = row
                if not pool_said and row["minicaffe"].get("pool"):
                    mb = row["minicaffe"].get("compiled_mb")
                    libs = f"; its compiled kernels' libraries (Numba, LLVM) add {mb:.0f} MB at import," \
                           " not counted in MB, as torch's and cv2's libraries are not" if mb else ""
                    mkl_mb = row["minicaffe"].get("mkl_mb")
                    libs += f"; MKL's (its GEMMs) {mkl_mb:.0f} MB, likewise" if mkl_mb is not None else ""
                    print(f"(minicaffe's kernels' thread pool: {row['minicaffe']['pool']} thread(s){libs})")
                    pool_said = True
                print(format_row(net, batch, mode, row), flush=True)
                notes = []
                if args.scaling and args.threads > 1 and "error" not in row["minicaffe"]:
                    one_args = argparse.Namespace(**{**vars(args), "threads": 1})
                    one = merge_rounds([spawn("minicaffe", net, mode, batch, work, one_args)
                                        for _ in range(max(1, args.rounds))])
                    row["minicaffe_1thread"] = one
                    notes.append(scaling_note(row["minicaffe"], one, args.threads))
                for fw, res in row.items():
                    if "error" in res:
                        notes.append(f"    {fw} failed: {res['error']}")
                    elif res.get("max_diff") is not None and res["max_diff"] > 1e-3:
                        notes.append(f"    {fw}: output differs from minicaffe's by {res['max_diff']:.3g}")
                mc = row["minicaffe"]
                if "error" not in mc and any(_ratio(mc, row.get(r)) and _ratio(mc, row.get(r)) > 1
                                             for r in refs):
                    notes.append("    slower than a reference; minicaffe's slowest layers:\n" +
                                 slowest_layers(mc, args.layers))
                for n in notes:
                    print(n, flush=True)
    print("\nms: best wall-clock iteration; cpu ms: CPU time of that process over its best iteration (all"
          "\nthreads; unlike wall time it barely moves when other processes share the cores); ratio / cpu x:"
          "\nminicaffe / reference (below 1: minicaffe is faster); MB: peak resident memory added by the"
          "\ntimed iterations; mem x: minicaffe's MB / torch's.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()}, f, indent=1)
    return 0


def merge_rounds(runs):
    """One framework's result over ``--rounds`` runs: every round's iteration times (the best
    counts), the highest peak memory, the first round's other fields; the first error when every
    round failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    out["times"] = [t for r in ok for t in r.get("times", [])]
    out["cpu"] = [c for r in ok for c in r.get("cpu", [])]
    peaks = [r["peak_mb"] for r in ok if r.get("peak_mb") is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    out["rounds"] = len(ok)
    return out


def scaling_note(many, one, threads):
    """The line under a row with ``--scaling``: minicaffe at one thread, run right after the row, and
    how much faster the default thread count is (the issue's 1 -> N scaling)."""
    if "error" in one:
        return f"    minicaffe at 1 thread failed: {one['error']}"
    t1, tn = min(one["times"]), min(many["times"])
    return (f"    minicaffe at 1 thread: {1e3 * t1:.1f} ms (cpu {1e3 * min(one['cpu']):.1f} ms); "
            f"1 -> {threads} threads: {t1 / max(tn, 1e-9):.2f}x")


def _ratio(mc, ref, key="times"):
    """minicaffe / reference for the best iteration (wall time, or ``key="cpu"``: CPU time)."""
    if not ref or "error" in ref or "error" in mc or not ref.get(key) or not mc.get(key):
        return None
    return min(mc[key]) / max(min(ref[key]), 1e-9)


def format_row(net, batch, mode, row):
    mc = row["minicaffe"]

    def ms(res, key="times"):
        if not res or "error" in res or not res.get(key):
            return "n/a" if key == "times" or res else ""
        return f"{1e3 * min(res[key]):.1f}"

    def ips(res):
        if not res or "error" in res:
            return "n/a" if res else ""
        return f"{batch / min(res['times']):.1f}"

    def mb(res):
        if not res or "error" in res or res.get("peak_mb") is None:
            return "n/a"
        return f"{res['peak_mb']:.0f}"

    def ratio(ref, key="times"):
        r = _ratio(mc, ref, key)
        return ("n/a" if ref is not None else "") if r is None else f"{r:.2f}"

    def mem_ratio(ref):
        if not ref or "error" in ref or "error" in mc or not ref.get("peak_mb") or mc.get("peak_mb") is None:
            return "n/a"
        return f"{mc['peak_mb'] / ref['peak_mb']:.2f}"
    t, o = row.get("torch"), row.get("opencv")
    return (f"{net:10s} {batch:5d} {mode:6s} {ms(mc):>8s} {ips(mc):>7s} {ms(mc, 'cpu'):>7s} {mb(mc):>6s}"
            f" | {ms(t) if t else 'n/a':>8s} {ips(t):>7s} {ms(t, 'cpu'):>7s} {mb(t):>6s} {ratio(t):>5s}"
            f" {ratio(t, 'cpu'):>5s} {mem_ratio(t):>5s}"
            f" | {ms(o) if o else '':>7s} {ips(o):>7s} {ms(o, 'cpu') if o else '':>7s} {ratio(o):>5s}"
            f" {ratio(o, 'cpu'):>5s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma list of " + ", ".join(NETS))
    ap.add_argument("--modes", default="train,infer", help="train, infer or both (default both)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help="minicaffe and the references to run (default all that import)")
    ap.add_argument("--batch", type=int, default=0,
                    help="override every net's default batch (default: issue 15's per net and mode)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (the best counts)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every framework this many times, in turn, and keep the best iteration of all "
                         "(evens out bursts of load on a shared machine)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and OpenCV")
    ap.add_argument("--minicaffe-python", default=None,
                    help="the Python that runs minicaffe's workers (default: this one). Why: this venv "
                         "holds the references' pins (OpenCV 4.12 asks for NumPy < 2.3, so OpenBLAS "
                         "0.3.29), while `pip install minicaffe` gets NumPy 2.4 and OpenBLAS 0.3.31; "
                         "pass a venv made by `pip install -e .` to time what users get")
    ap.add_argument("--numpy-first", action="store_true",
                    help="minicaffe's worker imports NumPy before minicaffe (a pycaffe-style script): "
                         "its kernels' thread pool then has one thread unless OPENBLAS_THREAD_TIMEOUT is set")
    ap.add_argument("--scaling", action="store_true",
                    help="also time minicaffe at one thread after each row and print the 1 -> N speed-up")
    ap.add_argument("--layers", type=int, default=8, help="slowest layers listed when behind a reference")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="LeNet only, 1 iteration, no warm-up (smoke test)")
    ap.add_argument("--no-share-memory", action="store_true",
                    help="inference: every blob keeps its own memory (Net without share_memory)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.quick:
        args.nets, args.iters, args.warmup = "lenet", 1, 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
