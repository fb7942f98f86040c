"""pycaffe's ``caffe.draw``: a picture of a net definition, through Graphviz.

The graph is written as DOT text here, so ``.dot``/``.gv``/``.raw`` files need nothing else;
images (``.png``, ``.svg``, ``.pdf``, ...) run Graphviz's ``dot`` program (Debian: ``apt-get install
graphviz``). ``get_pydot_graph`` returns a pydot graph for code that wants one (needs pydot).
Layers are boxes (convolutions red, pooling orange, inner products purple, in-place layers green),
blobs grey octagons; edges out of Data/Convolution/InnerProduct layers carry the batch size or
``num_output`` as in pycaffe.
"""
import os
import shutil
import subprocess

from .errors import MinicaffeError
from .proto import caffe_pb2

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
TEXT_FORMATS = ("dot", "gv", "raw")


class DrawError(MinicaffeError):
    """The graph cannot be rendered (no Graphviz, an unknown format, no pydot)."""


def get_pooling_types_dict():
    """Pooling method number → name (0 → 'MAX', ...)."""
    desc = caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR
    return {v.number: name for name, v in desc.values_by_name.items()}


def get_edge_label(layer):
    """pycaffe's edge labels: 'Batch N' out of Data layers, num_output out of conv/IP layers."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def get_layer_lr_mult(layer):
    """(weights, bias) lr_mult of a Convolution/Deconvolution/InnerProduct layer (1.0 when unset)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    mults = [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in layer.param[:2]]
    if len(layer.param) > 2:
        raise ValueError(f"layer '{layer.name}' has {len(layer.param)} param entries; expected at most 2")
    return tuple(mults + [1.0] * (2 - len(mults)))


def _first(values, default):
    return values[0] if len(values) else default


