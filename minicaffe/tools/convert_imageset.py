"""convert_imageset: images named in a list file → an LMDB of Caffe Datum records.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE has ``<path> <label>`` lines (the label is the last field, so paths may contain spaces);
each image is ``ROOTFOLDER + path``. Flags as Caffe's tool (gflags style: ``--flag=value``,
``--flag value``, ``--flag`` / ``--noflag`` for booleans): ``--gray --shuffle --backend lmdb|leveldb
--resize_width --resize_height --check_size --encoded --encode_type``, plus ``--overwrite``,
``--jobs N`` (decoding processes, default all cores), ``--seed`` (makes ``--shuffle`` repeatable) and
``--max_pixels`` (images larger than this are skipped before they are decoded).

The result is what Caffe writes: keys ``%08d_<path>`` (the position in the possibly shuffled list),
raw Datums C×H×W BGR uint8 (OpenCV imread, ``cv2.resize`` bilinear when both sizes are > 0) or,
with ``--encoded``, the image file's bytes whatever its channels (re-encoded only when resized or of another format),
one LMDB transaction per 1000 records.

Unlike Caffe it is safe to interrupt: the database is built in a working directory
``DB_NAME.tmp-<pid>-<random>`` beside the target and renamed to DB_NAME only when complete; Ctrl-C
stops a run at once, ``--jobs`` included (the decoding processes ignore SIGINT, the parent stops
them without doing the queued work and removes its working directory). An
existing DB_NAME is refused (as Caffe does) unless ``--overwrite`` is given and DB_NAME is an LMDB
(a directory holding only ``data.mdb``/``lock.mdb``, or a ``-nosubdir`` file and its ``-lock``);
anything else under that name is refused and nothing is deleted. Unreadable images and images over
``--max_pixels`` are reported with their list-file line and skipped (the summary names them).

What a killed run leaves beside DB_NAME is cleaned up by the next run for the same DB_NAME, but
only what minicaffe can prove it made: its working directories get an owner marker file first
(tool, host, boot id, pid namespace, pid and start time, and a random token), and one is removed
only when that marker is well-formed and its process is provably gone. A name alone (a user's
``train_lmdb.old-20240101``) or a pid alone (reused in containers and on shared file systems)
proves nothing: such entries are left alone. (The one exception is an *empty* directory named
exactly as minicaffe names them, left by a kill in the instant before its marker was written; it is
removed with ``rmdir``, which cannot remove anything that holds data.)
"""
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import threading
import time

import lmdb
import numpy as np

from ..formats.datum import cv_image_to_datum_bytes, join_root, read_image_list
from ..data.lmdb_source import check_backend
from ..data.db import open_writer
from ..data.lmdb_writer import BatchedLMDBWriter  # noqa: F401 - the tests patch its put()
from ..deps import import_cv2
from ..errors import DataError
from ..proto import caffe_pb2
from .common import ProgressBar, get_logger, run_main
from .gflags import parse_command

COMMIT_EVERY = 1000          # records per LMDB transaction, as Caffe
INITIAL_MAP_SIZE = 1 << 30   # grown by doubling when full (the file itself only holds what is written)

USAGE = """Convert a set of images to the lmdb format used as input for Caffe.
Usage:
    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
"""

FLAGS = {
    "gray": (bool, False, "When this option is on, treat images as grayscale ones"),
    "shuffle": (bool, False, "Randomly shuffle the order of images and their labels"),
    "backend": (str, "lmdb", "The backend {lmdb, leveldb} for storing the result"),
    "resize_width": (int, 0, "Width images are resized to"),
    "resize_height": (int, 0, "Height images are resized to"),
    "check_size": (bool, False, "When this option is on, check that all the datum have the same size"),
    "encoded": (bool, False, "When this option is on, the encoded image will be saved in datum"),
    "encode_type": (str, "", "Optional: What type should we encode the image as ('png','jpg',...)."),
    "overwrite": (bool, False, "Replace DB_NAME if it exists (it is refused otherwise)"),
    "jobs": (int, 0, "Processes decoding images (0 = all cores)"),
    "seed": (int, -1, "Random seed for --shuffle (-1 = different every run)"),
    "max_pixels": (int, 100_000_000, "Skip images of more pixels (width x height, read from the "
                                     "file's header before decoding where possible; 0 = no limit)"),
}

