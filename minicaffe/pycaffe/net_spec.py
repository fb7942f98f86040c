"""pycaffe's ``caffe.net_spec``: write nets as Python calls and get a NetParameter back.

``layers`` (``L``) makes a layer of any type from its bottoms and keyword parameters;
``params`` (``P``) gives enum constants (``P.Pooling.MAX``); ``NetSpec`` names tops by attribute
assignment; ``to_proto`` collects every layer needed for some tops. Naming follows pycaffe: a
layer takes the name of its first top; unnamed tops are called ``<Type><count>``.

Keyword parameters go where pycaffe puts them: ``*_param``/``param`` keys on the layer itself,
other keys into the layer type's own parameter message (``kernel_size`` → ``convolution_param``),
and what that message lacks onto the LayerParameter (``include``, ``loss_weight``, ...). Unlike
pycaffe, Deconvolution/Im2col reach ``convolution_param`` and loss layers ``loss_param``, and a
misspelt key raises a clear error naming the layer and the closest field.
"""
from __future__ import annotations

import collections
import difflib
from typing import Any, Sequence

import numpy as np
from google.protobuf.message import Message

from ..errors import NetError
from ..proto import caffe_pb2, is_repeated


class NetSpecError(NetError, ValueError):
    """A net_spec keyword that does not fit the layer's messages."""


def _param_fields():
    """Layer type name → its ``*_param`` field, from the message names (ConvolutionParameter → Convolution)."""
    out = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = field.name
    return out


_PARAM_FIELD = _param_fields()
# types whose parameters live in another type's message (pycaffe made users spell these out)
_EXTRA_PARAM_FIELDS = {
    "Deconvolution": ["convolution_param"],
    "Im2col": ["convolution_param"],
    "SoftmaxWithLoss": ["softmax_param", "loss_param"],
}


def _candidate_fields(type_name):
    fields = []
    if type_name in _PARAM_FIELD:
        fields.append(_PARAM_FIELD[type_name])
    fields += _EXTRA_PARAM_FIELDS.get(type_name, [])
    if type_name.endswith("Loss") and "loss_param" not in fields:
        fields.append("loss_param")
    return fields


