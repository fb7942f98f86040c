"""BatchNorm (batch statistics) and Scale (+ bias) in TRAIN, in place as ResNet has them: this
checkout's ``layers/normalization.py`` against another revision of that file, A/B in one process.

    git show <rev>:minicaffe/layers/normalization.py > /tmp/old_normalization.py
    python benchmarks/bench_normalization_ab.py --old /tmp/old_normalization.py
    python benchmarks/bench_normalization_ab.py --old /tmp/old_normalization.py --net resnet50 --batch 8

Why one process: the machine this project is measured on is shared, and timings from separate runs
move by more than the changes being measured. The other revision's BatchNorm and Scale methods are
loaded beside this checkout's and swapped onto the same layers (the same arrays, the same thread
pool) round by round, alternating which goes first; the tables are medians over rounds. Per layer:
forward and backward of each layer type on ResNet-50's shapes at the batch; with ``--net``: the
whole TRAIN iteration (forward + backward) of a ``bench_nets`` net. Each layer row also says whether
both revisions gave the same bits (a changed order of addition gives ulp-level differences).
"""
import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# minicaffe before NumPy, as the minicaffe commands do: after NumPy, the kernels' pool would have
# one thread (OpenBLAS's long idle spin; core/threads.py)
import minicaffe  # noqa: E402,F401
import numpy as np  # noqa: E402
from minicaffe.core import layer as layer_module  # noqa: E402
from minicaffe.layers import normalization as new  # noqa: E402
from minicaffe.testing import make_layer  # noqa: E402

METHODS = ("normalize", "normalize_backward", "scale_forward", "scale_backward")
# ResNet-50's BatchNorm/Scale shapes without the batch: conv1, res2 (256), res3, res4, res5
SHAPES = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))


def load_old(path):
    """The other revision's module, its layers not registered (the registry keeps this checkout's)."""
    register = layer_module.register
    layer_module.register = lambda name: (lambda cls: cls)
    try:
        spec = importlib.util.spec_from_file_location("minicaffe.layers._ab_normalization", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        layer_module.register = register
    return mod


def method_sets(old):
    """{"old": ..., "new": ...}: the (class, method name) -> function to set for each revision."""
    sets = {"new": {}, "old": {}}
    for cls, old_cls in ((new.BatchNorm, old.BatchNorm), (new.Scale, old.Scale)):
        for m in METHODS:
            if hasattr(cls, m):
                sets["new"][(cls, m)] = getattr(cls, m)
                sets["old"][(cls, m)] = getattr(old_cls, m)
    return sets


def use(methods):
    for (cls, m), fn in methods.items():
        setattr(cls, m, fn)


def order(r):
    return ("old", "new") if r % 2 == 0 else ("new", "old")


def bench_layers(sets, batch, shapes, rounds):
    print("| shape | BatchNorm fwd old / new | Scale fwd | Scale bwd | BatchNorm bwd | all four | same bits |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        shape = (batch,) + tuple(shape)
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        bn, bn_bottom, bn_top = make_layer('name: "bn" type: "BatchNorm"', [x], in_place=True)
        bn._x_norm = None         # the attribute revisions before 087d0aa read
        sc, sc_bottom, sc_top = make_layer('name: "sc" type: "Scale" scale_param { bias_term: true }',
                                           [x], in_place=True)
        for b in sc.blobs:
            b.data[...] = rng.standard_normal(b.shape)

        def run():
            bn_bottom[0].data[...] = x
            for b in bn.blobs:
                b.data[...] = 0
            t = [time.perf_counter()]
            bn.forward(bn_bottom, bn_top)
            t.append(time.perf_counter())
            sc_bottom[0].data[...] = bn_top[0].data
            t.append(time.perf_counter())
            sc.forward(sc_bottom, sc_top)
            t.append(time.perf_counter())
            out = [sc_top[0].data.copy()]
            sc_top[0].diff[...] = dy
            for b in sc.blobs:
                b.diff[...] = 0
            t.append(time.perf_counter())
            sc.backward(sc_top, [True], sc_bottom)
            t.append(time.perf_counter())
            bn_top[0].diff[...] = sc_bottom[0].diff
            t.append(time.perf_counter())
            bn.backward(bn_top, [True], bn_bottom)
            t.append(time.perf_counter())
            out += [bn_bottom[0].diff.copy()] + [b.data.copy() for b in bn.blobs] + \
                [b.diff.copy() for b in sc.blobs]
            return [t[1] - t[0], t[3] - t[2], t[5] - t[4], t[7] - t[6]], out

        times = {"old": [], "new": []}
        outs = {}
        for r in range(rounds + 1):
            for name in order(r):
                use(sets[name])
                t, outs[name] = run()
                if r:                        # round 0 warms both up
                    times[name].append(t)
        use(sets["new"])
        same = all(np.array_equal(a, b) for a, b in zip(outs["old"], outs["new"]))
        o, n = (np.median(times[k], axis=0) * 1e3 for k in ("old", "new"))
        cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(o, n))
        print(f"| {'x'.join(map(str, shape))} | {cells} | {o.sum():.2f} / {n.sum():.2f} | "
              f"{'yes' if same else 'no'} |", flush=True)


def bench_net(sets, name, batch, rounds):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tempfile

    import bench_nets
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.prototxt")
        bench_nets.write_text(path, bench_nets.train_param(name, batch))
        net = minicaffe.Net(path, minicaffe.TRAIN)
    rng = np.random.default_rng(0)
    for b in net.inputs:
        net.blobs[b].data[...] = rng.random(net.blobs[b].data.shape)
    if "label" in net.blobs:
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].data.shape)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            layer._x_norm = None
    times = {"old": [], "new": []}
    for r in range(rounds + 1):
        for k in order(r):
            use(sets[k])
            t0 = time.perf_counter()
            net.forward()
            net.backward()
            if r:
                times[k].append(time.perf_counter() - t0)
    use(sets["new"])
    o, n = (np.median(times[k]) * 1e3 for k in ("old", "new"))
    print(f"{name} TRAIN batch {batch}, forward + backward, median of {rounds} rounds: "
          f"old {o:.0f} ms, new {n:.0f} ms ({o / n:.3f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="another revision's minicaffe/layers/normalization.py")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds, each runs both (default 7)")
    ap.add_argument("--shapes", default="", help="comma list of CxHxW (default: ResNet-50's)")
    ap.add_argument("--net", default="", help="time this bench_nets net's TRAIN iteration instead")
    args = ap.parse_args(argv)
    sets = method_sets(load_old(args.old))
    if args.net:
        bench_net(sets, args.net, args.batch, args.rounds)
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes \
        else SHAPES
    bench_layers(sets, args.batch, shapes, args.rounds)


if __name__ == "__main__":
    main()
