"""Atomic file writes: every file minicaffe produces appears whole under its final name or not at all."""
import contextlib
import os
import tempfile


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
    try:
        with atomic_open(path, mode) as f:
            f.write(data)
    except OSError as exc:
        raise MinicaffeError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
