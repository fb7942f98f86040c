"""Optional and fragile imports, with one wording for what to install.

``require("h5py", "HDF5Data")`` returns the module or raises one line such as
``HDF5Data needs h5py: pip install 'minicaffe[hdf5]'``: every "needs X" message in minicaffe comes from
here, naming the extra that installs the package (or the package itself where no extra has it).

``import_cv2()`` is OpenCV's own case: the dependency is ``opencv-python-headless``, but many
environments also get ``opencv-python`` from another package. Both install the same ``cv2`` folder,
so uninstalling or upgrading either leaves a broken ``cv2`` (a failing import, or the GUI build
wanting libGL on a server). When the import fails, the message says which of the two are installed
and how to get back to one.
"""
from __future__ import annotations

import sys
from importlib import metadata
from types import ModuleType

from .errors import MinicaffeError

# import name -> (distribution to install, minicaffe extra that installs it or None)
PACKAGES = {
    "h5py": ("h5py", "hdf5"),
    "pydot": ("pydot", "draw"),
    "matplotlib": ("matplotlib", "plot"),
    "mpi4py": ("mpi4py", "mpi"),
    "cupy": ("cupy-cuda12x", "gpu"),
    "sklearn": ("scikit-learn", "examples"),
    "cv2": ("opencv-python-headless", None),
    "lmdb": ("lmdb", None),
    "plyvel": ("plyvel", "leveldb"),
}

_EXTRA_NOTES = {
    "mpi": " (plus an MPI library, e.g. apt-get install openmpi-bin libopenmpi-dev)",
    "gpu": " (or 'minicaffe[gpu-cuda13]' for CUDA 13)",
}

BOTH_OPENCV = ("both opencv-python and opencv-python-headless are installed; pip uninstall opencv-python "
               "opencv-python-headless && pip install opencv-python-headless")


def install_hint(name: str) -> str:
    """``pip install 'minicaffe[hdf5]'`` for import name ``name`` (``pip install lmdb`` where no extra)."""
    dist, extra = PACKAGES.get(name.split(".")[0], (name.split(".")[0], None))
    if extra:
        return f"pip install 'minicaffe[{extra}]'{_EXTRA_NOTES.get(extra, '')}"
    return f"pip install {dist}"


def missing_message(name: str, what: str) -> str:
    """``<what> needs <distribution>: <install hint>``."""
    dist = PACKAGES.get(name.split(".")[0], (name.split(".")[0], None))[0]
    return f"{what} needs {dist}: {install_hint(name)}"


def require(name: str, what: str, error: type[Exception] = MinicaffeError) -> ModuleType:
    """Import ``name`` (``"h5py"``, ``"matplotlib.figure"``) and return it; when it is not installed,
    raise ``error`` with one line: ``<what> needs <package>: pip install 'minicaffe[<extra>]'``."""
    if name.split(".")[0] == "cv2":
        return import_cv2(what, error)
    try:
        __import__(name)        # through builtins.__import__, so a test can hide a package
    except ImportError:
        raise error(missing_message(name, what)) from None
    return sys.modules[name]


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def import_cv2(what: str = "reading images", error: type[Exception] = MinicaffeError) -> ModuleType:
    """``cv2``, or one line saying why it does not import and what to run: the two-distribution
    clash above, the GUI build without its system libraries, or simply not installed."""
    try:
        import cv2
        cv2.imdecode        # a half-removed cv2 folder imports as an empty namespace package
        return cv2
    except (ImportError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        gui, headless = _installed("opencv-python"), _installed("opencv-python-headless")
    if gui and headless:
        raise error(f"{what} needs OpenCV, and cv2 does not import ({reason}): {BOTH_OPENCV}") from None
    if gui:
        raise error(f"{what} needs OpenCV, and cv2 does not import ({reason}): opencv-python (the GUI build) "
                    f"is installed; on a machine without a display use pip uninstall opencv-python && "
                    f"pip install opencv-python-headless") from None
    if headless:
        raise error(f"{what} needs OpenCV, and cv2 does not import ({reason}): pip install --force-reinstall "
                    f"opencv-python-headless") from None
    raise error(missing_message("cv2", what)) from None
