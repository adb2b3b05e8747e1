"""Literature quantizers: math vs the NumPy references (tests/methods_reference.py), eagerly
and compiled by XLA, XLA vs no XLA bit for bit where the math allows, Keras integration (train,
save/load in .keras and .h5), mixed methods, errors, old configs, and the export hooks
(uniform_levels / integer_view reproduce the Keras inference output)."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import methods_reference as ref
import n2uq_tf
from n2uq_tf.quantization_math import baselines as m
from n2uq_tf.quantize import N2UQQuantizeConfig, N2UQWrapper, method_table
from n2uq_tf.quantize import baseline_quantizers as bq

BITS = [1, 2, 3, 4]


MODES = ["eager", "xla"]


@pytest.fixture(params=MODES)
def mode(request):
    """Each math test runs eagerly and inside tf.function(jit_compile=True)."""
    return request.param


def grads(fn, *args, mode="eager"):
    """(value, gradients) of sum(g * fn(*args)) for a fixed random upstream g; "xla" compiles it."""
    args = [tf.constant(a, tf.float32) for a in args]
    g = np.random.default_rng(7).normal(size=fn(*args).shape).astype(np.float32)

    def forward_backward(g, *args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        return y, tape.gradient(y, args, output_gradients=g)

    if mode == "xla":
        forward_backward = tf.function(forward_backward, jit_compile=True)
    y, d = forward_backward(tf.constant(g), *args)
    return y.numpy(), [t.numpy() for t in d], g


def compiled(fn, mode):
    """fn as is, or compiled by XLA."""
    return tf.function(fn, jit_compile=True) if mode == "xla" else fn


def away_from(x, points, gap=1e-3):
    """x with the elements closer than `gap` to any point nudged away (no ties at thresholds)."""
    x = np.asarray(x, np.float64)
    for p in np.atleast_1d(points):
        near = np.abs(x - p) < gap
        x = np.where(near, p + np.where(x >= p, gap, -gap) * 2, x)
    return x.astype(np.float32)


def rng_x(shape=(4, 5, 6), scale=1.5, seed=0):
    return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)


# --------------------------------------------------------------------------- math vs references

@pytest.mark.parametrize("bits", BITS)
def test_dorefa_activation(bits, mode):
    n = 2 ** bits - 1
    x = away_from(rng_x(scale=0.8), np.r_[(np.arange(n) + 0.5) / n, 0.0, 1.0])
    y, (dx,), g = grads(lambda x: m.dorefa_activation(x, bits), x, mode=mode)
    want, mask = ref.dorefa_activation(x, bits)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dx, g * mask, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_weights(bits, mode):
    w = rng_x((3, 3, 4, 5), scale=0.3, seed=bits)
    y, (dw,), g = grads(lambda w: m.dorefa_weights(w, bits), w, mode=mode)
    want, want_grad = ref.dorefa_weights(w.astype(np.float64), bits, g.astype(np.float64))
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dw, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_pact(bits, mode):
    alpha = 1.7
    n = 2 ** bits - 1
    x = away_from(rng_x(), np.r_[(np.arange(n) + 0.5) * alpha / n, 0.0, alpha])
    y, (dx, dalpha), g = grads(lambda x, a: m.pact_activation(x, a, bits), x, alpha, mode=mode)
    want, want_dx, want_da = ref.pact(x, alpha, bits, g)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dx, want_dx, atol=1e-6)
    np.testing.assert_allclose(dalpha, want_da, rtol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_lsq_activation_unsigned(bits, mode):
    s = 0.37
    q_p = 2 ** bits - 1
    x = away_from(rng_x(), np.r_[(np.arange(q_p) + 0.5) * s, 0.0, q_p * s])
    y, (dx, ds), g = grads(lambda x, s: m.lsq_activation(x, s, bits), x, s, mode=mode)
    features = int(np.prod(x.shape[1:]))  # N = features per example
    want, want_dx, want_ds = ref.lsq(x, s, 0, q_p, g, features)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dx, want_dx, atol=1e-6)
    np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_weights_signed_and_grad_scale(bits, mode):
    s = 0.05
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    w = away_from(rng_x((3, 3, 4, 6), scale=0.1), (np.arange(-q_n, q_p) + 0.5) * s, gap=1e-4)
    y, (dw, ds), g = grads(lambda w, s: m.lsq_weights(w, s, bits), w, s, mode=mode)
    want, want_dw, want_ds = ref.lsq(w, s, q_n, q_p, g, w.size)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, atol=1e-6)
    np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-6)
    # The gradient scale is exactly 1 / sqrt(N Q_P): doubling N divides ds by sqrt(2).
    np.testing.assert_allclose(m.lsq_grad_scale(w.size, q_p).numpy(), 1 / math.sqrt(w.size * q_p), rtol=1e-6)


def test_lsq_one_bit_weights_rejected():
    with pytest.raises(ValueError, match="at least 2 bits"):
        bq.LSQWeightQuantizer(1)


@pytest.mark.parametrize("temperature, sigma", [(2.0, 2.0), (2.0, 1.0), (4.0, 1.5)])
def test_daq_temperature_controller(temperature, sigma, mode):
    f = np.linspace(0.01, 0.99, 37).astype(np.float32)
    got = compiled(lambda f: m.daq_temperature(f, temperature, sigma), mode)(tf.constant(f)).numpy()
    np.testing.assert_allclose(got, ref.daq_beta(f, temperature, sigma), rtol=1e-5)
    # It adapts to the input: largest (sharpest) where the two scores are closest, near f = 1/2.
    assert got[18] > 2 * got[0] and got[18] > 2 * got[-1]


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_daq_activation_training_forward_and_gradients(bits, mode):
    u = 1.9
    n = 2 ** bits - 1
    x = away_from(rng_x((257,), scale=1.2), np.r_[np.arange(n + 1) * u / n, (np.arange(n) + 0.5) * u / n], gap=2e-3)
    y, (dx, du), g = grads(lambda x, u: m.daq_activation(x, u, bits, True, 2.0, 2.0), x, u, mode=mode)
    want, want_dx, want_du = ref.daq_activation_train(x, u, bits, 2.0, 2.0, g)
    np.testing.assert_allclose(y, want, atol=2e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(du, want_du, rtol=2e-3, atol=1e-3)
    # The controller makes the soft value the rounded one (no quantizer gap) ...
    np.testing.assert_allclose(y, ref.daq_activation_infer(x, u, bits), atol=2e-5)
    # ... and inference is hard rounding.
    hard = compiled(lambda x: m.daq_activation(x, u, bits, False), mode)(tf.constant(x)).numpy()
    np.testing.assert_allclose(hard, ref.daq_activation_infer(x, u, bits), atol=1e-6)


def test_daq_soft_round_finite_differences(mode):
    r = np.array([0.2, 0.4, 0.7, 1.1, 1.35, 2.8], np.float64)
    h = 1e-6
    # With beta held at its value at r, the soft value is smooth in r: central differences.
    numeric = []
    for ri in r:
        beta = ref.daq_beta(np.array([ri - np.floor(ri)]), 2.0, 2.0)[0]

        def soft(v, beta=beta, ri=ri):
            fl = np.floor(ri)
            s = ref.daq_scores(np.array([v - fl]), 2.0)[:, 0]
            z = beta * s
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            c = 1 / (math.exp(2.0) - 1)
            return fl - c * p[0] + (1 + c) * p[1]

        numeric.append((soft(ri + h) - soft(ri - h)) / (2 * h))
    np.testing.assert_allclose(ref.daq_soft_slope(r, 2.0, 2.0), numeric, rtol=1e-5)
    _, (slope,), g = grads(lambda r: m.daq_soft_round(r, 2.0, 2.0), r.astype(np.float32), mode=mode)
    np.testing.assert_allclose(slope, g * np.array(numeric), rtol=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_daq_weights(bits, mode):
    w = rng_x((3, 3, 4, 6), scale=0.2, seed=3)
    lower, upper = -2.5, 2.8
    hard = compiled(lambda w: m.daq_weights(w, lower, upper, bits, False), mode)(tf.constant(w)).numpy()
    np.testing.assert_allclose(hard, ref.daq_weights_infer(w, lower, upper, bits), rtol=1e-5, atol=1e-6)
    soft, (dw,), g = grads(lambda w: m.daq_weights(w, lower, upper, bits, True), w, mode=mode)
    np.testing.assert_allclose(soft, hard, atol=1e-5)
    # d w_q / dw = S * 2/n * dDASR/dr * n / (std (u - l)) = dDASR/dr inside the range (S = std (u - l) / 2).
    w64 = w.astype(np.float64)
    n = 2 ** bits - 1
    r = n * np.clip(((w64 - w64.mean()) / w64.std() - lower) / (upper - lower), 0, 1)
    inside = (r > 0) & (r < n)
    want = np.where(inside, ref.daq_soft_slope(r, 2.0, 1.0).reshape(r.shape), 0.0) * g
    np.testing.assert_allclose(dw, want, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
def test_noscale_weights(bits, mode):
    w = rng_x((3, 3, 2, 4), scale=0.9)
    n = 2 ** bits - 1
    w = away_from(w, np.arange(1, n) * 2 / n - 1)
    y, (dw,), g = grads(lambda w: m.noscale_weights(w, bits), w, mode=mode)
    np.testing.assert_allclose(y, ref.noscale(w.astype(np.float64), bits), atol=1e-6)
    np.testing.assert_allclose(dw, g, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_learnable_scale_weights(bits, mode):
    w = rng_x((3, 3, 2, 4), scale=0.3, seed=5)
    alpha = np.array([0.2, 0.35, 0.5, 0.8], np.float32).reshape(1, 1, 1, 4)
    y, (dw, da), g = grads(lambda w, a: m.learnable_scale_weights(w, a, bits), w, alpha, mode=mode)
    gs = 1 / math.sqrt(18 * 2 ** (bits - 1))
    want, want_dw, want_da = ref.learnable(w.astype(np.float64), alpha.astype(np.float64), bits, g,
                                           (0, 1, 2), gs)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, atol=1e-6)
    np.testing.assert_allclose(da, want_da, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- XLA vs no XLA

def _xla_cases(bits):
    """name -> (function of float32 tensors, arguments, the kind of each output: value, then gradients).

    "exact": per-element compares, selects, table lookups and products, which XLA computes with
    the same float32 operations: bit for bit. ("sum", bound): a sum over elements (a parameter's
    gradient), accumulated by XLA in another order: |difference| <= 1e-5 * bound, where bound is
    the largest |per-element factor| times sum|g| (>= sum |term|). "smooth": through tanh or exp,
    which XLA evaluates with its own approximations (a few ulps apart from TensorFlow's kernels),
    then through DAQ's temperature controller, which divides by a difference of two scores:
    |difference| <= 1e-5 (tanh) or 1e-4 (DAQ) of the tensor's largest |value|.
    """
    n = 2 ** bits - 1
    x = rng_x((4, 50, 6), seed=10 + bits)
    w = rng_x((3, 3, 8, 5), scale=0.3, seed=20 + bits)
    lsq_a = float(m.lsq_grad_scale(300, n)) * n                   # g * max |ds/ds_e| = g * Q_P
    cases = {
        "dorefa_activation": (lambda x: m.dorefa_activation(x, bits), [x], ["exact", "exact"]),
        "dorefa_weights": (lambda w: m.dorefa_weights(w, bits), [w],
                           [("sum", float(np.mean(np.abs(w)))) if bits == 1 else "exact", "smooth5"]),
        "pact": (lambda x, a: m.pact_activation(x, a, bits), [x, np.float32(1.5)], ["exact", "exact", ("sum", 1.0)]),
        "lsq_activation": (lambda x, s: m.lsq_activation(x, s, bits), [x, np.float32(0.3)],
                           ["exact", "exact", ("sum", lsq_a)]),
        "daq_activation": (lambda x, u: m.daq_activation(x, u, bits, True), [x, np.float32(1.7)],
                           ["smooth4", "smooth4", "smooth4"]),
        "daq_activation_inference": (lambda x, u: m.daq_activation(x, u, bits, False), [x, np.float32(1.7)],
                                     ["exact", "exact", ("sum", 1.0)]),  # dy/du = level / n <= 1
        "daq_weights": (lambda w: m.daq_weights(w, -2.5, 2.8, bits, True), [w], ["smooth4", "smooth4"]),
        "noscale_weights": (lambda w: m.noscale_weights(w, bits), [w], ["exact", "exact"]),
        "learnable_scale_weights": (lambda w, a: m.learnable_scale_weights(w, a, bits),
                                    [w, np.full((1, 1, 1, 5), 0.4, np.float32)],
                                    ["exact", "exact", ("sum", m.learnable_scale_grad_scale(w, -1, bits))]),
    }
    if bits > 1:
        q_n, q_p = m.lsq_weight_range(bits, signed=True)
        cases["lsq_weights"] = (lambda w, s: m.lsq_weights(w, s, bits), [w, np.float32(0.1)],
                                ["exact", "exact", ("sum", float(m.lsq_grad_scale(w.size, q_p)) * q_n)])
    return cases


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_xla_matches_the_uncompiled_methods(bits):
    """Every literature quantizer, value and gradients, under XLA vs the same graph without XLA."""
    for name, (fn, args, kinds) in _xla_cases(bits).items():
        args = [tf.constant(a) for a in args]
        g = tf.constant(np.random.default_rng(bits).normal(size=fn(*args).shape).astype(np.float32))

        def forward_backward(*args, fn=fn, g=g):
            with tf.GradientTape() as tape:
                tape.watch(args)
                y = fn(*args)
            return [y] + [d if d is not None else tf.zeros_like(a)
                          for d, a in zip(tape.gradient(y, args, output_gradients=g), args)]

        plain = [t.numpy() for t in tf.function(forward_backward)(*args)]
        xla = [t.numpy() for t in tf.function(forward_backward, jit_compile=True)(*args)]
        sum_g = float(np.sum(np.abs(g.numpy())))
        for i, (kind, want, got) in enumerate(zip(kinds, plain, xla)):
            what = f"{name} at {bits} bits, output {i} ({kind})"
            assert np.all(np.isfinite(got)), what
            if kind == "exact":
                np.testing.assert_array_equal(got, want, err_msg=what)
            elif kind in ("smooth5", "smooth4"):
                tol = (1e-5 if kind == "smooth5" else 1e-4) * np.max(np.abs(want))
                assert np.max(np.abs(got - want)) <= tol, what
            else:
                assert np.all(np.abs(got - want) <= 1e-5 * kind[1] * sum_g), what


# --------------------------------------------------------------------------- Keras integration

ALL_PAIRS = [("n2uq", "n2uq"), ("n2uq", "uniform"), ("dorefa", "dorefa"), ("dorefa", "pact"),
             ("lsq", "lsq"), ("daq", "daq"), ("none", "uniform"), ("learnable", "n2uq")]


def mlp_cnn():
    """A model unlike conftest's: Sequential, strided conv, dense head."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((10, 10, 2)),
        keras.layers.Conv2D(6, 3, name="c1"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, strides=2, name="c2"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(12, name="d1"), keras.layers.ReLU(),
        keras.layers.Dense(3, name="out")])


