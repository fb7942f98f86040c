"""The VGG paper's training and evaluation methods on scikit-learn's digits, end to end.

1. the digits of ``examples/digits/prepare_digits.py`` (same stratified split), resized to 40x40;
2. ``convert_imageset --gray --shuffle`` -> LMDB;
3. a small VGG-style net trained twice: fixed scale (S = 40, random 32x32 crops) and with scale
   jittering (``transform_param { scale_jitter { min_side: 32 max_side: 48 } }``);
4. each evaluated on the held-out digits: centre crop, 10 crops, 144 crops, 150 crops (3 scales),
   dense (1 and 3 scales), dense + 150 crops; and the two nets as an ensemble;
5. markdown tables of top-1 and top-5 error (%) per setting (also written to WORK/results.md).

    python examples/vgg_methods/run.py            # default: 3000 iterations per net, 5-10 min on 2 cores
    python examples/vgg_methods/run.py --tiny     # CI size: 20 iterations and 8 test images, ~15 s

Run from anywhere; paths in the prototxt are relative to the repository root.
"""
import argparse
import importlib.util
import os
import sys
import time

# The nets are small: one BLAS thread per process is faster than several fighting for 2 shared cores
# (7x faster per iteration measured on a loaded 2-core machine). Set before NumPy loads BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import minicaffe as caffe  # noqa: E402
from minicaffe.core import backend  # noqa: E402
from minicaffe.multicrop import Preprocessor, combine, default_scales, evaluate_images, topk_error  # noqa: E402
from minicaffe.formats.prototxt import load_net_param, load_solver_param  # noqa: E402
from minicaffe.tools.beyond import load_image_bgr, read_list_file  # noqa: E402
from minicaffe.tools.convert_imageset import convert_imageset  # noqa: E402

SIZE = 40                     # stored image size: S for the fixed-scale net
CROP = 32
JITTER = (32, 48)
SCALES = {"fixed": (35, 40, 45),   # VGG: Q = {S - 32, S, S + 32} for fixed S=256, here S ± 1/8 S
          "jitter": (32, 40, 48)}  # VGG: Q = {S_min, (S_min + S_max) / 2, S_max} for jittered nets
KINDS = {"fixed": "fixed S = 40", "jitter": "jittered S ∈ [32, 48]"}


