"""benchmarks/bench_caffe.py runs BVLC Caffe's ``caffe time`` and ``minicaffe time`` on the same net in
one run: both sides must produce their averages (the numbers themselves depend on the machine)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_caffe_times_lenet_in_both(ref):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_caffe.py"), "--caffe", ref.prefix,
                           "--nets", "lenet", "--iterations", "1", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("lenet"))
    assert "failed" not in proc.stdout, proc.stdout
    fields = row.replace("|", " ").split()
    caffe_fb, mc_fb, ratio = float(fields[4]), float(fields[7]), float(fields[8])
    assert caffe_fb > 0 and mc_fb > 0
    assert abs(ratio - mc_fb / caffe_fb) < 0.01 + 0.01 * ratio


def test_bench_caffe_rounds_keep_each_tools_best(ref):
    """``--rounds 2``: both tools run twice; the row shows each one's lowest forward + backward, and
    the line under it every round's."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_caffe.py"), "--caffe", ref.prefix,
                           "--nets", "lenet", "--iterations", "1", "--threads", "1", "--rounds", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("lenet"))
    fields = lines[i].replace("|", " ").split()
    caffe_fb, mc_fb = float(fields[4]), float(fields[7])
    rounds = lines[i + 1].split(":", 1)[1]
    caffe_part, mc_part = rounds.split(";")
    caffe_rounds = [float(v) for v in caffe_part.split()[1:]]
    mc_rounds = [float(v) for v in mc_part.split()[1:]]
    assert len(caffe_rounds) == len(mc_rounds) == 2
    assert abs(caffe_fb - min(caffe_rounds)) < 0.051 and abs(mc_fb - min(mc_rounds)) < 0.051


def test_bench_caffe_without_a_reference_says_how_to_get_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MINICAFFE_REFERENCE_CAFFE", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_caffe.py"), "--nets", "lenet"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: give --caffe PREFIX") and len(proc.stderr.strip().splitlines()) == 1
