"""One reader of quantized models: what the report, the plots, the export, the callbacks and the
model builders know of a model, whichever front end built it.

A front end (today the tf_keras + tfmot one, `n2uq_tf.quantize.reader`) implements `ModelReader`
for its models and registers it with `register_reader` when it is imported. Everything above the
front ends reads a quantized model through this module only, never through the front end's
classes or private Keras / tfmot attributes:

* which layers are quantized: `quantized_layers(model)` (nested models entered), one
  `QuantizedLayer` per quantized layer, named by its *path* (``backbone/block1_conv``: the names of
  the nested models holding it and its own, joined by `SEPARATOR`), as in the quantization plan,
  the report and the export;
* a layer's quantizers: `QuantizedLayer.weights` (`QuantizedWeight`), ``.input`` and
  ``.intermediate`` (`QuantizedActivation`);
* thresholds and levels in input units: `QuantizedActivation.levels` and `input_units`, the one
  place that says what a zero input scale means; `quantizer_state` for every layer at once;
* the functional graph: `ModelReader.graph_nodes` (`GraphNode`) and
  `ModelReader.activation_input_tensors`.

The quantizers themselves are the front end's objects; both front ends' quantizers keep one
protocol: an activation quantizer has ``bits``, ``method`` and ``uniform_levels(variables)``
(its inference output is ``step * #{i : x * input_scale > thresholds[i]}``, bit for bit in
float32); a weight quantizer has ``bits``, ``method``, ``integer_view(w, variables)`` and
``quantizer(w, training, weights=variables)``.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from n2uq_tf.quantization_math import n2uq as ops

SEPARATOR = "/"  # between the names in a layer's path

# Variables of an N2UQ activation quantizer (also the "uniform" one, thresholds frozen).
_N2UQ_VARIABLES = frozenset({"start", "intervals", "beta1", "beta2"})


def input_units(values, input_scale):
    """Values on an activation quantizer's comparison axis, in the units of its input.

    An activation quantizer compares ``input_scale * x`` with its thresholds T_i (N2UQ: input_scale
    is beta1), so a threshold (or an N2UQ segment bound) lies at T_i / input_scale on the input's
    axis. The zero-scale rule, the same for the report, the plots and the callbacks: with
    ``input_scale == 0`` every input gives the same output, no threshold falls anywhere on the
    input's axis, and the values are returned unchanged (the raw T_i), so that they stay finite
    and the stored parameters are still shown. A negative scale divides as any other (the
    comparison is then x < T_i / input_scale; the crossing points are the same).
    Returns a list of Python floats (float64 arithmetic on the float32 values).
    """
    scale = float(input_scale)
    values = np.asarray(values, np.float64).reshape(-1)
    return [float(v) for v in (values / scale if scale != 0 else values)]


class QuantizedWeight(NamedTuple):
    """One quantized weight of a layer."""
    attr: str            # the wrapped layer's attribute ("kernel", "depthwise_kernel", ...)
    variable: Any        # the float variable the optimizer trains
    quantizer: Any       # its weight quantizer (integer_view, __call__)
    variables: dict      # the quantizer's own variables ({} for N2UQ's weight quantizer)


class QuantizedActivation(NamedTuple):
    """One activation quantizer of a layer: on its input, or between two of its stages."""
    name: str            # "input", or the stage input it quantizes ("pointwise_input" of SeparableConv2D)
    quantizer: Any
    variables: dict      # {"start", "intervals", "beta1", "beta2"} for N2UQ; each method its own

    @property
    def bits(self):
        return self.quantizer.bits

    @property
    def method(self):
        return getattr(self.quantizer, "method", "n2uq")

    def levels(self):
        """The quantizer's inference function: (thresholds, step, input_scale), float32, exact."""
        return self.quantizer.uniform_levels(self.variables)

    def input_thresholds(self):
        """The thresholds T_i / input_scale in input units (`input_units`)."""
        levels = self.levels()
        return input_units(levels.thresholds, levels.input_scale)


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """A quantized layer of a model, as every reader above the front ends sees it."""
    path: str                     # "backbone/block1_conv"; a top-level layer's path is its name
    wrapper: Any                  # the layer in the model (N2UQWrapper): its name, weights, graph calls
    layer: Any                    # the wrapped float layer: its type, configuration and other weights
    weight_bits: Optional[int]    # None: weights stay float
    activation_bits: Optional[int]  # None: the input stays float
    weight_method: Optional[str]  # "n2uq", "dorefa", ... (None when the weights stay float)
    weights: Tuple[QuantizedWeight, ...] = ()
    input: Optional[QuantizedActivation] = None
    intermediate: Tuple[QuantizedActivation, ...] = ()


class WalkedLayer(NamedTuple):
    """One layer met by `ModelReader.walk`."""
    path: str           # "backbone/block1_conv"; a top-level layer's path is its name
    layer: Any          # the front end's layer (its quantize wrapper for a quantized layer)
    owners: tuple = ()  # paths of the nested models holding the layer, outermost first


