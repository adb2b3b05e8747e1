"""quantize_model, quantize_scope and load_model: the public entry points of quantization."""

import contextlib
import os
import warnings

from n2uq_tf import ops
from n2uq_tf._keras import keras, tfmot
from n2uq_tf.quantize import methods, registry
from n2uq_tf.quantize.config import N2UQQuantizeConfig
from n2uq_tf.quantize.quantizers import ActivationQuantizer, UniformActivationQuantizer, WeightQuantizer
from n2uq_tf.quantize.scheme import N2UQQuantizeScheme
from n2uq_tf.quantize.wrapper import N2UQWrapper

_KERAS2_HINT = (
    "n2uq_tf needs a tf_keras (Keras 2) model, because tensorflow-model-optimization does. "
    "Build the model with `import tf_keras as keras` (or set TF_USE_LEGACY_KERAS=1 before importing "
    "TensorFlow so that tf.keras is tf_keras), e.g. keras.applications.ResNet50(weights=None).")


def custom_objects():
    """Every class a saved quantized model may name, for Keras deserialization."""
    objects = {cls.__name__: cls for cls in
               (N2UQWrapper, N2UQQuantizeConfig, ActivationQuantizer, UniformActivationQuantizer, WeightQuantizer)}
    objects.update({cls.__name__: cls for pair in methods.METHODS.values() for cls in pair if cls is not None})
    # Layers defined by n2uq_tf.layers (RPReLU, ...) register themselves there.
    try:
        from n2uq_tf import layers as _layers
        objects.update(_layers.custom_objects())
    except ImportError:
        pass
    # The optimizer and schedule of the training recipe (named by class in .h5 files).
    from n2uq_tf import training as _training
    objects.update(_training.custom_objects())
    return objects


@contextlib.contextmanager
def quantize_scope(*extra_objects):
    """Scope for loading quantized models through tf_keras directly.

    ``with n2uq_tf.quantize_scope(): keras.models.load_model(path)``. Extra dicts of
    custom objects (your own layers) may be passed.
    """
    objects = custom_objects()
    for extra in extra_objects:
        objects.update(extra)
    with tfmot.quantization.keras.quantize_scope(objects):
        yield


def check_model(model, what="model"):
    """Raises TypeError/ValueError unless `model` is a built Functional or Sequential tf_keras model."""
    if isinstance(model, keras.Model):
        pass
    elif _is_keras3_model(model):
        raise TypeError(f"{what} is a Keras 3 model ({type(model).__module__}.{type(model).__name__}). "
                        + _KERAS2_HINT)
    else:
        raise TypeError(f"{what} must be a tf_keras.Model, got {type(model).__name__}. " + _KERAS2_HINT)
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"{what} {model.name!r} is a subclassed model ({type(model).__name__}); it cannot be cloned "
            "layer by layer. Build it with the Functional or Sequential API, or quantize its layers by "
            "hand: wrap each with N2UQWrapper(layer, N2UQQuantizeConfig(...)).")
    if not model.built:
        raise ValueError(f"{what} {model.name!r} is not built; call model.build(input_shape) first")


def _is_keras3_model(obj):
    for cls in type(obj).__mro__:
        if cls.__name__ == "Model" and cls.__module__.startswith("keras"):
            return not cls.__module__.startswith("tf_keras")
    return False


_METHOD_KEYS = ("method", "weight_method", "activation_method")


