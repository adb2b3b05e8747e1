"""The N2UQ QuantizeConfig: which weights of a layer are quantized, and its input quantizer."""

from n2uq_tf import ops
from n2uq_tf._keras import FORMAT_VERSION, ConfigSerializable, register, tfmot
from n2uq_tf.quantize import methods


@register
class N2UQQuantizeConfig(ConfigSerializable, tfmot.quantization.keras.QuantizeConfig):
    """Quantizes ``weight_attrs`` of a layer and, through `N2UQWrapper`, its input.

    Args:
      weight_bits: bits of the weights, or None to keep them float.
      activation_bits: bits of the layer input, or None to keep it float.
      weight_attrs: names of the kernel attributes (``("kernel",)`` for Conv2D/Dense,
        ``("depthwise_kernel",)`` for DepthwiseConv2D).
      channel_axis: output-channel axis of those kernels for the per-channel scale.
      learn_thresholds: False freezes the activation thresholds at uniform (baseline); the same
        as ``activation_method="uniform"``.
      weight_method, activation_method: names in `n2uq_tf.quantize.methods.METHODS` ("n2uq",
        "uniform", "dorefa", "pact", "lsq", "daq"; weights also "none", "learnable"). A config
        saved before these existed loads as "n2uq".
    """

    def __init__(self, weight_bits=2, activation_bits=2, weight_attrs=("kernel",), channel_axis=-1,
                 learn_thresholds=True, weight_method="n2uq", activation_method="n2uq"):
        if weight_bits is None and activation_bits is None:
            raise ValueError("N2UQQuantizeConfig needs weight_bits or activation_bits (both are None)")
        self.weight_bits = None if weight_bits is None else ops.check_bits(weight_bits, "weight_bits")
        self.activation_bits = (None if activation_bits is None
                                else ops.check_bits(activation_bits, "activation_bits"))
        self.weight_attrs = tuple(weight_attrs)
        self.channel_axis = tuple(channel_axis) if isinstance(channel_axis, (list, tuple)) else int(channel_axis)
        if activation_method == "uniform":
            learn_thresholds = False
        self.weight_method, self.activation_method = methods.resolve_methods(
            "n2uq", weight_method, activation_method, learn_thresholds)
        self.learn_thresholds = self.activation_method != "uniform"
        if self.weight_bits is not None:
            self._weight_quantizer()  # checks the bits the method takes (LSQ weights need 2+)

    def _weight_quantizer(self):
        return methods.weight_quantizer(self.weight_method, self.weight_bits, self.channel_axis)

    def get_weights_and_quantizers(self, layer):
        if self.weight_bits is None:
            return []
        missing = [attr for attr in self.weight_attrs if not hasattr(layer, attr)]
        if missing:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no weight named {missing[0]!r}")
        return [(getattr(layer, attr), self._weight_quantizer()) for attr in self.weight_attrs]

    def set_quantize_weights(self, layer, quantize_weights):
        if self.weight_bits is None:
            return
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(f"layer {layer.name!r}: expected {len(self.weight_attrs)} quantized weights, "
                             f"got {len(quantize_weights)}")
        for attr, weight in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, weight)

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_input_quantizers(self, layer):
        """Quantizers for the layer's inputs, applied by `N2UQWrapper` (not a tfmot hook)."""
        if self.activation_bits is None:
            return []
        return [methods.activation_quantizer(self.activation_method, self.activation_bits)]

    def get_config(self):
        axis = list(self.channel_axis) if isinstance(self.channel_axis, tuple) else self.channel_axis
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "weight_attrs": list(self.weight_attrs), "channel_axis": axis,
                "learn_thresholds": self.learn_thresholds, "weight_method": self.weight_method,
                "activation_method": self.activation_method, "format_version": FORMAT_VERSION}

    def __repr__(self):
        return (f"N2UQQuantizeConfig(weight_bits={self.weight_bits}, activation_bits={self.activation_bits}, "
                f"weight_attrs={self.weight_attrs}, weight_method={self.weight_method!r}, "
                f"activation_method={self.activation_method!r})")
