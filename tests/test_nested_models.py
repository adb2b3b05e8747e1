"""Models nested in models: quantized at every depth, named by path, trained, saved, exported.

A Sequential block used as a layer and a `tf_keras.applications` backbone inside a Functional
model (transfer learning) are quantized inside; a nested model must give exactly the model that
tfmot's own quantize_apply gives for the same layers flattened, keep working through every save
format and the TFLite export (parity with Keras in both interpreters), and stay frozen when the
user froze it.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf.export import export_tflite, inspect_tflite, lower
from n2uq_tf.quantize import N2UQWrapper, nested, plan_quantization
from random_parameters import randomize
from test_export import REL_TOL
from test_export_models import BACKENDS, _run

layers = keras.layers


def block(name="block"):
    return keras.Sequential([layers.Conv2D(6, 3, padding="same", name="conv_a"),
                             layers.BatchNormalization(name="bn_a"), layers.ReLU(name="relu_a"),
                             layers.Conv2D(6, 3, padding="same", name="conv_b")], name=name)


def sequential_in_sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((10, 10, 3)), layers.Conv2D(6, 3, padding="same", name="stem"), block(),
                             layers.GlobalAveragePooling2D(name="gap"), layers.Dense(4, name="head")], name="outer")


def flat_twin(model):
    """The same layers with the same weights, without the nested Sequential."""
    inner = model.get_layer("block")
    flat = keras.Sequential([keras.Input((10, 10, 3)), layers.Conv2D(6, 3, padding="same", name="stem"),
                             layers.Conv2D(6, 3, padding="same", name="conv_a"),
                             layers.BatchNormalization(name="bn_a"), layers.ReLU(name="relu_a"),
                             layers.Conv2D(6, 3, padding="same", name="conv_b"),
                             layers.GlobalAveragePooling2D(name="gap"), layers.Dense(4, name="head")], name="flat")
    for source in [model.get_layer("stem"), *inner.layers, model.get_layer("head")]:
        flat.get_layer(source.name).set_weights(source.get_weights())
    return flat


def two_levels():
    """stem -> mid(inner(conv c, BN, ReLU) -> depthwise -> add) -> GAP -> head: two levels of nesting."""
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([layers.Conv2D(6, 3, padding="same", name="c"), layers.BatchNormalization(name="bn"),
                              layers.ReLU(name="relu")], name="inner")
    mid_in = keras.Input((9, 9, 6))
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(inner(mid_in))
    mid = keras.Model(mid_in, layers.Add(name="add")([mid_in, y]), name="mid")
    inp = keras.Input((9, 9, 3))
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inp)
    x = layers.GlobalAveragePooling2D(name="gap")(mid(x))
    return keras.Model(inp, layers.Dense(5, name="head")(x), name="outer")


def wrappers(model):
    return {w.path: w.layer for w in nested.walk(model) if isinstance(w.layer, N2UQWrapper)}


def data(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = [n] + model.inputs[0].shape.as_list()[1:]
    return rng.normal(0, 1, shape).astype(np.float32), rng.integers(0, 4, n)


# ------------------------------------------------------------------ quantizing inside

def randomize_quantizers(model, seed):
    """The same non-trivial thresholds for the layers of the same name in any model."""
    for path, w in wrappers(model).items():
        name = path.split("/")[-1]
        rng = np.random.default_rng([seed, *map(ord, name)])
        variables = w.input_quantizer[1]
        variables["start"].assign(rng.uniform(-0.6, -0.1))
        variables["intervals"].assign(rng.uniform(0.1, 0.6, variables["intervals"].shape).astype(np.float32))
        variables["beta2"].assign(rng.uniform(0.7, 1.4))


def test_nested_sequential_gives_the_model_of_its_flat_twin():
    """The reference: tfmot's quantize_apply (our flat path) on the same layers flattened."""
    model = sequential_in_sequential()
    randomize(model, seed=5)  # BN statistics and biases away from their initial values
    q_nested = n2uq_tf.quantize_model(model, bits=2, skip_layers=["stem"])
    q_flat = n2uq_tf.quantize_model(flat_twin(model), bits=2, skip_layers=["stem"])
    got = wrappers(q_nested)
    assert set(got) == {"block/conv_a", "block/conv_b", "head"}
    assert set(wrappers(q_flat)) == {"conv_a", "conv_b", "head"}
    assert isinstance(q_nested.get_layer("block"), keras.Sequential)  # the user's structure stays
    for path, w in got.items():
        assert w.quantize_config == wrappers(q_flat)[path.split("/")[-1]].quantize_config
    # Non-trivial thresholds, the same in both, so the comparison sees every quantizer.
    for q in (q_nested, q_flat):
        randomize_quantizers(q, seed=3)
    q_flat_paths = {"block/" + k if k.startswith("conv") else k: w for k, w in wrappers(q_flat).items()}
    for path, w in got.items():
        np.testing.assert_array_equal(w.input_quantizer[1]["intervals"].numpy(),
                                      q_flat_paths[path].input_quantizer[1]["intervals"].numpy())
    x, _ = data(model)
    np.testing.assert_array_equal(q_nested(x, training=False).numpy(), q_flat(x, training=False).numpy())
    # The float weights were copied into the nested clone.
    for a, b in zip(q_nested.get_layer("block").get_layer("bn_a").get_weights(),
                    model.get_layer("block").get_layer("bn_a").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_first_and_last_count_over_the_flattened_model():
    model = keras.Sequential([keras.Input((8, 8, 3)), block(), layers.Flatten(name="flat"),
                              layers.Dense(4, name="head")], name="outer")
    plan = {p["name"]: p for p in plan_quantization(model, 2)}
    assert plan["block/conv_a"]["action"] == "skip" and plan["block/conv_a"]["first"]
    assert "first quantizable layer" in plan["block/conv_a"]["reason"]
    assert plan["block/conv_b"]["action"] == "quantize"
    assert plan["head"]["action"] == "skip" and "last quantizable" in plan["head"]["reason"]
    q = n2uq_tf.quantize_model(model, 2)
    assert set(wrappers(q)) == {"block/conv_b"}


def test_two_levels_of_nesting_paths_overrides_and_skip_layers():
    model = two_levels()
    plan = {p["name"]: p for p in plan_quantization(model, 2, skip_layers=None)}
    assert {n for n, p in plan.items() if p["action"] == "quantize"} == {"stem", "mid/inner/c", "mid/dw", "head"}
    # A nested model's path names every layer inside it; a layer's own path wins over it, and
    # names (of the layer, then of the models holding it) win over classes.
    q = n2uq_tf.quantize_model(model, 2, overrides={"mid": 3, "mid/inner/c": (4, 2),
                                                    layers.DepthwiseConv2D: 1, layers.Dense: 4})
    bits = {p: (w.quantize_config.weight_bits, w.quantize_config.activation_bits) for p, w in wrappers(q).items()}
    assert bits == {"mid/inner/c": (4, 2), "mid/dw": (3, 3), "head": (4, 4)}
    assert isinstance(q.get_layer("mid").get_layer("inner"), keras.Sequential)
    q = n2uq_tf.quantize_model(model, 2, skip_layers=["stem", "head", "mid/inner"])
    assert set(wrappers(q)) == {"mid/dw"}
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None, overrides={"mid": None})
    assert set(wrappers(q)) == {"stem", "head"}
    # An inner layer named without its path: the error gives the path.
    for argument in ("overrides", "skip_layers"):
        value = {"dw": 2} if argument == "overrides" else ["dw"]
        with pytest.raises(ValueError, match=f"{argument} names 'dw'.*did you mean 'mid/dw'"):
            n2uq_tf.quantize_model(model, 2, **{argument: value})


