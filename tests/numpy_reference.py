"""Independent NumPy reference of the N2UQ quantizers (written from the design spec only).

Nothing here imports TensorFlow or n2uq_tf: this module is the oracle that
``tests/test_ops_reference.py`` holds ``n2uq_tf.ops`` against.

Activation quantizer, bits b, n = 2**b - 1, delta = 2 / n:

* x = beta1 * x_in
* a' = where(a > 1e-3, a, 1e-3)            (a stored a <= 1e-3 gets no gradient)
* d_0 = s, d_i = s + sum_{j<=i} a'_j       (segment i is d_{i-1} < x <= d_i)
* T_i = d_{i-1} + a'_i / 2, level = #{i : x > T_i}, output = beta2 * delta * level
* backward: gradient of the G-STE surrogate
  beta2 * (delta / a'_i * (x - d_{i-1}) + (i - 1) * delta) on segment i, 0 below s,
  constant above d_n; beta2 gets delta * level (the forward scale) everywhere.

Weight quantizer: alpha = gamma * mean|W| per output channel, gamma = n / 2**(b-1),
W~ = clip(W / alpha, -1, 1), Wq = alpha * (round((W~ + 1) * n / 2) * 2 / n - 1),
gradient g / alpha (alpha held constant, no clip mask).
"""

import numpy as np

FLOOR = 1e-3
# The floor as the op sees it: the float32 constant 1e-3 (0.0010000000474974513).
FLOOR32 = float(np.float32(FLOOR))


def num_levels(bits):
    return 2 ** bits - 1


def delta_of(bits):
    return 2.0 / num_levels(bits)


# --------------------------------------------------------------------------- activation, float32 forward

def floored_intervals_f32(intervals):
    a = np.asarray(intervals, np.float32)
    return np.where(a > np.float32(FLOOR), a, np.float32(FLOOR)).astype(np.float32)


def bounds_f32(start, intervals):
    """d_0..d_n in float32, in the spec's order: cumsum of a' (float32), then + s."""
    a = floored_intervals_f32(intervals)
    s = np.float32(start)
    csum = np.cumsum(a, dtype=np.float32)
    return np.concatenate([[s], (s + csum).astype(np.float32)]).astype(np.float32)


def thresholds_f32(start, intervals):
    """T_i = d_{i-1} + a'_i / 2 in float32, i = 1..n."""
    a = floored_intervals_f32(intervals)
    d = bounds_f32(start, intervals)
    return (d[:-1] + a / np.float32(2)).astype(np.float32)


def scaled_input_f32(x_in, beta1):
    return (np.float32(beta1) * np.asarray(x_in, np.float32)).astype(np.float32)


def levels_f32(x_in, start, intervals, beta1):
    """level = #{i : beta1 * x_in > T_i}, all in float32."""
    x = scaled_input_f32(x_in, beta1)
    t = thresholds_f32(start, intervals)
    return np.sum(x[..., None] > t, axis=-1).astype(np.int64)


def output_from_levels_f32(levels, beta2, bits):
    """beta2 * delta * level in float32 (evaluated left to right)."""
    scale = np.float32(np.float32(beta2) * np.float32(delta_of(bits)))
    return (scale * np.asarray(levels, np.float32)).astype(np.float32)


def quantize_f32(x_in, start, intervals, beta1, beta2, bits):
    return output_from_levels_f32(levels_f32(x_in, start, intervals, beta1), beta2, bits)


def threshold_distance_f32(x_in, start, intervals, beta1):
    """Distance of beta1 * x_in (float32) from the nearest threshold."""
    x = scaled_input_f32(x_in, beta1).astype(np.float64)
    t = thresholds_f32(start, intervals).astype(np.float64)
    return np.min(np.abs(x[..., None] - t), axis=-1)


