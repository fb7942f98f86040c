"""minicaffe: Caffe's formats, layers, solvers and tools in Python; ``import minicaffe as caffe``
runs ordinary pycaffe scripts."""
from . import backend, layers as _layers  # noqa: F401  (registers every layer type)
from .backend import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .blob import Blob
from .errors import MinicaffeError
from .layers.base import Layer, layer_type_list
from .net import Net
from .net_spec import NetSpec, layers, params, to_proto  # noqa: F401  (pycaffe's caffe.layers is NetSpec's)
from .proto import caffe_pb2
from .proto.caffe_pb2 import TEST, TRAIN

__version__ = "0.1.0"


def __getattr__(name):
    # the heavier modules load on first use, so `import minicaffe` stays quick
    import importlib
    lazy = {
        "io": ".io", "net_spec": ".net_spec", "draw": ".draw", "classifier": ".classifier",
        "coord_map": ".coord_map", "solvers": ".solvers", "surgery": ".surgery", "multicrop": ".multicrop",
        "parallel": ".parallel", "vis": ".vis",
    }
    if name in lazy:
        return importlib.import_module(lazy[name], __name__)
    if name in ("convert_fc_to_conv", "dense_scores", "init_from"):   # the papers' net surgery
        from . import surgery
        return getattr(surgery, name)
    if name == "Classifier":
        from .classifier import Classifier
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