def test_report_names_inner_layers_by_path_with_their_status():
    model = two_levels()
    q = n2uq_tf.quantize_model(model, 2, overrides={"mid/dw": None})
    rows = {r.name: r for r in n2uq_tf.quantization_report(q).layers}
    assert rows["mid/inner/c"].status == "quantized" and rows["mid/inner/c"].weight_bits == 2
    assert rows["mid/dw"].status == "kept float"
    assert rows["mid/inner/bn"].status == "float" and rows["mid/inner/bn"].params == 4 * 6
    assert rows["stem"].status == "kept float" and rows["head"].status == "kept float"
    assert "mid" not in rows  # a nested model is replaced by its layers
    # What the export does with them, from the exporter's plan under the same names.
    assert rows["mid/inner/c"].export == "packed" and rows["mid/inner/c"].packed_bytes < rows["mid/inner/c"].float_bytes
    assert rows["mid/inner/bn"].export == "folded" and rows["mid/inner/bn"].export_note == "folded into mid/inner/c"
    assert rows["mid/dw"].export == "float"
    report = n2uq_tf.quantization_report(q)
    assert report.total_params == sum(int(np.prod(v.shape)) for v in q.weights if v.dtype.is_floating)
    assert "mid/inner/c" in str(report)
    from n2uq_tf import plots
    assert [name for name, _ in plots.quantized_layers(q)] == ["mid/inner/c"]


