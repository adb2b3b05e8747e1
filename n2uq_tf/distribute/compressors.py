"""Gradient compressors for data-parallel SGD: NUQSGD, QSGD, QSGDinf (and "none").

One source of truth for the math; the optimizer hook (`optimizer.py`) only moves bytes.

A gradient vector is cut into buckets of `bucket_size` values. Each bucket is divided by its
norm (L2 for nuqsgd and qsgd, max |v| for qsgdinf), so every r_i = |v_i| / norm lies in [0, 1].
r_i is rounded at random to one of its two neighbouring magnitude levels l_j <= r_i <= l_{j+1},
up with probability p = (r_i - l_j) / (l_{j+1} - l_j): E[level] = r_i, so the decoded
sign * norm * level is an unbiased estimate of v_i, with variance norm^2 (l_{j+1} - r)(r - l_j).

With b bits a code is (sign << (b - 1)) | level index, so there are 2^(b-1) magnitude levels:
- nuqsgd (Ramezani-Kebrya et al., arXiv 1908.06077): {0, 2^(1-K), ..., 1/4, 1/2, 1}, K = 2^(b-1) - 1.
  Normalised gradients crowd near 0, where exponential levels are dense: lower variance.
- qsgd (Alistarh et al., 2017): {0, 1/s, ..., 1}, s = 2^(b-1) - 1, L2 norm.
- qsgdinf: the same uniform levels, max-abs norm.
Codes are bit-packed 32 / b to an int32 word; the norms travel as float32 beside them.

Non-finite values (what the float all-reduce does with them, and nothing more). A NaN or +/-Inf
gradient value must reach the sum at its own position, as the float exchange carries it, without
spoiling the rest of its bucket. It takes no part in the bucket's norm and is sent as the marker
code: the "negative zero" code (sign bit set, level 0), otherwise never needed. A bucket holding
markers says so by the sign bit of its norm word (a norm is never negative), and in such a bucket
a negative value that rounds to level 0 is sent as +0, so the marker is unambiguous; buckets of
finite values are coded exactly as before. Which non-finite value a marker stands for (NaN, +Inf
or -Inf) travels in a side list after the norms: 2 bits for each of the payload's first
NONFINITE_KINDS markers, in position order (4 words, 16 bytes a payload). Markers past those
decode as NaN: still non-finite and at their positions, only an Inf among them loses its kind.
Decoded payloads are summed as floats, so NaN + x = NaN, Inf + finite = Inf and Inf - Inf = NaN,
as in the float exchange.

Huge finite values: the L2 norm is summed in float64 (no overflow) and, where it exceeds the
largest float32, clamped to it. Any norm >= max |v| keeps the rounding unbiased (r <= 1), and
with this one every decoded value level * norm stays a finite float32.
"""

import dataclasses

import numpy as np
import tensorflow as tf

SUPPORTED_BITS = (2, 4, 8)  # b divides 32: codes never straddle a word
DEFAULT_BUCKET_SIZE = 8192  # the paper's runs
# 2 bits diverged with 8192-value buckets and trained with 128 (measured on a small MLP: see benchmarks/DISTRIBUTED.md)
SMALL_BITS_BUCKET_SIZE = 128
# The side list of non-finite kinds: 2-bit codes, 16 to a word, for a payload's first 64 markers.
NONFINITE_KINDS = 64
NONFINITE_WORDS = NONFINITE_KINDS * 2 // 32
# Kind code -> value (3 is never sent; it reads as NaN).
NONFINITE_VALUES = np.float32([np.nan, np.inf, -np.inf, np.nan])
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def nuqsgd_levels(bits):
    k = 2 ** (bits - 1) - 1
    return np.concatenate([[0.0], 2.0 ** np.arange(1 - k, 1)])


def uniform_levels(bits):
    s = 2 ** (bits - 1) - 1
    return np.arange(s + 1) / s


# The table of compressors: level set and bucket norm. "none" is the framework's own float all-reduce.
COMPRESSORS = {
    "none": None,
    "nuqsgd": (nuqsgd_levels, "l2"),
    "qsgd": (uniform_levels, "l2"),
    "qsgdinf": (uniform_levels, "max"),
}


