"""quantize_model for Keras 3 models: the same plan, warnings and errors as the tf_keras front end.

`n2uq_tf.quantize_model` hands a Keras 3 model here (through this front end's model reader). The
plan is `n2uq_tf.quantize.api.checked_plan` (the registry table, skip_layers, overrides, the
first/last rule); each layer to quantize is cloned into an `N2UQWrapper`, every other layer is
cloned as it is, nested models keep their names, places and frozen state, and every layer takes
the float model's weights by its path.
"""

import keras

from n2uq_tf.quantize import api as quantize_api
from n2uq_tf.keras3 import nested, quantizers
from n2uq_tf.keras3.backend import check_tensorflow_backend
from n2uq_tf.keras3.wrapper import N2UQWrapper


def check_model(model, what="model"):
    """Raises TypeError/ValueError unless `model` is a built Functional or Sequential Keras 3 model."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"{what} must be a keras.Model, got {type(model).__name__}")
    if not nested.is_nested_model(model):
        raise ValueError(
            f"{what} {model.name!r} is a subclassed model ({type(model).__name__}); it cannot be cloned layer by "
            "layer. Build it with the Functional or Sequential API, or quantize its layers by hand: wrap each "
            "with n2uq_tf.keras3.N2UQWrapper(layer, weight_bits, activation_bits).")
    if not model.built:
        raise ValueError(f"{what} {model.name!r} is not built; call model.build(input_shape) first")


def check_not_quantized(model):
    for walked in nested.walk(model):
        if isinstance(walked.layer, N2UQWrapper):
            raise ValueError(
                f"model {model.name!r} is already quantized: layer {walked.path!r} is N2UQ-quantized. quantize_model "
                "takes the float model; compile and fit this one to keep training it, or quantize the float model "
                "again for other bits")


def _copy_weights(source, target):
    """Every layer of ``target`` (a wrapper: its wrapped layer) takes the weights of the layer of
    ``source`` with the same path."""
    sources = {w.path: w.layer for w in nested.walk(source)}
    for walked in nested.walk(target):
        layer = walked.layer.layer if isinstance(walked.layer, N2UQWrapper) else walked.layer
        if layer.weights:
            layer.set_weights(sources[walked.path].get_weights())


def quantize_model(model, **arguments):
    """`n2uq_tf.quantize_model` of a Keras 3 model (the same arguments; see there)."""
    check_tensorflow_backend("n2uq_tf.quantize_model")
    check_model(model)
    check_not_quantized(model)
    # stacklevel: the warnings point at the caller of n2uq_tf.quantize_model.
    to_quantize, frozen = quantize_api.checked_plan(model, stacklevel=5, **arguments)
    for path, p in to_quantize.items():
        quantizers.check_methods(p["weight_method"], p["activation_method"], f"layer {path!r}")

    def clone_leaf(layer, path):
        config = layer.get_config()
        if frozen and "trainable" in config:
            config["trainable"] = True
        clone = layer.__class__.from_config(config)
        p = to_quantize.get(path)
        if p is None:
            return clone
        return N2UQWrapper(clone, p["weight_bits"], p["activation_bits"], weight_method=p["weight_method"] or "n2uq",
                           activation_method=p["activation_method"] or "n2uq")

    quantized = nested.clone(model, clone_leaf, unfreeze=frozen)
    _copy_weights(model, quantized)
    return quantized
