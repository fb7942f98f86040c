"""plot_training_log: Caffe's eight chart types drawn with matplotlib into a PNG."""
import os
import shutil
import struct
import sys
import zlib

import pytest

from minicaffe.tools import plot_training_log as ptl

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "caffe_train.log")


def _png_info(path):
    """Width, height and the tEXt entries of a PNG, walking its chunks (checks every CRC)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, size = 8, {}, None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode()] = value.decode("latin-1")
        pos += 12 + length
        if kind == b"IEND":
            break
    assert pos == len(data)
    return size, text


def test_chart_types_are_caffes():
    assert [ptl.chart_description(i) for i in range(8)] == [
        "Test accuracy vs. Iters", "Test accuracy vs. Seconds", "Test loss vs. Iters", "Test loss vs. Seconds",
        "Train learning rate vs. Iters", "Train learning rate vs. Seconds", "Train loss vs. Iters",
        "Train loss vs. Seconds"]


@pytest.mark.parametrize("chart", [0, 7])
def test_chart_writes_a_png(tmp_path, chart):
    second = tmp_path / "other.log"
    shutil.copy(FIXTURE, second)
    out = str(tmp_path / "chart.png")
    assert ptl.main([str(chart), out, FIXTURE, str(second), "--dpi", "40"]) == 0
    (w, h), text = _png_info(out)
    assert (w, h) == (320, 200)                       # 8x5 inches at 40 dpi
    assert text["Software"].startswith("Matplotlib")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.fixture
def drawn(monkeypatch):
    """What each chart draws, caught at savefig (which then writes nothing, to keep the test quick)."""
    from matplotlib.figure import Figure
    seen = {}

    def spy(self, fname, **kwargs):
        ax = self.axes[0]
        seen["lines"] = [(l.get_label(), list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["labels"] = (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


# x and y of each chart type for tests/data/caffe_train.log (see test_parse_log.py for the numbers)
ITERS_TEST, SECS_TEST = [0, 200, 400], [1.75, 107.9, 218.2]
ITERS_TRAIN, SECS_TRAIN = [0, 100, 200, 300], [1.8, 56.5, 107.95, 162.5]
ACC, TEST_LOSS = [0.0863, 0.9712, 0.9801], [2.37823, 0.0897, 0.0612]
LR, TRAIN_LOSS = [0.01, 0.00992565, 0.00985258, 0.00978075], [2.35143, 0.270709, 0.1793, 0.12]
EXPECTED = [(ITERS_TEST, ACC), (SECS_TEST, ACC), (ITERS_TEST, TEST_LOSS), (SECS_TEST, TEST_LOSS),
            (ITERS_TRAIN, LR), (SECS_TRAIN, LR), (ITERS_TRAIN, TRAIN_LOSS), (SECS_TRAIN, TRAIN_LOSS)]


def test_every_chart_plots_the_right_columns(tmp_path, drawn):
    for chart, (xs, ys) in enumerate(EXPECTED):
        assert ptl.main([str(chart), str(tmp_path / "c.png"), FIXTURE]) == 0
        assert drawn["lines"] == [("caffe_train", xs, ys)], chart
        title = ptl.chart_description(chart)
        assert drawn["labels"] == (title, title.split(" vs. ")[1], title.split(" vs. ")[0])


def test_one_line_per_log_with_legend(tmp_path, drawn):
    run_b = tmp_path / "run_b.log"
    run_b.write_text(open(FIXTURE).read().replace("accuracy = 0.9801", "accuracy = 0.5"))
    same_name = tmp_path / "sub" / "caffe_train.log"
    same_name.parent.mkdir()
    shutil.copy(FIXTURE, same_name)
    assert ptl.main(["0", str(tmp_path / "a.png"), FIXTURE, str(run_b)]) == 0
    assert drawn["lines"] == [("caffe_train", ITERS_TEST, ACC), ("run_b", ITERS_TEST, [0.0863, 0.9712, 0.5])]
    assert drawn["legend"] == ["caffe_train", "run_b"]
    # two logs of the same name are told apart by their paths
    assert ptl.main(["0", str(tmp_path / "a.png"), FIXTURE, str(same_name)]) == 0
    assert drawn["legend"] == [FIXTURE, str(same_name)]


def test_column_choice_for_other_output_names():
    rows = [{"NumIters": 0, "Seconds": 0.0, "LearningRate": 0.1, "loss1/loss1": 1.0, "loss1/top-1": 0.1,
             "loss3/loss3": 2.0, "loss3/top-1": 0.3, "loss3/top-5": 0.5}]
    assert ptl.pick_column(rows, "accuracy") == "loss3/top-1"
    assert ptl.pick_column(rows, "loss") == "loss3/loss3"
    assert ptl.pick_column(rows, "loss", explicit="loss1/loss1") == "loss1/loss1"
    assert ptl.pick_column(rows, "learning rate") == "LearningRate"
    with pytest.raises(Exception, match="no output named 'x'"):
        ptl.pick_column(rows, "loss", explicit="x", path="a.log")


def test_errors(tmp_path, capsys):
    assert ptl.main(["10", str(tmp_path / "a.png"), FIXTURE]) == 1   # 8 and 9 are minicaffe's
    assert "10 is not a valid chart type" in capsys.readouterr().err
    assert ptl.main(["0", str(tmp_path / "a.png"), str(tmp_path / "missing.log")]) == 1
    assert "missing.log: no such file" in capsys.readouterr().err
    assert ptl.main(["0", str(tmp_path / "a.xyz"), FIXTURE]) == 1
    assert "unsupported image type '.xyz'" in capsys.readouterr().err
    empty = tmp_path / "empty.log"
    empty.write_text("I0101 00:00:00.000000 1 a.cpp:1] Solving x\n")
    assert ptl.main(["0", str(tmp_path / "a.png"), str(empty)]) == 1
    assert "empty.log: no 'Test net output' lines" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.png")


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert ptl.main(["0", str(tmp_path / "a.png"), FIXTURE]) == 1
    assert "plot_training_log needs matplotlib: pip install 'minicaffe[plot]'" in capsys.readouterr().err


def test_help_lists_chart_types(capsys):
    with pytest.raises(SystemExit) as exc:
        ptl.main(["--help"])
    assert exc.value.code == 0 and "7: Train loss vs. Seconds" in capsys.readouterr().out