def _normalize_bits(value, default_w, default_a, where):
    """Override value -> (weight_bits, activation_bits); None means skip the layer."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"weight_bits", "activation_bits", *_METHOD_KEYS}
        if unknown:
            raise ValueError(f"overrides[{where!r}]: unknown keys {sorted(unknown)}; "
                             "use weight_bits, activation_bits, method, weight_method and activation_method")
        w = value.get("weight_bits", default_w)
        a = value.get("activation_bits", default_a)
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"overrides[{where!r}]: give (weight_bits, activation_bits), got {value!r}")
        w, a = value
    else:
        w = a = value
    w = None if w is None else ops.check_bits(w, f"overrides[{where!r}] weight bits")
    a = None if a is None else ops.check_bits(a, f"overrides[{where!r}] activation bits")
    if w is None and a is None:
        return None
    return w, a


def _override_for(layer, overrides, default_w, default_a):
    """Looks a layer up in overrides by name, then class, then class name. Returns (found, value)."""
    for key in (layer.name, type(layer), type(layer).__name__):
        if key in overrides:
            return True, _normalize_bits(overrides[key], default_w, default_a, key)
    return False, None


def _override_methods(layer, overrides, default_methods):
    """(weight_method, activation_method) of a layer: the defaults, or what its override dict names.

    An override's ``method`` sets both sides (as quantize_model's), weight_method /
    activation_method one side; sides it does not name keep the defaults.
    """
    for key in (layer.name, type(layer), type(layer).__name__):
        if key in overrides:
            value = overrides[key]
            if not isinstance(value, dict) or not any(k in value for k in _METHOD_KEYS):
                break
            if value.get("method") is not None:
                return methods.resolve_methods(value["method"], value.get("weight_method"),
                                               value.get("activation_method"))
            return methods.resolve_methods("n2uq", value.get("weight_method") or default_methods[0],
                                           value.get("activation_method") or default_methods[1])
    return default_methods


def plan_quantization(model, bits=2, *, weight_bits=None, activation_bits=None,
                      skip_layers="first_last", overrides=None, method="n2uq", weight_method=None,
                      activation_method=None, learn_thresholds=True):
    """Decides, per layer, what `quantize_model` will do.

    Returns a list of dicts (in model.layers order) with keys name, type, action
    ("quantize", "skip" or "unsupported"), weight_bits, activation_bits, weight_method,
    activation_method and reason.
    """
    default_methods = methods.resolve_methods(method, weight_method, activation_method, learn_thresholds)
    default_w = ops.check_bits(bits if weight_bits is None else weight_bits, "weight_bits")
    default_a = ops.check_bits(bits if activation_bits is None else activation_bits, "activation_bits")
    overrides = dict(overrides or {})
    names = {layer.name for layer in model.layers}
    for key in overrides:
        if isinstance(key, str) and key not in names and not any(type(l).__name__ == key for l in model.layers):
            raise ValueError(f"overrides names {key!r}, which is neither a layer name nor a layer type "
                             f"in model {model.name!r}")

    supported = [layer for layer in model.layers if registry.lookup(layer) is not None]
    if skip_layers == "first_last":
        skipped = {}
        if supported:
            skipped[supported[0].name] = "first quantizable layer kept float (skip_layers='first_last')"
            skipped.setdefault(supported[-1].name, "last quantizable layer kept float (skip_layers='first_last')")
    elif skip_layers is None:
        skipped = {}
    elif isinstance(skip_layers, (list, tuple, set)):
        skipped = {}
        for item in skip_layers:
            matches = [l for l in model.layers
                       if item in (l.name, type(l), type(l).__name__)]
            if not matches:
                raise ValueError(f"skip_layers names {item!r}, which is not a layer name or type in "
                                 f"model {model.name!r}")
            for l in matches:
                skipped[l.name] = f"kept float (skip_layers includes {item!r})"
    else:
        raise ValueError(f"skip_layers must be 'first_last', None or a list of layer names/types, "
                         f"got {skip_layers!r}")

    plan = []
    for layer in model.layers:
        entry = {"name": layer.name, "type": type(layer).__name__, "action": None,
                 "weight_bits": None, "activation_bits": None, "weight_method": None,
                 "activation_method": None, "reason": ""}
        rule = registry.lookup(layer)
        found, value = _override_for(layer, overrides, default_w, default_a)
        if rule is None:
            reason = registry.unsupported_reason(layer)
            if reason is not None:
                entry.update(action="unsupported", reason=reason)
            elif found and value is not None:
                raise ValueError(f"overrides asks to quantize layer {layer.name!r} ({type(layer).__name__}), "
                                 "which has no kernel to quantize")
            else:
                entry.update(action="float")
        elif found:
            if value is None:
                entry.update(action="skip", reason="kept float (overrides)")
            else:
                entry.update(action="quantize", weight_bits=value[0], activation_bits=value[1])
        elif layer.name in skipped:
            entry.update(action="skip", reason=skipped[layer.name])
        else:
            entry.update(action="quantize", weight_bits=default_w, activation_bits=default_a)
        if entry["action"] == "quantize":
            w_method, a_method = _override_methods(layer, overrides, default_methods)
            entry.update(weight_method=w_method if entry["weight_bits"] is not None else None,
                         activation_method=a_method if entry["activation_bits"] is not None else None)
        plan.append(entry)
    return plan


def config_for(layer, weight_bits, activation_bits, learn_thresholds=True, weight_method="n2uq",
               activation_method="n2uq"):
    """The N2UQQuantizeConfig that the registry table gives a supported layer."""
    rule = registry.lookup(layer)
    if rule is None:
        raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) is not supported: "
                         f"{registry.unsupported_reason(layer) or 'no kernel to quantize'}")
    return N2UQQuantizeConfig(weight_bits, activation_bits, rule.weight_attrs, rule.channel_axis, learn_thresholds,
                              weight_method=weight_method or "n2uq", activation_method=activation_method or "n2uq")


def quantize_model(model, bits=2, *, method="n2uq", weight_method=None, activation_method=None,
                   weight_bits=None, activation_bits=None, skip_layers="first_last",
                   overrides=None, learn_thresholds=True):
    """Returns a new tf_keras model with N2UQ (or another method's) quantization, ready for compile/fit.

    Args:
      model: a built Functional or Sequential tf_keras model (float).
      bits: default bits of weights and activations (1..8).
      method: the quantizer of weights and activations: "n2uq" (default), "uniform" (N2UQ with
        thresholds frozen at uniform: the paper's STE baseline; N2UQ weights), "dorefa", "pact"
        (DoReFa weights, as in the PACT paper), "lsq", "daq"; for weights only, "none" (no weight
        scaling) and "learnable" (learned per-channel scale); see `n2uq_tf.quantize.methods.METHODS`.
        A method without an activation (weight) quantizer leaves that side to "n2uq".
      weight_method, activation_method: override ``method`` for weights / activations (for
        ablations such as uniform activations with entropy-preserving weights).
      weight_bits, activation_bits: defaults for each, overriding ``bits``.
      skip_layers: "first_last" (default, as in the paper: the first and the last
        quantizable layers stay float), None (quantize every supported layer) or a
        list of layer names or types to keep float.
      overrides: per-layer bits for mixed precision, keyed by layer name, layer class or
        class name; values are an int, a (weight_bits, activation_bits) pair, a dict
        with those keys (None keeps that part float) and optionally method / weight_method /
        activation_method, or None to keep the layer float.
      learn_thresholds: False freezes the activation thresholds (uniform-quantization baseline):
        the same as ``activation_method="uniform"``.

    A model frozen as a whole (``model.trainable = False``, e.g. a `DistillationModel`'s teacher)
    is quantized into a trainable model, with a warning; layers frozen one by one in a trainable
    model stay frozen.

    Layers that cannot be quantized stay float; they are warned about and listed by
    `quantization_report`.
    """
    check_model(model)
    plan = plan_quantization(model, bits, weight_bits=weight_bits, activation_bits=activation_bits,
                             skip_layers=skip_layers, overrides=overrides, method=method,
                             weight_method=weight_method, activation_method=activation_method,
                             learn_thresholds=learn_thresholds)
    to_quantize = {p["name"]: p for p in plan if p["action"] == "quantize"}
    unsupported = [p for p in plan if p["action"] == "unsupported"]
    if unsupported:
        warnings.warn("n2uq_tf.quantize_model keeps these layers float: "
                      + "; ".join(f"{p['name']} ({p['type']}): {p['reason']}" for p in unsupported),
                      stacklevel=2)
    if not to_quantize:
        raise ValueError(f"model {model.name!r} has no layer to quantize (supported: "
                         f"{', '.join(c.__name__ for c in registry.SUPPORTED)}); plan: "
                         + ", ".join(f"{p['name']}={p['action']}" for p in plan if p['action'] != 'float'))

    # A frozen model (model.trainable = False, as DistillationModel leaves its teacher) gives a
    # trainable student: cloned with trainable=False, every BatchNorm would run in inference mode
    # on the float model's moving statistics and only the quantizer parameters would train.
    frozen = not model.trainable
    if frozen:
        warnings.warn(f"model {model.name!r} is frozen (trainable=False, as DistillationModel sets on its "
                      "teacher); the quantized model is made trainable. Set trainable=False on the result "
                      "to freeze it.", stacklevel=2)

    def annotate(layer):
        p = to_quantize.get(layer.name)
        layer_config = layer.get_config()
        if frozen and "trainable" in layer_config:
            layer_config["trainable"] = True
        clone = layer.__class__.from_config(layer_config)
        if p is None:
            return clone
        config = config_for(layer, p["weight_bits"], p["activation_bits"],
                            weight_method=p["weight_method"], activation_method=p["activation_method"])
        return tfmot.quantization.keras.quantize_annotate_layer(clone, quantize_config=config)

    with quantize_scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        quantized = tfmot.quantization.keras.quantize_apply(annotated, N2UQQuantizeScheme())
    return quantized


def _describe_format(path):
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path!r} is a directory without saved_model.pb: not a SavedModel")
        return "SavedModel"
    ext = os.path.splitext(path)[1].lower()
    return {".h5": "HDF5", ".hdf5": "HDF5", ".keras": "Keras"}.get(ext, "unknown")


def load_model(path, custom_objects=None, compile=True, require_quantized=True):
    """Loads a quantized model saved as .keras, .h5 or a SavedModel directory.

    All quantizer state (thresholds, betas) is restored, so predictions are identical.
    Raises FileNotFoundError for a missing path and ValueError for a file that is not a
    model, is corrupt, or (unless ``require_quantized=False``, e.g. for a float teacher)
    holds no N2UQ-quantized layer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path!r}")
    fmt = _describe_format(path)
    try:
        with quantize_scope(custom_objects or {}):
            model = keras.models.load_model(path, compile=compile)
    except Exception as error:  # OSError, zipfile.BadZipFile, h5py and protobuf decode errors, ...
        raise ValueError(f"could not load a quantized model from {path!r} ({fmt} format): "
                         f"{type(error).__name__}: {error}") from error
    if require_quantized and not any(isinstance(layer, N2UQWrapper) for layer in _all_layers(model)):
        raise ValueError(f"{path!r} holds a model without N2UQ-quantized layers; load float models with "
                         "tf_keras.models.load_model")
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