def _plain(value):
    """NumPy scalars and arrays as Python values protobuf accepts."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def assign_proto(proto: Message, name: str, val: Any, where: str = "layer") -> None:
    """Set ``proto.<name>`` from a Python value, recursively: dicts fill messages, lists fill repeated
    fields, a single value given to a repeated field becomes a one-element list (pycaffe's rules).
    Enum fields also take their value names as strings."""
    val = _plain(val)
    fields = type(proto).DESCRIPTOR.fields_by_name
    if name not in fields:
        raise NetSpecError(_unknown_field(proto, name, where))
    field = fields[name]
    repeated = is_repeated(field)
    try:
        if repeated:
            items = list(val) if isinstance(val, (list, tuple)) else [val]
            target = getattr(proto, name)
            for item in items:
                item = _plain(item)
                if field.message_type is not None:
                    msg = target.add()
                    _fill_message(msg, item, f"{where}.{name}")
                else:
                    target.append(_scalar(field, item))
        elif field.message_type is not None:
            _fill_message(getattr(proto, name), val, f"{where}.{name}")
        else:
            setattr(proto, name, _scalar(field, val))
    except NetSpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise NetSpecError(f"cannot set {where}.{name} = {val!r}: {exc}") from None


def _fill_message(msg, val, where):
    if isinstance(val, dict):
        for k, v in val.items():
            assign_proto(msg, k, v, where)
    elif hasattr(val, "DESCRIPTOR") and val.DESCRIPTOR is msg.DESCRIPTOR:
        msg.CopyFrom(val)
    else:
        raise NetSpecError(f"{where} is a {msg.DESCRIPTOR.name} message: give it a dict, not {val!r}")


def _scalar(field, val):
    if field.enum_type is not None and isinstance(val, str):
        values = field.enum_type.values_by_name
        if val not in values:
            raise NetSpecError(f"'{val}' is not a value of {field.enum_type.name} "
                               f"(one of {', '.join(values)})")
        return values[val].number
    return val


def _unknown_field(proto, name, where):
    names = list(type(proto).DESCRIPTOR.fields_by_name)
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"{where} ({type(proto).DESCRIPTOR.name}) has no field '{name}'{hint}"


class Top:
    """One output blob of a layer (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: Function, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)

    def __repr__(self):
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """One layer: its type, its bottoms (Tops) and its keyword parameters."""

    def __init__(self, type_name: str, inputs: Sequence[Top], params: dict[str, Any]) -> None:
        self.type_name = type_name
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                # pycaffe's own test pins this message with ^...$, so the hint goes in a note
                # (shown in tracebacks, not in str(error))
                err = TypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
                if isinstance(inp, tuple) and hasattr(err, "add_note"):
                    err.add_note("a layer with several tops returns a tuple: pass its elements, e.g. *tops")
                raise err
        self.inputs = tuple(inputs)
        params = dict(params)
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        if self.ntop < 0:
            raise ValueError(f"{type_name}: ntop must be >= 0, got {self.ntop}")
        if self.in_place and self.ntop > len(self.inputs):
            raise ValueError(f"{type_name}: in_place needs a bottom for each of its {self.ntop} tops")
        self.params = params
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames):
        if self not in names:
            if self.ntop > 0:
                names[self] = self._get_top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    @staticmethod
    def _get_top_name(top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(bottom_names[:self.ntop])
        else:
            layer.top.extend(self._get_top_name(t, names, autonames) for t in self.tops)
        layer.name = self._get_name(names, autonames)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        layers[self] = layer

    def _assign(self, layer, key, value):
        where = f"layer '{layer.name}' ({self.type_name})"
        try:
            if key.endswith("param"):
                assign_proto(layer, key, value, "layer")
                return
            for field in _candidate_fields(self.type_name):
                msg = getattr(layer, field)
                if key in type(msg).DESCRIPTOR.fields_by_name:
                    assign_proto(msg, key, value, field)
                    return
            if key in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name:
                assign_proto(layer, key, value, "layer")
                return
        except NetSpecError as exc:
            raise NetSpecError(f"{where}: {exc}") from None
        known = list(caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)
        messages = ["LayerParameter"]
        for field in _candidate_fields(self.type_name):
            msg_type = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name[field].message_type
            known += list(msg_type.fields_by_name)
            messages.insert(0, msg_type.name)
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise NetSpecError(f"{where}: unknown parameter '{key}' (not a field of "
                           f"{' or '.join(messages)}){hint}")

    def __repr__(self):
        return f"<{self.type_name} layer function, {self.ntop} top(s)>"


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """A NetParameter with every layer needed to compute ``tops`` (names generated)."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops assigned as attributes (``n.conv1 = L.Convolution(...)``) take the attribute's name;
    ``to_proto()`` gives the NetParameter with all their layers, in assignment order."""

    def __init__(self) -> None:
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top named '{name}'") from None

    def __setitem__(self, key, value):
        self.tops[key] = value

    def __getitem__(self, item):
        return self.tops[item]

    def __contains__(self, item):
        return item in self.tops

    def __delattr__(self, name):
        del self.tops[name]

    def __dir__(self):
        return list(super().__dir__()) + list(self.tops)

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter of every assigned top's layers (and the layers they need), in assignment
        order, each top named by its attribute and unnamed intermediate ones numbered (pycaffe's)."""
        names = {v: k for k, v in self.tops.items()}
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for name, top in self.tops.items():
            if not isinstance(top, (Top, Function)):
                raise TypeError(f"NetSpec.{name} holds a {type(top).__name__}, not a Top; assign the tops of a "
                                "several-top layer one by one (n.a, n.b = L.Slice(..., ntop=2))")
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.<Type>(*bottoms, **params)`` → a Top, a tuple of Tops (``ntop`` > 1), or the layer
    Function itself (``ntop=0``)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        layer_fn.__name__ = name
        return layer_fn


class _ParamEnums:
    def __init__(self, name, message):
        self._name, self._message = name, message

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            return getattr(self._message, attr)
        except AttributeError:
            values = [v.name for e in self._message.DESCRIPTOR.enum_types for v in e.values]
            raise AttributeError(f"params.{self._name} has no constant '{attr}' "
                                 f"(has: {', '.join(values) or 'none'})") from None


class Parameters:
    """``P.Pooling.MAX`` → ``caffe_pb2.PoolingParameter.MAX``: enum constants by layer type."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        message = getattr(caffe_pb2, name + "Parameter", None)
        if message is None:
            raise AttributeError(f"params.{name}: caffe.proto has no {name}Parameter message")
        return _ParamEnums(name, message)


_param_names = {k: v[:-len("_param")] for k, v in _PARAM_FIELD.items()}   # pycaffe's name for it
layers = Layers()
params = Parameters()

__all__ = ["layers", "params", "NetSpec", "to_proto", "Top", "Function", "assign_proto", "NetSpecError"]
