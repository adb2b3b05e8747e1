"""Building blocks shared by the reference networks, the paper's quantization plan, and
weight transfer from a float network into its quantized twin.

Layer names follow one convention so that the quantization plan is a table lookup:
``stem_conv`` and ``fc`` stay float, downsample convs end in ``downsample_conv``.
"""

import math
import os

from n2uq_tf import layers as n2uq_layers
from n2uq_tf import model_reader
from n2uq_tf._keras_kind import require_tf_keras
from n2uq_tf._keras import keras
from n2uq_tf.quantize import quantize_model, quantize_scope

FLOAT_LAYERS = ("stem_conv", "fc")  # the paper keeps the first conv and the classifier float
DOWNSAMPLE_SUFFIX = "downsample_conv"  # float in the N2UQ* variant

# PyTorch defaults (BatchNorm2d momentum 0.1 is Keras momentum 0.9) and the official init.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_initializer():
    """kaiming_normal_(mode='fan_out', nonlinearity='relu'), as the official ResNet."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def batch_norm(name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def conv(filters, kernel_size, strides, name):
    """A bias-free conv with PyTorch padding ``kernel_size // 2`` (none for 1x1)."""
    if kernel_size == 1:
        # No padding, so Keras 'valid' is exactly PyTorch at any stride.
        return keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                   kernel_initializer=conv_initializer(), name=name)
    # Explicit symmetric padding for every padded conv, at stride 1 too (where 'same' would agree),
    # so a model has one kind of 3x3 conv and the padding is always after the input quantizer.
    return n2uq_layers.PaddedConv2D(filters, kernel_size, strides=strides, use_bias=False,
                                    kernel_initializer=conv_initializer(), name=name)


def depthwise_conv(kernel_size, strides, name):
    return n2uq_layers.PaddedDepthwiseConv2D(kernel_size, strides=strides, use_bias=False,
                                             depthwise_initializer=conv_initializer(), name=name)


def classifier(num_classes, in_features, name="fc"):
    """nn.Linear's default init: U(+-1/sqrt(fan_in)) for kernel and bias."""
    limit = 1.0 / math.sqrt(in_features)
    return keras.layers.Dense(num_classes, name=name,
                              kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
                              bias_initializer=keras.initializers.RandomUniform(-limit, limit))


def rprelu(name):
    return n2uq_layers.RPReLU(name=name)


def check_input_shape(input_shape, minimum, what):
    shape = tuple(input_shape)
    if len(shape) != 3 or any(d is not None and (not isinstance(d, int) or d <= 0) for d in shape):
        raise ValueError(f"{what}: input_shape must be (height, width, channels), got {input_shape!r}")
    if any(d is not None and d < minimum for d in shape[:2]):
        raise ValueError(f"{what}: input height and width must be at least {minimum}, got {input_shape!r}")
    return shape


def check_num_classes(num_classes, what):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{what}: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _is_quantized(model):
    reader = model_reader.reader_for(model)
    return any(reader.quantized(layer) is not None for layer in model.layers)


def quantize(float_model: keras.Model, bits: int | None = 2, *, weight_bits: int | None = None,
             activation_bits: int | None = None, quantize_downsample: bool = True, learn_thresholds: bool = True,
             method: str | None = None, weight_method: str | None = None,
             activation_method: str | None = None) -> keras.Model:
    """The paper's quantization plan for a float model built by `n2uq_tf.models`.

    ``stem_conv`` and ``fc`` stay float, the downsample convs stay float when
    ``quantize_downsample=False`` (the paper's N2UQ*), every other conv is quantized
    (input and weights). The float weights are copied into the returned twin.
    ``learn_thresholds=False`` freezes the activation thresholds (the uniform baseline).
    ``method``, ``weight_method`` and ``activation_method`` choose the quantizers, as in
    `n2uq_tf.quantize_model` (None: N2UQ; e.g. ``method="lsq"``, or ``weight_method="none",
    activation_method="uniform"`` for the paper's baseline).
    """
    require_tf_keras(float_model, "n2uq_tf.models.quantize", "model",
                     "use n2uq_tf.quantize_model(model, bits=...) for Keras 3 models (the first/last layers "
                     "stay float by default; skip_layers and overrides choose the rest)")
    if not isinstance(float_model, keras.Model):
        raise TypeError(f"quantize() takes a tf_keras model built by n2uq_tf.models, got "
                        f"{type(float_model).__name__}")
    if _is_quantized(float_model):
        raise ValueError(f"model {float_model.name!r} is already quantized; pass its float twin")
    names = {layer.name for layer in float_model.layers}
    missing = [name for name in FLOAT_LAYERS if name not in names]
    if missing:
        raise ValueError(f"model {float_model.name!r} has no layer named {missing[0]!r}, so it was not built by "
                         "n2uq_tf.models; use n2uq_tf.quantize_model for other models")
    skip = list(FLOAT_LAYERS)
    if not quantize_downsample:
        skip += [layer.name for layer in float_model.layers if layer.name.endswith(DOWNSAMPLE_SUFFIX)]
    return quantize_model(float_model, bits, weight_bits=weight_bits, activation_bits=activation_bits,
                          skip_layers=skip, learn_thresholds=learn_thresholds,
                          method="n2uq" if method is None else method, weight_method=weight_method,
                          activation_method=activation_method)


