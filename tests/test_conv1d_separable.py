"""Conv1D and SeparableConv2D: quantized as the registry says, held against NumPy, saved, reported, exported.

A quantized Conv1D (causal padding and dilation included) is a conv of its quantized input and
weights, and exports as a 2-D conv of height 1. A quantized SeparableConv2D quantizes its input
before the depthwise conv and the depthwise output ("pointwise_input", its own learned
thresholds) before the pointwise conv, with per-channel weight scales for both kernels, and
exports as N2UQQuantize + N2UQDepthwiseConv2D + N2UQQuantizePack + N2UQConv2D (1x1).

The models are what a new user would bring: a small temporal conv net on synthetic time series
and an Xception-style block, trained a few steps with `fit`, then given learned-looking quantizer
parameters (thresholds spread over what each quantizer sees) so that every level is exercised.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
import n2uq_tf
from n2uq_tf import model_reader
from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops, export_tflite, inspect_tflite, lower, plan_export
from n2uq_tf.quantize import N2UQQuantizeConfig, N2UQWrapper, registry

L = keras.layers
F32 = np.float32
# As in test_export.py: the folded arithmetic differs from Keras' float32 convolutions by a few
# ulps; a wrong level or fold is ~1e-1.
REL_TOL = 2e-5


# --------------------------------------------------------------------------- models and data

def _time_series(count, length, seed):
    """Three noisy channels whose dominant frequency (1, 3 or 6 cycles per window) is the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    t = np.arange(length) / length
    cycles = np.array([1.0, 3.0, 6.0])[labels][:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 3))
    x = np.sin(2 * np.pi * cycles * t[None, :, None] + phase) + rng.normal(0, 0.3, (count, length, 3))
    return x.astype(F32), labels


def _tcn(length=32):
    """Causal dilated convs (a TCN), a strided causal conv, 'same' and 'valid' convs, BN to fold."""
    keras.utils.set_random_seed(10)
    inp = keras.Input((length, 3))
    x = L.Conv1D(8, 5, padding="causal", name="stem")(inp)                      # first: stays float
    x = L.ReLU(name="stem_relu")(x)
    x = L.Conv1D(8, 3, padding="causal", dilation_rate=2, name="causal_d2")(x)
    x = L.BatchNormalization(name="bn_d2")(x)                                   # folded into causal_d2
    x = L.ReLU(name="relu_d2")(x)
    x = L.Conv1D(12, 3, padding="causal", dilation_rate=4, use_bias=False, name="causal_d4")(x)
    x = L.Conv1D(12, 3, strides=2, padding="causal", name="causal_s2")(x)
    x = L.Conv1D(10, 4, strides=2, padding="same", activation="relu", name="same_s2")(x)
    x = L.Conv1D(6, 3, padding="valid", name="valid")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    x = L.Dense(3, name="head")(x)                                             # last: stays float
    return keras.Model(inp, x, name="tcn")


def _xception_block():
    """An Xception entry-flow block: separable convs with BN and ReLU, max-pool, 1x1 strided shortcut."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)  # first: stays float
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    shortcut = L.Conv2D(16, 1, strides=2, padding="same", use_bias=False, name="shortcut")(x)
    shortcut = L.BatchNormalization(name="shortcut_bn")(shortcut)
    y = L.SeparableConv2D(16, 3, padding="same", use_bias=False, name="sep1")(x)
    y = L.BatchNormalization(name="sep1_bn")(y)                                 # folded into sep1
    y = L.ReLU(name="sep1_relu")(y)
    y = L.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, name="sep2")(y)
    y = L.BatchNormalization(name="sep2_bn")(y)
    y = L.MaxPooling2D(3, strides=2, padding="same", name="pool")(y)
    x = L.Add(name="add")([y, shortcut])
    x = L.SeparableConv2D(24, 3, padding="same", dilation_rate=2, activation="relu", name="sep_dilated")(x)
    x = L.SeparableConv2D(24, 3, strides=2, padding="valid", name="sep_s2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(5, name="head")(x)                                             # last: stays float
    return keras.Model(inp, x, name="xception_block")


def _train(model, x, y, seed):
    keras.utils.set_random_seed(seed)
    q = n2uq_tf.quantize_model(model, bits=2)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return q


def _spread(variables, values, rng):
    """N2UQ parameters whose thresholds lie, unevenly spaced, over the 5th..95th percentile of ``values``."""
    beta1 = rng.uniform(0.8, 1.25)
    lo, hi = np.percentile(beta1 * np.asarray(values, np.float64), [5, 95])
    share = rng.uniform(0.5, 1.5, variables["intervals"].shape[0])
    variables["start"].assign(lo)
    variables["intervals"].assign((hi - lo) * share / share.sum())
    variables["beta1"].assign(beta1)
    variables["beta2"].assign(rng.uniform(0.7, 1.4))


def _learned_looking(model, x, seed):
    """Non-trivial BN statistics and quantizer parameters (a few training steps barely move the
    initial ones, and those hide bugs): each quantizer's thresholds spread over what it sees on x."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "moving_mean" in v.name:
            v.assign(rng.normal(0, 0.1, v.shape).astype(F32))
        elif "moving_variance" in v.name:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(F32))
    for name, wrapper in _wrappers(model).items():  # graph order: each sees its inputs' final values
        inputs = _layer_inputs(model, x)[name]
        _spread(wrapper.input_quantizer[1], inputs, rng)
        for _, _, variables in wrapper.intermediate_quantizers:
            _spread(variables, _depthwise_reference(wrapper, inputs), rng)
    return model


