"""RNN, LSTM and LSTMUnit: Caffe's blobs and semantics (cont resets, carried state, static input,
expose_hidden) against per-element loop references, and float64 numerical gradients."""
import math

import numpy as np
import pytest

from minicaffe.core import backend
from minicaffe.errors import MinicaffeError
from minicaffe.testing import check_gradient, make_layer

FILLERS = 'weight_filler { type: "uniform" min: -0.6 max: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def lstm_text(h=3, expose=False):
    return f'type: "LSTM" recurrent_param {{ num_output: {h} expose_hidden: {str(expose).lower()} {FILLERS} }}'


def rnn_text(h=3, expose=False):
    return f'type: "RNN" recurrent_param {{ num_output: {h} expose_hidden: {str(expose).lower()} {FILLERS} }}'


def rand(shape, seed=0, scale=1.0):
    return np.random.RandomState(seed).uniform(-scale, scale, shape)


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def matvec(w, v):
    return [sum(w[r][k] * v[k] for k in range(len(v))) for r in range(len(w))]


def lstm_reference(x, cont, blobs, static=None, h0=None, c0=None):
    """Caffe's unrolled LSTM, element by element. blobs: W_xc, b_c, [W_xc_static], W_hc."""
    w_xc, b_c = blobs[0], blobs[1]
    w_s = blobs[2] if static is not None else None
    w_hc = blobs[-1]
    t_steps, n = cont.shape
    hd = w_hc.shape[1]
    xs = x.reshape(t_steps, n, -1)
    h = [[0.0] * hd for _ in range(n)] if h0 is None else [list(r) for r in h0.reshape(n, hd)]
    c = [[0.0] * hd for _ in range(n)] if c0 is None else [list(r) for r in c0.reshape(n, hd)]
    out = np.zeros((t_steps, n, hd))
    for t in range(t_steps):
        for s in range(n):
            hc = [cont[t, s] * v for v in h[s]]
            gates = [a + b + bb for a, b, bb in zip(matvec(w_hc, hc), matvec(w_xc, xs[t, s]), b_c)]
            if w_s is not None:
                gates = [g + e for g, e in zip(gates, matvec(w_s, static.reshape(n, -1)[s]))]
            new_c, new_h = [], []
            for d in range(hd):
                i = sig(gates[d])
                f = 0.0 if cont[t, s] == 0 else cont[t, s] * sig(gates[hd + d])
                o = sig(gates[2 * hd + d])
                g = math.tanh(gates[3 * hd + d])
                cc = f * c[s][d] + i * g
                new_c.append(cc)
                new_h.append(o * math.tanh(cc))
            c[s], h[s] = new_c, new_h
            out[t, s] = new_h
    return out, np.array(h), np.array(c)


def rnn_reference(x, cont, blobs, static=None, h0=None):
    """Caffe's unrolled RNN. blobs: W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o."""
    w_xh, b_h = blobs[0], blobs[1]
    w_s = blobs[2] if static is not None else None
    w_hh, w_ho, b_o = blobs[-3], blobs[-2], blobs[-1]
    t_steps, n = cont.shape
    hd = w_hh.shape[0]
    xs = x.reshape(t_steps, n, -1)
    h = [[0.0] * hd for _ in range(n)] if h0 is None else [list(r) for r in h0.reshape(n, hd)]
    out = np.zeros((t_steps, n, hd))
    for t in range(t_steps):
        for s in range(n):
            hc = [cont[t, s] * v for v in h[s]]
            a = [p + q + r for p, q, r in zip(matvec(w_hh, hc), matvec(w_xh, xs[t, s]), b_h)]
            if w_s is not None:
                a = [p + q for p, q in zip(a, matvec(w_s, static.reshape(n, -1)[s]))]
            h[s] = [math.tanh(v) for v in a]
            out[t, s] = [math.tanh(v + b) for v, b in zip(matvec(w_ho, h[s]), b_o)]
    return out, np.array(h)


def blobs64(layer):
    return [b.data.astype(np.float64) for b in layer.blobs]


def f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


def cont_with_starts(t_steps, n):
    cont = np.ones((t_steps, n))
    cont[0] = 0
    if t_steps > 2:
        cont[2, n - 1] = 0            # a new sequence starts mid-batch in the last stream
    return cont


# --- parameter blobs ------------------------------------------------------------------------------

def test_lstm_and_rnn_blobs_have_caffes_order_and_shapes():
    x, cont, xs = rand((3, 2, 4, 2)), np.ones((3, 2)), rand((2, 5))
    layer, _, _ = make_layer(lstm_text(3), [x, cont])
    assert [b.shape for b in layer.blobs] == [(12, 8), (12,), (12, 3)]
    layer, _, _ = make_layer(lstm_text(3), [x, cont, xs])
    assert [b.shape for b in layer.blobs] == [(12, 8), (12,), (12, 5), (12, 3)]
    layer, _, _ = make_layer(rnn_text(3), [x, cont])
    assert [b.shape for b in layer.blobs] == [(3, 8), (3,), (3, 3), (3, 3), (3,)]
    layer, _, _ = make_layer(rnn_text(3), [x, cont, xs])
    assert [b.shape for b in layer.blobs] == [(3, 8), (3,), (3, 5), (3, 3), (3, 3), (3,)]


