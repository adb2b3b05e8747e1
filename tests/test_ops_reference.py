"""n2uq_tf.ops against an independent NumPy reference (tests/numpy_reference.py).

The reference is written from the design spec, not from ops.py. What is checked:

1. forward levels/values vs float32 reference (mismatch allowed only within a
   rounding-order tolerance of a threshold, see ``threshold_tolerance``), and an
   exactly representable (dyadic) case where everything must match bit for bit;
2. every gradient vs the analytic spec formulas (float64);
3. central finite differences of the G-STE surrogate (float64) vs the op's gradients;
4. the weight quantizer (values, gradient, channel axes, depthwise);
5. hypothesis properties;
6. float16 / bfloat16 inputs;
7. bad ``bits``;
8. tf.function (graph mode) vs eager;
9. XLA (``tf.function(jit_compile=True)``) vs the same op without XLA.

When ops.n2uq_quantize has an ``implementation`` switch and a non-reference
(fused) kernel is active, every activation test runs for the default and for
``implementation="reference"``; every activation test also runs compiled by XLA
("xla": the default implementation inside ``tf.function(jit_compile=True)``).
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numpy_reference as ref
from n2uq_tf.quantization_math import n2uq as ops

F32 = np.float32
ACT_BITS = [1, 2, 3, 4]
W_BITS = [1, 2, 3, 4]
X_SHAPES = [(257,), (16, 33), (2, 5, 7, 3), (2, 3, 4, 5, 6)]


def _implementations():
    params = inspect.signature(ops.n2uq_quantize).parameters
    if "implementation" not in params:
        return ["default"]
    active = getattr(ops, "active_implementation", lambda: "unknown")()
    return (["default", "reference"] if active != "reference" else ["default"]) + ["xla"]


IMPLS = _implementations()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def xla(fn):
    """fn compiled by XLA; arguments become tensors (a numpy scalar would be a Python constant)."""
    compiled = tf.function(fn, jit_compile=True)
    return lambda *args: compiled(*[a if isinstance(a, (tf.Tensor, tf.Variable)) else tf.constant(a) for a in args])


def quant(x, s, a, b1, b2, bits, impl="default"):
    if impl == "xla":
        return xla(lambda *args: ops.n2uq_quantize(*args, bits))(x, s, a, b1, b2)
    kw = {} if impl == "default" else {"implementation": impl}
    return ops.n2uq_quantize(x, s, a, b1, b2, bits, **kw)


# --------------------------------------------------------------------------- data

def make_params(rng, bits, floored=False):
    """Random start in [-0.3, 0.3], intervals around delta, positive betas.

    With floored=True some intervals are set <= 1e-3 (incl. exactly the float32
    1e-3, zero and a negative value): floored to 1e-3 in the forward, no gradient.
    """
    n = ref.num_levels(bits)
    delta = ref.delta_of(bits)
    s = F32(rng.uniform(-0.3, 0.3))
    a = (delta * rng.uniform(0.4, 1.6, n)).astype(F32)
    if floored:
        specials = [F32(5e-4), F32(1e-3), F32(0.0), F32(-0.05)]
        idx = rng.permutation(n)[: max(1, n // 3)]
        for k, i in enumerate(idx):
            a[i] = specials[k % len(specials)]
    b1 = F32(rng.uniform(0.6, 1.8))
    b2 = F32(rng.uniform(0.6, 1.8))
    return s, a, b1, b2


def make_x(rng, shape, s, a, b1, margin=0.0, spread=0.5):
    """x_in with beta1 * x_in spanning [s - spread, d_n + spread]; when margin > 0
    every element is kept at least `margin` (float64) away from every d_i and T_i."""
    d = ref.bounds_f32(s, a).astype(np.float64)
    lo, hi = d[0] - spread, d[-1] + spread
    x = (rng.uniform(lo, hi, shape) / float(b1)).astype(F32)
    for _ in range(100):
        if margin <= 0:
            break
        dist = ref.boundary_distance64(float(b1) * x.astype(np.float64), s, a)
        bad = dist < margin
        if not bad.any():
            break
        x[bad] = (rng.uniform(lo, hi, int(bad.sum())) / float(b1)).astype(F32)
    else:
        raise AssertionError("could not draw x away from the boundaries")
    return x


def levels_from_output(y, b2, bits):
    scale = float(F32(F32(b2) * F32(ref.delta_of(bits))))
    lv = np.asarray(y, np.float64) / scale
    r = np.rint(lv)
    assert np.all(np.abs(lv - r) < 1e-3), "output is not an integer multiple of beta2 * delta"
    return r.astype(np.int64)


def run_grads(x, s, a, b1, b2, bits, g, impl="default"):
    xv = tf.Variable(x)
    sv, av, b1v, b2v = tf.Variable(s), tf.Variable(a), tf.Variable(b1), tf.Variable(b2)

    def forward_backward():
        with tf.GradientTape() as tape:
            y = quant(xv, sv, av, b1v, b2v, bits, "default" if impl == "xla" else impl)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * g)
        return y, tape.gradient(loss, [xv, sv, av, b1v, b2v])

    y, grads = (tf.function(forward_backward, jit_compile=True) if impl == "xla" else forward_backward)()
    names = ["x", "start", "intervals", "beta1", "beta2"]
    out = {}
    for nme, gr in zip(names, grads):
        assert gr is not None, f"no gradient for {nme}"
        out[nme] = np.asarray(tf.convert_to_tensor(gr), np.float64)
    return y.numpy(), out


def assert_sum_close(got, want, scale, name, rtol=1e-4):
    got, want, scale = np.asarray(got, np.float64), np.asarray(want, np.float64), np.asarray(scale, np.float64)
    err = np.abs(got - want)
    tol = rtol * (scale + np.abs(want)) + 1e-6
    assert np.all(err <= tol), f"{name}: got {got}, want {want}, |err| {err}, tol {tol}"


# --------------------------------------------------------------------------- 1. forward

@pytest.mark.parametrize("floored", [False, True], ids=["plain", "floored"])
@pytest.mark.parametrize("shape", X_SHAPES, ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("bits", ACT_BITS)
def test_forward_matches_reference(bits, shape, floored, impl):
    rng = np.random.default_rng(1000 * bits + 10 * len(shape) + floored)
    s, a, b1, b2 = make_params(rng, bits, floored)
    x = make_x(rng, shape, s, a, b1)
    # add elements that sit on / next to every float32 threshold (after scaling by beta1)
    t = ref.thresholds_f32(s, a)
    near = np.concatenate([t, np.nextafter(t, F32(np.inf)), np.nextafter(t, F32(-np.inf))]) / b1
    flat = x.reshape(-1)
    flat[: min(flat.size, near.size)] = near.astype(F32)[: flat.size]
    y = quant(x, s, a, b1, b2, bits, impl).numpy()
    assert y.dtype == np.float32 and y.shape == x.shape

    want = ref.levels_f32(x, s, a, b1)
    got = levels_from_output(y, b2, bits)
    tol = ref.threshold_tolerance(s, a, bits)
    dist = ref.threshold_distance_f32(x, s, a, b1)
    bad = (got != want) & (dist > tol)
    assert not bad.any(), (
        f"levels differ away from thresholds: x={x[bad][:5]}, want {want[bad][:5]}, got {got[bad][:5]}")
    assert np.all(np.abs(got - want) <= 1)
    # the output is exactly beta2 * delta * level (float32); level 0 is exactly +0.0
    np.testing.assert_array_equal(y, ref.output_from_levels_f32(got, b2, bits))
    assert not np.signbit(y[got == 0]).any()


DYADIC = [
    # bits, start, intervals: every d_i and T_i exactly representable in float32
    (1, 0.0, [2.0]),
    (2, -0.25, [0.5, 0.25, 1.0]),
    (3, 0.125, [0.25, 0.5, 0.125, 0.25, 0.25, 0.5, 0.0625]),
]


@pytest.mark.parametrize("bits,start,intervals", DYADIC)
def test_exact_thresholds_and_boundaries(bits, start, intervals, impl):
    """Exact float32 thresholds: strict '>' at T_i, segment i = (d_{i-1}, d_i]."""
    s, a = F32(start), np.asarray(intervals, F32)
    b1, b2 = F32(1.0), F32(1.25)
    d, t = ref.bounds_f32(s, a), ref.thresholds_f32(s, a)
    pts = np.concatenate([d, t])
    x = np.unique(np.concatenate([pts, np.nextafter(pts, F32(np.inf)), np.nextafter(pts, F32(-np.inf)),
                                  [d[0] - 1, d[-1] + 1]]).astype(F32))
    # TensorFlow runs its CPU kernels with denormals flushed to zero (FTZ/DAZ), so a
    # subnormal x (nextafter(0)) behaves as 0; that is TF's float environment, not the op.
    x = x[(x == 0) | (np.abs(x) >= np.finfo(F32).tiny)]
    g = np.linspace(0.5, 1.5, x.size).astype(F32)
    y, gr = run_grads(x, s, a, b1, b2, bits, g, impl)
    np.testing.assert_array_equal(y, ref.quantize_f32(x, s, a, b1, b2, bits))
    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    np.testing.assert_allclose(gr["x"], want["x"], rtol=1e-5, atol=0)
    # explicit spot checks of the boundary convention
    n, delta = ref.num_levels(bits), ref.delta_of(bits)
    af = ref.floored_intervals_f32(a)
    for i in range(n + 1):
        k = int(np.flatnonzero(x == d[i])[0])
        expect = 0.0 if i == 0 else g[k] * b2 * delta / af[i - 1]
        assert gr["x"][k] == pytest.approx(expect, rel=1e-5), f"dy/dx at x = d_{i} = {d[i]}"
    k_above = int(np.flatnonzero(x == np.nextafter(d[-1], F32(np.inf)))[0])
    assert gr["x"][k_above] == 0.0
    for i in range(n):
        k = int(np.flatnonzero(x == t[i])[0])
        assert levels_from_output(y[k:k + 1], b2, bits)[0] == i, f"x = T_{i + 1} exactly must not count"


def test_floored_interval_still_shapes_thresholds(impl):
    """a = [0.5, -0.5, 0.75], s = 0: the middle interval is floored to 1e-3, so
    d = [0, 0.5, 0.501, 1.251] and T = [0.25, 0.5005, 0.876] (not 0.25 / 0.25 / ...):
    the floored segment is real in the forward and the backward (slope delta / 1e-3),
    but the stored interval gets no gradient. (Not dyadic: compared with tolerance.)"""
    bits, s, a = 2, F32(0), np.array([0.5, -0.5, 0.75], F32)
    b2 = F32(1.0)
    x = np.array([-0.1, 0.3, 0.5002, 0.5008, 0.8, 0.9, 1.2, 1.3], F32)
    g = np.ones(x.size, F32)
    y, gr = run_grads(x, s, a, F32(1), b2, bits, g, impl)
    np.testing.assert_array_equal(levels_from_output(y, b2, bits), [0, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(levels_from_output(y, b2, bits), ref.levels_f32(x, s, a, 1))
    delta = ref.delta_of(bits)
    want = ref.gradients64(x, g, s, a, F32(1), b2, bits)
    np.testing.assert_allclose(gr["x"], [0, delta / 0.5, delta / 1e-3, delta / 1e-3, delta / 0.75,
                                         delta / 0.75, delta / 0.75, 0], rtol=1e-5)
    np.testing.assert_allclose(gr["x"], want["x"], rtol=1e-5)
    assert gr["intervals"][1] == 0.0 and gr["intervals"][0] != 0.0 and gr["intervals"][2] != 0.0
    assert_sum_close(gr["intervals"], want["intervals"], 1e3, "intervals")


@pytest.mark.parametrize("bits", [5, 8])
def test_high_bits(bits, impl):
    """More than 16 thresholds (other code paths are allowed there): same contract."""
    rng = np.random.default_rng(bits)
    s, a, b1, b2 = make_params(rng, bits, floored=True)
    x = make_x(rng, (12, 50), s, a, b1)
    y = quant(x, s, a, b1, b2, bits, impl).numpy()
    got, want = levels_from_output(y, b2, bits), ref.levels_f32(x, s, a, b1)
    far = ref.threshold_distance_f32(x, s, a, b1) > ref.threshold_tolerance(s, a, bits)
    np.testing.assert_array_equal(got[far], want[far])
    assert np.all(np.abs(got - want) <= 1)
    x = make_x(rng, (12, 50), s, a, b1, margin=1e-5)
    g = rng.normal(size=x.shape).astype(F32)
    _, gr = run_grads(x, s, a, b1, b2, bits, g, impl)
    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    scale = ref.gradient_scales64(x, g, s, a, b1, b2, bits)
    np.testing.assert_allclose(gr["x"], want["x"], rtol=1e-5, atol=1e-7 * np.max(np.abs(want["x"])))
    for name in ("start", "beta1", "beta2", "intervals"):
        assert_sum_close(gr[name], want[name], scale[name], name)


# --------------------------------------------------------------------------- 2. analytic gradients

@pytest.mark.parametrize("floored", [False, True], ids=["plain", "floored"])
@pytest.mark.parametrize("shape", [(301,), (3, 4, 5, 6)], ids=["rank1", "rank4"])
@pytest.mark.parametrize("bits", ACT_BITS)
def test_gradients_match_formulas(bits, shape, floored, impl):
    rng = np.random.default_rng(7 + 100 * bits + len(shape) + 50 * floored)
    s, a, b1, b2 = make_params(rng, bits, floored)
    x = make_x(rng, shape, s, a, b1, margin=1e-4)
    g = rng.normal(size=shape).astype(F32)
    d = ref.bounds_f32(s, a).astype(np.float64)
    xs = float(b1) * x.astype(np.float64)
    assert (xs < d[0]).any() and (xs > d[-1]).any()
    if d[-1] - d[0] > 0.01:           # (bits=1 floored: the only segment is 1e-3 wide)
        assert ((xs > d[0]) & (xs < d[-1])).any()

    _, got = run_grads(x, s, a, b1, b2, bits, g, impl)
    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    scale = ref.gradient_scales64(x, g, s, a, b1, b2, bits)
    np.testing.assert_allclose(got["x"], want["x"], rtol=1e-5, atol=1e-7 * np.max(np.abs(want["x"])))
    for name in ("start", "beta1", "beta2", "intervals"):
        assert np.shape(got[name]) == np.shape(want[name]), name
        assert_sum_close(got[name], want[name], scale[name], name)
    stored_floor = ~(a > F32(1e-3))
    assert np.all(got["intervals"][stored_floor] == 0.0), "a floored interval must get no gradient"
    if (~stored_floor).any():
        assert np.any(got["intervals"][~stored_floor] != 0.0)


def test_gradient_for_unconnected_elements_is_zero(impl):
    """All x below s: output 0 and every gradient 0; all above d_n: only beta2 gets a gradient."""
    rng = np.random.default_rng(3)
    s, a, b1, b2 = make_params(rng, 2)
    d = ref.bounds_f32(s, a)
    below = (np.linspace(d[0] - 2, d[0] - 0.01, 50) / b1).astype(F32)
    above = (np.linspace(d[-1] + 0.01, d[-1] + 2, 50) / b1).astype(F32)
    g = np.ones(50, F32)
    y, gr = run_grads(below, s, a, b1, b2, 2, g, impl)
    assert np.all(y == 0.0)
    for name in gr:
        assert np.all(gr[name] == 0.0), name
    y, gr = run_grads(above, s, a, b1, b2, 2, g, impl)
    np.testing.assert_array_equal(y, ref.output_from_levels_f32(np.full(50, 3), b2, 2))
    for name in ("x", "start", "intervals", "beta1"):
        assert np.all(gr[name] == 0.0), name
    assert gr["beta2"] == pytest.approx(50 * 2.0, rel=1e-6)       # sum g * delta * n


@pytest.mark.parametrize("bits", [2, 3])
def test_large_tensor_gradients_and_determinism(bits, impl):
    """~300k elements, odd length (vector tails, blocked/threaded reductions): same
    gradients as the reference, and bit-identical on a second run."""
    rng = np.random.default_rng(500 + bits)
    s, a, b1, b2 = make_params(rng, bits, floored=bits == 3)
    x = make_x(rng, (3, 100003), s, a, b1, margin=1e-5)
    g = rng.normal(size=x.shape).astype(F32)
    y, gr = run_grads(x, s, a, b1, b2, bits, g, impl)
    np.testing.assert_array_equal(levels_from_output(y, b2, bits), ref.levels_f32(x, s, a, b1))
    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    scale = ref.gradient_scales64(x, g, s, a, b1, b2, bits)
    np.testing.assert_allclose(gr["x"], want["x"], rtol=1e-5, atol=1e-7 * np.max(np.abs(want["x"])))
    for name in ("start", "beta1", "beta2", "intervals"):
        assert_sum_close(gr[name], want[name], scale[name], name)
    y2, gr2 = run_grads(x, s, a, b1, b2, bits, g, impl)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(gr2["x"], gr["x"])
    # Bit-identical parameter gradients are only promised by the fused kernel
    # ("deterministic block reductions"); the pure-TF path sums with tf.math.bincount,
    # whose multi-threaded float accumulation varies between runs (~1e-5 relative).
    if impl == "default" and getattr(ops, "active_implementation", lambda: "reference")() == "fused":
        for name in gr:
            np.testing.assert_array_equal(gr2[name], gr[name], err_msg=f"{name} not deterministic")


# --------------------------------------------------------------------------- 3. finite differences of the surrogate

@pytest.mark.parametrize("floored", [False, True], ids=["plain", "floored"])
@pytest.mark.parametrize("bits", ACT_BITS)
def test_surrogate_finite_differences(bits, floored, impl):
    """Central differences of the float64 G-STE surrogate equal the op's gradients.

    The surrogate is piecewise linear in every argument, so away from the segment
    bounds (margin 1e-4 >> eps 1e-6) central differences are exact up to float64
    rounding. beta2 is the exception by design: its gradient is the forward scale
    delta * level, not d(surrogate)/d(beta2) (the surrogate is the backward path
    only), so it is compared with delta * sum(g * level) instead.
    """
    rng = np.random.default_rng(11 + bits + 40 * floored)
    s, a, b1, b2 = make_params(rng, bits, floored)
    if floored:
        a[a == F32(1e-3)] = F32(4e-4)           # exactly-at-floor is not differentiable; tested above
    shape = (9, 23)
    x = make_x(rng, shape, s, a, b1, margin=1e-4)
    g = rng.normal(size=shape).astype(F32)
    _, got = run_grads(x, s, a, b1, b2, bits, g, impl)

    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    s64, a64, b164, b264 = float(s), a.astype(np.float64), float(b1), float(b2)
    eps = 1e-6

    def loss(xx=x64, ss=s64, aa=a64, bb1=b164):
        return g64 * ref.surrogate64(xx, ss, aa, bb1, b264, bits)

    fd_x = (loss(xx=x64 + eps) - loss(xx=x64 - eps)) / (2 * eps)      # elementwise (diagonal)
    fd_s = (loss(ss=s64 + eps).sum() - loss(ss=s64 - eps).sum()) / (2 * eps)
    fd_b1 = (loss(bb1=b164 + eps).sum() - loss(bb1=b164 - eps).sum()) / (2 * eps)
    fd_a = np.empty(a.size)
    for i in range(a.size):
        e = np.zeros(a.size)
        e[i] = eps
        fd_a[i] = (loss(aa=a64 + e).sum() - loss(aa=a64 - e).sum()) / (2 * eps)

    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    scale = ref.gradient_scales64(x, g, s, a, b1, b2, bits)
    # the reference formulas themselves are the derivative of the surrogate
    np.testing.assert_allclose(want["x"], fd_x, rtol=1e-7, atol=1e-9)
    assert_sum_close(want["start"], fd_s, scale["start"], "ref start", rtol=1e-7)
    assert_sum_close(want["beta1"], fd_b1, scale["beta1"], "ref beta1", rtol=1e-7)
    assert_sum_close(want["intervals"], fd_a, scale["intervals"], "ref intervals", rtol=1e-7)
    # and so is the op
    np.testing.assert_allclose(got["x"], fd_x, rtol=1e-5, atol=1e-7 * np.max(np.abs(fd_x)))
    assert_sum_close(got["start"], fd_s, scale["start"], "start")
    assert_sum_close(got["beta1"], fd_b1, scale["beta1"], "beta1")
    assert_sum_close(got["intervals"], fd_a, scale["intervals"], "intervals")
    lv = ref.levels64(b164 * x64, s, a)
    assert_sum_close(got["beta2"], ref.delta_of(bits) * np.sum(g64 * lv), scale["beta2"], "beta2")


# --------------------------------------------------------------------------- 4. weights

W_CASES = [
    ("dense", (37, 11), -1),
    ("conv2d", (3, 3, 5, 8), -1),
    ("conv3d", (2, 3, 2, 4, 6), -1),
    ("depthwise", (3, 3, 6, 2), (-2, -1)),
    ("depthwise_pos", (5, 5, 4, 1), (2, 3)),
    ("rank1", (64,), -1),
    ("axis0", (7, 9), 0),
]


def assert_close_in_alpha_ulps(got, want, alpha, ulps, msg=""):
    """|got - want| <= ulps * eps32 * alpha (elementwise, alpha broadcast).

    The natural unit for the weight quantizer: Wq = alpha * (2k/n - 1), and the float32
    evaluation of 2k/n - 1 cancels near 0, so a few-ulp change of an intermediate moves a
    small level by many of its own ulps while staying within eps32 * alpha.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = ulps * float(np.finfo(F32).eps) * np.broadcast_to(np.asarray(alpha, np.float64), got.shape)
    err = np.abs(got - want)
    bad = err > tol
    assert not bad.any(), (f"{msg}: {bad.sum()} elements off by more than {ulps} * eps32 * alpha; got {got[bad][:4]}, "
                           f"want {want[bad][:4]}, err / (eps32 * alpha) {(err / tol * ulps)[bad][:4]}")


