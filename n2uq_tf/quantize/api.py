"""quantize_model, quantize_scope and load_model: the public entry points of quantization."""

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from n2uq_tf import model_reader
from n2uq_tf._keras import custom_objects, keras, tfmot
from n2uq_tf.quantization_math import n2uq
from n2uq_tf.quantize import method_table, nested, registry, saving
from n2uq_tf.quantize.config import N2UQQuantizeConfig
from n2uq_tf.quantize.scheme import N2UQQuantizeScheme
from n2uq_tf.quantize.wrapper import N2UQWrapper

_KERAS2_HINT = (
    "n2uq_tf needs a tf_keras (Keras 2) model, because tensorflow-model-optimization does. "
    "Build the model with `import tf_keras as keras` (or set TF_USE_LEGACY_KERAS=1 before importing "
    "TensorFlow so that tf.keras is tf_keras), e.g. keras.applications.ResNet50(weights=None).")


@contextlib.contextmanager
def quantize_scope(*extra_objects: Mapping[str, Any]) -> Iterator[None]:
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
    """Raises TypeError/ValueError unless `model` is a built Functional or Sequential tf_keras model
    (or Keras 3 model, which the Keras 3 front end's reader checks where it is registered)."""
    if isinstance(model, keras.Model):
        pass
    elif _is_keras3_model(model) and hasattr(model_reader.find_reader(model), "check_model"):
        model_reader.find_reader(model).check_model(model, what)
        return
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


def check_finite_weights(model, what="model"):
    """Raises ValueError naming every layer of `model` whose weights hold NaN or Inf.

    Quantizing such a weight has no meaning (its scale is NaN and its codes are not levels), so
    quantize_model and export stop here rather than fail later inside a quantizer.
    """
    bad = []
    for walked in _nested_of(model).walk(model):  # inner layers of nested models by their path
        for variable in walked.layer.weights:
            values = np.asarray(variable.numpy())
            if not np.issubdtype(values.dtype, np.floating):
                continue
            finite = np.isfinite(values)
            if not finite.all():
                bad.append(f"{walked.path} ({variable.name}: {int(np.isnan(values).sum())} NaN and "
                           f"{int(np.isinf(values).sum())} Inf of {values.size} values)")
    if bad:
        raise ValueError(f"{what} {model.name!r} has non-finite weights (NaN or Inf) in layer "
                         + "; ".join(bad) + ". They come from a diverged training run or a broken file; "
                         "train again from the last good checkpoint (a lower learning rate, gradient clipping).")


def _nested_of(model):
    """The walk over nested models of `model`'s front end: `n2uq_tf.quantize.nested` for tf_keras, the
    module its reader names as ``nested`` for another front end (Keras 3)."""
    reader = model_reader.find_reader(model)
    return getattr(reader, "nested", nested)


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
    w = None if w is None else n2uq.check_bits(w, f"overrides[{where!r}] weight bits")
    a = None if a is None else n2uq.check_bits(a, f"overrides[{where!r}] activation bits")
    if w is None and a is None:
        return None
    return w, a


def _lookup_keys(walked):
    """The keys that name a layer in overrides, most specific first: its path, the paths of the
    nested models holding it (innermost first), its class, its class name."""
    layer = walked.layer
    return (walked.path, *reversed(walked.owners), type(layer), type(layer).__name__)


def _override_key(walked, overrides):
    """The overrides key that applies to a layer (see `_lookup_keys`), or None."""
    return next((key for key in _lookup_keys(walked) if key in overrides), None)


def _override_for(walked, overrides, default_w, default_a):
    """Looks a layer up in overrides (see `_lookup_keys`). Returns (found, value)."""
    key = _override_key(walked, overrides)
    if key is None:
        return False, None
    return True, _normalize_bits(overrides[key], default_w, default_a, key)