@pytest.fixture(scope="module")
def tcn():
    x, y = _time_series(64, 32, seed=0)
    return _learned_looking(_train(_tcn(), x, y, 0), x[:16], 0), x[:4]


@pytest.fixture(scope="module")
def xception():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (48, 16, 16, 3)).astype(F32), rng.integers(0, 5, 48)
    return _learned_looking(_train(_xception_block(), x, y, 1), x[:8], 1), x[:3]


def _wrappers(model):
    return {w.layer.name: w for w in model.layers if isinstance(w, N2UQWrapper)}


def _layer_inputs(model, x):
    """{layer name: the float input of each quantized layer} in Keras inference."""
    wrappers = list(_wrappers(model).values())
    tensors = model_reader.reader_for(model).activation_input_tensors(model, {id(w) for w in wrappers})
    values = keras.Model(model.inputs, [t for _, t in tensors])(x, training=False)
    return {w.layer.name: np.asarray(v) for (w, _), v in zip(tensors, tf.nest.flatten(values))}


# --------------------------------------------------------------------------- NumPy references

def _quantizer_parameters(variables):
    return tuple(F32(variables[k].numpy()) for k in ("start", "intervals", "beta1", "beta2"))


def _tf_same_padding(size, kernel, stride, dilation):
    """TensorFlow's 'SAME' (before, after) padding of one dimension."""
    extent = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _conv1d_reference(wrapper, x):
    """The quantized Conv1D in NumPy: N2UQ levels of x, entropy-preserving weights, padded 1-D conv."""
    layer, config = wrapper.layer, wrapper.quantize_config
    q = ref.quantize_f32(x, *_quantizer_parameters(wrapper.input_quantizer[1]), config.activation_bits)
    kernel = wrapper.weight_quantizers[0].variable.numpy()
    w, _, _ = ref.quantize_weights64(kernel, config.weight_bits, -1)   # [K][IC][OC]
    (k,), (s,), (d,) = layer.kernel_size, layer.strides, layer.dilation_rate
    pads = {"causal": ((k - 1) * d, 0), "valid": (0, 0),
            "same": _tf_same_padding(x.shape[1], k, s, d)}[layer.padding]
    xp = np.pad(q.astype(np.float64), ((0, 0), pads, (0, 0)))
    steps = (xp.shape[1] - (k - 1) * d - 1) // s + 1
    y = sum(xp[:, j * d: j * d + s * (steps - 1) + 1: s, :] @ w[j] for j in range(k))
    if layer.use_bias:
        y = y + layer.bias.numpy()
    return np.maximum(y, 0) if layer.activation is keras.activations.relu else y


def _separable_kernel(wrapper, attr):
    """A SeparableConv2D kernel as the quantized layer uses it (float64): entropy-preserving
    weights, one scale per depthwise output channel / per filter; the float kernel if unquantized."""
    config = wrapper.quantize_config
    if config.weight_bits is None:
        return getattr(wrapper.layer, attr).numpy().astype(np.float64)
    variable = wrapper.weight_quantizers[config.weight_attrs.index(attr)].variable
    axis = (-2, -1) if attr == "depthwise_kernel" else -1
    return ref.quantize_weights64(variable.numpy(), config.weight_bits, axis)[0]