def _weights(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, shape) * rng.uniform(0.2, 3.0, shape[-1:])   # per-channel spread
    return w.astype(F32)


@pytest.mark.parametrize("case", W_CASES, ids=[c[0] for c in W_CASES])
@pytest.mark.parametrize("bits", W_BITS)
def test_weight_quantizer(bits, case):
    _, shape, axis = case
    w = _weights(shape, 100 * bits + len(shape))
    n = ref.num_levels(bits)
    wv = tf.Variable(w)
    g = np.random.default_rng(bits).normal(size=shape).astype(F32)
    with tf.GradientTape() as tape:
        q = ops.quantize_weights(wv, bits, channel_axis=axis)
        loss = tf.reduce_sum(q * g)
    dw = tape.gradient(loss, wv).numpy()
    q = q.numpy()
    assert q.dtype == np.float32 and q.shape == w.shape

    _, alpha, k = ref.quantize_weights64(w, bits, axis)
    _, u = ref.weight_codes64(w, alpha, bits)
    # codes: exact except where the pre-round value is within float32 noise of a .5 tie
    k_got = np.rint((q / alpha + 1.0) * n / 2.0).astype(np.int64)
    tie = np.abs(u - np.floor(u) - 0.5) < 1e-5
    assert np.all((k_got == k) | tie), f"codes differ: w={w[(k_got != k) & ~tie][:5]}"
    assert np.all(np.abs(k_got - k) <= 1)
    # values: the spec formula in float32; alpha's float32 mean may differ by rounding order
    # (float64 formula with the op's codes; then the spec's float32 evaluation, where the codes agree)
    assert_close_in_alpha_ulps(q, alpha * (k_got * 2.0 / n - 1.0), alpha, 3, "vs float64 formula")
    w32 = ref.quantize_weights_f32(w, bits, axis)
    same = k_got == k
    assert_close_in_alpha_ulps(np.where(same, q, 0), np.where(same, w32, 0), alpha, 3, "vs float32 formula")
    # gradient: straight through, divided by the per-channel alpha, no clip mask
    np.testing.assert_allclose(dw, g / alpha, rtol=1e-5, atol=0)
    clipped = np.abs(w / alpha) > 1
    if clipped.any():
        assert np.all(dw[clipped] != 0)

    # per channel: <= 2**bits distinct values, none zero, symmetric set
    keep = ref.normalize_axes(w.ndim, axis)
    red = tuple(i for i in range(w.ndim) if i not in keep)
    last = tuple(range(w.ndim - len(keep), w.ndim))
    channels = int(np.prod([w.shape[i] for i in keep]))
    qc = np.moveaxis(q, keep, last).reshape(-1, channels)
    ac = np.moveaxis(np.broadcast_to(alpha, w.shape), keep, last).reshape(qc.shape)[0]
    assert not (q == 0).any()
    for c in range(qc.shape[1]):
        vals = np.unique(qc[:, c])
        assert vals.size <= 2 ** bits
        lv = np.rint((vals / ac[c] + 1) * n / 2).astype(int)
        assert np.all((lv >= 0) & (lv <= n))
        np.testing.assert_allclose(vals, ac[c] * (lv * 2.0 / n - 1.0), rtol=4e-6)
        # symmetric: codes k and n - k give opposite values (up to float32 rounding)
        for v, kk in zip(vals, lv):
            mirror = vals[lv == n - kk]
            if mirror.size:
                np.testing.assert_allclose(mirror[0], -v, rtol=1e-6)
    if red:
        assert alpha.size == int(np.prod([w.shape[i] for i in keep]))


