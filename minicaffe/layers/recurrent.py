"""Recurrent layers: RNN, LSTM and the single-step LSTMUnit, with Caffe's semantics and blobs.

Caffe builds RNN and LSTM as an unrolled net of InnerProduct, Scale, Eltwise and LSTMUnit layers
over the T time steps. Here the time loop is written out directly in array code (one matrix
product per step for the recurrence; the input and output projections of all steps at once), with
the same parameter blobs in the same order and shapes, so weights trained in Caffe load and give
the same results:

* bottoms: ``x`` (T x N x ...), ``cont`` (T x N; 0 where a sequence starts, so the previous state
  is dropped there), optionally ``x_static`` (N x ...) added to every step, and with
  ``expose_hidden`` the initial state(s) (1 x N x num_output each: h_0, then c_0 for LSTM);
* tops: the outputs (T x N x num_output), and with ``expose_hidden`` the final state(s) h_T
  (then c_T for LSTM);
* LSTM blobs: W_xc (4H x I), b_c (4H), [W_xc_static (4H x S)], W_hc (4H x H), gates in the order
  input, forget, output, candidate (i, f, o, g) as in Caffe's LSTMUnit;
* RNN blobs: W_xh (H x I), b_h (H), [W_xh_static (H x S)], W_hh (H x H), W_ho (H x H), b_o (H);
  h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]),
  o_t = tanh(W_ho h_t + b_o).

Without ``expose_hidden`` the final state of one forward pass is the initial state of the next
(multiplied by cont at t = 0; zeros before the first pass), as in Caffe. Gradients are truncated
at the batch boundary as in Caffe: the final-state tops' gradients are ignored and the exposed
initial-state bottoms receive zeros (Caffe leaves them unwritten); ``cont`` gets no gradient.
"""
from ..core import fillers
from ..core.blob import Blob
from ..errors import ShapeError
from ..core.layer import Layer, register
from ..core.numeric import element_count


def _sigmoid(xp, x):
    """1 / (1 + e^-x) as 0.5 tanh(x / 2) + 0.5: no overflow for large |x|."""
    out = xp.tanh(x * 0.5)
    out *= 0.5
    out += 0.5
    return out


