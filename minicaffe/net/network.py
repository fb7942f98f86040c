"""Net: builds layers from a NetParameter, wires blobs, and runs forward/backward as Caffe's Net does.

Build order follows Caffe: upgrade the definition, filter layers by NetState, insert Split layers
where one top feeds several bottoms, then set up each layer, share parameters by ``param { name }``,
and work out which layers need backward; those steps live in build.py. The net knows no particular
layer type: what it needs from a layer it reads from the layer's class attributes (core/layer.py).
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..core import backend, context, threads
from ..kernels import fusion, train_fusion
from ..core.blob import Blob
from ..errors import MinicaffeError, NetError, NumericalError, ShapeError, WeightsError
from ..fileio import atomic_write
from ..proto import caffe_pb2
from ..formats.wire import blobproto_bytes
from ..formats.prototxt import load_net_param, make_state, parse_binary, upgrade_net
from . import build
from .memory_plan import MemoryPlan
from .build import is_inserted_split, raise_naming_layer

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

# Net construction logs Caffe's Net::Init lines (Creating Layer, Top shape, Memory required for data...)
# at INFO, so logs of minicaffe runs read like Caffe's; they show where the 'minicaffe' logger prints
log = logging.getLogger("minicaffe")


def in_file(exc, source):
    """Prefix an error's message with the file it concerns (once), keeping its type; returns it."""
    msg = str(exc)
    if source and not msg.startswith(os.fspath(source)):
        exc.args = (f"{os.fspath(source)}: {msg}",) + tuple(exc.args[1:])
    return exc




