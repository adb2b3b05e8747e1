"""tfmot Quantizers of the literature baselines: DoReFa, PACT, LSQ, DAQ and two weight variants.

The math is in `n2uq_tf.quantization_math.baselines`; these classes own the variables, choose the
training or inference path, and give the exporter the integer view (N2UQ's own Quantizers are in
`quantizers`; `method_table` maps method names to both).

Variables initialised from data (LSQ's step, DAQ's activation range, the learnable weight
scale) are set on the quantizer's first call (training or not) from the tensor it sees, and a
saved ``*_initialized`` flag keeps a loaded model from initialising again.
"""

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import FORMAT_VERSION, ConfigSerializable, keras, register, tfmot
from n2uq_tf.quantization_math import baselines, n2uq
from n2uq_tf.quantize.quantizers import IntegerView, UniformLevels

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer


def _variable(layer, name, suffix, shape, value, trainable=True):
    return layer.add_weight(f"{name}_{suffix}", shape=shape, dtype="float32",
                            initializer=keras.initializers.Constant(value), trainable=trainable,
                            experimental_autocast=False)  # parameters stay float32 under mixed precision


def _lazy(variable, flag, init_fn):
    """The variable's value, first set to init_fn() on the first call (flag 0 -> 1)."""

    def first():
        value = tf.cast(init_fn(), variable.dtype)
        with tf.control_dependencies([variable.assign(value), flag.assign(1.0)]):
            return tf.identity(variable.read_value())

    return tf.cond(flag > 0.0, lambda: tf.identity(variable), first)


def _training(training):
    if training is None:
        training = keras.backend.learning_phase()
    if isinstance(training, (bool, int)):
        return bool(training)
    return tf.cast(training, tf.bool)


def _numpy(value):
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float32)


def _channel_shape(tensor_shape, channel_axis):
    shape = list(tensor_shape)
    keep = {a % len(shape) for a in (channel_axis if isinstance(channel_axis, (tuple, list)) else (channel_axis,))}
    return [d if i in keep else 1 for i, d in enumerate(shape)]


def _per_channel(value, w, channel_axis):
    """A per-tensor scale broadcast to the per-channel shape of integer_view."""
    return np.broadcast_to(np.asarray(value, np.float64), _channel_shape(w.shape, channel_axis)).copy()


class _Base(ConfigSerializable, _Quantizer):
    method = None

    def __init__(self, bits=2):
        self.bits = n2uq.check_bits(bits, f"{self.method} bits")

    def build(self, tensor_shape, name, layer):
        return {}  # no variables; quantizers with parameters override this

    def get_config(self):
        return {"bits": self.bits, "format_version": FORMAT_VERSION}


class _WeightBase(_Base):
    def __init__(self, bits=2, channel_axis=-1):
        super().__init__(bits)
        self.channel_axis = tuple(channel_axis) if isinstance(channel_axis, (list, tuple)) else int(channel_axis)

    def get_config(self):
        axis = list(self.channel_axis) if isinstance(self.channel_axis, tuple) else self.channel_axis
        return {"bits": self.bits, "channel_axis": axis, "format_version": FORMAT_VERSION}


# --------------------------------------------------------------------------- activations

@register
class DoReFaActivationQuantizer(_Base):
    """DoReFa: round(n clip(x, 0, 1)) / n, STE (no parameters)."""
    method = "dorefa"

    def __call__(self, inputs, training, weights, **kwargs):
        return tf.cast(baselines.dorefa_activation(inputs, self.bits), inputs.dtype)

    def uniform_levels(self, variables):
        n = n2uq.num_levels(self.bits)
        return UniformLevels(baselines.half_step_thresholds(self.bits).numpy(), np.float32(1.0 / n), np.float32(1.0))


@register
class PACTActivationQuantizer(_Base):
    """PACT: learnable clipping value alpha (init ``alpha_init``), uniform levels on [0, alpha].

    ``alpha_l2`` > 0 adds the paper's L2 regularisation alpha_l2 * alpha^2 to the layer's losses.
    alpha_init defaults to 2, the initial range of the N2UQ quantizer, for normalised inputs
    (the paper starts at 10 on unnormalised ReLU outputs).
    """
    method = "pact"

    def __init__(self, bits=2, alpha_init=2.0, alpha_l2=0.0):
        super().__init__(bits)
        self.alpha_init = float(alpha_init)
        self.alpha_l2 = float(alpha_l2)
        if not self.alpha_init > 0:
            raise ValueError(f"PACT alpha_init must be > 0, got {alpha_init!r}")

    def build(self, tensor_shape, name, layer):
        alpha = _variable(layer, name, "pact_alpha", (), self.alpha_init)
        if self.alpha_l2 > 0:
            layer.add_loss(lambda: self.alpha_l2 * tf.square(alpha))
        return {"alpha": alpha}

    def __call__(self, inputs, training, weights, **kwargs):
        return tf.cast(baselines.pact_activation(inputs, weights["alpha"], self.bits), inputs.dtype)

    def uniform_levels(self, variables):
        thresholds, step = baselines.pact_levels(variables["alpha"], self.bits)
        return UniformLevels(thresholds.numpy(), np.float32(step.numpy()), np.float32(1.0))

    def get_config(self):
        return dict(super().get_config(), alpha_init=self.alpha_init, alpha_l2=self.alpha_l2)


