"""Per-layer speed of minicaffe at the sizes of VGG-16, GoogLeNet and AlexNet layers.

For each layer: forward and backward time (best of ``--repeat`` runs after a warm-up), GFLOP/s for
the GEMM-bound layers (Convolution, InnerProduct) with the fraction of the machine's float32 GEMM
rate measured in the same run (a square ``np.matmul``), and GB/s (bottom + top bytes once) for
the memory-bound ones. With PyTorch importable, the same layer through ``torch.nn.functional`` is
timed next to it (``--no-torch`` to skip).

    python benchmarks/bench_layers.py                 # every layer, batch 4
    python benchmarks/bench_layers.py --batch 2 --only conv --repeat 3
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_layers.py   # one core each
    python benchmarks/bench_layers.py --only "alex conv2" --engines default,im2col --repeat 9 --median
    python benchmarks/bench_layers.py --only "vgg conv" --engines default,winograd:tile=2,winograd:tile=4 --forward-only
    python benchmarks/bench_layers.py --only vgg --engines winograd:data_grad=0,winograd:data_grad=1

``--engines`` times each convolution with each named engine (``default``: the one DEFAULT picks)
in the same process, the runs interleaved round by round, so an engine change is measured A/B on a
shared machine (``name:option=value`` passes a build option, integers as such: an engine with and
without one of its paths); ``--median`` reports the median run instead of the best; ``--clock process`` times
CPU time, which other jobs on a busy machine do not inflate (with one thread everywhere only);
``--forward-only`` skips the backward (an engine that changes only the forward).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# minicaffe before NumPy, as the minicaffe commands do: after NumPy, the kernels' pool would have
# one thread (OpenBLAS's long idle spin; core/threads.py)
import minicaffe  # noqa: E402
import numpy as np  # noqa: E402
from minicaffe.kernels import engines  # noqa: E402
from minicaffe.testing import make_layer  # noqa: E402

# name, prototxt body, bottom shape without the batch, GEMM-bound?
CONV = 'type: "Convolution" convolution_param {{ num_output: {o} kernel_size: {k} stride: {s} pad: {p} ' \
       'group: {g} weight_filler {{ type: "gaussian" std: 0.01 }} bias_filler {{ type: "constant" }} }}'


def conv(o, k, s=1, p=0, g=1):
    return CONV.format(o=o, k=k, s=s, p=p, g=g)


LAYERS = [
    # VGG-16 3x3 convolutions (pad 1)
    ("vgg conv1_2 3x3 64->64 224²", conv(64, 3, p=1), (64, 224, 224)),
    ("vgg conv2_1 3x3 64->128 112²", conv(128, 3, p=1), (64, 112, 112)),
    ("vgg conv2_2 3x3 128->128 112²", conv(128, 3, p=1), (128, 112, 112)),
    ("vgg conv3_1 3x3 128->256 56²", conv(256, 3, p=1), (128, 56, 56)),
    ("vgg conv3_2 3x3 256->256 56²", conv(256, 3, p=1), (256, 56, 56)),
    ("vgg conv4_1 3x3 256->512 28²", conv(512, 3, p=1), (256, 28, 28)),
    ("vgg conv4_2 3x3 512->512 28²", conv(512, 3, p=1), (512, 28, 28)),
    ("vgg conv5_2 3x3 512->512 14²", conv(512, 3, p=1), (512, 14, 14)),
    # GoogLeNet
    ("gnet conv1 7x7/2 3->64 224²", conv(64, 7, s=2, p=3), (3, 224, 224)),
    ("gnet conv2 3x3 64->192 56²", conv(192, 3, p=1), (64, 56, 56)),
    ("gnet 3a/1x1 192->64 28²", conv(64, 1), (192, 28, 28)),
    ("gnet 3a/3x3 96->128 28²", conv(128, 3, p=1), (96, 28, 28)),
    ("gnet 3a/5x5 16->32 28²", conv(32, 5, p=2), (16, 28, 28)),
    # ResNet-50's 3x3/1 bottleneck convolutions, CaffeNet's conv3
    ("res 3x3 64->64 56²", conv(64, 3, p=1), (64, 56, 56)),
    ("res 3x3 128->128 28²", conv(128, 3, p=1), (128, 28, 28)),
    ("res 3x3 256->256 14²", conv(256, 3, p=1), (256, 14, 14)),
    ("res 3x3 512->512 7²", conv(512, 3, p=1), (512, 7, 7)),
    ("alex conv3 3x3 256->384 13²", conv(384, 3, p=1), (256, 13, 13)),
    # AlexNet grouped conv2
    ("alex conv2 5x5 g2 96->256 27²", conv(256, 5, p=2, g=2), (96, 27, 27)),
    # pooling
    ("vgg pool1 max 2/2 64x224²", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }',
     (64, 224, 224)),
    ("gnet pool1 max 3/2 64x112²", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
     (64, 112, 112)),
    ("gnet 3a/pool max 3/1p1 192x28²",
     'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }', (192, 28, 28)),
    ("gnet pool5 ave 7/1 1024x7²", 'type: "Pooling" pooling_param { pool: AVE kernel_size: 7 stride: 1 }',
     (1024, 7, 7)),
    # LRN
    ("gnet norm1 lrn5 64x56²", 'type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }',
     (64, 56, 56)),
    ("alex norm1 lrn5 96x55²", 'type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }',
     (96, 55, 55)),
    # fully connected, softmax, relu
    ("vgg fc6 25088->4096", 'type: "InnerProduct" inner_product_param { num_output: 4096 '
     'weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "constant" } }', (512, 7, 7)),
    ("vgg fc7 4096->4096", 'type: "InnerProduct" inner_product_param { num_output: 4096 '
     'weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "constant" } }', (4096,)),
    ("softmax 1000", 'type: "Softmax"', (1000,)),
    ("vgg relu1_1 64x224²", 'type: "ReLU"', (64, 224, 224)),
]

GROUPS = {"conv": "Convolution", "pool": "Pooling", "lrn": "LRN", "ip": "InnerProduct",
          "softmax": "Softmax", "relu": "ReLU"}


def best_time(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def engine_spec(spec):
    """'winograd:data_grad=0:band_rows=2' -> ('winograd', {'data_grad': 0, 'band_rows': 2})."""
    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def interleaved_times(fns, repeat, stat, clock=time.perf_counter):
    """``{key: seconds}`` for each closure in ``fns`` (``{key: (setup, fn)}``): a warm-up each, then
    ``repeat`` rounds that run every closure once, after its ``setup``; the best or median run."""
    for setup, fn in fns.values():
        setup()
        fn()
    runs = {key: [] for key in fns}
    for _ in range(repeat):
        for key, (setup, fn) in fns.items():
            setup()
            t0 = clock()
            fn()
            runs[key].append(clock() - t0)
    return {key: (float(np.median(v)) if stat == "median" else min(v)) for key, v in runs.items()}


def sgemm_rate(size, repeat):
    """GFLOP/s of a square float32 matmul: the machine's practical peak for GEMM-bound layers."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty((size, size), np.float32)
    t = best_time(lambda: np.matmul(a, b, out=c), repeat)
    return 2.0 * size ** 3 / t / 1e9


