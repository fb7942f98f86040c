#!/usr/bin/env bash
# The oldest and newest protobuf and NumPy that pyproject.toml admits: for each pair, a fresh venv
# with minicaffe installed from this checkout and those two pinned, then a small subset of the tests
# (prototxt/binary round trips, net forward/backward and save/load, solver steps, Datum and image
# I/O). caffe_pb2.py is protoc 3.21 gencode precisely so that protobuf 4.21 still loads it.
# NumPy 1.23.5 is the oldest 1.23 with a wheel for CPython 3.11; pip then picks an OpenCV wheel
# that still supports it. Takes about a minute with a warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUBSET=(tests/test_proto.py tests/test_net.py tests/test_solver.py tests/test_datum.py tests/test_io.py)

run_pair() {
  local name=$1; shift
  local venv=".venv-compat-$name"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q . "$@" pytest hypothesis
  "$venv/bin/python" -c "import google.protobuf as g, numpy as n; print('$name: protobuf', g.__version__, '/ numpy', n.__version__)"
  "$venv/bin/python" -m pytest -q "${SUBSET[@]}"
  rm -rf "$venv"
}

run_pair oldest "protobuf==4.21.12" "numpy==1.23.5"
run_pair newest "protobuf>=7,<8" "numpy>=2,<3"
