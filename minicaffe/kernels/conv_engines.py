"""The faster ways of computing Convolution, Deconvolution and Im2col, and where each one pays.

The layers (``minicaffe/layers/conv.py``) keep Caffe's arithmetic once, as a plain reference; the
engines here compute the same numbers faster for some shapes, and ``engines.choose`` picks one at
reshape from this table (``engine: CAFFE`` picks the reference):

====================  ===========  ==========================================================  =====
engine                devices      DEFAULT picks it for                                        prio
====================  ===========  ==========================================================  =====
winograd              cpu          Convolution 3x3/1, >= 64 input channels (and, grouped,       40
                                   >= 64 of each in a group: CaffeNet's conv4/5), output
                                   maps >= 13x13, >= 48 4x4 output tiles per batch (32 when
                                   the pool splits its GEMMs, 24 at one BLAS thread: VGG,
                                   ResNet, GoogLeNet 3x3s), unless ``MINICAFFE_WINOGRAD=0``; its
                                   data gradient too where that pays (pad <= 2), its weight
                                   gradient from 64 4x4 tiles; 5x5/1 (F(3x3, 5x5), F(2x2, 5x5)
                                   without Numba) forward and data gradient on groups of >= 32
                                   -> 96 channels, maps >= 20², >= 1024 2x2 tiles (CaffeNet
                                   conv2, GoogLeNet 3b/5x5), its weight gradient on groups of
                                   >= 48 -> 128 (CaffeNet conv2);
                                   Deconvolution 3x3/1 and 5x5/1 where its forward (a data
                                   gradient) pays
gemm_1x1              cpu, gpu     1x1 kernels without padding: stride 1 anywhere, strided on   30
                                   the CPU from ``DIRECT_1X1_MIN_COLUMNS`` output positions
im2col_channels_last  cpu          Convolution forward, kernels > 1x1 on maps < 48 wide with    25
                                   >= 1024 output positions in the batch: position-major
                                   columns, the GEMM's inner dimension contiguous
im2col_bands          cpu          forward over wide maps, a band of output rows at a time      20
im2col_batch_last     cpu          narrow maps (<= 16 wide, stride_w 1, batch >= 4)             20
im2col                cpu          everything else                                              10
cuda_im2col           gpu          everything else                                              10
cudnn                 gpu          every 2-D shape, where cuDNN 9 is installed (``cudnn_conv``)  50
====================  ===========  ==========================================================  =====

Every engine computes in the convolution's *forward orientation* (input ``cin`` channels ->
output ``cout`` channels, weights ``cout x cin/group x kh x kw``), described by a ``ConvShape``,
with two calls:

* ``forward(x, w, y=None, grad_src=None, dw=None)``: ``y[...] = conv(x, w)`` when ``y`` is given;
  ``dw += rows(grad_src) @ cols(x)^T`` when ``dw`` is;
* ``backward(dy, w, dx=None, x=None, dw=None)``: ``dx[...] = conv^T(dy, w)`` when ``dx`` is given;
  ``dw += rows(dy) @ cols(x)^T`` when ``dw`` is.

Convolution calls them as they are; Deconvolution the other way round (its forward is the
convolution's data gradient), as Caffe's ``DeconvolutionLayer`` reuses ``BaseConvolutionLayer``.
Both halves of a call share their column matrix, so a weight gradient next to a data gradient
costs one im2col, not two. On the CPU the copies around the GEMMs (im2col, col2im, the transposes
of the output side) are split over the kernels' thread pool (``core/threads.py``) while each GEMM
runs on all of BLAS's threads. The specialised engines (winograd, gemm_1x1, bands,
channels_last) do only part of the work their own way and leave the rest to the column code, in
the layout DEFAULT would use.

Each engine also says where it is *correct* (``computes``), a wider set than where it pays
(``applies``), so the tests run every engine against the reference on small shapes. Tuning knobs
(chunk and band sizes) are build options, not module state: tests reach ragged chunks and bands
with ``engines.force(layer, name, max_col_elements=1)``.
"""

import os

import numpy as np

from ..core import backend
from ..core import context as _context
from ..core import blas, threads
from ..core.threads import parallel_copyto
from ..proto import caffe_pb2
from . import compiled, cuda_im2col, cudnn_conv, engines, space_to_depth, winograd
from .engines import Engine, register
from .im2col import (COL, col2im, col2im_batch_last, im2col, im2col_batch_last, im2col_channels_last,
                     im2col_rows, images_per_chunk, padded_source, workspace)

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_ROWS = _context.Slot("rows")                       # a band of output rows before it is scattered
_WGRAD = _context.Slot("wgrad")                     # a chunk's weight gradient before it is added
_WGRAD_PARTS = _context.Slot("wgrad_parts")         # the partial weight gradients of _weight_grad_in_parts
_WINOGRAD_FILTERS = _context.Slot("wino_filters")   # transformed filters (the im2col COL is shared)
_CL_FILTERS = _context.Slot("cl_filters")           # weights permuted to (cout, kh, kw, cin/group)
_GROUP_X, _GROUP_DY = _context.Slot("group_x"), _context.Slot("group_dy")   # a group's channels, contiguous

# Largest column matrix (in elements) built at once; bigger batches are processed in chunks of
# images so memory stays bounded (Caffe builds one image at a time; we build as many as fit).
MAX_COL_ELEMENTS = 1 << 26

# A convolution's forward GEMM on the CPU runs over bands of output rows whose column matrix has
# about this many elements (2 MiB of float32: written by im2col and read by the GEMM while still in
# cache), but at least COL_BAND_MIN_COLUMNS columns so each GEMM stays efficient. Measured to
# help on wide maps only (VGG's 224 and 112, AlexNet's conv1: 10-20%); from 56 down it does not.
COL_BAND_ELEMENTS = 1 << 19
COL_BAND_MIN_COLUMNS = 1024
COL_BAND_MIN_WIDTH = 48

# On the CPU, convolutions of horizontal stride 1 whose output rows are at most this wide (LeNet's
# conv2, GoogLeNet's 14 and 7, CaffeNet's 13) put the batch axis last in the column matrix,
# ``(C, kh, kw, oh, ow, N)``, when the batch has at least BATCH_LAST_MIN_NUM images: im2col and
# col2im then move runs of ``ow * N`` values instead of rows of ``ow``, 2-5x faster at these sizes
# (NumPy's per-row overhead dominates). With a horizontal stride the runs would be N long only:
# slower at small batches, so those keep the batch-first layout.
BATCH_LAST_MAX_WIDTH = 16
BATCH_LAST_MIN_NUM = 4

# On the CPU, a strided 1x1 convolution without padding gathers its input's strided view and
# multiplies each image's (C, oh*ow) (as stride 1 always does) when the map has at least this many
# output positions; smaller maps keep im2col and one GEMM over the whole batch's columns. Measured
# on ResNet-50's 1x1/2 layers at batch 10, one thread: per image is 8-12% faster at 28x28 and 14x14
# outputs, one GEMM 10% faster at 7x7 (the per-image GEMMs are too thin there).
DIRECT_1X1_MIN_COLUMNS = 196

# On the CPU, the forward of a convolution with a kernel larger than 1x1 over maps narrower than
# COL_BAND_MIN_WIDTH builds position-major columns (ChannelsLastConv) when the batch has at least
# this many output positions. Measured forward, one thread, against the engine picked before
# (interleaved, medians): AlexNet conv2 5x5 g2 at 27² 0.87-0.92x (batch 4-32), GoogLeNet 3a/5x5
# 0.82x, 3a/3x3 0.88x, 3b/5x5 0.91x, CaffeNet conv3/conv4 at 13² batch 32 0.89-0.95x, a ResNet
# 3x3/2 at 28² 0.88-0.92x; 14² at batch 4 (784 positions) the same, 7² at batch 4 1.06-1.10x
# (the GEMMs are too thin); wide maps lose to the bands (GoogLeNet conv1 1.22x, conv2 1.04x).
CHANNELS_LAST_MIN_COLUMNS = 1024

# The strided first layers over wide maps (channels_last_strided_wide) build their position-major
# columns in chunks of at least one image and at most about this many elements (4 MiB of float32;
# one image of GoogLeNet's conv1 is 1.8M): no more memory than the bands' column buffer plus an
# image's. Forward ms at batch 10, TEST phase, bands against these columns (interleaved, best of 7,
# benchmarks/bench_layers.py shapes): at two threads (the default here) GoogLeNet/ResNet 7x7/2
# 37-41 against 29-31, CaffeNet 11x11/4 37-41 against 20-21; at one thread 50 against 48 and 36
# against 32. Whole-batch columns were no faster and took GoogLeNet's inference peak over OpenCV's.
# TRAIN, batch 32/16, two threads: CaffeNet conv1 87 -> 58 ms, GoogLeNet conv1 69 -> 50 ms.
CHANNELS_LAST_WIDE_COL_ELEMENTS = 1 << 20


# The position-major forward (ChannelsLastConv) computes ``columns @ weights^T`` when a group has
# fewer output channels than this (OpenBLAS is faster that way round on thin outputs: GoogLeNet's
# 3a/5x5, 32 outputs), ``weights @ columns^T`` otherwise (its output copy is a block copy, not a
# transpose).
CHANNELS_LAST_TRANSPOSED_MAX_OUT = 64

