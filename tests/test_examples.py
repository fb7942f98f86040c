"""The examples end to end, as a user runs them: examples/digits/run.sh (the README's main job) and
examples/vgg_methods/run.py at its CI size."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    """The interpreter's bin folder first on PATH (run.sh calls python, convert_imageset, minicaffe),
    and one BLAS thread: these nets are small, and BLAS threads competing for CI's 2 cores (with
    pytest and other jobs) made run.sh 10x slower in a measured run."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def test_digits_run_sh_reaches_the_accuracy_target(tmp_path):
    """run.sh works relative to the repository root it sits in, so a copy of examples/digits under
    tmp_path runs it without touching the checkout's examples/digits/work."""
    pytest.importorskip("sklearn")
    if shutil.which("convert_imageset", path=_env()["PATH"]) is None:
        pytest.skip("the console scripts are not installed (pip install -e .)")
    shutil.copytree(os.path.join(ROOT, "examples", "digits"), tmp_path / "examples" / "digits",
                    ignore=shutil.ignore_patterns("work"))
    res = subprocess.run(["bash", str(tmp_path / "examples" / "digits" / "run.sh")], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    verdict = [line for line in res.stdout.splitlines() if line.startswith("held-out accuracy")]
    assert len(verdict) == 1 and verdict[0].endswith(": ok"), res.stdout[-2000:]
    work = tmp_path / "examples" / "digits" / "work"
    assert (work / "lenet_digits_iter_1000.caffemodel").exists() and (work / "digits_mean.binaryproto").exists()


def test_vgg_methods_tiny_produces_the_whole_table(tmp_path):
    """run.py --tiny: digits -> LMDB -> two trainings (fixed S, scale jitter) -> every evaluation
    setting -> the markdown table with every row and column (numbers are noise at this size)."""
    pytest.importorskip("sklearn")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "vgg_methods", "run.py"), "--tiny",
                          "--work", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    top1, _, top5 = res.stdout.partition("Top-5 error (%):")
    assert top5, res.stdout[-2000:]
    for text in (top1, top5):                   # the top-1 table, then the top-5 table
        lines = text.splitlines()
        header = next(line for line in lines if line.startswith("| training |"))
        assert header.split(" | ")[1:] == ["centre crop", "10 crops", "144 crops", "150 crops", "dense, 1 scale",
                                           "dense, 3 scales", "dense + 150 crops |"]
        rows = [line for line in lines if line.startswith("| ") and line[2].isalpha() and "training" not in line]
        assert [r.split(" | ")[0] for r in rows] == ["| fixed S = 40", "| jittered S ∈ [32, 48]",
                                                     "| ensemble of both"]
        for row in rows:
            values = [float(v) for v in row.strip("| ").split(" | ")[1:]]
            assert len(values) == 7 and all(0 <= v <= 100 for v in values)
    assert "on 8 held-out digits" in res.stdout
    assert (tmp_path / "vgg_digits_jitter.caffemodel").exists()
    assert (tmp_path / "results.md").read_text().count("\n| ") == 8       # 2 tables: header + 3 rows
