"""TFLite side of n2uq_tf: run exported models with the N2UQ custom ops in stock interpreters.

Needs neither TensorFlow nor the exporter: ai_edge_litert (or tf.lite) and a C++ compiler.

* `delegate`: the delegate plugin library (built from tflite_tools/tflite on first use),
  loadable by any TFLite interpreter as an external delegate:
  `tf.lite.Interpreter(path, experimental_delegates=[tf.lite.experimental.load_delegate(delegate_path())])`
  or the same with `ai_edge_litert.interpreter`; `load_delegate(**options)`,
  `Interpreter(model_path=..., num_threads=..., backend=...)`, `kernel_profile`.
* `benchmark`: `benchmark_model(path, ...)` / `format_benchmark` / `default_warmup` (inspection lives in
  `n2uq_tf.export.inspect_tflite`, int8 calibration in `n2uq_tf.export.calibration`).
* `op_names`: the custom op names, shared with the exporter.
* `_core`: the bit-serial kernel core wrapped with ctypes (tests, benchmarks).
"""

from n2uq_tf.tflite.benchmark import benchmark_model, default_warmup, format_benchmark
from n2uq_tf.tflite.delegate import (BACKENDS, N2UQ_OPS, DelegateUnavailableError, Interpreter, abi_probe_text, build,
                                     delegate_path, kernel_profile, load_delegate, model_n2uq_ops,
                                     reset_kernel_profile)

__all__ = ["BACKENDS", "N2UQ_OPS", "DelegateUnavailableError", "Interpreter", "abi_probe_text", "benchmark_model",
           "build", "default_warmup", "delegate_path", "format_benchmark", "kernel_profile", "load_delegate",
           "model_n2uq_ops", "reset_kernel_profile"]
