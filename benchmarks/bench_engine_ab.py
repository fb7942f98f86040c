"""A threshold of the convolution engines changed, against this checkout's, on a whole TRAIN net:
A/B in one process, per layer and for the whole backward.

    python benchmarks/bench_engine_ab.py --net vgg16 --batch 4 --set WINOGRAD_WEIGHT_GRAD_MIN_TILES=1000000000
    python benchmarks/bench_engine_ab.py --net resnet50 --batch 8 --rounds 5 --set WINOGRAD_WEIGHT_GRAD_MIN_TILES=1000000000
    python benchmarks/bench_engine_ab.py --net resnet50 --batch 8 --rounds 7 --set threads.MIN_FLAT_ELEMENTS=2097152
    python benchmarks/bench_engine_ab.py --net resnet50 --batch 8 --rounds 9 --set train_fusion.SUM_RELU_BACKWARD=0
    python benchmarks/bench_engine_ab.py --net resnet50 --batch 8 --rounds 9 --set diff_plan.ALIAS_FIRST_TOP=0
    python benchmarks/bench_engine_ab.py --net googlenet --batch 16 --rounds 7 --reference Pooling
    python benchmarks/bench_engine_ab.py --net googlenet --batch 16 --rounds 9 --set stacked_1x1.STACKED=0

``--set NAME=VALUE`` sets a constant of ``minicaffe.kernels.conv_engines`` (or of
``minicaffe.kernels.winograd``, where conv_engines has no such name) while net B is built; the
engines read their thresholds when a layer is reshaped, so net A (the checkout's values) and net B
keep their engines. ``--reference TYPE`` runs net B's layers of that type on their own code (the
engine table's reference) instead of the engine DEFAULT picks. ``--set threads.NAME=VALUE`` (or
``train_fusion.NAME``, ``diff_plan.NAME``, ``stacked_1x1.NAME``, ``winograd.NAME``) sets a constant
of ``minicaffe.core.threads`` (``minicaffe.kernels.train_fusion``, ``minicaffe.net.diff_plan``,
``minicaffe.kernels.stacked_1x1``, ``minicaffe.kernels.winograd``) instead, which the passes read as
they run (a net's diff plan is made at its first solver-style pass): it is in force while net B
runs, each round (a bool: 0 or 1). Why one process: the machine this project is measured on is
shared, and timings from separate runs move by more than the changes being measured. The two nets run in turn,
round by round, on the same input; the table gives medians over rounds of each convolution's
backward (the layers whose engine or engine options differ between the nets) and of the whole
forward and backward passes.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# minicaffe before NumPy, as the minicaffe commands do: imported after NumPy, OpenBLAS keeps its
# long idle spin and the kernels' thread pool has one thread (core/threads.py), so the engines
# would be measured, and chosen, as on one core
import minicaffe  # noqa: E402
import numpy as np  # noqa: E402
import bench_nets  # noqa: E402
from minicaffe.core import threads  # noqa: E402
from minicaffe.kernels import conv_engines, engines, stacked_1x1, train_fusion, winograd  # noqa: E402
from minicaffe.net import diff_plan  # noqa: E402

# the modules whose constants --set MODULE.NAME=VALUE sets around net B's passes
RUN_TIME_MODULES = {"threads": threads, "train_fusion": train_fusion, "diff_plan": diff_plan,
                    "stacked_1x1": stacked_1x1, "winograd": winograd}


def build(path, settings):
    """A TRAIN net of ``path`` built with the module constants ``settings`` in force, then put back."""
    saved = []
    for name, value in settings:
        if name.split(".", 1)[0] in RUN_TIME_MODULES:
            continue            # read as the passes run: set around net B's rounds (main)
        mod = conv_engines if hasattr(conv_engines, name) else winograd
        if not hasattr(mod, name):
            raise SystemExit(f"--set {name}: neither conv_engines nor winograd has a constant of that name")
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, type(getattr(mod, name))(value))
    try:
        net = minicaffe.Net(path, minicaffe.TRAIN)
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    rng = np.random.default_rng(0)
    for b in net.inputs:
        net.blobs[b].data[...] = rng.random(net.blobs[b].data.shape)
    if "label" in net.blobs:
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].data.shape)
    net.forward()
    net.backward()
    return net


class RunSettings:
    """``MODULE.NAME`` settings (RUN_TIME_MODULES) in force inside the block, the old values back
    after it."""

    def __init__(self, settings):
        self.items = []
        for name, value in settings:
            mod_name, _, const = name.partition(".")
            mod = RUN_TIME_MODULES.get(mod_name)
            if mod is None:
                continue
            if not hasattr(mod, const):
                raise SystemExit(f"--set {name}: {mod.__name__} has no constant of that name")
            old = getattr(mod, const)
            new = value not in ("0", "false", "False") if isinstance(old, bool) else type(old)(value)
            self.items.append((mod, const, new))

    def __enter__(self):
        self.saved = [(mod, const, getattr(mod, const)) for mod, const, _ in self.items]
        for mod, const, value in self.items:
            setattr(mod, const, value)

    def __exit__(self, *exc):
        for mod, const, value in self.saved:
            setattr(mod, const, value)


def describe(layer):
    """(engine name, its public bool/int options) of a convolution layer."""
    engine = getattr(layer, "engine", None)
    opts = {k: v for k, v in vars(engine).items() if isinstance(v, (bool, int)) and not k.startswith("_")} \
        if engine is not None else {}
    return getattr(layer, "engine_name", None), opts


def difference(a, b):
    """What differs between two ``describe`` results, one short text for each side."""
    if a[0] != b[0]:
        return str(a[0]), str(b[0])
    keys = [k for k in a[1] if a[1][k] != b[1].get(k)]
    return tuple(f"{d[0]} " + " ".join(f"{k}={d[1][k]}" for k in keys) for d in (a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="vgg16", choices=sorted(bench_nets.NETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--reference", action="append", default=[], metavar="TYPE",
                    help="net B runs every layer of this type on the layer's own code, not its engine")
    args = ap.parse_args(argv)
    if not args.set and not args.reference:
        ap.error("nothing to compare: give --set or --reference")
    settings = [tuple(s.split("=", 1)) for s in args.set]
    with tempfile.TemporaryDirectory(prefix="engine_ab_") as top:
        path = os.path.join(top, f"{args.net}_train.prototxt")
        bench_nets.write_text(path, bench_nets.train_param(args.net, args.batch))
        nets = {"A": build(path, []), "B": build(path, settings)}
    for layer in nets["B"].layers:
        if layer.type in args.reference:
            engines.force(layer, engines.REFERENCE)
    run_settings = {"A": RunSettings([]), "B": RunSettings(settings)}
    per_layer = {k: {} for k in nets}
    whole = {k: {"forward": [], "backward": []} for k in nets}
    for r in range(args.rounds):
        order = list(nets) if r % 2 == 0 else list(nets)[::-1]
        for k in order:
            net = nets[k]
            with run_settings[k]:
                t0 = time.perf_counter()
                net.forward()
                t1 = time.perf_counter()
                timings = {}
                net.backward_from_to(timings=timings, share_diffs=True)
                t2 = time.perf_counter()
            whole[k]["forward"].append(t1 - t0)
            whole[k]["backward"].append(t2 - t1)
            for i, v in timings.items():
                per_layer[k].setdefault(i, []).append(v)
    a, b = nets["A"], nets["B"]
    print(f"{args.net} batch {args.batch}, {args.rounds} rounds, kernels' pool of {threads.size()} threads; "
          "A: this checkout, B: " + ", ".join([f"{n}={v}" for n, v in settings] +
                                              [f"{t} on its reference" for t in args.reference]) + "; medians, ms")
    print("| layer | A engine | B engine | A | B | B / A |\n|---|---|---|---|---|---|")
    for i, layer in enumerate(a.layers):
        if layer.type not in ("Convolution", "Deconvolution") or describe(layer) == describe(b.layers[i]):
            continue
        ta, tb = (np.median(per_layer[k].get(i, [0.0])) * 1e3 for k in ("A", "B"))
        ea, eb = difference(describe(layer), describe(b.layers[i]))
        print(f"| {a._layer_names[i]} | {ea} | {eb} | {ta:.1f} | {tb:.1f} | "
              f"{tb / ta if ta else float('nan'):.2f} |")
    for part in ("forward", "backward"):
        ta, tb = (np.median(whole[k][part]) * 1e3 for k in ("A", "B"))
        print(f"| whole {part} | | | {ta:.0f} | {tb:.0f} | {tb / ta:.2f} |")


if __name__ == "__main__":
    main()
