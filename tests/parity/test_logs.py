"""``caffe train``/``test``/``time`` log the same lines as BVLC Caffe's on the same files.

Both tools run in subprocesses with ``GLOG_logtostderr=1 GLOG_minloglevel=0``. Each log is normalised:
glog's prefix (severity kept; date, time, thread id and file:line dropped), the timings (``iter/s``,
``s/N iters``, ``ms.``) replaced by ``<t>``, and every value printed after ``= `` (losses, outputs, lr)
replaced by ``<v>`` and compared separately as numbers: both engines start from the same weights
(``--weights``) and read the same LMDB, so they agree to float32 summation order. Every other line,
the parameter dumps included, must be the same text in the same order.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from . import common

PREFIX = re.compile(r"^([IWEF])\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d{6} +\d+ [^\]\s]+:\d+\] ")
NUM = r"-?(?:nan|inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?)"
TIMING = [(re.compile(rf"\({NUM} iter/s, {NUM}s/(\d+) iters\)"), r"(<t> iter/s, <t>s/\1 iters)"),
          (re.compile(rf"{NUM} ms\."), "<t> ms.")]
VALUE = re.compile(rf"((?:= |Loss: |Initial loss: )){NUM}(?= |$)")

# Inherent differences, kept out of both logs (each a whole message):
ALLOW = {
    # logged by Caffe's prefetch threads, so where (and how often) they appear depends on thread timing
    "Restarting data prefetching from start.",
    "Waiting for data",
}


def normalise(text):
    """(lines, values): the normalised messages, and the numbers taken out of them in order."""
    lines, values = [], []
    for raw in text.splitlines():
        m = PREFIX.match(raw)
        line = raw[m.end():] if m else raw          # a line without a prefix continues a dump
        if m and line in ALLOW:
            continue
        if m:
            line = m.group(1) + " " + line
        for pattern, repl in TIMING:
            line = pattern.sub(repl, line)
        values.extend(float(v.group(0)[len(v.group(1)):]) for v in VALUE.finditer(line))
        lines.append(VALUE.sub(r"\1<v>", line))
    return lines, values


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    common.write_lmdb(str(d / "db"))
    net = common.write_net(str(d), "db")          # relative: both logs then name the same source
    with open(net, "a") as f:                       # a second test output, and a NetState rule line
        f.write('layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"\n'
                '  include { phase: TEST } }\n')
    cwd = os.getcwd()
    os.chdir(d)
    try:
        common.write_initial_weights(str(d), net)
    finally:
        os.chdir(cwd)
    (d / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "step"\ngamma: 0.5\nstepsize: 4\n'
        'weight_decay: 0.0005\ndisplay: 2\ntest_iter: 2\ntest_interval: 4\nmax_iter: 8\nsnapshot: 4\n'
        'snapshot_prefix: "snap"\nrandom_seed: 1\nsolver_mode: CPU\n'
        'clip_gradients: 100\ndelta: 1e-08\n')      # floats whose text Python writes otherwise
    return d


def run_both(ref, workdir, *args):
    """(Caffe's stderr, minicaffe's stderr) of the same command, each in a fresh copy of the work dir
    (so each writes its own snapshots)."""
    logs = []
    for engine in ("caffe", "minicaffe"):
        cwd = workdir / engine
        if not cwd.exists():
            cwd.mkdir()
            for name in ("db", "net.prototxt", "solver.prototxt", "init.caffemodel"):
                os.symlink(workdir / name, cwd / name)
        if engine == "caffe":
            cmd, env = [ref.bin("caffe")], ref.env()
        else:
            cmd, env = [sys.executable, "-m", "minicaffe.tools.cli"], dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(GLOG_logtostderr="1", GLOG_minloglevel="0")
        proc = subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{engine} {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
        logs.append(proc.stderr)
    return logs


def assert_same_log(theirs, mine, value_tol=1e-4):
    t_lines, t_values = normalise(theirs)
    m_lines, m_values = normalise(mine)
    if m_lines != t_lines:
        import difflib
        diff = "\n".join(difflib.unified_diff(t_lines, m_lines, "caffe", "minicaffe", lineterm="", n=2))
        pytest.fail(f"log lines differ from Caffe's:\n{diff}")
    np.testing.assert_allclose(m_values, t_values, rtol=value_tol, atol=1e-6)


def test_train_log_as_caffe(ref, workdir):
    theirs, mine = run_both(ref, workdir, "train", "--solver=solver.prototxt", "--weights=init.caffemodel")
    assert_same_log(theirs, mine)


def test_test_log_as_caffe(ref, workdir):
    theirs, mine = run_both(ref, workdir, "test", "--model=net.prototxt", "--weights=init.caffemodel",
                            "--iterations=3")
    assert_same_log(theirs, mine)


def test_time_log_as_caffe(ref, workdir):
    theirs, mine = run_both(ref, workdir, "time", "--model=net.prototxt", "--iterations=2")
    # without --weights the initial loss comes from each engine's own random fillers
    t_lines, _ = normalise(theirs)
    m_lines, _ = normalise(mine)
    assert m_lines == t_lines, "\n".join(__import__("difflib").unified_diff(t_lines, m_lines, lineterm=""))
