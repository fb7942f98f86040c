"""Net building and weight loading that used to lose or corrupt things without a word (issue 11):
PERMISSIVE parameter sharing, layers run in place that cannot be, allocations too large to make,
crafted BlobProto shapes, shared parameters with conflicting multipliers, non-finite weights."""
import subprocess
import sys

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.errors import AllocationError, NetError, ShapeError, WeightsError
from minicaffe.proto import caffe_pb2


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# --- 6: PERMISSIVE sharing shares storage ---------------------------------------------------------

PERMISSIVE_NET = """
name: "share"
force_backward: true
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" }
  inner_product_param { num_output: 4 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "a" top: "b"
  param { name: "w" share_mode: PERMISSIVE }
  inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "b" bottom: "x" top: "loss" }
"""


def test_permissive_sharing_accumulates_both_gradients_in_one_blob(tmp_path):
    _check_permissive_gradients(tmp_path)


def test_permissive_sharing_on_the_gpu(tmp_path, gpu):
    _check_permissive_gradients(tmp_path)
    test_permissive_sharing_an_update_changes_both_users(tmp_path)


def _check_permissive_gradients(tmp_path):
    net = caffe.Net(_write(tmp_path, PERMISSIVE_NET), caffe.TRAIN)
    w1, w2 = net.params["ip1"][0], net.params["ip2"][0]
    assert w1.shape == (4, 6) and w2.shape == (6, 4)
    # one parameter: the second user sees the owner's values through its own shape
    np.testing.assert_array_equal(w2.data, w1.data.reshape(6, 4))
    assert len(net.learnable_params) == 1

    x = np.random.RandomState(0).randn(2, 6).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.clear_param_diffs()
    net.forward()
    net.backward()

    # the gradient of both users by hand: b = (x W^T) V^T with V = W viewed as 6x4
    W = w1.data.astype(np.float64)
    V = W.reshape(6, 4)
    a = x @ W.T
    b = a @ V.T
    db = (b - x) / 2                      # EuclideanLoss: 1/(2N) sum (b - x)^2, N = 2
    dV = db.T @ a
    dW = (db @ V).T @ x
    expected = dW + dV.reshape(4, 6)
    np.testing.assert_allclose(w1.diff, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w2.diff, expected.reshape(6, 4), rtol=1e-4, atol=1e-6)


def test_permissive_sharing_an_update_changes_both_users(tmp_path):
    solver = caffe.get_solver(f'base_lr: 0.1 lr_policy: "fixed" net_param {{ {PERMISSIVE_NET} }}')
    net = solver.net
    net.blobs["x"].data[...] = np.random.RandomState(1).randn(2, 6)
    before = net.params["ip1"][0].data.copy()
    solver.step(1)
    w1, w2 = net.params["ip1"][0].data, net.params["ip2"][0].data
    assert not np.allclose(w1, before)
    np.testing.assert_array_equal(w2, w1.reshape(6, 4))
    # and writing through the second user reaches the owner
    net.params["ip2"][0].data[...] = 3.0
    assert (net.params["ip1"][0].data == 3.0).all()


def test_permissive_sharing_still_needs_equal_counts(tmp_path):
    text = PERMISSIVE_NET.replace("num_output: 6", "num_output: 5")      # (5, 4): 20 values, not 24
    with pytest.raises(ShapeError, match=r"layer 'ip2'.*param 'w' owned by layer 'ip1': count"):
        caffe.Net(_write(tmp_path, text), caffe.TRAIN)


# --- 7: in place only where a layer supports it -------------------------------------------------

IN_PLACE = """
name: "inplace"
force_backward: true
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "bad" %s bottom: "x" top: "x" }
"""


@pytest.mark.parametrize("layer", [
    'type: "InnerProduct" inner_product_param { num_output: 48 }',
    'type: "Convolution" convolution_param { num_output: 3 kernel_size: 1 }',
    'type: "Pooling" pooling_param { kernel_size: 2 stride: 2 }',
    'type: "LRN"',
    'type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 1 }',
    'type: "Flatten"',
    'type: "Tile" tile_param { tiles: 2 }',
])
def test_layers_that_cannot_run_in_place_are_refused(tmp_path, layer):
    with pytest.raises(NetError, match=r"layer 'bad' \(\w+\): cannot compute in place \(top 'x'"):
        caffe.Net(_write(tmp_path, IN_PLACE % layer), caffe.TRAIN)


