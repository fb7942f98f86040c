"""Building a Net's graph from its NetParameter, in the named steps of Caffe's ``Net::Init``.

Caffe builds a net in one long ``Init`` that calls ``AppendBottom``, ``AppendTop`` and
``AppendParam`` for every layer; the steps here are the same, each a method with one job, so that
a reader can find where a rule lives (in-place checks, split insertion, parameter sharing, which
layers need backward) and a rule can change without touching the others:

1. ``prepare``: filter the layers by NetState and insert Split layers (``insert_splits``);
2. for each layer (``NetBuilder.append_layer``): create it, wire its bottoms and tops (in-place
   checks, automatic tops), set it up, give its tops their loss weights and its learnable blobs
   their lr_mult/decay_mult, sharing by ``param { name }``;
3. ``NetBuilder.prune_backward``: skip backward where no loss is reached or ``propagate_down``
   cuts it, then honour ``force_backward``.

The steps log the lines Caffe's ``Net::Init`` logs, in the same order and wording ("Creating
Layer", "Setting up", "Top shape", "needs backward computation"...), so minicaffe's logs can be
compared with Caffe's line by line. The builder knows no particular layer type: what it needs from
a layer it reads from the layer's class attributes (``is_net_input``, ``is_loss``, ``is_split``,
``auto_top_blobs``, ``fixed_params``, ``allows_in_place``; see ``core/layer.py``).
"""
from __future__ import annotations

import collections
import logging

import numpy as np

from ..core import backend
from ..core.blob import Blob, SharedBlob
from ..core.layer import split_layer_type
from ..errors import AllocationError, NetError, ShapeError
from ..formats.prototxt import caffe_text, filter_net
from ..layers import create_layer
from ..proto import caffe_pb2

log = logging.getLogger("minicaffe")


# --- step 1: the definition the net is built from --------------------------------------------

def prepare(param, state):
    """The layers this net runs: ``param`` filtered by ``state`` (include/exclude rules) with Split
    layers inserted. Logs Caffe's "Initializing net from parameters" dump of the filtered net, which
    is what a user compares when a layer is missing from one phase."""
    filtered = filter_net(param, state, log_rules=True)
    filtered.state.CopyFrom(state)
    if log.isEnabledFor(logging.INFO):
        log.info("Initializing net from parameters: \n%s", _debug_string(filtered))
    return insert_splits(filtered)


def _debug_string(message):
    """The text form of a message as Caffe's DebugString prints it (C++'s float style, UTF-8 as is)."""
    return caffe_text(message, utf8=True).rstrip("\n")


# --- automatic splits (Caffe's InsertSplits, with its naming) -----------------------------------

def split_layer_name(blob, layer, top_index):
    """Caffe's name for the Split layer after top ``top_index`` of ``layer``: weights files and logs
    written by Caffe name the same layers."""
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob, layer, top_index, split_index):
    """Caffe's name for output ``split_index`` of that Split layer."""
    return f"{split_layer_name(blob, layer, top_index)}_{split_index}"


