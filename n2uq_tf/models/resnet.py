"""The official N2UQ pre-activation ResNets (ImageNet ResNet-18/34/50) and a CIFAR ResNet-20.

Every block stage is RPReLU -> (activation quantizer) -> conv -> BN; the shortcut takes the
raw block input (through the downsample conv + BN when the shape changes) and an RPReLU
follows the addition. The activation quantizer lives in the N2UQWrapper of the conv, so
the float model is the same graph without it: the teacher and the initialisation.

Layer names mirror the PyTorch module names (``layer2_0_conv1`` is ``layer2[0].conv1``); one
RPReLU layer ``rprelu{i}`` holds PyTorch's ``bias{i}1``, ``prelu{i}``, ``bias{i}2``, and the one after
the addition is ``rprelu_out``; ``downsample_conv`` / ``downsample_bn`` are the downsample's conv and BN.
"""

from n2uq_tf._keras import keras
from n2uq_tf.models import _common as common

layers = keras.layers


def basic_block(x, planes, stride, prefix):
    """Two 3x3 stages (expansion 1)."""
    shortcut = _shortcut(x, planes, stride, prefix)
    y = common.rprelu(f"{prefix}_rprelu1")(x)
    y = common.conv(planes, 3, stride, f"{prefix}_conv1")(y)
    y = common.batch_norm(f"{prefix}_bn1")(y)
    y = common.rprelu(f"{prefix}_rprelu2")(y)
    y = common.conv(planes, 3, 1, f"{prefix}_conv2")(y)
    y = common.batch_norm(f"{prefix}_bn2")(y)
    y = layers.Add(name=f"{prefix}_add")([y, shortcut])
    return common.rprelu(f"{prefix}_rprelu_out")(y)


def bottleneck_block(x, planes, stride, prefix, expansion=4):
    """1x1 reduce, 3x3 (stride here, as torchvision v1.5), 1x1 expand by 4."""
    shortcut = _shortcut(x, planes * expansion, stride, prefix)
    y = x
    for i, (filters, kernel, s) in enumerate(((planes, 1, 1), (planes, 3, stride), (planes * expansion, 1, 1)), 1):
        y = common.rprelu(f"{prefix}_rprelu{i}")(y)
        y = common.conv(filters, kernel, s, f"{prefix}_conv{i}")(y)
        y = common.batch_norm(f"{prefix}_bn{i}")(y)
    y = layers.Add(name=f"{prefix}_add")([y, shortcut])
    return common.rprelu(f"{prefix}_rprelu_out")(y)


def _shortcut(x, filters, stride, prefix):
    """The raw block input, or downsample conv 1x1 (stride) -> BN of it when the shape changes.

    No RPReLU here: when quantized, the downsample conv's quantizer sees the raw input.
    """
    if stride == 1 and x.shape[-1] == filters:
        return x
    y = common.conv(filters, 1, stride, f"{prefix}_{common.DOWNSAMPLE_SUFFIX}")(x)
    return common.batch_norm(f"{prefix}_downsample_bn")(y)


_BLOCKS = {"basic": basic_block, "bottleneck": bottleneck_block}


def _stages(x, block, blocks_per_stage, widths, strides):
    block_fn = _BLOCKS[block]
    for stage, (count, planes, stride) in enumerate(zip(blocks_per_stage, widths, strides), 1):
        for index in range(count):
            x = block_fn(x, planes, stride if index == 0 else 1, f"layer{stage}_{index}")
    return x


def _head(x, num_classes):
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return common.classifier(num_classes, x.shape[-1])(x)


