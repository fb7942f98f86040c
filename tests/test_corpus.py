"""The bad-input corpus (tests/corpus/cases.txt): every case must end in a non-zero exit and one
``error:`` line that matches its expected expression (naming the file and the line:col, layer or
record at fault), with no Python traceback. Most cases run in-process through each tool's
``main(argv)`` (a subprocess costs ~1 s of imports); a sample runs through real subprocesses."""
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "corpus")
sys.path.insert(0, CORPUS)
import make_binary  # noqa: E402

# command name -> (module, function): console scripts of pyproject.toml
TOOLS = {
    "minicaffe": ("minicaffe.tools.cli", "main"),
    "convert_imageset": ("minicaffe.tools.convert_imageset", "main"),
    "compute_image_mean": ("minicaffe.tools.compute_image_mean", "main"),
    "upgrade_net_proto_text": ("minicaffe.tools.upgrade", "main_net_text"),
    "upgrade_net_proto_binary": ("minicaffe.tools.upgrade", "main_net_binary"),
    "upgrade_solver_proto_text": ("minicaffe.tools.upgrade", "main_solver_text"),
}

# run through a real process: one per tool and per kind of failure (parse, build, data thread, weights)
SUBPROCESS_CASES = ("unbalanced_open", "cycle", "weights_truncated", "state_truncated",
                    "data_layer_nodatum", "mean_of_badlen", "list_no_label", "upgrade_binary_truncated")


def load_cases(path=os.path.join(CORPUS, "cases.txt")):
    cases = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.rstrip("\n").split(" | ")]
            assert len(parts) == 3, f"cases.txt:{lineno}: want 'id | command | regex'"
            cases.append(tuple(parts))
    return cases


CASES = load_cases()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory with c/ → a copy of the corpus and g/ → the generated binary inputs; the cases run in it.
    A copy, not a link: a case that trains writes its snapshots (and lock file) beside its solver file
    (the default snapshot_prefix), which must not land in the source tree."""
    work = tmp_path_factory.mktemp("corpus")
    shutil.copytree(CORPUS, work / "c", ignore=shutil.ignore_patterns("__pycache__"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        make_binary.build("g")
    finally:
        os.chdir(cwd)
    return work


@pytest.fixture
def in_scratch(env_switch, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    env_switch("MINICAFFE_DEBUG", None)
    return scratch


def run_in_process(argv):
    """(exit status, everything written to stderr and stdout) of a tool's main(argv)."""
    import importlib
    module, func = TOOLS[argv[0]]
    main = getattr(importlib.import_module(module), func)
    err, out = io.StringIO(), io.StringIO()
    from minicaffe.tools.common import get_logger
    log = get_logger()
    handlers = [(h, h.stream) for h in log.handlers if hasattr(h, "stream")]
    for h, _ in handlers:
        h.stream = err
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv[1:])
            except SystemExit as exc:       # argparse usage errors
                code = exc.code
    finally:
        for h, stream in handlers:
            h.stream = stream
    return code, err.getvalue() + out.getvalue()


def run_subprocess(argv, cwd):
    module, func = TOOLS[argv[0]]
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MINICAFFE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code] + argv[1:], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)
    return proc.returncode, proc.stderr + proc.stdout


def check(case_id, regex, code, output):
    assert "Traceback" not in output, f"{case_id}: traceback:\n{output}"
    assert code not in (0, None), f"{case_id}: exit status {code}\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors, f"{case_id}: no 'error:' line in:\n{output}"
    message = errors[-1][len("error: "):]
    assert re.search(regex, message), f"{case_id}: {message!r} does not match {regex!r}"
    return message


@pytest.mark.parametrize("case_id,command,regex", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clean_line(in_scratch, case_id, command, regex):
    code, output = run_in_process(shlex.split(command))
    check(case_id, regex, code, output)


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_real_process_exits_cleanly(scratch, case_id):
    _, command, regex = next(c for c in CASES if c[0] == case_id)
    code, output = run_subprocess(shlex.split(command), scratch)
    check(case_id, regex, code, output)


def test_cases_cannot_write_into_the_source_tree(scratch):
    """The cases run on a copy of the corpus: a solver case that trains writes its snapshots beside its
    solver file, and those once ended up committed under tests/corpus/solver/."""
    probe = "written-by-a-case.tmp"
    (scratch / "c" / "solver" / probe).write_text("x")
    try:
        assert not os.path.lexists(os.path.join(CORPUS, "solver", probe))
    finally:
        (scratch / "c" / "solver" / probe).unlink()


def test_debug_flag_shows_the_traceback(env_switch, in_scratch):
    """--debug (and MINICAFFE_DEBUG=1) is how a developer gets the traceback back."""
    from minicaffe.errors import MinicaffeError
    from minicaffe.tools import cli
    with pytest.raises(MinicaffeError):
        cli.main(["time", "--model", "c/net/cycle.prototxt", "--debug"])
    env_switch("MINICAFFE_DEBUG", "1")
    with pytest.raises(MinicaffeError):
        cli.main(["time", "--model", "c/net/cycle.prototxt"])


def test_corpus_is_big_and_covers_every_tool():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {shlex.split(c[1])[0] for c in CASES} == set(TOOLS)


if __name__ == "__main__":     # print what each case says now: python tests/test_corpus.py DIR
    work = sys.argv[1]
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    if not os.path.exists("c"):
        shutil.copytree(CORPUS, "c", ignore=shutil.ignore_patterns("__pycache__"))
    make_binary.build("g")
    for case_id, command, regex in CASES:
        code, output = run_in_process(shlex.split(command))
        errs = [l for l in output.splitlines() if l.startswith("error: ")]
        tb = "TRACEBACK " if "Traceback" in output else ""
        print(f"{case_id} [{code}] {tb}{errs[-1] if errs else output.strip().splitlines()[-3:]}")