def _check_override_class(key, walked, model):
    """An overrides key given as a class must be the exact class of some layer of the model."""
    if any(type(w.layer) is key for w in walked):
        return
    types = sorted({type(w.layer).__name__ for w in walked})
    raise ValueError(f"overrides names the class {key.__module__}.{key.__qualname__}, which is neither a layer name "
                     f"nor a layer type in model {model.name!r} (a class matches layers of exactly that class; the "
                     f"model's layer types: {', '.join(types)})")


def _override_methods(walked, overrides, default_methods):
    """(weight_method, activation_method) of a layer: the defaults, or what its override dict names.

    An override's ``method`` sets both sides (as quantize_model's), weight_method /
    activation_method one side; sides it does not name keep the defaults.
    """
    for key in _lookup_keys(walked):
        if key in overrides:
            value = overrides[key]
            if not isinstance(value, dict) or not any(k in value for k in _METHOD_KEYS):
                break
            if value.get("method") is not None:
                return method_table.resolve_methods(value["method"], value.get("weight_method"),
                                                    value.get("activation_method"))
            return method_table.resolve_methods("n2uq", value.get("weight_method") or default_methods[0],
                                                value.get("activation_method") or default_methods[1])
    return default_methods


def plan_quantization(model, bits=2, *, weight_bits=None, activation_bits=None,
                      skip_layers="first_last", overrides=None, method="n2uq", weight_method=None,
                      activation_method=None, learn_thresholds=True):
    """Decides, per layer, what `quantize_model` will do.

    Nested models (a Sequential block or a `tf_keras.applications` backbone used as a layer) are
    looked into at any depth; every layer is named by its path (``backbone/block1_conv``, see
    `n2uq_tf.quantize.nested`). ``skip_layers="first_last"`` counts over these layers in order: the
    first quantizable layer (the one that sees the raw input) and the last one stay float.
    In ``overrides`` and a ``skip_layers`` list a layer is named by its path, its class or class
    name, or the path of a nested model holding it (which names every layer inside). For
    overrides the most specific key wins: the layer's path, then the nested models holding it
    (innermost first), then its class, then its class name.

    Returns a list of dicts (in layer order, nested models replaced by their layers) with keys
    name (the layer's path), type, action ("quantize", "skip", "unsupported" or "float"),
    weight_bits, activation_bits, weight_method, activation_method, reason, first (True for
    the first quantizable layer) and override (the overrides key that decided its bits, or None).
    """
    default_methods = method_table.resolve_methods(method, weight_method, activation_method, learn_thresholds)
    default_w = n2uq.check_bits(bits if weight_bits is None else weight_bits, "weight_bits")
    default_a = n2uq.check_bits(bits if activation_bits is None else activation_bits, "activation_bits")
    overrides = dict(overrides or {})
    walker = _nested_of(model)  # plans a float model of either front end
    walked = list(walker.walk(model))
    model_paths = {w.path for w in walker.walk(model, models=True) if walker.is_nested_model(w.layer)}
    for key in overrides:
        if isinstance(key, str):
            _check_layer_key(key, walked, model_paths, model, "overrides", walker)
        elif isinstance(key, type):
            _check_override_class(key, walked, model)
        else:
            raise TypeError(f"overrides keys are layer names, layer classes or class names; got "
                            f"{key!r} ({type(key).__name__})")

    supported = [w for w in walked if registry.lookup(w.layer) is not None]
    if skip_layers == "first_last":
        skipped = {}
        if supported:
            skipped[supported[0].path] = "first quantizable layer kept float (skip_layers='first_last')"
            skipped.setdefault(supported[-1].path, "last quantizable layer kept float (skip_layers='first_last')")
    elif skip_layers is None:
        skipped = {}
    elif isinstance(skip_layers, (list, tuple, set)):
        skipped = {}
        for item in skip_layers:
            if isinstance(item, str):
                _check_layer_key(item, walked, model_paths, model, "skip_layers", walker)
            matches = [w for w in walked if item in _lookup_keys(w)]
            if not matches:
                raise ValueError(f"skip_layers names {item!r}, which is not a layer name or type in "
                                 f"model {model.name!r}")
            for w in matches:
                skipped[w.path] = f"kept float (skip_layers includes {item!r})"
    else:
        raise ValueError(f"skip_layers must be 'first_last', None or a list of layer names/types, "
                         f"got {skip_layers!r}")

    plan = []
    for w in walked:
        layer = w.layer
        entry = {"name": w.path, "type": type(layer).__name__, "action": None,
                 "weight_bits": None, "activation_bits": None, "weight_method": None,
                 "activation_method": None, "reason": "", "first": bool(supported) and w is supported[0],
                 "override": None}
        rule = registry.lookup(layer)
        found, value = _override_for(w, overrides, default_w, default_a)
        key = _override_key(w, overrides) if found else None
        if rule is None:
            reason = registry.unsupported_reason(layer)
            if (isinstance(layer, keras.Model) or _is_keras3_model(layer)) and not walker.is_nested_model(layer):
                reason = (f"a subclassed model ({type(layer).__name__}) cannot be looked into; build it with "
                          "the Functional or Sequential API, or wrap its layers in N2UQWrapper by hand")
            if reason is not None:
                entry.update(action="unsupported", reason=reason)
            elif found and value is not None and key not in w.owners:
                raise ValueError(f"overrides asks to quantize layer {w.path!r} ({type(layer).__name__}), "
                                 "which has no kernel to quantize")
            else:
                entry.update(action="float")
        elif found:
            entry["override"] = key
            if value is None:
                entry.update(action="skip", reason=f"kept float (overrides[{_key_text(key)}] is None)")
            else:
                entry.update(action="quantize", weight_bits=value[0], activation_bits=value[1])
        elif w.path in skipped:
            entry.update(action="skip", reason=skipped[w.path])
        else:
            entry.update(action="quantize", weight_bits=default_w, activation_bits=default_a)
        if entry["action"] == "quantize":
            w_method, a_method = _override_methods(w, overrides, default_methods)
            entry.update(weight_method=w_method if entry["weight_bits"] is not None else None,
                         activation_method=a_method if entry["activation_bits"] is not None else None)
        plan.append(entry)
    return plan


