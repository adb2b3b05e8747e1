"""METHODS: the one table from a quantization method's name to its tfmot Quantizer classes.

Names are what `quantize_model(method=..., weight_method=..., activation_method=...)` and
`N2UQQuantizeConfig` take; `resolve_methods` turns those arguments into one weight and one
activation method, `activation_quantizer` / `weight_quantizer` build the Quantizers, and
`check_exportable` is the per-method rule of what today's TFLite kernels can run.
"""

from n2uq_tf.quantize.baseline_quantizers import (DAQActivationQuantizer, DAQWeightQuantizer,
                                                  DoReFaActivationQuantizer, DoReFaWeightQuantizer,
                                                  LearnableScaleWeightQuantizer, LSQActivationQuantizer,
                                                  LSQWeightQuantizer, NoScaleWeightQuantizer, PACTActivationQuantizer)
from n2uq_tf.quantize.quantizers import ActivationQuantizer, UniformActivationQuantizer, WeightQuantizer

# method -> (activation quantizer class or None, weight quantizer class or None). A method
# without one side leaves that side to N2UQ when chosen with `method=`; PACT's paper quantizes
# weights with DoReFa, so "pact" pairs the two.
METHODS = {
    "n2uq": (ActivationQuantizer, WeightQuantizer),
    "uniform": (UniformActivationQuantizer, None),
    "dorefa": (DoReFaActivationQuantizer, DoReFaWeightQuantizer),
    "pact": (PACTActivationQuantizer, DoReFaWeightQuantizer),
    "lsq": (LSQActivationQuantizer, LSQWeightQuantizer),
    "daq": (DAQActivationQuantizer, DAQWeightQuantizer),
    "none": (None, NoScaleWeightQuantizer),
    "learnable": (None, LearnableScaleWeightQuantizer),
}

ACTIVATION_METHODS = tuple(name for name, (a, _) in METHODS.items() if a is not None)
WEIGHT_METHODS = tuple(name for name, (_, w) in METHODS.items() if w is not None and w.method == name)

# Today's bit-serial kernels take weights scale * (2k - n) / 2 only (zero2 = n = 2^b - 1).
NEEDS_ZERO_POINT = ("lsq",)


def _check_name(name, allowed, what):
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; methods: {', '.join(METHODS)}")
    if name not in allowed:
        raise ValueError(f"{name!r} is not a {what} method; {what} methods: {', '.join(allowed)}")
    return name


def resolve_methods(method="n2uq", weight_method=None, activation_method=None, learn_thresholds=True):
    """(weight_method, activation_method) from `method` and the per-side overrides.

    ``method`` sets both sides; a method without one side leaves it to "n2uq".
    ``learn_thresholds=False`` turns an "n2uq" activation into "uniform".
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; methods: {', '.join(METHODS)}")
    activation_quantizer, weight_quantizer = METHODS[method]
    w = _check_name(weight_method, WEIGHT_METHODS, "weight") if weight_method is not None else (
        weight_quantizer.method if weight_quantizer is not None else "n2uq")
    a = _check_name(activation_method, ACTIVATION_METHODS, "activation") if activation_method is not None else (
        method if activation_quantizer is not None else "n2uq")
    if not learn_thresholds:
        if a == "n2uq":
            a = "uniform"
        elif a != "uniform":
            raise ValueError(f"learn_thresholds=False freezes N2UQ thresholds; it does not apply to "
                             f"activation method {a!r}")
    return w, a


def activation_quantizer(method, bits):
    return METHODS[_check_name(method, ACTIVATION_METHODS, "activation")][0](bits)


def weight_quantizer(method, bits, channel_axis):
    return METHODS[_check_name(method, WEIGHT_METHODS, "weight")][1](bits, channel_axis)


def check_exportable(wrapper):
    """Raises ValueError when a wrapper's quantizers cannot be lowered to today's bit-serial kernels.

    For the exporter: LSQ weights have a zero level (zero2 = 2^b), the kernels take zero2 = 2^b - 1.
    """
    for _, _, quantizer, _ in wrapper.weight_quantizers:
        if getattr(quantizer, "method", None) in NEEDS_ZERO_POINT:
            raise ValueError(
                f"layer {wrapper.layer.name!r}: {quantizer.method!r} weights have a zero level "
                f"(w = scale (2k - 2^b) / 2); the bit-serial kernels take only zero2 = 2^b - 1 "
                f"(N2UQ, uniform, DoReFa, PACT, DAQ, none, learnable). Export of {quantizer.method!r} "
                "weights needs the zero-point generalisation of the kernels.")
