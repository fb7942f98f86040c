"""Forward + backward of whole nets in minicaffe next to BVLC Caffe's own CPU build, in the same run.

Both sides run ``time`` with Caffe's semantics on the same prototxt: every layer's forward, then every
layer's backward (``caffe time -model m -iterations n`` and ``minicaffe time --model m --iterations n``),
each in its own process with the same thread count for BLAS/OpenMP, alternating per net. The nets are
the TRAIN nets of ``models/*/train_val.prototxt`` with their data layer replaced by an Input layer of
the net's default training batch (as ``bench_nets.py`` builds them; ResNet-50's BatchNorms therefore
normalise with the batch's statistics, as in training; before models/resnet50 had a train_val it
was timed as its deploy net with ``force_backward`` at batch 10).

    python benchmarks/bench_caffe.py --caffe "$(bash ../shared/reference-caffe/build.sh | tail -1)"
    python benchmarks/bench_caffe.py --caffe PREFIX --nets lenet,caffenet --iterations 3 --threads 1
    python benchmarks/bench_caffe.py --caffe PREFIX --iterations 5 --rounds 3
    python benchmarks/bench_caffe.py --caffe PREFIX --nets resnet50 --rounds 2 --by-kind

``--rounds N`` runs the two tools N times each per net, in turn (Caffe, minicaffe, Caffe, ...), and
keeps each tool's round with the lowest forward + backward average, printing every round's figure
under the row. Why: on a shared machine either tool's time moved by up to 50% from one run to the
next (Caffe's CaffeNet: 1266-1893 ms in three runs of one session), so one round per tool compares
a lucky run with an unlucky one as often as not; the best of several rounds of each is the figure
least touched by other load, as ``bench_nets.py --rounds`` keeps each framework's best iteration.

``--by-kind`` adds, under each net's row, the kept rounds' per-layer averages (both tools print one
line a layer) summed by kind of layer: 1x1 convolutions, 3x3 and 5x5 convolutions of stride 1
(where minicaffe runs Winograd), the other convolutions (first layers, strided), InnerProduct, and
everything else (normalisation, activations, pooling, Eltwise, Split, loss). Why: the 1x1
convolutions and InnerProduct are BLAS GEMMs in both tools, from the same kind of OpenBLAS; it
says how far those kinds hold a net from a ratio, and the last line says what the other kinds would
have to take, in all, for the net to reach 0.5x with those two as they are. minicaffe times a
chain of layers it runs as one (BatchNorm + Scale + ReLU, Convolution + ReLU, a stacked group of
1x1 convolutions) on one of them; the kinds keep such chains within a kind but for a
Convolution + ReLU's forward, whose ReLU runs in the convolution's epilogue and counts there.

The reference's prefix may also come from $MINICAFFE_REFERENCE_CAFFE. The ratio column is
minicaffe / Caffe (below 1: minicaffe is faster); the figures are the averages each tool prints.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench_nets  # noqa: E402  (the net definitions: one source for both benchmarks)

_AVERAGE = re.compile(r"Average (Forward pass|Backward pass|Forward-Backward): ([0-9.eE+-]+) ms")


# a layer's average in a ``time`` log: "<layer>\tforward: 1.23 ms." (both tools)
_LAYER = re.compile(r"(\S+)\s+(forward|backward): ([0-9.eE+-]+) ms")

# --by-kind's kinds, in the order printed; GEMM_KINDS are BLAS GEMMs in both tools
KINDS = ("convolution 1x1", "convolution 3x3/5x5, stride 1", "convolution, other", "inner product",
         "everything else")
GEMM_KINDS = ("convolution 1x1", "inner product")


def layer_times(text):
    """{layer name: forward + backward ms} from a ``time`` log's per-layer lines."""
    out = {}
    for m in _LAYER.finditer(text):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def kind_of(lp):
    """The kind (KINDS) of a LayerParameter."""
    if lp.type == "Convolution":
        cp = lp.convolution_param
        kh = cp.kernel_h or (cp.kernel_size[0] if cp.kernel_size else 1)
        kw = cp.kernel_w or (cp.kernel_size[-1] if cp.kernel_size else 1)
        sh = cp.stride_h or (cp.stride[0] if cp.stride else 1)
        sw = cp.stride_w or (cp.stride[-1] if cp.stride else 1)
        if kh == kw == 1:
            return KINDS[0]
        if kh == kw and kh in (3, 5) and sh == sw == 1:
            return KINDS[1]
        return KINDS[2]
    return KINDS[3] if lp.type == "InnerProduct" else KINDS[4]