def test_depthwise_alpha_is_per_output_channel():
    """channel_axis=(-2, -1): alpha over kh, kw only; scaling one (cin, mult) slice
    changes only that slice's scale."""
    w = _weights((3, 3, 4, 2), 5)
    q = ops.quantize_weights(w, 2, channel_axis=(-2, -1)).numpy()
    w2 = w.copy()
    w2[:, :, 1, 0] *= 7.0
    q2 = ops.quantize_weights(w2, 2, channel_axis=(-2, -1)).numpy()
    mask = np.zeros(w.shape, bool)
    mask[:, :, 1, 0] = True
    np.testing.assert_array_equal(q2[~mask], q[~mask])
    np.testing.assert_allclose(q2[mask], 7.0 * q[mask], rtol=2e-6)
    # and differs from the per-`mult` (channel_axis=-1) scale
    q_last = ops.quantize_weights(w, 2, channel_axis=-1).numpy()
    want_last, _, _ = ref.quantize_weights64(w, 2, -1)
    np.testing.assert_allclose(q_last, want_last, rtol=4e-6)   # no ties here: codes agree
    assert not np.allclose(q_last, q)


@pytest.mark.parametrize("bits", W_BITS)
def test_weight_round_half_even(bits):
    """W = 0 is an exact tie: u = (0 + 1) * n / 2 = n / 2 = k + 0.5 in float32.

    Round-half-to-even gives code 0 (-alpha) for 1 bit and code (n + 1) / 2
    (+alpha / n) for 2..4 bits; rounding half away from zero would give +alpha
    for 1 bit, and half-down/floor would give -alpha / n for 2..4 bits.
    """
    n = 2 ** bits - 1
    w = np.array([[0.0, 1.0], [1.0, -3.0], [-2.0, 0.0], [1.0, 0.0]], F32)   # mean|w| = 1 per column
    q = ops.quantize_weights(w, bits).numpy()
    alpha = ref.weight_gamma(bits)
    k_tie = int(np.round(n / 2))
    assert k_tie == (0 if bits == 1 else (n + 1) // 2)
    expect_tie = alpha * (k_tie * 2.0 / n - 1.0)
    np.testing.assert_allclose(q[0, 0], expect_tie, rtol=2e-6)
    np.testing.assert_allclose(q[2:, 1], [expect_tie] * 2, rtol=2e-6)
    np.testing.assert_allclose(q, ref.quantize_weights64(w, bits)[0], rtol=4e-6)


# --------------------------------------------------------------------------- 5. hypothesis properties

def _param_strategy():
    @st.composite
    def params(draw):
        bits = draw(st.integers(1, 4))
        n = 2 ** bits - 1
        s = draw(st.floats(-0.5, 0.5, width=32, allow_subnormal=False))
        a = draw(st.lists(st.floats(-0.125, 0.75, width=32, allow_subnormal=False), min_size=n, max_size=n))
        b1 = draw(st.floats(0.25, 4.0, width=32, allow_subnormal=False))
        b2 = draw(st.floats(0.25, 4.0, width=32, allow_subnormal=False))
        x = draw(st.lists(st.floats(-4.0, 8.0, width=32, allow_subnormal=False), min_size=1, max_size=64))
        return bits, F32(s), np.asarray(a, F32), F32(b1), F32(b2), np.asarray(x, F32)
    return params()


PROP = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])


