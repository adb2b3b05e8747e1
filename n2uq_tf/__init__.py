"""n2uq_tf: N2UQ quantization-aware training for tf_keras, exported to bit-packed TFLite.

    import n2uq_tf
    qmodel = n2uq_tf.quantize_model(float_model, bits=2)
    qmodel.compile(...); qmodel.fit(...)
    print(n2uq_tf.quantization_report(qmodel))

The paper's recipe in one call: ``n2uq_tf.recipe.train_n2uq``, built from ``n2uq_tf.models``
(reference networks), ``n2uq_tf.data`` (datasets), ``n2uq_tf.DistillationModel`` and
``n2uq_tf.paper_optimizer`` (training), ``n2uq_tf.plots``.
Saving: ``n2uq_tf.save_model(qmodel, path)`` (atomic) and ``n2uq_tf.load_model(path)``.
Deployment: ``n2uq_tf.export_tflite(qmodel, "model.tflite")`` and ``n2uq_tf.tflite.Interpreter``.
Data-parallel training with compressed gradients: ``n2uq_tf.distribute.compress_gradients``.
"""

import importlib

__version__ = "0.1.0"

from n2uq_tf import ops  # noqa: E402
from n2uq_tf.quantize import (ActivationQuantizer, N2UQQuantizeConfig, N2UQQuantizeScheme,  # noqa: E402
                              N2UQWrapper, WeightQuantizer, custom_objects, load_model, quantize_model,
                              quantize_scope)
from n2uq_tf.quantize.saving import save_model  # noqa: E402
from n2uq_tf.report import QuantizationReport, quantization_report  # noqa: E402
from n2uq_tf.training import (DistillationModel, LinearEpochDecay, N2UQAdam, distillation_loss,  # noqa: E402
                              paper_optimizer)

# Imported on first use: data pulls in tensorflow_datasets, plots matplotlib.
_LAZY_SUBMODULES = ("cli", "data", "distribute", "export", "layers", "models", "plots", "recipe", "tflite")
_LAZY_FUNCTIONS = {"export_tflite": "n2uq_tf.export", "inspect_tflite": "n2uq_tf.export"}


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"n2uq_tf.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'n2uq_tf' has no attribute {name!r}")


__all__ = [
    "ActivationQuantizer", "DistillationModel", "LinearEpochDecay", "N2UQAdam", "N2UQQuantizeConfig",
    "N2UQQuantizeScheme", "N2UQWrapper", "QuantizationReport", "WeightQuantizer", "custom_objects",
    "distillation_loss", "export_tflite", "inspect_tflite", "load_model", "ops", "paper_optimizer",
    "quantization_report", "quantize_model", "quantize_scope", "save_model",
]