def _key_text(key):
    return key.__name__ if isinstance(key, type) else repr(key)


def _check_layer_key(key, walked, model_paths, model, argument, walker=nested):
    """Raises a ValueError unless the string `key` is a layer path, a nested model's path or a
    layer class name of `model`; a bare name of a layer inside a nested model gets its path."""
    if key in model_paths or any(key in (w.path, type(w.layer).__name__) for w in walked):
        return
    inner = [w.path for w in walked if w.owners and walker.layer_name(w.layer) == key]
    hint = ""
    if inner:
        hint = (f"; layers inside nested models are named by their path: did you mean "
                f"{' or '.join(map(repr, inner[:3]))}?")
    raise ValueError(f"{argument} names {key!r}, which is neither a layer name nor a layer type "
                     f"in model {model.name!r}{hint}")


def config_for(layer, weight_bits, activation_bits, learn_thresholds=True, weight_method="n2uq",
               activation_method="n2uq"):
    """The N2UQQuantizeConfig that the registry table gives a supported layer."""
    rule = registry.lookup(layer)
    if rule is None:
        raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) is not supported: "
                         f"{registry.unsupported_reason(layer) or 'no kernel to quantize'}")
    return N2UQQuantizeConfig(weight_bits, activation_bits, rule.weight_attrs, rule.channel_axis, learn_thresholds,
                              weight_method=weight_method or "n2uq", activation_method=activation_method or "n2uq")


