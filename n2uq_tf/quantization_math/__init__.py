"""The quantization math: pure TensorFlow (no Keras), the one source of truth for the semantics.

* `n2uq`: the N2UQ activation quantizer (learnable thresholds, uniform output levels, G-STE
  gradients; a pure-TF reference path that compiles with XLA and a fused C++ CPU path) and the
  entropy-preserving weight quantizer.
* `baselines`: the literature quantizers N2UQ is compared with (DoReFa, PACT, LSQ, DAQ and the
  weight variants of the paper's Table 4), each written from its paper.

The Keras front end (`n2uq_tf.quantize`) calls these functions; the fused training kernel, the
exporter's reference bodies and the TFLite kernels are all tested against them. `n2uq_tf.ops` and
`n2uq_tf.methods`, the names these modules had before, still import (the same module objects).
"""

from n2uq_tf.quantization_math import baselines, n2uq  # noqa: F401
