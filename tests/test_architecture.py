"""The house plan (docs/architecture.md), checked on the source: which package may import which, no
import cycles, one place that reads the environment, nothing imports the commands, and no reach into
another package's private attributes.

Pure ``ast`` over ``minicaffe/**/*.py``: nothing is imported, so the checks are quick and see the
function-local (lazy) imports too, which an import-time check would miss.

Each rule has a ``KNOWN_*`` list: today's violations, each with why it is there and what removes it.
A violation not on its list fails the test (the code must go down the tiers, or the exception must be
argued in a documented exception list); an entry that is no longer a violation fails it too, so the
lists only shrink.
"""
from __future__ import annotations

import ast
import pathlib
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "minicaffe"
DOC = ROOT / "docs" / "architecture.md"

# Imports go DOWN this list only (never up); names on one line are one tier, and may import each other.
# The first tier is the leaves: modules that everything may use and that know nothing of the engine.
TIERS: List[Tuple[str, ...]] = [
    ("errors", "deps", "fileio", "_aliases", "proto"),
    ("formats",),
    ("core",),
    ("kernels",),
    ("data",),
    ("layers",),
    ("net",),
    ("solvers",),
    ("parallel",),
    ("methods",),
    ("pycaffe",),
    ("tools",),
]
# The package root assembles pycaffe's ``caffe`` namespace, ``python -m minicaffe`` runs the command line,
# and minicaffe.testing builds layers for tests: these sit above every tier.
TOP = {"minicaffe", "minicaffe.__main__", "minicaffe.testing"}

# Documented exceptions to the tier rule that are meant to stay (lazy imports only): (importer, imported): why.
LAZY_UPWARD_ALLOWED: Dict[Tuple[str, str], str] = {}

# Today's upward imports (importer, imported): why, and what removes them.
KNOWN_UPWARD: Dict[Tuple[str, str], str] = {
}

# Modules that may read the environment (os.environ, os.getenv): the context reads every switch once;
# the command-line wiring in tools/ reads its own (listed one by one, so a new reader is a decision).
ENV_ALLOWED: Dict[str, str] = {
    "minicaffe/core/context.py": "the one place the engine's switches are read, once, at start-up",
}

# Today's environment readers outside the context: why, and what removes them.
KNOWN_ENV: Dict[str, str] = {
}

# Who may import minicaffe.tools from outside tools/: why.
TOOLS_IMPORT_ALLOWED: Dict[str, str] = {
    "minicaffe.__main__": "python -m minicaffe is the command line",
}

# Today's imports of minicaffe.tools from outside tools/ (importer, imported): why, and what removes them.
KNOWN_TOOLS_IMPORTS: Dict[Tuple[str, str], str] = {
    key: why for key, why in KNOWN_UPWARD.items() if key[1].startswith("minicaffe.tools")
}

# Private attributes that the Net, the solvers and ParallelSolver keep to themselves, whether or not the
# class still defines them (a rename must not let an old reach pass): the public seams replace them
# (Net.layer_names, top_vecs, bottom_vecs, layer_loss_weights, bottom_need_backward,
# learnable_param_names, data_positions(), restore_data_positions(); the gradient-sync strategy).
PRIVATE_PATTERNS: Dict[str, str] = {
    "_top": "net", "_bottom": "net", "_loss_weights": "net", "_layer_names": "net",
    "_learnable_names": "net", "_bottom_need_backward": "net", "_learnable": "net",
    "_parallel": "solvers", "_restore_data_positions": "solvers", "_data_positions": "solvers",
}
# pycaffe's own Net surface is spelled with an underscore (python/caffe/_caffe.cpp); reading it is using
# the public API, not reaching in. (_layer_names is pycaffe's too, but minicaffe's code uses layer_names.)
PYCAFFE_SURFACE = {"_blobs", "_blob_names", "_blob_loss_weights", "_inputs", "_outputs", "_top_ids",
                   "_bottom_ids", "_forward", "_backward", "_set_input_arrays"}

# Today's reaches into another package's private attributes (module, attribute): why, and what removes them.
KNOWN_PRIVATE: Dict[Tuple[str, str], str] = {
}


# ---------------------------------------------------------------------------------------------------
# reading the source

@dataclass
class Import:
    target: str      # the module imported (a package's __init__ is the package's name)
    line: int
    lazy: bool       # inside a function: runs when called, not when the module is imported
    typing_only: bool = False   # under ``if TYPE_CHECKING:``: never runs