@PROP
@given(p=_param_strategy())
def test_property_levels_monotone_and_zero(p):
    bits, s, a, b1, b2, x = p
    for impl in IMPLS:
        xs = np.sort(x)
        y = quant(xs, s, a, b1, b2, bits, impl).numpy()
        assert np.unique(y).size <= 2 ** bits
        assert np.all(np.diff(y) >= 0), "output must be non-decreasing in x"
        lv = levels_from_output(y, b2, bits)
        assert np.all((lv >= 0) & (lv <= 2 ** bits - 1))
        # beta1 * x <= s (float32) is below every threshold: exactly +0.0
        below = ref.scaled_input_f32(xs, b1) <= s
        assert np.all(y[below] == 0.0) and not np.signbit(y[below]).any()
        # and it agrees with the reference away from thresholds
        want = ref.levels_f32(xs, s, a, b1)
        far = ref.threshold_distance_f32(xs, s, a, b1) > ref.threshold_tolerance(s, a, bits)
        np.testing.assert_array_equal(lv[far], want[far])


@PROP
@given(bits=st.integers(1, 4),
       x=st.lists(st.floats(-1.0, 3.0, width=32, allow_subnormal=False), min_size=1, max_size=64))
def test_property_equal_intervals_is_plain_ste(bits, x):
    """a_i = delta, s = 0, beta1 = beta2 = 1: uniform quantizer with the plain STE.

    The float32 cumsum of delta is not exactly k * delta, so elements within a
    rounding tolerance of a bound/midpoint (k * delta / 2) are not asserted on.
    Exact ties are checked in test_plain_ste_exact_ties.
    """
    n, delta = 2 ** bits - 1, 2.0 / (2 ** bits - 1)
    x = np.asarray(x, F32)
    a = np.full(n, delta, F32)
    g = np.linspace(-1.0, 2.0, x.size).astype(F32)
    x64 = x.astype(np.float64)
    halfgrid = np.arange(0, 2 * n + 1) * delta / 2
    far = np.min(np.abs(x64[:, None] - halfgrid), axis=1) > 1e-5
    xc = np.clip(x64, 0.0, 2.0) / delta
    # uniform rounding with half-down ties: ceil(v - 0.5)
    want_level = np.ceil(xc - 0.5).astype(np.int64)
    for impl in IMPLS:
        y, gr = run_grads(x, F32(0), a, F32(1), F32(1), bits, g, impl)
        lv = levels_from_output(y, F32(1), bits)
        np.testing.assert_array_equal(lv[far], want_level[far])
        inside = (x64 > 0) & (x64 <= 2)
        np.testing.assert_allclose(gr["x"][far & inside], g[far & inside], rtol=1e-5)
        assert np.all(gr["x"][far & ~inside] == 0.0)
        assert np.all(gr["x"][x64 <= 0] == 0.0)


