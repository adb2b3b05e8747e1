"""n2uq_tf.distribute.compressors held against the independent NumPy reference (tests/distribute_reference.py).

What is checked: the paper's level sets and config validation; codes and norms equal to the
reference given the same U[0,1) draws (Gaussian, heavy-tailed, sparse, per-bucket scales, zero
buckets, r = 1, values exactly on and next to levels); the bit layout of packed words; the
encode/decode round trip; unbiasedness and the exact variance by Monte Carlo over many seeds, with
bounds from Bernstein's inequality (not tuned constants); the published-scale variance figures (measured
once: QSGD 9.3, QSGDinf 0.05, NUQSGD 0.34);
independence and determinism of the rounding noise; the bucket layout; the payload size.

Monte Carlo bounds. For independent X_k with |X_k - E X_k| <= M and total variance V, Bernstein's
inequality gives P(|sum_k (X_k - E X_k)| >= t) <= 2 exp(-t^2 / (2 (V + M t / 3))), so with
probability >= 1 - delta the deviation is below t = M L / 3 + sqrt((M L / 3)^2 + 2 V L), L = ln(2 / delta).
V and M come from the exact per-coordinate formulas, so each bound is derived; the seeds are fixed,
so the test is deterministic, and a correct implementation fails it with probability < delta.
"""

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distribute_reference as ref
from n2uq_tf.distribute.compressors import (BucketLayout, GradientCompression, compress_vector, decode, decode_sum,
                                            encode, pack_codes, quantize_buckets, unpack_codes)

METHODS = ref.METHODS
BITS = ref.BITS
PROP = settings(deadline=None, derandomize=True, max_examples=25, suppress_health_check=[HealthCheck.too_slow])

# Where the L2 norm is summed in another order than NumPy's, r (and p) may move by an ulp; a code may
# then differ from the reference only where u is that close to p, and only by one level.
TIE_TOLERANCE = 1e-5
MAX_TIE_FRACTION = 1e-4
# Failure probability allowed to each Monte Carlo assertion (union-bounded over its coordinates).
DELTA = 1e-6


def seed_of(*parts):
    return tf.constant(list(parts), tf.int64)


def bernstein_radius(total_variance, max_deviation, delta):
    """t with P(|sum of centred independent terms| >= t) <= delta (Bernstein), see the module docstring."""
    log_term = math.log(2.0 / delta)
    a = np.asarray(max_deviation, np.float64) * log_term / 3.0
    return a + np.sqrt(a * a + 2.0 * np.asarray(total_variance, np.float64) * log_term)


def sign_and_index(codes, bits):
    codes = np.asarray(codes, np.int64)
    return codes >> (bits - 1), codes & (2 ** (bits - 1) - 1)


def assert_codes_match(codes, norms, ref_codes, ref_norms, p_ref, uniform, bits, max_tie_fraction=MAX_TIE_FRACTION):
    """Codes equal to the reference's; where a bucket's L2 norm came out an ulp away from the reference's
    (another summation order), r and p move by an ulp, and a code there may differ only at a tie
    |u - p| < TIE_TOLERANCE, by one level. Where the norms agree bit for bit (always for max-abs),
    r and p are the same float32 computations: codes must be identical.
    """
    codes, norms = np.asarray(codes), np.asarray(norms)
    assert codes.dtype == np.int32 and norms.dtype == np.float32
    assert codes.shape == ref_codes.shape and norms.shape == ref_norms.shape
    assert codes.min() >= 0 and codes.max() < 2 ** bits
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(norms == 0, ref_norms == 0)
    same_norm = norms == ref_norms
    np.testing.assert_array_equal(codes[same_norm], ref_codes[same_norm])
    differ = codes != ref_codes
    if differ.any():
        sign, index = sign_and_index(codes[differ], bits)
        ref_sign, ref_index = sign_and_index(ref_codes[differ], bits)
        np.testing.assert_array_equal(sign, ref_sign)
        np.testing.assert_array_equal(np.abs(index - ref_index), 1)
        assert np.all(np.abs(np.asarray(uniform)[differ] - p_ref[differ]) < TIE_TOLERANCE), "code differs off a tie"
    assert differ.mean() <= max_tie_fraction, f"{differ.sum()} of {differ.size} codes differ"
    return differ


# --------------------------------------------------------------------------- 1. levels and validation

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_levels_are_the_papers_sets(method, bits):
    compression = GradientCompression(method, bits)
    levels = compression.levels()
    assert levels.dtype == np.float32 and levels.shape == (2 ** (bits - 1),)
    exact = ref.exact_levels(method, bits)
    # Each level is the float32 nearest the exact fraction (exactly equal where it is dyadic).
    for got, want in zip(levels, exact):
        spacing = Fraction(float(np.spacing(np.float32(float(want))))) if want else Fraction(0)
        assert abs(Fraction(float(got)) - want) <= spacing / 2
    np.testing.assert_array_equal(levels, ref.levels(method, bits))
    assert levels[0] == 0 and levels[-1] == 1 and np.all(np.diff(levels) > 0)
    k = 2 ** (bits - 1) - 1
    if method == "nuqsgd":
        # {0, 2^(1-K), ..., 1/4, 1/2, 1}: exact powers of two, each twice the one below.
        assert levels[1] == np.float32(2.0 ** (1 - k))
        np.testing.assert_array_equal(levels[2:] / levels[1:-1], 2)
    else:
        np.testing.assert_array_equal(levels, (np.arange(k + 1) / k).astype(np.float32))
    signed = compression.signed_levels()
    assert signed.dtype == np.float32 and signed.shape == (2 ** bits,)
    for code in range(2 ** bits):
        sign, index = code >> (bits - 1), code & (2 ** (bits - 1) - 1)
        assert signed[code] == (-1) ** sign * levels[index]


