"""The Keras 3 front end (n2uq_tf.keras3): quantize_model of Keras 3 models, training, save/load, reading.

Numbers are held against the independent NumPy reference (tests/numpy_reference.py) and against
the tf_keras front end on the same weights and quantizer parameters.
"""

import numpy as np
import pytest
import tensorflow as tf

import n2uq_tf
import numpy_reference as ref
from n2uq_tf import model_reader

import keras  # noqa: E402  (Keras 3 comes with TensorFlow >= 2.16, which setup.cfg requires)

assert keras.__version__.startswith("3."), f"these tests need Keras 3, got keras {keras.__version__}"

import tf_keras  # noqa: E402

from n2uq_tf.keras3 import N2UQWrapper  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 8, 8, 3)).astype(np.float32)
Y = RNG.normal(size=(6, 4)).astype(np.float32)


def cnn(k, name="cnn"):
    """The same small CNN in Keras 3 (k=keras) or tf_keras (k=tf_keras)."""
    inputs = k.Input((8, 8, 3))
    x = k.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = k.layers.BatchNormalization(name="bn")(x)
    x = k.layers.ReLU(name="relu")(x)
    x = k.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(x)
    # Normalized conv outputs: at initialisation the small conv's outputs lie below the first threshold
    # (1/3), every code would be 0 and no gradient would pass (N2UQ's semantics, in both front ends).
    x = k.layers.BatchNormalization(name="bn2")(x)
    x = k.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = k.layers.BatchNormalization(name="bn3")(x)
    x = k.layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    # Non-negative pooled features: fc1's quantizer sees inputs inside its segments.
    x = k.layers.ReLU(name="relu2")(x)
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    x = k.layers.BatchNormalization(name="bn4")(x)
    x = k.layers.Dense(16, name="fc1")(x)
    return k.Model(inputs, k.layers.Dense(4, name="fc")(x), name=name)


def randomize_quantizers(model, seed):
    """Distinct, non-initial N2UQ parameters in every quantizer of `model` (either front end)."""
    rng = np.random.default_rng(seed)
    for q in model_reader.quantized_layers(model):
        for activation in (q.input, *q.intermediate):
            v = activation.variables
            v["start"].assign(np.float32(rng.uniform(-0.3, 0.1)))
            v["intervals"].assign(rng.uniform(0.2, 0.9, size=v["intervals"].shape).astype(np.float32))
            v["beta1"].assign(np.float32(rng.uniform(0.7, 1.4)))
            v["beta2"].assign(np.float32(rng.uniform(0.7, 1.4)))


def quantizer_values(model):
    return {v.path: v.numpy().copy() for v in model.weights if "n2uq" in v.path}


@pytest.fixture(scope="module")
def pair():
    """(Keras 3 float model, its quantization, tf_keras twin of the float model, its quantization)."""
    keras.utils.set_random_seed(1)
    float3 = cnn(keras)
    float2 = cnn(tf_keras)
    for layer in float2.layers:
        if layer.weights:
            layer.set_weights(float3.get_layer(layer.name).get_weights())
    q3 = n2uq_tf.quantize_model(float3, bits=2)
    q2 = n2uq_tf.quantize_model(float2, bits=2)
    randomize_quantizers(q3, 5)
    randomize_quantizers(q2, 5)
    return float3, q3, float2, q2


def test_quantize_functional_model_wraps_the_planned_layers(pair):
    float3, q3, _, q2 = pair
    assert isinstance(q3, keras.Model) and not isinstance(q3, tf_keras.Model)
    wrapped = {layer.layer.name: type(layer.layer).__name__ for layer in q3.layers if isinstance(layer, N2UQWrapper)}
    # The first (stem) and last (fc) quantizable layers stay float, as in the paper and the tf_keras front end.
    assert wrapped == {"conv": "Conv2D", "dw": "DepthwiseConv2D", "sep": "SeparableConv2D", "fc1": "Dense"}
    assert [q.path for q in model_reader.quantized_layers(q3)] == [q.path for q in model_reader.quantized_layers(q2)]
    # The float model is left as it was.
    assert not any(isinstance(layer, N2UQWrapper) for layer in float3.layers)