def layer_type(text):
    return text.split('"')[1]


def conv_flops(text, bshape, tshape):
    """Multiply-adds x 2 of the forward pass; backward (data + weight gradient) is twice that."""
    import re
    k = int(re.search(r"kernel_size: (\d+)", text).group(1))
    g = int(re.search(r"group: (\d+)", text).group(1))
    n, cin = bshape[0], bshape[1]
    cout = tshape[1]
    return 2.0 * n * cout * tshape[2] * tshape[3] * (cin // g) * k * k


def ip_flops(bshape, tshape):
    return 2.0 * bshape[0] * int(np.prod(bshape[1:])) * tshape[1]


def torch_layer(text, x_np, layer):
    """The same layer in torch.nn.functional with minicaffe's weights; returns (fwd, bwd) closures."""
    import torch
    import torch.nn.functional as F
    kind = layer_type(text)
    x = torch.from_numpy(x_np.copy()).requires_grad_(kind != "Softmax")
    params = [torch.from_numpy(b.data.copy()).requires_grad_(True) for b in layer.blobs]
    if kind == "Convolution":
        g = layer.geom
        f = lambda: F.conv2d(x, params[0], params[1], stride=(g.sh, g.sw), padding=(g.ph, g.pw),  # noqa: E731
                             groups=layer.group)
    elif kind == "InnerProduct":
        f = lambda: F.linear(x.reshape(x.shape[0], -1), params[0], params[1])  # noqa: E731
    elif kind == "Pooling":
        pool = layer.param.pooling_param
        if pool.pool == 0:
            f = lambda: F.max_pool2d(x, layer.kh, layer.sh, layer.ph, ceil_mode=True)  # noqa: E731
        else:
            f = lambda: F.avg_pool2d(x, layer.kh, layer.sh, layer.ph, ceil_mode=True)  # noqa: E731
    elif kind == "LRN":
        p = layer.param.lrn_param
        f = lambda: F.local_response_norm(x, p.local_size, p.alpha, p.beta, p.k)  # noqa: E731
    elif kind == "Softmax":
        f = lambda: F.softmax(x, dim=1)  # noqa: E731
    elif kind == "ReLU":
        f = lambda: F.relu(x)  # noqa: E731
    else:
        return None
    y = f()
    dy = torch.randn_like(y)
    inputs = ([x] if x.requires_grad else []) + params

    def fwd():
        with torch.no_grad():
            f()

    def bwd():
        if inputs:
            torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return fwd, bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the best counts")
    ap.add_argument("--gemm-size", type=int, default=4096, help="side of the reference square matmul")
    ap.add_argument("--only", default="", help="comma list of layer groups: " + ",".join(GROUPS)
                    + ", or substrings of layer names")
    ap.add_argument("--no-torch", action="store_true", help="do not time PyTorch next to minicaffe")
    ap.add_argument("--engines", default="", help="comma list of convolution engines to time side by side, "
                    "interleaved ('default': DEFAULT's choice; e.g. default,im2col); build options after "
                    "colons, e.g. winograd:tile=2")
    ap.add_argument("--forward-only", action="store_true", help="time the forward pass alone")
    ap.add_argument("--median", action="store_true", help="report the median run instead of the best")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (default) or process: CPU time of this process, which time-sharing with "
                         "other jobs does not inflate; only meaningful with one thread everywhere")
    args = ap.parse_args(argv)
    stat = "median" if args.median else "best"
    conv_engines = [e.strip() for e in args.engines.split(",") if e.strip()] or ["default"]

    torch = None
    if not args.no_torch:
        try:
            import torch
            # as many threads as NumPy's BLAS gets (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS)
            torch.set_num_threads(int(os.environ.get("OPENBLAS_NUM_THREADS")
                                      or os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
        except ImportError:
            torch = None
    minicaffe.set_mode_cpu()
    minicaffe.set_random_seed(1)
    peak = sgemm_rate(args.gemm_size, args.repeat)
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"float32 matmul {args.gemm_size}²: {peak:.1f} GFLOP/s (the 'of peak' reference, measured "
          f"again at the end)")
    if torch is not None:
        print(f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"batch {args.batch}, {stat} of {args.repeat}, {args.clock} clock\n")

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    lw = 34 if len(conv_engines) == 1 else 56     # room for the engine's name
    header = (f"{'layer':{lw}s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd GF/s':>9s} {'bwd GF/s':>9s} "
              f"{'fwd %pk':>7s} {'bwd %pk':>7s}")
    if torch is not None:
        header += f" {'torch fwd':>9s} {'torch bwd':>9s} {'fwd x':>6s} {'bwd x':>6s}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    rates = []
    for name, text, shape in LAYERS:
        kind = layer_type(text)
        if wanted and not any(GROUPS.get(w) == kind or w in name for w in wanted):
            continue
        bshape = (args.batch,) + tuple(shape)
        x = rng.standard_normal(bshape, dtype=np.float32)
        layer, bottom, top = make_layer(text, [x])
        top[0].diff[...] = rng.standard_normal(top[0].shape, dtype=np.float32)
        if kind == "ReLU":  # in place, as in every net
            layer, bottom, top = make_layer(text, [x], in_place=True)

        def fwd():
            layer.forward(bottom, top)

        def bwd():
            layer.backward(top, [True], bottom)
            for b in layer.blobs:   # gradients accumulate: keep them from growing without bound
                b.diff[...] = 0

        def use(engine):
            def setup():
                if kind == "Convolution":
                    name, options = engine_spec(engine)
                    engines.force(layer, None if name == "default" else name, **options)
                    layer.reshape(bottom, top)
            return setup
        variants = conv_engines if kind == "Convolution" else ["default"]
        fns = {}
        for e in variants:
            fns[(e, "fwd")] = (use(e), fwd)
            fns[(e, "bwd")] = (use(e), (lambda: None) if args.forward_only else bwd)
        times = interleaved_times(fns, args.repeat, stat, CLOCKS[args.clock])
        use("default")()
        default_name = layer.engine_name if kind == "Convolution" else None
        if kind == "Convolution":
            flops = conv_flops(text, bshape, top[0].shape)
        elif kind == "InnerProduct":
            flops = ip_flops(bshape, top[0].shape)
        else:
            flops = None
        torch_times = None
        if torch is not None:
            fb = torch_layer(text, x, layer)
            if fb is not None:
                tt = interleaved_times({"fwd": (lambda: None, fb[0]), "bwd": (lambda: None, fb[1])}, args.repeat, stat,
                                       CLOCKS[args.clock])
                torch_times = tt["fwd"], tt["bwd"]
        for e in variants:
            tf, tb = times[(e, "fwd")], times[(e, "bwd")]
            label = name
            if len(variants) > 1:
                label = f"{name} [{default_name if e == 'default' else e}{'*' if e == 'default' else ''}]"
            if flops:
                rates.append((label, flops / tf / 1e9, 2 * flops / tb / 1e9))
                row = (f"{label:{lw}s} {tf * 1e3:8.2f} {tb * 1e3:8.2f} {flops / tf / 1e9:9.1f} "
                       f"{2 * flops / tb / 1e9:9.1f} {100 * flops / tf / 1e9 / peak:6.0f}% "
                       f"{100 * 2 * flops / tb / 1e9 / peak:6.0f}%")
            else:
                nbytes = 4.0 * (x.size + top[0].count)
                row = (f"{label:{lw}s} {tf * 1e3:8.2f} {tb * 1e3:8.2f} {nbytes / tf / 1e9:7.1f}GB "
                       f"{2 * nbytes / tb / 1e9:7.1f}GB {'':>7s} {'':>7s}")
            if torch_times is not None:
                ttf, ttb = torch_times
                row += f" {ttf * 1e3:9.2f} {ttb * 1e3:9.2f} {tf / ttf:6.2f} {tb / ttb:6.2f}"
            print(row, flush=True)
    peak_end = sgemm_rate(args.gemm_size, args.repeat)
    best_peak = max(peak, peak_end)
    print(f"\nfloat32 matmul {args.gemm_size}² again: {peak_end:.1f} GFLOP/s", end="")
    if rates and best_peak > peak * 1.02:
        # other processes slow a measurement down, never up: the faster one is the machine's
        print(f"; of the best ({best_peak:.1f} GFLOP/s) the GEMM-bound layers reach:")
        for name, fwd, bwd in rates:
            print(f"  {name:{lw}s} fwd {100 * fwd / best_peak:4.0f}%  bwd {100 * bwd / best_peak:4.0f}%")
    else:
        print()
    print("\nGF/s: GFLOP/s (backward counts the data and the weight gradient: twice the forward's work);"
          "\n%pk: of the matmul rate above; GB: bottom+top bytes per second for memory-bound layers;"
          "\nfwd x / bwd x: minicaffe time / PyTorch time (below 1: minicaffe is faster)."
          + ("\n[engine]: the convolution engine forced for that row; * marks DEFAULT's choice."
             if len(conv_engines) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
