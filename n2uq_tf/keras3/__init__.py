"""The Keras 3 front end (TensorFlow backend): Keras 3 models quantized with the same math and table.

`n2uq_tf.quantize_model` hands a Keras 3 `keras.Model` here; the result holds `N2UQWrapper`
layers (registered with Keras 3 as ``n2uq_tf>N2UQWrapper``), trains with the default
``compile()`` and ``fit()`` (under XLA too), saves as `.keras` and loads with
`keras.models.load_model` after ``import n2uq_tf``, or with `n2uq_tf.load_model`. Importing this
package registers its `n2uq_tf.model_reader` reader. It imports Keras 3 (`keras`), never tf_keras
itself; it reuses the tf_keras front end's registry table and planning (`n2uq_tf.quantize`).
The literature methods (DoReFa, PACT, LSQ, DAQ, ...) run the tf_keras front end's quantizer classes
on Keras 3 variables (`baseline_quantizers`).
"""

from n2uq_tf.keras3 import reader  # noqa: F401  (registers the reader)
from n2uq_tf.keras3.backend import check_tensorflow_backend
from n2uq_tf.keras3.quantize import quantize_model
from n2uq_tf.keras3.saving import load_model
from n2uq_tf.keras3.wrapper import N2UQWrapper

__all__ = ["N2UQWrapper", "check_tensorflow_backend", "load_model", "quantize_model"]
