"""Reading Caffe's text and binary definitions: located parse errors, V1 → current upgrade, NetState rules.

Everything here turns user files into ``caffe_pb2`` messages in the current format, the way Caffe's
``upgrade_proto.cpp`` and ``Net::FilterNet`` do, so the rest of minicaffe sees one format only.
"""
import logging
import os
import re

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from .errors import MinicaffeError, NetError, ParseError
from .proto import caffe_pb2, is_repeated

# V1LayerParameter.LayerType enum name → current type string (Caffe's UpgradeV1LayerType)
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

_LOCATED = re.compile(r"^(\d+):(\d+)\s*:\s*(.*)$", re.S)


def parse_text(text, message, path=None):
    """Parse prototxt ``text`` into ``message``; errors become ``ParseError(file:line:col: ...)``.

    A scalar field given twice is an error (as in Caffe's C++ parser), not a silent override."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        msg = str(exc)
        m = _LOCATED.match(msg)
        if m:
            line, col, detail = int(m.group(1)), int(m.group(2)), m.group(3).strip()
            lines = text.split("\n")
            if 0 < line <= len(lines):   # protobuf quotes the whole source line: the position says it
                quoted = f"'{lines[line - 1]}': "
                if detail.startswith(quoted):
                    detail = detail[len(quoted):]
            if 0 < line <= len(lines):
                detail = _wrong_value_detail(detail, lines[line - 1], col) or detail
            unclosed, stray = _unbalanced_brace(text)
            if stray is not None and "got }" in detail:
                line, col = stray
                detail = "unbalanced braces: this '}' closes no '{'"
            elif unclosed is not None and detail == 'Expected "}".':
                line, col = unclosed
                detail = "unbalanced braces: this '{' is never closed (the file ends first)"
            elif unclosed is not None and "has no field named" in detail:
                detail += (f" (the '{{' at {unclosed[0]}:{unclosed[1]} is never closed: a missing '}}' "
                           f"before this line?)")
            elif 0 < line <= len(lines) and _odd_quotes(lines[line - 1]):
                detail += " (this line has an odd number of quotes: a string left unclosed?)"
            raise ParseError(detail, path, line, col) from None
        raise ParseError(msg, path) from None
    return message


_WRONG_VALUE = [
    (re.compile(r"^Couldn't parse (?:unsigned )?integer: (.*)$", re.S), "expected an integer"),
    (re.compile(r"^Couldn't parse float: (.*)$", re.S), "expected a number"),
    (re.compile(r"^Value out of range: (.*)$", re.S), "value out of range for the field's type"),
    (re.compile(r'^Expected "true" or "false"\.$'), "expected true or false"),
    (re.compile(r"^Expected string but found: '(.*)'$", re.S), "expected a quoted string"),
    (re.compile(r'^Enum type "([\w.]+)" has no value (?:named|with number) (.*?)\.?$', re.S), None),
]
_FIELD_BEFORE = re.compile(r"([A-Za-z_]\w*)\s*:\s*$")
_TOKEN_AT = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[^\s{}<>#]+')


def _wrong_value_detail(detail, row, col):
    """``field: expected an integer, got "ten"`` for protobuf's value errors, which name neither the field
    nor, for booleans, the value; None when ``detail`` is another error or the field cannot be found."""
    field = _FIELD_BEFORE.search(row[:max(col - 1, 0)])
    token = _TOKEN_AT.match(row, max(col - 1, 0))
    if field is None:
        return None
    got = token.group(0) if token else ""
    for pattern, expected in _WRONG_VALUE:
        m = pattern.match(detail)
        if not m:
            continue
        if expected is None:        # an enum: list the names it takes
            try:
                enum = caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName(m.group(1))
            except KeyError:
                return None
            expected = "expected one of " + ", ".join(v.name for v in enum.values)
        return f"{field.group(1)}: {expected}, got {got or (m.group(m.lastindex) if m.lastindex else '')}"
    return None


def _odd_quotes(row):
    """Does ``row`` (outside a # comment) hold an odd number of unescaped double quotes?"""
    count, escaped = 0, False
    for ch in row:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            count += 1
        elif ch == "#" and count % 2 == 0:
            break
    return count % 2 == 1


def _unbalanced_brace(text):
    """(line, col) of the innermost '{' left open at the end and of the first '}' closing nothing
    (1-based, either None), skipping strings and # comments; for readable parse errors."""
    opened, stray = [], None
    quote = None
    for ln, row in enumerate(text.split("\n"), 1):
        escaped = False
        for cn, ch in enumerate(row, 1):
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch in "{<":
                opened.append((ln, cn))
            elif ch in "}>":
                if opened:
                    opened.pop()
                elif stray is None:
                    stray = (ln, cn)
        quote = None   # protobuf strings do not span lines
    return (opened[-1] if opened else None), stray


def read_text_file(path, message):
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ParseError("no such file", path) from None
    except UnicodeDecodeError as exc:
        raise ParseError(f"not a text file (byte {exc.start} is not UTF-8): a binary file where a text "
                         f"{type(message).DESCRIPTOR.name} (.prototxt) is expected?", path) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ParseError(f"cannot read: {exc.strerror or exc}", path) from None
    return parse_text(text, message, path)


def read_binary_file(path, message):
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ParseError("no such file", path) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ParseError(f"cannot read: {exc}", path) from None
    return parse_binary(data, message, path)


def parse_binary(data, message, path=None):
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        what = type(message).DESCRIPTOR.name
        hint = "truncated or another kind of file"
        if _looks_like_text(data):
            hint = "it is text: a .prototxt given where a binary file is expected?"
        raise ParseError(f"not a valid binary {what} ({hint}): {exc}", path) from None
    clash = wrong_type_fields(message)
    if clash:
        what = type(message).DESCRIPTOR.name
        raise ParseError(f"not a binary {what}: {clash} (another kind of file?)", path)
    bad = invalid_utf8_field(message)
    if bad:
        what = type(message).DESCRIPTOR.name
        raise ParseError(f"not a valid binary {what}: {bad} is not UTF-8 text (a corrupt file?)", path)
    return message


def invalid_utf8_field(message, prefix=""):
    """The name of the first string field whose bytes are not UTF-8, else "". protobuf parses such
    bytes without complaint and fails only when the field is read (a UnicodeDecodeError far from
    the file), so binary files are checked once here. Walks messages, not numeric arrays: cheap."""
    desc = type(message).DESCRIPTOR
    for field in desc.fields:
        name = prefix + field.name
        if field.type == field.TYPE_STRING:
            try:   # such values come back as bytes (or raise, depending on the protobuf version)
                value = getattr(message, field.name)
                values = value if is_repeated(field) else [value]
                if any(not isinstance(v, str) for v in values):
                    return f"field '{name}'"
            except UnicodeDecodeError:
                return f"field '{name}'"
            continue
        if field.type != field.TYPE_MESSAGE:
            continue
        repeated = is_repeated(field)
        if repeated:
            children = getattr(message, field.name)
        elif message.HasField(field.name):
            children = [getattr(message, field.name)]
        else:
            continue
        for i, child in enumerate(children):
            bad = invalid_utf8_field(child, f"{name}[{i}]." if repeated else f"{name}.")
            if bad:
                return bad
    return ""


def wrong_type_fields(message):
    """'field x (#n) has the wrong wire type' when the bytes parsed into ``message`` used one of its
    declared field numbers with another wire type (protobuf keeps those as unknown fields): the mark
    of another message type, e.g. a BlobProto read as a SolverState. Unknown numbers (fields of a
    newer Caffe) are fine. Top level only; empty string if none."""
    declared = type(message).DESCRIPTOR.fields_by_number
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
        numbers = sorted({f.field_number for f in UnknownFieldSet(message)} & set(declared))
    except Exception:  # noqa: BLE001 - an older protobuf without UnknownFieldSet: skip the check
        return ""
    if not numbers:
        return ""
    n = numbers[0]
    return f"field '{declared[n].name}' (#{n}) has the wrong wire type"


def _looks_like_text(data):
    head = bytes(data[:512])
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 32 or b in (9, 10, 13) for b in head)


