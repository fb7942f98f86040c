"""draw / draw_net: DOT text without Graphviz, PNG through `dot` when installed, clear errors otherwise."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import minicaffe as caffe
from minicaffe import draw
from minicaffe.proto import caffe_pb2
from minicaffe.formats.prototxt import parse_text
from minicaffe.tools import draw_net as draw_net_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DOT = shutil.which("dot") is not None

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 16 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" exclude { phase: TRAIN } }
"""


def net_param():
    return parse_text(NET, caffe_pb2.NetParameter())


def test_dot_text_has_layers_blobs_labels_and_styles():
    dot = draw.to_dot(net_param(), "LR")
    assert dot.startswith('digraph "tiny" {') and 'rankdir="LR"' in dot
    assert '"conv1_Convolution" [shape="record", fillcolor="#FF5050", style="filled", ' \
           'label="conv1\\n(Convolution)\\nkernel size: 3\\nstride: 2\\npad: 1"]' in dot
    assert 'label="pool1\\n(Pooling AVE)\\nkernel size: 2\\nstride: 2\\npad: 0"' in dot
    assert '"relu1_ReLU" [shape="record", fillcolor="#90EE90"' in dot          # in place: green
    assert '"ip_InnerProduct" [shape="record", fillcolor="#CC33FF"' in dot
    assert '"conv1_blob" [shape="octagon", fillcolor="#E0E0E0", style="filled", label="conv1"]' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="16"];' in dot
    assert '"ip_InnerProduct" -> "ip_blob" [label="10"];' in dot
    assert '"data_blob" -> "conv1_Convolution";' in dot
    # vertical layouts separate with spaces
    assert 'label="conv1 (Convolution) kernel size: 3 stride: 2 pad: 1"' in draw.to_dot(net_param(), "TB")
    # learning-rate multipliers on request
    assert "lr mult: 1.0, 2.0" in draw.to_dot(net_param(), "LR", display_lrm=True)
    assert "lr mult" not in dot
    assert "[label=" not in draw.to_dot(net_param(), "LR", label_edges=False).split("->", 1)[1]


def test_phase_selection():
    all_layers = draw.to_dot(net_param(), "LR")
    train = draw.to_dot(net_param(), "LR", phase=caffe.TRAIN)
    test = draw.to_dot(net_param(), "LR", phase=caffe.TEST)
    assert "drop_Dropout" in all_layers and "prob_Softmax" in all_layers
    assert "drop_Dropout" in train and "prob_Softmax" not in train
    assert "drop_Dropout" not in test and "prob_Softmax" in test


def test_record_labels_are_escaped():
    p = parse_text('layer { name: "a{b}|<c>\\"q" type: "Input" top: "x" '
                   'input_param { shape { dim: 1 } } }', caffe_pb2.NetParameter())
    dot = draw.to_dot(p, "LR")
    assert 'label="a\\{b\\}\\|\\<c\\>\\"q\\n(Input)"' in dot


def test_pydot_graph_matches():
    pydot = pytest.importorskip("pydot")
    graph = draw.get_pydot_graph(net_param(), "LR")
    assert isinstance(graph, pydot.Dot)
    assert len(graph.get_edges()) == 13
    parsed = pydot.graph_from_dot_data(draw.to_dot(net_param(), "LR"))[0]
    assert len(parsed.get_edges()) == len(graph.get_edges())
    assert len(parsed.get_nodes()) == len(graph.get_nodes())


MODELS = sorted(p for p in glob.glob(os.path.join(ROOT, "models", "**", "*.prototxt"), recursive=True)
                if "solver" not in os.path.basename(p))


@pytest.mark.parametrize("path", MODELS, ids=[os.path.relpath(p, ROOT) for p in MODELS])
def test_every_shipped_model_draws(path):
    dot = draw.draw_net(path, "LR", ext="dot").decode()
    assert dot.startswith("digraph") and "->" in dot


def test_v1_net_param_is_upgraded():
    v1 = parse_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4 '
                    'layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" '
                    'convolution_param { num_output: 2 kernel_size: 1 } }', caffe_pb2.NetParameter())
    dot = draw.to_dot(v1, "LR")
    assert '"c_Convolution"' in dot and '"data_blob" -> "c_Convolution"' in dot