def wrappers(model):
    return [layer for layer in model.layers if isinstance(layer, N2UQWrapper)]


@pytest.mark.parametrize("weight_method, activation_method", ALL_PAIRS)
def test_train_save_load(weight_method, activation_method, tmp_path):
    model = mlp_cnn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 10, 10, 2)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    q = n2uq_tf.quantize_model(model, 2, weight_method=weight_method, activation_method=activation_method)
    for w in wrappers(q):
        cfg = w.quantize_config
        assert (cfg.weight_method, cfg.activation_method) == (weight_method, activation_method)
        assert w.input_quantizer[0].method == activation_method
    q.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(x, y, epochs=4, batch_size=8, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and min(losses[1:]) < losses[0]
    before = q.predict(x, verbose=0)
    for name in ("m.keras", "m.h5"):
        q.save(str(tmp_path / name))
        loaded = n2uq_tf.load_model(str(tmp_path / name))
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
        for a, b in zip(wrappers(q), wrappers(loaded)):
            assert a.quantize_config == b.quantize_config
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)  # resumes; data-initialised variables stay


@pytest.mark.parametrize("weight_method, activation_method", ALL_PAIRS)
def test_export_hooks_reproduce_inference(weight_method, activation_method):
    """uniform_levels / integer_view give exactly what the Keras quantizers compute at inference."""
    q = n2uq_tf.quantize_model(mlp_cnn(), 2, weight_method=weight_method, activation_method=activation_method)
    x = rng_x((4, 10, 10, 2), seed=2)
    q(x, training=True)  # data-dependent initialisation, and DAQ's training path
    for wrapper in wrappers(q):
        quantizer, variables = wrapper.input_quantizer
        for v in variables.values():  # move trained parameters off their initial values
            if v.trainable:
                v.assign(v * 1.1 + 0.01)
        inputs = rng_x((3, 50), scale=2.0, seed=4)
        got = quantizer(tf.constant(inputs), False, weights=variables).numpy()
        levels = quantizer.uniform_levels(variables)
        assert levels.thresholds.dtype == np.float32 and np.all(np.diff(levels.thresholds) > 0)
        xs = inputs * np.float32(levels.input_scale)
        count = np.sum(xs[..., None] > levels.thresholds, axis=-1).astype(np.float32)
        np.testing.assert_array_equal(got, count * np.float32(levels.step))
        _, kernel, wq, wv = wrapper.weight_quantizers[0]
        view = wq.integer_view(kernel, wv)
        n_codes = 2 ** wq.bits
        assert view.codes.min() >= 0 and view.codes.max() < n_codes
        want = wq(tf.convert_to_tensor(kernel), False, weights=wv).numpy()
        np.testing.assert_allclose(view.scale * (2 * view.codes - view.zero2) / 2, want, rtol=1e-6, atol=1e-7)
        assert view.zero2 == (n_codes if weight_method == "lsq" else n_codes - 1)
        if weight_method == "lsq":
            with pytest.raises(ValueError, match="'lsq' weights have a zero level"):
                method_table.check_exportable(wrapper)
        else:
            method_table.check_exportable(wrapper)


