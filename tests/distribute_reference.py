"""Independent NumPy reference of the gradient compressors (written from the formulas, not the TF code).

Nothing here imports TensorFlow or n2uq_tf: this module is the oracle that
``tests/test_distribute_compressors.py`` holds ``n2uq_tf.distribute.compressors`` against.

Scheme (NUQSGD, Ramezani-Kebrya et al., arXiv 1908.06077; QSGD, Alistarh et al. 2017), b bits per value:

* a vector is cut into buckets of B values (the last one zero-padded); each bucket has a norm:
  L2 for nuqsgd and qsgd, max |v| for qsgdinf; r_i = |v_i| / norm lies in [0, 1];
* 2^(b-1) magnitude levels: nuqsgd {0, 2^-(K-1), ..., 1/4, 1/2, 1} with K = 2^(b-1) - 1
  (the paper's (0, 1/2^s, ..., 1/2, 1) with s = K - 1), qsgd / qsgdinf {0, 1/s, 2/s, ..., 1}
  with s = 2^(b-1) - 1;
* j is the bracket levels[j] <= r < levels[j+1] (r = 1 takes the top bracket); with
  p = (r - levels[j]) / (levels[j+1] - levels[j]) the level index is j + 1 if u < p else j, u ~ U[0, 1);
* code = (sign << (b - 1)) | index, sign = 1 for negative values; decoded value
  (-1)^sign * levels[index] * norm. A zero bucket has norm 0 and codes 0;
* E[Q(v)_i] = v_i and Var[Q(v)_i] = norm^2 (l_{j+1} - r)(r - l_j);
* codes are packed 32 / b to a 32-bit word, code i of a group at bit offset b * i (little end first),
  and the word is read as a two's-complement int32.

Arithmetic follows what a float32 implementation is expected to compute: r = float32(|v|) /
float32(norm) and p = (r - lo) / (hi - lo) in float32; the L2 norm is summed in float64 and rounded
once to float32 (the correctly rounded norm, so r <= 1 always holds for it); an L2 norm above the
largest float32 is that largest float32 (still >= max |v|, so r <= 1 and every decoded value is finite).

Non-finite values (NaN, +Inf, -Inf) must come out of decoding where they went in, and nowhere else:

* they count as 0 in their bucket's norm and ratios, and get the marker code 2^(b-1) (sign 1, level 0);
* a bucket holding any of them is sent with its norm negated (sign bit set; -0.0 for a zero norm), and
  in it a negative value whose level index is 0 gets sign 0, so that the marker means only "non-finite";
* after the norms, a side list of 64 two-bit kinds (0 NaN, 1 +Inf, 2 -Inf) of the payload's first 64
  non-finite values in position order, packed as codes are (4 words);
* decoding gives a marker in a negated-norm bucket the listed kind, NaN past the 64th.
"""

from fractions import Fraction

import numpy as np

METHODS = ("nuqsgd", "qsgd", "qsgdinf")
BITS = (2, 4, 8)
FLOAT32_MAX = np.finfo(np.float32).max
SIDE_LIST_KINDS = 64
KIND_VALUE = {0: np.float32(np.nan), 1: np.float32(np.inf), 2: np.float32(-np.inf), 3: np.float32(np.nan)}


def num_levels(bits):
    """2^(b-1) magnitude levels: one bit of the code is the sign."""
    return 2 ** (bits - 1)


def exact_levels(method, bits):
    """The paper's level set as exact fractions, ascending."""
    n = num_levels(bits)
    if method == "nuqsgd":
        k = n - 1  # K: number of nonzero levels, 1 = 2^0 down to 2^-(K-1)
        return [Fraction(0)] + [Fraction(1, 2 ** e) for e in range(k - 1, -1, -1)]
    if method in ("qsgd", "qsgdinf"):
        s = n - 1
        return [Fraction(j, s) for j in range(s + 1)]
    raise ValueError(method)


def levels(method, bits):
    """float32 levels (each the float32 nearest to the exact fraction)."""
    return np.array([float(f) for f in exact_levels(method, bits)], np.float32)


def norm_kind(method):
    return "max" if method == "qsgdinf" else "l2"


def bucket_norms(buckets, method):
    """float32 [nb] norms of float32 [nb, B] buckets, over their finite values (non-negative)."""
    b = np.asarray(buckets, np.float32)
    b = np.where(np.isfinite(b), b, np.float32(0))
    if norm_kind(method) == "max":
        return np.max(np.abs(b), axis=1).astype(np.float32)  # exact
    l2 = np.sqrt(np.sum(b.astype(np.float64) ** 2, axis=1))
    return np.minimum(l2, np.float64(FLOAT32_MAX)).astype(np.float32)


def ratios(buckets, norms):
    """r = |v| / norm in float32; 0 for a zero bucket. Clipped to 1 (a no-op for correctly rounded norms)."""
    b = np.abs(np.asarray(buckets, np.float32))
    n = np.asarray(norms, np.float32)[:, None]
    safe = np.where(n > 0, n, np.float32(1))
    r = (b / safe).astype(np.float32)
    r = np.where(n > 0, r, np.float32(0))
    return np.minimum(r, np.float32(1)).astype(np.float32)


