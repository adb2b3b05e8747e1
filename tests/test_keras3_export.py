"""export_tflite of a Keras 3 quantized model: the same custom ops, and parity with Keras in both
stock interpreters through the N2UQ delegate (the tolerance of tests/test_export.py)."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import n2uq_tf

import keras  # noqa: E402  (Keras 3 comes with TensorFlow >= 2.16, which setup.cfg requires)

assert keras.__version__.startswith("3."), f"these tests need Keras 3, got keras {keras.__version__}"

from test_export import REL_TOL  # noqa: E402
from test_keras3_front_end import cnn, randomize_quantizers  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported():
    keras.utils.set_random_seed(4)
    q = n2uq_tf.quantize_model(cnn(keras), bits=2)
    randomize_quantizers(q, 9)
    # Moving statistics away from their initial values, so that folding the BatchNorms matters.
    q.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    q.fit(rng.normal(size=(8, 8, 8, 3)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32),
          batch_size=4, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = n2uq_tf.export_tflite(q)
    return q, data


def test_every_quantized_layer_becomes_a_custom_op(exported):
    q, _ = exported
    rows = {r.name: r for r in n2uq_tf.quantization_report(q).layers}
    assert {name for name, r in rows.items() if r.export == "packed"} == {"conv", "dw", "sep", "fc1"}
    assert {name for name, r in rows.items() if r.export == "folded"} == {"bn2", "bn3"}


@pytest.mark.parametrize("backend", ["tflite", "litert"])
def test_parity_with_keras_through_the_delegate(exported, backend):
    from ai_edge_litert import interpreter as litert

    from n2uq_tf import tflite
    q, data = exported
    path = tflite.delegate_path()
    make, load = ((tf.lite.Interpreter, tf.lite.experimental.load_delegate) if backend == "tflite"
                  else (litert.Interpreter, litert.load_delegate))
    x = np.random.default_rng(7).normal(size=(3, 8, 8, 3)).astype(np.float32)
    interpreter = make(model_content=data, experimental_delegates=[load(path)])
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    expected = q(x, training=False).numpy()
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= REL_TOL * max(scale, 1.0)


def _names(data):
    interpreter = tf.lite.Interpreter(model_content=data)
    signature = interpreter.get_signature_list()["serving_default"]
    return [d["name"] for d in interpreter.get_input_details()], signature["inputs"], signature["outputs"]


def _dense_models():
    """A Functional model with an unnamed and a named input, and a Sequential model."""
    a, b = keras.Input((6,)), keras.Input((4,), name="side")
    x = keras.layers.Dense(8, name="d")(keras.layers.Concatenate(name="join")([a, b]))
    functional = keras.Model([a, b], keras.layers.Dense(3, name="fc")(x))
    sequential = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d"),
                                   keras.layers.Dense(3, name="fc")])
    return {"functional": functional, "sequential": sequential}


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_input_names_equal_the_stock_converters(kind):
    """The stock converter (from_keras_model) names a Keras 3 model's inputs after its KerasTensors
    (an unnamed keras.Input gives "keras_tensor_<n>", not its layer's "input_layer"); the export
    of the same quantized model keeps those names, in the signature and on the input tensors. Outputs
    are named after their layers, as for tf_keras models (the stock converter says "output_0")."""
    keras.utils.set_random_seed(6)
    q = n2uq_tf.quantize_model(_dense_models()[kind], bits=2, skip_layers=["fc"])
    stock = _names(tf.lite.TFLiteConverter.from_keras_model(q).convert())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "d" sees the raw input
        ours = _names(n2uq_tf.export_tflite(q))
    assert ours[:2] == stock[:2]
    assert len(stock[1]) == len(q.inputs)
    assert ours[2] == ["fc"]
