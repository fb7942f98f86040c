"""What minicaffe writes to the terminal: Caffe's glog-like log lines, the one-line ``error:``
message, and progress bars that share the terminal with the log lines.

Low in the package (next to errors.py) because every tier writes log lines or draws a bar: the
solvers log Caffe's training lines and draw the training bar, the data-parallel workers print their
error line, pycaffe's ``caffe.log``/``init_log`` log. ``minicaffe.tools.common`` and
``minicaffe.tools.progress`` re-export these names for the commands. (Not named ``log.py``: the
package's ``log`` attribute is pycaffe's ``caffe.log`` function, which a submodule would shadow.)

The bar is tqdm's (a maintained library) rather than a hand-written ``\\r`` line: it draws an ETA,
switches to seconds per iteration when an iteration takes more than a second ("3.2s/iter", not
"0.3 iter/s"), fits the terminal width, and stacks a second bar (a test pass inside training) under
the first. Log lines never land inside a bar: while a bar is open, the 'minicaffe' logger's terminal
handlers write through ``tqdm.external_write_mode``, which clears the bars, writes the line and
redraws them. Bars are drawn only when the stream is a terminal, so a log redirected to a file or a
pipe has no ``\\r`` in it.
"""
import logging
import os
import sys
import threading
import time
import weakref

from .context import switches


def debug_enabled(argv=None):
    """``--debug`` or $MINICAFFE_DEBUG: show the traceback of a user error instead of its one line."""
    return switches().debug or "--debug" in (argv or sys.argv)


# One lock for every line this package writes to the terminal: the log handler's and the error
# line's. Without it, a line logged by a prefetch thread could land between the error message and
# its newline when stderr is a pipe (print writes the two separately).
OUTPUT_LOCK = threading.RLock()
_SILENCED = weakref.WeakSet()           # background threads whose log lines are dropped
_BACKGROUND_PREFIXES = ("prefetch", "decode")   # minicaffe.data.prefetch names its threads so


def print_error(message):
    """Write ``error: <message>`` (white space folded into one line) to stderr as a line of its own
    and the last line of the command: stdout and stderr are flushed first, and from now on the log
    lines of the data threads (prefetch, decode) still running are dropped, so a prefetch thread that
    goes on reading while the process exits cannot write after it (scripts read the last line)."""
    with OUTPUT_LOCK:
        me = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not me and thread.name.startswith(_BACKGROUND_PREFIXES):
                _SILENCED.add(thread)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


_LOGGER = None


# glog's severities (GLOG_minloglevel 0..3) as logging levels
_GLOG_LEVELS = [(logging.INFO, "INFO"), (logging.WARNING, "WARNING"), (logging.ERROR, "ERROR"),
                (logging.CRITICAL, "FATAL")]


def glog_settings(environ=None):
    """(minimum logging level, log to stderr only, log directory or None) from glog's environment
    variables, which Caffe's tools honour: ``GLOG_minloglevel`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL;
    4 and above: nothing), ``GLOG_logtostderr`` (1: no log files) and ``GLOG_log_dir`` (where the log
    files go). Caffe's tools log to stderr as well as to files (they set alsologtostderr); glog's
    default directory for the files is /tmp, but minicaffe writes files only when GLOG_log_dir is set,
    so a plain run leaves nothing behind."""
    env = switches().glog if environ is None else environ
    try:
        minlevel = int(env.get("GLOG_minloglevel", "0").strip() or 0)
    except ValueError:
        minlevel = 0
    minlevel = max(0, minlevel)
    level = _GLOG_LEVELS[minlevel][0] if minlevel < len(_GLOG_LEVELS) else logging.CRITICAL + 10
    to_stderr_only = env.get("GLOG_logtostderr", "").strip().lower() in ("1", "true", "yes", "t", "y")
    log_dir = env.get("GLOG_log_dir", "").strip() or None
    return level, to_stderr_only, log_dir


def get_logger():
    """The 'minicaffe' logger writing Caffe's glog-like lines to stderr (``I1125 10:47:54.123 file] msg``)
    and, with ``GLOG_log_dir``, to glog-named log files; ``GLOG_minloglevel`` drops the lower levels."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = logging.getLogger("minicaffe")
        level, to_stderr_only, log_dir = glog_settings()
        if not _LOGGER.handlers:
            handler = SerialHandler(sys.stderr)
            handler.setFormatter(GlogFormatter())
            _LOGGER.addHandler(handler)
            if log_dir and not to_stderr_only:
                for file_level, name in _GLOG_LEVELS[:3]:
                    if file_level >= level:
                        _LOGGER.addHandler(GlogFileHandler(log_dir, name, file_level))
        _LOGGER.setLevel(level)
        _LOGGER.propagate = False
    return _LOGGER


class GlogFileHandler(logging.Handler):
    """glog's log file of one severity: ``<program>.<host>.<user>.log.<SEVERITY>.<yyyymmdd-hhmmss>.<pid>``
    in the log directory, holding every line of that severity and above, with a ``<program>.<SEVERITY>``
    link to it, created at the first such line (as glog does). A file that cannot be written is given
    up with one warning on stderr; logging never stops the run."""

    def __init__(self, log_dir, severity, level):
        super().__init__(level)
        self.log_dir, self.severity = log_dir, severity
        self.setFormatter(GlogFormatter())
        self.stream = None
        self.failed = False

    def createLock(self):
        self.lock = OUTPUT_LOCK

    def _open(self, created):
        import getpass
        import socket
        program = os.path.basename(sys.argv[0] or "python") or "python"
        if program.endswith(".py"):
            program = program[:-3]
        if program in ("__main__", "-c", "-m", ""):
            program = "python"
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "invalid-user"
        host = socket.gethostname() or "unknown"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(created))
        name = f"{program}.{host}.{user}.log.{self.severity}.{stamp}.{os.getpid()}"
        path = os.path.join(self.log_dir, name)
        # 'x': never write into a file this process did not create
        self.stream = open(path, "x", encoding="utf-8", errors="replace")
        self.stream.write(f"Log file created at: {time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(created))}\n"
                          f"Running on machine: {host}\n"
                          "Running duration (h:mm:ss): 0:00:00\n"
                          "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n")
        link = os.path.join(self.log_dir, f"{program}.{self.severity}")
        try:
            if os.path.islink(link):
                os.unlink(link)
            if not os.path.lexists(link):
                os.symlink(name, link)
        except OSError:
            pass

    def emit(self, record):
        if self.failed or threading.current_thread() in _SILENCED:
            return
        try:
            if self.stream is None:
                self._open(record.created)
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except OSError as exc:
            self.failed = True
            sys.stderr.write(f"warning: cannot write the log file in {self.log_dir} "
                             f"({exc.strerror or exc}); logging to stderr only\n")

    def close(self):
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None
        super().close()


class SerialHandler(logging.StreamHandler):
    """A StreamHandler that takes ``OUTPUT_LOCK`` (shared with ``print_error``) around each line and
    drops the lines of the threads ``print_error`` silenced."""

    def createLock(self):
        self.lock = OUTPUT_LOCK

    def emit(self, record):
        if threading.current_thread() in _SILENCED:
            return
        super().emit(record)


class GlogFormatter(logging.Formatter):
    """Lines shaped like Caffe's glog output, so Caffe's parse_log and our parse_log both read them."""

    def format(self, record):
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1e6)
        stamp = time.strftime("%m%d %H:%M:%S", t)
        return f"{record.levelname[0]}{stamp}.{usec:06d} {record.process} {record.filename}:{record.lineno}] " \
               f"{record.getMessage()}"


# --- progress bars ------------------------------------------------------------------------------

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
