"""The Net: its graph built from a NetParameter in Caffe's steps (phase rules, splits, wiring, sharing,
backward pruning: build.py), run forward and backward, weights in and out (network.py)."""
from .network import TEST, TRAIN, Net  # noqa: F401
