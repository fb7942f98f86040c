"""Winograd forward for 3x3, stride-1, undilated convolutions (CPU only), in two tile sizes:
F(2x2, 3x3) and F(4x4, 3x3); and for 5x5 ones, F(2x2, 5x5) and F(3x3, 5x5) (their own section
below).

Each m x m block of outputs comes from an (m+2) x (m+2) input tile (tiles overlap by 2): the filters
and tiles are transformed (``G g G^T``, ``B^T d B``), multiplied elementwise per transform position,
which over channels is (m+2)^2 GEMMs ``(cout x cin) @ (cin x tiles)``, and transformed back
(``A^T M A``). Per m x m outputs that is 16 multiplies for F(2x2) and 36 for F(4x4) where im2col +
GEMM does 36 and 144: 2.25x and 4x fewer (Lavin & Gray 2015). The work runs a band of tile rows at
a time, so its scratch memory stays small.

Transform points. F(m, 3) evaluates polynomials at m + 1 finite points and infinity; the matrices
follow from the points (``matrices``: ``A^T`` the Vandermonde rows, ``G`` the Lagrange weights,
``B^T`` solved from the bilinear identity and checked exactly in rationals). F(2x2) uses 0, 1, -1.
F(4x4) uses 0, 1, -1, 1/2, -2 (not the common 0, +-1, +-2): its float32 error against a float64
reference, in an implementation straight from the matrices, was 2.5-4x smaller at the largest
element (max|y|-relative 3.7e-6 against 1.6e-5 at 256 input channels, 5.6e-6 against 1.4e-5 at
512) and 1.5x smaller in RMS, as Barabasz et al. report for points paired as a and 1/a; 0, +-1,
+-1/2 was as bad as +-2 (tests/test_conv_engines.py checks the order, and the engine's error).
The price, a denser ``B^T``, is nothing to a GEMM.

Transforms. Both are separable: over the rows of every tile, then over its columns. F(2x2) keeps
channels first, the padded input's columns split by parity, and writes each side as a few NumPy
passes over a band's tiles. F(4x4) keeps channels last with each tile's six columns apart
(``_source4``): one image's tile row is then six (6, 6 tw cin) rows, so each side of each
transform is a small GEMM with the 6x6 ``B^T`` or 4x6 ``A^T`` over ``tw * cin`` (``tw * cout``)
contiguous columns (``_band4``). Measured on one core, VGG-sized tile rows: the GEMMs take 0.2x
the time of the same transforms as element-wise passes (26 a side, shared subexpressions: 1.8
against 8.0 ms on conv1_2's); element-wise passes channels first, over runs of ``tw`` values,
cost 0.7-2.6 ns a value. The input's copy to channels last goes through OpenCV's transpose
(``_transposer``; 5 against 18 ms for NumPy's strided copy on conv1_2's batch of 2). Each side is
one ``np.matmul`` over a stack of strided views covering every image and tile row of a chunk
(``_stacked_gemm``), not a Python loop of a GEMM per image and row: NumPy loops over the stack
in C with the GIL released, so the pool's threads overlap (the loop of ~3-10 us calls held the GIL
between calls, and two threads ran it no faster than one) and the call overhead goes. The output
is written channels last and goes to ``y`` by one OpenCV transpose per image and band, where the
direct scatter into channels-first ``y`` read with a stride of ``tw * cout`` (24 against 13 us a
tile row of ResNet's 64->64 56x56). ResNet-50's 3x3 layers at batch 10, forward, old/new: one
thread (CPU time) 1.50x, 1.48x, 1.20x, 1.15x from 56x56 to 7x7; two threads 1.94x, 1.95x, 1.57x,
1.11x (docs/performance.md). Not taken:
the 36x36 ``kron(B^T, B^T)`` as one GEMM over gathered tiles (2592 flops a tile where the GEMMs
that follow do 72 per output channel).

Threads. The input transform of a band is split over input channels (F(2x2)) or tile rows
(F(4x4)), the output transform over output channels or tile rows, the padded copy of the input
over channels or rows, on the kernels' pool (``core.threads.parallel_for``); each chunk does the
same operations on its own part, so the result has the same bits at any thread count. The big
GEMMs run on BLAS's threads.

Which tile size a shape gets is ``tile_size``; where Winograd pays at all is the engine's business
(``minicaffe.kernels.conv_engines``); this module says what it can compute (``applies``) and
computes it.
"""
import math
from fractions import Fraction

import numpy as np

from ..core import blas, threads
from ..core.context import Slot
from . import compiled
from .im2col import workspace

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_SRC, _ROWS, _TILES = Slot("wino_src"), Slot("wino_rows"), Slot("wino_tiles")
_PROD, _OUT = Slot("wino_prod"), Slot("wino_out")
_TMP_D, _CHANNELS_LAST = Slot("wino_tmp_d"), Slot("wino_channels_last")
_CHANNELS_LAST_OUT = Slot("wino_channels_last_out")
_IMAGE_T = Slot("wino_image_t")
_GRAD = Slot("wino_grad")
# the data gradient's padded channels-last dy, kept for the weight gradient's dy tiles (forward's
# source_slot, weight_gradient's dy_source): apart from _SRC, which the weight gradient's x takes
DY_SOURCE = Slot("wino_dy_source")

# _source_channels_last transposes a whole image at once up to this many values (4 MB of float32)
IMAGE_TRANSPOSE_ELEMENTS = 1 << 20

# a band's transformed tiles and their products: (m+2)^2 * (cin + cout) * columns floats at most
# (then at least BAND_MIN_COLUMNS tile columns, so each GEMM stays efficient). Why this size: each
# band is four passes on the kernels' pool (input transform, GEMMs, output transform, copy into y)
# that wait for one another, and on 64-channel layers the bands were too short for two threads to
# keep busy. Sized as (m+2)^2 * cin * columns <= 1 << 20 before; F(4x4) on 2 cores (Intel Xeon),
# ms, before / now, forward and backward: VGG-16's conv1_2 at batch 4 80 / 69 and 157 / 146 (3
# tile rows a band, now 6), at batch 2 41 / 34 and 81 / 70; ResNet-50's 64-channel 3x3 at batch 8
# 9.3 / 8.9 and 20.2 / 18.3. No change at one thread, nor on wider layers. Not more: 1 << 23 gave
# conv1_2 8 rows (64 ms forward) but GoogLeNet's conv2/3x3 (64 -> 192) 6 rows instead of 4 at
# batch 10, and its inference 12.6 MB more peak memory (220 MB, above OpenCV's 212).
BAND_ELEMENTS = 6 << 20
BAND_MIN_COLUMNS = 512

# F(4x4)'s transform GEMMs (6 x 6 x N) go in column blocks of this many, under OpenBLAS's
# threshold for using more than one thread (see _stacked_gemm)
SMALL_GEMM_COLUMNS = 4096


POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}

# tile_size: F(4x4) from this many 4x4 output tiles in a batch, else F(2x2)
F4_MIN_TILES = 24

# F(3x3, 5x5)'s six finite points. Of the sets tried, the one with the smallest float32 error (one
# 7x7 tile over 256 input channels against a float64 reference, of the largest output): these
# 2.7e-6 (F(2x2, 5x5): 2.2e-6); 0, +-1, +-1/2, 2 and its mirrors 8.4e-6 to 9.4e-6; 0, +-1, +-2, 3
# 2.2e-4.
POINTS3X5 = (0, 1, -1, Fraction(1, 2), -2, 2)

