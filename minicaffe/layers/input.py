"""Input and DummyData: layers with no bottoms that only give their tops a shape (and values)."""
from ..core import fillers
from ..proto import caffe_pb2
from ..core.layer import Layer, register


def _shape(layer, blob_shape):
    dims = [int(d) for d in blob_shape.dim]
    if any(d < 0 for d in dims):
        raise layer.error(f"shape {dims} has a negative dimension")
    return dims


@register("Input")
class Input(Layer):
    """Tops shaped by ``input_param.shape`` (one for all tops or one per top); the user fills them.

    Reshape and forward do nothing, so a shape the user sets later (``blob.reshape`` then
    ``net.reshape()``) is kept."""

    exact_num_bottom = 0
    min_num_top = 1
    is_net_input = True

    def setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"input_param gives {len(shapes)} shapes for {len(top)} tops: give one, "
                             f"one per top, or none")
        for i, t in enumerate(top):
            if len(shapes):
                t.reshape(_shape(self, shapes[0 if len(shapes) == 1 else i]))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


@register("DummyData")
class DummyData(Layer):
    """Tops of a fixed shape filled by ``data_filler`` (default constant 0).

    As Caffe: constant fillers fill once at setup; other fillers draw new values at every forward.
    Shapes from ``shape`` or the legacy num/channels/height/width, each given once or per top."""

    is_data_source = True
    exact_num_bottom = 0
    min_num_top = 1

    def setup(self, bottom, top):
        p = self.param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise self.error(f"{len(p.data_filler)} data_filler(s) for {n} tops: give 0, 1 or one per top")
        legacy = len(p.num) or len(p.channels) or len(p.height) or len(p.width)
        if legacy:
            if len(p.shape):
                raise self.error("give either shape or the legacy num/channels/height/width, not both")
            fields = {"num": p.num, "channels": p.channels, "height": p.height, "width": p.width}
            for name, vals in fields.items():
                if len(vals) not in (1, n):
                    raise self.error(f"give '{name}' once or once per top ({n}); got {len(vals)}")
            pick = lambda vals, i: int(vals[0] if len(vals) == 1 else vals[i])  # noqa: E731
            shapes = [[pick(v, i) for v in fields.values()] for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(f"give 'shape' once or once per top ({n}); got {len(p.shape)}")
            shapes = [_shape(self, p.shape[0 if len(p.shape) == 1 else i]) for i in range(n)]
        if len(p.data_filler):
            self.fillers = list(p.data_filler)
        else:
            self.fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        for i, t in enumerate(top):
            t.reshape(shapes[i])
            filler = self._filler(i)
            if self._constant(filler):
                t.xdata = fillers.fill(filler, t.shape, t.dtype, self.name)

    def _filler(self, i):
        return self.fillers[i if len(self.fillers) > 1 else 0]

    @staticmethod
    def _constant(filler):
        return (filler.type or "constant") == "constant"

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for i, t in enumerate(top):
            filler = self._filler(i)
            if not self._constant(filler):
                t.xdata = fillers.fill(filler, t.shape, t.dtype, self.name)


@register("Parameter")
class Parameter(Layer):
    """A learnable blob of ``parameter_param.shape`` as a top, so other layers can take a
    parameter as a bottom. Caffe creates it zero-filled (no filler) and shares it with the top;
    here forward copies it to the top and backward adds the top's gradient to it."""

    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom, top):
        shape = _shape(self, self.param.parameter_param.shape)
        if not self.blobs:
            from ..core.blob import Blob
            self.blobs = [Blob(shape, name=f"{self.name}.param")]
        self.param_propagate_down = [True]
        top[0].reshape(self.blobs[0].shape)

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].xdata = self.blobs[0].xdata.copy()

    def backward(self, top, propagate_down, bottom):
        if self.need_param_grad(0):
            self.blobs[0].xdiff += top[0].xdiff
