"""coord_map: (axis, scale, offset) through conv/pool/deconv chains, and Crop layers from crop()."""
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.coord_map import CoordMapError, CropError, coord_map_from_to, crop
from minicaffe.net_spec import NetSpec, layers as L, params as P


def conv_pool_deconv(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0, size=100):
    """data → conv(ks, stride, pad) → max pool(pool, pool) → deconv(2·dstride, dstride, dpad)."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, size, size]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool)
    dks = [2 * s for s in dstride] if isinstance(dstride, list) else 2 * dstride
    n.deconv = L.Deconvolution(n.pool, num_output=2, kernel_size=dks, stride=dstride, pad=dpad)
    return n


def test_identity_for_matching_pool_and_deconv():
    # conv 3x3 pad 0 shifts by -1, pool 2 and deconv 2 (k=4) cancel except the conv shift:
    # deconv→data: scale 1, offset 0 (pycaffe's reference case)
    n = conv_pool_deconv()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and a == 1 and b == 0
    # 4x pool with 4x deconv (k=8): shift of -1
    n = conv_pool_deconv(pool=4, dstride=4)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and a == 1 and b == -1


def test_hand_computed_single_layers():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 32, 32]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=5, stride=2, pad=1, dilation=2)
    # effective kernel (5-1)*2+1 = 9; data→conv: scale 1/2, shift (1 - 4)/2 = -1.5
    ax, a, b = coord_map_from_to(n.data, n.conv)
    assert ax == 1 and a == pytest.approx(0.5) and b == pytest.approx(-1.5)
    # the inverse direction: conv→data scale 2, shift 3
    ax, a, b = coord_map_from_to(n.conv, n.data)
    assert a == pytest.approx(2.0) and b == pytest.approx(3.0)


def test_params_given_as_messages_or_legacy_h_w():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 32, 32]))
    n.conv = L.Convolution(n.data, convolution_param=dict(num_output=1, kernel_size=3, stride=2, pad=2))
    n.pool = L.Pooling(n.conv, pooling_param=dict(pool=P.Pooling.AVE, kernel_size=3, stride=1))
    # conv k3 s2 p2: scale 1/2, shift (2 - 1)/2 = 0.5; pool k3 s1 p0: scale 1, shift -1; composed: 1/2, 0.5 - 1
    ax, a, b = coord_map_from_to(n.data, n.pool)
    assert ax == 1 and a == pytest.approx(0.5) and b == pytest.approx(0.5 - 1)
    n.hw = L.Convolution(n.data, num_output=1, kernel_h=3, kernel_w=5, pad_h=1, pad_w=0)
    ax, a, b = coord_map_from_to(n.data, n.hw)
    np.testing.assert_allclose(a, [1, 1])
    np.testing.assert_allclose(b, [0, -2])
    n.glob = L.Pooling(n.conv, pool=P.Pooling.AVE, global_pooling=True)
    with pytest.raises(CoordMapError):
        coord_map_from_to(n.glob, n.data)


def test_padding_moves_the_offset():
    base = coord_map_from_to(*(lambda n: (n.deconv, n.data))(conv_pool_deconv()))[2]
    for pad in (1, 5):
        n = conv_pool_deconv(pad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == base - pad
        n = conv_pool_deconv(dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == base + pad
        n = conv_pool_deconv(pad=pad, dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == base


def test_pass_through_and_rectangular_kernels():
    n = conv_pool_deconv()
    ref = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.one = L.Convolution(n.relu, num_output=2, kernel_size=1)
    for top in (n.relu, n.one):
        assert coord_map_from_to(top, n.data) == ref
    n3 = conv_pool_deconv(ks=3, stride=1, pad=0)
    n5 = conv_pool_deconv(ks=5, stride=2, pad=10)
    rect = conv_pool_deconv(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    _, a3, b3 = coord_map_from_to(n3.deconv, n3.data)
    _, a5, b5 = coord_map_from_to(n5.deconv, n5.data)
    _, ar, br = coord_map_from_to(rect.deconv, rect.data)
    np.testing.assert_allclose(ar, [a3[0], a5[0]])
    np.testing.assert_allclose(br, [b3[0], b5[0]])


def test_crop_of_crop_and_crop_helper_builds_a_working_net():
    n = conv_pool_deconv(pad=0, dpad=0, size=20)
    _, _, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=3)
    assert coord_map_from_to(n.crop, n.data)[2] == b + 3

    # FCN-style: upsampled scores larger than the input, crop() computes the offset
    n = conv_pool_deconv(ks=3, pad=10, size=20)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert a == 1 and b == -10
    n.score = crop(n.deconv, n.data)
    proto = n.to_proto()
    layer = proto.layer[-1]
    assert layer.type == "Crop" and list(layer.bottom) == ["deconv", "data"]
    assert layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [10]
    net = caffe.Net(str(proto), caffe.TEST)
    net.forward()
    assert net.blobs["score"].data.shape == (1, 2, 20, 20)


def test_errors():
    n = conv_pool_deconv()
    n.ip = L.InnerProduct(n.deconv, num_output=3)
    with pytest.raises(CoordMapError, match="not connected by spatial layers"):
        coord_map_from_to(n.ip, n.data)
    with pytest.raises(CropError, match="scale mismatch"):
        n = conv_pool_deconv(pool=3, dstride=2)
        crop(n.deconv, n.data)
    with pytest.raises(CropError, match="negative offset"):
        n = conv_pool_deconv(dpad=10)
        crop(n.deconv, n.data)
    # pycaffe's exception kinds still catch them
    assert issubclass(CoordMapError, RuntimeError) and issubclass(CropError, AssertionError)