def test_data_dependent_initialisation_happens_once():
    """LSQ's steps start at 2 mean|v| / sqrt(Q_P) on the first call, and stay after later calls."""
    q = n2uq_tf.quantize_model(mlp_cnn(), 3, method="lsq")
    x = rng_x((4, 10, 10, 2), seed=9)
    wrapper = wrappers(q)[0]  # c2 (c1 and out stay float)
    q.predict(x, verbose=0)
    _, variables = wrapper.input_quantizer
    c2_input = x
    for layer in q.layers[:q.layers.index(wrapper)]:
        c2_input = layer(c2_input, training=False)
    c2_input = c2_input.numpy()
    np.testing.assert_allclose(variables["step"].numpy(), 2 * np.mean(np.abs(c2_input)) / math.sqrt(7), rtol=1e-5)
    _, kernel, _, wv = wrapper.weight_quantizers[0]
    np.testing.assert_allclose(wv["step"].numpy(), 2 * np.mean(np.abs(kernel.numpy())) / math.sqrt(3), rtol=1e-5)
    assert variables["initialized"].numpy() == 1.0 == wv["initialized"].numpy()
    step = variables["step"].numpy()
    q.predict(2 * x, verbose=0)
    assert variables["step"].numpy() == step  # not initialised again


def test_mixed_methods_per_side_and_per_layer():
    q = n2uq_tf.quantize_model(mlp_cnn(), 2, method="uniform", weight_method="n2uq", skip_layers=None,
                               overrides={"c1": {"method": "pact"}, "d1": {"weight_method": "none"},
                                          "out": {"activation_method": "daq", "weight_bits": 3}})
    got = {w.layer.name: (w.quantize_config.weight_method, w.quantize_config.activation_method,
                          w.quantize_config.weight_bits) for w in wrappers(q)}
    assert got == {"c1": ("dorefa", "pact", 2), "c2": ("n2uq", "uniform", 2), "d1": ("none", "uniform", 2),
                   "out": ("n2uq", "daq", 3)}
    report = n2uq_tf.quantization_report(q)
    rows = {r.name: r for r in report.layers}
    assert rows["c1"].method == "W:dorefa A:pact" and rows["c2"].method == "W:n2uq A:uniform"
    assert "W:dorefa A:pact" in str(report)
    assert len(rows["c1"].thresholds) == 3 and rows["c1"].beta1 is None


