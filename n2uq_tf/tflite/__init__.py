"""TFLite side of n2uq_tf: run exported models with the N2UQ custom ops in stock interpreters.

* `delegate_path()`: the delegate plugin library (built from tflite_tools/tflite on first use),
  loadable by any TFLite interpreter as an external delegate:
  `tf.lite.Interpreter(path, experimental_delegates=[tf.lite.experimental.load_delegate(delegate_path())])`
  or the same with `ai_edge_litert.interpreter`.
* `load_delegate(**options)`, `Interpreter(model_path=..., num_threads=..., backend=...)`.
* `benchmark_model(path, ...)` / `format_benchmark` (inspection lives in `n2uq_tf.export.inspect_tflite`).
* `_core`: the bit-serial kernel core wrapped with ctypes (tests, benchmarks).
"""

from n2uq_tf.tflite._delegate import (BACKENDS, N2UQ_OPS, DelegateUnavailableError, Interpreter, abi_probe_text,
                                      benchmark_model, build, delegate_path, format_benchmark, kernel_profile,
                                      load_delegate, model_n2uq_ops, op_resolver_registerer, reset_kernel_profile)

__all__ = ["BACKENDS", "N2UQ_OPS", "DelegateUnavailableError", "Interpreter", "abi_probe_text", "benchmark_model",
           "build", "delegate_path", "format_benchmark", "kernel_profile", "load_delegate", "model_n2uq_ops",
           "op_resolver_registerer", "reset_kernel_profile"]
