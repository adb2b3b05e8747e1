"""Keras -> TFLite export of N2UQ models with bit-packed custom ops (see custom_ops for the op contract).

    tflite_bytes = n2uq_tf.export.export_tflite(qmodel, "model.tflite")
    print(n2uq_tf.export.inspect_tflite("model.tflite"))
"""

from n2uq_tf.export.converter import EXPORT_FORMAT_VERSION, METADATA_NAME, export_tflite, plan_export
from n2uq_tf.export.inspect import TFLiteInspection, format_inspection, inspect_tflite
from n2uq_tf.export.lowering import ExportReport, LayerExport, LoweredModel, lower

__all__ = ["EXPORT_FORMAT_VERSION", "ExportReport", "LayerExport", "LoweredModel", "METADATA_NAME",
           "TFLiteInspection", "export_tflite", "format_inspection", "inspect_tflite", "lower", "plan_export"]