def test_method_sets_both_sides_and_learn_thresholds_is_uniform():
    q = n2uq_tf.quantize_model(mlp_cnn(), 2, method="uniform")
    cfg = wrappers(q)[0].quantize_config
    assert (cfg.weight_method, cfg.activation_method, cfg.learn_thresholds) == ("n2uq", "uniform", False)
    q2 = n2uq_tf.quantize_model(mlp_cnn(), 2, learn_thresholds=False)
    assert wrappers(q2)[0].quantize_config == cfg
    _, variables = wrappers(q2)[0].input_quantizer
    assert not variables["intervals"].trainable and variables["beta1"].trainable
    q3 = n2uq_tf.quantize_model(mlp_cnn(), 2, method="none")  # weight-only method: N2UQ activations
    assert (wrappers(q3)[0].quantize_config.weight_method, wrappers(q3)[0].quantize_config.activation_method) \
        == ("none", "n2uq")


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "bogus"}, "unknown quantization method 'bogus'; methods: n2uq, uniform, dorefa, pact, lsq, daq"),
    ({"weight_method": "pactt"}, "unknown quantization method 'pactt'"),
    ({"activation_method": "none"}, "'none' is not an? activation method; activation methods: "
                                    "n2uq, uniform, dorefa, pact, lsq, daq"),
    ({"weight_method": "pact"}, "'pact' is not a weight method; weight methods: n2uq, dorefa, lsq, "
                                "daq, none, learnable"),
    ({"method": "pact", "learn_thresholds": False}, "does not apply to activation method 'pact'"),
    ({"method": "lsq", "bits": 1}, "at least 2 bits"),
    ({"overrides": {"c2": {"method": "nope"}}}, "unknown quantization method 'nope'"),
])
def test_bad_methods_raise(kwargs, match):
    kwargs = dict(kwargs)
    bits = kwargs.pop("bits", 2)
    with pytest.raises(ValueError, match=match):
        n2uq_tf.quantize_model(mlp_cnn(), bits, **kwargs)


