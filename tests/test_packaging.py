"""Packaging: the wheel carries models/, proto/caffe.proto and tools/*.sh; documented paths such as
models/lenet/solver.prototxt resolve against them from any directory; ``minicaffe models``; every
console script is also a ``minicaffe`` subcommand; ``python -m minicaffe``."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny MNIST-shaped LMDBs where models/lenet/train_val.prototxt looks for them (relative to the cwd)
MAKE_MNIST_LMDBS = r"""
import os, lmdb, numpy as np
from minicaffe.proto import caffe_pb2
rng = np.random.default_rng(0)
for name in ("mnist_train_lmdb", "mnist_test_lmdb"):
    path = os.path.join("examples", "mnist", name)
    os.makedirs(path)
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(8):
            d = caffe_pb2.Datum(channels=1, height=28, width=28, label=i % 10,
                                data=rng.integers(0, 256, 28 * 28, dtype=np.uint8).tobytes())
            txn.put(b"%08d" % i, d.SerializeToString())
    env.close()
"""


def _run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_lenet_from_empty_dir(python, cwd, env=None):
    """From an empty folder, with only tiny LMDBs: ``minicaffe train --solver
    models/lenet/solver.prototxt`` must read the shipped solver and net and write its snapshot here."""
    r = _run([python, "-c", MAKE_MNIST_LMDBS], cwd, env=env)
    assert r.returncode == 0, r.stderr
    r = _run([python, "-m", "minicaffe", "train", "--solver", "models/lenet/solver.prototxt",
              "--iterations", "2"], cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--solver 'models/lenet/solver.prototxt' is not in the working directory; using the copy " \
           "shipped with minicaffe" in r.stderr
    assert "net 'models/lenet/train_val.prototxt' is not in the working directory" in r.stderr
    assert "Optimization Done." in r.stderr
    # the snapshot went to the working directory's models/lenet, never into the shipped folder
    assert os.path.isfile(os.path.join(cwd, "models", "lenet", "lenet_iter_2.caffemodel"))
    assert not os.path.exists(os.path.join(cwd, "models", "lenet", "solver.prototxt"))
    return r


@pytest.mark.slow
def test_shipped_lenet_trains_from_an_empty_directory(tmp_path):
    """A fresh directory holds no models/: the checkout's files are found (the wheel's in the slow test
    below). Slow: LeNet's solver tests 100 batches of 100 before and after training (~12 s)."""
    _train_lenet_from_empty_dir(sys.executable, str(tmp_path), env=_env())
    assert not os.path.exists(os.path.join(ROOT, "models", "lenet", "lenet_iter_2.caffemodel"))


def test_shipped_solver_and_net_resolve_from_an_empty_directory(tmp_path):
    """The fast variant: without the MNIST LMDBs the shipped solver and net are found (both logged),
    the snapshot folder is made here, and the run stops at the data source, named relative to the
    working directory (the data are the user's, never looked up in the shipped files)."""
    r = _run([sys.executable, "-m", "minicaffe", "train", "--solver", "models/lenet/solver.prototxt"],
             str(tmp_path), env=_env())
    assert r.returncode == 1
    assert "--solver 'models/lenet/solver.prototxt' is not in the working directory; using the copy " \
           "shipped with minicaffe" in r.stderr
    assert r.stderr.count("net 'models/lenet/train_val.prototxt' is not in the working directory") == 1
    assert r.stderr.strip().splitlines()[-1].endswith("examples/mnist/mnist_train_lmdb: no such LMDB database")
    assert os.path.isdir(tmp_path / "models" / "lenet")
    assert not os.path.exists(tmp_path / "models" / "lenet" / "solver.prototxt")


