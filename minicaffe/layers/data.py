"""Data layers: Data (LMDB or LevelDB), ImageData (list file of images), MemoryData (NumPy arrays), HDF5Data.

They have no bottoms and no backward. Data and ImageData read, decode and transform the next
batches in a background thread (``minicaffe.data.Prefetcher``), as Caffe's prefetching data layers;
``forward`` only hands the ready batch to the tops. Labels go to a top of shape (N,).

Every data layer draws its own random generator from ``backend.rng()`` when it is set up (shuffles,
``rand_skip``, random crops and flips), so a seed set before the net is built repeats a run exactly.
"""
import logging
import os
import weakref

import numpy as np

from .. import backend
from ..data.datum import hwc_to_chw, join_root, parse_datum, read_image, read_image_list, record_where
from ..data.db import open_source
from ..data.lmdb_source import solver_count, solver_rank
from ..data.prefetch import Prefetcher, parallel_map
from ..data.transformer import DataTransformer
from ..errors import DataError
from ..proto import caffe_pb2
from .base import Layer, register

log = logging.getLogger("minicaffe")


def _child_rng():
    return np.random.default_rng(int(backend.rng().integers(2 ** 63)))


def _with_layer(layer_name, exc):
    """A DataError naming the layer (once)."""
    msg = str(exc)
    prefix = f"layer '{layer_name}': "
    return DataError(msg if msg.startswith(prefix) else prefix + msg)


class _DataLayerBase(Layer):
    exact_num_bottom = 0
    allow_force_backward_all = False

    def reshape(self, bottom, top):
        """The tops keep the shape of the last batch (set in setup and forward)."""

    def backward(self, top, propagate_down, bottom):
        """Data layers have no gradient."""

    def _batch_size(self, value, field):
        if int(value) <= 0:
            raise self.error(f"{field} must be positive, got {int(value)}")
        return int(value)

    def _log_shape(self, top):
        log.info("output data size: %s", ",".join(str(d) for d in top[0].shape))

    def _shard(self):
        """(rank, count) for this layer: the solver's at TRAIN; at TEST every worker reads all."""
        if self.phase == caffe_pb2.TRAIN:
            return solver_rank(), solver_count()
        return 0, 1


