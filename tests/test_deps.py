"""minicaffe.deps: one wording for a missing package (the extra that installs it), and the
opencv-python / opencv-python-headless clash named with the commands that fix it."""
import os
import subprocess
import sys

import numpy as np
import pytest

from minicaffe import deps
from minicaffe.errors import DataError, MinicaffeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)        # import h5py -> ImportError
    with pytest.raises(DataError) as exc:
        deps.require("h5py", "HDF5Data", DataError)
    assert str(exc.value) == "HDF5Data needs h5py: pip install 'minicaffe[hdf5]'"
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MinicaffeError, match=r"^x needs scikit-learn: pip install 'minicaffe\[examples\]'$"):
        deps.require("sklearn.datasets", "x")


def test_require_returns_the_module():
    assert deps.require("numpy", "x") is np


def test_hdf5_weights_missing_h5py_message(monkeypatch, tmp_path):
    """Through the API: Net.copy_from on a .h5 file without h5py."""
    import minicaffe
    net = minicaffe.Net(
        'layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 2 } } }', minicaffe.TEST)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MinicaffeError, match=r"HDF5 weights needs h5py: pip install 'minicaffe\[hdf5\]'"):
        net.copy_from(str(tmp_path / "w.caffemodel.h5"))


def _fake_site(tmp_path, module, error, dists=()):
    """A folder, put first on sys.path, whose ``module`` fails to import with ``error`` and which
    holds dist-info folders for ``dists`` (as pip leaves them)."""
    site = tmp_path / "site"
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(f"raise ImportError({error!r})\n")
    for dist in dists:
        info = site / f"{dist.replace('-', '_')}-4.12.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 4.12.0\n")
    return site


def _run(code, site, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_both_opencv_wheels_are_named_with_the_fix(tmp_path):
    """cv2 broken while both distributions are installed: load_image and convert_imageset say so,
    and `import minicaffe` itself still works."""
    site = _fake_site(tmp_path, "cv2", "libGL.so.1: cannot open shared object file",
                      ["opencv-python", "opencv-python-headless"])
    code = ("import minicaffe, minicaffe.io\n"
            "try:\n    minicaffe.io.load_image('x.png')\n"
            "except minicaffe.MinicaffeError as e:\n    print(e)\n")
    r = _run(code, site, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        "load_image needs OpenCV, and cv2 does not import (libGL.so.1: cannot open shared object file): "
        "both opencv-python and opencv-python-headless are installed; pip uninstall opencv-python "
        "opencv-python-headless && pip install opencv-python-headless")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    r = _run("import sys; from minicaffe.tools.cli import main; sys.exit(main(['convert_imageset', '"
             + str(tmp_path) + "/', 'list.txt', 'db']))", site, str(tmp_path))
    assert r.returncode == 1
    assert "both opencv-python and opencv-python-headless are installed; pip uninstall" in r.stderr
    assert "Traceback" not in r.stderr


def test_gui_opencv_alone_without_libgl(tmp_path):
    site = _fake_site(tmp_path, "cv2", "libGL.so.1: cannot open shared object file", ["opencv-python"])
    # the real headless wheel of this environment must not count: hide its metadata lookup
    code = ("import importlib.metadata as m, minicaffe.deps as d\n"
            "real = m.distribution\n"
            "def fake(n):\n"
            "    if n == 'opencv-python-headless': raise m.PackageNotFoundError(n)\n"
            "    return real(n)\n"
            "m.distribution = fake\n"
            "try:\n    d.import_cv2('x')\nexcept Exception as e:\n    print(e)\n")
    r = _run(code, site, str(tmp_path))
    assert "opencv-python (the GUI build) is installed" in r.stdout, r.stdout + r.stderr
    assert "pip install opencv-python-headless" in r.stdout


def test_digits_example_without_scikit_learn(tmp_path):
    site = _fake_site(tmp_path, "sklearn", "No module named 'sklearn'")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "digits", "prepare_digits.py"),
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: examples/digits (its data set) needs scikit-learn: "
                                "pip install 'minicaffe[examples]'")
    assert not os.path.exists(tmp_path / "out")