def by_kind(param, ref_layers, mc_layers):
    """{kind: (Caffe ms, minicaffe ms)} over every layer either log names (a layer the prototxt
    does not name, such as an inserted Split, is "everything else")."""
    kinds = {lp.name: kind_of(lp) for lp in param.layer}
    sums = {k: [0.0, 0.0] for k in KINDS}
    for who, layers in enumerate((ref_layers, mc_layers)):
        for name, ms in layers.items():
            sums[kinds.get(name, KINDS[4])][who] += ms
    return {k: tuple(v) for k, v in sums.items()}


def kind_lines(sums):
    """The --by-kind lines under a net's row."""
    total_ref = sum(r for r, _ in sums.values())
    total_mc = sum(m for _, m in sums.values())
    lines = ["    by kind, forward + backward, sums of the per-layer averages: Caffe / minicaffe ms, ratio, "
             "share of minicaffe's"]
    for k in KINDS:
        r, m = sums[k]
        if r or m:
            ratio = f"{m / r:5.2f}" if r else "  n/a"
            lines.append(f"      {k:31s} {r:8.1f} / {m:8.1f}  {ratio}  {100 * m / max(total_mc, 1e-9):3.0f}%")
    gemm_ref = sum(sums[k][0] for k in GEMM_KINDS)
    gemm_mc = sum(sums[k][1] for k in GEMM_KINDS)
    rest_ref, rest_mc = total_ref - gemm_ref, total_mc - gemm_mc
    budget = 0.5 * total_ref - gemm_mc
    if rest_ref > 0:
        lines.append(f"      at 0.5x of Caffe's {total_ref:.1f} ms, with {' and '.join(GEMM_KINDS)} as they are "
                     f"({gemm_mc:.1f} ms), the other kinds would have {budget:.1f} ms "
                     f"({budget / rest_ref:.2f}x Caffe's {rest_ref:.1f}); they take {rest_mc:.1f} "
                     f"({rest_mc / rest_ref:.2f}x)")
    return lines


def averages(text):
    """{'Forward pass': ms, 'Backward pass': ms, 'Forward-Backward': ms} from a ``time`` log."""
    return {m.group(1): float(m.group(2)) for m in _AVERAGE.finditer(text)}


def net_file(name, batch, folder):
    """The prototxt both tools time: the TRAIN net with an Input layer."""
    param = bench_nets.train_param(name, batch)
    path = os.path.join(folder, f"{name}.prototxt")
    bench_nets.write_text(path, param)
    return path