@dataclasses.dataclass(frozen=True)
class GradientCompression:
    """Which compressor, how many bits per value, how many values share a norm, and the noise seed.

    bucket_size=None picks 8192 (the paper's) at 4 and 8 bits and 128 at 2 bits.
    """

    method: str = "nuqsgd"
    bits: int = 4
    bucket_size: int = None
    seed: int = 0

    def __post_init__(self):
        method = self.method.lower() if isinstance(self.method, str) else self.method
        if method not in COMPRESSORS:
            raise ValueError(f"compression method must be one of {sorted(COMPRESSORS)}, got {self.method!r}")
        object.__setattr__(self, "method", method)
        if (not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool)
                or self.bits not in SUPPORTED_BITS):
            raise ValueError(f"compression bits must be one of {SUPPORTED_BITS} (codes are packed 32 / bits "
                             f"to an int32 word), got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        bucket_size = self.bucket_size
        if bucket_size is None:
            bucket_size = SMALL_BITS_BUCKET_SIZE if self.bits == 2 else DEFAULT_BUCKET_SIZE
        if (isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer))
                or bucket_size <= 0 or bucket_size % self.codes_per_word):
            raise ValueError(f"compression bucket_size must be a positive multiple of {self.codes_per_word} "
                             f"(codes per 32-bit word at {self.bits} bits), got {self.bucket_size!r}")
        object.__setattr__(self, "bucket_size", int(bucket_size))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"compression seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def enabled(self):
        return self.method != "none"

    @property
    def codes_per_word(self):
        return 32 // self.bits

    @property
    def norm(self):
        return COMPRESSORS[self.method][1] if self.enabled else None

    def levels(self):
        """The 2^(bits-1) magnitude levels in [0, 1], ascending (float32)."""
        if not self.enabled:
            raise ValueError("compression method 'none' has no levels")
        return COMPRESSORS[self.method][0](self.bits).astype(np.float32)

    def signed_levels(self):
        """Decode table indexed by code: (-1)^sign * levels[index] (float32, 2^bits entries)."""
        levels = self.levels()
        return np.concatenate([levels, -levels]).astype(np.float32)

    @property
    def marker_code(self):
        """The code of a non-finite value: sign bit set, level 0 ("negative zero")."""
        return 1 << (self.bits - 1)

    def code_words(self, num_buckets):
        """32-bit words of the packed codes of num_buckets buckets."""
        return num_buckets * self.bucket_size // self.codes_per_word

    def payload_words(self, num_buckets):
        """32-bit words one replica sends for num_buckets buckets: packed codes, one norm per bucket,
        then the NONFINITE_WORDS of the non-finite side list."""
        return self.code_words(num_buckets) + num_buckets + NONFINITE_WORDS

    def get_config(self):
        return dataclasses.asdict(self)


def bucket_norms(buckets, norm):
    """Per-bucket norm of [num_buckets, bucket_size] finite float32 values: 'l2' or 'max' (max |v|).

    The L2 norm is clamped to the largest float32 (see the module docstring).
    """
    if norm != "l2":
        return tf.reduce_max(tf.abs(buckets), axis=1)
    # In float64: float32 squares overflow beyond ~1e19 and flush to zero below ~1e-19, where the
    # float exchange would carry the values unchanged; float64 squares of float32 values are exact,
    # and a bucket of them sums far below float64's range.
    wide = tf.cast(buckets, tf.float64)
    l2 = tf.sqrt(tf.reduce_sum(tf.square(wide), axis=1))
    return tf.cast(tf.minimum(l2, _FLOAT32_MAX), tf.float32)


