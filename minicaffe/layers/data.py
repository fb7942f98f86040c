"""Data layers: Data (LMDB or LevelDB), ImageData (list file of images), MemoryData (NumPy arrays), HDF5Data.

They have no bottoms and no backward. Data and ImageData read, decode and transform the next
batches in a background thread (``minicaffe.data.Prefetcher``), as Caffe's prefetching data layers;
``forward`` only hands the ready batch to the tops. Labels go to a top of shape (N,).

Every data layer draws its own random generator from ``backend.rng()`` when it is set up (shuffles,
``rand_skip``, random crops and flips), so a seed set before the net is built repeats a run exactly.

Resuming: Data, ImageData and HDF5Data report their read position with ``data_position()`` (JSON-able:
the record under the cursor, shuffle state and the random generators' states) and go back to it with
``restore_data_position(state)``; the solver keeps these in the snapshot's ``.rng`` sidecar. With
prefetching the loader runs ahead, so every prepared batch carries the position *after* it and the
layer reports the position of the last batch a forward pass actually took, never one read ahead.
``restore_position(n)`` (no saved position, e.g. an older sidecar) replays ``n`` records from the start.
"""
import logging
import os
import weakref

import numpy as np

from ..core import backend
from ..formats.datum import hwc_to_chw, join_root, parse_datum, read_image, read_image_list, record_where
from ..data.db import open_source
from ..core.context import solver_count, solver_rank
from ..data.prefetch import DeviceUploader, Prefetcher, parallel_map
from ..data.transformer import DataTransformer
from ..errors import DataError
from ..proto import caffe_pb2
from ..core.layer import Layer, register

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
    is_data_source = True
    allow_force_backward_all = False
    _batch_uploader = None  # _to_tops on the GPU: a DeviceUploader of two slots, made at first use
    _batch_slot = None      # the slot whose arrays the tops hold

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

    def _to_tops(self, top, arrays):
        """Hand a batch made in this forward (NumPy arrays, one per top, already shaped) to the tops.
        On the GPU through pinned memory on a copy stream into two device buffers kept between
        batches (the one the last batch's work may still read, and this one); the compute stream
        waits for the copy on the device."""
        if not backend.is_gpu():
            for blob, arr in zip(top, arrays):
                blob.xdata = arr
            return
        uploader = self._batch_uploader
        if uploader is None:
            uploader = self._batch_uploader = DeviceUploader(2)
        elif self._batch_slot is not None:
            uploader.release(self._batch_slot)
        dev, ready, self._batch_slot = uploader.upload(
            [np.ascontiguousarray(a, dtype=backend.dtype()) for a in arrays])
        uploader.ready(ready)
        for blob, arr in zip(top, dev):
            blob.xdata = arr

    def _shard(self):
        """(rank, count) for this layer: the solver's at TRAIN; at TEST every worker reads all."""
        if self.phase == caffe_pb2.TRAIN:
            return solver_rank(), solver_count()
        return 0, 1