@register
class LSQActivationQuantizer(_Base):
    """LSQ, unsigned (Q_N = 0, Q_P = 2^b - 1): learned step s, init 2 mean|x| / sqrt(Q_P) on the first batch."""
    method = "lsq"

    def build(self, tensor_shape, name, layer):
        return {"step": _variable(layer, name, "lsq_step", (), 1.0),
                "initialized": _variable(layer, name, "lsq_initialized", (), 0.0, trainable=False)}

    def __call__(self, inputs, training, weights, **kwargs):
        _, q_p = baselines.lsq_weight_range(self.bits, signed=False)
        step = _lazy(weights["step"], weights["initialized"],
                     lambda: tf.maximum(baselines.lsq_init(inputs, q_p), 1e-6))
        return tf.cast(baselines.lsq_activation(inputs, step, self.bits), inputs.dtype)

    def uniform_levels(self, variables):
        thresholds, step = baselines.lsq_activation_levels(variables["step"], self.bits)
        return UniformLevels(thresholds.numpy(), np.float32(step.numpy()), np.float32(1.0))


@register
class DAQActivationQuantizer(_Base):
    """DAQ on [0, u]: soft rounding (DASR + temperature controller) at training, rounding at inference.

    u is learnable, initialised to 3 std(x) on the first batch (as the authors' code).
    """
    method = "daq"

    def __init__(self, bits=2, temperature=baselines.DAQ_ACT_TEMPERATURE, sigma=baselines.DAQ_ACT_SIGMA):
        super().__init__(bits)
        self.temperature, self.sigma = float(temperature), float(sigma)

    def build(self, tensor_shape, name, layer):
        return {"upper": _variable(layer, name, "daq_upper", (), 2.0),
                "initialized": _variable(layer, name, "daq_initialized", (), 0.0, trainable=False)}

    def __call__(self, inputs, training, weights, **kwargs):
        upper = _lazy(weights["upper"], weights["initialized"],
                      lambda: tf.maximum(3.0 * tf.math.reduce_std(tf.cast(inputs, tf.float32)), 1e-3))
        y = baselines.daq_activation(inputs, upper, self.bits, _training(training), self.temperature, self.sigma)
        return tf.cast(y, inputs.dtype)

    def uniform_levels(self, variables):
        thresholds, step = baselines.pact_levels(variables["upper"], self.bits)  # hard rounding on [0, u]
        return UniformLevels(thresholds.numpy(), np.float32(step.numpy()), np.float32(1.0))

    def get_config(self):
        return dict(super().get_config(), temperature=self.temperature, sigma=self.sigma)


# --------------------------------------------------------------------------- weights

@register
class DoReFaWeightQuantizer(_WeightBase):
    """DoReFa weights (per tensor): 2 round(n (tanh(w)/(2 max|tanh w|) + 1/2))/n - 1; E|w| sign(w) at 1 bit."""
    method = "dorefa"

    def __call__(self, inputs, training, weights, **kwargs):
        return tf.cast(baselines.dorefa_weights(inputs, self.bits), inputs.dtype)

    def integer_view(self, w, variables=None):
        codes, scale = baselines.dorefa_weight_codes(tf.convert_to_tensor(w, tf.float32), self.bits)
        n = n2uq.num_levels(self.bits)
        # bits > 1: 2k/n - 1 = (2/n)(2k - n)/2; bits = 1: E (2k - 1) = 2E (2k - 1)/2.
        step = 2.0 / n if self.bits > 1 else 2.0 * float(scale.numpy())
        return IntegerView(codes.numpy(), _per_channel(step, w, self.channel_axis), n)