def _depthwise_reference(wrapper, x):
    """A quantized SeparableConv2D's depthwise output in NumPy (float64): N2UQ levels of x, weights
    with one scale per depthwise output channel, TF's padding; output channel c * M + j."""
    layer, config = wrapper.layer, wrapper.quantize_config
    q = ref.quantize_f32(x, *_quantizer_parameters(wrapper.input_quantizer[1]),
                         config.activation_bits).astype(np.float64)
    dw = _separable_kernel(wrapper, "depthwise_kernel")
    kh, kw, c, m = dw.shape
    (sh, sw), (dh, dwl) = layer.strides, layer.dilation_rate
    if layer.padding == "same":
        pads = (_tf_same_padding(x.shape[1], kh, sh, dh), _tf_same_padding(x.shape[2], kw, sw, dwl))
    else:
        pads = ((0, 0), (0, 0))
    xp = np.pad(q, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dwl - 1) // sw + 1
    depthwise = np.zeros((x.shape[0], oh, ow, c, m))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a * dh: a * dh + sh * (oh - 1) + 1: sh, b * dwl: b * dwl + sw * (ow - 1) + 1: sw, :]
            depthwise += patch[..., None] * dw[a, b]
    return depthwise.reshape(x.shape[0], oh, ow, c * m)


def _separable_reference(wrapper, x):
    """The quantized SeparableConv2D in NumPy: input levels -> depthwise -> pointwise_input levels ->
    1x1 conv. Returns (output, depthwise output, pointwise_input levels)."""
    layer, config = wrapper.layer, wrapper.quantize_config
    bits = config.activation_bits
    depthwise = _depthwise_reference(wrapper, x)
    pw = _separable_kernel(wrapper, "pointwise_kernel")
    (_, _, mid_variables), = wrapper.intermediate_quantizers
    start, intervals, beta1, beta2 = _quantizer_parameters(mid_variables)
    # Keras computes the depthwise conv in float32: no value may sit within its rounding of a threshold.
    distance = ref.threshold_distance_f32(depthwise.astype(F32), start, intervals, beta1)
    assert distance.min() > 1e-5, "a depthwise output lies on a threshold: pick another seed"
    levels = ref.levels_f32(depthwise.astype(F32), start, intervals, beta1)
    mid = ref.output_from_levels_f32(levels, beta2, bits).astype(np.float64)
    y = mid @ pw[0, 0]
    if layer.use_bias:
        y = y + layer.bias.numpy()
    y = np.maximum(y, 0) if layer.activation is keras.activations.relu else y
    return y, depthwise, levels


def _assert_close(got, want, what):
    scale = max(float(np.abs(want).max()), 1.0)
    diff = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert diff <= REL_TOL * scale, f"{what}: max |diff| {diff:.3g} (outputs up to {scale:.3g})"


# --------------------------------------------------------------------------- registry and plan

def test_registry_rows():
    conv1d = registry.lookup(L.Conv1D(4, 3))
    separable = registry.lookup(L.SeparableConv2D(4, 3))
    assert conv1d == registry.Rule(("kernel",), -1) and conv1d.split is None
    assert separable.weight_attrs == ("depthwise_kernel", "pointwise_kernel")
    assert separable.channel_axis == {"depthwise_kernel": (-2, -1), "pointwise_kernel": -1}
    assert separable.split.name == "pointwise_input"


@pytest.mark.parametrize("layer, words", [
    (L.Conv2DTranspose(4, 3, name="float_layer"), "transposed convolution has no bit-serial kernel"),
    (L.SeparableConv1D(4, 3, name="float_layer"), "1-D separable"),
    (L.DepthwiseConv1D(3, name="float_layer"), "1-D depthwise"),
])
def test_layers_that_stay_float_say_why(layer, words):
    inp = keras.Input((8, 8, 4) if isinstance(layer, L.Conv2DTranspose) else (8, 4))
    conv = L.Conv2D if isinstance(layer, L.Conv2DTranspose) else L.Conv1D
    x = conv(4, 3, padding="same", name="c1")(inp)
    x = layer(x)
    x = conv(4, 3, padding="same", name="c2")(x)
    with pytest.warns(UserWarning, match=f"float_layer .{type(layer).__name__}.: .*{words}"):
        q = n2uq_tf.quantize_model(keras.Model(inp, x), bits=2, skip_layers=None)
    [row] = [r for r in n2uq_tf.quantization_report(q).layers if r.name == "float_layer"]
    assert row.status == "unsupported" and words in row.note


