"""The files minicaffe ships beside its code: the model zoo prototxts (``models/``), Caffe's message
definitions (``proto/caffe.proto``) and the data-preparation scripts (``tools/*.sh``).

In a source checkout they are the repository's top-level folders; an installed wheel carries them as
``minicaffe/_shipped/{models,proto,tools}`` (setup.py maps them). Commands and docs name them as
``models/lenet/solver.prototxt``, a path relative to a checkout, and a solver file names its net the
same way, so a path that does not exist where it is given, but names a shipped file, is read from
the shipped copy (``resolve``) with a log line saying so: the installed command then runs the
documented examples from any directory. Shipped files are only read, never written: a snapshot
prefix such as ``models/lenet/lenet`` stays relative to the working directory.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import MinicaffeError

log = logging.getLogger("minicaffe")

FOLDERS = ("models", "proto", "tools")
_PACKAGE = Path(__file__).resolve().parent.parent        # minicaffe/
_announced = set()          # (flag or field, path) already logged by resolve()


def root() -> Path | None:
    """The folder holding ``models/``, ``proto/`` and ``tools/``: the wheel's ``minicaffe/_shipped``,
    else the source checkout this package was imported from; None when neither is there."""
    installed = _PACKAGE / "_shipped"
    if (installed / "models").is_dir():
        return installed
    checkout = _PACKAGE.parent
    if (checkout / "models").is_dir() and (checkout / "proto" / "caffe.proto").is_file():
        return checkout
    return None


def path(relative: str | os.PathLike) -> Path | None:
    """The shipped file or folder a checkout-relative path such as ``models/lenet/solver.prototxt``
    (or ``./models/...``) names, or None. Only paths under models/, proto/ and tools/ are looked up,
    and nothing outside them is reachable (``..`` is refused)."""
    base = root()
    if base is None:
        return None
    rel = os.path.normpath(os.fspath(relative))
    if os.path.isabs(rel):
        return None
    parts = Path(rel).parts
    if not parts or parts[0] not in FOLDERS or ".." in parts:
        return None
    candidate = base.joinpath(*parts)
    return candidate if candidate.exists() else None


def resolve(value: str | os.PathLike, what: str = "file") -> str:
    """``value`` as given when it exists (or is not a shipped path); else the shipped copy it names,
    with a log line. ``what`` names the flag or field in that line (``--solver``, ``net``)."""
    value = os.fspath(value)
    if not value or os.path.exists(value):
        return value
    found = path(value)
    if found is None or not found.is_file():
        return value
    if (what, value) not in _announced:      # a solver reads its net file twice (train and test nets)
        _announced.add((what, value))
        log.info("%s '%s' is not in the working directory; using the copy shipped with minicaffe: %s",
                 what, value, found)
    return str(found)


def resolve_list(value: str, what: str = "file") -> str:
    """``resolve`` for each entry of a ``,``-separated list (Caffe's ``--weights a,b``)."""
    if "," not in value:
        return resolve(value, what)
    return ",".join(resolve(v.strip(), what) if v.strip() else v for v in value.split(","))


def models() -> list[tuple[str, list[str]]]:
    """Every shipped model folder (one holding a ``*.prototxt``) as ``(name, files)``; ``name`` is the
    folder under models/ (``lenet``, ``vgg/vgg_a``), ``files`` its file names, sorted."""
    base = root()
    if base is None:
        return []
    top = base / "models"
    out = []
    for folder, dirs, files in os.walk(top):
        dirs.sort()
        if any(f.endswith(".prototxt") for f in files):
            name = Path(folder).relative_to(top).as_posix()
            out.append((name, sorted(f for f in files if not f.startswith("."))))
    return sorted(out)


def model_folder(name: str) -> Path:
    """The shipped folder of model ``name`` (``lenet``, ``vgg/vgg_a``, also ``vgg_a`` when unique);
    MinicaffeError listing the models otherwise."""
    names = [n for n, _ in models()]
    if not names:
        raise MinicaffeError("no shipped models found (this minicaffe was installed without its data "
                             "files; reinstall it from a wheel or the source tree)")
    key = name.strip("/").removeprefix("models/")
    matches = [n for n in names if n == key] or [n for n in names if n.rsplit("/", 1)[-1] == key]
    if len(matches) != 1:
        raise MinicaffeError(f"no shipped model '{name}'; the models are: {', '.join(names)}")
    return root() / "models" / matches[0]


def copy_model(name: str, dest: str | os.PathLike) -> list[str]:
    """Copy the files of shipped model ``name`` into folder ``dest`` (made if missing) as
    ``dest/models/<name>/...``, so that the paths inside them (``net: "models/lenet/..."``,
    ``snapshot_prefix: "models/lenet/lenet"``) work from ``dest``. A file already there is not
    overwritten: MinicaffeError naming it, before anything is copied. Returns the paths written."""
    src = model_folder(name)
    rel = src.relative_to(root()).as_posix()
    target = Path(dest) / rel
    files = sorted(p for p in src.iterdir() if p.is_file())
    for f in files:
        if (target / f.name).exists():
            raise MinicaffeError(f"{target / f.name} already exists; copy into another folder or remove "
                                 f"it first")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        final = target / f.name
        tmp = final.with_name(final.name + ".tmp")
        shutil.copyfile(f, tmp)                 # a temporary name, then renamed: never a partial file
        os.replace(tmp, final)
        written.append(str(final))
    return written


def make_snapshot_folder(prefix: str) -> None:
    """Make the folder of a shipped solver's ``snapshot_prefix`` (``models/lenet`` for
    ``models/lenet/lenet``) in the working directory when it is missing, with a log line: the
    solver was found in the shipped files, so the folder its prefix names was never made here."""
    folder = os.path.dirname(prefix)
    if folder and not os.path.isabs(folder) and not os.path.exists(folder):
        os.makedirs(folder)
        log.info("snapshot_prefix '%s': made the folder %s in the working directory for the snapshots",
                 prefix, os.path.abspath(folder))
