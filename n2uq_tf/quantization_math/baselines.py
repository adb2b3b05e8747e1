"""The literature quantizers that N2UQ is compared with: pure-TF math with the papers' gradients.

N2UQ's own math is the sibling module `n2uq` (also the "uniform" baseline: N2UQ with frozen
thresholds). This module holds the others, each written from its paper:

* DoReFa-Net (Zhou et al. 2016, arXiv 1606.06160), Sec. 2.2-2.3: weights
  ``w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (``E|w| sign(w)`` at 1 bit),
  activations ``quantize_k(clip(x, 0, 1))``, ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)``
  with the straight-through estimator (STE) on the rounding only.
* PACT (Choi et al. 2018, arXiv 1805.06085), Eq. 1-3: ``y = clip(x, 0, alpha)`` quantized
  uniformly on [0, alpha]; STE, so ``dy_q/dx = 1`` on [0, alpha) and ``dy_q/dalpha = 1`` for
  ``x >= alpha``, 0 below (the paper's Eq. 3; the rounding error term is not differentiated).
* LSQ (Esser et al. 2020, arXiv 1902.08153), Sec. 2: ``v_q = round(clip(v/s, -Q_N, Q_P)) * s``;
  STE ``dv_q/dv = 1`` for ``-Q_N < v/s < Q_P``; step gradient ``-v/s + round(v/s)`` inside,
  ``-Q_N`` / ``Q_P`` outside, times ``g = 1 / sqrt(N * Q_P)``.
* DAQ (Kim, Lee, Ham, "Distance-aware Quantization", ICCV 2021, arXiv 2108.06983), Sec. 3:
  distance-aware soft rounding (DASR) = kernel soft argmax over the two nearest levels with
  the similarity ``phi_i = exp(-|x - q_i|)``, a Gaussian kernel ``exp(-(q_i - q_*)^2 / sigma^2)``
  around the nearest level q_*, rescaled levels ``q_0 - c``, ``q_1 + c`` with
  ``c = 1 / (exp(T) - 1)``, and the temperature controller ``beta(x) = T / |s_0(x) - s_1(x)|``
  (held constant for the gradient) that makes the soft output equal the rounded value; hard
  rounding at inference. Checked against the authors' code (cvlab-yonsei/DAQ,
  ``a_soft_argmax``/``w_soft_argmax``); see `daq_soft_round`.
* Two weight variants for the paper's Table 4: no weight scaling (`noscale_weights`) and a
  learnable per-channel scale with an LSQ-style gradient (`learnable_scale_weights`).

Every activation quantizer's forward (at inference, and at training for all but DAQ) is
``step * #{x > T_i}`` with float32 thresholds computed by one multiply from the quantizer's
parameter, so the exported threshold count reproduces it bit for bit. Ties (``x`` exactly
at a threshold, i.e. ``v/s`` exactly half-way) round down, where the papers' round() is
unspecified.
"""

import math

import numpy as np
import tensorflow as tf

from n2uq_tf.quantization_math._common import channel_axes, check_bits, count_less, num_levels, symmetric_levels

__all__ = [
    "half_step_thresholds", "count_above",
    "dorefa_activation", "dorefa_weights", "dorefa_weight_codes",
    "pact_activation", "pact_levels",
    "lsq_activation", "lsq_activation_levels", "lsq_weights", "lsq_weight_codes", "lsq_weight_range",
    "lsq_grad_scale", "lsq_init",
    "daq_temperature", "daq_soft_round", "daq_activation", "daq_weights", "daq_weight_codes", "daq_weight_scale",
    "DAQ_ACT_TEMPERATURE", "DAQ_ACT_SIGMA", "DAQ_WEIGHT_TEMPERATURE", "DAQ_WEIGHT_SIGMA",
    "noscale_weights", "noscale_weight_codes", "learnable_scale_weights", "learnable_scale_codes",
    "learnable_scale_grad_scale", "learnable_scale_init",
]

# The authors' DAQ settings (configs/DAQ/resnet20_DAQ_W1A1.yml: a_temp 2, a_sig 2; the weight
# quantizer's w_temperature 2, w_sigma 1 in models/resnet20_DAQ.py).
DAQ_ACT_TEMPERATURE, DAQ_ACT_SIGMA = 2.0, 2.0
DAQ_WEIGHT_TEMPERATURE, DAQ_WEIGHT_SIGMA = 2.0, 1.0