def test_default_plan_counts_new_layers_as_first_and_last(tcn, xception):
    for model, first, last in ((tcn[0], "stem", "head"), (xception[0], "stem", "head")):
        report = n2uq_tf.quantization_report(model)
        status = {r.name: r.status for r in report.layers}
        assert status[first] == status[last] == "kept float"
    assert set(_wrappers(tcn[0])) == {"causal_d2", "causal_d4", "causal_s2", "same_s2", "valid"}
    assert set(_wrappers(xception[0])) == {"shortcut", "sep1", "sep2", "sep_dilated", "sep_s2"}


def test_separable_config_by_hand_equals_quantize_model():
    """The README's tfmot-by-hand annotation of a SeparableConv2D gives the model quantize_model gives."""
    import tensorflow_model_optimization as tfmot
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 3))
    out = L.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")(inp)
    model = keras.Model(inp, out)
    auto = n2uq_tf.quantize_model(model, bits=2, skip_layers=None)
    config = N2UQQuantizeConfig(2, 2, weight_attrs=("depthwise_kernel", "pointwise_kernel"),
                                channel_axis={"depthwise_kernel": (-2, -1), "pointwise_kernel": -1})
    assert config == _wrappers(auto)["sep"].quantize_config
    assert N2UQQuantizeConfig.from_config(config.get_config()) == config
    annotated = keras.Sequential([keras.Input((6, 6, 3)), tfmot.quantization.keras.quantize_annotate_layer(
        L.SeparableConv2D(4, 3, depth_multiplier=2, name="sep"), config)])
    with n2uq_tf.quantize_scope():
        by_hand = tfmot.quantization.keras.quantize_apply(annotated, n2uq_tf.N2UQQuantizeScheme())
    by_hand.set_weights(auto.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(F32)
    np.testing.assert_array_equal(by_hand(x, training=False).numpy(), auto(x, training=False).numpy())
    with pytest.raises(ValueError, match=r"channel_axis names the kernels \[.depthwise_kernel.\], but weight_attrs"):
        N2UQQuantizeConfig(2, 2, weight_attrs=("depthwise_kernel", "pointwise_kernel"),
                           channel_axis={"depthwise_kernel": (-2, -1)})


# --------------------------------------------------------------------------- forward and gradients

def test_conv1d_forward_equals_numpy(tcn):
    model, x = tcn
    inputs = _layer_inputs(model, x)
    for name, wrapper in _wrappers(model).items():
        got = wrapper(inputs[name], training=False).numpy()
        want = _conv1d_reference(wrapper, inputs[name])
        assert got.shape == want.shape, name
        _assert_close(got, want, name)
    # causal: output step t sees input steps <= t only
    perturbed = x.copy()
    perturbed[:, 20:] += 5.0
    before, after = (_layer_inputs(model, v)["causal_s2"] for v in (x, perturbed))  # causal_d4's output
    np.testing.assert_array_equal(before[:, :20], after[:, :20])
    assert not np.array_equal(before[:, 20:], after[:, 20:])


def test_separable_forward_equals_numpy(xception):
    model, x = xception
    inputs = _layer_inputs(model, x)
    separable = {n: w for n, w in _wrappers(model).items() if n.startswith("sep")}
    assert len(separable) == 4
    for name, wrapper in separable.items():
        got = wrapper(inputs[name], training=False).numpy()
        want, _, levels = _separable_reference(wrapper, inputs[name])
        assert got.shape == want.shape, name
        assert len(np.unique(levels)) > 1, f"{name}: degenerate pointwise_input levels make the test weak"
        _assert_close(got, want, name)
        # Without the quantizer between depthwise and pointwise the layer computes something else.
        layer = wrapper.layer
        kernels = {attr: quantizer(w, False, weights=v) for attr, w, quantizer, v in wrapper.weight_quantizers}
        assert list(kernels) == ["depthwise_kernel", "pointwise_kernel"]
        quantized_input = wrapper.input_quantizer[0](tf.constant(inputs[name]), False,
                                                     weights=wrapper.input_quantizer[1])
        unquantized = registry.split_of(layer).call(layer, quantized_input, kernels, lambda t: t)
        assert np.abs(unquantized.numpy() - want).max() > 1e-2


def _assert_sum_close(got, want, scale, name, rtol=1e-4):
    err = np.abs(np.asarray(got, np.float64) - want)
    tol = rtol * (np.asarray(scale) + np.abs(want)) + 1e-6
    assert np.all(err <= tol), f"{name}: got {got}, want {want}"


def _single_layer(layer, shape, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    q = n2uq_tf.quantize_model(keras.Model(inp, layer(inp)), bits=2, skip_layers=None)
    [wrapper] = _wrappers(q).values()
    rng = np.random.default_rng(seed)
    for v in wrapper.weights:  # non-trivial quantizer parameters
        if "n2uq_start" in v.name:
            v.assign(rng.uniform(-0.4, -0.1))
        elif "n2uq_intervals" in v.name:
            v.assign(rng.uniform(0.2, 0.6, v.shape).astype(F32))
        elif "n2uq_beta" in v.name:
            v.assign(rng.uniform(0.8, 1.3))
    return wrapper


@pytest.mark.parametrize("kind", ["conv1d_causal", "separable"])
def test_every_variable_gets_a_gradient(kind):
    if kind == "separable":
        wrapper = _single_layer(L.SeparableConv2D(5, 3, padding="same", depth_multiplier=2, name="sep"), (7, 7, 4), 4)
        x = np.random.default_rng(5).normal(0, 1, (2, 7, 7, 4)).astype(F32)
    else:
        wrapper = _single_layer(L.Conv1D(5, 3, padding="causal", dilation_rate=2, name="c"), (12, 4), 4)
        x = np.random.default_rng(5).normal(0, 1, (2, 12, 4)).astype(F32)
    g = np.random.default_rng(6).normal(0, 1, wrapper(x).shape).astype(F32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x, training=True) * g)
    variables = wrapper.trainable_weights
    names = [v.name.split("/")[-1].split(":")[0] for v in variables]
    expected = {"kernel", "bias"} if kind != "separable" else {"depthwise_kernel", "pointwise_kernel", "bias"}
    prefixes = ["input"] + (["pointwise_input"] if kind == "separable" else [])
    expected |= {f"{p}_n2uq_{s}" for p in prefixes for s in ("start", "intervals", "beta1", "beta2")}
    assert set(names) == expected
    grads = dict(zip(names, tape.gradient(loss, variables)))
    for name, grad in grads.items():
        assert grad is not None and np.any(grad.numpy() != 0), name
    if kind != "separable":
        return
    # The pointwise_input quantizer's gradients are the G-STE formulas on the depthwise output,
    # with the upstream gradient sent back through the quantized pointwise kernel.
    _, depthwise, _ = _separable_reference(wrapper, x)
    pw, _, _ = ref.quantize_weights64(wrapper.weight_quantizers[1].variable.numpy(), 2, -1)
    upstream = g.astype(np.float64) @ pw[0, 0].T
    (_, _, v), = wrapper.intermediate_quantizers
    start, intervals, beta1, beta2 = _quantizer_parameters(v)
    assert ref.boundary_distance64(float(beta1) * depthwise, start, intervals).min() > 1e-5
    want = ref.gradients64(depthwise, upstream, start, intervals, beta1, beta2, 2)
    scale = ref.gradient_scales64(depthwise, upstream, start, intervals, beta1, beta2, 2)
    for key in ("start", "intervals", "beta1", "beta2"):
        _assert_sum_close(grads[f"pointwise_input_n2uq_{key}"].numpy(), want[key], scale[key], key)


# --------------------------------------------------------------------------- save, load, report

def _weights_by_layer(model):
    return [(layer.name, [v.numpy() for v in layer.weights]) for layer in model.layers]


@pytest.mark.parametrize("filename", ["model.keras", "model.h5", "saved_model"])
def test_save_load_bit_identical(tcn, xception, filename, tmp_path):
    for model, x in (tcn, xception):
        path = str(tmp_path / f"{model.name}_{filename}")
        model.save(path)
        loaded = n2uq_tf.load_model(path)
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
        before, after = _weights_by_layer(model), _weights_by_layer(loaded)
        assert [name for name, _ in before] == [name for name, _ in after]
        for (name, a), (_, b) in zip(before, after):
            assert len(a) == len(b), name
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v, err_msg=name)
        for name, wrapper in _wrappers(loaded).items():
            original = _wrappers(model)[name]
            assert len(wrapper.intermediate_quantizers) == len(original.intermediate_quantizers)
            for (_, _, got), (_, _, want) in zip(wrapper.intermediate_quantizers, original.intermediate_quantizers):
                for key in want:
                    np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=f"{name} {key}")