# --- nets ------------------------------------------------------------------------------------

def load_net_param(source, path=None):
    """A NetParameter (current format) from a prototxt path, prototxt text or a NetParameter."""
    if isinstance(source, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
    elif isinstance(source, (str, os.PathLike)) and (os.path.exists(source) or "{" not in str(source)):
        path = os.fspath(source)
        param = read_text_file(path, caffe_pb2.NetParameter())
    else:
        param = parse_text(str(source), caffe_pb2.NetParameter(), path)
    return upgrade_net(param, path)


def upgrade_net(param, path=None):
    """Bring a NetParameter to the current format in place (V1 layers, net inputs, data transforms)."""
    if len(param.layers) and len(param.layer):
        raise ParseError("net mixes V1 'layers' and current 'layer' entries; use one format", path)
    if len(param.layers):
        if any(l.HasField("layer") for l in param.layers):
            raise ParseError("V0 nets (layers { layer { ... } }) are not supported; upgrade them with "
                             "Caffe's upgrade_net_proto_text first", path)
        v1 = list(param.layers)
        del param.layers[:]
        for old in v1:
            _upgrade_v1_layer(old, param.layer.add(), path)
    _upgrade_data_transform(param)
    _upgrade_input_fields(param, path)
    return param


def _upgrade_v1_layer(old, new, path):
    if old.bottom:
        new.bottom.extend(old.bottom)
    if old.top:
        new.top.extend(old.top)
    if old.HasField("name"):
        new.name = old.name
    for rule in old.include:
        new.include.add().CopyFrom(rule)
    for rule in old.exclude:
        new.exclude.add().CopyFrom(rule)
    if old.HasField("type"):
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(old.type)
        new.type = V1_TYPE_NAMES.get(enum_name, enum_name)
    for blob in old.blobs:
        new.blobs.add().CopyFrom(blob)

    def spec(i):
        while len(new.param) <= i:
            new.param.add()
        return new.param[i]

    for i, name in enumerate(old.param):
        spec(i).name = name
    for i, mode in enumerate(old.blob_share_mode):
        spec(i).share_mode = mode  # STRICT/PERMISSIVE share numbers in both enums
    for i, lr in enumerate(old.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(old.weight_decay):
        spec(i).decay_mult = decay
    new.loss_weight.extend(old.loss_weight)
    # every *_param the V1 layer has is the same message in LayerParameter
    for field, value in old.ListFields():
        if field.name.endswith("_param") and field.name in new.DESCRIPTOR.fields_by_name:
            getattr(new, field.name).CopyFrom(value)


def _upgrade_data_transform(param):
    """Old data layers kept scale/mean_file/crop_size/mirror in their own param: move to transform_param."""
    for layer in param.layer:
        for src_name in ("data_param", "image_data_param", "window_data_param"):
            if not layer.HasField(src_name):
                continue
            src = getattr(layer, src_name)
            for f in ("scale", "mean_file", "crop_size", "mirror"):
                if f in src.DESCRIPTOR.fields_by_name and src.HasField(f):
                    setattr(layer.transform_param, f, getattr(src, f))
                    src.ClearField(f)


def _upgrade_input_fields(param, path):
    """``input:`` with ``input_dim``/``input_shape`` at the top becomes an Input layer, as Caffe does."""
    if not len(param.input):
        if len(param.input_dim) or len(param.input_shape):
            raise ParseError("input_dim/input_shape given without 'input:' names", path)
        return
    n = len(param.input)
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    layer.top.extend(param.input)
    if len(param.input_shape):
        if len(param.input_shape) not in (1, n):
            raise ParseError(f"{n} inputs but {len(param.input_shape)} input_shape entries", path)
        for shape in param.input_shape:
            layer.input_param.shape.add().CopyFrom(shape)
    elif len(param.input_dim):
        if len(param.input_dim) != 4 * n:
            raise ParseError(f"{n} inputs need {4 * n} input_dim values, got {len(param.input_dim)}", path)
        for i in range(n):
            layer.input_param.shape.add().dim.extend(param.input_dim[4 * i:4 * i + 4])
    else:
        # caffemodels written before late 2015 list bare input names; Caffe drops them
        param.ClearField("input")
        return
    layers = [layer] + list(param.layer)
    del param.layer[:]
    param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_dim")
    param.ClearField("input_shape")


# --- NetState rules ----------------------------------------------------------------------------

def state_meets_rule(state, rule, layer_name=None):
    """Caffe's StateMeetsRule. With ``layer_name`` the reason a rule is not met is logged in Caffe's
    words (Net::Init prints these lines; the min_level text is Caffe's, 'above' included)."""
    def no(message):
        if layer_name is not None:
            logging.getLogger("minicaffe").info("%s specified by a rule in layer %s", message, layer_name)
        return False
    if rule.HasField("phase") and rule.phase != state.phase:
        return no(f"The NetState phase ({state.phase}) differed from the phase ({rule.phase})")
    if rule.HasField("min_level") and state.level < rule.min_level:
        return no(f"The NetState level ({state.level}) is above the min_level ({rule.min_level})")
    if rule.HasField("max_level") and state.level > rule.max_level:
        return no(f"The NetState level ({state.level}) is above the max_level ({rule.max_level})")
    stages = set(state.stage)
    for s in rule.stage:
        if s not in stages:
            return no(f"The NetState did not contain stage '{s}'")
    for s in rule.not_stage:
        if s in stages:
            return no(f"The NetState contained a not_stage '{s}'")
    return True


def filter_net(param, state, log_rules=False):
    """The layers of ``param`` that ``state`` includes (Caffe's FilterNet); returns a new NetParameter.
    ``log_rules``: log why each rule is not met, as Caffe does while building a net."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise NetError("specify either include or exclude rules, not both", layer.name, layer.type)
        if len(layer.include):
            keep = any(state_meets_rule(state, r, layer.name if log_rules else None) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r, layer.name if log_rules else None) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


def make_state(phase, level=0, stages=(), base=None):
    state = caffe_pb2.NetState()
    if base is not None:
        state.CopyFrom(base)
    if phase is not None:
        state.phase = phase
    if level:
        state.level = level
    if stages:
        state.stage.extend(stages)
    return state


def load_solver_param(source):
    """A SolverParameter from a path or text (V1 ``solver_type`` kept; the solver reads both)."""
    if isinstance(source, caffe_pb2.SolverParameter):
        return source
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        return read_text_file(source, caffe_pb2.SolverParameter())
    if isinstance(source, (str, os.PathLike)) and "\n" not in str(source) and ":" not in str(source):
        raise ParseError("no such file", os.fspath(source))
    return parse_text(str(source), caffe_pb2.SolverParameter())


__all__ = ["parse_text", "read_text_file", "read_binary_file", "parse_binary", "load_net_param",
           "upgrade_net", "filter_net", "state_meets_rule", "make_state", "load_solver_param",
           "wrong_type_fields", "MinicaffeError"]
