"""The Keras 3 backend this front end runs on: TensorFlow only (its math is TensorFlow ops)."""

import keras


def check_tensorflow_backend(function):
    """Raises RuntimeError naming ``function`` unless Keras 3 runs on the TensorFlow backend.

    Checked when a function is called, not on import: `import n2uq_tf` works under any backend.
    """
    name = keras.backend.backend()
    if name != "tensorflow":
        raise RuntimeError(
            f"{function} needs Keras 3 on the TensorFlow backend; keras.backend.backend() is {name!r}. The N2UQ "
            "quantizers are TensorFlow ops (and the TFLite export starts from a TensorFlow graph). Set "
            "KERAS_BACKEND=tensorflow before importing keras, or build the model with tf_keras.")