class Net:
    """pycaffe's ``caffe.Net``: ``Net(proto, phase)``, ``Net(proto, weights, phase)``,
    ``Net(proto, phase, weights=..., level=..., stages=[...])`` or with pycaffe's keywords
    ``Net(network_file=..., phase=..., weights=...)``; ``proto`` may also be a NetParameter.

    Public attributes, as pycaffe's: ``name``, ``phase``, ``param`` (the NetParameter as built, Split
    layers included), ``layers`` (Layer objects in order), ``blobs`` (blob name → Blob, in creation
    order), ``top_names``/``bottom_names`` (layer name → its blob names), ``inputs`` and ``outputs``
    (blob names), ``layer_dict`` (layer name → Layer), ``source`` (the prototxt path, if any)."""

    _hooks = None       # {"before_forward": [callables], ...} once one is registered (pycaffe's callbacks)

    def __init__(self, network: str | os.PathLike | caffe_pb2.NetParameter | None = None,
                 *args: str | os.PathLike | int, network_file: str | os.PathLike | None = None,
                 weights: str | os.PathLike | None = None, phase: int | None = None, level: int = 0,
                 stages: Sequence[str] | None = None, share_memory: bool = False) -> None:
        if network is None:
            network = network_file
        elif network_file is not None:
            raise TypeError("Net() got the network twice (positionally and as network_file=)")
        if network is None:
            raise TypeError("Net needs a network: Net(network_file, phase, weights=None)")
        args = list(args)
        if args and isinstance(args[0], (str, os.PathLike)):
            weights = args.pop(0)
        if args:
            phase = args.pop(0)
        if args:
            raise TypeError("Net(network, [weights,] phase, weights=None, level=0, stages=None)")
        if phase is None:
            raise TypeError("Net needs a phase: caffe.TRAIN or caffe.TEST")
        self.source = os.fspath(network) if isinstance(network, (str, os.PathLike)) and \
            os.path.exists(network) else None
        param = load_net_param(network)
        state = make_state(phase, level, stages or (), base=param.state)
        state.phase = phase
        if not isinstance(network, caffe_pb2.NetParameter):
            # Caffe's Net(file, phase, level, stages) sets the level even when it is 0, so the
            # "Initializing net" dump shows it; Net(NetParameter), as the solver uses, keeps the state
            state.level = level
        self.phase = phase
        # check mode: every top after forward and every diff after backward must be finite
        self.check_finite = context.switches().check_nan
        try:
            self._build(param, state)
        except MinicaffeError as exc:
            raise in_file(exc, self.source)
        if weights is not None:
            self.copy_from(weights)
        if share_memory:
            self.share_blob_memory()

    # --- construction --------------------------------------------------------------------
    def _build(self, param, state):
        """Build the graph in Caffe's steps (net/build.py), then plan the TEST-phase fusion."""
        self.name = param.name
        build.NetBuilder(build.prepare(param, state), state.phase, param.force_backward).build().install(self)
        self._fusion = fusion.plan(self)     # TEST phase only; MINICAFFE_FUSION=0 switches it off
        # BatchNorm (batch statistics) + Scale (+ ReLU), forward and backward (kernels/train_fusion.py)
        self._train_fusion = train_fusion.plan(self)
        self._shared_diffs = None            # the solver's DiffPlan, made at its first backward
        # layers that read what the layer just before them kept (core/layer.py link_producer)
        self._linked = frozenset(
            li for li in range(1, len(self.layers))
            if self.layers[li].link_producer(self.layers[li - 1], self._top[li - 1],
                                             self._bottom[li], self._top[li]))
        log.info("Network initialization done.")

    # --- pycaffe-shaped views ------------------------------------------------------------
    @property
    def params(self) -> collections.OrderedDict[str, list[Blob]]:
        """Layer name → list of its learnable blobs (layers without blobs left out), as pycaffe."""
        return collections.OrderedDict((n, list(l.blobs)) for n, l in zip(self._layer_names, self.layers)
                                       if l.blobs)

    @property
    def learnable_params(self) -> list[Blob]:
        """The distinct learnable blobs in net order, a shared parameter once (Caffe's
        ``learnable_params()``): what a solver updates, in the order of ``params_lr``."""
        return list(self._learnable)

    @property
    def params_lr(self) -> list[float]:
        """``lr_mult`` of each blob of ``learnable_params``, same order (a shared blob: its owner's)."""
        return list(self._lr_mult)

    @property
    def params_weight_decay(self) -> list[float]:
        """``decay_mult`` of each blob of ``learnable_params``, same order."""
        return list(self._decay_mult)

    # --- what solvers, tools and engines need from a built net (read-only views) ------------
    @property
    def layer_names(self) -> list[str]:
        """Layer names in execution order (pycaffe's ``_layer_names``)."""
        return list(self._layer_names)

    @property
    def bottom_vecs(self) -> list[list[Blob]]:
        """Each layer's bottom blobs, in execution order (Caffe's ``bottom_vecs()``)."""
        return self._bottom

    @property
    def top_vecs(self) -> list[list[Blob]]:
        """Each layer's top blobs, in execution order (Caffe's ``top_vecs()``)."""
        return self._top

    @property
    def layer_loss_weights(self) -> list[list[float]]:
        """Each layer's loss weight per top (0 for tops no loss reads), in execution order."""
        return [list(ws) for ws in self._loss_weights]

    @property
    def layer_need_backward(self) -> list[bool]:
        """Per layer: does backward run it (Caffe's ``layer_need_backward()``)."""
        return self._layer_need_backward

    @property
    def bottom_need_backward(self) -> list[list[bool]]:
        """Per layer, per bottom: does backward propagate into it (Caffe's ``bottom_need_backward()``)."""
        return self._bottom_need_backward

    @property
    def learnable_param_names(self) -> list[tuple[str, int]]:
        """``(layer name, blob index)`` of each blob of ``learnable_params``, same order."""
        return list(self._learnable_names)

    def data_positions(self) -> dict[str, object]:
        """Layer name → read position of each data layer that reports one (``data_position()``), for the
        snapshot's sidecar, so that a resumed run reads the records the original would have."""
        return {layer.name: layer.data_position() for layer in self.layers
                if callable(getattr(layer, "data_position", None))}

    def restore_data_positions(self, forward_passes: int, saved: dict | None = None) -> None:
        """Put the data layers back where a run was: at their ``saved`` positions (from
        ``data_positions()``), else tell layers with ``restore_position(n)`` how many records this net
        has read in ``forward_passes`` forward passes."""
        saved = saved if isinstance(saved, dict) else {}
        for layer, tops in zip(self.layers, self._top):
            if layer.name in saved and callable(getattr(layer, "restore_data_position", None)):
                if layer.restore_data_position(saved[layer.name]) is not False:
                    continue        # False: saved by another shard (worker count); count the records instead
            hook = getattr(layer, "restore_position", None)
            if callable(hook) and tops:
                batch = tops[0].shape[0] if tops[0].shape else 1
                hook(int(forward_passes) * int(batch))

    @property
    def _blob_names(self):
        return list(self.blobs)

    # pycaffe's _caffe.cpp views (lists and ids, as the C++ Net holds them) and pycaffe.py's dicts over them
    @property
    def _blobs(self):
        return list(self.blobs.values())

    @property
    def _inputs(self):
        """Indices into ``_blobs`` of the net's inputs (the tops of its Input layers)."""
        ids = self._blob_ids()
        return [ids[name] for name in self.inputs]

    @property
    def _outputs(self):
        ids = self._blob_ids()
        return [ids[name] for name in self.outputs]

    def _top_ids(self, i):
        ids = self._blob_ids()
        return [ids[name] for name in self.param.layer[i].top]

    def _bottom_ids(self, i):
        ids = self._blob_ids()
        return [ids[name] for name in self.param.layer[i].bottom]

    def _blob_ids(self):
        return {name: k for k, name in enumerate(self.blobs)}

    @property
    def _blob_loss_weights(self):
        """One loss weight per blob in ``_blobs`` order: the weight its (last) producing layer gives it,
        0 for blobs no loss reads, as Caffe's blob_loss_weights_."""
        weights = dict.fromkeys(self.blobs, 0.0)
        for lp, ws in zip(self.param.layer, self._loss_weights):
            for name, w in zip(lp.top, ws):
                weights[name] = float(w)
        return list(weights.values())

    @property
    def blob_loss_weights(self) -> collections.OrderedDict[str, float]:
        """Blob name → loss weight (pycaffe's OrderedDict, input to output)."""
        return collections.OrderedDict(zip(self.blobs, self._blob_loss_weights))

    def _forward(self, start, end):
        """pycaffe's Net._forward(start, end): Caffe's ForwardFromTo over layer indices; the loss."""
        self._check_range(start, end)
        return self.forward_from_to(start, end)

    def _backward(self, start, end):
        """pycaffe's Net._backward(start, end): Caffe's BackwardFromTo, from layer ``start`` down to ``end``."""
        self._check_range(end, start)
        self.backward_from_to(start, end)

    def _check_range(self, low, high):
        n = len(self.layers)
        if not (0 <= int(low) and int(high) < n):
            raise NetError(f"layer range {low}..{high} is outside net '{self.name}' (layers 0..{n - 1})")

    def before_forward(self, fn: Callable[[int], object]) -> None:
        """Call ``fn(layer_index)`` before each layer's forward (pycaffe's Net.before_forward)."""
        self._add_hook("before_forward", fn)

    def after_forward(self, fn: Callable[[int], object]) -> None:
        """Call ``fn(layer_index)`` after each layer's forward."""
        self._add_hook("after_forward", fn)

    def before_backward(self, fn: Callable[[int], object]) -> None:
        """Call ``fn(layer_index)`` before each layer's backward (also for layers that skip it, as Caffe)."""
        self._add_hook("before_backward", fn)

    def after_backward(self, fn: Callable[[int], object]) -> None:
        """Call ``fn(layer_index)`` after each layer's backward."""
        self._add_hook("after_backward", fn)

    def _add_hook(self, kind, fn):
        if not callable(fn):
            raise TypeError(f"Net.{kind} needs a callable taking the layer index, got {type(fn).__name__}")
        if self._hooks is None:
            self._hooks = {k: [] for k in ("before_forward", "after_forward", "before_backward", "after_backward")}
        self._hooks[kind].append(fn)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """pycaffe's Net.set_input_arrays: hand ``data`` (N×C×H×W float32) and ``labels`` (N or N×1×1×1)
        to the MemoryData layer, which must be the net's first layer as in Caffe (any first layer that
        takes arrays, i.e. has ``set_input_arrays``: the net tests no type name)."""
        if not self.layers or not callable(getattr(self.layers[0], "set_input_arrays", None)):
            raise NetError("set_input_arrays may only be called if the first layer is a MemoryDataLayer "
                           f"(net '{self.name}' starts with "
                           f"{self.layers[0].type if self.layers else 'no layer'})")
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        return self.layers[0].set_input_arrays(data, labels)

    def _set_input_arrays(self, data, labels):
        return self.set_input_arrays(data, labels)

    def _layer_index(self, name, default):
        if name is None:
            return default
        if name not in self.layer_dict:
            raise NetError(f"no layer named '{name}' in net '{self.name}'")
        return self._layer_names.index(name)

    # --- running -------------------------------------------------------------------------
    def reshape(self) -> None:
        """Reshape every layer from its bottoms, in order (Caffe's ``Net::Reshape``): call it after
        changing an input blob's shape so that the tops and buffers follow before the next forward."""
        for layer, bottom, top in zip(self.layers, self._bottom, self._top):
            try:
                layer.reshape(bottom, top)
            except (NetError, MemoryError) as exc:
                raise_naming_layer(exc, layer)
        if self._memory is not None:
            self._refresh_memory_plan()

    # --- blob memory sharing for forward-only nets (net/memory_plan.py) -------------------
    _memory = None      # the applied MemoryPlan, or None: every blob has memory of its own

    def share_blob_memory(self, keep: Iterable[str] = ()) -> None:
        """Let blobs whose lifetimes do not overlap share memory during forward (a TEST net without
        force_backward only; NetError otherwise). The net's inputs and outputs and the blobs named
        in ``keep`` keep their values after ``forward``; reading ``data`` of any other blob whose
        memory a later blob reused raises a NetError naming it. Redone after a reshape. On a GPU
        this does nothing yet (the device copies are the blobs' own)."""
        from . import memory_plan
        if backend.is_gpu():
            log.debug("Blob memory sharing covers host memory only: not used on the GPU")
            return
        if self._memory is not None:
            self._memory.release()
            self._memory = None
        self._memory = memory_plan.share(self, keep)
        log.debug("Blob memory shared: %d bytes in %d buffers instead of %d", self._memory.planned_bytes,
                 len(self._memory.buffers), self._memory.private_bytes)

    def unshare_blob_memory(self) -> None:
        """Give every blob its own memory again (the values the shared buffers hold are kept)."""
        if self._memory is not None:
            self._memory.release()
            self._memory = None

    @property
    def memory_plan(self) -> MemoryPlan | None:
        """The applied blob-sharing MemoryPlan, or None."""
        return self._memory

    def _refresh_memory_plan(self):
        if self._memory.stale():
            from . import memory_plan
            self._memory = memory_plan.share(self, self._memory.keep)

    def forward_from_to(self, start: int = 0, end: int | None = None,
                        timings: dict[int, float] | None = None, device_loss: bool = False) -> Any:
        """Run layers start..end (inclusive); returns the weighted loss, as Caffe's ForwardFromTo.

        The loss is a Python float, read from the device on the GPU. ``device_loss``: on the GPU
        return it as a 0-d float64 CuPy array instead, so that nothing waits for the GPU (the solver
        reads its losses once per display: see docs/gpu.md); the same value, summed in the same
        order. On the CPU it is a float either way."""
        end = len(self.layers) - 1 if end is None else end
        if self._memory is not None and start == 0:
            self._refresh_memory_plan()
        if self._memory is not None:
            # a forward-only net: each layer's scratch lies over the previous layer's
            # (core/context.py's Workspaces.layer_frames), as its blobs share memory
            with context.current().workspaces.layer_frames() as frame:
                loss = self._forward_layers(start, end, timings, device_loss, frame)
            if frame.grew or not self._memory.trimmed:
                # the first forward of a plan (or one whose scratch grew) has freed what the
                # plan and the scratch replaced: give it back to the OS (context.trim_heap)
                context.trim_heap()
                self._memory.trimmed = True
            return loss
        return self._forward_layers(start, end, timings, device_loss, None)

    def _forward_layers(self, start, end, timings, device_loss, frame):
        loss = 0.0
        on_device = device_loss and backend.is_gpu()
        hooks = self._hooks
        linked = self._linked
        ran = None      # the layer whose forward ran last in this pass, unfused
        li = start
        while li <= end:
            if frame is not None:
                frame.next_layer()
            layer, bottom, top = self.layers[li], self._bottom[li], self._top[li]
            if li in linked:
                # a hook may change the blobs between the two layers: then the layer keeps its copy
                layer.producer_ran = ran == li - 1 and not hooks
            if hooks:
                for fn in hooks["before_forward"]:
                    fn(li)
            t0, first = (time.perf_counter() if timings is not None else None), li
            # TEST nets: a chain of layers fused into one (minicaffe/kernels/fusion.py; no loss, same blobs);
            # not while pycaffe hooks are set, which must see every layer
            chain = self._fusion.chain_at(li, end) if self._fusion is not None and not hooks else None
            kept = chain is None and self._train_fusion is not None and not hooks
            if kept:    # a chain that leaves its layers the state of their backward
                chain = self._train_fusion.chain_at(li, end)
            try:
                if chain is not None and chain.run(self):
                    if not kept:
                        self._fusion.ran[li] = chain
                    li, layer = chain.last, self.layers[chain.last]
                    ran = None
                    top = self._top[li]
                else:
                    layer.reshape(bottom, top)
                    layer.forward(bottom, top)
                    ran = li
            except (NetError, MemoryError) as exc:
                raise_naming_layer(exc, layer)
            if timings is not None:
                backend.synchronize()
                timings[first] = timings.get(first, 0.0) + time.perf_counter() - t0
            if self.check_finite:
                self._check_finite(li, "forward", [(f"top '{b.name}'", b.xdata) for b in top])
            for w, blob in zip(self._loss_weights[li], top):
                if w:
                    # on the device: the float32 sum widened, times w, added in float64: what the
                    # host does with float(sum) and Python floats, without the read
                    loss = loss + (blob.xdata.sum().astype(np.float64) * w if on_device
                                   else w * float(blob.xdata.sum()))
            if hooks:
                for fn in hooks["after_forward"]:
                    fn(li)
            li += 1
        return loss

    def backward_from_to(self, start: int | None = None, end: int = 0,
                         timings: dict[int, float] | None = None, share_diffs: bool = False) -> None:
        """Back-propagate layers start..end (inclusive, by index, default the last down to the
        first), as Caffe's ``BackwardFromTo``: a loss layer's top diff is seeded with its loss weight,
        layers that feed no loss are skipped. Parameter diffs accumulate (``clear_param_diffs``
        resets them). ``timings`` (layer index → seconds) is added to when given.
        ``share_diffs`` (whole passes only; what the solver asks for): activation gradients live in
        buffers shared by those never live together, and a Split's tops' gradients are added into
        its bottom as they arrive; activation diffs are not kept after the pass (net/diff_plan.py)."""
        start = len(self.layers) - 1 if start is None else start
        if self._memory is not None:
            raise NetError(f"net '{self.name}' shares blob memory (share_memory=True): backward needs every "
                           f"blob's values; call unshare_blob_memory() and forward again first")
        hooks = self._hooks
        if self._fusion is not None:
            # fused layers kept no state for their gradients: redo them unfused, fuse no more
            self._fusion.unfuse(self)
            self._fusion = None
        plan = self._diff_plan(share_diffs and start == len(self.layers) - 1 and end == 0)
        fused = self._train_fusion is not None and not hooks
        li = start + 1
        while li > end:
            li -= 1
            if fused:
                t0 = time.perf_counter() if timings is not None else None
                first = self.fused_backward_at(li, end)
                if first is not None:
                    self._after_fused_backward(first, li, plan, timings, t0)
                    li = first
                    continue
            if hooks:       # as Caffe: the hooks run for every layer, even one that skips backward
                for fn in hooks["before_backward"]:
                    fn(li)
            if not self._layer_need_backward[li]:
                if hooks:
                    for fn in hooks["after_backward"]:
                        fn(li)
                continue
            layer, bottom, top = self.layers[li], self._bottom[li], self._top[li]
            for w, blob in zip(self._loss_weights[li], top):
                if w:
                    diff = blob.xdiff
                    if diff.base is None and diff.shape == blob.shape and diff.dtype == blob.dtype:
                        diff.fill(w)        # its own storage, kept across iterations
                    else:                   # a view of another blob's diff: not to be written through
                        blob.xdiff = backend.xp().full(blob.shape, w, dtype=blob.dtype)
            t0 = time.perf_counter() if timings is not None else None
            try:
                if plan is not None and li in plan.splits:
                    plan.split_backward(li)
                else:
                    layer.backward(top, self._bottom_need_backward[li], bottom)
                if plan is not None and li in plan.after:
                    plan.after_layer(li)
            except (NetError, MemoryError) as exc:
                raise_naming_layer(exc, layer)
            if timings is not None:
                backend.synchronize()
                timings[li] = timings.get(li, 0.0) + time.perf_counter() - t0
            if self.check_finite:
                checks = [(f"bottom '{b.name}' diff", b.xdiff)
                          for j, b in enumerate(bottom) if self._bottom_need_backward[li][j]]
                checks += [(f"parameter {k} diff", b.xdiff) for k, b in enumerate(layer.blobs)
                           if k < len(layer.param_propagate_down) and layer.param_propagate_down[k]]
                self._check_finite(li, "backward", checks)
            if hooks:
                for fn in hooks["after_backward"]:
                    fn(li)

    def fused_backward_at(self, li: int, end: int = 0) -> int | None:
        """Run the backward of the fused chain that ends at layer ``li`` (kernels/train_fusion.py:
        BatchNorm + Scale + ReLU) as one, where there is one, a backward down to layer ``end``
        covers it and it can run fused, and return the chain's first layer index; else do nothing
        and return None. ``backward_from_to`` uses it, and so can a tool that calls each layer's
        backward itself, as ``minicaffe time`` does, so it times the backward a solver runs."""
        chains = self._train_fusion if not self._hooks else None
        chain = chains.backward_chain_at(li, end) if chains is not None else None
        if chain is None:
            return None
        try:
            fused = chain.run_backward(self)
        except (NetError, MemoryError) as exc:
            raise_naming_layer(exc, self.layers[li])
        return chain.first if fused else None

    def diff_is_transient(self, blob: Blob) -> bool:
        """Whether ``blob``'s diff is, in the backward pass under way, a shared buffer of a solver's
        pass (net/diff_plan.py): then no one reads it after the layers that use it, and the pass
        does not keep it, so a fused backward (kernels/train_fusion.py) need not write it."""
        plan = self._shared_diffs
        return plan is not None and plan.in_use and blob in plan.slot_of

    def begin_shared_backward(self) -> Any:
        """Ready the activation gradients for a backward pass that a tool runs layer by layer
        (``minicaffe time``) as a solver's pass keeps them (net/diff_plan.py), and return the
        DiffPlan: around each layer's backward the tool runs the plan's ``split_backward`` in place
        of a planned Split's own, then ``after_layer``. None for a net that shares blob memory
        (it runs no backward)."""
        if self._memory is not None:
            return None
        return self._diff_plan(True)

    def withhold_bottom_gradient(self, li: int) -> bool:
        """In a solver's pass (net/diff_plan.py): layer ``li``'s backward gives its bottoms no
        gradient of their own, because another layer's backward gave the sum of theirs
        (kernels/stacked_1x1.py); the Splits they are tops of add nothing for them. False (nothing
        withheld) unless every bottom it propagates to is a split top summed that way."""
        plan = self._shared_diffs
        if plan is None or not plan.in_use:
            return False
        wanted = [b for j, b in enumerate(self._bottom[li]) if self._bottom_need_backward[li][j]]
        if not wanted or not all(plan.summed_after(li, b) for b in wanted):
            return False
        for b in wanted:
            plan.withhold(li, b)
        return True

    def bottom_gradient_target(self, li: int) -> tuple[Any, bool] | None:
        """In a solver's pass (net/diff_plan.py): where layer ``li``'s backward may add its one
        bottom's gradient straight into the sum its Split makes, instead of writing the bottom's
        own diff for the Split to add afterwards: (the Split's bottom's diff, whether to add into
        it; False: the first gradient to arrive, to be written). The gradient then counts as
        arrived. None: write the bottom's own diff, as always."""
        plan = self._shared_diffs
        if plan is None or not plan.in_use or len(self._bottom[li]) != 1:
            return None
        return plan.take_target(li, self._bottom[li][0])

    def _after_fused_backward(self, first, last, plan, timings, t0):
        """What the backward loop does after each layer, for a chain ``first..last`` run as one
        (train_fusion): the diff plan's additions, the timing (on the chain's last layer) and the
        finiteness checks."""
        for k in range(last, first - 1, -1):
            if plan is not None and k in plan.after:
                plan.after_layer(k)
        if timings is not None:
            timings[last] = timings.get(last, 0.0) + time.perf_counter() - t0
        if self.check_finite:
            for k in range(last, first - 1, -1):
                layer = self.layers[k]
                checks = [(f"bottom '{b.name}' diff", b.xdiff) for b in self._bottom[k]]
                checks += [(f"parameter {j} diff", b.xdiff) for j, b in enumerate(layer.blobs)
                           if j < len(layer.param_propagate_down) and layer.param_propagate_down[j]]
                self._check_finite(k, "backward", checks)

    def _diff_plan(self, share):
        """The DiffPlan for this backward pass (made once, its buffers readied) when ``share``;
        otherwise None, after giving blobs that a shared pass left on shared buffers their own diffs
        back (a pass that keeps every diff must not write through aliased ones)."""
        plan = self._shared_diffs
        if not share:
            if plan is not None:
                plan.release()
            return None
        if plan is None:
            from .diff_plan import DiffPlan
            plan = self._shared_diffs = DiffPlan(self)
        plan.begin()
        return plan

    def _check_finite(self, li, direction, arrays):
        """NumericalError naming the layer, the blob and the pass at the first NaN/infinity (check mode)."""
        xp = backend.xp()
        for what, arr in arrays:
            if arr is None or not arr.size:
                continue
            finite = xp.isfinite(arr)
            if bool(finite.all()):
                continue
            nan = int(xp.isnan(arr).sum())
            inf = int(arr.size - int(finite.sum()) - nan)
            name = self._layer_names[li]
            raise NumericalError(f"{direction} pass: layer '{name}' ({self.layers[li].type}) wrote a "
                                 f"non-finite {what} ({nan} NaN, {inf} infinite of {arr.size} values)")

    def forward(self, blobs: Iterable[str] | None = None, start: str | None = None, end: str | None = None,
                **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """pycaffe's forward: set inputs from keywords, run, return {output name: array}."""
        for name, arr in kwargs.items():
            if name not in self.blobs:
                raise NetError(f"forward(): no blob named '{name}' (inputs: {', '.join(self.inputs)})")
            blob = self.blobs[name]
            arr = np.asarray(arr)
            if arr.shape != blob.shape:
                if arr.ndim and blob.shape and arr.shape[0] != blob.shape[0]:
                    raise ShapeError(f"forward(): input '{name}' has batch {arr.shape[0]}, the net expects "
                                     f"{blob.shape[0]} (reshape the blob first)")
                raise ShapeError(f"forward(): input '{name}' has shape {arr.shape}, blob is {blob.shape}")
            blob.data[...] = arr
        si = self._layer_index(start, 0)
        ei = self._layer_index(end, len(self.layers) - 1)
        self.forward_from_to(si, ei, device_loss=True)     # the loss is not returned: not read either
        outs = set(self.outputs if end is None else self.top_names[self._layer_names[ei]]) | set(blobs or ())
        return {name: self.blobs[name].data for name in self.blobs if name in outs}

    def backward(self, diffs: Iterable[str] | None = None, start: str | None = None, end: str | None = None,
                 **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """pycaffe's backward: set top diffs from keywords, run, return {input name: diff}."""
        for name, arr in kwargs.items():
            if name not in self.blobs:
                raise NetError(f"backward(): no blob named '{name}'")
            self.blobs[name].diff[...] = arr
        si = self._layer_index(start, len(self.layers) - 1)
        ei = self._layer_index(end, 0)
        self.backward_from_to(si, ei)
        outs = set(self.inputs if end is None else self.bottom_names[self._layer_names[ei]]) | set(diffs or ())
        return {name: self.blobs[name].diff for name in self.blobs if name in outs}

    def forward_backward(self, device_loss: bool = False) -> Any:
        """One forward pass and one backward pass over the whole net; returns the weighted loss
        (Caffe's ``ForwardBackward``, what a solver step runs for each of its ``iter_size``);
        ``device_loss`` as in ``forward_from_to``."""
        loss = self.forward_from_to(device_loss=device_loss)
        self.backward_from_to()
        return loss

    def forward_all(self, blobs: Iterable[str] | None = None, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """Run whole batches over inputs of any length; returns concatenated outputs (pycaffe)."""
        outs = {name: [] for name in set(self.outputs) | set(blobs or ())}
        batch = self._batches(kwargs)
        n_total = len(next(iter(kwargs.values()))) if kwargs else None
        for chunk in batch:
            res = self.forward(blobs=blobs, **chunk)
            for name in outs:
                outs[name].append(res[name].copy())
        return {name: self._trim(vals, n_total) for name, vals in outs.items()}

    def forward_backward_all(self, blobs: Iterable[str] | None = None, diffs: Iterable[str] | None = None,
                             **kwargs: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's ``forward_backward_all``: keywords naming net inputs are fed forward and the
        others are top diffs fed backward, batch by batch (the last batch zero-padded); returns
        ``(outputs, input diffs)`` concatenated and trimmed to the number of items given."""
        in_keys = [k for k in kwargs if k in self.inputs]
        fwd_in = {k: kwargs[k] for k in in_keys}
        bwd_in = {k: v for k, v in kwargs.items() if k not in in_keys}
        outs = {name: [] for name in set(self.outputs) | set(blobs or ())}
        douts = {name: [] for name in set(self.inputs) | set(diffs or ())}
        n_total = len(next(iter(kwargs.values()))) if kwargs else None
        for fchunk, bchunk in zip(self._batches(fwd_in), self._batches(bwd_in)):
            res = self.forward(blobs=blobs, **fchunk)
            dres = self.backward(diffs=diffs, **bchunk)
            for name in outs:
                outs[name].append(res[name].copy())
            for name in douts:
                douts[name].append(dres[name].copy())
        return ({n: self._trim(v, n_total) for n, v in outs.items()},
                {n: self._trim(v, n_total) for n, v in douts.items()})

    def _batches(self, arrays):
        if not arrays:
            yield {}
            return
        batch_size = self.blobs[next(iter(arrays))].shape[0]
        total = len(next(iter(arrays.values())))
        for i in range(0, total, batch_size):
            chunk = {}
            for name, arr in arrays.items():
                part = np.asarray(arr[i:i + batch_size])
                if len(part) < batch_size:   # pad the last batch, as pycaffe does
                    pad = np.zeros((batch_size - len(part),) + part.shape[1:], dtype=part.dtype)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            yield chunk

    @staticmethod
    def _trim(vals, n_total):
        arr = np.concatenate(vals) if vals and np.ndim(vals[0]) else np.asarray(vals)
        return arr[:n_total] if n_total is not None and arr.ndim else arr

    def clear_param_diffs(self) -> None:
        """Zero the diff of every learnable blob (Caffe's ``ClearParamDiffs``): backward adds to
        them, so a solver clears them before each iteration's first forward/backward. Large NumPy
        diffs are zeroed in flat chunks on the kernels' pool: one thread wrote 7.5 GB/s (VGG-16's
        553 MB of diffs took 75 ms), two about twice that."""
        for blob in self._learnable:
            d = blob.xdiff
            flat = threads.flat_views(d)
            if flat is None:
                d.fill(0)
            else:
                f = flat[0]
                threads.parallel_flat(f.size, lambda a, b: f[a:b].fill(0))

    # --- weights -------------------------------------------------------------------------
    def to_proto(self, write_diff: bool = False) -> caffe_pb2.NetParameter:
        """The net definition with every layer's blobs, as Caffe writes a .caffemodel."""
        out = caffe_pb2.NetParameter()
        out.name = self.param.name
        for lp, layer in zip(self.param.layer, self.layers):
            if is_inserted_split(lp, layer):
                continue
            new = out.layer.add()
            new.CopyFrom(lp)
            del new.blobs[:]
            for blob in layer.blobs:
                bp = new.blobs.add()
                bp.MergeFromString(blobproto_bytes(blob.host_data.astype(np.float32, copy=False)))
                if write_diff:
                    bp.diff.extend(blob.host_diff.astype(np.float32).ravel().tolist())
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write a binary .caffemodel (atomically)."""
        atomic_write(path, self.to_proto().SerializeToString())

    def copy_from(self, path: str | os.PathLike) -> None:
        """Load weights by layer name from a .caffemodel (current or V1) or a Caffe HDF5 file."""
        path = os.fspath(path)
        if path.endswith((".h5", ".hdf5")):
            return self.load_hdf5(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise WeightsError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
        source = parse_binary(data, caffe_pb2.NetParameter(), path)
        if not len(source.layer) and not len(source.layers):
            raise WeightsError(f"{path}: holds no layers (not a .caffemodel?)")
        upgrade_net(source, path)
        self.copy_from_proto(source, path)

    def copy_from_proto(self, source: caffe_pb2.NetParameter, path: str = "<weights>") -> None:
        """Copy weights by layer name from a NetParameter holding blobs (Caffe's ``CopyTrainedLayersFrom``):
        layers not in this net are ignored; a blob count or shape mismatch, a non-finite weight, or a file
        none of whose layers is in this net raises WeightsError naming ``path``, with nothing copied."""
        with_blobs = [sl.name for sl in source.layer if len(sl.blobs)]
        if with_blobs and any(l.blobs for l in self.layers) and not any(n in self.layer_dict for n in with_blobs):
            # Caffe copies nothing here without a word; a net left at its initial weights is never meant
            raise WeightsError(f"{path}: none of its layers with weights ({', '.join(with_blobs[:4])}"
                               f"{', ...' if len(with_blobs) > 4 else ''}) is in net '{self.name}': "
                               f"the weights of another net?")
        # every blob is read and checked before any is copied: a bad file leaves the net as it was
        copies = []
        for sl in source.layer:
            if sl.name not in self.layer_dict or not len(sl.blobs):
                continue
            layer = self.layers[self._layer_names.index(sl.name)]    # the first of that name, as Caffe
            if len(layer.blobs) != len(sl.blobs):
                raise WeightsError(f"{path}: layer '{sl.name}' has {len(sl.blobs)} blobs in the file but "
                                   f"{len(layer.blobs)} in the net")
            for k, (target, bp) in enumerate(zip(layer.blobs, sl.blobs)):
                try:
                    arr = blobproto_to_array(bp)
                except BlobShapeError as exc:
                    raise WeightsError(f"{path}: layer '{sl.name}' blob {k}: {exc}") from None
                if not shape_matches(bp, target.shape):
                    raise WeightsError(f"{path}: cannot copy param {k} of layer '{sl.name}': shape "
                                       f"{tuple(arr.shape)} in the file, {target.shape} in the net"
                                       f"{_rename_hint(sl.name)}")
                check_finite_weights(arr, path, sl.name, k)
                copies.append((target, arr))
        for target, arr in copies:
            target.data[...] = arr.reshape(target.shape)

    def share_with(self, other: Net) -> None:
        """Use ``other``'s parameter blobs for layers of the same name (Caffe's ShareTrainedLayersWith:
        each of ``other``'s layers shares into the first layer here of its name)."""
        first = {}
        for name, layer in zip(self._layer_names, self.layers):
            first.setdefault(name, layer)
        for name, src in zip(other._layer_names, other.layers):
            layer = first.get(name)
            if layer is None or not layer.blobs:
                continue
            if len(src.blobs) != len(layer.blobs):
                raise WeightsError(f"cannot share layer '{name}': {len(src.blobs)} vs {len(layer.blobs)} blobs")
            for k, blob in enumerate(src.blobs):
                if blob.shape != layer.blobs[k].shape:
                    raise WeightsError(f"cannot share param {k} of layer '{name}': {blob.shape} vs "
                                       f"{layer.blobs[k].shape}")
                layer.blobs[k] = blob

    def save_hdf5(self, path: str | os.PathLike) -> None:
        """Caffe's HDF5 weights layout: /data/<layer>/<k>; needs h5py."""
        h5py = _h5py()
        from ..fileio import atomic_open
        with atomic_open(path, "wb") as f:
            with h5py.File(f, "w") as h5:
                data = h5.create_group("data")
                for name, layer in zip(self._layer_names, self.layers):
                    if layer.blobs:
                        group = data.create_group(name)
                        for k, blob in enumerate(layer.blobs):
                            group.create_dataset(str(k), data=blob.host_data.astype(np.float32))

    def load_hdf5(self, path: str | os.PathLike) -> None:
        """Load weights by layer name from Caffe's HDF5 layout (``/data/<layer>/<k>``; needs h5py),
        checked in full before anything is copied, like ``copy_from_proto``."""
        h5py = _h5py()
        try:
            h5 = h5py.File(path, "r")
        except OSError as exc:
            raise WeightsError(f"{path}: cannot read HDF5 weights: {exc}") from None
        with h5:
            if not isinstance(h5.get("data"), h5py.Group):
                raise WeightsError(f"{path}: not Caffe HDF5 weights (no /data group)")
            data = h5["data"]
            copies = []
            for name in data:
                if name not in self.layer_dict:
                    continue
                layer = self.layer_dict[name]
                group = data[name]
                if len(group) != len(layer.blobs):
                    raise WeightsError(f"{path}: layer '{name}' has {len(group)} blobs in the file but "
                                       f"{len(layer.blobs)} in the net")
                for k, blob in enumerate(layer.blobs):
                    if str(k) not in group:
                        raise WeightsError(f"{path}: layer '{name}' has no dataset '{k}'")
                    arr = np.asarray(group[str(k)])
                    if arr.size != blob.count:
                        raise WeightsError(f"{path}: cannot copy param {k} of layer '{name}': shape "
                                           f"{arr.shape} in the file, {blob.shape} in the net{_rename_hint(name)}")
                    check_finite_weights(arr, path, name, k)
                    copies.append((blob, arr))
        for blob, arr in copies:
            blob.data[...] = arr.reshape(blob.shape)


# --- blob protos ----------------------------------------------------------------------------

def _rename_hint(layer):
    """Caffe's fine-tuning idiom, for the shape mismatch users meet when they change a layer's size
    (a new num_output for their classes) and load the old weights: weights are copied by layer name,
    so a renamed layer is skipped and starts from its filler."""
    return (f"; to fine-tune with a new shape, rename the layer (e.g. '{layer}' -> '{layer}_new') so it "
            f"is not copied and starts from its weight_filler")


class BlobShapeError(WeightsError):
    """A BlobProto whose shape is impossible or does not fit its values. Raised without context; the
    loaders (copy_from, the CLI's --snapshot) re-raise it with the file and the layer or blob."""


def blobproto_to_array(bp, return_diff=False):
    """A NumPy array from a BlobProto, using ``shape`` or the legacy num/channels/height/width."""
    if return_diff:
        values = bp.double_diff if len(bp.double_diff) else bp.diff
    else:
        values = bp.double_data if len(bp.double_data) else bp.data
    arr = np.asarray(values, dtype=np.float64 if (len(bp.double_data) and not return_diff) else np.float32)
    shape = blobproto_shape(bp)
    count = 1
    for d in shape:          # Python integers: a product of crafted dims cannot wrap round to arr.size
        count *= d
    if count != arr.size:
        raise BlobShapeError(f"BlobProto has {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def blobproto_shape(bp):
    """The shape a BlobProto declares; a negative dimension (a damaged or crafted file) is a
    WeightsError, which the loaders prefix with the file and the layer or blob."""
    if bp.HasField("shape"):
        shape = tuple(int(d) for d in bp.shape.dim)
    elif any(bp.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (bp.num, bp.channels, bp.height, bp.width)
    else:
        n = len(bp.double_data) or len(bp.data)
        shape = (n,) if n else (0,)
    if any(d < 0 for d in shape):
        raise BlobShapeError(f"BlobProto shape {shape} has a negative dimension")
    return shape


def check_finite_weights(arr, path, layer, index):
    """Refuse weights with NaN or infinity at load, naming the file, the layer and the blob: used
    unnoticed they surface many iterations later as a diverged loss or an "overflowed" update."""
    if np.isfinite(arr).all():
        return
    nan = int(np.isnan(arr).sum())
    inf = int(arr.size - np.isfinite(arr).sum()) - nan
    raise WeightsError(f"{path}: layer '{layer}' blob {index} holds non-finite values ({nan} NaN, "
                       f"{inf} infinite of {arr.size}): the weights of a run that diverged?")


def shape_matches(bp, shape):
    """Caffe's Blob::ShapeEquals: legacy 4-D blobs match shapes padded with leading ones."""
    if bp.HasField("shape"):
        return tuple(bp.shape.dim) == tuple(shape)
    legacy = (bp.num, bp.channels, bp.height, bp.width)
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    return legacy == padded


def array_to_blobproto(arr, diff=None):
    bp = caffe_pb2.BlobProto()
    arr = np.asarray(arr)
    bp.shape.dim.extend(arr.shape)
    bp.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        bp.diff.extend(np.asarray(diff, np.float32).ravel().tolist())
    return bp


def _h5py():
    from ..deps import require
    return require("h5py", "HDF5 weights")


