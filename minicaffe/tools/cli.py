"""``minicaffe <command> <flags>``: Caffe's ``caffe`` tool (train, test, time, device_query).

Flags are spelled as Caffe's gflags (``--solver=x``, ``--solver x`` and ``-solver x`` all work) and
the log lines are worded as Caffe's. Each command is a thin shell over library calls: the same work
can be done from Python with ``minicaffe.get_solver``/``Net``.
"""
import argparse
import sys
import time as _time

import numpy as np

from ..core import backend, shipped
from ..parallel import data_parallel as parallel
from ..errors import MinicaffeError, did_you_mean
from ..layers.python_layer import python_layers_refused, refuse_python_layers
from ..proto import caffe_pb2
from . import beyond, subcommands
from .argparsing import ArgumentParser
from .common import get_logger, print_error, run_main
from .progress import ProgressBar, log_to_file

COMMANDS = ("train", "test", "device_query", "time", "fully_convolutional", "init_from", "evaluate",
            "visualize")
BEYOND_COMMANDS = ("fully_convolutional", "init_from", "evaluate")    # tools/beyond.py, own flags
FLAGS = ("gpu", "solver", "model", "phase", "level", "stage", "snapshot", "weights", "iterations",
         "sigint_effect", "sighup_effect", "debug", "plot", "no-python-layers", "log_file", "tensorboard") + beyond.EVALUATION_FLAGS
NO_PYTHON_LAYERS = ("--no-python-layers", "-no-python-layers")

USAGE = """minicaffe <command> <args>

commands:
  train           train or finetune a model
  test            score a model
  device_query    show GPU diagnostic information
  time            benchmark model execution time
  fully_convolutional  turn FC layers into convolutions (VGG dense evaluation)
  init_from       initialise a net from layers of a trained one (VGG's recipe)
  evaluate        top-1/top-5 error with multi-crop, dense evaluation and ensembles
  visualize       mean image, filters, feature maps, top-k predictions as PNGs

test also takes --crops 1|10|144|150, --scales, --dense and several --model/--weights pairs
(an ensemble); see 'minicaffe evaluate --help' for those flags.

Paths such as models/lenet/solver.prototxt that are not in the working directory
are read from the files shipped with minicaffe ('minicaffe models' lists them).

Python layers in a net import code from the current directory: see the note at
the end of this help, and --no-python-layers.

""" + subcommands.USAGE

PYTHON_LAYERS_NOTE = """Python layers run code from the current directory:
  a net with type: "Python" layers imports each python_param.module with the
  current directory first on sys.path (as Caffe does). Running train, test or
  time on a downloaded prototxt from its directory therefore runs any Python
  file that came with it. Use --no-python-layers, or set
  MINICAFFE_NO_PYTHON_LAYERS=1, to refuse Python layers: the net then fails
  with one line naming the layer and module, before anything is imported."""


COMMAND_HELP = {
    "train": "train or finetune a model",
    "test": "score a model",
    "device_query": "show GPU diagnostic information",
    "time": "benchmark model execution time",
}
# the flags each command reads, shown by 'minicaffe <command> --help'. The others are still accepted
# and ignored, as Caffe's gflags are global (a script passing --model to train keeps working)
COMMAND_FLAGS = {
    "train": ("solver", "gpu", "snapshot", "weights", "iterations", "level", "stage", "sigint_effect",
              "sighup_effect", "no-python-layers", "log_file", "tensorboard"),
    "test": ("model", "weights", "gpu", "iterations", "phase", "level", "stage", "no-python-layers",
             "log_file") + beyond.EVALUATION_FLAGS,
    "time": ("model", "gpu", "iterations", "phase", "level", "stage", "plot", "no-python-layers", "log_file"),
    "device_query": ("gpu", "log_file"),
}


