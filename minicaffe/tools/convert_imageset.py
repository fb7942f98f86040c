"""convert_imageset: images named in a list file → an LMDB of Caffe Datum records.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE has ``<path> <label>`` lines (the label is the last field, so paths may contain spaces);
each image is ``ROOTFOLDER + path``. Flags as Caffe's tool (gflags style: ``--flag=value``,
``--flag value``, ``--flag`` / ``--noflag`` for booleans): ``--gray --shuffle --backend lmdb|leveldb
--resize_width --resize_height --check_size --encoded --encode_type``, plus ``--overwrite``,
``--jobs N`` (decoding processes, default all cores) and ``--seed`` (makes ``--shuffle`` repeatable).

The result is what Caffe writes: keys ``%08d_<path>`` (the position in the possibly shuffled list),
raw Datums C×H×W BGR uint8 (OpenCV imread, ``cv2.resize`` bilinear when both sizes are > 0) or,
with ``--encoded``, the image file's bytes (re-encoded only when resized or of another format),
one LMDB transaction per 1000 records.

Unlike Caffe it is safe to interrupt: the database is built in ``DB_NAME.tmp-<pid>`` beside the target
and renamed to DB_NAME only when complete, an existing DB_NAME is refused unless ``--overwrite``,
and unreadable images are reported with their list-file line and skipped (the summary counts them).
What a killed run leaves beside DB_NAME is cleaned up by the next run for the same DB_NAME.
"""
import collections
import os
import shutil
import sys

import lmdb
import numpy as np

from ..data.datum import cv_image_to_datum_bytes, join_root, read_image_list
from ..data.lmdb_source import check_backend
from ..data.db import open_writer
from ..data.lmdb_writer import BatchedLMDBWriter  # noqa: F401 - the tests patch its put()
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
}


# --- gflags-style command line ---------------------------------------------------------------------

# --- one image → one serialized Datum (runs in the worker processes) --------------------------------

_OPTS = {}


def _match_ext(filename, encoding):
    """Caffe's matchExt: does the file name's extension say ``encoding`` (jpg also matches jpeg)?"""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in os.path.basename(filename) else ""
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def make_record(filename, label, is_color=True, height=0, width=0, encoding=""):
    """Read one image as Caffe's ReadImageToDatum does. Returns (serialized Datum, (C, H, W)) or
    (None, reason) when the image cannot be read."""
    import cv2
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return None, f"could not open or find file {filename} ({exc.strerror or exc})"
    flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE
    buf = np.frombuffer(raw, np.uint8)
    datum = caffe_pb2.Datum()
    if encoding and not height and not width and _match_ext(filename, encoding):
        # the file can be stored as it is if decoding it as stored gives what we would store
        native = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if len(buf) else None
        if native is None:
            return None, f"{filename} is not an image OpenCV can read"
        channels = 1 if native.ndim == 2 else native.shape[2]
        if native.dtype == np.uint8 and channels == (3 if is_color else 1):
            datum.data = raw
            datum.label = int(label)
            datum.encoded = True
            return datum.SerializeToString(), (channels,) + native.shape[:2]
    img = cv2.imdecode(buf, flag) if len(buf) else None
    if img is None:
        return None, f"{filename} is not an image OpenCV can read"
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


def _init_worker(opts):
    import cv2
    cv2.setNumThreads(1)   # the processes are the parallelism
    _OPTS.clear()
    _OPTS.update(opts)


def _work(task):
    index, filename, label, encoding = task
    payload, info = make_record(filename, label, _OPTS["is_color"], _OPTS["height"], _OPTS["width"], encoding)
    return index, payload, info


