"""The literature methods (DoReFa, PACT, LSQ, DAQ, the Table 4 weight variants) in the Keras 3 front end.

Each method's Keras 3 quantized model is held against the tf_keras front end's on the same float
weights and quantizer variables: forward bit-identical, gradients (input, kernels, every quantizer
variable) equal to float tolerance, the same report, the same export decisions; and its `.keras`
file loads back bit-identical.
"""

import numpy as np
import pytest
import tensorflow as tf

import n2uq_tf
from n2uq_tf import model_reader
from n2uq_tf.export import lowering
from n2uq_tf.quantize import method_table

import keras  # Keras 3 comes with TensorFlow >= 2.16, which setup.cfg requires: a missing one fails, not skips
import tf_keras

# Every method of the table but N2UQ's own two (the Keras 3 front end's tests hold those).
METHODS = [name for name in method_table.METHODS if name not in ("n2uq", "uniform")]
X = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype(np.float32)


def tiny(k):
    """The same tiny model in Keras 3 (k=keras) or tf_keras (k=tf_keras): conv and fc1 are quantized
    (the first and last quantizable layers stay float)."""
    inputs = k.Input((6, 6, 2))
    x = k.layers.Conv2D(4, 3, name="stem")(inputs)
    x = k.layers.Conv2D(5, 3, name="conv")(x)
    x = k.layers.Flatten(name="flat")(x)
    x = k.layers.Dense(6, name="fc1")(x)
    return k.Model(inputs, k.layers.Dense(3, name="fc")(x))


def quantizer_variables(model):
    """{(layer path, "input" or kernel attr, variable key): variable} of every quantizer of `model`."""
    found = {}
    for q in model_reader.quantized_layers(model):
        for side, variables in [("input", q.input.variables)] + [(w.attr, w.variables) for w in q.weights]:
            for key, variable in variables.items():
                found[(q.path, side, key)] = variable
    return found


def quantized_pair(method, **arguments):
    """(Keras 3 quantized model, tf_keras quantized model) of `tiny` with `method` (and further
    quantize_model `arguments`): the same float weights and quantizer values, moved off their initial values."""
    keras.utils.set_random_seed(3)
    float3, float2 = tiny(keras), tiny(tf_keras)
    for layer in float2.layers:
        if layer.weights:
            layer.set_weights(float3.get_layer(layer.name).get_weights())
    q3 = n2uq_tf.quantize_model(float3, bits=2, method=method, **arguments)
    q2 = n2uq_tf.quantize_model(float2, bits=2, method=method, **arguments)
    q2(X, training=False)  # data-dependent initialisation (LSQ's steps, DAQ's range, the learnable scale)
    rng = np.random.default_rng(7)
    variables3 = quantizer_variables(q3)
    for key, variable in quantizer_variables(q2).items():
        value = variable.numpy()
        if variable.trainable:  # off the initial values, so a swapped or unused variable shows
            value = (value * rng.uniform(0.8, 1.2, size=value.shape)).astype(np.float32)
            variable.assign(value)
        variables3[key].assign(value)  # "initialized" flags too: q3 does not initialise again
    return q3, q2


@pytest.fixture(scope="module", params=METHODS)
def pair(request):
    """(method, Keras 3 quantized model, tf_keras quantized model): see `quantized_pair`."""
    return (request.param, *quantized_pair(request.param))


def test_quantize_model_builds_the_same_quantizer_variables(pair):
    method, q3, q2 = pair
    variables3, variables2 = quantizer_variables(q3), quantizer_variables(q2)
    assert variables3.keys() == variables2.keys()
    for key, variable in variables3.items():
        assert variable.trainable == variables2[key].trainable, key
        assert tuple(variable.shape) == tuple(variables2[key].shape), key
    sides = {(q.weight_method, q.input.method) for q in model_reader.quantized_layers(q3)}
    assert sides == {method_table.resolve_methods(method)}
    # The literature quantizers are registered Keras 3 serializables.
    literature = [quantizer for q in model_reader.quantized_layers(q3) for quantizer in
                  [q.input.quantizer] + [w.quantizer for w in q.weights] if quantizer.method not in ("n2uq", "uniform")]
    assert literature
    for quantizer in literature:
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(quantizer))
        assert type(copy) is type(quantizer) and copy.get_config() == quantizer.get_config()


@pytest.mark.parametrize("training", [False, True])
def test_forward_is_bit_identical_to_the_tf_keras_front_end(pair, training):
    _, q3, q2 = pair
    np.testing.assert_array_equal(q3(X, training=training).numpy(), q2(X, training=training).numpy())


def _gradients(model, keys, x, xla=False):
    """Gradients of a fixed weighted sum of the training outputs w.r.t. the input, the float kernels
    and the quantizer variables ``keys``, computed eagerly or inside tf.function(jit_compile=True)."""
    variables = quantizer_variables(model)
    kernels = [w.variable for q in model_reader.quantized_layers(model) for w in q.weights]
    # A Keras 3 variable's tf.Variable is its .value (a tf_keras variable is one).
    sources = [v.value if isinstance(v, keras.Variable) else v for v in kernels + [variables[key] for key in keys]]
    weights = tf.constant(np.linspace(-1.0, 1.0, 3 * len(x)).reshape(len(x), 3), tf.float32)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=True) * weights)
        return tape.gradient(loss, [x] + sources)

    return [g.numpy() for g in (tf.function(run, jit_compile=True) if xla else run)(tf.constant(x))]


