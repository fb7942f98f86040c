#!/usr/bin/env sh
# Build the ImageNet training and validation LMDBs with minicaffe's convert_imageset.
#
# Set the variables below (or pass them in the environment) to your data:
#   TRAIN_DATA_ROOT / VAL_DATA_ROOT  folders the image paths of train.txt / val.txt are relative to
#   DATA                             folder holding train.txt and val.txt ("<image path> <label>" lines)
#   EXAMPLE                          where the two LMDBs are written
#   RESIZE=true                      resize every image to 256x256 (leave false if already resized)
#   JOBS                             decoding processes (0 = all cores)
# Writes $EXAMPLE/ilsvrc12_train_lmdb and $EXAMPLE/ilsvrc12_val_lmdb. An existing database is not
# touched: delete it first, or set OVERWRITE=true.
set -e

EXAMPLE=${EXAMPLE:-examples/imagenet}
DATA=${DATA:-data/ilsvrc12}
TRAIN_DATA_ROOT=${TRAIN_DATA_ROOT:-/path/to/imagenet/train/}
VAL_DATA_ROOT=${VAL_DATA_ROOT:-/path/to/imagenet/val/}
RESIZE=${RESIZE:-false}
JOBS=${JOBS:-0}
OVERWRITE=${OVERWRITE:-false}

# the installed console script, or the module from a checkout
if command -v convert_imageset >/dev/null 2>&1; then
  CONVERT="convert_imageset"
else
  CONVERT="${PYTHON:-python} -m minicaffe.tools.convert_imageset"
fi

if $RESIZE; then
  RESIZE_HEIGHT=256
  RESIZE_WIDTH=256
else
  RESIZE_HEIGHT=0
  RESIZE_WIDTH=0
fi

if [ ! -d "$TRAIN_DATA_ROOT" ]; then
  echo "Error: TRAIN_DATA_ROOT is not a path to a directory: $TRAIN_DATA_ROOT"
  echo "Set TRAIN_DATA_ROOT (in create_imagenet.sh or the environment) to the folder of the" \
       "ImageNet training images."
  exit 1
fi

if [ ! -d "$VAL_DATA_ROOT" ]; then
  echo "Error: VAL_DATA_ROOT is not a path to a directory: $VAL_DATA_ROOT"
  echo "Set VAL_DATA_ROOT (in create_imagenet.sh or the environment) to the folder of the" \
       "ImageNet validation images."
  exit 1
fi

mkdir -p "$EXAMPLE"

# make_lmdb NAME ROOT LIST: one resized, shuffled LMDB under $EXAMPLE
make_lmdb() {
  echo "Creating $1 lmdb..."
  $CONVERT \
      --resize_height=$RESIZE_HEIGHT \
      --resize_width=$RESIZE_WIDTH \
      --shuffle \
      --jobs=$JOBS \
      --overwrite=$OVERWRITE \
      "$2" \
      "$3" \
      "$EXAMPLE/ilsvrc12_$1_lmdb"
}

make_lmdb train "$TRAIN_DATA_ROOT" "$DATA/train.txt"
make_lmdb val "$VAL_DATA_ROOT" "$DATA/val.txt"

echo "Done."
