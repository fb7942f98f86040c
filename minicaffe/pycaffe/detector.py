"""pycaffe's ``caffe.Detector``: a TEST-phase Net that classifies windows (crops) of images, as in
R-CNN (Girshick et al., "Rich feature hierarchies for accurate object detection and semantic
segmentation", 2014): each window is cut out, optionally grown by a border of context, warped to the
net's input size, pre-processed and run through the net in whole batches.

Same arguments, attributes and results as BVLC Caffe's ``python/caffe/detector.py``:
``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
channel_swap=None, context_pad=None)``; ``detect_windows([(image file, [window, ...]), ...])`` returns
``[{'window', 'prediction', 'filename'}, ...]`` in input order; a window is (ymin, xmin, ymax, xmax).
One addition, ``share_memory=True``: only the output is read, so blobs share memory
(``Net.share_blob_memory``); ``False`` keeps every blob's values readable after a detection.
With ``context_pad`` the window is enlarged so that, once warped, a border of ``context_pad`` input
pixels is image context; the part of that border outside the image is filled with the mean (in
unprocessed image space), as R-CNN does. ``detect_selective_search`` needs the external
selective_search_ijcv_with_python package (and MATLAB), as in Caffe.
"""
import os

import numpy as np

from . import io as caffe_io
from .classifier import _input_transformer
from ..errors import MinicaffeError
from ..net.network import Net
from ..proto import caffe_pb2


class Detector(Net):
    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None, share_memory=True):
        # only the output is read: blobs share memory as in Classifier (share_memory=False keeps all)
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file, share_memory=share_memory)
        _, self.transformer = _input_transformer(self, "Detector", "windows", mean, input_scale, raw_scale,
                                                channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """Classify every window of every image: ``images_windows`` is an iterable of
        (image filename, window list). Returns one dict per window, in order, with its
        ``window``, ``prediction`` (the net's first output for it) and ``filename``."""
        images_windows = [(fname, list(windows)) for fname, windows in images_windows]
        window_inputs = []
        for fname, windows in images_windows:
            image = caffe_io.load_image(fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            return []
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2]) + self.blobs[in_].data.shape[2:],
                            dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections = []
        ix = 0
        for fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix], "filename": fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """Detect over Selective Search proposals (needs selective_search_ijcv_with_python)."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise MinicaffeError("detect_selective_search needs the selective_search_ijcv_with_python "
                                 "package (https://github.com/sergeyk/selective_search_ijcv_with_python) "
                                 "and MATLAB; or give windows to detect_windows") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window):
        """The window (ymin, xmin, ymax, xmax) of the H×W×K image ``im``; with ``context_pad``, the
        window grown by the context border and warped to the input size, mean-filled where the
        grown window leaves the image (R-CNN's context padding, with Caffe's arithmetic)."""
        window = np.asarray(window)
        crop = im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        if not self.context_pad:
            return crop
        box = window.astype(np.float64)
        crop_size = self.blobs[self.inputs[0]].width      # assumes a square input, as Caffe does
        scale = crop_size / (1. * crop_size - self.context_pad * 2)
        half_h = (box[2] - box[0] + 1) / 2.
        half_w = (box[3] - box[1] + 1) / 2.
        center = (box[0] + half_h, box[1] + half_w)
        scaled_dims = scale * np.array((-half_h, -half_w, half_h, half_w))
        box = np.round(np.tile(center, 2) + scaled_dims)
        full_h = box[2] - box[0] + 1
        full_w = box[3] - box[1] + 1
        scale_h = crop_size / full_h
        scale_w = crop_size / full_w
        pad_y = int(round(max(0, -box[0]) * scale_h))      # how far the box leaves the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0., [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise MinicaffeError(f"Detector.crop: window {tuple(window.tolist())} lies outside the "
                                 f"{im_h}×{im_w} image")
        crop_h = int(round(clip_h * scale_h))
        crop_w = int(round(clip_w * scale_w))
        if pad_y + crop_h > crop_size:
            crop_h = crop_size - pad_y
        if pad_x + crop_w > crop_size:
            crop_w = crop_size - pad_x
        # Caffe indexes with the float box, which NumPy of its day truncated; the box is >= 0 here
        context_crop = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        context_crop = caffe_io.resize_image(context_crop, (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:(pad_y + crop_h), pad_x:(pad_x + crop_w)] = context_crop
        return crop

    def configure_crop(self, context_pad):
        """Set the crop size (the input's, in H×W×K image order) and the context border; with a
        border, the fill mean is taken back into unprocessed image space (undo transpose, channel
        swap and raw scale)."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if self.context_pad:
            transpose = self.transformer.transpose.get(in_)
            channel_order = self.transformer.channel_swap.get(in_)
            raw_scale = self.transformer.raw_scale.get(in_)
            mean = self.transformer.mean.get(in_)
            if mean is not None:
                inv_transpose = [transpose[t] for t in transpose]
                crop_mean = mean.copy().transpose(inv_transpose)
                if channel_order is not None:
                    channel_order = list(channel_order)
                    inverse = [channel_order.index(i) for i in range(crop_mean.shape[2])]
                    crop_mean = crop_mean[:, :, inverse]
                if raw_scale is not None:
                    crop_mean /= raw_scale
                self.crop_mean = crop_mean
            else:
                self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