class _Recurrent(Layer):
    """Bottom/top bookkeeping, parameter blobs and the carried state shared by RNN and LSTM."""

    min_num_bottom = 2
    min_num_top = 1
    gates = 1                 # rows of the weight matrices per hidden unit (LSTM: 4)
    state_names = ("h",)      # recurrent states, in Caffe's bottom/top order

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    # --- set-up --------------------------------------------------------------------------------
    def blob_specs(self, hidden, in_dim, static_dim):
        """[(name, shape, is_bias)] in Caffe's blob order."""
        raise NotImplementedError

    def setup(self, bottom, top):
        rp = self.param.recurrent_param
        x = bottom[0]
        if len(x.shape) < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (time steps, streams, ...), got shape "
                             f"{x.shape}", ShapeError)
        self.hidden = int(rp.num_output)
        if self.hidden <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.expose = bool(rp.expose_hidden)
        num_states = len(self.state_names) if self.expose else 0
        self.static = len(bottom) > 2 + num_states
        want_bottoms = 2 + self.static + num_states
        if len(bottom) != want_bottoms:
            raise self.error(f"takes x, cont, an optional x_static{' and the initial states' if self.expose else ''}: "
                             f"got {len(bottom)} bottoms")
        if len(top) != 1 + num_states:
            raise self.error(f"needs {1 + num_states} top(s) with expose_hidden: {self.expose}, got {len(top)}")
        self._check_shapes(bottom)
        in_dim = element_count(x.shape[2:])
        static_dim = element_count(bottom[2].shape[1:]) if self.static else 0
        specs = self.blob_specs(self.hidden, in_dim, static_dim)
        self.index = {name: k for k, (name, _, _) in enumerate(specs)}
        if self.blobs:
            if len(self.blobs) != len(specs):
                raise self.error(f"expected {len(specs)} parameter blobs "
                                 f"({', '.join(s[0] for s in specs)}), got {len(self.blobs)}")
            for blob, (name, shape, _) in zip(self.blobs, specs):
                if tuple(blob.shape) != shape:
                    raise self.error(f"parameter {name} has shape {tuple(blob.shape)}, expected {shape}",
                                     ShapeError)
        else:
            for name, shape, is_bias in specs:
                filler = rp.bias_filler if is_bias else rp.weight_filler
                blob = Blob(shape, name=f"{self.name}.{name}")
                blob.data[...] = fillers.fill(filler, shape, dtype=blob.dtype, layer=self.name)
                self.blobs.append(blob)
        self.param_propagate_down = [True] * len(self.blobs)
        self._state = None

    def _check_shapes(self, bottom):
        x, cont = bottom[0], bottom[1]
        if len(x.shape) < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (time steps, streams, ...), got shape "
                             f"{x.shape}", ShapeError)
        t, n = x.shape[:2]
        if tuple(cont.shape) != (t, n):
            raise self.error(f"cont (bottom[1]) must have shape (T, N) = {(t, n)}, got {cont.shape}",
                             ShapeError)
        if self.static and (len(bottom[2].shape) < 1 or bottom[2].shape[0] != n):
            raise self.error(f"x_static (bottom[2]) must have {n} rows (one per stream), got shape "
                             f"{bottom[2].shape}", ShapeError)
        if self.expose:
            for k, name in enumerate(self.state_names):
                b = bottom[2 + self.static + k]
                if tuple(b.shape) != (1, n, self.hidden):
                    raise self.error(f"initial state {name}_0 (bottom[{2 + self.static + k}]) must have shape "
                                     f"{(1, n, self.hidden)}, got {b.shape}", ShapeError)

    def reshape(self, bottom, top):
        self._check_shapes(bottom)
        t, n = bottom[0].shape[:2]
        top[0].reshape(t, n, self.hidden)
        for k in range(1, len(top)):
            top[k].reshape(1, n, self.hidden)
        if self._state is not None and self._state[0].shape[0] != n:
            self._state = None   # a new number of streams starts from zeros

    # --- helpers -------------------------------------------------------------------------------
    def w(self, name):
        return self.blobs[self.index[name]].xdata

    def add_grad(self, name, grad):
        k = self.index[name]
        if self.need_param_grad(k):
            self.blobs[k].xdiff += grad.reshape(self.blobs[k].shape)

    def initial_states(self, bottom, n, dtype):
        xp = self.xp
        if self.expose:
            base = 2 + self.static
            return [bottom[base + k].xdata.reshape(n, self.hidden) for k in range(len(self.state_names))]
        if self._state is None:
            return [xp.zeros((n, self.hidden), dtype=dtype) for _ in self.state_names]
        return self._state

    def finish_forward(self, top, finals):
        """Keep the final states for the next pass and expose them as tops."""
        self._state = [s.copy() for s in finals]
        for k, s in enumerate(finals):
            if self.expose:
                top[1 + k].xdata = s.reshape(top[1 + k].shape)

    def input_projection(self, bottom, w_name, b_name, static_name):
        """W x_t + b for every step at once (T, N, G), and W_static x_static (N, G) or None."""
        x = bottom[0].xdata
        t, n = x.shape[:2]
        xw = x.reshape(t * n, -1) @ self.w(w_name).T
        xw += self.w(b_name)
        sw = None
        if self.static:
            sw = bottom[2].xdata.reshape(n, -1) @ self.w(static_name).T
        return xw.reshape(t, n, -1), sw

    def input_backward(self, bottom, propagate_down, dxw, dsw, w_name, b_name, static_name):
        """Gradients of the input projection from d(W x_t + b) (T, N, G) and d(static term) (N, G)."""
        x = bottom[0].xdata
        t, n = x.shape[:2]
        d2 = dxw.reshape(t * n, -1)
        self.add_grad(w_name, d2.T @ x.reshape(t * n, -1))
        self.add_grad(b_name, d2.sum(axis=0))
        if propagate_down[0]:
            bottom[0].xdiff = (d2 @ self.w(w_name)).reshape(bottom[0].shape)
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot back-propagate to the sequence continuation indicators (cont)")
        if self.static:
            xs = bottom[2].xdata.reshape(n, -1)
            self.add_grad(static_name, dsw.T @ xs)
            if propagate_down[2]:
                bottom[2].xdiff = (dsw @ self.w(static_name)).reshape(bottom[2].shape)
        if self.expose:
            base = 2 + self.static
            for k in range(len(self.state_names)):
                if propagate_down[base + k]:
                    bottom[base + k].xdiff = self.xp.zeros(bottom[base + k].shape, dtype=dxw.dtype)