def brackets(r, lv):
    """(j, p): bracket index with lv[j] <= r < lv[j+1] (r = 1 -> top bracket) and the round-up probability."""
    lv = np.asarray(lv, np.float32)
    j = np.searchsorted(lv, r, side="right") - 1
    j = np.clip(j, 0, len(lv) - 2)
    lo, hi = lv[j], lv[j + 1]
    p = ((r - lo) / (hi - lo)).astype(np.float32)
    return j.astype(np.int64), p


def quantize(buckets, method, bits, uniform, return_details=False):
    """Codes (int64 [nb, B]) and norms (float32 [nb]) given the U[0,1) draws `uniform` of the same shape.

    A bucket with non-finite values has its norm negated and those values' codes are the marker.
    """
    buckets = np.asarray(buckets, np.float32)
    finite = np.isfinite(buckets)
    values = np.where(finite, buckets, np.float32(0))
    norms = bucket_norms(values, method)
    r = ratios(values, norms)
    j, p = brackets(r, levels(method, bits))
    index = j + (np.asarray(uniform, np.float32) < p)
    sign = (values < 0).astype(np.int64)
    codes = (sign << (bits - 1)) | index
    marker = 1 << (bits - 1)
    for b in np.flatnonzero(~finite.all(axis=1)):
        codes[b][codes[b] == marker] = 0  # a negative value at level 0: +0, so the marker is free
        codes[b][~finite[b]] = marker
        norms[b] = -norms[b]
    if return_details:
        return codes, norms, {"r": r, "j": j, "p": p}
    return codes, norms


def dequantize(codes, norms, method, bits):
    """float32 values (-1)^sign * levels[index] * |norm|, [..., nb, B] codes with [..., nb] norms;
    NaN at markers of negated-norm buckets."""
    codes = np.asarray(codes, np.int64)
    norms = np.asarray(norms, np.float32)
    sign = (codes >> (bits - 1)) & 1
    index = codes & (num_levels(bits) - 1)
    magnitude = levels(method, bits)[index] * np.abs(norms)[..., None]
    out = np.where(sign == 1, -magnitude, magnitude).astype(np.float32)
    out[np.signbit(norms)[..., None] & (codes == 1 << (bits - 1))] = np.nan
    return out


def side_list(buckets):
    """The 64 two-bit kinds of the first non-finite values of [nb, B] buckets in position order, 0-padded."""
    kinds = []
    for v in np.asarray(buckets, np.float32).reshape(-1):
        if len(kinds) == SIDE_LIST_KINDS:
            break
        if np.isnan(v):
            kinds.append(0)
        elif v == np.inf:
            kinds.append(1)
        elif v == -np.inf:
            kinds.append(2)
    return kinds + [0] * (SIDE_LIST_KINDS - len(kinds))


def encode_payload(buckets, method, bits, uniform):
    """int32 payload words: packed codes, the norms' bits, the packed side list."""
    codes, norms = quantize(buckets, method, bits, uniform)
    return np.concatenate([pack(codes, bits), np.asarray(norms, np.float32).view(np.int32),
                           pack(side_list(buckets), 2)]).astype(np.int32)


def decode_payload(words, method, bits, num_buckets, bucket_size):
    """float32 [num_buckets * bucket_size] values of one payload (inverse of encode_payload)."""
    words = np.asarray(words, np.int32)
    code_words = num_buckets * bucket_size * bits // 32
    codes = unpack(words[:code_words], bits).reshape(num_buckets, bucket_size)
    norms = words[code_words:code_words + num_buckets].view(np.float32)
    kinds = unpack(words[code_words + num_buckets:], 2)
    assert len(kinds) == SIDE_LIST_KINDS
    out = dequantize(codes, norms, method, bits).reshape(-1)
    markers = np.flatnonzero(np.repeat(np.signbit(norms), bucket_size) & (codes.reshape(-1) == 1 << (bits - 1)))
    for rank, position in enumerate(markers):
        out[position] = KIND_VALUE[int(kinds[rank])] if rank < SIDE_LIST_KINDS else np.float32(np.nan)
    return out


def decode_sum(payloads, method, bits, num_buckets, bucket_size):
    """Sum of decoded payloads in float32, replica 0 first, then 1, ..."""
    total = decode_payload(payloads[0], method, bits, num_buckets, bucket_size)
    for words in payloads[1:]:
        total = (total + decode_payload(words, method, bits, num_buckets, bucket_size)).astype(np.float32)
    return total


def pack(codes, bits):
    """int32 words: code i of each group of 32 / b at bit offset b * i, explicit integer arithmetic."""
    per_word = 32 // bits
    flat = [int(c) for c in np.asarray(codes).reshape(-1)]
    assert len(flat) % per_word == 0
    words = []
    for start in range(0, len(flat), per_word):
        word = 0
        for i, code in enumerate(flat[start:start + per_word]):
            assert 0 <= code < 2 ** bits
            word += code * 2 ** (bits * i)
        assert 0 <= word < 2 ** 32
        words.append(word - 2 ** 32 if word >= 2 ** 31 else word)  # two's complement view
    return np.array(words, np.int64).astype(np.int32)


