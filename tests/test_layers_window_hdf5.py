"""WindowData (R-CNN window files: fg/bg sampling, context padding, square crops, mean, mirror)
and HDF5Output (atomic writes of data and label), on small generated files."""
import os

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import MinicaffeError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import make_layer

cv2 = pytest.importorskip("cv2")
h5py = pytest.importorskip("h5py")


@pytest.fixture
def images(tmp_path):
    rs = np.random.RandomState(0)
    imgs = [rs.randint(0, 256, (40, 50, 3)).astype(np.uint8), rs.randint(0, 256, (30, 36, 3)).astype(np.uint8)]
    for i, img in enumerate(imgs):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), img)
    return imgs


def window_file(tmp_path, blocks):
    """blocks: [(image name, (c, h, w), [(label, overlap, x1, y1, x2, y2)])]"""
    lines = []
    for i, (name, size, windows) in enumerate(blocks):
        lines += [f"# {i}", name, *map(str, size), str(len(windows))]
        lines += [" ".join(str(v) for v in w) for w in windows]
    path = tmp_path / "windows.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def window_layer(tmp_path, path, transform="crop_size: 10", extra="", batch=4):
    text = (f'type: "WindowData" window_data_param {{ source: "{path}" root_folder: "{tmp_path}/" '
            f'batch_size: {batch} {extra} }} transform_param {{ {transform} }}')
    return make_layer(text, [], num_top=2)


STANDARD = [("im0.png", (3, 40, 50), [(3, 0.9, 5, 6, 30, 33), (0, 0.1, 1, 1, 20, 20), (2, 0.3, 0, 0, 9, 9)]),
            ("im1.png", (3, 30, 36), [(1, 0.05, 2, 3, 20, 25)])]


def test_window_file_split_into_foreground_and_background(tmp_path, images):
    from minicaffe.layers.data import parse_window_file
    path = window_file(tmp_path, STANDARD)
    imgs, fg, bg = parse_window_file(str(path), "root/", np.float32(0.5), np.float32(0.2), "")
    assert imgs == [("root/im0.png", (3, 40, 50)), ("root/im1.png", (3, 30, 36))]
    assert fg == [(0, 3, float(np.float32(0.9)), 5, 6, 30, 33)]
    # overlap 0.3 lies between bg_threshold 0.2 and fg_threshold 0.5: unused; bg labels become 0
    assert bg == [(0, 0, 0.0, 1, 1, 20, 20), (1, 0, 0.0, 2, 3, 20, 25)]


def test_overlap_on_the_threshold_compares_as_c_floats(tmp_path, images):
    """Caffe reads overlaps into floats: 0.3 equals a 0.3 threshold (as a double it would be below)."""
    from minicaffe.layers.data import parse_window_file
    path = window_file(tmp_path, [("im0.png", (3, 40, 50), [(1, 0.3, 1, 1, 5, 5), (1, 0.29999, 1, 1, 5, 5)])])
    _, fg, bg = parse_window_file(str(path), "", np.float32(0.3), np.float32(0.3), "")
    assert len(fg) == 1 and len(bg) == 1


def crop_reference(img, box, crop, mean=0.0, scale=1.0):
    x1, y1, x2, y2 = box
    patch = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], (crop, crop), interpolation=cv2.INTER_LINEAR)
    return (patch.transpose(2, 0, 1).astype(np.float64) - mean) * scale


def test_warp_batch_holds_background_then_foreground_windows(tmp_path, images):
    path = window_file(tmp_path, STANDARD)
    backend.set_random_seed(3)
    layer, bottom, top = window_layer(tmp_path, path, "crop_size: 10 mean_value: 100",
                                      "fg_fraction: 0.5 scale: 0.25 bg_threshold: 0.2")
    assert top[0].shape == (4, 3, 10, 10) and top[1].shape == (4,)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[1].data, [0, 0, 3, 3])
    fg = crop_reference(images[0], (5, 6, 30, 33), 10, 100, 0.25)
    for i in (2, 3):
        np.testing.assert_allclose(top[0].data[i], fg, atol=1e-5)
    bgs = [crop_reference(images[0], (1, 1, 20, 20), 10, 100, 0.25),
           crop_reference(images[1], (2, 3, 20, 25), 10, 100, 0.25)]
    for i in (0, 1):
        assert any(np.allclose(top[0].data[i], b, atol=1e-5) for b in bgs)


