"""Which Keras built an object (tf_keras or Keras 3), told from its classes without importing either.

tf_keras is Keras 2 (what tfmot and this package's tf_keras front end use); `import keras` is Keras 3
with TensorFlow 2.16 and later. Functions written for one of them call `require_tf_keras` so that an
object of the other gets an error naming the function instead of a failure deep inside Keras.
"""

import importlib.util
import sys

TF_KERAS = "tf_keras"
KERAS_3 = "keras 3"


def keras_of(obj):
    """TF_KERAS or KERAS_3 for a Keras object (model, layer, optimizer, callback, ...), else None."""
    for cls in type(obj).__mro__:
        package = cls.__module__.split(".")[0]
        if package == "tf_keras":
            return TF_KERAS
        if package == "keras":
            version = getattr(sys.modules.get("keras"), "__version__", "3")
            return KERAS_3 if version.startswith("3") else None
    return None


def is_keras3(obj):
    """True for an object of Keras 3 (`import keras`)."""
    return keras_of(obj) == KERAS_3


def keras3_available():
    """True where Keras 3 is installed and imports (its configured backend included)."""
    if importlib.util.find_spec("keras") is None:
        return False
    try:
        import keras
    except Exception:  # a backend that fails to load: Keras 3 is not usable here
        return False
    return keras.__version__.startswith("3")


def require_tf_keras(obj, function, what="model", alternative=None):
    """Raises TypeError naming `function` when `obj` is a Keras 3 object; returns `obj`."""
    if is_keras3(obj):
        message = (f"{function} works with tf_keras (Keras 2) objects only, but the {what} given is a Keras 3 "
                   f"{type(obj).__name__} (built with `import keras`).")
        if alternative:
            message += " " + alternative
        raise TypeError(message)
    return obj
