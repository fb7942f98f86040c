"""``--log_file``, and the progress bar importable as before.

The bar (``ProgressBar``, tqdm's, that log lines clear and redraw) lives in ``minicaffe.core.terminal``,
since the solvers draw it too; ``--log_file`` writes the plain log lines to a file while the terminal
shows the bar."""
import contextlib
import logging

from ..core.terminal import ProgressBar, bars_wanted, get_logger  # noqa: F401


class _PlainFileHandler(logging.FileHandler):
    """``--log_file``: the same glog lines as the terminal, appended, never a bar in them."""


@contextlib.contextmanager
def log_to_file(path):
    """While the command runs, also append its log lines to ``path`` (nothing when ``path`` is '').

    Appended, as a log is read while it grows (``tail -f``) and an existing file, maybe an earlier
    run's log, is never truncated."""
    if not path:
        yield
        return
    log = get_logger()
    formatter = next((h.formatter for h in log.handlers if h.formatter is not None), None)
    try:
        handler = _PlainFileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        from ..errors import MinicaffeError
        raise MinicaffeError(f"--log_file {path}: cannot open: {exc.strerror or exc}") from None
    if formatter is not None:
        handler.setFormatter(formatter)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