def _lower_level_index(ratio, compression):
    """The j with levels[j] <= ratio < levels[j+1], clamped to [0, L-2] (so ratio 1.0 gives L-2)."""
    top = 2 ** (compression.bits - 1) - 2  # L - 2
    if compression.method == "nuqsgd":
        # levels[j] = 2^(j-K) for j >= 1: j = floor(log2 ratio) + K, read exactly from the float's
        # exponent field (ratio <= 1, so the field is <= 127; zero and subnormals give j <= 0).
        k = top + 1
        exponent = tf.bitwise.right_shift(tf.bitcast(ratio, tf.int32), 23) - 127
        return tf.clip_by_value(exponent + k, 0, top)
    # Uniform levels j / s: floor(ratio * s), then one step of correction against the float32 table
    # (ratio * s can round across a level).
    s = top + 1
    levels = tf.constant(compression.levels())
    index = tf.clip_by_value(tf.cast(tf.floor(ratio * s), tf.int32), 0, top)
    index -= tf.cast(tf.gather(levels, index) > ratio, tf.int32)
    index += tf.cast((tf.gather(levels, index + 1) <= ratio) & (index < top), tf.int32)
    return index


def quantize_buckets(buckets, compression, uniform):
    """Codes and norms of [num_buckets, bucket_size] float32 buckets, given U[0,1) draws of that shape.

    Returns (codes int32 in [0, 2^bits), norms float32 [num_buckets]). A bucket of zeros gets norm 0
    and codes 0. Non-finite values get the marker code and their bucket's norm is negated (its sign
    bit set, -0.0 for a zero norm): see the module docstring.
    """
    buckets = tf.convert_to_tensor(buckets, tf.float32)
    finite = tf.math.is_finite(buckets)
    values = tf.where(finite, buckets, tf.zeros_like(buckets))
    norms = bucket_norms(values, compression.norm)
    safe_norms = tf.where(norms > 0, norms, tf.ones_like(norms))
    # |v| <= norm in exact arithmetic; float rounding may put a lone value a hair above 1.
    ratio = tf.minimum(tf.abs(values) / safe_norms[:, None], 1.0)
    levels = tf.constant(compression.levels())
    lower = _lower_level_index(ratio, compression)
    low, high = tf.gather(levels, lower), tf.gather(levels, lower + 1)
    round_up = uniform < (ratio - low) / (high - low)
    index = lower + tf.cast(round_up, tf.int32)
    marked = tf.reduce_any(~finite, axis=1, keepdims=True)  # buckets that hold markers
    negative = (values < 0) & ~(marked & (index == 0))  # there, a value rounded to 0 is sent as +0
    codes = tf.bitwise.bitwise_or(index, tf.bitwise.left_shift(tf.cast(negative, tf.int32), compression.bits - 1))
    codes = tf.where(finite, codes, compression.marker_code)
    return codes, tf.where(marked[:, 0], -norms, norms)


def dequantize_buckets(codes, norms, compression):
    """float32 values of [..., num_buckets, bucket_size] codes with [..., num_buckets] norms.

    Markers (in buckets whose norm has its sign bit set) decode as NaN; `decode` then gives the
    side list's infinities their places.
    """
    table = tf.constant(compression.signed_levels())
    marked = tf.bitcast(norms, tf.int32) < 0  # the sign bit, also of -0.0
    values = tf.gather(table, codes) * tf.abs(norms)[..., None]
    return tf.where(marked[..., None] & (codes == compression.marker_code), tf.constant(np.nan, tf.float32), values)


def pack_codes(codes, bits):
    """int32 words of b-bit codes (count a multiple of 32 / b): code i of a word sits at bits b*i."""
    per_word = 32 // bits
    groups = tf.reshape(tf.cast(codes, tf.uint32), [-1, per_word])
    word = groups[:, 0]
    for i in range(1, per_word):
        word = tf.bitwise.bitwise_or(word, tf.bitwise.left_shift(groups[:, i], tf.constant(bits * i, tf.uint32)))
    return tf.bitcast(word, tf.int32)


def unpack_codes(words, bits):
    """int32 codes of packed words ([..., n] -> [..., n * 32 / b]); inverse of pack_codes."""
    per_word = 32 // bits
    words = tf.bitcast(tf.convert_to_tensor(words, tf.int32), tf.uint32)
    mask = tf.constant(2 ** bits - 1, tf.uint32)
    parts = [tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, tf.constant(bits * i, tf.uint32)), mask)
             for i in range(per_word)]
    codes = tf.stack(parts, axis=-1)
    shape = tf.concat([tf.shape(words)[:-1], [-1]], axis=0)
    return tf.cast(tf.reshape(codes, shape), tf.int32)