def _parser(command=None):
    """The global parser (``command`` None: ``minicaffe --help``) or one command's: the same flags,
    with the help of those the command does not read hidden."""
    if command is None:
        p = ArgumentParser(prog="minicaffe", usage=USAGE, epilog=PYTHON_LAYERS_NOTE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("command", help="train | test | device_query | time")
    else:
        p = ArgumentParser(prog=f"minicaffe {command}", description=COMMAND_HELP[command],
                           epilog=PYTHON_LAYERS_NOTE if command != "device_query" else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", default="",
                   help="run in GPU mode on the given device IDs separated by ','; 'all' for every device")
    p.add_argument("--solver", default="", help="the solver definition protocol buffer text file")
    p.add_argument("--model", action="append", default=[],
                   help="the model definition protocol buffer text file (test: repeat for an ensemble)")
    p.add_argument("--phase", default="", help="network phase (TRAIN or TEST); for 'time' and 'test'")
    p.add_argument("--level", type=int, default=0, help="network level")
    p.add_argument("--stage", default="", help="network stages, separated by ','")
    p.add_argument("--snapshot", default="", help="the solver state (.solverstate) to resume training from")
    p.add_argument("--weights", action="append", default=[],
                   help="pretrained weights to initialise finetuning (or to score), separated by ','; "
                        "test: repeat, one per --model, for an ensemble")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations to run (test/time; default 50); for train, overrides max_iter")
    p.add_argument("--sigint_effect", default="stop", help="action on SIGINT: snapshot, stop or none")
    p.add_argument("--sighup_effect", default="snapshot", help="action on SIGHUP: snapshot, stop or none")
    p.add_argument("--plot", default="", help="time: also draw the per-layer times into this image (.png)")
    p.add_argument("--no-python-layers", action="store_true",
                   help="refuse type: \"Python\" layers (they import code from the current directory; "
                        "also MINICAFFE_NO_PYTHON_LAYERS=1); works with every command")
    p.add_argument("--log_file", default="",
                   help="also write the log lines to this file (plain, without the progress bar)")
    p.add_argument("--tensorboard", default="", metavar="DIR",
                   help="train: write loss, accuracy, learning rate and per-layer weight/gradient L2 norms "
                        "as TensorBoard scalars into DIR (needs tensorboardX: the 'tensorboard' extra)")
    beyond.add_evaluation_options(p.add_argument_group("test with crops, dense evaluation or an ensemble"))
    if command is not None:
        shown = {"--" + f for f in COMMAND_FLAGS[command]} | {"-h", "--help"}
        for action in p._actions:
            if not shown.intersection(action.option_strings):
                action.help = argparse.SUPPRESS
    return p


def _gflags_style(argv):
    """``-solver x`` (gflags' single dash) → ``--solver x``."""
    out = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and a[1:].split("=", 1)[0] in FLAGS:
            a = "-" + a
        out.append(a)
    return out


def _stages(flag):
    """Caffe's get_stages_from_flags: boost::split on ',', so an empty --stage is one empty stage
    (it shows as ``stage: ""`` in the logged net state and matches no rule)."""
    return flag.split(",")


def _phase(flag, default):
    if not flag:
        return default
    if flag == "TRAIN":
        return caffe_pb2.TRAIN
    if flag == "TEST":
        return caffe_pb2.TEST
    raise MinicaffeError(f'--phase must be "TRAIN" or "TEST" (got "{flag}")')


def _gpus(flag):
    """Device ids from ``--gpu`` ('' → none, 'all', or '0,1'); a one-line error when CUDA is missing."""
    if not flag:
        return []
    if not backend.gpu_available():
        raise MinicaffeError(f"--gpu {flag}: no CUDA device is visible (CuPy is not installed or there is "
                             f"no GPU); leave out --gpu to run on the CPU")
    count = backend.import_cupy().cuda.runtime.getDeviceCount()
    if flag == "all":
        return list(range(count))
    try:
        ids = [int(s) for s in flag.split(",")]
    except ValueError:
        raise MinicaffeError(f"--gpu {flag}: give device ids separated by ',' or 'all'") from None
    for i in ids:
        if not 0 <= i < count:
            raise MinicaffeError(f"--gpu {flag}: no CUDA device {i} ({count} visible)")
    return ids


def _device_name(i):
    props = backend.import_cupy().cuda.runtime.getDeviceProperties(i)
    name = props.get("name", b"")
    return name.decode() if isinstance(name, bytes) else str(name)


def _use(gpus, log):
    if gpus:
        backend.set_device(gpus[0])
        backend.set_mode_gpu()
    else:
        log.info("Use CPU.")
        backend.set_mode_cpu()


# --- commands ---------------------------------------------------------------------------------------

def train(args):
    """Train or finetune (Caffe's ``caffe train``)."""
    from ..solvers.solver import SignalHandler, read_solver_param
    log = get_logger()
    if not args.solver:
        raise MinicaffeError("train: need a solver definition (--solver)")
    if args.snapshot and args.weights:
        raise MinicaffeError("train: give a snapshot to resume training or weights to finetune, but not both")
    if args.snapshot.endswith((".caffemodel", ".caffemodel.h5")):
        # a common slip: the weights file holds no iteration, history or lr state to resume from
        state = args.snapshot.replace(".caffemodel", ".solverstate")
        raise MinicaffeError(f"{args.snapshot}: a .caffemodel holds weights only, not the solver state "
                             f"--snapshot resumes from; to fine-tune from it use --weights {args.snapshot}, to resume give "
                             f"the .solverstate ({state})")
    if args.tensorboard:        # a missing tensorboardX is found before the nets are built
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise MinicaffeError("--tensorboard needs tensorboardX: pip install 'minicaffe[tensorboard]' "
                                 "(or pip install tensorboardX)") from None
    handler = SignalHandler(args.sigint_effect, args.sighup_effect)   # checks the effect names
    param, path = read_solver_param(args.solver)
    if args.solver != args.solver_given:
        shipped.make_snapshot_folder(param.snapshot_prefix)     # a shipped solver: its prefix is local
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args.stage))
    gpu_flag = args.gpu
    if not gpu_flag and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        if backend.gpu_available():
            gpu_flag = str(param.device_id)
        else:
            log.warning("%s asks for solver_mode: GPU, but no CUDA device is visible; using the CPU", path)
    gpus = _gpus(gpu_flag)
    if gpus and not parallel.launched_as_worker():
        log.info("Using GPUs %s", ", ".join(map(str, gpus)))
        for g in gpus:
            log.info("GPU %d: %s", g, _device_name(g))
        if len(gpus) > 1:       # one process per GPU, NCCL between them (processes: see parallel.py)
            return parallel.spawn_gpu_workers(lambda g: _worker_argv(args, g), gpus)
    comm = None
    if parallel.launched_as_worker():       # under mpirun -np N, or one of the per-GPU processes
        comm, gpus = parallel.start_worker(gpus)
        log.info("Worker %d of %d (%s)%s", comm.rank, comm.size, comm.name,
                 f" on GPU {gpus[0]}" if gpus else "")
    if gpus:
        param.device_id = gpus[0]
    _use(gpus, log)
    try:
        _train(args, log, param, path, handler, comm)
    except parallel.WorkersDisagree as exc:
        # every worker found the same difference at the same point: the root alone prints the one
        # line (N copies would bury it), and the others wait for it before they exit, since mpirun
        # ends the whole job at the first non-zero exit
        if comm.rank == 0:
            print_error(exc)
        comm.barrier()
        return 1
    except BaseException as exc:
        if comm is not None and comm.size > 1 and not isinstance(exc, SystemExit):
            parallel.abort_job(comm, exc)
        raise
    return 0


