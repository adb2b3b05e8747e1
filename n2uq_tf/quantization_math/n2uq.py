"""The N2UQ math: activation and weight quantizers with their training gradients.

Pure TensorFlow, no Keras. This module is the single source of truth for the
quantization semantics (Liu et al., "Nonuniform-to-Uniform Quantization",
CVPR 2022, and the official implementation); the Keras layers, the fused
training kernel and the TFLite kernels are all tested against it.

Activation quantizer, ``n = 2**bits - 1`` levels above zero, ``delta = 2 / n``:

* ``xs = beta1 * x``; intervals are floored, ``a' = where(a > 1e-3, a, 1e-3)``;
* segment bounds ``d_0 = s``, ``d_i = s + sum_{j<=i} a'_j``;
* forward: ``level = #{i : xs > T_i}`` with ``T_i = d_{i-1} + a'_i / 2`` (the
  segment midpoints), output ``level * beta2 * delta`` (uniform levels);
* backward (generalized straight-through estimator): the gradient of the
  piecewise-linear surrogate ``beta2 * delta * ((i - 1) + (xs - d_{i-1}) / a'_i)``
  on segment ``i``, flat below ``d_0`` and above ``d_n``; ``beta2`` gets the
  gradient of the forward output, ``delta * level``.

Weight quantizer: ``alpha = gamma * mean|W|`` per output channel with
``gamma = (2**b - 1) / 2**(b - 1)`` (entropy-preserving scale), ``2**b``
symmetric levels ``alpha * (2k/n - 1)``, straight-through gradient ``g / alpha``.

Two implementations of the activation quantizer compute the same thing (see
`active_implementation`): "reference", pure TensorFlow with static shapes only, which
runs on every device and compiles with XLA (``tf.function(jit_compile=True)``), and
"fused", a C++ CPU kernel (n2uq_tf/kernels) that does the work in one pass each way
and is what ``implementation="auto"`` picks on a CPU outside XLA.
"""

import tensorflow as tf
# TensorFlow's own test for "this graph will be compiled by XLA" (what Keras uses too);
# there is no public equivalent.
from tensorflow.python.ops import control_flow_util

# MIN_BITS, MAX_BITS, check_bits and num_levels are shared with the baselines and public here.
from n2uq_tf.quantization_math._common import (  # noqa: F401
    COMPARE_LIMIT, MAX_BITS, MIN_BITS, channel_axes, check_bits, count_less, num_levels, symmetric_levels)

# Intervals at or below this are floored (a `where`, so a floored interval gets
# no gradient), as in the official code.
INTERVAL_FLOOR = 1e-3
IMPLEMENTATIONS = ("auto", "fused", "reference")

__all__ = [
    "check_bits",
    "num_levels",
    "level_step",
    "weight_gamma",
    "segment_bounds",
    "activation_levels",
    "n2uq_quantize",
    "active_implementation",
    "weight_scale",
    "weight_codes",
    "quantize_weights",
]


def level_step(bits):
    """delta = 2 / n: the activation output step (outputs span [0, 2] * beta2)."""
    return 2.0 / num_levels(bits)


def weight_gamma(bits):
    """Entropy-preserving weight scale factor gamma = (2**b - 1) / 2**(b - 1)."""
    return num_levels(bits) / 2.0 ** (check_bits(bits) - 1)


def segment_bounds(start, intervals):
    """Floored intervals, segment bounds d_0..d_n and forward thresholds T_1..T_n.

    Returns ``(a, bounds, thresholds)`` as float32 tensors of shapes [n], [n + 1], [n].
    """
    start = tf.cast(tf.reshape(start, []), tf.float32)
    intervals = tf.cast(intervals, tf.float32)
    a = tf.where(intervals > INTERVAL_FLOOR, intervals, tf.constant(INTERVAL_FLOOR, tf.float32))
    bounds = start + tf.concat([tf.zeros([1], tf.float32), tf.cumsum(a)], axis=0)
    thresholds = bounds[:-1] + a * 0.5
    return a, bounds, thresholds


def activation_levels(x, start, intervals, beta1, bits):
    """Integer activation codes m in {0..n} (int32) that the quantizer outputs as m * beta2 * delta."""
    num_levels(bits)
    _, _, thresholds = segment_bounds(start, intervals)
    xs = tf.cast(x, tf.float32) * tf.cast(tf.reshape(beta1, []), tf.float32)
    return count_less(thresholds, xs)


