"""DataTransformer against hand computations: crop, mirror, mean, scale, and the two extensions."""
import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.core import backend
from minicaffe.data import DataTransformer, load_pca_file
from minicaffe.errors import DataError, NetError
from minicaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make(text, phase=TRAIN, name="data"):
    p = caffe_pb2.TransformationParameter()
    text_format.Merge(text, p)
    return DataTransformer(p, phase, name)


def write_mean(path, mean):
    bp = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    bp.data.extend(mean.ravel().tolist())
    path.write_bytes(bp.SerializeToString())
    return str(path)


def write_pca(path, lam, vecs):
    vec = caffe_pb2.BlobProtoVector()
    for arr in (np.asarray(lam, np.float32), np.asarray(vecs, np.float32)):
        bp = vec.blobs.add()
        bp.shape.dim.extend(arr.shape)
        bp.data.extend(arr.ravel().tolist())
    path.write_bytes(vec.SerializeToString())
    return str(path)


def image(c=3, h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (c, h, w), dtype=np.uint8)


def find_offset(out, img, crop):
    """The (h, w, flipped) window of img that out equals."""
    hits = []
    for h in range(img.shape[1] - crop + 1):
        for w in range(img.shape[2] - crop + 1):
            win = img[:, h:h + crop, w:w + crop].astype(np.float32)
            if np.array_equal(out, win):
                hits.append((h, w, False))
            if np.array_equal(out, win[:, :, ::-1]):
                hits.append((h, w, True))
    return hits


def test_no_params_is_identity_as_float():
    img = image()
    out = make("").transform(img)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img)


def test_test_phase_centre_crop_mean_value_scale():
    img = image(h=7, w=10)
    t = make("crop_size: 4 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5", TEST)
    out = t.transform(img)
    h0, w0 = (7 - 4) // 2, (10 - 4) // 2
    expect = (img[:, h0:h0 + 4, w0:w0 + 4].astype(np.float32) - np.array([10, 20, 30], np.float32)[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6)
    assert t.infer_shape(img) == (3, 4, 4)


def test_single_mean_value_applies_to_all_channels():
    img = image()
    out = make("mean_value: 100").transform(img)
    np.testing.assert_array_equal(out, img.astype(np.float32) - 100)


def test_train_random_crop_inside_and_covers_offsets():
    img = image(h=6, w=7, seed=5)
    t = make("crop_size: 4")
    batch = t.transform_batch([img] * 200)
    seen = set()
    for out in batch:
        hits = [x for x in find_offset(out, img, 4) if not x[2]]
        assert hits, "crop is not a window of the image"
        seen.add(hits[0][:2])
    assert seen == {(h, w) for h in range(3) for w in range(4)}


def test_mirror_flips_about_half_at_train_and_test():
    img = image(h=3, w=5, seed=7)
    for phase in (TRAIN, TEST):
        out = make("mirror: true", phase).transform_batch([img] * 400)
        flipped = np.array([np.array_equal(o, img[:, :, ::-1]) for o in out])
        same = np.array([np.array_equal(o, img) for o in out])
        assert np.all(flipped | same)
        assert 120 < flipped.sum() < 280


def test_mean_file_is_cropped_with_the_image_offsets_then_flipped(tmp_path):
    img = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)      # float image: every pixel distinct
    mean = np.random.default_rng(3).uniform(0, 50, (2, 6, 7)).astype(np.float32)
    t = make(f'crop_size: 3 mirror: true scale: 2 mean_file: "{write_mean(tmp_path / "m.binaryproto", mean)}"')
    for out in t.transform_batch([img] * 50):
        # undo scale, find which window (and flip) the image part came from
        found = False
        for h in range(4):
            for w in range(5):
                for flip in (False, True):
                    win = (img - mean)[:, h:h + 3, w:w + 3]
                    if flip:
                        win = win[:, :, ::-1]
                    if np.allclose(out, win * 2, atol=1e-4):
                        found = True
        assert found


def test_mean_file_test_phase_exact(tmp_path):
    img = image(h=5, w=5)
    mean = np.random.default_rng(4).uniform(0, 255, (3, 5, 5)).astype(np.float32)
    t = make(f'crop_size: 3 mean_file: "{write_mean(tmp_path / "m.binaryproto", mean)}"', TEST)
    np.testing.assert_allclose(t.transform(img), (img.astype(np.float32) - mean)[:, 1:4, 1:4], atol=1e-5)


