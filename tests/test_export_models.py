"""Every reference network, and tf_keras.applications models, exported and run in the stock interpreters.

Each quantized model (random weights, randomized quantizer parameters and BN statistics) goes
through export_tflite and runs in tf.lite.Interpreter and ai_edge_litert's Interpreter with only
the N2UQ delegate added; the outputs must equal the Keras model's inference outputs up to the
float rounding of the folded arithmetic (the same bound as the lowered-graph tests).
"""

import warnings

import numpy as np
import pytest

import n2uq_tf
from n2uq_tf import models, tflite
from n2uq_tf._keras import keras
from n2uq_tf.export import export_tflite, inspect_tflite
from random_parameters import randomize
from test_export import REL_TOL

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)

BACKENDS = ("tflite", "litert")


def _run(content, x, backend):
    interpreter = tflite.Interpreter(model_content=content, backend=backend, num_threads=2)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def _check(model, expected_custom_ops, seed=0, batch=2):
    randomize(model, seed)
    shape = [batch] + model.inputs[0].shape.as_list()[1:]
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers kept builtin are checked through the outputs
        content = export_tflite(model)
    counts = inspect_tflite(content).op_counts(as_unfused=True)
    for op, count in expected_custom_ops.items():
        assert counts.get(op, 0) == count, (op, counts)
    expected = model(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        got = _run(content, x, backend)
        diff = float(np.abs(got - expected).max())
        assert diff <= REL_TOL * scale, (backend, diff, scale)


def _quantized_convs(model):
    return sum(isinstance(layer, n2uq_tf.N2UQWrapper) for layer in model.layers)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {"input_shape": (32, 32, 3)}),
    ("resnet18", {"input_shape": (32, 32, 3), "quantize_downsample": False}),  # N2UQ*
    ("resnet34", {"input_shape": (32, 32, 3)}),
    ("resnet50", {"input_shape": (32, 32, 3)}),
    ("mobilenet_v2", {"input_shape": (32, 32, 3), "alpha": 0.35}),
    ("resnet20", {"input_shape": (16, 16, 3), "width": 8, "weight_bits": 3, "activation_bits": 4}),
])
def test_reference_network_exports_and_runs(name, kwargs):
    keras.utils.set_random_seed(0)
    bits = kwargs.pop("bits", None) or (4 if name == "mobilenet_v2" else 2)
    if "weight_bits" in kwargs:
        bits = None
    model = models.get_model(name, bits=bits, num_classes=10, **kwargs)
    wrappers = _quantized_convs(model)
    depthwise = sum(isinstance(layer, n2uq_tf.N2UQWrapper) and type(layer.layer).__name__.endswith("DepthwiseConv2D")
                    for layer in model.layers)
    _check(model, {"N2UQConv2D": wrappers - depthwise, "N2UQDepthwiseConv2D": depthwise})


@pytest.mark.parametrize("application", ["ResNet50", "MobileNetV2"])
def test_keras_application_exports_and_runs(application):
    keras.utils.set_random_seed(1)
    kwargs = {"alpha": 0.35} if application == "MobileNetV2" else {}
    base = getattr(keras.applications, application)(weights=None, input_shape=(32, 32, 3), classes=10, **kwargs)
    model = n2uq_tf.quantize_model(base, bits=2)
    depthwise = sum(isinstance(layer, n2uq_tf.N2UQWrapper) and type(layer.layer).__name__ == "DepthwiseConv2D"
                    for layer in model.layers)
    convs = sum(isinstance(layer, n2uq_tf.N2UQWrapper) and type(layer.layer).__name__ == "Conv2D"
                for layer in model.layers)
    _check(model, {"N2UQConv2D": convs, "N2UQDepthwiseConv2D": depthwise}, seed=1)


@pytest.mark.parametrize("method, weight_method", [
    ("uniform", None), ("dorefa", None), ("pact", None), ("daq", None), ("lsq", None), ("n2uq", "learnable"),
    ("n2uq", "none")])
def test_every_quantizer_method_exports_and_runs(method, weight_method):
    """Each literature method lowers through its uniform_levels / integer_view hooks (LSQ weights,
    with a zero level the kernels do not take yet, stay builtin and are reported) and runs in the
    stock interpreters equal to Keras."""
    keras.utils.set_random_seed(2)
    float_model = models.resnet20(num_classes=10, input_shape=(16, 16, 3), width=8)
    model = n2uq_tf.quantize_model(float_model, 2, method=method, weight_method=weight_method,
                                   skip_layers=["stem_conv", "fc"])
    x = np.random.default_rng(2).normal(0, 1, (2, 16, 16, 3)).astype(np.float32)
    model.predict(x, verbose=0)  # data-dependent initialisations (LSQ, DAQ)
    wrappers = _quantized_convs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        content, report = export_tflite(model, return_report=True)
    if method == "lsq":
        assert len(report.kept_builtin) == wrappers and "zero level" in report.kept_builtin[0].reason
    else:
        assert len(report.lowered) == wrappers and not report.kept_builtin
    expected = model(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        got = _run(content, x, backend)
        assert float(np.abs(got - expected).max()) <= REL_TOL * scale, backend
