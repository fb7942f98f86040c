"""Data-parallel training speed on CPU: images/s with 1 and N MPI processes, and the share of every
iteration spent in the gradient all-reduce.

The net is a ``models/`` train_val (GoogLeNet by default) whose TRAIN ``Data`` layer reads a
synthetic LMDB written here, with the given batch *per worker* (Caffe's convention: N workers
train on N x batch images an iteration). One process runs the plain path (``ParallelSolver`` over
a ``LocalComm``: the same per-layer backward loop, nothing to send); N > 1 runs under
``mpirun -np N`` with ``MPIComm``. Each process uses one BLAS thread by default, so the one-process
rate is a per-core rate and N processes use N cores (``--threads 0``: cores / N threads each).
The load average is printed with the results: other work on the machine slows every run.

For every timed iteration the root prints: its seconds, its CPU seconds (all its threads; MPI
spins while it waits, so waiting costs CPU too), the seconds inside all-reduce calls
(starting buckets and polling them between layers' backward: ``comm``), the seconds waiting for
the last buckets after backward (``wait``), and their share of the forward-backward time.

    python benchmarks/bench_scale.py                             # GoogLeNet, batch 4, 1 and 2 processes
    python benchmarks/bench_scale.py --procs 1,2,4 --iters 5 --batch 8
    python benchmarks/bench_scale.py --quick                     # LeNet, a smoke test
    python benchmarks/bench_scale.py --plan googlenet,vgg16      # bytes per iteration, ring all-reduce
                                                                 # costs (docs/scaling.md), no training
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

NETS = {   # name: (train_val, channels, side of the stored images)
    "lenet": ("models/lenet/train_val.prototxt", 1, 28),
    "googlenet": ("models/googlenet/train_val.prototxt", 3, 224),
    "caffenet": ("models/caffenet/train_val.prototxt", 3, 227),
    "vgg16": ("models/vgg/vgg_d/train_val.prototxt", 3, 224),
}
MARK = "BENCH_SCALE "


# --- set-up (driver) ------------------------------------------------------------------------------

def write_lmdb(path, n, channels, side, seed=0):
    import lmdb
    import numpy as np

    from minicaffe.data import array_to_datum
    rng = np.random.default_rng(seed)
    env = lmdb.open(path, map_size=max(1 << 24, 2 * n * channels * side * side + (1 << 20)))
    with env.begin(write=True) as txn:
        for i in range(n):
            img = rng.integers(0, 256, (channels, side, side), dtype=np.uint8)
            txn.put(b"%08d" % i, array_to_datum(img, int(rng.integers(10))).SerializeToString())
    env.close()


def write_files(work, net_name, batch, iters, warmup):
    """The LMDB, the net (TRAIN Data layer pointed at it, TEST layers kept but never built) and a
    solver without tests or snapshots. Returns the solver path."""
    from minicaffe.formats.prototxt import load_net_param
    model, channels, side = NETS[net_name]
    db = os.path.join(work, "lmdb")
    write_lmdb(db, 64, channels, side)
    param = load_net_param(os.path.join(ROOT, model))
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.source = db
            lp.data_param.batch_size = batch
    net = os.path.join(work, "net.prototxt")
    with open(net, "w") as f:
        f.write(str(param))
    solver = os.path.join(work, "solver.prototxt")
    with open(solver, "w") as f:
        f.write(f'net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0002\nlr_policy: "fixed"\n'
                f'max_iter: {warmup + iters}\ndisplay: 0\nsnapshot_after_train: false\nrandom_seed: 1\n')
    return solver


def mpirun_prefix(procs, extra=()):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("bench_scale: more than one process needs mpirun (Debian: apt-get install openmpi-bin "
                         "libopenmpi-dev; pip install mpi4py)")
    # no pinning: Open MPI binds each of 2 processes to one core by default, where its data and
    # decode threads then compete with its BLAS thread while another core may be idle
    cmd = [mpirun, "-np", str(procs), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + list(extra)


def run(procs, threads, solver, args):
    worker = [sys.executable, os.path.abspath(__file__), "--worker", solver, "--iters", str(args.iters),
              "--warmup", str(args.warmup), "--bucket-mb", str(args.bucket_mb)]
    cmd = worker if procs == 1 else mpirun_prefix(procs, args.mpirun_args.split()) + worker
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln[len(MARK):] for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_scale: {procs} process(es) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["threads"] = threads
    return result


# --- one worker -----------------------------------------------------------------------------------

def worker(args):
    """Train ``warmup + iters`` iterations one at a time; the root prints its per-iteration timings."""
    import logging

    import minicaffe as caffe
    from minicaffe.parallel import data_parallel as parallel
    from minicaffe.tools.common import get_logger
    get_logger().setLevel(logging.WARNING)
    logging.getLogger("minicaffe").setLevel(logging.WARNING)
    comm = parallel.setup_worker(parallel.communicator())
    solver = parallel.ParallelSolver(caffe.get_solver(args.worker), comm, bucket_mb=args.bucket_mb)
    reducer, stats = solver.reducer, solver.stats
    rows = []
    for i in range(args.warmup + args.iters):
        comm.barrier()
        c0, w0, f0 = reducer.comm_s, reducer.wait_s, stats["forward_backward_s"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        solver.step(1)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if i >= args.warmup:
            rows.append({"s": seconds, "cpu_s": cpu, "comm_s": reducer.comm_s - c0, "wait_s": reducer.wait_s - w0,
                         "fb_s": stats["forward_backward_s"] - f0})
    batch = solver.net.blobs[solver.net.inputs[0]].shape[0] if solver.net.inputs else \
        solver.net.blobs["data"].shape[0]
    if comm.rank == 0:
        print(MARK + json.dumps({"procs": comm.size, "comm": comm.name, "batch": batch, "rows": rows,
                                 "nbytes": reducer.nbytes, "buckets": len(reducer.buckets),
                                 "share": solver.communication_share()}), flush=True)
    comm.barrier()
    return 0


# --- planning (docs/scaling.md) ------------------------------------------------------------------

def gradient_bytes(net_name, bucket_mb=25.0):
    """(learnable values, bytes, buckets) all-reduced per iteration by the TRAIN net of ``models/``,
    counted on the net minicaffe builds (its Data layers replaced by Inputs of batch 1)."""
    import minicaffe as caffe
    from minicaffe.parallel import data_parallel as parallel
    from minicaffe.formats.prototxt import load_net_param
    from minicaffe.proto import caffe_pb2
    model, channels, side = NETS[net_name]
    param = load_net_param(os.path.join(ROOT, model))
    crop = side
    for lp in param.layer:
        if lp.type == "Data" and lp.transform_param.crop_size:
            crop = lp.transform_param.crop_size
    train = caffe_pb2.NetParameter()
    train.CopyFrom(param)
    del train.layer[:]
    train.ClearField("input")
    inputs = False
    for lp in param.layer:
        if lp.type == "Data":
            if inputs or any(r.phase == caffe_pb2.TEST for r in lp.include):
                continue
            inputs = True
            new = train.layer.add()
            new.name, new.type = lp.name, "Input"
            new.top.extend(lp.top)
            new.input_param.shape.add().dim.extend([1, channels, crop, crop])
            new.input_param.shape.add().dim.extend([1])
        else:
            train.layer.add().CopyFrom(lp)
    net = caffe.Net(train, caffe.TRAIN)
    values = sum(p.count for p in net.learnable_params)
    reducer = parallel.GradientReducer(net, parallel.LocalComm(), bucket_mb * 2 ** 20)
    return values, reducer.nbytes, len(reducer.buckets)


def ring_allreduce_s(nbytes, workers, link_bytes_per_s, step_latency_s, buckets=1):
    """Ring all-reduce (reduce-scatter then all-gather): 2(N-1) steps per bucket, each paying the
    link latency, and 2(N-1)/N of the bytes sent (and received) by every worker."""
    if workers < 2:
        return 0.0
    return 2 * (workers - 1) * step_latency_s * buckets + 2 * (workers - 1) / workers * nbytes / link_bytes_per_s


LINKS = (   # name, bytes/s each way per worker, latency of one ring step, worker counts it reaches
    ("10 GbE (TCP)", 1.25e9, 50e-6, (8, 64, 512)),
    ("100 Gb/s InfiniBand", 12.5e9, 5e-6, (8, 64, 512)),
    ("NVLink, one 8-GPU node", 150e9, 5e-6, (8,)),
)


def plan(nets, bucket_mb, batch=32, rates=(10, 100, 1000)):
    """Bytes per iteration counted on the nets, then ring all-reduce costs and bandwidth needs."""
    for name in nets:
        values, nbytes, buckets = gradient_bytes(name, bucket_mb)
        print(f"\n{name}: {values:,} learnable values = {nbytes / 1e6:.1f} MB of float32 gradients "
              f"per iteration, {buckets} bucket(s) of {bucket_mb:g} MB")
        print(f"  {'link':<24} {'N':>4}  {'sent/worker MB':>14}  {'bandwidth s':>11}  {'latency s':>9}  {'total s':>8}")
        for label, bw, lat, counts in LINKS:
            for n in counts:
                sent = 2 * (n - 1) / n * nbytes
                total = ring_allreduce_s(nbytes, n, bw, lat, buckets)
                print(f"  {label:<24} {n:>4}  {sent / 1e6:14.1f}  {sent / bw:11.4f}  "
                      f"{2 * (n - 1) * lat * buckets:9.4f}  {total:8.4f}")
        need = ", ".join(f"{r} images/s: {2 * nbytes * r / batch / 1e9:.2f} GB/s" for r in rates)
        print(f"  bandwidth each worker needs to hide the reduction behind compute at batch {batch} per "
              f"worker (large N): {need}")
    return 0


# --- report ---------------------------------------------------------------------------------------

def report(results, net_name):
    base = None
    print(f"\n{net_name}: gradients all-reduced per iteration: {results[0]['nbytes'] / 2 ** 20:.1f} MiB "
          f"in {results[0]['buckets']} bucket(s)")
    for r in results:
        print(f"\n{r['procs']} process(es) ({r['comm']}), {r['threads']} BLAS thread(s) each, "
              f"batch {r['batch']} per worker")
        print(f"  {'iter':>4}  {'seconds':>8}  {'CPU s':>8}  {'comm s':>8}  {'wait s':>8}  {'comm share':>10}")
        for i, row in enumerate(r["rows"]):
            share = (row["comm_s"] + row["wait_s"]) / row["fb_s"] if row["fb_s"] else 0.0
            print(f"  {i:>4}  {row['s']:8.3f}  {row['cpu_s']:8.3f}  {row['comm_s']:8.4f}  {row['wait_s']:8.4f}  "
                  f"{100 * share:9.2f}%")
        mean_s = sum(row["s"] for row in r["rows"]) / len(r["rows"])
        r["images_per_s"] = r["procs"] * r["batch"] / mean_s
        r["images_per_cpu_s"] = r["batch"] / (sum(row["cpu_s"] for row in r["rows"]) / len(r["rows"]))
        base = base or r["images_per_s"] / r["procs"]
        r["timed_share"] = sum(row["comm_s"] + row["wait_s"] for row in r["rows"]) / \
            max(sum(row["fb_s"] for row in r["rows"]), 1e-12)
        print(f"  mean {mean_s:.3f} s/iter: {r['images_per_s']:.2f} images/s "
              f"({r['images_per_s'] / (base * r['procs']):.0%} of {r['procs']} x the first run's per-process rate)")
    print(f"\n{'procs':>5}  {'threads':>7}  {'images/s':>9}  {'images/CPU-s':>12}  {'comm share':>10}")
    for r in results:
        print(f"{r['procs']:>5}  {r['threads']:>7}  {r['images_per_s']:9.2f}  {r['images_per_cpu_s']:12.2f}  "
              f"{100 * r['timed_share']:9.2f}%")
    print("(images/CPU-s: per process, from the root's CPU time; unlike images/s it depends little on\n"
          " how much of the machine other programs take, and its drop with more processes is the CPU\n"
          " cost of communicating)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="googlenet", choices=sorted(NETS))
    p.add_argument("--batch", type=int, default=4, help="batch per worker")
    p.add_argument("--iters", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--procs", default="1,2", help="process counts, separated by ','")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per process (0: cores / processes)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size")
    p.add_argument("--mpirun-args", default="", help="more mpirun options (e.g. '--hostfile hosts')")
    p.add_argument("--quick", action="store_true", help="LeNet, batch 8, 2 iterations (smoke test)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plan", help="nets (',') to count and cost on paper instead of training")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.plan:
        return plan([s for s in args.plan.split(",") if s], args.bucket_mb)
    if args.quick:
        args.net, args.batch, args.iters, args.warmup = "lenet", 8, 2, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = [int(s) for s in args.procs.split(",") if s]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = tempfile.mkdtemp(prefix="bench_scale_")
    try:
        solver = write_files(work, args.net, args.batch, args.iters, args.warmup)
        results = [run(n, args.threads or max(1, cores // n), solver, args) for n in procs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{cores} core(s); {args.net}, batch {args.batch} per worker, {args.iters} timed iteration(s) "
          f"after {args.warmup} warm-up; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.2f} after")
    report(results, args.net)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