@pytest.mark.parametrize("bits", [1, 2])
def test_exact_ties_half_down(bits, impl):
    """Exact ties on T_i (dyadic values): half-down; gradient on (d_0, d_n] only.

    bits=1 with a = [2] = delta, s = 0 is exactly the plain STE case: grad g on (0, 2].
    """
    n = 2 ** bits - 1
    if bits == 1:
        a = np.array([2.0], F32)
        x = np.array([-0.5, 0.0, 1e-30, 0.5, 1.0, np.nextafter(F32(1), F32(2)), 2.0,
                      np.nextafter(F32(2), F32(3)), 3.0], F32)
    else:   # use dyadic intervals 0.5 with beta2 = 1: thresholds 0.25, 0.75, 1.25, d_n = 1.5
        a = np.full(n, 0.5, F32)
        x = np.array([0.0, 0.25, 0.75, 1.25, 1.5, np.nextafter(F32(1.5), F32(2)), 0.26], F32)
    g = np.ones(x.size, F32)
    y, gr = run_grads(x, F32(0), a, F32(1), F32(1), bits, g, impl)
    d = ref.bounds_f32(0, a)
    want = ref.levels_f32(x, 0, a, 1)
    np.testing.assert_array_equal(levels_from_output(y, 1, bits), want)
    slope = ref.delta_of(bits) / a[0]
    inside = (x > d[0]) & (x <= d[-1])
    np.testing.assert_allclose(gr["x"], np.where(inside, slope, 0.0), rtol=1e-6)
    if bits == 1:
        np.testing.assert_array_equal(want, [0, 0, 0, 0, 0, 1, 1, 1, 1])   # x = 1 (tie) -> 0


