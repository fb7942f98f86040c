"""One-shot GPU check of minicaffe on a real CUDA machine (or rehearsed on the CuPy stand-in).

Why: the GPU path had never run on a GPU, and a GPU machine may be lent for minutes only. This
script does everything worth knowing in one go, each section guarded (a failure is reported and the
next section runs) and all under one time budget (sections left when it runs out are skipped with
a note):

1. ``pytest``: the GPU test set (tests using the ``gpu`` fixture, ``-m gpu``) on real CuPy, with a
   per-test timeout; the whole log goes to ``$OUT/pytest.log``.
2. ``agreement``: LeNet, CaffeNet, GoogLeNet, VGG-16 (``models/*/deploy.prototxt``, random weights,
   small batches) forward and backward on CPU and GPU, for the output, the input's gradient and
   every weight gradient: float64 blobs must agree to rounding (largest error / largest magnitude
   below 1e-9); float32 (TF32 off) on the GPU must be as close to the float64 result as float32 on
   the CPU is in the forward output (relative L2 error at most 5x the CPU's), and every float32
   gradient within 5x the CPU's error or 2e-2, whichever is larger: a max-pooling window whose two
   largest values float32 cannot separate sends a whole gradient path elsewhere on one device and
   not the other (GoogLeNet on the H100: 5.7x the CPU's input-gradient error with every forward blob
   as close as the CPU's), so a plain ratio on gradients cannot tell a tie from lost precision; the
   float64 check is what proves the kernels' arithmetic.
3. ``nccl``: data-parallel training through ``minicaffe.parallel.NCCLComm`` with one rank must
   equal plain training (the multi-GPU code path on one GPU).
4. ``timing`` (TF32 off, then on): GoogLeNet training (forward+backward+SGD update) at batch 128
   and VGG-16 inference at batch 64: images/s and peak GPU memory for minicaffe and for PyTorch
   eager running the same architecture (``benchmarks/bench_nets.build_torch``), then minicaffe
   again with cuDNN switched off (the CuPy engines cuda_im2col/gemm_1x1) when cuDNN ran the first
   rows; each row says which convolution, pooling and LRN engines ran. Caffe's published K40
   figure is printed for the record.

The convolution engine is cuDNN wherever it loads (``minicaffe/kernels/cudnn.py``: the
``nvidia-cudnn-cu13`` wheel on the GPU machine); the env section says whether it did and why not.

Results: a compact summary on stdout and in ``$OUT/summary.json`` + ``$OUT/summary.md``, the test
log in ``$OUT/pytest.log``, worker output in ``$OUT/workers.log`` (4 files).

    bash benchmarks/gpu_check.sh                    # on the GPU machine (installs .whl/ first)
    python benchmarks/gpu_check.py --standin        # rehearsal without a GPU: CuPy stand-in, small sizes
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CAFFE_K40 = ("BVLC Caffe's published figure: GoogLeNet, batch 128, forward+backward 1688.8 ms per batch "
             "on an NVIDIA K40 (75.8 images/s)")

# (section, cap in seconds, least time worth starting it with)
SECTIONS = [("env", 20, 2), ("pytest", 150, 30), ("agreement", 90, 20), ("nccl", 30, 8),
            ("timing_tf32_off", 110, 25), ("timing_tf32_on", 90, 20)]


# --- the stand-in, for rehearsals ----------------------------------------------------------------

def use_standin():
    """Install tests/cupy_standin.py as cupy, and tests/cudnn_standin.py as the cuDNN library (the
    rehearsal path: no GPU needed; the cuDNN engine runs on the emulation as it does in the tests)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import cudnn_standin
    import cupy_standin
    from minicaffe.core import context
    cupy_standin.install()
    ctx = context.current()
    ctx.cupy = cupy_standin
    ctx.cudnn = cudnn_standin.FakeCudnn()
    return cupy_standin