def _f32(value):
    """A scalar parameter (variable, tensor or number) as a float32 scalar tensor."""
    return tf.reshape(tf.cast(value, tf.float32), [])


def half_step_thresholds(bits):
    """(i - 1/2) / n for i = 1..n as a float32 constant: thresholds of round(n * r) on r in [0, 1]."""
    n = num_levels(bits)
    return tf.constant((np.arange(n, dtype=np.float64) + 0.5) / n, tf.float32)


def count_above(x, thresholds):
    """#{i : x > T_i} (int32) for increasing float32 thresholds: the exported quantize op's count."""
    return count_less(thresholds, x)  # one compare per threshold, as the N2UQ forward


# --------------------------------------------------------------------------- DoReFa

def dorefa_activation(x, bits):
    """DoReFa activations: round(n * clip(x, 0, 1)) / n; STE gradient 1 on [0, 1], 0 outside."""
    n = num_levels(bits)
    thresholds = half_step_thresholds(bits)
    step = tf.constant(1.0 / n, tf.float32)

    @tf.custom_gradient
    def quantize(x):
        y = tf.cast(count_above(x, thresholds), tf.float32) * step

        def grad(g):
            return g * tf.cast((x >= 0.0) & (x <= 1.0), g.dtype)

        return y, grad

    return quantize(tf.cast(x, tf.float32))


def _dorefa_normalized(w):
    """tanh(w) / (2 max|tanh(w)|) + 1/2 in [0, 1] (per tensor, as in the paper)."""
    t = tf.tanh(w)
    return t / (2.0 * tf.reduce_max(tf.abs(t))) + 0.5


def dorefa_weight_codes(w, bits):
    """Integer codes k and the per-tensor scale E of DoReFa weights (E = 1 above 1 bit).

    bits > 1: k = round(n * r), w_q = 2k/n - 1. bits = 1: k = [w >= 0], w_q = E (2k - 1), E = mean|w|.
    """
    n = num_levels(bits)
    w = tf.cast(w, tf.float32)
    if bits == 1:
        return tf.cast(w >= 0.0, tf.int32), tf.reduce_mean(tf.abs(w))
    return tf.cast(tf.round(_dorefa_normalized(w) * n), tf.int32), tf.constant(1.0, tf.float32)


def dorefa_weights(w, bits):
    """DoReFa weights; the gradient is autodiff of the smooth part (tanh and the max), STE on round.

    At 1 bit: E sign(w) with E = mean|w| held constant and an identity STE (the paper's 1-bit rule).
    """
    w = tf.cast(w, tf.float32)
    codes, scale = dorefa_weight_codes(tf.stop_gradient(w), bits)
    if bits == 1:
        exact = tf.stop_gradient(scale) * (2.0 * tf.cast(codes, tf.float32) - 1.0)
        smooth = w
    else:
        exact = tf.gather(symmetric_levels(bits), codes)
        smooth = 2.0 * _dorefa_normalized(w) - 1.0
    # exact + (smooth - smooth) is exact in the forward (x - x == 0 in float), smooth's gradient backward.
    return tf.stop_gradient(exact) + (smooth - tf.stop_gradient(smooth))


# --------------------------------------------------------------------------- PACT

def pact_activation(x, alpha, bits):
    """PACT: y = clip(x, 0, alpha), y_q = round(y n / alpha) alpha / n (thresholds alpha (i - 1/2) / n).

    Gradients (PACT Eq. 3, plain STE): dy_q/dx = 1 for 0 <= x < alpha, else 0;
    dy_q/dalpha = 1 for x >= alpha, else 0. Returns float32.
    """
    n = num_levels(bits)
    fractions = half_step_thresholds(bits)

    @tf.custom_gradient
    def quantize(x, alpha):
        thresholds = alpha * fractions
        step = alpha * tf.constant(1.0 / n, tf.float32)
        y = tf.cast(count_above(x, thresholds), tf.float32) * step

        def grad(g):
            inside = tf.cast((x >= 0.0) & (x < alpha), g.dtype)
            above = tf.cast(x >= alpha, g.dtype)
            return g * inside, tf.reduce_sum(g * above)

        return y, grad

    return quantize(tf.cast(x, tf.float32), _f32(alpha))


def pact_levels(alpha, bits):
    """(thresholds, step) of PACT in input units, computed exactly as the forward does."""
    n = num_levels(bits)
    alpha = _f32(alpha)
    return alpha * half_step_thresholds(bits), alpha * tf.constant(1.0 / n, tf.float32)


# --------------------------------------------------------------------------- LSQ

