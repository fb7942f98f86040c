"""Write ``deploy.prototxt`` and ``train_val.prototxt`` of ResNet-50 in Kaiming He's Caffe layout
(deep-residual-networks).

Layout, as in He's released ``ResNet-50-deploy.prototxt``: conv1 7x7/2 (no bias) + BatchNorm
(``use_global_stats``) + Scale (with bias) + ReLU, all three in place on the convolution's top;
3x3/2 max pool; four stages of bottleneck blocks (3, 4, 6, 3) whose first block has a projection
shortcut (``branch1``, 1x1) and puts the stride 2 of stages 3-5 on the 1x1 ``branch2a`` and on
``branch1``; the block's output is ``Eltwise`` SUM of the shortcut and ``branch2c`` followed by an
in-place ReLU; 7x7 average pool (global at 224x224); fc1000; Softmax ``prob``.

``train_val.prototxt`` is the same net for training, as a Caffe user writes one to train or
fine-tune it: ImageNet ``Data`` layers (TRAIN: mirrored random 224 crops; TEST: centre crops; BGR
mean values as the BVLC reference models), BatchNorm without ``use_global_stats`` (Caffe then
normalises with the batch's statistics in TRAIN and the stored ones in TEST, and the moving
averages are not learned), MSRA fillers for the convolutions (He's initialisation), Scale's default
fillers (gamma 1, beta 0), ``SoftmaxWithLoss`` on fc1000, top-1 / top-5 ``Accuracy`` in TEST.

Both prototxts are generated so that they cannot drift from this description or from each other
(same layer names: a caffemodel trained with one loads into the other); rerun after editing:

    python models/resnet50/make_deploy.py            # rewrites deploy.prototxt and train_val.prototxt

Parameters: convolutions 23,454,912 + fc1000 2,049,000 + Scale (gamma, beta) 53,120 = 25,557,032
learnable values (torchvision's ``resnet50`` count, whose BatchNorm affine is Caffe's Scale); the
BatchNorm layers add 2 x 26,560 running mean/variance values and one moving-average factor each
(53 layers): 53,173 more stored, not learned, so a caffemodel holds 25,610,205 values.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from minicaffe.net_spec import NetSpec, layers as L, params as P  # noqa: E402

STAGES = ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512))   # (stage, blocks, bottleneck width)


def conv_bn(n, bottom, name, bn_name, scale_name, num_output, kernel, stride=1, pad=0, relu=None,
            train=False):
    """Convolution (no bias) + BatchNorm + Scale (+ ReLU), the last three in place. ``train``: MSRA
    filler, and BatchNorm on the batch's statistics in TRAIN (no ``use_global_stats``)."""
    extra = dict(weight_filler=dict(type="msra")) if train else {}
    conv = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                         bias_term=False, **extra)
    setattr(n, name, conv)
    setattr(n, bn_name, L.BatchNorm(conv, in_place=True) if train else
            L.BatchNorm(conv, use_global_stats=True, in_place=True))
    setattr(n, scale_name, L.Scale(conv, bias_term=True, in_place=True))
    if relu:
        setattr(n, relu, L.ReLU(conv, in_place=True))
    return conv


def block(n, bottom, tag, width, stride, project, train=False):
    """Bottleneck ``res<tag>``: 1x1 (stride) -> 3x3 -> 1x1 (4 x width), plus the shortcut."""
    if project:
        shortcut = conv_bn(n, bottom, f"res{tag}_branch1", f"bn{tag}_branch1", f"scale{tag}_branch1",
                           4 * width, 1, stride, train=train)
    else:
        shortcut = bottom
    x = conv_bn(n, bottom, f"res{tag}_branch2a", f"bn{tag}_branch2a", f"scale{tag}_branch2a", width, 1,
                stride, relu=f"res{tag}_branch2a_relu", train=train)
    x = conv_bn(n, x, f"res{tag}_branch2b", f"bn{tag}_branch2b", f"scale{tag}_branch2b", width, 3, 1, 1,
                relu=f"res{tag}_branch2b_relu", train=train)
    x = conv_bn(n, x, f"res{tag}_branch2c", f"bn{tag}_branch2c", f"scale{tag}_branch2c", 4 * width, 1,
                train=train)
    out = L.Eltwise(shortcut, x, operation=P.Eltwise.SUM)
    setattr(n, f"res{tag}", out)
    setattr(n, f"res{tag}_relu", L.ReLU(out, in_place=True))
    return out


def _body(n, data, train=False):
    """conv1 .. fc1000 on ``data``; returns fc1000's top."""
    x = conv_bn(n, data, "conv1", "bn_conv1", "scale_conv1", 64, 7, 2, 3, relu="conv1_relu", train=train)
    n.pool1 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n.pool1
    for stage, blocks, width in STAGES:
        for b in range(blocks):
            tag = f"{stage}{chr(ord('a') + b)}"
            x = block(n, x, tag, width, 2 if (b == 0 and stage > 2) else 1, project=b == 0, train=train)
    n.pool5 = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    extra = dict(weight_filler=dict(type="gaussian", std=0.01), bias_filler=dict(type="constant", value=0)) \
        if train else {}
    n.fc1000 = L.InnerProduct(n.pool5, num_output=1000, **extra)
    return n.fc1000


def resnet50(batch=1):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, 224, 224]))
    n.prob = L.Softmax(_body(n, n.data))
    proto = n.to_proto()
    proto.name = "ResNet-50"
    return proto


MEAN_BGR = (104, 117, 123)      # the BVLC reference models' ImageNet mean values


def resnet50_train_val(train_batch=32, test_batch=10):
    """The training net: the TEST Data layer is inserted after the TRAIN one (NetSpec names one
    layer per top; Caffe's ImageNet train_vals have two ``data`` layers told apart by phase)."""
    from minicaffe.proto import caffe_pb2
    n = NetSpec()
    n.data, n.label = L.Data(ntop=2, include=dict(phase=caffe_pb2.TRAIN),
                             transform_param=dict(mirror=True, crop_size=224, mean_value=list(MEAN_BGR)),
                             data_param=dict(source="examples/imagenet/ilsvrc12_train_lmdb",
                                             batch_size=train_batch, backend=P.Data.LMDB))
    fc = _body(n, n.data, train=True)
    n.loss = L.SoftmaxWithLoss(fc, n.label)
    n.accuracy_top1 = L.Accuracy(fc, n.label, include=dict(phase=caffe_pb2.TEST))
    n.accuracy_top5 = L.Accuracy(fc, n.label, include=dict(phase=caffe_pb2.TEST),
                                 accuracy_param=dict(top_k=5))
    proto = n.to_proto()
    proto.name = "ResNet-50"
    test = caffe_pb2.LayerParameter()
    test.CopyFrom(proto.layer[0])
    test.include[0].phase = caffe_pb2.TEST
    test.transform_param.mirror = False
    test.data_param.source = "examples/imagenet/ilsvrc12_val_lmdb"
    test.data_param.batch_size = test_batch
    layers = list(proto.layer)
    del proto.layer[:]
    proto.layer.extend([layers[0], test] + layers[1:])
    return proto


def main():
    from minicaffe.fileio import atomic_write
    atomic_write(os.path.join(HERE, "deploy.prototxt"), str(resnet50()).encode())
    atomic_write(os.path.join(HERE, "train_val.prototxt"), str(resnet50_train_val()).encode())


if __name__ == "__main__":
    main()