def conv_engines(net):
    """Which engines ran the net's (de)convolutions, pooling and LRN layers (each engine slot's
    choice): {"cudnn": 57, "pool:cudnn": 13, "pool:cuda": 1, "lrn:cudnn": 2}; convolutions unprefixed."""
    counts = {}
    prefix = {"Convolution": "", "Deconvolution": "", "Pooling": "pool:", "LRN": "lrn:"}
    for layer in net.layers:
        if layer.type in prefix:
            slot = getattr(layer, "engine_slot", None)
            name = prefix[layer.type] + str(getattr(layer, "engine_name", None) or getattr(slot, "name", "?"))
            counts[name] = counts.get(name, 0) + 1
    return counts


def cudnn_report():
    """cuDNN as minicaffe sees it in GPU mode: usable or why not, and the library's version."""
    from minicaffe.core import backend
    from minicaffe.kernels import cudnn
    mode = backend.mode()
    backend.set_mode_gpu()
    try:
        ok, why = cudnn.available()
        if not ok:
            return f"not used: {why}"
        return (f"cuDNN {cudnn.library().version} (engine 'cudnn' is DEFAULT for convolution and softmax, "
                "and for pooling and LRN where it computes Caffe's result)")
    finally:
        backend.set_mode_gpu() if mode == "gpu" else backend.set_mode_cpu()


def cupy_module(standin):
    if standin:
        return use_standin()
    import cupy
    return cupy


def sync(cp):
    cp.cuda.Device().synchronize()


# --- workers (each in its own process, killed if it overruns) -----------------------------------

