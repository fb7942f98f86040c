"""Progress bars on a terminal (a pty here): log lines clear and redraw them, never run into them;
nothing of a bar in a pipe or in --log_file."""
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from test_cli import NET, SOLVER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("MINICAFFE_NO_PROGRESS", None)
GLOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} ")

pytest.importorskip("tqdm")


@pytest.fixture
def work(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        SOLVER.replace("max_iter: 4", "max_iter: 30").replace("test_iter: 2", "test_iter: 10")
        .replace("test_interval: 4", "test_interval: 15").replace("snapshot: 4", "snapshot: 10"))
    (tmp_path / "snaps").mkdir()
    return tmp_path


def _run_on_a_terminal(argv, cwd, **env):
    """stderr on a 120×40 pty, as a user's terminal; returns (exit status, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "minicaffe.tools.cli"] + argv, cwd=cwd, env=dict(ENV, **env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:         # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def _check_lines_start_clean(text):
    """Every log line begins a terminal line: right after a newline or a carriage return, never
    after a bar's text (the old ``ETA 00:00:00I1126 ...``)."""
    starts = [m.start() for m in GLOG.finditer(text)]
    assert starts
    for at in starts:
        assert at == 0 or text[at - 1] in "\r\n", repr(text[max(0, at - 80):at + 20])


def test_train_bar_and_log_lines_share_the_terminal(work):
    (work / "glog").mkdir()
    code, text = _run_on_a_terminal(["train", "--solver=solver.prototxt", "--log_file=train.log"], work,
                                    GLOG_log_dir=str(work / "glog"))
    assert code == 0, text[-2000:]
    assert re.search(r"train: +\d+%\|.*\| *\d+/30 \[[\d:]+<[\d:?]+", text), "no train bar with an ETA"
    assert re.search(r"test #0: +\d+%\|.*\| *\d+/10 ", text), "no bar for the test pass"
    _check_lines_start_clean(text)
    assert "Optimization Done." in text
    log = (work / "train.log").read_text()
    assert "\r" not in log and "%|" not in log           # the file gets the plain lines
    assert "Optimization Done." in log and "Test net output #0: accuracy" in log
    assert all(GLOG.match(line) or not line[:1].isupper() for line in log.splitlines())
    # GLOG_log_dir's files too: the terminal has the bar, the files the plain lines
    info = [p for p in (work / "glog").iterdir() if ".INFO." in p.name and not p.is_symlink()]
    assert info
    glog_text = info[0].read_text()
    assert "Optimization Done." in glog_text and "\r" not in glog_text and "%|" not in glog_text


@pytest.mark.parametrize("argv, bar", [
    (["time", "--model=net.prototxt", "--iterations=20"], r"time: +\d+%\|.*\| *\d+/20 "),
    (["test", "--model=net.prototxt", "--weights=w.caffemodel", "--iterations=20"], r"test: +\d+%\|.*\| *\d+/20 "),
])
def test_test_and_time_show_a_bar(work, argv, bar):
    import minicaffe as caffe
    caffe.Net(str(work / "net.prototxt"), caffe.TEST).save(str(work / "w.caffemodel"))
    code, text = _run_on_a_terminal(argv, work)
    assert code == 0, text[-2000:]
    assert re.search(bar, text), text[-2000:]
    _check_lines_start_clean(text)


def test_no_bar_when_stderr_is_not_a_terminal(work):
    proc = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "train", "--solver=solver.prototxt"],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr


def test_slow_iterations_show_seconds_per_iteration():
    """Rates under one per second read as seconds per iteration (tqdm's format, as the bar uses)."""
    from tqdm import tqdm
    assert "3.00s/iter" in tqdm.format_meter(n=2, total=10, elapsed=6.0, unit="iter")
    assert "0.3" not in tqdm.format_meter(n=2, total=10, elapsed=6.0, unit="iter").split("<")[1]


def test_log_file_appends_and_cannot_open_is_one_line(work, capsys, monkeypatch):
    from minicaffe.tools import cli
    from minicaffe.tools.common import get_logger
    get_logger()
    (work / "old.log").write_text("earlier run\n")
    monkeypatch.chdir(work)
    assert cli.main(["train", "--solver=solver.prototxt", "--iterations=2", "--log_file=old.log"]) == 0
    text = (work / "old.log").read_text()
    assert text.startswith("earlier run\n") and "Optimization Done." in text
    capsys.readouterr()
    assert cli.main(["train", "--solver=solver.prototxt", "--log_file=no/such/dir/x.log"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --log_file no/such/dir/x.log: cannot open")


def test_a_log_line_clears_the_bar_and_the_bar_comes_back():
    """In process, with the bar drawn at every update: the line written while the bar is up starts
    a terminal line of its own, and the bar is drawn again after it."""
    import io
    import logging

    from minicaffe.tools.common import get_logger
    from minicaffe.tools.common import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    log = get_logger()
    handler = logging.StreamHandler(term)
    handler.setFormatter(log.handlers[0].formatter)
    log.addHandler(handler)
    try:
        bar = ProgressBar(total=4, unit="iter", stream=term, min_interval=0)
        bar.update()
        log.info("Snapshotting to binary proto file x_iter_1.caffemodel")
        bar.update()
        bar.close()
    finally:
        log.removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", term.getvalue())
    _check_lines_start_clean(text)
    after = text[text.index("x_iter_1.caffemodel"):]
    assert re.search(r"\d/4 ", after), "the bar was not drawn again after the log line"
    assert handler.stream is term          # the handler has its own stream back once the bar is gone
