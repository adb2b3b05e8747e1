"""ops.n2uq_quantize and ops.quantize_weights against NumPy, finite differences and properties."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from n2uq_tf.quantization_math import n2uq as ops

IMPLEMENTATIONS = ["reference"] + (["fused"] if ops.active_implementation() == "fused" else [])


# ---------------------------------------------------------------- NumPy reference (float64)

def np_bounds(s, a):
    a = np.where(a > 1e-3, a, 1e-3)
    d = s + np.concatenate([[0.0], np.cumsum(a)])
    return a, d, d[:-1] + a / 2


def np_forward(x, s, a, b1, b2, bits):
    n = 2 ** bits - 1
    # Thresholds in float32 as ops computes them, so the strict comparison agrees exactly.
    a32 = np.where(a.astype(np.float32) > np.float32(1e-3), a.astype(np.float32), np.float32(1e-3))
    d32 = np.float32(s) + np.concatenate([[np.float32(0)], np.cumsum(a32, dtype=np.float32)]).astype(np.float32)
    t32 = (d32[:-1] + a32 * np.float32(0.5)).astype(np.float32)
    xs = (x.astype(np.float32) * np.float32(b1)).astype(np.float32)
    level = (xs[..., None] > t32).sum(-1)
    return level, b2 * (2.0 / n) * level


def np_surrogate(x, s, a, b1, b2, bits):
    """The G-STE surrogate: beta2 * delta * ((i-1) + (xs - d_{i-1}) / a'_i) on segment i."""
    n = 2 ** bits - 1
    a, d, _ = np_bounds(s, a)
    xs = b1 * x
    u = np.zeros_like(xs)
    for i in range(n):
        u += np.clip((xs - d[i]) / a[i], 0.0, 1.0)
    return b2 * (2.0 / n) * u


def np_gradients(g, x, s, a_raw, b1, b2, bits):
    """The G-STE formulas of docs/design.md section 1, written per element."""
    n = 2 ** bits - 1
    delta = 2.0 / n
    a, d, _ = np_bounds(s, a_raw)
    xs = b1 * x
    level, _ = np_forward(x, s, a_raw, b1, b2, bits)
    gx = np.zeros_like(x)
    gs = 0.0
    ga = np.zeros(n)
    gb1 = 0.0
    for i in range(1, n + 1):
        m = (xs > d[i - 1]) & (xs <= d[i])
        gi, xi, x_in = g[m], xs[m], x[m]
        gx[m] = gi * b1 * b2 * delta / a[i - 1]
        ga[i - 1] += np.sum(-gi * b2 * delta * (xi - d[i - 1]) / a[i - 1] ** 2)
        ga[: i - 1] += np.sum(-gi * b2 * delta / a[i - 1])
        gs += np.sum(-gi * b2 * delta / a[i - 1])
        gb1 += np.sum(gi * b2 * delta / a[i - 1] * x_in)
    ga = np.where(a_raw > 1e-3, ga, 0.0)
    gb2 = np.sum(g * delta * level)
    return gx, gs, ga, gb1, gb2


def tf_gradients(x, s, a, b1, b2, bits, g, implementation):
    xv = tf.constant(x, tf.float32)
    params = [tf.Variable(v, dtype=tf.float32) for v in (s, a, b1, b2)]
    with tf.GradientTape() as tape:
        tape.watch(xv)
        y = ops.n2uq_quantize(xv, *params, bits, implementation=implementation)
        loss = tf.reduce_sum(y * tf.constant(g, tf.float32))
    grads = tape.gradient(loss, [xv] + params)
    return y.numpy(), [gr.numpy() for gr in grads]


def random_case(rng, bits, shape, floor_one=False):
    n = 2 ** bits - 1
    s = rng.uniform(-0.3, 0.3)
    a = rng.uniform(0.05, 1.2, n)
    if floor_one and n > 1:
        a[rng.integers(n)] = rng.uniform(-0.2, 1e-3)
    b1, b2 = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    d_n = s + np.sum(np.maximum(a, 1e-3))
    x = rng.uniform(s - 0.5, d_n + 0.5, shape) / b1  # below s, every segment, above d_n
    g = rng.normal(size=shape)
    return x, s, a, b1, b2, g


SHAPES = [(37,), (4, 9), (2, 5, 5, 3), (2, 3, 4, 2, 3)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_numpy(bits, shape, implementation):
    rng = np.random.default_rng(bits * 100 + len(shape))
    x, s, a, b1, b2, g = random_case(rng, bits, shape, floor_one=True)
    y, (gx, gs, ga, gb1, gb2) = tf_gradients(x, s, a, b1, b2, bits, g, implementation)
    level, y_ref = np_forward(x, s, a, b1, b2, bits)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=0)
    rx, rs, ra, rb1, rb2 = np_gradients(g, x.astype(np.float32).astype(np.float64), s, a, b1, b2, bits)
    np.testing.assert_allclose(gx, rx, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(gs, rs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb1, rb1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb2, rb2, rtol=1e-4, atol=1e-4)
    if 2 ** bits - 1 > 1:
        floored = a <= 1e-3
        assert np.all(ga[floored] == 0.0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gradients_equal_finite_differences_of_the_surrogate(bits):
    rng = np.random.default_rng(7 + bits)
    x, s, a, b1, b2, g = random_case(rng, bits, (200,))
    n = 2 ** bits - 1
    _, d, _ = np_bounds(s, a)
    # Keep away from segment bounds, where the surrogate has kinks.
    xs = b1 * x
    keep = np.min(np.abs(xs[:, None] - d[None, :]), axis=1) > 1e-3
    x, g = x[keep], g[keep]
    _, (gx, gs, ga, gb1, gb2) = tf_gradients(x, s, a, b1, b2, bits, g, "auto")
    eps = 1e-6

    def loss(x_=x, s_=s, a_=a, b1_=b1):
        return np.sum(g * np_surrogate(x_, s_, a_, b1_, b2, bits))

    num_gx = g * (np_surrogate(x + eps, s, a, b1, b2, bits) - np_surrogate(x - eps, s, a, b1, b2, bits)) / (2 * eps)
    np.testing.assert_allclose(gx, num_gx, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gs, (loss(s_=s + eps) - loss(s_=s - eps)) / (2 * eps), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gb1, (loss(b1_=b1 + eps) - loss(b1_=b1 - eps)) / (2 * eps), rtol=1e-3, atol=1e-3)
    for i in range(n):
        step = np.zeros(n)
        step[i] = eps
        num = (loss(a_=a + step) - loss(a_=a - step)) / (2 * eps)
        np.testing.assert_allclose(ga[i], num, rtol=1e-3, atol=1e-3)
    # beta2 scales the forward output, so its gradient is delta * level, not the surrogate's.
    level, _ = np_forward(x, s, a, b1, b2, bits)
    np.testing.assert_allclose(gb2, np.sum(g * (2.0 / n) * level), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 4), seed=st.integers(0, 2 ** 31 - 1))
def test_properties(bits, seed):
    rng = np.random.default_rng(seed)
    x, s, a, b1, b2, _ = random_case(rng, bits, (300,))
    x = np.sort(x).astype(np.float32)
    y = ops.n2uq_quantize(x, s, a.astype(np.float32), b1, b2, bits).numpy()
    assert len(np.unique(y)) <= 2 ** bits
    assert np.all(np.diff(y) >= 0), "monotone in x"
    below = b1 * x.astype(np.float64) <= s
    assert np.all(y[below] == 0.0), "level 0 is exactly 0"
    levels = y / (b2 * 2.0 / (2 ** bits - 1))
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_intervals_give_plain_ste_and_uniform_rounding(bits):
    n = 2 ** bits - 1
    delta = 2.0 / n
    x = np.linspace(-0.7, 2.7, 997).astype(np.float32)
    g = np.random.default_rng(0).normal(size=x.shape)
    y, (gx, *_rest) = tf_gradients(x, 0.0, np.full(n, delta), 1.0, 1.0, bits, g, "auto")
    inside = (x > 0) & (x <= delta * n * (1 + 1e-7))
    np.testing.assert_allclose(gx, np.where(inside, g, 0.0), rtol=1e-5, atol=1e-7)
    expected = np.ceil(np.clip(x, 0, 2) / delta - 0.5) * delta  # round half down
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs(dtype):
    rng = np.random.default_rng(3)
    x16 = tf.cast(tf.constant(rng.uniform(-0.5, 2.5, (64,)), tf.float32), dtype)
    intervals = tf.constant([0.3, 0.7, 1.0], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x16)
        y = ops.n2uq_quantize(x16, 0.1, intervals, 1.0, 1.0, 2)
    assert y.dtype == dtype
    expected = ops.n2uq_quantize(tf.cast(x16, tf.float32), 0.1, intervals, 1.0, 1.0, 2)
    np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), tf.cast(tf.cast(expected, dtype), tf.float32))
    assert tape.gradient(y, x16).dtype == dtype


