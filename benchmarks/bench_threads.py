"""The thread pool's gain per layer: each pass timed at one pool thread and at ``--threads`` (default:
every core), the runs interleaved round by round in one process (so a shared machine's load falls on
both alike), medians reported.

    python benchmarks/bench_threads.py                      # every case, 2 threads against 1
    python benchmarks/bench_threads.py --only relu --repeat 15

The pool's size is switched through ``MINICAFFE_THREADS`` and ``context.reload_environment`` between
runs; BLAS is not involved in these passes.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minicaffe  # noqa: E402,F401  (before NumPy: OpenBLAS's short spin, as the commands have it)
import numpy as np  # noqa: E402

from minicaffe.core import context  # noqa: E402
from minicaffe.solvers import updates  # noqa: E402
from minicaffe.testing import make_layer  # noqa: E402


def layer_case(text, shapes, in_place=False, phase=0, num_top=1):
    """(forward, backward) closures of a layer on random bottoms of ``shapes``."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    layer, bottom, top = make_layer(text, xs, in_place=in_place, phase=phase, num_top=num_top)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape, dtype=np.float32)
    down = [True] * len(bottom)
    return (lambda: layer.forward(bottom, top)), (lambda: layer.backward(top, down, bottom))


def softmax_loss_case(shape):
    """SoftmaxWithLoss on scores of ``shape`` (classes on axis 1) and random integer labels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, shape[1], (shape[0],) + tuple(shape[2:])).astype(np.float32)
    layer, bottom, top = make_layer('name: "l" type: "SoftmaxWithLoss"', [x, labels])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    return (lambda: layer.forward(bottom, top)), (lambda: layer.backward(top, [True, False], bottom))


def wgrad_accumulate_case(rows, cols):
    """InnerProduct's accumulation of a weight gradient ``dw += product`` in its bands, without the
    GEMMs (whose time BLAS's threads decide)."""
    from minicaffe.layers import inner_product
    rng = np.random.default_rng(0)
    dw = rng.standard_normal((rows, cols), dtype=np.float32)
    band = max(1, inner_product.WGRAD_BAND_ELEMENTS // cols)
    tmp = rng.standard_normal((band, cols), dtype=np.float32)

    def accumulate():
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            inner_product._add_into(dw[r0:r1], tmp[:r1 - r0])
    return accumulate, None


def transformer_case(n=32):
    """The data transformer's crop 227 + mirror + mean file of a batch of 3x256x256 images (CaffeNet's)."""
    from google.protobuf import text_format
    from minicaffe.data.transformer import DataTransformer
    from minicaffe.proto import caffe_pb2
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (3, 256, 256), dtype=np.uint8) for _ in range(n)]
    t = DataTransformer(text_format.Parse("crop_size: 227 mirror: true", caffe_pb2.TransformationParameter()), 0, "data")
    t.mean = rng.random((3, 256, 256)).astype(np.float32) * 255
    out = np.empty((n, 3, 227, 227), np.float32)
    return (lambda: t.transform_batch(images, out=out)), None


