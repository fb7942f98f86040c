"""convert_imageset: Caffe's keys and records, the flags, and its safety (no partial DB_NAME, ever)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import lmdb
import numpy as np
import pytest

from minicaffe.data import iterate_lmdb
from minicaffe.errors import DataError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import make_layer
from minicaffe.tools import convert_imageset as ci
from minicaffe.tools import gflags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_set(folder, n=5, h=6, w=7, ext=".png", gray=False, seed=0, names=None):
    """n random images plus a list file 'path label' (label = 10 + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = names or [f"img{i}{ext}" for i in range(n)]
    shape = (h, w) if gray else (h, w, 3)
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 256, shape, dtype=np.uint8))
    lst = folder / "list.txt"
    lst.write_text("".join(f"{name} {10 + i}\n" for i, name in enumerate(names)))
    return str(folder) + "/", str(lst), names


def records(db):
    return [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in iterate_lmdb(db)]


def convert(*args):
    return ci.main([str(a) for a in args])


def test_raw_round_trip_keys_and_pixels(tmp_path, log_text):
    root, lst, names = make_set(tmp_path / "imgs")
    db = tmp_path / "db"
    assert convert("--jobs=1", root, lst, db) == 0
    recs = records(db)
    assert [k for k, _ in recs] == [f"{i:08d}_{name}" for i, name in enumerate(names)]
    for (k, d), name in zip(recs, names):
        img = cv2.imread(root + name)
        assert (d.channels, d.height, d.width) == (3, 6, 7) and not d.encoded
        assert np.frombuffer(d.data, np.uint8).tobytes() == img.transpose(2, 0, 1).tobytes()
    assert [d.label for _, d in recs] == [10, 11, 12, 13, 14]
    text = log_text.getvalue()
    assert "A total of 5 images." in text and "Processed 5 files." in text
    # the Data layer gives back exactly OpenCV's pixels
    layer, bottom, top = make_layer(f'type: "Data" data_param {{ source: "{db}" batch_size: 5 backend: LMDB }}',
                                    [], 2, caffe_pb2.TEST)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, np.stack([cv2.imread(root + n).transpose(2, 0, 1) for n in names]))
    np.testing.assert_array_equal(top[1].data, [10, 11, 12, 13, 14])
    layer.close()


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_encoded_stores_the_file_and_decodes_to_opencv_pixels(tmp_path, ext):
    root, lst, names = make_set(tmp_path / "imgs", n=3, ext=ext)
    db = tmp_path / "db"
    assert convert("--encoded", "--jobs", "1", root, lst, db) == 0
    recs = records(db)
    for (_, d), name in zip(recs, names):
        assert d.encoded and not d.HasField("channels")
        assert d.data == open(root + name, "rb").read()          # stored as-is
    layer, bottom, top = make_layer(f'type: "Data" data_param {{ source: "{db}" batch_size: 3 backend: LMDB }}',
                                    [], 2, caffe_pb2.TEST)
    layer.forward(bottom, top)
    expect = np.stack([cv2.imread(root + n).transpose(2, 0, 1) for n in names])
    np.testing.assert_array_equal(top[0].data, expect)
    layer.close()


def test_encoded_keeps_the_file_whatever_its_channels(tmp_path):
    """As Caffe's ReadImageToDatum: without a resize, a file whose extension is the encoding is stored
    as it is even when its channels differ from --gray's (a gray PNG under colour, a colour JPEG
    under --gray, a 16-bit PNG); only the Data layer's force_color/force_gray convert it later."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.RandomState(5)
    files = {"g.png": rng.randint(0, 256, (5, 6)).astype(np.uint8),
             "c.jpg": rng.randint(0, 256, (5, 6, 3)).astype(np.uint8),
             "d.png": rng.randint(0, 65536, (5, 6, 3)).astype(np.uint16)}
    for name, img in files.items():
        assert cv2.imwrite(str(root / name), img)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{n} {i}\n" for i, n in enumerate(files)))
    for flags in ([], ["--gray"]):
        db = tmp_path / f"db{len(flags)}"
        assert convert("--encoded", *flags, "--jobs=1", str(root) + "/", lst, db) == 0
        recs = records(db)
        assert [k for k, _ in recs] == [f"{i:08d}_{n}" for i, n in enumerate(files)]
        for (_, d), name in zip(recs, files):
            assert d.encoded and d.data == (root / name).read_bytes(), (flags, name)


def test_encode_type_reencodes_and_resize(tmp_path):
    root, lst, names = make_set(tmp_path / "imgs", n=2, ext=".jpg", h=10, w=12)
    db = tmp_path / "db"
    assert convert("--encode_type=png", "--jobs=1", root, lst, db) == 0
    for (_, d), name in zip(records(db), names):
        assert d.encoded and d.data[:4] == b"\x89PNG"
        dec = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(dec, cv2.imread(root + name))       # png keeps the jpg's pixels
    db2 = tmp_path / "db2"
    assert convert("--resize_height", "4", "--resize_width=5", "--jobs=1", root, lst, db2) == 0
    for (_, d), name in zip(records(db2), names):
        assert (d.channels, d.height, d.width) == (3, 4, 5)
        want = cv2.resize(cv2.imread(root + name), (5, 4), interpolation=cv2.INTER_LINEAR)
        assert d.data == want.transpose(2, 0, 1).tobytes()


def test_gray(tmp_path):
    root, lst, names = make_set(tmp_path / "imgs", n=2)
    db = tmp_path / "db"
    assert convert("--gray", "--jobs=1", root, lst, db) == 0
    for (_, d), name in zip(records(db), names):
        assert d.channels == 1
        assert d.data == cv2.imread(root + name, cv2.IMREAD_GRAYSCALE).tobytes()
    # --gray=false is colour again, --nogray too
    for flag in ("--gray=false", "--nogray"):
        out = tmp_path / f"db{flag}"
        assert convert(flag, "--jobs=1", root, lst, out) == 0
        assert records(out)[0][1].channels == 3


def test_shuffle_is_reproducible_with_a_seed(tmp_path):
    root, lst, names = make_set(tmp_path / "imgs", n=12, h=2, w=2)
    orders = []
    for i, seed in enumerate((7, 7, 8)):
        db = tmp_path / f"db{i}"
        assert convert("--shuffle", f"--seed={seed}", "--jobs=1", root, lst, db) == 0
        keys = [k for k, _ in records(db)]
        assert [k[:8] for k in keys] == [f"{j:08d}" for j in range(12)]   # index in the shuffled list
        orders.append([k[9:] for k in keys])
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert sorted(orders[0]) == sorted(names) and orders[0] != names


_AFTER_OPENCV_POOL = """
import sys
import cv2, numpy as np
from minicaffe.tools.convert_imageset import convert_imageset
cv2.setNumThreads(2)
big = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
for _ in range(3):                       # parallel_for: OpenCV's native thread pool is now running
    cv2.GaussianBlur(cv2.resize(big, (1500, 1500)), (9, 9), 0)
if __name__ == "__main__":
    r = convert_imageset(sys.argv[1], sys.argv[2], sys.argv[3], jobs=2)
    print("written", r["written"])
"""


def test_parallel_jobs_after_opencv_used_its_thread_pool(tmp_path):
    """A process that already ran OpenCV's (native, invisible to Python) thread pool: a forked
    decoding worker used to hang in its first cv2 call, holding a copy of the pool's lock."""
    root, lst, _ = make_set(tmp_path / "imgs", n=12, h=5, w=5)
    script = tmp_path / "after_pool.py"
    script.write_text(_AFTER_OPENCV_POOL)
    proc = subprocess.run([sys.executable, str(script), root, lst, str(tmp_path / "db")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "written 12" in proc.stdout


def test_parallel_jobs_write_the_same_database(tmp_path):
    import threading
    root, lst, _ = make_set(tmp_path / "imgs", n=40, h=5, w=5)
    assert convert("--jobs=1", root, lst, tmp_path / "a") == 0
    assert convert("--jobs=2", root, lst, tmp_path / "b") == 0
    # with another thread alive (the workers never start from a plain fork)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        assert convert("--jobs=2", root, lst, tmp_path / "c") == 0
    finally:
        stop.set()
    want = list(iterate_lmdb(tmp_path / "a"))
    assert list(iterate_lmdb(tmp_path / "b")) == want and list(iterate_lmdb(tmp_path / "c")) == want


def test_unreadable_images_are_skipped_with_line_numbers(tmp_path, log_text):
    root, lst, names = make_set(tmp_path / "imgs", n=3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"this is not a png")
    with open(lst, "a") as f:
        f.write("missing.png 1\nbroken.png 2\n")
    db = tmp_path / "db"
    result = ci.convert_imageset(root, lst, str(db), jobs=1)
    assert result == {"total": 5, "written": 3, "skipped": 2}
    text = log_text.getvalue()
    assert "list.txt:4: could not open or find file" in text and "missing.png" in text
    assert "list.txt:5:" in text and "broken.png is not an image" in text
    assert "Skipped 2 of 5 images" in text
    assert [k for k, _ in records(db)] == [f"{i:08d}_{n}" for i, n in enumerate(names)]


def test_bad_list_line_gives_line_number(tmp_path, capsys):
    root, lst, _ = make_set(tmp_path / "imgs", n=2)
    with open(lst, "a") as f:
        f.write("img0.png seven\n")
    assert convert("--jobs=1", root, lst, tmp_path / "db") == 1
    err = capsys.readouterr().err
    assert "error: " in err and "list.txt:3: label 'seven' is not an integer" in err
    assert not os.path.exists(tmp_path / "db")


def test_existing_db_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    root, lst, _ = make_set(tmp_path / "imgs", n=2)
    db = tmp_path / "db"
    assert convert("--jobs=1", root, lst, db) == 0
    assert convert("--jobs=1", "--gray", root, lst, db) == 1
    assert "db: already exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert records(db)[0][1].channels == 3
    assert convert("--jobs=1", "--gray", "--overwrite", root, lst, db) == 0
    assert records(db)[0][1].channels == 1
    assert sorted(os.listdir(tmp_path)) == ["db", "imgs"]


def test_failure_mid_way_leaves_no_database(tmp_path, monkeypatch):
    root, lst, _ = make_set(tmp_path / "imgs", n=12, h=2, w=2)
    monkeypatch.setattr(ci, "COMMIT_EVERY", 4)
    real_put = ci.BatchedLMDBWriter.put
    calls = []

    def failing_put(self, key, value):
        calls.append(key)
        if len(calls) == 10:                 # after two committed transactions
            raise RuntimeError("simulated crash")
        real_put(self, key, value)

    monkeypatch.setattr(ci.BatchedLMDBWriter, "put", failing_put)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ci.convert_imageset(root, lst, str(tmp_path / "db"), jobs=1)
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_out_of_space_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    root, lst, _ = make_set(tmp_path / "imgs", n=3, h=2, w=2)

    def full(self):
        raise lmdb.Error("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(ci.BatchedLMDBWriter, "commit", full)
    assert convert("--jobs=1", root, lst, tmp_path / "db") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "db: cannot write the database" in err and "No space left" in err
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_unwritable_directory(tmp_path, capsys, monkeypatch):
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        # root writes anywhere: make the database creation fail the way a read-only directory does
        def denied(*a, **k):
            raise lmdb.Error(f"{out}/db.tmp: Permission denied")
        monkeypatch.setattr(lmdb, "open", denied)
    else:
        out.chmod(0o555)
    try:
        assert convert("--jobs=1", root, lst, out / "db") == 1
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert "db: cannot create the database" in err and "Permission denied" in err
    assert os.listdir(out) == []


def test_usage_errors(tmp_path, capsys):
    root, lst, _ = make_set(tmp_path / "imgs", n=1)
    assert convert("--resize_width", "abc", root, lst, tmp_path / "db") == 1
    assert "flag --resize_width: 'abc' is not an integer" in capsys.readouterr().err
    assert convert("--bogus", root, lst, tmp_path / "db") == 1
    assert "unknown flag --bogus" in capsys.readouterr().err
    assert convert(tmp_path / "nope", lst, tmp_path / "db") == 1
    assert "nope: root folder not found" in capsys.readouterr().err
    assert convert("--backend=bdb", root, lst, tmp_path / "db") == 1
    assert "unknown database backend 'bdb' (use lmdb or leveldb)" in capsys.readouterr().err
    assert convert(root, lst) == 1
    assert "Usage:" in capsys.readouterr().err
    assert convert("--help") == 0
    assert "--resize_height" in capsys.readouterr().out


def test_check_size(tmp_path):
    root, lst, names = make_set(tmp_path / "imgs", n=2, h=4, w=4)
    cv2.imwrite(root + "big.png", np.zeros((5, 4, 3), np.uint8))
    with open(lst, "a") as f:
        f.write("big.png 3\n")
    with pytest.raises(DataError, match=r"list.txt:3: big.png: image is 3x5x4 .* first one was 3x4x4"):
        ci.convert_imageset(root, lst, str(tmp_path / "db"), check_size=True, jobs=1)
    assert not os.path.exists(tmp_path / "db")
    assert ci.convert_imageset(root, lst, str(tmp_path / "db"), jobs=1)["written"] == 3


def test_gflags_parser_forms():
    flags, pos = gflags.parse_gflags(["-gray", "--resize_width", "3", "a", "--encode_type=png", "--", "--x"], ci.FLAGS)
    assert flags["gray"] and flags["resize_width"] == 3 and flags["encode_type"] == "png"
    assert pos == ["a", "--x"]
    with pytest.raises(gflags.UsageError, match="--gray: 'maybe' is not a boolean"):
        gflags.parse_gflags(["--gray=maybe"], ci.FLAGS)
    with pytest.raises(gflags.UsageError, match="--jobs needs a value"):
        gflags.parse_gflags(["--jobs"], ci.FLAGS)


def test_command_line_end_to_end(tmp_path):
    root, lst, _ = make_set(tmp_path / "imgs", n=3, h=3, w=3)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "minicaffe.tools.convert_imageset", "--jobs=2", root, lst, str(tmp_path / "db")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Processed 3 files." in res.stderr
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in res.stderr


# --- issue 11: nothing minicaffe did not make is ever deleted -----------------------------------------

def _tree(path):
    """Every file under ``path`` with its bytes (a directory's whole content), or the file's bytes."""
    if os.path.isfile(path):
        return open(path, "rb").read()
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


@pytest.mark.parametrize("victim", ["project", "root", "list", "empty_dir", "lmdb_plus_file", "symlink"])
def test_overwrite_refuses_what_is_not_an_lmdb(tmp_path, capsys, victim):
    """--overwrite with a mistyped DB_NAME (the project folder, the image root, the list file...) used
    to delete it and exit 0; now only an LMDB is replaced and anything else is refused untouched."""
    project = tmp_path / "project"
    root, lst, _ = make_set(project / "imgs", n=2, h=2, w=2)
    (project / "train.prototxt").write_text("name: 'x'\n")
    targets = {"project": project, "root": project / "imgs", "list": lst}
    if victim == "empty_dir":
        targets[victim] = tmp_path / "empty"
        os.mkdir(targets[victim])
    elif victim == "lmdb_plus_file":
        targets[victim] = tmp_path / "db"
        assert convert("--jobs=1", root, lst, targets[victim]) == 0
        (targets[victim] / "notes.txt").write_text("mine\n")
    elif victim == "symlink":
        targets[victim] = tmp_path / "link"
        os.symlink(project, targets[victim])
    target = str(targets[victim])
    before = _tree(target)
    capsys.readouterr()
    assert convert("--jobs=1", "--overwrite", root, lst, target) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"{target}: is a" in errors[0] and "not an LMDB or LevelDB database" in errors[0] and "nothing was deleted" in errors[0]
    assert _tree(target) == before
    assert not [n for n in os.listdir(os.path.dirname(target)) if ".tmp-" in n or ".old-" in n]


def test_overwrite_replaces_a_nosubdir_lmdb(tmp_path):
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    db = tmp_path / "flat"
    env = lmdb.open(str(db), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"old", b"record")
    env.close()
    assert sorted(os.listdir(tmp_path)) == ["flat", "flat-lock", "imgs"]
    assert convert("--jobs=1", "--overwrite", root, lst, db) == 0
    assert len(records(db)) == 2
    assert sorted(os.listdir(tmp_path)) == ["flat", "imgs"]


def _marked(tmp_path, name, **change):
    """A working directory as a killed run leaves it: marker first (as this process would write it,
    with ``change`` applied), then the database inside."""
    path = tmp_path / name
    path.mkdir()
    marker = dict(ci._identity(), tool=ci.MARKER_TOOL, kind=name.split(".")[1].split("-")[0], target="db",
                  name=name, token="0123456789abcdef" * 2)
    marker.update(change)
    (path / ci.MARKER).write_text(__import__("json").dumps(marker))
    env = lmdb.open(str(path / ci.WORK_DB))
    with env.begin(write=True) as txn:
        txn.put(b"00000000_kept", caffe_pb2.Datum(channels=1, height=1, width=1, data=b"\x07").SerializeToString())
    env.close()
    return path


def _dead_pid():
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_cleanup_leaves_user_folders_named_like_leftovers(tmp_path, capsys):
    """A user's backup train_lmdb.old-20240101 was deleted as an 'interrupted run's leftover' (its
    'pid' was not running), even by a run that was then refused."""
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    db = tmp_path / "train_lmdb"
    assert convert("--jobs=1", root, lst, db) == 0
    backup = tmp_path / "train_lmdb.old-20240101"
    shutil.copytree(db, backup)
    tmp_named = tmp_path / f"train_lmdb.tmp-{_dead_pid()}"
    tmp_named.mkdir()
    (tmp_named / "photo.jpg").write_bytes(b"mine")
    keep = {p: _tree(p) for p in (backup, tmp_named)}
    assert convert("--jobs=1", root, lst, db) == 1               # refused: exists
    assert "already exists" in capsys.readouterr().err
    assert all(_tree(p) == t for p, t in keep.items())
    assert convert("--jobs=1", "--overwrite", root, lst, db) == 0
    assert all(_tree(p) == t for p, t in keep.items())
    assert sorted(os.listdir(tmp_path)) == sorted(["imgs", "train_lmdb", backup.name, tmp_named.name])


def test_cleanup_never_deletes_what_it_cannot_prove_it_made(tmp_path, capsys, log_text):
    """A user's backup named like a leftover (db.old-20240101), an unmarked db.tmp-<dead pid>, and
    marked ones whose owner may be alive (a live pid, another host, another pid namespace) all
    stay; the run is refused before any clean-up; only a marked leftover of a gone process goes."""
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    dead = _dead_pid()
    backup = tmp_path / "db.old-20240101"
    backup.mkdir()
    (backup / "data.mdb").write_bytes(b"my backup")
    unmarked = tmp_path / f"db.tmp-{dead}"
    unmarked.mkdir()
    (unmarked / "photo.jpg").write_bytes(b"mine")
    alive = _marked(tmp_path, f"db.tmp-{os.getppid()}-a", pid=os.getppid(), start=None)
    other_host = _marked(tmp_path, f"db.tmp-{dead}-b", pid=dead, host="elsewhere.example")
    other_ns = _marked(tmp_path, f"db.tmp-{dead}-c", pid=dead, pid_ns="pid:[1]")
    bad_token = _marked(tmp_path, f"db.tmp-{dead}-d", pid=dead, token="not hex")
    ours = _marked(tmp_path, f"db.tmp-{dead}-e", pid=dead)
    ours2 = _marked(tmp_path, f"db2.tmp-{dead}-f", pid=dead, target="db2")
    # its pid now belongs to another process (started at another time): provably gone too
    reused = _marked(tmp_path, f"db2.tmp-{os.getppid()}-g", pid=os.getppid(), target="db2",
                     start=ci._process_start(os.getppid()) + 1)
    # killed between creating a working directory and marking it: empty, so rmdir loses nothing;
    # the same name holding anything, or of a live pid, or not exactly that name, stays
    empty = tmp_path / f"db2.tmp-{dead}-abc_12yz"
    empty.mkdir()
    not_empty = tmp_path / f"db2.old-{dead}-abc_12yz"
    not_empty.mkdir()
    (not_empty / "x").write_text("x")
    live_empty = tmp_path / f"db2.tmp-{os.getppid()}-abc_12yz"
    live_empty.mkdir()
    user_empty = tmp_path / "db2.old-20240101"
    user_empty.mkdir()
    keep = {p: _tree(p) for p in (backup, unmarked, alive, other_host, other_ns, bad_token, not_empty,
                                  live_empty, user_empty)}
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "precious.txt").write_text("x")
    # refused (DB_NAME is not an LMDB): nothing at all is cleaned up, not even our own leftover
    assert convert("--jobs=1", "--overwrite", root, lst, tmp_path / "db") == 1
    assert "not an LMDB or LevelDB database" in capsys.readouterr().err
    assert ours.exists() and all(_tree(p) == t for p, t in keep.items())
    # a run that goes ahead removes only the marked leftover of a gone process for its DB_NAME
    assert convert("--jobs=1", root, lst, tmp_path / "db2") == 0
    assert not ours2.exists() and not reused.exists() and not empty.exists() and ours.exists()
    assert all(_tree(p) == t for p, t in keep.items())
    assert f"Removing {ours2}, left by an interrupted run" in log_text.getvalue()
    assert (tmp_path / "db" / "precious.txt").read_text() == "x"


def test_interrupted_overwrite_is_put_back_from_a_marked_old_dir(tmp_path, log_text):
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    dead = _dead_pid()
    old = _marked(tmp_path, f"db.old-{dead}-x", pid=dead)
    with pytest.raises(DataError, match=r"db: already exists \(use --overwrite"):
        ci.convert_imageset(root, lst, str(tmp_path / "db"), jobs=1)
    assert [k for k, _ in records(tmp_path / "db")] == ["00000000_kept"]
    assert not old.exists() and "restored the database" in log_text.getvalue()


def test_ctrl_c_with_jobs_exits_at_once_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during --jobs 2 printed
    'error: interrupted' and then hung until SIGKILL, leaving the temporary database."""
    import cv2
    work = tmp_path / "w"
    work.mkdir()
    # a flat image: cheap to decode, 120 KB to write, so the workers often wait for work, which is
    # when the old workers died of the SIGINT and broke the pool (the hang was a race: ~3 in 4 runs)
    cv2.imwrite(str(work / "img.png"), np.full((200, 200, 3), 7, np.uint8))
    (work / "list.txt").write_text("".join(f"img.png {i % 3}\n" for i in range(3000)))
    db = work / "db"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = work / "err.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "minicaffe.tools.convert_imageset", "--jobs", "2",
                                 f"{work}/", str(work / "list.txt"), str(db)],
                                stderr=err, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "Processed 1000 files." not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            assert proc.poll() is None, "finished before it could be interrupted"
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            code = proc.wait(timeout=15)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert code != 0 and took < 5, (code, took, text[-2000:])
    assert [line for line in text.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    assert "Traceback" not in text and "Exception" not in text, text[-2000:]
    assert sorted(os.listdir(work)) == ["err.log", "img.png", "list.txt"]


# --- issue 11 #15: a pixel limit, checked before decoding --------------------------------------------

def _flat_png(path, width, height):
    """A real, valid grayscale PNG of ``width`` x ``height`` zeros: a few hundred KB on disk however
    many pixels it declares (written without ever holding the pixels in memory)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp = zlib.compressobj(9)
    block = bytes(width + 1) * 100                    # 100 rows: filter byte 0 + zeros
    idat = []
    for start in range(0, height, 100):
        rows = min(100, height - start)
        idat.append(comp.compress(block if rows == 100 else bytes(width + 1) * rows))
    idat.append(comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))


def test_huge_image_is_skipped_from_its_header_without_decoding(tmp_path, capsys, log_text, monkeypatch):
    """A 100-KB PNG declaring ~100 megapixels used to be decoded and written as a 300 MB record
    (an 873 KB one became 2.6 GB and took 8 GB of RAM): now the header is read first and the image
    skipped like an unreadable one, the summary naming it; it is never decoded."""
    root, lst, names = make_set(tmp_path / "imgs", n=2, h=3, w=3)
    _flat_png(tmp_path / "imgs" / "huge.png", 10000, 10001)
    assert os.path.getsize(tmp_path / "imgs" / "huge.png") < 1 << 20
    with open(lst, "a") as f:
        f.write("huge.png 1\n")
    decoded = []
    real_imdecode = cv2.imdecode

    def imdecode(buf, flag):
        decoded.append(len(buf))
        return real_imdecode(buf, flag)
    monkeypatch.setattr(cv2, "imdecode", imdecode)
    db = tmp_path / "db"
    assert convert("--jobs=1", root, lst, db) == 0
    assert len(decoded) == 2                                  # the huge one never reached OpenCV
    assert [k for k, _ in records(db)] == [f"{i:08d}_{n}" for i, n in enumerate(names)]
    text = log_text.getvalue()
    assert (f"list.txt:3: {root}huge.png: 10000x10001 image is 100 megapixels, over "
            f"--max_pixels=100000000 (100 megapixels) (skipped)") in text
    assert "Skipped 1 of 3 images that could not be read or were too large (huge.png); 2 written to" in text
    # a higher limit lets it through (checked on a smaller one, to stay fast)
    _flat_png(tmp_path / "imgs" / "huge.png", 300, 200)
    assert convert("--jobs=1", "--max_pixels=60000", root, lst, tmp_path / "db2") == 0
    assert len(records(tmp_path / "db2")) == 3
    assert convert("--jobs=1", "--max_pixels=59999", root, lst, tmp_path / "db3") == 0
    assert len(records(tmp_path / "db3")) == 2


def test_max_pixels_on_decoded_size_and_resize(tmp_path, capsys, log_text):
    """Formats whose header is not parsed (TIFF) are checked once decoded; a resize target over the
    limit is refused up front in one line."""
    root, lst, _ = make_set(tmp_path / "imgs", n=2, h=2, w=2)
    cv2.imwrite(root + "big.tif", np.zeros((6, 7, 3), np.uint8))
    with open(lst, "a") as f:
        f.write("big.tif 1\n")
    assert convert("--jobs=1", "--max_pixels=41", root, lst, tmp_path / "db") == 0
    assert len(records(tmp_path / "db")) == 2
    assert f"list.txt:3: {root}big.tif: 7x6 image is 42 pixels, over --max_pixels=41 (skipped)" in log_text.getvalue()
    assert convert("--jobs=1", "--max_pixels=42", "--encoded", root, lst, tmp_path / "db2") == 0
    assert len(records(tmp_path / "db2")) == 3
    capsys.readouterr()
    assert convert("--jobs=1", "--max_pixels=100", "--resize_width=20", "--resize_height=10", root, lst,
                   tmp_path / "db3") == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: --resize_width=20 x --resize_height=10 is 200 pixels, over "
                                        "--max_pixels=100"]
    assert not os.path.exists(tmp_path / "db3")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
def test_header_size_matches_opencv(tmp_path, ext):
    for h, w in ((5, 9), (300, 17), (1, 1)):
        path = str(tmp_path / f"x{ext}")
        assert cv2.imwrite(path, np.zeros((h, w, 3), np.uint8))
        assert ci.header_size(open(path, "rb").read()) == (w, h)
    assert ci.header_size(b"\x89PNG\r\n\x1a\n") is None and ci.header_size(b"not an image") is None
