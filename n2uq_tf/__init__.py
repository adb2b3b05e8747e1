"""n2uq_tf: N2UQ quantization-aware training for tf_keras, exported to bit-packed TFLite.

    import n2uq_tf
    qmodel = n2uq_tf.quantize_model(float_model, bits=2)
    qmodel.compile(...); qmodel.fit(...)
    print(n2uq_tf.quantization_report(qmodel))
"""

__version__ = "0.1.0"

from n2uq_tf import ops  # noqa: E402
from n2uq_tf.quantize import (ActivationQuantizer, N2UQQuantizeConfig, N2UQQuantizeScheme,  # noqa: E402
                              N2UQWrapper, WeightQuantizer, custom_objects, load_model, quantize_model,
                              quantize_scope)
from n2uq_tf.report import QuantizationReport, quantization_report  # noqa: E402

__all__ = [
    "ActivationQuantizer", "N2UQQuantizeConfig", "N2UQQuantizeScheme", "N2UQWrapper", "QuantizationReport",
    "WeightQuantizer", "custom_objects", "load_model", "ops", "quantization_report", "quantize_model",
    "quantize_scope",
]