def test_sampling_follows_the_seed_and_uses_every_background_window(tmp_path, images):
    path = window_file(tmp_path, STANDARD)
    runs = []
    for _ in range(2):
        backend.set_random_seed(11)
        layer, bottom, top = window_layer(tmp_path, path, extra="fg_fraction: 0.25 bg_threshold: 0.2", batch=8)
        seen = []
        for _ in range(3):
            layer.forward(bottom, top)
            seen.append(top[0].data.copy())
            np.testing.assert_array_equal(top[1].data, [0] * 6 + [3] * 2)
        runs.append(np.stack(seen))
    np.testing.assert_array_equal(runs[0], runs[1])
    bg_items = runs[0][:, :6].reshape(-1, 3, 10, 10)
    distinct = {item.tobytes() for item in bg_items}
    assert len(distinct) == 2


def test_context_padding_inside_and_at_the_border(tmp_path, images):
    # a window well inside image 0: the context box (scale 16 / (16 - 2*3)) is inside too
    path = window_file(tmp_path, [("im0.png", (3, 40, 50), [(1, 1.0, 15, 12, 34, 27)]),
                                  ("im1.png", (3, 30, 36), [(1, 0.0, 0, 0, 9, 9)])])
    layer, bottom, top = window_layer(tmp_path, path, "crop_size: 16", "context_pad: 3 fg_fraction: 0.5", batch=2)
    layer.forward(bottom, top)
    # half sizes 10 and 8, centre (25, 20), scale 1.6: x 9..41, y 7..33 (C rounding)
    np.testing.assert_allclose(top[0].data[1], crop_reference(images[0], (9, 7, 41, 33), 16), atol=1e-5)
    # the background window at the corner: its context box starts outside the image, so the crop
    # is shifted by the scaled padding and the rest stays 0
    # (half size 5 x 1.6 around 5: -3..13, 17 pixels of which 3 are outside, 3 x 16/17 -> 3 output pixels)
    bg = top[0].data[0]
    pad = int(np.floor(3 * 16 / 17 + 0.5))
    assert pad == 3
    assert np.all(bg[:, :pad, :] == 0) and np.all(bg[:, :, :pad] == 0)
    np.testing.assert_allclose(bg[:, pad:, pad:], crop_reference(images[1], (0, 0, 13, 13), 13), atol=1e-5)


def test_square_mode_and_mirror(tmp_path, images):
    path = window_file(tmp_path, [("im0.png", (3, 40, 50), [(2, 0.9, 10, 10, 29, 19)]),
                                  ("im1.png", (3, 30, 36), [(1, 0.0, 5, 5, 15, 15)])])
    layer, bottom, top = window_layer(tmp_path, path, "crop_size: 12", 'crop_mode: "square" fg_fraction: 0.5',
                                      batch=2)
    layer.forward(bottom, top)
    # square: both halves become 10 around centre (20, 15): x 10..30, y 5..25
    square = crop_reference(images[0], (10, 5, 30, 25), 12)
    np.testing.assert_allclose(top[0].data[1], square, atol=1e-5)
    backend.set_random_seed(2)
    layer, bottom, top = window_layer(tmp_path, path, "crop_size: 12 mirror: true",
                                      'crop_mode: "square" fg_fraction: 0.5', batch=16)
    layer.forward(bottom, top)
    fg = top[0].data[8:]
    flipped = [np.allclose(item, square[:, :, ::-1], atol=1e-5) for item in fg]
    straight = [np.allclose(item, square, atol=1e-5) for item in fg]
    assert all(f or s for f, s in zip(flipped, straight)) and any(flipped) and any(straight)


def test_mean_file_centre_crop_is_subtracted(tmp_path, images):
    path = window_file(tmp_path, [("im0.png", (3, 40, 50), [(1, 0.9, 0, 0, 49, 39)]),
                                  ("im1.png", (3, 30, 36), [(1, 0.0, 0, 0, 9, 9)])])
    mean = np.random.RandomState(4).uniform(0, 255, (1, 3, 14, 14)).astype(np.float32)
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend(mean.shape)
    bp.data.extend(mean.ravel())
    (tmp_path / "mean.binaryproto").write_bytes(bp.SerializeToString())
    layer, bottom, top = window_layer(tmp_path, path, f'crop_size: 10 mean_file: "{tmp_path}/mean.binaryproto"',
                                      "fg_fraction: 0.5", batch=2)
    layer.forward(bottom, top)
    expect = crop_reference(images[0], (0, 0, 49, 39), 10) - mean[0, :, 2:12, 2:12]
    np.testing.assert_allclose(top[0].data[1], expect, atol=1e-4)