def test_level_sets_by_hand():
    # The 4-bit sets written out, the paper's runs (NUQSGD: 0, 1/2^s, ..., 1/2, 1 with s = 6).
    np.testing.assert_array_equal(GradientCompression("nuqsgd", 4).levels(),
                                  np.float32([0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]))
    np.testing.assert_array_equal(GradientCompression("qsgd", 4).levels(), np.float32([j / 7 for j in range(8)]))
    np.testing.assert_array_equal(GradientCompression("qsgdinf", 4).levels(), np.float32([j / 7 for j in range(8)]))
    for method in METHODS:  # 2 bits: one magnitude bit, {0, 1} for every method
        np.testing.assert_array_equal(GradientCompression(method, 2).levels(), np.float32([0, 1]))
    assert GradientCompression("nuqsgd", 8).levels()[1] == np.float32(2.0 ** -126)  # smallest normal float32
    with pytest.raises(ValueError):
        GradientCompression("none").levels()


def test_defaults_and_payload_words():
    assert GradientCompression().method == "nuqsgd" and GradientCompression().bits == 4
    assert GradientCompression("nuqsgd", 4).bucket_size == 8192
    assert GradientCompression("qsgd", 8).bucket_size == 8192
    assert GradientCompression("qsgdinf", 2).bucket_size == 128
    assert GradientCompression("QSGD").method == "qsgd"
    for bits in BITS:
        for bucket_size in (32 // bits, 64, 8192):
            c = GradientCompression("qsgd", bits, bucket_size=bucket_size)
            for nb in (0, 1, 7):
                assert c.payload_words(nb) == nb * (bucket_size * bits // 32 + 1) + 4  # + the side list
    with pytest.raises(AttributeError):  # frozen
        GradientCompression().bits = 8


@pytest.mark.parametrize("kwargs, argument", [
    (dict(method="nuq"), "method"),
    (dict(method="terngrad"), "method"),
    (dict(method=""), "method"),
    (dict(bits=3), "bits"),
    (dict(bits=1), "bits"),
    (dict(bits=16), "bits"),
    (dict(bits=32), "bits"),
    (dict(bits=True), "bits"),
    (dict(bits="4"), "bits"),
    (dict(bits=4, bucket_size=100), "bucket_size"),  # 100 % 8 != 0
    (dict(bits=2, bucket_size=8), "bucket_size"),  # 16 codes per word
    (dict(bits=8, bucket_size=6), "bucket_size"),
    (dict(bucket_size=0), "bucket_size"),
    (dict(bucket_size=-8), "bucket_size"),
    (dict(bucket_size=64.0), "bucket_size"),
    (dict(bucket_size=True), "bucket_size"),
    (dict(bucket_size="64"), "bucket_size"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
])
def test_invalid_config_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        GradientCompression(**kwargs)


def test_float_bits_are_rejected_like_float_bucket_size():
    with pytest.raises(ValueError, match="bits"):
        GradientCompression("nuqsgd", bits=4.0)


# --------------------------------------------------------------------------- 2. codes against the reference

NB, BUCKET = 32, 512  # 16384 values a case: MAX_TIE_FRACTION allows at most one tie there


def make_buckets(kind, rng, nb=NB, bucket_size=BUCKET):
    shape = (nb, bucket_size)
    signs = rng.choice(np.float32([-1, 1]), shape)
    if kind == "gaussian":
        x = rng.standard_normal(shape)
    elif kind == "student_t2":
        x = rng.standard_t(2, shape)
    elif kind == "lognormal":
        x = rng.lognormal(0.0, 2.0, shape) * signs
    elif kind == "sparse":  # 98% zeros, half of them -0.0 (sign bit set, yet not negative)
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.02)
        x = np.where(x == 0, np.where(signs < 0, -0.0, 0.0), x)
    elif kind == "scaled":  # each bucket at its own magnitude, as gradients of different layers are
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-15, 15, (nb, 1))
    else:
        raise ValueError(kind)
    x = x.astype(np.float32)
    x[0] = 0.0  # an all-zero bucket
    x[1] = 0.0  # one nonzero value: r = 1 exactly under either norm
    x[1, rng.integers(bucket_size)] = -abs(x[5, 0]) or -1.0
    x[2] = -0.0  # negative zeros: norm 0, codes 0
    x[3] = 0.0
    x[3, rng.integers(bucket_size)] = 3e-7
    return x


@pytest.mark.parametrize("kind", ["gaussian", "student_t2", "lognormal", "sparse", "scaled"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_quantize_buckets_matches_reference(method, bits, kind):
    rng = np.random.default_rng([METHODS.index(method), bits, len(kind)])
    buckets = make_buckets(kind, rng)
    uniform = rng.random(buckets.shape, dtype=np.float32)
    compression = GradientCompression(method, bits, bucket_size=BUCKET)
    codes, norms = quantize_buckets(buckets, compression, uniform)
    ref_codes, ref_norms, details = ref.quantize(buckets, method, bits, uniform, return_details=True)
    assert_codes_match(codes, norms, ref_codes, ref_norms, details["p"], uniform, bits)
    codes, norms = codes.numpy(), norms.numpy()
    # The special buckets, exactly.
    assert norms[0] == 0 and norms[2] == 0 and not codes[0].any() and not codes[2].any()
    top = 2 ** (bits - 1) - 1
    nonzero = np.flatnonzero(buckets[1])
    assert codes[1, nonzero[0]] == (1 << (bits - 1)) | top  # negative, top level whatever u is
    assert np.count_nonzero(codes[1]) == 1 and norms[1] == abs(buckets[1, nonzero[0]])
    # Signs: set exactly for negative values (not for -0.0).
    sign, _ = sign_and_index(codes, bits)
    np.testing.assert_array_equal(sign == 1, buckets < 0)


def four_squares(n):
    """Positive integers whose squares sum to n (Lagrange: at most four are needed)."""
    if n == 0:
        return []
    for a in range(math.isqrt(n), 0, -1):
        r1 = n - a * a
        if r1 == 0:
            return [a]
        for b in range(min(a, math.isqrt(r1)), 0, -1):
            r2 = r1 - b * b
            if r2 == 0:
                return [a, b]
            for c in range(min(b, math.isqrt(r2)), 0, -1):
                r3 = r2 - c * c
                d = math.isqrt(r3)
                if d * d == r3:
                    return [a, b, c] + ([d] if d else [])
    raise AssertionError(n)


def place(row_values, rng, bucket_size=BUCKET):
    row = np.zeros(bucket_size, np.float32)
    values = np.asarray(row_values, np.float32) * rng.choice(np.float32([-1, 1]), len(row_values))
    row[rng.permutation(bucket_size)[:len(values)]] = values
    return row


def boundary_buckets(method, bits, rng):
    """(buckets, exact_rows): buckets whose r land exactly on levels (exact_rows) or one ulp either side.

    Each exact row's norm is exact in float32 whatever the summation order, so every r is a level:
    the code is that level whatever u is, and decoding gives the input back bit for bit.
    """
    levels = ref.levels(method, bits)
    s = len(levels) - 1
    exact, near = [], []
    scale = lambda: np.float32(2.0 ** int(rng.integers(-20, 21)))  # noqa: E731 - powers of two keep r exact
    if method == "qsgdinf":
        # Max-abs norm M = 2^e and values M * l_k: r = l_k exactly.
        for _ in range(3):
            exact.append(place(levels * scale(), rng))
        # M = 1 (r = |v|) and values one ulp below and above every level.
        below = np.nextafter(levels[1:], np.float32(0))
        above = np.nextafter(levels[:-1], np.float32(2))
        above[0] = np.finfo(np.float32).tiny  # not the subnormal next to 0 (TF flushes it to 0)
        near.append(place(np.concatenate([[1.0], below, above]), rng))
    elif method == "qsgd":
        # Integer values with sum of squares s^2 and a power-of-two scale: norm s * 2^e, r = k / s.
        for k in sorted({1, 2, s // 3, s // 2, s - 1, s} & set(range(1, s + 1))):
            exact.append(place(np.float32([k] + four_squares(s * s - k * k)) * scale(), rng))
        # Same rows with one value nudged by an ulp.
        for k in sorted({1, s // 2, s - 1} & set(range(1, s + 1))):
            for direction in (0, 2 * s):
                values = np.float32([k] + four_squares(s * s - k * k))
                values[0] = np.nextafter(values[0], np.float32(direction))
                near.append(place(values, rng))
    else:
        k = s  # K: nonzero levels 2^0 ... 2^-(K-1)
        # 3 copies of 2^-m for m = 1..n and one more of 2^-n: sum of squares 1 exactly (telescoping),
        # every partial sum a multiple of 4^-n (n <= 12), so the float32 sum is exactly 1 in any order.
        for n in sorted({1, min(k - 1, 6), min(k - 1, 12)} & set(range(1, k))):  # 2^-n must be a level
            values = [2.0 ** -m for m in range(1, n + 1) for _ in range(3)] + [2.0 ** -n]
            exact.append(place(np.float32(values) * scale(), rng))
        exact.append(place(np.float32([1.0]) * scale(), rng))  # r = 1
        if k - 1 >= 13:
            # Deep levels (8 bits): 1 plus 2^-m, m = 13..K-1, whose squares sum below half an ulp of 1.
            deep = [2.0 ** -m for m in range(13, k)]
            up = np.float32(2.0 ** int(rng.integers(0, 21)))  # scale up only: no subnormal values
            exact.append(place(np.float32([1.0] + deep) * up, rng))
            # One ulp around 2^-13 .. 2^-100 (deeper, r - l_j is subnormal: see the flush-to-zero test).
            near_deep = np.float32(deep[:100 - 12])
            near.append(place(np.concatenate([[1.0], np.nextafter(near_deep, np.float32(0)),
                                              np.nextafter(near_deep, np.float32(1))]), rng))
        # One ulp around shallow levels (the norm may then move by an ulp: reference comparison only).
        n = min(k - 1, 12)  # (deeper levels are the rows above; 2^-126 nudged down would be subnormal)
        values = np.float32([2.0 ** -m for m in range(1, n + 1) for _ in range(3)] + [2.0 ** -n])
        for direction in (0, 1):
            nudged = values.copy()
            nudged[::3] = np.nextafter(nudged[::3], np.float32(direction))
            near.append(place(nudged, rng))
    buckets = np.stack(exact + near).astype(np.float32)
    return buckets, np.arange(len(buckets)) < len(exact)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_values_on_and_next_to_levels(method, bits):
    rng = np.random.default_rng([7, METHODS.index(method), bits])
    buckets, exact_rows = boundary_buckets(method, bits, rng)
    compression = GradientCompression(method, bits, bucket_size=BUCKET)
    levels = ref.levels(method, bits)
    for trial in range(3):
        uniform = rng.random(buckets.shape, dtype=np.float32)
        if trial == 1:
            uniform[:] = 0.0  # round up whenever p > 0
        if trial == 2:
            uniform[:] = np.float32(1.0) - np.float32(2.0 ** -24)  # the largest draw below 1
        codes, norms = quantize_buckets(buckets, compression, uniform)
        ref_codes, ref_norms, details = ref.quantize(buckets, method, bits, uniform, return_details=True)
        # Ties are the point here (p is 0 or 1 next to a level, and u is 0 or 1 - 2^-24 in two trials):
        # no limit on how many, but a code may still differ only at a tie and only by one level.
        assert_codes_match(codes, norms, ref_codes, ref_norms, details["p"], uniform, bits, max_tie_fraction=1)
        # On the exact rows every r is a level and p is 0 (or 1 at r = 1): no randomness at all.
        r = details["r"][exact_rows]
        assert np.all(np.isin(r, levels))
        np.testing.assert_array_equal(codes.numpy()[exact_rows], ref_codes[exact_rows])
        np.testing.assert_array_equal(ref.dequantize(codes.numpy()[exact_rows], norms.numpy()[exact_rows],
                                                     method, bits), buckets[exact_rows])
    # Through the fused encode / decode too: the input comes back bit for bit.
    payload = encode(buckets, compression, seed_of(3, bits))
    decoded = decode(payload, compression, len(buckets)).numpy().reshape(buckets.shape)
    np.testing.assert_array_equal(decoded[exact_rows], buckets[exact_rows])


def test_deep_nuqsgd_levels_under_flush_to_zero():
    """8-bit NUQSGD's lowest levels 2^-126 .. 2^-100 sit next to float32's subnormal range.

    TF's CPU kernels flush subnormals to zero, so there r (below 2^-126) or r - l_j (when below
    2^-126) may read as 0 and the round-up probability p drops to 0: the reference (IEEE, no flush)
    differs. What still holds either way is that the decoded value is one of the two ends of the exact
    bracket, with the value's sign: a bias of at most 2^-125 * norm, about 2.4e-38 of the norm.
    """
    rng = np.random.default_rng(13)
    bits, bucket_size = 8, 256
    compression = GradientCompression("nuqsgd", bits, bucket_size=bucket_size)
    levels = ref.levels("nuqsgd", bits)
    tiny = np.float32(2.0 ** rng.uniform(-160, -100, bucket_size - 1))
    tiny = np.concatenate([tiny, [2.0 ** -126, np.nextafter(np.float32(2.0 ** -125), np.float32(0)), 2.0 ** -127]])
    buckets = np.zeros((2, bucket_size), np.float32)
    buckets[0, 0] = 1.0  # norm 1: the tiny values are the ratios themselves (subnormal ones included)
    buckets[0, 1:] = tiny[:bucket_size - 1] * rng.choice([-1, 1], bucket_size - 1)
    buckets[1, 0] = 2.0 ** 40  # norm 2^40: normal values, ratios down to 2^-200 (flushed or not)
    buckets[1, 1:] = np.float32(2.0 ** 40) * tiny[-(bucket_size - 1):] * rng.choice([-1, 1], bucket_size - 1)
    _, ref_norms, details = ref.quantize(buckets, "nuqsgd", bits, np.zeros(buckets.shape, np.float32),
                                         return_details=True)
    lo = levels[details["j"]] * ref_norms[:, None]
    hi = levels[details["j"] + 1] * ref_norms[:, None]
    for uniform in (np.zeros(buckets.shape, np.float32), rng.random(buckets.shape, dtype=np.float32)):
        codes, norms = quantize_buckets(buckets, compression, uniform)
        np.testing.assert_array_equal(norms, ref_norms)
        for decoded in (ref.dequantize(codes.numpy(), norms.numpy(), "nuqsgd", bits),
                        decode(encode(buckets, compression, seed_of(1, 1)), compression, 2).numpy().reshape(2, -1)):
            magnitude = np.abs(decoded)
            assert np.all((magnitude == lo) | (magnitude == hi))
            assert np.all(decoded * buckets >= 0)


def test_two_bit_nuqsgd_and_qsgd_coincide():
    # At 2 bits both level sets are {0, 1} under the L2 norm: the same payload for the same noise.
    rng = np.random.default_rng(11)
    buckets = rng.standard_normal((8, 128)).astype(np.float32)
    a = encode(buckets, GradientCompression("nuqsgd", 2), seed_of(1, 2))
    b = encode(buckets, GradientCompression("qsgd", 2), seed_of(1, 2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", [1e20, 1e-22])
def test_l2_norm_of_extreme_but_finite_values(value):
    vector = np.zeros(256, np.float32)
    vector[:3] = np.float32([value, -value, 0.5 * value])
    compression = GradientCompression("nuqsgd", 4, bucket_size=256)
    norms = quantize_buckets(vector[None], compression, np.zeros((1, 256), np.float32))[1].numpy()
    np.testing.assert_allclose(norms, ref.bucket_norms(vector[None], "nuqsgd"), rtol=1e-6)
    assert np.all(np.isfinite(compress_vector(vector, compression, seed_of(0, 0)).numpy()))


# --------------------------------------------------------------------------- 3. bit packing

def test_pack_known_words():
    cases = [
        (4, [1, 2, 3, 4, 5, 6, 7, 8], 0x87654321 - 2 ** 32),  # code i at bits 4i, little end first
        (8, [0x12, 0x34, 0x56, 0x78], 0x78563412),
        (8, [0, 0, 0, 0x80], -2 ** 31),  # top bit of the last code is the word's sign bit
        (2, [1] + [0] * 15, 1),
        (2, [0] * 15 + [2], -2 ** 31),
        (2, [3] * 16, -1),
        (4, [15] * 8, -1),
    ]
    for bits, codes, word in cases:
        np.testing.assert_array_equal(pack_codes(np.int32(codes), bits), [word])
        np.testing.assert_array_equal(ref.pack(codes, bits), [word])
        np.testing.assert_array_equal(unpack_codes(np.int32([word]), bits), codes)


@PROP
@given(bits=st.sampled_from(BITS), words=st.integers(1, 64), seed=st.integers(0, 2 ** 32 - 1),
       top_heavy=st.booleans())
def test_pack_unpack_round_trip_and_layout(bits, words, seed, top_heavy):
    rng = np.random.default_rng(seed)
    per_word = 32 // bits
    low = 2 ** (bits - 1) if top_heavy else 0  # top_heavy: every code has its sign bit set
    codes = rng.integers(low, 2 ** bits, words * per_word).astype(np.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == tf.int32 and packed.shape == (words,)
    np.testing.assert_array_equal(packed, ref.pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)
    np.testing.assert_array_equal(ref.unpack(packed.numpy(), bits), codes)
    if top_heavy:
        assert np.all(packed.numpy() < 0)  # the last code's top bit is the word's sign bit
    # Leading dimensions: [replicas, words] -> [replicas, words * per_word].
    stacked = np.stack([packed.numpy(), packed.numpy()[::-1]])
    unpacked = unpack_codes(stacked, bits).numpy()
    assert unpacked.shape == (2, words * per_word)
    np.testing.assert_array_equal(unpacked[0], codes)
    np.testing.assert_array_equal(unpacked[1], ref.unpack(packed.numpy()[::-1], bits))


# --------------------------------------------------------------------------- 4. encode / decode

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_encode_decode_matches_reference(method, bits):
    rng = np.random.default_rng([4, METHODS.index(method), bits])
    buckets = make_buckets("gaussian", rng)
    buckets[4:8] = make_buckets("lognormal", rng)[4:8]
    compression = GradientCompression(method, bits, bucket_size=BUCKET)
    seed = seed_of(1234, bits)
    payload = encode(buckets, compression, seed)
    assert payload.dtype == tf.int32 and payload.shape == (compression.payload_words(NB),)
    uniform = tf.random.stateless_uniform(buckets.shape, seed=seed, dtype=tf.float32).numpy()
    ref_codes, ref_norms, details = ref.quantize(buckets, method, bits, uniform, return_details=True)
    code_words = NB * BUCKET * bits // 32
    codes = ref.unpack(payload.numpy()[:code_words], bits).reshape(NB, BUCKET).astype(np.int32)
    norms = payload.numpy()[code_words:code_words + NB].view(np.float32)
    assert not payload.numpy()[code_words + NB:].any()  # finite values: an empty non-finite side list
    differ = assert_codes_match(codes, norms, ref_codes, ref_norms, details["p"], uniform, bits)
    # The payload is exactly the reference packing of those codes, then the norms' bits.
    np.testing.assert_array_equal(payload.numpy()[:code_words], ref.pack(codes, bits))
    decoded = decode(payload, compression, NB).numpy()
    assert decoded.dtype == np.float32 and decoded.shape == (NB * BUCKET,)
    # decode is exactly the reference dequantisation of the payload's own codes and norms ...
    np.testing.assert_array_equal(decoded, ref.dequantize(codes, norms, method, bits).reshape(-1))
    # ... and, away from ties, the reference dequantisation of the reference codes (norms to an ulp or so).
    expected = ref.dequantize(ref_codes, ref_norms, method, bits).reshape(-1)
    keep = ~differ.reshape(-1)
    np.testing.assert_allclose(decoded[keep], expected[keep], rtol=1e-6, atol=0)
    # Payloads of several replicas decode in one call, row by row.
    other = encode(buckets[::-1].copy(), compression, seed_of(99, bits))
    both = decode(tf.stack([payload, other]), compression, NB).numpy()
    np.testing.assert_array_equal(both[0], decoded)
    np.testing.assert_array_equal(both[1], decode(other, compression, NB).numpy())


@PROP
@given(method=st.sampled_from(METHODS), bits=st.sampled_from(BITS), words_per_bucket=st.sampled_from([1, 2, 5]),
       size=st.integers(1, 700), seed=st.integers(0, 2 ** 31 - 1))
def test_compress_vector_matches_reference(method, bits, words_per_bucket, size, seed):
    bucket_size = words_per_bucket * 32 // bits
    compression = GradientCompression(method, bits, bucket_size=bucket_size)
    rng = np.random.default_rng(seed)
    vector = (rng.standard_t(3, size) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    tf_seed = seed_of(seed, 5)
    out = compress_vector(vector, compression, tf_seed).numpy()
    assert out.shape == (size,) and out.dtype == np.float32
    nb = -(-size // bucket_size)
    uniform = tf.random.stateless_uniform([nb, bucket_size], seed=tf_seed, dtype=tf.float32).numpy()
    buckets = ref.bucketize(vector, bucket_size)
    ref_codes, ref_norms, details = ref.quantize(buckets, method, bits, uniform, return_details=True)
    expected = ref.dequantize(ref_codes, ref_norms, method, bits).reshape(-1)[:size]
    tie = (np.abs(uniform - details["p"]) < TIE_TOLERANCE).reshape(-1)[:size]
    np.testing.assert_allclose(out[~tie], expected[~tie], rtol=1e-6, atol=0)
    assert np.all(np.sign(out) * np.sign(vector) >= 0)  # never the wrong sign


# --------------------------------------------------------------------------- 5, 6. Monte Carlo: mean and variance

MC_SIZE = 8192
MC_DRAWS = 400
MC_DATA = ("gaussian", "student_t2")


@functools.lru_cache(maxsize=None)
def mc_vector(kind):
    rng = np.random.default_rng(MC_DATA.index(kind) + 100)
    if kind == "gaussian":
        return rng.standard_normal(MC_SIZE).astype(np.float32)
    return rng.standard_t(2, MC_SIZE).astype(np.float32)


@functools.lru_cache(maxsize=None)
def monte_carlo(method, bits, kind):
    """MC_DRAWS decoded Q(v), seeds (draw, config): (mean of Q(v) in float64, ||Q(v) - v||^2 per draw)."""
    vector = mc_vector(kind)
    compression = GradientCompression(method, bits)  # the default bucket: 8192 (4, 8 bits), 128 (2 bits)
    buckets = ref.bucketize(vector, compression.bucket_size)
    nb = buckets.shape[0]
    config = 100 * MC_DATA.index(kind) + 10 * METHODS.index(method) + bits
    total = np.zeros(MC_SIZE, np.float64)
    squared_errors = []
    for start in range(0, MC_DRAWS, 100):
        payloads = tf.stack([encode(buckets, compression, seed_of(draw, config))
                             for draw in range(start, min(start + 100, MC_DRAWS))])
        q = decode(payloads, compression, nb).numpy().astype(np.float64)[:, :MC_SIZE]
        total += q.sum(axis=0)
        squared_errors.append(np.sum((q - vector.astype(np.float64)) ** 2, axis=1))
    return total / MC_DRAWS, np.concatenate(squared_errors)


# float32 rounding of the norm, r, p and the decoded product moves E[Q(v)_i] by a few ulps of |v_i| and of
# the level spacing: a fixed allowance of 2^-20 of each, far below the Monte Carlo radius.
FLOAT_SLACK = 2.0 ** -20


@pytest.mark.parametrize("kind", MC_DATA)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_unbiased(method, bits, kind):
    vector = mc_vector(kind).astype(np.float64)
    bucket_size = GradientCompression(method, bits).bucket_size
    var, step, p = ref.coordinate_variance(mc_vector(kind), method, bits, bucket_size)
    mean, _ = monte_carlo(method, bits, kind)
    slack = FLOAT_SLACK * (np.abs(vector) + step)
    # Per coordinate: MC_DRAWS draws, each within step of its mean, variance var; union over coordinates.
    radius = bernstein_radius(MC_DRAWS * var, step, DELTA / MC_SIZE) / MC_DRAWS + slack
    excess = np.abs(mean - vector) - radius
    assert np.all(excess <= 0), f"coordinate {np.argmax(excess)}: mean {mean[np.argmax(excess)]}, " \
                                f"v {vector[np.argmax(excess)]}, radius {radius[np.argmax(excess)]}"
    # Aggregate along sign(v): a bias in the magnitude (rounding probability off) adds up here.
    signs = np.sign(vector)
    aggregate = np.sum(signs * (mean - vector))
    aggregate_radius = bernstein_radius(MC_DRAWS * var.sum(), step.max(), DELTA) / MC_DRAWS + slack.sum()
    assert abs(aggregate) <= aggregate_radius
    # Power: rounding up with probability p + 1% would move the aggregate by 1% of the summed spacing,
    # several times the radius (so the check is not vacuous).
    assert 0.01 * np.sum(step[(p > 0) & (p < 0.99)]) > 3 * aggregate_radius


@pytest.mark.parametrize("kind", MC_DATA)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_variance_equals_formula(method, bits, kind):
    vector = mc_vector(kind)
    bucket_size = GradientCompression(method, bits).bucket_size
    _, squared_errors = monte_carlo(method, bits, kind)
    norm2 = float(np.sum(vector.astype(np.float64) ** 2))
    expected = ref.expected_relative_variance(vector, method, bits, bucket_size)
    empirical = squared_errors.mean() / norm2
    # Bernstein over MC_DRAWS * d independent squared errors: each within step^2 of its mean.
    var, step, _ = ref.coordinate_variance(vector, method, bits, bucket_size)
    radius = bernstein_radius(MC_DRAWS * ref.squared_error_variance(vector, method, bits, bucket_size),
                              np.max(step) ** 2, DELTA) / MC_DRAWS / norm2
    assert abs(empirical - expected) <= radius + 1e-5 * expected, (empirical, expected, radius)
    # The check resolves the variance to a few percent (heavy tails: a few coordinates carry most of the
    # error, so 400 draws pin it down less tightly).
    assert radius < (0.03 if kind == "gaussian" else 0.1) * expected
    # The formula itself is the sum of the per-coordinate variances.
    assert expected == pytest.approx(var.sum() / norm2, rel=1e-12)


# Relative variance E||Q(v)-v||^2/||v||^2 at 4 bits, d = bucket = 8192, Gaussian v (README figures).
GAUSSIAN_4BIT = {"qsgd": 9.3, "qsgdinf": 0.05, "nuqsgd": 0.34}


def test_design_figures_and_nuqsgd_beats_qsgd():
    norm2 = {kind: float(np.sum(mc_vector(kind).astype(np.float64) ** 2)) for kind in MC_DATA}
    assert GradientCompression("nuqsgd", 4).bucket_size == MC_SIZE
    for method in ("qsgd", "nuqsgd"):  # these depend on sums over the bucket: stable from sample to sample
        empirical = monte_carlo(method, 4, "gaussian")[1].mean() / norm2["gaussian"]
        assert empirical == pytest.approx(GAUSSIAN_4BIT[method], rel=0.1), method
    # QSGDinf's variance scales with the square of the bucket's max |v|, which varies from sample to
    # sample (0.039 .. 0.088 over 200 samples; the Monte Carlo vector above has max 4.3 and 0.063): the
    # figure is the mean over Gaussian samples (the formula is held to the Monte Carlo just above).
    rng = np.random.default_rng(8)
    figures = {method: np.mean([ref.expected_relative_variance(rng.standard_normal(MC_SIZE).astype(np.float32),
                                                                method, 4, MC_SIZE) for _ in range(100)])
               for method in GAUSSIAN_4BIT}
    for method, figure in GAUSSIAN_4BIT.items():
        assert figures[method] == pytest.approx(figure, rel=0.1), method
    # The paper's point: at 4 bits NUQSGD's exponential levels beat QSGD's uniform ones (same L2 norm).
    for kind in MC_DATA:
        nuq = monte_carlo("nuqsgd", 4, kind)[1].mean() / norm2[kind]
        qsgd = monte_carlo("qsgd", 4, kind)[1].mean() / norm2[kind]
        assert nuq < 0.2 * qsgd, kind
    lognormal = (np.random.default_rng(5).lognormal(0, 2, MC_SIZE)
                 * np.random.default_rng(6).choice([-1, 1], MC_SIZE)).astype(np.float32)
    assert (ref.expected_relative_variance(lognormal, "nuqsgd", 4, MC_SIZE)
            < ref.expected_relative_variance(lognormal, "qsgd", 4, MC_SIZE))


# --------------------------------------------------------------------------- 7. the noise

def test_noise_is_deterministic_per_seed_and_independent_across_seeds():
    rng = np.random.default_rng(21)
    buckets = rng.standard_normal((4, 1024)).astype(np.float32)
    compression = GradientCompression("nuqsgd", 4, bucket_size=1024)
    nb, code_words = 4, 4 * 1024 * 4 // 32
    seeds = [(0, 0), (1, 0), (0, 1), (2 ** 31 - 1, 7), (-5, 3)]
    payloads = [encode(buckets, compression, seed_of(*s)).numpy() for s in seeds]
    for s, payload in zip(seeds, payloads):  # same seed, same bytes
        np.testing.assert_array_equal(encode(buckets, compression, seed_of(*s)).numpy(), payload)
        np.testing.assert_array_equal(payload[code_words:], payloads[0][code_words:])  # norms carry no noise
    _, _, p = ref.coordinate_variance(buckets.reshape(-1), "nuqsgd", 4, 1024)
    # Two independent draws differ at coordinate i with probability 2 p (1 - p); a shared or correlated
    # noise would give fewer differences. Bernstein over the 4096 coordinates, union over the 10 pairs.
    expected = np.sum(2 * p * (1 - p))
    radius = bernstein_radius(np.sum(2 * p * (1 - p) * (1 - 2 * p * (1 - p))), 1.0, DELTA / 10)
    codes = [unpack_codes(payload[:code_words], 4).numpy() for payload in payloads]
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            assert abs(np.sum(codes[i] != codes[j]) - expected) <= radius, (seeds[i], seeds[j])
    decoded = decode(np.stack(payloads), compression, nb).numpy()
    assert len({d.tobytes() for d in decoded}) == len(seeds)


# --------------------------------------------------------------------------- 8. bucket layout

def check_layout(sizes, bucket_size, seed=0):
    layout = BucketLayout(sizes, bucket_size)
    expected = ref.Layout(sizes, bucket_size)
    assert layout.num_buckets == expected.num_buckets and layout.padded_size == expected.padded_size
    assert layout.padded_size == layout.num_buckets * bucket_size
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal(size).astype(np.float32) + 1 for size in sizes]  # no zeros in the data
    buckets = layout.to_buckets(tensors).numpy()
    np.testing.assert_array_equal(buckets, expected.flatten(tensors))
    back = layout.from_flat(tf.reshape(buckets, [-1]))
    for tensor, out in zip(tensors, back):
        np.testing.assert_array_equal(np.asarray(out), tensor)
    # Every value that is no tensor's is zero padding, and the padding is less than one bucket (at the end).
    assert np.count_nonzero(buckets) == sum(sizes)
    assert 0 <= layout.padded_size - sum(sizes) < bucket_size
    # Each tensor's floor(size / B) whole buckets hold its values alone.
    for i, size in enumerate(sizes):
        assert len(expected.own_buckets_of(i)) == size // bucket_size, (i, size)
    return layout


def test_bucket_layout_mixed_sizes():
    b = 64
    sizes = [2 * b + 5, 3, b, 17, b - 1, 1, 3 * b, 40, 0, b + 1]
    layout = check_layout(sizes, b)
    # Whole buckets first, in order (2, 1, 3, 1 of them: positions 0, 128, 192, 384); then from 448 on the
    # leftovers back to back: tail 5 of tensor 0, 3, 17, 63, 1, 40, tail 1 of tensor 9 = 130 values.
    assert layout.segments == [[(0, 0, 128), (448, 128, 5)], [(453, 0, 3)], [(128, 0, 64)], [(456, 0, 17)],
                               [(473, 0, 63)], [(536, 0, 1)], [(192, 0, 192)], [(537, 0, 40)], [],
                               [(384, 0, 64), (577, 64, 1)]]
    assert layout.num_buckets == 10 and layout.padded_size == 10 * b
    # One tensor exactly one bucket long, one tensor alone, and a tail sharing with a small tensor.
    assert check_layout([b], b).num_buckets == 1
    assert check_layout([5], b).num_buckets == 1
    assert check_layout([b + 1, b - 1], b).segments == [[(0, 0, b), (b, b, 1)], [(b + 1, 0, b - 1)]]


@PROP
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8), bucket_size=st.sampled_from([32, 64, 128]))
def test_bucket_layout_property(sizes, bucket_size):
    check_layout(sizes, bucket_size, seed=len(sizes))


# --------------------------------------------------------------------------- 9. bytes on the wire

@pytest.mark.parametrize("bits, min_ratio", [(2, 14), (4, 7), (8, 3.9)])
def test_payload_bytes(bits, min_ratio):
    size = 1_000_000
    compression = GradientCompression("nuqsgd", bits)
    layout = BucketLayout([size], compression.bucket_size)
    vector = np.random.default_rng(bits).standard_normal(size).astype(np.float32)
    payload = encode(layout.to_buckets([vector]), compression, seed_of(0, bits))
    assert payload.dtype == tf.int32
    assert payload.shape[0] == compression.payload_words(layout.num_buckets)
    payload_bytes = payload.shape[0] * payload.dtype.size
    codes_bytes = math.ceil(size / compression.bucket_size) * compression.bucket_size * bits // 8
    assert payload_bytes == codes_bytes + 4 * layout.num_buckets + 16  # codes, norms, the non-finite side list
    assert size * 4 / payload_bytes >= min_ratio
    if bits == 4:  # 4 bits, bucket 8192: 123 buckets of 1025 words and 4 words, 7.93x less than float32
        assert layout.num_buckets == 123 and payload_bytes == (123 * 1025 + 4) * 4


# --------------------------------------------------------------------------- 10. non-finite and huge values
# The float exchange carries a NaN or +/-Inf to its own position and nowhere else; so must the codec.

NONFINITE = {"nan": np.float32(np.nan), "+inf": np.float32(np.inf), "-inf": np.float32(-np.inf)}


def kinds_of(values):
    """'nan', '+inf', '-inf' or 'finite' per value (an exact comparison of what a sum would carry)."""
    values = np.asarray(values, np.float32)
    return np.where(np.isnan(values), "nan", np.where(values == np.inf, "+inf",
                                                      np.where(values == -np.inf, "-inf", "finite")))


def with_nonfinite(rng):
    """Gaussian buckets with non-finite values in a few of them, and the same buckets with 0 there."""
    buckets = make_buckets("gaussian", rng)
    places = {(5, 7): "nan", (5, 100): "+inf", (6, 3): "-inf", (0, 9): "nan",  # bucket 0 is otherwise all zero
              (9, BUCKET - 1): "+inf", (10, 0): "-inf", (10, 1): "nan"}
    buckets[8, ::13] = NONFINITE["nan"]  # 40 NaN: 48 non-finite values in all, within the side list's 64
    buckets[11, :] *= np.float32(1e-15)
    buckets[11, 1] = np.float32(1e15)  # r ~ 1e-30 for the others: level 0 (but at 8-bit nuqsgd's 2^-126)
    buckets[11, 0] = NONFINITE["+inf"]
    for (b, i), kind in places.items():
        buckets[b, i] = NONFINITE[kind]
    return buckets, np.where(np.isfinite(buckets), buckets, np.float32(0))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_values_keep_their_places_and_spare_their_buckets(method, bits):
    rng = np.random.default_rng([10, METHODS.index(method), bits])
    buckets, zeroed = with_nonfinite(rng)
    compression = GradientCompression(method, bits, bucket_size=BUCKET)
    seed = seed_of(77, bits)
    uniform = tf.random.stateless_uniform(buckets.shape, seed=seed, dtype=tf.float32).numpy()
    codes, norms = quantize_buckets(buckets, compression, uniform)
    codes, norms = codes.numpy(), norms.numpy()
    ref_codes, ref_norms, details = ref.quantize(buckets, method, bits, uniform, return_details=True)
    assert_codes_match(codes, norms, ref_codes, ref_norms, details["p"], uniform, bits)
    # Each bucket is coded as if its non-finite values were 0: the same norms (sign bit apart), and
    # the same codes but at the markers and at the level-0 values there, sent as +0.
    marked = ~np.isfinite(buckets).all(axis=1)
    clean_codes, clean_norms = (t.numpy() for t in quantize_buckets(zeroed, compression, uniform))
    np.testing.assert_array_equal(np.abs(norms), clean_norms)
    np.testing.assert_array_equal(np.signbit(norms), marked)
    marker = 1 << (bits - 1)
    # The marker means non-finite in the marked buckets (elsewhere it is a negative value at level 0).
    np.testing.assert_array_equal((codes == marker) & marked[:, None], ~np.isfinite(buckets))
    same = np.where(marked[:, None] & (clean_codes == marker), 0, clean_codes)
    np.testing.assert_array_equal(np.where(np.isfinite(buckets), codes, same), same)
    if (method, bits) != ("nuqsgd", 8):
        assert (clean_codes[11] == marker).any()  # the +0 rule was exercised

    payload = encode(buckets, compression, seed).numpy()
    assert payload.shape == (compression.payload_words(NB),)
    if np.array_equal(norms, ref_norms):  # the L2 sums agreed to the bit: the payload is the reference's
        np.testing.assert_array_equal(payload, ref.encode_payload(buckets, method, bits, uniform))
    np.testing.assert_array_equal(payload[-4:], ref.pack(ref.side_list(buckets), 2))
    decoded = decode(payload, compression, NB).numpy()
    np.testing.assert_array_equal(kinds_of(decoded), kinds_of(buckets.reshape(-1)))
    np.testing.assert_array_equal(decoded, ref.decode_payload(payload, method, bits, NB, BUCKET))
    # The finite values decode as the zeroed buckets' do (the +0 rule changes no value).
    clean = decode(encode(zeroed, compression, seed), compression, NB).numpy()
    finite = np.isfinite(buckets.reshape(-1))
    np.testing.assert_array_equal(decoded[finite], clean[finite])


def test_nonfinite_values_past_the_side_list_decode_as_nan():
    compression = GradientCompression("nuqsgd", 4, bucket_size=64)
    vector = np.ones(300, np.float32)
    bad = np.arange(0, 300, 3)[:80]  # 80 non-finite values: the side list names the first 64
    vector[bad] = np.where(np.arange(80) % 2, np.float32(-np.inf), np.float32(np.inf))
    vector[bad[10]] = np.nan
    out = compress_vector(vector, compression, seed_of(1, 2)).numpy()
    np.testing.assert_array_equal(kinds_of(out[bad[:64]]), kinds_of(vector[bad[:64]]))
    assert np.all(np.isnan(out[bad[64:]]))  # kind lost, place kept: still never finite
    good = np.setdiff1d(np.arange(300), bad)
    assert np.all(np.isfinite(out[good]))
    np.testing.assert_array_equal(out, ref.decode_payload(encode(ref.bucketize(vector, 64), compression,
                                                                 seed_of(1, 2)).numpy(),
                                                          "nuqsgd", 4, 5, 64)[:300])


@pytest.mark.parametrize("method", METHODS)
def test_huge_finite_values_decode_finite(method):
    # L2 norm far above the largest float32 (8 values of 3e38 and -3e38 beside ordinary ones).
    rng = np.random.default_rng(METHODS.index(method))
    vector = rng.standard_normal(256).astype(np.float32)
    vector[::32] = np.float32(3e38) * np.float32([1, -1, 1, 1, -1, 1, -1, 1])
    compression = GradientCompression(method, 4, bucket_size=128)
    uniform = tf.random.stateless_uniform([2, 128], seed=seed_of(5, 5), dtype=tf.float32).numpy()
    codes, norms = quantize_buckets(vector.reshape(2, 128), compression, uniform)
    ref_codes, ref_norms = ref.quantize(vector.reshape(2, 128), method, 4, uniform)
    np.testing.assert_array_equal(norms, ref_norms)
    np.testing.assert_array_equal(codes, ref_codes)
    if method != "qsgdinf":
        np.testing.assert_array_equal(norms, np.finfo(np.float32).max)  # clamped
    out = compress_vector(vector, compression, seed_of(5, 5)).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, ref.dequantize(ref_codes, ref_norms, method, 4).reshape(-1))
    assert np.all(np.sign(out) * np.sign(vector) >= 0)
    # Unbiased still: the mean over draws approaches each huge value (spacing <= the norm, 400 draws).
    payloads = tf.stack([encode(vector.reshape(2, 128), compression, seed_of(d, 9)) for d in range(400)])
    mean = decode(payloads, compression, 2).numpy().astype(np.float64).mean(axis=0)
    huge = vector[::32].astype(np.float64)
    np.testing.assert_allclose(mean[::32], huge, rtol=0.15)


def test_decode_sum_of_two_payloads_is_the_float_sum_at_nonfinite_places():
    """Per position, replica 0's and replica 1's values: the float exchange's g0 + g1 decides the kind."""
    pairs = [("nan", 1.0), (1.0, "nan"), ("+inf", 1.0), ("+inf", "-inf"), ("+inf", "+inf"), ("-inf", "-inf"),
             ("-inf", "nan"), ("+inf", -1e30), (2e38, 2e38), (1e38, 1e38)]
    compression = GradientCompression("nuqsgd", 4, bucket_size=64)
    rng = np.random.default_rng(3)
    g = rng.standard_normal((2, 128)).astype(np.float32)
    for position, pair in enumerate(pairs):
        for replica, value in enumerate(pair):
            g[replica, 7 * position] = NONFINITE[value] if isinstance(value, str) else np.float32(value)
    payloads = tf.stack([encode(g[r].reshape(2, 64), compression, seed_of(r, 0)) for r in range(2)])
    total = decode_sum(payloads, compression, 2).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        float_sum = g[0] + g[1]
    nonfinite = ~np.isfinite(g).all(axis=0)
    np.testing.assert_array_equal(kinds_of(total[nonfinite]), kinds_of(float_sum[nonfinite]))
    assert np.all(np.isfinite(total[np.isfinite(float_sum) & ~nonfinite]))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = ref.decode_sum(payloads.numpy(), "nuqsgd", 4, 2, 64)
    np.testing.assert_array_equal(total, expected)
