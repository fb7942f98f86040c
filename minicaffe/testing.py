"""Helpers for layer tests: build one layer from prototxt text and check its gradients numerically."""
import numpy as np
from google.protobuf import text_format

from .core import backend
from .core.blob import Blob
from .layers import create_layer
from .proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def layer_param(text):
    """A LayerParameter from prototxt text such as ``'type: "ReLU" relu_param { negative_slope: 0.1 }'``."""
    param = caffe_pb2.LayerParameter()
    text_format.Merge(text, param)
    if not param.name:
        param.name = "test_layer"
    return param


def make_layer(text, bottoms, num_top=1, phase=TRAIN, in_place=False):
    """Build a layer with bottom blobs holding ``bottoms`` (arrays); returns (layer, bottom, top).

    ``in_place=True`` makes top[0] the same Blob as bottom[0], as a prototxt with top == bottom would.
    """
    param = layer_param(text)
    layer = create_layer(param, phase)
    bottom = []
    for i, arr in enumerate(bottoms):
        b = Blob(np.shape(arr), name=f"bottom{i}")
        b.data[...] = arr
        bottom.append(b)
    top = [bottom[0] if (in_place and i == 0) else Blob(name=f"top{i}") for i in range(num_top)]
    layer.check_blob_counts(bottom, top)
    layer.setup(bottom, top)
    layer.param_propagate_down = [True] * len(layer.blobs)
    layer.reshape(bottom, top)
    return layer, bottom, top


def forward(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


def check_gradient(text, bottoms, check_bottom=None, num_top=1, phase=TRAIN, eps=1e-4, rtol=1e-3,
                   atol=1e-5, seed=1701, setup_hook=None, top_weights=None, check_params=True):
    """Compare backward() with central differences in float64, as Caffe's GradientChecker does.

    The objective is ``sum_i <w_i, top_i>`` with fixed random weights ``w_i`` so every top element
    contributes. ``check_bottom``: indices of bottoms to check (default all). Random layers (dropout)
    are re-seeded before every forward so the numerical and analytic passes see the same mask.
    Returns the largest relative error seen; raises AssertionError with the place of a mismatch.
    """
    with backend.float64_blobs():
        backend.set_random_seed(seed)
        layer, bottom, top = make_layer(text, [np.asarray(b, np.float64) for b in bottoms], num_top, phase)
        if setup_hook:
            setup_hook(layer, bottom, top)
        rs = np.random.RandomState(seed)

        def run():
            backend.set_random_seed(seed)
            layer.reshape(bottom, top)
            layer.forward(bottom, top)

        run()
        if top_weights is None:
            top_weights = [rs.uniform(-1, 1, t.shape) for t in top]

        def objective():
            run()
            return sum(float(np.sum(w * t.data)) for w, t in zip(top_weights, top))

        run()
        for b in layer.blobs:
            b.diff[...] = 0
        for w, t in zip(top_weights, top):
            t.diff[...] = w
        check_bottom = range(len(bottom)) if check_bottom is None else check_bottom
        propagate = [i in check_bottom for i in range(len(bottom))]
        layer.backward(top, propagate, bottom)
        analytic = [(f"bottom[{i}]", bottom[i], bottom[i].diff.copy()) for i in check_bottom]
        if check_params:
            analytic += [(f"param[{k}]", b, b.diff.copy()) for k, b in enumerate(layer.blobs)]
        worst = 0.0
        for where, blob, grad in analytic:
            data = blob.data
            flat = data.reshape(-1)
            gflat = grad.reshape(-1)
            for idx in range(flat.size):
                orig = flat[idx]
                flat[idx] = orig + eps
                plus = objective()
                flat = blob.data.reshape(-1)
                flat[idx] = orig - eps
                minus = objective()
                flat = blob.data.reshape(-1)
                flat[idx] = orig
                numeric = (plus - minus) / (2 * eps)
                err = abs(numeric - gflat[idx])
                scale = max(abs(numeric), abs(gflat[idx]), 1.0)
                worst = max(worst, err / scale)
                if err > atol + rtol * scale:
                    raise AssertionError(f"{layer.type} gradient mismatch at {where} index {idx}: "
                                         f"analytic {gflat[idx]:.6g} vs numeric {numeric:.6g}")
        return worst
