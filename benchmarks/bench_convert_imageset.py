"""Speed of convert_imageset: images/s at --jobs 1 and at all cores, against a plain loop.

Generates ``--n`` random ``--size``×``--size`` JPEGs (smooth noise, so they compress and decode like
photographs rather than like white noise) in a temporary folder, then builds an LMDB resized to
``--resize`` three ways, each into a fresh database:

* ``reference``: one process, ``cv2.imread`` + ``cv2.resize`` + a Datum + ``txn.put``, a
  transaction per 1000 records: the least work that gives the same database;
* ``convert_imageset --jobs 1``;
* ``convert_imageset --jobs N`` (N = all cores, or ``--jobs``).

    python benchmarks/bench_convert_imageset.py            # 2000 images
    python benchmarks/bench_convert_imageset.py --n 300
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# minicaffe before NumPy, as the convert_imageset command does (its pool: core/threads.py)
import minicaffe  # noqa: E402,F401
import cv2  # noqa: E402
import lmdb  # noqa: E402
import numpy as np  # noqa: E402
from minicaffe.data import iterate_lmdb  # noqa: E402
from minicaffe.proto import caffe_pb2  # noqa: E402
from minicaffe.tools.convert_imageset import convert_imageset  # noqa: E402


def make_images(folder, n, size, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        name = f"n{i % 10:02d}/img_{i:06d}.JPEG"
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        cv2.imwrite(os.path.join(folder, name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        names.append(name)
    lst = os.path.join(folder, "list.txt")
    with open(lst, "w") as f:
        f.writelines(f"{name} {i % 1000}\n" for i, name in enumerate(names))
    return lst, names


def reference(root, names, db, resize):
    """The plain single-process loop."""
    env = lmdb.open(db, map_size=1 << 40)
    txn = env.begin(write=True)
    for i, name in enumerate(names):
        img = cv2.imread(root + name, cv2.IMREAD_COLOR)
        img = cv2.resize(img, (resize, resize), interpolation=cv2.INTER_LINEAR)
        d = caffe_pb2.Datum(channels=3, height=resize, width=resize, data=img.transpose(2, 0, 1).tobytes(),
                            label=i % 1000, encoded=False)
        txn.put(b"%08d_%s" % (i, name.encode()), d.SerializeToString())
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    ap.add_argument("--size", type=int, default=256, help="image side (default 256)")
    ap.add_argument("--resize", type=int, default=227, help="resize to this side (default 227)")
    ap.add_argument("--jobs", type=int, default=0, help="processes for the parallel run (0 = all cores)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = args.jobs or cores

    work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    quiet = logging.getLogger("bench_convert_quiet")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        root = os.path.join(work, "images") + "/"
        t0 = time.perf_counter()
        lst, names = make_images(root, args.n, args.size)
        print(f"generated {args.n} {args.size}x{args.size} JPEGs in {time.perf_counter() - t0:.1f} s "
              f"({cores} cores, OpenCV {cv2.__version__})")

        results = {}
        db = os.path.join(work, "ref_lmdb")
        t0 = time.perf_counter()
        reference(root, names, db, args.resize)
        results["reference (1 process)"] = time.perf_counter() - t0
        ref = list(iterate_lmdb(db))
        for label, j in (("convert_imageset --jobs 1", 1), (f"convert_imageset --jobs {jobs}", jobs)):
            out = os.path.join(work, f"lmdb_{j}")
            t0 = time.perf_counter()
            convert_imageset(root, lst, out, resize_height=args.resize, resize_width=args.resize, jobs=j,
                             logger=quiet)
            results[label] = time.perf_counter() - t0
            same = list(iterate_lmdb(out)) == ref
            if not same:
                print(f"WARNING: {label} wrote a database different from the reference")

        base = results["reference (1 process)"]
        print(f"\n{'run':32s} {'seconds':>8s} {'images/s':>9s} {'vs reference':>13s}")
        for label, sec in results.items():
            print(f"{label:32s} {sec:8.2f} {args.n / sec:9.1f} {base / sec:12.2f}x")
        j1 = results["convert_imageset --jobs 1"]
        jn = results[f"convert_imageset --jobs {jobs}"]
        print(f"\nparallel speed-up (--jobs {jobs} vs --jobs 1): {j1 / jn:.2f}x")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