def nonfinite_kinds(buckets):
    """The side list of buckets' non-finite values: int32 [NONFINITE_WORDS].

    2-bit kind codes (0 NaN, 1 +Inf, 2 -Inf) of the first NONFINITE_KINDS non-finite values in
    position order, packed like the codes; unused slots are 0.
    """
    flat = tf.reshape(tf.convert_to_tensor(buckets, tf.float32), [-1])
    positions = tf.where(~tf.math.is_finite(flat))[:NONFINITE_KINDS, 0]
    values = tf.gather(flat, positions)
    kinds = tf.where(values > 0, 1, tf.where(values < 0, 2, 0))  # NaN compares false both ways
    kinds = tf.pad(kinds, [[0, NONFINITE_KINDS - tf.size(kinds)]])
    return tf.ensure_shape(pack_codes(kinds, 2), [NONFINITE_WORDS])


def restore_infinities(values, side_lists):
    """values [..., n] with NaN at every marker, and their payloads' side lists [..., NONFINITE_WORDS]:
    the values with each listed marker set to its kind (rows of the leading axes apart)."""
    n = tf.shape(values)[-1]
    rows = tf.reshape(values, [-1, n])
    kinds = tf.reshape(unpack_codes(side_lists, 2), [-1, NONFINITE_KINDS])
    marked = tf.where(tf.math.is_nan(rows))  # [k, 2]: (row, position), in row-major order
    row = marked[:, 0]
    rank = tf.range(tf.shape(marked, out_type=tf.int64)[0]) - tf.searchsorted(row, row, side="left", out_type=tf.int64)
    listed = rank < NONFINITE_KINDS
    kind = tf.gather_nd(kinds, tf.stack([row, tf.minimum(rank, NONFINITE_KINDS - 1)], axis=1))
    kind = tf.where(listed, kind, 0)
    restored = tf.tensor_scatter_nd_update(rows, marked, tf.gather(tf.constant(NONFINITE_VALUES), kind))
    return tf.reshape(restored, tf.shape(values))


def _any_marked(norm_words):
    return tf.reduce_any(norm_words < 0)  # a norm's sign bit, read on its int32 word


def encode(buckets, compression, seed):
    """One replica's payload for [num_buckets, bucket_size] buckets: int32 [payload_words].

    seed: int32/int64 [2] for tf.random.stateless_uniform; the rounding noise is a function of it.
    """
    buckets = tf.convert_to_tensor(buckets, tf.float32)
    uniform = tf.random.stateless_uniform(tf.shape(buckets), seed=seed, dtype=tf.float32)
    coded = _quantize_and_pack(buckets, uniform, compression)
    # The side list only where a bucket holds markers: the search over the values costs a pass.
    side = tf.cond(_any_marked(coded[compression.code_words(buckets.shape[0]):]),
                   lambda: nonfinite_kinds(buckets), lambda: tf.zeros([NONFINITE_WORDS], tf.int32))
    return tf.concat([coded, side], axis=0)


def decode(payload, compression, num_buckets):
    """float32 [..., num_buckets * bucket_size] from payloads [..., payload_words] (inverse of encode)."""
    payload = tf.convert_to_tensor(payload, tf.int32)
    values = _unpack_and_dequantize(payload, compression, num_buckets)
    code_words = compression.code_words(num_buckets)
    return tf.cond(_any_marked(payload[..., code_words:code_words + num_buckets]),
                   lambda: restore_infinities(values, payload[..., -NONFINITE_WORDS:]), lambda: values)


def decode_sum(payloads, compression, num_buckets):
    """Sum over the leading axis of decoded payloads [replicas, payload_words], added in replica order.

    The fixed order (not a tree reduction) gives every replica the very same float sum. The adds stay
    outside XLA, which would contract them with the decode's multiply into FMAs where the CPU has them:
    workers on different CPUs would then disagree in the last bit.
    """
    values = decode(payloads, compression, num_buckets)
    total = values[0]
    for replica in range(1, values.shape[0]):
        total = total + values[replica]
    return total


