"""Parity tests: minicaffe against BVLC Caffe on the same files in the same run (see reference.py)."""
import pytest

from .reference import locate_reference, on_ci


@pytest.fixture(scope="session")
def ref():
    """The reference Caffe; skips (fails on CI) when there is none."""
    found, why = locate_reference()
    if found is None:
        if on_ci():
            pytest.fail(f"parity tests need the reference Caffe on CI: {why}", pytrace=False)
        pytest.skip(why)
    return found