def prepare(work, seed):
    """Write the digits at 40x40 with train/test list files (reusing prepare_digits' split)."""
    from minicaffe.deps import import_cv2
    cv2 = import_cv2("examples/vgg_methods")
    spec = importlib.util.spec_from_file_location("prepare_digits",
                                                  os.path.join(ROOT, "examples", "digits", "prepare_digits.py"))
    prepare_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_digits)
    if prepare_digits.main([work, "--seed", str(seed)]) != 0:     # it printed the error line
        raise SystemExit(1)
    img_dir = os.path.join(work, "images")
    for name in os.listdir(img_dir):          # 28x28 -> 40x40, the "larger images" of this example
        path = os.path.join(img_dir, name)
        img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if img.shape != (SIZE, SIZE):
            cv2.imwrite(path, cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
    convert_imageset(img_dir + "/", os.path.join(work, "train.txt"), os.path.join(work, "digits_train_lmdb"),
                     gray=True, shuffle=True, seed=seed, overwrite=True)


def train(kind, work, iters, seed):
    """Train one net with the example's solver, its data source and length adapted; returns weights."""
    solver_param = load_solver_param(os.path.join(HERE, f"solver_{kind}.prototxt"))
    net_param = load_net_param(os.path.join(HERE, f"vgg_digits_train_{kind}.prototxt"))
    for layer in net_param.layer:
        if layer.type == "Data":
            layer.data_param.source = os.path.join(work, "digits_train_lmdb")
    solver_param.ClearField("net")
    solver_param.net_param.CopyFrom(net_param)
    if iters != solver_param.max_iter:            # keep the lr schedule's shape
        ratio = iters / solver_param.max_iter
        steps = [max(1, int(s * ratio)) for s in solver_param.stepvalue]
        del solver_param.stepvalue[:]
        solver_param.stepvalue.extend(steps)
        solver_param.max_iter = iters
        solver_param.display = max(1, iters // 5)
    solver_param.random_seed = seed
    solver_param.snapshot_after_train = False
    # a NaN stop still snapshots: into the work folder in use (checked when the solver is built)
    solver_param.snapshot_prefix = os.path.join(work, f"vgg_digits_{kind}")
    solver = caffe.get_solver(solver_param)
    solver.solve()
    weights = os.path.join(work, f"vgg_digits_{kind}.caffemodel")
    solver.net.save(weights)
    return weights


def evaluate(kinds_weights, work, limit):
    """{kind: {setting: N×10 probabilities}} and the labels."""
    items = read_list_file(os.path.join(work, "test.txt"))[:limit]
    images = [load_image_bgr(os.path.join(work, "images", name), 1) for name, _ in items]
    labels = np.array([label for _, label in items])
    pre = Preprocessor(input_scale=0.00390625)       # the training nets' transform_param scale
    deploy = os.path.join(HERE, "vgg_digits_deploy.prototxt")
    results = {}
    for kind, weights in kinds_weights.items():
        net = caffe.Net(deploy, caffe.TEST, weights=weights)
        scales = SCALES[kind]
        t0 = time.perf_counter()
        r = {
            "centre crop": evaluate_images([net], images, "1", preprocess=pre),
            "10 crops": evaluate_images([net], images, "10", preprocess=pre),
            "144 crops": evaluate_images([net], images, "144", preprocess=pre),
            "150 crops": evaluate_images([net], images, "150", scales, preprocess=pre),
            "dense, 1 scale": evaluate_images([net], images, None, [SIZE], dense=True, preprocess=pre),
            "dense, 3 scales": evaluate_images([net], images, None, scales, dense=True, preprocess=pre),
        }
        r["dense + 150 crops"] = (r["dense, 3 scales"] + r["150 crops"]) / 2   # as evaluate_images combines
        results[kind] = r
        print(f"evaluated {kind} on {len(images)} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if len(results) == 2:
        results["ensemble"] = {k: combine(results["fixed"][k], results["jitter"][k]) for k in results["fixed"]}
    return results, labels


def table(results, labels, k=1):
    """A markdown table of top-k error (%) per training (rows) and evaluation setting (columns)."""
    settings = list(next(iter(results.values())))
    names = dict(KINDS, ensemble="ensemble of both")
    lines = ["| training | " + " | ".join(settings) + " |",
             "|---|" + "---|" * len(settings)]
    for kind, r in results.items():
        lines.append(f"| {names[kind]} | " + " | ".join(f"{100 * topk_error(r[s], labels, k):.2f}"
                                                       for s in settings) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CI size: 20 iterations, 8 test images")
    parser.add_argument("--iters", type=int, help="training iterations per net (default: the solver's "
                        "max_iter; tiny 20)")
    parser.add_argument("--work", default=os.path.join(HERE, "work"), help="folder for data and weights")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    iters = args.iters or (20 if args.tiny else load_solver_param(os.path.join(HERE, "solver_fixed.prototxt")).max_iter)
    limit = 8 if args.tiny else None
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    backend.set_random_seed(args.seed)
    prepare(args.work, args.seed)
    weights = {}
    for kind in KINDS:
        t = time.perf_counter()
        weights[kind] = train(kind, args.work, iters, args.seed)
        print(f"trained {kind} ({iters} iterations) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    results, labels = evaluate(weights, args.work, limit)
    header = (f"Top-1 error (%) on {len(labels)} held-out digits, {iters} training iterations, seed {args.seed}; "
              f"150-crop and dense scales: fixed {SCALES['fixed']}, jittered {SCALES['jitter']}; "
              f"144-crop scales {default_scales('144', CROP)}.")
    text = header + "\n\n" + table(results, labels, 1) + "\n\nTop-5 error (%):\n\n" + table(results, labels, 5)
    print(text)
    with open(os.path.join(args.work, "results.md"), "w") as f:
        f.write(text + "\n")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