class _PrefetchingLayer(_DataLayerBase):
    """A data layer whose batches come from a loader callable run ahead in a thread. The loader
    returns (data, labels, position after this batch) and has ``state()``/``set_state(state)``/
    ``skip(records)``."""

    _prefetcher = None
    _uploader = None
    _held = None        # the uploader's slot whose arrays the tops hold

    def _start(self, loader, depth, resources=()):
        self._loader, self._depth, self._resources = loader, depth, list(resources)
        self._position = self._initial = loader.state()     # nothing consumed yet
        # on the GPU the thread also uploads (pinned memory, a copy stream): one slot per queued batch,
        # one for the batch the tops hold
        self._uploader = DeviceUploader(max(depth, 1) + 1) if backend.is_gpu() else None
        self._held = None
        self._prefetcher = Prefetcher(_uploading(loader, self._uploader), depth=depth, name=self.name)
        self._finalizer = weakref.finalize(self, _shutdown, self._prefetcher, self._resources, self._uploader)

    def data_position(self):
        """Where the next forward pass reads from (the batches read ahead do not count)."""
        return self._position

    def _restart(self, set_position):
        """Stop the prefetch thread (dropping the batches it read ahead), move the loader, restart."""
        self._finalizer.detach()
        if self._uploader is not None:
            self._uploader.close()
        if self._prefetcher.close() is False:
            raise self.error("the prefetch thread did not stop, so the read position cannot be restored")
        try:
            set_position()
        except DataError as exc:
            _shutdown(self._prefetcher, self._resources)
            raise _with_layer(self.name, exc) from None
        self._start(self._loader, self._depth, self._resources)

    def restore_data_position(self, state):
        """Continue from a position given by :meth:`data_position` (in this or an earlier run).
        Returns False, changing nothing, for a position of another shard (see ``restore_position``)."""
        if not self._loader.fits(state):
            return False
        self._restart(lambda: self._loader.set_state(state))
        return True

    def restore_position(self, records):
        """Continue after ``records`` records read from the start (only the position: random crops
        and mirrors are not replayed; a saved :meth:`data_position` restores those too)."""
        def replay():
            self._loader.set_state(self._initial)
            self._loader.skip(int(records))
        self._restart(replay)

    def forward(self, bottom, top):
        if self._held is not None:       # the last batch's work is queued: its slot may be refilled
            self._uploader.release(self._held)
            self._held = None
        data, labels, self._position, sent = self._prefetcher.get()
        if sent is not None:
            ready, self._held = sent
            self._uploader.ready(ready)
        top[0].reshape(data.shape)
        top[0].xdata = data
        if len(top) > 1:
            top[1].reshape(labels.shape)
            top[1].xdata = labels

    def close(self):
        """Stop the prefetch thread and close the database (also done when the layer is collected)."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()


def _uploading(loader, uploader):
    """The prefetch thread's callable: a batch from ``loader``, on the GPU uploaded by ``uploader``
    (data, labels, position, (ready event, slot) or None). It holds no reference to the layer."""
    def load():
        data, labels, position = loader()
        if uploader is None or not backend.is_gpu():
            return data, labels, position, None
        (data, labels), ready, slot = uploader.upload([data, labels])
        return data, labels, position, (ready, slot)
    return load


def _shutdown(prefetcher, resources, uploader=None):
    if uploader is not None:
        uploader.close()
    if prefetcher.close() is False:
        return  # the thread is still inside a read: leave the database open rather than pull it away
    for res in resources:
        res.close()


def _set_rng(rng, state, where):
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"{where}: unreadable random generator state in the read position ({exc})") from None


# --- Data (LMDB) ------------------------------------------------------------------------------------

class _DatumLoader:
    """Reads ``batch_size`` records, decodes them and transforms the batch (runs in the prefetch thread)."""

    def __init__(self, source, transformer, batch_size, name):
        self.source, self.transformer = source, transformer
        self.batch_size, self.name = batch_size, name

    def state(self):
        return {"source": self.source.state(), "transform_rng": self.transformer.rng.bit_generator.state}

    def fits(self, state):
        return isinstance(state, dict) and isinstance(state.get("source"), (dict, type(None))) and \
            self.source.fits(state["source"])

    def set_state(self, state):
        try:
            source, rng = state["source"], state["transform_rng"]
        except (KeyError, TypeError):
            raise DataError(f"{self.source.path}: unreadable read position {state!r}") from None
        self.source.restore(source)
        _set_rng(self.transformer.rng, rng, self.source.path)

    def skip(self, records):
        self.source.skip_records(records)

    def __call__(self):
        datums, wheres = [], []
        labels = np.empty(self.batch_size, np.float32)
        for i in range(self.batch_size):
            try:
                key, value = self.source.next()
            except DataError as exc:
                raise _with_layer(self.name, exc) from None
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
        return self.transformer.transform_batch(images, wheres), labels, self.state()


@register("Data")
class Data(_PrefetchingLayer):
    """Caffe's DataLayer: Datum records from an LMDB or LevelDB (``data_param { source batch_size backend
    rand_skip prefetch }``), transformed by ``transform_param``; tops ``data`` and optionally ``label``.
    The top shape comes from the first record (and is reset by the first record of every batch)."""

    min_num_top = 1
    max_num_top = 2

    _opened = None

    def construct(self):
        """Open the database now, as Caffe's DataLayer constructor does (its "Opened lmdb" line comes
        before the net's "Creating Layer"); closed with the layer if setup never takes it over."""
        self._opened = self._open()
        self._finalizer = weakref.finalize(self, self._opened.close)

    def _open(self):
        dp = self.param.data_param
        if not dp.source:
            raise self.error("data_param.source is not set")
        try:
            rank, count = self._shard()
            rng = _child_rng()
            # backend unset is LEVELDB, as in caffe.proto; a path holding an LMDB is read as one
            return open_source(dp.source, dp.backend, rank, count, dp.rand_skip, rng,
                               default_used=not dp.HasField("backend"))
        except DataError as exc:
            raise _with_layer(self.name, exc) from None

    def setup(self, bottom, top):
        dp = self.param.data_param
        batch = self._batch_size(dp.batch_size, "data_param.batch_size")
        if self._opened is not None:
            source, self._opened = self._opened, None
            self._finalizer.detach()        # from here on setup closes it on failure, _start after
        else:
            source = self._open()
        try:
            self.transformer = DataTransformer(self.param.transform_param, self.phase, self.name)
        except DataError as exc:
            source.close()
            raise _with_layer(self.name, exc) from None
        except BaseException:
            source.close()
            raise
        self.source = source
        try:
            key, value = source.peek()
            where = record_where(source.path, key)
            try:
                datum = parse_datum(value, where)
            except DataError as exc:
                raise _with_layer(self.name, exc) from None
            shape = self.transformer.infer_shape(self.transformer.decode(datum, where), where)
            source.restore(None)        # the peeked record is read again by the first batch
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

    def __init__(self, lines, order, pos, rng, ip, transformer, source, name, order_rng=None):
        self.lines, self.order, self.pos, self.rng = lines, order, pos, rng
        self.order_rng = order_rng      # the generator's state the current shuffled order came from
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

    def fits(self, state):
        return True             # ImageData is not sharded: every worker reads the whole list

    def state(self):
        """Position in the (shuffled) order; the order itself is kept as the generator state it was
        drawn from, not as a list of indices (which would be as long as the image list)."""
        return {"pos": int(self.pos), "order_rng": self.order_rng, "rng": self.rng.bit_generator.state,
                "transform_rng": self.transformer.rng.bit_generator.state}

    def set_state(self, state):
        try:
            pos, order_rng = int(state["pos"]), state["order_rng"]
            rng, transform_rng = state["rng"], state["transform_rng"]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.source}: unreadable read position {state!r}") from None
        if not 0 <= pos < len(self.lines):
            raise DataError(f"{self.source}: the saved read position {pos} is past the {len(self.lines)} "
                            f"images of the list (was the list file changed?)")
        if order_rng is None:
            self.order = np.arange(len(self.lines))
        else:
            _set_rng(self.rng, order_rng, self.source)
            self.order = self.rng.permutation(len(self.lines))
        self.order_rng, self.pos = order_rng, pos
        _set_rng(self.rng, rng, self.source)
        _set_rng(self.transformer.rng, transform_rng, self.source)

    def _advance(self):
        self.pos += 1
        if self.pos >= len(self.order):
            self.pos = 0
            log.info("Restarting data prefetching from start.")
            if self.shuffle:
                self.order_rng = self.rng.bit_generator.state
                self.order = self.rng.permutation(len(self.lines))

    def skip(self, records):
        while records > 0:      # whole stretches at once: a late iteration is millions of records
            take = min(records, len(self.order) - self.pos - 1)
            self.pos += take
            records -= take
            if records:
                self._advance()
                records -= 1

    def __call__(self):
        indices = []
        for _ in range(self.batch_size):
            indices.append(self.order[self.pos])
            self._advance()
        read = parallel_map(self.read, indices)          # imread + resize on the decode threads
        images = [r[0] for r in read]
        labels = np.asarray([r[1] for r in read], np.float32)
        return self.transformer.transform_batch(images, [r[2] for r in read]), labels, self.state()


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
        order, order_rng = np.arange(len(lines)), None
        if ip.shuffle:
            log.info("Shuffling data")
            order_rng = rng.bit_generator.state
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
        loader = _ImageLoader(lines, order, pos, rng, ip, self.transformer, ip.source, self.name, order_rng)
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
        top[1].reshape((b, 1, 1, 1))    # as Caffe's Forward does (its setup gives (b,), as here)
        data = np.asarray(self._data[p:p + b], np.float32)
        labels = np.asarray(self._labels[p:p + b], np.float32).reshape(b, 1, 1, 1)
        if not backend.is_gpu():
            data, labels = data.copy(), labels.copy()       # the tops own their values, as before
        self._to_tops(top, [data, labels])
        self.pos = (p + b) % self.n


