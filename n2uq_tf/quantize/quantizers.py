"""tfmot Quantizer subclasses for N2UQ: they own the learnable parameters and call `quantization_math.n2uq`.

Every activation quantizer (here and in `n2uq_tf.quantize.baseline_quantizers`) has a ``method`` name and
``uniform_levels(variables)``; every weight quantizer a ``method`` and ``integer_view(w, variables)``:
the integer form the exporter lowers to bit-serial ops.
"""

import collections

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import FORMAT_VERSION, ConfigSerializable, keras, register, tfmot
from n2uq_tf.quantization_math import n2uq

# Inference output of an activation quantizer = step * #{i : x * input_scale > thresholds[i]},
# bit for bit in float32 (the exported quantize op's count; input_scale is N2UQ's beta1, else 1).
UniformLevels = collections.namedtuple("UniformLevels", ["thresholds", "step", "input_scale"])

# Quantized weight = scale * (2 * codes - zero2) / 2, codes in 0..2^b - 1, scale per output channel
# (shaped like the kernel with 1 on the reduced axes), zero2 = twice the zero point (an int).
# Today's kernels compute 2 sum(m k) - n sum(m), i.e. they take zero2 = n = 2^b - 1 only.
IntegerView = collections.namedtuple("IntegerView", ["codes", "scale", "zero2"])

# Suffixes of the activation-quantizer variables; training uses them to find the
# quantizer parameters (trained at lr / 10 in the official recipe).
QUANTIZER_PARAMETER_SUFFIXES = ("n2uq_start", "n2uq_intervals", "n2uq_beta1", "n2uq_beta2")


def n2uq_variables(bits, learn_thresholds, variable):
    """The variables of an N2UQ activation quantizer, in both front ends: start 0, intervals delta
    each, beta1 = beta2 = 1, float32; start and intervals trainable only with ``learn_thresholds``.

    ``variable(suffix, shape, value, trainable)`` adds one to the layer (named ``<name>_<suffix>``,
    autocast off) the front end's way; the suffixes are `QUANTIZER_PARAMETER_SUFFIXES`.
    """
    return {
        "start": variable("n2uq_start", (), 0.0, learn_thresholds),
        "intervals": variable("n2uq_intervals", (n2uq.num_levels(bits),), n2uq.level_step(bits), learn_thresholds),
        "beta1": variable("n2uq_beta1", (), 1.0, True),
        "beta2": variable("n2uq_beta2", (), 1.0, True),
    }


@register
class ActivationQuantizer(ConfigSerializable, tfmot.quantization.keras.quantizers.Quantizer):
    """N2UQ activation quantizer: learnable thresholds (start, intervals), scales beta1, beta2.

    ``learn_thresholds=False`` freezes start and intervals at the uniform initialisation:
    the paper's baseline, where the G-STE reduces to the plain STE.
    """

    def __init__(self, bits=2, learn_thresholds=True):
        self.bits = n2uq.check_bits(bits, "activation bits")
        self.learn_thresholds = bool(learn_thresholds)

    @property
    def method(self):
        """"n2uq", or "uniform" when the thresholds are frozen."""
        return "n2uq" if self.learn_thresholds else "uniform"

    def build(self, tensor_shape, name, layer):
        def variable(suffix, shape, value, trainable):
            return layer.add_weight(
                f"{name}_{suffix}", shape=shape, dtype="float32",
                initializer=keras.initializers.Constant(value), trainable=trainable,
                experimental_autocast=False)  # thresholds stay float32 under mixed precision

        return n2uq_variables(self.bits, self.learn_thresholds, variable)

    def __call__(self, inputs, training, weights, **kwargs):
        return n2uq.n2uq_quantize(inputs, weights["start"], weights["intervals"], weights["beta1"],
                                 weights["beta2"], self.bits)

    def uniform_levels(self, variables):
        """Thresholds T_i (in beta1 * x units), step beta2 * delta and input_scale beta1 (exact)."""
        _, _, thresholds = n2uq.segment_bounds(variables["start"], variables["intervals"])
        beta2 = np.float32(variables["beta2"].numpy())
        return UniformLevels(thresholds.numpy().astype(np.float32),
                             np.float32(beta2 * np.float32(n2uq.level_step(self.bits))),
                             np.float32(variables["beta1"].numpy()))

    def get_config(self):
        return {"bits": self.bits, "learn_thresholds": self.learn_thresholds,
                "format_version": FORMAT_VERSION}


@register
class UniformActivationQuantizer(ActivationQuantizer):
    """The paper's baseline: the N2UQ quantizer with thresholds frozen at uniform (G-STE = STE).

    Same variables (start, intervals, beta1, beta2) as `ActivationQuantizer`, so everything that
    reads an N2UQ quantizer reads this one too.
    """

    def __init__(self, bits=2, learn_thresholds=False):
        if learn_thresholds:
            raise ValueError("UniformActivationQuantizer has frozen thresholds (learn_thresholds=False)")
        super().__init__(bits, learn_thresholds=False)

    def get_config(self):
        return {"bits": self.bits, "format_version": FORMAT_VERSION}


@register
class WeightQuantizer(ConfigSerializable, tfmot.quantization.keras.quantizers.Quantizer):
    """Entropy-preserving uniform weight quantizer (no variables: alpha is computed from W)."""

    method = "n2uq"

    def __init__(self, bits=2, channel_axis=-1):
        self.bits = n2uq.check_bits(bits, "weight bits")
        self.channel_axis = tuple(channel_axis) if isinstance(channel_axis, (list, tuple)) else int(channel_axis)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return n2uq.quantize_weights(inputs, self.bits, self.channel_axis)

    def integer_view(self, w, variables=None):
        """codes k, scale 2 alpha / n, zero2 = n: alpha (2k/n - 1) = (2 alpha / n) (2k - n) / 2."""
        codes, alpha = n2uq.weight_codes(tf.convert_to_tensor(w, tf.float32), self.bits, self.channel_axis)
        n = n2uq.num_levels(self.bits)
        return IntegerView(codes.numpy(), (alpha.numpy().astype(np.float64) * 2.0 / n), n)

    def get_config(self):
        axis = list(self.channel_axis) if isinstance(self.channel_axis, tuple) else self.channel_axis
        return {"bits": self.bits, "channel_axis": axis, "format_version": FORMAT_VERSION}
