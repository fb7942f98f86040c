"""What every command shares: one-line errors, Caffe-style log lines, a terminal progress bar.

The log lines, the error line and the bar live in ``minicaffe.core.terminal`` (the solvers, the
data-parallel workers and pycaffe use them too, and nothing below ``tools/`` imports ``tools/``);
they are importable from here as before."""
import functools
import os
import sys

from ..errors import MinicaffeError
from ..core.terminal import (OUTPUT_LOCK, GlogFileHandler, ProgressBar, GlogFormatter,  # noqa: F401
                        SerialHandler, debug_enabled, get_logger, glog_settings, print_error)


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


def strip_debug_flag(argv):
    return [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]