# --------------------------------------------------------------------------- 6. mixed precision

@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_precision_inputs(bits, dtype, impl):
    rng = np.random.default_rng(bits)
    s, a, b1, b2 = make_params(rng, bits)
    x32 = make_x(rng, (6, 41), s, a, b1)
    x = tf.cast(x32, dtype)
    xc = tf.cast(x, tf.float32).numpy()                 # what the op sees
    y = quant(x, tf.constant(s), tf.constant(a), tf.constant(b1), tf.constant(b2), bits, impl)
    assert y.dtype == dtype
    y32 = quant(xc, s, a, b1, b2, bits, impl)
    np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), tf.cast(tf.cast(y32, dtype), tf.float32).numpy())
    # levels of the float32 cast of x match the reference away from thresholds
    lv_ref = ref.levels_f32(xc, s, a, b1)
    far = ref.threshold_distance_f32(xc, s, a, b1) > ref.threshold_tolerance(s, a, bits)
    want = tf.cast(tf.cast(ref.output_from_levels_f32(lv_ref, b2, bits), dtype), tf.float32).numpy()
    np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy()[far], want[far])
    # gradient w.r.t. a low-precision x comes back in that dtype
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(quant(xv, s, a, b1, b2, bits, impl), tf.float32))
    gx = tape.gradient(loss, xv)
    assert gx.dtype == dtype
    g_ref = ref.gradients64(xc, np.ones(xc.shape), s, a, b1, b2, bits)["x"]
    far_b = far & (ref.boundary_distance64(float(b1) * xc.astype(np.float64), s, a) > 1e-5)
    np.testing.assert_allclose(tf.cast(gx, tf.float32).numpy()[far_b], g_ref[far_b], rtol=1e-2)