def test_subclassed_nested_model_is_reported_unsupported():
    class Tower(keras.Model):
        def __init__(self):
            super().__init__(name="tower")
            self.conv = layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="c1")(inp)
    x = layers.Conv2D(4, 3, name="c2")(Tower()(x))
    model = keras.Model(inp, layers.Dense(2, name="head")(layers.Flatten()(x)))
    plan = {p["name"]: p for p in plan_quantization(model, 2)}
    assert plan["tower"]["action"] == "unsupported" and "subclassed model" in plan["tower"]["reason"]


# ------------------------------------------------------------------ training, saving, export

@pytest.mark.parametrize("filename", ["model.keras", "model.h5", "saved_model"])
def test_nested_model_trains_saves_and_loads(tmp_path, filename):
    model = two_levels()
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None)
    x, y = data(model)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=2, batch_size=4, verbose=0)
    variables = wrappers(q)["mid/inner/c"].input_quantizer[1]
    assert not np.allclose(variables["intervals"].numpy(), 2 / 7)  # the inner quantizer trained
    path = str(tmp_path / filename)
    q.save(path)
    loaded = n2uq_tf.load_model(path)
    assert isinstance(loaded.get_layer("mid").get_layer("inner"), keras.Sequential)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), q.predict(x, verbose=0))
    for p, w in wrappers(q).items():
        for key, v in w.input_quantizer[1].items():
            np.testing.assert_array_equal(wrappers(loaded)[p].input_quantizer[1][key].numpy(), v.numpy())
    before = loaded.get_weights()
    loaded.fit(x, y, epochs=1, batch_size=4, verbose=0)  # training resumes
    assert any(not np.array_equal(a, b) for a, b in zip(before, loaded.get_weights()))


@pytest.mark.slow
def test_nested_model_exports_with_parity_in_both_interpreters():
    model = two_levels()
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None)
    randomize(q, seed=4)
    x, _ = data(model, n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept builtin
        content, report = export_tflite(q, return_report=True)
    assert [r.name for r in report.lowered] == ["stem", "mid/inner/c", "mid/dw", "head"]
    rows = {r.name: r for r in report.layers}
    assert rows["mid/inner/bn"].status == "folded" and rows["mid/inner/c"].folded == "mid/inner/bn"
    counts = inspect_tflite(content).op_counts(as_unfused=True)
    assert (counts["N2UQConv2D"], counts["N2UQDepthwiseConv2D"], counts["N2UQFullyConnected"]) == (2, 1, 1)
    # The lowered codes of an inner layer are its Keras quantizer's levels on its real input.
    codes = lower(q).activation_codes(tf.constant(x))
    assert set(codes) == {"stem", "mid/inner/c", "mid/dw", "head"}
    expected = q(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        assert float(np.abs(_run(content, x, backend) - expected).max()) <= REL_TOL * scale, backend


# ------------------------------------------------------------------ frozen backbones

def test_frozen_backbone_stays_frozen_through_training_and_saving(tmp_path):
    model = two_levels()
    model.get_layer("mid").trainable = False  # transfer learning: the backbone frozen
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None)
    mid = q.get_layer("mid")
    assert not mid.trainable and not mid.trainable_weights
    trainable_ids = {id(v) for v in q.trainable_variables}
    assert trainable_ids and all(id(v) not in trainable_ids for v in mid.weights)
    trainable_shapes = [tuple(v.shape) for v in q.trainable_variables]
    x, y = data(model)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    frozen_before = [v.numpy().copy() for v in mid.weights]
    head_before = q.get_layer("quant_head").get_weights()
    q.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen_before, mid.weights))
    assert any(not np.array_equal(a, b) for a, b in zip(head_before, q.get_layer("quant_head").get_weights()))
    for filename in ("m.keras", "m.h5", "sm"):
        q.save(str(tmp_path / filename))
        loaded = n2uq_tf.load_model(str(tmp_path / filename))
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), q.predict(x, verbose=0))
        assert not loaded.get_layer("mid").trainable_weights, filename
        assert [tuple(v.shape) for v in loaded.trainable_variables] == trainable_shapes, filename