# --- HDF5Data ----------------------------------------------------------------------------------------

def _h5py():
    from ..deps import require
    return require("h5py", "HDF5Data", DataError)


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
        self._rows_rng = None
        self.file_order = self.rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        self.rank, self.count = self._shard()
        self.offset = 0
        self.current_file = 0
        self._load(self.files[self.file_order[0]])
        self.row = 0
        self._initial = self.data_position()
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
        self.rows = self._permute_rows(n) if self.shuffle else np.arange(n)

    def _permute_rows(self, n):
        self._rows_rng = self.rng.bit_generator.state    # kept so a resumed run redraws the same rows
        return self.rng.permutation(n)

    def data_position(self):
        """The read position (JSON-able): file, row, shuffled orders (as generator states) and offset."""
        return {"offset": int(self.offset), "file": int(self.current_file), "row": int(self.row),
                "file_order": [int(i) for i in self.file_order], "rows_rng": self._rows_rng,
                "rng": self.rng.bit_generator.state, "shard": [self.rank, self.count]}

    def restore_data_position(self, state):
        """Continue from a position given by :meth:`data_position`. Returns False, changing nothing,
        for a position of another shard (a resume with another number of workers replays instead)."""
        if isinstance(state, dict) and list(state.get("shard", [0, 1])) != [self.rank, self.count]:
            return False
        try:
            offset, current, row = int(state["offset"]), int(state["file"]), int(state["row"])
            file_order, rows_rng, rng = [int(i) for i in state["file_order"]], state["rows_rng"], state["rng"]
        except (KeyError, TypeError, ValueError):
            raise self.error(f"unreadable read position {state!r}") from None
        if sorted(file_order) != list(range(len(self.files))) or not 0 <= current < len(self.files):
            raise self.error(f"the saved read position names {len(file_order)} HDF5 files, the list has "
                             f"{len(self.files)} (was the list file changed?)")
        if rows_rng is not None:
            _set_rng(self.rng, rows_rng, self.name)
        self.file_order, self.current_file = np.asarray(file_order), current
        self._load(self.files[self.file_order[current]])
        if not 0 <= row < self.arrays[0].shape[0]:
            raise self.error(f"the saved read position row {row} is past the rows of "
                             f"{self.files[self.file_order[current]]} (was the file changed?)")
        self.row, self.offset = row, offset
        _set_rng(self.rng, rng, self.name)
        return True

    def restore_position(self, records):
        """Continue after ``records`` records read from the start (when no position was saved)."""
        self.restore_data_position(self._initial)
        records = int(records)
        steps = 0 if records <= 0 else (records - 1) * self.count + self.rank + 1   # stream positions
        while steps > 0:        # whole stretches of a file at once
            take = min(steps, self.arrays[0].shape[0] - self.row - 1)
            self.row += take
            self.offset += take
            steps -= take
            if steps:
                self._next()
                steps -= 1

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
                self.rows = self._permute_rows(self.arrays[0].shape[0])
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
        self._to_tops(top, outs)


