"""QuantizeWrapperV2 subclass that also quantizes the wrapped layer's input.

tfmot places activation quantizers on layer outputs only. N2UQ quantizes each
conv's input while the residual shortcut keeps the raw (float) block input, so
the quantizer must sit on the consuming layer's input, inside its wrapper.
A layer that the registry splits into two convolutions (SeparableConv2D) also gets
a quantizer between them, applied here through the registry's split forward.
"""

import tensorflow as tf

from n2uq_tf._keras import keras, register, tfmot
from n2uq_tf.model_reader import QuantizedActivation, QuantizedWeight
from n2uq_tf.quantize import registry

_QuantizeWrapperV2 = tfmot.quantization.keras.QuantizeWrapperV2


@register
class N2UQWrapper(_QuantizeWrapperV2):
    """Quantizes the weights (per the config) and the input of one layer."""

    def build(self, input_shape):
        # A variable's name comes from the name scope open when it is created: a functional call
        # opens the wrapper's, a `.keras` load (build_from_config) none, so the same quantizer
        # variable was 'quant_conv/input_n2uq_start' or a bare 'input_n2uq_start', and the optimizer
        # slots of every layer collided (a `.h5` save then failed half-written). Absolute scopes
        # ("name/") give the same layer-scoped names on every path.
        with tf.name_scope(self.name + "/"):
            # Build the inner layer first: QuantizeWrapperV2.build snapshots its trainable weights,
            # and an unbuilt layer (as when loading) would give another variable order than the
            # trained model, so optimizer state would be restored onto the wrong variables.
            if not self.layer.built:
                with tf.name_scope(self.layer.name + "/"):
                    self.layer.build(input_shape)
            super().build(input_shape)
            quantizers = self.quantize_config.get_input_quantizers(self.layer)
            if len(quantizers) > 1:
                raise ValueError(f"layer {self.layer.name!r}: N2UQWrapper quantizes a single input, "
                                 f"the config gave {len(quantizers)} input quantizers")
            self._input_quantizers = [(q, q.build(input_shape, "input", self)) for q in quantizers]
            get_intermediate = getattr(self.quantize_config, "get_intermediate_quantizers", None)
            intermediate = get_intermediate(self.layer) if get_intermediate is not None else []
            # The quantizers take no shape from their input (scalar thresholds and scales).
            self._intermediate_quantizers = [(name, q, q.build(None, name, self)) for name, q in intermediate]

    @property
    def input_quantizer(self):
        """(quantizer, variables dict) of the input, or None when the input stays float."""
        return self._input_quantizers[0] if self._input_quantizers else None

    @property
    def intermediate_quantizers(self):
        """[`QuantizedActivation` (name, quantizer, variables dict)] between the layer's stages
        (SeparableConv2D's "pointwise_input"); empty for other layers."""
        return [QuantizedActivation(*entry) for entry in self._intermediate_quantizers]

    @property
    def weight_quantizers(self):
        """[`QuantizedWeight` (attr, float variable, quantizer, quantizer variables dict)], one per
        quantized weight in ``quantize_config.weight_attrs`` order; empty when the weights stay float
        (and before the wrapper is built).

        The variable is what trains: tfmot replaces the wrapped layer's attribute (``layer.kernel``)
        by the quantized tensor while the wrapper is called.
        """
        built = getattr(self, "_weight_vars", [])  # set by tfmot's build
        return [QuantizedWeight(attr, variable, quantizer, variables)
                for attr, (variable, quantizer, variables) in zip(self.quantize_config.weight_attrs, built)]

    # A NaN or Inf weight would reach the quantizers' level tables as an out-of-range index (a
    # cryptic GatherV2 error) or silently zero a channel, so every call first checks the wrapper's
    # float variables and names the layer. It reads each weight once per step; the cost is measured
    # by `benchmarks/train_step.py --finite-check-cost`. Set False (on the class or one wrapper,
    # before the model is traced) to leave it out.
    check_finite = True

    def call(self, inputs, training=None, **kwargs):
        with tf.control_dependencies(self._finite_checks() if self.check_finite else []):
            if self._input_quantizers:
                if isinstance(inputs, (list, tuple)):
                    raise ValueError(f"layer {self.layer.name!r}: N2UQWrapper expects one input tensor, "
                                     f"got {len(inputs)}")
                quantizer, variables = self._input_quantizers[0]
                inputs = quantizer(inputs, training, weights=variables)
            if self._intermediate_quantizers:
                return self._split_call(inputs, training)
            return super().call(inputs, training=training, **kwargs)

    def _finite_checks(self):
        checks, seen = [], set()
        for variable in self.trainable_weights + self.non_trainable_weights:
            if id(variable) in seen or not variable.dtype.is_floating:
                continue
            seen.add(id(variable))
            name = variable.name.split(":")[0]
            checks.append(tf.debugging.check_numerics(
                variable, f"layer {self.layer.name!r} has non-finite weights: NaN or Inf in {name}"))
        return checks

    def _split_call(self, inputs, training):
        """The base wrapper's weight quantization, then the registry's split forward of the layer.

        The base call would run the layer's own `call` (SeparableConv2D: both convolutions in one op),
        leaving no place for the quantizer between them.
        """
        if training is None:
            training = keras.backend.learning_phase()
        kernels = {attr: _by_training(training, lambda flag, w=w, q=q, v=v: q(w, flag, weights=v))
                   for attr, w, q, v in self.weight_quantizers}
        [(_, quantizer, variables)] = self._intermediate_quantizers
        return registry.split_of(self.layer).call(
            self.layer, inputs, kernels, lambda x: quantizer(x, training, weights=variables))

    # tfmot's wrapper lists the quantized kernels among its trainable weights even when the
    # wrapped layer is frozen, so a frozen layer (e.g. of a transfer-learning backbone) would
    # train. Frozen means nothing trains, as for any Keras layer: kernels and quantizer variables
    # move to the non-trainable weights (same order, so h5 files read the same).
    @property
    def trainable_weights(self):
        return super().trainable_weights if self.trainable else []

    @property
    def non_trainable_weights(self):
        if self.trainable:
            return super().non_trainable_weights
        return self._dedup_weights(super().trainable_weights + super().non_trainable_weights)

    # The base wrapper lists the wrapped layer's weights among its own, so the `.keras`
    # format would store them twice and count them differently on load (tfmot's
    # "expected 2 variables, but received 3"). Store only the variables this wrapper
    # created (quantizer parameters, optimizer_step); the inner layer stores its own.
    def _own_variables(self):
        inner = {id(v) for v in self.layer.weights}
        seen, own = set(), []
        for v in self._trainable_weights + self._non_trainable_weights:
            if id(v) not in inner and id(v) not in seen:
                seen.add(id(v))
                own.append(v)
        return own

    def save_own_variables(self, store):
        for i, v in enumerate(self._own_variables()):
            store[f"{i}"] = v.numpy()

    def load_own_variables(self, store):
        own = self._own_variables()
        if len(store.keys()) != len(own):
            raise ValueError(f"layer {self.name!r}: the file holds {len(store.keys())} quantizer variables, "
                             f"this model expects {len(own)} ({[v.name for v in own]})")
        for i, v in enumerate(own):
            value = store[f"{i}"]
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"layer {self.name!r}: variable {v.name} has shape {tuple(v.shape)} "
                                 f"but the file holds {tuple(value.shape)}")
            v.assign(tf.convert_to_tensor(value, v.dtype))


def _by_training(training, fn):
    """fn(True) or fn(False) as `training` says (a Python bool or a boolean tensor)."""
    if isinstance(training, (bool, int)):
        return fn(bool(training))
    return tf.cond(tf.cast(training, tf.bool), lambda: fn(True), lambda: fn(False))
