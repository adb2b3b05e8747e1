"""The Keras this package uses: always tf_keras (Keras 2), which tfmot requires.

Importing tensorflow_model_optimization sets TF_USE_LEGACY_KERAS=1 for the process;
we import it here so that happens in one known place. Code in this package names
`tf_keras` explicitly and never uses the ambiguous `tf.keras`.
"""

import tf_keras as keras  # noqa: F401  (re-exported)
import tensorflow_model_optimization as tfmot  # noqa: F401  (re-exported)

FORMAT_VERSION = 1  # bumped when saved configs change incompatibly


def register(cls):
    """Registers a class for Keras serialization under the package name n2uq_tf."""
    return keras.saving.register_keras_serializable(package="n2uq_tf")(cls)


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
