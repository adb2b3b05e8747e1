"""quantize_model: what gets quantized, the tfmot integration, and training."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import n2uq_tf
from n2uq_tf import ops
from n2uq_tf.quantize import N2UQQuantizeConfig, N2UQQuantizeScheme, N2UQWrapper


def wrappers(model):
    return {layer.layer.name: layer for layer in model.layers if isinstance(layer, N2UQWrapper)}


def test_default_keeps_first_and_last_float(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    assert set(wrappers(q)) == {"conv_a", "dw", "fc1"}
    for w in wrappers(q).values():
        assert (w.quantize_config.weight_bits, w.quantize_config.activation_bits) == (2, 2)
    # No 8-bit fake-quant was added anywhere: only our wrappers and the original layers.
    assert not any("QuantizeLayer" == type(layer).__name__ for layer in q.layers)
    assert not any("quantize_layer" in v.name or "min" in v.name.split("/")[-1] for v in q.variables)


def test_skip_none_and_overrides(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=4, skip_layers=None,
                               overrides={"logits": None, keras.layers.DepthwiseConv2D: (3, 2),
                                          "fc1": {"activation_bits": None}})
    ws = wrappers(q)
    assert set(ws) == {"stem", "conv_a", "dw", "fc1"}
    assert (ws["dw"].quantize_config.weight_bits, ws["dw"].quantize_config.activation_bits) == (3, 2)
    assert ws["fc1"].quantize_config.activation_bits is None and ws["fc1"].input_quantizer is None
    assert ws["stem"].quantize_config.weight_bits == 4


def test_weight_and_activation_bits_defaults(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2, weight_bits=3)
    cfg = wrappers(q)["conv_a"].quantize_config
    assert (cfg.weight_bits, cfg.activation_bits) == (3, 2)


def test_quantized_layer_computes_conv_of_quantized_input_and_weights(small_cnn, batch):
    """The wrapper output equals a NumPy-free recomputation with ops on the same variables."""
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    w = wrappers(q)["conv_a"]
    # Give the thresholds non-uniform values so the check is not trivial.
    _, qv = w.input_quantizer
    qv["start"].assign(0.1)
    qv["intervals"].assign([0.3, 0.5, 0.9])
    qv["beta2"].assign(0.7)
    x = tf.random.stateless_uniform((2, 12, 12, 8), seed=(1, 2), minval=-0.5, maxval=2.5)
    got = w(x, training=False)
    kernel = [v for v in w.weights if v.name.endswith("kernel:0")][0]
    bias = [v for v in w.weights if v.name.endswith("bias:0")][0]
    xq = ops.n2uq_quantize(x, 0.1, [0.3, 0.5, 0.9], 1.0, 0.7, 2)
    expected = tf.nn.conv2d(xq, ops.quantize_weights(kernel, 2), 1, "SAME") + bias
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    levels = np.unique(np.round(xq.numpy() / (0.7 * 2 / 3), 4))
    assert set(levels) <= {0.0, 1.0, 2.0, 3.0}


def test_hand_annotation_gives_the_same_model(small_cnn, batch):
    q = n2uq_tf.quantize_model(small_cnn, bits=3)

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if layer.name in ("conv_a", "fc1"):
            return tfmot.quantization.keras.quantize_annotate_layer(clone, N2UQQuantizeConfig(3, 3))
        if layer.name == "dw":
            return tfmot.quantization.keras.quantize_annotate_layer(
                clone, N2UQQuantizeConfig(3, 3, ("depthwise_kernel",), (-2, -1)))
        return clone

    with n2uq_tf.quantize_scope():
        annotated = keras.models.clone_model(small_cnn, clone_function=annotate)
        annotated.set_weights(small_cnn.get_weights())
        by_hand = tfmot.quantization.keras.quantize_apply(annotated, N2UQQuantizeScheme())
    assert [type(layer).__name__ for layer in by_hand.layers] == [type(layer).__name__ for layer in q.layers]
    for a, b in zip(by_hand.layers, q.layers):
        if isinstance(a, N2UQWrapper):
            assert a.quantize_config == b.quantize_config
    x, _ = batch
    np.testing.assert_array_equal(by_hand.predict(x, verbose=0), q.predict(x, verbose=0))


def test_fit_updates_quantizer_parameters(small_cnn, batch):
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, qv = wrappers(q)["conv_a"].input_quantizer
    before = {k: v.numpy().copy() for k, v in qv.items()}
    x, y = batch
    history = q.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    changed = [k for k in before if not np.array_equal(before[k], qv[k].numpy())]
    assert {"intervals", "beta1", "beta2"} <= set(changed)


def test_frozen_thresholds_baseline(small_cnn, batch):
    q = n2uq_tf.quantize_model(small_cnn, bits=2, learn_thresholds=False)
    _, qv = wrappers(q)["conv_a"].input_quantizer
    assert not qv["start"].trainable and not qv["intervals"].trainable
    assert qv["beta1"].trainable


def test_original_model_is_untouched(small_cnn, batch):
    x, _ = batch
    before = small_cnn.predict(x, verbose=0)
    weights = [w.copy() for w in small_cnn.get_weights()]
    n2uq_tf.quantize_model(small_cnn, bits=2)
    np.testing.assert_array_equal(small_cnn.predict(x, verbose=0), before)
    for a, b in zip(weights, small_cnn.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sequential_model(batch):
    model = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3), keras.layers.ReLU(),
                              keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3)])
    q = n2uq_tf.quantize_model(model, bits=2)
    assert len(wrappers(q)) == 1
    assert q.predict(batch[0], verbose=0).shape == (8, 3)


def test_unsupported_layers_stay_float_and_are_reported():
    inp = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.Conv2DTranspose(4, 3, name="up")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="up .Conv2DTranspose.: transposed convolution has no bit-serial kernel"):
        q = n2uq_tf.quantize_model(model, bits=2)
    report = n2uq_tf.quantization_report(q)
    [up] = [r for r in report.layers if r.name == "up"]
    assert up.status == "unsupported" and "transposed convolution" in up.note
    assert "up" in str(report) and "unsupported: transposed convolution" in str(report)


@pytest.mark.parametrize("bits", [0, 9, 2.5, "2", None, True])
def test_bad_bits(small_cnn, bits):
    with pytest.raises(ValueError, match=repr(bits).replace("(", r"\(").replace(".", r"\.")):
        n2uq_tf.quantize_model(small_cnn, bits=bits)


def test_bad_override_names(small_cnn):
    with pytest.raises(ValueError, match="no_such_layer"):
        n2uq_tf.quantize_model(small_cnn, overrides={"no_such_layer": 4})
    with pytest.raises(ValueError, match="overrides"):
        n2uq_tf.quantize_model(small_cnn, overrides={"conv_a": 11})
    with pytest.raises(ValueError, match="skip_layers"):
        n2uq_tf.quantize_model(small_cnn, skip_layers="everything")


def test_not_a_model():
    with pytest.raises(TypeError, match="tf_keras.Model"):
        n2uq_tf.quantize_model("model.h5")
    with pytest.raises(TypeError, match="tf_keras"):
        n2uq_tf.quantize_model(keras.layers.Dense(3))


def test_keras3_model_goes_to_the_keras3_front_end():
    import keras as keras3
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(3), keras3.layers.Dense(3),
                               keras3.layers.Dense(2)])
    q = n2uq_tf.quantize_model(model)  # was a TypeError asking for tf_keras; tests/test_keras3_*.py test the rest
    assert isinstance(q, keras3.Model) and not isinstance(q, keras.Model)
    assert [type(layer).__module__ for layer in q.layers][1] == "n2uq_tf.keras3.wrapper"


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(tf.zeros((1, 4)))
    with pytest.raises(ValueError, match="subclassed"):
        n2uq_tf.quantize_model(net)


def test_model_without_quantizable_layers():
    model = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no layer to quantize"):
        n2uq_tf.quantize_model(model)


@pytest.mark.parametrize("builder, shape", [
    (lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10), (32, 32, 3)),
    (lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10), (32, 32, 3)),
])
def test_applications_quantize_and_fit(builder, shape, tmp_path):
    keras.utils.set_random_seed(1)
    model = builder()
    q = n2uq_tf.quantize_model(model, bits=2)
    kinds = {type(w.layer).__name__ for w in wrappers(q).values()}
    assert "Conv2D" in kinds
    convs = [layer for layer in model.layers if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense")]
    assert len(wrappers(q)) == len(convs) - 2  # all but the first conv and the classifier
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy())
    x = np.random.default_rng(0).random((4,) + shape, dtype=np.float32)
    y = np.arange(4)
    q.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "q.keras")
    q.save(path)
    np.testing.assert_array_equal(n2uq_tf.load_model(path).predict(x, verbose=0), q.predict(x, verbose=0))


# ------------------------------------------------------------------ defaults that surprise (issue 12.5)

def two_quantizable_layers():
    return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="first"),
                             keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="last")], name="tiny")


def test_only_first_and_last_quantizable_says_to_pass_skip_layers_none():
    model = two_quantizable_layers()
    with pytest.raises(ValueError, match=r"only quantizable layers are the first and the last \('first' and 'last'\)"
                                         r".*skip_layers=None.*raw model input"):
        n2uq_tf.quantize_model(model)
    assert set(wrappers(n2uq_tf.quantize_model(model, skip_layers=None))) == {"first", "last"}
    # Kept float by the user, not by the default: no advice about skip_layers=None.
    with pytest.raises(ValueError, match="no layer to quantize") as error:
        n2uq_tf.quantize_model(model, skip_layers=["first", "last"])
    assert "skip_layers=None" not in str(error.value)


def first_layer_warnings(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = n2uq_tf.quantize_model(model, **kwargs)
    return q, [str(w.message) for w in caught if "the first quantizable layer" in str(w.message)]


def test_quantizing_the_first_layer_unasked_warns_with_its_name(small_cnn):
    # A skip_layers list replaces the default first/last rule: the stem gets quantized.
    q, caught = first_layer_warnings(small_cnn, skip_layers=["logits"])
    assert "stem" in wrappers(q)
    assert len(caught) == 1 and "'stem'" in caught[0] and "raw model input" in caught[0]
    assert "skip_layers is a list, which replaces the default first/last rule" in caught[0]
    # An override by class reaches the first layer too.
    q, caught = first_layer_warnings(small_cnn, overrides={keras.layers.Conv2D: 4})
    assert wrappers(q)["stem"].quantize_config.weight_bits == 4
    assert len(caught) == 1 and "'stem'" in caught[0] and "overrides[Conv2D] applies to it" in caught[0]
    # Asked for by name, or every layer with skip_layers=None: no warning.
    for kwargs in ({"overrides": {"stem": 4}}, {"skip_layers": None}, {"skip_layers": ["stem", "logits"]}, {}):
        _, caught = first_layer_warnings(small_cnn, **kwargs)
        assert not caught, kwargs


def test_already_quantized_model_is_refused(small_cnn, tmp_path):
    q = n2uq_tf.quantize_model(small_cnn)
    with pytest.raises(ValueError, match="'small_cnn' is already quantized: layer 'conv_a' is N2UQ-quantized"):
        n2uq_tf.quantize_model(q)
    q.save(str(tmp_path / "q.keras"))
    with pytest.raises(ValueError, match="already quantized"):
        n2uq_tf.quantize_model(n2uq_tf.load_model(str(tmp_path / "q.keras")))
    inp = keras.Input((12, 12, 3))
    outer = keras.Model(inp, keras.layers.Dense(2, name="extra")(q(inp)))  # quantized model nested
    with pytest.raises(ValueError, match="layer 'small_cnn/conv_a' is N2UQ-quantized"):
        n2uq_tf.quantize_model(outer)
    eight_bit = tfmot.quantization.keras.quantize_model(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")]))
    with pytest.raises(ValueError, match="already quantized: layer 'd1' is quantized by tfmot"):
        n2uq_tf.quantize_model(eight_bit)


def test_non_finite_float_weights_are_named_at_quantize_time(small_cnn):
    kernel = small_cnn.get_layer("conv_a").kernel
    value = kernel.numpy()
    value[0, 0, 0, 0], value[1, 0, 0, 0] = np.nan, np.inf
    kernel.assign(value)
    with pytest.raises(ValueError, match=r"non-finite weights \(NaN or Inf\) in layer conv_a "
                                         r"\(conv_a/kernel:0: 1 NaN and 1 Inf of 576 values\)"):
        n2uq_tf.quantize_model(small_cnn)


@pytest.mark.parametrize("method", ["n2uq", "dorefa", "lsq"])
def test_a_weight_turned_nan_is_named_in_training_and_inference(small_cnn, batch, method):
    import tensorflow as tf
    q = n2uq_tf.quantize_model(small_cnn, bits=2, method=method)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # the variable (tfmot sets the attribute to a tensor)
    kernel = q.get_layer("quant_conv_a").weight_quantizers[0].variable
    value = kernel.numpy()
    value[0, 0, 0, 0] = np.nan  # as a diverged step leaves it
    kernel.assign(value)
    message = "layer 'conv_a' has non-finite weights: NaN or Inf in conv_a/kernel"
    x, y = batch
    for run in (lambda: q.fit(x, y, epochs=1, verbose=0), lambda: q.predict(x, verbose=0), lambda: q(x)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            run()


def test_override_keyed_by_a_class_the_model_lacks(small_cnn):
    with pytest.raises(ValueError, match="overrides names the class .*SeparableConv2D, which is neither"):
        n2uq_tf.quantize_model(small_cnn, overrides={keras.layers.SeparableConv2D: 4})
    # Classes match exactly (as the lookup does): a base class names no layer of the model.
    with pytest.raises(ValueError, match=r"overrides names the class .*\.Layer, .*Conv2D, Dense"):
        n2uq_tf.quantize_model(small_cnn, overrides={keras.layers.Layer: 4})
    with pytest.raises(TypeError, match="overrides keys are layer names, layer classes or class names; got 3"):
        n2uq_tf.quantize_model(small_cnn, overrides={3: 4})