def _worker_argv(args, gpu):
    """The ``train`` command line for the process of one GPU."""
    argv = ["train", "--solver", args.solver, "--gpu", str(gpu), "--level", str(args.level),
            "--sigint_effect", args.sigint_effect, "--sighup_effect", args.sighup_effect]
    for flag in ("stage", "snapshot", "weights", "log_file", "tensorboard"):   # the root writes the board
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    if args.iterations is not None:
        argv += ["--iterations", str(args.iterations)]
    if python_layers_refused():
        argv.append("--no-python-layers")
    return argv


def _train(args, log, param, path, handler, comm):
    import contextlib
    from ..parallel.data_parallel import ParallelSolver
    from ..solvers.checkpoint import SnapshotLock
    from ..solvers.registry import solver_class
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    if args.iterations is not None:
        param.max_iter = args.iterations
    # the snapshot prefix is locked before anything is built: a second run with it is refused at once
    root = comm is None or comm.rank == 0
    lock = SnapshotLock(param.snapshot_prefix, path or "<solver>") if root else contextlib.nullcontext()
    with handler, lock:
        solver = solver_class(param.type, path)(param, solver_file=path)
        if comm is not None:
            solver = ParallelSolver(solver, comm)
        solver.set_action_function(handler.check)
        board = None
        if args.tensorboard and root:
            from .tensorboard import TensorBoardLogger
            board = TensorBoardLogger(solver, args.tensorboard)
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            from ..net.network import BlobShapeError
            try:
                solver.restore(args.snapshot)
            except BlobShapeError as exc:      # a history blob (the weights name their own file)
                raise MinicaffeError(f"{args.snapshot}: a history blob: {exc}") from None
        log.info("Starting Optimization")
        try:
            solver.solve()
        finally:
            if board is not None:
                board.close()
    log.info("Optimization Done.")