def test_report_lists_the_layers(tcn, xception):
    report = n2uq_tf.quantization_report(xception[0])
    rows = {r.name: r for r in report.layers}
    wrappers = _wrappers(xception[0])
    for name in ("sep1", "sep2", "sep_dilated", "sep_s2"):
        row, layer = rows[name], wrappers[name].layer
        assert (row.status, row.type, row.weight_bits, row.activation_bits) == ("quantized", "SeparableConv2D", 2, 2)
        kh, kw, c, m = layer.depthwise_kernel.shape
        filters = layer.pointwise_kernel.shape[-1]
        bias = filters if layer.use_bias else 0
        quantizer_values = 2 * (3 + 3)  # two N2UQ quantizers: start, 3 intervals, beta1, beta2
        assert row.params == kh * kw * c * m + c * m * filters + bias + quantizer_values
        # What the file holds: both kernels at 2 bits a weight; float32 multiplier and bias per
        # output channel of each op (c * m depthwise, `filters` pointwise) and 3 thresholds per quantizer
        assert row.export == "packed"
        assert row.packed_bytes == (math.ceil(kh * kw * c * m * 2 / 8) + math.ceil(c * m * filters * 2 / 8)
                                    + 4 * (2 * c * m + 3) + 4 * (2 * filters + 3))
        (_, quantizer, variables), = wrappers[name].intermediate_quantizers
        levels = quantizer.uniform_levels(variables)
        np.testing.assert_allclose(row.intermediate_thresholds["pointwise_input"],
                                   levels.thresholds / levels.input_scale, rtol=1e-6)
        assert f"{name} " in str(report) and "pointwise_input:" in str(report)
    conv = {r.name: r for r in n2uq_tf.quantization_report(tcn[0]).layers}
    assert conv["causal_d2"].status == "quantized" and conv["causal_d2"].type == "Conv1D"
    assert conv["causal_d2"].export == "packed" and conv["bn_d2"].export == "folded"
    assert conv["causal_d2"].packed_bytes == math.ceil(3 * 8 * 8 * 2 / 8) + 4 * (2 * 8 + 3)
    assert conv["causal_d2"].intermediate_thresholds is None


