"""Pictures: caffe.vis, the visualize tool, `minicaffe time --plot`, plot_training_log's new options.

Every picture is opened again and checked: its size is within bounds and it is not blank (several
colours, a spread of pixel values), so a chart drawn empty or white fails.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import vis
from minicaffe.tools import cli, plot_training_log as ptl, visualize

pytest.importorskip("matplotlib")
cv2 = pytest.importorskip("cv2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = os.path.join(ROOT, "tests", "data", "caffe_train.log")

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def check_png(path, min_size=(100, 100), max_size=(4000, 4000), min_std=5.0):
    """Open the PNG: height×width within bounds, more than one colour, pixel std above ``min_std``."""
    assert os.path.getsize(path) > 0
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    h, w = image.shape[:2]
    assert min_size[0] <= h <= max_size[0] and min_size[1] <= w <= max_size[1], (h, w)
    assert (image != image[0, 0]).any(axis=2).any()        # more than one colour
    assert float(image.std()) > min_std, image.std()
    return image


@pytest.fixture
def tiny(tmp_path):
    """A small net with random weights, its caffemodel, a mean file, an image and a labels file."""
    model = tmp_path / "tiny.prototxt"
    model.write_text(NET)
    caffe.set_random_seed(3)
    net = caffe.Net(str(model), caffe.TEST)
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    rng = np.random.default_rng(0)
    mean = np.stack([np.full((12, 12), 40.0), np.tile(np.linspace(0, 255, 12), (12, 1)),
                     np.full((12, 12), 200.0)])[np.newaxis]
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    labels = tmp_path / "labels.txt"
    labels.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\ncat\ndog\n")
    return dict(model=str(model), weights=str(weights), mean=str(mean_file), image=str(image),
                labels=str(labels), net=net)


def test_vis_square_tiles_and_normalises():
    tiles = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    grid = vis.vis_square(tiles, padsize=1, padval=1.0)
    assert grid.shape == (2 * 2 + 1, 3 * 3 + 2)      # 2 rows of 3 tiles of 2×3 (no empty row), 1-pixel gaps
    assert grid.min() == 0.0 and grid.max() == 1.0
    np.testing.assert_allclose(grid[:2, :3], tiles[0] / 29.0)
    np.testing.assert_allclose(grid[3:5, 4:7], tiles[4] / 29.0)   # 5th tile: second row, middle
    assert (grid[2] == 1.0).all()                             # the padding row
    colour = vis.vis_square(np.random.default_rng(0).random((4, 3, 3, 3)))
    assert colour.shape == (7, 7, 3)
    with pytest.raises(caffe.MinicaffeError, match="N×H×W"):
        vis.vis_square(np.zeros((2, 3)))


def test_mean_filters_features_arrays(tiny):
    mean = vis.mean_image(tiny["mean"])
    assert mean.shape == (12, 12, 3)
    # a BGR mean is shown RGB: its red plane (200, stored last) is the first channel of the picture
    assert mean[..., 0].mean() > mean[..., 2].mean()
    grid, layer, shape = vis.filters_grid(tiny["net"])
    assert layer == "conv1" and shape == (6, 3, 3, 3) and grid.shape == (2 * 3 + 1, 3 * 3 + 2, 3)
    tiny["net"].forward()
    maps, shape = vis.feature_maps(tiny["net"], "conv1")
    assert shape == (1, 6, 10, 10) and maps.shape == (2 * 10 + 1, 3 * 10 + 2)
    assert np.isnan(maps[10]).all() and not np.isnan(maps[:10, :10]).any()   # gaps are NaN (white)
    values, shape = vis.feature_maps(tiny["net"], "prob")
    assert values.shape == (4,)
    with pytest.raises(caffe.MinicaffeError, match="no blob named 'nope'"):
        vis.feature_maps(tiny["net"], "nope")
    with pytest.raises(caffe.MinicaffeError, match="layer 'relu1' has no weights"):
        vis.filters_grid(tiny["net"], "relu1")
    assert caffe.io.vis_square is vis.vis_square


def test_visualize_tool_draws_every_picture(tiny, tmp_path, capsys):
    out = {k: str(tmp_path / f"{k}.png") for k in ("mean", "filters", "features", "predictions", "ip")}
    net_args = ["--model", tiny["model"], "--weights", tiny["weights"]]
    image_args = net_args + ["--image", tiny["image"]]
    assert visualize.main(["mean", tiny["mean"], out["mean"]]) == 0
    assert visualize.main(["filters"] + net_args + [out["filters"]]) == 0
    assert visualize.main(["features"] + image_args + ["--layer", "conv1", out["features"]]) == 0
    assert visualize.main(["features"] + image_args + ["--layer", "ip", out["ip"]]) == 0
    # through the minicaffe command too
    assert cli.main(["visualize", "predictions"] + image_args + ["--labels", tiny["labels"], "--top_k", "3",
                                                                    out["predictions"]]) == 0
    for path in out.values():
        check_png(path, min_size=(150, 200), max_size=(1000, 1200))
    mean = check_png(out["mean"])
    # the mean's picture holds its colours: the gradient plane is green in RGB, so green varies
    assert mean[..., 1].std() > 10
    err = capsys.readouterr().err
    assert err.count("Wrote ") == 5


def test_top_k_bars_use_labels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    seen = {}
    real = Figure.savefig

    def spy(self, fname, **kwargs):
        ax = self.axes[0]
        seen["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["widths"] = [p.get_width() for p in ax.patches]
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    path = str(tmp_path / "top.png")
    vis.plot_top_k([0.1, 0.6, 0.05, 0.25], path, ["n01440764 tench, Tinca tinca", "goldfish", "cat", "dog"], k=3)
    assert seen["labels"] == ["goldfish", "dog", "tench, Tinca tinca"]
    assert seen["widths"] == [0.6, 0.25, 0.1]
    check_png(path)
    with pytest.raises(caffe.MinicaffeError, match="3 labels for 4 scores"):
        vis.plot_top_k([0.1, 0.6, 0.05, 0.25], path, ["a", "b", "c"])


def test_visualize_errors_are_one_line(tiny, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert visualize.main(["mean", str(tmp_path / "missing.binaryproto"), out]) == 1
    assert "missing.binaryproto: no such mean file" in capsys.readouterr().err
    assert visualize.main(["filters", "--model", tiny["model"], "--weights", tiny["weights"],
                           "--layer", "pool1", out]) == 1
    assert "layer 'pool1' has no weights" in capsys.readouterr().err
    bad = tmp_path / "labels.txt"
    bad.write_text("a\nb\n")
    assert visualize.main(["predictions", "--model", tiny["model"], "--weights", tiny["weights"],
                           "--image", tiny["image"], "--labels", str(bad), out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "2 labels but the net's output 'prob' has 4 classes" in err
    assert visualize.main(["mean", tiny["mean"], str(tmp_path / "x.xyz")]) == 1
    assert "unsupported image type '.xyz'" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "x.xyz")


def test_time_plot(tiny, tmp_path):
    """`minicaffe time --plot`: a bar per layer in net order, the totals in the title, a real PNG."""
    out = tmp_path / "time.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "time", "--model", tiny["model"],
                           "--iterations", "2", "-plot", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    check_png(out, min_size=(200, 500), max_size=(1000, 1000))


def test_layer_times_chart(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    seen = {}
    real = Figure.savefig

    def spy(self, fname, **kwargs):
        ax = self.axes[0]
        seen["names"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["title"] = ax.get_title()
        seen["ylim"] = ax.get_ylim()
        seen["bars"] = [(p.get_width(), round(p.get_y() + p.get_height() / 2, 6)) for p in ax.patches]
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    rows = [("data", "Input", 0.0, 0.0), ("conv1", "Convolution", 2.5, 4.0), ("prob", "Softmax", 0.5, 0.25)]
    path = str(tmp_path / "t.png")
    vis.plot_layer_times(rows, path, title="tiny")
    assert seen["names"] == ["data (Input)", "conv1 (Convolution)", "prob (Softmax)"]
    assert seen["ylim"][0] > seen["ylim"][1]           # first layer on top
    assert "forward 3 ms + backward 4.25 ms = 7.25 ms" in seen["title"] and seen["title"].startswith("tiny")
    assert (2.5, 0.8) in seen["bars"] and (4.0, 1.2) in seen["bars"]
    check_png(path)


def test_training_log_new_charts(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    seen = {}
    real = Figure.savefig

    def spy(self, fname, **kwargs):
        ax = self.axes[0]
        seen["lines"] = [(l.get_label(), list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()]
        seen["yscale"] = ax.get_yscale()
        seen["title"] = ax.get_title()
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    out = str(tmp_path / "loss.png")
    assert ptl.main(["8", out, LOG, "--log_y"]) == 0
    assert seen["title"] == "Train and test loss vs. Iters" and seen["yscale"] == "log"
    assert seen["lines"] == [("train", [0, 100, 200, 300], [2.35143, 0.270709, 0.1793, 0.12]),
                             ("test", [0, 200, 400], [2.37823, 0.0897, 0.0612])]
    check_png(out)
    assert ptl.main(["9", out, LOG]) == 0
    assert seen["yscale"] == "linear" and seen["lines"][1][1] == [1.75, 107.9, 218.2]
    # several logs: each line names its log
    other = tmp_path / "run_b.log"
    other.write_text(open(LOG).read())
    assert ptl.main(["8", out, LOG, str(other)]) == 0
    assert [l[0] for l in seen["lines"]] == ["caffe_train train", "caffe_train test", "run_b train", "run_b test"]
    # Caffe's numbers keep their charts; --log_y works on them too
    assert ptl.main(["6", out, LOG, "--log_y"]) == 0
    assert seen["title"] == "Train loss vs. Iters" and seen["yscale"] == "log"
    assert seen["lines"] == [("caffe_train", [0, 100, 200, 300], [2.35143, 0.270709, 0.1793, 0.12])]
    assert ptl.chart_description(8) == "Train and test loss vs. Iters"


def test_docs_pictures_are_small_and_not_blank():
    """docs/img holds one of each picture (README): each a real, non-blank PNG under 200 KB."""
    import glob
    paths = sorted(glob.glob(os.path.join(ROOT, "docs", "img", "*.png")))
    assert len(paths) >= 8
    for path in paths:
        assert os.path.getsize(path) < 200_000, path
        check_png(path, min_size=(100, 300), max_size=(4000, 4000))