def quantize_model(model: keras.Model, bits: int = 2, *, method: str = "n2uq", weight_method: str | None = None,
                   activation_method: str | None = None, weight_bits: int | None = None,
                   activation_bits: int | None = None, skip_layers: str | Sequence[str | type] | None = "first_last",
                   overrides: Mapping[str | type, Any] | None = None,
                   learn_thresholds: bool = True) -> keras.Model:
    """Returns a new tf_keras model with N2UQ (or another method's) quantization, ready for compile/fit.

    Args:
      model: a built Functional or Sequential tf_keras model (float).
      bits: default bits of weights and activations (1..8).
      method: the quantizer of weights and activations: "n2uq" (default), "uniform" (N2UQ with
        thresholds frozen at uniform: the paper's STE baseline; N2UQ weights), "dorefa", "pact"
        (DoReFa weights, as in the PACT paper), "lsq", "daq"; for weights only, "none" (no weight
        scaling) and "learnable" (learned per-channel scale); see `n2uq_tf.quantize.method_table.METHODS`.
        A method without an activation (weight) quantizer leaves that side to "n2uq".
      weight_method, activation_method: override ``method`` for weights / activations (for
        ablations such as uniform activations with entropy-preserving weights).
      weight_bits, activation_bits: defaults for each, overriding ``bits``.
      skip_layers: "first_last" (default, as in the paper: the first and the last
        quantizable layers stay float), None (quantize every supported layer) or a
        list of layer names or types to keep float, which replaces the first/last rule (a first
        layer it leaves quantized is warned about).
      overrides: per-layer bits for mixed precision, keyed by layer name, layer class or
        class name; values are an int, a (weight_bits, activation_bits) pair, a dict
        with those keys (None keeps that part float) and optionally method / weight_method /
        activation_method, or None to keep the layer float.
      learn_thresholds: False freezes the activation thresholds (uniform-quantization baseline):
        the same as ``activation_method="uniform"``.

    Models nested in `model` (a Sequential block, a `tf_keras.applications` backbone) are
    quantized inside and keep their place; their layers are named by path
    (``backbone/block1_conv``) in skip_layers and overrides, see `plan_quantization`.

    A model frozen as a whole (``model.trainable = False``, e.g. a `DistillationModel`'s teacher)
    is quantized into a trainable model, with a warning; nested models and layers frozen in a
    trainable model stay frozen (quantizer variables included).

    Layers that cannot be quantized stay float; they are warned about and listed by
    `quantization_report`.
    """
    arguments = dict(bits=bits, method=method, weight_method=weight_method, activation_method=activation_method,
                     weight_bits=weight_bits, activation_bits=activation_bits, skip_layers=skip_layers,
                     overrides=overrides, learn_thresholds=learn_thresholds)
    if _is_keras3_model(model):
        # The Keras 3 front end (n2uq_tf.keras3) registers its reader, which quantizes its models.
        return model_reader.reader_for(model).quantize_model(model, **arguments)
    check_model(model)
    _check_not_quantized(model)
    to_quantize, frozen = checked_plan(model, stacklevel=3, **arguments)

    def clone_layer(layer, path):
        """(clone of a float layer, its N2UQQuantizeConfig or None when it stays float)."""
        p = to_quantize.get(path)
        layer_config = layer.get_config()
        if frozen and "trainable" in layer_config:
            layer_config["trainable"] = True
        clone = layer.__class__.from_config(layer_config)
        if p is None:
            return clone, None
        return clone, config_for(layer, p["weight_bits"], p["activation_bits"],
                                 weight_method=p["weight_method"], activation_method=p["activation_method"])

    if nested.has_nested_models(model):
        return saving.make_save_atomic(_quantize_nested(model, clone_layer, frozen))

    def annotate(layer):
        clone, config = clone_layer(layer, layer.name)
        if config is None:
            return clone
        return tfmot.quantization.keras.quantize_annotate_layer(clone, quantize_config=config)

    with quantize_scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        quantized = tfmot.quantization.keras.quantize_apply(annotated, N2UQQuantizeScheme())
    return saving.make_save_atomic(quantized)