def imagenet_resnet(block, blocks_per_stage, *, num_classes=1000, input_shape=(224, 224, 3), name="resnet"):
    """The float ImageNet ResNet: stem 7x7/2 conv, BN, ReLU, 3x3/2 maxpool; four stages; GAP; fc."""
    input_shape = common.check_input_shape(input_shape, 32, name)
    num_classes = common.check_num_classes(num_classes, name)
    inputs = keras.Input(input_shape, name="input")
    # PyTorch pads 3 on each side; Keras 'same' would pad (2, 3) on even inputs.
    x = layers.ZeroPadding2D(3, name="stem_pad")(inputs)
    x = layers.Conv2D(64, 7, strides=2, use_bias=False, kernel_initializer=common.conv_initializer(),
                      name="stem_conv")(x)
    x = common.batch_norm("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    # Zero padding equals PyTorch's -inf padding here because the input is a ReLU output (>= 0).
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    x = _stages(x, block, blocks_per_stage, (64, 128, 256, 512), (1, 2, 2, 2))
    return keras.Model(inputs, _head(x, num_classes), name=name)


def _imagenet_builder(arch, block, blocks_per_stage):
    def build(bits: int | None = None, *, num_classes: int = 1000, input_shape: tuple[int, int, int] = (224, 224, 3),
              quantize_downsample: bool = True, weight_bits: int | None = None, activation_bits: int | None = None,
              name: str | None = None, learn_thresholds: bool = True, method: str | None = None,
              weight_method: str | None = None, activation_method: str | None = None) -> keras.Model:
        float_model = imagenet_resnet(block, blocks_per_stage, num_classes=num_classes, input_shape=input_shape,
                                      name=name or arch)
        return common.finish(float_model, bits, weight_bits, activation_bits, quantize_downsample, learn_thresholds,
                             method, weight_method, activation_method)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = f"""The official N2UQ {arch} ({block} blocks {list(blocks_per_stage)}).

    ``bits=None`` (and no weight_bits/activation_bits) returns the float model: the
    teacher and the initialisation. An int returns the quantized twin with the paper's
    plan (`n2uq_tf.models.quantize`): float stem conv and fc, every other conv quantized;
    ``quantize_downsample=False`` keeps the downsample convs float (the paper's N2UQ*).
    ``weight_bits`` / ``activation_bits`` override ``bits`` for weights / activations;
    ``learn_thresholds=False`` freezes the activation thresholds (the uniform baseline);
    ``method`` / ``weight_method`` / ``activation_method`` pick the quantizers (`n2uq_tf.quantize_model`'s).
    """
    return build


resnet18 = _imagenet_builder("resnet18", "basic", (2, 2, 2, 2))
resnet34 = _imagenet_builder("resnet34", "basic", (3, 4, 6, 3))
resnet50 = _imagenet_builder("resnet50", "bottleneck", (3, 4, 6, 3))


def resnet20(bits: int | None = None, *, num_classes: int = 10, input_shape: tuple[int, int, int] = (32, 32, 3),
             width: int = 16, quantize_downsample: bool = True, weight_bits: int | None = None,
             activation_bits: int | None = None, name: str | None = None, learn_thresholds: bool = True,
             method: str | None = None, weight_method: str | None = None,
             activation_method: str | None = None) -> keras.Model:
    """A CIFAR-size ResNet-20 with the N2UQ block structure, for CPU work.

    Float 3x3 stem conv (``width`` channels), BN, ReLU; three stages of three basic blocks
    at ``width``, 2 ``width`` and 4 ``width`` channels, strides 1, 2, 2 (1x1 conv downsample
    shortcut); GAP; float fc. ``bits`` etc. as in `resnet18`.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"resnet20: width must be a positive int, got {width!r}")
    name = name or "resnet20"
    input_shape = common.check_input_shape(input_shape, 4, name)
    num_classes = common.check_num_classes(num_classes, name)
    inputs = keras.Input(input_shape, name="input")
    x = common.conv(width, 3, 1, "stem_conv")(inputs)
    x = common.batch_norm("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = _stages(x, "basic", (3, 3, 3), (width, 2 * width, 4 * width), (1, 2, 2))
    float_model = keras.Model(inputs, _head(x, num_classes), name=name)
    return common.finish(float_model, bits, weight_bits, activation_bits, quantize_downsample, learn_thresholds,
                         method, weight_method, activation_method)