def _net(args, default_phase, weights=None):
    from ..net.network import Net
    return Net(args.model, _phase(args.phase, default_phase), weights=weights, level=args.level,
               stages=_stages(args.stage))


def _loss_weights(net):
    weights = {}
    for lp, ws in zip(net.param.layer, net.layer_loss_weights):
        for name, w in zip(lp.top, ws):
            if w:
                weights[name] = w
    return weights


def _g(x):
    return f"{float(x):.6g}"


def _papers_evaluation(args):
    """True when ``test`` is asked for crops, scales, dense evaluation, a list file or an ensemble."""
    return (len(args.models) > 1 or len(args.weights_list) > 1
            or any(getattr(args, f) for f in beyond.EVALUATION_FLAGS if f != "root"))


def test(args):
    """Score a model: mean of each output over ``--iterations`` batches (Caffe's ``caffe test``); with
    ``--crops``/``--scales``/``--dense``/``--list`` or several models, top-1/top-5 error of the
    softmax averaged over crops and models (``beyond.run_evaluation``)."""
    log = get_logger()
    if not args.model:
        raise MinicaffeError("test: need a model definition to score (--model)")
    if not args.weights:
        raise MinicaffeError("test: need model weights to score (--weights)")
    gpus = _gpus(args.gpu)
    if gpus:
        log.info("Use GPU with device ID %d", gpus[0])
        log.info("GPU device name: %s", _device_name(gpus[0]))
    _use(gpus, log)
    if _papers_evaluation(args):
        if args.iterations is not None:
            raise MinicaffeError("test: --iterations counts batches of the plain test; with crops, dense "
                                 "evaluation or an ensemble use --limit (images)")
        evaluation = argparse.Namespace(**vars(args))
        evaluation.model, evaluation.weights = args.models, args.weights_list
        evaluation.stages = _stages(args.stage)
        result = beyond.run_evaluation(evaluation)
        log.info("top-1 error = %.2f%%, top-5 error = %.2f%% (%d images)", 100 * result["top1"],
                 100 * result["top5"], len(result["labels"]))
        return 0
    net = _net(args, caffe_pb2.TEST)
    for w in (s.strip() for s in args.weights.split(",")):
        if w:
            net.copy_from(w)
    from ..net import memory_plan
    if memory_plan.can_share(net):
        net.share_blob_memory()         # only the outputs are read: blobs take turns in memory
    iterations = 50 if args.iterations is None else args.iterations
    log.info("Running for %d iterations.", iterations)
    sums, names, loss = [], [], 0.0
    with ProgressBar(total=iterations, unit="batch", desc="test") as bar:
        for i in range(iterations):
            loss += net.forward_from_to()
            idx = 0
            for name in sorted(net.outputs):      # Caffe's output order: sorted by name
                for v in np.ravel(net.blobs[name].host_data):
                    if i == 0:
                        sums.append(0.0)
                        names.append(name)
                    sums[idx] += float(v)
                    idx += 1
                    log.info("Batch %d, %s = %s", i, name, _g(v))
            bar.update()
    loss /= max(iterations, 1)
    log.info("Loss: %s", _g(loss))
    weights = _loss_weights(net)
    for name, total in zip(names, sums):
        mean = total / iterations
        w = weights.get(name, 0.0)
        extra = f" (* {_g(w)} = {_g(w * mean)} loss)" if w else ""
        log.info("%s = %s%s", name, _g(mean), extra)
    return 0