# --------------------------------------------------------------------------- export

def _run_tflite(data, x, backend):
    from ai_edge_litert import interpreter as litert
    from n2uq_tf import tflite
    make, load = ((tf.lite.Interpreter, tf.lite.experimental.load_delegate) if backend == "tflite"
                  else (litert.Interpreter, litert.load_delegate))
    interpreter = make(model_content=data, experimental_delegates=[load(tflite.delegate_path())])
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _check_lowered_codes(model, x):
    """Lowered graph == Keras; every quantize op's codes == the NumPy levels of what it quantizes."""
    lowered = lower(model)
    _assert_close(lowered(x).numpy(), model(x, training=False).numpy(), "lowered")
    codes = {k: v.numpy() for k, v in lowered.activation_codes(x).items()}
    inputs = _layer_inputs(model, x)
    wrappers = _wrappers(model)
    for name, wrapper in wrappers.items():
        want = ref.levels_f32(inputs[name], *_quantizer_parameters(wrapper.input_quantizer[1])[:3])
        np.testing.assert_array_equal(codes[name], want, err_msg=name)
        assert len(np.unique(want)) > 1, name
        if wrapper.intermediate_quantizers:
            _, _, levels = _separable_reference(wrapper, inputs[name])
            np.testing.assert_array_equal(codes[f"{name}/pointwise_input"], levels, err_msg=name)
    assert len(codes) == len(wrappers) + sum(len(w.intermediate_quantizers) for w in wrappers.values())
    return lowered