# --------------------------------------------------------------------------- 7. bad bits

@pytest.mark.parametrize("bits", [0, 9, 2.5, "2", -1])
def test_bad_bits_raise(bits):
    x = np.zeros(4, F32)
    with pytest.raises(ValueError) as err:
        ops.n2uq_quantize(x, 0.0, np.full(3, 0.5, F32), 1.0, 1.0, bits)
    assert str(bits) in str(err.value), str(err.value)
    with pytest.raises(ValueError) as err:
        ops.quantize_weights(np.ones((3, 2), F32), bits)
    assert str(bits) in str(err.value), str(err.value)


# --------------------------------------------------------------------------- 8. graph mode

@pytest.mark.parametrize("bits", [1, 3])
def test_graph_mode_matches_eager(bits, impl):
    rng = np.random.default_rng(99 + bits)
    s, a, b1, b2 = make_params(rng, bits, floored=True)
    x = make_x(rng, (4, 7, 5), s, a, b1, margin=1e-4)
    g = rng.normal(size=x.shape).astype(F32)
    w = _weights((3, 3, 4, 2), bits)
    vs = [tf.Variable(v) for v in (s, a, b1, b2)]
    wv = tf.Variable(w)

    def step(xx):
        with tf.GradientTape() as tape:
            tape.watch(xx)
            y = quant(xx, *vs, bits, impl)
            q = ops.quantize_weights(wv, bits, channel_axis=(-2, -1))
            loss = tf.reduce_sum(y * g) + tf.reduce_sum(q * w)
        return [y, q] + tape.gradient(loss, [xx] + vs + [wv])

    eager = [t.numpy() for t in step(tf.constant(x))]
    graph_fn = tf.function(step, input_signature=[tf.TensorSpec(None, tf.float32)])   # unknown shape
    graph = [t.numpy() for t in graph_fn(tf.constant(x))]
    for e, gph in zip(eager, graph):
        np.testing.assert_allclose(gph, e, rtol=1e-6, atol=1e-7)
    # activation output and every activation gradient: bit for bit
    for i in (0, 2, 3, 4, 5, 6):
        np.testing.assert_array_equal(graph[i], eager[i], err_msg=f"graph vs eager, output {i}")
    # weights: same codes; values within 2 * eps32 * alpha. Grappler's constant folding
    # rewrites k * 2.0 / n into k * (2 / n): the intermediate in [0, 2] moves by <= 1 of its
    # ulps (eps32 at 1..2), i.e. eps32 * alpha after scaling, plus the final rounding. Small
    # levels (k near n/2) move by up to ~12 of their own ulps this way.
    _, alpha, _ = ref.quantize_weights64(w, bits, (-2, -1))
    n = ref.num_levels(bits)
    np.testing.assert_array_equal(np.rint((graph[1] / alpha + 1) * n / 2), np.rint((eager[1] / alpha + 1) * n / 2))
    assert_close_in_alpha_ulps(graph[1], eager[1], alpha, 2, "graph vs eager weights")
    np.testing.assert_array_equal(graph[7], eager[7])
    # and the graph results are the reference
    want = ref.gradients64(x, g, s, a, b1, b2, bits)
    np.testing.assert_allclose(graph[2], want["x"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(levels_from_output(graph[0], b2, bits), ref.levels_f32(x, s, a, b1))


# --------------------------------------------------------------------------- 9. XLA vs no XLA

@pytest.mark.parametrize("floored", [False, True], ids=["plain", "floored"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_xla_matches_the_uncompiled_op(bits, floored):
    """Under XLA the pure-TF op gives the same numbers as without XLA (implementation="reference").

    Bit for bit up to 4 bits: the outputs, the integer levels and the gradient to x (the
    same float32 operations on every element: compares, selects and products; no sum, so
    no contraction into a fused multiply-add changes their rounding).

    From 5 bits on, XLA evaluates the cumulative sum of the n > 16 intervals as a tree
    (another rounding order), so the bounds d_i and thresholds T_i may differ by an ulp or
    two; elements within `threshold_tolerance` of a threshold (or bound) may then take the
    neighbouring level (or slope), as between any two correct float32 implementations, and
    everything else is bit for bit.

    The parameter gradients are sums over all elements, which XLA accumulates in another
    order; two float32 sums of the same terms differ by a few ulps of sum |term|
    (`gradient_scales64`) each, bounded here by 1e-5 of that scale (about 80 ulps; the
    suite above bounds each against float64 by 1e-4).
    """
    rng = np.random.default_rng(2024 + 10 * bits + floored)
    s, a, b1, b2 = make_params(rng, bits, floored)
    x = make_x(rng, (3, 5000), s, a, b1)
    t = ref.thresholds_f32(s, a)
    d = ref.bounds_f32(s, a)
    edges = np.concatenate([t, d, np.nextafter(t, F32(np.inf)), np.nextafter(d, F32(-np.inf))]) / b1
    x.reshape(-1)[:edges.size] = edges.astype(F32)  # elements on and next to every threshold and bound
    x.reshape(-1)[edges.size:edges.size + 3] = [np.nan, np.inf, -np.inf]
    g = rng.normal(size=x.shape).astype(F32)
    g.reshape(-1)[edges.size:edges.size + 3] = 0.0
    tol = ref.threshold_tolerance(s, a, bits)
    away = (ref.boundary_distance64(float(b1) * x.astype(np.float64), s, a) > tol) | ~np.isfinite(x)
    if bits > 4:  # an element that changes segment changes the sums: compare the sums without them
        g[~away] = 0.0
    y_ref, gr_ref = run_grads(x, s, a, b1, b2, bits, g, "reference")
    y_xla, gr_xla = run_grads(x, s, a, b1, b2, bits, g, "xla")
    levels_ref = ops.activation_levels(x, s, a, b1, bits).numpy()
    levels_xla = xla(lambda *args: ops.activation_levels(*args, bits))(x, s, a, b1).numpy()
    if bits <= 4:
        np.testing.assert_array_equal(y_xla, y_ref)
        np.testing.assert_array_equal(levels_xla, levels_ref)
        np.testing.assert_array_equal(gr_xla["x"], gr_ref["x"])
    else:
        assert away.sum() > 0.8 * x.size
        np.testing.assert_array_equal(y_xla[away], y_ref[away])
        np.testing.assert_array_equal(levels_xla[away], levels_ref[away])
        np.testing.assert_array_equal(gr_xla["x"], gr_ref["x"])
        assert np.all(np.abs(levels_xla - levels_ref) <= 1)
    finite = np.isfinite(x)
    scale = ref.gradient_scales64(x[finite], g[finite], s, a, b1, b2, bits)
    for name in ("start", "beta1", "beta2", "intervals"):
        assert np.all(np.isfinite(gr_xla[name])), name
        err = np.abs(gr_xla[name] - gr_ref[name])
        assert np.all(err <= 1e-5 * scale[name] + 1e-30), f"{name}: XLA {gr_xla[name]}, no XLA {gr_ref[name]}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_xla_weight_quantizer(bits):
    """quantize_weights / weight_codes under XLA. alpha = gamma * mean|W| is a sum, which XLA
    orders differently: alpha may move by a few ulps (bounded by 8 here; 144 terms per channel).
    Everything after alpha is exact: the codes agree except where (W / alpha + 1) n / 2 is within
    float32 noise of a .5 tie, the values are alpha * (2k - n) / n of XLA's own alpha, and the
    gradient is g / alpha, bit for bit."""
    w = _weights((3, 3, 16, 24), 40 + bits)
    g = np.random.default_rng(bits).normal(size=w.shape).astype(F32)
    n = ref.num_levels(bits)
    table = np.array([(2 * k - n) / n for k in range(n + 1)], F32)

    def run(w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            q = ops.quantize_weights(w, bits)
        codes, alpha = ops.weight_codes(w, bits)
        return q, tape.gradient(q, w, output_gradients=tf.constant(g)), codes, alpha

    q, dw, codes, alpha = [t.numpy() for t in run(tf.constant(w))]
    q_x, dw_x, codes_x, alpha_x = [t.numpy() for t in tf.function(run, jit_compile=True)(tf.constant(w))]
    np.testing.assert_allclose(alpha_x, alpha, rtol=8 * np.finfo(F32).eps, atol=0)
    np.testing.assert_allclose(alpha_x, ref.weight_alpha64(w, bits), rtol=8 * np.finfo(F32).eps, atol=0)
    _, u = ref.weight_codes64(w, ref.weight_alpha64(w, bits), bits)
    tie = np.abs(u - np.floor(u) - 0.5) < 1e-5
    assert np.all((codes_x == codes) | tie)
    for values, grads, k, scale in ((q, dw, codes, alpha), (q_x, dw_x, codes_x, alpha_x)):
        np.testing.assert_array_equal(values, (scale * table[k]).astype(F32))
        np.testing.assert_array_equal(grads, (g / scale).astype(F32))