def worker_env(args):
    import minicaffe
    cp = cupy_module(args.standin)
    out = {"python": sys.version.split()[0], "minicaffe": os.path.dirname(minicaffe.__file__),
           "cupy": getattr(cp, "__version__", "?"), "standin": bool(getattr(cp, "STANDIN", False))}
    import numpy
    out["numpy"] = numpy.__version__
    try:
        out["devices"] = cp.cuda.runtime.getDeviceCount()
        name = cp.cuda.runtime.getDeviceProperties(0)["name"]
        out["device"] = name.decode() if isinstance(name, bytes) else str(name)
        out["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out["device_error"] = f"{type(exc).__name__}: {exc}"
    for mod in ("torch", "google.protobuf", "lmdb", "cv2", "h5py", "mpi4py"):
        try:
            m = __import__(mod, fromlist=["_"])
            out[mod] = getattr(m, "__version__", "ok")
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"missing ({type(exc).__name__})"
    try:
        out["cudnn"] = cudnn_report()
    except Exception as exc:  # noqa: BLE001
        out["cudnn"] = f"error ({type(exc).__name__}: {exc})"
    try:
        from cupy.cuda import nccl  # noqa: F401
        out["nccl"] = "ok"
    except Exception as exc:  # noqa: BLE001
        out["nccl"] = f"missing ({type(exc).__name__})"
    return out


def _random_weights(net, seed):
    """He-scaled normal weights (biases small), the same for every mode: deploy nets carry no fillers."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for b in blobs:
            shape = b.shape
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
            scale = np.sqrt(2.0 / fan_in) if fan_in else 0.01
            b.data[...] = rng.standard_normal(shape) * scale


def _fwd_bwd(name, batch, dtype64, seed=3):
    import numpy as np
    import minicaffe as caffe
    from minicaffe.core import backend
    from bench_nets import deploy_param, inputs
    param = deploy_param(name, batch)
    param.force_backward = True
    ctx = backend.float64_blobs() if dtype64 else _Null()
    with ctx:
        net = caffe.Net(param, caffe.TEST)
    _random_weights(net, seed)
    data, _ = inputs(name, batch, seed=seed)
    out_name = net.outputs[0]
    net.blobs[net.inputs[0]].data[...] = data
    net.forward()
    rng = np.random.default_rng(seed + 1)
    top = net.blobs[out_name]
    top.diff[...] = rng.standard_normal(top.shape)
    net.backward()
    res = {"output": top.data.astype(np.float64), "input_grad": net.blobs[net.inputs[0]].diff.astype(np.float64)}
    for lname, blobs in net.params.items():
        for i, b in enumerate(blobs):
            res[f"{lname}[{i}]"] = b.diff.astype(np.float64)
    return res, conv_engines(net)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rel(a, b):
    import numpy as np
    scale = float(np.abs(a).max()) or 1.0
    return float(np.abs(a - b).max()) / scale


def _l2(ref, x):
    import numpy as np
    return float(np.linalg.norm(x - ref)) / (float(np.linalg.norm(ref)) or 1.0)


def worker_agreement(args):
    """Per net: float64 on CPU and GPU must agree to rounding (the same arithmetic); float32 on the
    GPU must be as close to that float64 reference as float32 on the CPU is. (Comparing float32
    CPU with float32 GPU directly says little: a ReLU or max-pooling decision that flips between
    two float32 roundings moves a whole gradient path, ~1e-3 of the input gradient here.)"""
    from minicaffe.core import backend
    cupy_module(args.standin)
    plan = ([("lenet", 2), ("googlenet", 1)] if args.standin else
            [("lenet", 8), ("caffenet", 2), ("googlenet", 2), ("vgg16", 1)])
    rows = []
    deadline = time.time() + args.seconds - 5
    for name, batch in plan:
        if time.time() > deadline:
            rows.append({"net": name, "skipped": "time"})
            continue
        t0 = time.time()
        try:
            runs, engines = {}, {}
            for mode, d64 in (("cpu", True), ("gpu", True), ("cpu", False), ("gpu", False)):
                backend.set_mode_gpu() if mode == "gpu" else backend.set_mode_cpu()
                runs[mode, d64], engines[mode] = _fwd_bwd(name, batch, d64)
            backend.set_mode_cpu()
            ref = runs["cpu", True]
            exact = {k: _rel(ref[k], runs["gpu", True][k]) for k in ref}
            cpu32 = {k: _l2(ref[k], runs["cpu", False][k]) for k in ref}
            gpu32 = {k: _l2(ref[k], runs["gpu", False][k]) for k in ref}
            worst64 = max(exact, key=exact.get)
            worst32 = max(gpu32, key=lambda k: gpu32[k] / (cpu32[k] + 1e-7))
            ok64 = exact[worst64] < 1e-9
            ok32 = gpu32["output"] <= 5 * cpu32["output"] + 1e-5 and all(
                gpu32[k] <= max(5 * cpu32[k] + 1e-5, 2e-2) for k in ref)
            rows.append({"net": name, "batch": batch, "f64_max_rel": exact[worst64], "f64_worst": worst64,
                         "f32_output": [gpu32["output"], cpu32["output"]],
                         "f32_input_grad": [gpu32["input_grad"], cpu32["input_grad"]],
                         "f32_worst": worst32, "f32_worst_gpu_cpu": [gpu32[worst32], cpu32[worst32]],
                         "gpu_conv": engines["gpu"],
                         "ok": ok64 and ok32, "seconds": round(time.time() - t0, 1)})
        except Exception as exc:  # noqa: BLE001
            backend.set_mode_cpu()
            rows.append({"net": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "trace": traceback.format_exc()[-1500:]})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "ok": all(r.get("ok", False) for r in rows if "skipped" not in r)}


def worker_nccl(args):
    import numpy as np
    import minicaffe as caffe
    from minicaffe.core import backend
    from minicaffe.parallel import data_parallel as parallel
    cupy_module(args.standin)
    backend.set_mode_gpu()
    if not parallel.nccl_available():
        return {"ok": False, "error": "CuPy has no NCCL bindings (cupy.cuda.nccl)"}
    from bench_nets import inputs, solver_param, train_param
    net = train_param("lenet", 16)
    data, labels = inputs("lenet", 16)

    def run(comm):
        caffe.set_random_seed(1)
        solver = caffe.SGDSolver(solver_param(net))
        if comm is not None:
            solver = parallel.ParallelSolver(solver, comm, bucket_mb=0.05)
        solver.net.blobs["data"].data[...] = data
        solver.net.blobs["label"].data[...] = labels
        solver.step(5)
        return [backend.to_host(p.xdata).copy() for p in solver.net.learnable_params]

    plain = run(None)
    comm = parallel.NCCLComm(parallel.new_nccl_uid(), 0, 1)
    try:
        nccl = run(comm)
    finally:
        comm.close()
    err = max(float(np.abs(a - b).max()) for a, b in zip(plain, nccl))
    return {"ok": err <= 1e-6, "max_abs_diff": err, "iterations": 5, "net": "lenet b16",
            "comm": "NCCLComm(rank 0 of 1), bucket 0.05 MB"}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _time(step, sync_fn, warmup, iters, budget_end):
    for _ in range(warmup):
        step()
    sync_fn()
    times = []
    for _ in range(iters):
        if times and time.time() > budget_end:
            break
        t0 = time.perf_counter()
        step()
        sync_fn()
        times.append(time.perf_counter() - t0)
    return times


def worker_timing(args):
    """GoogLeNet train b128 and VGG-16 inference b64, minicaffe then PyTorch, TF32 per args.tf32."""
    import dataclasses
    import minicaffe as caffe
    from minicaffe.core import backend, context
    from bench_nets import build_torch, deploy_param, inputs, solver_param, train_param
    cp = cupy_module(args.standin)
    backend.set_mode_gpu()
    pool = cp.get_default_memory_pool()
    sizes = {"googlenet": 2, "vgg16": 1} if args.standin else {"googlenet": 128, "vgg16": 64}
    warmup, iters = (0, 1) if args.standin else (2, 5)
    end = time.time() + args.seconds - 5
    rows, weights = [], {}

    def mc_row(name, mode, batch, step, conv):
        pool.free_all_blocks()
        times = _time(step, lambda: sync(cp), warmup, iters, end)
        ms = _median(times) * 1000
        rows.append({"framework": "minicaffe", "net": name, "mode": mode, "batch": batch, "ms": round(ms, 2),
                     "img_s": round(batch / ms * 1000, 1), "peak_mb": round(pool.total_bytes() / 2 ** 20),
                     "iters": len(times), "conv": conv})
        print(json.dumps(rows[-1]), flush=True)

    def minicaffe_rows(cudnn_on):
        """GoogLeNet training and VGG-16 inference, with the convolution engines DEFAULT picks
        (cuDNN where it loads) or with cuDNN switched off (the CuPy engines: cuda_im2col, gemm_1x1),
        as MINICAFFE_CUDNN=0 would, in this process."""
        ctx = context.current()
        saved = ctx.switches
        ctx.switches = dataclasses.replace(saved, cudnn=bool(cudnn_on))
        backend.set_mode_gpu()
        try:
            b = sizes["googlenet"]
            caffe.set_random_seed(1)
            solver = caffe.SGDSolver(solver_param(train_param("googlenet", b)))
            data, labels = inputs("googlenet", b)
            solver.net.blobs["data"].data[...] = data
            solver.net.blobs["label"].data[...] = labels
            weights.setdefault("googlenet", {n: [x.data.copy() for x in bl] for n, bl in solver.net.params.items()})
            try:
                mc_row("googlenet", "train", b, lambda: solver.step(1), conv_engines(solver.net))
            finally:
                del solver
                pool.free_all_blocks()
            b = sizes["vgg16"]
            net = caffe.Net(deploy_param("vgg16", b), caffe.TEST)
            _random_weights(net, 1)
            weights.setdefault("vgg16", {n: [x.data.copy() for x in bl] for n, bl in net.params.items()})
            net.blobs[net.inputs[0]].data[...] = inputs("vgg16", b)[0]
            try:
                mc_row("vgg16", "infer", b, lambda: net.forward(), conv_engines(net))
            finally:
                del net
                pool.free_all_blocks()
        finally:
            ctx.switches = saved
            backend.set_mode_cpu()

    minicaffe_rows(cudnn_on=True)

    def no_cudnn_rows():
        """The same minicaffe rows on the CuPy engines, when cuDNN ran the first ones and time is left
        (after PyTorch: the cuDNN-vs-PyTorch comparison matters more)."""
        if not any(r.get("conv", {}).get("cudnn") for r in rows):
            return
        if time.time() > end - 20:
            rows.append({"framework": "minicaffe", "net": "-", "mode": "no cuDNN", "skipped": "time"})
            return
        minicaffe_rows(cudnn_on=False)

    # PyTorch eager, same architectures and weights
    try:
        import torch
    except ImportError as exc:
        no_cudnn_rows()
        return {"rows": rows, "torch": f"not importable: {exc}"}
    if args.standin or not torch.cuda.is_available():
        no_cudnn_rows()
        return {"rows": rows, "torch": "skipped (no CUDA in torch)" if not args.standin else "skipped (stand-in)"}
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")

    def torch_row(name, mode, batch, step):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times = _time(step, torch.cuda.synchronize, warmup, iters, end)
        ms = _median(times) * 1000
        rows.append({"framework": "torch", "net": name, "mode": mode, "batch": batch, "ms": round(ms, 2),
                     "img_s": round(batch / ms * 1000, 1),
                     "peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20),
                     "reserved_mb": round(torch.cuda.max_memory_reserved() / 2 ** 20), "iters": len(times)})
        print(json.dumps(rows[-1]), flush=True)

    b = sizes["googlenet"]
    model = build_torch(train_param("googlenet", b), weights["googlenet"]).to(dev).train()
    groups = [{"params": [t], "lr": 0.001 * lr, "weight_decay": 0.0005 * decay} for t, lr, decay in model.param_mults]
    opt = torch.optim.SGD(groups, lr=0.001, momentum=0.9)
    data, labels = inputs("googlenet", b)
    x, y = torch.from_numpy(data).to(dev), torch.from_numpy(labels).to(dev)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model({"data": x, "label": y})
        loss.backward()
        opt.step()
    torch_row("googlenet", "train", b, train_step)
    del model, opt, x, y
    b = sizes["vgg16"]
    dp = deploy_param("vgg16", b)
    model = build_torch(dp, weights["vgg16"]).to(dev).eval()
    in_name = next(lp.top[0] for lp in dp.layer if lp.type == "Input")
    xv = torch.from_numpy(inputs("vgg16", b)[0]).to(dev)

    def infer_step():
        with torch.no_grad():
            model({in_name: xv})
    torch_row("vgg16", "infer", b, infer_step)
    del model, xv
    torch.cuda.empty_cache()
    no_cudnn_rows()
    return {"rows": rows, "torch": torch.__version__}


WORKERS = {"env": worker_env, "agreement": worker_agreement, "nccl": worker_nccl, "timing": worker_timing}


def worker_main(args):
    res = WORKERS[args.worker](args)
    with open(args.result, "w") as f:
        json.dump(res, f, default=str)


def gpu_test_files():
    """The test files with a test taking the ``gpu`` fixture (collecting only these keeps modules
    that need packages the GPU machine lacks out of the run)."""
    import re
    pattern = re.compile(r"def test_\w+\([^)]*\bgpu\b", re.S)
    tests = os.path.join(ROOT, "tests")
    return [os.path.join("tests", f) for f in sorted(os.listdir(tests))
            if f.startswith("test_") and f.endswith(".py")
            and pattern.search(open(os.path.join(tests, f), encoding="utf-8").read())]


# --- the driver ----------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "standin": args.standin,
                        "budget_s": args.budget, "sections": {}, "caffe_k40": CAFFE_K40}
        self.log = open(os.path.join(self.out, "workers.log"), "a", encoding="utf-8")

    def left(self):
        return self.args.budget - (time.time() - self.t0)

    def spawn(self, argv, seconds, env=None, log=None):
        """Run a child in its own process group; kill the group when it overruns. (rc, output)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT, start_new_session=True)
        chunks = []
        deadline = time.time() + seconds
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        timed_out = False
        while True:
            if time.time() > deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if not line:
                    break
                chunks.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if self.args.verbose:
                    sys.stdout.write("    | " + line)
        proc.wait()
        rest = proc.stdout.read() if not timed_out else ""
        if rest:
            chunks.append(rest)
            if log is not None:
                log.write(rest)
        return (None if timed_out else proc.returncode), "".join(chunks)

    def worker(self, name, seconds, extra=(), env=None):
        fd, result = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".json")
        os.close(fd)
        argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result", result,
                "--seconds", str(int(seconds))] + (["--standin"] if self.args.standin else []) + list(extra)
        self.log.write(f"\n===== worker {name} {' '.join(extra)} ({int(seconds)} s) =====\n")
        rc, text = self.spawn(argv, seconds, env=env, log=self.log)
        try:
            with open(result) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {}
        finally:
            os.unlink(result)
        if rc is None:
            res.setdefault("error", f"killed after {int(seconds)} s (time cap)")
        elif rc != 0:
            res.setdefault("error", f"exit status {rc}: " + text.strip()[-800:])
        return res

    # sections
    def s_env(self, seconds):
        res = self.worker("env", seconds)
        try:
            res["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            res["nvidia_smi"] = "not available"
        res["ok"] = "error" not in res and "device_error" not in res
        return res

    def s_pytest(self, seconds):
        env = dict(os.environ)
        argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfE", "-p", "no:cacheprovider",
                "--continue-on-collection-errors"] + gpu_test_files()
        try:
            import pytest_timeout  # noqa: F401
            argv[4:4] = ["--timeout", "60"]
        except ImportError:
            pass
        with open(os.path.join(self.out, "pytest.log"), "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(argv) + "\n")
            rc, text = self.spawn(argv, seconds, env=env, log=log)
        tail = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = tail[-1] if tail else ""
        failed = [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))]
        return {"ok": rc == 0, "rc": rc, "result": last.strip("= ") if rc is not None
                else f"killed after {int(seconds)} s; last: {last[:200]}",
                "failed": failed[:30], "failed_total": len(failed)}

    def s_agreement(self, seconds):
        env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
        return self.worker("agreement", seconds, env=env)

    def s_nccl(self, seconds):
        return self.worker("nccl", seconds)

    def s_timing_tf32_off(self, seconds):
        env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", CUPY_TF32="0")
        res = self.worker("timing", seconds, ["--tf32", "0"], env=env)
        res["ok"] = "error" not in res
        return res

    def s_timing_tf32_on(self, seconds):
        env = dict(os.environ, CUPY_TF32="1")
        env.pop("NVIDIA_TF32_OVERRIDE", None)
        res = self.worker("timing", seconds, ["--tf32", "1"], env=env)
        res["ok"] = "error" not in res
        return res

    def run(self):
        only = set(self.args.sections.split(",")) if self.args.sections else None
        for name, cap, least in SECTIONS:
            if only and name not in only:
                continue
            left = self.left() - 3
            if left < least:
                self.summary["sections"][name] = {"ok": None, "skipped": f"time budget spent ({int(left)} s left)"}
                print(f"[{name}] skipped: time budget spent", flush=True)
                self.write()
                continue
            seconds = min(cap, left)
            print(f"[{name}] start (up to {int(seconds)} s, {int(self.left())} s of budget left)", flush=True)
            t0 = time.time()
            try:
                res = getattr(self, f"s_{name}")(seconds)
            except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
            res.setdefault("ok", "error" not in res)
            res["seconds"] = round(time.time() - t0, 1)
            self.summary["sections"][name] = res
            print(self.section_text(name, res), flush=True)
            self.write()
        self.summary["total_s"] = round(time.time() - self.t0, 1)
        self.write()
        print("\n" + self.markdown(), flush=True)
        return 0

    def section_text(self, name, res):
        status = {True: "ok", False: "FAIL", None: "skipped"}[res.get("ok")]
        lines = [f"[{name}] {status} ({res.get('seconds', 0)} s)"]
        if res.get("error"):
            lines.append(f"    error: {res['error'][:600]}")
        return "\n".join(lines)

    def markdown(self):
        s = self.summary
        sec = s["sections"]
        md = [f"# minicaffe GPU check ({'CuPy stand-in rehearsal' if s['standin'] else 'real GPU'})", "",
              f"started {s['started']}, {s.get('total_s', '?')} s of a {s['budget_s']} s budget", ""]
        env = sec.get("env", {})
        if env:
            md.append(f"device: {env.get('device', '?')} ({env.get('nvidia_smi', '')}); cupy {env.get('cupy')}, "
                      f"numpy {env.get('numpy')}, torch {env.get('torch')}, protobuf {env.get('google.protobuf')}, "
                      f"lmdb {env.get('lmdb')}, nccl {env.get('nccl')}; cudnn: {env.get('cudnn')}")
            md.append("")
        md.append("| section | status | seconds | result |")
        md.append("|---|---|---|---|")
        for name, _, _ in SECTIONS:
            r = sec.get(name)
            if r is None:
                continue
            status = {True: "ok", False: "FAIL", None: "skipped"}[r.get("ok")]
            if name == "pytest":
                detail = r.get("result", "")
            elif name == "agreement":
                detail = "; ".join(
                    f"{x['net']}: " + (f"f64 {x['f64_max_rel']:.0e}, f32 in-grad gpu/cpu "
                                       f"{x['f32_input_grad'][0]:.0e}/{x['f32_input_grad'][1]:.0e} "
                                       f"({'+'.join(sorted(x.get('gpu_conv', {})))})"
                                       if "f64_max_rel" in x else x.get("error", x.get("skipped", "?"))[:80])
                    for x in r.get("rows", []))
            elif name == "nccl":
                detail = f"max |diff| {r.get('max_abs_diff')}" if "max_abs_diff" in r else ""
            elif name.startswith("timing"):
                detail = f"torch {r.get('torch', '?')}"
            else:
                detail = ""
            if r.get("error"):
                detail = (detail + " error: " + r["error"].replace("\n", " ")[:200]).strip()
            if r.get("skipped"):
                detail = r["skipped"]
            md.append(f"| {name} | {status} | {r.get('seconds', '')} | {detail.replace('|', '/')} |")
        rows = [(n[len('timing_'):], row) for n in ("timing_tf32_off", "timing_tf32_on")
                for row in sec.get(n, {}).get("rows", [])]
        if rows:
            md += ["", "| TF32 | framework | conv engines | net | mode | batch | ms/iter | images/s | peak GPU MB |",
                   "|---|---|---|---|---|---|---|---|---|"]
            for tf, r in rows:
                if r.get("skipped"):
                    md.append(f"| {tf} | {r['framework']} | | {r['net']} | {r['mode']} | skipped: {r['skipped']} "
                              f"| | | |")
                    continue
                conv = " ".join(f"{k}×{v}" for k, v in sorted(r.get("conv", {}).items())) or "cuDNN (torch)"
                md.append(f"| {tf} | {r['framework']} | {conv} | {r['net']} | {r['mode']} | {r['batch']} | "
                          f"{r['ms']} | {r['img_s']} | {r['peak_mb']} |")
            md += ["", "minicaffe peak = CuPy memory pool bytes held after the timed loop; torch peak = "
                   "max_memory_allocated."]
        fails = sec.get("pytest", {}).get("failed", [])
        if fails:
            md += ["", f"failed tests ({sec['pytest'].get('failed_total')}):"] + [f"- {f[:200]}" for f in fails]
        md += ["", s["caffe_k40"]]
        return "\n".join(md)

    def write(self):
        for name, text in (("summary.json", json.dumps(self.summary, indent=1, default=str)),
                           ("summary.md", self.markdown())):
            path = os.path.join(self.out, name)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--standin", action="store_true", help="rehearse on the CuPy stand-in with small sizes")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "gpu_check"),
                   help="where the summary and logs go (default $OUT)")
    p.add_argument("--budget", type=float, default=390.0, help="seconds for everything (default 390)")
    p.add_argument("--sections", default="", help="comma-separated subset of: " + ",".join(s for s, _, _ in SECTIONS))
    p.add_argument("--verbose", action="store_true", help="echo worker output")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60, help=argparse.SUPPRESS)
    p.add_argument("--tf32", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    print(CAFFE_K40, flush=True)
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
