"""Net surgery as one call: the VGG paper's dense evaluation and its deeper-from-shallower initialisation.

Caffe users did both by hand (the ``net_surgery`` notebook: rename ``fc6`` to ``fc6-conv``, reshape
the weights, copy them over). Here:

- ``convert_fc_to_conv(net)`` turns the first InnerProduct that reads a C×H×W blob into an H×W
  Convolution and every later InnerProduct into a 1×1 Convolution, with the weights reshaped, so
  the net takes inputs of any size and produces a class score *map*;
- ``dense_scores(conv_net, images, flip)`` runs it and averages that map spatially (and over the
  mirrored image), the VGG paper's dense evaluation;
- ``init_from(target, source, mapping)`` copies chosen layers of a trained (shallower) net into
  another net, checking shapes; by default the paper's recipe: the first four conv layers and the
  last three FC layers.
"""
import numpy as np

from ..errors import NetError, ShapeError, WeightsError
from ..net.network import Net
from ..proto import caffe_pb2

CONV_SUFFIX = "-conv"


# --- net definitions ---------------------------------------------------------------------------

def _is_auto_split(lp):
    return (lp.type == "Split" and lp.name.endswith("_split") and len(lp.bottom) == 1
            and all(t.startswith(lp.name + "_") for t in lp.top))


def strip_splits(param):
    """A copy of ``param`` without the Split layers ``Net`` inserted, bottoms renamed back.

    ``net.param`` is the definition after split insertion; a prototxt written from it should look
    like the one the user wrote.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    rename = {}
    producer = {}                      # blob name -> (new layer, top index)
    for lp in param.layer:
        if _is_auto_split(lp):
            src = rename.get(lp.bottom[0], lp.bottom[0])
            for t in lp.top:
                rename[t] = src
            if len(lp.loss_weight) and lp.loss_weight[0] and src in producer:
                layer, j = producer[src]   # the loss weight moves back to the layer that made the blob
                while len(layer.loss_weight) <= j:
                    layer.loss_weight.append(0)
                layer.loss_weight[j] = lp.loss_weight[0]
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        for j, name in enumerate(new.bottom):
            new.bottom[j] = rename.get(name, name)
        for j, name in enumerate(new.top):
            producer[name] = (new, j)
    return out


def net_definition(net):
    """The net's definition as a user would write it: no automatic splits, no filled-in state."""
    param = strip_splits(net.param)
    param.ClearField("state")
    return param


# --- FC -> convolution -------------------------------------------------------------------------

def _fc_plan(net):
    """{InnerProduct layer name: (channels, kernel_h, kernel_w)} for the layers to convert."""
    plan = {}
    started = False
    for li, lp in enumerate(net.param.layer):
        if lp.type != "InnerProduct":
            continue
        shape = net.bottom_vecs[li][0].shape
        if not started:
            if len(shape) != 4:
                continue
            started = True
        ipp = lp.inner_product_param
        if ipp.axis != 1:
            raise NetError(f"cannot convert to a convolution: inner_product_param axis is {ipp.axis}, "
                           f"only axis 1 (flatten C×H×W) has a convolution equivalent", lp.name, lp.type)
        if len(shape) == 4:
            plan[lp.name] = (shape[1], shape[2], shape[3])
        elif len(shape) == 2:
            plan[lp.name] = (shape[1], 1, 1)
        else:
            raise ShapeError(f"cannot convert to a convolution: input blob '{lp.bottom[0]}' has shape "
                             f"{shape} (needs N×K or N×C×H×W)", lp.name, lp.type)
    if not plan:
        raise NetError(f"net '{net.name}': no InnerProduct layer reads a 4-D (N×C×H×W) blob, so there "
                       f"is nothing to turn into a convolution")
    return plan


def _set_input_shape(param, input_shape):
    """Set the first Input layer's shape: (N, C, H, W), or (H, W) keeping N and C."""
    for lp in param.layer:
        if lp.type == "Input":
            if not len(lp.input_param.shape):
                raise NetError("Input layer has no shape to change", lp.name, lp.type)
            dims = list(lp.input_param.shape[0].dim)
            new = [int(d) for d in input_shape]
            if len(new) == 2 and len(dims) == 4:
                new = dims[:2] + new
            if len(new) != len(dims) or any(d <= 0 for d in new):
                raise ShapeError(f"input_shape {tuple(input_shape)} does not fit the input of shape "
                                 f"{tuple(dims)} (give N,C,H,W or H,W)", lp.name, lp.type)
            del lp.input_param.shape[0].dim[:]
            lp.input_param.shape[0].dim.extend(new)
            return
    raise NetError(f"net '{param.name}': input_shape needs a deploy net with an Input layer "
                   f"(or 'input:'/'input_dim:' fields); this one reads a data layer")