def _results(tasks, opts, jobs):
    """(index, payload, info) for every task, in order; decoded by ``jobs`` processes."""
    if jobs <= 1 or len(tasks) < 2:
        for index, filename, label, encoding in tasks:
            payload, info = make_record(filename, label, opts["is_color"], opts["height"], opts["width"],
                                        encoding)
            yield index, payload, info
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    chunk = max(1, min(32, len(tasks) // (jobs * 8)))
    window = max(jobs * chunk * 8, 256)
    try:
        with ProcessPoolExecutor(jobs, mp_context=_mp_context(mp), initializer=_init_worker,
                                 initargs=(opts,)) as pool:
            inflight = collections.deque()
            starts = iter(range(0, len(tasks), window))
            # two windows in flight: the pool works on the next while the writer drains this one,
            # and memory stays bounded whatever the writer's speed
            for _ in range(2):
                s = next(starts, None)
                if s is not None:
                    inflight.append(pool.map(_work, tasks[s:s + window], chunksize=chunk))
            while inflight:
                current = inflight.popleft()
                s = next(starts, None)
                if s is not None:
                    inflight.append(pool.map(_work, tasks[s:s + window], chunksize=chunk))
                yield from current
    except BrokenProcessPool as exc:
        raise DataError(f"the image decoding processes died ({exc}); try --jobs 1") from None


def _mp_context(mp):
    """How to start the decoding processes: forkserver (else spawn), never a plain fork. A forked
    child inherits the locks of every thread of this process in whatever state they are, and
    OpenCV's own worker pool is native threads that Python cannot see: once this process has
    decoded or resized an image (a script that made its images with cv2 first), a forked worker
    can hang in its first cv2 call. Workers start from a clean process instead; like spawn, that
    imports the main script, which must guard its top-level code with ``if __name__ == "__main__":``."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


# --- the database writer ------------------------------------------------------------------------------

def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def convert_imageset(root_folder, list_file, db_name, gray=False, shuffle=False, backend="lmdb",
                     resize_width=0, resize_height=0, check_size=False, encoded=False, encode_type="",
                     overwrite=False, jobs=0, seed=None, logger=None, progress=None):
    """Build the LMDB ``db_name`` from the images of ``list_file``; returns a dict with ``total``,
    ``written`` and ``skipped`` counts. See the module docstring for the rules."""
    log = logger or get_logger()
    db_name = os.fspath(db_name)
    check_backend(db_name, backend)
    if root_folder and not os.path.isdir(root_folder):
        raise DataError(f"{root_folder}: root folder not found" if not os.path.exists(root_folder)
                        else f"{root_folder}: root folder is not a directory")
    _recover_interrupted(db_name, log)
    if os.path.lexists(db_name) and not overwrite:
        raise DataError(f"{db_name}: already exists (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(db_name))
    if not os.path.isdir(parent):
        raise DataError(f"{db_name}: the directory {parent} does not exist")

    lines = read_image_list(list_file)
    if not lines:
        raise DataError(f"{list_file}: the list file has no images")
    if shuffle:
        log.info("Shuffling data")
        rng = np.random.default_rng(None if seed is None or seed < 0 else seed)
        lines = [lines[i] for i in rng.permutation(len(lines))]
    log.info("A total of %d images.", len(lines))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    resize_height, resize_width = max(0, int(resize_height)), max(0, int(resize_width))

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
    opts = {"is_color": not gray, "height": resize_height, "width": resize_width}
    jobs = int(jobs) if jobs and int(jobs) > 0 else (len(os.sched_getaffinity(0))
                                                     if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    _check_free_space(db_name, parent)
    tmp = f"{db_name}.tmp-{os.getpid()}"
    _remove(tmp)
    writer = None
    count = skipped = 0
    first_shape = None
    bar = progress if progress is not None else ProgressBar(total=len(tasks), unit="img")
    try:
        try:
            writer = open_writer(backend, tmp, map_size=INITIAL_MAP_SIZE, commit_every=COMMIT_EVERY,
                                 sync=False, metasync=False, max_dbs=0)
        except (lmdb.Error, OSError) as exc:
            raise _write_error(db_name, exc, "cannot create the database") from None
        for index, payload, info in _results(tasks, opts, jobs):
            path, _, lineno = lines[index]
            bar.update()
            if payload is None:
                skipped += 1
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
        _install(tmp, db_name, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        _remove(tmp)
        raise
    finally:
        if progress is None:
            bar.close()
    if skipped:
        log.warning("Skipped %d of %d images that could not be read; %d written to %s.",
                    skipped, len(tasks), count, db_name)
    return {"total": len(tasks), "written": count, "skipped": skipped}


MIN_FREE_BYTES = 64 << 10


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:       # alive but not ours (EPERM)
        return True
    return True


def _recover_interrupted(db_name, log):
    """Clean up after a run that was killed: its unfinished ``DB_NAME.tmp-<pid>`` goes; a complete
    ``DB_NAME.old-<pid>`` (killed between the two renames of --overwrite) is put back when DB_NAME is
    missing, else removed. Only entries of processes that no longer run are touched."""
    parent = os.path.dirname(os.path.abspath(db_name))
    base = os.path.basename(os.path.abspath(db_name))
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names):
        for kind in ("tmp", "old"):
            prefix = f"{base}.{kind}-"
            if not name.startswith(prefix) or not name[len(prefix):].isdigit():
                continue
            if _pid_alive(int(name[len(prefix):])):
                continue
            path = os.path.join(parent, name)
            if kind == "old" and not os.path.lexists(db_name):
                os.rename(path, db_name)
                log.warning("%s: restored the database an interrupted --overwrite run had moved to %s",
                            db_name, path)
            else:
                log.info("Removing %s, left by an interrupted run", path)
                _remove(path)


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


def _install(tmp, db_name, overwrite):
    """Rename the finished database into place (replacing an old one only with --overwrite)."""
    try:
        if os.path.lexists(db_name):
            if not overwrite:
                raise DataError(f"{db_name}: already exists (use --overwrite to replace it)")
            old = f"{db_name}.old-{os.getpid()}"
            _remove(old)
            os.rename(db_name, old)
            os.rename(tmp, db_name)
            _remove(old)
        else:
            os.rename(tmp, db_name)
    except OSError as exc:
        raise _write_error(db_name, exc, "cannot move the finished database into place") from None


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
                              seed=flags["seed"] if flags["seed"] >= 0 else None)
    return 0 if result["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