def run(cmd, threads):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["GLOG_minloglevel"] = "0"         # the averages are INFO lines: both tools must print them
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = averages(proc.stderr + proc.stdout)
    if proc.returncode != 0 or "Forward-Backward" not in found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
    found["layers"] = layer_times(proc.stderr + proc.stdout)
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caffe", default=os.environ.get("MINICAFFE_REFERENCE_CAFFE"),
                    help="BVLC Caffe's install prefix (its bin/caffe is run); default $MINICAFFE_REFERENCE_CAFFE")
    ap.add_argument("--nets", default="lenet,caffenet,googlenet,resnet50,vgg16")
    ap.add_argument("--batch", type=int, default=None, help="override every net's default batch")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="BLAS/OpenMP threads for both")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run both tools this many times each, in turn, and keep each one's best round")
    ap.add_argument("--by-kind", action="store_true",
                    help="under each net, its per-layer times summed by kind of layer (see the module's text)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print(f"error: --rounds {args.rounds}: give 1 or more", file=sys.stderr)
        return 2
    if not args.caffe:
        print("error: give --caffe PREFIX (or set MINICAFFE_REFERENCE_CAFFE); build it with "
              "bash ../shared/reference-caffe/build.sh", file=sys.stderr)
        return 2
    caffe_bin = os.path.join(args.caffe, "bin", "caffe")
    if not os.path.isfile(caffe_bin):
        print(f"error: --caffe {args.caffe}: no bin/caffe there", file=sys.stderr)
        return 2
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in bench_nets.NETS]
    if unknown:
        print(f"error: unknown net '{unknown[0]}' (known: {', '.join(bench_nets.NETS)})", file=sys.stderr)
        return 2
    rounds = f"; the best of {args.rounds} rounds each" if args.rounds > 1 else ""
    from minicaffe.core import mkl
    mkl_path = mkl.library_path()
    gemm = (f"MKL ({mkl_path})" if mkl_path
            else "NumPy's BLAS" + (" (MINICAFFE_MKL=0)" if os.environ.get("MINICAFFE_MKL") == "0" else ""))
    print(f"{os.cpu_count()} cores, {args.threads} threads; {args.iterations} iterations each{rounds}; load "
          f"average {os.getloadavg()[0]:.1f}; averages as each tool prints them (ms); minicaffe's GEMMs: {gemm}\n")
    header = (f"{'net':10s} {'batch':>5s} | {'caffe fwd':>9s} {'bwd':>9s} {'fwd+bwd':>9s} | "
              f"{'mc fwd':>9s} {'bwd':>9s} {'fwd+bwd':>9s} | {'ratio':>5s}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench_caffe_") as folder:
        for name in nets:
            batch = args.batch or bench_nets.default_batch(name, "train")
            model = net_file(name, batch, folder)
            commands = ([caffe_bin, "time", "-model", model, "-iterations", str(args.iterations)],
                        [sys.executable, "-m", "minicaffe", "time", "--model", model,
                         "--iterations", str(args.iterations)])
            runs = ([], [])
            for _ in range(args.rounds):
                for who, cmd in enumerate(commands):
                    runs[who].append(run(cmd, args.threads))
            ref, mc = (best(r) for r in runs)

            def cols(r):
                if "error" in r:
                    return f"{'failed':>9s} {'':>9s} {'':>9s}"
                return (f"{r.get('Forward pass', float('nan')):9.1f} {r.get('Backward pass', float('nan')):9.1f}"
                        f" {r['Forward-Backward']:9.1f}")
            ratio = ("n/a" if "error" in ref or "error" in mc
                     else f"{mc['Forward-Backward'] / max(ref['Forward-Backward'], 1e-9):.2f}")
            print(f"{name:10s} {batch:5d} | {cols(ref)} | {cols(mc)} | {ratio:>5s}", flush=True)
            for who, r in (("caffe", ref), ("minicaffe", mc)):
                if "error" in r:
                    print(f"    {who} failed: {r['error']}")
            if args.rounds > 1:
                def figures(rs):
                    return " ".join("failed" if "error" in r else f"{r['Forward-Backward']:.1f}" for r in rs)
                print(f"    rounds, fwd+bwd: caffe {figures(runs[0])}; minicaffe {figures(runs[1])}")
            if args.by_kind and "error" not in ref and "error" not in mc:
                sums = by_kind(bench_nets.train_param(name, batch), ref["layers"], mc["layers"])
                print("\n".join(kind_lines(sums)), flush=True)
    return 0


def best(results):
    """The round with the lowest forward + backward average (a failed round only where all failed)."""
    good = [r for r in results if "error" not in r]
    return min(good, key=lambda r: r["Forward-Backward"]) if good else results[-1]


if __name__ == "__main__":
    sys.exit(main())