@dataclass
class Module:
    name: str
    path: pathlib.Path
    is_package: bool
    tree: ast.Module
    imports: List[Import] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def package(self) -> str:
        """The first-level package (``core``, ``layers``...) or root module (``errors``) it belongs to."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> Tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _read_modules() -> Dict[str, Module]:
    modules = {}
    for path in sorted(PKG.rglob("*.py")):
        name, is_package = _module_name(path)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    for module in modules.values():
        module.imports = list(_imports(module, modules))
    return modules


def _resolve(module: Module, level: int, name: Optional[str]) -> str:
    """The absolute name of a relative import's base, as Python computes it."""
    if not level:
        return name or ""
    base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: Module, modules: Dict[str, Module]):
    """Every import of a minicaffe module in ``module``: statements at any depth, and
    ``importlib.import_module`` with a constant name."""
    def targets(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name`` runs pkg
            return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and \
                getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and \
                node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                return [_resolve(module, level, name.lstrip(".") or None)]
            return [name]
        return []

    def walk(node, lazy, typing_only):
        for target in targets(node):
            if target == "minicaffe" or target.startswith("minicaffe."):
                yield Import(target, node.lineno, lazy, typing_only)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                yield from walk(child, lazy, True)
            else:
                yield from walk(child, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                 ast.Lambda)), typing_only)

    yield from walk(module.tree, False, False)


MODULES = _read_modules()


def tier(name: str) -> Optional[int]:
    """The tier index of a module name; len(TIERS) for the top (root, __main__, testing); None if none."""
    if name in TOP:
        return len(TIERS)
    parts = name.split(".")
    if len(parts) < 2:
        return None
    for index, names in enumerate(TIERS):
        if parts[1] in names:
            return index
    return None


def _where(module: Module, line: int) -> str:
    return f"{module.rel}:{line}"


def _check_known(found: Dict, known: Dict, what: str):
    """Fail on a violation that is not on its list, and on a list entry that is no longer a violation."""
    new = {k: v for k, v in found.items() if k not in known}
    gone = sorted(set(known) - set(found))
    lines = []
    if new:
        lines.append(f"{what}: new violations (fix them, or argue the exception in the test's list):")
        lines += [f"  {k}  at {', '.join(sorted(v))}" for k, v in sorted(new.items())]
    if gone:
        lines.append(f"{what}: fixed, remove from the KNOWN list: " + ", ".join(map(str, gone)))
    assert not lines, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the rules

def test_every_module_has_a_tier():
    """A new package or root module must be placed in the house plan (here and in docs/architecture.md)."""
    missing = sorted(m.rel for m in MODULES.values() if tier(m.name) is None)
    assert not missing, f"modules in no tier (add their package to TIERS and docs/architecture.md): {missing}"