@pytest.mark.parametrize("layer", [
    'type: "ReLU"', 'type: "Sigmoid"', 'type: "TanH"', 'type: "AbsVal"', 'type: "BNLL"', 'type: "ELU"',
    'type: "Power" power_param { power: 2 }', 'type: "Exp"', 'type: "Log"', 'type: "PReLU"',
    'type: "Dropout"', 'type: "BatchNorm"', 'type: "Scale"', 'type: "Bias"', 'type: "Softmax"',
])
def test_element_wise_layers_still_run_in_place(tmp_path, layer):
    """In place gives what the same layer gives out of place: output, input gradient and parameter
    gradients (the layers on the allow list keep whatever their backward needs)."""
    rs = np.random.RandomState(2)
    x, dy = rs.randn(2, 3, 4, 4), rs.randn(2, 3, 4, 4)
    if "Log" in layer:
        x = np.abs(x) + 0.5
    results = []
    for top in ("x", "y"):
        text = (IN_PLACE % layer).replace('top: "x" }\n', f'top: "{top}" }}\n')
        net = caffe.Net(_write(tmp_path, text), caffe.TRAIN)
        for k, blob in enumerate(net.params.get("bad", [])):
            blob.data[...] = 0.5 + 0.25 * k + np.arange(blob.count).reshape(blob.shape) / blob.count
        net.blobs["x"].data[...] = x
        caffe.set_random_seed(7)                   # the same dropout mask both times
        out = net.forward()[top].copy()
        net.clear_param_diffs()
        net.backward(**{top: dy})
        results.append((out, net.blobs["x"].diff.copy(), [b.diff.copy() for b in net.params.get("bad", [])]))
    (out_a, dx_a, dp_a), (out_b, dx_b, dp_b) = results
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_a, dx_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(dp_a, dp_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_in_place_inner_product_through_the_command_line(tmp_path):
    _write(tmp_path, IN_PLACE % 'type: "InnerProduct" inner_product_param { num_output: 48 }')
    proc = _cli("time", "-model=net.prototxt", "-iterations=1", cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "layer 'bad' (InnerProduct)" in lines[-1]
    assert "Traceback" not in proc.stderr


# --- 13: allocations too large ------------------------------------------------------------------

@pytest.mark.parametrize("layer, name, nbytes", [
    ('name: "data" type: "Input" top: "x" input_param { shape { dim: 2000000000 dim: 3 dim: 224 dim: 224 } }',
     "data", 2000000000 * 3 * 224 * 224 * 4),
    ('name: "dummy" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2000000000 dim: 3 dim: 32 } }',
     "dummy", 2000000000 * 3 * 32 * 4),
    ('name: "mem" type: "MemoryData" top: "x" top: "y" '
     'memory_data_param { batch_size: 2000000000 channels: 3 height: 32 width: 32 }',
     "mem", 2000000000 * 3 * 32 * 32 * 4),
    # a product of dimensions past int64 (it would wrap round in NumPy's arithmetic)
    ('name: "data" type: "Input" top: "x" input_param { shape { dim: 4294967296 dim: 4294967296 } }',
     "data", 2 ** 64 * 4),
])
def test_huge_blobs_name_the_layer_and_the_bytes(tmp_path, layer, name, nbytes):
    with pytest.raises(AllocationError, match=rf"layer '{name}' \(\w+\): .*{nbytes} bytes"):
        caffe.Net(_write(tmp_path, f"layer {{ {layer} }}"), caffe.TEST)


def test_reshaping_an_input_too_far_names_the_layer_it_breaks(env_switch, tmp_path):
    env_switch("MINICAFFE_MAX_BLOB_BYTES", "5000")
    text = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 500 } } }
    layer { name: "tile" type: "Tile" bottom: "x" top: "y" tile_param { tiles: 2 } }
    """
    net = caffe.Net(_write(tmp_path, text), caffe.TEST)
    with pytest.raises(AllocationError, match=r"^blob 'x' of shape \(2, 1000\) would need 8000 bytes"):
        net.blobs["x"].reshape(2, 1000)
    assert net.blobs["x"].shape == (1, 500)       # a refused reshape leaves the blob as it was
    net.blobs["x"].reshape(1, 1000)               # 4000 bytes: fits; the Tile's 8000 do not
    with pytest.raises(AllocationError, match=r"^layer 'tile' \(Tile\): blob 'y' of shape \(1, 2000\) "
                                              r"would need 8000 bytes"):
        net.reshape()


def test_huge_tile_names_the_layer(tmp_path):
    text = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1000 } } }
    layer { name: "tile" type: "Tile" bottom: "x" top: "t" tile_param { axis: 1 tiles: 1000000000 } }
    """
    with pytest.raises(AllocationError, match=rf"layer 'tile' \(Tile\): .*{10 ** 12 * 4} bytes"):
        caffe.Net(_write(tmp_path, text), caffe.TEST)