def time(args):
    """Per-layer forward/backward timings (Caffe's ``caffe time``) plus a table on stdout."""
    log = get_logger()
    if not args.model:
        raise MinicaffeError("time: need a model definition to time (--model)")
    gpus = _gpus(args.gpu)
    if gpus:
        log.info("Use GPU with device ID %d", gpus[0])
    _use(gpus, log)
    net = _net(args, caffe_pb2.TRAIN)
    iterations = 50 if args.iterations is None else args.iterations
    if iterations < 1:
        raise MinicaffeError(f"time: --iterations must be at least 1 (got {iterations})")
    log.info("Performing Forward")
    log.info("Initial loss: %s", _g(net.forward_from_to()))
    log.info("Performing Backward")
    # the warm-up runs the backward the loop times (Caffe's warm-up is its timed loop's code):
    # a solver's pass with its shared gradient buffers and stacked groups, whose first run pays
    # for their allocation and compilation (GoogLeNet's first timed iteration took 1461 ms
    # against 1173 for the next when the warm-up ran pycaffe's backward instead)
    _backward_every_layer(net, {})
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    fwd, bwd = {}, {}
    fwd_total = bwd_total = 0.0
    bar = ProgressBar(total=iterations, unit="iter", desc="time")   # drawn outside the timed spans
    start = _time.perf_counter()
    with bar:
        for j in range(iterations):
            t0 = _time.perf_counter()
            net.forward_from_to(timings=fwd)
            t1 = _time.perf_counter()
            _backward_every_layer(net, bwd)
            t2 = _time.perf_counter()
            fwd_total += t1 - t0
            bwd_total += t2 - t1
            log.info("Iteration: %d forward-backward time: %s ms.", j + 1, _g((t2 - t0) * 1e3))
            bar.update()
    total = _time.perf_counter() - start
    log.info("Average time per layer: ")
    rows = []
    for li, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        f = fwd.get(li, 0.0) * 1e3 / iterations
        b = bwd.get(li, 0.0) * 1e3 / iterations
        log.info("%10s\tforward: %s ms.", name, _g(f))
        log.info("%10s\tbackward: %s ms.", name, _g(b))
        rows.append((name, layer.type, f, b))
    log.info("Average Forward pass: %s ms.", _g(fwd_total * 1e3 / iterations))
    log.info("Average Backward pass: %s ms.", _g(bwd_total * 1e3 / iterations))
    log.info("Average Forward-Backward: %s ms.", _g(total * 1e3 / iterations))
    log.info("Total Time: %s ms.", _g(total * 1e3))
    log.info("*** Benchmark ends ***")
    _print_table(rows, total * 1e3 / iterations)
    if args.plot:
        from ..pycaffe.vis import plot_layer_times
        plot_layer_times(rows, args.plot, title=f"{net.name or args.model}: {iterations} iterations")
    return 0


