"""The reference BVLC Caffe for the parity tests: where it is, and how to run it.

The reference is found, in order, from ``MINICAFFE_REFERENCE_CAFFE`` (its install prefix, which ``.ci/run``
exports after building it) or from ``../shared/reference-caffe/build.sh`` beside the checkout, which prints
the prefix at once when its cache is built. A fresh build takes minutes and runs apt-get, so outside CI it
is only run when asked (``MINICAFFE_BUILD_REFERENCE=1``); otherwise the parity tests skip with the reason.
On CI (``CI=true``, or ``MINICAFFE_REQUIRE_REFERENCE=1`` as ``.ci/run`` sets) a missing or unbuildable
reference FAILS them: a silent skip would hide every difference they exist to catch.

Caffe only ever runs in a subprocess: its own binaries (``PREFIX/bin/caffe`` ...) and pycaffe with the venv
Python it was compiled for, never imported into minicaffe's interpreter.
"""
import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SH = os.path.join(ROOT, "..", "shared", "reference-caffe", "build.sh")


def on_ci():
    """CI (``CI=true``) or ``.ci/run`` (``MINICAFFE_REQUIRE_REFERENCE=1``): no reference is a failure."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or \
        os.environ.get("MINICAFFE_REQUIRE_REFERENCE") == "1"


class ReferenceCaffe:
    """BVLC Caffe's install prefix plus helpers that run its tools and pycaffe in subprocesses."""

    def __init__(self, prefix, python):
        self.prefix, self.python = prefix, python

    def bin(self, name):
        return os.path.join(self.prefix, "bin", name)

    def env(self):
        env = dict(os.environ)
        env["GLOG_minloglevel"] = env.get("MINICAFFE_REFERENCE_GLOG", "2")
        env["PYTHONPATH"] = os.path.join(self.prefix, "python")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")     # deterministic and polite on a 2-core machine
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def run(self, tool, *args, cwd=None, timeout=300):
        """Run one of Caffe's binaries; returns the CompletedProcess, raising with its stderr on failure."""
        cmd = [self.bin(tool)] + [str(a) for a in args]
        proc = subprocess.run(cmd, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"reference {' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def pycaffe(self, script, *args, cwd=None, timeout=300):
        """Run a Python script with pycaffe importable (the reference venv's Python)."""
        cmd = [self.python, str(script)] + [str(a) for a in args]
        proc = subprocess.run(cmd, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"reference pycaffe {' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc


def _check_prefix(prefix):
    """(ReferenceCaffe, None) or (None, why not)."""
    caffe = os.path.join(prefix, "bin", "caffe")
    if not os.access(caffe, os.X_OK):
        return None, f"{caffe} is missing or not executable"
    python = os.environ.get("MINICAFFE_REFERENCE_PYTHON") or \
        os.path.join(os.path.dirname(os.path.abspath(prefix)), "venv", "bin", "python")
    if not os.access(python, os.X_OK):
        return None, f"pycaffe's Python {python} is missing (set MINICAFFE_REFERENCE_PYTHON)"
    return ReferenceCaffe(os.path.abspath(prefix), python), None


def _cache_built():
    base = os.environ.get("BASE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minicaffe-reference-caffe")
    return os.path.exists(os.path.join(base, "install", ".done"))


def locate_reference():
    """(ReferenceCaffe, None) or (None, the reason it is not available)."""
    prefix = os.environ.get("MINICAFFE_REFERENCE_CAFFE")
    if prefix:
        ref, why = _check_prefix(prefix)
        return ref, (None if ref else f"MINICAFFE_REFERENCE_CAFFE={prefix}: {why}")
    script = os.path.normpath(BUILD_SH)
    if not os.path.exists(script):
        return None, ("no reference Caffe: set MINICAFFE_REFERENCE_CAFFE to its install prefix "
                      "(../shared/reference-caffe/build.sh builds one)")
    if not (_cache_built() or on_ci() or os.environ.get("MINICAFFE_BUILD_REFERENCE") == "1"):
        return None, (f"reference Caffe not built yet: run `bash {script}` (about 6 minutes) "
                      "or set MINICAFFE_BUILD_REFERENCE=1")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, f"{script} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}"
    ref, why = _check_prefix(lines[-1].strip())
    return ref, (None if ref else f"{script} printed {lines[-1]!r}: {why}")


def require_reference():
    """The reference, or a skip with the reason; on CI a failure instead (the ``ref`` fixture)."""
    found, why = locate_reference()
    if found is None:
        if on_ci():
            pytest.fail(f"parity tests need the reference Caffe on CI: {why}", pytrace=False)
        pytest.skip(why)
    return found


# --- comparisons ------------------------------------------------------------------------------------

def rel_diff(a, b):
    """max|a - b| / max|b|: the largest difference relative to the reference's scale (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if b.size else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def assert_close(mine, theirs, tol, what):
    """Every named array within ``tol`` (rel_diff); the message lists every one that is not."""
    bad = []
    assert set(mine) == set(theirs), (what, sorted(set(mine) ^ set(theirs)))
    for key in sorted(theirs):
        r = rel_diff(mine[key], theirs[key])
        if not r <= tol:
            bad.append(f"{key}: {r:.3g}")
    assert not bad, f"{what}: differs from Caffe beyond {tol:g} (relative): " + ", ".join(bad)


def caffemodel_params(path):
    """{"layer/k": float32 array} of a .caffemodel, read with minicaffe's protobuf classes."""
    from minicaffe.proto import caffe_pb2
    net = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    out = {}
    for layer in (net.layer or net.layers):
        for k, blob in enumerate(layer.blobs):
            out[f"{layer.name}/{k}"] = np.asarray(blob.data, np.float32)
    return out
