"""Property-based fuzzing of the readers of untrusted files: the prototxt parser, the caffemodel
reader and the Datum decoder. Any input gives a result or a MinicaffeError, never another exception
or a hang. The CI budget is small (200 examples per target); ``--runslow`` runs 20000 per target and
MINICAFFE_FUZZ_EXAMPLES=N sets any other count. MINICAFFE_FUZZ_REPORT=path appends the counts run."""
import contextlib
import json
import os
import re
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicaffe.formats.datum import datum_to_array, parse_datum
from minicaffe.errors import MinicaffeError
from minicaffe.net.network import TRAIN, Net
from minicaffe.proto import caffe_pb2
from minicaffe.formats.prototxt import parse_binary, parse_text, upgrade_net

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # protobuf on odd escapes

HANG_SECONDS = 10      # one example taking this long counts as a hang

NET_TEXT = """name: "fuzz"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  include { phase: TRAIN } loss_weight: 1 }
"""
SOLVER_TEXT = """net: "train.prototxt"
test_iter: 10
test_interval: 100
base_lr: 0.01
momentum: 0.9
lr_policy: "step"
stepsize: 1000
gamma: 0.1
max_iter: 2000
snapshot: 500
snapshot_prefix: "snap/fuzz"
solver_mode: CPU
type: "Nesterov"
"""
TOKENS = ["layer", "layers", "name", "type", "bottom", "top", "{", "}", "<", ">", ":", '"', "'", "#", "\n",
          " ", "input", "input_dim", "num_output", "kernel_size", "convolution_param", "include",
          "phase", "TRAIN", "MAX", "1", "-1", "3.5", "1e40", "nan", "inf", "true", "\\", "[", "]", ",",
          "0x1F", "INNER_PRODUCT", "base_lr", "net_param", "blobs", "data", "shape", "dim", "\x00", "é"]


def budget(request):
    env = os.environ.get("MINICAFFE_FUZZ_EXAMPLES")
    if env:
        return int(env)
    return 20000 if request.config.getoption("--runslow") else 200


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def no_hang(seconds=HANG_SECONDS):
    """An example still running after ``seconds`` fails instead of hanging the suite."""
    def alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def mutations(seed):
    """Byte strings made from ``seed``: truncated, bytes flipped/inserted/deleted, or spliced."""
    n = len(seed)

    @st.composite
    def mutate(draw):
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["cut", "flip", "insert", "delete", "splice", "varint"]))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            if kind == "cut":
                del data[pos:]
            elif kind == "flip" and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[pos:pos + draw(st.integers(1, 8))]
            elif kind == "splice":
                start = draw(st.integers(0, n))
                data[pos:pos] = seed[start:start + draw(st.integers(1, 64))]
            elif kind == "varint":     # a huge length or count where a small one was
                data[pos:pos] = b"\xff\xff\xff\xff\x0f"
        return bytes(data)
    return st.one_of(st.binary(max_size=512), mutate())


def text_mutations(seed):
    @st.composite
    def mutate(draw):
        text = seed
        for _ in range(draw(st.integers(1, 5))):
            pos = draw(st.integers(0, len(text)))
            kind = draw(st.sampled_from(["insert", "delete", "cut", "replace"]))
            if kind == "insert":
                text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
            elif kind == "delete":
                text = text[:pos] + text[pos + draw(st.integers(1, 10)):]
            elif kind == "cut":
                text = text[:pos]
            else:
                text = text[:pos] + draw(st.text(max_size=6)) + text[pos + 1:]
        return text
    random_tokens = st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join)
    return st.one_of(st.text(max_size=200), random_tokens, mutate())


COUNTS = {}


