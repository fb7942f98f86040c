"""Where BVLC Caffe's own tools are, for the tests that compare minicaffe's databases with Caffe's.

The install prefix comes from ``MINICAFFE_REFERENCE_CAFFE`` or from the cache that
``../shared/reference-caffe/build.sh`` fills (used only once built: a build takes minutes). Without
either, the tests that need it skip with the reason.
"""
import os
import subprocess

import pytest


def reference_prefix():
    prefix = os.environ.get("MINICAFFE_REFERENCE_CAFFE")
    if prefix:
        return prefix
    base = os.environ.get("BASE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minicaffe-reference-caffe")
    if os.path.exists(os.path.join(base, "install", ".done")):
        return os.path.join(base, "install")
    return None


def reference_tool(name):
    """The path of Caffe's ``name`` binary, or skip the test."""
    prefix = reference_prefix()
    if prefix is None:
        pytest.skip("reference Caffe not built (bash ../shared/reference-caffe/build.sh, or set "
                    "MINICAFFE_REFERENCE_CAFFE)")
    path = os.path.join(prefix, "bin", name)
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is missing")
    return path


def run_reference(name, *args, cwd=None, env=None, timeout=300):
    """Run one of Caffe's tools; returns the CompletedProcess (stdout+stderr text), failing the test
    with its output when it fails."""
    full_env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([reference_tool(name)] + [str(a) for a in args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"reference {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc
