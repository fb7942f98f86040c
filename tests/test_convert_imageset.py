"""convert_imageset: Caffe's keys and records, the flags, and its safety (no partial DB_NAME, ever)."""
import os
import subprocess
import sys

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