def test_errors_name_layer_and_sizes(tmp_path):
    img = image(h=5, w=6)
    with pytest.raises(DataError, match=r"layer 'conv_in': db: record 'k': crop_size 7 is larger than the "
                                         r"image 3x5x6"):
        make("crop_size: 7", name="conv_in").transform(img, where="db: record 'k'")
    mean = np.zeros((3, 4, 4), np.float32)
    t = make(f'mean_file: "{write_mean(tmp_path / "m.binaryproto", mean)}"')
    with pytest.raises(DataError, match=r"layer 'data': mean_file is 3x4x4 but the image is 3x5x6"):
        t.transform(img)
    with pytest.raises(NetError, match=r"layer 'data'.*2 mean_value\(s\) for 3 channels"):
        make("mean_value: 1 mean_value: 2").transform(img)
    with pytest.raises(NetError, match="mean_file and mean_value"):
        make(f'mean_file: "{tmp_path / "m.binaryproto"}" mean_value: 1')
    with pytest.raises(NetError, match="force_color and force_gray"):
        make("force_color: true force_gray: true")
    with pytest.raises(DataError, match=r"layer 'data': .*nope.binaryproto: mean_file not found"):
        make(f'mean_file: "{tmp_path / "nope.binaryproto"}"')
    (tmp_path / "bad.binaryproto").write_bytes(b"\xff\xff\xff")
    with pytest.raises(DataError, match="bad.binaryproto: mean_file is not a binary BlobProto"):
        make(f'mean_file: "{tmp_path / "bad.binaryproto"}"')


