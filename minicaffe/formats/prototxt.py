"""Reading Caffe's text and binary definitions: located parse errors, V1 → current upgrade, NetState rules.

Everything here turns user files into ``caffe_pb2`` messages in the current format, the way Caffe's
``upgrade_proto.cpp`` and ``Net::FilterNet`` do, so the rest of minicaffe sees one format only.
"""
import logging
import os
import re
import struct

from google.protobuf import text_encoding, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from ..errors import MinicaffeError, NetError, ParseError
from ..proto import caffe_pb2, is_repeated

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

log = logging.getLogger("minicaffe")

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


def prototxt_path(source):
    """The one rule that tells a prototxt *path* from prototxt *text*: the path (a str) when
    ``source`` names a file, None when it is text (or not a str/path at all).

    A path object is a path; a string is a path when a file of that name exists, or when it could
    not be prototxt text (no newline, ':' or '{': a misspelt file name then reports "no such file"
    instead of a parse error). Every reader of nets and solvers asks this, so one argument is never
    a path to one of them and text to another."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if not isinstance(source, str):
        return None
    if os.path.exists(source) or not any(c in source for c in "\n:{"):
        return source
    return None


def read_prototxt(source, message, path=None):
    """``message`` read from a prototxt path or parsed from prototxt text (``prototxt_path``
    decides which); returns ``(message, file path or None)``. ``path`` names text in errors."""
    file = prototxt_path(source)
    if file is not None:
        return read_text_file(file, message), file
    return parse_text(str(source), message, path), None


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

# --- Caffe's text output ---------------------------------------------------------------------------

def _float_text(value, single):
    """C++ protobuf's SimpleFtoa/SimpleDtoa: %g with FLT_DIG (6) or DBL_DIG (15) digits, and 3 or 2
    more when that does not read back as the same value (Python prints the shortest repr, 1.0 as 1.0)."""
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    digits, extra = (6, 3) if single else (15, 2)
    text = "%.*g" % (digits, value)
    if single:
        same = struct.pack("<f", float(text)) == struct.pack("<f", value)
    else:
        same = float(text) == value
    return text if same else "%.*g" % (digits + extra, value)


def _scalar_text(field, value, utf8):
    fd = field
    if fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        if utf8 and fd.type == fd.TYPE_STRING:
            return '"' + text_encoding.CEscape(raw.decode("utf-8"), as_utf8=True) + '"'
        return '"' + text_encoding.CEscape(raw, as_utf8=False) + '"'
    if fd.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        named = fd.enum_type.values_by_number.get(value)
        return named.name if named is not None else str(value)
    if fd.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return "true" if value else "false"
    if fd.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return _float_text(value, fd.cpp_type == FieldDescriptor.CPPTYPE_FLOAT)
    return str(value)


def _is_repeated(field):
    repeated = getattr(field, "is_repeated", None)       # protobuf >= 5.29; older ones have label
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def caffe_text(message, utf8=False):
    """``message`` in protobuf text format exactly as Caffe's C++ writes it: TextFormat::Print
    (WriteProtoToTextFile, what the upgrade tools write; non-ASCII bytes as octal escapes) or, with
    ``utf8``, DebugString (the parameter dumps in Caffe's logs). Python's text_format differs in
    floats: it writes ``lr_mult: 1.0`` and ``0.12345679`` where C++ writes ``1`` and ``0.123456791``."""
    lines = []

    def emit(msg, indent):
        pad = "  " * indent
        for field, value in msg.ListFields():
            values = value if _is_repeated(field) else [value]
            for v in values:
                if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    lines.append(f"{pad}{field.name} {{")
                    emit(v, indent + 1)
                    lines.append(f"{pad}}}")
                else:
                    lines.append(f"{pad}{field.name}: {_scalar_text(field, v, utf8)}")
    emit(message, 0)
    return "".join(line + "\n" for line in lines)


def load_net_param(source, path=None):
    """A NetParameter (current format) from a prototxt path, prototxt text or a NetParameter."""
    if isinstance(source, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
    else:
        param, file = read_prototxt(source, caffe_pb2.NetParameter(), path)
        path = file or path
    return upgrade_net(param, path)


def upgrade_net(param, path=None, problems=None):
    """Bring a NetParameter to the current format in place, in the order of Caffe's UpgradeNetAsNeeded:
    V0 layers (``layers { layer { type: "conv" } }``) to V1, the V1 data layers' transformation fields
    to ``transform_param``, V1 to current ``layer`` entries, net inputs to an Input layer, BatchNorm's
    three param specs frozen. Each step logs Caffe's lines. What Caffe only reports (a V0 field the
    layer type has no place for) is dropped, logged, and appended to ``problems`` when given."""
    problems = [] if problems is None else problems
    where = "" if path is None else os.fspath(path)
    if len(param.layers) and len(param.layer):
        raise ParseError("net mixes V1 'layers' and current 'layer' entries; use one format", path)
    if any(l.HasField("layer") for l in param.layers):
        log.info("Attempting to upgrade input file specified using deprecated V0LayerParameter: %s", where)
        before = len(problems)
        _upgrade_v0_net(param, path, problems)
        if len(problems) > before:
            log.error("Warning: had one or more problems upgrading V0NetParameter to NetParameter (see "
                      "above); continuing anyway.")
        else:
            log.info("Successfully upgraded file specified using deprecated V0LayerParameter")
        log.warning("Note that future Caffe releases will not support V0NetParameter; use "
                    "./build/tools/upgrade_net_proto_text for prototxt and ./build/tools/"
                    "upgrade_net_proto_binary for model weights upgrade this and any other net protos "
                    "to the new format.")
    if len(param.layers):
        if _v1_needs_data_upgrade(param):
            log.info("Attempting to upgrade input file specified using deprecated transformation "
                     "parameters: %s", where)
            _upgrade_v1_data_transform(param)
            log.info("Successfully upgraded file specified using deprecated data transformation "
                     "parameters.")
            log.warning("Note that future Caffe releases will only support transform_param messages "
                        "for transformation fields.")
        log.info("Attempting to upgrade input file specified using deprecated V1LayerParameter: %s", where)
        v1 = list(param.layers)
        del param.layers[:]
        for old in v1:
            _upgrade_v1_layer(old, param.layer.add(), path)
        log.info("Successfully upgraded file specified using deprecated V1LayerParameter")
    else:
        # an extension: Caffe leaves these fields of a current-format layer alone (and ignores them)
        _upgrade_data_transform(param)
    if len(param.input):
        log.info("Attempting to upgrade input file specified using deprecated input fields: %s", where)
        _upgrade_input_fields(param, path)
        log.info("Successfully upgraded file specified using deprecated input fields.")
        log.warning("Note that future Caffe releases will only support input layers and not input fields.")
    else:
        _upgrade_input_fields(param, path)
    if any(is_old_batch_norm(layer) for layer in param.layer):
        log.info("Attempting to upgrade batch norm layers using deprecated params: %s", where)
        for layer in param.layer:
            if is_old_batch_norm(layer):
                for spec in layer.param:
                    spec.lr_mult = 0.0
                    spec.decay_mult = 0.0
        log.info("Successfully upgraded batch norm layers using deprecated params.")
    return param


def is_old_batch_norm(layer):
    """A BatchNorm layer declaring three param specs, as the first BatchNorm definition required."""
    return layer.type == "BatchNorm" and len(layer.param) == 3


# V0 layer type → V1 enum name (Caffe's UpgradeV0LayerType)
V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}

_DATA_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
                 "window_data": "window_data_param"}
_FILLED = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_WINDOW = {"window_data": "window_data_param"}
# V0 field → {V0 type: (V1 param message, its field)}, or (message, field) for every type; in the
# order Caffe's UpgradeV0LayerParameter checks them (the order its problems are reported in)
_V0_FIELDS = [
    ("num_output", {t: (m, "num_output") for t, m in _FILLED.items()}),
    ("biasterm", {t: (m, "bias_term") for t, m in _FILLED.items()}),
    ("weight_filler", {t: (m, "weight_filler") for t, m in _FILLED.items()}),
    ("bias_filler", {t: (m, "bias_filler") for t, m in _FILLED.items()}),
    ("pad", {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")}),
    ("kernelsize", {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")}),
    ("group", {"conv": ("convolution_param", "group")}),
    ("stride", {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")}),
    ("pool", {"pool": ("pooling_param", "pool")}),
    ("dropout_ratio", {"dropout": ("dropout_param", "dropout_ratio")}),
    ("local_size", {"lrn": ("lrn_param", "local_size")}),
    ("alpha", {"lrn": ("lrn_param", "alpha")}),
    ("beta", {"lrn": ("lrn_param", "beta")}),
    ("k", {"lrn": ("lrn_param", "k")}),
    ("source", dict({t: (m, "source") for t, m in _DATA_SOURCES.items()},
                    infogain_loss=("infogain_loss_param", "source"))),
    ("scale", ("transform_param", "scale")),
    ("meanfile", ("transform_param", "mean_file")),
    ("batchsize", {t: (m, "batch_size") for t, m in _DATA_SOURCES.items()}),
    ("cropsize", ("transform_param", "crop_size")),
    ("mirror", ("transform_param", "mirror")),
    ("rand_skip", {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")}),
    ("shuffle_images", {"images": ("image_data_param", "shuffle")}),
    ("new_height", {"images": ("image_data_param", "new_height")}),
    ("new_width", {"images": ("image_data_param", "new_width")}),
    ("concat_dim", {"concat": ("concat_param", "concat_dim")}),
    ("det_fg_threshold", {t: (m, "fg_threshold") for t, m in _WINDOW.items()}),
    ("det_bg_threshold", {t: (m, "bg_threshold") for t, m in _WINDOW.items()}),
    ("det_fg_fraction", {t: (m, "fg_fraction") for t, m in _WINDOW.items()}),
    ("det_context_pad", {t: (m, "context_pad") for t, m in _WINDOW.items()}),
    ("det_crop_mode", {t: (m, "crop_mode") for t, m in _WINDOW.items()}),
    ("hdf5_output_param", {"hdf5_output": ("hdf5_output_param", None)}),
]


def _v0_problem(problems, message):
    log.error("%s", message)
    problems.append(message)


def _upgrade_v0_net(param, path, problems):
    """Caffe's UpgradeV0Net: padding layers folded into the conv/pool layer they feed, each V0 layer
    to a V1 one; of the net's own fields only name, input, input_dim and force_backward are kept."""
    layers = _fold_v0_padding(param, path)
    old = caffe_pb2.NetParameter()
    old.CopyFrom(param)
    param.Clear()
    if old.HasField("name"):
        param.name = old.name
    for connection in layers:
        _upgrade_v0_layer(connection, param.layers.add(), path, problems)
    param.input.extend(old.input)
    param.input_dim.extend(old.input_dim)
    if old.HasField("force_backward"):
        param.force_backward = old.force_backward


