"""Shared test set-up: the slow marker, a GPU-or-skip fixture, log capture, mode reset between tests,
and a check that the test run leaves nothing new under tests/ (test outputs belong in tmp_path)."""
import io
import logging
import os
import subprocess

import pytest

from minicaffe import backend


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_status_tests():
    """``git status --porcelain`` of tests/ as a set of lines; None outside a git checkout (or without git)."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "tests"],
                              cwd=_ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else None


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):      # the controller only, under pytest-xdist
        session.config._tests_git_status = _git_status_tests()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if it left new or changed files under tests/ (compared with the start, so a
    developer's uncommitted edits do not count): test outputs once got committed under
    tests/corpus/solver/."""
    before = getattr(session.config, "_tests_git_status", None)
    if before is None:
        return
    after = _git_status_tests()
    if after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("error: the test run left files in the source tree (tests must write to tmp_path):\n  " +
                   "\n  ".join(new))
        if reporter is not None:
            reporter.write_line("\n" + message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
