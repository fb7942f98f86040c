"""Runs under the REFERENCE Caffe's venv Python (never minicaffe's): one forward and one backward pass per
case with pycaffe, every blob's data and diff and every parameter's data and diff written to an .npz.

    python pycaffe_dump.py cases.json

cases.json: a list of {"net": prototxt, "weights": caffemodel, "inputs": npz, "out": npz, "passes": n}
(n forward + backward passes, default 1). The inputs .npz
holds ``data/<input blob>`` arrays and ``topdiff/<blob>`` arrays set as top diffs before the backward
pass (loss tops keep the loss weight Caffe put there). One process does every case, so pycaffe is
imported once.
"""
import json
import sys

import numpy as np

import caffe


def run(case):
    net = caffe.Net(case["net"], case["weights"], caffe.TRAIN)
    given = np.load(case["inputs"])
    for _ in range(case.get("passes", 1)):      # parameter diffs add up over passes, as in Caffe
        for key in given.files:
            kind, name = key.split("/", 1)
            if kind == "data":
                net.blobs[name].data[...] = given[key]
        net.forward()
        for key in given.files:
            kind, name = key.split("/", 1)
            if kind == "topdiff":
                net.blobs[name].diff[...] = given[key]
        net._backward(len(net.layers) - 1, 0)
    out = {}
    for name, blob in net.blobs.items():
        out[f"data/{name}"] = blob.data.copy()
        out[f"diff/{name}"] = blob.diff.copy()
    for name, blobs in net.params.items():
        for k, blob in enumerate(blobs):
            out[f"pdata/{name}/{k}"] = blob.data.copy()
            out[f"pdiff/{name}/{k}"] = blob.diff.copy()
    np.savez(case["out"], **out)


def main():
    caffe.set_mode_cpu()
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        run(case)


if __name__ == "__main__":
    main()