def insert_splits(param):
    """Return a copy of ``param`` with a Split layer after every top that feeds several bottoms.

    Each consumer then gets its own blob, so backward can write each consumer's gradient and the
    Split sums them (a shared blob would have its diff overwritten). A top that is also a weighted
    loss output counts as one more consumer, as in Caffe.
    """
    producer = {}          # blob name -> (layer index, top index) of its newest version
    consumers = collections.Counter()
    bottom_source = {}     # (layer index, bottom index) -> (producer layer, top index)
    loss_weight = {}
    for i, layer in enumerate(param.layer):
        for j, name in enumerate(layer.bottom):
            if name not in producer:
                raise NetError(missing_bottom(param, i, name), layer.name, layer.type)
            src = producer[name]
            bottom_source[(i, j)] = src
            consumers[src] += 1
        for j, name in enumerate(layer.top):
            producer[name] = (i, j)
            if j < len(layer.loss_weight) and layer.loss_weight[j]:
                loss_weight[(i, j)] = layer.loss_weight[j]
    for key in loss_weight:
        consumers[key] += 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    split_used = collections.Counter()
    for i, layer in enumerate(param.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            src = bottom_source[(i, j)]
            if consumers[src] > 1:
                src_layer = param.layer[src[0]].name
                new.bottom[j] = split_blob_name(name, src_layer, src[1], split_used[src])
                split_used[src] += 1
        for j, name in enumerate(layer.top):
            if consumers[(i, j)] > 1:
                split = out.layer.add()
                split.name = split_layer_name(name, layer.name, j)
                split.type = split_layer_type()
                split.bottom.append(name)
                for k in range(consumers[(i, j)]):
                    split.top.append(split_blob_name(name, layer.name, j, k))
                if (i, j) in loss_weight:
                    # the loss weight moves to the split's first output, which nothing else reads
                    split.loss_weight.append(loss_weight[(i, j)])
                    for k in range(1, consumers[(i, j)]):
                        split.loss_weight.append(0)
                    new.loss_weight[j] = 0
                    split_used[(i, j)] = 1
    return out


def is_inserted_split(lp, layer):
    """Whether ``layer`` (built from ``lp``) is a Split the net inserted, which a saved .caffemodel
    leaves out as Caffe's does (the net re-inserts it when the definition is read again)."""
    return layer.is_split and lp.name.endswith("_split")


def missing_bottom(param, index, name):
    """Why bottom ``name`` of layer ``index`` has no producer: none at all, or only a later layer
    (a cycle or a layer out of order: Caffe runs layers in file order, so nets cannot loop)."""
    for later in param.layer[index + 1:]:
        if name in later.top:
            return (f"bottom '{name}' is produced only by the later layer '{later.name}': layers run in "
                    f"file order, so this is a cycle or a layer out of order")
    return f"bottom '{name}' is not produced by any earlier layer"


def raise_naming_layer(exc, layer):
    """Raise ``exc`` (being handled) from ``layer`` on: a MemoryError (NumPy's or CuPy's, which say
    how many bytes were asked for) or an error from a blob, which knows no layer, becomes one
    naming the layer (without the original as context); anything else is raised unchanged. One
    place for what every pass (set-up, reshape, forward, backward) does with a layer's error."""
    if isinstance(exc, MemoryError):
        raise AllocationError(f"out of memory: {exc}", layer.name, layer.type) from None
    if isinstance(exc, NetError) and exc.layer is None:
        raise type(exc)(str(exc), layer.name, layer.type) from None
    raise exc


# --- step 2: the layers, one at a time ------------------------------------------------------------

class NetBuilder:
    """The graph of one net as it is built: the layers and, per layer, its bottom and top blobs, loss
    weights and backward flags; the learnable parameters with their lr_mult and decay_mult.

    What only matters while building (which blobs are still unconsumed, which need backward, who owns
    a shared parameter, the memory count for the log) stays here; ``install`` hands the rest to the
    Net, which runs it."""

    def __init__(self, param, phase, force_backward=False):
        self.param = param                  # the NetParameter as built (Split layers included)
        self.phase = phase
        self.force_backward = force_backward
        self.layers = []
        self.layer_names = []
        self.blobs = collections.OrderedDict()
        self.top_names = collections.OrderedDict()
        self.bottom_names = collections.OrderedDict()
        self.bottom_vecs = []
        self.top_vecs = []
        self.loss_weights = []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self.inputs = []
        self.learnable = []                 # unique learnable Blobs, in order
        self.lr_mult = []
        self.decay_mult = []
        self.learnable_names = []           # (layer name, blob index) of each learnable Blob
        self.outputs = []
        # build-time only
        self._blob_need_backward = {}
        self._param_owner = {}   # param name -> (layer index, blob index, learnable index, has lr, has decay)
        self._available = []     # blobs produced and not yet consumed: the net's outputs at the end
        self._memory_used = 0    # elements of every top, as Caffe's memory_used_ (in-place tops again)

    def build(self):
        """Every step, in Caffe's order; returns self.

        Layer names need not be unique, as in Caffe (mnist_autoencoder has two layers named "loss"):
        name-keyed views (layer_dict, params, top_names) then hold the last such layer, while
        forward(start=name), copy_from and share_with use the first, as pycaffe and Caffe do."""
        for li, lp in enumerate(self.param.layer):
            self.append_layer(li, lp)
        self.outputs = sorted(self._available)   # Caffe keeps them in a std::set: sorted by name
        self.prune_backward()
        for name in self.outputs:
            log.info("This network produces output %s", name)
        return self

    def append_layer(self, li, lp):
        """Create layer ``li``, wire it, set it up and register its tops and parameters."""
        self.check_propagate_down(lp)
        layer = self.create(lp)
        bottoms, bottom_need_backward, need_backward = self.append_bottoms(li, lp)
        tops = self.append_tops(lp, layer)
        self.setup(layer, bottoms, tops)
        if layer.is_net_input:
            self.inputs.extend(lp.top)
        weights = self.loss_weights_of(lp, layer, tops)
        self.log_setup(lp.name, tops, weights)
        need_backward |= self.append_params(li, lp, layer)
        for name in lp.top:
            self._blob_need_backward[name] = need_backward
            if name not in self._available:
                self._available.append(name)
        self.layers.append(layer)
        self.layer_names.append(lp.name)
        self.bottom_vecs.append(bottoms)
        self.top_vecs.append(tops)
        self.loss_weights.append(weights)
        self.bottom_need_backward.append(bottom_need_backward)
        self.layer_need_backward.append(need_backward)
        self.top_names[lp.name] = list(lp.top)
        self.bottom_names[lp.name] = list(lp.bottom)

    @staticmethod
    def check_propagate_down(lp):
        """``propagate_down`` gives one flag per bottom or none: a wrong count is a typo in the
        definition, refused before the layer is created."""
        if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
            raise NetError(f"propagate_down has {len(lp.propagate_down)} entries for "
                           f"{len(lp.bottom)} bottoms", lp.name, lp.type)

    def create(self, lp):
        """The layer object for ``lp``, constructed (Caffe's layer constructor: a Data layer opens its
        database here, so its log line comes before "Creating Layer", as in Caffe)."""
        log.info("Creating layer %s", lp.name)
        layer = create_layer(lp, self.phase)
        layer.construct()
        log.info("Creating Layer %s", lp.name)
        return layer

    def append_bottoms(self, li, lp):
        """Caffe's AppendBottom for every bottom of ``lp``: the blobs, whether backward goes into each
        (from what produced it, or ``propagate_down``), and whether the layer needs backward because
        a bottom does. A consumed blob is no longer a candidate net output."""
        bottoms, need_bw_bottom = [], []
        need_backward = False
        for j, name in enumerate(lp.bottom):
            if name not in self.blobs:
                raise NetError(missing_bottom(self.param, li, name), lp.name, lp.type)
            bottoms.append(self.blobs[name])
            log.info("%s <- %s", lp.name, name)
            if name in self._available:
                self._available.remove(name)
            nb = self._blob_need_backward.get(name, False)
            if len(lp.propagate_down):
                nb = bool(lp.propagate_down[j])
            need_bw_bottom.append(nb)
            need_backward |= self._blob_need_backward.get(name, False)
        return bottoms, need_bw_bottom, need_backward

    def append_tops(self, lp, layer):
        """Caffe's AppendTop for every top of ``lp``: a new blob, or the bottom blob itself for an
        in-place top (refused for layers that cannot compute in place, and for a name another layer
        already produced); then AutoTopBlobs."""
        tops = []
        for j, name in enumerate(lp.top):
            if j < len(lp.bottom) and lp.bottom[j] == name:
                if not layer.allows_in_place:
                    raise NetError(f"cannot compute in place (top '{name}' is also its bottom): only "
                                   f"element-wise layers such as ReLU, Dropout, BatchNorm or Scale "
                                   f"can; give the top a name of its own", lp.name, lp.type)
                tops.append(self.blobs[name])          # in place
                log.info("%s -> %s (in-place)", lp.name, name)
                continue
            if name in self.blobs:
                raise NetError(f"top '{name}' is produced by more than one layer", lp.name, lp.type)
            blob = Blob(name=name)
            self.blobs[name] = blob
            tops.append(blob)
            log.info("%s -> %s", lp.name, name)
        self.append_auto_tops(lp, layer, tops)
        return tops

    @staticmethod
    def append_auto_tops(lp, layer, tops):
        """Caffe's AutoTopBlobs: a loss layer named without a top still gets one (unnamed, so not a net
        output) and its loss counts."""
        if not layer.auto_top_blobs:
            return
        needed = max(layer.min_num_top or 0, layer.exact_num_top or 0)
        for _ in range(needed - len(tops)):
            tops.append(Blob(name=f"{lp.name} (automatic)"))
            log.info("%s -> (automatic)", lp.name)

    @staticmethod
    def setup(layer, bottoms, tops):
        """The layer's SetUp and first Reshape. Bad values in the definition are the layer's to refuse
        (a NetError naming it, raised where it reads its parameters); a NetError from a blob gets the
        layer's name, a MemoryError becomes an AllocationError naming it; any other exception is a bug
        and propagates with its traceback."""
        layer.check_blob_counts(bottoms, tops)
        try:
            layer.setup(bottoms, tops)
            layer.reshape(bottoms, tops)
        except (NetError, MemoryError) as exc:
            raise_naming_layer(exc, layer)

    @staticmethod
    def loss_weights_of(lp, layer, tops):
        """One loss weight per top: as given in ``loss_weight``, else 1 on the first top of a loss
        layer and 0 elsewhere (Caffe's SetLossWeights)."""
        if len(lp.loss_weight):
            if len(lp.loss_weight) != len(tops):
                raise NetError(f"{len(lp.loss_weight)} loss_weight values for {len(tops)} tops",
                               lp.name, lp.type)
            return list(lp.loss_weight)
        return [1.0 if (layer.is_loss and j == 0) else 0.0 for j in range(len(tops))]

    def log_setup(self, name, tops, weights):
        """Caffe's lines after a layer's SetUp, with the running memory count of all tops."""
        log.info("Setting up %s", name)
        for blob, weight in zip(tops, weights):
            log.info("Top shape: %s(%d)", "".join(f"{d} " for d in blob.shape), blob.count)
            if weight:
                log.info("    with loss weight %g", weight)
            self._memory_used += blob.count
        log.info("Memory required for data: %d", self._memory_used * np.dtype(backend.dtype()).itemsize)

    def append_params(self, li, lp, layer):
        """Caffe's AppendParam for every learnable blob of the layer: its lr_mult and decay_mult (from
        ``param {}``, default 1; 0 for a layer with ``fixed_params``), a first owner of a named
        parameter registered, a later user sharing it. Sets which blobs get gradients; returns
        whether any does (then the layer needs backward)."""
        fixed = layer.fixed_params
        layer.param_propagate_down = []
        need_backward = False
        for k in range(len(layer.blobs)):
            spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
            has_lr = fixed or spec.HasField("lr_mult")
            lr = 0.0 if fixed else (spec.lr_mult if has_lr else 1.0)
            has_decay = spec.HasField("decay_mult")
            decay = spec.decay_mult if has_decay else 1.0
            layer.blobs[k].name = f"{lp.name}[{k}]"
            pname = spec.name
            if pname and pname in self._param_owner:
                self.share_param(lp, layer, k, spec, has_lr, lr, has_decay, decay)
            else:
                if pname:
                    self._param_owner[pname] = (li, k, len(self.learnable), has_lr, has_decay)
                self.learnable.append(layer.blobs[k])
                self.lr_mult.append(lr)
                self.decay_mult.append(decay)
                self.learnable_names.append((lp.name, k))
            layer.param_propagate_down.append(lr != 0)
            need_backward |= lr != 0
        return need_backward

    def share_param(self, lp, layer, k, spec, has_lr, lr, has_decay, decay):
        """Make blob ``k`` of ``layer`` the parameter ``spec.name`` first owned elsewhere, as Caffe's
        AppendParam: STRICT sharing needs equal shapes, PERMISSIVE equal counts; either way the blob
        then IS the owner's storage (data and diff; a reshaped view for PERMISSIVE), so gradients
        of every user accumulate in one diff and one update changes every user. lr_mult and
        decay_mult given by two users must agree (Caffe refuses "mismatched lr_mult"); given by a
        later user only, they become the parameter's. As in Caffe, whether this layer computes the
        gradient still follows its own lr_mult."""
        pname = spec.name
        oi, ok, idx, owner_has_lr, owner_has_decay = self._param_owner[pname]
        log.info("Sharing parameters '%s' owned by layer '%s', param index %d", pname, self.layer_names[oi], ok)
        owner_layer = self.layer_names[oi]
        owner = self.layers[oi].blobs[ok]
        mine = layer.blobs[k]
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        if owner.count != mine.count or (not permissive and owner.shape != mine.shape):
            what = "count" if permissive else "shape"
            raise ShapeError(f"cannot share param '{pname}' owned by layer '{owner_layer}': {what} "
                             f"mismatch, {owner.shape} there, {mine.shape} here", lp.name, lp.type)
        for field, has, value, owner_has, values in (("lr_mult", has_lr, lr, owner_has_lr, self.lr_mult),
                                                     ("decay_mult", has_decay, decay, owner_has_decay,
                                                      self.decay_mult)):
            if not has:
                continue
            if owner_has and values[idx] != value:
                raise NetError(f"shared param '{pname}' has mismatched {field}: {value:g} here, "
                               f"{values[idx]:g} in layer '{owner_layer}'", lp.name, lp.type)
            values[idx] = value
        self._param_owner[pname] = (oi, ok, idx, owner_has_lr or has_lr, owner_has_decay or has_decay)
        layer.blobs[k] = owner if mine.shape == owner.shape else \
            SharedBlob(owner, mine.shape, name=f"{lp.name}[{k}]")

    # --- step 3: which layers run backward ---------------------------------------------------------

    def prune_backward(self):
        """Skip backward for layers that feed no loss or whose every top is cut off by
        ``propagate_down: false``; honour force_backward (Caffe's Net::Init, backward pass). Backward
        work a loss never sees is wasted, and a layer without a gradient must not be asked for one."""
        under_loss, skip_backprop = set(), set()
        for li in reversed(range(len(self.layers))):
            lp = self.param.layer[li]
            tops = [blob.name for blob in self.top_vecs[li]]     # lp.top plus any automatic top
            contributes = any(w or name in under_loss for w, name in zip(self.loss_weights[li], tops))
            skip = all(name in skip_backprop for name in tops)
            if skip:
                self.bottom_need_backward[li] = [False] * len(lp.bottom)
            if skip or not contributes:
                self.layer_need_backward[li] = False
            log.info("%s %s backward computation.", self.layer_names[li],
                     "needs" if self.layer_need_backward[li] else "does not need")
            for j, name in enumerate(lp.bottom):
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[li][j] = False
                if not self.bottom_need_backward[li][j]:
                    skip_backprop.add(name)
        if self.force_backward:
            for li, layer in enumerate(self.layers):
                self.layer_need_backward[li] = True
                self.bottom_need_backward[li] = [
                    nb or layer.allow_force_backward(j) for j, nb in enumerate(self.bottom_need_backward[li])]

    # --- hand-over -----------------------------------------------------------------------------------

    def install(self, net):
        """Give the built graph to ``net`` under the names Net (and pycaffe's underscore views) read."""
        net.param = self.param
        net.force_backward = self.force_backward
        net.layers = self.layers
        net._layer_names = self.layer_names
        net.blobs = self.blobs
        net.top_names = self.top_names
        net.bottom_names = self.bottom_names
        net._bottom = self.bottom_vecs
        net._top = self.top_vecs
        net._loss_weights = self.loss_weights
        net._bottom_need_backward = self.bottom_need_backward
        net._layer_need_backward = self.layer_need_backward
        net.inputs = self.inputs
        net.outputs = self.outputs
        net._learnable = self.learnable
        net._lr_mult = self.lr_mult
        net._decay_mult = self.decay_mult
        net._learnable_names = self.learnable_names
        net.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layers))
