"""minicaffe: Caffe's formats, layers, solvers and tools in Python; ``import minicaffe as caffe``
runs ordinary pycaffe scripts."""
from . import _aliases
from .core import context as _context  # noqa: F401  (first of all: it sets OpenBLAS's spin before NumPy loads)
from . import layers as _layers  # noqa: F401  (registers every layer type)
from .core import backend  # noqa: F401
from .core.backend import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .core.blob import Blob
from .errors import MinicaffeError
from .core.layer import Layer, layer_type_list
from .net.network import Net
from .pycaffe.net_spec import NetSpec, layers, params, to_proto  # noqa: F401  (pycaffe's caffe.layers is NetSpec's)
from .proto import caffe_pb2
from .proto.caffe_pb2 import TEST, TRAIN

__version__ = "0.1.0"

_aliases.install()   # pycaffe's module names: minicaffe.io is minicaffe.pycaffe.io, etc.

# What `from minicaffe import *` gives: pycaffe's `caffe` namespace (its __init__ imports these
# names), the lazily loaded ones included (star-import asks __getattr__ for each), plus minicaffe's own.
__all__ = [
    # pycaffe's
    "Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
    "NCCL", "Timer", "init_log", "log", "set_mode_cpu", "set_mode_gpu", "set_device", "Layer", "get_solver",
    "layer_type_list", "set_random_seed", "solver_count", "set_solver_count", "solver_rank",
    "set_solver_rank", "set_multiprocess", "has_nccl", "__version__", "TRAIN", "TEST", "Classifier",
    "Detector", "io", "layers", "params", "NetSpec", "to_proto",
    # modules pycaffe scripts reach as caffe.<name>, and minicaffe's additions
    "net_spec", "draw", "classifier", "detector", "coord_map", "pycaffe", "vis", "caffe_pb2", "Solver", "Blob",
    "MinicaffeError", "ParallelSolver",
]


def __getattr__(name):
    # the heavier modules load on first use, so `import minicaffe` stays quick
    import importlib
    lazy = {
        "io": ".pycaffe.io", "net_spec": ".pycaffe.net_spec", "draw": ".pycaffe.draw",
        "classifier": ".pycaffe.classifier", "coord_map": ".pycaffe.coord_map", "solvers": ".solvers",
        "surgery": ".methods.surgery", "multicrop": ".methods.multicrop", "parallel": ".parallel",
        "detector": ".pycaffe.detector", "pycaffe": ".pycaffe", "vis": ".pycaffe.vis",
    }
    if name in lazy:
        return importlib.import_module(lazy[name], __name__)
    if name in ("Timer", "NCCL", "has_nccl", "init_log", "log"):     # the rest of pycaffe's _caffe
        from . import pycaffe
        return getattr(pycaffe, name)
    if name == "Detector":
        from .pycaffe.detector import Detector
        return Detector
    if name in ("convert_fc_to_conv", "dense_scores", "init_from"):   # the papers' net surgery
        from .methods import surgery
        return getattr(surgery, name)
    if name == "Classifier":
        from .pycaffe.classifier import Classifier
        return Classifier
    if name in ("Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                "AdaDeltaSolver", "AdamSolver", "get_solver"):
        from . import solvers
        return getattr(solvers, name)
    if name in ("ParallelSolver", "set_solver_count", "set_solver_rank", "set_multiprocess", "multiprocess",
                "solver_count", "solver_rank", "setup_worker"):
        # pycaffe's multi-GPU set-up (set_solver_count/rank, set_multiprocess) and the data-parallel solver
        from . import parallel
        return getattr(parallel, name)
    raise AttributeError(f"module 'minicaffe' has no attribute {name!r}")
