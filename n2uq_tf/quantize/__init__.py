"""tf_keras + tfmot front end: quantizers, config, wrapper, scheme, quantize_model, model reader."""

from n2uq_tf.quantize import reader  # noqa: F401  (registers this front end's n2uq_tf.model_reader reader)
from n2uq_tf.quantize.api import (check_model, config_for, custom_objects, load_model, plan_quantization,
                                  quantize_model, quantize_scope)
from n2uq_tf.quantize.config import N2UQQuantizeConfig
from n2uq_tf.quantize.quantizers import QUANTIZER_PARAMETER_SUFFIXES, ActivationQuantizer, WeightQuantizer
from n2uq_tf.quantize.saving import save_model
from n2uq_tf.quantize.scheme import N2UQQuantizeScheme
from n2uq_tf.quantize.wrapper import N2UQWrapper

__all__ = ["QUANTIZER_PARAMETER_SUFFIXES", "ActivationQuantizer", "N2UQQuantizeConfig", "N2UQQuantizeScheme",
           "N2UQWrapper", "WeightQuantizer", "check_model", "config_for", "custom_objects", "load_model",
           "plan_quantization", "quantize_model", "quantize_scope", "save_model"]