def lsq_weight_range(bits, signed):
    """(Q_N, Q_P): (2^(b-1), 2^(b-1) - 1) signed, (0, 2^b - 1) unsigned."""
    bits = check_bits(bits)
    if signed:
        if bits < 2:
            raise ValueError("signed LSQ needs at least 2 bits (1 bit would give the levels {-1, 0})")
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def lsq_grad_scale(count, q_p):
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_P) (N: weights of the layer or features)."""
    return tf.math.rsqrt(tf.cast(count, tf.float32) * float(q_p))


def _lsq(v, s, q_n, q_p, g):
    """Shared LSQ op on a float32 v: level count forward, the paper's gradients backward."""
    fractions = tf.constant(np.arange(-q_n, q_p, dtype=np.float64) + 0.5, tf.float32)

    @tf.custom_gradient
    def quantize(v, s):
        # round(clip(v/s, -Q_N, Q_P)) = -Q_N + #{i : v > s (i + 1/2)}, i = -Q_N .. Q_P - 1.
        level = tf.cast(count_above(v, s * fractions), tf.float32) - float(q_n)
        y = level * s

        def grad(g_up):
            ratio = v / s
            inside = (ratio > -q_n) & (ratio < q_p)
            ds = tf.where(inside, level - ratio, tf.where(ratio <= -q_n, -float(q_n), float(q_p)))
            return g_up * tf.cast(inside, g_up.dtype), tf.reduce_sum(g_up * ds) * g

        return y, grad

    return quantize(v, s)


def lsq_activation(x, step, bits, grad_scale=None):
    """Unsigned LSQ activations (Q_N = 0, Q_P = 2^b - 1); ``grad_scale`` defaults to 1/sqrt(N_features Q_P).

    N_features is the number of elements per example (every axis but the first).
    """
    q_n, q_p = lsq_weight_range(bits, signed=False)
    x = tf.cast(x, tf.float32)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(tf.reduce_prod(tf.shape(x)[1:]), q_p)
    return _lsq(x, _f32(step), q_n, q_p, grad_scale)


def lsq_activation_levels(step, bits):
    q_n, q_p = lsq_weight_range(bits, signed=False)
    step = _f32(step)
    return step * tf.constant(np.arange(q_p, dtype=np.float64) + 0.5, tf.float32), step


def lsq_weights(w, step, bits, grad_scale=None):
    """Signed LSQ weights (per-tensor step); ``grad_scale`` defaults to 1/sqrt(N_weights Q_P)."""
    q_n, q_p = lsq_weight_range(bits, signed=True)
    w = tf.cast(w, tf.float32)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(tf.size(w), q_p)
    return _lsq(w, _f32(step), q_n, q_p, grad_scale)


def lsq_weight_codes(w, step, bits):
    """Codes k = round(clip(w/s)) + Q_N in 0..2^b - 1, so w_q = s (k - Q_N) = s (2k - 2^b) / 2."""
    q_n, q_p = lsq_weight_range(bits, signed=True)
    fractions = tf.constant(np.arange(-q_n, q_p, dtype=np.float64) + 0.5, tf.float32)
    return count_above(tf.cast(w, tf.float32), _f32(step) * fractions)


def lsq_init(v, q_p):
    """LSQ's step initialisation 2 mean|v| / sqrt(Q_P)."""
    return 2.0 * tf.reduce_mean(tf.abs(tf.cast(v, tf.float32))) / math.sqrt(q_p)


# --------------------------------------------------------------------------- DAQ

def _daq_scores(frac, sigma):
    """Kernel-weighted similarities s_0, s_1 of the fractional part to the levels 0 and 1.

    phi_i = exp(-|f - q_i|); the Gaussian kernel exp(-(q_i - q_*)^2 / sigma^2) is 1 at the
    nearest level q_* and exp(-1 / sigma^2) at the other (two levels one apart).
    """
    phi0, phi1 = tf.exp(-tf.abs(frac)), tf.exp(-tf.abs(frac - 1.0))
    far = math.exp(-1.0 / sigma ** 2)
    nearest_is_0 = tf.stop_gradient(phi0) >= tf.stop_gradient(phi1)  # argmax, first on ties
    s0 = phi0 * tf.where(nearest_is_0, 1.0, far)
    s1 = phi1 * tf.where(nearest_is_0, far, 1.0)
    return s0, s1