def test_frozen_layer_stays_frozen_when_quantized():
    """tfmot's wrapper lists a quantized kernel as trainable even when its layer is frozen."""
    model = two_levels()
    model.get_layer("stem").trainable = False  # one layer frozen in a trainable model
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None)
    stem = q.get_layer("quant_stem")
    assert not stem.trainable and stem.trainable_weights == []
    assert len(stem.weights) == len(stem.non_trainable_weights) == 2 + 4 + 1  # kernel, bias, quantizer, step
    x, y = data(model)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in stem.weights]
    q.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, stem.weights))


# ------------------------------------------------------------------ an applications backbone

@pytest.mark.slow
def test_applications_backbone_in_a_functional_model():
    """The usual transfer-learning model: MobileNetV2 (include_top=False) -> GAP -> Dense."""
    keras.utils.set_random_seed(2)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    inp = keras.Input((32, 32, 3))
    outputs = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D()(base(inp)))
    model = keras.Model(inp, outputs)
    q = n2uq_tf.quantize_model(model, 2)
    found = wrappers(q)
    inner = [layer for layer in base.layers if type(layer) in (layers.Conv2D, layers.DepthwiseConv2D)]
    assert len(found) == len(inner) - 1  # all but the first conv (Conv1) and the float head
    assert f"{base.name}/Conv1" not in found and f"{base.name}/block_16_project" in found
    x, y = data(model, n=4)
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=1, verbose=0)
    randomize(q, seed=2)
    content, report = export_tflite(q, return_report=True)
    assert len(report.lowered) == len(found) and not report.kept_builtin
    expected = q(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        assert float(np.abs(_run(content, x, backend) - expected).max()) <= REL_TOL * scale, backend


def test_nested_separable_conv_stages_are_named_by_path():
    """A two-stage layer (SeparableConv2D: depthwise, then its pointwise_input quantizer and a 1x1
    conv) inside a nested model: both stages lowered under the layer's path."""
    keras.utils.set_random_seed(3)
    blk = keras.Sequential([layers.SeparableConv2D(5, 3, padding="same", name="sep")], name="blk")
    inp = keras.Input((7, 7, 3))
    x = layers.GlobalAveragePooling2D()(blk(layers.Conv2D(4, 3, name="stem")(inp)))
    model = keras.Model(inp, layers.Dense(3, name="head")(x))
    q = n2uq_tf.quantize_model(model, 2, skip_layers=None)
    randomize(q, seed=3)
    x, _ = data(model, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        content, report = export_tflite(q, return_report=True)
    assert [r.name for r in report.lowered] == ["stem", "blk/sep", "head"]
    assert set(lower(q).activation_codes(tf.constant(x))) == {"stem", "blk/sep", "blk/sep/pointwise_input", "head"}
    expected = q(x, training=False).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    for backend in BACKENDS:
        assert float(np.abs(_run(content, x, backend) - expected).max()) <= REL_TOL * scale, backend
