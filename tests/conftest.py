"""Shared test set-up: the slow marker, the GPU fixture (real CuPy or the stand-in), the guard that
fails a CI run whose GPU tests all skipped, log capture, mode reset between tests, and a check that
the test run leaves nothing new in the checkout (test outputs belong in tmp_path)."""
import gc
import io
import logging
import os
import subprocess
import sys

import pytest

from minicaffe.core import backend, context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cupy_standin  # noqa: E402  (tests/ is not a package)
import cudnn_standin  # noqa: E402

# Real CuPy with a visible device wins; otherwise the GPU tests run on tests/cupy_standin.py.
# MINICAFFE_NO_STANDIN=1 turns the stand-in off (the GPU tests then skip without a GPU; the
# all-skipped guard below accepts that only where it is said: MINICAFFE_GPU_SKIP_OK=<reason>).
REAL_GPU = backend.gpu_available()
_gpu_outcomes = {"ran": 0, "skipped": 0}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_status():
    """``git status --porcelain`` of the checkout as a set of lines; None outside a git checkout (or
    without git)."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                              cwd=_ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else None


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):      # the controller only, under pytest-xdist
        session.config._git_status_at_start = _git_status()


def _check_source_tree_untouched(session):
    """Fail the run if it left new or changed files in the checkout (compared with the start, so a
    developer's uncommitted edits do not count): test outputs once got committed under
    tests/corpus/solver/."""
    before = getattr(session.config, "_git_status_at_start", None)
    if before is None:
        return
    # a solver left in a reference cycle (a test's callback closing over it) still holds its snapshot
    # prefix's lock file, which it removes when freed: free it now, so whether the garbage collector
    # happened to run before this check does not decide the outcome
    gc.collect()
    after = _git_status()
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs in GPU mode (real CuPy, or the CuPy stand-in without a GPU)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def gpu_backend_name():
    """'cupy' on a real GPU, 'standin' where the CuPy stand-in runs the GPU tests, None if neither."""
    if REAL_GPU:
        return "cupy"
    return None if os.environ.get("MINICAFFE_NO_STANDIN") == "1" else "standin"


@pytest.fixture
def gpu():
    """Run the test in GPU mode: on real CuPy where a device is visible (with the real cuDNN where
    it is installed), else on the strict CuPy stand-in installed as ``cupy`` for this test only (so
    CPU tests never see it), with the cuDNN emulation as the context's cuDNN library."""
    kind = gpu_backend_name()
    if kind is None:
        pytest.skip("no CUDA device and MINICAFFE_NO_STANDIN=1")
    if kind == "cupy":
        backend.set_mode_gpu()
        yield "cupy"
        backend.set_mode_cpu()
        return
    saved_modules = cupy_standin.install()
    ctx = context.current()
    saved_cupy, saved_cudnn = ctx.cupy, ctx.cudnn
    ctx.cupy = cupy_standin
    # the emulated cuDNN 9 (tests/cudnn_standin.py): the cuDNN engine is DEFAULT in every stand-in
    # GPU test, as it is on a GPU machine with cuDNN installed
    ctx.cudnn = cudnn_standin.FakeCudnn()
    try:
        backend.set_mode_gpu()
        yield "standin"
    finally:
        backend.set_mode_cpu()
        ctx.cupy, ctx.cudnn = saved_cupy, saved_cudnn
        cupy_standin.uninstall(saved_modules)


def pytest_runtest_logreport(report):
    if "gpu" not in report.keywords:
        return
    if report.when == "call" and not report.skipped:
        _gpu_outcomes["ran"] += 1
    elif report.skipped:
        _gpu_outcomes["skipped"] += 1


def pytest_sessionfinish(session, exitstatus):
    _check_source_tree_untouched(session)
    _check_gpu_tests_ran(session)


def _check_gpu_tests_ran(session):
    """In CI a backend whose tests all skipped fails the run: silently untested GPU code is how the
    GPU path went years without running. MINICAFFE_GPU_SKIP_OK=<reason> documents an exception."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    if _gpu_outcomes["skipped"] and not _gpu_outcomes["ran"]:
        reason = os.environ.get("MINICAFFE_GPU_SKIP_OK")
        msg = (f"all {_gpu_outcomes['skipped']} GPU-mode tests were skipped (no CUDA device and no "
               f"CuPy stand-in)")
        if reason:
            print(f"\nnote: {msg}; accepted: MINICAFFE_GPU_SKIP_OK={reason}")
            return
        print(f"\nerror: {msg}; CI must run them (unset MINICAFFE_NO_STANDIN, or set "
              f"MINICAFFE_GPU_SKIP_OK=<reason>)")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _cpu_mode_and_seed():
    backend.set_mode_cpu()
    backend.set_random_seed(1234)
    switches = context.current().switches
    yield
    backend.set_mode_cpu()
    context.current().switches = switches     # a test's env_switch values end with it


@pytest.fixture
def env_switch(monkeypatch):
    """``env_switch(name, value)``: set a MINICAFFE_* variable (``None`` unsets it) for this test.
    minicaffe reads its switches once, into the context (minicaffe/core/context.py), so a plain
    ``monkeypatch.setenv`` would not reach it: this sets the variable (for child processes too) and
    reloads the context's switches; both go back after the test."""
    def switch(name, value):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        context.reload_environment()
    return switch


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