def test_old_configs_load_as_n2uq():
    old = {"weight_bits": 2, "activation_bits": 2, "weight_attrs": ["kernel"], "channel_axis": -1,
           "learn_thresholds": True, "format_version": 1}
    cfg = N2UQQuantizeConfig.from_config(old)
    assert (cfg.weight_method, cfg.activation_method) == ("n2uq", "n2uq")
    frozen = N2UQQuantizeConfig.from_config(dict(old, learn_thresholds=False))
    assert frozen.activation_method == "uniform" and frozen.learn_thresholds is False
    quantizer = frozen.get_input_quantizers(None)[0]
    assert quantizer.method == "uniform" and isinstance(quantizer, n2uq_tf.ActivationQuantizer)
    assert N2UQQuantizeConfig.from_config(cfg.get_config()) == cfg
    with pytest.raises(ValueError, match="newer n2uq_tf"):
        N2UQQuantizeConfig.from_config(dict(old, format_version=99))


def test_every_quantizer_is_registered_for_loading():
    objects = n2uq_tf.custom_objects()
    for activation, weight in method_table.METHODS.values():
        for cls in (activation, weight):
            if cls is not None:
                assert objects[cls.__name__] is cls
                assert keras.saving.get_registered_object(f"n2uq_tf>{cls.__name__}") is cls


@pytest.mark.parametrize("weight_method, activation_method", [("learnable", "n2uq"), ("daq", "daq"), ("lsq", "lsq")])
def test_functional_model_with_data_initialised_methods(small_cnn, batch, weight_method, activation_method):
    """A Functional model (cloned through autograph, unlike the Sequential one above) builds and trains."""
    q = n2uq_tf.quantize_model(small_cnn, 2, weight_method=weight_method, activation_method=activation_method)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(*batch, epochs=1, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