# XLA fuses the element-wise chains below into single loops: measured 2.6x (quantize) and 5x (decode)
# faster than op-by-op on CPU at 1M values. The noise stays outside: under XLA the default generator
# was 100x slower on CPU and an explicit Philox no faster than TF's own kernel (and draws other bits).
@tf.function(jit_compile=True, reduce_retracing=True)
def _quantize_and_pack(buckets, uniform, compression):
    codes, norms = quantize_buckets(buckets, compression, uniform)
    return tf.concat([pack_codes(codes, compression.bits), tf.bitcast(norms, tf.int32)], axis=0)


@tf.function(jit_compile=True, reduce_retracing=True)
def _unpack_and_dequantize(payload, compression, num_buckets):
    code_words = compression.code_words(num_buckets)
    codes = unpack_codes(payload[..., :code_words], compression.bits)
    norms = tf.bitcast(payload[..., code_words:code_words + num_buckets], tf.float32)
    leading = tf.shape(codes)[:-1]
    codes = tf.reshape(codes, tf.concat([leading, [num_buckets, compression.bucket_size]], axis=0))
    values = dequantize_buckets(codes, norms, compression)
    return tf.reshape(values, tf.concat([leading, [-1]], axis=0))


def compress_vector(vector, compression, seed):
    """Decoded Q(v) of a 1-D vector (padded to whole buckets and cut back): the round trip, for studies."""
    vector = tf.convert_to_tensor(vector, tf.float32)
    size = vector.shape[0]
    layout = BucketLayout([size], compression.bucket_size)
    payload = encode(layout.to_buckets([vector]), compression, seed)
    return layout.from_flat(decode(payload, compression, layout.num_buckets))[0]


class BucketLayout:
    """Where each gradient's values sit in the bucketed vector that is encoded.

    A tensor's whole buckets (floor(size / bucket_size) of them) are its own, so most of a large
    layer never shares a norm with a neighbour. What is left over (the tails of large tensors and
    every smaller tensor: biases, BN, quantizer parameters) is concatenated, in variable order, into
    shared buckets after them: one norm per bucket_size values, and zero padding only at the very end.

    segments[i]: (position in the flat vector, start in tensor i, length) of each piece of tensor i.
    """

    def __init__(self, sizes, bucket_size):
        self.sizes = [int(s) for s in sizes]
        self.bucket_size = int(bucket_size)
        self.segments = [[] for _ in self.sizes]
        position = 0
        for i, size in enumerate(self.sizes):
            whole = size - size % self.bucket_size
            if whole:
                self.segments[i].append((position, 0, whole))
                position += whole
        for i, size in enumerate(self.sizes):
            tail = size % self.bucket_size
            if tail:
                self.segments[i].append((position, size - tail, tail))
                position += tail
        self.num_values = position
        self.num_buckets = -(-position // self.bucket_size)
        self.padded_size = self.num_buckets * self.bucket_size

    def to_buckets(self, tensors):
        """[num_buckets, bucket_size] float32 from tensors of the layout's sizes (any shapes)."""
        flat = [tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors]
        pieces = sorted((position, i, start, length)
                        for i, segments in enumerate(self.segments) for position, start, length in segments)
        parts = [flat[i][start:start + length] for _, i, start, length in pieces]
        if self.padded_size > self.num_values or not parts:
            parts.append(tf.zeros([self.padded_size - self.num_values], tf.float32))
        joined = tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]
        return tf.reshape(joined, [self.num_buckets, self.bucket_size])

    def from_flat(self, flat):
        """The tensors' values (1-D each) back from a padded flat vector."""
        out = []
        for segments in self.segments:
            parts = [flat[position:position + length] for position, _, length in segments] or [flat[:0]]
            out.append(parts[0] if len(parts) == 1 else tf.concat(parts, axis=0))
        return out