def test_gpu_out_of_memory_names_the_layer(tmp_path, gpu):
    if gpu == "standin":
        pytest.skip("the CuPy stand-in has no device memory limit to hit; runs on a real GPU (gpu_check)")
    import cupy
    pool = cupy.get_default_memory_pool()
    text = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1024 dim: 1024 } } }
    layer { name: "relu" type: "ReLU" bottom: "x" top: "y" }
    """
    net = caffe.Net(_write(tmp_path, text), caffe.TEST)
    pool.free_all_blocks()
    pool.set_limit(size=1 << 20)            # 1 MiB: the 4 MiB input cannot go to the device
    try:
        with pytest.raises(AllocationError, match=r"layer 'relu' \(ReLU\): out of memory: .*bytes"):
            net.forward()
    finally:
        pool.set_limit(size=0)


def test_blob_size_is_checked_before_allocating(env_switch, tmp_path):
    # a limit below the blob: refused by the size check alone, whatever the machine could map
    env_switch("MINICAFFE_MAX_BLOB_BYTES", "3999")
    text = 'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1000 } } }'
    with pytest.raises(AllocationError, match=r"layer 'data' \(Input\): blob 'x' of shape \(1, 1000\) "
                                              r"would need 4000 bytes"):
        caffe.Net(_write(tmp_path, text), caffe.TEST)
    env_switch("MINICAFFE_MAX_BLOB_BYTES", "4000")
    assert caffe.Net(_write(tmp_path, text), caffe.TEST).blobs["x"].shape == (1, 1000)


def test_huge_blob_through_the_command_line(tmp_path):
    _write(tmp_path, 'layer { name: "data" type: "Input" top: "x" '
                     'input_param { shape { dim: 2000000000 dim: 3 dim: 224 dim: 224 } } }')
    proc = _cli("time", "-model=net.prototxt", "-iterations=1", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "layer 'data' (Input)" in last and "bytes" in last


# --- weights files: 14 crafted shapes, 17 non-finite values, 18 which file and layer ---------------

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4 } }
"""


def _model(tmp_path, edit):
    """A .caffemodel of SMALL whose blob ``ip`` 0 was changed by ``edit(BlobProto)``."""
    net = caffe.Net(_write(tmp_path, SMALL), caffe.TEST)
    param = net.to_proto()
    edit(param.layer[1].blobs[0])
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(param.SerializeToString())
    return net, str(path)


def _set_shape(dims, values):
    def edit(bp):
        bp.shape.ClearField("dim")
        bp.shape.dim.extend(dims)
        del bp.data[:]
        bp.data.extend([0.5] * values)
    return edit


@pytest.mark.parametrize("dims, values, why", [
    ((-3, -4), 12, "negative dimension"),         # product 12: NumPy's reshape raised ValueError
    ((-1, 12), 12, "negative dimension"),
    ((2 ** 62, 4), 0, r"0 values for shape"),     # product wraps to 0 in int64
    ((4, 3), 5, r"5 values for shape \(4, 3\)"),
])
def test_bad_blobproto_shapes_name_file_layer_and_blob(tmp_path, dims, values, why):
    net, path = _model(tmp_path, _set_shape(dims, values))
    with pytest.raises(WeightsError, match=rf"^{path}: layer 'ip' blob 0: .*{why}"):
        net.copy_from(path)
    with pytest.raises(WeightsError, match=rf"{path}: layer 'ip' blob 0: .*{why}"):
        caffe.Net(str(tmp_path / "net.prototxt"), path, caffe.TEST)


def _solver_dir(tmp_path):
    (tmp_path / "net.prototxt").write_text("""
name: "s"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
""")
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 momentum: 0.9 '
        'snapshot_prefix: "snap" snapshot_after_train: false')