def threshold_tolerance(start, intervals, bits):
    """How close to a threshold an element may be and still be classified differently.

    A correct implementation may build d_i and T_i with a different float32
    rounding order (s + cumsum vs a running sum from s, (d_{i-1} + d_i) / 2 vs
    d_{i-1} + a'_i / 2, fused multiply-add, ...). Each of the n + 2 roundings
    moves a threshold by at most half an ulp of the running magnitude, so the
    thresholds of two correct float32 implementations agree to about
    (n + 2) * eps32 * (|s| + sum a'). An element closer than that to a threshold
    (or than 1e-6, the floor of this tolerance) has no well-defined float32
    level across implementations; everywhere else the level must match exactly.
    """
    a = floored_intervals_f32(intervals).astype(np.float64)
    mag = abs(float(start)) + float(np.sum(a))
    return max(1e-6, (num_levels(bits) + 2) * float(np.finfo(np.float32).eps) * mag)


# --------------------------------------------------------------------------- activation, float64 math

def _params64(start, intervals, beta1, beta2):
    a_raw = np.asarray(intervals, np.float32).astype(np.float64)
    floored = ~(np.asarray(intervals, np.float32) > np.float32(FLOOR))
    a = np.where(floored, FLOOR32, a_raw)
    s = float(np.float32(start))
    d = np.concatenate([[s], s + np.cumsum(a)])
    return s, a, floored, d, float(np.float32(beta1)), float(np.float32(beta2))


def segment_index64(x, d):
    """i in 1..n for d_{i-1} < x <= d_i; 0 for x <= d_0; n + 1 for x > d_n."""
    return np.searchsorted(d, x, side="left")


def boundary_distance64(x, start, intervals):
    """Distance of x from the nearest segment bound d_i or threshold T_i (float64)."""
    _, a, _, d, _, _ = _params64(start, intervals, 1.0, 1.0)
    pts = np.concatenate([d, d[:-1] + a / 2])
    return np.min(np.abs(np.asarray(x, np.float64)[..., None] - pts), axis=-1)


def levels64(x, start, intervals):
    _, a, _, d, _, _ = _params64(start, intervals, 1.0, 1.0)
    t = d[:-1] + a / 2
    return np.sum(np.asarray(x, np.float64)[..., None] > t, axis=-1)


def surrogate64(x_in, start, intervals, beta1, beta2, bits):
    """The G-STE surrogate in float64, as a function of the raw (unfloored) parameters.

    Every argument is taken at full float64 value (no float32 rounding) so that
    it can be finite-differenced.
    """
    n = num_levels(bits)
    delta = 2.0 / n
    a_raw = np.asarray(intervals, np.float64)
    a = np.where(a_raw > FLOOR32, a_raw, FLOOR32)
    d = np.concatenate([[start], start + np.cumsum(a)])
    x = beta1 * np.asarray(x_in, np.float64)
    i = segment_index64(x, d)
    inside = (i >= 1) & (i <= n)
    ic = np.clip(i, 1, n)
    val = beta2 * (delta / a[ic - 1] * (x - d[ic - 1]) + (ic - 1) * delta)
    return np.where(inside, val, np.where(i > n, beta2 * n * delta, 0.0))


def gradients64(x_in, g, start, intervals, beta1, beta2, bits):
    """Analytic G-STE gradients of sum(g * y) (spec formulas), float64.

    Returns dict with x (per element), start, intervals [n], beta1, beta2.
    Parameters are read as float32 values (what the op sees), math is float64.
    """
    n = num_levels(bits)
    delta = 2.0 / n
    s, a, floored, d, b1, b2 = _params64(start, intervals, beta1, beta2)
    x_in = np.asarray(x_in, np.float32).astype(np.float64)
    g = np.asarray(g, np.float64)
    x = b1 * x_in
    i = segment_index64(x, d)
    inside = (i >= 1) & (i <= n)
    ic = np.clip(i, 1, n)
    ai = a[ic - 1]
    slope = np.where(inside, b2 * delta / ai, 0.0)          # d y / d x (scaled input)
    dx = g * slope * b1
    ds = -np.sum(g * slope)
    db1 = np.sum(g * slope * x_in)
    level = levels64(x, s, np.asarray(intervals, np.float32))
    db2 = np.sum(g * delta * level)
    da = np.zeros(n)
    gi = (g * slope).ravel()
    icf = ic.ravel()
    insf = inside.ravel()
    # j < i: -g * beta2 * delta / a'_i  (= -g * slope) -> sum over elements with i > j
    per_seg = np.bincount(icf[insf], weights=gi[insf], minlength=n + 2)   # index 1..n
    tail = np.cumsum(per_seg[::-1])[::-1]                                  # tail[k] = sum_{i>=k}
    da -= tail[2:n + 2]                                                    # j = 1..n: sum_{i>j}
    # j == i: -g * beta2 * delta * (x - d_{i-1}) / a'_i^2
    own = np.where(inside, -g * slope * (x - d[ic - 1]) / ai, 0.0).ravel()
    da += np.bincount(icf[insf] - 1, weights=own[insf], minlength=n)[:n]
    da = np.where(floored, 0.0, da)
    return {"x": dx, "start": ds, "intervals": da, "beta1": db1, "beta2": db2}


