"""keras.applications models (Keras 3, weights=None) end to end: quantize, a training step (ResNet50
with the default compile, MobileNetV2 with jit_compile=True), save as .keras, load
(keras.models.load_model after `import n2uq_tf`, and n2uq_tf.load_model), export_tflite, and parity
with Keras in both stock interpreters through the N2UQ delegate (the tolerance of tests/test_export.py).

ResNet50 is quantized as the whole model (its classifier included); MobileNetV2 is a backbone
nested in a Functional model with its own head (quantized inside, layers named by path). Each
model is built and trained once per module (32x32 inputs, two samples, one step).
"""

import types
import warnings

import numpy as np
import pytest
import tensorflow as tf

import n2uq_tf
from n2uq_tf import model_reader
from n2uq_tf.export import inspect_tflite
from n2uq_tf.keras3 import N2UQWrapper

import keras  # noqa: E402  (Keras 3 comes with TensorFlow >= 2.16, which setup.cfg requires)

assert keras.__version__.startswith("3."), f"these tests need Keras 3, got keras {keras.__version__}"

from random_parameters import randomize  # noqa: E402
from test_export import REL_TOL  # noqa: E402
from test_export_models import BACKENDS, _run  # noqa: E402
from test_keras3_front_end import quantizer_values  # noqa: E402

pytestmark = pytest.mark.slow  # whole networks: training, XLA compilation, export

SHAPE = (32, 32, 3)  # the smallest input both applications accept
CLASSES = 5


def _resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=SHAPE, classes=CLASSES)


def _mobilenet_v2_backbone():
    backbone = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, alpha=0.35, include_top=False)
    inputs = keras.Input(SHAPE)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x), name="classifier")


BUILDERS = {"ResNet50": _resnet50, "MobileNetV2": _mobilenet_v2_backbone}


def _changed(before, model):
    after = quantizer_values(model)
    return [path for path in before if not np.array_equal(before[path], after[path])]


# The compile() setting each model trains one step under ("auto" is compile()'s default, which picks
# XLA on a GPU but not on a CPU). Tracing a training step of either network takes ~1 minute on a
# loaded 2-core CPU, compiling it with XLA ~2.5 minutes: each network trains under one setting.
JIT_COMPILE = {"ResNet50": "auto", "MobileNetV2": True}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def trained(request):
    """The quantized application after one training step (compiled as JIT_COMPILE says), then with randomized
    quantizer parameters and BN statistics (the initial ones hide folding bugs) for save and export."""
    keras.utils.set_random_seed(11)
    float_model = BUILDERS[request.param]()
    q = n2uq_tf.quantize_model(float_model, bits=2)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    y = np.arange(2) % CLASSES
    # ResNet50 ends in a softmax; the backbone's head gives logits.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=request.param != "ResNet50")
    q.compile(optimizer="adam", loss=loss, jit_compile=JIT_COMPILE[request.param])
    before = quantizer_values(q)
    history = q.fit(x, y, batch_size=2, epochs=1, verbose=0)
    step = types.SimpleNamespace(jit=bool(q.jit_compile), loss=history.history["loss"][0],
                                 changed=_changed(before, q), quantizers=len(before))
    randomize(q, 11)
    return types.SimpleNamespace(name=request.param, float_model=float_model, q=q, x=x, step=step)


def test_quantized_layers(trained):
    q, float_model = trained.q, trained.float_model
    paths = [p.path for p in model_reader.quantized_layers(q)]
    convs = [layer for layer in (float_model.layers if trained.name == "ResNet50" else float_model.layers[1].layers)
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense))]
    if trained.name == "ResNet50":
        # Every conv but the first (the raw input) and the classifier: the paper's first/last rule.
        assert paths == [layer.name for layer in convs[1:-1]]
    else:
        backbone = float_model.layers[1].name
        assert paths == [f"{backbone}/{layer.name}" for layer in convs[1:]]  # the head ("head") stays float
    assert not any(isinstance(layer, N2UQWrapper) for layer in float_model.layers)


def test_training_step_trains_the_quantizers(trained):
    step = trained.step
    assert step.jit == (JIT_COMPILE[trained.name] is True or bool(tf.config.list_logical_devices("GPU")))
    assert np.isfinite(step.loss)
    # A quantizer whose inputs all lie below its start gets no gradient (N2UQ's semantics).
    assert len(step.changed) > 0.9 * step.quantizers, (len(step.changed), step.quantizers)


def test_save_and_load_round_trip(trained, tmp_path):
    q, x = trained.q, trained.x
    path = str(tmp_path / "m.keras")
    q.save(path)
    expected = q(x, training=False).numpy()  # eager calls: predict() would trace each model again
    for loaded in (keras.models.load_model(path), n2uq_tf.load_model(path)):
        assert isinstance(loaded, keras.Model)
        np.testing.assert_array_equal(loaded(x, training=False).numpy(), expected)
        assert model_reader.quantizer_state(loaded) == model_reader.quantizer_state(q)
        values = quantizer_values(q)
        assert all(np.array_equal(v, values[k]) for k, v in quantizer_values(loaded).items())
        assert quantizer_values(loaded).keys() == values.keys()


def test_export_and_parity_in_both_interpreters(trained):
    q = trained.q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        content = n2uq_tf.export_tflite(q)
    kinds = [type(p.layer).__name__ for p in model_reader.quantized_layers(q)]
    counts = inspect_tflite(content).op_counts(as_unfused=True)
    assert counts.get("N2UQDepthwiseConv2D", 0) == kinds.count("DepthwiseConv2D")
    assert counts.get("N2UQConv2D", 0) == kinds.count("Conv2D")
    assert counts.get("N2UQConv2D", 0) > 20
    x = np.random.default_rng(12).normal(size=(2, *SHAPE)).astype(np.float32)
    expected = q(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        diff = float(np.abs(_run(content, x, backend) - expected).max())
        assert diff <= REL_TOL * scale, (backend, diff, scale)
