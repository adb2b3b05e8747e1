"""Which layer gets which N2UQ quantization: a declarative table.

Each row of SUPPORTED names a tf_keras layer class, the attributes holding its kernels, the
kernels' output-channel axis (one scale per output channel) and, for a layer computed in two
stages with a quantizer between them, that split. Layers listed in UNSUPPORTED stay float and
are reported with the reason; any other layer with weights is reported as unsupported too.
"""

from typing import Callable, NamedTuple, Union

import tensorflow as tf

from n2uq_tf import layers as n2uq_layers
from n2uq_tf._keras import keras

layers = keras.layers


class Split(NamedTuple):
    """A layer computed as two convolutions with an activation quantizer between them.

    ``call(layer, inputs, kernels, between)`` is the layer's forward pass with ``kernels``
    ({attribute: tensor}, the quantized kernels; attributes it lacks are read from the layer, as
    when the weights stay float) in place of the layer's own and ``between``
    applied to the first stage's output. The kernels are passed rather than set on the layer, so
    the layer's own `call` (which Keras traces on its own when saving a SavedModel) keeps reading
    its variables. The quantizer's variables are named ``<name>_n2uq_start``, ...
    """
    name: str
    call: Callable


class Rule(NamedTuple):
    """How a supported layer is quantized (see `N2UQQuantizeConfig` for the fields' meaning)."""
    weight_attrs: tuple
    channel_axis: Union[int, tuple, dict]   # one axis spec for every kernel, or {attr: axis spec}
    split: Split = None


def _separable_conv2d_call(layer, inputs, kernels, between):
    """SeparableConv2D's forward with ``between`` on the depthwise output, before the pointwise conv.

    Without ``between`` this is what tf.nn.separable_conv2d computes (a depthwise conv with the
    layer's strides, padding and dilation, then a 1x1 'VALID' conv); split here so that the
    pointwise conv sees quantized activations, as every other quantized conv does.
    """
    depthwise_kernel = kernels.get("depthwise_kernel", layer.depthwise_kernel)
    pointwise_kernel = kernels.get("pointwise_kernel", layer.pointwise_kernel)
    channels_last = layer.data_format == "channels_last"
    data_format = "NHWC" if channels_last else "NCHW"
    strides = (1, *layer.strides, 1) if channels_last else (1, 1, *layer.strides)
    x = tf.nn.depthwise_conv2d(inputs, tf.cast(depthwise_kernel, inputs.dtype), strides,
                               layer.padding.upper(), dilations=layer.dilation_rate, data_format=data_format)
    x = between(x)
    x = tf.nn.conv2d(x, tf.cast(pointwise_kernel, x.dtype), 1, "VALID", data_format=data_format)
    if layer.use_bias:
        x = tf.nn.bias_add(x, tf.cast(layer.bias, x.dtype), data_format=data_format)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


SUPPORTED = {
    layers.Conv1D: Rule(("kernel",), -1),  # exported as a 2-D conv of height 1; causal padding included
    layers.Conv2D: Rule(("kernel",), -1),
    layers.DepthwiseConv2D: Rule(("depthwise_kernel",), (-2, -1)),  # one scale per depthwise output channel
    # Input quantizer -> depthwise -> "pointwise_input" quantizer -> pointwise 1x1 conv.
    layers.SeparableConv2D: Rule(("depthwise_kernel", "pointwise_kernel"),
                                 {"depthwise_kernel": (-2, -1), "pointwise_kernel": -1},
                                 Split("pointwise_input", _separable_conv2d_call)),
    layers.Dense: Rule(("kernel",), -1),
    n2uq_layers.PaddedConv2D: Rule(("kernel",), -1),  # PyTorch-style explicit padding, used by n2uq_tf.models
    n2uq_layers.PaddedDepthwiseConv2D: Rule(("depthwise_kernel",), (-2, -1)),
}

UNSUPPORTED = {
    layers.Conv2DTranspose: "transposed convolution has no bit-serial kernel; it stays float",
    layers.Conv1DTranspose: "transposed convolution has no bit-serial kernel; it stays float",
    layers.Conv3DTranspose: "transposed convolution has no bit-serial kernel; it stays float",
    layers.Conv3D: "only 1-D and 2-D convolutions are lowered to bit-serial kernels",
    layers.SeparableConv1D: "no N2UQ rule for 1-D separable convolutions yet; build it as Conv1D layers "
                            "or use SeparableConv2D on [batch, 1, width, channels]",
    layers.DepthwiseConv1D: "no N2UQ rule for 1-D depthwise convolutions yet; use DepthwiseConv2D on "
                            "[batch, 1, width, channels]",
}


# The Keras 3 front end (`n2uq_tf.keras3`) reads the same rows: a layer of one of Keras 3's own
# classes is looked up by its class name among the rows of tf_keras' own classes (the layer kinds
# are the same; their attribute names may differ, which that front end maps).
_SUPPORTED_BY_NAME = {cls.__name__: rule for cls, rule in SUPPORTED.items() if cls.__module__.startswith("tf_keras.")}
_UNSUPPORTED_BY_NAME = {cls.__name__: reason for cls, reason in UNSUPPORTED.items()}


def _keras3_own_class(layer):
    """True for a layer whose class is one of Keras 3's own (not a subclass defined elsewhere)."""
    return type(layer).__module__.startswith("keras.src.layers.")


def lookup(layer):
    """The `Rule` of a supported layer, else None.

    Exact class match: a subclass may change `call`, so it is not assumed to be supported.
    A Keras 3 layer matches the row of the tf_keras class of the same name.
    """
    rule = SUPPORTED.get(type(layer))
    if rule is None and _keras3_own_class(layer):
        rule = _SUPPORTED_BY_NAME.get(type(layer).__name__)
    return rule


def split_of(layer):
    """The `Split` of a layer computed in two quantized stages (SeparableConv2D), else None."""
    rule = lookup(layer)
    return None if rule is None else rule.split


def unsupported_reason(layer):
    """Why a layer with weights cannot be quantized, or None if it is supported or weightless."""
    if lookup(layer) is not None:
        return None
    reason = UNSUPPORTED.get(type(layer))
    if reason is None and _keras3_own_class(layer):
        reason = _UNSUPPORTED_BY_NAME.get(type(layer).__name__)
    if reason is not None:
        return reason
    kernel_like = [w for w in layer.weights if "kernel" in w.name]
    if kernel_like:
        return f"no N2UQ rule for {type(layer).__name__}"
    return None