def record(target, n):
    COUNTS[target] = COUNTS.get(target, 0) + n
    report = os.environ.get("MINICAFFE_FUZZ_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"target": target, "examples": n}) + "\n")


def run(request, target, strategy, check):
    count = [0]

    @fuzz_settings(budget(request))
    @given(strategy)
    def prop(value):
        count[0] += 1
        with no_hang():
            try:
                check(value)
            except MinicaffeError:
                pass

    prop()
    record(target, count[0])
    assert count[0] >= min(budget(request), 50)


# --- targets ----------------------------------------------------------------------------------------

def check_net_text(text):
    param = parse_text(text, caffe_pb2.NetParameter(), "fuzz.prototxt")
    upgrade_net(param, "fuzz.prototxt")


def check_solver_text(text):
    parse_text(text, caffe_pb2.SolverParameter(), "fuzz_solver.prototxt")


def test_fuzz_net_prototxt(request):
    run(request, "prototxt → NetParameter", text_mutations(NET_TEXT), check_net_text)


def test_fuzz_solver_prototxt(request):
    run(request, "prototxt → SolverParameter", text_mutations(SOLVER_TEXT), check_solver_text)


@pytest.fixture(scope="module")
def weights_net(tmp_path_factory):
    net = Net(NET_TEXT.replace('bottom: "label" ', "").replace("SoftmaxWithLoss", "Softmax")
              .replace("loss_weight: 1 ", ""), TRAIN)
    path = tmp_path_factory.mktemp("fuzz") / "seed.caffemodel"
    net.save(str(path))
    return net, path.read_bytes()


def test_fuzz_caffemodel(request, weights_net, tmp_path):
    net, seed = weights_net
    path = str(tmp_path / "fuzz.caffemodel")

    def check(data):
        with open(path, "wb") as f:
            f.write(data)
        net.copy_from(path)
        for blob in net.learnable_params:      # what was copied fits the net
            assert blob.data.shape == blob.shape

    run(request, "bytes → Net.copy_from (caffemodel)", mutations(seed), check)


def test_fuzz_caffemodel_in_memory(request, weights_net):
    """parse_binary + upgrade + copy_from_proto without the file: V1 layers and odd blob shapes too."""
    net, seed = weights_net
    v1 = caffe_pb2.NetParameter(name="v1")
    old = v1.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, bottom=["pool"], top=["ip"])
    old.blobs.add(num=1, channels=1, height=3, width=8).data.extend([0.5] * 24)
    old.blobs.add(num=1, channels=1, height=1, width=3).data.extend([0.1] * 3)

    def check(data):
        source = parse_binary(data, caffe_pb2.NetParameter(), "mem.caffemodel")
        upgrade_net(source, "mem.caffemodel")
        net.copy_from_proto(source, "mem.caffemodel")

    strategy = st.one_of(mutations(seed), mutations(v1.SerializeToString()))
    run(request, "bytes → parse_binary/upgrade/copy_from_proto", strategy, check)


def datum_seeds():
    raw = caffe_pb2.Datum(channels=3, height=4, width=5, label=2, data=bytes(range(60))).SerializeToString()
    flt = caffe_pb2.Datum(channels=1, height=2, width=3, float_data=[0.5] * 6).SerializeToString()
    import cv2
    ok, png = cv2.imencode(".png", np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    enc = caffe_pb2.Datum(data=png.tobytes(), encoded=True, label=1).SerializeToString()
    return raw, flt, enc


def test_fuzz_datum(request):
    def check(data):
        datum = parse_datum(data, "db: record 'fuzz'")
        arr = datum_to_array(datum, where="db: record 'fuzz'")
        assert arr.ndim == 3 and arr.size > 0

    strategy = st.one_of(*[mutations(s) for s in datum_seeds()])
    run(request, "bytes → Datum → array", strategy, check)


@pytest.mark.parametrize("data, field", [
    (b"\x1a\x02\x00\x80", "input"),                      # NetParameter.input (#3), repeated
    (b"\x0a\x02\x00\x80", "name"),                       # NetParameter.name (#1)
    # layer (#100) { bottom (#3): invalid }: a nested repeated string
    (b"\xa2\x06\x04\x1a\x02\x00\x80", "layer[0].bottom"),
])
def test_invalid_utf8_strings_are_a_parse_error(data, field):
    """Found by the long fuzz run: protobuf accepts such bytes and fails only when the field is
    read (a UnicodeDecodeError deep in the net upgrade); they are now refused when parsed."""
    with pytest.raises(MinicaffeError, match=rf"mem.caffemodel: .*field '{re.escape(field)}' is not UTF-8"):
        parse_binary(data, caffe_pb2.NetParameter(), "mem.caffemodel")
