"""Shared test set-up: the slow marker, a GPU-or-skip fixture, and mode reset between tests."""
import pytest

from minicaffe import backend


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def gpu():
    """Run the test in GPU mode, or skip it where CuPy sees no device."""
    if not backend.gpu_available():
        pytest.skip("no CUDA device")
    backend.set_mode_gpu()
    yield
    backend.set_mode_cpu()


@pytest.fixture(autouse=True)
def _cpu_mode_and_seed():
    backend.set_mode_cpu()
    backend.set_random_seed(1234)
    yield
    backend.set_mode_cpu()