def finish(float_model, bits, weight_bits, activation_bits, quantize_downsample=True, learn_thresholds=True,
           method=None, weight_method=None, activation_method=None):
    """What every builder returns: the float model, or its quantized twin when bits are given."""
    if bits is None and weight_bits is None and activation_bits is None:
        if any(m is not None for m in (method, weight_method, activation_method)):
            raise ValueError("method / weight_method / activation_method choose the quantizers of a quantized "
                             "model: give bits (or weight_bits and activation_bits) too")
        return float_model
    if bits is None and (weight_bits is None or activation_bits is None):
        raise ValueError("give bits, or both weight_bits and activation_bits (bits=None alone builds the "
                         f"float model); got weight_bits={weight_bits!r}, activation_bits={activation_bits!r}")
    return quantize(float_model, bits, weight_bits=weight_bits, activation_bits=activation_bits,
                    quantize_downsample=quantize_downsample, learn_thresholds=learn_thresholds,
                    method=method, weight_method=weight_method, activation_method=activation_method)


def _inner(layer, reader):
    """The float layer of a quantized layer (the layer itself if it is not quantized)."""
    quantized = reader.quantized(layer)
    return layer if quantized is None else quantized.layer


def float_twin(quantized_model: keras.Model) -> keras.Model:
    """A float model with the quantized model's architecture and layer names (fresh weights)."""
    require_tf_keras(quantized_model, "n2uq_tf.models.float_twin", "model",
                     "for a Keras 3 model keep the float model you quantized (n2uq_tf.quantize_model leaves "
                     "it unchanged), or build the network in tf_keras")
    reader = model_reader.reader_for(quantized_model)

    def unwrap(layer):
        inner = _inner(layer, reader)
        return inner.__class__.from_config(inner.get_config())

    with quantize_scope():
        return keras.models.clone_model(quantized_model, clone_function=unwrap)


def _is_full_model_file(path):
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "saved_model.pb"))
    if path.endswith(".keras"):
        return True
    if path.endswith((".h5", ".hdf5")) and not path.endswith(".weights.h5"):
        import h5py
        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    return False


def _load_source(quantized_model, path):
    path = os.fspath(path)
    checkpoint_index = path + ".index"
    if not os.path.exists(path) and not os.path.exists(checkpoint_index):
        raise FileNotFoundError(f"no float model or weights at {path!r}")
    try:
        if _is_full_model_file(path):
            with quantize_scope():
                return keras.models.load_model(path, compile=False)
        # A weights-only file needs the architecture: rebuild the float twin and load into it.
        twin = float_twin(quantized_model)
        twin.load_weights(path)
        return twin
    except Exception as error:  # h5py, checkpoint and shape errors alike
        raise ValueError(f"could not load float weights for {quantized_model.name!r} from {path!r}: "
                         f"{type(error).__name__}: {error}") from error


def _short_name(variable):
    return variable.name.split("/")[-1].split(":")[0]


def layer_variables(layer, reader):
    """{short name ('kernel', 'gamma', ...): variable} of a layer's own weights.

    For a quantized layer these are the wrapped layer's weights, without the quantizer
    parameters. (Wrapping moves the kernel out of the inner layer's weight list: the
    wrapper replaces the attribute by the quantized tensor and keeps the variable.)
    """
    quantized = reader.quantized(layer)
    if quantized is not None:
        variables = [weight.variable for weight in quantized.weights] + list(quantized.layer.weights)
    else:
        variables = list(layer.weights)
    named = {}
    for variable in variables:
        named.setdefault(_short_name(variable), variable)
    return named


def load_float_weights(quantized_model: keras.Model, source: keras.Model | str | os.PathLike[str]) -> keras.Model:
    """Copies a float network's weights, layer by layer name, into its quantized twin.

    ``source`` is a float tf_keras model or a path to one (.h5, .keras, SavedModel) or to its
    weights (.h5, .weights.h5, TF checkpoint). Wrapped layers receive the weights of their
    inner layer; quantizer parameters keep their values. Nothing is assigned unless every
    layer matches: a layer missing on either side or a shape mismatch raises ValueError
    naming the layer. Returns ``quantized_model``.
    """
    require_tf_keras(quantized_model, "n2uq_tf.models.load_float_weights", "model",
                     "copy float weights into the Keras 3 model before n2uq_tf.quantize_model, which keeps them")
    if not isinstance(quantized_model, keras.Model):
        raise TypeError(f"quantized_model must be a tf_keras model, got {type(quantized_model).__name__}")
    source_model = source if isinstance(source, keras.Model) else _load_source(quantized_model, source)
    reader = model_reader.reader_for(quantized_model)
    sources = {_inner(layer, reader).name: layer_variables(layer, reader) for layer in source_model.layers}
    targets = {_inner(layer, reader).name: layer_variables(layer, reader) for layer in quantized_model.layers}

    assignments = []
    for name, target in targets.items():
        if not target:
            continue
        source_variables = sources.get(name)
        if source_variables is None:
            raise ValueError(f"layer {name!r} of {quantized_model.name!r} has no counterpart in the float "
                             f"model {source_model.name!r}")
        if set(source_variables) != set(target):
            raise ValueError(f"layer {name!r}: the float model has weights {sorted(source_variables)}, the "
                             f"quantized model {sorted(target)}")
        for weight_name, variable in target.items():
            value = source_variables[weight_name]
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(f"layer {name!r}: weight {weight_name!r} has shape {tuple(variable.shape)} "
                                 f"in the quantized model but {tuple(value.shape)} in the float model")
            assignments.append((variable, value.numpy()))
    extra = [name for name, variables in sources.items() if variables and not targets.get(name)]
    if extra:
        raise ValueError(f"the float model {source_model.name!r} has weighted layers the quantized model lacks: "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    keras.backend.batch_set_value(assignments)
    return quantized_model