# Where Winograd pays: from WINOGRAD_MIN_CHANNELS input channels, on output maps of WINOGRAD_MIN_SIZE
# and more, with at least WINOGRAD_MIN_TILES 4x4 output tiles in the batch (the rows of its GEMMs).
# Forward ms, one thread, CPU time (benchmarks/bench_layers.py --engines default,winograd:tile=2,
# winograd:tile=4 --forward-only --clock process --median --repeat 7, MINICAFFE_WINOGRAD=0 so that
# "default" is what DEFAULT picks without Winograd; runs interleaved; docs/performance.md):
#
#   layer (batch)               default  F(2x2)  F(4x4)     layer (batch)             default  F(2x2)  F(4x4)
#   VGG conv1_2 64 224² (2)       113.0   108.2    69.0     VGG conv1_2 (8)             527.2   567.2   331.9
#   VGG conv2_1 64 112² (2)        50.3    49.6    31.7     VGG conv2_1 (8)             246.2   238.4   141.1
#   VGG conv2_2 128 112² (2)      113.2    83.7    50.0     VGG conv3_2 256 56² (8)     385.8   274.3   151.7
#   VGG conv3_2 256 56² (2)        92.8    61.4    37.6     VGG conv4_2 512 28² (8)     321.7   210.9   121.4
#   VGG conv4_2 512 28² (2)        81.8    54.1    43.6     VGG conv5_2 512 14² (8)      85.3    59.2    52.8
#   VGG conv5_2 512 14² (2)        21.8    21.0    23.7     ResNet 64 56² (8)            37.7    38.3    32.3
#   GoogLeNet conv2 64 56² (2)     18.6    17.4    12.7     ResNet 128 28² (8)           27.1    25.5    19.1
#   GoogLeNet 3a 96 28² (2)         5.8     5.2     5.1     ResNet 256 14² (8)           24.1    20.3    19.3
#   ResNet 256 14² (2)              6.3     6.5     6.9     ResNet 512 7² (8)            21.8    29.2    28.8
#   ResNet 512 7² (2)               7.3    13.0    20.0     CaffeNet conv3 256 13² (8)   29.3    26.7    25.6
#
# So: 64-channel layers pay too now (the transforms are GEMMs, winograd.py), 1.2-1.75x; 128-512
# channels 1.1-2.65x, F(4x4) ahead of F(2x2) everywhere it pays; 7x7 maps lost (a 4x4 tile there is
# 1.3x padding, and few tiles make thin GEMMs); below ~64 tiles the GEMMs were too thin to gain.
#
# Since the transforms became stacked GEMMs (winograd._stacked_gemm; ResNet-50's 3x3 layers at batch
# 10 1.1-1.5x faster at one thread, 1.1-1.95x at two), re-measured at fewer tiles: TEST-phase forward,
# F(4x4) / DEFAULT's im2col engine, interleaved in one process, medians of 11 (one thread, CPU
# time) or 15 (two threads, wall clock), load 1.5-2.5 from other jobs (docs/performance.md):
#
#   layer (batch, 4x4 tiles)         1 thread   2 threads
#   ResNet 512->512 7² (10, 40)        0.68       0.95
#   ResNet 512->512 7² (8, 32)         0.81       0.97
#   ResNet 512->512 7² (6, 24)         0.86       1.15
#   ResNet 512->512 7² (4, 16)         1.16          -
#   GoogLeNet 5a 160->320 7² (10, 40)  0.94       1.55
#   GoogLeNet 5b 192->384 7² (10, 40)  0.86       1.57
#   ResNet 256->256 14² (3, 48)        0.68       0.79
#   ResNet 256->256 14² (2, 32)        0.96       1.43
#   VGG 512->512 14² (2, 32)           0.75       0.98
#   ResNet 256->256 14² (1, 16)        1.20          -
#
# So at one BLAS thread Winograd pays from 24 tiles; at more threads, where im2col's one large GEMM
# splits well over BLAS's threads and Winograd's 36 thin ones do not, from 48 tiles. Maps from
# 13x13 either way: 7x7 maps at most break even at two threads, and at one, where they gain
# (ResNet-50's three 512-channel ones ~9 ms each at batch 10), their filter caches (the transformed
# filters, 4x the weights, and a copy of the weights) would add 141 MB and take ResNet-50's
# one-thread inference peak (323 MB) above OpenCV's (463 MB; measured 476 MB with them).
#
# Since the transform GEMMs run side by side on the kernels' pool, BLAS at one thread each
# (core/blas.py), Winograd's thin GEMMs run as fast at two threads as at one, and it pays from
# fewer tiles there too: forward ms, 2 cores, Winograd / columns: VGG 512->512 14² at batch 2
# (32 tiles) 10.1 / 12.1, 256->256 14² at batch 2 (32) 3.2 / 3.6, 512->512 14² at batch 1 (16)
# 6.7 / 6.7. So WINOGRAD_SPLIT_MIN_TILES when the pool has more than one thread.
# Im2colConv._accumulate_wgrad: a chunk's weight gradient as rows(dy) @ cols(x)^T into a scratch
# array, then added, where the chunk has up to this many output positions (the GEMMs' K); with more,
# as (cols(x) @ rows(dy)^T)^T. Measured on 2 cores, ms, this way / the other: K = 392 (ResNet-50's
# 7x7 maps at batch 8) 512 x 4608 11.0 / 20.5, 2048 x 512 4.9 / 7.8; K = 1568 (14x14) 256 x 2304
# 10.6 / 11.7; K = 6272 128 x 1152 12.3 / 11.1; K = 25088 64 x 576 14.3 / 12.8.
WGRAD_ROWS_FIRST_MAX_K = 4096

# Gemm1x1Conv._weight_grad_by_image: a 1x1 layer's weight gradient as one GEMM an image, BLAS adding
# into the sum (beta = 1: blas.add_product), the batch in WGRAD_BY_IMAGE_PARTS fixed groups of images
# side by side on the pool, where an image has WGRAD_BY_IMAGE_MIN_COLUMNS output positions
# (WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS strided: each image's sampled positions are gathered first);
# smaller maps keep one GEMM over transposed copies of dy and x (Im2colConv). Before BLAS could add
# into the sum, maps of 2048 positions and more went an image after the other through a scratch
# product, the rest through the transposed copies. Measured on 2 cores (Intel Xeon), the weight
# gradient alone beside a data gradient, ms, medians of 9-15 interleaved: ResNet-50 at batch 8,
# transposed copies (or, at 56x56, an image after the other) / groups of images: 56x56 64->256
# 4.6 / 3.9-4.1, 256->64 6.1 / 4.2-4.5, 64->64 1.9 / 1.5; 28x28 128->512 4.8 / 3.7, 512->128 5.0 /
# 3.9; 14x14 256->1024 4.0 / 3.5; strided 56x56 -> 28x28 256->512 8.6 / 7.5, 256->128 3.5 / 3.0;
# 28x28 -> 14x14 512->1024 7.2 / 7.0, 1024->512 at 14x14 -> 7x7 2.4 / 3.4 (the gathers cost more
# than they save: not there); 7x7 512->2048 3.9 / 4.8 (thin GEMMs: not there either). GoogLeNet's
# 14x14 at batch 16: 480->192 3.0 / 2.6, 512->112 2.5 / 1.9. One image after the other with BLAS's
# threads inside each GEMM was in between (3.9 at 7x7, 4.1 on 480->192 14x14 at batch 8).
WGRAD_BY_IMAGE_PARTS = 2
WGRAD_BY_IMAGE_MIN_COLUMNS = 196
WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS = 784

# Im2colConv._weight_grad_in_parts: a weight gradient with no data gradient beside it (a net's first
# layer) runs its chunks of images (the whole batch split in this many, where it is one chunk) in
# this many fixed groups, side by side on the pool, BLAS at one thread each, each group into its own
# partial sum. Each chunk's GEMM has few outputs and a long inner dimension (GoogLeNet's conv1: 147 x
# 64 over 12544 positions an image), which BLAS splits poorly over its threads; and the columns and
# dy's transposed copies of the groups are made side by side too. Measured on 2 cores, the GEMMs
# alone, GFLOP/s, groups / one chunk after the other: GoogLeNet's conv1 at batch 16 126 / 76, VGG-16's
# conv1_1 (27 x 64 over 50176) at batch 4 52 / 43, CaffeNet's conv1 (363 x 96 over 3025) at batch 32
# 164 / 162. The whole weight gradient, medians of 7 interleaved rounds, ms: GoogLeNet's conv1 48.1 /
# 64.9, ResNet-50's (batch 8) 24.2 / 33.0, CaffeNet's 75.5 / 109.7, VGG-16's conv1_1 20.8 / 23.4.
# The groups do not depend on the thread count, so neither do the bits. 1: chunk after chunk, as
# with a data gradient.
WGRAD_PARTS = 4

WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_SIZE = 13
WINOGRAD_MIN_TILES = 48
WINOGRAD_ONE_THREAD_MIN_TILES = 24
WINOGRAD_SPLIT_MIN_TILES = 32

# The data gradient's thresholds (below): measured before the stacked transforms, unchanged.
WINOGRAD_BACKWARD_MIN_SIZE = 13
WINOGRAD_BACKWARD_MIN_TILES = 64

# Where the data gradient through Winograd pays (WinogradConv ``data_grad``; a convolution of dy,
# ``cout`` channels in, ``cin`` out) against col2im(W^T dy): from WINOGRAD_BACKWARD_MIN_CHANNELS input channels on maps of WINOGRAD_BACKWARD_MIN_SIZE and more,
# with WINOGRAD_BACKWARD_MIN_TILES. Measured on VGG-16's layers, batch 4, one thread, the whole backward
# (data + weight gradient), Winograd / columns, interleaved, CPU time, medians of 5-9, two runs
# (docs/performance.md, "Winograd in backward"): 0.85-0.96 from conv1_2 (64->64, 224²) to conv5_2
# (512->512, 14²); widening layers pay less or lose, the more so the fewer channels: conv2_1
# (64->128) 1.05-1.15, GoogLeNet's conv2 (64->192) 1.13, conv3_1 (128->256) 0.92-0.97. Why: the
# transforms' memory traffic grows with dy's ``cout`` channels, the col2im they replace with
# ``cin``, while the GEMM work saved grows with both. At two threads, once the F(4x4) transforms
# were split over the kernels' pool: VGG-16 forward + backward at batch 4, 2788 ms with it against
# 3086 ms without (0.90x, medians of 5 interleaved rounds, every round faster, load 1.2), so it is
# no longer kept to one thread. Widening layers (cout > cin) were left to the columns until the weight
# gradient moved to Winograd too: their column data gradient then no longer shares the transposed
# dy with the weight gradient, and measured again (2 cores, the layer's backward, Winograd / columns
# data gradient, medians of 5 interleaved rounds) Winograd pays there as well: VGG-16 (batch 4)
# conv2_1 64->128 0.71, conv3_1 0.63, conv4_1 0.64; GoogLeNet (batch 16) conv2/3x3 64->192
# 0.74-0.81, inception 3a/3b 0.60-0.67, its 14x14 ones 0.69-1.03; CaffeNet (batch 32) conv3 256->384
# 13x13 0.78. So up to WINOGRAD_BACKWARD_MAX_WIDENING (cout / cin; 3 is the most measured), and
# ``bench_engine_ab.py --set WINOGRAD_BACKWARD_MAX_WIDENING=1`` measures it against the columns.
WINOGRAD_BACKWARD_MIN_CHANNELS = 64
WINOGRAD_BACKWARD_MAX_WIDENING = 3