# The G-STE backward. On segment i the surrogate is u_i(xs) = beta2 * delta * ((i-1) + (xs - d_{i-1}) / a'_i),
# with slope_i = beta2 * delta / a'_i, so for an element in segment i (d_{i-1} < xs <= d_i):
#   du/dxs = slope_i,  du/ds = -slope_i,  du/dbeta1 = slope_i * x_in,
#   du/da'_j = -slope_i * clip((xs - d_{j-1}) / a'_j, 0, 1)   (-slope_i for j < i, 0 for j > i),
# and elements outside [d_0, d_n] get nothing; beta2 gets the forward's delta * level. With upstream g
# and gs = g * slope (0 outside), the parameter gradients are the sums over all elements
#   start: -sum(gs),  a'_j: -sum(gs * clip(...)) (the "interval sums"),  beta1: sum(gs * x_in),
#   beta2: delta * sum(g * level).
# Grouped by segment (the fused kernel's form): interval sum_j = slope_j * offset_j / a'_j
# + sum_{i > j} slope_i * count_i, with count_i = sum(g) and offset_i = sum(g * (xs - d_{i-1})) over segment i.

def _parameter_gradients(interval_sums, slope_sum, beta1_sum, level_sum, raw_intervals, delta):
    """Gradients to start, intervals, beta1, beta2 from the sums above (float32 or float64) as float32.

    A stored interval at or below the floor gets no gradient (the floor is a `where`).
    """
    grad_intervals = tf.where(raw_intervals > INTERVAL_FLOOR, -tf.cast(interval_sums, tf.float32), 0.0)
    grad_beta2 = tf.cast(delta, level_sum.dtype) * level_sum
    return (-tf.cast(slope_sum, tf.float32), grad_intervals, tf.cast(beta1_sum, tf.float32),
            tf.cast(grad_beta2, tf.float32))


def _interval_sums_from_segments(count, offset, a, slopes):
    """The interval sums from per-segment sums of g and of g * (xs - d_{i-1}) (see above), in their dtype."""
    a, slopes = tf.cast(a, count.dtype), tf.cast(slopes, count.dtype)
    weighted = slopes * count
    return slopes * offset / a + tf.cumsum(weighted, exclusive=True, reverse=True), tf.reduce_sum(weighted)


def _gste_backward(g, x, xs, bounds, a, slopes):
    """``(g * slope, interval sums, sum(g * slope), sum(g * slope * x))`` with static shapes only (XLA).

    Up to COMPARE_LIMIT segments every sum is an elementwise expression of compares and selects
    feeding one reduction, which XLA fuses into one loop (no gather: that is the slow part under
    XLA on CPU). Above it, the segment index comes from a binary search and the per-segment sums
    from `unsorted_segment_sum` with a constant segment count, whose cost does not grow with n.
    NaN and elements outside [d_0, d_n] are in no segment (an infinite x adds nothing, not 0 * inf).
    """
    n = int(slopes.shape[0])
    zero = tf.zeros_like(xs)
    if n <= COMPARE_LIMIT:
        above = [xs > bounds[j] for j in range(n + 1)]  # segment i: above[i-1] and not above[i]
        slope_of = zero
        for i in range(n):
            slope_of = tf.where(above[i], slopes[i], slope_of)
        slope_of = tf.where(above[n], zero, slope_of)
        grad_xs = g * slope_of
        # clip((xs - d_{j-1}) / a'_j, 0, 1) as selects: 1 above d_j, the fraction inside segment j, else 0.
        interval_sums = tf.stack([
            tf.reduce_sum(tf.where(above[j], grad_xs, tf.where(above[j - 1], grad_xs * (xs - bounds[j - 1]) / a[j - 1],
                                                                 zero)))
            for j in range(1, n + 1)])
        slope_sum = tf.reduce_sum(grad_xs)
        in_range = above[0] & ~above[n]
    else:
        k = count_less(bounds, xs)  # segment k for 1 <= k <= n; 0 below d_0 and n + 1 above d_n
        pad = tf.zeros([1], tf.float32)
        slope_of = tf.gather(tf.concat([pad, slopes, pad], 0), k)
        lower_of = tf.gather(tf.concat([pad, bounds[:-1], pad], 0), k)
        in_range = (k > 0) & (k <= n)
        grad_xs = g * slope_of
        terms = tf.stack([tf.reshape(g, [-1]), tf.reshape(tf.where(in_range, g * (xs - lower_of), zero), [-1])], 1)
        sums = tf.math.unsorted_segment_sum(terms, tf.reshape(k, [-1]), num_segments=n + 2)  # bins 0, n + 1: outside
        interval_sums, slope_sum = _interval_sums_from_segments(sums[1:n + 1, 0], sums[1:n + 1, 1], a, slopes)
    return grad_xs, interval_sums, slope_sum, tf.reduce_sum(tf.where(in_range, grad_xs * x, zero))


