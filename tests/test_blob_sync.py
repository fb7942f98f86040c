"""Blob host/device sync: engine reads keep the device copy valid; pycaffe writes reach the device.

A tiny counting fake of CuPy's array module stands in for the GPU here (only what Blob uses:
``asarray`` uploads, ``.get()`` downloads), so the number of copies each access pattern costs is
checked exactly.
"""
import numpy as np
import pytest

from minicaffe.core import backend, context
from minicaffe.core.blob import Blob


class _Dev:
    """A 'device' array: a NumPy array that is not an ndarray, so backend.to_host must .get() it."""

    def __init__(self, arr, counter):
        self.a, self.counter = np.array(arr), counter

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)

    def get(self):
        self.counter["down"] += 1
        return self.a.copy()

    def __setitem__(self, key, value):
        self.a[key] = value.a if isinstance(value, _Dev) else value


class _FakeCupy:
    def __init__(self):
        self.counter = {"up": 0, "down": 0}

    def asarray(self, arr):
        self.counter["up"] += 1
        return _Dev(arr, self.counter)


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setattr(context.current(), "cupy", fake)
    monkeypatch.setattr(context.current(), "mode", "gpu")
    return fake.counter


def test_engine_reads_do_not_reupload(fake_gpu):
    b = Blob((2, 3))
    b.data[...] = np.arange(6).reshape(2, 3)       # pycaffe write
    b.xdata                                          # a layer reads it: one upload
    assert fake_gpu == {"up": 1, "down": 0}
    b.xdata[...] = 7                                 # a layer writes on the device
    for _ in range(3):                               # the display reads the value three times
        assert b.host_data.sum() == 42
    assert fake_gpu == {"up": 1, "down": 1}          # one download, no upload
    for _ in range(3):                               # each layer use may write on the device, so
        b.xdata                                      # each later host read downloads again, but
        assert b.host_data.sum() == 42               # nothing is ever uploaded again
    assert fake_gpu == {"up": 1, "down": 4}


def test_host_data_is_read_only(fake_gpu):
    b = Blob((4,))
    b.xdata
    with pytest.raises(ValueError):
        b.host_data[0] = 1.0


def test_pycaffe_write_after_a_read_reaches_the_device(fake_gpu):
    b = Blob((2, 2))
    b.xdata[...] = 1.0
    assert float(b.host_data.sum()) == 4.0           # SYNCED now
    b.data[...] = 5.0                                # the user's write through .data[...]
    assert float(b.xdata.a.sum()) == 20.0            # the device sees it: re-uploaded
    assert fake_gpu["up"] == 2
    arr = b.data                                     # hold on to the array, write later
    arr[0, 0] = 9.0
    assert float(b.xdata.a[0, 0]) == 9.0


def test_diff_follows_the_same_rule(fake_gpu):
    b = Blob((3,))
    b.xdiff[...] = 2.0
    assert b.host_diff.tolist() == [2.0, 2.0, 2.0]
    b.xdiff
    assert fake_gpu["up"] == 1
    b.diff[...] = 3.0
    assert b.xdiff.a.tolist() == [3.0, 3.0, 3.0]
    assert fake_gpu["up"] == 2


def test_cpu_mode_host_data_sees_layer_writes():
    b = Blob((3,))
    b.xdata[...] = 4.0
    assert b.host_data.tolist() == [4.0, 4.0, 4.0]
    b.data[...] = 1.0
    assert b.xdata.tolist() == [1.0, 1.0, 1.0]


def test_sync_rule_on_the_gpu_backend(gpu, monkeypatch):
    """The same rule with the real GPU module (or the suite's CuPy stand-in): uploads counted at
    ``backend.to_device``, which every host-to-device copy of a blob goes through."""
    ups = []
    real = backend.to_device
    monkeypatch.setattr(backend, "to_device", lambda arr: ups.append(1) or real(arr))
    xp = backend.xp()
    b = Blob((2, 3))
    b.xdata = xp.full((2, 3), 2.0, dtype=np.float32)      # a layer's output, on the device
    assert b.host_data.sum() == 12.0                       # the display reads it
    b.xdata += 1.0                                         # the next layer uses the device copy
    assert not ups
    b.data[...] = 5.0                                      # pycaffe's write
    assert float(b.xdata.sum()) == 30.0 and len(ups) == 1
