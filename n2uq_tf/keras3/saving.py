"""Loading Keras 3 `.keras` files: what `n2uq_tf.load_model` does for a file Keras 3 wrote.

A `.keras` file is a zip whose ``metadata.json`` (and, in older files, ``config.json``) names the
Keras version that wrote it: 3.x for Keras 3, 2.x for tf_keras.
"""

import json
import os
import zipfile

import keras

from n2uq_tf.keras3 import nested
from n2uq_tf.keras3.backend import check_tensorflow_backend
from n2uq_tf.keras3.wrapper import N2UQWrapper


def keras_version_of(path):
    """The Keras version a `.keras` file was written by ("3.15.0"), or None (not a readable `.keras` zip)."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in ("metadata.json", "config.json"):
                if member in archive.namelist():
                    version = json.loads(archive.read(member)).get("keras_version")
                    if version:
                        return str(version)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError):
        return None
    return None


def owns_file(path):
    """True for a `.keras` file written by Keras 3."""
    version = keras_version_of(path)
    return version is not None and version.split(".")[0] == "3"


def load_model(path, custom_objects=None, compile=True, require_quantized=True):
    """Loads a quantized Keras 3 model (`n2uq_tf.load_model` for a Keras 3 `.keras` file)."""
    check_tensorflow_backend("n2uq_tf.load_model")
    try:
        model = keras.models.load_model(path, custom_objects=custom_objects, compile=compile)
    except Exception as error:  # zip, JSON, deserialization and variable-count errors
        raise ValueError(f"could not load a quantized model from {path!r} (Keras 3 .keras format): "
                         f"{type(error).__name__}: {error}") from error
    if require_quantized and not any(isinstance(w.layer, N2UQWrapper) for w in nested.walk(model)):
        raise ValueError(f"{path!r} holds a model without N2UQ-quantized layers; load float models with "
                         "keras.models.load_model")
    return model