def gradient_scales64(x_in, g, start, intervals, beta1, beta2, bits):
    """sum |term| of every summed parameter gradient: the scale for an absolute tolerance."""
    n = num_levels(bits)
    delta = 2.0 / n
    s, a, _, d, b1, b2 = _params64(start, intervals, beta1, beta2)
    x_in = np.asarray(x_in, np.float32).astype(np.float64)
    g = np.abs(np.asarray(g, np.float64))
    x = b1 * x_in
    i = segment_index64(x, d)
    inside = (i >= 1) & (i <= n)
    ic = np.clip(i, 1, n)
    slope = np.where(inside, b2 * delta / a[ic - 1], 0.0)
    level = levels64(x, s, np.asarray(intervals, np.float32))
    tot = float(np.sum(g * slope))
    return {"start": tot, "beta1": float(np.sum(g * slope * np.abs(x_in))),
            "beta2": float(np.sum(g * delta * level)),
            "intervals": tot + float(np.sum(g * slope * np.abs(x - d[ic - 1]) / a[ic - 1]))}


# --------------------------------------------------------------------------- weights

def normalize_axes(rank, channel_axis):
    axes = channel_axis if isinstance(channel_axis, (tuple, list)) else (channel_axis,)
    return tuple(sorted(ax % rank for ax in axes))


def weight_gamma(bits):
    return (2 ** bits - 1) / 2 ** (bits - 1)


def weight_alpha64(w, bits, channel_axis=-1):
    """alpha = gamma * mean|W| over every axis but the channel axes (keepdims), float64."""
    w = np.asarray(w, np.float64)
    keep = normalize_axes(w.ndim, channel_axis)
    red = tuple(ax for ax in range(w.ndim) if ax not in keep)
    m = np.mean(np.abs(w), axis=red, keepdims=True) if red else np.abs(w)
    return weight_gamma(bits) * m


def weight_codes64(w, alpha, bits):
    """k = round_half_even((clip(W / alpha, -1, 1) + 1) * n / 2) and the pre-round value."""
    n = num_levels(bits)
    u = (np.clip(np.asarray(w, np.float64) / alpha, -1.0, 1.0) + 1.0) * n / 2.0
    return np.round(u).astype(np.int64), u


def quantize_weights64(w, bits, channel_axis=-1):
    n = num_levels(bits)
    alpha = weight_alpha64(w, bits, channel_axis)
    k, _ = weight_codes64(w, alpha, bits)
    return alpha * (k * 2.0 / n - 1.0), alpha, k


def quantize_weights_f32(w, bits, channel_axis=-1):
    """The spec formula evaluated step by step in float32 (mean in float64, rounded once)."""
    n = num_levels(bits)
    w = np.asarray(w, np.float32)
    alpha = np.float32(weight_alpha64(w, bits, channel_axis)).astype(np.float32)
    wt = np.clip(w / alpha, np.float32(-1), np.float32(1)).astype(np.float32)
    k = np.round((wt + np.float32(1)) * np.float32(n) / np.float32(2)).astype(np.float32)
    return (alpha * (k * np.float32(2) / np.float32(n) - np.float32(1))).astype(np.float32)
