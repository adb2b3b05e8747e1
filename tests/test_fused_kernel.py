"""The fused C++ training kernel against the pure-TF reference in ops.py."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from n2uq_tf import _fused
from n2uq_tf.quantization_math import n2uq as ops

kernels = _fused.load()
if kernels is None and os.environ.get("CI"):
    raise RuntimeError("the fused kernel failed to build in CI, where a C++ compiler is present")
pytestmark = pytest.mark.skipif(
    kernels is None, reason="the fused kernel could not be built here (see the RuntimeWarning); "
                            "the pure-TF path is what runs and is tested by test_ops.py")


def quantize_both(x, s, a, b1, b2, bits, g):
    results = []
    for implementation in ("reference", "fused"):
        xv = tf.constant(x)
        params = [tf.Variable(v, dtype=tf.float32) for v in (s, a, b1, b2)]
        with tf.GradientTape() as tape:
            tape.watch(xv)
            y = ops.n2uq_quantize(xv, *params, bits, implementation=implementation)
            loss = tf.reduce_sum(y * g)
        results.append((y.numpy(), [t.numpy() for t in tape.gradient(loss, [xv] + params)]))
    return results


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("size", [1, 7, 8, 9, 16384 + 5, 100_003])
def test_fused_equals_reference(bits, size):
    rng = np.random.default_rng(bits * 1000 + size)
    n = 2 ** bits - 1
    a = rng.uniform(0.02, 0.5, n).astype(np.float32)
    s, b1, b2 = rng.uniform(-0.2, 0.2), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    x = rng.uniform(-1.0, (s + a.sum()) / b1 + 1.0, size).astype(np.float32)
    if size > 10:
        x[:4] = [np.nan, np.inf, -np.inf, 0.0]
    g = rng.normal(size=size).astype(np.float32)
    g[:4] = 0.0 if size > 10 else g[:4]
    (y_ref, grads_ref), (y_fused, grads_fused) = quantize_both(x, s, a, b1, b2, bits, g)
    np.testing.assert_array_equal(y_fused, y_ref)  # forward is bit-exact
    np.testing.assert_array_equal(grads_fused[0], grads_ref[0])  # so is grad_x: same float ops
    for got, want in zip(grads_fused[1:], grads_ref[1:]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)


def test_backward_is_deterministic():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-0.5, 2.5, 300_000).astype(np.float32))
    g = tf.constant(rng.normal(size=300_000).astype(np.float32))
    _, bounds, thresholds = ops.segment_bounds(0.0, tf.constant([0.5, 0.6, 0.7]))
    outputs = [kernels.n2uq_quantize_backward(g, x, bounds, thresholds, 1.0, tf.ones(3)) for _ in range(3)]
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_backward_sums_match_float64():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 2.5, 50_001).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    _, bounds, thresholds = ops.segment_bounds(0.1, tf.constant([0.4, 0.6, 0.8]))
    slopes = np.array([2.0, 3.0, 4.0], np.float32)
    grad_x, sums, level_sum = kernels.n2uq_quantize_backward(g, x, bounds, thresholds, 1.25, slopes)
    xs = (x * np.float32(1.25)).astype(np.float64)
    d, t = bounds.numpy().astype(np.float64), thresholds.numpy().astype(np.float64)
    g64 = g.astype(np.float64)
    for i in range(3):
        m = (xs > d[i]) & (xs <= d[i + 1])
        np.testing.assert_allclose(sums.numpy()[:, i], [g64[m].sum(), (g64[m] * (xs[m] - d[i])).sum(),
                                                        (g64[m] * x[m]).sum()], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(grad_x.numpy()[m], g[m] * slopes[i] * 1.25, rtol=1e-6)
    level = (xs[:, None] > t).sum(1)
    np.testing.assert_allclose(level_sum.numpy(), (g64 * level).sum(), rtol=1e-4)


def test_portable_path_matches_avx2_path():
    """The non-AVX2 path, forced in a fresh process, gives the same results."""
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        from n2uq_tf import _fused
        from n2uq_tf.quantization_math import n2uq as ops
        k = _fused.load()
        rng = np.random.default_rng(5)
        x = rng.uniform(-0.5, 2.5, 40_003).astype(np.float32); g = rng.normal(size=x.shape).astype(np.float32)
        for n in (1, 3, 7, 15):
            _, b, t = ops.segment_bounds(0.05, tf.constant(rng.uniform(0.05, 2.0 / n, n).astype(np.float32)))
            out = k.n2uq_quantize_backward(g, x, b, t, 1.1, tf.ones(n))
            np.save(f"{OUT}/{n}_gx.npy", out[0].numpy()); np.save(f"{OUT}/{n}_sums.npy", out[1].numpy())
    """)
    results = {}
    for mode in ("avx2", "portable"):
        out = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"n2uq_{mode}_{os.getpid()}")
        os.makedirs(out, exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        if mode == "portable":
            env["N2UQ_TF_PORTABLE_KERNELS"] = "1"
        subprocess.run([sys.executable, "-c", f"OUT={out!r}\n" + script], env=env, check=True)
        results[mode] = out
    for n in (1, 3, 7, 15):
        np.testing.assert_array_equal(np.load(f"{results['avx2']}/{n}_gx.npy"),
                                      np.load(f"{results['portable']}/{n}_gx.npy"))
        np.testing.assert_allclose(np.load(f"{results['avx2']}/{n}_sums.npy"),
                                   np.load(f"{results['portable']}/{n}_sums.npy"), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.n2uq_quantize_forward(tf.ones(4), tf.ones([2, 2]), 1.0, 1.0), "thresholds must be"),
    (lambda: kernels.n2uq_quantize_forward(tf.ones(4), tf.ones(3), tf.ones(2), 1.0), "scalars"),
    (lambda: kernels.n2uq_quantize_backward(tf.ones(4), tf.ones(5), tf.ones(4), tf.ones(3), 1.0, tf.ones(3)),
     "grad shape"),
    (lambda: kernels.n2uq_quantize_backward(tf.ones(4), tf.ones(4), tf.ones(3), tf.ones(3), 1.0, tf.ones(3)),
     "bounds must have"),
    (lambda: kernels.n2uq_quantize_backward(tf.ones(4), tf.ones(4), tf.ones(4), tf.ones(3), 1.0, tf.ones(2)),
     "slopes must have"),
])
def test_malformed_inputs_are_errors(call, message):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        call()


def test_empty_input():
    y = kernels.n2uq_quantize_forward(tf.zeros([0, 3]), tf.ones(3), 1.0, 1.0)
    assert y.shape == (0, 3)


def test_missing_compiler_falls_back_with_a_warning(tmp_path):
    script = textwrap.dedent("""
        import warnings, tensorflow as tf
        from n2uq_tf import _fused
        from n2uq_tf.quantization_math import n2uq as ops
        _fused._candidate_dirs = lambda: [TMP]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _fused.load() is None
        assert any("pure-TF" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert ops.active_implementation() == "reference"
        print(float(tf.reduce_sum(ops.n2uq_quantize(tf.ones(4), 0.0, tf.fill([3], 2 / 3), 1.0, 1.0, 2))))
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", f"TMP={str(tmp_path)!r}\n" + script], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(4 * 2 / 3)  # x = 1 sits on T_2 = 1: level 1
