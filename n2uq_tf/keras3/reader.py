"""The Keras 3 front end's `n2uq_tf.model_reader.ModelReader`, and its entry points.

With it registered, `n2uq_tf.quantization_report`, `model_reader.quantizer_state`, the plots, the
callbacks and the exporter read a Keras 3 model as they read a tf_keras one; `n2uq_tf.quantize_model`
and `n2uq_tf.load_model` hand Keras 3 models and files to it.

The private Keras 3 attributes read here, and only here: a Functional model's own nodes
(``_nodes_by_depth``: each node's ``operation``, ``arguments`` and tensors) and a Sequential
model's functional graph (``_functional``).
"""

import inspect

import keras
import tensorflow as tf

from n2uq_tf import model_reader
from n2uq_tf.quantize import registry
from n2uq_tf.keras3 import nested, quantize, saving
from n2uq_tf.keras3.wrapper import N2UQWrapper


def _graph_of(model):
    """The Functional model holding `model`'s graph (a Sequential's inner one), or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if nested.is_nested_model(model) else None


def _own_nodes(model):
    graph = _graph_of(model)
    return [node for depth in sorted(graph._nodes_by_depth, reverse=True) for node in graph._nodes_by_depth[depth]]


def _graph_node(node):
    def arguments(values):
        return node.arguments.fill_in(values)  # {id(symbolic tensor): value} -> (args, kwargs)

    return model_reader.GraphNode(
        layer=node.operation, is_input=node.is_input, inputs=[] if node.is_input else list(node.input_tensors),
        input_ids=tuple(id(t) for t in node.input_tensors), output_ids=tuple(id(t) for t in node.output_tensors),
        arguments=arguments)


def _node_input(node):
    tensors = list(node.input_tensors)
    return tensors[0] if len(tensors) == 1 else tensors


class Keras3Reader(model_reader.LayerTableReader):
    """Reads Keras 3 models quantized by `n2uq_tf.quantize_model` (`n2uq_tf.keras3.N2UQWrapper` layers)."""

    model_type = "keras.Model (Keras 3)"
    layer_table = registry
    nested = nested  # the walk `n2uq_tf.quantize.api.plan_quantization` uses for these models

    def owns(self, model):
        return isinstance(model, keras.Model)

    def check_model(self, model, what="model"):
        quantize.check_model(model, what)

    def quantize_model(self, model, **arguments):
        return quantize.quantize_model(model, **arguments)

    def owns_file(self, path):
        return saving.owns_file(path)

    def load_model(self, path, custom_objects=None, compile=True, require_quantized=True):
        return saving.load_model(path, custom_objects, compile, require_quantized)

    def walk(self, model):
        return nested.walk(model)

    def quantized(self, layer, path=None):
        if not isinstance(layer, N2UQWrapper):
            return None
        activation = None
        if layer.input_quantizer is not None:
            activation = model_reader.QuantizedActivation("input", *layer.input_quantizer)
        return model_reader.QuantizedLayer(
            path=layer.layer.name if path is None else path, wrapper=layer, layer=layer.layer,
            weight_bits=layer.weight_bits, activation_bits=layer.activation_bits,
            weight_method=None if layer.weight_bits is None else layer.weight_method,
            weights=tuple(layer.weight_quantizers), input=activation, intermediate=tuple(layer.intermediate_quantizers))

    def is_functional(self, model):
        return isinstance(model, keras.Model) and _graph_of(model) is not None

    def graph_nodes(self, model):
        return [_graph_node(node) for node in _own_nodes(model)]

    def tensor_id(self, tensor):
        return id(tensor)  # what Keras 3's SymbolicArguments.fill_in looks values up by

    def call_inference(self, layer, args, kwargs):
        if "training" in inspect.signature(layer.call).parameters:
            kwargs = dict(kwargs, training=False)
        return layer(*args, **kwargs)

    def call_with_kernels(self, quantized, inputs, kernels, quantize_between=None):
        return quantized.wrapper.call_with_kernels(inputs, kernels, quantize_between)

    def activation_input_tensors(self, model, wanted):
        found = []
        for node in _own_nodes(model):
            layer = node.operation
            if isinstance(layer, N2UQWrapper):
                if id(layer) in wanted:
                    found.append((layer, _node_input(node)))
            elif self.is_functional(layer):
                inner = self.activation_input_tensors(layer, wanted)
                if inner:
                    # A sub-extractor called on this node's arguments maps the nested model's
                    # tensors into the outer graph.
                    sub = keras.Model(layer.inputs, [t for _, t in inner])
                    outputs = tf.nest.flatten(sub(*node.arguments.args, **node.arguments.kwargs))
                    found.extend(zip([w for w, _ in inner], outputs))
        return found

    def sub_model(self, model, outputs):
        # One input as a tensor, not a list of one: Keras 3 warns when a call's structure differs.
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return keras.Model(inputs, outputs)


READER = model_reader.register_reader(Keras3Reader())
