"""Progress bars that share the terminal with the log lines, and ``--log_file``.

The bar is tqdm's (a maintained library) rather than a hand-written ``\\r`` line: it draws an ETA,
switches to seconds per iteration when an iteration takes more than a second ("3.2s/iter", not
"0.3 iter/s"), fits the terminal width, and stacks a second bar (a test pass inside training) under
the first. The hand-written bar this replaces wrote its line and let the log handler write over it
(``ETA 00:00:00I1126 ...``).

Log lines never land inside a bar: while a bar is open, the 'minicaffe' logger's terminal handlers
write through ``tqdm.external_write_mode``, which clears the bars, writes the line and redraws them.
Bars are drawn only when the stream is a terminal, so a log redirected to a file or a pipe has no
``\\r`` in it; ``--log_file`` writes the plain lines to a file while the terminal shows the bar.
"""
import contextlib
import logging
import sys
import threading

from ..core.context import switches

_LOCK = threading.RLock()
_OPEN = 0                   # bars open now (a test pass's bar inside training's makes two)
_SWAPPED = []               # (handler, its own stream) while bars are open


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def bars_wanted(stream=None):
    """Bars on ``stream`` (stderr): only on a terminal, and not with MINICAFFE_NO_PROGRESS=1."""
    if switches().no_progress:
        return False
    return _is_tty(stream or sys.stderr)


class _AroundBars:
    """A stream proxy for a log handler: each write clears the bars, writes, redraws them."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        from tqdm import tqdm
        with tqdm.external_write_mode(file=self._stream):
            n = self._stream.write(text)
            self._stream.flush()
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _logger_handlers():
    from .common import get_logger
    return [h for h in get_logger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _opened(stream):
    global _OPEN
    with _LOCK:
        _OPEN += 1
        if _OPEN == 1:
            for h in _logger_handlers():
                if h.stream is stream:
                    _SWAPPED.append((h, h.stream))
                    h.stream = _AroundBars(h.stream)


def _closed():
    global _OPEN
    with _LOCK:
        _OPEN -= 1
        if _OPEN == 0:
            for h, stream in _SWAPPED:
                if isinstance(h.stream, _AroundBars):
                    h.stream = stream
            _SWAPPED.clear()


class ProgressBar:
    """count/total, rate and ETA on a terminal line that log lines clear and redraw; nothing at all
    when the stream is not a terminal. ``enabled`` forces it on or off (off on non-root workers)."""

    def __init__(self, total=None, unit="it", stream=None, enabled=None, min_interval=0.2, desc=None,
                 leave=True):
        self.total, self.unit, self.count = total, unit, 0
        self.stream = stream or sys.stderr
        self.enabled = bars_wanted(self.stream) if enabled is None else bool(enabled)
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:     # an install without it (it is a dependency): no bar, no failure
                self.enabled = False
                return
            self._bar = tqdm(total=total, unit=unit, desc=desc, file=self.stream, leave=leave,
                             mininterval=min_interval, dynamic_ncols=True, smoothing=0.1)
            _opened(self.stream)

    def update(self, n=1):
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()
            _closed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    from .common import get_logger
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
