"""What every command shares: one-line errors, Caffe-style log lines, a terminal progress bar."""
import functools
import logging
import os
import sys
import threading
import time
import weakref

from ..core.context import switches
from ..errors import MinicaffeError


def debug_enabled(argv=None):
    return switches().debug or "--debug" in (argv or sys.argv)


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
    env = os.environ if environ is None else environ
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
            handler = _SerialHandler(sys.stderr)
            handler.setFormatter(_GlogFormatter())
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
        self.setFormatter(_GlogFormatter())
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