# Where the weight gradient through Winograd (winograd.weight_gradient; WinogradConv ``weight_grad``)
# pays against the columns' (im2col + GEMM): from WINOGRAD_WEIGHT_GRAD_MIN_TILES 4x4 tiles of the
# output map in the batch, on maps of WINOGRAD_WEIGHT_GRAD_MIN_SIZE and more. Measured on 2 cores,
# the layer's whole backward, Winograd weight gradient / columns' (docs/performance.md, "Winograd
# weight gradient"): VGG-16 at batch 4, 224² to 28² (196 tiles and more) 0.58-0.91; ResNet-50 at
# batch 8, 56² and 28² 0.71-1.0; GoogLeNet at batch 16, 56² and 28² 0.78-0.96. Those first runs
# had the kernels' pool at one thread (bench_engine_ab.py imported NumPy before minicaffe), which
# runs the Winograd transforms on one core, and 14x14 maps (a 4x4 tile grid covers 16x16: 31% of
# the work is padding) did not pay reliably there. With the pool at two threads they do: VGG conv5
# at 64 tiles 0.77-0.85, ResNet-50's 256->256 at 128 tiles 0.70-0.90, GoogLeNet's 4a-4e at 256
# tiles 0.86-1.01, CaffeNet's conv3 (13x13, 512 tiles) 0.81. So from 64 tiles (the fewest
# measured) on any map the forward's Winograd runs on (WINOGRAD_MIN_SIZE).
WINOGRAD_WEIGHT_GRAD_MIN_TILES = 64
WINOGRAD_WEIGHT_GRAD_MIN_SIZE = 13

# 5x5 stride-1 kernels through Winograd F(2x2, 5x5) (winograd._forward2x5): the forward and the data
# gradient where a group has WINOGRAD5_MIN_IN_CHANNELS inputs and WINOGRAD5_MIN_OUT_CHANNELS outputs,
# on maps of WINOGRAD5_MIN_SIZE and more, with WINOGRAD5_MIN_TILES 2x2 output tiles in the batch.
# Measured on 2 cores, one layer, medians of 5 interleaved rounds, ms, columns (the engine DEFAULT
# picked before) / Winograd:
#   CaffeNet conv2 (96 -> 256, group 2, 27², batch 32) forward 126.1 / 88.7, data gradient
#   119.5 / 96.4; at batch 10 (TEST) forward 37.2 / 27.4;
#   GoogLeNet 3b/5x5 (32 -> 96, 28², batch 16) forward 17.9 / 14.9, data gradient 21.3 / 16.1;
#   not on thinner or smaller layers (GoogLeNet at batch 16): 3a (16 -> 32, 28²) 6.1 / 6.8
#   forward; 4a-4d (16-32 -> 48-64, 14²) 2.4-4.7 / 3.6-5.1; 4e (32 -> 128, 14²) 6.0 / 5.7 and a
#   slower data gradient; 5a/5b (7²) 2.1-4.3 / 3.3-4.6.
# Its weight gradient (F(5x5, 2x2)) computed but did not pay: the whole backward of conv2 243 / 227
# with / without it, GoogLeNet's 3b 40.6 / 34.3 (now F(5x5, 3x3) where the compiled kernels run,
# and it pays on CaffeNet's conv2: WINOGRAD5_WEIGHT_GRAD_*).
# Since then the forward and the data gradient go F(3x3, 5x5) where the compiled kernels run
# (winograd.tile_size): 7x7 input tiles, 49 products a 3x3 block of outputs where F(2x2) makes 81,
# and CaffeNet's 27x27 maps split into 3x3 tiles with no padding. The layer alone, 2 cores, ms,
# F(2x2) / F(3x3) (the columns): CaffeNet conv2 at batch 32 forward 71.6 / 44.2 (111.1), data
# gradient 77.8 / 52.7 (100.2); at batch 10 forward 19.1 / 12.5; GoogLeNet 3b/5x5 at batch 16
# forward 11.1 / 8.3, data gradient 11.5 / 9.4. The whole CaffeNet at batch 32 (bench_engine_ab.py
# --set F3X5_MIN_TILES=1000000000, medians of 5 interleaved rounds): forward 244 -> 224 ms, conv2's
# backward 155 -> 135. The thresholds below were not moved: at 14x14 and below F(3x3) still loses
# to the columns, and GoogLeNet's thin 3a/5x5 (16 -> 32) gained 0.8 ms in its backward, no more
# than the noise of the whole net.
WINOGRAD5_MIN_IN_CHANNELS = 32
WINOGRAD5_MIN_OUT_CHANNELS = 96

# The 5x5 weight gradient through F(5x5, 3x3) (winograd.weight_gradient: the input's 7x7 tiles as in
# the F(3x3, 5x5) forward, dy's 3x3 blocks, 49 GEMMs summing over the tiles) where the forward pays
# and a group has WINOGRAD5_WEIGHT_GRAD_MIN_IN_CHANNELS inputs and WINOGRAD5_WEIGHT_GRAD_MIN_OUT_CHANNELS
# outputs. The weight gradient alone, 2 cores, ms, columns / F(5x5, 3x3): CaffeNet conv2 (48 -> 128
# a group, 27²) at batch 32 78.6 / 65.0, at batch 16 36.9 / 28.5; GoogLeNet 3b/5x5 (32 -> 96, 28²)
# at batch 16 10.8 / 11.7, at batch 32 21.3 / 24.8 (its GEMMs' 96 x 32 outputs are too small).
# F(5x5, 2x2) lost on all four (CaffeNet conv2 at batch 32 106-109). Its float32 error against a
# float64 reference, of max|dW|, on CaffeNet conv2's shapes at batch 8: 1.4e-5 (F(5x5, 2x2) 5.8e-6,
# the 3x3 F(3x3, 4x4) 4.3e-6, the columns 4e-7). Since dy's tiles run channels last
# (winograd.GRAD_TILES_CHANNELS_LAST) 3b/5x5 pays too: its whole backward in GoogLeNet at batch 16
# (bench_engine_ab.py --set WINOGRAD5_WEIGHT_GRAD_MIN_IN_CHANNELS=16 --set
# WINOGRAD5_WEIGHT_GRAD_MIN_OUT_CHANNELS=32, medians of 5) 24.6 with the columns' weight gradient,
# 20.5 with F(5x5, 3x3); no other 5x5 layer of the four nets changed engine (48 -> 128 before).
WINOGRAD5_WEIGHT_GRAD_MIN_IN_CHANNELS = 32
WINOGRAD5_WEIGHT_GRAD_MIN_OUT_CHANNELS = 96
WINOGRAD5_MIN_SIZE = 20
WINOGRAD5_MIN_TILES = 1024


class ConvShape:
    """A (de)convolution as the engines see it, in the convolution's forward orientation: ``num``
    images of ``cin`` channels, ``in_hw`` -> ``cout`` channels, ``out_hw``, in ``group`` groups."""

    __slots__ = ("geom", "group", "cin", "cout", "in_hw", "out_hw", "num")

    def __init__(self, geom, group, cin, cout, in_hw, out_hw, num):
        self.geom, self.group, self.cin, self.cout = geom, group, cin, cout
        self.in_hw, self.out_hw, self.num = tuple(in_hw), tuple(out_hw), num

    @property
    def kg(self):
        """GEMM inner size per group."""
        return self.cin // self.group * self.geom.kh * self.geom.kw

    @property
    def og(self):
        """Output channels per group."""
        return self.cout // self.group

    @property
    def columns(self):
        """Output positions per image."""
        return self.out_hw[0] * self.out_hw[1]

    def key(self):
        g = self.geom
        return ((g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw), self.group, self.cin, self.cout,
                self.in_hw, self.out_hw, self.num)


# --- where each engine is correct and where it pays ------------------------------------------------

def _is_cpu():
    return engines.current_device() == "cpu"


def batch_last_pays(s):
    """Narrow maps, stride_w 1, a batch of at least BATCH_LAST_MIN_NUM (see the constants)."""
    return (not s.geom.is_1x1 and s.geom.sw == 1 and s.out_hw[1] <= BATCH_LAST_MAX_WIDTH
            and s.num >= BATCH_LAST_MIN_NUM)


