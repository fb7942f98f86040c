"""The Net: built from a NetParameter (phase rules, splits, sharing), run forward and backward, weights in
and out (network.py)."""
from .network import TEST, TRAIN, Net  # noqa: F401