def convert_fc_to_conv(net, input_shape=None):
    """A new Net in which the FC layers are convolutions computing the same function.

    The first InnerProduct whose bottom is N×C×H×W becomes a Convolution with an H×W kernel; every
    later InnerProduct becomes a 1×1 Convolution (num_output kept). Weights N×K are reshaped to
    N×C×H×W (Caffe flattens C×H×W in that order, so the result is exact); biases are copied.
    Converted layers and their output blobs are renamed ``<name>-conv`` as in Caffe's net-surgery
    notebook (``fc6`` -> ``fc6-conv``). ``input_shape`` (N,C,H,W or H,W) sets the Input layer's
    shape; any size at least the training size works, and ``dense_scores`` reshapes per call.
    """
    plan = _fc_plan(net)
    param = strip_splits(net.param)
    param.ClearField("state")
    rename = {}
    for lp in param.layer:
        original_bottoms = list(lp.bottom)
        for j, name in enumerate(lp.bottom):
            lp.bottom[j] = rename.get(name, name)
        if lp.name in plan:
            ipp = caffe_pb2.InnerProductParameter()
            ipp.CopyFrom(lp.inner_product_param)
            _, kh, kw = plan[lp.name]
            lp.name = lp.name + CONV_SUFFIX
            lp.type = "Convolution"
            lp.ClearField("inner_product_param")
            cp = lp.convolution_param
            cp.num_output = ipp.num_output
            if ipp.HasField("bias_term"):
                cp.bias_term = ipp.bias_term
            if kh == kw:
                cp.kernel_size.append(kh)
            else:
                cp.kernel_h, cp.kernel_w = kh, kw
            if ipp.HasField("weight_filler"):
                cp.weight_filler.CopyFrom(ipp.weight_filler)
            if ipp.HasField("bias_filler"):
                cp.bias_filler.CopyFrom(ipp.bias_filler)
            for j, name in enumerate(lp.top):
                rename[name] = name + CONV_SUFFIX
                lp.top[j] = rename[name]
        else:
            for j, name in enumerate(lp.top):
                if name in rename and name not in original_bottoms:
                    del rename[name]           # a later layer reuses the name for a new blob
                lp.top[j] = rename.get(name, name)
    if input_shape is not None:
        _set_input_shape(param, input_shape)

    conv_net = Net(param, net.phase)
    for lp, layer in zip(net.param.layer, net.layers):
        if not layer.blobs:
            continue
        target = conv_net.layer_dict[lp.name + CONV_SUFFIX if lp.name in plan else lp.name]
        for k, blob in enumerate(layer.blobs):
            arr = blob.data
            if lp.name in plan and k == 0 and lp.inner_product_param.transpose:
                arr = arr.T                    # K×N when transpose: true
            target.blobs[k].data[...] = arr.reshape(target.blobs[k].shape)
    return conv_net


# --- dense evaluation ----------------------------------------------------------------------------