def _fold_v0_padding(param, path):
    """Caffe's UpgradeV0PaddingLayers: the layers without the "padding" ones, a conv or pool layer fed
    by one taking the padding layer's pad and input instead."""
    last_top = {name: -1 for name in param.input}
    out = []
    for i, connection in enumerate(param.layers):
        v0 = connection.layer
        kept = None
        if v0.type != "padding":
            kept = caffe_pb2.V1LayerParameter()
            kept.CopyFrom(connection)
            out.append(kept)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_top:
                raise ParseError(f"layer '{v0.name}': unknown bottom blob '{blob}' (no layer before it "
                                 f"produces it)", path)
            source = last_top[blob]
            if source == -1 or param.layers[source].layer.type != "padding":
                continue
            pad = param.layers[source]
            if v0.type not in ("conv", "pool"):
                raise ParseError(f"layer '{v0.name}': a padding layer can only feed a conv or pool "
                                 f"layer, not '{v0.type}'", path)
            if len(connection.bottom) != 1 or len(pad.bottom) != 1 or len(pad.top) != 1:
                raise ParseError(f"layer '{v0.name}': a padding layer and the layer it feeds take "
                                 f"one bottom and give one top", path)
            kept.layer.pad = pad.layer.pad
            kept.bottom[j] = pad.bottom[0]
        for blob in connection.top:
            last_top[blob] = i
    return out