def test_local_solver_naming_a_shipped_net_trains(tmp_path):
    """``net:`` inside the user's own solver file: found in the shipped files; trains two iterations."""
    r = _run([sys.executable, "-c", MAKE_MNIST_LMDBS], str(tmp_path), env=_env())
    assert r.returncode == 0, r.stderr
    (tmp_path / "solver.prototxt").write_text(
        'net: "models/lenet/train_val.prototxt"\ntest_iter: 1\ntest_interval: 100\nbase_lr: 0.01\n'
        'lr_policy: "fixed"\nmax_iter: 2\nsnapshot_prefix: "lenet"\n')
    r = _run([sys.executable, "-m", "minicaffe", "train", "--solver", "solver.prototxt"], str(tmp_path), env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    # the train and the test net both come from that file: one line says so
    assert r.stderr.count("net 'models/lenet/train_val.prototxt' is not in the working directory; using "
                          "the copy shipped with minicaffe") == 1
    assert os.path.isfile(tmp_path / "lenet_iter_2.caffemodel")


def test_missing_non_shipped_path_still_fails_with_one_line(tmp_path):
    r = _run([sys.executable, "-m", "minicaffe", "train", "--solver", "models/nope/solver.prototxt"],
             str(tmp_path), env=_env())
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "models/nope/solver.prototxt" in r.stderr and "Traceback" not in r.stderr


def test_model_from_the_shipped_files_for_time(tmp_path):
    """``--model`` too: ``minicaffe time`` on the shipped LeNet deploy net from an empty folder."""
    r = _run([sys.executable, "-m", "minicaffe", "time", "--model", "models/lenet/deploy.prototxt",
              "--iterations", "1"], str(tmp_path), env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--model 'models/lenet/deploy.prototxt' is not in the working directory" in r.stderr


def test_models_list_copy_and_path(tmp_path):
    r = _run([sys.executable, "-m", "minicaffe", "models"], str(tmp_path), env=_env())
    assert r.returncode == 0, r.stderr
    assert "models/lenet: README.md deploy.prototxt solver.prototxt train_val.prototxt" in r.stdout
    assert "models/vgg/vgg_a:" in r.stdout
    dest = tmp_path / "work"
    r = _run([sys.executable, "-m", "minicaffe", "models", "copy", "lenet", str(dest)], str(tmp_path), env=_env())
    assert r.returncode == 0, r.stderr
    copied = dest / "models" / "lenet" / "solver.prototxt"
    with open(os.path.join(ROOT, "models", "lenet", "solver.prototxt"), "rb") as f:
        assert copied.read_bytes() == f.read()
    # a second copy refuses to overwrite, with one line naming the file
    (dest / "models" / "lenet" / "solver.prototxt").write_text("# mine\n")
    r = _run([sys.executable, "-m", "minicaffe", "models", "copy", "lenet", str(dest)], str(tmp_path), env=_env())
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "already exists" in r.stderr
    assert copied.read_text() == "# mine\n"
    r = _run([sys.executable, "-m", "minicaffe", "models", "copy", "nonet", str(dest)], str(tmp_path), env=_env())
    assert r.returncode == 1 and "no shipped model 'nonet'" in r.stderr and "lenet" in r.stderr
    r = _run([sys.executable, "-m", "minicaffe", "models", "path", "proto/caffe.proto"], str(tmp_path), env=_env())
    assert r.returncode == 0 and r.stdout.strip().endswith(os.path.join("proto", "caffe.proto"))
    assert os.path.isfile(r.stdout.strip())


def test_shipped_path_refuses_escapes():
    from minicaffe.core import shipped
    assert shipped.path("models/lenet/solver.prototxt") is not None
    assert shipped.path("models/../setup.py") is None
    assert shipped.path("minicaffe/net/network.py") is None
    assert shipped.path(os.path.join(ROOT, "models", "lenet", "solver.prototxt")) is None


def _pyproject():
    tomllib = pytest.importorskip("tomllib")        # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_console_script_is_a_minicaffe_subcommand():
    from minicaffe.tools import subcommands
    scripts = _pyproject()["project"]["scripts"]
    assert scripts.pop("minicaffe") == "minicaffe.tools.cli:main"
    assert scripts == {k: v for k, v in subcommands.TOOLS.items() if k != "models"}


@pytest.mark.parametrize("tool", ["parse_log", "draw_net", "convert_imageset", "upgrade_net_proto_text"])
def test_subcommand_runs_the_tool(tool, tmp_path):
    """``minicaffe <tool> --help`` is the tool's own help (its parser's options), exit 0."""
    r = _run([sys.executable, "-m", "minicaffe", tool, "--help"], str(tmp_path), env=_env())
    script = _run([sys.executable, "-c", f"import sys; from minicaffe.tools.subcommands import function; "
                                          f"sys.argv[0] = 'x'; sys.exit(function({tool!r})(['--help']))"],
                  str(tmp_path), env=_env())
    assert r.returncode == 0 and script.returncode == 0, r.stderr
    assert r.stdout.split("\n", 1)[1] == script.stdout.split("\n", 1)[1]   # past the usage line's prog name


def _build_wheel(dest):
    """Build the wheel from a copy of the sources (the build leaves build/ and *.egg-info behind), with
    the setuptools of this environment (no download)."""
    src = os.path.join(dest, "src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "build", "*.egg-info")
    os.makedirs(src)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("minicaffe", "models", "proto", "tools"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name), ignore=ignore)
    out = os.path.join(dest, "dist")
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src],
             dest)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not installed in this environment")
    assert r.returncode == 0, r.stderr
    (wheel,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return wheel


def _need_setuptools_77():
    """pyproject.toml's SPDX license needs setuptools >= 77 (build isolation would fetch it)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (77)")


def test_wheel_carries_models_proto_and_scripts(tmp_path):
    _need_setuptools_77()
    wheel = _build_wheel(str(tmp_path))
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in ("models", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".prototxt", ".sh", "README.md")):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                    assert "minicaffe/_shipped/" + rel in names
    for name in ("minicaffe/_shipped/proto/caffe.proto", "minicaffe/py.typed", "minicaffe/__main__.py",
                 "minicaffe/proto/caffe_pb2.py", "minicaffe/_shipped/tools/create_imagenet.sh"):
        assert name in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-2-Clause" in meta
    assert "Requires-Dist: protobuf<8,>=4.21" in meta
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in _pyproject()["project"]["scripts"]:
        assert f"\n{script} = " in entry_points


@pytest.mark.slow
def test_installed_wheel_trains_shipped_lenet(tmp_path):
    """The packaging promise end to end: wheel, fresh venv outside the checkout, empty directory,
    ``minicaffe train --solver models/lenet/solver.prototxt`` trains from the shipped files."""
    _need_setuptools_77()
    wheel = _build_wheel(str(tmp_path))
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)], str(tmp_path))
    assert r.returncode == 0, r.stderr
    py = str(venv / "bin" / "python")
    r = _run([py, "-m", "pip", "install", "-q", wheel], str(tmp_path), timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot install the wheel's dependencies here (no index?): {r.stderr[-300:]}")
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = _run([py, "-c", "import minicaffe; print(minicaffe.__file__)"], str(work), env=env)
    assert str(venv) in r.stdout, r.stdout + r.stderr          # the installed copy, not the checkout
    r = _train_lenet_from_empty_dir(py, str(work), env=env)
    assert "_shipped" in r.stderr
    r = _run([str(venv / "bin" / "minicaffe"), "models", "path", "tools/create_imagenet.sh"], str(work), env=env)
    assert r.returncode == 0 and os.path.isfile(r.stdout.strip())