# --- WindowData (R-CNN) ------------------------------------------------------------------------------

def _cv2():
    from ..formats.datum import opencv as get
    return get()


def _c_round(v):
    """C's round(): halves away from zero (Python's round() goes to the even neighbour)."""
    v = float(v)
    return int(np.floor(v + 0.5)) if v >= 0 else -int(np.floor(-v + 0.5))


def parse_window_file(path, root_folder, fg_threshold, bg_threshold, where):
    """Caffe's R-CNN window file: repeated blocks of

        # <image index>
        <image path>
        <channels> <height> <width>
        <number of windows>
        <class> <overlap> <x1> <y1> <x2> <y2>      (one line per window, inclusive pixel corners)

    (whitespace-separated). Returns (images [(path, (c, h, w))], fg windows, bg windows); a
    window is (image index, label, overlap, x1, y1, x2, y2). Windows with overlap >= fg_threshold
    are foreground (their class must be > 0); those below bg_threshold are background (label and
    overlap set to 0); the rest are not used."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = f.read().split()
    except FileNotFoundError:
        raise DataError(f"{where}{path}: window file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}{path}: cannot read the window file: {exc}") from None
    if not tokens:
        raise DataError(f"{where}{path}: the window file is empty")
    pos = 0

    def take(kind, what):
        nonlocal pos
        if pos >= len(tokens):
            raise DataError(f"{where}{path}: the window file ends early (expected {what})")
        tok = tokens[pos]
        pos += 1
        try:
            return kind(tok)
        except ValueError:
            raise DataError(f"{where}{path}: expected {what}, got '{tok}' (token {pos})") from None

    images, fg, bg = [], [], []
    while pos < len(tokens):
        mark = take(str, "'#'")
        if mark != "#":
            raise DataError(f"{where}{path}: expected '#' to start an image block, got '{mark}' (token {pos})")
        index = take(int, "an image index")
        image_path = root_folder + take(str, "an image path")
        size = (take(int, "the channel count"), take(int, "the image height"), take(int, "the image width"))
        while len(images) <= index:
            images.append(None)
        images[index] = (image_path, size)
        for _ in range(take(int, "the number of windows")):
            label = take(int, "a class label")
            overlap = np.float32(take(float, "an overlap"))   # a C float, compared with float thresholds
            x1, y1, x2, y2 = (take(int, "a window corner") for _ in range(4))
            if overlap >= fg_threshold:
                if label <= 0:
                    raise DataError(f"{where}{path}: image {index}: a foreground window (overlap {overlap:g}) "
                                    f"has class {label}; foreground classes must be > 0")
                fg.append((index, label, float(overlap), x1, y1, x2, y2))
            elif overlap < bg_threshold:
                bg.append((index, 0, 0.0, x1, y1, x2, y2))
    return images, fg, bg


@register("WindowData")
class WindowData(_DataLayerBase):
    """R-CNN's window data layer: each batch holds ``batch_size · (1 − fg_fraction)`` background
    windows then the foreground ones, drawn at random (with replacement) from the window file
    (``window_data_param.source``; see :func:`parse_window_file`). Each window is cut from its
    image (read as colour, or grey for a 1-channel entry), optionally grown by ``context_pad``
    pixels of context at the output scale (``crop_mode: "square"`` makes it square first), warped
    to ``transform_param.crop_size`` squared with bilinear interpolation (the parts outside the
    image stay 0), optionally mirrored (``transform_param.mirror``), the mean (``mean_file``, its
    centre crop, or ``mean_value``) subtracted, and multiplied by ``window_data_param.scale``.
    Tops: data (N, C, crop, crop) and the labels (N). Caffe's arithmetic (float, C rounding)."""

    exact_num_top = 2

    def setup(self, bottom, top):
        wp, tp = self.param.window_data_param, self.param.transform_param
        where = f"layer '{self.name}': "
        self.batch_size = self._batch_size(wp.batch_size, "window_data_param.batch_size")
        if not wp.source:
            raise self.error("window_data_param.source is not set")
        self.crop = int(tp.crop_size)
        if self.crop <= 0:
            raise self.error("WindowData needs transform_param.crop_size > 0")
        self.context_pad = int(wp.context_pad)
        if 2 * self.context_pad >= self.crop and self.context_pad:
            raise self.error(f"context_pad {self.context_pad} leaves nothing of a {self.crop} crop")
        if wp.crop_mode not in ("warp", "square"):
            raise self.error(f"crop_mode must be \"warp\" or \"square\", got \"{wp.crop_mode}\"")
        self.square = wp.crop_mode == "square"
        self.mirror = bool(tp.mirror)
        # Caffe reads window_data_param.scale (transform_param.scale is not used by this layer);
        # minicaffe's prototxt upgrade moves an old-style data layer's scale to transform_param,
        # so it is taken from there when window_data_param no longer has it
        self.scale = np.float32(wp.scale if wp.HasField("scale") or not tp.HasField("scale") else tp.scale)
        self.fg_fraction = float(wp.fg_fraction)
        if not 0.0 <= self.fg_fraction <= 1.0:       # NaN included: the batch's share of foreground
            raise self.error(f"fg_fraction must be between 0 and 1, got {self.fg_fraction:g}")
        self.images, self.fg, self.bg = parse_window_file(
            wp.source, wp.root_folder, np.float32(wp.fg_threshold), np.float32(wp.bg_threshold), where)
        missing = [i for i, im in enumerate(self.images) if im is None]
        if missing:
            raise DataError(f"{where}{wp.source}: no block for image index {missing[0]}")
        channels = {im[1][0] for im in self.images}
        if len(channels) != 1 or not channels <= {1, 3}:
            raise DataError(f"{where}{wp.source}: every image must have the same channel count, 1 or 3 "
                            f"(got {sorted(channels)})")
        self.channels = channels.pop()
        log.info("WindowData: %d images, %d foreground and %d background windows", len(self.images),
                 len(self.fg), len(self.bg))
        self.mean = None
        self.mean_values = None
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise self.error("give mean_file or mean_value, not both")
        if tp.HasField("mean_file"):
            from ..data.transformer import load_mean_file
            try:
                self.mean = load_mean_file(tp.mean_file)
            except DataError as exc:
                raise _with_layer(self.name, exc) from None
            off = (self.mean.shape[2] - self.crop) // 2
            if self.mean.shape[0] != self.channels or off < 0 or self.mean.shape[1] - off < self.crop:
                raise self.error(f"mean_file {tp.mean_file} has shape {self.mean.shape}, which has no "
                                 f"centre {self.crop}x{self.crop} crop of {self.channels} channels")
        elif len(tp.mean_value):
            values = [float(v) for v in tp.mean_value]
            if len(values) not in (1, self.channels):
                raise self.error(f"give 1 mean_value or one per channel ({self.channels}), got {len(values)}")
            self.mean_values = np.asarray(values * (self.channels if len(values) == 1 else 1), np.float32)
        self.cache = {} if wp.cache_images else None
        self.rng = _child_rng()
        top[0].reshape(self.batch_size, self.channels, self.crop, self.crop)
        top[1].reshape(self.batch_size)
        self._log_shape(top)

    def _rand(self):
        return int(self.rng.integers(0, 2 ** 32))

    def _image(self, index):
        cv = _cv2()
        path = self.images[index][0]
        flag = cv.IMREAD_COLOR if self.channels == 3 else cv.IMREAD_GRAYSCALE
        if self.cache is not None:
            raw = self.cache.get(index)
            if raw is None:
                try:
                    with open(path, "rb") as f:
                        raw = self.cache[index] = np.frombuffer(f.read(), np.uint8)
                except OSError as exc:
                    raise DataError(f"layer '{self.name}': {path}: cannot read the image: "
                                    f"{exc.strerror or exc}") from None
            img = cv.imdecode(raw, flag)
        else:
            img = cv.imread(path, flag)
        if img is None:
            raise DataError(f"layer '{self.name}': {path}: could not open or decode the image")
        return img.reshape(img.shape[0], img.shape[1], -1)

    def _window(self, window, do_mirror, out):
        """Writes one window, transformed, into ``out`` (C, crop, crop), which starts at 0."""
        cv = _cv2()
        f32 = np.float32
        img = self._image(window[0])
        rows, cols = img.shape[:2]
        x1, y1, x2, y2 = window[3:]
        crop = self.crop
        out_w = out_h = crop
        pad_w = pad_h = 0
        if self.context_pad > 0 or self.square:
            context_scale = f32(crop) / f32(crop - 2 * self.context_pad)
            half_h, half_w = f32(y2 - y1 + 1) / f32(2), f32(x2 - x1 + 1) / f32(2)
            cx, cy = f32(x1) + half_w, f32(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _c_round(cx - half_w * context_scale), _c_round(cx + half_w * context_scale)
            y1, y2 = _c_round(cy - half_h * context_scale), _c_round(cy + half_h * context_scale)
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            px1, py1 = max(0, -x1), max(0, -y1)
            px2, py2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
            x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
            if x1 > x2 or y1 > y2:
                raise DataError(f"layer '{self.name}': {self.images[window[0]][0]}: window "
                                f"{window[3:]} lies outside the {cols}x{rows} image")
            scale_x, scale_y = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
            out_w = _c_round(f32(x2 - x1 + 1) * scale_x)
            out_h = _c_round(f32(y2 - y1 + 1) * scale_y)
            px1, px2 = _c_round(f32(px1) * scale_x), _c_round(f32(px2) * scale_x)
            pad_h = _c_round(f32(py1) * scale_y)
            pad_w = px2 if do_mirror else px1
            out_h = min(out_h, crop - pad_h)
            out_w = min(out_w, crop - pad_w)
        if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows):
            raise DataError(f"layer '{self.name}': {self.images[window[0]][0]}: window "
                            f"{window[3:]} lies outside the {cols}x{rows} image")
        if out_w <= 0 or out_h <= 0:
            return
        patch = cv.resize(img[y1:y2 + 1, x1:x2 + 1], (out_w, out_h), interpolation=cv.INTER_LINEAR)
        patch = patch.reshape(out_h, out_w, -1)
        if do_mirror:
            patch = patch[:, ::-1]
        chw = patch.transpose(2, 0, 1).astype(np.float32)
        if self.mean is not None:
            off = (self.mean.shape[2] - crop) // 2
            chw -= self.mean[:, off + pad_h:off + pad_h + out_h, off + pad_w:off + pad_w + out_w]
        elif self.mean_values is not None:
            chw -= self.mean_values[:, None, None]
        chw *= self.scale
        out[:, pad_h:pad_h + out_h, pad_w:pad_w + out_w] = chw

    def forward(self, bottom, top):
        if not self.fg or not self.bg:
            raise self.error(f"the window file must give foreground and background windows (it has "
                             f"{len(self.fg)} and {len(self.bg)})", DataError)
        data = np.zeros((self.batch_size, self.channels, self.crop, self.crop), np.float32)
        labels = np.empty(self.batch_size, np.float32)
        num_fg = int(np.float32(self.batch_size) * np.float32(self.fg_fraction))
        item = 0
        for pool, count in ((self.bg, self.batch_size - num_fg), (self.fg, num_fg)):
            for _ in range(count):
                window = pool[self._rand() % len(pool)]
                do_mirror = self.mirror and self._rand() % 2 == 1
                self._window(window, do_mirror, data[item])
                labels[item] = window[1]
                item += 1
        top[0].reshape(data.shape)
        top[1].reshape(labels.shape)
        self._to_tops(top, [data.astype(backend.dtype()), labels.astype(backend.dtype())])


