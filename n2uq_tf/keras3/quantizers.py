"""Keras 3 quantizers: own the N2UQ variables of one Keras 3 layer and call `quantization_math.n2uq`.

The same protocol as the tf_keras front end's quantizers (`n2uq_tf.model_reader`): an activation
quantizer has ``bits``, ``method``, ``build(layer, name)`` -> its variables and
``uniform_levels(variables)``; a weight quantizer has ``bits``, ``method``, ``channel_axis`` and
``integer_view(w, variables)``; both are called as ``quantizer(x, training, weights=variables)``.
They are plain objects rebuilt from the wrapper's config (bits, method), so a saved model stores
only their variables. ``build(layer, name, tensor_shape)`` takes the shape of the tensor quantized
(a kernel's, for per-channel variables). Same variables and initial values as the tf_keras front
end: start 0, intervals delta each, beta1 = beta2 = 1. The literature methods are in `baseline_quantizers`.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from n2uq_tf.keras3 import baseline_quantizers
from n2uq_tf.quantization_math import n2uq
from n2uq_tf.quantize.quantizers import IntegerView, UniformLevels, n2uq_variables


class ActivationQuantizer:
    """N2UQ activation quantizer: learnable thresholds (start, intervals), scales beta1, beta2.

    ``learn_thresholds=False`` (method "uniform") freezes start and intervals at uniform.
    """

    def __init__(self, bits=2, learn_thresholds=True):
        self.bits = n2uq.check_bits(bits, "activation bits")
        self.learn_thresholds = bool(learn_thresholds)

    @property
    def method(self):
        return "n2uq" if self.learn_thresholds else "uniform"

    def build(self, layer, name, tensor_shape=None):
        """Adds the quantizer's variables to ``layer`` (named ``<name>_n2uq_start``, ...); returns them."""
        def variable(suffix, shape, value, trainable):
            # float32 under mixed precision too (autocast off), as in the tf_keras front end.
            return layer.add_weight(name=f"{name}_{suffix}", shape=shape, dtype="float32",
                                    initializer=keras.initializers.Constant(value), trainable=trainable,
                                    autocast=False)

        return n2uq_variables(self.bits, self.learn_thresholds, variable)

    def __call__(self, inputs, training, weights):
        # implementation="auto": the fused CPU op only on a CPU outside XLA (`n2uq.active_implementation`).
        return n2uq.n2uq_quantize(inputs, weights["start"].value, weights["intervals"].value, weights["beta1"].value,
                                  weights["beta2"].value, self.bits)

    def uniform_levels(self, variables):
        """Thresholds T_i (in beta1 * x units), step beta2 * delta and input_scale beta1 (exact)."""
        _, _, thresholds = n2uq.segment_bounds(variables["start"].numpy(), variables["intervals"].numpy())
        beta2 = np.float32(variables["beta2"].numpy())
        return UniformLevels(thresholds.numpy().astype(np.float32),
                             np.float32(beta2 * np.float32(n2uq.level_step(self.bits))),
                             np.float32(variables["beta1"].numpy()))


class WeightQuantizer:
    """Entropy-preserving uniform weight quantizer (no variables: alpha is computed from W)."""

    method = "n2uq"

    def __init__(self, bits=2, channel_axis=-1):
        self.bits = n2uq.check_bits(bits, "weight bits")
        self.channel_axis = tuple(channel_axis) if isinstance(channel_axis, (list, tuple)) else int(channel_axis)

    def build(self, layer, name, tensor_shape=None):
        return {}

    def __call__(self, inputs, training, weights):
        return n2uq.quantize_weights(inputs, self.bits, self.channel_axis)

    def integer_view(self, w, variables=None):
        """codes k, scale 2 alpha / n, zero2 = n: alpha (2k/n - 1) = (2 alpha / n) (2k - n) / 2."""
        codes, alpha = n2uq.weight_codes(tf.convert_to_tensor(w, tf.float32), self.bits, self.channel_axis)
        n = n2uq.num_levels(self.bits)
        return IntegerView(codes.numpy(), (alpha.numpy().astype(np.float64) * 2.0 / n), n)


# method name -> Keras 3 quantizer factory, each side: N2UQ's own above, and the literature methods
# of `n2uq_tf.quantize.method_table.METHODS` (which resolves the names for both front ends), each
# running that table's tf_keras quantizer class on Keras 3 variables.
ACTIVATION_QUANTIZERS = {
    "n2uq": lambda bits: ActivationQuantizer(bits, learn_thresholds=True),
    "uniform": lambda bits: ActivationQuantizer(bits, learn_thresholds=False),
    **{name: functools.partial(baseline_quantizers.LiteratureActivationQuantizer, name)
       for name in baseline_quantizers.ACTIVATION_METHODS},
}
WEIGHT_QUANTIZERS = {
    "n2uq": WeightQuantizer,
    **{name: functools.partial(baseline_quantizers.LiteratureWeightQuantizer, name)
       for name in baseline_quantizers.WEIGHT_METHODS},
}


def check_methods(weight_method, activation_method, where):
    """Raises ValueError for a method the Keras 3 front end does not have."""
    for side, method, table in (("weight", weight_method, WEIGHT_QUANTIZERS),
                                ("activation", activation_method, ACTIVATION_QUANTIZERS)):
        if method is not None and method not in table:
            raise ValueError(f"{where}: {side} method {method!r} is not a Keras 3 {side} method; the Keras 3 "
                             f"front end has {side} methods {', '.join(map(repr, table))}")
