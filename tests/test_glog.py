"""Logging as Caffe's: Net::Init's lines while a net is built, and glog's environment variables
(GLOG_minloglevel, GLOG_logtostderr, GLOG_log_dir) for the command-line tools."""
import os
import re
import subprocess
import sys

import pytest

import minicaffe as caffe
from minicaffe.tools.common import glog_settings

from reference_bins import reference_tool

NET = """
name: "lognet"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { name: "shared_w" } convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "conv_b" type: "Convolution" bottom: "data" top: "conv_b"
  param { name: "shared_w" } convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "conv_b" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "lvl" type: "ReLU" bottom: "ip" top: "lvl" include { min_level: 1 } }
"""

STRIP = re.compile(r"^[IWEF]\d{4,8} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ", re.M)


def net_init_lines(text):
    """The glog messages from the first NetState line (or 'Initializing net') to 'Network
    initialization done.', without the prototxt dump (its text form differs in float style)."""
    msgs = [STRIP.sub("", line) for line in text.splitlines() if STRIP.match(line)]
    start = next(i for i, m in enumerate(msgs) if m.startswith(("The NetState", "Initializing net")))
    end = msgs.index("Network initialization done.")
    return msgs[start:end + 1]


def test_net_init_lines_as_caffe(tmp_path, log_text):
    (tmp_path / "net.prototxt").write_text(NET)
    caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    dump = ("  ", "name:", "layer", "}", "state", "input:")       # the prototxt printed by 'Initializing'
    lines = [line for line in log_text.getvalue().splitlines()
             if not line.startswith(dump) or line.startswith("    with loss weight")]
    text = "\n".join(lines)
    for expect in [
        "The NetState phase (0) differed from the phase (1) specified by a rule in layer acc",
        "The NetState level (0) is above the min_level (1) specified by a rule in layer lvl",
        "Initializing net from parameters: ",
        "Creating layer data\nCreating Layer data\ndata -> data\ndata -> label\nSetting up data\n"
        "Top shape: 2 3 4 4 (96)\nTop shape: 2 (2)\nMemory required for data: 392",
        "Creating layer relu\nCreating Layer relu\nrelu <- conv\nrelu -> conv (in-place)\nSetting up relu\n"
        "Top shape: 2 2 2 2 (16)\nMemory required for data: ",
        "Sharing parameters 'shared_w' owned by layer 'conv', param index 0",
        "data_data_0_split -> data_data_0_split_0\ndata_data_0_split -> data_data_0_split_1",
        "Setting up loss\nTop shape: (1)\n    with loss weight 2\nMemory required for data: ",
        "loss needs backward computation.\nip needs backward computation.",
        "data does not need backward computation.\nThis network produces output loss\n"
        "Network initialization done.",
    ]:
        assert expect in text, f"missing:\n{expect}\n--- in ---\n{text}"
    # the prototxt dump is the filtered net in text form, whole numbers without '.0'
    assert "loss_weight: 2\n" in log_text.getvalue() and "loss_weight: 2.0" not in log_text.getvalue()


