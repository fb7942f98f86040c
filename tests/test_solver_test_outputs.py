"""Solver.test with test-net outputs of shape (1,): Caffe's examples/pycaffe/layers/pyloss.py reshapes its
loss top to (1,), and NumPy >= 2.4 no longer turns a 1-element 1-d array into a float with float()."""
import textwrap

import numpy as np

import minicaffe as caffe

PYLOSS = '''
import numpy as np
import minicaffe as caffe


class EuclideanLossLayer(caffe.Layer):
    """examples/pycaffe/layers/pyloss.py: the loss top is reshaped to (1,)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if propagate_down[i]:
                bottom[i].diff[...] = (1 if i == 0 else -1) * self.diff / bottom[i].num
'''

SOLVER = """
base_lr: 0.01 lr_policy: "fixed" max_iter: 2 test_iter: 3 test_interval: 1 display: 0
snapshot_after_train: false random_seed: 3
net_param {
  name: "pyloss"
  layer { name: "data" type: "DummyData" top: "x" top: "y"
    dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
      data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
    inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
  layer { name: "loss" type: "Python" bottom: "ip" bottom: "y" top: "loss"
    python_param { module: "%s" layer: "EuclideanLossLayer" } loss_weight: 1 }
}
"""


def test_test_net_output_of_shape_1_is_a_float_score(tmp_path, monkeypatch):
    module = f"pyloss_{abs(hash(str(tmp_path))) % 10 ** 8}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(PYLOSS))
    monkeypatch.syspath_prepend(str(tmp_path))
    solver = caffe.get_solver(SOLVER % module)
    assert solver.test_nets[0].blobs["loss"].data.shape == (1,)
    solver.solve()
    score = solver.test_scores[0]["loss"]
    assert isinstance(score, float) and np.isfinite(score) and score > 0