def test_recurrent_shape_errors_name_the_layer():
    with pytest.raises(MinicaffeError, match="'test_layer'.*cont.*\\(3, 2\\)"):
        make_layer(lstm_text(), [rand((3, 2, 4)), np.ones((3, 3))])
    with pytest.raises(MinicaffeError, match="x_static.*2 rows"):
        make_layer(lstm_text(), [rand((3, 2, 4)), np.ones((3, 2)), rand((3, 4))])
    with pytest.raises(MinicaffeError, match="num_output must be positive"):
        make_layer('type: "RNN"', [rand((3, 2, 4)), np.ones((3, 2))])
    with pytest.raises(MinicaffeError, match="initial state h_0.*\\(1, 2, 3\\)"):
        make_layer(lstm_text(expose=True), [rand((3, 2, 4)), np.ones((3, 2)), rand((1, 2, 4)), rand((1, 2, 3))],
                   num_top=3)
    with pytest.raises(MinicaffeError, match="needs 3 top"):
        make_layer(lstm_text(expose=True), [rand((3, 2, 4)), np.ones((3, 2)), rand((1, 2, 3)), rand((1, 2, 3))])


# --- forward against the loop references -------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
def test_lstm_forward_against_loop_reference(static):
    t_steps, n = 4, 3
    x, cont = rand((t_steps, n, 2, 2), seed=1), cont_with_starts(t_steps, n)
    bottoms = [x, cont] + ([rand((n, 3), seed=2)] if static else [])
    backend.set_random_seed(5)
    layer, bottom, top = make_layer(lstm_text(3), bottoms)
    layer.forward(bottom, top)
    ref, _, _ = lstm_reference(f32(x), cont, blobs64(layer), f32(bottoms[2]) if static else None)
    assert top[0].shape == (t_steps, n, 3)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_rnn_forward_against_loop_reference(static):
    t_steps, n = 4, 3
    x, cont = rand((t_steps, n, 3), seed=3), cont_with_starts(t_steps, n)
    bottoms = [x, cont] + ([rand((n, 2, 2), seed=4)] if static else [])
    backend.set_random_seed(6)
    layer, bottom, top = make_layer(rnn_text(4), bottoms)
    layer.forward(bottom, top)
    ref, _ = rnn_reference(f32(x), cont, blobs64(layer), f32(bottoms[2]) if static else None)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carries_over_between_batches_unless_cont_resets_it(kind):
    """Two forward passes of T steps with cont = 1 equal one pass over the 2T steps (Caffe copies
    h_T, c_T into h_0, c_0); with cont = 0 at t = 0 the second pass forgets the first."""
    text = lstm_text(3) if kind == "LSTM" else rnn_text(3)
    t_steps, n = 3, 2
    x = rand((2 * t_steps, n, 4), seed=7)
    backend.set_random_seed(8)
    whole, wb, wt = make_layer(text, [x, np.ones((2 * t_steps, n))])
    whole.forward(wb, wt)
    backend.set_random_seed(8)
    part, pb, pt = make_layer(text, [x[:t_steps], np.ones((t_steps, n))])
    part.forward(pb, pt)
    first = pt[0].data.copy()
    pb[0].data[...] = x[t_steps:]
    part.forward(pb, pt)
    np.testing.assert_allclose(np.concatenate([first, pt[0].data]), wt[0].data, rtol=1e-5, atol=1e-6)
    # reset: cont 0 at the first step makes the pass independent of what came before
    pb[1].data[0] = 0
    part.forward(pb, pt)
    again = pt[0].data.copy()
    part.forward(pb, pt)
    np.testing.assert_allclose(pt[0].data, again, rtol=0, atol=0)
    ref = (lstm_reference if kind == "LSTM" else rnn_reference)(f32(x[t_steps:]), pb[1].data.astype(float),
                                                                 blobs64(part))[0]
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-6)