def sgd_case(count):
    """One SGD step (momentum, L2 decay) of a ``count``-element parameter, as the solver runs it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(count, dtype=np.float32)
    g = rng.standard_normal(count, dtype=np.float32) * np.float32(1e-3)
    hist, scratch = [np.zeros_like(w)], [np.empty_like(w)]
    rule = updates.SGD(type("P", (), {"momentum": 0.9, "momentum2": 0.999, "delta": 1e-8, "rms_decay": 0.99})())

    def step():
        updates.parameter_step(rule, w, g, hist, scratch, 1, updates.f32(5e-4), "L2", updates.f32(1e-3), 0)
    return step, None


CASES = {
    "relu caffenet conv1 32x96x55²": lambda: layer_case('name: "r" type: "ReLU"', [(32, 96, 55, 55)], True),
    "relu vgg conv1_2 4x64x224²": lambda: layer_case('name: "r" type: "ReLU"', [(4, 64, 224, 224)], True),
    "relu caffenet fc6 32x4096": lambda: layer_case('name: "r" type: "ReLU"', [(32, 4096)], True),
    "lrn alexnet norm1 32x96x55²": lambda: layer_case(
        'name: "n" type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }', [(32, 96, 55, 55)]),
    "lrn googlenet norm2 16x192x56²": lambda: layer_case(
        'name: "n" type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }', [(16, 192, 56, 56)]),
    "dropout caffenet fc6 32x4096": lambda: layer_case('name: "d" type: "Dropout"', [(32, 4096)], True),
    "dropout 256x4096 (inline: under 2M)": lambda: layer_case('name: "d" type: "Dropout"', [(256, 4096)], True),
    "dropout 1024x4096": lambda: layer_case('name: "d" type: "Dropout"', [(1024, 4096)], True),
    "batchnorm resnet res2 8x256x56²": lambda: layer_case('name: "b" type: "BatchNorm"', [(8, 256, 56, 56)], True),
    "scale+bias resnet res2 8x256x56²": lambda: layer_case(
        'name: "s" type: "Scale" scale_param { bias_term: true }', [(8, 256, 56, 56)], True),
    "eltwise sum resnet res2 8x256x56²": lambda: layer_case('name: "e" type: "Eltwise"', [(8, 256, 56, 56)] * 2),
    "concat googlenet 3b 16x(128+192+96+64)x28²": lambda: layer_case(
        'name: "c" type: "Concat"', [(16, c, 28, 28) for c in (128, 192, 96, 64)]),
    "concat googlenet 3b batch 1": lambda: layer_case(
        'name: "c" type: "Concat"', [(1, c, 28, 28) for c in (128, 192, 96, 64)]),
    "slice 16x480x28² into 4": lambda: layer_case(
        'name: "s" type: "Slice" slice_param { slice_point: 128 slice_point: 320 slice_point: 416 }',
        [(16, 480, 28, 28)], num_top=4),
    "split backward resnet 8x256x56² 2 tops": lambda: layer_case(
        'name: "s" type: "Split"', [(8, 256, 56, 56)], num_top=2),
    "softmax googlenet 16x1000 (inline)": lambda: layer_case('name: "p" type: "Softmax"', [(16, 1000)]),
    "softmax 256x1000": lambda: layer_case('name: "p" type: "Softmax"', [(256, 1000)]),
    "softmax fcn 1x21x500²": lambda: layer_case('name: "p" type: "Softmax"', [(1, 21, 500, 500)]),
    "softmax fcn 4x21x256²": lambda: layer_case('name: "p" type: "Softmax"', [(4, 21, 256, 256)]),
    "softmaxloss fcn 1x21x500²": lambda: softmax_loss_case((1, 21, 500, 500)),
    "softmaxloss googlenet 16x1000 (inline)": lambda: softmax_loss_case((16, 1000)),
    "prelu 8x64x112²": lambda: layer_case('name: "p" type: "PReLU"', [(8, 64, 112, 112)]),
    "prelu shared 8x64x112²": lambda: layer_case(
        'name: "p" type: "PReLU" prelu_param { channel_shared: true }', [(8, 64, 112, 112)]),
    "mvn 8x64x112²": lambda: layer_case('name: "m" type: "MVN"', [(8, 64, 112, 112)]),
    "innerproduct vgg fc6 dw += band, 4096x25088": lambda: wgrad_accumulate_case(4096, 25088),
    "crop fcn-32s 1x21x544²→500²": lambda: layer_case(
        'name: "c" type: "Crop" crop_param { axis: 2 offset: 19 }', [(1, 21, 544, 544), (1, 21, 500, 500)]),
    "transformer caffenet 32x3x256² crop": transformer_case,
    "sgd vgg fc6 102.8M params": lambda: sgd_case(25088 * 4096),
    "sgd caffenet conv2 307K params (inline)": lambda: sgd_case(256 * 48 * 5 * 5),
    "sgd caffenet conv3 885K x4 arrays": lambda: sgd_case(384 * 256 * 3 * 3),
}


def set_threads(n):
    os.environ[context.THREADS_VAR] = str(n)
    context.reload_environment()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=9, help="rounds (each: one run per thread count)")
    ap.add_argument("--only", default="", help="cases whose name contains this")
    args = ap.parse_args()
    counts = (1, args.threads)
    print(f"{os.cpu_count()} cores; pool threads {counts[0]} vs {counts[1]}, {args.repeat} interleaved rounds, "
          f"medians (ms); load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':34s} {'pass':8s} {'1 thread':>9s} {f'{counts[1]} threads':>10s} {'speed-up':>8s}")
    for name, make in CASES.items():
        if args.only and args.only not in name:
            continue
        passes = [p for p in zip(("forward", "backward"), make()) if p[1] is not None]
        for label, fn in passes:
            times = {n: [] for n in counts}
            for n in counts:        # warm-up: the pool's threads and every buffer exist before timing
                set_threads(n)
                fn()
            for _ in range(args.repeat):
                for n in counts:
                    set_threads(n)
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
            a, b = (statistics.median(times[n]) * 1e3 for n in counts)
            print(f"{name:34s} {label:8s} {a:9.2f} {b:10.2f} {a / b:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