DEFAULT_MAX_PIXELS = FLAGS["max_pixels"][1]


# --- gflags-style command line ---------------------------------------------------------------------

# --- one image → one serialized Datum (runs in the worker processes) --------------------------------

_OPTS = {}


def _match_ext(filename, encoding):
    """Caffe's matchExt: does the file name's extension say ``encoding`` (jpg also matches jpeg)? As
    Caffe, the extension is what follows the path's last dot, or the whole path when it has none."""
    ext = filename.rsplit(".", 1)[-1].lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def header_size(raw):
    """(width, height) from the header of a PNG, JPEG, GIF, BMP or WebP file, else None.

    Decoding is what costs: a small, highly compressed PNG can declare 30000x30000 pixels (2.7 GB
    decoded in colour), so the size is read from the header and checked before OpenCV allocates it.
    Other formats are checked once decoded (OpenCV itself refuses more than 2^30 pixels)."""
    try:
        if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
            return struct.unpack(">II", raw[16:24])
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", raw[6:10])
        if raw[:2] == b"BM":
            if struct.unpack("<I", raw[14:18])[0] == 12:
                return struct.unpack("<HH", raw[18:22])
            w, h = struct.unpack("<ii", raw[18:26])
            return abs(w), abs(h)
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            chunk = raw[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", raw[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = struct.unpack("<I", raw[21:25])[0]
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return (int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1)
            return None
        if raw[:2] == b"\xff\xd8":
            return _jpeg_size(raw)
    except struct.error:       # truncated header: let the decoder say what is wrong
        return None
    return None


def _jpeg_size(raw):
    """Walk the JPEG markers to the first start-of-frame segment (SOF0..SOF15 but DHT/JPG/DAC)."""
    i, n = 2, len(raw)
    while i + 1 < n:
        if raw[i] != 0xFF:
            return None
        while i < n and raw[i] == 0xFF:       # fill bytes
            i += 1
        if i >= n:
            return None
        marker = raw[i]
        i += 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:   # no length
            continue
        if marker in (0xD9, 0xDA) or i + 2 > n:                 # end of image / start of scan
            return None
        length = (raw[i] << 8) | raw[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 7 > n:
                return None
            h, w = struct.unpack(">HH", raw[i + 3:i + 7])
            return w, h
        i += length
    return None


def _pixels(n):
    return f"{n / 1e6:.4g} megapixels" if n >= 1e6 else f"{n} pixels"


def _too_big(filename, w, h, max_pixels):
    limit = f" ({_pixels(max_pixels)})" if max_pixels >= 1e6 else ""
    return f"{filename}: {w}x{h} image is {_pixels(w * h)}, over --max_pixels={max_pixels}{limit}"


def make_record(filename, label, is_color=True, height=0, width=0, encoding="", max_pixels=DEFAULT_MAX_PIXELS):
    """Read one image as Caffe's ReadImageToDatum does. Returns (serialized Datum, (C, H, W)) or
    (None, reason) when the image cannot be read or has more than ``max_pixels`` pixels (0: no
    limit; checked on the file's header before decoding, and on the decoded image for formats whose
    header is not parsed here)."""
    cv2 = import_cv2("convert_imageset")
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return None, f"could not open or find file {filename} ({exc.strerror or exc})"
    if max_pixels > 0:
        size = header_size(raw)
        if size is not None and size[0] * size[1] > max_pixels:
            return None, _too_big(filename, size[0], size[1], max_pixels)
    flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE
    buf = np.frombuffer(raw, np.uint8)
    datum = caffe_pb2.Datum()
    img = cv2.imdecode(buf, flag) if len(buf) else None
    if img is None:
        return None, f"{filename} is not an image OpenCV can read"
    if 0 < max_pixels < img.shape[0] * img.shape[1]:
        return None, _too_big(filename, img.shape[1], img.shape[0], max_pixels)
    if encoding and not height and not width and _match_ext(filename, encoding):
        # Caffe's ReadImageToDatum stores the file's own bytes here. Its test that the channels
        # "match" --gray looks at the image as read with the --gray flag, which always matches: a
        # gray file stays gray under colour and a colour file stays colour under --gray (the Data
        # layer's force_color/force_gray decide when training), and a 16-bit PNG stays 16-bit.
        datum.data = raw
        datum.label = int(label)
        datum.encoded = True
        return datum.SerializeToString(), (1 if img.ndim == 2 else img.shape[2],) + img.shape[:2]
    if height > 0 and width > 0:
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    shape = (1 if img.ndim == 2 else img.shape[2],) + img.shape[:2]
    if encoding:
        try:
            ok, enc = cv2.imencode("." + encoding, img)
        except cv2.error:
            ok = False
        if not ok:
            return None, f"cannot encode {filename} as '{encoding}'"
        datum.data = enc.tobytes()
        datum.label = int(label)
        datum.encoded = True
        return datum.SerializeToString(), shape
    # Caffe's CVMatToDatum: channels, height, width, C×H×W bytes, and encoded explicitly false
    return cv_image_to_datum_bytes(img, label), shape


def _init_worker(opts, abort):
    # Ctrl-C reaches the whole process group: the parent alone handles it (it stops the pool and
    # removes its working directory); a worker dying of it would print a traceback and break the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2 = import_cv2("convert_imageset")
    cv2.setNumThreads(1)   # the processes are the parallelism
    _OPTS.clear()
    _OPTS.update(opts, abort=abort)


def _work(chunk):
    out = []
    for index, filename, label, encoding in chunk:
        if _OPTS["abort"].is_set():      # the parent gave up: return at once, the rest is not wanted
            break
        payload, info = make_record(filename, label, _OPTS["is_color"], _OPTS["height"], _OPTS["width"],
                                    encoding, _OPTS["max_pixels"])
        out.append((index, payload, info))
    return out


def _results(tasks, opts, jobs):
    """(index, payload, info) for every task, in order; decoded by ``jobs`` processes.

    Chunks are submitted one by one (not ``pool.map``), a bounded number in flight so that memory
    stays bounded whatever the writer's speed. When the consumer stops early (an error, Ctrl-C) the
    pool must stop without doing the queued work, which is what made an interrupted run hang:
    pending chunks are cancelled by the pool itself (``cancel_futures``; a future cancelled from
    here makes the pool's manager thread die with InvalidStateError on Python < 3.12, and the
    interpreter hang at exit), and the chunks the workers already hold end after their current
    image because ``abort`` is set. Workers are not simply terminated: one killed while sending a
    result leaves the manager thread blocked on the half-sent message, and exit waits for it."""
    if jobs <= 1 or len(tasks) < 2:
        for index, filename, label, encoding in tasks:
            payload, info = make_record(filename, label, opts["is_color"], opts["height"], opts["width"],
                                        encoding, opts["max_pixels"])
            yield index, payload, info
        return
    import collections
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    size = max(1, min(32, len(tasks) // (jobs * 8)))
    chunks = (tasks[s:s + size] for s in range(0, len(tasks), size))
    ahead = max(4 * jobs, 512 // size)
    ctx = _mp_context(mp)
    pool = abort = None
    finished = False
    inflight = collections.deque()
    try:
        # the fork server, the pool and its processes start with Ctrl-C held back (and delivered
        # right after): interrupted half-way, a worker is left starting without the parent
        with _sigint_held(ctx):
            abort = ctx.Event()
            pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(opts, abort))
            for chunk in chunks:
                inflight.append(pool.submit(_work, chunk))
                if len(inflight) >= ahead:
                    break
        while inflight:
            done = inflight.popleft().result()
            chunk = next(chunks, None)
            if chunk is not None:
                inflight.append(pool.submit(_work, chunk))
            yield from done
        finished = True
    except BrokenProcessPool as exc:
        raise DataError(f"the image decoding processes died ({exc}); try --jobs 1") from None
    finally:
        if pool is None:
            pass
        elif finished:
            pool.shutdown(wait=True)
        else:
            _stop_pool(pool, abort)


STOP_WAIT_S = 10.0   # how long a worker may take to finish its current image after an abort


def _stop_pool(pool, abort):
    """Stop the pool without doing its queued work (see :func:`_results`); a worker stuck for
    STOP_WAIT_S in one image is terminated."""
    abort.set()
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + STOP_WAIT_S
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(max(0.0, deadline - time.monotonic()))
    stuck = [proc for proc in procs if proc.is_alive()]
    for proc in stuck:
        with contextlib.suppress(Exception):
            proc.terminate()
            proc.join(5)
    if not stuck:
        pool.shutdown(wait=True)


def _mp_context(mp):
    """How to start the decoding processes: forkserver (else spawn), never a plain fork. A forked
    child inherits the locks of every thread of this process in whatever state they are, and
    OpenCV's own worker pool is native threads that Python cannot see: once this process has
    decoded or resized an image (a script that made its images with cv2 first), a forked worker
    can hang in its first cv2 call. Workers start from a clean process instead; like spawn, that
    imports the main script, which must guard its top-level code with ``if __name__ == "__main__":``."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


@contextlib.contextmanager
def _sigint_held(ctx):
    """Hold Ctrl-C back while the pool starts (main thread only) and deliver it right after, so
    that it is neither lost nor raised half-way through starting a worker (a worker started but
    not yet registered with the pool outlives its parent, and fails with a traceback). Two holds:
    SIGINT is blocked, so a signal arriving now stays pending, and the fork server started here
    and the workers it forks keep that mask (a Ctrl-C while they import, before ``_init_worker``
    ignores SIGINT, cannot kill them with a traceback each); and a signal that arrived just before
    but is not yet handled in Python is recorded by a stand-in handler instead of raising. The
    resource tracker is started first, outside: starting it unblocks SIGINT, whatever the mask."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    held = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if ctx.get_start_method() == "forkserver":
                from multiprocessing import forkserver
                forkserver.ensure_running()
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if held:
        signal.raise_signal(signal.SIGINT)      # as it came, to whatever handled it before


# --- the database writer ------------------------------------------------------------------------------

def convert_imageset(root_folder, list_file, db_name, gray=False, shuffle=False, backend="lmdb",
                     resize_width=0, resize_height=0, check_size=False, encoded=False, encode_type="",
                     overwrite=False, jobs=0, seed=None, max_pixels=DEFAULT_MAX_PIXELS, logger=None,
                     progress=None):
    """Build the LMDB ``db_name`` from the images of ``list_file``; returns a dict with ``total``,
    ``written`` and ``skipped`` counts. See the module docstring for the rules."""
    log = logger or get_logger()
    db_name = os.fspath(db_name)
    # everything is checked before anything on disk is touched, clean-up of old runs included
    check_backend(db_name, backend)
    if root_folder and not os.path.isdir(root_folder):
        raise DataError(f"{root_folder}: root folder not found" if not os.path.exists(root_folder)
                        else f"{root_folder}: root folder is not a directory")
    parent = os.path.dirname(os.path.abspath(db_name))
    if not os.path.isdir(parent):
        raise DataError(f"{db_name}: the directory {parent} does not exist")
    _check_target(db_name, overwrite)
    max_pixels = int(max_pixels)
    if max_pixels < 0:
        raise DataError(f"--max_pixels={max_pixels}: must be 0 (no limit) or positive")
    resize_height, resize_width = max(0, int(resize_height)), max(0, int(resize_width))
    if max_pixels and resize_height and resize_width and resize_height * resize_width > max_pixels:
        raise DataError(f"--resize_width={resize_width} x --resize_height={resize_height} is "
                        f"{resize_width * resize_height} pixels, over --max_pixels={max_pixels}")

    lines = read_image_list(list_file)
    if not lines:
        raise DataError(f"{list_file}: the list file has no images")
    _check_free_space(db_name, parent)
    _recover_interrupted(db_name, log)
    _check_target(db_name, overwrite)       # the clean-up may have put an interrupted run's DB back

    if shuffle:
        log.info("Shuffling data")
        rng = np.random.default_rng(None if seed is None or seed < 0 else seed)
        lines = [lines[i] for i in rng.permutation(len(lines))]
    log.info("A total of %d images.", len(lines))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True

    tasks = []
    for index, (path, label, _) in enumerate(lines):
        enc = encode_type
        if encoded and not enc:
            # guess the encoding from the file name, as Caffe
            base = os.path.basename(path)
            if "." in base:
                enc = base.rsplit(".", 1)[1].lower()
            else:
                log.warning("Failed to guess the encoding of '%s'; using png", path)
                enc = "png"
        tasks.append((index, join_root(root_folder, path), label, enc))
    opts = {"is_color": not gray, "height": resize_height, "width": resize_width, "max_pixels": max_pixels}
    jobs = int(jobs) if jobs and int(jobs) > 0 else (len(os.sched_getaffinity(0))
                                                     if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    work = None
    token, made = secrets.token_hex(16), []    # the working directory, as soon as it exists
    writer = None
    count = 0
    skipped = []
    first_shape = None
    bar = progress if progress is not None else ProgressBar(total=len(tasks), unit="img")
    try:
        try:
            work = _make_work_dir(db_name, "tmp", token, made)
            writer = open_writer(backend, os.path.join(work, WORK_DB), map_size=INITIAL_MAP_SIZE,
                                 commit_every=COMMIT_EVERY, sync=False, metasync=False, max_dbs=0)
        except (lmdb.Error, OSError) as exc:
            raise _write_error(db_name, exc, "cannot create the database") from None
        with contextlib.closing(_results(tasks, opts, jobs)) as results:
            for index, payload, info in results:
                path, _, lineno = lines[index]
                bar.update()
                if payload is None:
                    skipped.append(path)
                    log.error("%s:%d: %s (skipped)", list_file, lineno, info)
                    continue
                if check_size:
                    if first_shape is None:
                        first_shape = info
                    elif info != first_shape:
                        raise DataError(f"{list_file}:{lineno}: {path}: image is {'x'.join(map(str, info))} "
                                        f"(CxHxW) but the first one was {'x'.join(map(str, first_shape))} "
                                        f"(--check_size)")
                key = b"%08d_" % index + path.encode("utf-8", "surrogateescape")
                try:
                    writer.put(key, payload)
                except (lmdb.Error, OSError) as exc:
                    raise _write_error(db_name, exc) from None
                count += 1
                if count % COMMIT_EVERY == 0:
                    log.info("Processed %d files.", count)
        if count == 0:
            raise DataError(f"{list_file}: none of the {len(tasks)} images could be read; "
                            f"no database written")
        try:
            writer.finish()
        except (lmdb.Error, OSError) as exc:
            raise _write_error(db_name, exc) from None
        if count % COMMIT_EVERY != 0:
            log.info("Processed %d files.", count)
        _install(work, token, db_name, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        _discard(made, token)
        raise
    finally:
        if progress is None:
            bar.close()
    if skipped:
        names = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("Skipped %d of %d images that could not be read or were too large (%s); "
                    "%d written to %s.", len(skipped), len(tasks), names, count, db_name)
    return {"total": len(tasks), "written": count, "skipped": len(skipped)}


MIN_FREE_BYTES = 64 << 10


# --- what --overwrite may replace ---------------------------------------------------------------------

LMDB_FILES = ("data.mdb", "lock.mdb")
_LMDB_MAGIC = 0xBEEFC0DE


def _has_lmdb_magic(path):
    """Whether ``path`` is a regular file starting with an LMDB meta page (magic 0xBEEFC0DE after
    the page header: offset 16 on 64-bit builds, 12 on 32-bit ones; either byte order)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return False
    return any(len(head) >= off + 4 and _LMDB_MAGIC in (struct.unpack("<I", head[off:off + 4])[0],
                                                        struct.unpack(">I", head[off:off + 4])[0])
               for off in (16, 12))


def lmdb_layout(path):
    """'dir' for an LMDB directory (``data.mdb``, optionally ``lock.mdb``, nothing else), 'file' for a
    ``-nosubdir`` LMDB file (its ``-lock`` file beside it, if any, a regular file too), else None."""
    if os.path.islink(path):
        return None
    if os.path.isdir(path):
        try:
            names = set(os.listdir(path))
        except OSError:
            return None
        if "data.mdb" not in names or not names <= set(LMDB_FILES):
            return None
        if not _has_lmdb_magic(os.path.join(path, "data.mdb")):
            return None
        lock = os.path.join(path, "lock.mdb")
        if os.path.lexists(lock) and (os.path.islink(lock) or not os.path.isfile(lock)):
            return None
        return "dir"
    if _has_lmdb_magic(path):
        lock = path + "-lock"
        if os.path.lexists(lock) and (os.path.islink(lock) or not os.path.isfile(lock)):
            return None
        return "file"
    return None


_LEVELDB_FILE = re.compile(r"^(CURRENT|LOCK|LOG|LOG\.old|MANIFEST-\d+|\d+\.(ldb|log|sst))$")


def leveldb_layout(path):
    """'dir' for a LevelDB directory (its ``CURRENT`` file names a ``MANIFEST-N`` that is there, and
    every other name is one LevelDB writes), else None."""
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    try:
        names = os.listdir(path)
    except OSError:
        return None
    current = _read(os.path.join(path, "CURRENT"))
    if not current or not re.fullmatch(r"MANIFEST-\d+", current) or current not in names:
        return None
    if not all(_LEVELDB_FILE.match(name) and not os.path.islink(os.path.join(path, name)) and
               os.path.isfile(os.path.join(path, name)) for name in names):
        return None
    return "dir"


def database_layout(path):
    """What --overwrite may replace: 'dir' or 'file' for an LMDB (see ``lmdb_layout``), 'dir' for a
    LevelDB directory, else None."""
    return lmdb_layout(path) or leveldb_layout(path)


def _check_target(db_name, overwrite):
    """Refuse an existing DB_NAME (Caffe refuses it outright); with --overwrite accept only an LMDB,
    so that a mistyped DB_NAME (the project folder, the image root, the list file) is never deleted."""
    if not os.path.lexists(db_name):
        return
    if not overwrite:
        raise DataError(f"{db_name}: already exists (use --overwrite to replace it)")
    if database_layout(db_name) is None:
        what = ("a symbolic link" if os.path.islink(db_name) else
                "a directory" if os.path.isdir(db_name) else "a file")
        raise DataError(f"{db_name}: is {what} but not an LMDB or LevelDB database (a directory "
                        f"holding only data.mdb and lock.mdb, or LevelDB's files); --overwrite replaces only a database, nothing was deleted")


# --- working directories: marked, so that only minicaffe's own are ever removed ----------------------

MARKER = "minicaffe-convert_imageset.owner"   # written first in each working directory
MARKER_TOOL = "minicaffe convert_imageset"
WORK_DB = "db"                               # the database inside a working directory


def _read(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _process_start(pid):
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _identity():
    """Who this process is, as precisely as the system says: the pid alone is not enough (pids are
    reused, and a container or another host on a shared file system has its own)."""
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid": os.getpid(), "start": _process_start(os.getpid())}


_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _make_work_dir(db_name, kind, token, made):
    """Make the directory ``DB_NAME.<kind>-<pid>-<8 random>``, whose first content is the owner
    marker holding ``token``, and append it to ``made`` the moment it exists. Ctrl-C can strike
    between any two steps (Python raises KeyboardInterrupt between bytecodes), so whatever the
    moment the directory is not there, is removed again here, or is in ``made`` for the caller's
    clean-up (:func:`_discard`). Returns the path."""
    parent = os.path.dirname(os.path.abspath(db_name))
    base = os.path.basename(os.path.abspath(db_name))
    marker = dict(_identity(), tool=MARKER_TOOL, kind=kind, target=base, token=token)
    for _ in range(100):
        name = f"{base}.{kind}-{os.getpid()}-" + "".join(secrets.choice(_NAME_CHARS) for _ in range(8))
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)                  # mode 0777 less the umask, as the database will have
            made.append(path)
        except FileExistsError:
            continue
        except BaseException:
            if path not in made:            # interrupted right after the mkdir: it is empty
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        break
    else:
        raise FileExistsError(errno.EEXIST, "no free name for a working directory", f"{db_name}.{kind}-*")
    try:
        data = json.dumps(dict(marker, name=name)).encode("ascii")
        fd = os.open(os.path.join(path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write", os.path.join(path, MARKER))
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, MARKER))
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return path


def _discard(made, token):
    """Clean up the working directories this process made (``made``, from :func:`_make_work_dir`):
    a marked one is removed as usual; one left empty by an interruption before its marker was
    written is removed with ``rmdir`` (this process made it, and an empty directory holds nothing)."""
    for path in made:
        if not _remove_own(path, token):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_marker(path):
    """The owner marker of the working directory ``path`` if it is there and well-formed, else None."""
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    marker_path = os.path.join(path, MARKER)
    if os.path.islink(marker_path) or not os.path.isfile(marker_path):
        return None
    text = _read(marker_path)
    try:
        marker = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(marker, dict) or marker.get("tool") != MARKER_TOOL:
        return None
    types = {"host": str, "pid": int, "kind": str, "target": str, "name": str, "token": str}
    if any(not isinstance(marker.get(k), t) or isinstance(marker.get(k), bool) for k, t in types.items()):
        return None
    for k in ("boot_id", "pid_ns"):
        if marker.get(k) is not None and not isinstance(marker[k], str):
            return None
    if marker.get("start") is not None and not isinstance(marker["start"], int):
        return None
    token = marker["token"]
    if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        return None
    if marker["name"] != os.path.basename(path) or marker["kind"] not in ("tmp", "old"):
        return None
    if marker["pid"] <= 0:
        return None
    return marker


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:       # alive but not ours (EPERM)
        return True
    return True


def owner_gone(marker):
    """(gone, why not): the process that wrote ``marker`` is provably not running: this host, this
    boot and this pid namespace, and its pid is free or now belongs to a process started at
    another time."""
    me = _identity()
    if marker["host"] != me["host"]:
        return False, f"made on host {marker['host']}"
    for key, what in (("boot_id", "another boot of this host or another machine of the same name"),
                      ("pid_ns", "another pid namespace (container)")):
        if marker.get(key) != me[key]:
            return False, f"made in {what}"
    pid = marker["pid"]
    if pid == me["pid"]:
        return (marker.get("start") is not None and me["start"] is not None and marker["start"] != me["start"],
                "made by this process")
    if not _pid_alive(pid):
        return True, ""
    start = _process_start(pid)
    if marker.get("start") is not None and start is not None and start != marker["start"]:
        return True, ""
    return False, f"process {pid} is still running"


def _remove_own(path, token):
    """Remove a working directory whose marker holds ``token`` (read again now: what is removed is
    what was decided on, not something put under that name since). The marker goes last, so that
    if this is interrupted what remains is still marked and the next run removes it."""
    marker = read_marker(path)
    if marker is None or marker["token"] != token:
        return False
    for name in sorted(os.listdir(path)):
        if name != MARKER:
            _remove(os.path.join(path, name))
    _remove(path)
    return True


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _recover_interrupted(db_name, log):
    """Clean up after a run that was killed. Only working directories whose owner marker is
    well-formed, names this DB_NAME and whose process is provably gone are touched: an unfinished
    ``tmp`` one is removed; an ``old`` one (killed between the renames of --overwrite) has its
    database put back when DB_NAME is missing, and is removed otherwise. Anything else, whatever its
    name, is left alone (with a warning when it is marked but its owner may still be running), but
    for the empty directory of :func:`_remove_empty_unmarked`."""
    parent = os.path.dirname(os.path.abspath(db_name))
    base = os.path.basename(os.path.abspath(db_name))
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names):
        if not name.startswith((f"{base}.tmp-", f"{base}.old-")):
            continue
        path = os.path.join(parent, name)
        marker = read_marker(path)
        if marker is None:
            _remove_empty_unmarked(path, base, log)
            continue            # not provably ours: not touched
        if marker["target"] != base:
            continue
        gone, why = owner_gone(marker)
        if not gone:
            if "still running" not in why:
                log.warning("%s: left alone: an interrupted convert_imageset's working directory, but %s",
                            path, why)
            continue
        inner = os.path.join(path, WORK_DB)
        if marker["kind"] == "old" and not os.path.lexists(db_name) and os.path.lexists(inner):
            try:
                os.rename(inner, db_name)
                if os.path.lexists(inner + "-lock"):
                    os.rename(inner + "-lock", db_name + "-lock")
            except OSError as exc:
                log.warning("%s: could not put back the database an interrupted --overwrite run had "
                            "moved to %s: %s", db_name, inner, exc.strerror or exc)
                continue
            log.warning("%s: restored the database an interrupted --overwrite run had moved to %s",
                        db_name, path)
        else:
            log.info("Removing %s, left by an interrupted run", path)
        _remove_own(path, marker["token"])


def _remove_empty_unmarked(path, base, log):
    """A run killed in the instant between creating its working directory and writing the marker
    (or between removing the marker and the directory) leaves it empty. Such a directory, named
    exactly as :func:`_make_work_dir` names them, by a pid not running here, is removed with
    ``rmdir``, which the system refuses for a directory holding anything: nothing can be lost."""
    m = re.fullmatch(rf"{re.escape(base)}\.(?:tmp|old)-(\d+)-[a-z0-9_]{{8}}", os.path.basename(path))
    if not m or os.path.islink(path) or not os.path.isdir(path) or _pid_alive(int(m.group(1))):
        return
    try:
        os.rmdir(path)
    except OSError:
        return
    log.info("Removed the empty directory %s, left by an interrupted run", path)


def _check_free_space(db_name, parent):
    """Refuse to start on a (nearly) full filesystem: LMDB creating its file where not one page is
    free dies of SIGBUS instead of returning an error. Later ENOSPC errors are reported normally."""
    try:
        st = os.statvfs(parent)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        raise DataError(f"{db_name}: cannot create the database: No space left on device "
                        f"({free // 1024} KiB free in {parent})")


def _write_error(db_name, exc, what="cannot write the database"):
    if isinstance(exc, DataError):
        return exc
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
    return DataError(f"{db_name}: {what}: {text}")


def _install(work, token, db_name, overwrite):
    """Rename the finished database (``work``/db) into place. With --overwrite an existing LMDB is
    first moved into a marked ``old`` working directory, so that whatever moment this process is
    killed at, the next run can tell it is minicaffe's and put it back or remove it."""
    new = os.path.join(work, WORK_DB)
    old_token, old_made = secrets.token_hex(16), []
    moved = []
    try:
        if os.path.lexists(db_name):
            _check_target(db_name, overwrite)      # it may have changed since the start
            layout = database_layout(db_name)
            old = _make_work_dir(db_name, "old", old_token, old_made)
            for src, dst in [(db_name, WORK_DB)] + ([(db_name + "-lock", WORK_DB + "-lock")]
                                                     if layout == "file" and os.path.lexists(db_name + "-lock")
                                                     else []):
                os.rename(src, os.path.join(old, dst))
                moved.append((src, os.path.join(old, dst)))
        os.rename(new, db_name)
    except BaseException as exc:
        restored = True
        if moved and not os.path.lexists(db_name):
            try:                                   # put the old database back (else the next run does)
                for src, dst in reversed(moved):
                    os.rename(dst, src)
            except OSError:
                restored = False
        if restored:        # (with DB_NAME there and moved non-empty, the new database is in place)
            _discard(old_made, old_token)
        if isinstance(exc, OSError):
            raise _write_error(db_name, exc, "cannot move the finished database into place") from None
        raise
    _discard(old_made, old_token)
    _remove_own(work, token)


@run_main
def main(argv=None):
    parsed = parse_command(sys.argv[1:] if argv is None else argv, FLAGS, USAGE, range(3, 4))
    if isinstance(parsed, int):
        return parsed
    flags, args = parsed
    root, list_file, db_name = args
    result = convert_imageset(root, list_file, db_name, gray=flags["gray"], shuffle=flags["shuffle"],
                              backend=flags["backend"], resize_width=flags["resize_width"],
                              resize_height=flags["resize_height"], check_size=flags["check_size"],
                              encoded=flags["encoded"], encode_type=flags["encode_type"],
                              overwrite=flags["overwrite"], jobs=flags["jobs"],
                              max_pixels=flags["max_pixels"],
                              seed=flags["seed"] if flags["seed"] >= 0 else None)
    return 0 if result["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
