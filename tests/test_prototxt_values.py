"""A value of the wrong type in a prototxt names the field and what it takes (protobuf's own message names
neither the field nor, for a boolean, the value): ``3:37: num_output: expected an integer, got "ten"``."""
import pytest

import minicaffe as caffe
from minicaffe.errors import ParseError
from minicaffe.tools import cli

NET = """name: "typed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { %s } }
layer { name: "pool" type: "Pooling" bottom: "ip" top: "pool" pooling_param { %s kernel_size: 1 } }
"""

# (inner_product_param body, pooling_param body, the bad token, its field, what the message says it takes)
CASES = [
    ('num_output: "ten"', "pool: MAX", '"ten"', "num_output", "expected an integer"),
    ("num_output: 2.5", "pool: MAX", "2.5", "num_output", "expected an integer"),
    ("num_output: -3", "pool: MAX", "-3", "num_output", "value out of range for the field's type"),
    ("num_output: 2 bias_term: maybe", "pool: MAX", "maybe", "bias_term", "expected true or false"),
    ("num_output: 2", "pool: MEDIAN", "MEDIAN", "pool", "expected one of MAX, AVE, STOCHASTIC"),
    ("num_output: 2 weight_filler { std: wide }", "pool: MAX", "wide", "std", "expected a number"),
]


@pytest.mark.parametrize("ip,pool,token,field,expected", CASES)
def test_wrong_typed_value_names_the_field(tmp_path, ip, pool, token, field, expected):
    path = tmp_path / "net.prototxt"
    text = NET % (ip, pool)
    path.write_text(text)
    lineno, row = next((i, row) for i, row in enumerate(text.split("\n"), 1) if f"{field}: {token}" in row)
    col = row.index(f"{field}: {token}") + len(field) + 3
    with pytest.raises(ParseError) as err:
        caffe.Net(str(path), caffe.TEST)
    assert str(err.value) == f"{path}:{lineno}:{col}: {field}: {expected}, got {token}"


def test_cli_prints_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(NET % ('num_output: "ten"', "pool: MAX"))
    assert cli.main(["time", "--model=net.prototxt", "--iterations=1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ['error: net.prototxt:4:37: num_output: expected an integer, got "ten"']


def test_one_rule_tells_a_prototxt_path_from_text(tmp_path, monkeypatch):
    """Nets and solvers read one argument the same way (formats.prototxt.prototxt_path): an existing
    file or a bare name is a path, anything else with a newline, ':' or '{' is text."""
    import pathlib

    from minicaffe.formats.prototxt import load_net_param, load_solver_param, prototxt_path
    from minicaffe.solvers.solver import read_solver_param

    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "odd:name.prototxt"                    # a ':' in an existing file's name
    odd.write_text('base_lr: 0.5 net: "n.prototxt"')
    assert prototxt_path(str(odd)) == str(odd)
    assert prototxt_path(pathlib.Path("missing")) == "missing"
    assert prototxt_path("missing.prototxt") == "missing.prototxt"
    for text in ("base_lr: 0.1", "net_param { }", "a\nb", caffe.caffe_pb2.NetParameter()):
        assert prototxt_path(text) is None
    for read in (load_net_param, load_solver_param, read_solver_param):
        with pytest.raises(ParseError, match="missing.prototxt.*no such file"):
            read("missing.prototxt")
    assert load_solver_param(str(odd)).base_lr == 0.5
    assert read_solver_param(str(odd))[1] == str(odd)
    assert read_solver_param('base_lr: 0.5 net: "n.prototxt"')[1] is None
    # text with '{' and no ':' is text for the solver too (it was "no such file" there, text for nets)
    assert load_solver_param("net_param { }").HasField("net_param")
    assert load_net_param('layer { }').layer[0].name == ""
