"""The binary bad inputs (weights, snapshots, mean files, LMDBs, images), made at test time from valid
ones so the corpus stays a set of small text files; ``build(dest)`` writes them all under ``dest``."""
import json
import os

import lmdb
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

IP_NET = os.path.join(HERE, "net", "ip.prototxt")

# same layer names as net/ip.prototxt, other sizes or blob counts
IP_WIDER_INPUT = """name: "ipnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" inner_product_param { num_output: 2 } }
"""
IP_NO_BIAS = IP_WIDER_INPUT.replace("dim: 5", "dim: 3").replace(
    "num_output: 2 }", "num_output: 2 bias_term: false }")
OTHER_NET = """name: "convnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 5 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 3 } }
"""
SOLVER = 'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\nsnapshot_prefix: "{prefix}"\ntype: "{type}"\n'


def _net(text_or_path):
    from minicaffe.net.network import Net, TRAIN
    return Net(text_or_path, TRAIN)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _datum(c=3, h=8, w=8, data=None, **fields):
    from minicaffe.proto import caffe_pb2
    d = caffe_pb2.Datum(channels=c, height=h, width=w, label=fields.pop("label", 0), **fields)
    d.data = bytes(range(c * h * w)) if data is None else data
    return d.SerializeToString()


def _lmdb(path, records):
    env = lmdb.open(path, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()


def _snapshot(dest, name, solver_type):
    """A real .caffemodel/.solverstate pair from one iteration of net/ip.prototxt."""
    from minicaffe.solvers.solver import get_solver
    text = SOLVER.format(net=IP_NET, prefix=os.path.join(dest, name), type=solver_type)
    solver = get_solver(text)
    solver.step(1)
    return solver.snapshot()


def build(dest):
    import cv2
    from minicaffe.proto import caffe_pb2
    os.makedirs(dest, exist_ok=True)
    j = lambda name: os.path.join(dest, name)  # noqa: E731

    # weights
    net = _net(IP_NET)
    net.save(j("ip.caffemodel"))
    good = open(j("ip.caffemodel"), "rb").read()
    _write(j("truncated.caffemodel"), good[:len(good) // 2])
    noise = np.random.default_rng(0).integers(0, 256, 200, np.uint8).tobytes()
    _write(j("garbage.caffemodel"), b"\x89HDF\r\n\x1a\n" + noise)     # an HDF5 signature, then noise
    _write(j("empty.caffemodel"), b"")
    _write(j("text.caffemodel"), open(IP_NET, "rb").read())
    _net(IP_WIDER_INPUT).save(j("ip_wider_input.caffemodel"))
    _net(IP_NO_BIAS).save(j("ip_no_bias.caffemodel"))
    _net(OTHER_NET).save(j("other_net.caffemodel"))
    _write(j("garbage.h5"), b"not an HDF5 file at all" * 4)
    try:
        import h5py
        with h5py.File(j("nodata.h5"), "w") as h5:
            h5.create_dataset("something", data=np.zeros(3))
    except ImportError:
        pass

    # solver states
    _model, state = _snapshot(dest, "sgd", "SGD")
    raw = open(state, "rb").read()
    _write(j("truncated.solverstate"), raw[:len(raw) - 7])
    _snapshot(dest, "adam", "Adam")       # two history sets: does not fit an SGD solver
    _write(j("garbage.solverstate"), np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes())
    _write(j("solver.prototxt"), SOLVER.format(net=IP_NET, prefix=j("resumed"), type="SGD").encode())
    _snapshot(dest, "nesterov", "Nesterov")     # as many history blobs as SGD: only the sidecar tells
    _write(j("sidecar_iter.solverstate"), raw)           # beside the sidecar of another iteration
    side = json.loads(open(state + ".rng", encoding="utf-8").read())
    side["iter"] = 7
    _write(j("sidecar_iter.solverstate.rng"), json.dumps(side).encode())
    _write(j("sidecar_deep.solverstate"), raw)           # beside a sidecar nested too deeply
    _write(j("sidecar_deep.solverstate.rng"), b"[" * 100000 + b"]" * 100000)

    # mean files (3x8x8 images in the LMDBs below)
    mean = caffe_pb2.BlobProto(num=1, channels=3, height=8, width=8)
    mean.data.extend([1.0] * 192)
    ok_mean = mean.SerializeToString()
    _write(j("mean_ok.binaryproto"), ok_mean)
    _write(j("mean_truncated.binaryproto"), ok_mean[:len(ok_mean) - 5])
    _write(j("mean_wrongtype.binaryproto"), raw)          # a solver state where a BlobProto belongs
    small = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=4)
    small.data.extend([1.0] * 48)
    _write(j("mean_shape.binaryproto"), small.SerializeToString())

    # LMDBs
    _lmdb(j("ok_lmdb"), [(b"00000000_a", _datum()), (b"00000001_b", _datum(label=1))])
    _lmdb(j("nodatum_lmdb"), [(b"00000000_a", _datum()), (b"00000001_junk", b"\xff\xfe\xfd not a datum \x00\x07")])
    _lmdb(j("badlen_lmdb"), [(b"00000000_short", _datum(data=bytes(100)))])
    _lmdb(j("notimage_lmdb"), [(b"00000000_fake.jpg", _datum(data=b"this is not a JPEG", encoded=True))])
    _lmdb(j("zeroshape_lmdb"), [(b"00000000_flat", _datum(c=0, data=b""))])
    _lmdb(j("mixed_lmdb"), [(b"00000000_a", _datum()), (b"00000001_big", _datum(h=9))])
    _lmdb(j("empty_lmdb"), [])
    _lmdb(j("solverstate_lmdb"), [(b"00000000_state", raw)])
    os.makedirs(j("not_an_lmdb"), exist_ok=True)
    _write(j("not_an_lmdb/readme.txt"), b"hello\n")
    os.makedirs(j("garbage_lmdb"), exist_ok=True)
    _write(j("garbage_lmdb/data.mdb"), b"\x00" * 100)

    # images for convert_imageset
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    cv2.imwrite(j("ok.png"), img)
    cv2.imwrite(j("wide.png"), np.concatenate([img, img], axis=1))
    _write(j("broken.png"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    os.makedirs(j("existing_db"), exist_ok=True)
    return dest


if __name__ == "__main__":
    import sys
    print(build(sys.argv[1] if len(sys.argv) > 1 else "g"))