def test_conv1d_lowers_to_height_one_convs(tcn):
    model, x = tcn
    lowered = _check_lowered_codes(model, x)
    rows = {r.name: r for r in lowered.report.layers}
    assert rows["causal_d2"].folded == "bn_d2" and rows["bn_d2"].status == "folded"
    assert rows["same_s2"].ops == [custom_ops.OP_QUANTIZE_PACK, custom_ops.OP_CONV2D, "builtin relu"]
    stages = {s.name: s for s in lowered.lowered_layers}
    # (kernel, strides, dilations, paddings) of each as a 2-D conv of height 1
    assert (stages["causal_d2"].kernel_size, stages["causal_d2"].dilations, stages["causal_d2"].paddings) == \
        ((1, 3), (1, 2), ((0, 0), (4, 0)))
    assert stages["causal_d4"].paddings == ((0, 0), (8, 0))
    assert (stages["causal_s2"].strides, stages["causal_s2"].paddings) == ((1, 2), ((0, 0), (2, 0)))
    assert (stages["same_s2"].strides, stages["same_s2"].paddings) == ((1, 2), ((0, 0), (1, 1)))
    assert stages["valid"].paddings == ((0, 0), (0, 0))


def test_separable_lowers_to_two_stages(xception):
    model, x = xception
    lowered = _check_lowered_codes(model, x)
    rows = {r.name: r for r in lowered.report.layers}
    pair = [custom_ops.OP_QUANTIZE, custom_ops.OP_DEPTHWISE_CONV2D, custom_ops.OP_QUANTIZE_PACK, custom_ops.OP_CONV2D]
    assert rows["sep1"].ops == pair and rows["sep1"].folded == "sep1_bn"
    assert rows["sep_dilated"].ops == pair + ["builtin relu"]
    assert rows["sep2"].folded == "sep2_bn" and rows["shortcut"].folded == "shortcut_bn"
    assert rows["stem_bn"].status == "float"  # after a float conv
    stages = {s.name: s for s in lowered.lowered_layers}
    assert stages["sep_dilated/depthwise"].dilations == (2, 2)
    assert stages["sep_dilated/depthwise"].paddings == ((2, 2), (2, 2))
    assert (stages["sep_s2/depthwise"].strides, stages["sep_s2/depthwise"].paddings) == ((2, 2), ((0, 0), (0, 0)))
    for name in ("sep1", "sep2", "sep_dilated", "sep_s2"):
        assert (stages[name].kernel_size, stages[name].strides, stages[name].paddings) == \
            ((1, 1), (1, 1), ((0, 0), (0, 0)))
    assert len(stages["sep2/depthwise"].multiplier) == 32 and stages["sep2"].in_channels == 32


def _layout(stage, kernel):
    """The kernel's codes in the custom op's layout (custom_ops docstring)."""
    axis = (-2, -1) if stage.kind == custom_ops.OP_DEPTHWISE_CONV2D else -1
    k = ref.quantize_weights64(kernel, stage.report.weight_bits, axis)[2]
    if stage.kind == custom_ops.OP_DEPTHWISE_CONV2D:
        return k  # [KH][KW][C][M]
    return k.reshape(*stage.kernel_size, k.shape[-2], k.shape[-1]).transpose(3, 0, 1, 2)  # [OC][KH][KW][IC]


@pytest.mark.parametrize("backend", ["tflite", "litert"])
def test_export_matches_keras_in_both_interpreters(tcn, xception, backend, tmp_path):
    for model, x in (tcn, xception):
        data, report = export_tflite(model, tmp_path / f"{model.name}.tflite", return_report=True)
        assert not report.kept_builtin
        got = _run_tflite(data, x, backend)
        _assert_close(got, model(x, training=False).numpy(), f"{backend} {model.name}")
        if backend != "tflite":
            continue
        info = inspect_tflite(data)
        stages = {s.name: s for s in lower(model).lowered_layers}
        assert {layer.name for layer in info.layers} == set(stages)
        wrappers = _wrappers(model)
        for layer in info.layers:
            stage = stages[layer.name]
            wrapper = wrappers[stage.layer.name]
            index = 0 if stage.kind == custom_ops.OP_DEPTHWISE_CONV2D or not wrapper.intermediate_quantizers else 1
            codes = custom_ops.unpack_weight_codes(stage.stream, stage.weight_count, 2)
            kernel = wrapper.weight_quantizers[index].variable.numpy()
            np.testing.assert_array_equal(codes, _layout(stage, kernel).reshape(-1))
            assert layer.packed_bytes == math.ceil(stage.weight_count * 2 / 8)
            op = next(o for o in info.operators if o.layer == layer.name)
            assert (op.options["kernel_height"], op.options["kernel_width"]) == stage.kernel_size
            if op.options.get("padding") == custom_ops.PADDING_SAME:  # computed by the kernel at any size
                assert stage.layer.padding == "same" and "pad_left" not in op.options
            else:
                assert (op.options["pad_left"], op.options["pad_right"]) == stage.paddings[1]