def test_same_seed_same_random_choices():
    imgs = [image(h=9, w=9, seed=s) for s in range(8)]
    backend.set_random_seed(42)
    a = make("crop_size: 5 mirror: true").transform_batch(imgs)
    backend.set_random_seed(42)
    b = make("crop_size: 5 mirror: true").transform_batch(imgs)
    backend.set_random_seed(43)
    c = make("crop_size: 5 mirror: true").transform_batch(imgs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- scale jittering ---------------------------------------------------------------------------------

def test_scale_jitter_plan_sides_in_range_and_crops_inside():
    t = make("crop_size: 8 scale_jitter { min_side: 10 max_side: 16 }")
    rng = np.random.default_rng(0)
    shapes = [(3, int(h), int(w)) for h, w in rng.integers(5, 40, (500, 2))]
    plan = t.plan(shapes)
    sides, sizes, offsets = plan["sides"], plan["sizes"], plan["offsets"]
    assert sides.min() >= 10 and sides.max() <= 16
    assert set(sides.tolist()) == set(range(10, 17))
    assert np.array_equal(sizes.min(axis=1), sides)             # the smaller side becomes S
    assert np.all(offsets >= 0) and np.all(offsets + 8 <= sizes)
    for (c, h, w), (nh, nw), s in zip(shapes, sizes, sides):     # aspect ratio kept, rounded
        if min(h, w) == s:
            assert (nh, nw) == (h, w)
        elif h <= w:
            assert (nh, nw) == (s, int(w * s / h + 0.5))
        else:
            assert (nh, nw) == (int(h * s / w + 0.5), s)


def test_scale_jitter_transform_matches_resize_then_crop():
    img = image(h=20, w=30, seed=9)
    t = make("crop_size: 8 scale_jitter { min_side: 10 max_side: 14 }", TEST)    # S = 12
    out = t.transform(img)
    hwc = cv2.resize(np.ascontiguousarray(img.transpose(1, 2, 0)), (18, 12), interpolation=cv2.INTER_LINEAR)
    expect = hwc.transpose(2, 0, 1)[:, 2:10, 5:13]
    np.testing.assert_array_equal(out, expect)
    # at TRAIN every output is a window of the image resized to some S in range
    t = make("crop_size: 8 scale_jitter { min_side: 10 max_side: 12 }")
    resized = {s: cv2.resize(np.ascontiguousarray(img.transpose(1, 2, 0)), (int(30 * s / 20 + .5), s),
                             interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1) for s in (10, 11, 12)}
    for o in t.transform_batch([img] * 20):
        assert any(find_offset(o, r, 8) for r in resized.values())


def test_scale_jitter_config_errors():
    with pytest.raises(NetError, match="needs crop_size"):
        make("scale_jitter { min_side: 10 max_side: 12 }")
    with pytest.raises(NetError, match="crop_size 11 is larger than scale_jitter min_side 10"):
        make("crop_size: 11 scale_jitter { min_side: 10 max_side: 12 }")
    with pytest.raises(NetError, match="0 < min_side <= max_side"):
        make("crop_size: 4 scale_jitter { min_side: 12 max_side: 10 }")


# --- colour shift ------------------------------------------------------------------------------------

def test_color_shift_has_the_pca_covariance(tmp_path):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    lam = np.array([900.0, 100.0, 25.0])
    pca = write_pca(tmp_path / "pca.binaryproto", lam, q)
    sigma = 0.5
    t = make(f'color_shift {{ sigma: {sigma} pca_file: "{pca}" }}')
    img = np.full((3, 2, 2), 100, np.uint8)
    out = t.transform_batch([img] * 20000)
    # the same shift on every pixel of an image
    assert np.allclose(out, out[:, :, :1, :1], atol=1e-4)
    shift = out[:, :, 0, 0].astype(np.float64) - 100
    expect = sigma ** 2 * (q * lam) @ q.T                       # sum_i sigma^2 lambda_i p_i p_i^T
    cov = np.cov(shift.T)
    assert np.abs(shift.mean(axis=0)).max() < 0.05 * np.sqrt(lam.max()) * sigma
    np.testing.assert_allclose(cov, expect, atol=0.04 * expect.max())
    # TEST: no shift
    out = make(f'color_shift {{ sigma: {sigma} pca_file: "{pca}" }}', TEST).transform(img)
    np.testing.assert_array_equal(out, img)


def test_color_shift_needs_three_channels_and_a_valid_file(tmp_path):
    pca = write_pca(tmp_path / "pca.binaryproto", [1, 1, 1], np.eye(3))
    with pytest.raises(DataError, match="color_shift needs 3-channel images, got 1"):
        make(f'color_shift {{ pca_file: "{pca}" }}').transform(image(c=1))
    with pytest.raises(NetError, match="needs pca_file"):
        make("color_shift { sigma: 0.1 }")
    bad = write_pca(tmp_path / "bad.binaryproto", [1, 1], np.eye(2))
    with pytest.raises(DataError, match="bad.binaryproto: pca_file holds eigenvalues of shape"):
        make(f'color_shift {{ pca_file: "{bad}" }}')
    lam, vecs = load_pca_file(pca)
    np.testing.assert_array_equal(vecs, np.eye(3))


def test_solver_random_seed_repeats_jitter_and_colour_shift_exactly(tmp_path):
    """A Data layer over encoded records of several sizes, with scale jitter, colour shift and
    mirror: the solver's random_seed alone decides every batch."""
    import minicaffe as caffe
    from minicaffe.tools.convert_imageset import convert_imageset
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i, (h, w) in enumerate([(12, 20), (16, 14), (13, 13), (20, 11)]):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lines.append(f"{i}.png {i}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    convert_imageset(str(tmp_path / "img") + "/", str(tmp_path / "list.txt"), str(tmp_path / "db"), encoded=True)
    pca = write_pca(tmp_path / "pca.binaryproto", [400.0, 100.0, 25.0], np.eye(3))
    net = f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
      transform_param {{ crop_size: 8 mirror: true scale_jitter {{ min_side: 10 max_side: 16 }}
                        color_shift {{ sigma: 0.1 pca_file: "{pca}" }} }}
      data_param {{ source: "{tmp_path / 'db'}" batch_size: 4 backend: LMDB }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}"""

    def batches(seed, steps=3):
        sp = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", max_iter=steps, random_seed=seed,
                                       snapshot_after_train=False, display=0)
        text_format.Merge(net, sp.net_param)
        solver = caffe.get_solver(sp)
        out = []
        for _ in range(steps):
            solver.step(1)
            out.append(solver.net.blobs["data"].data.copy())
        return np.stack(out)

    backend.set_random_seed(99)        # the global state before the solver must not matter
    a = batches(5)
    backend.set_random_seed(7)
    b = batches(5)
    c = batches(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