def checked_plan(model, *, stacklevel=2, bits=2, skip_layers="first_last", **arguments):
    """quantize_model's plan of a float model of either front end, with its warnings and errors.

    Checks the weights are finite, plans (`plan_quantization`), warns about the layers kept float
    as unsupported, about a first layer quantized without being named and about a frozen model;
    raises ValueError when nothing would be quantized. Returns ({path: plan entry} of the layers
    to quantize, whether the model is frozen as a whole).
    """
    check_finite_weights(model)
    plan = plan_quantization(model, bits, skip_layers=skip_layers, **arguments)
    to_quantize = {p["name"]: p for p in plan if p["action"] == "quantize"}
    unsupported = [p for p in plan if p["action"] == "unsupported"]
    if unsupported:
        warnings.warn("n2uq_tf.quantize_model keeps these layers float: "
                      + "; ".join(f"{p['name']} ({p['type']}): {p['reason']}" for p in unsupported),
                      stacklevel=stacklevel)
    if not to_quantize:
        raise ValueError(_nothing_to_quantize_message(model, plan, skip_layers))
    first_layer_warning = _first_layer_warning(plan, skip_layers)
    if first_layer_warning:
        warnings.warn(first_layer_warning, stacklevel=stacklevel)

    # A frozen model (model.trainable = False, as DistillationModel leaves its teacher) gives a
    # trainable student: cloned with trainable=False, every BatchNorm would run in inference mode
    # on the float model's moving statistics and only the quantizer parameters would train.
    frozen = not model.trainable
    if frozen:
        warnings.warn(f"model {model.name!r} is frozen (trainable=False, as DistillationModel sets on its "
                      "teacher); the quantized model is made trainable. Set trainable=False on the result "
                      "to freeze it.", stacklevel=stacklevel)
    return to_quantize, frozen


def _quantize_nested(model, clone_layer, frozen):
    """quantize_model of a model with nested models: what quantize_apply would give if it recursed.

    tfmot's quantize_apply only wraps the layers of the model it is given, and clones a nested
    model whole (from its config, annotations inside left unapplied). So the same two steps are
    done at every depth (`nested.clone`): a clone of the float model that takes its weights, then
    a clone in which each layer to quantize is wrapped in N2UQWrapper (as our scheme's
    quantize_apply wraps annotated layers) and every other layer is shared. Each nested model
    keeps its name, place and frozen state (a `trainable=False` backbone stays frozen): keeping
    the user's structure, rather than flattening it, keeps `model.get_layer("backbone")` and
    fine-tuning code working, and the model saves and loads as any model of nested models does.
    """
    configs = {}

    def clone_leaf(layer, path):
        clone, config = clone_layer(layer, path)
        if config is not None:
            configs[path] = config
        return clone

    def wrap_leaf(layer, path):
        config = configs.get(path)
        return layer if config is None else N2UQWrapper(layer, config)

    with quantize_scope():
        cloned = nested.clone(model, clone_leaf, unfreeze=frozen)
        cloned.set_weights(model.get_weights())
        return nested.clone(cloned, wrap_leaf)


def _check_not_quantized(model):
    """quantize_model takes a float model: a clear error for one that is already quantized."""
    for walked in nested.walk(model):
        layer = walked.layer
        if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
            kind = ("N2UQ-quantized" if isinstance(layer, N2UQWrapper)
                    else f"quantized by tfmot ({type(layer).__name__})")
            raise ValueError(
                f"model {model.name!r} is already quantized: layer {walked.path!r} is {kind}. quantize_model "
                "takes the float model; compile and fit this one to keep training it, or quantize the float "
                "model again for other bits")
        if type(layer).__name__ == "QuantizeAnnotate":
            raise ValueError(
                f"model {model.name!r} holds tfmot quantization annotations (layer {walked.path!r}); "
                "quantize_model takes the float model and annotates it itself. To apply your own "
                "annotations use tfmot.quantization.keras.quantize_apply(model, n2uq_tf.N2UQQuantizeScheme()) "
                "inside n2uq_tf.quantize_scope()")