def test_lstm_expose_hidden_tops_feed_the_next_batch():
    t_steps, n = 3, 2
    x = rand((2 * t_steps, n, 4), seed=9)
    backend.set_random_seed(10)
    whole, wb, wt = make_layer(lstm_text(3), [x, np.ones((2 * t_steps, n))])
    whole.forward(wb, wt)
    zeros = np.zeros((1, n, 3))
    backend.set_random_seed(10)
    layer, bottom, top = make_layer(lstm_text(3, expose=True), [x[:t_steps], np.ones((t_steps, n)), zeros, zeros],
                                    num_top=3)
    assert [t.shape for t in top] == [(t_steps, n, 3), (1, n, 3), (1, n, 3)]
    layer.forward(bottom, top)
    first = top[0].data.copy()
    np.testing.assert_array_equal(top[1].data[0], top[0].data[-1])      # h_T is the last output
    bottom[0].data[...] = x[t_steps:]
    bottom[2].data[...] = top[1].data
    bottom[3].data[...] = top[2].data
    layer.forward(bottom, top)
    np.testing.assert_allclose(np.concatenate([first, top[0].data]), wt[0].data, rtol=1e-5, atol=1e-6)
    # the exposed initial state is used as given, every pass (no carried state)
    h0, c0 = rand((1, n, 3), seed=11), rand((1, n, 3), seed=12)
    bottom[2].data[...], bottom[3].data[...] = h0, c0
    layer.forward(bottom, top)
    ref, h_t, c_t = lstm_reference(f32(x[t_steps:]), np.ones((t_steps, n)), blobs64(layer), None, f32(h0), f32(c0))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(top[2].data[0], c_t, rtol=1e-5, atol=1e-6)


def test_rnn_expose_hidden_top_is_the_last_hidden_state():
    t_steps, n = 3, 2
    x, h0 = rand((t_steps, n, 4), seed=13), rand((1, n, 3), seed=14)
    layer, bottom, top = make_layer(rnn_text(3, expose=True), [x, np.ones((t_steps, n)), h0], num_top=2)
    layer.forward(bottom, top)
    ref, h_t = rnn_reference(f32(x), np.ones((t_steps, n)), blobs64(layer), None, f32(h0))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(top[1].data[0], h_t, rtol=1e-5, atol=1e-6)


def test_a_new_number_of_streams_starts_from_zero_state():
    layer, bottom, top = make_layer(lstm_text(3), [rand((2, 3, 4), seed=15), np.ones((2, 3))])
    layer.forward(bottom, top)
    from minicaffe.core.blob import Blob
    x2, c2 = Blob((2, 2, 4)), Blob((2, 2))
    x2.data[...], c2.data[...] = rand((2, 2, 4), seed=16), 1
    layer.reshape([x2, c2], top)
    layer.forward([x2, c2], top)
    ref, _, _ = lstm_reference(f32(x2.data), np.ones((2, 2)), blobs64(layer))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)


# --- gradients ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_gradient(kind, static):
    t_steps, n = 4, 2
    bottoms = [rand((t_steps, n, 3), seed=17), cont_with_starts(t_steps, n)]
    if static:
        bottoms.append(rand((n, 2), seed=18))
    check_gradient(lstm_text(3) if kind == "LSTM" else rnn_text(3), bottoms,
                   check_bottom=[0, 2] if static else [0])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_gradient_with_exposed_hidden_state(kind):
    """Caffe truncates at the batch: the h_T/c_T tops' gradients are not used, and the initial
    state bottoms get none (zeros here). Checked against the numerical gradient of the h top."""
    t_steps, n, hd = 3, 2, 3
    states = 2 if kind == "LSTM" else 1
    bottoms = [rand((t_steps, n, 3), seed=19), np.ones((t_steps, n))]
    bottoms += [rand((1, n, hd), seed=20 + k) for k in range(states)]
    weights = [rand((t_steps, n, hd), seed=30)] + [np.zeros((1, n, hd))] * states
    text = lstm_text(hd, expose=True) if kind == "LSTM" else rnn_text(hd, expose=True)
    check_gradient(text, bottoms, check_bottom=[0], num_top=1 + states, top_weights=weights)
    layer, bottom, top = make_layer(text, bottoms, num_top=1 + states)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = 1
    for b in bottom[2:]:
        b.diff[...] = 5
    layer.backward(top, [True, False] + [True] * states, bottom)
    for b in bottom[2:]:
        np.testing.assert_array_equal(b.diff, 0)


def test_recurrent_refuses_gradient_to_cont():
    layer, bottom, top = make_layer(lstm_text(), [rand((2, 2, 3)), np.ones((2, 2))])
    layer.forward(bottom, top)
    with pytest.raises(MinicaffeError, match="cont"):
        layer.backward(top, [True, True], bottom)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_parameter_gradients_accumulate():
    """Like every layer here, parameter gradients add up over backward passes (iter_size)."""
    layer, bottom, top = make_layer(lstm_text(), [rand((2, 2, 3), seed=31), np.ones((2, 2))])
    layer.forward(bottom, top)
    top[0].diff[...] = rand(top[0].shape, seed=32)
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True, False], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [True, False], bottom)
    for b, g in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * g, rtol=1e-6)
        assert np.any(g != 0)


