"""pycaffe's surface: the modules BVLC scripts reach as ``caffe.io``, ``caffe.classifier``,
``caffe.detector``, ``caffe.net_spec``, ``caffe.draw``, ``caffe.coord_map`` (minicaffe adds ``vis``), and
``_caffe``'s small pieces (Timer, NCCL, init_log, log). ``minicaffe.io`` and the other old names are
aliases of these modules (minicaffe/_aliases.py)."""
from ._caffe import NCCL, Timer, has_nccl, init_log, log  # noqa: F401
from ._caffe import __all__  # noqa: F401


def __getattr__(name):
    # Net and the solver classes load on first use, as _caffe's do
    from . import _caffe
    return getattr(_caffe, name)