@register("LSTM")
class LSTM(_Recurrent):
    """Long short-term memory over T steps (see the module docstring for bottoms, tops, blobs)."""

    state_names = ("h", "c")

    def blob_specs(self, hidden, in_dim, static_dim):
        g = 4 * hidden
        specs = [("W_xc", (g, in_dim), False), ("b_c", (g,), True)]
        if self.static:
            specs.append(("W_xc_static", (g, static_dim), False))
        specs.append(("W_hc", (g, hidden), False))
        return specs

    def forward(self, bottom, top):
        xp = self.xp
        hd = self.hidden
        xw, sw = self.input_projection(bottom, "W_xc", "b_c", "W_xc_static")
        t_steps, n = xw.shape[:2]
        cont = bottom[1].xdata.reshape(t_steps, n, 1).astype(xw.dtype)
        h_prev, c_prev = self.initial_states(bottom, n, xw.dtype)
        w_hc = self.w("W_hc")
        out = xp.empty((t_steps, n, hd), dtype=xw.dtype)
        acts = xp.empty((t_steps, n, 4 * hd), dtype=xw.dtype)   # i, f, o, g after their nonlinearity
        cells = xp.empty((t_steps + 1, n, hd), dtype=xw.dtype)  # c_0 .. c_T
        conted = xp.empty((t_steps, n, hd), dtype=xw.dtype)     # cont_t h_{t-1}
        cells[0] = c_prev
        for t in range(t_steps):
            hc = h_prev * cont[t]
            conted[t] = hc
            gate_in = hc @ w_hc.T
            gate_in += xw[t]
            if sw is not None:
                gate_in += sw
            a = acts[t]
            a[:, :3 * hd] = _sigmoid(xp, gate_in[:, :3 * hd])
            a[:, 3 * hd:] = xp.tanh(gate_in[:, 3 * hd:])
            a[:, hd:2 * hd] *= cont[t]           # f = cont·sigmoid (exactly 0 where cont is 0)
            c = a[:, hd:2 * hd] * cells[t]
            c += a[:, :hd] * a[:, 3 * hd:]
            cells[t + 1] = c
            h_prev = a[:, 2 * hd:3 * hd] * xp.tanh(c)
            out[t] = h_prev
        self._cache = (acts, cells, conted, cont)
        top[0].xdata = out
        self.finish_forward(top, [h_prev, cells[t_steps]])

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        hd = self.hidden
        acts, cells, conted, cont = self._cache
        t_steps, n = acts.shape[:2]
        dy = top[0].xdiff.reshape(t_steps, n, hd)
        w_hc = self.w("W_hc")
        dgates = xp.empty_like(acts)
        dh_next = xp.zeros((n, hd), dtype=acts.dtype)
        dc_next = xp.zeros((n, hd), dtype=acts.dtype)
        dw_hc = xp.zeros(w_hc.shape, dtype=acts.dtype)
        for t in range(t_steps - 1, -1, -1):
            a = acts[t]
            i, f, o, g = a[:, :hd], a[:, hd:2 * hd], a[:, 2 * hd:3 * hd], a[:, 3 * hd:]
            tanh_c = xp.tanh(cells[t + 1])
            dh = dy[t] + dh_next
            dc = dh * o * (1 - tanh_c * tanh_c)
            dc += dc_next
            d = dgates[t]
            d[:, :hd] = dc * g * i * (1 - i)
            d[:, hd:2 * hd] = dc * cells[t] * f * (1 - f)     # Caffe's form, with f = cont·sigmoid
            d[:, 2 * hd:3 * hd] = dh * tanh_c * o * (1 - o)
            d[:, 3 * hd:] = dc * i * (1 - g * g)
            dc_next = dc * f
            dw_hc += d.T @ conted[t]
            dh_next = (d @ w_hc) * cont[t]
        self.add_grad("W_hc", dw_hc)
        dsw = dgates.sum(axis=0) if self.static else None
        self.input_backward(bottom, propagate_down, dgates, dsw, "W_xc", "b_c", "W_xc_static")