# --- LSTMUnit -----------------------------------------------------------------------------------------

def lstm_unit_reference(c_prev, x, cont, dc, dh):
    n, hd = c_prev.shape[1], c_prev.shape[2]
    c_out, h_out = np.zeros((1, n, hd)), np.zeros((1, n, hd))
    dc_prev, dx = np.zeros_like(c_prev), np.zeros_like(x)
    for s in range(n):
        for d in range(hd):
            i = sig(x[0, s, d])
            f = 0.0 if cont[0, s] == 0 else cont[0, s] * sig(x[0, s, hd + d])
            o = sig(x[0, s, 2 * hd + d])
            g = math.tanh(x[0, s, 3 * hd + d])
            c = f * c_prev[0, s, d] + i * g
            tc = math.tanh(c)
            c_out[0, s, d], h_out[0, s, d] = c, o * tc
            cterm = dc[0, s, d] + dh[0, s, d] * o * (1 - tc * tc)
            dc_prev[0, s, d] = cterm * f
            dx[0, s, d] = cterm * g * i * (1 - i)
            dx[0, s, hd + d] = cterm * c_prev[0, s, d] * f * (1 - f)
            dx[0, s, 2 * hd + d] = dh[0, s, d] * tc * o * (1 - o)
            dx[0, s, 3 * hd + d] = cterm * i * (1 - g * g)
    return c_out, h_out, dc_prev, dx


def test_lstm_unit_against_loop_reference_and_gradient():
    n, hd = 3, 4
    c_prev, x = rand((1, n, hd), seed=40, scale=2), rand((1, n, 4 * hd), seed=41, scale=2)
    cont = np.array([[1.0, 0.0, 1.0]])
    dc, dh = rand((1, n, hd), seed=42), rand((1, n, hd), seed=43)
    layer, bottom, top = make_layer('type: "LSTMUnit"', [c_prev, x, cont], num_top=2)
    layer.forward(bottom, top)
    top[0].diff[...], top[1].diff[...] = dc, dh
    layer.backward(top, [True, True, False], bottom)
    ref = lstm_unit_reference(f32(c_prev), f32(x), cont, f32(dc), f32(dh))
    for got, want in zip([top[0].data, top[1].data, bottom[0].diff, bottom[1].diff], ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(bottom[0].diff[0, 1] == 0)         # cont 0: nothing flows to the old cell
    check_gradient('type: "LSTMUnit"', [c_prev, x, cont], check_bottom=[0, 1], num_top=2)
    with pytest.raises(MinicaffeError, match="cont"):
        layer.backward(top, [True, True, True], bottom)


def test_lstm_unit_shape_checks():
    with pytest.raises(MinicaffeError, match="4 x 3 = 12"):
        make_layer('type: "LSTMUnit"', [np.zeros((1, 2, 3)), np.zeros((1, 2, 8)), np.ones((1, 2))], num_top=2)
    with pytest.raises(MinicaffeError, match="bottom\\[2\\] must have 2 axes"):
        make_layer('type: "LSTMUnit"', [np.zeros((1, 2, 3)), np.zeros((1, 2, 12)), np.ones((1, 2, 1))], num_top=2)


def test_lstm_is_lstm_units_over_time():
    """The LSTM layer's steps are the LSTMUnit layer applied to W_hc (cont h) + W_xc x + b_c."""
    t_steps, n, hd = 3, 2, 3
    x, cont = rand((t_steps, n, 4), seed=50), cont_with_starts(t_steps, n)
    layer, bottom, top = make_layer(lstm_text(hd), [x, cont])
    layer.forward(bottom, top)
    w_xc, b_c, w_hc = blobs64(layer)
    h, c = np.zeros((1, n, hd)), np.zeros((1, n, hd))
    for t in range(t_steps):
        gates = (h[0] * cont[t][:, None]) @ w_hc.T + f32(x[t]) @ w_xc.T + b_c
        unit, ub, ut = make_layer('type: "LSTMUnit"', [c, gates[None], cont[t][None]], num_top=2)
        unit.forward(ub, ut)
        c, h = ut[0].data.astype(np.float64), ut[1].data.astype(np.float64)
        np.testing.assert_allclose(top[0].data[t], h[0], rtol=1e-5, atol=1e-6)


def test_weights_of_the_wrong_shape_are_refused():
    from minicaffe.core.blob import Blob
    layer, bottom, top = make_layer(lstm_text(3), [rand((2, 2, 4)), np.ones((2, 2))])
    from minicaffe.layers import create_layer
    other = create_layer(layer.param, layer.phase)
    other.blobs = [Blob(b.shape) for b in layer.blobs]
    other.blobs[2] = Blob((12, 4))
    with pytest.raises(MinicaffeError, match="W_hc has shape \\(12, 4\\), expected \\(12, 3\\)"):
        other.setup(bottom, top)