def _band_rows(s):
    """Output rows per band: about COL_BAND_ELEMENTS of columns, at least COL_BAND_MIN_COLUMNS."""
    ow = s.out_hw[1]
    per_row = s.cin * s.geom.kh * s.geom.kw * s.num * ow
    return max(COL_BAND_ELEMENTS // per_row, -(-COL_BAND_MIN_COLUMNS // (s.num * ow)), 1), per_row


def bands_pay(s):
    """Wide maps (COL_BAND_MIN_WIDTH and more) that split into two bands or more, each within
    MAX_COL_ELEMENTS."""
    band, per_row = _band_rows(s)
    return (s.out_hw[1] >= COL_BAND_MIN_WIDTH and band * 2 <= s.out_hw[0]
            and band * per_row <= MAX_COL_ELEMENTS)


def direct_1x1_computes(s):
    g = s.geom
    return g.kh == 1 and g.kw == 1 and g.ph == 0 and g.pw == 0


def direct_1x1_pays(s):
    """Stride 1 always (no im2col at all); strided on the CPU from DIRECT_1X1_MIN_COLUMNS positions."""
    g = s.geom
    if not direct_1x1_computes(s):
        return False
    return (g.sh == 1 and g.sw == 1) or (_is_cpu() and s.columns >= DIRECT_1X1_MIN_COLUMNS)


def channels_last_pays(s):
    """Kernels larger than 1x1 on maps narrower than COL_BAND_MIN_WIDTH with at least
    CHANNELS_LAST_MIN_COLUMNS output positions in a batch; and strided ones on wide maps
    (``channels_last_strided_wide``). Other wide maps keep the bands."""
    g = s.geom
    if g.kh == 1 and g.kw == 1:
        return False
    if s.out_hw[1] < COL_BAND_MIN_WIDTH:
        return s.num * s.columns >= CHANNELS_LAST_MIN_COLUMNS
    return channels_last_strided_wide(s)


def channels_last_strided_wide(s):
    """A strided kernel larger than 1x1 over an output map at least COL_BAND_MIN_WIDTH wide: the
    first layers of AlexNet/CaffeNet (11x11/4), GoogLeNet and ResNet (7x7/2). Their position-major
    columns go in chunks of CHANNELS_LAST_WIDE_COL_ELEMENTS (see there)."""
    g = s.geom
    return (g.kh > 1 or g.kw > 1) and (g.sh > 1 or g.sw > 1) and s.out_hw[1] >= COL_BAND_MIN_WIDTH


def channels_last_transposed(s):
    """Whether the position-major forward computes positions x cout (see ChannelsLastConv)."""
    return s.og < CHANNELS_LAST_TRANSPOSED_MAX_OUT


def _blas_threads():
    """The BLAS thread count the context's switches name (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or
    MKL_NUM_THREADS), else the number of cores (OpenBLAS's own default)."""
    text = (_context.current().switches.blas_threads or "").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else (os.cpu_count() or 1)


def _groups_wide(s):
    """A grouped layer goes to Winograd (group by group) only with WINOGRAD_MIN_CHANNELS outputs a
    group as well: measured on CaffeNet's conv4 and conv5 (192 -> 192 and 192 -> 128 a group, 13x13,
    batch 32, 2 cores, Winograd / columns, medians of 5 interleaved rounds: forward 32.6 / 56.4 and
    26.1 / 42.2 ms; backward with Winograd's data gradient 87.1 / 110.9 and 64.4 / 83.6, and with
    its weight gradient too 82.6 / 91.9 and 66.3 / 75.8 against that), not on thin groups, whose
    GEMMs would be a few columns wide."""
    return s.group == 1 or s.cout // s.group >= WINOGRAD_MIN_CHANNELS


def winograd5_pays(s):
    """A 5x5/1 layer as wide and as large as WINOGRAD5_MIN_* say (forward and data gradient alike),
    unless MINICAFFE_WINOGRAD=0."""
    if not (winograd.applies(s.geom, s.group) and s.geom.kh == 5 and len(s.out_hw) == 2):
        return False
    oh, ow = s.out_hw
    return (s.cin // s.group >= WINOGRAD5_MIN_IN_CHANNELS and s.cout // s.group >= WINOGRAD5_MIN_OUT_CHANNELS
            and min(oh, ow) >= WINOGRAD5_MIN_SIZE and s.num * -(-oh // 2) * -(-ow // 2) >= WINOGRAD5_MIN_TILES
            and _context.current().switches.winograd)


def winograd_pays(s):
    """5x5/1 as ``winograd5_pays`` says; 3x3/1, from WINOGRAD_MIN_CHANNELS input channels (a
    group's, with as many outputs a group: ``_groups_wide``) on maps of WINOGRAD_MIN_SIZE and more,
    with WINOGRAD_MIN_TILES 4x4 output tiles in the batch (WINOGRAD_ONE_THREAD_MIN_TILES at one
    BLAS thread, WINOGRAD_SPLIT_MIN_TILES when the kernels' pool splits the transform GEMMs),
    unless MINICAFFE_WINOGRAD=0 (the context's switch, read at start-up)."""
    if s.geom.kh == 5:
        return winograd5_pays(s)
    if not (winograd.applies(s.geom, s.group) and len(s.out_hw) == 2):
        return False
    oh, ow = s.out_hw
    if _blas_threads() == 1:
        min_tiles = WINOGRAD_ONE_THREAD_MIN_TILES
    elif threads.size() > 1:
        min_tiles = WINOGRAD_SPLIT_MIN_TILES       # the transform GEMMs split over the pool
    else:
        min_tiles = WINOGRAD_MIN_TILES
    return (s.cin // s.group >= WINOGRAD_MIN_CHANNELS and _groups_wide(s) and min(oh, ow) >= WINOGRAD_MIN_SIZE
            and s.num * -(-oh // 4) * -(-ow // 4) >= min_tiles and _context.current().switches.winograd)


def winograd_backward_computes(s):
    """Whether Winograd computes the data gradient: the forward's shapes with pads up to k - 1 (the
    gradient's own pad is ``k - 1 - p`` for a k x k kernel)."""
    g = s.geom
    return winograd.applies(g, s.group) and g.ph <= g.kh - 1 and g.pw <= g.kw - 1


def winograd_weight_grad_pays(s):
    """Where the Winograd weight gradient beats the columns': 3x3, WINOGRAD_WEIGHT_GRAD_MIN_TILES
    4x4 tiles of the output map in the batch, maps of WINOGRAD_WEIGHT_GRAD_MIN_SIZE and more; 5x5
    (F(5x5, 3x3)) where the forward pays on groups of WINOGRAD5_WEIGHT_GRAD_MIN_IN_CHANNELS ->
    WINOGRAD5_WEIGHT_GRAD_MIN_OUT_CHANNELS; unless MINICAFFE_WINOGRAD=0. (It runs only where the
    compiled kernels do: ``WinogradConv._weight_grad_left``.)"""
    if s.geom.kh == 5:
        return (winograd5_pays(s) and s.cin // s.group >= WINOGRAD5_WEIGHT_GRAD_MIN_IN_CHANNELS
                and s.cout // s.group >= WINOGRAD5_WEIGHT_GRAD_MIN_OUT_CHANNELS)
    if not (winograd.applies(s.geom, s.group) and s.geom.kh == 3 and len(s.out_hw) == 2
            and _groups_wide(s)):
        return False
    oh, ow = s.out_hw
    return (min(oh, ow) >= WINOGRAD_WEIGHT_GRAD_MIN_SIZE and _context.current().switches.winograd
            and s.num * -(-oh // 4) * -(-ow // 4) >= WINOGRAD_WEIGHT_GRAD_MIN_TILES)


def winograd_backward_pays(s):
    """Where the Winograd data gradient beats col2im(W^T dy): up to WINOGRAD_BACKWARD_MAX_WIDENING, from
    WINOGRAD_BACKWARD_MIN_CHANNELS input channels on maps of WINOGRAD_BACKWARD_MIN_SIZE and more, with
    WINOGRAD_BACKWARD_MIN_TILES 4x4 tiles of the input's map in the batch (see the constants), unless
    MINICAFFE_WINOGRAD=0; a 5x5 where its forward pays (``winograd5_pays``)."""
    if not (winograd_backward_computes(s) and len(s.in_hw) == 2):
        return False
    if s.geom.kh == 5:
        return winograd5_pays(s)
    h, w = s.in_hw
    return (s.cin // s.group >= WINOGRAD_BACKWARD_MIN_CHANNELS and _groups_wide(s)
            and s.cout <= WINOGRAD_BACKWARD_MAX_WIDENING * s.cin
            and min(h, w) >= WINOGRAD_BACKWARD_MIN_SIZE
            and s.num * -(-h // 4) * -(-w // 4) >= WINOGRAD_BACKWARD_MIN_TILES and _context.current().switches.winograd)


# A strided layer run as a stride-1 3x3 Winograd over its input's blocks (SpaceToDepthWinogradConv)
# from this many channels once blocked (cin * stride^2) and WINOGRAD_MIN_TILES 4x4 tiles in the batch.
SPACE_TO_DEPTH_MIN_CHANNELS = 16


def space_to_depth_pays(s):
    """A layer ``space_to_depth.applies`` to, SPACE_TO_DEPTH_MIN_CHANNELS channels once blocked,
    WINOGRAD_MIN_TILES tiles, the compiled kernels on, unless MINICAFFE_WINOGRAD=0."""
    if not (space_to_depth.applies(s.geom, s.group) and len(s.out_hw) == 2 and compiled.enabled()):
        return False
    oh, ow = s.out_hw
    return (s.cin * s.geom.sh * s.geom.sw >= SPACE_TO_DEPTH_MIN_CHANNELS
            and s.num * -(-oh // 4) * -(-ow // 4) >= WINOGRAD_MIN_TILES and _context.current().switches.winograd)


# --- the engines ------------------------------------------------------------------------------------

class Im2colConv:
    """im2col + one GEMM per group over a chunk of images (as many as fit in ``max_col_elements``).

    Columns are ``(C, kh, kw, N, oh, ow)`` (batch first) or, with ``batch_last``, ``(C, kh, kw, oh,
    ow, N)`` (CPU; chunks of fewer than BATCH_LAST_MIN_NUM images stay batch first). On the GPU
    (``device="gpu"``) im2col and col2im are the CUDA kernels of ``cuda_im2col``."""

    def __init__(self, shape, device="cpu", batch_last=False, max_col_elements=MAX_COL_ELEMENTS):
        self.s = shape
        self.gpu = device == "gpu"
        self.batch_last = bool(batch_last) and not self.gpu
        self.max_col_elements = max_col_elements
        if self.gpu:
            self._im2col, self._col2im = cuda_im2col.im2col, cuda_im2col.col2im
        else:
            self._im2col, self._col2im = im2col, col2im

    def _groups(self):
        og, kg = self.s.og, self.s.kg
        for g in range(self.s.group):
            yield slice(g * og, (g + 1) * og), slice(g * kg, (g + 1) * kg)

    def _each_group(self, fn):
        """``fn(i, go, gk)`` for each group ``i`` (its output-channel and column slices). The groups'
        GEMMs are independent: on the CPU they run side by side on the kernels' pool, BLAS at one
        thread each (core/blas.py). Large GEMMs already split well over BLAS's threads, so the gain
        is small: CaffeNet's 2-group layers at batch 32 on 2 cores, forward + backward ms, split /
        not: conv2 (5x5) 347 / 349, conv4 159 / 167, conv5 116 / 123."""
        groups = list(enumerate(self._groups()))
        if self.gpu or len(groups) == 1:
            for i, (go, gk) in groups:
                fn(i, go, gk)
            return
        blas.parallel_gemms(len(groups), lambda a, b: [fn(i, go, gk) for i, (go, gk) in groups[a:b]])

    def _chunks(self, num):
        g = self.s.geom
        step = images_per_chunk(self.s.cin * g.kh * g.kw * self.s.columns, num, self.max_col_elements)
        for n0 in range(0, num, step):
            yield n0, min(num, n0 + step)

    def _last(self, n):
        """Whether a chunk of ``n`` images puts the batch axis last."""
        return self.batch_last and n >= BATCH_LAST_MIN_NUM

    def _rows(self, xp, a, batch_last):
        """(n, cout, oh, ow) -> (cout, n*oh*ow), the GEMM layout of an output-side array (columns
        ordered (oh, ow, n) with ``batch_last``)."""
        n = a.shape[0]
        s = self.s
        oh, ow = s.out_hw
        if batch_last:
            buf = workspace(xp, (s.cout, oh, ow, n), a.dtype, _ROWS)
            parallel_copyto(buf, a.transpose(1, 2, 3, 0))
        else:
            buf = workspace(xp, (s.cout, n, oh, ow), a.dtype, _ROWS)
            parallel_copyto(buf, a.transpose(1, 0, 2, 3))
        return buf.reshape(s.cout, n * s.columns)

    def _cols(self, x, batch_last):
        s = self.s
        if batch_last:
            col = im2col_batch_last(x, s.geom, s.out_hw)
        else:
            col = self._im2col(x, s.geom, s.out_hw)
        return col.reshape(s.cin * s.geom.kh * s.geom.kw, x.shape[0] * s.columns)

    def _accumulate_wgrad(self, rows, col2, dw):
        dw2 = dw.reshape(self.s.cout, self.s.kg)
        rows_first = rows.shape[1] <= WGRAD_ROWS_FIRST_MAX_K

        def group(i, go, gk):
            if self.gpu:
                dw2[go] += rows[go] @ col2[gk].T
            elif rows_first:
                # few positions, a large gradient: the product in the gradient's own layout, then
                # a contiguous add (the other way round wrote a new transposed array and added it
                # through strides: WGRAD_ROWS_FIRST_MAX_K)
                part = workspace(np, (self.s.og, self.s.kg), dw.dtype, _WGRAD)   # this thread's own
                blas.matmul(rows[go], col2[gk].T, out=part)
                dw2[go] += part
            else:
                # (col2 rows^T)^T: OpenBLAS is up to 1.4x faster this way round on small
                # layers (LeNet's conv2: 2.4 against 3.4 ms) and with many positions
                dw2[go] += (col2[gk] @ rows[go].T).T
        self._each_group(group)

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        """``y[...] = conv(x, w)`` when ``y`` is given; ``dw += rows(grad_src) @ cols(x)^T`` when ``dw`` is."""
        if y is None and dw is None:
            return
        xp = backend.get_array_module(x)
        s = self.s
        w2 = w.reshape(s.cout, s.kg)
        oh, ow = s.out_hw
        for n0, n1 in self._chunks(x.shape[0]):
            n = n1 - n0
            last = self._last(n)
            col2 = self._cols(x[n0:n1], last)
            if y is not None:
                rows = workspace(xp, (s.cout, n * s.columns), x.dtype, _ROWS)
                self._each_group(lambda i, go, gk: blas.matmul(w2[go], col2[gk], out=rows[go]))
                if last:
                    parallel_copyto(y[n0:n1], rows.reshape(s.cout, oh, ow, n).transpose(3, 0, 1, 2))
                else:
                    parallel_copyto(y[n0:n1], rows.reshape(s.cout, n, oh, ow).transpose(1, 0, 2, 3))
            if dw is not None:
                self._accumulate_wgrad(self._rows(xp, grad_src[n0:n1], last), col2, dw)

    def forward_images(self, x, w, y, finish):
        """``y[...] = conv(x, w)``, then ``finish(i0, i1)`` on images ``i0..i1`` of ``y`` (an
        inference-time epilogue, kernels/fusion.py): here after the whole forward, over the
        kernels' pool; an engine that computes an image at a time calls it image by image, while
        the image's output is in cache."""
        self.forward(x, w, y=y)
        threads.parallel_for(y.shape[0], finish, work=y.size * 2)

    def backward(self, dy, w, dx=None, x=None, dw=None):
        """``dx[...] = conv^T(dy, w)`` when ``dx`` is given; ``dw += rows(dy) @ cols(x)^T`` when ``dw`` is."""
        num = dy.shape[0]
        if dx is None and dw is not None and isinstance(dy, np.ndarray) and num > 1 and WGRAD_PARTS > 1:
            # no data gradient asked for (a net's first layer)
            chunks = list(self._chunks(num))
            if len(chunks) == 1:        # the batch in WGRAD_PARTS chunks, so that every group has one
                step = -(-num // WGRAD_PARTS)
                chunks = [(n, min(num, n + step)) for n in range(0, num, step)]
            self._weight_grad_in_parts(dy, x, dw, chunks)
            return
        self._backward_columns(dy, w, dx, x, dw)

    def _backward_columns(self, dy, w, dx, x, dw):
        """``backward`` through the columns, chunk after chunk (engines that compute the data
        gradient their own way call it for the weight gradient alone)."""
        if dx is None and dw is None:
            return
        xp = backend.get_array_module(dy)
        s = self.s
        g = s.geom
        w2 = w.reshape(s.cout, s.kg)
        oh, ow = s.out_hw
        for n0, n1 in self._chunks(dy.shape[0]):
            n = n1 - n0
            last = self._last(n)
            rows = self._rows(xp, dy[n0:n1], last)
            if dw is not None:
                self._accumulate_wgrad(rows, self._cols(x[n0:n1], last), dw)
            if dx is not None:
                # the column buffer is free again: the weight gradient is done with it
                shape = (s.cin, g.kh, g.kw, oh, ow, n) if last else (s.cin, g.kh, g.kw, n, oh, ow)
                dcol = workspace(xp, shape, dy.dtype, COL)
                dcol2 = dcol.reshape(s.cin * g.kh * g.kw, n * s.columns)
                self._each_group(lambda i, go, gk: blas.matmul(w2[go].T, rows[go], out=dcol2[gk]))
                if last:
                    col2im_batch_last(dcol, g, s.in_hw, out=dx[n0:n1])
                else:
                    self._col2im(dcol, g, s.in_hw, out=dx[n0:n1])


    def _weight_grad_in_parts(self, dy, x, dw, chunks):
        """``dw += rows(dy) @ cols(x)^T`` over ``chunks`` (CPU, no data gradient): the chunks in
        WGRAD_PARTS fixed groups, each group's sum in its own partial, the groups side by side on the
        pool with BLAS at one thread each (``blas.parallel_gemms``), then the partials added to
        ``dw`` in order (see WGRAD_PARTS)."""
        parts = min(len(chunks), WGRAD_PARTS)
        bounds = [len(chunks) * k // parts for k in range(parts + 1)]
        partial = workspace(np, (parts,) + self._partial_weight_grad_shape(dw), dw.dtype, _WGRAD_PARTS)
        partial.fill(0)

        def groups(k0, k1):
            for k in range(k0, k1):
                for n0, n1 in chunks[bounds[k]:bounds[k + 1]]:
                    self._chunk_weight_grad(dy, x, n0, n1, partial[k])
        blas.parallel_gemms(parts, groups)
        for k in range(parts):
            self._add_partial_weight_grad(partial[k], dw)

    # the three steps of _weight_grad_in_parts that an engine with its own columns' layout changes
    def _partial_weight_grad_shape(self, dw):
        return dw.shape

    def _chunk_weight_grad(self, dy, x, n0, n1, out):
        """``out += rows(dy) @ cols(x)^T`` over images ``n0..n1``, ``out`` in the partials' shape."""
        last = self._last(n1 - n0)
        self._accumulate_wgrad(self._rows(np, dy[n0:n1], last), self._cols(x[n0:n1], last), out)

    def _add_partial_weight_grad(self, part, dw):
        dw += part


class BandedConv(Im2colConv):
    """The forward (without a weight gradient) a band of output rows at a time over the whole batch,
    so each band's column matrix is still in cache when its GEMM reads it (CPU). The rest as
    ``Im2colConv``, batch first (bands pay on wide maps, batch-last on narrow ones)."""

    def __init__(self, shape, band_rows=None, max_col_elements=MAX_COL_ELEMENTS):
        super().__init__(shape, max_col_elements=max_col_elements)
        band, per_row = _band_rows(shape)
        band = band if band_rows is None else band_rows
        self.band = max(1, min(band, max_col_elements // per_row, shape.out_hw[0]))

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        if y is None or dw is not None:
            return super().forward(x, w, y, grad_src, dw)
        s = self.s
        g, num = s.geom, x.shape[0]
        oh, ow = s.out_hw
        k = s.cin * g.kh * g.kw
        w2 = w.reshape(s.cout, s.kg)
        src = padded_source(x, g)
        bands = [(y0, min(oh, y0 + self.band)) for y0 in range(0, oh, self.band)]

        def run(b0, b1):
            for y0, y1 in bands[b0:b1]:
                cols = (y1 - y0) * ow * num
                col2 = im2col_rows(src, g, s.out_hw, y0, y1).reshape(k, cols)
                rows = workspace(np, (s.cout, cols), x.dtype, _ROWS)
                self._each_group(lambda i, go, gk: blas.matmul(w2[go], col2[gk], out=rows[go]))
                parallel_copyto(y[:, :, y0:y1], rows.reshape(s.cout, num, y1 - y0, ow).transpose(1, 0, 2, 3))
        # the bands side by side on the pool, BLAS at one thread each (core/blas.py): VGG's
        # conv1_1 (3 -> 64 channels, a GEMM of K = 27), 2 cores: batch 2 6.8 -> 5.7 ms, batch 4
        # 13.7 -> 11.4 ms
        blas.parallel_gemms(len(bands), run)


class Gemm1x1Conv(Im2colConv):
    """1x1 kernels without padding: the forward is a GEMM per image straight on the blob (on its
    strided view gathered into a buffer when strided), and the data gradient too (strided: into a
    buffer scattered onto the sampled positions): no column matrix, no transposed copy of the
    output. The weight gradient an image at a time as well on maps large enough
    (``_weight_grad_by_image``), otherwise as ``Im2colConv``."""

    def __init__(self, shape, *args, **kwargs):
        super().__init__(shape, *args, **kwargs)
        self.wgrad_by_image = self._weight_grad_by_image_pays()     # decided once, as engines are

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        if y is not None:
            if self.s.group == 1 and isinstance(x, np.ndarray):
                self.forward_images(x, w, y, None)     # the images side by side on the pool
            else:
                self._direct_forward(x, w, y)
        if dw is not None:
            super().forward(x, w, None, grad_src, dw)

    def forward_images(self, x, w, y, finish):
        """An image's GEMM, then ``finish`` on it while it is in cache (the same GEMM calls as the
        batched ``matmul`` of ``forward``): ResNet-50's 1x1 layers with their bias, ReLU and
        Eltwise sum took 17.2 ms on 10x64x56x56 -> 256 as the batched GEMM and the separate
        passes, 10.0 ms this way (2 cores). The images run side by side on the kernels' pool,
        each GEMM on one BLAS thread (``blas.parallel_gemms``), so the epilogues run in parallel too.
        ``finish`` None: the GEMMs alone (``forward``)."""
        s = self.s
        if s.group != 1 or not isinstance(x, np.ndarray):
            return super().forward_images(x, w, y, finish)
        g, num = s.geom, x.shape[0]
        oh, ow = s.out_hw
        w2 = w.reshape(s.cout, s.kg)
        y3 = y.reshape(num, s.cout, s.columns)
        strided = g.sh != 1 or g.sw != 1

        def images(i0, i1):
            for i in range(i0, i1):
                if strided:
                    src = workspace(np, (s.cin, oh, ow), x.dtype, COL)     # this thread's own
                    parallel_copyto(src, x[i, :, :oh * g.sh:g.sh, :ow * g.sw:g.sw])
                    xi = src.reshape(s.cin, s.columns)
                else:
                    xi = x[i].reshape(s.cin, s.columns)
                blas.matmul(w2, xi, out=y3[i])
                if finish is not None:
                    finish(i, i + 1)
        # the images side by side on the pool, BLAS at one thread each (core/blas.py)
        blas.parallel_gemms(num, images)

    def _direct_forward(self, x, w, y):
        xp = backend.get_array_module(x)
        s = self.s
        g, num = s.geom, x.shape[0]
        w2 = w.reshape(s.cout, s.kg)
        src = x
        if g.sh != 1 or g.sw != 1:
            oh, ow = s.out_hw
            src = workspace(xp, (num, s.cin, oh, ow), x.dtype, COL)
            parallel_copyto(src, x[:, :, :oh * g.sh:g.sh, :ow * g.sw:g.sw])
        x3 = src.reshape(num, s.cin, s.columns)
        y3 = y.reshape(num, s.cout, s.columns)
        if s.group == 1:
            blas.matmul(w2, x3, out=y3)
        else:
            cg = s.cin // s.group
            for i, (go, _) in enumerate(self._groups()):
                y3[:, go] = blas.matmul(w2[go], x3[:, i * cg:(i + 1) * cg])

    def adds_data_gradient(self):
        """Whether ``backward`` takes ``add_dx``: stride 1, one group, on the CPU."""
        g = self.s.geom
        return g.sh == 1 and g.sw == 1 and self.s.group == 1 and not self.gpu

    def backward(self, dy, w, dx=None, x=None, dw=None, add_dx=False):
        """``add_dx`` (where ``adds_data_gradient``): the data gradient added into ``dx`` (a
        Split's sum: kernels/train_fusion.Conv1x1SplitSumChain), an image's GEMM with BLAS adding
        (beta = 1), instead of written."""
        s = self.s
        g = s.geom
        if add_dx and not (self.adds_data_gradient() and isinstance(dy, np.ndarray)):
            raise ValueError("this 1x1 engine adds its data gradient only at stride 1, one group, on the CPU")
        if dw is not None and self.wgrad_by_image and blas.adds_products(dy, x, dw):
            self._weight_grad_by_image(dy, x, dw)
            dw = None
        if dx is not None and (g.sh != 1 or g.sw != 1) and s.group == 1 and isinstance(dy, np.ndarray):
            # strided: the data gradient is W^T dy at the sampled positions, zero elsewhere (the
            # column path's col2im adds the same values into a zeroed dx): an image a GEMM into a
            # buffer, copied into the strided view, side by side on the pool
            self._strided_data_grad(dy, w, dx)
            self._backward_columns(dy, w, None, x, dw)
            return
        direct = dx is not None and g.sh == 1 and g.sw == 1
        if direct:
            xp = backend.get_array_module(dy)
            num = dy.shape[0]
            w2 = w.reshape(s.cout, s.kg)
            dy3 = dy.reshape(num, s.cout, s.columns)
            dx3 = dx.reshape(num, s.cin, s.columns)
            if add_dx:
                def add_images(i0, i1):
                    for i in range(i0, i1):
                        if not blas.add_product(w2.T, dy3[i], dx3[i]):
                            dx3[i] += blas.matmul(w2.T, dy3[i])
                blas.parallel_gemms(num, add_images)
            elif s.group == 1 and xp is np:
                # an image's GEMM each, side by side on the pool (core/blas.py)
                blas.parallel_gemms(num, lambda i0, i1: blas.matmul(w2.T, dy3[i0:i1], out=dx3[i0:i1]))
            elif s.group == 1:
                blas.matmul(w2.T, dy3, out=dx3)
            else:
                cg = s.cin // s.group
                for i, (go, _) in enumerate(self._groups()):
                    dx3[:, i * cg:(i + 1) * cg] = blas.matmul(w2[go].T, dy3[:, go])
        if direct:
            self._backward_columns(dy, w, None, x, dw)
        else:
            super().backward(dy, w, dx, x, dw)

    def _weight_grad_by_image_pays(self):
        """One group, and WGRAD_BY_IMAGE_MIN_COLUMNS output positions an image
        (WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS strided)."""
        s = self.s
        strided = s.geom.sh != 1 or s.geom.sw != 1
        return s.group == 1 and s.columns >= (WGRAD_BY_IMAGE_STRIDED_MIN_COLUMNS if strided
                                              else WGRAD_BY_IMAGE_MIN_COLUMNS)

    def _weight_grad_by_image(self, dy, x, dw):
        """``dw += sum_i dy_i x_i^T``, an image's GEMM each on the blobs' own arrays (a strided
        layer's x_i gathered from its sampled positions into a buffer first), BLAS adding into the
        sum itself (``blas.add_product``, beta = 1): no transposed copies of dy and x, no scratch
        product. The batch goes in WGRAD_BY_IMAGE_PARTS fixed groups of images side by side on the
        pool (BLAS at one thread each), each group into its own partial, the partials then added in
        order: the sums' order is fixed by the batch, not by the thread count. See
        WGRAD_BY_IMAGE_PARTS for the measurements."""
        s = self.s
        g, num = s.geom, dy.shape[0]
        oh, ow = s.out_hw
        strided = g.sh != 1 or g.sw != 1
        x3 = None if strided else x.reshape(num, s.cin, s.columns)
        dy3 = dy.reshape(num, s.cout, s.columns)

        def images(i0, i1, out):
            for i in range(i0, i1):
                if strided:
                    buf = workspace(np, (s.cin, oh, ow), x.dtype, COL)     # this thread's own
                    np.copyto(buf, x[i, :, :oh * g.sh:g.sh, :ow * g.sw:g.sw])
                    xi = buf.reshape(s.cin, s.columns)
                else:
                    xi = x3[i]
                if not blas.add_product(dy3[i], xi.T, out):
                    out += dy3[i] @ xi.T

        dw2 = dw.reshape(s.cout, s.kg)
        parts = min(num, WGRAD_BY_IMAGE_PARTS)
        if parts <= 1:
            images(0, num, dw2)
            return
        bounds = [num * k // parts for k in range(parts + 1)]
        partial = workspace(np, (parts,) + dw2.shape, dw.dtype, _WGRAD_PARTS)
        partial.fill(0)
        blas.parallel_gemms(parts, lambda k0, k1: [images(bounds[k], bounds[k + 1], partial[k])
                                                    for k in range(k0, k1)])
        for k in range(parts):
            dw2 += partial[k]

    def _strided_data_grad(self, dy, w, dx):
        s = self.s
        g, num = s.geom, dy.shape[0]
        oh, ow = s.out_hw
        w2t = w.reshape(s.cout, s.kg).T
        dy3 = dy.reshape(num, s.cout, s.columns)

        def images(i0, i1):
            buf = workspace(np, (s.cin, oh, ow), dy.dtype, COL)     # this thread's own
            for i in range(i0, i1):
                blas.matmul(w2t, dy3[i], out=buf.reshape(s.cin, s.columns))
                dx[i].fill(0)
                dx[i, :, :oh * g.sh:g.sh, :ow * g.sw:g.sw] = buf
        blas.parallel_gemms(num, images)


class ChannelsLastConv(Im2colConv):
    """The forward (without a weight gradient) on position-major columns, ``(N·oh·ow, kh·kw·C/G)``
    per group (``im2col_channels_last``), whose GEMM inner dimension is contiguous: OpenBLAS runs
    that GEMM 10-35% faster than on channel-major columns (AlexNet's conv2, GoogLeNet's 28x28
    layers), and the copy into the columns moves runs of ``kw·C/G`` values, not of ``ow``. The
    weights are permuted to the columns' (kh, kw, c) order on each call (they change every
    iteration in training; the copy is ``1/(N·oh·ow)`` of the GEMM's work).

    ``transposed`` computes ``columns @ weights^T`` (positions x cout, then transposed into the
    output per image) instead of ``weights @ columns^T`` (cout x positions, copied out by blocks
    of ``oh·ow``): OpenBLAS favours it when ``cout/group`` is small. The gradients as
    ``Im2colConv`` (their GEMMs reduce over positions, which channel-major columns keep
    contiguous), in the layout DEFAULT would use."""

    def __init__(self, shape, batch_last=False, transposed=None, max_col_elements=MAX_COL_ELEMENTS):
        super().__init__(shape, batch_last=batch_last, max_col_elements=max_col_elements)
        self.transposed = channels_last_transposed(shape) if transposed is None else bool(transposed)
        # a weight gradient alone on position-major columns (see _chunk_weight_grad)
        self.position_major_wgrad = channels_last_strided_wide(shape)

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        if y is None or dw is not None:
            return super().forward(x, w, y, grad_src, dw)
        s = self.s
        g = s.geom
        cg, kg = s.cin // s.group, s.kg
        wp = workspace(np, (s.cout, g.kh, g.kw, cg), w.dtype, _CL_FILTERS)
        np.copyto(wp, w.reshape(s.cout, cg, g.kh, g.kw).transpose(0, 2, 3, 1))
        w2 = wp.reshape(s.cout, kg)
        chunks = list(self._chunks(x.shape[0]))

        def run(k0, k1):
            for n0, n1 in chunks[k0:k1]:
                self._forward_chunk(x, w2, y, n0, n1)
        # several chunks (the strided first layers run an image a chunk): side by side on the
        # pool, BLAS at one thread each (core/blas.py), each with its thread's own columns
        blas.parallel_gemms(len(chunks), run)

    def _forward_chunk(self, x, w2, y, n0, n1):
        s = self.s
        kg, p = s.kg, s.columns
        n = n1 - n0
        col = im2col_channels_last(x[n0:n1], s.geom, s.out_hw, s.group).reshape(s.group, n * p, kg)
        if self.transposed:
            rows = workspace(np, (n * p, s.cout), x.dtype, _ROWS)
            self._each_group(lambda i, go, gk: blas.matmul(col[i], w2[go].T, out=rows[:, go]))
            parallel_copyto(y[n0:n1].reshape(n, s.cout, p), rows.reshape(n, p, s.cout).transpose(0, 2, 1))
        else:
            # one image's (cout, positions) is its output already: no buffer, no copy (the
            # strided first layers run an image a chunk, and their buffer added to the peak). An
            # image's columns whole, not a band of output rows at a time so that a band stays in
            # cache: since the GEMM writes the output itself the bands were slower or no faster
            # (medians of 9 interleaved, 2 cores, bands / whole, TRAIN: CaffeNet's conv1 at batch 32
            # 46.2 / 43.3 ms with OpenBLAS 0.3.31, 44.7 / 39.7 with 0.3.29, 41.3 / 35.8 with MKL;
            # GoogLeNet's at batch 16 34.3 / 34.9, 31.8 / 31.3, 29.6 / 24.3; ResNet-50's at batch 8
            # 16.3 / 16.2, 15.4 / 14.6, 13.7 / 12.2)
            one = n == 1 and y[n0].flags.c_contiguous
            rows = y[n0].reshape(s.cout, p) if one else workspace(np, (s.cout, n * p), x.dtype, _ROWS)
            self._each_group(lambda i, go, gk: blas.matmul(w2[go], col[i].T, out=rows[go]))
            if not one:
                parallel_copyto(y[n0:n1].reshape(n, s.cout, p),
                                rows.reshape(s.cout, n, p).transpose(1, 0, 2))

    # A weight gradient with no data gradient (a first layer: channels_last_strided_wide) on the
    # forward's position-major columns, an image's GEMM at a time, BLAS adding into the partial, in
    # Im2colConv._weight_grad_in_parts's fixed groups. Why: the channel-major columns of Im2colConv
    # move runs of one value for these strided kernels, and their GEMM reads its inner dimension
    # across rows. The partials are (cout, kh, kw, C/G), permuted into the weights' order as they are
    # added. Measured, 2 cores, the layer's backward, medians of 9 interleaved, channel-major /
    # position-major ms: CaffeNet's conv1 at batch 32 50.6 / 40.1 with OpenBLAS 0.3.31 (NumPy 2.4),
    # 46.3 / 35.6 with MKL; GoogLeNet's at batch 16 31.6 / 29.1 and 30.4 / 25.0; ResNet-50's at
    # batch 8 16.3 / 14.9 and 16.1 / 13.3.
    def _partial_weight_grad_shape(self, dw):
        if not self.position_major_wgrad:
            return dw.shape
        g = self.s.geom
        return (self.s.cout, g.kh, g.kw, self.s.cin // self.s.group)

    def _chunk_weight_grad(self, dy, x, n0, n1, out):
        s = self.s
        if not self.position_major_wgrad:
            return super()._chunk_weight_grad(dy, x, n0, n1, out)
        p, n = s.columns, n1 - n0
        col = im2col_channels_last(x[n0:n1], s.geom, s.out_hw, s.group).reshape(s.group, n, p, s.kg)
        out2 = out.reshape(s.cout, s.kg)
        for j in range(n):
            rows = dy[n0 + j].reshape(s.cout, p)
            for i, (go, _) in enumerate(self._groups()):
                if not blas.add_product(rows[go], col[i, j], out2[go]):
                    out2[go] += blas.matmul(rows[go], col[i, j])

    def _add_partial_weight_grad(self, part, dw):
        if self.position_major_wgrad:
            dw += part.transpose(0, 3, 1, 2)
        else:
            dw += part


def _contiguous(a, slot):
    """``a`` copied into the scratch of ``slot`` (C-contiguous), over the kernels' pool."""
    out = workspace(np, a.shape, a.dtype, slot)
    parallel_copyto(out, a)
    return out


class WinogradConv(Im2colConv):
    """Winograd F(4x4, 3x3) or F(2x2, 3x3) for the forward of a 3x3 kernel, F(3x3, 5x5) or F(2x2,
    5x5) for a 5x5 one (``winograd``; the tile size from ``winograd.tile_size``, or the ``tile``
    option), with
    ``data_grad`` for the data gradient and with ``weight_grad`` for the weight gradient
    (``winograd.weight_gradient``: F(3x3, 4x4) or F(5x5, 2x2), where the compiled kernels run);
    otherwise as ``Im2colConv``.

    The data gradient of a k x k stride-1 convolution with pad ``p`` is itself a k x k stride-1
    convolution, of ``dy`` with the filters flipped in both spatial axes and their two channel axes
    swapped, with pad ``k - 1 - p`` (each input pixel gathers the outputs whose windows cover it, the
    window seen from the other side): so ``winograd.forward`` computes it, for pads up to k - 1
    (``winograd_backward_computes``), with the tile size picked for the input's map. Deconvolution's
    forward is that data gradient, so it gets the same path; its data gradient is the convolution's
    forward (Winograd when no weight gradient shares the call's column matrix).

    The transformed filters (forward, flipped) are kept between calls in a TEST net, whose weights
    rarely change, and redone in scratch space in a TRAIN net, whose weights change every iteration.
    ``data_grad``: None (DEFAULT) uses Winograd for the data gradient where it pays
    (``winograd_backward_pays``); True or False forces it (True only where it computes).
    ``weight_grad``: the same for the weight gradient (``winograd_weight_grad_pays``; it computes
    wherever the forward does)."""

    def __init__(self, shape, phase, batch_last=False, max_col_elements=MAX_COL_ELEMENTS, band_rows=None,
                 tile=None, data_grad=None, weight_grad=None):
        super().__init__(shape, batch_last=batch_last, max_col_elements=max_col_elements)
        self.train = phase == caffe_pb2.TRAIN
        self.band = band_rows
        taps = shape.geom.kh
        forced = tile in ((2, 4) if taps == 3 else (2, 3))      # a tile size this kernel has
        self.tile = (tile if forced else winograd.tile_size(shape.num, shape.out_hw[0], shape.out_hw[-1], taps))
        self.grad_tile = (tile if forced else winograd.tile_size(shape.num, shape.in_hw[0], shape.in_hw[-1], taps))
        # the transformed filters a TEST net keeps, forward and flipped, a pair per group (a grouped
        # layer runs its groups one after the other)
        self.caches = [winograd.FilterCache() for _ in range(shape.group)]
        self.flipped_caches = [winograd.FilterCache() for _ in range(shape.group)]
        if data_grad is None:
            data_grad = winograd_backward_pays(shape)
        elif data_grad and not winograd_backward_computes(shape):
            raise ValueError(f"Winograd cannot compute the data gradient of pad {shape.geom.ph}x{shape.geom.pw}")
        self.data_grad = bool(data_grad)
        self.weight_grad = bool(winograd_weight_grad_pays(shape) if weight_grad is None else weight_grad)
        # dy's tiles for the weight gradient channels last (winograd.grad_tiles_channels_last, read
        # once here, as the thresholds are), from the data gradient's own padded dy (group by
        # group) where Winograd computes both and the data gradient's tiles keep dy padded channels
        # last: F(4x4, 3x3), or any 5x5 (backward)
        self.grad_tiles_channels_last = winograd.grad_tiles_channels_last(shape.cout // shape.group)
        self.shares_dy = (self.grad_tiles_channels_last and self.data_grad and self.weight_grad
                          and (taps == 5 or self.grad_tile == 4))

    def _weight_grad_left(self, x, dy, dw, dy_source=None):
        """``dw += dW`` through Winograd where this call takes it (the option, and the compiled
        kernels take the arrays: without them the NumPy twins would be slower than the columns);
        returns the weight gradient still to compute (``dw``, or None once it is done).
        ``dy_source``: the data gradient's padded channels-last dy (one group), for dy's tiles."""
        if not self._winograd_weight_grad(x, dy, dw):
            return dw
        for _, xg, dyg, dwg in self._by_group(x, dy, dw):
            self._weight_grad_group(xg, dyg, dwg, dy_source)
        return None

    def _weight_grad_group(self, xg, dyg, dwg, dy_source=None):
        """One group's ``dw += dW`` through Winograd (``dy_source``: that group's padded dy)."""
        if self.s.group > 1:
            # the kernels read C-contiguous arrays: each group's channels copied out first
            xg = _contiguous(xg, _GROUP_X)
            dyg = _contiguous(dyg, _GROUP_DY)
        g = self.s.geom
        winograd.weight_gradient(xg, dyg, dwg, g.ph, g.pw, dy_source=dy_source,
                                 channels_last=self.grad_tiles_channels_last)

    def _winograd_weight_grad(self, x, dy, dw):
        return dw is not None and self.weight_grad and compiled.runs_on(x, dy, dw)

    def _filters(self, w, tile=None, cache=None, flipped=False):
        tile = tile or self.tile
        if self.train:
            positions = (tile + w.shape[-1] - 1) ** 2
            scratch = workspace(np, (positions,) + w.shape[:2], w.dtype, _WINOGRAD_FILTERS)
            return winograd.transform_filters(w, out=scratch, flipped=flipped)
        return (cache if cache is not None else self.caches[0]).get(w, tile=tile, flipped=flipped)

    def _flipped_filters(self, w, cache):
        """The filters of the data gradient: ``w`` (cout, cin, 3, 3) -> (cin, cout, 3, 3), flipped
        in both spatial axes, as a view (``winograd.forward`` reads only their shape when handed
        them transformed), and transformed (``winograd.transform_filters``: the flip goes into the
        transform, the swap into a transposed view of it)."""
        flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        return flipped, self._filters(w, tile=self.grad_tile, cache=cache, flipped=True)

    def _by_group(self, a, b, w):
        """(group index, group's view of ``a``'s channels, of ``b``'s, its filters) for each group
        (``a`` the convolution's input side, ``b`` its output side, both (N, C, H, W)): one group,
        the arrays themselves."""
        s = self.s
        if s.group == 1:
            yield 0, a, b, w
            return
        cg, og = s.cin // s.group, s.cout // s.group
        for i in range(s.group):
            yield (i, a[:, i * cg:(i + 1) * cg], b[:, i * og:(i + 1) * og], w[i * og:(i + 1) * og])

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        dw = self._weight_grad_left(x, grad_src, dw)        # Deconvolution's weight gradient
        if y is None or dw is not None:
            return super().forward(x, w, y, grad_src, dw)
        g = self.s.geom
        for i, xg, yg, wg in self._by_group(x, y, w):
            winograd.forward(xg, wg, yg, g.ph, g.pw, u=self._filters(wg, cache=self.caches[i]), band=self.band)

    def backward(self, dy, w, dx=None, x=None, dw=None):
        if dx is not None and self.shares_dy and self._winograd_weight_grad(x, dy, dw):
            # a group's data gradient first: its padded channels-last dy (in winograd.DY_SOURCE,
            # which the weight gradient's x does not take) is what that group's dy tiles read
            g = self.s.geom
            pad_h, pad_w = g.kh - 1 - g.ph, g.kw - 1 - g.pw
            for (i, dxg, dyg, wg), (_, xg, _, dwg) in zip(self._by_group(dx, dy, w), self._by_group(x, dy, dw)):
                flipped, u = self._flipped_filters(wg, self.flipped_caches[i])
                src = winograd.forward(dyg, flipped, dxg, pad_h, pad_w, u=u, band=self.band,
                                       source_slot=winograd.DY_SOURCE)
                self._weight_grad_group(xg, dyg, dwg, None if src is None else (src, pad_h, pad_w))
            return
        dw = self._weight_grad_left(x, dy, dw)
        if dx is None or not self.data_grad:
            return super().backward(dy, w, dx, x, dw)
        if dw is not None:
            self._backward_columns(dy, w, None, x, dw)
        g = self.s.geom
        for i, dxg, dyg, wg in self._by_group(dx, dy, w):
            flipped, u = self._flipped_filters(wg, self.flipped_caches[i])
            winograd.forward(dyg, flipped, dxg, g.kh - 1 - g.ph, g.kw - 1 - g.pw, u=u, band=self.band)


class SpaceToDepthWinogradConv(ChannelsLastConv):
    """The forward of a strided layer whose kernel, cut into stride-sized blocks, is 3x3
    (``space_to_depth``: AlexNet's and CaffeNet's 11x11/4 first layer) as a stride-1 3x3
    convolution over its input's blocks, through Winograd F(4x4, 3x3). The blocked input is made
    straight in the padded channels-last layout that the compiled Winograd kernels read. The
    filters are cut and transformed on each call: they change every iteration in training, and
    they are a few thousand values.

    The gradients, and the forward where the compiled kernels do not run, are those of
    ``ChannelsLastConv``. The weight gradient through Winograd's F(3x3, 4x4) on the same blocks was
    measured and not kept: CaffeNet's conv1 at batch 32 on 2 cores took 36.9 ms against the
    position-major columns' 36.4. The forward: 36.7 -> 29.5 ms."""

    def __init__(self, shape, *args, **kwargs):
        super().__init__(shape, *args, **kwargs)
        oh, ow = shape.out_hw
        # F(4x4)'s tiles over the stride-1 layer's output (the same map), and their source's extent
        self.source_hw = (4 * -(-oh // 4) + 2, 4 * -(-ow // 4) + 2)

    def forward(self, x, w, y=None, grad_src=None, dw=None):
        if y is None or dw is not None or len(self.s.out_hw) != 2 or not compiled.runs_on(x, w, y):
            return super().forward(x, w, y, grad_src, dw)
        g = self.s.geom
        u = winograd.transform_filters(space_to_depth.filters(w, g.sh), tile=4)
        src = space_to_depth.source(x, g.sh, g.ph, g.pw, *self.source_hw)
        winograd.forward_channels_last(src, u, y)


def _device():
    return engines.current_device()


def _register_conv(layer_type):
    def cpu(cls, **fixed):
        return lambda layer, **opt: cls(layer.conv, **{**fixed, **opt})

    def default_layout(layer):
        return batch_last_pays(layer.conv)

    register(Engine(layer_type, "gemm_1x1", devices=("cpu", "gpu"), priority=30,
                    applies=lambda layer: direct_1x1_pays(layer.conv),
                    computes=lambda layer: direct_1x1_computes(layer.conv),
                    build=lambda layer, **opt: Gemm1x1Conv(
                        layer.conv, device=_device(),
                        batch_last=_device() == "cpu" and default_layout(layer), **opt)))
    register(Engine(layer_type, "im2col_bands", devices=("cpu",), priority=20,
                    applies=lambda layer: bands_pay(layer.conv), computes=lambda layer: True,
                    build=cpu(BandedConv)))
    register(Engine(layer_type, "im2col_batch_last", devices=("cpu",), priority=20,
                    applies=lambda layer: batch_last_pays(layer.conv), computes=lambda layer: True,
                    build=cpu(Im2colConv, batch_last=True)))
    register(Engine(layer_type, "im2col", devices=("cpu",), priority=10, build=cpu(Im2colConv)))
    register(Engine(layer_type, "cuda_im2col", devices=("gpu",), priority=10,
                    build=lambda layer, **opt: Im2colConv(layer.conv, device="gpu", **opt)))
    # cuDNN (kernels/cudnn_conv.py) wherever it is installed and computes the shape; cuda_im2col and
    # gemm_1x1 are the fallback (MINICAFFE_CUDNN=0, no cuDNN 9, a shape cuDNN does not take)
    register(Engine(layer_type, "cudnn", devices=("gpu",), priority=50, cudnn=True,
                    applies=lambda layer: cudnn_conv.applies(layer.conv),
                    computes=lambda layer: cudnn_conv.computes(layer.conv),
                    build=lambda layer, **opt: cudnn_conv.CudnnConv(layer.conv, layer.blobs[0].dtype, **opt)))


# Winograd: Convolution's forward where it pays and its data gradient where that pays; Deconvolution's
# forward is a convolution's data gradient, so DEFAULT picks it there where that pays
def _winograd(layer, **opt):
    return WinogradConv(layer.conv, layer.phase, **{"batch_last": batch_last_pays(layer.conv), **opt})


register(Engine("Convolution", "winograd", devices=("cpu",), priority=40,
                applies=lambda layer: winograd_pays(layer.conv),
                computes=lambda layer: winograd.applies(layer.conv.geom, layer.conv.group),
                build=_winograd))
register(Engine("Deconvolution", "winograd", devices=("cpu",), priority=40,
                applies=lambda layer: winograd_backward_pays(layer.conv),
                computes=lambda layer: winograd.applies(layer.conv.geom, layer.conv.group),
                build=_winograd))
_register_conv("Convolution")
_register_conv("Deconvolution")


# --- position-major columns for the forward (CPU; kept apart from _register_conv) -----------------
# DEFAULT picks it for Convolution only where measured to pay; Deconvolution's forward is a data
# gradient, which this engine computes as Im2colConv does, so it is registered there for the tests
# (its frozen-weights data gradient runs the position-major path) and never picked.
def _channels_last(layer, cls=None, **opt):
    fixed = {"batch_last": batch_last_pays(layer.conv)}
    if channels_last_strided_wide(layer.conv):
        fixed["max_col_elements"] = CHANNELS_LAST_WIDE_COL_ELEMENTS
    return (cls or ChannelsLastConv)(layer.conv, **{**fixed, **opt})


register(Engine("Convolution", "im2col_channels_last", devices=("cpu",), priority=25,
                applies=lambda layer: channels_last_pays(layer.conv), computes=lambda layer: True,
                build=_channels_last))
register(Engine("Deconvolution", "im2col_channels_last", devices=("cpu",), priority=25,
                applies=lambda layer: False, computes=lambda layer: True, build=_channels_last))
# a strided first layer cut into blocks, its forward through Winograd (SpaceToDepthWinogradConv);
# its options are ChannelsLastConv's, which runs its gradients
register(Engine("Convolution", "winograd_space_to_depth", devices=("cpu",), priority=40,
                applies=lambda layer: space_to_depth_pays(layer.conv),
                computes=lambda layer: space_to_depth.applies(layer.conv.geom, layer.conv.group),
                build=lambda layer, **opt: _channels_last(layer, cls=SpaceToDepthWinogradConv, **opt)))


# --- Im2col (the layer): the column matrix as a blob ------------------------------------------------

class Im2colColumns:
    """The Im2col layer on the column primitives: ``forward(x)`` -> (N, C·kh·kw, oh, ow), a new
    array; ``backward(dy, dx)`` sums the columns back onto ``dx`` (N, C, H, W), overwriting it."""

    def __init__(self, geom, out_hw, device="cpu"):
        self.geom, self.out_hw = geom, out_hw
        if device == "gpu":
            self._im2col, self._col2im = cuda_im2col.im2col, cuda_im2col.col2im
        else:
            self._im2col, self._col2im = im2col, col2im

    def forward(self, x):
        n, c = x.shape[:2]
        g = self.geom
        oh, ow = self.out_hw
        col = self._im2col(x, g, self.out_hw)          # (C, kh, kw, N, oh, ow), a workspace
        return col.reshape(c * g.kh * g.kw, n, oh, ow).transpose(1, 0, 2, 3).copy()

    def backward(self, dy, dx):
        xp = backend.get_array_module(dy)
        n, c, h, w = dx.shape
        g = self.geom
        oh, ow = self.out_hw
        d = dy.reshape(n, c, g.kh, g.kw, oh, ow).transpose(1, 2, 3, 0, 4, 5)
        self._col2im(xp.ascontiguousarray(d), g, (h, w), dx)


register(Engine("Im2col", "im2col", devices=("cpu",), priority=10,
                build=lambda layer: Im2colColumns(layer.geom, layer.out_hw)))
register(Engine("Im2col", "cuda_im2col", devices=("gpu",), priority=10,
                build=lambda layer: Im2colColumns(layer.geom, layer.out_hw, device="gpu")))