def test_net_init_lines_match_caffes_for_lenet(tmp_path):
    """minicaffe's Net::Init lines against the reference ``caffe time`` on the same net, line for line."""
    caffe_bin = reference_tool("caffe")
    model = tmp_path / "net.prototxt"
    model.write_text(NET.replace('include { min_level: 1 }', ''))
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    ref = subprocess.run([caffe_bin, "time", "--model", str(model), "--iterations", "1"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert ref.returncode == 0, ref.stderr[-2000:]
    mine = subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "time", "--model", str(model),
                           "--iterations", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert mine.returncode == 0, mine.stderr[-2000:]

    assert net_init_lines(mine.stderr) == net_init_lines(ref.stderr)


def test_construction_lines_in_caffes_order(tmp_path, log_text):
    """Lines Caffe logs from inside a layer, where Caffe logs them: the Data layer opens its database in
    its constructor ("Opened lmdb" before "Creating Layer"), SoftmaxWithLoss and Scale with a bias make
    their inner Softmax/Bias through the layer factory (a second "Creating layer <name>" in setup)."""
    from minicaffe.formats.datum import array_to_datum
    import lmdb
    import numpy as np
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", array_to_datum(np.zeros((1, 2, 2), np.uint8), 1).SerializeToString())
    env.close()
    (tmp_path / "net.prototxt").write_text(f"""
layer {{ name: "d" type: "Data" top: "data" top: "label"
  data_param {{ source: "{tmp_path / 'db'}" batch_size: 2 backend: LMDB }} }}
layer {{ name: "sc" type: "Scale" bottom: "data" top: "sc" scale_param {{ bias_term: true }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "sc" top: "ip" inner_product_param {{ num_output: 2 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
""")
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    net.layers[0].close()
    msgs = [m for m in log_text.getvalue().splitlines()         # the prefetch thread's line comes any time
            if not m.startswith(("  ", "}", "layer", "name:", "Restarting data prefetching"))]
    for seq in (["Creating layer d", f"Opened lmdb {tmp_path / 'db'}", "Creating Layer d", "d -> data"],
                ["sc -> sc", "Creating layer sc", "Setting up sc"],
                ["loss -> loss", "Creating layer loss", "Setting up loss"]):
        i = msgs.index(seq[0])
        assert msgs[i:i + len(seq)] == seq, msgs
    # Caffe's Net(file, phase, level, stages) sets the level even when 0: the dump shows it
    assert "state {\n  phase: TRAIN\n  level: 0\n}" in log_text.getvalue()


def _run_cli(tmp_path, env_extra, model="net.prototxt"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "minicaffe.tools.cli", "time", "--model", model,
                           "--iterations", "1"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


@pytest.fixture
def cli_dir(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    return tmp_path


def test_minloglevel_silences_lower_levels(cli_dir):
    plain = _run_cli(cli_dir, {})
    assert plain.returncode == 0 and re.search(r"^I\d{4} .*\] Network initialization done\.$", plain.stderr, re.M)
    for level in ("1", "2", "3"):
        quiet = _run_cli(cli_dir, {"GLOG_minloglevel": level})
        assert quiet.returncode == 0, quiet.stderr
        assert not re.search(r"^I\d{4} ", quiet.stderr, re.M), quiet.stderr[:500]
    # errors still get their line
    bad = _run_cli(cli_dir, {"GLOG_minloglevel": "3"}, model="missing.prototxt")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: missing.prototxt")


def test_log_dir_gets_glog_files_unless_logtostderr(cli_dir):
    logs = cli_dir / "logs"
    logs.mkdir()
    run = _run_cli(cli_dir, {"GLOG_log_dir": str(logs)})
    assert run.returncode == 0
    files = [n for n in os.listdir(logs) if ".log.INFO." in n]
    assert len(files) == 1 and re.fullmatch(r"cli\.[^.]+.*\.log\.INFO\.\d{8}-\d{6}\.\d+", files[0]), files
    content = (logs / files[0]).read_text()
    assert content.startswith("Log file created at: ")
    assert "] Network initialization done." in content and "] Setting up conv" in content
    assert os.readlink(logs / "cli.INFO") == files[0]
    assert "] Network initialization done." in run.stderr          # also on stderr, as Caffe's tools
    again = cli_dir / "logs2"
    again.mkdir()
    assert _run_cli(cli_dir, {"GLOG_log_dir": str(again), "GLOG_logtostderr": "1"}).returncode == 0
    assert os.listdir(again) == []
    assert _run_cli(cli_dir, {"GLOG_log_dir": str(again), "GLOG_minloglevel": "1"}).returncode == 0
    assert not [n for n in os.listdir(again) if ".INFO" in n]


def test_unwritable_log_dir_does_not_stop_the_run(cli_dir):
    run = _run_cli(cli_dir, {"GLOG_log_dir": str(cli_dir / "no" / "such")})
    assert run.returncode == 0
    assert "warning: cannot write the log file" in run.stderr and "Network initialization done." in run.stderr


def test_glog_settings_parse_like_glog():
    import logging
    assert glog_settings({}) == (logging.INFO, False, None)
    assert glog_settings({"GLOG_minloglevel": "2", "GLOG_logtostderr": "1", "GLOG_log_dir": "/x"}) == \
        (logging.ERROR, True, "/x")
    assert glog_settings({"GLOG_minloglevel": "junk"})[0] == logging.INFO
    assert glog_settings({"GLOG_minloglevel": "7"})[0] > logging.CRITICAL
