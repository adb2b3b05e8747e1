"""n2uq_tf.layers: RPReLU and the PyTorch-padded convolutions, against NumPy references."""

import numpy as np
import pytest
import tf_keras as keras

import numpy_reference as ref
import n2uq_tf
from n2uq_tf import layers as n2uq_layers
from n2uq_tf.quantize import N2UQWrapper, registry


def torch_style_conv(x, kernel, stride, padding, depthwise=False, dilation=1):
    """NumPy float64: zero-pad ((top, bottom), (left, right)) then a 'valid' strided conv (NHWC)."""
    (top, bottom), (left, right) = padding
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    out_w = (x.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    channels_out = kernel.shape[2] * kernel.shape[3] if depthwise else kernel.shape[3]
    out = np.zeros((x.shape[0], out_h, out_w, channels_out))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dilation: i * dilation + stride * (out_h - 1) + 1: stride,
                      j * dilation: j * dilation + stride * (out_w - 1) + 1: stride, :]
            if depthwise:
                out += (patch[..., None] * kernel[i, j]).reshape(out.shape)
            else:
                out += patch @ kernel[i, j]
    return out


def numpy_rprelu(x, bias1, alpha, bias2):
    y = x + bias1
    return np.where(y > 0, y, alpha * y) + bias2


# ------------------------------------------------------------------ RPReLU

def test_rprelu_matches_numpy():
    rng = np.random.default_rng(0)
    layer = n2uq_layers.RPReLU()
    x = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)
    layer.build(x.shape)
    bias1, alpha, bias2 = (rng.normal(size=6).astype(np.float32) for _ in range(3))
    layer.set_weights([bias1, alpha, bias2])
    np.testing.assert_allclose(layer(x).numpy(), numpy_rprelu(x, bias1, alpha, bias2), rtol=1e-6, atol=1e-6)


def test_rprelu_initialisation_and_config():
    layer = n2uq_layers.RPReLU(name="r")
    layer.build((None, 4, 4, 3))
    bias1, alpha, bias2 = layer.get_weights()
    np.testing.assert_array_equal(alpha, np.full(3, 0.25, np.float32))  # torch.nn.PReLU's init
    np.testing.assert_array_equal(bias1, 0)
    np.testing.assert_array_equal(bias2, 0)
    x = np.array([[-2.0, 0.0, 3.0]], np.float32)
    np.testing.assert_allclose(layer(x).numpy(), [[-0.5, 0.0, 3.0]])
    clone = n2uq_layers.RPReLU.from_config(layer.get_config())
    assert clone.name == "r" and clone.alpha_initializer == 0.25


def test_rprelu_needs_known_channels():
    with pytest.raises(ValueError, match="channel"):
        n2uq_layers.RPReLU(name="r").build((None, 4, None))


# ------------------------------------------------------------------ padded convolutions

