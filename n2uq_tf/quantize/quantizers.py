"""tfmot Quantizer subclasses for N2UQ: they own the learnable parameters and call ops."""

from n2uq_tf import ops
from n2uq_tf._keras import FORMAT_VERSION, ConfigSerializable, keras, register, tfmot

# Suffixes of the activation-quantizer variables; training uses them to find the
# quantizer parameters (trained at lr / 10 in the official recipe).
QUANTIZER_PARAMETER_SUFFIXES = ("n2uq_start", "n2uq_intervals", "n2uq_beta1", "n2uq_beta2")


@register
class ActivationQuantizer(ConfigSerializable, tfmot.quantization.keras.quantizers.Quantizer):
    """N2UQ activation quantizer: learnable thresholds (start, intervals), scales beta1, beta2.

    ``learn_thresholds=False`` freezes start and intervals at the uniform initialisation:
    the paper's baseline, where the G-STE reduces to the plain STE.
    """

    def __init__(self, bits=2, learn_thresholds=True):
        self.bits = ops.check_bits(bits, "activation bits")
        self.learn_thresholds = bool(learn_thresholds)

    def build(self, tensor_shape, name, layer):
        n = ops.num_levels(self.bits)
        delta = ops.level_step(self.bits)

        def variable(suffix, shape, value, trainable):
            return layer.add_weight(
                f"{name}_{suffix}", shape=shape, dtype="float32",
                initializer=keras.initializers.Constant(value), trainable=trainable,
                experimental_autocast=False)  # thresholds stay float32 under mixed precision

        return {
            "start": variable("n2uq_start", (), 0.0, self.learn_thresholds),
            "intervals": variable("n2uq_intervals", (n,), delta, self.learn_thresholds),
            "beta1": variable("n2uq_beta1", (), 1.0, True),
            "beta2": variable("n2uq_beta2", (), 1.0, True),
        }

    def __call__(self, inputs, training, weights, **kwargs):
        return ops.n2uq_quantize(inputs, weights["start"], weights["intervals"], weights["beta1"],
                                 weights["beta2"], self.bits)

    def get_config(self):
        return {"bits": self.bits, "learn_thresholds": self.learn_thresholds,
                "format_version": FORMAT_VERSION}


@register
class WeightQuantizer(ConfigSerializable, tfmot.quantization.keras.quantizers.Quantizer):
    """Entropy-preserving uniform weight quantizer (no variables: alpha is computed from W)."""

    def __init__(self, bits=2, channel_axis=-1):
        self.bits = ops.check_bits(bits, "weight bits")
        self.channel_axis = tuple(channel_axis) if isinstance(channel_axis, (list, tuple)) else int(channel_axis)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return ops.quantize_weights(inputs, self.bits, self.channel_axis)

    def get_config(self):
        axis = list(self.channel_axis) if isinstance(self.channel_axis, tuple) else self.channel_axis
        return {"bits": self.bits, "channel_axis": axis, "format_version": FORMAT_VERSION}