def _reference_quantize(x, start, intervals, beta1, beta2, bits):
    """Pure-TF forward and G-STE backward (float32 in, float32 out); compiles with XLA."""
    delta = level_step(bits)

    @tf.custom_gradient
    def quantize(x, start, intervals, beta1, beta2):
        a, bounds, thresholds = segment_bounds(start, intervals)
        scale = beta2 * delta
        level = tf.cast(count_less(thresholds, x * beta1), tf.float32)
        y = level * scale

        def grad(g):
            # xs and level are recomputed rather than kept from the forward: under XLA this
            # fuses into the backward's loops, and no activation-sized tensor is held between passes.
            xs = x * beta1
            grad_xs, interval_sums, slope_sum, beta1_sum = _gste_backward(g, x, xs, bounds, a, scale / a)
            level_sum = tf.reduce_sum(g * tf.cast(count_less(thresholds, xs), tf.float32))
            return (grad_xs * beta1,) + _parameter_gradients(interval_sums, slope_sum, beta1_sum, level_sum,
                                                             intervals, delta)

        return y, grad

    return quantize(x, start, intervals, beta1, beta2)


def _fused_quantize(x, start, intervals, beta1, beta2, bits, kernels):
    """Same contract as `_reference_quantize`, one pass forward and one backward in C++ (CPU only, no XLA)."""
    delta = level_step(bits)

    @tf.custom_gradient
    def quantize(x, start, intervals, beta1, beta2):
        a, bounds, thresholds = segment_bounds(start, intervals)
        scale = beta2 * delta
        y = kernels.n2uq_quantize_forward(x, thresholds, beta1, scale)

        def grad(g):
            slopes = scale / a
            # float64 per-segment sums: count, offset and sum(g * x_in) of each segment
            grad_x, sums, level_sum = kernels.n2uq_quantize_backward(g, x, bounds, thresholds, beta1, slopes)
            interval_sums, slope_sum = _interval_sums_from_segments(sums[0], sums[1], a, slopes)
            beta1_sum = tf.reduce_sum(tf.cast(slopes, tf.float64) * sums[2])
            return (grad_x,) + _parameter_gradients(interval_sums, slope_sum, beta1_sum, level_sum, intervals, delta)

        return y, grad

    return quantize(x, start, intervals, beta1, beta2)


def _fused_kernels():
    try:
        from n2uq_tf import _fused
    except ImportError:
        return None
    return _fused.load()


def _writing_saved_model():
    try:
        from n2uq_tf import _fused
    except ImportError:
        return False
    return _fused.writing_saved_model()


def in_xla_context():
    """True while tracing a function that XLA compiles (``tf.function(jit_compile=True)``, a
    Keras model compiled with ``jit_compile=True``, TPU replication), outer functions included."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _accelerators_visible():
    """Whether TensorFlow sees a device other than the CPU (where unplaced ops then go)."""
    return any(d.device_type != "CPU" for d in tf.config.list_logical_devices())


def _device_type(device):
    """'CPU', 'GPU', 'TPU', ... for a device string; an unnamed type is where TF's placer puts
    ops that have kernels everywhere: an accelerator when one is visible, else the CPU."""
    kind = tf.DeviceSpec.from_string(device or "").device_type
    if kind:
        return kind.upper()
    return "GPU" if _accelerators_visible() else "CPU"


def _current_device():
    """The device that an op created here is meant for (graph: the device scope; eager: where it runs)."""
    return tf.identity(tf.zeros([])).device


def active_implementation(implementation="auto", *, jit_compile=None, device=None):
    """Which path `n2uq_quantize(..., implementation=implementation)` takes: 'fused' or 'reference'.

    "auto" picks the fused C++ kernel only where it belongs: it is loaded (a compiler was
    found, ``N2UQ_TF_DISABLE_FUSED`` is not 1), the code is not compiled by XLA (the kernel has
    no XLA lowering) and the op is meant for the CPU (the kernel is CPU-only: in a GPU/TPU step
    it would cost two host transfers per quantizer), and no SavedModel is being written (the file
    must not depend on our op library). Everywhere else it picks "reference".

    By default the context answers: the tf.function being traced (its XLA setting) and the
    device scope. ``jit_compile`` and ``device`` (e.g. "/GPU:0") ask about another context,
    e.g. ``active_implementation(jit_compile=model.jit_compile)`` for a compiled Keras model.
    Raises ValueError for an unknown name, or for "fused" under XLA.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                         f"got {implementation!r}")
    xla = in_xla_context() if jit_compile is None else bool(jit_compile)
    if implementation == "fused" and xla:
        raise ValueError("implementation='fused' cannot run under XLA (jit_compile=True): the fused kernel has "
                         "no XLA lowering; use implementation='auto' or 'reference'")
    if implementation == "reference":
        return "reference"
    if implementation == "fused":
        if _fused_kernels() is None:
            raise RuntimeError("the fused N2UQ kernel is not available (N2UQ_TF_DISABLE_FUSED=1, or see the "
                               "warning from n2uq_tf._fused)")
        return "fused"
    # While a SavedModel is written "auto" keeps to TensorFlow's own ops: the file must load and
    # serve where our op library is not loaded (a fresh process, TF Serving, N2UQ_TF_DISABLE_FUSED=1).
    if xla or _fused_kernels() is None or _writing_saved_model():
        return "reference"
    return "fused" if _device_type(_current_device() if device is None else device) == "CPU" else "reference"


