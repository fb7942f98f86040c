"""Layer base class and the registry that maps Caffe type names to layer classes.

The net knows no particular layer: it builds each one from its ``LayerParameter`` through
``create_layer`` and calls ``setup -> reshape -> forward -> backward``.
"""
import difflib

from . import backend
from ..errors import NetError

_REGISTRY = {}
_SPLIT = []            # the type name of the class registered with ``is_split`` (at most one)


def register(*type_names):
    """Class decorator: register a layer under one or more Caffe type names."""
    def deco(cls):
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise RuntimeError(f"layer type {name} registered twice")
            _REGISTRY[name] = cls
        if cls.type is None:
            cls.type = type_names[0]
        if cls.__dict__.get("is_split"):
            if _SPLIT and _SPLIT[0] != cls.type:
                raise RuntimeError(f"two split layers registered: {_SPLIT[0]} and {cls.type}")
            _SPLIT[:] = [cls.type]
        return cls
    return deco


def layer_class(type_name):
    """The class registered for a Caffe type name, or None."""
    return _REGISTRY.get(type_name)


def layer_type_list():
    return sorted(_REGISTRY)


def split_layer_type():
    """The type name of the layer the net inserts where one top feeds several bottoms (the class
    registered with ``is_split = True``): the net writes it into the definition it builds, as
    Caffe's InsertSplits does, without naming a layer type itself."""
    if not _SPLIT:
        raise RuntimeError("no split layer registered (a layer class with is_split = True)")
    return _SPLIT[0]


def create_layer(param, phase):
    """Instantiate the registered class for ``param.type``; unknown types name near matches."""
    cls = _REGISTRY.get(param.type)
    if cls is None:
        near = difflib.get_close_matches(param.type, _REGISTRY, n=3, cutoff=0.5)
        near += [t for t in _REGISTRY if t.lower() == param.type.lower() and t not in near]
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise NetError(f"unknown layer type '{param.type}'{hint}", layer=param.name)
    return cls(param, phase)


class Layer:
    """Caffe's four steps: ``setup`` once, ``reshape`` before every forward, ``forward``, ``backward``.

    Subclasses read their ``*_param`` from ``self.param`` (a ``caffe_pb2.LayerParameter``), keep their
    learnable blobs in ``self.blobs`` (created in ``setup`` unless weights were loaded), write tops with
    ``top[i].xdata = ...`` and bottom gradients with ``bottom[i].xdiff = ...`` (overwrite), and
    ACCUMULATE parameter gradients (``self.blobs[k].xdiff += ...``) so ``iter_size`` and shared
    parameters work. Arrays come from ``self.xp`` (NumPy or CuPy).
    """

    type = None
    # bottom/top counts: None means "any"
    exact_num_bottom = None
    min_num_bottom = None
    max_num_bottom = None
    exact_num_top = None
    min_num_top = None
    max_num_top = None
    # What the net needs to know about a layer, declared by the layer's class so that the net
    # tests no type name (net/build.py):
    is_loss = False          # loss layers get loss_weight 1 on top[0] by default
    is_net_input = False     # its tops are the net's inputs (pycaffe's ``net.inputs``): Input
    is_split = False         # the layer the net inserts where a top feeds several bottoms: Split
    # reads training/test examples itself (a database, files, memory, generated values): Data, ImageData,
    # MemoryData, HDF5Data, WindowData, DummyData. Tools tell a train_val net from a deploy net by it.
    is_data_source = False
    # Caffe's AutoTopBlobs: the net adds the tops the layer needs when the definition names none
    # (a loss layer without a top still has its loss counted)
    auto_top_blobs = False
    # the learnable blobs are not the solver's (lr_mult forced to 0): BatchNorm's statistics,
    # which forward updates
    fixed_params = False
    # May top[i] be bottom[i] (``top: "x"`` with ``bottom: "x"``)? Only for layers whose forward and
    # backward are correct when they are: element-wise layers that keep what backward needs. Others
    # (InnerProduct, Convolution, Pooling, ...) would compute wrong gradients or change the shape of
    # their input, so the net refuses them in place.
    allows_in_place = False
    allow_force_backward_all = True
    # Forward always makes every top a view of bottom[0]'s whole array (same values, same count:
    # Split, Flatten, Reshape). Blob memory sharing (net/memory_plan.py) then keeps such tops in
    # their bottom's buffer instead of copying them out of it.
    tops_view_bottom = False
    # Set on every layer of a net that shares blob memory (net/memory_plan.py), which runs no
    # backward: a layer may then skip keeping what only its backward reads (LRN's scale).
    forward_only = False
    # Set by the net before each forward of a layer whose ``link_producer`` accepted the layer just
    # before it: True when that layer's forward ran just before this one, in the same pass, with no
    # pycaffe hook in between (so the producer's state still describes this layer's input).
    producer_ran = False

    def __init__(self, param, phase):
        self.param = param
        self.phase = phase
        self.name = param.name
        self.blobs = []
        # one flag per learnable blob: compute its gradient? (set by the net from lr_mult)
        self.param_propagate_down = []

    @property
    def xp(self):
        return backend.xp()

    # --- the four steps (and what Caffe's constructors do) ------------------------------------
    def construct(self):
        """What Caffe does in the layer's constructor, before Net logs "Creating Layer" and links its
        blobs (the Data layer opens its database there, so its "Opened lmdb" line comes first).
        Called once by the net right after creating the layer; setup works without it too."""

    def setup(self, bottom, top):
        """Read parameters and create learnable blobs; called once."""

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        """Default: a layer with no gradient. Layers that have one override this."""

    def link_producer(self, producer, producer_top, bottom, top):
        """Offered once by the net after it is built, with the layer that runs just before this one
        and the blobs of both. A layer that can use what that layer kept for its own backward,
        instead of keeping a copy of its input (Scale after BatchNorm: layers/normalization.py),
        returns True; the net then sets ``producer_ran`` before each of its forwards."""
        return False

    # --- helpers ---------------------------------------------------------------------------
    def allow_force_backward(self, bottom_index):
        return self.allow_force_backward_all

    def check_blob_counts(self, bottom, top):
        def check(what, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise NetError(f"takes exactly {exact} {what} blob(s), got {n}", self.name, self.type)
            if lo is not None and n < lo:
                raise NetError(f"takes at least {lo} {what} blob(s), got {n}", self.name, self.type)
            if hi is not None and n > hi:
                raise NetError(f"takes at most {hi} {what} blob(s), got {n}", self.name, self.type)
        check("bottom", len(bottom), self.exact_num_bottom, self.min_num_bottom, self.max_num_bottom)
        check("top", len(top), self.exact_num_top, self.min_num_top, self.max_num_top)

    def error(self, message, cls=NetError):
        """An error naming this layer, for use as ``raise self.error(...)``."""
        return cls(message, self.name, self.type)

    def need_param_grad(self, k):
        return k < len(self.param_propagate_down) and self.param_propagate_down[k]