def walk_layers(model, is_nested_model, layer_name, *, models=False):
    """The walk of both front ends' `nested.walk`: a `WalkedLayer` for every layer of `model`,
    nested models entered, in layer order.

    ``is_nested_model(layer)`` says which layers are models to enter, ``layer_name(layer)`` the
    name a layer has in paths (a quantize wrapper's: the wrapped layer's). A nested model is
    replaced by its layers (and, with ``models=True``, also yielded itself, before them). A layer
    object met twice (shared between models) is yielded once.
    """
    seen = set()

    def visit(container, prefix, owners):
        for layer in container.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = prefix + layer_name(layer)
            if is_nested_model(layer):
                if models:
                    yield WalkedLayer(path, layer, owners)
                yield from visit(layer, path + SEPARATOR, owners + (path,))
            else:
                yield WalkedLayer(path, layer, owners)

    yield from visit(model, "", ())


def clone_layers(model, clone_leaf, *, is_nested_model, layer_name, clone_model, unfreeze=False):
    """The clone of both front ends' `nested.clone`: ``clone_model`` (the front end's
    ``keras.models.clone_model``) at every depth, keeping the user's structure and the paths of
    `walk_layers`.

    ``clone_leaf(layer, path)`` gives the clone of each layer that is not a nested model; every
    nested model is cloned the same way, under its own name, and stays frozen if it was
    (``trainable=False``) unless ``unfreeze``.
    """

    def clone_level(container, prefix):
        def clone_function(layer):
            path = prefix + layer_name(layer)
            if is_nested_model(layer):
                return clone_level(layer, path + SEPARATOR)
            return clone_leaf(layer, path)

        cloned = clone_model(container, clone_function=clone_function)
        if not container.trainable and not unfreeze:
            cloned.trainable = False
        return cloned

    return clone_level(model, "")


class GraphNode(NamedTuple):
    """One call of a layer in a functional model's own graph (`ModelReader.graph_nodes`)."""
    layer: Any
    is_input: bool      # a graph input (no call to compute)
    inputs: list        # the symbolic tensors of its first argument, flattened
    input_ids: tuple    # ids (`ModelReader.tensor_id`) of every tensor it takes
    output_ids: tuple   # ids of the tensors it gives, flattened
    # arguments({tensor id: value}) -> (args, kwargs): the call's arguments with these values in
    # place of the symbolic tensors (a value may be used by several nodes).
    arguments: Callable


class ModelReader:
    """What a front end tells about its models; every method has the front end's meaning.

    A front end subclasses this, fills every method and calls `register_reader` on import.
    """

    model_type = "model"  # what `owns` accepts, for error messages ("tf_keras.Model")

    def owns(self, model):
        """True for a model of this front end."""
        raise NotImplementedError

    def walk(self, model):
        """A `WalkedLayer` for every layer of `model`, nested models entered, in layer order."""
        raise NotImplementedError

    def quantized(self, layer, path=None):
        """The `QuantizedLayer` of a layer, or None when it is not quantized (path: the layer's name)."""
        raise NotImplementedError

    def unsupported_reason(self, layer):
        """Why a float layer cannot be quantized, or None."""
        raise NotImplementedError

    def is_quantizable(self, layer):
        """True for a float layer this front end could quantize (kept float by the plan)."""
        raise NotImplementedError

    def float_parameter_count(self, layer):
        """Values in the layer's distinct floating-point variables (a wrapper's: quantizers' too)."""
        raise NotImplementedError

    def is_functional(self, model):
        """True for a model with a graph of layers (Functional; Sequential with an input)."""
        raise NotImplementedError

    def graph_nodes(self, model):
        """The model's own `GraphNode`s, inputs first, every node after the nodes it takes from."""
        raise NotImplementedError

    def tensor_id(self, tensor):
        """The id of a symbolic tensor (model.inputs / outputs), as in `GraphNode.input_ids`."""
        raise NotImplementedError

    def call_inference(self, layer, args, kwargs):
        """``layer(*args, **kwargs)`` in inference mode (``training=False`` where the call takes it)."""
        raise NotImplementedError

    def call_with_kernels(self, quantized, inputs, kernels, quantize_between=None):
        """The wrapped layer's inference call with ``kernels`` ({attr: tensor}) as its weights.

        For a layer with an intermediate quantizer, ``quantize_between(x)`` runs between its stages.
        """
        raise NotImplementedError

    def activation_input_tensors(self, model, wanted):
        """[(wrapper, symbolic tensor)]: the input of every quantize wrapper whose id is in
        ``wanted``, as a tensor of ``model``'s own graph (nested models entered)."""
        raise NotImplementedError

    def sub_model(self, model, outputs):
        """A model from ``model``'s inputs to ``outputs`` (its symbolic tensors), called as
        ``sub_model(x, training=False)``."""
        raise NotImplementedError

    # The entry points `n2uq_tf.quantize_model` and `n2uq_tf.load_model` hand over to a front end
    # other than tf_keras (the Keras 3 one): its models, and the files it saved.

    def quantize_model(self, model, **arguments):
        """`n2uq_tf.quantize_model(model, **arguments)` for a float model of this front end."""
        raise NotImplementedError

    def owns_file(self, path):
        """True for a saved model file this front end wrote (and `load_model` reads)."""
        return False

    def load_model(self, path, custom_objects=None, compile=True, require_quantized=True):
        """`n2uq_tf.load_model` for a file this front end owns (`owns_file`)."""
        raise NotImplementedError