def test_report_lists_the_same_layers_as_the_tf_keras_twin(pair):
    _, q3, _, q2 = pair
    # Input layers are named by each Keras' defaults ("input_1" / "input_layer"): compared by type only.
    rows3, rows2 = ([(r.name if r.type != "InputLayer" else "", r.type, r.weight_bits, r.activation_bits)
                     for r in n2uq_tf.quantization_report(q).layers] for q in (q3, q2))
    assert rows3 == rows2
    assert model_reader.quantizer_state(q3) == model_reader.quantizer_state(q2)


def test_output_is_bit_identical_to_the_tf_keras_front_end(pair):
    _, q3, _, q2 = pair
    np.testing.assert_array_equal(q3.predict(X, verbose=0), q2.predict(X, verbose=0))
    np.testing.assert_array_equal(q3(X, training=True).numpy(), q2(X, training=True).numpy())


def test_dense_forward_equals_the_numpy_reference(pair):
    _, q3, _, _ = pair
    wrapper = q3.get_layer("quant_fc1")
    x = RNG.normal(size=(5, 8)).astype(np.float32) * 2
    quantizer, v = wrapper.input_quantizer
    params = [v[name].numpy() for name in ("start", "intervals", "beta1", "beta2")]
    xq = ref.quantize_f32(x, *params, 2)
    kernel, bias = wrapper.layer.get_weights()
    expected = xq.astype(np.float64) @ ref.quantize_weights_f32(kernel, 2).astype(np.float64) + bias
    got = wrapper(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert len(np.unique(xq)) > 2  # several levels used: the thresholds matter


def test_sequential_model_and_skip_layers_by_name():
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(8, name="b"),
                              keras.layers.Dense(3, name="c")])
    q = n2uq_tf.quantize_model(model, bits=3, skip_layers=["a"], overrides={"c": (4, 2)})
    assert isinstance(q, keras.Sequential)
    state = {p.path: (p.weight_bits, p.activation_bits) for p in model_reader.quantized_layers(q)}
    assert state == {"b": (3, 3), "c": (4, 2)}
    np.testing.assert_array_equal(q.get_layer("quant_b").layer.get_weights()[0], model.get_layer("b").get_weights()[0])


def test_nested_model_is_quantized_inside_and_keeps_its_name():
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, keras.layers.Dense(5, name="d2")(keras.layers.Dense(5, name="d1")(inner_in)),
                        name="backbone")
    inputs = keras.Input((6,))
    x = keras.layers.Dense(6, name="head_in")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inner(x)))
    q = n2uq_tf.quantize_model(model, bits=2)
    assert [p.path for p in model_reader.quantized_layers(q)] == ["backbone/d1", "backbone/d2"]
    assert isinstance(q.get_layer("backbone"), keras.Model)
    with pytest.raises(ValueError, match="backbone/d1"):  # a bare inner name gets its path as a hint
        n2uq_tf.quantize_model(model, bits=2, skip_layers=["d1"])


def _changed(before, model):
    after = quantizer_values(model)
    return sorted(path for path in before if not np.array_equal(before[path], after[path]))


@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_default_compile_and_fit_train_every_quantizer_variable(jit_compile):
    keras.utils.set_random_seed(2)
    q = n2uq_tf.quantize_model(cnn(keras), bits=2)
    before = quantizer_values(q)
    q.compile(optimizer="adam", loss="mse", jit_compile=jit_compile)  # "auto" is compile()'s default
    q.fit(X, Y, epochs=1, batch_size=3, verbose=0)
    assert _changed(before, q) == sorted(before)  # start, intervals, beta1, beta2 of every quantizer
    assert bool(q.jit_compile) == (jit_compile is True or bool(tf.config.list_logical_devices("GPU")))