def test_graph_mode_matches_eager():
    x = tf.random.stateless_uniform((4, 8), (1, 1), -0.5, 2.5)
    args = (0.05, tf.constant([0.5, 0.6, 0.7]), 1.1, 0.9, 2)
    np.testing.assert_array_equal(tf.function(ops.n2uq_quantize)(x, *args).numpy(),
                                  ops.n2uq_quantize(x, *args).numpy())


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, "2", None, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="got " + repr(bits).replace(".", r"\.")):
        ops.n2uq_quantize(tf.zeros(3), 0.0, tf.zeros(1), 1.0, 1.0, bits)
    with pytest.raises(ValueError, match="got " + repr(bits).replace(".", r"\.")):
        ops.quantize_weights(tf.ones((3, 2)), bits)


def test_wrong_interval_count():
    with pytest.raises(ValueError, match=r"shape \[3\] for bits=2"):
        ops.n2uq_quantize(tf.zeros(3), 0.0, tf.zeros(4), 1.0, 1.0, 2)


# ---------------------------------------------------------------- weights

def np_quantize_weights(w, bits, reduce_axes):
    n = 2 ** bits - 1
    gamma = n / 2 ** (bits - 1)
    alpha = gamma * np.mean(np.abs(w), axis=reduce_axes, keepdims=True)
    code = np.round((np.clip(w / alpha, -1, 1) + 1) * n / 2)
    return alpha * (code * 2 / n - 1), alpha


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape, axis, reduce_axes", [
    ((3, 3, 5, 7), -1, (0, 1, 2)),      # Conv2D kernel
    ((11, 6), -1, (0,)),                # Dense kernel
    ((3, 3, 4, 2), (-2, -1), (0, 1)),   # DepthwiseConv2D kernel, multiplier 2
])
def test_weight_quantizer(bits, shape, axis, reduce_axes):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    wv = tf.Variable(w)
    with tf.GradientTape() as tape:
        wq = ops.quantize_weights(wv, bits, axis)
        loss = tf.reduce_sum(wq * g)
    expected, alpha = np_quantize_weights(w.astype(np.float64), bits, reduce_axes)
    np.testing.assert_allclose(wq.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, wv).numpy(), g / alpha, rtol=1e-5)
    # 2^b symmetric levels per channel, none of them zero.
    flat = np.moveaxis(wq.numpy(), [a % len(shape) for a in np.atleast_1d(axis)],
                       list(range(len(shape) - len(np.atleast_1d(axis)), len(shape))))
    flat = flat.reshape(-1, int(np.prod(flat.shape[len(shape) - len(np.atleast_1d(axis)):])))
    for c in range(flat.shape[1]):
        values = np.unique(np.round(flat[:, c], 5))
        assert len(values) <= 2 ** bits and 0.0 not in values
        if len(values) == 2 ** bits:  # all levels used: they are symmetric around zero
            np.testing.assert_allclose(np.sort(values), -np.sort(values)[::-1], atol=1e-5)
    codes, alpha_tf = ops.weight_codes(w, bits, axis)
    np.testing.assert_allclose(alpha_tf.numpy() * (codes.numpy() * 2 / (2 ** bits - 1) - 1), expected, rtol=1e-5,
                               atol=1e-6)


def test_weight_gamma_values():
    assert [ops.weight_gamma(b) for b in (2, 3, 4)] == [1.5, 1.75, 1.875]


def test_all_zero_channel_stays_zero():
    w = np.ones((3, 3, 2, 2), np.float32)
    w[..., 1] = 0
    wv = tf.Variable(w)
    with tf.GradientTape() as tape:
        wq = ops.quantize_weights(wv, 2)
        loss = tf.reduce_sum(wq)
    assert np.all(wq.numpy()[..., 1] == 0) and np.all(np.isfinite(tape.gradient(loss, wv).numpy()))