def daq_temperature(frac, temperature, sigma):
    """The temperature controller: beta(f) = T / |s_0(f) - s_1(f)| (an inverse temperature).

    It rescales the softmax so that the gap between the two scaled scores is always T,
    whatever the distance of the input to the levels; it is a constant for the gradient.
    """
    s0, s1 = _daq_scores(tf.cast(frac, tf.float32), sigma)
    return tf.stop_gradient(temperature / tf.maximum(tf.abs(s0 - s1), 1e-12))


def daq_soft_round(r, temperature, sigma):
    """DASR on r in [0, n]: floor(r) + kernel soft argmax over {0, 1} of the fractional part.

    p = softmax(beta (s_0, s_1)) with beta from `daq_temperature`; the levels are rescaled to
    (-c, 1 + c), c = 1 / (exp(T) - 1), so that sum q_i p_i equals the nearest level exactly
    (up to float rounding) while the gradient is that of the soft assignment. floor(r) and
    beta carry no gradient (the authors' code: ``x_floor.detach()``, ``T.detach()``).
    """
    r = tf.cast(r, tf.float32)
    floor = tf.stop_gradient(tf.floor(r))
    frac = r - floor
    s0, s1 = _daq_scores(frac, sigma)
    beta = daq_temperature(tf.stop_gradient(frac), temperature, sigma)
    z0, z1 = beta * s0, beta * s1
    top = tf.maximum(z0, z1)
    e0, e1 = tf.exp(z0 - top), tf.exp(z1 - top)
    c = 1.0 / math.expm1(temperature)
    return floor + ((-c) * e0 + (1.0 + c) * e1) / (e0 + e1)


def _training_flag(training):
    return bool(training) if isinstance(training, (bool, int, type(None))) else training


def daq_activation(x, upper, bits, training, temperature=DAQ_ACT_TEMPERATURE, sigma=DAQ_ACT_SIGMA):
    """DAQ activations on [0, upper] with n = 2^b - 1 levels, output in input units (u/n steps).

    r = n clip(x / u, 0, 1); training: y = u/n * DASR(r) (gradients to x and u by autodiff,
    zero below 0, dy/du = 1 above u); inference: y = u/n * #{x > u (i - 1/2) / n} (hard rounding).
    ``training`` is a Python bool (or a boolean tensor).
    """
    n = num_levels(bits)
    x = tf.cast(x, tf.float32)
    upper = _f32(upper)

    def hard():
        thresholds, step = pact_levels(upper, bits)
        return tf.cast(count_above(x, thresholds), tf.float32) * step

    def soft():
        r = n * tf.clip_by_value(x / upper, 0.0, 1.0)
        return daq_soft_round(r, temperature, sigma) * (upper / n)

    training = _training_flag(training)
    if isinstance(training, bool):
        return soft() if training else hard()
    return tf.cond(training, soft, hard)


def _daq_normalized_codes(w, lower, upper, bits):
    """r = n clip((w_n - l) / (u - l), 0, 1) with w_n = (w - mean) / std (mean, std held constant)."""
    n = num_levels(bits)
    w = tf.cast(w, tf.float32)
    mean = tf.stop_gradient(tf.reduce_mean(w))
    std = tf.stop_gradient(tf.math.reduce_std(w))
    std = tf.where(std > 0, std, 1.0)
    w_n = (w - mean) / std
    r = n * tf.clip_by_value((w_n - lower) / (upper - lower), 0.0, 1.0)
    return r, std


def daq_weight_scale(std, lower, upper):
    """Per-tensor scale back to weight units, std (u - l) / 2 (constant for the gradient)."""
    return tf.stop_gradient(std * (upper - lower) / 2.0)


def daq_weight_codes(w, lower, upper, bits):
    """Hard codes k = round(r) in 0..n and the scale S, with w_q = S (2k - n) / n."""
    r, std = _daq_normalized_codes(tf.stop_gradient(w), _f32(lower), _f32(upper), bits)
    return tf.cast(tf.round(r), tf.int32), daq_weight_scale(std, _f32(lower), _f32(upper))


