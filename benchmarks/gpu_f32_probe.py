"""Where does float32 on the GPU drift from float64 more than float32 on the CPU does?

gpu_check's agreement section compares only a net's output, input gradient and parameter
gradients. This walks every blob of one net (data after forward, diff after backward), in net
order, and prints the blobs whose float32 GPU error (relative L2 against the float64 CPU result)
exceeds the CPU's float32 error by a factor: the first such blob names the layer whose kernel sums
in a less precise order. Usage: python benchmarks/gpu_f32_probe.py [--net googlenet] [--standin]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def run(net_name, batch, dtype64, seed=3):
    import numpy as np
    import minicaffe as caffe
    from minicaffe.core import backend
    from bench_nets import deploy_param, inputs
    from gpu_check import _Null, _random_weights
    param = deploy_param(net_name, batch)
    param.force_backward = True
    with (backend.float64_blobs() if dtype64 else _Null()):
        net = caffe.Net(param, caffe.TEST)
    _random_weights(net, seed)
    data, _ = inputs(net_name, batch, seed=seed)
    net.blobs[net.inputs[0]].data[...] = data
    net.forward()
    top = net.blobs[net.outputs[0]]
    top.diff[...] = np.random.default_rng(seed + 1).standard_normal(top.shape)
    net.backward()
    return [(name, b.data.astype(np.float64), b.diff.astype(np.float64)) for name, b in net.blobs.items()]


def main(argv=None):
    import numpy as np
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="googlenet")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--standin", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    from minicaffe.core import backend
    from gpu_check import cupy_module
    cupy_module(args.standin)
    runs = {}
    for mode, d64 in (("cpu", True), ("cpu", False), ("gpu", False)):
        backend.set_mode_gpu() if mode == "gpu" else backend.set_mode_cpu()
        runs[mode, d64] = run(args.net, args.batch, d64)
    backend.set_mode_cpu()

    def l2(ref, x):
        return float(np.linalg.norm(x - ref)) / (float(np.linalg.norm(ref)) or 1.0)

    rows = []
    for (name, d_ref, g_ref), (_, d_c, g_c), (_, d_g, g_g) in zip(runs["cpu", True], runs["cpu", False],
                                                                  runs["gpu", False]):
        rows.append({"blob": name, "data_cpu": l2(d_ref, d_c), "data_gpu": l2(d_ref, d_g),
                     "diff_cpu": l2(g_ref, g_c), "diff_gpu": l2(g_ref, g_g)})
    flagged = [r for r in rows if r["data_gpu"] > args.factor * r["data_cpu"] + 1e-6
               or r["diff_gpu"] > args.factor * r["diff_cpu"] + 1e-6]
    print(f"{args.net} batch {args.batch}: {len(flagged)} of {len(rows)} blobs where float32 on the GPU is "
          f">{args.factor}x further from float64 than on the CPU (data = forward, diff = backward)")
    for r in flagged[:40]:
        print(f"  {r['blob']:40s} data gpu/cpu {r['data_gpu']:.1e}/{r['data_cpu']:.1e}   "
              f"diff gpu/cpu {r['diff_gpu']:.1e}/{r['diff_cpu']:.1e}")
    if args.out:
        with open(os.path.join(args.out, f"f32_probe_{args.net}.json"), "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
