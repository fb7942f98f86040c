"""Every deploy net in models/ builds and gives the blob shapes of SPEC.md (the papers' Table 1)."""
import glob
import os

import numpy as np
import pytest

import minicaffe as caffe

ROOT = os.path.join(os.path.dirname(__file__), "..", "models")


def deploy(name):
    return os.path.join(ROOT, name, "deploy.prototxt")


def shapes(net):
    return {name: blob.shape for name, blob in net.blobs.items()}


def test_vgg16_shapes_match_the_paper():
    net = caffe.Net(deploy("vgg/vgg_d"), caffe.TEST)
    s = shapes(net)
    assert s["data"] == (10, 3, 224, 224)
    assert s["conv1_2"] == (10, 64, 224, 224)
    assert s["pool1"] == (10, 64, 112, 112)
    assert s["pool2"] == (10, 128, 56, 56)
    assert s["pool3"] == (10, 256, 28, 28)
    assert s["pool4"] == (10, 512, 14, 14)
    assert s["pool5"] == (10, 512, 7, 7)
    assert s["fc6"] == s["fc7"] == (10, 4096)
    assert s["fc8"] == s["prob"] == (10, 1000)
    n_params = sum(b.count for blobs in net.params.values() for b in blobs)
    assert n_params == 138_357_544


@pytest.mark.parametrize("config,weight_layers,n_params", [
    ("vgg_a", 11, 132_863_336), ("vgg_a_lrn", 11, 132_863_336), ("vgg_b", 13, 133_047_848),
    ("vgg_c", 16, 133_638_952), ("vgg_d", 16, 138_357_544), ("vgg_e", 19, 143_667_240)])
def test_every_vgg_configuration_builds(config, weight_layers, n_params):
    net = caffe.Net(deploy(f"vgg/{config}"), caffe.TEST)
    weighted = [n for n, l in net.layer_dict.items() if l.type in ("Convolution", "InnerProduct")]
    assert len(weighted) == weight_layers
    assert sum(b.count for blobs in net.params.values() for b in blobs) == n_params
    assert net.blobs["pool5"].shape == (10, 512, 7, 7)
    assert net.blobs["prob"].shape == (10, 1000)


def test_googlenet_shapes():
    net = caffe.Net(deploy("googlenet"), caffe.TEST)
    s = shapes(net)
    n = s["data"][0]
    assert s["conv1/7x7_s2"] == (n, 64, 112, 112)
    assert s["pool1/3x3_s2"] == (n, 64, 56, 56)
    assert s["conv2/3x3"] == (n, 192, 56, 56)
    assert s["pool2/3x3_s2"] == (n, 192, 28, 28)
    expected = {"3a": (256, 28), "3b": (480, 28), "4a": (512, 14), "4b": (512, 14), "4c": (512, 14),
                "4d": (528, 14), "4e": (832, 14), "5a": (832, 7), "5b": (1024, 7)}
    for module, (c, hw) in expected.items():
        assert s[f"inception_{module}/output"] == (n, c, hw, hw), module
    assert s["pool3/3x3_s2"] == (n, 480, 14, 14)
    assert s["pool4/3x3_s2"] == (n, 832, 7, 7)
    assert s["pool5/7x7_s1"] == (n, 1024, 1, 1)
    assert s["prob"] == (n, 1000)


@pytest.mark.parametrize("name", ["alexnet", "caffenet"])
def test_alexnet_family_shapes(name):
    net = caffe.Net(deploy(name), caffe.TEST)
    s = shapes(net)
    n = s["data"][0]
    assert s["data"][1:] == (3, 227, 227)
    assert s["conv1"] == (n, 96, 55, 55)
    assert s["pool1"] == (n, 96, 27, 27)
    assert s["conv2"] == (n, 256, 27, 27)
    assert s["pool2"] == (n, 256, 13, 13)
    assert s["conv5"] == (n, 256, 13, 13)
    assert s["pool5"] == (n, 256, 6, 6)
    assert s["fc8"] == (n, 1000)
    assert sum(b.count for blobs in net.params.values() for b in blobs) == 60_965_224


def test_lenet_shapes_and_forward():
    net = caffe.Net(deploy("lenet"), caffe.TEST)
    s = shapes(net)
    n = s["data"][0]
    assert s["conv1"] == (n, 20, 24, 24)
    assert s["pool1"] == (n, 20, 12, 12)
    assert s["conv2"] == (n, 50, 8, 8)
    assert s["pool2"] == (n, 50, 4, 4)
    assert s["ip1"] == (n, 500)
    net.blobs["data"].data[...] = np.random.default_rng(0).random(s["data"])
    out = net.forward()
    prob = out[net.outputs[0]]
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "**", "*.prototxt"), recursive=True)))
def test_every_model_file_parses(path):
    from minicaffe.formats.prototxt import load_net_param, load_solver_param
    if "solver" in os.path.basename(path):
        assert load_solver_param(path).base_lr > 0
    else:
        assert len(load_net_param(path).layer) > 0