def test_save_and_load_round_trip(pair, tmp_path):
    _, q3, _, _ = pair
    path = str(tmp_path / "m.keras")
    q3.save(path)
    for loaded in (keras.models.load_model(path), n2uq_tf.load_model(path)):
        assert isinstance(loaded, keras.Model)
        np.testing.assert_array_equal(loaded.predict(X, verbose=0), q3.predict(X, verbose=0))
        assert model_reader.quantizer_state(loaded) == model_reader.quantizer_state(q3)
        assert quantizer_values(loaded).keys() == quantizer_values(q3).keys()
    loaded.compile(optimizer="adam", loss="mse")
    before = quantizer_values(loaded)
    loaded.fit(X, Y, epochs=1, batch_size=6, verbose=0)
    assert _changed(before, loaded) == sorted(before)  # training continues


def test_load_model_refuses_a_float_keras3_file(tmp_path):
    path = str(tmp_path / "float.keras")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    with pytest.raises(ValueError, match="without N2UQ-quantized layers"):
        n2uq_tf.load_model(path)
    assert isinstance(n2uq_tf.load_model(path, require_quantized=False), keras.Model)


def test_uniform_is_n2uq_with_frozen_thresholds(pair):
    float3 = pair[0]
    q = n2uq_tf.quantize_model(float3, bits=2, learn_thresholds=False)
    assert {s["method"] for s in model_reader.quantizer_state(q).values()} == {"uniform"}
    assert not any("n2uq_start" in v.path or "n2uq_intervals" in v.path for v in q.trainable_weights)


def test_already_quantized_and_subclassed_models_are_refused(pair):
    _, q3, _, _ = pair
    with pytest.raises(ValueError, match="already quantized"):
        n2uq_tf.quantize_model(q3)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        n2uq_tf.quantize_model(Sub())


def test_other_backends_get_a_clear_error_at_call_time(pair, monkeypatch):
    # jax and torch are not installed here, so the backend is faked in-process.
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="TensorFlow backend.*'jax'"):
        n2uq_tf.quantize_model(pair[0], bits=2)


@pytest.mark.parametrize("function", ["float_twin", "load_float_weights", "quantize"])
def test_tf_keras_only_model_builders_name_themselves_and_the_alternative(pair, function):
    from n2uq_tf import models
    float3, q3, _, _ = pair
    args = {"float_twin": (q3,), "load_float_weights": (q3, float3), "quantize": (float3,)}[function]
    with pytest.raises(TypeError, match=f"n2uq_tf.models.{function} works with tf_keras .*Keras 3"):
        getattr(models, function)(*args)


def test_load_model_tells_the_two_keras_files_apart(tmp_path):
    from n2uq_tf.keras3 import saving
    k3, k2 = str(tmp_path / "k3.keras"), str(tmp_path / "k2.keras")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(k3)
    tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)]).save(k2)
    assert saving.owns_file(k3) and not saving.owns_file(k2)
    assert isinstance(n2uq_tf.load_model(k2, require_quantized=False), tf_keras.Model)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    assert saving.keras_version_of(str(tmp_path / "junk.keras")) is None


def test_quantizer_tensorboard_logs_a_keras3_model(pair, tmp_path):
    import glob

    from n2uq_tf.training import QuantizerTensorBoard
    _, q3, _, _ = pair
    model = keras.models.clone_model(q3)  # the fixture's model stays untrained
    model.set_weights(q3.get_weights())
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, Y, epochs=1, batch_size=6, verbose=0, callbacks=[QuantizerTensorBoard(str(tmp_path))])
    tags = {}
    for path in glob.glob(str(tmp_path / "quantizers" / "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags[value.tag] = float(tf.make_ndarray(value.tensor))
    state = model_reader.quantizer_state(model)
    assert tags["quantizers/fc1/beta1"] == pytest.approx(state["fc1"]["beta1"])
    assert tags["quantizers/sep/threshold_1"] == pytest.approx(state["sep"]["thresholds"][0])  # numbered from 1