def test_write_dot_and_raw_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    for ext in ("dot", "raw"):
        out = tmp_path / f"net.{ext}"
        draw.draw_net_to_file(net_param(), str(out), "LR")
        assert out.read_text().startswith('digraph "tiny"')
    with pytest.raises(draw.DrawError, match=r"drawing a \.png needs Graphviz's 'dot' program.*apt-get "
                                             r"install graphviz"):
        draw.draw_net_to_file(net_param(), str(tmp_path / "net.png"))
    assert not (tmp_path / "net.png").exists()
    with pytest.raises(draw.DrawError, match="give the file an extension"):
        draw.draw_net_to_file(net_param(), str(tmp_path / "net"))


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' not installed")
def test_png_and_svg_with_graphviz(tmp_path):
    png = draw.draw_net(net_param(), "TB", ext="png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "net.svg"
    draw.draw_net_to_file(net_param(), str(out), "LR")
    assert "<svg" in out.read_text() and "conv1" in out.read_text()
    with pytest.raises(draw.DrawError, match=r"dot -Tnotaformat failed"):
        draw.draw_net(net_param(), "LR", ext="notaformat")


def test_draw_net_tool(tmp_path, capsys, monkeypatch):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    out = tmp_path / "net.dot"
    assert draw_net_tool.main([str(model), str(out), "--rankdir", "TB", "--phase", "TEST"]) == 0
    text = out.read_text()
    assert "prob_Softmax" in text and "drop_Dropout" not in text and 'rankdir="TB"' in text
    assert f"Drawing net to {out}" in capsys.readouterr().out
    # errors: one line naming the file
    assert draw_net_tool.main([str(tmp_path / "missing.prototxt"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.prototxt" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "a" tpye: "ReLU" }\n')
    assert draw_net_tool.main([str(bad), str(out)]) == 1
    assert "bad.prototxt:1:" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "")
    assert draw_net_tool.main([str(model), str(tmp_path / "net.png")]) == 1
    assert "error: drawing a .png needs Graphviz" in capsys.readouterr().err


def test_draw_net_subprocess(tmp_path):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    out = tmp_path / "net.raw"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.draw_net", str(model), str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("digraph")


# --- the auto layout, shapes, readable pictures ----------------------------------------------------

def _check_png(path, max_w, max_h, min_std=5.0):
    """Open the PNG again: size within bounds, more than one colour, not blank."""
    cv2 = pytest.importorskip("cv2")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    h, w = image.shape[:2]
    assert 50 <= w <= max_w and 50 <= h <= max_h, (w, h)
    assert (image != image[0, 0]).any(axis=2).any() and float(image.std()) > min_std   # not blank
    return w, h


def _plain_positions(source):
    """{node: (x, y)} of dot -Tplain (inches)."""
    import shlex
    out = subprocess.run(["dot", "-Tplain"], input=source, capture_output=True, text=True, check=True).stdout
    return {p[1]: (float(p[2]), float(p[3])) for p in map(shlex.split, out.splitlines()) if p[0] == "node"}


VGG16 = os.path.join(ROOT, "models", "vgg", "vgg_d", "deploy.prototxt")
GOOGLENET = os.path.join(ROOT, "models", "googlenet", "deploy.prototxt")


def test_auto_keeps_small_nets_in_caffes_row():
    dot = draw.to_dot(net_param(), "AUTO")
    assert 'rankdir="LR"' in dot and "cluster_column" not in dot
    # the in-place ReLU sits beside its blob, its edges do not push the chain sideways
    assert '{ rank=same; "conv1_blob"; "relu1_ReLU"; }' in dot
    assert '"conv1_blob" -> "relu1_ReLU" [constraint="false"];' in dot
    assert draw.to_dot(net_param(), "auto") == dot


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' not installed")
def test_auto_vgg16_columns_without_a_staircase(tmp_path):
    dot = draw.to_dot(VGG16, "AUTO")
    assert 'rankdir="TB"' in dot and dot.count("subgraph \"cluster_column_") >= 2
    pos = _plain_positions(dot)
    chain = [f"conv{b}_{i}_Convolution" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
             for i in range(1, n + 1)]
    # each column is straight: its convolutions share one x (Caffe's TB drifts 40+ inches sideways)
    columns = {}
    for node in chain:
        columns.setdefault(round(pos[node][0]), []).append(pos[node][0])
    assert 2 <= len(columns) <= 4
    for xs in columns.values():
        assert max(xs) - min(xs) < 1.0
    old = _plain_positions(draw.to_dot(VGG16, "TB"))
    assert max(old[n][0] for n in chain) - min(old[n][0] for n in chain) > 20       # the staircase
    # a cut blob heads the next column again, with one dashed edge from the original
    assert '"pool4_blob" -> "pool4_blob (continued)" [constraint="false", style="dashed"' in dot
    assert '"pool4_blob (continued)" -> "conv5_1_Convolution";' in dot


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' not installed")
@pytest.mark.parametrize("model, max_w, max_h", [(VGG16, 2000, 3000), (GOOGLENET, 6000, 7000)],
                         ids=["vgg16", "googlenet"])
def test_auto_deep_nets_are_near_square(tmp_path, model, max_w, max_h):
    """Caffe's LR: VGG-16 8983×1631, GoogLeNet 25784×1395 pixels; AUTO: within 1:2.5 either way."""
    out = tmp_path / "net.png"
    assert draw_net_tool.main([model, str(out)]) == 0
    w, h = _check_png(out, max_w, max_h)
    assert 0.4 < w / h < 2.5


def test_googlenet_inception_modules_are_boxed():
    dot = draw.to_dot(GOOGLENET, "AUTO") if HAVE_DOT else draw._dot_text(
        draw._graph(GOOGLENET, "LR"), "TB", groups=draw._groups(draw._graph(GOOGLENET, "LR")), auto=True)
    assert 'subgraph "cluster_inception_3a" {' in dot and 'label="inception_3a"' in dot
    block = dot.split('subgraph "cluster_inception_3a" {')[1].split("}")[0]
    assert '"inception_3a/1x1_Convolution"' in block and '"inception_3a/relu_1x1_ReLU"' in block
    assert '"inception_3b/1x1_Convolution"' not in block


def test_shapes_and_parameter_counts(tmp_path):
    shapes, counts = draw.net_shapes(net_param())
    assert shapes["data"] == (1, 3, 8, 8) and shapes["conv1"] == (1, 16, 4, 4) and shapes["ip"] == (1, 10)
    assert counts["conv1"] == 16 * 3 * 3 * 3 + 16 and counts["ip"] == 16 * 2 * 2 * 10 + 10
    assert "relu1" not in counts or counts["relu1"] == 0
    dot = draw.to_dot(net_param(), "LR", blob_shapes=shapes, param_counts=counts)
    assert 'label="conv1\\n1×16×4×4"' in dot and "params: 448" in dot and "params: 650" in dot
    # the tool: a data layer needs its shape, labels get (N,)
    model = tmp_path / "train.prototxt"
    model.write_text(NET.replace(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }',
        'layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "nowhere_lmdb" '
        'batch_size: 5 backend: LMDB } }'))
    out = tmp_path / "net.dot"
    assert draw_net_tool.main([str(model), str(out), "--shapes", "--phase", "TEST", "--input_shape",
                               "5,3,8,8"]) == 0
    text = out.read_text()
    assert 'label="data\\n5×3×8×8"' in text and 'label="label\\n5"' in text and "params: 448" in text
    assert draw_net_tool.main([str(model), str(out), "--shapes", "--input_shape", "data=5,x"]) == 1
    assert draw_net_tool.main([str(model), str(out), "--input_shape", "5,3,8,8"]) == 1


def test_shapes_need_a_data_source_or_input_shape(tmp_path, capsys):
    model = tmp_path / "train.prototxt"
    model.write_text('layer { name: "d" type: "Data" top: "data" data_param { source: "nowhere_lmdb" '
                     'batch_size: 2 backend: LMDB } }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                     'inner_product_param { num_output: 2 } }\n')
    assert draw_net_tool.main([str(model), str(tmp_path / "n.dot"), "--shapes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build the net for its shapes") and "--input_shape" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.dot").exists()


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' not installed")
def test_png_with_shapes_dpi_and_palette(tmp_path):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    assert draw_net_tool.main([str(model), str(big), "--shapes"]) == 0
    assert draw_net_tool.main([str(model), str(small), "--shapes", "--dpi", "48", "--palette"]) == 0
    wb, hb = _check_png(big, 4000, 800)
    ws, hs = _check_png(small, 2000, 400)
    assert abs(ws * 2 - wb) <= 4 and os.path.getsize(small) < os.path.getsize(big)


def test_auto_without_graphviz_writes_one_column(tmp_path, monkeypatch):
    """No dot program: the auto layout cannot measure the column, so the .dot file has one (top to
    bottom, in-place layers beside their blobs) and Graphviz elsewhere renders it."""
    monkeypatch.setenv("PATH", "")
    out = tmp_path / "vgg.dot"
    assert draw_net_tool.main([VGG16, str(out)]) == 0
    text = out.read_text()
    assert 'rankdir="TB"' in text and "cluster_column" not in text and "rank=same" in text


def test_pydot_graph_of_the_auto_layout():
    pydot = pytest.importorskip("pydot")
    graph = draw.get_pydot_graph(net_param(), "AUTO")
    assert isinstance(graph, pydot.Dot) and graph.get_rankdir() == '"LR"'
    assert len(graph.get_edges()) == 13
