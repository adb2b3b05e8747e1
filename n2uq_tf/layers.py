"""Layers of the N2UQ reference networks: RPReLU and convolutions with PyTorch-style padding.

PyTorch pads ``padding=1`` symmetrically; Keras ``"same"`` pads (0, 1) for a stride-2
3x3 conv on an even input, so the two frameworks see different pixels. The padded
convolutions here pad explicitly and symmetrically *inside* the layer. That matters for
quantized layers: `N2UQWrapper` quantizes the wrapped layer's input, so the padding
happens after the quantizer and the padded border is activation level 0 (exactly 0),
as with ``F.conv2d(quantized_x, w, padding=1)`` in the official code.
"""

import math

import tensorflow as tf

from n2uq_tf._keras import keras, register, registered_classes

__all__ = ["RPReLU", "PaddedConv2D", "PaddedDepthwiseConv2D", "custom_objects", "symmetric_padding"]


@register
class RPReLU(keras.layers.Layer):
    """ReAct-style PReLU with learnable shifts: ``prelu(x + bias1) + bias2`` per channel.

    ``prelu(y) = max(y, 0) + alpha * min(y, 0)`` with one ``alpha`` per channel
    (initialised to 0.25, as ``torch.nn.PReLU``); the biases start at 0. Channels are the
    last axis.
    """

    def __init__(self, alpha_initializer=0.25, **kwargs):
        super().__init__(**kwargs)
        self.alpha_initializer = float(alpha_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"layer {self.name!r}: RPReLU needs a known channel count, got shape {input_shape}")
        shape = (int(channels),)
        self.bias1 = self.add_weight("bias1", shape=shape, initializer="zeros")
        self.alpha = self.add_weight("alpha", shape=shape,
                                     initializer=keras.initializers.Constant(self.alpha_initializer))
        self.bias2 = self.add_weight("bias2", shape=shape, initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        y = inputs + tf.cast(self.bias1, inputs.dtype)
        alpha = tf.cast(self.alpha, inputs.dtype)
        y = tf.nn.relu(y) - alpha * tf.nn.relu(-y)
        return y + tf.cast(self.bias2, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "alpha_initializer": self.alpha_initializer}


def symmetric_padding(kernel_size, dilation_rate=1):
    """PyTorch's ``padding=(k - 1) // 2`` per side for each spatial dim: ((p, p), (p, p))."""
    sizes = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    rates = (dilation_rate, dilation_rate) if isinstance(dilation_rate, int) else tuple(dilation_rate)
    return tuple(((r * (k - 1)) // 2,) * 2 for k, r in zip(sizes, rates))


def _normalize_explicit_padding(explicit_padding, kernel_size, dilation_rate, name):
    if explicit_padding is None:
        explicit_padding = symmetric_padding(kernel_size, dilation_rate)
    if isinstance(explicit_padding, int):
        explicit_padding = ((explicit_padding,) * 2,) * 2
    try:
        rows, cols = explicit_padding
        if isinstance(rows, int):
            rows = (rows, rows)
        if isinstance(cols, int):
            cols = (cols, cols)
        padding = tuple((int(a), int(b)) for a, b in (rows, cols))
    except (TypeError, ValueError):
        raise ValueError(f"layer {name!r}: explicit_padding must be an int, (rows, cols) or "
                         f"((top, bottom), (left, right)), got {explicit_padding!r}") from None
    if any(p < 0 for pair in padding for p in pair):
        raise ValueError(f"layer {name!r}: explicit_padding must be non-negative, got {explicit_padding!r}")
    return padding


class _ExplicitPaddingMixin:
    """Zero padding ((top, bottom), (left, right)) applied by the convolution op itself."""

    def _init_padding(self, padding, kwargs):
        if str(padding).lower() != "valid":
            raise ValueError(f"{type(self).__name__} pads explicitly (explicit_padding); "
                             f"its `padding` must be 'valid', got {padding!r}")
        if kwargs.get("data_format", "channels_last") not in (None, "channels_last"):
            raise ValueError(f"{type(self).__name__} supports data_format='channels_last' only")

    def _tf_explicit_padding(self):
        (top, bottom), (left, right) = self.explicit_padding
        return [[0, 0], [top, bottom], [left, right], [0, 0]]

    def _same_matches(self, spatial_shape):
        """Whether TF's 'SAME' pads exactly explicit_padding for this input size.

        It does at stride 1 (odd kernels) and at stride 2 on odd sizes. 'SAME' is preferred then:
        on CPU a conv with an explicit padding list is up to 3x slower than 'SAME' at stride 1.
        """
        for size, pads, k, stride, rate in zip(spatial_shape, self.explicit_padding, self.kernel_size,
                                               self.strides, self.dilation_rate):
            extent = (k - 1) * rate + 1
            if stride == 1:
                total = extent - 1
            elif size is None:
                return False
            else:
                total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
            if (total // 2, total - total // 2) != pads:
                return False
        return True

    def _pad_for_conv(self, inputs):
        """(inputs, TF padding): 'SAME' where it is exact, else zero-padded inputs and 'VALID'."""
        if self._same_matches(inputs.shape[1:3]):
            return inputs, "SAME"
        return tf.pad(inputs, self._tf_explicit_padding()), "VALID"

    def _padded_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        (top, bottom), (left, right) = self.explicit_padding
        if shape[1] is not None:
            shape[1] += top + bottom
        if shape[2] is not None:
            shape[2] += left + right
        return tf.TensorShape(shape)

    def _padding_config(self):
        return {"explicit_padding": [list(pair) for pair in self.explicit_padding]}


@register
class PaddedConv2D(_ExplicitPaddingMixin, keras.layers.Conv2D):
    """Conv2D that zero-pads ``explicit_padding`` ((top, bottom), (left, right)) like PyTorch.

    The default pads ``(k - 1) // 2`` on every side (PyTorch ``padding=k // 2`` for odd k).
    ``padding`` is always ``'valid'``: the explicit padding replaces it.
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), explicit_padding=None, padding="valid", **kwargs):
        self._init_padding(padding, kwargs)
        super().__init__(filters, kernel_size, strides=strides, padding="valid", **kwargs)
        if self.groups != 1:
            raise ValueError(f"layer {self.name!r}: PaddedConv2D does not support groups != 1")
        self.explicit_padding = _normalize_explicit_padding(explicit_padding, self.kernel_size,
                                                            self.dilation_rate, self.name)

    def convolution_op(self, inputs, kernel):
        inputs, padding = self._pad_for_conv(inputs)
        return tf.nn.conv2d(inputs, kernel, strides=list(self.strides), padding=padding,
                            dilations=list(self.dilation_rate), name=type(self).__name__)

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(self._padded_shape(input_shape))

    def get_config(self):
        return {**super().get_config(), **self._padding_config()}


@register
class PaddedDepthwiseConv2D(_ExplicitPaddingMixin, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D that zero-pads ``explicit_padding`` like PyTorch (see `PaddedConv2D`)."""

    def __init__(self, kernel_size, strides=(1, 1), explicit_padding=None, padding="valid", **kwargs):
        self._init_padding(padding, kwargs)
        super().__init__(kernel_size, strides=strides, padding="valid", **kwargs)
        self.explicit_padding = _normalize_explicit_padding(explicit_padding, self.kernel_size,
                                                            self.dilation_rate, self.name)

    def call(self, inputs):
        # The kernel is read from the attribute, where N2UQWrapper puts the quantized one.
        inputs, padding = self._pad_for_conv(inputs)
        outputs = tf.nn.depthwise_conv2d(inputs, self.depthwise_kernel, strides=[1, *self.strides, 1],
                                         padding=padding, dilations=list(self.dilation_rate))
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(self._padded_shape(input_shape))

    def get_config(self):
        return {**super().get_config(), **self._padding_config()}


def custom_objects():
    """{class name: class} of every layer defined here, for loading saved models."""
    return registered_classes(__name__)
