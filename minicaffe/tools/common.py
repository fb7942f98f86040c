"""What every command shares: one-line errors, Caffe-style log lines, a terminal progress bar."""
import functools
import logging
import os
import sys
import threading
import time
import weakref

from ..errors import MinicaffeError


def debug_enabled(argv=None):
    return os.environ.get("MINICAFFE_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv)


def run_main(fn):
    """Decorate ``main(argv=None)``: user errors print ``error: ...`` on one line and return 1."""
    @functools.wraps(fn)
    def wrapper(argv=None):
        if argv is not None:
            argv = list(argv)
        try:
            code = fn([a for a in argv if a != "--debug"] if argv is not None else None)
            sys.stdout.flush()      # inside the try: a closed pipe is reported below, not at exit
            return 0 if code is None else code
        except BrokenPipeError as exc:
            if _reader_gone(sys.stdout):
                return _stdout_closed()
            print_error(f"{exc.filename or 'pipe'}: {exc.strerror or exc}")   # another pipe than stdout
            return 1
        except KeyboardInterrupt:
            print_error("interrupted")
            return 130
        except (MinicaffeError, OSError) as exc:
            if debug_enabled(argv):
                raise
            msg = str(exc)
            if isinstance(exc, OSError) and exc.filename:
                msg = f"{exc.filename}: {exc.strerror or exc}"
            print_error(msg)
            return 1
    return wrapper


def _reader_gone(stream):
    """Whether ``stream`` is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    import select
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _stdout_closed():
    """``minicaffe --help | head -1``: the reader went away, which is not an error of ours. Python's
    advice: point stdout at /dev/null so the interpreter's last flush does not print "Exception
    ignored ... BrokenPipeError" either; exit status 141 is the shell's for a SIGPIPE death, as a C
    tool (Caffe's) dies there."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):     # a stdout without a descriptor (captured)
        pass
    return 141


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


def strip_debug_flag(argv):
    return [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]


_LOGGER = None


def get_logger():
    """The 'minicaffe' logger writing Caffe's glog-like lines to stderr (``I1125 10:47:54.123 file] msg``)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = logging.getLogger("minicaffe")
        if not _LOGGER.handlers:
            handler = _SerialHandler(sys.stderr)
            handler.setFormatter(_GlogFormatter())
            _LOGGER.addHandler(handler)
        _LOGGER.setLevel(logging.INFO)
        _LOGGER.propagate = False
    return _LOGGER


class _SerialHandler(logging.StreamHandler):
    """A StreamHandler that takes ``OUTPUT_LOCK`` (shared with ``print_error``) around each line and
    drops the lines of the threads ``print_error`` silenced."""

    def createLock(self):
        self.lock = OUTPUT_LOCK

    def emit(self, record):
        if threading.current_thread() in _SILENCED:
            return
        super().emit(record)


class _GlogFormatter(logging.Formatter):
    """Lines shaped like Caffe's glog output, so Caffe's parse_log and our parse_log both read them."""

    def format(self, record):
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1e6)
        stamp = time.strftime("%m%d %H:%M:%S", t)
        return f"{record.levelname[0]}{stamp}.{usec:06d} {record.process} {record.filename}:{record.lineno}] " \
               f"{record.getMessage()}"


# the bar lives in progress.py (tqdm, log lines clear and redraw it); importable from here as before
from .progress import ProgressBar  # noqa: E402,F401
