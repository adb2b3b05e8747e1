"""Keras 3 models nested in models: the walk and the clone of `n2uq_tf.quantize.nested`, for Keras 3.

The same paths (``backbone/block1_conv``: the names of the nested models holding a layer and its
own, joined by "/"); a quantize wrapper is named by the layer it wraps, so a layer keeps its path
through quantization. Functional and Sequential models are entered; a subclassed model is one layer.
"""

import keras
# Keras 3 has no public test for "a Functional model" (`keras.Model(inputs, outputs)` returns one);
# this is the one private Keras 3 import of the package.
from keras.src.models.functional import Functional

from n2uq_tf import model_reader
from n2uq_tf.model_reader import SEPARATOR, WalkedLayer  # noqa: F401  (re-exported)


def is_model(layer):
    return isinstance(layer, keras.Model)


def is_nested_model(layer):
    """True for a Functional or Sequential Keras 3 model (what `walk` enters and `clone` clones)."""
    return isinstance(layer, (keras.Sequential, Functional))


def has_nested_models(model):
    return any(is_nested_model(layer) for layer in model.layers)


def layer_name(layer):
    """The name a layer has in paths: a quantize wrapper's is the name of the layer it wraps."""
    wrapped = getattr(layer, "quantized_layer", None)
    return layer.name if wrapped is None else wrapped.name


def walk(model, *, models=False):
    """Yields a `WalkedLayer` for every layer of `model`, nested models entered, in layer order
    (with ``models=True`` each nested model too, before its layers); a shared layer once."""
    return model_reader.walk_layers(model, is_nested_model, layer_name, models=models)


def clone(model, clone_leaf, *, unfreeze=False):
    """`keras.models.clone_model` at every depth, keeping the user's structure.

    ``clone_leaf(layer, path)`` gives the clone of each layer that is not a nested model; every
    nested model is cloned the same way under its own name and stays frozen if it was, unless
    ``unfreeze``. Cloned layers have fresh weights.
    """
    return model_reader.clone_layers(model, clone_leaf, is_nested_model=is_nested_model,
                                     layer_name=layer_name, clone_model=keras.models.clone_model,
                                     unfreeze=unfreeze)