def _upgrade_v0_layer(connection, new, path, problems):
    """Caffe's UpgradeV0LayerParameter: one V0 layer (inside its V1 connection) → a V1 layer."""
    new.bottom.extend(connection.bottom)
    new.top.extend(connection.top)
    if not connection.HasField("layer"):
        return
    v0 = connection.layer
    kind = v0.type
    if v0.HasField("name"):
        new.name = v0.name
    if v0.HasField("type"):
        if kind not in V0_TYPES:
            raise ParseError(f"layer '{v0.name}': unknown V0 layer type '{kind}'", path)
        new.type = caffe_pb2.V1LayerParameter.LayerType.Value(V0_TYPES[kind])
    for blob in v0.blobs:
        new.blobs.add().CopyFrom(blob)
    new.blobs_lr.extend(v0.blobs_lr)
    new.weight_decay.extend(v0.weight_decay)
    for name, targets in _V0_FIELDS:
        if not v0.HasField(name):
            continue
        target = targets if isinstance(targets, tuple) else targets.get(kind)
        if target is None:
            _v0_problem(problems, f"Unknown parameter {'shuffle' if name == 'shuffle_images' else name} "
                                  f"for layer type {kind}")
            continue
        message, field = target
        dest = getattr(new, message)
        value = getattr(v0, name)
        if field is None:
            dest.CopyFrom(value)
        elif dest.DESCRIPTOR.fields_by_name[field].cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            getattr(dest, field).CopyFrom(value)
        elif _is_repeated(dest.DESCRIPTOR.fields_by_name[field]):
            getattr(dest, field).append(value)
        else:
            setattr(dest, field, value)


_V1_DATA_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}


def _v1_needs_data_upgrade(param):
    """Caffe's NetNeedsDataUpgrade: a V1 data layer with a transformation field in its own param."""
    for layer in param.layers:
        name = _V1_DATA_PARAMS.get(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
        if name and any(getattr(layer, name).HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror")):
            return True
    return False


def _upgrade_v1_data_transform(param):
    """Caffe's UpgradeNetDataTransformation: every V1 data layer gets its param and a transform_param
    (both written out, if empty), the transformation fields moved from the one to the other."""
    for layer in param.layers:
        name = _V1_DATA_PARAMS.get(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
        if not name:
            continue
        src = getattr(layer, name)
        src.SetInParent()
        layer.transform_param.SetInParent()
        for f in ("scale", "mean_file", "crop_size", "mirror"):
            if src.HasField(f):
                setattr(layer.transform_param, f, getattr(src, f))
                src.ClearField(f)


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
    return read_prototxt(source, caffe_pb2.SolverParameter())[0]


__all__ = ["parse_text", "prototxt_path", "read_prototxt", "read_text_file", "read_binary_file", "parse_binary", "load_net_param",
           "upgrade_net", "filter_net", "state_meets_rule", "make_state", "load_solver_param",
           "wrong_type_fields", "caffe_text", "is_old_batch_norm", "MinicaffeError"]
