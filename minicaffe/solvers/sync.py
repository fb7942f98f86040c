"""Gradient synchronisation: the strategy a solver is given for combining the gradients of the
workers of a data-parallel run (Caffe's ``Solver::Callback`` and the ``Net`` after-backward hook that
its ``NCCL`` class plugs in).

``GradientSync`` here is the interface and the strategy "none": one worker, nothing to combine, the
solver trains exactly as alone. ``minicaffe.parallel`` provides the all-reduce strategy (over MPI or
NCCL, by the communicator it is given). ``Solver.set_gradient_sync(strategy)`` installs one; the
solver then calls it at these points of each iteration, and nowhere else:

* ``before_forward(last)`` / ``after_forward(loss, last)`` around the forward of each of the
  iteration's ``iter_size`` passes (``last``: the last pass, after which the gradients are final);
* during the last pass's backward, when ``layer_wise`` is true, ``after_layer_backward(i)`` after
  the backward of each layer ``i`` from the top down (so reductions overlap the backward of the
  layers below), else one whole backward;
* ``after_backward(loss, last)``, which returns the loss the solver records (the mean over the
  workers); on the last pass the gradients are combined when it returns;
* ``agree(value)``: the root's value of a flag or an action ('none', 'stop', 'snapshot'), so that
  every worker stops or snapshots at the same iteration;
* ``rank``/``is_root``: only the root tests, logs the display lines and writes snapshots.
"""
from __future__ import annotations


class GradientSync:
    """The strategy "none": a world of one worker. Subclasses override the points they need."""

    name = "none"
    rank, size = 0, 1
    layer_wise = False      # call after_layer_backward during the last pass's backward

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def before_forward(self, last: bool) -> None:
        """A forward/backward pass starts."""

    def after_forward(self, loss, last: bool) -> None:
        """The pass's forward is done; ``loss`` is this worker's (a float, or on the GPU a 0-d float64
        CuPy array: the solver reads losses at check points only)."""

    def after_layer_backward(self, layer_index: int) -> None:
        """The backward of layer ``layer_index`` is done (last pass, ``layer_wise`` only)."""

    def after_backward(self, loss, last: bool):
        """The pass's backward is done: the loss the solver records (here this worker's own), a float
        or a device scalar."""
        return loss

    def agree(self, value):
        """The root worker's ``value`` (a bool, or an action 'none' | 'stop' | 'snapshot')."""
        return value

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


NO_SYNC = GradientSync()