# tile_size: a 5x5 kernel goes F(3x3, 5x5) from this many 3x3 output tiles in the batch, where the
# compiled transforms run; F(2x2, 5x5) otherwise.
# F(3x3) was ahead on every layer measured (conv_engines.WINOGRAD5_*), so from one tile;
# ``bench_engine_ab.py --set F3X5_MIN_TILES=1000000000`` measures it against F(2x2).
F3X5_MIN_TILES = 1


def applies(geom, group):
    """Whether the Winograd forward can compute this convolution: 3x3 or 5x5, stride 1, no
    dilation, in any number of groups (conv_engines.WinogradConv runs a grouped one group by
    group)."""
    return geom.kh == geom.kw and geom.kh in (3, 5) and geom.sh == geom.sw == 1 and geom.dh == geom.dw == 1


def tile_size(num, oh, ow, taps=3):
    """The output tile side for ``num`` images of ``oh x ow`` outputs. 5x5 (``taps``): 3 (F(3x3,
    5x5)) from F3X5_MIN_TILES 3x3 tiles where the compiled kernels run, else 2. 3x3: 4 from F4_MIN_TILES
    4x4 tiles in the batch, else 2. Why (one thread, forward ms, conv_engines' table): F(4x4) was
    ahead of F(2x2) on every layer from 64 tiles on (VGG, ResNet, GoogLeNet, CaffeNet conv3 at
    batch 8: 1.04-1.8x), but with fewer tiles its GEMMs get too thin and its padding shows: at
    batch 2, ResNet's 7x7 13.0 against 20.0 ms, CaffeNet's 13x13 8.6 against 10.7, VGG conv5's
    14x14 21.0 against 23.7. Since the transforms are stacked GEMMs (``_stacked_gemm``), F(4x4)
    leads from fewer tiles (one thread, CPU ms, TEST phase): ResNet 256->256 14² at batch 2 (32
    tiles) 6.3 against 7.0, 512->512 7² at batch 4 (16 tiles) 12.7 against 13.7, but not at 4-16
    tiles everywhere (256->256 14² at batch 1 4.1 against 3.5, 7² at batch 2 12.0 against 10.3):
    so 4 from 24 tiles, the fewest the engine table picks Winograd for. F(2x2) runs where the
    engine is forced on fewer tiles, or is handed 16-position filters. A 5x5 kernel (``taps`` 5)
    goes as said first."""
    if taps == 5:
        return 3 if compiled.enabled() and num * -(-oh // 3) * -(-ow // 3) >= F3X5_MIN_TILES else 2
    return 4 if num * -(-oh // 4) * -(-ow // 4) >= F4_MIN_TILES else 2


def matrices(points, r=3):
    """``(A^T, G, B^T)`` of F(m, r) for the m + r - 2 finite ``points`` (and infinity), in float64.

    ``A^T[i, j] = a_j^i`` and ``G[j, k] = a_j^k / prod_{l != j}(a_j - a_l)`` (the infinity column/row
    picks the leading coefficient), each position's sign flipped where its row of ``G`` starts
    negative (the transforms below are written for that convention); ``B^T`` is the unique solution of the identity
    ``sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k]`` (output i of the correlation reads input
    i + k with filter tap k), solved in float64, rounded to small fractions and checked exactly."""
    pts = [Fraction(p) for p in points]
    n = len(pts) + 1
    m = n - r + 1
    at = [[Fraction(0)] * n for _ in range(m)]
    g = [[Fraction(0)] * r for _ in range(n)]
    for j, a in enumerate(pts):
        norm = Fraction(1)
        for b in pts[:j] + pts[j + 1:]:
            norm *= a - b
        for i in range(m):
            at[i][j] = a ** i
        for k in range(r):
            g[j][k] = a ** k / norm
    at[m - 1][n - 1] = g[n - 1][r - 1] = Fraction(1)
    for j in range(n):          # sign convention: each row of G starts positive (B^T's row follows)
        if next(v for v in g[j] if v) < 0:
            g[j] = [-v for v in g[j]]
    eqs = [(i, k) for i in range(m) for k in range(r)]
    lhs = np.array([[float(at[i][j] * g[j][k]) for j in range(n)] for i, k in eqs])
    rhs = np.array([[float(l == i + k) for l in range(n)] for i, k in eqs])
    bt_f = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    bt = [[Fraction(v).limit_denominator(64) for v in row] for row in bt_f]
    for i, k in eqs:
        for l in range(n):
            if sum(at[i][j] * g[j][k] * bt[j][l] for j in range(n)) != (l == i + k):
                raise AssertionError(f"no exact Winograd transform for points {points}")
    return tuple(np.array([[float(v) for v in row] for row in mat]) for mat in (at, g, bt))


_MATRICES = {m: matrices(p) for m, p in POINTS.items()}
# vec(G g G^T) = kron(G, G) vec(g): ((m+2)^2, 9), float64
_KRON = {m: np.kron(g, g) for m, (_, g, _) in _MATRICES.items()}

# F(2x2, 5x5): the same five finite points as F(4x4, 3x3), so the same 6x6 input transform B^T
# (``matrices`` puts the Lagrange weights in G for any r, and the sign convention follows G's first
# column, 1 / prod(a_j - a_l) in both), 2x6 A^T, 6x5 G. Per 2x2 outputs it multiplies 36 times
# where im2col + GEMM does 100 (2.78x fewer). Its float32 error against a float64 reference, one
# tile over 256 input channels: 1.7e-6 of the largest output (0, +-1, +-2: 5.4e-6).
MATRICES5 = matrices(POINTS[4], r=5)
_KRON5 = np.kron(MATRICES5[1], MATRICES5[1])        # (36, 25)

# F(3x3, 5x5): 7x7 input tiles three apart, 3x7 A^T, 7x5 G, 7x7 B^T (POINTS3X5)
MATRICES3X5 = matrices(POINTS3X5, r=5)
_KRON3X5 = np.kron(MATRICES3X5[1], MATRICES3X5[1])  # (49, 25)


def _kron_of(taps, tile):
    """kron(G, G) of the tile size ``tile`` for a ``taps`` x ``taps`` kernel."""
    if taps == 5:
        return _KRON3X5 if tile == 3 else _KRON5
    return _KRON[tile]


def _tile5_of(u):
    """The tile side of a 5x5 kernel's transformed filters ``u`` (36 or 49 positions first)."""
    if u.shape[0] not in (36, 49):
        raise ValueError(f"transformed 5x5 filters of shape {u.shape}: expected 36 or 49 positions first")
    return 2 if u.shape[0] == 36 else 3


def _tile_of(u):
    """The tile side of transformed filters ``u`` ((m+2)^2, cout, cin)."""
    for m in _KRON:
        if u.shape[0] == (m + 2) ** 2:
            return m
    raise ValueError(f"transformed filters of shape {u.shape}: expected 16 or 36 positions first")


class FilterCache:
    """The transformed filters of one layer, recomputed only when the weights (or the tile size)
    change (a compare costs one pass over them, the transform several)."""

    def __init__(self):
        self.weights = self.transformed = None

    def get(self, w, tile=2, flipped=False):
        """``transform_filters(w, tile=tile, flipped=flipped)``, kept until ``w`` changes (a cache
        serves one of the two: forward or flipped)."""
        n = (tile + w.shape[-1] - 1) ** 2
        if (self.weights is None or self.weights.shape != w.shape or self.weights.dtype != w.dtype
                or self.transformed.shape[0] != n):
            self.weights = np.empty_like(w)
            self.transformed = np.empty((n,) + w.shape[:2], w.dtype)
        elif np.array_equal(self.weights, w):
            return self.transformed.transpose(0, 2, 1) if flipped else self.transformed
        np.copyto(self.weights, w)
        return transform_filters(w, out=self.transformed, flipped=flipped)


def transform_filters(w, out=None, tile=None, flipped=False):
    """(cout, cin, 3, 3) -> ((m+2)^2, cout, cin): ``G g G^T`` flattened over the transform positions,
    into ``out`` when given (its first axis, 16 or 36, then says the tile size; else ``tile``,
    default 2); (cout, cin, 5, 5) -> (36, cout, cin), F(2x2, 5x5)'s, or (49, cout, cin), F(3x3,
    5x5)'s (``tile`` 3, or such an ``out``). One GEMM ``kron(G, G) @ w``
    (K = 9 or 25) in the weights' dtype, written straight into ``out``: a TRAIN net redoes it
    every forward, and the float64 version with a transposed copy took as long as VGG conv5's
    whole F(4x4) forward; its float32 rounding (a few ulps of each transformed weight) is small
    next to the tile transforms' error.

    ``flipped``: the data gradient's filters instead, those of ``w`` with its two channel axes
    swapped and its taps flipped in both spatial axes, as a ((m+2)^2, cin, cout) transposed view of
    ``out``. A k x k kernel flipped in both axes is its k*k taps in reverse order, so the flip is
    kron(G, G) with its columns reversed, and the GEMMs take the transposed view as it is: no
    flipped copy of the weights (ResNet-50's 256-channel layers: that copy took 0.85 ms of a
    12 ms backward)."""
    cout, cin, taps = w.shape[0], w.shape[1], w.shape[-1]
    if taps == 5:
        tile = _tile5_of(out) if out is not None else (tile or 2)
    elif out is not None:
        tile = _tile_of(out)
    elif tile is None:
        tile = 2
    kron = _kron_of(taps, tile)
    kron = (kron[:, ::-1] if flipped else kron).astype(w.dtype)
    if out is None:
        out = np.empty((kron.shape[0], cout, cin), w.dtype)
    blas.matmul(kron, w.reshape(cout * cin, taps * taps).T, out=out.reshape(kron.shape[0], cout * cin))
    return out.transpose(0, 2, 1) if flipped else out


def forward(x, w, y, pad_h, pad_w, u=None, band=None, tile=None, source_slot=_SRC):
    """``y[...] = conv(x, w)`` for a 3x3 or 5x5 stride-1 kernel; x (n, cin, h, w), y (n, cout, oh,
    ow); ``u``: the filters already transformed (``transform_filters``; its size says the tile
    size); else ``tile`` (3x3: 2 or 4, 5x5: 2 or 3; default ``tile_size``); ``band``: tile rows per
    band (default: sized from ``BAND_ELEMENTS``; tests pass 1 to reach ragged bands). Returns the
    padded channels-last copy of ``x`` that F(4x4, 3x3)'s compiled path and the 5x5 tiles read (in
    the workspace ``source_slot``: the data gradient keeps its dy there for ``weight_gradient``),
    else None."""
    num, cin = x.shape[:2]
    oh, ow = y.shape[2], y.shape[3]
    if w.shape[-1] == 5:
        return _forward5(x, w, y, pad_h, pad_w, u, band, tile, source_slot)
    if u is not None:
        m = _tile_of(u)
    else:
        m = tile if tile is not None else tile_size(num, oh, ow)
        u = transform_filters(w, tile=m)
    u = u.astype(x.dtype, copy=False)
    th, tw = -(-oh // m), -(-ow // m)
    band = _band_rows(band, m, num, cin, y.shape[1], th, tw)
    if m == 2:
        src = _source2(x, pad_h, pad_w, th, tw)
        for t0 in range(0, th, band):
            _band2(src, u, y, t0, min(th, t0 + band), tw, oh, ow)
    elif x.dtype in (np.float32, np.float64) and compiled.enabled():
        src = _source_channels_last(x, pad_h, pad_w, 4 * th + 2, 4 * tw + 2, slot=source_slot)
        forward_channels_last(src, u, y, band)
        return src
    else:
        src = _source4(x, pad_h, pad_w, th, tw)
        for t0 in range(0, th, band):
            _band4(src, u, y, t0, min(th, t0 + band), oh, ow)


def _band_rows(band, m, num, cin, cout, th, tw):
    """Tile rows per band of an F(m x m, 3x3) forward over ``th`` x ``tw`` tiles of ``num`` images:
    ``band`` when given, else sized from BAND_ELEMENTS (at least BAND_MIN_COLUMNS tiles); at most
    ``th``."""
    if band is None:
        per_row = num * tw
        band = max(BAND_ELEMENTS // ((m + 2) ** 2 * (cin + cout) * per_row), -(-BAND_MIN_COLUMNS // per_row), 1)
    return min(band, th)


def forward_channels_last(src, u, y, band=None):
    """F(4x4, 3x3)'s compiled forward from ``src``, the input already padded channels last as
    ``_source_channels_last`` makes it (n, 4*th + 2, 4*tw + 2, cin) for the output ``y`` (n, cout,
    oh, ow), th x tw tiles; ``u`` the 36-position transformed filters. ``forward`` calls it with the
    source of its ``x``; a strided layer cut into blocks (kernels/space_to_depth.py) with its own."""
    oh, ow = y.shape[2], y.shape[3]
    th, tw = -(-oh // 4), -(-ow // 4)
    band = _band_rows(band, 4, src.shape[0], src.shape[3], y.shape[1], th, tw)
    for t0 in range(0, th, band):
        _band_channels_last(src, u, y, t0, min(th, t0 + band), tw, oh, ow, 4)


def _transform_gemms(a, b, out):
    """``out[k] = a[k] @ b[k]`` for each transform position ``k``: 16 or 36 GEMMs that do not depend
    on one another, whole GEMMs side by side on the kernels' pool (core/blas.py: 64-channel layers'
    bands twice as fast on 2 cores as each GEMM split over both)."""
    blas.parallel_gemms(out.shape[0], lambda k0, k1: blas.matmul(a[k0:k1], b[k0:k1], out=out[k0:k1]))


def _source2(x, pad_h, pad_w, th, tw):
    """F(2x2)'s padded input, channels first so the tile matrix is (cin, n * tiles) without another
    copy, and columns split by parity (src[..., p, k] is padded column 2 k + p), so the column
    transform reads contiguous runs."""
    num, cin, h, wd = x.shape
    src = workspace(np, (cin, num, 2 * th + 2, 2, tw + 1), x.dtype, _SRC)
    xt = x.transpose(1, 0, 2, 3)

    def fill(c0, c1):
        s = src[c0:c1]
        s.fill(0)
        for p in range(2):
            first = (p - pad_w) % 2                 # first x column landing on parity p
            count = len(range(first, wd, 2))
            k0 = (pad_w + first) // 2
            np.copyto(s[:, :, pad_h:pad_h + h, p, k0:k0 + count], xt[c0:c1, ..., first::2])
    threads.parallel_for(cin, fill, work=src.size)
    return src


def _source4(x, pad_h, pad_w, th, tw):
    """F(4x4)'s padded input, channels last and every tile's six columns apart:
    ``src[n, r, j, q, c]`` is padded ``x[n, c, r, 4 q + j]`` (the two columns tiles share are
    stored twice). Why: the six rows of a tile row are then one (6, 6 tw cin) matrix and each
    transformed row one (6, tw cin) matrix, so both sides of the input transform are GEMMs.
    Split over padded rows on the pool."""
    num, cin, h, wd = x.shape
    hp = 4 * th + 2
    src = workspace(np, (num, hp, 6, tw, cin), x.dtype, _SRC)
    transpose = _transposer()

    def fill(r0, r1):
        a0, a1, part = _rows_holding_x(src, r0, r1, pad_h, h)
        if part is None:
            return
        rows = a1 - a0
        for k in range(num):
            xk = transpose(x[k, :, a0 - pad_h:a1 - pad_h], (rows, wd, cin), x.dtype)    # (rows, w, cin)
            for j in range(4):
                qa = max(0, -(-(pad_w - j) // 4))               # tiles whose column j is inside x
                qb = min(tw, (wd - 1 + pad_w - j) // 4 + 1)
                if qb <= qa:
                    part[k, :, j].fill(0)
                    continue
                part[k, :, j, :qa].fill(0)
                part[k, :, j, qb:].fill(0)
                x0 = 4 * qa + j - pad_w
                np.copyto(part[k, :, j, qa:qb], xk[:, x0:x0 + 4 * (qb - qa) - 3:4])
            # columns 4 and 5 of tile q are columns 0 and 1 of tile q + 1 (zero past the last tile)
            np.copyto(part[k, :, 4:, :tw - 1], part[k, :, :2, 1:])
            x0 = 4 * tw - pad_w                             # x column of the last tile's column 4
            for j in (4, 5):
                if 0 <= x0 + j - 4 < wd:
                    np.copyto(part[k, :, j, tw - 1], xk[:, x0 + j - 4])
                else:
                    part[k, :, j, tw - 1].fill(0)
    threads.parallel_for(hp, fill, work=src.size)
    return src


def _rows_holding_x(src, r0, r1, pad_h, h):
    """Padded rows ``r0:r1`` of a source buffer (axis 1): the padding rows zeroed, and
    ``(a0, a1, view)`` of the rows ``a0:a1`` that hold ``x``'s rows ``a0 - pad_h:a1 - pad_h``
    (``view`` None when there are none)."""
    s = src[:, r0:r1]
    a0, a1 = max(r0, pad_h), min(r1, pad_h + h)
    if a0 >= a1:
        s.fill(0)
        return a0, a1, None
    s[:, :a0 - r0].fill(0)
    s[:, a1 - r0:].fill(0)
    return a0, a1, s[:, a0 - r0:a1 - r0]


def _tmp(slot, shape, dtype):
    return workspace(np, shape, dtype, slot)


def _opencv():
    """The cv2 module where it imports (its blocked transpose), else None."""
    try:
        import cv2
        cv2.transpose           # a half-removed cv2 folder imports as an empty namespace package
    except (ImportError, AttributeError):
        return None
    return cv2


def _transposer():
    """``f(a, shape, dtype)``: the (c, rows, w) array ``a`` channels last, as ``shape`` (rows, w, c):
    OpenCV's blocked transpose into this thread's scratch where cv2 imports (3.6x NumPy's strided
    copy on VGG conv1_2's input: 5 against 18 ms), else a NumPy view that the copies read strided."""
    if _opencv() is None:
        return lambda a, shape, dtype: a.transpose(1, 2, 0)

    def transpose(a, shape, dtype):
        out = _tmp(_CHANNELS_LAST, shape, dtype)
        _transpose_into(a.reshape(a.shape[0], -1), out.reshape(-1, a.shape[0]))
        return out
    return transpose


def _transpose_into(a, dst, cv2=None):
    """``dst[...] = a.T`` for a C-contiguous 2-D ``a`` and a 2-D ``dst`` whose rows may be strided
    (e.g. a band of rows of every channel of one image): OpenCV's blocked transpose (it writes
    through a row step) where ``cv2`` (default: ``_opencv()``) is the module, else NumPy's strided
    copy. A pure copy either way: the same bits."""
    cv2 = cv2 or _opencv()
    if cv2 is None:
        np.copyto(dst, a.T)
        return
    got = cv2.transpose(a, dst)
    if got is not dst and not np.shares_memory(got, dst):     # OpenCV made its own array
        np.copyto(dst, got)


def _band2(src, u, y, t0, t1, tw, oh, ow):
    cin, num = src.shape[0], src.shape[1]
    cout = u.shape[1]
    bt = t1 - t0
    wh = src.shape[4]
    dt = src.dtype
    rows = [src[:, :, 2 * t0 + i:2 * t1 + i:2] for i in range(4)]   # (cin, n, bt, 2, wh) each
    t = workspace(np, (4, cin, num, bt, 2, wh), dt, _ROWS)
    v = workspace(np, (4, 4, cin, num, bt, tw), dt, _TILES)

    def transform_in(c0, c1):
        # B^T d B with B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,-1,0,1]]: rows first ...
        r = [a[c0:c1] for a in rows]
        tc = t[:, c0:c1]
        np.subtract(r[0], r[2], out=tc[0])
        np.add(r[1], r[2], out=tc[1])
        np.subtract(r[2], r[1], out=tc[2])
        np.subtract(r[3], r[1], out=tc[3])
        # ... then columns (all four rows at once), into the 16 tile matrices (cin, n * bt * tw)
        c = [tc[..., j % 2, j // 2:j // 2 + tw] for j in range(4)]
        vc = v[:, :, c0:c1]
        np.subtract(c[0], c[2], out=vc[:, 0])
        np.add(c[1], c[2], out=vc[:, 1])
        np.subtract(c[2], c[1], out=vc[:, 2])
        np.subtract(c[3], c[1], out=vc[:, 3])
    threads.parallel_for(cin, transform_in, work=t.size + v.size)
    cols = num * bt * tw
    m = workspace(np, (16, cout, cols), dt, _PROD)
    _transform_gemms(u, v.reshape(16, cin, cols), m)
    m = m.reshape(4, 4, cout, num, bt, tw)
    s = workspace(np, (2, 4, cout, num, bt, tw), dt, _OUT)

    def transform_out(o0, o1):
        # A^T M A with A^T = [[1,1,1,0],[0,1,-1,1]]: rows ...
        mc, sc = m[:, :, o0:o1], s[:, :, o0:o1]
        np.add(mc[0], mc[1], out=sc[0])
        sc[0] += mc[2]
        np.subtract(mc[1], mc[2], out=sc[1])
        sc[1] += mc[3]
        # ... then columns, straight into y (cropping the last tile row/column of an odd size)
        for a in range(2):
            r0 = 2 * t0 + a
            nr = min(bt, (oh - r0 + 1) // 2)
            if nr <= 0:
                continue
            for b in range(2):
                nc = (ow - b + 1) // 2
                out = y[:, o0:o1, r0:r0 + 2 * nr:2, b:b + 2 * nc:2].transpose(1, 0, 2, 3)
                sa = sc[a, :, :, :, :nr, :nc]
                if b == 0:
                    np.add(sa[0], sa[1], out=out)
                    out += sa[2]
                else:
                    np.subtract(sa[1], sa[2], out=out)
                    out += sa[3]
    threads.parallel_for(cout, transform_out, work=m.size + s.size)


def _flat(a, shape):
    """``a`` reshaped without a copy (a GEMM's ``out`` must be the array itself)."""
    return np.reshape(a, shape, copy=False)


def _stacked_gemm(a, b, out):
    """``out[..., :, :] = a @ b[..., :, :]`` for a transform matrix ``a`` (6x6 or 4x6) and a stack
    ``b`` (..., 6, N) of strided matrices, as one ``np.matmul`` per block of at most
    SMALL_GEMM_COLUMNS columns. Why: NumPy loops over the stack in C (one BLAS call a matrix) with
    the GIL released throughout, where a Python loop of one call per matrix held the GIL between
    calls of a few microseconds each: on two pool threads those transforms ran no faster than on
    one (the threads queued for the GIL). The column blocks: OpenBLAS runs a GEMM on all its threads
    from m*n*k > 262144 (4 x 65536), and waking a second thread for a GEMM of ~0.1 ms, thousands of
    times a forward, made VGG conv4_2's F(4x4) forward 18x slower at two BLAS threads (1145 against
    64 ms); blocks under the threshold stay on the calling thread (the kernels' pool splits the
    work)."""
    n = b.shape[-1]
    if n <= SMALL_GEMM_COLUMNS:
        blas.matmul(a, b, out=out)
        return
    for j in range(0, n, SMALL_GEMM_COLUMNS):
        k = min(n, j + SMALL_GEMM_COLUMNS)
        blas.matmul(a, b[..., j:k], out=out[..., j:k])


# The per-thread temporaries of F(4x4)'s transforms take at most about this many bytes: a chunk of
# tile rows goes through them in steps of rows (each step still one stacked GEMM over every image).
# Unbounded, a chunk's temporaries grew with the batch: GoogLeNet's inference peak went from 200 to
# 226 MB (OpenCV's: 215) with the stacked transforms, and is 214 MB with these steps and the output
# in the tiles' buffer, at the same speed (bench_nets, batch 10).
TRANSFORM_STEP_BYTES = 1 << 20


def _in_row_steps(fn, bytes_per_row):
    """``fn`` for a pool chunk of tile rows ``r0:r1``, run in steps of about TRANSFORM_STEP_BYTES of
    temporaries (at least one row each)."""
    step = max(1, TRANSFORM_STEP_BYTES // max(1, bytes_per_row))

    def chunk(r0, r1):
        for a in range(r0, r1, step):
            fn(a, min(r1, a + step))
    return chunk


def _band4(src, u, y, t0, t1, oh, ow):
    """Tile rows ``t0:t1`` of F(4x4), channels last: tiles (36, n, rows, tw, cin), GEMMs
    ``(tiles x cin) @ (cin x cout)``, products (36, n, rows, tw, cout). Each side of each transform
    is one stacked GEMM (``_stacked_gemm``) over every image and every tile row of a chunk: the 6x6
    ``B^T`` (4x6 ``A^T``) times (6, ``tw * cin``) strided views, split over the band's tile rows on
    the pool. The output lands channels last (n, rows, ow, cout) and goes to ``y`` by one 2-D
    transpose per image (``_transpose_into``, split over images): the direct scatter into
    channels-first ``y`` (innermost stride ``tw * cout`` on the read side) cost 2x the two passes
    (24 against 13 us a tile row of ResNet's 64->64 56x56)."""
    num, hp, _, tw, cin = src.shape
    cout = u.shape[1]
    bt = t1 - t0
    dt = src.dtype
    at, _, bt_m = (np.asarray(a, dt) for a in _MATRICES[4])
    v = workspace(np, (6, 6, num, bt, tw, cin), dt, _TILES)
    run_in, run_out = tw * cin, tw * cout
    row_in = 6 * run_in                         # one padded row of src: (6 columns, tw, cin)
    isz = src.itemsize
    cols = num * bt * tw

    def transform_in(r0, r1):
        nr = r1 - r0
        tr = _tmp(_ROWS, (num, nr, 6, 6, run_in), dt)     # B^T d: (image, row, i, j, (q, c))
        # rows of every tile (all six columns at once): src rows 4 r .. 4 r + 5, overlapping views
        d = np.lib.stride_tricks.as_strided(
            src[:, 4 * (t0 + r0):], shape=(num, nr, 6, row_in),
            strides=(src.strides[0], 4 * src.strides[1], src.strides[1], isz), writeable=False)
        _stacked_gemm(bt_m, d, _flat(tr, (num, nr, 6, row_in)))
        # ... then the columns, into the 36 tile matrices (v's rows: image, tile row, tile column)
        vv = _flat(v[:, :, :, r0:r1], (6, 6, num, nr, run_in)).transpose(2, 3, 0, 1, 4)
        _stacked_gemm(bt_m, tr, vv)
    threads.parallel_for(bt, _in_row_steps(transform_in, num * 36 * run_in * isz), work=2 * v.size)
    m = workspace(np, (36, cols, cout), dt, _PROD)
    _transform_gemms(v.reshape(36, cols, cin), u.transpose(0, 2, 1), m)
    m = m.reshape(6, 6, num, bt, tw, cout)
    ycl = _channels_last_output(v, (num, 4 * bt, ow, cout))

    def transform_out(r0, r1):
        nr = r1 - r0
        sr = _tmp(_OUT, (num, nr, 4, 6, run_out), dt)     # A^T M: (image, row, a, j, (q, c))
        o = _tmp(_TMP_D, (num, nr, 4, 4, tw, cout), dt)   # A^T M A: (image, row, a, b, q, c)
        mm = _flat(m[:, :, :, r0:r1], (6, 6, num, nr, run_out)).transpose(2, 3, 1, 0, 4)
        _stacked_gemm(at, mm, sr.transpose(0, 1, 3, 2, 4))
        _stacked_gemm(at, sr, _flat(o, (num, nr, 4, 4, run_out)))
        # channels last: ycl[k, 4 r + a, 4 q + b] (the last tile column cropped at the map's edge)
        yr = ycl[:, 4 * r0:4 * r1].reshape(num, nr, 4, ow, cout)
        if ow == 4 * tw:
            np.copyto(yr.reshape(num, nr, 4, tw, 4, cout), o.transpose(0, 1, 2, 4, 3, 5))
        else:
            for b in range(4):
                nc = (ow - b + 3) // 4
                np.copyto(yr[:, :, :, b::4], o[:, :, :, b, :nc])
    threads.parallel_for(bt, _in_row_steps(transform_out, num * 40 * run_out * isz), work=2 * m.size)
    _into_y(ycl, y, t0, t1, oh)


def _channels_last_output(v, shape):
    """The band's channels-last output (n, rows, ow, cout), in the tiles' buffer ``v`` where it fits
    (the tiles are dead after the GEMMs; cout <= 2.25 cin, as in every 3x3 layer of VGG and ResNet
    and all but GoogLeNet's conv2): a buffer of its own for every layer added to the peak
    (TRANSFORM_STEP_BYTES)."""
    need = math.prod(shape)
    return v.reshape(-1)[:need].reshape(shape) if need <= v.size else _tmp(_CHANNELS_LAST_OUT, shape, v.dtype)


def _into_y(ycl, y, t0, t1, oh, tile=4):
    """Tile rows ``t0:t1`` (of ``tile`` output rows each)'s channels-last output ``ycl`` into ``y``'s
    rows (channels first), one 2-D transpose per image, split over images."""
    num, _, ow, cout = ycl.shape
    y0, y1 = tile * t0, min(oh, tile * t1)
    cv2 = _opencv()

    def to_y(k0, k1):
        for k in range(k0, k1):
            _transpose_into(ycl[k, :y1 - y0].reshape(-1, cout), _flat(y[k, :, y0:y1], (cout, -1)), cv2)
    threads.parallel_for(num, to_y, work=num * (y1 - y0) * ow * cout)


def _source_channels_last(x, pad_h, pad_w, hp, wp, slot=_SRC):
    """The compiled F(4x4)'s input: ``x`` padded to (n, hp, wp, cin), channels last (the compiled
    transform reads each tile's 6x6 window there, and its channel loop runs over contiguous
    values; ``_source4``'s copy of every tile's six columns apart is only for the stacked GEMMs).
    Where the compiled kernels run, one compiled pass (``compiled.channels_last_source``) split over
    (image, padded row) pairs. Otherwise (its twin) each image goes in by one blocked transpose
    (OpenCV's) into a scratch image, then one copy into
    the padded rows, split over images, where an image is at most IMAGE_TRANSPOSE_ELEMENTS (it stays
    in cache between the two) and there are images for every thread of the pool: ResNet-50's
    10x64x56x56 took 4.35 ms with a transpose per row, 1.20 ms this way (2 cores). Else one
    transpose per image row (without cv2, NumPy's strided copy), split over padded rows. ``slot``:
    the workspace it goes in."""
    num, cin, h, wd = x.shape
    src = workspace(np, (num, hp, wp, cin), x.dtype, slot)
    if compiled.runs_on(src) and isinstance(x, np.ndarray) and x.dtype == src.dtype and x.strides[3] == x.itemsize:
        # x may be a group's channels of a blob (conv_engines.WinogradConv): rows contiguous is enough
        kernel = compiled.get(compiled.channels_last_source)
        threads.parallel_for(num * hp, lambda i0, i1: kernel(x, src, pad_h, pad_w, i0, i1), work=x.size + src.size)
        return src
    cv2 = _opencv()
    if cv2 is not None and num >= threads.size() and cin * h * wd <= IMAGE_TRANSPOSE_ELEMENTS:
        def images(k0, k1):
            tmp = _tmp(_IMAGE_T, (h * wd, cin), x.dtype)      # this thread's own
            for k in range(k0, k1):
                _, _, rows = _rows_holding_x(src[k:k + 1], 0, hp, pad_h, h)
                rows[:, :, :pad_w].fill(0)
                rows[:, :, pad_w + wd:].fill(0)
                _transpose_into(x[k].reshape(cin, h * wd), tmp, cv2)
                rows[0, :, pad_w:pad_w + wd] = tmp.reshape(h, wd, cin)
        threads.parallel_for(num, images, work=src.size)
        return src

    def fill(r0, r1):
        a0, a1, part = _rows_holding_x(src, r0, r1, pad_h, h)
        if part is None:
            return
        part[:, :, :pad_w].fill(0)
        part[:, :, pad_w + wd:].fill(0)
        for k in range(num):
            for r in range(a0, a1):
                _transpose_into(x[k, :, r - pad_h], src[k, r, pad_w:pad_w + wd], cv2)
    threads.parallel_for(hp, fill, work=src.size)
    return src


def _tile_row_items(num, rows, fn, work):
    """``fn(i0, i1)`` over the band's (image, tile row) pairs, item ``n * rows + r``, on the kernels'
    pool. Why not over tile rows alone: a band is a few tile rows (3 on VGG's conv1_2), which two
    threads split 2 + 1; its ``num * rows`` items split evenly. Every tile is computed alone, so
    the split changes no bits."""
    threads.parallel_for(num * rows, fn, work=work)


def _band_channels_last(src, u, y, t0, t1, tw, oh, ow, tile, fast=True):
    """Tile rows ``t0:t1`` of a 6x6- or 7x7-tile Winograd (``u``'s 36 positions with ``tile`` 4:
    F(4x4, 3x3), with 2: F(2x2, 5x5); 49 positions: F(3x3, 5x5)), each transform one compiled pass
    over the band's tiles (``compiled.winograd6_input`` / ``winograd7_input`` and
    ``winograd4_output``, ``winograd2x5_output`` or ``winograd3x5_output``: the transform matrices'
    non-zero terms, vectorised over channels; the output kernels write ``y`` channels first
    themselves), from a plain padded channels-last input (``_source_channels_last``); without
    ``fast`` (5x5 only: F(4x4)'s NumPy path is ``_band4``) their NumPy twins, whose channels-last
    output goes in the tiles' buffer and is transposed into ``y`` (``_into_y``). The GEMMs are the
    same either way."""
    num, cin = src.shape[0], src.shape[3]
    positions, cout = u.shape[0], u.shape[1]
    seven = positions == 49
    bt = t1 - t0
    dt = src.dtype
    cols = num * bt * tw
    v = workspace(np, (positions, cols, cin), dt, _TILES)
    if fast:
        kin = compiled.get(compiled.winograd7_input if seven else compiled.winograd6_input)
        _tile_row_items(num, bt, lambda i0, i1: kin(src, v, t0, bt, tw, i0, i1, tile), 2 * v.size)
    else:
        np.copyto(v, _input_tiles_numpy(src, t0, bt, tw, step=tile, n=7 if seven else 6))
    m = workspace(np, (positions, cols, cout), dt, _PROD)
    _transform_gemms(v, u.transpose(0, 2, 1), m)
    if fast:
        # straight into y, channels first
        kout = compiled.get(compiled.winograd3x5_output if seven else
                            compiled.winograd4_output if tile == 4 else compiled.winograd2x5_output)
        _tile_row_items(num, bt, lambda i0, i1: kout(m, y, t0, bt, i0, i1), 2 * m.size)
        return
    ycl = _channels_last_output(v, (num, tile * bt, ow, cout))
    _output_numpy(m, ycl, bt, tw, ow, (MATRICES3X5 if seven else MATRICES5)[0])
    _into_y(ycl, y, t0, t1, oh, tile=tile)


# --- F(2x2, 5x5) and F(3x3, 5x5) ----------------------------------------------------------------
#
# A 5x5 stride-1 kernel: F(2x2, 5x5) takes each 2x2 block of outputs from a 6x6 input tile (tiles 2
# apart), the same B^T as F(4x4, 3x3) (``winograd6_input`` with step 2), 36 GEMMs over the
# channels, and the 2x6 A^T back; F(3x3, 5x5) each 3x3 block from a 7x7 tile (tiles 3 apart, six
# finite points: POINTS3X5), 49 GEMMs and a 3x7 A^T (``winograd7_input``, ``winograd3x5_output``):
# 5.4 products an output where F(2x2) makes 9. CaffeNet's conv2 (5x5, group 2) and GoogLeNet's 5x5
# branches (conv_engines says where it pays; ``tile_size`` which).

# F(2x2, 5x5)'s bands: its GEMMs are thin (K = a group's input channels, 48 on CaffeNet's conv2), and
# its products 9 values an output (36 a 2x2 block), so it wants more tiles a band than F(4x4):
# CaffeNet's conv2 at batch 32, one group, forward, 2 cores: 2 tile rows a band (the F(4x4) sizing)
# 57.7 ms, 4 rows 50.4, 7 rows 47.0, all 14 42.2; the pieces on the whole map: 1.4 ms the
# channels-last source, 4.9 the input transform, 21.0 the GEMMs, 8.3 the output transform, 3.1 the
# transposes into y. F(3x3) sizes its bands the same way (49 values a tile): on CaffeNet's conv2 one
# band is the whole map again.
BAND5_ELEMENTS = 1 << 22
BAND5_MIN_COLUMNS = 4096


def _forward5(x, w, y, pad_h, pad_w, u, band, tile=None, source_slot=_SRC):
    """``forward`` for a 5x5 kernel: F(3x3, 5x5) or F(2x2, 5x5) (``u``'s positions, else ``tile``,
    else ``tile_size``) in bands of tile rows (BAND5_*), the compiled transforms where they run;
    returns its padded channels-last source (in ``source_slot``)."""
    num, cin = x.shape[:2]
    oh, ow = y.shape[2], y.shape[3]
    if u is None:
        u = transform_filters(w, tile=tile or tile_size(num, oh, ow, taps=5))
    u = u.astype(x.dtype, copy=False)
    tile = _tile5_of(u)
    n = tile + 4
    th, tw = -(-oh // tile), -(-ow // tile)
    per_row = num * tw
    if band is None:
        band = max(BAND5_ELEMENTS // (n * n * cin * per_row), -(-BAND5_MIN_COLUMNS // per_row), 1)
    band = min(band, th)
    fast = x.dtype in (np.float32, np.float64) and compiled.enabled()
    src = _source_channels_last(x, pad_h, pad_w, tile * th + 4, tile * tw + 4, slot=source_slot)
    for t0 in range(0, th, band):
        _band_channels_last(src, u, y, t0, min(th, t0 + band), tw, oh, ow, tile, fast)
    return src


def _output_numpy(m, ycl, rows, tw, ow, at):
    """Twin of ``compiled.winograd2x5_output`` and ``winograd3x5_output`` (``at``: A^T, 2x6 or 3x7;
    to rounding: einsum adds in its own order)."""
    num, cout = ycl.shape[0], m.shape[2]
    tile, n = at.shape
    at = np.asarray(at, m.dtype)
    o = np.einsum("ai,bj,ijnrqk->nraqbk", at, at, m.reshape(n, n, num, rows, tw, cout), optimize=True)
    ycl[...] = o.reshape(num, tile * rows, tile * tw, cout)[:, :, :ow]


# --- the weight gradient -------------------------------------------------------------------------
#
# dW of a 3x3 stride-1 convolution is a correlation of the padded input with dy: each filter tap
# (k, l) sums dy[y, x] * xpad[y + k, x + l] over the batch and the map. Seen per 4x4 block of dy,
# that is F(3x3, 4x4): three outputs (the taps) from a 4-wide "filter" (dy's block) over the same
# 6x6 window of the input that the forward's output tile reads. Its algorithm is the forward's
# transposed (the bilinear form y_i = sum_p A^T[i, p] (G g)_p (B^T d)_p read for g): the input's
# tiles transformed by B^T exactly as in the forward, dy's blocks by A (6x4, A^T's transpose), 36
# GEMMs (cout x tiles) @ (tiles x cin) that sum over every tile of the batch, and G^T (3x6) on both
# sides back to the 3x3 taps. The GEMMs do 36 multiply-adds a 4x4 block and channel pair where the
# columns' GEMM does 144 (4x fewer), and there is no column matrix.
#
# Measured against the columns' weight gradient (im2col + GEMM), 2 cores, VGG-16's layers at batch
# 4, ms: see conv_engines.WINOGRAD_WEIGHT_GRAD_MIN_TILES, which says where it pays.

# A band's transformed tiles (input and dy together) take about WEIGHT_GRAD_BAND_ELEMENTS values,
# more where that leaves the GEMMs fewer than WEIGHT_GRAD_MIN_COLUMNS tiles to sum over (a thin K
# costs more than the memory: GoogLeNet's conv2/3x3 at batch 16, 2 tile rows a band, ran at 1.04x
# the columns' time, 7 rows at 0.84x), at most WEIGHT_GRAD_MAX_ELEMENTS.
WEIGHT_GRAD_BAND_ELEMENTS = 1 << 22
WEIGHT_GRAD_MIN_COLUMNS = 1536
WEIGHT_GRAD_MAX_ELEMENTS = 1 << 24

# F(4x4, 3x3)'s and F(3x3, 5x5)'s weight gradients take dy's tiles from a channels-last dy, each
# loop of the compiled kernel over the output channels (compiled.winograd4_gradient_tiles_cl,
# winograd3x5_gradient_tiles_cl), where channels first its loops ran over a tile row's tiles (four
# on a 14-wide map); the data gradient's own padded dy is that source where Winograd computes both
# (conv_engines.WinogradConv.backward), and the 36 or 49 GEMMs read the tiles transposed (3-15%
# slower GEMMs on these shapes; the tiles about twice as fast). Measured in whole TRAIN nets, one
# process, medians, backward with / without (bench_engine_ab.py --set GRAD_TILES_CHANNELS_LAST=0, 2
# cores): CaffeNet batch 32 397 / 448 ms (conv2 97.5 / 119.7, conv3 50.7 / 64.1), GoogLeNet batch 16
# 622 / 659 ms (conv2/3x3 76.1 / 90.6, inception_4e/3x3 19.1 / 24.5), ResNet-50 batch 8 748 / 792
# (res2a_branch2b 17.6 / 20.5, the 14x14 layers 13.7-14.3 / 15.6-16.3), VGG-16 batch 4 814 / 820.
# Under GRAD_TILES_CHANNELS_LAST_MIN_OUT output channels (a group's) the loops would be shorter than
# one AVX-512 vector of float32: the channels-first kernel (not measured; no layer of the four nets
# is that thin).
GRAD_TILES_CHANNELS_LAST = 1
GRAD_TILES_CHANNELS_LAST_MIN_OUT = 16


def grad_tiles_channels_last(cout):
    """Whether a weight gradient through F(4x4, 3x3) or F(3x3, 5x5) of ``cout`` output channels (a
    group's) takes dy's tiles channels last (GRAD_TILES_CHANNELS_LAST,
    GRAD_TILES_CHANNELS_LAST_MIN_OUT)."""
    return bool(GRAD_TILES_CHANNELS_LAST) and cout >= GRAD_TILES_CHANNELS_LAST_MIN_OUT


def weight_gradient(x, dy, dw, pad_h, pad_w, band=None, tile=None, dy_source=None, channels_last=None):
    """``dw += dW`` of a 3x3 or 5x5 stride-1 undilated ungrouped convolution with pads ``pad_h,
    pad_w``: x (n, cin, h, w), dy (n, cout, oh, ow), dw (cout, cin, k, k); F(4x4, 3x3)'s transforms
    (see above), or for 5x5 F(3x3, 5x5)'s (``tile`` 3: dy's 3x3 blocks, input tiles 3 apart: F(5x5,
    3x3), 49 multiplies a block and channel pair where the columns' GEMM does 225) or F(2x2,
    5x5)'s (``tile`` 2: F(5x5, 2x2), 36 where the columns do 100); by default as ``tile_size``
    says. ``band``: tile rows per band (default: sized as WEIGHT_GRAD_BAND_ELEMENTS says; tests
    pass 1). The compiled kernels where they run (``compiled.runs_on``), else their NumPy twins.

    ``channels_last`` (default ``grad_tiles_channels_last``; F(4x4, 3x3) and F(3x3, 5x5) on the
    compiled kernels only): dy's tiles from a channels-last dy
    (``compiled.winograd4_gradient_tiles_cl``, ``winograd3x5_gradient_tiles_cl``), the products'
    GEMMs reading them transposed; ``dy_source`` ``(src, off_h, off_w)``: that dy already padded
    (the data gradient's, ``forward``'s return), else one is made. See GRAD_TILES_CHANNELS_LAST."""
    num, cin = x.shape[:2]
    cout, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    taps = dw.shape[-1]
    if taps == 5:
        tile = tile if tile in (2, 3) else tile_size(num, oh, ow, taps=5)
    else:
        tile = 4
    n = tile + taps - 1                     # the input tiles' side: 6, or 7 for F(5x5, 3x3)
    positions = n * n
    th, tw = -(-oh // tile), -(-ow // tile)
    per_row = num * tw
    if band is None:
        row = positions * (cin + cout) * per_row
        band = max(WEIGHT_GRAD_BAND_ELEMENTS // row, -(-WEIGHT_GRAD_MIN_COLUMNS // per_row))
        band = max(1, min(band, WEIGHT_GRAD_MAX_ELEMENTS // row))
    band = min(band, th)
    dt = x.dtype
    fast = compiled.runs_on(x, dy, dw)
    src = _source_channels_last(x, pad_h, pad_w, tile * th + n - tile, tile * tw + n - tile)
    m = workspace(np, (positions, cout, cin), dt, _GRAD)
    cl = fast and tile in (3, 4) and (grad_tiles_channels_last(cout) if channels_last is None else channels_last)
    if cl:
        dsrc, off_h, off_w = _dy_source(dy, tile * th, tile * tw, dy_source)
        kcl = compiled.get(compiled.winograd3x5_gradient_tiles_cl if tile == 3 else
                           compiled.winograd4_gradient_tiles_cl)
    elif fast:
        kdy = compiled.get(compiled.winograd3x5_gradient_tiles if tile == 3 else
                           compiled.winograd2x5_gradient_tiles if taps == 5 else compiled.winograd4_gradient_tiles)
    if fast:
        kin = compiled.get(compiled.winograd7_input if n == 7 else compiled.winograd6_input)
    for t0 in range(0, th, band):
        bt = min(th, t0 + band) - t0
        cols = num * bt * tw
        v = workspace(np, (positions, cols, cin), dt, _TILES)
        u = workspace(np, (positions, cols, cout) if cl else (positions, cout, cols), dt, _PROD)
        if fast:
            _tile_row_items(num, bt, lambda i0, i1: kin(src, v, t0, bt, tw, i0, i1, tile), 2 * v.size)
        if cl:
            _tile_row_items(num, bt, lambda i0, i1: kcl(dsrc, off_h, off_w, u, t0, bt, tw, i0, i1), 2 * u.size)
            u = u.transpose(0, 2, 1)
        elif fast:
            threads.parallel_for(cout, lambda c0, c1: kdy(dy, u, t0, bt, tw, c0, c1), work=2 * u.size)
        else:
            np.copyto(v, _input_tiles_numpy(src, t0, bt, tw, step=tile, n=n))
            np.copyto(u, _gradient_tiles_numpy(dy, t0, bt, tw, tile))
        _accumulate_products(u, v, m, first=t0 == 0)
    g = np.asarray((MATRICES3X5 if tile == 3 else MATRICES5 if taps == 5 else _MATRICES[4])[1], dt)
    if fast:
        kfg = compiled.get(compiled.winograd_filter_gradient)
        threads.parallel_for(cout, lambda o0, o1: kfg(m, g, dw, o0, o1), work=m.size + dw.size)
    else:
        _filter_gradient_numpy(m, dw, g)


def _dy_source(dy, rows, cols, given):
    """``(src, off_h, off_w)``: dy padded channels-last with zeros past its map's edge to ``rows``
    rows and ``cols`` columns from the offsets (the tiles' whole extent): ``given`` where it is
    that (the data gradient's source of the same dy: its pad ``k - 1 - p`` is the offset), else a
    copy made in DY_SOURCE."""
    num, cout, oh, ow = dy.shape
    if given is not None:
        src, off_h, off_w = given
        if (src.shape[0] == num and src.shape[3] == cout and src.dtype == dy.dtype
                and src.shape[1] >= off_h + rows and src.shape[2] >= off_w + cols):
            return src, off_h, off_w
    return _source_channels_last(dy, 0, 0, rows, cols, slot=DY_SOURCE), 0, 0


def _accumulate_products(u, v, m, first):
    """``m[k] (+)= u[k] @ v[k]`` for the 36 positions, whole GEMMs side by side on the pool (as
    ``_transform_gemms``); a later band's products go through this thread's scratch and are added
    while they are in cache."""
    def gemms(k0, k1):
        for k in range(k0, k1):
            if first:
                blas.matmul(u[k], v[k], out=m[k])
            else:
                part = workspace(np, m.shape[1:], m.dtype, _OUT)       # this thread's own
                blas.matmul(u[k], v[k], out=part)
                m[k] += part
    blas.parallel_gemms(m.shape[0], gemms)


def _input_tiles_numpy(src, t0, rows, tw, step=4, n=6):
    """Twin of ``compiled.winograd6_input`` (``n`` 6) and ``winograd7_input`` (7) (to rounding:
    einsum adds in its own order): the n*n transformed input tiles (n*n, num * rows * tw, cin) of
    tile rows ``t0:t0 + rows``, tiles ``step`` apart."""
    num, cin = src.shape[0], src.shape[3]
    s0, s1, s2, s3 = src.strides
    d = np.lib.stride_tricks.as_strided(src[:, step * t0:], shape=(num, rows, tw, n, n, cin),
                                        strides=(s0, step * s1, step * s2, s1, s2, s3), writeable=False)
    bt = np.asarray((MATRICES3X5 if n == 7 else _MATRICES[4])[2], src.dtype)
    v = np.einsum("ia,jb,nrqabc->ijnrqc", bt, bt, d, optimize=True)
    return v.reshape(n * n, num * rows * tw, cin)


def _gradient_tiles_numpy(dy, t0, rows, tw, tile=4):
    """Twin of ``compiled.winograd4_gradient_tiles`` (``tile`` 4), ``winograd2x5_gradient_tiles``
    (2) and ``winograd3x5_gradient_tiles`` (3), the same operations on whole arrays (the same bits):
    (36 or 49, cout, n * rows * tw), dy's ``tile`` x ``tile`` blocks."""
    num, cout, oh, ow = dy.shape
    dt = dy.dtype.type
    h, q4, e, t2, f4, e8 = dt(0.5), dt(0.25), dt(0.125), dt(2.0), dt(4.0), dt(8.0)
    pad = np.zeros((num, cout, tile * rows, tile * tw), dy.dtype)
    y0 = tile * t0
    part = dy[:, :, y0:min(oh, y0 + tile * rows)]
    pad[:, :, :part.shape[2], :ow] = part
    d = pad.reshape(num, cout, rows, tile, tw, tile)

    def a_side(*ys):        # A (6 x tile, 7 x 3) on ``tile`` values
        if tile == 2:
            y0, y1 = ys
            return (y0, y0 + y1, y0 - y1, y0 + h * y1, y0 - t2 * y1, y1)
        if tile == 3:
            y0, y1, y2 = ys
            return (y0, y0 + y1 + y2, y0 - y1 + y2, y0 + h * y1 + q4 * y2, y0 - t2 * y1 + f4 * y2,
                    y0 + t2 * y1 + f4 * y2, y2)
        y0, y1, y2, y3 = ys
        return (y0, y0 + y1 + y2 + y3, y0 - y1 + y2 - y3, y0 + h * y1 + q4 * y2 + e * y3,
                y0 - t2 * y1 + f4 * y2 - e8 * y3, y3)
    t = a_side(*(d[..., b] for b in range(tile)))               # n (n, c, r, a, q), n = 6 or 7
    n = len(t)
    u = np.empty((n, n, cout, num, rows, tw), dy.dtype)
    for j in range(n):
        for i, val in enumerate(a_side(*(t[j][:, :, :, a] for a in range(tile)))):
            u[i, j] = val.transpose(1, 0, 2, 3)
    return u.reshape(n * n, cout, num * rows * tw)


def _filter_gradient_numpy(m, dw, g):
    """Twin of ``compiled.winograd_filter_gradient`` (to rounding: BLAS's order): ``dw += G^T M G``
    as one GEMM with kron(G, G)."""
    cout, cin, k = m.shape[1], m.shape[2], dw.shape[-1]
    taps = np.kron(g, g).T @ m.reshape(m.shape[0], cout * cin)          # (k * k, cout * cin)
    dw.reshape(cout * cin, k * k)[...] += taps.T
