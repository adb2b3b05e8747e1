"""The tf_keras + tfmot front end's `n2uq_tf.model_reader.ModelReader`.

Outside this front end's own classes, this is the one place that reads private tf_keras
attributes: a functional model's own nodes (``Functional._nodes_by_depth``: ``model.layers`` has
no order of calls, and a layer's public ``inbound_nodes`` also holds the calls tfmot made in
temporary graphs while quantizing) and whether a layer's call takes ``training``
(``Layer._call_spec``). Nested models are entered through `n2uq_tf.quantize.nested`.
"""

import tensorflow as tf

from n2uq_tf import model_reader
from n2uq_tf._keras import keras
from n2uq_tf.quantize import nested, registry
from n2uq_tf.quantize.wrapper import N2UQWrapper


class _Value:
    """A computed tensor that tf_keras' ``Node.map_arguments`` may pop any number of times."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def pop(self):
        return self.value


def _own_nodes(model):
    """A functional model's own nodes, inputs first (not the temporary graphs tfmot called layers in)."""
    return [node for depth in sorted(model._nodes_by_depth, reverse=True) for node in model._nodes_by_depth[depth]]


def _graph_node(node):
    def arguments(values):
        return node.map_arguments({t_id: _Value(values[t_id]) for t_id in node.flat_input_ids})

    return model_reader.GraphNode(layer=node.layer, is_input=node.is_input,
                                  inputs=[] if node.is_input else tf.nest.flatten(node.input_tensors),
                                  input_ids=tuple(node.flat_input_ids), output_ids=tuple(node.flat_output_ids),
                                  arguments=arguments)


class TfKerasReader(model_reader.LayerTableReader):
    """Reads tf_keras models quantized by `n2uq_tf.quantize_model` (`N2UQWrapper` layers)."""

    model_type = "tf_keras.Model"
    layer_table = registry

    def owns(self, model):
        return isinstance(model, keras.Model)

    def walk(self, model):
        return nested.walk(model)

    def quantized(self, layer, path=None):
        if not isinstance(layer, N2UQWrapper):
            return None
        config = layer.quantize_config
        activation = None
        if layer.input_quantizer is not None:
            activation = model_reader.QuantizedActivation("input", *layer.input_quantizer)
        return model_reader.QuantizedLayer(
            path=layer.layer.name if path is None else path, wrapper=layer, layer=layer.layer,
            weight_bits=config.weight_bits, activation_bits=config.activation_bits,
            weight_method=None if config.weight_bits is None else getattr(config, "weight_method", "n2uq"),
            weights=tuple(layer.weight_quantizers), input=activation,
            intermediate=tuple(layer.intermediate_quantizers))

    def is_functional(self, model):
        return isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)

    def graph_nodes(self, model):
        return [_graph_node(node) for node in _own_nodes(model)]

    def tensor_id(self, tensor):
        return str(id(tensor))  # tf_keras' Node.flat_input_ids

    def call_inference(self, layer, args, kwargs):
        if layer._call_spec.expects_training_arg:
            kwargs = dict(kwargs, training=False)
        return layer(*args, **kwargs)

    def call_with_kernels(self, quantized, inputs, kernels, quantize_between=None):
        layer = quantized.layer
        if quantized.intermediate:
            return registry.split_of(layer).call(layer, inputs, kernels, quantize_between)
        # tfmot's way: the wrapped layer reads its kernels from its attributes.
        saved = {attr: getattr(layer, attr) for attr in kernels}
        try:
            for attr, kernel in kernels.items():
                setattr(layer, attr, kernel)
            return layer.call(inputs)
        finally:
            for attr, value in saved.items():
                setattr(layer, attr, value)

    def activation_input_tensors(self, model, wanted):
        # From the model's own nodes: ``wrapper.input`` is the input of the wrapper's node 0, and
        # tfmot's quantize_apply also calls each wrapper in intermediate graphs, so node 0 is not ours.
        found = []
        for node in _own_nodes(model):
            layer = node.layer
            if isinstance(layer, N2UQWrapper):
                if id(layer) in wanted:
                    found.append((layer, node.input_tensors))
            elif self.is_functional(layer):
                inner = self.activation_input_tensors(layer, wanted)
                if inner:
                    # A sub-extractor called on this node's inputs maps the nested
                    # model's tensors into the outer graph.
                    sub = keras.Model(layer.inputs, [t for _, t in inner])
                    outputs = tf.nest.flatten(sub(node.input_tensors))
                    found.extend(zip([w for w, _ in inner], outputs))
        return found

    def sub_model(self, model, outputs):
        return keras.Model(model.inputs, outputs)


READER = model_reader.register_reader(TfKerasReader())
