"""The reference fixture itself: without a reference the parity tests skip, but on CI they fail."""
import os
import subprocess
import sys

import pytest

from .reference import require_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MINICAFFE_REQUIRE_REFERENCE", raising=False)
    monkeypatch.setenv("MINICAFFE_REFERENCE_CAFFE", str(tmp_path / "no-such-prefix"))


@pytest.mark.parametrize("var,value", [("CI", "true"), ("MINICAFFE_REQUIRE_REFERENCE", "1")])
def test_missing_reference_fails_on_ci(no_reference, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(pytest.fail.Exception, match="need the reference Caffe on CI: .*no-such-prefix/bin/caffe"):
        require_reference()


def test_missing_reference_skips_elsewhere(no_reference):
    with pytest.raises(pytest.skip.Exception, match="no-such-prefix/bin/caffe is missing"):
        require_reference()


def test_a_parity_test_run_fails_on_ci_without_the_reference(tmp_path):
    """End to end, as CI runs it: pytest exits non-zero and says why."""
    env = dict(os.environ, CI="true", MINICAFFE_REFERENCE_CAFFE=str(tmp_path / "no-such-prefix"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/parity/test_layers.py", "-k", "conv"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "parity tests need the reference Caffe on CI" in proc.stdout, proc.stdout