def _backward_every_layer(net, timings):
    """One backward pass over every layer, last to first, timing each (Caffe's ``time`` loop).

    Caffe's ``time`` calls each layer's Backward itself instead of ``Net::Backward``, so a deploy net
    (no loss, so no layer "needs" backward) still times every layer's parameter gradients; bottoms are
    propagated only where the net would (``bottom_need_backward``). Doing the same keeps the backward
    figures comparable with Caffe's rather than ~0 ms.

    What is timed is the backward a solver's pass runs: a chain of layers whose forward ran fused
    (BatchNorm + Scale + ReLU in a net that learns) runs its backward fused too
    (``Net.fused_backward_at``), timed on its last layer, and the activation gradients live as that
    pass keeps them (``Net.begin_shared_backward``, net/diff_plan.py: shared buffers, each split
    top's gradient added into its Split's bottom as it arrives, which the Split's own time then
    does not repeat), so a stacked group of 1x1 convolutions (kernels/stacked_1x1.py) runs its
    backward stacked, timed on its first layer.
    """
    xp = backend.xp()
    bottoms, tops, weights = net.bottom_vecs, net.top_vecs, net.layer_loss_weights
    need_backward = net.bottom_need_backward
    plan = net.begin_shared_backward()
    li = len(net.layers) - 1
    while li >= 0:
        layer, bottom, top = net.layers[li], bottoms[li], tops[li]
        for w, blob in zip(weights[li], top):
            if w:
                blob.xdiff = xp.full(blob.shape, w, dtype=blob.dtype)
        t0 = _time.perf_counter()
        first = net.fused_backward_at(li)
        if first is None:
            if plan is not None and li in plan.splits:
                plan.split_backward(li)
            else:
                layer.backward(top, need_backward[li], bottom)
            first = li
        if plan is not None:
            for k in range(li, first - 1, -1):
                if k in plan.after:
                    plan.after_layer(k)
        backend.synchronize()
        timings[li] = timings.get(li, 0.0) + _time.perf_counter() - t0
        li = first - 1


def _print_table(rows, per_iter_ms):
    """Layers in net order with their mean forward/backward ms and share of the iteration."""
    wn = max([len("layer")] + [len(r[0]) for r in rows])
    wt = max([len("type")] + [len(r[1]) for r in rows])
    out = sys.stdout
    out.write(f"{'layer':<{wn}}  {'type':<{wt}}  {'forward ms':>11}  {'backward ms':>11}  {'share':>6}\n")
    for name, kind, f, b in rows:
        share = 100.0 * (f + b) / per_iter_ms if per_iter_ms > 0 else 0.0
        out.write(f"{name:<{wn}}  {kind:<{wt}}  {f:11.3f}  {b:11.3f}  {share:5.1f}%\n")
    fsum, bsum = sum(r[2] for r in rows), sum(r[3] for r in rows)
    out.write(f"{'total':<{wn}}  {'':<{wt}}  {fsum:11.3f}  {bsum:11.3f}\n")
    out.flush()


_PROPS = (
    ("Major revision number:         ", "major"),
    ("Minor revision number:         ", "minor"),
    ("Name:                          ", "name"),
    ("Total global memory:           ", "totalGlobalMem"),
    ("Total shared memory per block: ", "sharedMemPerBlock"),
    ("Total registers per block:     ", "regsPerBlock"),
    ("Warp size:                     ", "warpSize"),
    ("Maximum memory pitch:          ", "memPitch"),
    ("Maximum threads per block:     ", "maxThreadsPerBlock"),
    ("Maximum dimension of block:    ", "maxThreadsDim"),
    ("Maximum dimension of grid:     ", "maxGridSize"),
    ("Clock rate:                    ", "clockRate"),
    ("Total constant memory:         ", "totalConstMem"),
    ("Texture alignment:             ", "textureAlignment"),
    ("Concurrent copy and execution: ", "deviceOverlap"),
    ("Number of multiprocessors:     ", "multiProcessorCount"),
    ("Kernel execution timeout:      ", "kernelExecTimeoutEnabled"),
)


def device_query(args):
    """CUDA device properties, as Caffe's ``caffe device_query`` (every device when --gpu is left out)."""
    log = get_logger()
    if not backend.gpu_available():
        raise MinicaffeError("device_query: no CUDA device is visible (CuPy is not installed or there is no GPU)")
    gpus = _gpus(args.gpu or "all")
    log.info("Querying GPUs %s", args.gpu or "all")
    runtime = backend.import_cupy().cuda.runtime
    for i in gpus:
        props = runtime.getDeviceProperties(i)
        log.info("Device id:                     %d", i)
        for label, key in _PROPS:
            value = props.get(key, "?")
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            if key in ("deviceOverlap", "kernelExecTimeoutEnabled"):
                value = "Yes" if value else "No"
            elif isinstance(value, (tuple, list)):
                value = ", ".join(str(v) for v in value)
            log.info("%s%s", label, value)
    return 0


_COMMAND_FUNCS = {"train": train, "test": test, "device_query": device_query, "time": time}


def _command_first(argv):
    """Caffe reads the command after gflags took the flags out, so ``caffe --gpu 0 train`` works:
    move the first known command name to the front."""
    if argv and argv[0].startswith("-"):
        for i, a in enumerate(argv):
            if a in COMMANDS:
                return [a] + argv[:i] + argv[i + 1:]
    return argv


@run_main
def main(argv=None):
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--debug", "-debug")]
    if not argv:
        _parser().print_help(sys.stderr)
        return 1
    if argv[0] in ("-h", "--help", "-help", "help"):
        _parser().print_help()          # stdout, so 'minicaffe --help | less' pages it
        return 0
    if any(a in NO_PYTHON_LAYERS for a in argv):
        # every command takes it (the evaluation commands have parsers of their own): refuse Python
        # layers for this command only, so a program calling main() gets its setting back
        previous = refuse_python_layers(True)
        try:
            return main.__wrapped__([a for a in argv if a not in NO_PYTHON_LAYERS])
        finally:
            refuse_python_layers(previous)
    if argv[0] in subcommands.TOOLS:         # minicaffe convert_imageset ...: the console script's main
        return subcommands.run(argv[0], argv[1:])
    argv = _command_first(argv)
    if argv[0] in BEYOND_COMMANDS:
        parser = ArgumentParser(prog="minicaffe")
        beyond.add_subcommands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.run(args)
    if argv[0] == "visualize":          # tools/visualize.py, own flags
        from . import visualize
        return visualize.main.__wrapped__(argv[1:])
    command = argv[0]
    if command not in _COMMAND_FUNCS:
        if command.startswith("-"):
            raise MinicaffeError(f"no command given; commands: {', '.join(COMMANDS)} (see 'minicaffe --help')")
        known = COMMANDS + tuple(subcommands.TOOLS)
        raise MinicaffeError(f"unknown command '{command}'{did_you_mean(command, known)}; commands: "
                             f"{', '.join(COMMANDS)} (and the tools: see 'minicaffe --help')")
    args = _parser(command).parse_args(_gflags_style(argv[1:]))
    args.command = command
    # gflags keep the last of a repeated flag; test's ensembles use them all
    args.models, args.weights_list = args.model, args.weights
    args.model = args.model[-1] if args.model else ""
    with log_to_file(args.log_file):
        # a documented path (models/lenet/...) not in the working directory: the shipped copy (logged)
        get_logger()
        args.solver_given, args.solver = args.solver, shipped.resolve(args.solver, "--solver")
        args.models = [shipped.resolve(m, "--model") for m in args.models]
        args.model = shipped.resolve(args.model, "--model") if args.model else ""
        args.weights_list = [shipped.resolve_list(w, "--weights") for w in args.weights_list]
        args.weights = args.weights_list[-1] if args.weights_list else ""
        return _COMMAND_FUNCS[command](args)


if __name__ == "__main__":
    sys.exit(main())