@register
class LSQWeightQuantizer(_WeightBase):
    """Signed LSQ weights (Q_N = 2^(b-1), Q_P = 2^(b-1) - 1, per-tensor step, init 2 mean|w| / sqrt(Q_P)).

    Levels include zero, so the integer view has zero2 = 2^b, not the 2^b - 1 of today's kernels.
    """
    method = "lsq"

    def __init__(self, bits=2, channel_axis=-1):
        super().__init__(bits, channel_axis)
        baselines.lsq_weight_range(self.bits, signed=True)  # raises for 1 bit

    def build(self, tensor_shape, name, layer):
        return {"step": _variable(layer, name, "lsq_step", (), 1.0),
                "initialized": _variable(layer, name, "lsq_initialized", (), 0.0, trainable=False)}

    def __call__(self, inputs, training, weights, **kwargs):
        _, q_p = baselines.lsq_weight_range(self.bits, signed=True)
        step = _lazy(weights["step"], weights["initialized"],
                     lambda: tf.maximum(baselines.lsq_init(inputs, q_p), 1e-8))
        return tf.cast(baselines.lsq_weights(inputs, step, self.bits), inputs.dtype)

    def integer_view(self, w, variables):
        codes = baselines.lsq_weight_codes(tf.convert_to_tensor(w, tf.float32), variables["step"], self.bits)
        return IntegerView(codes.numpy(), _per_channel(_numpy(variables["step"]), w, self.channel_axis),
                           2 ** self.bits)


@register
class DAQWeightQuantizer(_WeightBase):
    """DAQ weights: standardised, soft-rounded on a learnable [l, u] (init [-3, 3]), 2^b symmetric levels."""
    method = "daq"

    def __init__(self, bits=2, channel_axis=-1, temperature=baselines.DAQ_WEIGHT_TEMPERATURE,
                 sigma=baselines.DAQ_WEIGHT_SIGMA):
        super().__init__(bits, channel_axis)
        self.temperature, self.sigma = float(temperature), float(sigma)

    def build(self, tensor_shape, name, layer):
        return {"lower": _variable(layer, name, "daq_lower", (), -3.0),
                "upper": _variable(layer, name, "daq_upper", (), 3.0)}

    def __call__(self, inputs, training, weights, **kwargs):
        y = baselines.daq_weights(inputs, weights["lower"], weights["upper"], self.bits, _training(training),
                          self.temperature, self.sigma)
        return tf.cast(y, inputs.dtype)

    def integer_view(self, w, variables):
        codes, scale = baselines.daq_weight_codes(tf.convert_to_tensor(w, tf.float32), variables["lower"],
                                          variables["upper"], self.bits)
        n = n2uq.num_levels(self.bits)
        return IntegerView(codes.numpy(), _per_channel(float(scale.numpy()) * 2.0 / n, w, self.channel_axis), n)

    def get_config(self):
        return dict(super().get_config(), temperature=self.temperature, sigma=self.sigma)


@register
class NoScaleWeightQuantizer(_WeightBase):
    """Table 4 "no weight scaling": W clipped to [-1, 1], N2UQ's 2^b levels (2k - n)/n, STE."""
    method = "none"

    def __call__(self, inputs, training, weights, **kwargs):
        return tf.cast(baselines.noscale_weights(inputs, self.bits), inputs.dtype)

    def integer_view(self, w, variables=None):
        codes = baselines.noscale_weight_codes(tf.convert_to_tensor(w, tf.float32), self.bits)
        n = n2uq.num_levels(self.bits)
        return IntegerView(codes.numpy(), _per_channel(2.0 / n, w, self.channel_axis), n)


@register
class LearnableScaleWeightQuantizer(_WeightBase):
    """Table 4 "learnable scale": alpha_c (2k - n)/n with alpha_c learned per output channel (LSQ-style).

    alpha_c starts at n mean|W_c| / sqrt(2^(b-1)) (LSQ's 2 mean|w| / sqrt(Q_P) in steps of
    2 alpha / n, Q_P = 2^(b-1) positive levels) on the first call.
    """
    method = "learnable"

    def build(self, tensor_shape, name, layer):
        return {"alpha": _variable(layer, name, "learned_scale", _channel_shape(tensor_shape, self.channel_axis), 1.0),
                "initialized": _variable(layer, name, "learned_scale_initialized", (), 0.0, trainable=False)}

    def __call__(self, inputs, training, weights, **kwargs):
        alpha = _lazy(weights["alpha"], weights["initialized"],
                      lambda: baselines.learnable_scale_init(inputs, self.bits, self.channel_axis))
        grad_scale = baselines.learnable_scale_grad_scale(inputs, self.channel_axis, self.bits)  # static shapes
        return tf.cast(baselines.learnable_scale_weights(inputs, alpha, self.bits, self.channel_axis, grad_scale),
                       inputs.dtype)

    def integer_view(self, w, variables):
        alpha = _numpy(variables["alpha"]).astype(np.float64)
        codes = baselines.learnable_scale_codes(tf.convert_to_tensor(w, tf.float32), variables["alpha"], self.bits)
        return IntegerView(codes.numpy(), alpha * 2.0 / n2uq.num_levels(self.bits), n2uq.num_levels(self.bits))