def test_variable_length_causal_conv1d(tmp_path):
    """Causal Conv1D on [batch, time, channels] with the time unknown: one file runs any length."""
    keras.utils.set_random_seed(12)
    inp = keras.Input((None, 3))
    x = L.Conv1D(6, 3, padding="causal", name="c1")(inp)
    x = L.Conv1D(6, 3, padding="causal", dilation_rate=2, name="c2")(x)
    x = L.Conv1D(4, 2, padding="causal", name="c3")(x)
    model = keras.Model(inp, L.GlobalMaxPooling1D()(x))
    q = n2uq_tf.quantize_model(model, bits=2)
    x20 = _time_series(4, 20, seed=3)[0]
    _learned_looking(q, x20, 3)
    data = export_tflite(q)
    for length in (20, 33):
        x = _time_series(2, length, seed=length)[0]
        for backend in ("tflite", "litert"):
            _assert_close(_run_tflite(data, x, backend), q(x, training=False).numpy(), f"{backend} length {length}")
    # 'same' on an unknown length: the padding depends on the length, so the layer stays builtin
    inp = keras.Input((None, 3))
    x = L.Conv1D(4, 3, padding="same", name="c1")(inp)
    x = L.Conv1D(4, 3, padding="same", name="same")(x)
    x = L.Conv1D(4, 3, padding="same", name="c3")(x)
    q = n2uq_tf.quantize_model(keras.Model(inp, x), bits=2)
    kept = {r.name: r.reason for r in plan_export(q).kept_builtin}
    assert kept == {"same": "'same' padding on an input of unknown width"}


def test_separable_kept_builtin_keeps_the_intermediate_quantizer(xception):
    """A separable conv the kernels cannot take (8-bit weights) stays builtin, quantizer between stages included."""
    keras.utils.set_random_seed(13)
    inp = keras.Input((8, 8, 4))
    x = L.SeparableConv2D(6, 3, padding="same", name="sep_w8")(inp)
    q = n2uq_tf.quantize_model(keras.Model(inp, x), bits=2, skip_layers=None, overrides={"sep_w8": (8, 4)})
    x = np.random.default_rng(0).normal(0, 1, (2, 8, 8, 4)).astype(F32)
    _learned_looking(q, x, 4)
    report = plan_export(q)
    [row] = report.kept_builtin
    assert row.name == "sep_w8" and "W8A4" in row.reason and "1..4 bits" in row.reason
    _assert_close(lower(q)(x).numpy(), q(x, training=False).numpy(), "kept builtin")
    wrapper = _wrappers(q)["sep_w8"]
    want, _, _ = _separable_reference(wrapper, x)
    _assert_close(lower(q)(x).numpy(), want, "kept builtin vs NumPy")
    # float weights, quantized activations: both quantizers, the layer's own kernels
    q = n2uq_tf.quantize_model(keras.Model(inp, L.SeparableConv2D(6, 3, name="sep_wfloat")(inp)), bits=2,
                               skip_layers=None, overrides={"sep_wfloat": {"weight_bits": None}})
    wrapper = _wrappers(q)["sep_wfloat"]
    assert len(wrapper.intermediate_quantizers) == 1 and not wrapper.weight_quantizers
    _learned_looking(q, x, 5)
    [row] = plan_export(q).kept_builtin
    assert "weight_bits=None" in row.reason
    _assert_close(lower(q)(x).numpy(), q(x, training=False).numpy(), "float weights")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x, training=True))
    assert all(g is not None for g in tape.gradient(loss, q.trainable_weights))


def test_separable_mixed_precision_training():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(14)
        inp = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 3, padding="same")(inp)
        x = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
        x = L.GlobalAveragePooling2D()(x)
        out = L.Dense(3, dtype="float32")(x)
        q = n2uq_tf.quantize_model(keras.Model(inp, out), bits=2)
        wrapper = _wrappers(q)["sep"]
        assert all(v.dtype == "float32" for _, _, vs in wrapper.intermediate_quantizers for v in vs.values())
        q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        history = q.fit(rng.normal(size=(8, 8, 8, 3)).astype(F32), rng.integers(0, 3, 8), epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
