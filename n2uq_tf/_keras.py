"""The Keras this package's tf_keras front end uses: tf_keras (Keras 2), which tfmot requires; its class registry.

The front end imports tfmot here, in one known place. Code in this package names `tf_keras` (or
`keras` for Keras 3) explicitly and never uses the ambiguous `tf.keras`.

`tf.keras` stays what the user's environment makes it. Importing tfmot sets TF_USE_LEGACY_KERAS=1
for the process and, if `tf.keras` has not been used yet, resolves it then, to tf_keras for good.
So before tfmot is imported `tf.keras` is resolved as the environment says (Keras 3 unless the
user set TF_USE_LEGACY_KERAS), and afterwards the variable is put back as it was. tfmot itself uses
tf_keras either way (it takes tf_keras when `tf.keras` is Keras 3). If tfmot was imported before
n2uq_tf, it has already decided `tf.keras` (tf_keras); that cannot be undone.

Every class a saved model may name goes through `register`; `custom_objects` is built from it.
"""

import importlib
import os

import tf_keras as keras  # noqa: F401  (re-exported)

_LEGACY_KERAS_VARIABLE = "TF_USE_LEGACY_KERAS"


def _import_tfmot_leaving_tf_keras_alone():
    """Imports tfmot without changing what `tf.keras` is or the TF_USE_LEGACY_KERAS variable."""
    import sys

    if "tensorflow_model_optimization" in sys.modules:
        return sys.modules["tensorflow_model_optimization"]
    previous = os.environ.get(_LEGACY_KERAS_VARIABLE)
    try:
        import keras as keras_3  # noqa: F401  (tf.keras resolves to it below, so it must import)
    except Exception:  # no usable Keras 3 (not installed, or its backend fails): tfmot decides tf.keras
        keras_3 = None
    if keras_3 is not None:
        import tensorflow as tf

        tf.keras.__name__  # noqa: B018  (the first attribute read resolves the lazy tf.keras module)
    try:
        import tensorflow_model_optimization as tfmot
    finally:
        if previous is None:
            os.environ.pop(_LEGACY_KERAS_VARIABLE, None)
        else:
            os.environ[_LEGACY_KERAS_VARIABLE] = previous
    return tfmot


tfmot = _import_tfmot_leaving_tf_keras_alone()

FORMAT_VERSION = 1  # bumped when saved configs change incompatibly

# Every module that defines a class through `register` (tests/test_package.py checks the list
# against the sources). `custom_objects` imports them, so a loader knows every class whichever
# parts of the package the caller has used so far; the classes themselves are not listed anywhere.
REGISTERING_MODULES = ("n2uq_tf.layers", "n2uq_tf.quantize.quantizers", "n2uq_tf.quantize.baseline_quantizers",
                       "n2uq_tf.quantize.config", "n2uq_tf.quantize.wrapper", "n2uq_tf.training.optimizer",
                       "n2uq_tf.training.schedules", "n2uq_tf.distribute.optimizer")
_registered = {}  # class name -> class, in registration order


def register(cls):
    """Registers a class for Keras serialization under the package name n2uq_tf."""
    cls = keras.saving.register_keras_serializable(package="n2uq_tf")(cls)
    _registered[cls.__name__] = cls
    return cls


def registered_classes(package: str = "n2uq_tf") -> dict[str, type]:
    """{class name: class} of the classes registered so far whose module is `package` or inside it."""
    return {name: cls for name, cls in _registered.items()
            if cls.__module__ == package or cls.__module__.startswith(package + ".")}


def custom_objects() -> dict[str, type]:
    """Every class a saved n2uq_tf model may name, for Keras deserialization: {class name: class}."""
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
    return registered_classes()


def check_format_version(config, what):
    """Raises a clear error for a config written by a newer, incompatible n2uq_tf."""
    version = config.pop("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{what} was saved by a newer n2uq_tf (format version {version}; this one reads "
            f"up to {FORMAT_VERSION}). Upgrade n2uq_tf to load it.")


class ConfigSerializable:
    """from_config with the format-version check, and equality by config, for our config objects."""

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        check_format_version(config, cls.__name__)
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __ne__(self, other):
        return not self == other

    __hash__ = None