def daq_weights(w, lower, upper, bits, training, temperature=DAQ_WEIGHT_TEMPERATURE, sigma=DAQ_WEIGHT_SIGMA):
    """DAQ weights: w_n = (w - mean)/std, r on [l, u] (learnable, init -3, 3), w_q = S (2 q(r) - n)/n.

    q = DASR at training, round at inference, as the authors' ``w_soft_quan`` / ``w_quan``;
    S = std (u - l) / 2 maps the normalised levels back to weight units (the authors instead
    scale the conv output by a learned beta; with BatchNorm after the conv that is absorbed).
    """
    n = num_levels(bits)
    lower, upper = _f32(lower), _f32(upper)
    w = tf.cast(w, tf.float32)
    r, std = _daq_normalized_codes(w, lower, upper, bits)
    scale = daq_weight_scale(std, lower, upper)

    def hard():
        codes = tf.cast(tf.round(tf.stop_gradient(r)), tf.int32)
        return scale * tf.gather(symmetric_levels(bits), codes)

    def soft():
        return scale * ((2.0 * daq_soft_round(r, temperature, sigma) - n) / n)

    training = _training_flag(training)
    if isinstance(training, bool):
        return soft() if training else hard()
    return tf.cond(training, soft, hard)


# --------------------------------------------------------------------------- Table 4 weight variants

def noscale_weight_codes(w, bits):
    """Codes of N2UQ's level set with alpha = 1: k = round((clip(w, -1, 1) + 1) n / 2)."""
    n = num_levels(bits)
    return tf.cast(tf.round((tf.clip_by_value(tf.cast(w, tf.float32), -1.0, 1.0) + 1.0) * (n / 2.0)), tf.int32)


def noscale_weights(w, bits):
    """No weight scaling: 2^b symmetric levels (2k - n)/n of [-1, 1]; STE gradient g (no clip mask, as N2UQ)."""
    w = tf.cast(w, tf.float32)
    exact = tf.gather(symmetric_levels(bits), noscale_weight_codes(tf.stop_gradient(w), bits))
    return tf.stop_gradient(exact) + (w - tf.stop_gradient(w))


def learnable_scale_codes(w, alpha, bits):
    """k = round((clip(w / alpha, -1, 1) + 1) n / 2) with a per-channel alpha (broadcastable)."""
    n = num_levels(bits)
    ratio = tf.cast(w, tf.float32) / tf.cast(alpha, tf.float32)
    return tf.cast(tf.round((tf.clip_by_value(ratio, -1.0, 1.0) + 1.0) * (n / 2.0)), tf.int32)


def learnable_scale_init(w, bits, channel_axis=-1):
    """The learnable scale's start, n mean|W_c| / sqrt(2^(b-1)) per channel (at least 1e-8).

    LSQ's 2 mean|w| / sqrt(Q_P) in steps of 2 alpha / n, with Q_P = 2^(b-1) positive levels.
    """
    w = tf.cast(w, tf.float32)
    axes = channel_axes(w.shape.rank, channel_axis)
    n = num_levels(bits)
    mean = tf.reduce_mean(tf.abs(w), axis=axes, keepdims=True)
    return tf.maximum(mean * (n / math.sqrt(2 ** (bits - 1))), 1e-8)


@tf.autograph.experimental.do_not_convert
def learnable_scale_grad_scale(w, channel_axis, bits):
    """1 / sqrt(N_c * 2^(b-1)): LSQ's g with N the weights per channel and Q_P the positive levels."""
    w = tf.convert_to_tensor(w)
    axes = channel_axes(w.shape.rank, channel_axis)
    per_channel = int(np.prod([w.shape[a] for a in axes])) if axes else 1
    return 1.0 / math.sqrt(per_channel * 2 ** (check_bits(bits) - 1))


def learnable_scale_weights(w, alpha, bits, channel_axis=-1, grad_scale=None):
    """w_q = alpha_c (2k - n)/n, alpha_c learnable per output channel.

    Gradients, LSQ-style: dw = g where |w/alpha| < 1 (0 where clipped); dalpha_c = grad_scale *
    sum over the channel of g * (q - w/alpha) inside, g * sign(w) outside, q = (2k - n)/n.
    """
    w = tf.cast(w, tf.float32)
    axes = channel_axes(w.shape.rank, channel_axis)
    if grad_scale is None:
        grad_scale = learnable_scale_grad_scale(w, channel_axis, bits)
    table = symmetric_levels(bits)

    @tf.custom_gradient
    def quantize(w, alpha):
        level = tf.gather(table, learnable_scale_codes(w, alpha, bits))
        y = alpha * level

        def grad(g):
            ratio = w / alpha
            inside = tf.abs(ratio) < 1.0
            d_alpha = tf.where(inside, level - ratio, tf.sign(ratio))
            return (g * tf.cast(inside, g.dtype),
                    tf.reduce_sum(g * d_alpha, axis=axes, keepdims=True) * grad_scale)

        return y, grad

    return quantize(w, tf.cast(alpha, tf.float32))