def test_crafted_solverstate_history_shape_is_one_line(tmp_path):
    _solver_dir(tmp_path)
    state = caffe_pb2.SolverState(iter=1)
    for dims in ((-3, -4), (4,)):
        bp = state.history.add()
        bp.shape.dim.extend(dims)
        bp.data.extend([0.0] * 12 if len(dims) == 2 else [0.0] * 4)
    (tmp_path / "bad.solverstate").write_bytes(state.SerializeToString())
    proc = _cli("train", "-solver=solver.prototxt", "-snapshot=bad.solverstate", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bad.solverstate: ") and "negative dimension" in last


def test_nan_in_weights_is_refused_at_load_naming_file_layer_and_blob(tmp_path):
    net, path = _model(tmp_path, lambda bp: bp.data.__setitem__(5, float("nan")))
    before = net.params["ip"][1].data.copy()
    with pytest.raises(WeightsError, match=rf"^{path}: layer 'ip' blob 0 holds non-finite values "
                                           r"\(1 NaN, 0 infinite of 12\)"):
        net.copy_from(path)
    # nothing was copied: the bias (a good blob after the bad one) is as it was
    np.testing.assert_array_equal(net.params["ip"][1].data, before)
    _, path = _model(tmp_path, lambda bp: bp.data.__setitem__(0, float("-inf")))
    with pytest.raises(WeightsError, match=r"layer 'ip' blob 0 holds non-finite values \(0 NaN, 1 infinite"):
        caffe.Net(str(tmp_path / "net.prototxt"), path, caffe.TEST)


def test_nan_in_hdf5_weights_is_refused(tmp_path):
    pytest.importorskip("h5py")
    net = caffe.Net(_write(tmp_path, SMALL), caffe.TEST)
    net.params["ip"][1].data[2] = np.nan
    path = str(tmp_path / "w.h5")
    net.save_hdf5(path)
    with pytest.raises(WeightsError, match=rf"^{path}: layer 'ip' blob 1 holds non-finite values \(1 NaN"):
        caffe.Net(str(tmp_path / "net.prototxt"), path, caffe.TEST)


def test_nan_weights_through_the_command_line(tmp_path):
    _, path = _model(tmp_path, lambda bp: bp.data.__setitem__(3, float("nan")))
    proc = _cli("test", "-model=net.prototxt", "-weights=bad.caffemodel", "-iterations=1", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bad.caffemodel: layer 'ip' blob 0 holds non-finite" in last


# --- 16: shared parameters with conflicting multipliers -------------------------------------------

SHARED = """
name: "mults"
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "first" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" %s } inner_product_param { num_output: 3 bias_term: false } }
layer { name: "second" type: "InnerProduct" bottom: "x" top: "b"
  param { name: "w" %s } inner_product_param { num_output: 3 bias_term: false } }
"""


@pytest.mark.parametrize("first, second, field", [
    ("lr_mult: 1", "lr_mult: 2", "lr_mult"),
    ("lr_mult: 1 decay_mult: 1", "decay_mult: 0", "decay_mult"),
])
def test_shared_param_with_mismatched_multipliers_is_refused(tmp_path, first, second, field):
    with pytest.raises(NetError, match=rf"layer 'second' \(InnerProduct\): shared param 'w' has mismatched "
                                       rf"{field}: .* in layer 'first'"):
        caffe.Net(_write(tmp_path, SHARED % (first, second)), caffe.TRAIN)


def test_shared_param_multipliers_given_once_are_the_params(tmp_path):
    # as Caffe: a multiplier only a later user gives becomes the shared parameter's
    net = caffe.Net(_write(tmp_path, SHARED % ("", "lr_mult: 3 decay_mult: 0")), caffe.TRAIN)
    assert net.params_lr == [3] and net.params_weight_decay == [0]
    net = caffe.Net(_write(tmp_path, SHARED % ("lr_mult: 2", "lr_mult: 2")), caffe.TRAIN)
    assert net.params_lr == [2] and net.params["first"][0] is net.params["second"][0]


def test_huge_data_layer_batch_names_the_layer_and_closes_the_database(tmp_path, monkeypatch):
    import lmdb
    from minicaffe.data import LMDBSource, array_to_datum
    db = str(tmp_path / "db")
    env = lmdb.open(db, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", array_to_datum(np.zeros((3, 32, 32), np.uint8), 0).SerializeToString())
    env.close()
    text = f"""layer {{ name: "data" type: "Data" top: "x" top: "y"
      data_param {{ source: "{db}" batch_size: 2000000000 backend: LMDB }} }}"""
    closed = []
    real_close = LMDBSource.close
    monkeypatch.setattr(LMDBSource, "close", lambda self: (closed.append(self.path), real_close(self))[1])
    with pytest.raises(AllocationError, match=rf"layer 'data' \(Data\): .*{2000000000 * 3 * 32 * 32 * 4} bytes"):
        caffe.Net(_write(tmp_path, text), caffe.TEST)
    # the database was closed at once (the traceback still holds the layer: no collection closed it)
    assert len(closed) == 1
    ok = caffe.Net(_write(tmp_path, text.replace("2000000000", "1")), caffe.TEST)
    assert ok.forward()["x"].shape == (1, 3, 32, 32)
    for layer in ok.layers:
        if hasattr(layer, "close"):
            layer.close()


def test_python_layers_may_run_in_place_unless_their_class_says_not(tmp_path, monkeypatch):
    # Caffe runs a Python layer in place when asked (its code is the user's); a class may refuse
    (tmp_path / "inplace_user_layers.py").write_text(
        "import minicaffe as caffe\n"
        "class Double(caffe.Layer):\n"
        "    def reshape(self, bottom, top):\n"
        "        top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top):\n"
        "        top[0].data[...] = 2 * bottom[0].data\n"
        "class Strict(Double):\n"
        "    allows_in_place = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = IN_PLACE % 'type: "Python" python_param { module: "inplace_user_layers" layer: "%s" }'
    net = caffe.Net(_write(tmp_path, text % "Double"), caffe.TEST)
    net.blobs["x"].data[...] = 1.5
    assert (net.forward()["x"] == 3.0).all()
    with pytest.raises(NetError, match=r"layer 'bad' \(Python\): cannot compute in place"):
        caffe.Net(_write(tmp_path, text % "Strict"), caffe.TEST)


@pytest.mark.parametrize("dims, values", [((1, -3, -4, 1), 12), ((1, 2 ** 62, 4, 1), 0)])
def test_crafted_mean_file_shape_is_one_line(tmp_path, dims, values):
    from minicaffe.data import load_mean_file
    from minicaffe.errors import DataError
    from minicaffe.io import BlobProtoError
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend(dims)
    bp.data.extend([1.0] * values)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(bp.SerializeToString())
    with pytest.raises(DataError, match=rf"^{path}: BlobProto (shape .* has a negative|has 0 values)"):
        load_mean_file(str(path))
    with pytest.raises(BlobProtoError, match=r"negative dimension|0 data values"):
        caffe.io.blobproto_to_array(bp)


# --- errors at the boundary: bad input is one line, a bug keeps its traceback -----------------------

def test_a_bug_in_a_layers_setup_propagates_with_its_traceback(tmp_path, monkeypatch):
    # the net used to turn any ValueError/IndexError/TypeError from a layer's set-up into a one-line
    # "cannot set up" NetError, so a bug looked like bad input; now only the layer's own refusals
    # (NetError via self.error) are one line
    (tmp_path / "buggy_user_layers.py").write_text(
        "import minicaffe as caffe\n"
        "class Buggy(caffe.Layer):\n"
        "    def setup(self, bottom, top):\n"
        "        self.k = [1, 2][5]\n"
        "    def reshape(self, bottom, top):\n"
        "        top[0].reshape(*bottom[0].data.shape)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = ('layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "bug" type: "Python" bottom: "x" top: "y"\n'
            '  python_param { module: "buggy_user_layers" layer: "Buggy" } }\n')
    with pytest.raises(IndexError, match="list index out of range") as info:
        caffe.Net(_write(tmp_path, text), caffe.TEST)
    assert info.traceback[-1].path.name == "buggy_user_layers.py"      # where the bug is


def test_argmax_of_a_scalar_is_a_shape_error(tmp_path):
    text = ('layer { name: "s" type: "Input" top: "s" input_param { shape { } } }\n'
            'layer { name: "am" type: "ArgMax" bottom: "s" top: "i" }\n')
    with pytest.raises(ShapeError, match=r"net.prototxt: layer 'am' \(ArgMax\): needs a bottom with a batch axis"):
        caffe.Net(_write(tmp_path, text), caffe.TEST)
