#!/usr/bin/env sh
# Compute the mean image of the ImageNet training LMDB with minicaffe's compute_image_mean.
#
#   EXAMPLE  folder holding ilsvrc12_train_lmdb (made by tools/create_imagenet.sh)
#   DATA     where imagenet_mean.binaryproto is written (the transform_param mean_file)
#   PCA=true also write imagenet_mean_pca.binaryproto, the colour eigen data that
#            transform_param { color_shift { pca_file } } reads (AlexNet colour augmentation)
# The per-channel means are printed too ("mean_value channel [c]: v"), for mean_value instead
# of mean_file.
set -e

EXAMPLE=${EXAMPLE:-examples/imagenet}
DATA=${DATA:-data/ilsvrc12}
PCA=${PCA:-false}

if command -v compute_image_mean >/dev/null 2>&1; then
  MEAN="compute_image_mean"
else
  MEAN="${PYTHON:-python} -m minicaffe.tools.compute_image_mean"
fi

mkdir -p "$DATA"
$MEAN --pca=$PCA "$EXAMPLE/ilsvrc12_train_lmdb" "$DATA/imagenet_mean.binaryproto"

echo "Done."