def _softmax(x, axis=1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def forward_batch(net, batch, output_blob=None, input_blob=None):
    """Reshape the net's input to ``batch``'s shape, run forward, return a copy of the output blob."""
    name = input_blob or (net.inputs[0] if net.inputs else None)
    if name is None:
        raise NetError(f"net '{net.name}' has no Input layer to feed (use a deploy prototxt)")
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    blob = net.blobs[name]
    if blob.shape != batch.shape:
        blob.reshape(batch.shape)
        net.reshape()
    net.forward(**{name: batch})
    out = output_blob or net.outputs[-1]
    if out not in net.blobs:
        raise NetError(f"net '{net.name}' has no blob named '{out}'")
    return net.blobs[out].data.copy()


def dense_scores(conv_net, image_batch, flip=False, output_blob=None, softmax=False):
    """VGG's dense evaluation: N×K class scores, the output map averaged over its spatial positions.

    ``image_batch`` is N×C×H×W, already preprocessed, of any size the converted net accepts. With
    ``flip=True`` the mirrored images go through too and the two results are averaged. ``softmax``
    turns a raw score map into per-position posteriors first (use it when the net does not end in
    a Softmax layer).
    """
    batch = np.asarray(image_batch, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    n = len(batch)
    if flip:
        batch = np.concatenate([batch, batch[..., ::-1]])
    scores = forward_batch(conv_net, batch, output_blob)
    if softmax:
        scores = _softmax(scores, axis=1)
    if scores.ndim > 2:
        scores = scores.reshape(scores.shape[0], scores.shape[1], -1).mean(axis=2)
    if flip:
        scores = 0.5 * (scores[:n] + scores[n:])
    return scores


# --- initialising one net from another -----------------------------------------------------------

def _layers_of_type(net, types):
    return [lp.name for lp, layer in zip(net.param.layer, net.layers) if lp.type in types and layer.blobs]


def vgg_init_mapping(target_net, source_net, n_conv=4, n_fc=3):
    """The VGG paper's recipe as {target layer: source layer}: the source's first ``n_conv``
    convolutions and last ``n_fc`` InnerProducts.

    Each group goes to the target's layers of the same names when all of them exist there (VGG's
    release naming: A's conv1_1, conv2_1, conv3_1, conv3_2 are D's layers of those names and
    shapes); otherwise to the target's first ``n_conv`` convolutions / last ``n_fc`` InnerProducts
    in forward order.
    """
    mapping = {}
    for kind, first, last in (("Convolution", n_conv, 0), ("InnerProduct", 0, n_fc)):
        src_all = _layers_of_type(source_net, (kind,))
        tgt_all = _layers_of_type(target_net, (kind,))
        src = src_all[:first] if first else (src_all[-last:] if last else [])
        tgt = tgt_all[:first] if first else (tgt_all[-last:] if last else [])
        if src and all(s in tgt_all for s in src):
            mapping.update({s: s for s in src})
        else:
            mapping.update(dict(zip(tgt, src)))
    return mapping


def init_from(target_net, source_net, mapping=None):
    """Copy the parameters of mapped layers ({target name: source name}) from ``source_net``.

    Every pair is checked before anything is copied, so a bad mapping changes nothing. Unmapped
    layers keep what they had (their fillers). Returns ``[(target, source, [shapes])]`` in mapping
    order, for printing.
    """
    if mapping is None:
        mapping = vgg_init_mapping(target_net, source_net)
    plan = []
    for tname, sname in mapping.items():
        if tname not in target_net.layer_dict:
            raise WeightsError(f"init_from: no layer '{tname}' in the target net '{target_net.name}' "
                               f"(mapped from '{sname}')")
        if sname not in source_net.layer_dict:
            raise WeightsError(f"init_from: no layer '{sname}' in the source net '{source_net.name}' "
                               f"(mapped to '{tname}')")
        tl, sl = target_net.layer_dict[tname], source_net.layer_dict[sname]
        if not tl.blobs or not sl.blobs:
            which = f"target layer '{tname}'" if not tl.blobs else f"source layer '{sname}'"
            raise WeightsError(f"init_from: {which} has no parameters to copy ('{sname}' -> '{tname}')")
        if len(tl.blobs) != len(sl.blobs):
            raise WeightsError(f"init_from: source layer '{sname}' has {len(sl.blobs)} parameter blobs, "
                               f"target layer '{tname}' has {len(tl.blobs)}")
        for k, (t, s) in enumerate(zip(tl.blobs, sl.blobs)):
            if t.shape != s.shape:
                raise WeightsError(f"init_from: cannot copy param {k} of source layer '{sname}' "
                                   f"{s.shape} into target layer '{tname}' {t.shape}")
        plan.append((tname, sname, tl, sl))
    copied = []
    for tname, sname, tl, sl in plan:
        for t, s in zip(tl.blobs, sl.blobs):
            t.data[...] = s.data
        copied.append((tname, sname, [b.shape for b in tl.blobs]))
    return copied


def parse_mapping(text):
    """``"conv1_1:conv1_1,fc6:fc6"`` -> {target: source}; a bare ``name`` maps a layer to itself."""
    mapping = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        tgt, _, src = item.partition(":")
        tgt, src = tgt.strip(), (src.strip() or tgt.strip())
        if not tgt:
            raise WeightsError(f"--map: empty layer name in '{item}' (use target:source)")
        mapping[tgt] = src
    return mapping
