"""The N2UQ QuantizeScheme for `tfmot.quantization.keras.quantize_apply`.

Its layout transform wraps every layer annotated with an `N2UQQuantizeConfig` in an
`N2UQWrapper` (which quantize_apply keeps as it is), and its registry supports no
layer, so quantize_apply adds no 8-bit fake-quant anywhere.
"""

import tensorflow as tf

from n2uq_tf._keras import keras, tfmot
from n2uq_tf.quantize.config import N2UQQuantizeConfig
from n2uq_tf.quantize.wrapper import N2UQWrapper

_keras_quantization = tfmot.quantization.keras


class _NoDefaultsRegistry(_keras_quantization.QuantizeRegistry):
    """Supports nothing: only explicitly annotated layers are quantized."""

    def supports(self, layer):
        return False

    def get_quantize_config(self, layer):
        raise ValueError(f"layer {layer.name!r} has no N2UQ annotation; annotate it with "
                         "quantize_annotate_layer(layer, N2UQQuantizeConfig(...))")


class _WrapAnnotatedLayers(_keras_quantization.QuantizeLayoutTransform):
    def apply(self, model, layer_quantize_map):
        def wrap(layer):
            config = layer_quantize_map.get(layer.name, {}).get("quantize_config")
            if isinstance(config, N2UQQuantizeConfig):
                return N2UQWrapper(_with_own_weight_names(layer), config)
            if config is not None:
                raise ValueError(f"layer {layer.name!r} is annotated with {type(config).__name__}; "
                                 "the N2UQ scheme takes N2UQQuantizeConfig annotations only")
            return layer

        return keras.models.clone_model(model, input_tensors=None, clone_function=wrap), layer_quantize_map


def _with_own_weight_names(layer):
    """A copy of a built layer whose variables are named under the layer's name ('conv/kernel').

    quantize_apply hands over layers that its annotation wrapper built, named
    'quantize_annotate_7/kernel'; a loaded model names them 'conv/kernel' (see N2UQWrapper.build).
    """
    build_config = layer.get_build_config() if layer.built else None
    if not build_config or all(w.name.startswith(layer.name + "/") for w in layer.weights):
        return layer
    copy = layer.__class__.from_config(layer.get_config())
    with tf.name_scope(layer.name + "/"):
        copy.build_from_config(build_config)
    copy.set_weights(layer.get_weights())
    return copy


class N2UQQuantizeScheme(_keras_quantization.QuantizeScheme):
    """Pass to ``quantize_apply(annotated_model, N2UQQuantizeScheme())``."""

    def get_layout_transformer(self):
        return _WrapAnnotatedLayers()

    def get_quantize_registry(self):
        return _NoDefaultsRegistry()
