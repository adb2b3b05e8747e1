"""The model that export and reports describe: a distiller's student, computing in float32.

`export_source(model)` is what `lower` / `export_tflite` / `quantization_report` start from:

* a `DistillationModel` stands for its student (as its ``save``, ``evaluate`` and ``predict`` do);
* a model under a reduced-precision dtype policy (``mixed_float16``, ``mixed_bfloat16``, ``float16``,
  ``bfloat16``) is rebuilt from its config under float32 with the same weights (its *float32 twin*).
  Its layers would otherwise trace float16 / bfloat16 TensorFlow ops (Conv2D, MatMul,
  FusedBatchNormV3, ...) that have no TFLite builtin: the converter keeps them as custom ops
  that no interpreter runs. Mixed policies keep their variables in float32, so the twin holds
  exactly the trained values; the exported graph is the one the float32 model would give.
"""

import tensorflow as tf

from n2uq_tf._keras import keras

# Policies whose computations (or variables) are not float32; each maps to float32 in the twin.
REDUCED_PRECISION_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def inference_model(model):
    """`model`, or the student of a `DistillationModel`."""
    from n2uq_tf.training.distillation import DistillationModel
    return model.student if isinstance(model, DistillationModel) else model


def _layers(model):
    """Every layer, inside nested models and wrappers too."""
    for layer in model.layers:
        yield layer
        inner = getattr(layer, "layer", None)
        if hasattr(inner, "dtype_policy"):  # a wrapped layer (tf_keras or Keras 3)
            yield inner
        if hasattr(layer, "layers"):  # a nested model (tf_keras or Keras 3)
            yield from _layers(layer)


def reduced_precision_layers(model):
    """Names of the layers (and graph inputs) of `model` whose dtype policy is not float32."""
    names = [f"input {t.name!r} ({tf.as_dtype(t.dtype).name})" for t in model.inputs
             if tf.as_dtype(t.dtype).name in REDUCED_PRECISION_POLICIES]  # Keras 3 gives dtypes as strings
    names += [f"{layer.name} ({layer.dtype_policy.name})" for layer in _layers(model)
              if layer.dtype_policy.name in REDUCED_PRECISION_POLICIES]
    return names


def _float32_config(value):
    """A copy of a Keras config with every reduced-precision dtype (policy or plain) set to float32."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "dtype" and isinstance(item, str) and item in REDUCED_PRECISION_POLICIES:
                item = "float32"
            elif key == "dtype" and isinstance(item, dict) and item.get("class_name") in ("Policy", "DTypePolicy") \
                    and item.get("config", {}).get("name") in REDUCED_PRECISION_POLICIES:
                item = "float32"
            else:
                item = _float32_config(item)
            out[key] = item
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_float32_config(item) for item in value)
    return value


def float32_twin(model):
    """`model` itself when every layer computes in float32, else its float32 twin (see the module doc).

    Raises ValueError, naming the model and the error, when the twin cannot be built (a custom
    layer Keras cannot rebuild from its config) or its weights do not line up with the model's.
    """
    reduced = reduced_precision_layers(model)
    if not reduced:
        return model
    from n2uq_tf.quantize.api import quantize_scope
    shown = ", ".join(reduced[:4]) + (f" and {len(reduced) - 4} more" if len(reduced) > 4 else "")
    hint = (f"model {model.name!r} computes in reduced precision ({shown}); export rebuilds it under a "
            "float32 policy with the same weights, because TFLite has no builtins for float16 / bfloat16 "
            "TensorFlow ops")
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")  # for layers whose config names no dtype
        with quantize_scope():
            twin = type(model).from_config(_float32_config(model.get_config()))
    except Exception as error:  # any deserialization failure, reported with the reason
        raise ValueError(f"{hint}, and rebuilding failed: {type(error).__name__}: {error}. Register custom "
                         "layers with keras.saving.register_keras_serializable, or build the model under "
                         "keras.mixed_precision.set_global_policy('float32'), copy the weights "
                         "(set_weights) and export that.") from error
    finally:
        keras.mixed_precision.set_global_policy(policy)
    weights = model.weights
    if len(twin.weights) != len(weights) or any(tuple(a.shape) != tuple(b.shape)
                                                for a, b in zip(twin.weights, weights)):
        raise ValueError(f"{hint}, and the rebuilt model's {len(twin.weights)} variables do not line up with "
                         f"the model's {len(weights)}; build it under a float32 policy, copy the weights "
                         "(set_weights) and export that.")
    for target, source in zip(twin.weights, weights):
        target.assign(tf.cast(tf.convert_to_tensor(source), target.dtype))  # float16 -> float32 is exact
    return twin


def export_source(model):
    """The float32 tf_keras model that `model` exports as (see the module doc)."""
    from n2uq_tf.quantize.api import check_model
    model = inference_model(model)
    check_model(model)
    return float32_twin(model)


def _unique(names):
    seen, out = set(), []
    for name in names:
        candidate, i = name, 1
        while candidate in seen:
            candidate, i = f"{name}_{i}", i + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def signature_names(model):
    """(input names, output names) of the exported signature: the Keras model's own, as TFLite's
    stock converter (``from_keras_model``) gives them.

    Outputs are named after the layers that produce them; a quantized layer is named after the
    layer it wraps (``fc``, not tfmot's ``quant_fc``), so switching a float model to its
    quantized export keeps the names app code looks up.
    """
    outputs = []
    # A Keras 3 Sequential model has no output_names: its one output is its last layer's.
    for name in getattr(model, "output_names", None) or [model.layers[-1].name]:
        layer = model.get_layer(name) if name in {each.name for each in model.layers} else None
        inner = getattr(layer, "layer", None)
        outputs.append(inner.name if hasattr(inner, "dtype_policy") else name)  # a wrapped layer (either Keras)
    # Keras 3 models have no input_names: the stock converter names their inputs after the input
    # KerasTensors ("keras_tensor_<n>" for an unnamed keras.Input, not the layer's "input_layer").
    input_names = getattr(model, "input_names", None) or [t.name for t in model.inputs]
    return _unique(list(input_names)), _unique(outputs)
