"""The papers' methods on top of a Net: multi-crop and dense evaluation with ensembles (multicrop.py), net
surgery (surgery.py)."""