def _nothing_to_quantize_message(model, plan, skip_layers):
    message = (f"model {model.name!r} has no layer to quantize (supported: "
               f"{', '.join(c.__name__ for c in registry.SUPPORTED)}); plan: "
               + ", ".join(f"{p['name']}={p['action']}" for p in plan if p['action'] != 'float'))
    quantizable = [p for p in plan if p["action"] in ("quantize", "skip")]
    kept = [p["name"] for p in quantizable if p["reason"].endswith("(skip_layers='first_last')")]
    if skip_layers == "first_last" and kept and len(kept) == len(quantizable):
        message += (f". Its only quantizable layers are the first and the last ({' and '.join(map(repr, kept))}), "
                    "which skip_layers='first_last' (the default, as in the paper) keeps float. Pass "
                    "skip_layers=None to quantize them too: the first then quantizes the raw model input and "
                    "the last the output layer's weights, which usually costs more accuracy than any other "
                    "layer; or quantize one of them with overrides={name: bits}")
    return message


def _first_layer_warning(plan, skip_layers):
    """The warning for a first quantizable layer that gets quantized without being asked for by
    name (through a skip_layers list that leaves it out, or an override by class or nested model)."""
    first = next((p for p in plan if p["first"]), None)
    if first is None or first["action"] != "quantize" or skip_layers is None or first["override"] == first["name"]:
        return None
    why = (f"overrides[{_key_text(first['override'])}] applies to it" if first["override"] is not None
           else "skip_layers is a list, which replaces the default first/last rule")
    name = first["name"]
    return (f"n2uq_tf.quantize_model quantizes {name!r}, the first quantizable layer, which sees the raw model "
            f"input, because {why}. The paper (and the default skip_layers='first_last') keeps it float: "
            f"quantizing the raw input usually costs accuracy. To keep it float add {name!r} to skip_layers or "
            f"pass overrides={{{name!r}: None}}; to quantize it without this warning name it in overrides.")


def _describe_format(path):
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path!r} is a directory without saved_model.pb: not a SavedModel")
        return "SavedModel"
    ext = os.path.splitext(path)[1].lower()
    return {".h5": "HDF5", ".hdf5": "HDF5", ".keras": "Keras"}.get(ext, "unknown")


def load_model(path: str | os.PathLike[str], custom_objects: Mapping[str, Any] | None = None, compile: bool = True,
               require_quantized: bool = True) -> keras.Model:
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
    other = next((r for r in model_reader.readers() if r.owns_file(path)), None)
    if other is not None:  # a file of another front end (a Keras 3 .keras file)
        return other.load_model(path, custom_objects, compile, require_quantized)
    try:
        model = _load_keras_model(path, fmt, custom_objects, compile)
    except Exception as error:  # OSError, zipfile.BadZipFile, h5py and protobuf decode errors, ...
        incomplete = saving.incomplete_message(path, fmt, error)
        if incomplete is not None:
            raise ValueError(incomplete) from error
        raise ValueError(f"could not load a quantized model from {path!r} ({fmt} format): "
                         f"{type(error).__name__}: {error}") from error
    if require_quantized and not any(isinstance(w.layer, N2UQWrapper) for w in nested.walk(model)):
        raise ValueError(f"{path!r} holds a model without N2UQ-quantized layers; load float models with "
                         "tf_keras.models.load_model")
    return saving.make_save_atomic(model)


def _load_keras_model(path, fmt, custom_objects, compile):
    def load():
        with quantize_scope(custom_objects or {}):
            return keras.models.load_model(path, compile=compile)

    from n2uq_tf import _fused

    try:
        model = load()
    except Exception as error:
        if fmt != "SavedModel" or not any(name in str(error) for name in _fused.OP_NAMES):
            raise
        # Earlier n2uq_tf versions traced the fused training op into SavedModels: register it, then load.
        _fused.register_ops()
        model = load()
    if fmt == "SavedModel" and compile:
        saving.restore_saved_model_optimizer(model, path)
    return model

