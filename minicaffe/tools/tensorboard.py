"""``minicaffe train --tensorboard DIR``: training curves as TensorBoard scalars and histograms.

Written through tensorboardX (the ``tensorboard`` extra: ``pip install 'minicaffe[tensorboard]'``),
a small maintained event-file writer that needs neither TensorFlow nor PyTorch. Scalars:

- ``train/loss`` (the smoothed loss Caffe displays) and ``train/lr``, every iteration;
- ``train_output/<output>`` for each scalar output of the train net (this batch, not smoothed),
  every ``display`` iterations;
- ``test<i>/<output>`` (accuracy, loss...) at each test pass, the means the log shows;
- ``weights/<layer>/<k>`` and ``gradients/<layer>/<k>``: the L2 norm of each learnable blob and of
  its gradient before the update, every ``display`` iterations (each is a pass over the weights, so
  not at every iteration), where exploding or vanishing gradients show first;
- histograms ``weights/<layer>/<k>`` and ``gradients/<layer>/<k>`` of the same blobs' values, at the
  same moments (one host copy of the weights each time: the reason they are not written at every
  iteration).

It hooks the solver only through ``add_callback`` (pycaffe's), so the training loop is unchanged.
"""
import numpy as np

from ..core import backend
from ..errors import MinicaffeError


def _writer(logdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise MinicaffeError("--tensorboard needs tensorboardX: pip install 'minicaffe[tensorboard]' "
                             "(or pip install tensorboardX)") from None
    try:
        return SummaryWriter(logdir=logdir)
    except OSError as exc:
        raise MinicaffeError(f"--tensorboard {logdir}: cannot write there: {exc.strerror or exc}") from None


def _l2(x):
    xp = backend.xp()
    return float(xp.sqrt(xp.sum(xp.square(x.astype(xp.float64)))))


class TensorBoardLogger:
    """Scalars and histograms of one training run into ``logdir`` (see the module docstring)."""

    def __init__(self, solver, logdir):
        self.solver, self.logdir = solver, logdir
        self.writer = _writer(logdir)
        self._seen_scores = {}          # test net id -> the scores dict already written
        self.every = max(int(solver.param.display), 1) if solver.param.display else 20
        solver.add_callback(self.on_start, self.on_gradients)

    def _scalar(self, tag, value, step):
        self.writer.add_scalar(tag, float(value), step)

    def write_test_scores(self):
        """The scores of test passes not yet written (a pass runs before its iteration's callbacks,
        and once more after the last iteration)."""
        for i, scores in dict(self.solver.test_scores).items():
            if self._seen_scores.get(i) is scores:
                continue
            self._seen_scores[i] = scores
            for name, value in (scores or {}).items():
                if np.size(value) == 1:
                    self._scalar(f"test{i}/{name}", np.ravel(value)[0], self.solver.iter)

    def on_start(self):
        self.write_test_scores()

    def on_gradients(self):
        s, it = self.solver, self.solver.iter
        self._scalar("train/loss", s.smoothed_loss, it)
        self._scalar("train/lr", s.lr, it)
        if it % self.every:
            return
        net = s.net
        for name in net.outputs:
            data = net.blobs[name].host_data
            if np.size(data) == 1:
                self._scalar(f"train_output/{name}", np.ravel(data)[0], it)
        for layer_name, layer in zip(net.layer_names, net.layers):
            for k, blob in enumerate(layer.blobs):
                self._scalar(f"weights/{layer_name}/{k}", _l2(blob.xdata), it)
                self._scalar(f"gradients/{layer_name}/{k}", _l2(blob.xdiff), it)
                self.writer.add_histogram(f"weights/{layer_name}/{k}", backend.to_host(blob.xdata), it)
                self.writer.add_histogram(f"gradients/{layer_name}/{k}", backend.to_host(blob.xdiff), it)

    def close(self):
        self.write_test_scores()
        self.writer.close()
