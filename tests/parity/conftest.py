"""Parity tests: minicaffe against BVLC Caffe on the same files in the same run (see reference.py)."""
import pytest

from .reference import require_reference


@pytest.fixture(scope="session")
def ref():
    """The reference Caffe; skips (fails on CI) when there is none."""
    return require_reference()