def n2uq_quantize(x, start, intervals, beta1, beta2, bits, *, implementation="auto"):
    """N2UQ activation quantizer (forward levels, G-STE gradients).

    Args:
      x: input tensor of any rank; float32, or float16/bfloat16 (computed in float32,
        returned in the input dtype).
      start: scalar, the lower bound ``s`` of the first segment.
      intervals: [n] segment lengths ``a`` (floored at 1e-3).
      beta1, beta2: scalar input and output scales.
      bits: 1..8.
      implementation: "auto" (the fused C++ kernel on a CPU outside XLA when it is available,
        except while a SavedModel is written; see `active_implementation`), "fused" or "reference".

    Returns:
      ``beta2 * (2 / n) * level`` in the dtype of ``x``.
    """
    n = num_levels(bits)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                         f"got {implementation!r}")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(f"n2uq_quantize needs a floating-point input, got {x.dtype.name}")
    intervals = tf.cast(intervals, tf.float32)  # reads a Variable; the gradient still reaches it
    if intervals.shape.rank != 1 or intervals.shape[0] != n:
        raise ValueError(f"intervals must have shape [{n}] for bits={bits}, got {intervals.shape}")
    start, beta1, beta2 = [tf.cast(tf.reshape(p, []), tf.float32) for p in (start, beta1, beta2)]
    x32 = tf.cast(x, tf.float32)
    # `start` was made by an op just now, so its device is that of this scope (see active_implementation).
    if active_implementation(implementation, device=start.device if implementation == "auto" else None) == "fused":
        y = _fused_quantize(x32, start, intervals, beta1, beta2, bits, _fused_kernels())
    else:
        y = _reference_quantize(x32, start, intervals, beta1, beta2, bits)
    return tf.cast(y, x.dtype)


def weight_scale(w, bits, channel_axis=-1):
    """alpha = gamma * mean(|W|) over every axis but the output-channel axis (keepdims)."""
    gamma = weight_gamma(bits)
    w = tf.convert_to_tensor(w)
    reduce_axes = channel_axes(w.shape.rank, channel_axis)
    return gamma * tf.reduce_mean(tf.abs(w), axis=reduce_axes, keepdims=True)


def weight_codes(w, bits, channel_axis=-1):
    """Integer weight codes k in {0..n} (int32) and alpha, with W_q = alpha * (2k/n - 1).

    An all-zero channel has alpha = 0; its codes are meaningless and its W_q is 0.
    """
    n = num_levels(bits)
    w = tf.convert_to_tensor(w)
    alpha = weight_scale(w, bits, channel_axis)
    safe_alpha = tf.where(alpha > 0, alpha, tf.ones_like(alpha))
    clipped = tf.clip_by_value(w / safe_alpha, -1.0, 1.0)
    codes = tf.round((clipped + 1.0) * (n / 2.0))
    return tf.cast(codes, tf.int32), alpha


def quantize_weights(w, bits, channel_axis=-1):
    """Entropy-preserving weight quantizer with the straight-through gradient g / alpha.

    ``channel_axis`` is the output-channel axis (-1 for Conv2D and Dense kernels) or a
    tuple of axes kept separate (``(-2, -1)`` for a DepthwiseConv2D kernel, one scale per
    depthwise output channel).
    """
    check_bits(bits)
    w = tf.convert_to_tensor(w)
    if not w.dtype.is_floating:
        raise TypeError(f"quantize_weights needs a floating-point weight, got {w.dtype.name}")
    channel_axes(w.shape.rank, channel_axis)
    dtype = w.dtype

    @tf.custom_gradient
    def quantize(w):
        codes, alpha = weight_codes(tf.stop_gradient(w), bits, channel_axis)
        alpha = tf.stop_gradient(alpha)
        nonzero = alpha > 0
        levels = tf.gather(symmetric_levels(bits), codes)  # 2k/n - 1, correctly rounded (see there)
        wq = tf.where(nonzero, alpha * levels, tf.zeros_like(w))

        def grad(g):
            return g / tf.where(nonzero, alpha, tf.ones_like(alpha))

        return wq, grad

    # Computed in float32 so that float16 kernels under mixed precision get the same levels.
    return tf.cast(quantize(tf.cast(w, tf.float32)), dtype)
