"""parse_log: Caffe's training logs (and minicaffe's, same glog prefix) into .train/.test CSV tables."""
import csv
import datetime
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest

from minicaffe.tools import parse_log as pl
from minicaffe.tools.common import GlogFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "caffe_train.log")

# hand-checked from tests/data/caffe_train.log: "Solving LeNet" at 23:58:13.500100 on 31 Dec is t=0;
# the log runs past midnight into 1 January (next year); LearningRate is the rate logged for the
# row's own iteration, or the last one logged before it (iteration 400 has no rate line)
TRAIN = [
    (0, 1.8, 0.01, 2.35143),
    (100, 56.5, 0.00992565, 0.270709),
    (200, 107.95, 0.00985258, 0.1793),
    (300, 162.5, 0.00978075, 0.12),
]
TEST = [
    (0, 1.75, 0.01, 0.0863, 2.37823),
    (200, 107.9, 0.00985258, 0.9712, 0.0897),
    (400, 218.2, 0.00978075, 0.9801, 0.0612),
]


def _check(rows, expected, names):
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected):
        assert list(row) == names
        assert row["NumIters"] == exp[0] and isinstance(row["NumIters"], int)
        for name, value in zip(names[1:], exp[1:]):
            assert row[name] == pytest.approx(value, abs=1e-9), (row, name)


