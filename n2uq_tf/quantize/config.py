"""The N2UQ QuantizeConfig: which weights of a layer are quantized, and its input quantizer."""

from n2uq_tf._keras import FORMAT_VERSION, ConfigSerializable, register, tfmot
from n2uq_tf.quantization_math import n2uq
from n2uq_tf.quantize import method_table, registry


@register
class N2UQQuantizeConfig(ConfigSerializable, tfmot.quantization.keras.QuantizeConfig):
    """Quantizes ``weight_attrs`` of a layer and, through `N2UQWrapper`, its input.

    Args:
      weight_bits: bits of the weights, or None to keep them float.
      activation_bits: bits of the layer input, or None to keep it float.
      weight_attrs: names of the kernel attributes (``("kernel",)`` for Conv2D/Dense,
        ``("depthwise_kernel",)`` for DepthwiseConv2D).
      channel_axis: output-channel axis (or tuple of axes) of those kernels for the per-channel
        scale, or a dict {attribute: axis or axes} when the kernels differ (SeparableConv2D:
        ``{"depthwise_kernel": (-2, -1), "pointwise_kernel": -1}``).
      learn_thresholds: False freezes the activation thresholds at uniform (baseline); the same
        as ``activation_method="uniform"``.
      weight_method, activation_method: names in `n2uq_tf.quantize.method_table.METHODS` ("n2uq",
        "uniform", "dorefa", "pact", "lsq", "daq"; weights also "none", "learnable"). A config
        saved before these existed loads as "n2uq".
    """

    def __init__(self, weight_bits=2, activation_bits=2, weight_attrs=("kernel",), channel_axis=-1,
                 learn_thresholds=True, weight_method="n2uq", activation_method="n2uq"):
        if weight_bits is None and activation_bits is None:
            raise ValueError("N2UQQuantizeConfig needs weight_bits or activation_bits (both are None)")
        self.weight_bits = None if weight_bits is None else n2uq.check_bits(weight_bits, "weight_bits")
        self.activation_bits = (None if activation_bits is None
                                else n2uq.check_bits(activation_bits, "activation_bits"))
        self.weight_attrs = tuple(weight_attrs)
        self.channel_axis = _normalize_channel_axis(channel_axis, self.weight_attrs)
        if activation_method == "uniform":
            learn_thresholds = False
        self.weight_method, self.activation_method = method_table.resolve_methods(
            "n2uq", weight_method, activation_method, learn_thresholds)
        self.learn_thresholds = self.activation_method != "uniform"
        if self.weight_bits is not None:
            for attr in self.weight_attrs:
                self._weight_quantizer(attr)  # checks the bits the method takes (LSQ weights need 2+)

    def channel_axis_of(self, attr):
        """The output-channel axis (or axes) of the kernel held by attribute ``attr``."""
        return self.channel_axis[attr] if isinstance(self.channel_axis, dict) else self.channel_axis

    def _weight_quantizer(self, attr):
        return method_table.weight_quantizer(self.weight_method, self.weight_bits, self.channel_axis_of(attr))

    def get_weights_and_quantizers(self, layer):
        if self.weight_bits is None:
            return []
        missing = [attr for attr in self.weight_attrs if not hasattr(layer, attr)]
        if missing:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no weight named {missing[0]!r}")
        return [(getattr(layer, attr), self._weight_quantizer(attr)) for attr in self.weight_attrs]

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
        return [method_table.activation_quantizer(self.activation_method, self.activation_bits)]

    def get_intermediate_quantizers(self, layer):
        """[(name, quantizer)] between the stages of a layer the registry splits, applied by `N2UQWrapper`.

        SeparableConv2D: one, "pointwise_input", on the depthwise output before the pointwise
        conv, with the bits and method of the input quantizer. Other layers: none.
        """
        split = registry.split_of(layer)
        if split is None or self.activation_bits is None:
            return []
        return [(split.name, method_table.activation_quantizer(self.activation_method, self.activation_bits))]

    def get_config(self):
        axis = ({attr: _axis_config(a) for attr, a in self.channel_axis.items()}
                if isinstance(self.channel_axis, dict) else _axis_config(self.channel_axis))
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "weight_attrs": list(self.weight_attrs), "channel_axis": axis,
                "learn_thresholds": self.learn_thresholds, "weight_method": self.weight_method,
                "activation_method": self.activation_method, "format_version": FORMAT_VERSION}

    def __repr__(self):
        return (f"N2UQQuantizeConfig(weight_bits={self.weight_bits}, activation_bits={self.activation_bits}, "
                f"weight_attrs={self.weight_attrs}, weight_method={self.weight_method!r}, "
                f"activation_method={self.activation_method!r})")


def _axis_config(axis):
    return list(axis) if isinstance(axis, tuple) else axis


def _normalize_axis(axis):
    return tuple(int(a) for a in axis) if isinstance(axis, (list, tuple)) else int(axis)


def _normalize_channel_axis(channel_axis, weight_attrs):
    if not isinstance(channel_axis, dict):
        return _normalize_axis(channel_axis)
    if set(channel_axis) != set(weight_attrs):
        raise ValueError(f"channel_axis names the kernels {sorted(channel_axis)}, but weight_attrs are "
                         f"{sorted(weight_attrs)}; give one axis (or axes) per weight attribute")
    return {attr: _normalize_axis(channel_axis[attr]) for attr in weight_attrs}
