"""The Keras 3 quantize wrapper: one registered layer class for every supported layer kind.

One wrapper rather than a quantized class per layer type, as in the tf_keras front end: the
registry table (`n2uq_tf.quantize.registry`) decides which kinds are quantized and how, the
wrapped layer keeps its own class, configuration and variables (so readers, the exporter and
`model.get_layer` see a Conv2D as a Conv2D), and a new kind needs one row in `FORWARD` below, not a
new class. The wrapper quantizes its layer's input (N2UQ quantizes each conv's input while a
residual shortcut keeps the float block input) and its kernels, then runs the layer's forward pass
with the quantized kernels.
"""

import keras
import tensorflow as tf

from n2uq_tf.model_reader import QuantizedActivation, QuantizedWeight
from n2uq_tf.quantize import registry
from n2uq_tf.keras3 import quantizers

# Keras 3 names some kernels differently from tf_keras, whose names the registry rows use.
KERAS3_ATTRIBUTE = {("DepthwiseConv2D", "depthwise_kernel"): "kernel"}


def keras3_attribute(layer, attr):
    """The Keras 3 attribute holding the kernel that the registry calls ``attr``."""
    return KERAS3_ATTRIBUTE.get((type(layer).__name__, attr), attr)


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _bias_and_activation(layer, x):
    bias = getattr(layer, "bias", None)
    if bias is not None:
        shape = [1] * (x.shape.rank - 1) + [-1] if _channels_last(layer) else [1, -1] + [1] * (x.shape.rank - 2)
        x = x + tf.reshape(tf.cast(bias, x.dtype), shape)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def _conv_forward(layer, x, kernels):
    padding = layer.padding
    if padding == "causal":  # Conv1D: left padding, as Keras 3's own call does
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        x = tf.pad(x, [[0, 0], [left, 0], [0, 0]] if _channels_last(layer) else [[0, 0], [0, 0], [left, 0]])
        padding = "valid"
    y = keras.ops.conv(x, tf.cast(kernels["kernel"], x.dtype), strides=list(layer.strides), padding=padding,
                       dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    return _bias_and_activation(layer, y)


def _depthwise_forward(layer, x, kernels):
    y = keras.ops.depthwise_conv(x, tf.cast(kernels["depthwise_kernel"], x.dtype), strides=layer.strides,
                                 padding=layer.padding, dilation_rate=layer.dilation_rate,
                                 data_format=layer.data_format)
    return _bias_and_activation(layer, y)


def _dense_forward(layer, x, kernels):
    return _bias_and_activation(layer, keras.ops.matmul(x, tf.cast(kernels["kernel"], x.dtype)))


# Keras 3 layer class name -> forward(layer, inputs, {registry attribute: kernel}). A layer the
# registry splits in two stages (SeparableConv2D) runs the registry's split forward instead.
FORWARD = {
    "Conv1D": _conv_forward,
    "Conv2D": _conv_forward,
    "DepthwiseConv2D": _depthwise_forward,
    "Dense": _dense_forward,
}


class _Quantizers:
    """The wrapper's quantizers and their variables, in an object Keras 3 does not track (the
    variables are the wrapper's own weights already)."""

    def __init__(self, weights, input, intermediate):
        self.weights, self.input, self.intermediate = weights, input, intermediate


@keras.saving.register_keras_serializable(package="n2uq_tf")
class N2UQWrapper(keras.layers.Wrapper):
    """Quantizes the kernels and the input of one Keras 3 layer (Conv1D, Conv2D, DepthwiseConv2D,
    SeparableConv2D, Dense: the rows of `n2uq_tf.quantize.registry`).

    Args:
      layer: the float layer (its weights are used as they are).
      weight_bits, activation_bits: bits of the kernels / of the input; None keeps that side float.
      weight_method, activation_method: a weight / activation method of
        `n2uq_tf.quantize.method_table.METHODS` ("n2uq", "dorefa", "lsq", ...; activations also
        "uniform": N2UQ with frozen thresholds).
    """

    # Set False (on the class or a wrapper, before the model is traced) to leave out the per-call
    # NaN/Inf check of the wrapper's variables (the same check as the tf_keras wrapper's).
    check_finite = True

    def __init__(self, layer, weight_bits=2, activation_bits=2, weight_method="n2uq", activation_method="n2uq",
                 **kwargs):
        kwargs.setdefault("name", "quant_" + layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        rule = registry.lookup(layer)
        if rule is None or (type(layer).__name__ not in FORWARD and rule.split is None):
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) is not supported by the Keras 3 "
                             f"front end: {registry.unsupported_reason(layer) or 'no kernel to quantize'}")
        if weight_bits is None and activation_bits is None:
            raise ValueError(f"layer {layer.name!r}: N2UQWrapper needs weight_bits or activation_bits (both None)")
        quantizers.check_methods(weight_method if weight_bits is not None else None,
                                 activation_method if activation_bits is not None else None, f"layer {layer.name!r}")
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.weight_method = weight_method
        self.activation_method = activation_method
        self.rule = rule
        self._quantizers = _Quantizers((), None, ())

    @property
    def quantized_layer(self):
        """The wrapped float layer (what `n2uq_tf.keras3.nested.layer_name` names paths by)."""
        return self.layer

    def _channel_axis(self, attr):
        axis = self.rule.channel_axis
        return axis[attr] if isinstance(axis, dict) else axis

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if getattr(self.layer, "lora_enabled", False):
            raise ValueError(f"layer {self.layer.name!r} has LoRA enabled; quantize the model before enabling LoRA")
        weights = []
        if self.weight_bits is not None:
            for attr in self.rule.weight_attrs:
                quantizer = quantizers.WEIGHT_QUANTIZERS[self.weight_method](self.weight_bits, self._channel_axis(attr))
                variable = getattr(self.layer, keras3_attribute(self.layer, attr))
                variables = quantizer.build(self, attr, tuple(variable.shape))
                weights.append(QuantizedWeight(attr, variable, quantizer, variables))
        activation, intermediate = None, ()
        if self.activation_bits is not None:
            make = quantizers.ACTIVATION_QUANTIZERS[self.activation_method]
            quantizer = make(self.activation_bits)
            activation = QuantizedActivation("input", quantizer, quantizer.build(self, "input"))
            if self.rule.split is not None:
                between = make(self.activation_bits)
                name = self.rule.split.name
                intermediate = (QuantizedActivation(name, between, between.build(self, name)),)
        self._quantizers = _Quantizers(tuple(weights), activation, intermediate)
        self.built = True

    @property
    def weight_quantizers(self):
        """[`QuantizedWeight`] in the registry's ``weight_attrs`` order (attr named as the registry
        names it); empty when the weights stay float."""
        return list(self._quantizers.weights)

    @property
    def input_quantizer(self):
        """(quantizer, variables) of the input, or None when the input stays float."""
        activation = self._quantizers.input
        return None if activation is None else (activation.quantizer, activation.variables)

    @property
    def intermediate_quantizers(self):
        """[`QuantizedActivation`] between the layer's stages (SeparableConv2D's "pointwise_input")."""
        return list(self._quantizers.intermediate)

    def _finite_checks(self):
        checks, seen = [], set()
        for variable in self.weights:
            if id(variable) in seen or not tf.as_dtype(variable.dtype).is_floating:
                continue
            seen.add(id(variable))
            checks.append(tf.debugging.check_numerics(
                variable.value, f"layer {self.layer.name!r} has non-finite weights: NaN or Inf in {variable.name}"))
        return checks

    def kernels(self, training):
        """{registry attribute: kernel}: the quantized kernels, or the float ones when weights stay float."""
        kernels = {attr: getattr(self.layer, keras3_attribute(self.layer, attr)) for attr in self.rule.weight_attrs}
        for attr, variable, quantizer, variables in self._quantizers.weights:
            kernels[attr] = quantizer(variable.value, training, weights=variables)
        return kernels

    def call_with_kernels(self, inputs, kernels, between=None):
        """The wrapped layer's forward pass with ``kernels`` in place of its own; ``between`` runs
        between the stages of a split layer (the identity when None)."""
        split = self.rule.split
        if split is not None:
            return split.call(self.layer, inputs, kernels, between or (lambda x: x))
        return FORWARD[type(self.layer).__name__](self.layer, inputs, kernels)

    def call(self, inputs, training=None):
        with tf.control_dependencies(self._finite_checks() if self.check_finite else []):
            x = inputs
            activation = self._quantizers.input
            if activation is not None:
                x = activation.quantizer(x, training, weights=activation.variables)
            between = None
            if self._quantizers.intermediate:
                (middle,) = self._quantizers.intermediate
                between = lambda t: middle.quantizer(t, training, weights=middle.variables)  # noqa: E731
            return self.call_with_kernels(x, self.kernels(training), between)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(weight_bits=self.weight_bits, activation_bits=self.activation_bits,
                      weight_method=self.weight_method, activation_method=self.activation_method)
        return config