def test_fixture_rows():
    train, test = pl.parse_log(FIXTURE)
    _check(train, TRAIN, ["NumIters", "Seconds", "LearningRate", "loss"])
    _check(test, TEST, ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"])


def test_csv_files(tmp_path, capsys):
    out = tmp_path / "csv"
    assert pl.main([FIXTURE, str(out), "--verbose"]) == 0        # the output directory is created
    assert sorted(os.listdir(out)) == ["caffe_train.log.test", "caffe_train.log.train"]
    with open(out / "caffe_train.log.train", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert rows[1] == ["0", "1.8", "0.01", "2.35143"]
    assert rows[3] == ["200", "107.95", "0.00985258", "0.1793"]
    with open(out / "caffe_train.log.test", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert rows[-1] == ["400", "218.2", "0.00978075", "0.9801", "0.0612"]
    assert "Wrote" in capsys.readouterr().out


def test_delimiter(tmp_path):
    assert pl.main([FIXTURE, str(tmp_path), "--delimiter", "\t"]) == 0
    lines = (tmp_path / "caffe_train.log.train").read_text().splitlines()
    assert lines[0] == "NumIters\tSeconds\tLearningRate\tloss"
    assert lines[2] == "100\t56.5\t0.00992565\t0.270709"
    assert pl.main([FIXTURE, str(tmp_path / "escaped"), "--delimiter", "\\t"]) == 0     # '\t' typed in a shell
    assert (tmp_path / "escaped" / "caffe_train.log.train").read_text() == (tmp_path / "caffe_train.log.train").read_text()


def test_bad_delimiter(tmp_path, capsys):
    assert pl.main([FIXTURE, str(tmp_path), "--delimiter", ";;"]) == 1
    assert "--delimiter must be one character" in capsys.readouterr().err


def _log(tmp_path, lines, mtime=None, name="run.log"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    if mtime is not None:
        stamp = mtime.timestamp()
        os.utime(path, (stamp, stamp))
    return str(path)


def _leap_log(tmp_path, mtime):
    return _log(tmp_path, [
        "I0228 23:00:00.000000  7 solver.cpp:272] Solving N",
        "I0228 23:00:00.500000  7 solver.cpp:218] Iteration 0, loss = 1",
        "I0228 23:00:00.500000  7 solver.cpp:237]     Train net output #0: loss = 1",
        "I0301 00:00:00.000000  7 solver.cpp:218] Iteration 10, loss = 0.5",
        "I0301 00:00:00.000000  7 solver.cpp:237]     Train net output #0: loss = 0.5",
    ], mtime)


def test_year_comes_from_the_file_for_leap_days(tmp_path):
    # 28 Feb 23:00 → 1 Mar 00:00 is one hour in 2023 but a day and an hour in 2024
    train, _ = pl.parse_log(_leap_log(tmp_path, datetime.datetime(2023, 6, 1)))
    assert [r["Seconds"] for r in train] == [0.5, 3600.0]
    train, _ = pl.parse_log(_leap_log(tmp_path, datetime.datetime(2024, 6, 1)))
    assert [r["Seconds"] for r in train] == [0.5, 86400.0 + 3600.0]


def test_new_year_run_takes_the_earlier_year(tmp_path):
    # Dec 2023 → Jan/Mar 2024: the start year is one before the file's, so 29 Feb 2024 exists
    path = _log(tmp_path, [
        "I1231 23:59:00.000000  7 solver.cpp:272] Solving N",
        "I1231 23:59:30.000000  7 solver.cpp:218] Iteration 0, loss = 1",
        "I1231 23:59:30.000000  7 solver.cpp:237]     Train net output #0: loss = 1",
        "I0229 00:00:00.000000  7 solver.cpp:218] Iteration 10, loss = 0.5",
        "I0229 00:00:00.000000  7 solver.cpp:237]     Train net output #0: loss = 0.5",
    ], datetime.datetime(2024, 3, 2))
    train, _ = pl.parse_log(path)
    assert train[1]["Seconds"] == (datetime.datetime(2024, 2, 29) - datetime.datetime(2023, 12, 31, 23, 59)).total_seconds()


def _record(created, msg, lineno):
    rec = logging.makeLogRecord({"name": "minicaffe", "levelno": logging.INFO, "levelname": "INFO",
                                 "msg": msg, "args": (), "pathname": "/x/minicaffe/solvers/solver.py",
                                 "filename": "solver.py", "lineno": lineno, "process": 4242})
    rec.created = created
    return rec


def test_minicaffe_logger_lines(tmp_path):
    """Lines from minicaffe's own log formatter (glog prefix, Caffe's wording) parse the same way."""
    t0 = datetime.datetime(2025, 11, 25, 23, 59, 58, 250000).timestamp()
    fmt = GlogFormatter()
    events = [
        (0.0, "Solving LeNet"),
        (0.5, "Iteration 0, Testing net (#0)"),
        (1.0, "    Test net output #0: accuracy = 0.1"),
        (1.0, "    Test net output #1: loss = 2.30259 (* 1 = 2.30259 loss)"),
        (1.25, "Iteration 0 (0 iter/s, 1.2s/50 iters), loss = 2.3"),
        (1.25, "    Train net output #0: loss = 2.3 (* 1 = 2.3 loss)"),
        (1.5, "Iteration 0, lr = 0.1"),
        (3.0, "Iteration 50 (25 iter/s, 2s/50 iters), loss = 1.5"),       # past midnight
        (3.0, "    Train net output #0: loss = 1.4 (* 1 = 1.4 loss)"),
        (3.25, "Iteration 50, lr = 0.05"),
        (4.0, "Iteration 100, Testing net (#0)"),
        (4.5, "    Test net output #0: accuracy = 0.6"),
        (4.5, "    Test net output #1: loss = 1.1 (* 1 = 1.1 loss)"),
        (4.75, "Optimization Done."),
    ]
    lines = [fmt.format(_record(t0 + dt, msg, 100 + i)) for i, (dt, msg) in enumerate(events)]
    assert lines[0].startswith("I1125 23:59:58.250000 4242 solver.py:100] ")
    train, test = pl.parse_log(_log(tmp_path, lines))
    _check(train, [(0, 1.25, 0.1, 2.3), (50, 3.0, 0.05, 1.4)], ["NumIters", "Seconds", "LearningRate", "loss"])
    _check(test, [(0, 1.0, 0.1, 0.1, 2.30259), (100, 4.5, 0.05, 0.6, 1.1)],
           ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"])


def test_single_test_pass_and_outputs_without_timestamps(tmp_path):
    # Caffe's script drops a table's only row; here it is kept. Lines with no glog prefix still count.
    path = _log(tmp_path, [
        "Iteration 0, Testing net (#0)",
        "    Test net output #0: accuracy = 0.5",
        "    Test net output #1: loss3/top-5 = -nan",
    ])
    train, test = pl.parse_log(path)
    assert train == []
    assert len(test) == 1 and test[0]["accuracy"] == 0.5
    assert math.isnan(test[0]["loss3/top-5"]) and math.isnan(test[0]["Seconds"])
    assert math.isnan(test[0]["LearningRate"])


def test_nothing_before_first_iteration_and_no_rows(tmp_path, capsys):
    path = _log(tmp_path, ["I0101 00:00:00.000000  7 net.cpp:1] Train net output #0: loss = 3"], name="x.log")
    assert pl.parse_log(path) == ([], [])
    assert pl.main([path, str(tmp_path / "o"), "--verbose"]) == 0
    assert os.listdir(tmp_path / "o") == []
    captured = capsys.readouterr()
    assert "Not writing" in captured.out and "no 'Train net output'" in captured.err


def test_missing_log_and_bad_output_dir(tmp_path, capsys):
    assert pl.main([str(tmp_path / "none.log"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.log: no such file" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert pl.main([FIXTURE, str(blocker)]) == 1
    assert "file: not a directory" in capsys.readouterr().err


def test_command_line(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "caffe.INFO")
    res = subprocess.run([sys.executable, "-m", "minicaffe.tools.parse_log", str(tmp_path / "caffe.INFO"),
                          str(tmp_path)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "caffe.INFO.train").read_text().startswith("NumIters,Seconds,LearningRate,loss")
    assert (tmp_path / "caffe.INFO.test").exists()


TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
"""


def test_log_of_a_real_minicaffe_run(tmp_path):
    """minicaffe's solver, logging through its own logger into a file, gives a log parse_log reads."""
    import minicaffe as caffe
    from minicaffe.tools.common import get_logger
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\ntest_iter: 2 test_interval: 10 display: 5 max_iter: 20\n'
        'base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 10 snapshot_after_train: false\n')
    log_path = tmp_path / "train.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(GlogFormatter())
    logger = get_logger()
    logger.addHandler(handler)
    try:
        caffe.get_solver(str(tmp_path / "solver.prototxt")).solve()
    finally:
        logger.removeHandler(handler)
        handler.close()
    train, test = pl.parse_log(log_path)
    assert [r["NumIters"] for r in train] == [0, 5, 10, 15]
    assert [r["LearningRate"] for r in train] == [0.1, 0.1, 0.05, 0.05]       # step at 10
    assert [r["NumIters"] for r in test] == [0, 10, 20]
    assert [r["LearningRate"] for r in test] == [0.1, 0.05, 0.05]
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert sorted(test[0]) == sorted(["NumIters", "Seconds", "LearningRate", "loss", "accuracy"])
    seconds = [r["Seconds"] for r in train]
    assert seconds == sorted(seconds) and 0 <= seconds[0] < 60
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in test)


def test_impossible_time_stamps_do_not_stop_parsing(tmp_path):
    path = _log(tmp_path, [
        "I0101 10:00:00.000000  7 solver.cpp:272] Solving N",
        "I0101 10:00:01.000000  7 solver.cpp:218] Iteration 0, loss = 1",
        "I0101 10:00:01.000000  7 solver.cpp:237]     Train net output #0: loss = 1",
        "I0230 10:00:02.000000  7 solver.cpp:218] Iteration 10, loss = 0.5",          # no 30 February
        "I0230 10:00:02.000000  7 solver.cpp:237]     Train net output #0: loss = 0.5",
        "I1399 10:00:03.000000  7 solver.cpp:218] Iteration 20, loss = 0.25",         # not a date at all
        "I1399 10:00:03.000000  7 solver.cpp:237]     Train net output #0: loss = 0.25",
    ], datetime.datetime(2021, 5, 1))
    train, _ = pl.parse_log(path)
    assert [r["NumIters"] for r in train] == [0, 10, 20] and [r["loss"] for r in train] == [1, 0.5, 0.25]
    assert train[0]["Seconds"] == 1.0 and math.isnan(train[1]["Seconds"]) and math.isnan(train[2]["Seconds"])


def test_glog_header_year_wins_over_file_time(tmp_path):
    lines = open(_leap_log(tmp_path, None)).read().splitlines()
    path = _log(tmp_path, ["Log file created at: 2024/02/28 22:59:59", "Running on machine: m"] + lines,
                datetime.datetime(2023, 6, 1), name="hdr.log")
    train, _ = pl.parse_log(path)
    assert [r["Seconds"] for r in train] == [0.5, 86400.0 + 3600.0]       # 2024 is a leap year
