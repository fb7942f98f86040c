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

``--rounds N`` runs the two tools N times each per net, in turn (Caffe, minicaffe, Caffe, ...), and
keeps each tool's round with the lowest forward + backward average, printing every round's figure
under the row. Why: on a shared machine either tool's time moved by up to 50% from one run to the
next (Caffe's CaffeNet: 1266-1893 ms in three runs of one session), so one round per tool compares
a lucky run with an unlucky one as often as not; the best of several rounds of each is the figure
least touched by other load, as ``bench_nets.py --rounds`` keeps each framework's best iteration.

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
    print(f"{os.cpu_count()} cores, {args.threads} threads; {args.iterations} iterations each{rounds}; load "
          f"average {os.getloadavg()[0]:.1f}; averages as each tool prints them (ms)\n")
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
    return 0


def best(results):
    """The round with the lowest forward + backward average (a failed round only where all failed)."""
    good = [r for r in results if "error" not in r]
    return min(good, key=lambda r: r["Forward-Backward"]) if good else results[-1]


if __name__ == "__main__":
    sys.exit(main())
