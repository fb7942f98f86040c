"""Build shim: the metadata is in pyproject.toml. This adds the repository's top-level data folders to
the wheel: models/ (every prototxt and README.md), proto/caffe.proto and tools/*.sh ship as
minicaffe/_shipped/{models,proto,tools}, where minicaffe.core.shipped finds them. They stay at the top
level here because the docs and scripts name them there. The data packages have no __init__.py."""
import os

from setuptools import find_packages, setup

SHIPPED = {"models": ["*.prototxt", "README.md"], "proto": ["caffe.proto"], "tools": ["*.sh", "README.md"]}
package_dir, package_data = {}, {"minicaffe": ["py.typed"], "minicaffe.proto": ["*.py"]}
for top, patterns in SHIPPED.items():
    for folder, dirs, _ in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        name = "minicaffe._shipped." + ".".join(folder.split(os.sep))
        package_dir[name] = folder
        package_data[name] = patterns

setup(packages=find_packages(include=["minicaffe", "minicaffe.*"]) + sorted(package_dir),
      package_dir=package_dir, package_data=package_data)
