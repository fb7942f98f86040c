"""Winograd F(2x2, 3x3) forward for 3x3, stride-1, undilated, ungrouped convolutions (CPU only).

Each 2x2 block of outputs comes from a 4x4 input tile (tiles overlap by 2): the filters and tiles
are transformed (``G g G^T``, ``B^T d B``), multiplied elementwise per transform position, which
over channels is 16 GEMMs ``(cout x cin) @ (cin x tiles)``, and transformed back (``A^T m A``).
That is 16 multiplies per 2x2 outputs where im2col + GEMM does 36 (Lavin & Gray 2015). The work
runs a band of tile rows at a time, so its scratch memory stays small (the band size barely
changes the speed).

Where it pays is the Winograd engine's business (``minicaffe.kernels.conv_engines``); this module
says only what it can compute (``applies``) and computes it.
"""
import numpy as np

from ..core.context import Slot
from .im2col import workspace

# scratch slots (context.Slot): shared by the code that imports the object, not by a name anyone may pick
_SRC, _ROWS, _TILES = Slot("wino_src"), Slot("wino_rows"), Slot("wino_tiles")
_PROD, _OUT = Slot("wino_prod"), Slot("wino_out")

# transformed tiles per band: 16 * cin * columns floats at most (then at least BAND_MIN_COLUMNS
# tile columns, so each of the 16 GEMMs stays efficient)
BAND_ELEMENTS = 1 << 20
BAND_MIN_COLUMNS = 512


def applies(geom, group):
    """Whether the Winograd forward can compute this convolution."""
    return (geom.kh == geom.kw == 3 and geom.sh == geom.sw == 1 and geom.dh == geom.dw == 1
            and group == 1)


class FilterCache:
    """The transformed filters of one layer, recomputed only when the weights change (a compare
    costs one pass over them, the transform several)."""

    def __init__(self):
        self.weights = self.transformed = None

    def get(self, w):
        if self.weights is None or self.weights.shape != w.shape or self.weights.dtype != w.dtype:
            self.weights = np.empty_like(w)
            self.transformed = np.empty((16,) + w.shape[:2], w.dtype)
        elif np.array_equal(self.weights, w):
            return self.transformed
        np.copyto(self.weights, w)
        return transform_filters(w, out=self.transformed)


def _filter_matrix():
    g = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
    return np.kron(g, g)            # (16, 9): vec(G g G^T) = kron(G, G) vec(g)


_KRON = _filter_matrix()


def transform_filters(w, out=None):
    """(cout, cin, 3, 3) -> (16, cout, cin): ``G g G^T`` flattened over the 4x4 positions, into
    ``out`` when given (a few thousand filters at a time, so no full-size temporary)."""
    cout, cin = w.shape[0], w.shape[1]
    w2 = w.reshape(cout * cin, 9)
    if out is None:
        out = np.empty((16, cout, cin), w.dtype)
    out2 = out.reshape(16, cout * cin)
    step = 1 << 14
    for i in range(0, cout * cin, step):
        j = min(cout * cin, i + step)
        out2[:, i:j] = (w2[i:j] @ _KRON.T.astype(w.dtype, copy=False)).T
    return out


def forward(x, w, y, pad_h, pad_w, u=None, band=None):
    """``y[...] = conv(x, w)`` for a 3x3 stride-1 kernel; x (n, cin, h, w), y (n, cout, oh, ow);
    ``u``: the filters already transformed (``transform_filters``); ``band``: tile rows per band
    (default: sized from ``BAND_ELEMENTS``; tests pass 1 to reach ragged bands)."""
    num, cin, h, wd = x.shape
    oh, ow = y.shape[2], y.shape[3]
    if u is None:
        u = transform_filters(w)
    th, tw = -(-oh // 2), -(-ow // 2)
    hp = 2 * th + 2
    # padded input, channels first so the tile matrix is (cin, n * tiles) without another copy, and
    # columns split into even and odd ones (src[..., p, k] is padded column 2k + p), so the column
    # transform reads contiguous runs
    wh = tw + 1
    src = workspace(np, (cin, num, hp, 2, wh), x.dtype, _SRC)
    src.fill(0)
    xt = x.transpose(1, 0, 2, 3)
    for p in range(2):
        first = (p - pad_w) % 2                 # first x column landing on parity p
        count = len(range(first, wd, 2))
        k0 = (pad_w + first) // 2
        np.copyto(src[:, :, pad_h:pad_h + h, p, k0:k0 + count], xt[..., first::2])
    per_row = num * tw
    if band is None:
        band = max(BAND_ELEMENTS // (16 * cin * per_row), -(-BAND_MIN_COLUMNS // per_row), 1)
    band = min(band, th)
    for t0 in range(0, th, band):
        t1 = min(th, t0 + band)
        _band(src, u, y, t0, t1, tw, oh, ow)


def _band(src, u, y, t0, t1, tw, oh, ow):
    cin, num = src.shape[0], src.shape[1]
    cout = u.shape[1]
    bt = t1 - t0
    wh = src.shape[4]
    # B^T d B with B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]: rows first ...
    rows = [src[:, :, 2 * t0 + i:2 * t1 + i:2] for i in range(4)]   # (cin, n, bt, 2, wh) each
    t = workspace(np, (4, cin, num, bt, 2, wh), src.dtype, _ROWS)
    np.subtract(rows[0], rows[2], out=t[0])
    np.add(rows[1], rows[2], out=t[1])
    np.subtract(rows[2], rows[1], out=t[2])
    np.subtract(rows[1], rows[3], out=t[3])
    # ... then columns, into the 16 tile matrices (cin, n * bt * tw)
    v = workspace(np, (4, 4, cin, num, bt, tw), src.dtype, _TILES)
    for k in range(4):
        c = [t[k][..., j % 2, j // 2:j // 2 + tw] for j in range(4)]
        np.subtract(c[0], c[2], out=v[k, 0])
        np.add(c[1], c[2], out=v[k, 1])
        np.subtract(c[2], c[1], out=v[k, 2])
        np.subtract(c[1], c[3], out=v[k, 3])
    cols = num * bt * tw
    m = workspace(np, (16, cout, cols), src.dtype, _PROD)
    np.matmul(u, v.reshape(16, cin, cols), out=m)
    # A^T m A with A^T = [[1,1,1,0],[0,1,-1,-1]]: rows ...
    m = m.reshape(4, 4, cout, num, bt, tw)
    s = workspace(np, (2, 4, cout, num, bt, tw), src.dtype, _OUT)
    np.add(m[0], m[1], out=s[0])
    s[0] += m[2]
    np.subtract(m[1], m[2], out=s[1])
    s[1] -= m[3]
    # ... then columns, straight into y (cropping the last tile row/column of an odd size)
    for a in range(2):
        r0 = 2 * t0 + a
        nr = min(bt, (oh - r0 + 1) // 2)
        if nr <= 0:
            continue
        for b in range(2):
            nc = (ow - b + 1) // 2
            out = y[:, :, r0:r0 + 2 * nr:2, b:b + 2 * nc:2].transpose(1, 0, 2, 3)
            sa = s[a, :, :, :, :nr, :nc]
            if b == 0:
                np.add(sa[0], sa[1], out=out)
                out += sa[2]
            else:
                np.subtract(sa[1], sa[2], out=out)
                out -= sa[3]