@pytest.mark.parametrize("size,kernel_size,stride,padding,dilation", [
    (8, 3, 2, None, 1),             # the case where Keras 'same' pads (0, 1)
    (7, 3, 2, None, 1),
    (8, 3, 1, None, 1),
    (9, 5, 2, None, 1),
    (8, 3, 1, None, 2),
    (8, 3, 2, ((0, 2), (1, 0)), 1),  # asymmetric explicit padding
])
def test_padded_conv_matches_torch_style_reference(size, kernel_size, stride, padding, dilation):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    layer = n2uq_layers.PaddedConv2D(4, kernel_size, strides=stride, explicit_padding=padding,
                                     dilation_rate=dilation)
    got = layer(x).numpy()
    kernel, bias = layer.get_weights()
    pad = padding or ((dilation * (kernel_size - 1) // 2,) * 2,) * 2
    expected = torch_style_conv(x, kernel, stride, pad, dilation=dilation) + bias
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert layer.compute_output_shape(x.shape).as_list() == list(expected.shape)


@pytest.mark.parametrize("depthwise", [False, True])
def test_padded_convs_with_unknown_spatial_size(depthwise):
    """The input size is only known when called: the padding is chosen per call, both sizes exact."""
    inputs = keras.Input((None, None, 3))
    if depthwise:
        layer = n2uq_layers.PaddedDepthwiseConv2D(3, strides=2)
    else:
        layer = n2uq_layers.PaddedConv2D(4, 3, strides=2)
    model = keras.Model(inputs, layer(inputs))
    assert model.output_shape[1:3] == (None, None)
    kernel, bias = layer.get_weights()
    for size in (8, 9):
        x = np.random.default_rng(size).normal(size=(1, size, size, 3)).astype(np.float32)
        expected = torch_style_conv(x, kernel, 2, ((1, 1), (1, 1)), depthwise=depthwise) + bias
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)


def test_keras_same_padding_differs_from_pytorch_at_stride_2():
    """Why PaddedConv2D exists: on an even input, 'same' at stride 2 pads (0, 1), PyTorch (1, 1)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
    same = keras.layers.Conv2D(3, 3, strides=2, padding="same", use_bias=False)
    same.build(x.shape)
    padded = n2uq_layers.PaddedConv2D(3, 3, strides=2, use_bias=False)
    padded.build(x.shape)
    padded.set_weights(same.get_weights())
    expected = torch_style_conv(x, same.get_weights()[0], 2, ((1, 1), (1, 1)))
    np.testing.assert_allclose(padded(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(same(x).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("size,stride", [(8, 2), (7, 2), (8, 1)])
def test_padded_depthwise_conv_matches_torch_style_reference(size, stride):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, size, size, 5)).astype(np.float32)
    layer = n2uq_layers.PaddedDepthwiseConv2D(3, strides=stride, depth_multiplier=2)
    got = layer(x).numpy()
    kernel, bias = layer.get_weights()
    expected = torch_style_conv(x, kernel, stride, ((1, 1), (1, 1)), depthwise=True) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_padded_layers_config_round_trip():
    conv = n2uq_layers.PaddedConv2D(4, 3, strides=2, explicit_padding=((0, 1), (2, 3)), name="c")
    clone = n2uq_layers.PaddedConv2D.from_config(conv.get_config())
    assert clone.explicit_padding == ((0, 1), (2, 3)) and clone.strides == (2, 2) and clone.padding == "valid"
    dw = n2uq_layers.PaddedDepthwiseConv2D(5, name="d")
    assert n2uq_layers.PaddedDepthwiseConv2D.from_config(dw.get_config()).explicit_padding == ((2, 2), (2, 2))
    assert n2uq_layers.PaddedConv2D(2, 3, explicit_padding=1).explicit_padding == ((1, 1), (1, 1))
    assert n2uq_layers.PaddedConv2D(2, 3, explicit_padding=(0, 2)).explicit_padding == ((0, 0), (2, 2))


def test_padded_conv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'valid'"):
        n2uq_layers.PaddedConv2D(2, 3, padding="same")
    with pytest.raises(ValueError, match="non-negative"):
        n2uq_layers.PaddedConv2D(2, 3, explicit_padding=((-1, 1), (1, 1)))
    with pytest.raises(ValueError, match="explicit_padding"):
        n2uq_layers.PaddedConv2D(2, 3, explicit_padding="wide")
    with pytest.raises(ValueError, match="channels_last"):
        n2uq_layers.PaddedDepthwiseConv2D(3, data_format="channels_first")


def test_custom_objects_and_registry():
    assert n2uq_layers.custom_objects() == {"RPReLU": n2uq_layers.RPReLU, "PaddedConv2D": n2uq_layers.PaddedConv2D,
                                            "PaddedDepthwiseConv2D": n2uq_layers.PaddedDepthwiseConv2D}
    for name, cls in n2uq_layers.custom_objects().items():
        assert n2uq_tf.custom_objects()[name] is cls
    assert registry.lookup(n2uq_layers.PaddedConv2D(2, 3)) == registry.Rule(("kernel",), -1, None)
    assert registry.lookup(n2uq_layers.PaddedDepthwiseConv2D(3)) == registry.Rule(("depthwise_kernel",), (-2, -1), None)


# ------------------------------------------------------------------ quantized: padding after the quantizer

@pytest.mark.parametrize("depthwise", [False, True])
def test_quantized_padded_conv_pads_with_level_zero(depthwise):
    """With start < 0 an input of 0 quantizes to level 1; the padded border must still be level 0."""
    bits, start, stride = 2, -0.5, 2
    intervals = np.full(3, 2.0 / 3.0, np.float32)
    inputs = keras.Input((8, 8, 3))
    if depthwise:
        conv = n2uq_layers.PaddedDepthwiseConv2D(3, strides=stride, use_bias=False, name="conv")
    else:
        conv = n2uq_layers.PaddedConv2D(4, 3, strides=stride, use_bias=False, name="conv")
    model = n2uq_tf.quantize_model(keras.Model(inputs, conv(inputs)), bits, skip_layers=None)
    wrapper = next(layer for layer in model.layers if isinstance(layer, N2UQWrapper))
    _, variables = wrapper.input_quantizer
    variables["start"].assign(start)

    # Inputs well away from the thresholds (-1/6, 1/2, 7/6) so float rounding cannot flip a level.
    rng = np.random.default_rng(4)
    x = rng.choice(np.array([-1.0, -0.4, 0.0, 0.1, 0.8, 1.5, 2.5], np.float32), size=(2, 8, 8, 3))
    got = model(x, training=False).numpy()

    # The wrapper holds the kernel variable (the inner layer's attribute is the quantized tensor).
    kernel = next(v for v in wrapper.weights if v.name.split("/")[-1].split(":")[0] in ("kernel", "depthwise_kernel"))
    kernel = kernel.numpy()
    axis = (-2, -1) if depthwise else -1
    wq = ref.quantize_weights_f32(kernel, bits, axis)
    xq = ref.quantize_f32(x, start, intervals, 1.0, 1.0, bits)
    pad = ((1, 1), (1, 1))
    expected = torch_style_conv(xq, wq, stride, pad, depthwise=depthwise)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # Padding before the quantizer would have made the border level 1 and changed the border outputs.
    padded_first = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    wrong = torch_style_conv(ref.quantize_f32(padded_first, start, intervals, 1.0, 1.0, bits), wq, stride,
                             ((0, 0), (0, 0)), depthwise=depthwise)
    assert not np.allclose(got[:, 0], wrong[:, 0], atol=1e-3)


def test_model_with_n2uq_layers_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 3))
    x = n2uq_layers.PaddedConv2D(4, 3, strides=2)(inputs)
    x = n2uq_layers.RPReLU()(x)
    x = n2uq_layers.PaddedDepthwiseConv2D(3, strides=2)(x)
    model = keras.Model(inputs, x)
    for layer in model.layers[1:]:
        layer.set_weights([np.random.default_rng(6).normal(size=w.shape) for w in layer.get_weights()])
    data = np.random.default_rng(7).normal(size=(2, 8, 8, 3)).astype(np.float32)
    for filename in ("m.h5", "m.keras"):
        model.save(tmp_path / filename)
        loaded = keras.models.load_model(tmp_path / filename, custom_objects=n2uq_layers.custom_objects())
        np.testing.assert_array_equal(loaded.predict(data, verbose=0), model.predict(data, verbose=0))