@register("RNN")
class RNN(_Recurrent):
    """Elman recurrent net with a tanh output layer (see the module docstring)."""

    def blob_specs(self, hidden, in_dim, static_dim):
        specs = [("W_xh", (hidden, in_dim), False), ("b_h", (hidden,), True)]
        if self.static:
            specs.append(("W_xh_static", (hidden, static_dim), False))
        specs += [("W_hh", (hidden, hidden), False), ("W_ho", (hidden, hidden), False),
                  ("b_o", (hidden,), True)]
        return specs

    def forward(self, bottom, top):
        xp = self.xp
        hd = self.hidden
        xw, sw = self.input_projection(bottom, "W_xh", "b_h", "W_xh_static")
        t_steps, n = xw.shape[:2]
        cont = bottom[1].xdata.reshape(t_steps, n, 1).astype(xw.dtype)
        (h_prev,) = self.initial_states(bottom, n, xw.dtype)
        w_hh = self.w("W_hh")
        hs = xp.empty((t_steps, n, hd), dtype=xw.dtype)
        conted = xp.empty((t_steps, n, hd), dtype=xw.dtype)
        for t in range(t_steps):
            hc = h_prev * cont[t]
            conted[t] = hc
            a = hc @ w_hh.T
            a += xw[t]
            if sw is not None:
                a += sw
            h_prev = xp.tanh(a)
            hs[t] = h_prev
        o = hs.reshape(t_steps * n, hd) @ self.w("W_ho").T
        o += self.w("b_o")
        xp.tanh(o, out=o)
        self._cache = (hs, conted, cont, o.reshape(t_steps, n, hd))
        top[0].xdata = o.reshape(t_steps, n, hd)
        self.finish_forward(top, [h_prev])

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        hd = self.hidden
        hs, conted, cont, o = self._cache
        t_steps, n = hs.shape[:2]
        do = top[0].xdiff.reshape(t_steps * n, hd) * (1 - o.reshape(-1, hd) ** 2)
        self.add_grad("W_ho", do.T @ hs.reshape(-1, hd))
        self.add_grad("b_o", do.sum(axis=0))
        dh_out = (do @ self.w("W_ho")).reshape(t_steps, n, hd)
        w_hh = self.w("W_hh")
        da = xp.empty_like(hs)
        dh_next = xp.zeros((n, hd), dtype=hs.dtype)
        dw_hh = xp.zeros(w_hh.shape, dtype=hs.dtype)
        for t in range(t_steps - 1, -1, -1):
            dh = dh_out[t] + dh_next
            d = dh * (1 - hs[t] * hs[t])
            da[t] = d
            dw_hh += d.T @ conted[t]
            dh_next = (d @ w_hh) * cont[t]
        self.add_grad("W_hh", dw_hh)
        dsw = da.sum(axis=0) if self.static else None
        self.input_backward(bottom, propagate_down, da, dsw, "W_xh", "b_h", "W_xh_static")


@register("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM step: bottoms c_prev (1 x N x H), the gate inputs X (1 x N x 4H, in the order i, f,
    o, g) and cont (1 x N); tops c (1 x N x H) and h (1 x N x H).
    c = f·c_prev + i·g with f = cont·sigmoid(X_f) (exactly 0 where cont is 0), h = o·tanh(c).
    The forget-gate gradient is Caffe's c_prev·f·(1 − f), exact for cont in {0, 1}."""

    exact_num_bottom = 3
    exact_num_top = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        c_prev, x, cont = bottom
        n = c_prev.shape[1] if len(c_prev.shape) > 1 else None
        for i, b in enumerate(bottom):
            axes = 2 if i == 2 else 3
            if len(b.shape) != axes or b.shape[0] != 1 or b.shape[1] != n:
                raise self.error(f"bottom[{i}] must have {axes} axes (1, N{', ...' if axes == 3 else ''}) "
                                 f"with N = {n}, got shape {b.shape}", ShapeError)
        self.hidden = c_prev.shape[2]
        if x.shape[2] != 4 * self.hidden:
            raise self.error(f"the gate input (bottom[1]) must have 4 x {self.hidden} = {4 * self.hidden} "
                             f"values per stream, got {x.shape[2]}", ShapeError)
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)

    def _gates(self, bottom):
        xp = self.xp
        hd = self.hidden
        x = bottom[1].xdata.reshape(-1, 4 * hd)
        cont = bottom[2].xdata.reshape(-1, 1).astype(x.dtype)
        i = _sigmoid(xp, x[:, :hd])
        f = _sigmoid(xp, x[:, hd:2 * hd]) * cont
        o = _sigmoid(xp, x[:, 2 * hd:3 * hd])
        g = xp.tanh(x[:, 3 * hd:])
        return i, f, o, g

    def forward(self, bottom, top):
        i, f, o, g = self._gates(bottom)
        c = f * bottom[0].xdata.reshape(-1, self.hidden) + i * g
        top[0].xdata = c.reshape(top[0].shape)
        top[1].xdata = (o * self.xp.tanh(c)).reshape(top[1].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot back-propagate to the sequence continuation indicators (cont)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = self.xp
        hd = self.hidden
        i, f, o, g = self._gates(bottom)
        c_prev = bottom[0].xdata.reshape(-1, hd)
        tanh_c = xp.tanh(top[0].xdata.reshape(-1, hd))
        dh = top[1].xdiff.reshape(-1, hd)
        dc = top[0].xdiff.reshape(-1, hd) + dh * o * (1 - tanh_c * tanh_c)
        if propagate_down[0]:
            bottom[0].xdiff = (dc * f).reshape(bottom[0].shape)
        if propagate_down[1]:
            dx = xp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                                 dh * tanh_c * o * (1 - o), dc * i * (1 - g * g)], axis=1)
            bottom[1].xdiff = dx.reshape(bottom[1].shape)