def test_imports_only_go_down_the_tiers():
    """An import from a higher tier is a dependency running up the house: the lower package can no
    longer be understood, tested or reused without the upper one. Lazy imports count as well: they
    only hide the dependency until the function runs."""
    found: Dict[Tuple[str, str], Set[str]] = {}
    for module in MODULES.values():
        if module.name in TOP:
            continue
        mine = tier(module.name)
        for imp in module.imports:
            theirs = tier(imp.target)
            if theirs is None or theirs <= mine or imp.typing_only:
                continue
            if imp.lazy and (module.name, imp.target) in LAZY_UPWARD_ALLOWED:
                continue
            found.setdefault((module.name, imp.target), set()).add(_where(module, imp.line))
    _check_known(found, KNOWN_UPWARD, "imports that go up the tiers")


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Module-level imports form no cycle: each module can be imported (and read) after the ones it
    uses. The package root is left out: it imports everything to assemble pycaffe's namespace, and a
    module that imported it back would already fail the tier rule."""
    edges: Dict[str, Set[str]] = {}
    for module in MODULES.values():
        if module.name == "minicaffe":
            continue
        for imp in module.imports:
            if not imp.lazy and not imp.typing_only and imp.target in MODULES and imp.target != "minicaffe":
                edges.setdefault(module.name, set()).add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, "import cycles among module-level imports:\n" + "\n".join(
        "  " + " <-> ".join(c) for c in cycles)


def _env_reads(module: Module) -> List[int]:
    lines = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "environb", "getenv", "getenvb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_context_reads_the_environment():
    """Environment switches are read once, into the context (core/context.py), so a run's behaviour is
    fixed at start-up and a test sets them through the context rather than the process environment."""
    found = {}
    for module in MODULES.values():
        lines = _env_reads(module)
        if lines and module.rel not in ENV_ALLOWED:
            found[module.rel] = {_where(module, n) for n in lines}
    _check_known(found, KNOWN_ENV, "environment reads outside core/context.py")


def test_env_allow_list_names_files_that_exist_or_are_coming():
    """The allow list names real files (core/context.py is being written; the rest must exist)."""
    stale = [rel for rel in ENV_ALLOWED if rel != "minicaffe/core/context.py" and not (ROOT / rel).exists()]
    assert not stale, f"ENV_ALLOWED names files that are gone: {stale}"


def test_nothing_imports_the_commands():
    """tools/ holds the commands: each is an entry point, so nothing (but python -m minicaffe) imports
    one; code that two commands share, or that the library needs, lives in a library package."""
    found: Dict[Tuple[str, str], Set[str]] = {}
    for module in MODULES.values():
        if module.package == "tools" or module.name in TOOLS_IMPORT_ALLOWED:
            continue
        for imp in module.imports:
            if imp.target == "minicaffe.tools" or imp.target.startswith("minicaffe.tools."):
                found.setdefault((module.name, imp.target), set()).add(_where(module, imp.line))
    _check_known(found, KNOWN_TOOLS_IMPORTS, "imports of minicaffe.tools from outside tools/")


def _private_definitions() -> Dict[str, Set[str]]:
    """Per first-level package: the private attribute names its classes define (``self._x = ...``,
    ``def _x`` or ``_x = ...`` in a class body)."""
    defined: Dict[str, Set[str]] = {}
    for module in MODULES.values():
        names = defined.setdefault(module.package, set())
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and \
                            isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
                        names.add(sub.attr)
                for stmt in node.body:
                    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(stmt.name)
                    elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                        for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                            if isinstance(t, ast.Name):
                                names.add(t.id)
    return {pkg: {n for n in names if _private(n)} for pkg, names in defined.items()}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_names(module: Module) -> Dict[str, str]:
    """Local names bound to minicaffe modules by this module's imports (``from ..core import backend``,
    ``import minicaffe.core.backend as backend``): local name -> module name."""
    bound = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    bound[alias.asname] = alias.name
    return bound


def test_no_reach_into_another_packages_private_attributes():
    """``net._top`` read by the solver ties the solver to how Net stores its wiring today; the public
    seams (Net.top_vecs, layer_loss_weights, ...) are the contract. Outside the package that owns it,
    the rule forbids:

    - ``mod._name`` or ``from pkg.mod import _name`` where the module belongs to another package;
    - ``obj._name`` and ``getattr(obj, "_name")`` (``obj`` not self/cls) for a name that another
      package's classes define and this package's do not, and always for the seams' old names
      (PRIVATE_PATTERNS).

    pycaffe's underscore API (``net._blobs``, ``net._forward``...) is public and allowed."""
    class_private = _private_definitions()
    found: Dict[Tuple[str, str], Set[str]] = {}

    def object_reach(name, here):
        if name in PYCAFFE_SURFACE:
            return False
        if name in PRIVATE_PATTERNS:
            return PRIVATE_PATTERNS[name] != here
        return name not in class_private.get(here, set()) and \
            any(name in names for pkg, names in class_private.items() if pkg != here)

    def other_package(module_name, here):
        return MODULES[module_name].package != here

    for module in MODULES.values():
        here = module.package
        bound = _module_names(module)
        for node in ast.walk(module.tree):
            reach = None
            if isinstance(node, ast.Attribute) and _private(node.attr) and \
                    not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                if isinstance(node.value, ast.Name) and node.value.id in bound:
                    if other_package(bound[node.value.id], here):
                        reach = node.attr
                elif object_reach(node.attr, here):
                    reach = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) and \
                    _private(node.args[1].value) and \
                    not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")) and \
                    object_reach(node.args[1].value, here):
                reach = node.args[1].value
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.level, node.module)
                if base in MODULES and other_package(base, here):
                    for alias in node.names:
                        if _private(alias.name) and f"{base}.{alias.name}" not in MODULES:
                            found.setdefault((module.name, alias.name), set()).add(_where(module, node.lineno))
            if reach:
                found.setdefault((module.name, reach), set()).add(_where(module, node.lineno))
    _check_known(found, KNOWN_PRIVATE, "reaches into another package's private attributes")


def test_private_patterns_are_checked_where_they_are_defined():
    """The seam patterns name attributes of the Net and the solvers; a pattern no class defines any more
    is kept on purpose (an old reach must not come back), but its package must still exist."""
    packages = {m.package for m in MODULES.values()}
    assert set(PRIVATE_PATTERNS.values()) <= packages


# ---------------------------------------------------------------------------------------------------
# the document says what the test checks

def _doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_architecture_doc_lists_the_tiers_in_this_order():
    """docs/architecture.md's tier line is TIERS: the page and the check cannot drift apart."""
    line = next((ln for ln in _doc_text().splitlines() if ln.strip().startswith("tiers:")), None)
    assert line is not None, "docs/architecture.md has no 'tiers:' line"
    groups = [tuple(g.split()) for g in line.split(":", 1)[1].split("<")]
    assert groups == TIERS, f"docs/architecture.md's tiers {groups} differ from the test's {TIERS}"


def test_architecture_doc_names_every_package():
    """Every package and root module of minicaffe has its line on the page."""
    text = _doc_text()
    names = sorted({m.name.split(".")[1] for m in MODULES.values() if m.name.count(".") >= 1})
    missing = [n for n in names if not re.search(rf"`{re.escape(n)}(/|\.py)?`", text)]
    assert not missing, f"docs/architecture.md does not name: {missing}"


@pytest.mark.parametrize("rule_list", ["KNOWN_UPWARD", "KNOWN_ENV", "KNOWN_PRIVATE", "ENV_ALLOWED",
                                       "TOOLS_IMPORT_ALLOWED", "LAZY_UPWARD_ALLOWED"])
def test_every_exception_says_why(rule_list):
    """An entry without a reason is a silenced check, not an exception."""
    entries = globals()[rule_list]
    assert all(isinstance(why, str) and len(why.split()) >= 3 for why in entries.values()), rule_list