def unpack(words, bits):
    """Inverse of pack: [n] int32 words -> [n * 32 / b] codes."""
    per_word = 32 // bits
    out = []
    for w in np.asarray(words).reshape(-1):
        word = int(w) % 2 ** 32  # unsigned view
        for i in range(per_word):
            out.append((word // 2 ** (bits * i)) % 2 ** bits)
    return np.array(out, np.int64)


def bucketize(vector, bucket_size):
    """[nb, B] float32: a 1-D vector zero-padded to whole buckets."""
    v = np.asarray(vector, np.float32).reshape(-1)
    nb = -(-v.size // bucket_size)
    out = np.zeros(nb * bucket_size, np.float32)
    out[:v.size] = v
    return out.reshape(nb, bucket_size)


def quantize_vector(vector, method, bits, bucket_size, uniform):
    """Reference decoded Q(v) for a 1-D vector, `uniform` of the padded [nb, B] shape."""
    v = np.asarray(vector, np.float32).reshape(-1)
    buckets = bucketize(v, bucket_size)
    codes, norms = quantize(buckets, method, bits, uniform)
    return dequantize(codes, norms, method, bits).reshape(-1)[:v.size]


def coordinate_variance(vector, method, bits, bucket_size):
    """float64 per-coordinate Var[Q(v)_i] = norm^2 (l_{j+1} - r)(r - l_j), plus the spacing norm (hi - lo).

    Returns (variance, step, p) over the padded buckets' flat layout, cut to the vector's size:
    step is the distance between the two values Q(v)_i can take, p the probability of the upper one.
    """
    v = np.asarray(vector, np.float32).reshape(-1)
    buckets = bucketize(v, bucket_size)
    norms = bucket_norms(buckets, method)
    r = ratios(buckets, norms)
    lv = levels(method, bits)
    j, p = brackets(r, lv)
    lo, hi = lv[j].astype(np.float64), lv[j + 1].astype(np.float64)
    n = norms.astype(np.float64)[:, None]
    r64 = r.astype(np.float64)
    var = n ** 2 * (hi - r64) * (r64 - lo)
    step = n * (hi - lo) * np.ones_like(r64)
    cut = slice(0, v.size)
    return var.reshape(-1)[cut], step.reshape(-1)[cut], p.astype(np.float64).reshape(-1)[cut]


def expected_relative_variance(vector, method, bits, bucket_size):
    """Exact E||Q(v) - v||^2 / ||v||^2 from the variance formula."""
    v = np.asarray(vector, np.float64).reshape(-1)
    var, _, _ = coordinate_variance(vector, method, bits, bucket_size)
    return float(np.sum(var) / np.sum(v ** 2))


def squared_error_variance(vector, method, bits, bucket_size):
    """Exact Var[||Q(v) - v||^2] for one draw (coordinates round independently).

    Q(v)_i - v_i is +step(1-p) w.p. p and -step p w.p. 1-p, so its square is two-valued with
    variance p(1-p) (step^2 ((1-p)^2 - p^2))^2 = p (1-p) step^4 (1 - 2p)^2.
    """
    _, step, p = coordinate_variance(vector, method, bits, bucket_size)
    return float(np.sum(p * (1 - p) * step ** 4 * (1 - 2 * p) ** 2))


class Layout:
    """Reference bucket layout: each tensor's floor(size / B) whole buckets are its own, in order; the
    rest (tails of large tensors, small tensors whole) follow back to back, in order, in shared
    buckets; zero padding only at the end. Kept as an index map: flat position -> (tensor, element)."""

    def __init__(self, sizes, bucket_size):
        self.sizes = [int(s) for s in sizes]
        self.bucket_size = bucket_size
        owner, element = [], []
        for i, size in enumerate(self.sizes):
            whole = (size // bucket_size) * bucket_size
            owner += [i] * whole
            element += list(range(whole))
        for i, size in enumerate(self.sizes):
            whole = (size // bucket_size) * bucket_size
            owner += [i] * (size - whole)
            element += list(range(whole, size))
        self.num_buckets = int(np.ceil(len(owner) / bucket_size))
        self.padded_size = self.num_buckets * bucket_size
        pad = self.padded_size - len(owner)
        self.owner = np.array(owner + [-1] * pad)
        self.element = np.array(element + [-1] * pad)

    def buckets_of(self, i):
        """The set of bucket indices tensor i touches."""
        return set((np.flatnonzero(self.owner == i) // self.bucket_size).tolist())

    def own_buckets_of(self, i):
        """The buckets holding only tensor i's values (its whole buckets)."""
        return {b for b in self.buckets_of(i)
                if np.all(self.owner[b * self.bucket_size:(b + 1) * self.bucket_size] == i)}

    def flatten(self, arrays):
        flat = np.zeros(self.padded_size, np.float32)
        arrays = [np.asarray(a, np.float32).reshape(-1) for a in arrays]
        for position, (i, e) in enumerate(zip(self.owner, self.element)):
            if i >= 0:
                flat[position] = arrays[i][e]
        return flat.reshape(self.num_buckets, self.bucket_size)
