"""Write scikit-learn's bundled handwritten digits (no download) as PNG files with Caffe list files.

The 8x8 images (values 0-16) are scaled to 0-255 and resized to 28x28, LeNet's input size. A fixed,
stratified split keeps a held-out test set of 20% of the images.
"""
import argparse
import os
import sys

import numpy as np

from minicaffe.deps import import_cv2, require
from minicaffe.errors import MinicaffeError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="folder to write images/, train.txt and test.txt into")
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        load_digits = require("sklearn.datasets", "examples/digits (its data set)").load_digits
        cv2 = import_cv2("examples/digits")
    except MinicaffeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(args.seed)
    test_idx = []
    for c in np.unique(labels):  # stratified: the same share of every class in the test set
        idx = np.flatnonzero(labels == c)
        test_idx.extend(rng.choice(idx, int(round(len(idx) * args.test_fraction)), replace=False))
    is_test = np.zeros(len(labels), bool)
    is_test[test_idx] = True

    img_dir = os.path.join(args.out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    lists = {"train": [], "test": []}
    for i, (img, label) in enumerate(zip(images, labels)):
        big = cv2.resize(img, (28, 28), interpolation=cv2.INTER_LINEAR)
        name = f"digit_{i:04d}.png"
        cv2.imwrite(os.path.join(img_dir, name), big)
        lists["test" if is_test[i] else "train"].append(f"{name} {label}\n")
    for split, lines in lists.items():
        with open(os.path.join(args.out_dir, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    print(f"wrote {len(lists['train'])} training and {len(lists['test'])} test images to {img_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