def test_window_data_errors_are_one_line(tmp_path, images):
    path = window_file(tmp_path, STANDARD)
    cases = [
        ("crop_size: 0", "", "crop_size > 0"),
        ("crop_size: 8", 'crop_mode: "odd"', "crop_mode"),
        ("crop_size: 8 mean_value: 1 mean_value: 2", "", "1 mean_value or one per channel"),
        # refused at set-up: a fraction outside [0, 1] (or NaN) made forward index past the batch
        ("crop_size: 8", "fg_fraction: 1.5", "fg_fraction must be between 0 and 1, got 1.5"),
        ("crop_size: 8", "fg_fraction: -1", "fg_fraction must be between 0 and 1, got -1"),
        ("crop_size: 8", "fg_fraction: nan", "fg_fraction must be between 0 and 1, got nan"),
    ]
    for transform, extra, msg in cases:
        with pytest.raises(MinicaffeError, match=msg) as info:
            window_layer(tmp_path, path, transform, extra)
        assert "\n" not in str(info.value) and "test_layer" in str(info.value)
    bad = tmp_path / "bad.txt"
    for content, msg in [("", "empty"), ("# 0\nim0.png\n3 40 50\n1\n0 0.9 1 1 5 5\n", "foreground classes must be > 0"),
                         ("# 0\nim0.png\n3 40 x\n", "expected the image width, got 'x'"),
                         ("# 0\nim0.png\n3 40 50\n2\n1 0.9 1 1 5 5\n", "ends early"),
                         ("0\n", "expected '#'")]:
        bad.write_text(content)
        with pytest.raises(MinicaffeError, match=msg) as info:
            window_layer(tmp_path, bad)
        assert "bad.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MinicaffeError, match="window file not found"):
        window_layer(tmp_path, tmp_path / "missing.txt")
    only_fg = window_file(tmp_path, [("im0.png", (3, 40, 50), [(1, 0.9, 1, 1, 5, 5)])])
    layer, bottom, top = window_layer(tmp_path, only_fg)
    with pytest.raises(MinicaffeError, match="foreground and background windows"):
        layer.forward(bottom, top)
    missing_image = window_file(tmp_path, [("nope.png", (3, 40, 50), [(1, 0.9, 1, 1, 5, 5), (1, 0.0, 1, 1, 5, 5)])])
    layer, bottom, top = window_layer(tmp_path, missing_image)
    with pytest.raises(MinicaffeError, match="nope.png: could not open"):
        layer.forward(bottom, top)


def test_cache_images_gives_the_same_batches(tmp_path, images):
    path = window_file(tmp_path, STANDARD)
    out = []
    for cache in ("false", "true"):
        backend.set_random_seed(5)
        layer, bottom, top = window_layer(tmp_path, path, "crop_size: 10 mirror: true",
                                          f"cache_images: {cache} bg_threshold: 0.2")
        layer.forward(bottom, top)
        out.append(top[0].data.copy())
    np.testing.assert_array_equal(out[0], out[1])


# --- HDF5Output ---------------------------------------------------------------------------------------

def test_hdf5_output_writes_data_and_label_atomically(tmp_path):
    path = tmp_path / "out.h5"
    data = np.random.RandomState(1).randn(3, 2, 4).astype(np.float32)
    layer, bottom, top = make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{path}" }}',
                                    [data, np.array([1.0, 2.0, 3.0])], num_top=0)
    assert not path.exists()          # nothing is written before a forward pass
    layer.forward(bottom, top)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["data", "label"]
        assert f["data"].shape == (3, 2, 4, 1) and f["label"].shape == (3, 1, 1, 1)   # Caffe's 4 axes
        assert f["data"].dtype == np.float32
        np.testing.assert_array_equal(f["data"][...].reshape(3, 2, 4), data)
        np.testing.assert_array_equal(f["label"][...].ravel(), [1, 2, 3])
    bottom[0].data[...] = 7
    layer.forward(bottom, top)          # the next batch replaces the file whole
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][...], 7)
    assert os.listdir(tmp_path) == ["out.h5"]     # no temporary file left behind


def test_hdf5_output_errors(tmp_path):
    with pytest.raises(MinicaffeError, match="file_name is not set"):
        make_layer('type: "HDF5Output"', [np.zeros((2, 1)), np.zeros(2)], num_top=0)
    with pytest.raises(MinicaffeError, match="same batch size"):
        make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{tmp_path}/o.h5" }}',
                   [np.zeros((2, 1)), np.zeros(3)], num_top=0)
    layer, bottom, top = make_layer(
        f'type: "HDF5Output" hdf5_output_param {{ file_name: "{tmp_path}/no/such/dir/o.h5" }}',
        [np.zeros((2, 1)), np.zeros(2)], num_top=0)
    with pytest.raises(MinicaffeError, match="test_layer.*o.h5: cannot write") as info:
        layer.forward(bottom, top)
    assert "\n" not in str(info.value)
