"""Atomic file writes: every file minicaffe produces appears whole under its final name or not at all.

For fault-injection tests, MINICAFFE_SLOW_WRITE_S=<seconds> makes :func:`atomic_write` pause halfway
through writing each file, so that a process killed at a random moment is often caught mid-write.
"""
import contextlib
import os
import tempfile
import time


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; follow the umask like open() does
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path, data):
    """Write bytes (or str) to ``path`` atomically; errors name the file."""
    from .errors import MinicaffeError
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    pause = _slow_write_pause()
    try:
        with atomic_open(path, mode) as f:
            if pause:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                time.sleep(pause)
                f.write(data[half:])
            else:
                f.write(data)
    except OSError as exc:
        raise MinicaffeError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _slow_write_pause():
    try:
        return max(0.0, float(os.environ.get("MINICAFFE_SLOW_WRITE_S", "") or 0))
    except ValueError:
        return 0.0


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
