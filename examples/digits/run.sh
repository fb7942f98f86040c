#!/usr/bin/env bash
# The whole Caffe workflow on scikit-learn's digits: images + list files -> convert_imageset ->
# compute_image_mean -> minicaffe train -> minicaffe test. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=examples/digits/work
rm -rf "$WORK" && mkdir -p "$WORK"

python examples/digits/prepare_digits.py "$WORK"
convert_imageset --gray --shuffle "$WORK/images/" "$WORK/train.txt" "$WORK/digits_train_lmdb"
convert_imageset --gray "$WORK/images/" "$WORK/test.txt" "$WORK/digits_test_lmdb"
compute_image_mean "$WORK/digits_train_lmdb" "$WORK/digits_mean.binaryproto"

minicaffe train --solver examples/digits/lenet_solver.prototxt 2>&1 | tee "$WORK/train.log"
minicaffe test --model examples/digits/lenet_train_val.prototxt \
  --weights "$WORK/lenet_digits_iter_1000.caffemodel" --iterations 5 2>&1 | tee "$WORK/test.log"
python examples/digits/check_accuracy.py "$WORK/test.log" --min 0.97