def get_layer_label(layer, rankdir, display_lrm=False):
    """Node text: name, (type [pool method]), kernel/stride/pad for spatial layers, lr mults if asked.

    Lines are separated by a space for vertical layouts (TB/BT) and a newline otherwise, as pycaffe.
    """
    separator = " " if rankdir in ("TB", "BT") else "\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        parts.append(f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            p = layer.pooling_param
            kernel, stride, pad = p.kernel_size, p.stride, p.pad
        else:
            p = layer.convolution_param
            kernel, stride, pad = _first(p.kernel_size, 1), _first(p.stride, 1), _first(p.pad, 0)
        parts.append(separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        lrm0, lrm1 = get_layer_lr_mult(layer)
        if lrm0 or lrm1:
            parts.append(f"lr mult: {lrm0:.1f}, {lrm1:.1f}")
    return separator.join(parts)


def choose_color_by_layertype(layertype):
    if layertype in ("Convolution", "Deconvolution"):
        return "#FF5050"
    if layertype == "Pooling":
        return "#FF9900"
    if layertype == "InnerProduct":
        return "#CC33FF"
    return "#6495ED"


def _net_param(caffe_net):
    """A current-format NetParameter from a NetParameter (V1 upgraded), a prototxt path or text."""
    from .prototxt import load_net_param, upgrade_net
    if isinstance(caffe_net, caffe_pb2.NetParameter):
        if len(caffe_net.layers) or len(caffe_net.input):
            net = caffe_pb2.NetParameter()
            net.CopyFrom(caffe_net)
            return upgrade_net(net)
        return caffe_net
    return load_net_param(caffe_net)


def _included(layer, phase):
    """pycaffe's phase rule for drawing: only the phases in include/exclude count (stages ignored)."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise MinicaffeError(f"layer '{layer.name}' has both include and exclude rules")
    included = not len(layer.include)
    for rule in layer.include:
        included = included or rule.phase == phase
    for rule in layer.exclude:
        included = included and rule.phase != phase
    return included


def _graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """(name, nodes {id: attrs}, edges [(src, dst, label)]) of the drawing."""
    net = _net_param(caffe_net)
    nodes, edges = {}, []
    for layer in net.layer:
        if not _included(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        style = dict(NEURON_LAYER_STYLE) if in_place else \
            dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[node] = dict(style, label=get_layer_label(layer, rankdir, display_lrm))
        for blob in layer.bottom:
            nodes.setdefault(blob + "_blob", dict(BLOB_STYLE, label=blob))
            edges.append((blob + "_blob", node, ""))
        label = get_edge_label(layer) if label_edges else ""
        for blob in layer.top:
            nodes.setdefault(blob + "_blob", dict(BLOB_STYLE, label=blob))
            edges.append((node, blob + "_blob", label))
    return (net.name or "Net"), nodes, edges


def _quote(text, record=False):
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if record:   # characters that structure record labels
        for ch in "{}|<>":
            text = text.replace(ch, "\\" + ch)
    return '"' + text.replace("\n", "\\n") + '"'


def _attrs(attrs):
    record = attrs.get("shape") == "record"
    items = []
    for key, value in attrs.items():
        items.append(f"{key}={_quote(str(value), record and key == 'label')}")
    return ", ".join(items)


def to_dot(caffe_net, rankdir="LR", label_edges=True, phase=None, display_lrm=False):
    """The DOT source text of the drawing (no Graphviz needed)."""
    name, nodes, edges = _graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    lines = [f"digraph {_quote(name)} {{", f"  rankdir={_quote(rankdir)};"]
    lines += [f"  {_quote(node)} [{_attrs(attrs)}];" for node, attrs in nodes.items()]
    for src, dst, label in edges:
        extra = f" [label={_quote(label)}]" if label else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The drawing as a ``pydot.Dot`` graph (needs pydot: ``pip install pydot``)."""
    try:
        import pydot
    except ImportError:
        raise DrawError("get_pydot_graph needs pydot: pip install pydot (or write a .dot file with "
                        "draw_net_to_file, which needs nothing)") from None
    name, nodes, edges = _graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    graph = pydot.Dot(_quote(name), graph_type="digraph", rankdir=rankdir)
    for node, attrs in nodes.items():
        record = attrs.get("shape") == "record"
        kw = {k: _quote(str(v), record and k == "label") if k in ("label", "fillcolor") else v
              for k, v in attrs.items()}
        graph.add_node(pydot.Node(_quote(node), **kw))
    for src, dst, label in edges:
        kw = {"label": _quote(label)} if label else {}
        graph.add_edge(pydot.Edge(_quote(src), _quote(dst), **kw))
    return graph


def render_dot(source, ext="png"):
    """Run Graphviz's ``dot -T<ext>`` on DOT source; returns the bytes. Errors say what to install."""
    dot = shutil.which("dot")
    if dot is None:
        raise DrawError(f"drawing a .{ext} needs Graphviz's 'dot' program, which is not on PATH "
                        "(Debian/Ubuntu: apt-get install graphviz; conda: conda install graphviz); "
                        "a .dot file needs nothing and can be rendered elsewhere")
    try:
        proc = subprocess.run([dot, f"-T{ext}"], input=source.encode("utf-8"), capture_output=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrawError(f"running {dot} failed: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = err[0] if err else f"exit status {proc.returncode}"
        raise DrawError(f"dot -T{ext} failed: {detail}")
    return proc.stdout


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The drawing encoded as ``ext`` (bytes): DOT text for dot/gv/raw, else rendered by Graphviz."""
    source = to_dot(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    ext = ext.lower().lstrip(".")
    if ext in TEXT_FORMATS:
        return source.encode("utf-8")
    return render_dot(source, ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Write the drawing to ``filename`` in the format its extension names (atomically).

    ``.dot``/``.gv``/``.raw`` give Graphviz source, anything else is rendered by ``dot``.
    """
    from .fileio import atomic_write
    filename = os.fspath(filename)
    base = os.path.basename(filename)
    if "." not in base:
        raise DrawError(f"{filename}: give the file an extension naming the format (.png, .svg, .pdf, .dot)")
    ext = base.rsplit(".", 1)[1]
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    atomic_write(filename, data)


__all__ = ["get_pydot_graph", "draw_net", "draw_net_to_file", "to_dot", "render_dot", "DrawError",
           "get_layer_label", "get_edge_label", "get_layer_lr_mult", "choose_color_by_layertype",
           "get_pooling_types_dict"]
