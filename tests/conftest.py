"""Shared test set-up: the slow marker, a GPU-or-skip fixture, log capture, and mode reset between tests."""
import io
import logging

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


@pytest.fixture
def logs():
    """The messages the 'minicaffe' logger emits at INFO and above during the test, a list."""
    from minicaffe.tools.common import get_logger
    messages = []

    class Grab(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Grab(level=logging.INFO)
    get_logger().addHandler(handler)
    yield messages
    get_logger().removeHandler(handler)


@pytest.fixture
def log_text():
    """Everything the 'minicaffe' logger writes during the test, as a StringIO."""
    from minicaffe.tools.common import get_logger
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    get_logger().addHandler(handler)
    yield buf
    get_logger().removeHandler(handler)