def _trainable_keys(model):
    return sorted(key for key, v in quantizer_variables(model).items() if v.trainable)


def test_gradients_equal_the_tf_keras_front_end(pair):
    _, q3, q2 = pair
    keys = _trainable_keys(q2)
    got, want = _gradients(q3, keys, X), _gradients(q2, keys, X)
    assert len(got) == len(want) == 1 + 2 + len(keys)  # input, conv and fc1 kernels, quantizer variables
    for name, g3, g2 in zip(["input", "conv kernel", "fc1 kernel"] + keys, got, want):
        np.testing.assert_allclose(g3, g2, rtol=1e-5, atol=1e-6, err_msg=str(name))
    assert all(np.any(g != 0) for g in got[:3])


def test_report_and_quantizer_state_name_the_method(pair):
    method, q3, q2 = pair
    weight_method, activation_method = method_table.resolve_methods(method)
    rows3, rows2 = ({r.name: r.method for r in n2uq_tf.quantization_report(q).layers if r.type != "InputLayer"}
                    for q in (q3, q2))
    named = weight_method if weight_method == activation_method else f"W:{weight_method} A:{activation_method}"
    assert rows3["conv"] == rows3["fc1"] == named
    assert rows3 == rows2
    state3 = model_reader.quantizer_state(q3)
    assert state3 == model_reader.quantizer_state(q2)  # method, bits, thresholds, step, parameters
    assert {s["method"] for s in state3.values()} == {activation_method}


def test_export_decisions_equal_the_tf_keras_front_end(pair):
    method, q3, q2 = pair

    def decisions(model):
        return [(r.name, r.status, r.ops, r.reason) for r in lowering.lower(model).report.layers
                if r.name in ("conv", "fc1")]

    assert decisions(q3) == decisions(q2)
    if method == "lsq":  # today's kernels take no zero level: the layers stay builtin, with the reason
        assert all(status == "builtin" and "'lsq' weights have a zero level" in reason
                   for _, status, _, reason in decisions(q3))


def test_save_and_load_round_trip_is_bit_identical(pair, tmp_path):
    _, q3, _ = pair
    path = str(tmp_path / "m.keras")
    q3.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(X, training=False).numpy(), q3(X, training=False).numpy())
    np.testing.assert_array_equal(loaded(X, training=True).numpy(), q3(X, training=True).numpy())
    before, after = quantizer_variables(q3), quantizer_variables(loaded)
    assert after.keys() == before.keys()
    for key, variable in before.items():
        np.testing.assert_array_equal(after[key].numpy(), variable.numpy(), err_msg=str(key))
    assert model_reader.quantizer_state(loaded) == model_reader.quantizer_state(q3)


def test_methods_per_side_and_per_layer_as_in_the_tf_keras_front_end():
    q3, q2 = quantized_pair("uniform", weight_method="none", overrides={
        "conv": {"method": "pact"}, "fc1": {"activation_method": "daq", "weight_method": "lsq", "weight_bits": 3}})
    rows3, rows2 = ({r.name: (r.method, r.weight_bits) for r in n2uq_tf.quantization_report(q).layers
                     if r.type != "InputLayer"} for q in (q3, q2))
    assert rows3 == rows2
    assert rows3["conv"] == ("W:dorefa A:pact", 2) and rows3["fc1"] == ("W:lsq A:daq", 3)
    assert model_reader.quantizer_state(q3) == model_reader.quantizer_state(q2)
    for training in (False, True):
        np.testing.assert_array_equal(q3(X, training=training).numpy(), q2(X, training=training).numpy())


@pytest.mark.slow
def test_gradients_under_xla_equal_the_eager_tf_keras_ones():
    """One method (LSQ: custom gradients on both sides, a lazily initialised step) under jit_compile=True."""
    q3, q2 = quantized_pair("lsq")
    keys = _trainable_keys(q2)
    got, want = _gradients(q3, keys, X, xla=True), _gradients(q2, keys, X)
    assert len(got) == len(want) == 3 + len(keys)
    for name, g3, g2 in zip(["input", "conv kernel", "fc1 kernel"] + keys, got, want):
        np.testing.assert_allclose(g3, g2, rtol=1e-5, atol=1e-6, err_msg=str(name))
    # The forward, both compiled: XLA's float convolutions need not round as the eager kernels do.
    def compiled(model, training):
        return tf.function(lambda x: model(x, training=training), jit_compile=True)(tf.constant(X)).numpy()

    for training in (False, True):
        np.testing.assert_array_equal(compiled(q3, training), compiled(q2, training))


@pytest.mark.slow
@pytest.mark.parametrize("method, export", [("pact", "packed"), ("lsq", "float")])
def test_export_tflite_parity_through_the_delegate(method, export):
    """PACT activations with DoReFa weights become custom ops; LSQ layers stay float builtins (as in tf_keras)."""
    import warnings

    from n2uq_tf import tflite
    from test_export import REL_TOL
    q3, _ = quantized_pair(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = n2uq_tf.export_tflite(q3)
    rows = {r.name: r.export for r in n2uq_tf.quantization_report(q3).layers}
    assert rows["conv"] == rows["fc1"] == export
    interpreter = tf.lite.Interpreter(model_content=data,
                                      experimental_delegates=[tf.lite.experimental.load_delegate(tflite.delegate_path())])
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, X.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, X)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    expected = q3(X, training=False).numpy()
    assert float(np.abs(got - expected).max()) <= REL_TOL * max(float(np.abs(expected).max()), 1.0)