class LayerTableReader(ModelReader):
    """The `ModelReader` methods both front ends share: which float layers can be quantized is
    said by a layer table, ``layer_table`` (a module with ``lookup(layer)``, None for a layer it
    has no entry for, and ``unsupported_reason(layer)``: `n2uq_tf.quantize.registry` for both).
    """

    layer_table = None

    def unsupported_reason(self, layer):
        return self.layer_table.unsupported_reason(layer)

    def is_quantizable(self, layer):
        return self.layer_table.lookup(layer) is not None

    def float_parameter_count(self, layer):
        seen, count = set(), 0
        for v in layer.weights:
            if id(v) not in seen and tf.as_dtype(v.dtype).is_floating:
                seen.add(id(v))
                count += int(np.prod(v.shape))
        return count


_READERS = []


def register_reader(reader):
    """Adds a front end's `ModelReader`; returns it."""
    _READERS.append(reader)
    return reader


def _find_reader(model):
    return next((reader for reader in _READERS if reader.owns(model)), None)


def find_reader(model):
    """The `ModelReader` of the front end that built ``model``, or None."""
    return _find_reader(model)


def readers():
    """Every registered `ModelReader`, in registration order."""
    return tuple(_READERS)


def reader_for(model):
    """The `ModelReader` of the front end that built ``model``."""
    reader = _find_reader(model)
    if reader is None:
        kinds = " or ".join(r.model_type for r in _READERS) or "model"
        raise TypeError(f"expected a {kinds}, got {type(model).__name__}")
    return reader


def inspected_model(model):
    """The model whose quantizers are read: a distillation wrapper's ``student``, else ``model``."""
    student = getattr(model, "student", None)
    if student is not None and _find_reader(student) is not None:
        return student
    reader_for(model)  # a clear error for what no front end reads
    return model


def quantized_layers(model):
    """[`QuantizedLayer`] of every quantized layer, in layer order, nested models entered.

    A model with a ``student`` (a distillation wrapper) is read through its student.
    """
    model = inspected_model(model)
    reader = reader_for(model)
    found = (reader.quantized(walked.layer, walked.path) for walked in reader.walk(model))
    return [q for q in found if q is not None]


def _scalar(variable):
    return float(np.asarray(variable.numpy()))


def activation_state(activation):
    """The numbers of one `QuantizedActivation`, as `quantizer_state` gives them."""
    variables = activation.variables
    levels = activation.levels()
    state = {"bits": activation.bits, "method": activation.method,
             "thresholds": input_units(levels.thresholds, levels.input_scale),
             "step": float(levels.step), "bounds": []}
    if _N2UQ_VARIABLES <= set(variables):
        start = _scalar(variables["start"])
        intervals = np.asarray(variables["intervals"].numpy(), np.float64)
        _, bounds, _ = ops.segment_bounds(start, intervals.astype(np.float32))
        state.update(bounds=input_units(bounds.numpy(), levels.input_scale), start=start,
                     intervals=[float(a) for a in intervals], beta1=_scalar(variables["beta1"]),
                     beta2=_scalar(variables["beta2"]))
    else:
        state["parameters"] = {name: _scalar(v) for name, v in variables.items()
                               if len(v.shape) == 0 and tf.as_dtype(v.dtype).is_floating
                               and not name.endswith("initialized")}
    return state


def quantizer_state(model: Any) -> dict[str, dict[str, Any]]:
    """{layer path: {"bits", "method", "thresholds", "step", "bounds", ...}}, one entry per layer
    whose input is quantized.

    ``thresholds`` (T_i / beta1 for N2UQ) and ``bounds`` (N2UQ's segment bounds d_i / beta1; empty
    for other methods) are in input units (`input_units`), ``step`` is the output step. N2UQ
    quantizers also give ``start`` and ``intervals`` (the stored, unfloored variables), ``beta1``
    and ``beta2``; other methods give ``parameters``, their scalar variables (PACT's alpha, LSQ's
    step, ...). A model with a ``student`` (distillation) is read through its student.
    """
    return {q.path: activation_state(q.input) for q in quantized_layers(model) if q.input is not None}
