"""n2uq_tf.model_reader and the tf_keras front end's reader, on a hand-built model.

The model (an input, a nested Sequential holding conv "c1", Flatten, Dropout, Dense "fc") has
quantizer parameters set by hand, so its thresholds are known in closed form: N2UQ's segment
bounds are d_0 = start, d_i = d_{i-1} + a_i and its thresholds T_i = d_{i-1} + a_i / 2; with
start 0.5 and intervals (1, 0.5, 2): d = (0.5, 1.5, 2, 4), T = (1, 1.75, 3), all exact in float32.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf import model_reader, plots
from n2uq_tf.quantize import N2UQQuantizeConfig, N2UQWrapper
from n2uq_tf.training import callbacks

layers = keras.layers
START, INTERVALS = 0.5, (1.0, 0.5, 2.0)
BOUNDS, THRESHOLDS = [0.5, 1.5, 2.0, 4.0], [1.0, 1.75, 3.0]
BETA1, BETA2 = 2.0, 0.75  # c1's; fc's input scale beta1 is 0 (the zero-scale rule)


def _set(wrapper, beta1, beta2):
    _, variables = wrapper.input_quantizer
    variables["start"].assign(START)
    variables["intervals"].assign(INTERVALS)
    variables["beta1"].assign(beta1)
    variables["beta2"].assign(beta2)


@pytest.fixture(scope="module")
def quantized():
    keras.utils.set_random_seed(3)
    inp = keras.Input((5, 5, 2), name="x")
    y = keras.Sequential([layers.Conv2D(3, 3, name="c1")], name="block")(inp)
    y = layers.Flatten(name="flat")(y)
    y = layers.Dropout(0.5, name="drop")(y)
    model = keras.Model(inp, layers.Dense(4, name="fc")(y), name="hand_built")
    q = n2uq_tf.quantize_model(model, bits=2, skip_layers=None)
    _set(q.get_layer("block").get_layer("quant_c1"), BETA1, BETA2)
    _set(q.get_layer("quant_fc"), 0.0, 1.0)
    return q


def _by_path(model):
    return {q.path: q for q in model_reader.quantized_layers(model)}


def test_quantized_layers_paths_and_quantizers(quantized):
    found = _by_path(quantized)
    assert list(found) == ["block/c1", "fc"]
    c1 = found["block/c1"]
    assert c1.wrapper is quantized.get_layer("block").get_layer("quant_c1") and c1.layer is c1.wrapper.layer
    assert (c1.weight_bits, c1.activation_bits, c1.weight_method) == (2, 2, "n2uq")
    assert (c1.input.name, c1.input.method, c1.input.bits, c1.intermediate) == ("input", "n2uq", 2, ())
    [weight] = c1.weights
    assert weight.attr == "kernel" and tuple(weight.variable.shape) == (3, 3, 2, 3)
    # The trained variable (tfmot puts the quantized tensor on the wrapped layer's attribute).
    assert any(weight.variable is v for v in c1.wrapper.trainable_weights)
    assert weight.quantizer.method == "n2uq" and weight.variables == {}
    assert c1.wrapper.weight_quantizers == list(c1.weights)


def test_weight_quantizers_of_an_unbuilt_wrapper_is_empty():
    wrapper = N2UQWrapper(layers.Dense(2, name="d"), N2UQQuantizeConfig(2, 2))
    assert wrapper.weight_quantizers == []


def test_thresholds_in_input_units_known_values(quantized):
    found = _by_path(quantized)
    c1, fc = found["block/c1"].input, found["fc"].input
    levels = c1.levels()
    assert levels.thresholds.tolist() == THRESHOLDS and float(levels.input_scale) == BETA1
    assert float(levels.step) == BETA2 * 2 / 3
    assert c1.input_thresholds() == [t / BETA1 for t in THRESHOLDS]  # [0.5, 0.875, 1.5]
    assert fc.input_thresholds() == THRESHOLDS  # zero input scale: the raw T_i

    state = model_reader.quantizer_state(quantized)
    assert list(state) == ["block/c1", "fc"]
    assert state["block/c1"]["thresholds"] == [0.5, 0.875, 1.5]
    assert state["block/c1"]["bounds"] == [0.25, 0.75, 1.0, 2.0]
    assert (state["block/c1"]["start"], state["block/c1"]["intervals"]) == (START, list(INTERVALS))
    assert (state["fc"]["thresholds"], state["fc"]["bounds"]) == (THRESHOLDS, BOUNDS)
    # One rule everywhere: the plots, the callbacks and the report give the reader's numbers.
    assert plots.quantizer_state(quantized) == state and callbacks.quantizer_state(quantized) == state
    rows = {r.name: r for r in n2uq_tf.quantization_report(quantized).layers}
    assert rows["block/c1"].thresholds == [0.5, 0.875, 1.5] and rows["fc"].thresholds == THRESHOLDS
    assert (rows["block/c1"].beta1, rows["block/c1"].beta2, rows["block/c1"].step) == (BETA1, BETA2, 0.5)


def test_input_units_rule():
    assert model_reader.input_units([1.0, -2.0], 4.0) == [0.25, -0.5]
    assert model_reader.input_units(np.float32([1.0, -2.0]), -4.0) == [-0.25, 0.5]  # crossing points of x < T/s
    assert model_reader.input_units([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_graph_nodes_recompute_the_model(quantized):
    reader = model_reader.reader_for(quantized)
    nodes = reader.graph_nodes(quantized)
    assert [n.layer.name for n in nodes] == ["x", "block", "flat", "drop", "quant_fc"]
    assert nodes[0].is_input and nodes[0].inputs == [] and not any(n.is_input for n in nodes[1:])
    assert nodes[0].output_ids == (reader.tensor_id(quantized.inputs[0]),)
    assert nodes[-1].output_ids == (reader.tensor_id(quantized.outputs[0]),)
    assert [tuple(n.inputs[0].shape) for n in nodes[1:]] == [(None, 5, 5, 2), (None, 3, 3, 3), (None, 27),
                                                            (None, 27)]
    # Inputs first: every node takes only tensors given by the nodes before it. Running the nodes
    # in order (as the exporter does) gives the model's inference output.
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(np.float32)
    values = {reader.tensor_id(quantized.inputs[0]): tf.constant(x)}
    for node in nodes[1:]:
        assert set(node.input_ids) <= set(values)
        args, kwargs = node.arguments(values)
        outputs = reader.call_inference(node.layer, args, kwargs)
        values.update(zip(node.output_ids, tf.nest.flatten(outputs)))
    np.testing.assert_array_equal(values[reader.tensor_id(quantized.outputs[0])].numpy(),
                                  quantized(x, training=False).numpy())


def test_call_inference_overrides_training(quantized):
    reader = model_reader.reader_for(quantized)
    ones = tf.ones((4, 64))
    out = reader.call_inference(quantized.get_layer("drop"), (ones,), {"training": True})
    np.testing.assert_array_equal(out.numpy(), ones.numpy())  # Dropout(0.5) in training zeroes about half


def test_activation_input_tensors_enter_nested_models(quantized):
    reader = model_reader.reader_for(quantized)
    found = _by_path(quantized)
    wanted = {id(found[p].wrapper) for p in ("block/c1", "fc")}
    tensors = reader.activation_input_tensors(quantized, wanted)
    assert [w.layer.name for w, _ in tensors] == ["c1", "fc"]
    x = np.random.default_rng(1).normal(size=(3, 5, 5, 2)).astype(np.float32)
    c1_in, fc_in = reader.sub_model(quantized, [t for _, t in tensors])(x, training=False)
    np.testing.assert_array_equal(c1_in.numpy(), x)
    block_out = quantized.get_layer("block")(x, training=False).numpy()
    np.testing.assert_array_equal(fc_in.numpy(), block_out.reshape(3, -1))


def test_call_with_kernels_and_parameter_counts(quantized):
    reader = model_reader.reader_for(quantized)
    fc = _by_path(quantized)["fc"]
    kernel_before = fc.layer.kernel
    rng = np.random.default_rng(2)
    x, k = rng.normal(size=(2, 27)).astype(np.float32), rng.normal(size=(27, 4)).astype(np.float32)
    out = reader.call_with_kernels(fc, tf.constant(x), {"kernel": tf.constant(k)})
    expected = x.astype(np.float64) @ k + fc.layer.bias.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert fc.layer.kernel is kernel_before  # the wrapped layer is left as it was
    # kernel + bias + the quantizer's start, 3 intervals, beta1, beta2 (tfmot's int step counter is not float)
    assert reader.float_parameter_count(fc.wrapper) == 27 * 4 + 4 + 6
    assert reader.float_parameter_count(quantized.get_layer("flat")) == 0


def test_reader_for_names_what_it_reads():
    # Both front ends' readers are registered (tf_keras, and Keras 3 where it is installed).
    with pytest.raises(TypeError, match=r"expected a tf_keras.Model( or keras.Model \(Keras 3\))?, got int"):
        model_reader.reader_for(5)
    with pytest.raises(TypeError, match=r"expected a tf_keras.Model( or keras.Model \(Keras 3\))?, got str"):
        model_reader.quantized_layers("model")