# --- HDF5Output --------------------------------------------------------------------------------------

@register("HDF5Output")
class HDF5Output(Layer):
    """Writes its two bottoms to ``hdf5_output_param.file_name`` as the float datasets "data" and
    "label" (each in Caffe's legacy 4-D shape, num x channels x height x width). Caffe creates the
    file at set-up and its second forward pass fails (the datasets exist); here every forward pass
    writes the file anew, atomically (a temporary name, then a rename), so it holds the latest batch
    and never a partial one. No tops, no gradient."""

    exact_num_bottom = 2
    exact_num_top = 0
    allow_force_backward_all = False

    def setup(self, bottom, top):
        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is not set")
        self._h5 = _h5py()

    def reshape(self, bottom, top):
        if bottom[0].num != bottom[1].num:
            raise self.error(f"data {bottom[0].shape} and label {bottom[1].shape} must have the same batch size")
        for i, b in enumerate(bottom):
            if len(b.shape) > 4:
                raise self.error(f"bottom[{i}] must have at most 4 axes, got shape {b.shape}")

    def forward(self, bottom, top):
        from ..fileio import atomic_open
        arrays = [np.asarray(b.data, np.float32).reshape(b.num, b.channels, b.height, b.width) for b in bottom]
        try:
            with atomic_open(self.file_name, "w+b") as f:   # HDF5 reads back what it writes
                with self._h5.File(f, "w") as h5:
                    h5.create_dataset("data", data=arrays[0])
                    h5.create_dataset("label", data=arrays[1])
        except OSError as exc:
            raise DataError(f"layer '{self.name}': {self.file_name}: cannot write: {exc.strerror or exc}") from None
        log.info("Saved %d rows to HDF5 file %s", arrays[0].shape[0], self.file_name)

    def backward(self, top, propagate_down, bottom):
        """No gradient."""
