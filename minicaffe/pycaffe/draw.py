"""pycaffe's ``caffe.draw``: a picture of a net definition, through Graphviz.

The graph is written as DOT text here, so ``.dot``/``.gv``/``.raw`` files need nothing else;
images (``.png``, ``.svg``, ``.pdf``, ...) run Graphviz's ``dot`` program (Debian: ``apt-get install
graphviz``). ``get_pydot_graph`` returns a pydot graph for code that wants one (needs pydot).
Layers are boxes (convolutions red, pooling orange, inner products purple, in-place layers green),
blobs grey octagons; edges out of Data/Convolution/InnerProduct layers carry the batch size or
``num_output`` as in pycaffe. ``rankdir="AUTO"`` (draw_net's default) lays deep nets out in columns
so the picture stays near square (see the notes above ``AUTO``); ``net_shapes`` gives the blob
shapes and parameter counts the labels can carry.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from typing import Any, Mapping, Sequence, Union

from ..errors import MinicaffeError
from ..proto import caffe_pb2

# a net to draw: a NetParameter (V1 upgraded), a prototxt path or prototxt text
NetSource = Union[caffe_pb2.NetParameter, str, os.PathLike]

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
    from ..formats.prototxt import load_net_param, upgrade_net
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


class _Drawing:
    """What is drawn: nodes {id: attrs}, edges [(src, dst, label, attrs)], in-place layers
    {layer node: blob node}, the other nodes in net order (``main``), and name groups (clusters)."""

    def __init__(self, name):
        self.name, self.nodes, self.edges, self.in_place, self.main = name, {}, [], {}, []
        self.sources = set()          # blobs of layers without bottoms (data, labels)

    def add(self, node, attrs, main=True):
        if node not in self.nodes:
            self.nodes[node] = attrs
            if main:
                self.main.append(node)


def _shape_text(shape):
    return "×".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False, blob_shapes=None,
           param_counts=None):
    """The drawing (a ``_Drawing``). ``blob_shapes`` {blob: shape} and ``param_counts`` {layer: n}
    (from ``net_shapes``) add a line to blob and layer labels. ``rankdir`` only picks the label
    line separator here (the auto layout passes LR: lines under each other)."""
    net = _net_param(caffe_net)
    g = _Drawing(net.name or "Net")
    sep = " " if rankdir in ("TB", "BT") else "\n"
    for layer in net.layer:
        if not _included(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        style = dict(NEURON_LAYER_STYLE) if in_place else \
            dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        label = get_layer_label(layer, rankdir, display_lrm)
        if param_counts and param_counts.get(layer.name):
            label += f"{sep}params: {param_counts[layer.name]:,}"

        def add_blob(blob):
            text = blob
            if blob_shapes and blob in blob_shapes:
                text += "\n" + _shape_text(blob_shapes[blob])
            g.add(blob + "_blob", dict(BLOB_STYLE, label=text))

        for blob in layer.bottom:
            add_blob(blob)
        g.add(node, dict(style, label=label), main=not in_place)
        for blob in layer.top:
            add_blob(blob)
        if in_place:
            g.in_place[node] = layer.top[0] + "_blob"
        if not len(layer.bottom):
            g.sources.update(t + "_blob" for t in layer.top)
        for blob in layer.bottom:
            g.edges.append((blob + "_blob", node, "", {}))
        label = get_edge_label(layer) if label_edges else ""
        for blob in layer.top:
            g.edges.append((node, blob + "_blob", label, {}))
    return g


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


# --- the automatic layout -----------------------------------------------------------------------
#
# Caffe draws every net left to right in one row: GoogLeNet becomes 25784×1395 pixels. Drawn top to
# bottom it is one column three times taller than wide, and VGG-16 drifts into a staircase: each
# in-place ReLU takes a rank of its own beside the chain and pushes the next layer sideways. The
# auto layout (rankdir AUTO, draw_net's default) keeps small nets in Caffe's row; deeper ones go top
# to bottom with in-place layers beside their blob (same rank, no rank constraint), layers sharing
# a name prefix ("inception_3a/...") boxed together, and the chain cut at its bottlenecks into
# side-by-side columns, as many as bring the picture closest to square. The column heights come
# from a first layout of the single column by Graphviz (``dot -Tplain``, a fraction of a second).

AUTO = "AUTO"
DEEP_NET = 12           # layers on the longest path above which AUTO turns to columns
TARGET_ASPECT = 1.0     # height / width the number of columns aims for
MAX_COLUMNS = 8


def _longest_path(g):
    """Layers on the longest path through the main (not in-place) nodes."""
    depth = {}
    succ = {}
    for src, dst, _, _ in g.edges:
        if src in g.in_place or dst in g.in_place:
            continue
        succ.setdefault(src, []).append(dst)
    pos = {n: i for i, n in enumerate(g.main)}
    best = 0
    for n in g.main:
        d = depth.get(n, 0) + (0 if n.endswith("_blob") else 1)
        best = max(best, d)
        for m in succ.get(n, ()):
            if pos.get(m, -1) > pos[n] and depth.get(m, 0) < d:
                depth[m] = d
    return best


def _groups(g):
    """{node: group name} for layers/blobs whose names share a prefix before '/' (GoogLeNet's
    inception modules); groups of fewer than 4 nodes are left out."""
    members = {}
    for node, attrs in g.nodes.items():
        name = attrs["label"].split("\n")[0].split(" ")[0]
        if "/" in name:
            members.setdefault(name.split("/")[0], []).append(node)
    return {n: prefix for prefix, nodes in members.items() if len(nodes) >= 4 for n in nodes}


def _cut_points(g, groups):
    """Positions i in ``g.main`` after which the chain may be cut: a blob no other edge spans
    (edges out of data sources excepted: they become long edges), not inside a group."""
    pos = {n: i for i, n in enumerate(g.main)}
    spans = [0] * (len(g.main) + 1)
    for src, dst, _, _ in g.edges:
        if src in g.sources or src not in pos or dst not in pos:
            continue
        a, b = pos[src], pos[dst]
        if b - a > 1:
            spans[a + 1] += 1       # edge spans the cuts after positions a+1 .. b-1
            spans[b] -= 1
    cuts, running = [], 0
    for i, node in enumerate(g.main[:-1]):
        running += spans[i]
        after = g.main[i + 1]
        if running == 0 and node.endswith("_blob") and not (groups.get(node) and groups.get(node) ==
                                                              groups.get(after)):
            cuts.append(i)
    return cuts


def _plain_layout(source):
    """(width, height, {node: y from the top}) of ``dot -Tplain``; None without Graphviz."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    try:
        proc = subprocess.run([dot, "-Tplain"], input=source.encode("utf-8"), capture_output=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    import shlex
    width = height = None
    ys = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("graph "):
            _, _, width, height = line.split()[:4]
            width, height = float(width), float(height)
        elif line.startswith("node "):
            try:
                parts = shlex.split(line)
            except ValueError:
                continue
            ys[parts[1]] = height - float(parts[3])
    return (width, height, ys) if width else None


def _columns(g, groups, single_source):
    """{main node: column} for the auto layout, cut where the picture comes closest to square."""
    cuts = _cut_points(g, groups)
    layout = _plain_layout(single_source) if cuts else None
    if layout is None:
        return {}
    width, height, ys = layout
    best_k = min(range(1, min(MAX_COLUMNS, len(cuts) + 1) + 1),
                 key=lambda k: abs(math.log((height / k) / (k * width + (k - 1) * 0.5) / TARGET_ASPECT)))
    if best_k == 1:
        return {}
    chosen, last = [], -1
    for j in range(1, best_k):
        target = height * j / best_k
        options = [i for i in cuts if i > last and g.main[i] in ys]
        if not options:
            break
        i = min(options, key=lambda c: abs(ys[g.main[c]] - target))
        chosen.append(i)
        last = i
    column, col = {}, 0
    for i, node in enumerate(g.main):
        column[node] = col
        if i in chosen:
            col += 1
    return column


def _continue_columns(g, column):
    """A copy of each blob cut at the end of a column heads the next one (dashed outline, a dashed
    edge from the original): its consumers hang under the copy instead of under long edges."""
    nodes, edges, col = dict(g.nodes), [], dict(column)
    for src, dst, label, extra in g.edges:
        if (src in g.in_place or dst in g.in_place or src in g.sources
                or column.get(src, 0) == column.get(dst, 0)):
            edges.append((src, dst, label, extra))
            continue
        copy = f"{src} (continued)"
        if copy not in nodes:
            nodes[copy] = dict(g.nodes[src], style="filled,dashed")
            col[copy] = column[dst]
            edges.append((src, copy, "", {"constraint": "false", "style": "dashed", "color": "#808080"}))
        edges.append((copy, dst, label, extra))
    out = _Drawing(g.name)
    out.nodes, out.edges, out.in_place, out.sources = nodes, edges, g.in_place, g.sources
    out.main = g.main + [n for n in col if n not in g.main]
    return out, col


def _dot_text(g, rankdir, column=None, groups=None, auto=False):
    if column:
        g, column = _continue_columns(g, column)
    lines = [f"digraph {_quote(g.name)} {{", f"  rankdir={_quote(rankdir)};"]
    if auto:
        lines += ["  newrank=true;", '  nodesep="0.25";', '  ranksep="0.3";',
                  '  node [fontsize="12"];', '  edge [fontsize="10"];']
    # nodes nest as: column cluster (invisible, keeps each column's in-place layers in it) >
    # name group cluster (a dashed box) > node
    column = column or {}
    groups = groups or {}
    tree = {}
    for node, attrs in g.nodes.items():
        if auto and attrs.get("shape") == "record":
            # a box looks the same; dot mislays flat (same-rank) edges at record nodes
            attrs = dict(attrs, shape="box")
        anchor = g.in_place.get(node, node)
        tree.setdefault(column.get(anchor), {}).setdefault(groups.get(anchor), []).append(
            f"{_quote(node)} [{_attrs(attrs)}];")
    for col, by_group in tree.items():
        indent = "  "
        if col is not None:
            lines.append(f"  subgraph {_quote(f'cluster_column_{col}')} {{")
            lines.append('    style="invis";')
            indent = "    "
        for group, members in by_group.items():
            if group is None:
                lines += [indent + m for m in members]
                continue
            lines.append(f"{indent}subgraph {_quote('cluster_' + group)} {{")
            lines.append(f'{indent}  label={_quote(group)}; style="rounded,dashed"; color="#808080"; '
                         f'fontsize="12";')
            lines += [indent + "  " + m for m in members]
            lines.append(indent + "}")
        if col is not None:
            lines.append("  }")
    for src, dst, label, extra in g.edges:
        attrs = dict(extra)
        if label:
            attrs["label"] = label
        if auto and (src in g.in_place or dst in g.in_place):
            attrs["constraint"] = "false"
        elif column and column.get(src, 0) != column.get(dst, 0):
            attrs.update(constraint="false", style="dashed", color="#808080")   # a label's long edge
        tail = f" [{_attrs(attrs)}]" if attrs else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{tail};")
    if auto:
        for layer_node, blob in g.in_place.items():
            lines.append(f"  {{ rank=same; {_quote(blob)}; {_quote(layer_node)}; }}")
    if column:
        heads = []
        for c in range(max(column.values()) + 1):
            first = [n for n in column if column[n] == c]
            copies = [n for n in first if n.endswith(" (continued)")]
            heads.append((copies or first)[0])
        lines.append("  { rank=same; " + " -> ".join(_quote(h) for h in heads) + " [style=invis]; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(caffe_net: NetSource, rankdir: str = "LR", label_edges: bool = True, phase: int | None = None,
           display_lrm: bool = False, blob_shapes: Mapping[str, Sequence[int]] | None = None,
           param_counts: Mapping[str, int] | None = None) -> str:
    """The DOT source text of the drawing.

    ``rankdir`` LR/RL/TB/BT draws as pycaffe does; ``"AUTO"`` picks a readable layout (see the notes
    above ``AUTO``; it runs ``dot -Tplain`` once for a deep net when Graphviz is installed, and
    leaves the net in one column otherwise). ``blob_shapes``/``param_counts`` (``net_shapes``) add
    shapes and parameter counts to the labels.
    """
    if str(rankdir).upper() != AUTO:
        g = _graph(caffe_net, rankdir, label_edges, phase, display_lrm, blob_shapes, param_counts)
        return _dot_text(g, rankdir)
    g = _graph(caffe_net, "LR", label_edges, phase, display_lrm, blob_shapes, param_counts)
    if _longest_path(g) <= DEEP_NET:
        return _dot_text(g, "LR", auto=True)
    groups = _groups(g)
    column = _columns(g, groups, _dot_text(g, "TB", groups=groups, auto=True))
    return _dot_text(g, "TB", column, groups, auto=True)


def get_pydot_graph(caffe_net: NetSource, rankdir: str, label_edges: bool = True, phase: int | None = None,
                    display_lrm: bool = False) -> Any:
    """The drawing as a ``pydot.Dot`` graph (needs pydot: ``pip install 'minicaffe[draw]'``)."""
    from ..deps import require
    pydot = require("pydot", "get_pydot_graph (draw_net_to_file writes a .dot file without it)", DrawError)
    if str(rankdir).upper() == AUTO:        # the auto layout's subgraphs and ranks: parse its text
        return pydot.graph_from_dot_data(to_dot(caffe_net, AUTO, label_edges, phase, display_lrm))[0]
    g = _graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    graph = pydot.Dot(_quote(g.name), graph_type="digraph", rankdir=rankdir)
    for node, attrs in g.nodes.items():
        record = attrs.get("shape") == "record"
        kw = {k: _quote(str(v), record and k == "label") if k in ("label", "fillcolor") else v
              for k, v in attrs.items()}
        graph.add_node(pydot.Node(_quote(node), **kw))
    for src, dst, label, _ in g.edges:
        kw = {"label": _quote(label)} if label else {}
        graph.add_edge(pydot.Edge(_quote(src), _quote(dst), **kw))
    return graph


def render_dot(source: str, ext: str = "png", dpi: float | None = None, palette: bool = False) -> bytes:
    """Run Graphviz's ``dot -T<ext>`` on DOT source; returns the bytes. Errors say what to install.

    ``dpi`` sets the resolution of bitmap formats (Graphviz's default is 96); ``palette`` renders a
    PNG with Graphviz's gd renderer: 256 colours, no anti-aliasing, a third of the bytes."""
    dot = shutil.which("dot")
    if dot is None:
        raise DrawError(f"drawing a .{ext} needs Graphviz's 'dot' program, which is not on PATH "
                        "(Debian/Ubuntu: apt-get install graphviz; conda: conda install graphviz); "
                        "a .dot file needs nothing and can be rendered elsewhere")
    try:
        fmt = "png:gd" if palette and ext == "png" else ext
        args = [dot, f"-T{fmt}"] + ([f"-Gdpi={float(dpi):g}"] if dpi else [])
        proc = subprocess.run(args, input=source.encode("utf-8"), capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrawError(f"running {dot} failed: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = err[0] if err else f"exit status {proc.returncode}"
        raise DrawError(f"dot -T{ext} failed: {detail}")
    return proc.stdout


def draw_net(caffe_net: NetSource, rankdir: str, ext: str = "png", phase: int | None = None,
             display_lrm: bool = False, blob_shapes: Mapping[str, Sequence[int]] | None = None,
             param_counts: Mapping[str, int] | None = None, dpi: float | None = None,
             palette: bool = False) -> bytes:
    """The drawing encoded as ``ext`` (bytes): DOT text for dot/gv/raw, else rendered by Graphviz."""
    source = to_dot(caffe_net, rankdir, phase=phase, display_lrm=display_lrm, blob_shapes=blob_shapes,
                    param_counts=param_counts)
    ext = ext.lower().lstrip(".")
    if ext in TEXT_FORMATS:
        return source.encode("utf-8")
    return render_dot(source, ext, dpi, palette)


def draw_net_to_file(caffe_net: NetSource, filename: str | os.PathLike, rankdir: str = "LR",
                     phase: int | None = None, display_lrm: bool = False,
                     blob_shapes: Mapping[str, Sequence[int]] | None = None,
                     param_counts: Mapping[str, int] | None = None, dpi: float | None = None,
                     palette: bool = False) -> None:
    """Write the drawing to ``filename`` in the format its extension names (atomically).

    ``.dot``/``.gv``/``.raw`` give Graphviz source, anything else is rendered by ``dot``.
    """
    from ..fileio import atomic_write
    filename = os.fspath(filename)
    base = os.path.basename(filename)
    if "." not in base:
        raise DrawError(f"{filename}: give the file an extension naming the format (.png, .svg, .pdf, .dot)")
    ext = base.rsplit(".", 1)[1]
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm, blob_shapes, param_counts, dpi, palette)
    atomic_write(filename, data)


# --- shapes and parameter counts ----------------------------------------------------------------

NO_SOURCE_TYPES = ("Input", "DummyData", "Parameter")


def parse_input_shapes(specs):
    """``["data=64,1,28,28", "10,3,224,224"]`` → {"data": (64, 1, 28, 28), None: (10, 3, 224, 224)}."""
    shapes = {}
    for spec in specs or ():
        name, _, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise DrawError(f"--input_shape {spec}: expected [BLOB=]N,C,H,W with positive integers")
        shapes[name or None] = shape
    return shapes


def net_shapes(caffe_net, phase=None, input_shapes=None):
    """({blob: shape}, {layer: parameter count}) of the net, by building it (weights filled, no
    forward pass). Layers that read a data source (Data, ImageData, HDF5Data, ...) are replaced by
    Input layers when ``input_shapes`` names their tops ({blob: shape}, or {None: shape} for the
    first top of every such layer; their other tops, the labels, get (N,)); without one the layer
    is built as it is, which needs its source. ``phase`` None builds the TEST phase."""
    from ..net.network import Net
    net_param = caffe_pb2.NetParameter()
    net_param.CopyFrom(_net_param(caffe_net))
    input_shapes = dict(input_shapes or {})
    for layer in net_param.layer:
        if len(layer.bottom) or layer.type in NO_SOURCE_TYPES:
            continue
        tops = list(layer.top)
        given = [input_shapes.get(t) for t in tops]
        if given and given[0] is None:
            given[0] = input_shapes.get(None)
        if given and given[0] is None:
            continue
        batch = next(s for s in given if s is not None)[0]
        keep = (layer.name, list(layer.include), list(layer.exclude))
        layer.Clear()
        layer.name, layer.type = keep[0], "Input"
        layer.include.extend(keep[1])
        layer.exclude.extend(keep[2])
        layer.top.extend(tops)
        for shape in given:
            layer.input_param.shape.add().dim.extend(shape if shape is not None else (batch,))
    try:
        net = Net(net_param, caffe_pb2.TEST if phase is None else phase)
    except MinicaffeError as exc:
        hint = "" if input_shapes else " (a layer reading a data source needs --input_shape BLOB=N,C,H,W)"
        raise MinicaffeError(f"cannot build the net for its shapes: {exc}{hint}") from None
    shapes = {name: tuple(blob.data.shape) for name, blob in net.blobs.items()}
    counts = {name: int(sum(b.data.size for b in blobs)) for name, blobs in net.params.items()}
    return shapes, counts


__all__ = ["get_pydot_graph", "draw_net", "draw_net_to_file", "to_dot", "render_dot", "DrawError",
           "get_layer_label", "get_edge_label", "get_layer_lr_mult", "choose_color_by_layertype",
           "get_pooling_types_dict", "net_shapes", "AUTO"]
