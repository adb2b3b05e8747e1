"""The official N2UQ MobileNetV2 (4-bit in the paper).

Float stem (3x3/2 conv, BN, ReLU6) and float classifier. Each inverted-residual block has
three stages RPReLU -> (activation quantizer) -> conv -> BN: 1x1 expansion, 3x3 depthwise
(the block's stride), 1x1 projection; the residual add (stride 1, same width) has no
activation after it. The final 1x1 conv to 1280 channels is quantized without an RPReLU
in front (the official code puts a PACT quantizer there, which at initialisation equals
the N2UQ quantizer: levels 0..2 at the midpoint thresholds) and is followed by BN, ReLU6.

Layer names: ``block{i}_conv{1,2,3}`` etc. for the 17 blocks, ``head_conv``, ``fc``.
"""

from n2uq_tf._keras import keras
from n2uq_tf.models import _common as common

layers = keras.layers

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
# The official N2UQ code gives the first block an expansion conv too (32 -> 32 channels).
_INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value, divisor=8):
    """Channels rounded to a multiple of 8, never below 90% of ``value`` (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def inverted_residual(x, out_channels, mid_channels, stride, prefix):
    in_channels = x.shape[-1]
    y = x
    stages = ((mid_channels, "expand"), (None, "depthwise"), (out_channels, "project"))
    for i, (filters, kind) in enumerate(stages, 1):
        y = common.rprelu(f"{prefix}_rprelu{i}")(y)
        if kind == "depthwise":
            y = common.depthwise_conv(3, stride, f"{prefix}_conv{i}")(y)
        else:
            y = common.conv(filters, 1, 1, f"{prefix}_conv{i}")(y)
        y = common.batch_norm(f"{prefix}_bn{i}")(y)
    if stride == 1 and in_channels == out_channels:
        y = layers.Add(name=f"{prefix}_add")([y, x])
    return y


def mobilenet_v2(bits: int | None = None, *, num_classes: int = 1000,
                 input_shape: tuple[int, int, int] = (224, 224, 3), alpha: float = 1.0, weight_bits: int | None = None,
                 activation_bits: int | None = None, name: str | None = None, learn_thresholds: bool = True,
                 method: str | None = None, weight_method: str | None = None,
                 activation_method: str | None = None) -> keras.Model:
    """The official N2UQ MobileNetV2; ``alpha`` scales every width (multiples of 8).

    ``bits=None`` returns the float model; an int (the paper uses 4) returns the quantized
    twin: float stem conv and fc, every other conv (including depthwise) quantized.
    ``method`` / ``weight_method`` / ``activation_method`` pick the quantizers (`n2uq_tf.quantize_model`'s).
    """
    name = name or "mobilenet_v2"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{name}: alpha must be a positive number, got {alpha!r}")
    input_shape = common.check_input_shape(input_shape, 32, name)
    num_classes = common.check_num_classes(num_classes, name)

    inputs = keras.Input(input_shape, name="input")
    stem_channels = make_divisible(32 * alpha)
    # Explicit (1, 1) padding: PyTorch's padding=1 at stride 2 (Keras 'same' pads (0, 1)).
    x = layers.ZeroPadding2D(1, name="stem_pad")(inputs)
    x = layers.Conv2D(stem_channels, 3, strides=2, use_bias=False, kernel_initializer=common.conv_initializer(),
                      name="stem_conv")(x)
    x = common.batch_norm("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)

    index = 1
    for expansion, channels, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
        out_channels = make_divisible(channels * alpha)
        for r in range(repeats):
            mid_channels = x.shape[-1] * expansion
            x = inverted_residual(x, out_channels, mid_channels, first_stride if r == 0 else 1, f"block{index}")
            index += 1

    last_channels = make_divisible(1280 * max(1.0, alpha))
    x = common.conv(last_channels, 1, 1, "head_conv")(x)
    x = common.batch_norm("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = common.classifier(num_classes, last_channels)(x)
    float_model = keras.Model(inputs, outputs, name=name)
    return common.finish(float_model, bits, weight_bits, activation_bits, learn_thresholds=learn_thresholds,
                         method=method, weight_method=weight_method, activation_method=activation_method)
