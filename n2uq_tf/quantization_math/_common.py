"""What the N2UQ quantizers (`n2uq`) and the literature baselines (`baselines`) share.

Bit-width checks and level counts, the threshold count that every activation quantizer's
forward is (``#{i : x > T_i}``, also what the exported quantize op computes), the symmetric
weight-level table, and the per-channel reduction axes. Private to this folder: the public
names are re-exported by `n2uq` (``check_bits``, ``num_levels``, ...).
"""

import numbers

import tensorflow as tf

MIN_BITS, MAX_BITS = 1, 8
# Up to this many thresholds (4 bits), levels and segments are found by one elementwise
# compare per threshold, which XLA fuses into a single pass with no gather; above it, by
# a binary search (searchsorted) and index-based segment sums, whose cost does not grow with n.
COMPARE_LIMIT = 16


def check_bits(bits, what="bits"):
    """Returns ``bits`` as an int after checking it is an integer in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def num_levels(bits):
    """n = 2**bits - 1: the number of quantization steps above the lowest level."""
    return 2 ** check_bits(bits) - 1


def count_less(sorted_values, xs):
    """Per element of ``xs``, the number of ``sorted_values`` strictly below it (int32)."""
    n = int(sorted_values.shape[0])
    if n <= COMPARE_LIMIT:
        return tf.add_n([tf.cast(xs > sorted_values[i], tf.int32) for i in range(n)])
    flat = tf.reshape(xs, [1, -1])
    counts = tf.searchsorted(sorted_values[tf.newaxis], flat, side="left", out_type=tf.int32)
    return tf.reshape(counts, tf.shape(xs))


def symmetric_levels(bits):
    """(2k - n) / n for k = 0..n as a float32 constant, each value correctly rounded.

    Looked up rather than computed as ``k * 2.0 / n - 1``: Grappler's constant folding turns
    that into ``k * (2/n) - 1`` in graphs only, and graph and eager results would differ in the
    last bits.
    """
    n = num_levels(bits)
    return tf.constant([(2 * k - n) / n for k in range(n + 1)], tf.float32)


def channel_axes(rank, channel_axis):
    """The axes to reduce over for per-channel statistics: every axis but ``channel_axis``
    (an int or a tuple of ints kept separate), checked against ``rank``."""
    axes = channel_axis if isinstance(channel_axis, (tuple, list)) else (channel_axis,)
    keep = set()
    for axis in axes:
        if not -rank <= axis < rank:
            raise ValueError(f"channel_axis {channel_axis!r} is out of range for a weight of rank {rank}")
        keep.add(axis % rank)
    return [i for i in range(rank) if i not in keep]
