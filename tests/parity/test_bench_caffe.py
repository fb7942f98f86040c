"""benchmarks/bench_caffe.py runs BVLC Caffe's ``caffe time`` and ``minicaffe time`` on the same net in
one run: both sides must produce their averages (the numbers themselves depend on the machine)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_lenet(ref, *args):
    """bench_caffe.py's stdout lines for LeNet (1 iteration, 1 thread, ``args`` added), and the
    index of the net's row."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_caffe.py"), "--caffe", ref.prefix,
                           "--nets", "lenet", "--iterations", "1", "--threads", "1", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout, proc.stdout
    lines = proc.stdout.splitlines()
    return lines, next(k for k, line in enumerate(lines) if line.startswith("lenet"))


def test_bench_caffe_times_lenet_in_both(ref):
    lines, i = _bench_lenet(ref)
    fields = lines[i].replace("|", " ").split()
    caffe_fb, mc_fb, ratio = float(fields[4]), float(fields[7]), float(fields[8])
    assert caffe_fb > 0 and mc_fb > 0
    assert abs(ratio - mc_fb / caffe_fb) < 0.01 + 0.01 * ratio


def test_bench_caffe_rounds_keep_each_tools_best(ref):
    """``--rounds 2``: both tools run twice; the row shows each one's lowest forward + backward, and
    the line under it every round's."""
    lines, i = _bench_lenet(ref, "--rounds", "2")
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


def test_bench_caffe_by_kind_sums_each_tools_layers(ref):
    """``--by-kind``: under the row, each kind LeNet has with both tools' sums, and the budget line;
    each tool's layer sums are parts of its forward + backward, so they add up to no more than it."""
    lines, i = _bench_lenet(ref, "--by-kind")
    fields = lines[i].replace("|", " ").split()
    caffe_fb, mc_fb = float(fields[4]), float(fields[7])
    assert lines[i + 1].strip().startswith("by kind")
    sums = {}
    for line in lines[i + 2:i + 5]:
        # "      <kind, 31 wide> <Caffe ms> / <minicaffe ms>  <ratio>  <share>%"
        values = line[37:].split()
        sums[line[:37].strip()] = (float(values[0]), float(values[2]))
    assert set(sums) == {"convolution 3x3/5x5, stride 1", "inner product", "everything else"}
    assert all(r > 0 and m > 0 for r, m in sums.values())
    assert sum(r for r, _ in sums.values()) <= caffe_fb * 1.05
    assert sum(m for _, m in sums.values()) <= mc_fb * 1.05
    assert lines[i + 5].strip().startswith("at 0.5x of Caffe's")
