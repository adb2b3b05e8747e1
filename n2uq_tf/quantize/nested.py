"""Models nested in models: one walk over every layer, and cloning at every depth.

A Sequential block used as a layer, or a `tf_keras.applications` backbone called inside a
Functional model, is itself a model among the outer model's layers. Planning, quantizing,
reporting and exporting all look through such models with `walk`, so they agree on one name per
layer: its *path*, the names of the nested models that hold it and its own joined by "/"
(``backbone/block1_conv``; a top-level layer's path is its name). An `N2UQWrapper` is named
after the layer it wraps, so a layer keeps its path through quantization: the plan of the float
model, the report of the quantized one and the export all use the same names.

Subclassed models cannot be looked into (they have no layer graph to clone); the walk yields
them as single layers.
"""

from n2uq_tf._keras import keras, tfmot
from n2uq_tf import model_reader
from n2uq_tf.model_reader import SEPARATOR, WalkedLayer  # noqa: F401  (re-exported)


def is_nested_model(layer):
    """True for a Functional or Sequential model (what `walk` enters and `clone` clones)."""
    return isinstance(layer, keras.Model) and (
        isinstance(layer, keras.Sequential) or getattr(layer, "_is_graph_network", False))


def has_nested_models(model):
    return any(is_nested_model(layer) for layer in model.layers)


def layer_name(layer):
    """The name a layer has in paths: a quantize wrapper's is the name of the layer it wraps."""
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        return layer.layer.name
    return layer.name


def walk(model, *, models=False):
    """Yields a `WalkedLayer` for every layer of `model`, nested models entered, in layer order
    (`model_reader.walk_layers`: with ``models=True`` each nested model too, before its layers; a
    shared layer once)."""
    return model_reader.walk_layers(model, is_nested_model, layer_name, models=models)


def clone(model, clone_leaf, *, unfreeze=False):
    """`tf_keras.models.clone_model` at every depth, keeping the user's structure.

    ``clone_leaf(layer, path)`` gives the clone of each layer that is not a nested model (as
    clone_model's ``clone_function``); every nested model is cloned the same way, under its own
    name, and stays frozen if it was (``trainable=False``) unless ``unfreeze``. As with
    clone_model, cloned layers have fresh weights (``clone.set_weights(model.get_weights())``).
    """
    return model_reader.clone_layers(model, clone_leaf, is_nested_model=is_nested_model,
                                     layer_name=layer_name, clone_model=keras.models.clone_model,
                                     unfreeze=unfreeze)
