"""Keras 3 quantizers of the literature methods (DoReFa, PACT, LSQ, DAQ, the Table 4 weight variants).

Each one holds the tf_keras front end's quantizer of the same method
(`n2uq_tf.quantize.baseline_quantizers`, chosen through `n2uq_tf.quantize.method_table.METHODS`)
and runs it on Keras 3 variables: that class creates the variables (same names, shapes and initial
values) and calls the math in `n2uq_tf.quantization_math.baselines`, so the two front ends compute
the same numbers by running the same code. What differs is only how a variable is made:
`_Keras3Variables` turns the tf_keras class's ``add_weight`` into Keras 3's (``experimental_autocast``
is Keras 3's ``autocast``), and calls get the Keras 3 variables' TensorFlow variables (``.value``).
"""

import keras

from n2uq_tf.quantize import method_table


class _Keras3Variables:
    """The ``layer`` a tf_keras quantizer's ``build`` adds its variables to, for a Keras 3 layer."""

    def __init__(self, layer):
        self._layer = layer

    def add_weight(self, name, shape, dtype, initializer, trainable=True, experimental_autocast=True):
        # The tf_keras classes initialise with Constant(value); its config is public in both Keras.
        value = initializer.get_config()["value"]
        return self._layer.add_weight(name=name, shape=shape, dtype=dtype, trainable=trainable,
                                      initializer=keras.initializers.Constant(value), autocast=experimental_autocast)

    def add_loss(self, loss):
        raise ValueError(f"layer {self._layer.name!r}: the Keras 3 front end has no quantizer losses yet (PACT's "
                         "alpha_l2 regularisation is tf_keras only)")


def _tensorflow_variables(variables):
    """{name: tf.Variable} of a quantizer's Keras 3 variables (what the tf_keras classes compute with)."""
    return {name: v.value if isinstance(v, keras.Variable) else v for name, v in variables.items()}


class _LiteratureQuantizer:
    """A literature method's tf_keras quantizer (``self.tf_keras_quantizer``) on Keras 3 variables."""

    side = None  # "activation" or "weight": the column of METHODS

    def __init__(self, method, bits=2, **arguments):
        activation_class, weight_class = method_table.METHODS[method]
        quantizer_class = activation_class if self.side == "activation" else weight_class
        if quantizer_class is None or quantizer_class.method != method:
            raise ValueError(f"{method!r} is not a Keras 3 {self.side} method")
        self.tf_keras_quantizer = quantizer_class(bits, **arguments)

    @property
    def method(self):
        return self.tf_keras_quantizer.method

    @property
    def bits(self):
        return self.tf_keras_quantizer.bits

    def build(self, layer, name, tensor_shape=None):
        """Adds the quantizer's variables to the Keras 3 ``layer`` (named ``<name>_<suffix>``); returns them."""
        return self.tf_keras_quantizer.build(tensor_shape, name, _Keras3Variables(layer))

    def __call__(self, inputs, training, weights):
        # Keras 3 leaves training None outside fit(); the tf_keras classes would ask tf_keras' learning phase.
        return self.tf_keras_quantizer(inputs, False if training is None else training,
                                       _tensorflow_variables(weights))

    def get_config(self):
        config = self.tf_keras_quantizer.get_config()
        config.pop("format_version", None)
        return dict(config, method=self.method)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="n2uq_tf")
class LiteratureActivationQuantizer(_LiteratureQuantizer):
    """Activation side: ``uniform_levels(variables)`` for the reader and the exporter."""

    side = "activation"

    def uniform_levels(self, variables):
        return self.tf_keras_quantizer.uniform_levels(_tensorflow_variables(variables))


@keras.saving.register_keras_serializable(package="n2uq_tf")
class LiteratureWeightQuantizer(_LiteratureQuantizer):
    """Weight side: ``channel_axis`` and ``integer_view(w, variables)`` for the reader and the exporter."""

    side = "weight"

    def __init__(self, method, bits=2, channel_axis=-1, **arguments):
        super().__init__(method, bits, channel_axis=channel_axis, **arguments)

    @property
    def channel_axis(self):
        return self.tf_keras_quantizer.channel_axis

    def integer_view(self, w, variables=None):
        return self.tf_keras_quantizer.integer_view(w, _tensorflow_variables(variables or {}))


# The literature methods of METHODS, each side: every name whose class there is that side's own
# (PACT's weights are DoReFa's: "pact" is an activation method only, as in METHODS).
ACTIVATION_METHODS = tuple(name for name, (a, _) in method_table.METHODS.items()
                           if a is not None and name not in ("n2uq", "uniform"))
WEIGHT_METHODS = tuple(name for name in method_table.WEIGHT_METHODS if name != "n2uq")
