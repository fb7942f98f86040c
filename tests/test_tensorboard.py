"""``minicaffe train --tensorboard DIR``: the event file read back, record by record."""
import glob
import os
import struct

import pytest

from minicaffe.tools import cli
from minicaffe.tools.common import get_logger

from test_cli import NET, SOLVER

get_logger()        # the log handler keeps the session's stderr, not one test's capsys stream


def _scalars(logdir):
    """{tag: [(step, value)]} from the TFRecord event file(s) in ``logdir``."""
    from tensorboardX.proto import event_pb2
    out = {}
    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert files
    for path in files:
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4            # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER.replace("snapshot: 4", "snapshot: 0"))
    (tmp_path / "snaps").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_writes_loss_lr_accuracy_and_norms(work, logs):
    pytest.importorskip("tensorboardX")
    assert cli.main(["train", "--solver=solver.prototxt", "--tensorboard=board"]) == 0
    s = _scalars(str(work / "board"))
    assert [step for step, _ in s["train/loss"]] == [0, 1, 2, 3]
    assert all(v == pytest.approx(0.1) for _, v in s["train/lr"])
    # the test passes at iterations 0 and 4 (test_interval 4), the values the log shows
    assert [step for step, _ in s["test0/accuracy"]] == [0, 4]
    logged = [float(m.split("= ")[1].split()[0]) for m in logs if "Test net output #0: accuracy" in m]
    assert [v for _, v in s["test0/accuracy"]] == pytest.approx(logged)
    # norms every display (2) iterations, of the one learnable blob
    assert [step for step, _ in s["weights/ip/0"]] == [0, 2]
    assert [step for step, _ in s["gradients/ip/0"]] == [0, 2]
    assert all(v > 0 for _, v in s["weights/ip/0"] + s["gradients/ip/0"])
    final_loss = [float(m.split("loss = ")[1]) for m in logs if m.startswith("Iteration 2 (")]
    assert s["train/loss"][2][1] == pytest.approx(final_loss[0], rel=1e-5)
    assert [step for step, _ in s["train_output/loss"]] == [0, 2]


def test_tensorboard_without_tensorboardx_is_one_line(work, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert cli.main(["train", "--solver=solver.prototxt", "--tensorboard=board"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --tensorboard needs tensorboardX: pip install 'minicaffe[tensorboard]' "
                       "(or pip install tensorboardX)")
    assert not os.path.exists("board")