class _PrefetchingLayer(_DataLayerBase):
    """A data layer whose batches come from a loader callable run ahead in a thread."""

    _prefetcher = None

    def _start(self, loader, depth, resources=()):
        self._prefetcher = Prefetcher(loader, depth=depth, name=self.name)
        self._finalizer = weakref.finalize(self, _shutdown, self._prefetcher, list(resources))

    def forward(self, bottom, top):
        data, labels = self._prefetcher.get()
        top[0].reshape(data.shape)
        top[0].xdata = data
        if len(top) > 1:
            top[1].reshape(labels.shape)
            top[1].xdata = labels

    def close(self):
        """Stop the prefetch thread and close the database (also done when the layer is collected)."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()


def _shutdown(prefetcher, resources):
    if prefetcher.close() is False:
        return  # the thread is still inside a read: leave the database open rather than pull it away
    for res in resources:
        res.close()


# --- Data (LMDB) ------------------------------------------------------------------------------------

class _DatumLoader:
    """Reads ``batch_size`` records, decodes them and transforms the batch (runs in the prefetch thread)."""

    def __init__(self, source, transformer, batch_size, name):
        self.source, self.transformer = source, transformer
        self.batch_size, self.name = batch_size, name

    def __call__(self):
        datums, wheres = [], []
        labels = np.empty(self.batch_size, np.float32)
        for i in range(self.batch_size):
            key, value = self.source.next()
            where = record_where(self.source.path, key)
            try:
                datum = parse_datum(value, where)
            except DataError as exc:
                raise _with_layer(self.name, exc) from None
            datums.append(datum)
            labels[i] = datum.label
            wheres.append(where)
        decode = self.transformer.decode
        if any(d.encoded for d in datums):      # JPEG/PNG decoding: spread over threads
            images = parallel_map(lambda dw: decode(*dw), zip(datums, wheres))
        else:                                   # raw records are views of the bytes: nothing to gain
            images = [decode(d, w) for d, w in zip(datums, wheres)]
        return self.transformer.transform_batch(images, wheres), labels


@register("Data")
class Data(_PrefetchingLayer):
    """Caffe's DataLayer: Datum records from an LMDB or LevelDB (``data_param { source batch_size backend
    rand_skip prefetch }``), transformed by ``transform_param``; tops ``data`` and optionally ``label``.
    The top shape comes from the first record (and is reset by the first record of every batch)."""

    min_num_top = 1
    max_num_top = 2

    def setup(self, bottom, top):
        dp = self.param.data_param
        batch = self._batch_size(dp.batch_size, "data_param.batch_size")
        if not dp.source:
            raise self.error("data_param.source is not set")
        try:
            rank, count = self._shard()
            rng = _child_rng()
            self.transformer = DataTransformer(self.param.transform_param, self.phase, self.name)
            # backend unset is LEVELDB, as in caffe.proto; a path holding an LMDB is read as one
            source = open_source(dp.source, dp.backend, rank, count, dp.rand_skip, rng,
                                 default_used=not dp.HasField("backend"))
        except DataError as exc:
            raise _with_layer(self.name, exc) from None
        self.source = source
        try:
            key, value = source.peek()
            where = record_where(source.path, key)
            try:
                datum = parse_datum(value, where)
            except DataError as exc:
                raise _with_layer(self.name, exc) from None
            shape = self.transformer.infer_shape(self.transformer.decode(datum, where), where)
        except BaseException:
            source.close()
            raise
        try:
            top[0].reshape((batch,) + tuple(shape))
            if len(top) > 1:
                top[1].reshape((batch,))
        except BaseException:       # refused as too large to allocate: do not leave the database open
            source.close()
            raise
        self._log_shape(top)
        self._start(_DatumLoader(source, self.transformer, batch, self.name), dp.prefetch, [source])


# --- ImageData -------------------------------------------------------------------------------------

class _ImageLoader:
    """Walks an image list (reshuffled every epoch when asked), reading and transforming batches."""

    def __init__(self, lines, order, pos, rng, ip, transformer, source, name):
        self.lines, self.order, self.pos, self.rng = lines, order, pos, rng
        self.shuffle = bool(ip.shuffle)
        self.batch_size = int(ip.batch_size)
        self.new_h, self.new_w = int(ip.new_height), int(ip.new_width)
        self.is_color = bool(ip.is_color)
        self.root = ip.root_folder
        self.transformer, self.source, self.name = transformer, source, name

    def read(self, index):
        path, label, lineno = self.lines[index]
        full = join_root(self.root, path)
        img = read_image(full, self.new_h, self.new_w, self.is_color)
        where = f"{self.source}:{lineno}"
        if img is None:
            raise DataError(f"layer '{self.name}': {where}: could not read image {full}")
        return hwc_to_chw(img), label, where

    def __call__(self):
        indices = []
        for _ in range(self.batch_size):
            indices.append(self.order[self.pos])
            self.pos += 1
            if self.pos >= len(self.order):
                self.pos = 0
                log.info("Restarting data prefetching from start.")
                if self.shuffle:
                    self.order = self.rng.permutation(len(self.lines))
        read = parallel_map(self.read, indices)          # imread + resize on the decode threads
        images = [r[0] for r in read]
        labels = np.asarray([r[1] for r in read], np.float32)
        return self.transformer.transform_batch(images, [r[2] for r in read]), labels


@register("ImageData")
class ImageData(_PrefetchingLayer):
    """Caffe's ImageDataLayer: images named in a list file of ``<path> <label>`` lines (``image_data_param
    { source root_folder batch_size new_height new_width is_color shuffle rand_skip }``), read with
    OpenCV (BGR), optionally resized, then transformed. The label is the last field of a line, so
    paths may contain spaces."""

    min_num_top = 1
    max_num_top = 2

    def setup(self, bottom, top):
        ip = self.param.image_data_param
        batch = self._batch_size(ip.batch_size, "image_data_param.batch_size")
        new_h, new_w = int(ip.new_height), int(ip.new_width)
        if (new_h > 0) != (new_w > 0):
            raise self.error(f"new_height and new_width must be set together (got {new_h} and {new_w})")
        if not ip.source:
            raise self.error("image_data_param.source is not set")
        if ip.root_folder and not os.path.isdir(ip.root_folder):
            raise self.error(f"root_folder {ip.root_folder} is not a directory")
        log.info("Opening file %s", ip.source)
        try:
            lines = read_image_list(ip.source)
        except DataError as exc:
            raise _with_layer(self.name, exc) from None
        if not lines:
            raise DataError(f"layer '{self.name}': {ip.source}: the list file has no images")
        rng = _child_rng()
        order = np.arange(len(lines))
        if ip.shuffle:
            log.info("Shuffling data")
            order = rng.permutation(len(lines))
        log.info("A total of %d images.", len(lines))
        pos = 0
        if ip.rand_skip:
            pos = int(rng.integers(int(ip.rand_skip)))
            log.info("Skipping first %d data points.", pos)
            if pos >= len(lines):
                raise DataError(f"layer '{self.name}': {ip.source}: rand_skip {pos} but only "
                                f"{len(lines)} images")
        self.transformer = DataTransformer(self.param.transform_param, self.phase, self.name)
        loader = _ImageLoader(lines, order, pos, rng, ip, self.transformer, ip.source, self.name)
        img, _, where = loader.read(order[pos])
        shape = self.transformer.infer_shape(img, where)
        top[0].reshape((batch,) + tuple(shape))
        if len(top) > 1:
            top[1].reshape((batch,))
        self._log_shape(top)
        self._start(loader, self.param.data_param.prefetch)  # Caffe reads it from data_param for all


# --- MemoryData --------------------------------------------------------------------------------------

@register("MemoryData")
class MemoryData(_DataLayerBase):
    """Caffe's MemoryDataLayer: batches cut from arrays given with ``set_input_arrays(data, labels)``
    (pycaffe; float32, C-contiguous, N a multiple of batch_size). ``memory_data_param { batch_size
    channels height width }`` fixes the shape. The arrays are not transformed (as Caffe's Reset);
    ``add_datum_vector``/``add_mat_vector`` do transform."""

    exact_num_top = 2

    def setup(self, bottom, top):
        mp = self.param.memory_data_param
        dims = (int(mp.batch_size), int(mp.channels), int(mp.height), int(mp.width))
        if min(dims) <= 0:
            raise self.error("batch_size, channels, height and width must be specified and positive in "
                             f"memory_data_param (got {', '.join(map(str, dims))})")
        self.batch_size, self.channels, self.height, self.width = dims
        top[0].reshape(dims)
        top[1].reshape((self.batch_size,))
        self._data = self._labels = None
        self.n = self.pos = 0
        self._transformer = None

    def set_input_arrays(self, data, labels):
        """pycaffe's Net.set_input_arrays for this layer: keeps references (no copy) to ``data``
        (N×C×H×W float32) and ``labels`` (N or N×1×1×1 float32), both C-contiguous."""
        self._check_array(data, "data array", (self.channels, self.height, self.width))
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            self._check_array(labels, "labels array", None)
        else:
            self._check_array(labels, "labels array", (1, 1, 1))
        if data.shape[0] != labels.shape[0]:
            raise self.error(f"data and labels must have the same first dimension "
                             f"(got {data.shape[0]} and {labels.shape[0]})")
        self.reset(data, labels)

    def _check_array(self, arr, what, chw):
        if not isinstance(arr, np.ndarray):
            raise self.error(f"{what} must be a NumPy array, got {type(arr).__name__}")
        if arr.dtype != np.float32:
            raise self.error(f"{what} must be float32, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            raise self.error(f"{what} must be C contiguous (use np.ascontiguousarray)")
        if chw is not None:
            if arr.ndim != 4:
                raise self.error(f"{what} must be 4-d, got shape {arr.shape}")
            if tuple(arr.shape[1:]) != chw:
                raise self.error(f"{what} has shape {arr.shape}, expected Nx{'x'.join(map(str, chw))}")

    def reset(self, data, labels, n=None):
        """Caffe's Reset: serve batches from ``data``/``labels`` (first ``n`` items) from the start."""
        n = int(data.shape[0] if n is None else n)
        if n <= 0:
            raise self.error("there is no data to add (N = 0)")
        if n % self.batch_size:
            raise self.error(f"first dimensions of input arrays must be a multiple of batch size "
                             f"{self.batch_size}, got {n}")
        if self.param.HasField("transform_param"):
            log.warning("%s does not transform array data on Reset()", self.type)
        self._data = data
        self._labels = np.asarray(labels).reshape(-1)
        self.n, self.pos = n, 0

    def add_datum_vector(self, datums):
        """Caffe's AddDatumVector: transform Datums (with transform_param) into the layer's arrays."""
        images = [self._get_transformer().decode(d) for d in datums]
        labels = np.asarray([d.label for d in datums], np.float32)
        self._add_images(images, labels)

    def add_mat_vector(self, mats, labels):
        """Caffe's AddMatVector: OpenCV images (H×W×C BGR uint8) plus labels, transformed."""
        self._add_images([hwc_to_chw(np.asarray(m)) for m in mats], np.asarray(labels, np.float32))

    def _get_transformer(self):
        if self._transformer is None:
            self._transformer = DataTransformer(self.param.transform_param, self.phase, self.name)
        return self._transformer

    def _add_images(self, images, labels):
        if not len(images):
            raise self.error("there is no data to add")
        if len(images) % self.batch_size:
            raise self.error(f"the added data must be a multiple of the batch size {self.batch_size}, "
                             f"got {len(images)}")
        data = self._get_transformer().transform_batch(images)
        if data.shape[1:] != (self.channels, self.height, self.width):
            raise self.error(f"transformed images are {data.shape[1:]}, memory_data_param says "
                             f"{(self.channels, self.height, self.width)}")
        self._data, self._labels = data, labels.reshape(-1)
        self.n, self.pos = len(images), 0

    def set_batch_size(self, batch_size):
        """Caffe's set_batch_size (pycaffe tools change it between runs)."""
        self.batch_size = self._batch_size(batch_size, "batch_size")
        self.pos = 0

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("MemoryData needs data: call net.set_input_arrays(data, labels) (or the "
                             "layer's set_input_arrays) before forward")
        b, p = self.batch_size, self.pos
        top[0].reshape((b, self.channels, self.height, self.width))
        top[1].reshape((b,))
        top[0].xdata = np.array(self._data[p:p + b], np.float32)
        top[1].xdata = np.array(self._labels[p:p + b], np.float32)
        self.pos = (p + b) % self.n


# --- HDF5Data ----------------------------------------------------------------------------------------

def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("HDF5Data needs h5py: pip install h5py") from None
    return h5py


@register("HDF5Data")
class HDF5Data(_DataLayerBase):
    """Caffe's HDF5DataLayer: ``hdf5_data_param { source batch_size shuffle }``, ``source`` a text file
    listing .h5 files (one a line; relative names are looked up beside the list file when they are
    not found from the working directory). Each top reads the dataset of its own name; rows are
    served in order (or shuffled, per file and across files) and wrap around. Not transformed."""

    min_num_top = 1

    def setup(self, bottom, top):
        hp = self.param.hdf5_data_param
        self.batch_size = self._batch_size(hp.batch_size, "hdf5_data_param.batch_size")
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data (remove transform_param)")
        if not hp.source:
            raise self.error("hdf5_data_param.source is not set")
        self._h5 = _h5py()
        self.top_names = list(self.param.top) or [f"top{i}" for i in range(len(top))]
        self.files = self._read_source(hp.source)
        self.shuffle = bool(hp.shuffle)
        self.rng = _child_rng()
        self.file_order = self.rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        self.rank, self.count = self._shard()
        self.offset = 0
        self.current_file = 0
        self._load(self.files[self.file_order[0]])
        self.row = 0
        for blob, arr in zip(top, self.arrays):
            blob.reshape((self.batch_size,) + arr.shape[1:])

    def _read_source(self, source):
        try:
            with open(source, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise DataError(f"layer '{self.name}': {source}: HDF5 list file not found") from None
        except OSError as exc:
            raise DataError(f"layer '{self.name}': {source}: cannot read: {exc.strerror or exc}") from None
        if not names:
            raise DataError(f"layer '{self.name}': {source}: must list at least 1 HDF5 file")
        base = os.path.dirname(os.path.abspath(source))
        out = []
        for name in names:
            if not os.path.isabs(name) and not os.path.exists(name) and os.path.exists(os.path.join(base, name)):
                name = os.path.join(base, name)
            out.append(name)
        log.info("Number of HDF5 files: %d", len(out))
        return out

    def _load(self, path):
        h5 = self._h5
        try:
            f = h5.File(path, "r")
        except (OSError, ValueError) as exc:
            raise DataError(f"layer '{self.name}': {path}: failed opening HDF5 file ({exc})") from None
        arrays = []
        with f:
            for name in self.top_names:
                if name not in f or not isinstance(f[name], h5.Dataset):
                    raise DataError(f"layer '{self.name}': {path}: no dataset '{name}' (the tops name the "
                                    f"datasets; the file has {', '.join(sorted(f.keys())) or 'none'})")
                ds = f[name]
                if ds.dtype.kind not in "fiub":
                    raise DataError(f"layer '{self.name}': {path}: dataset '{name}' has unsupported type "
                                    f"{ds.dtype}")
                if ds.ndim < 1:
                    raise DataError(f"layer '{self.name}': {path}: dataset '{name}' must have at least 1 axis")
                arrays.append(np.asarray(ds[...], dtype=backend.dtype()))
        n = arrays[0].shape[0]
        for name, arr in zip(self.top_names, arrays):
            if arr.shape[0] != n:
                raise DataError(f"layer '{self.name}': {path}: dataset '{name}' has {arr.shape[0]} rows, "
                                f"'{self.top_names[0]}' has {n}")
        if n == 0:
            raise DataError(f"layer '{self.name}': {path}: the datasets have no rows")
        if hasattr(self, "arrays"):
            for name, arr, old in zip(self.top_names, arrays, self.arrays):
                if arr.shape[1:] != old.shape[1:]:
                    raise DataError(f"layer '{self.name}': {path}: dataset '{name}' rows are {arr.shape[1:]}, "
                                    f"earlier files had {old.shape[1:]}")
        self.arrays = arrays
        self.rows = self.rng.permutation(n) if self.shuffle else np.arange(n)

    def _next(self):
        self.row += 1
        if self.row == self.arrays[0].shape[0]:
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.file_order = self.rng.permutation(len(self.files))
                self._load(self.files[self.file_order[self.current_file]])
            elif self.shuffle:
                self.rows = self.rng.permutation(self.arrays[0].shape[0])
            self.row = 0
        self.offset += 1

    def forward(self, bottom, top):
        outs = [np.empty((self.batch_size,) + arr.shape[1:], backend.dtype()) for arr in self.arrays]
        for i in range(self.batch_size):
            while self.offset % self.count != self.rank:
                self._next()
            r = self.rows[self.row]
            for out, arr in zip(outs, self.arrays):
                out[i] = arr[r]
            self._next()
        for blob, out in zip(top, outs):
            blob.reshape(out.shape)
            blob.xdata = out
