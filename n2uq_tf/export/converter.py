"""export_tflite: a quantized tf_keras model -> .tflite with bit-packed N2UQ custom ops."""

import json
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops
from n2uq_tf.export.lowering import ExportReport, lower

# Written into the flatbuffer's metadata under METADATA_NAME; readers refuse a newer one.
METADATA_NAME = "n2uq_tf"
# 2: conv ops carry a 'padding' option; 3: fused output-stage ops (custom_ops). A file without
# fused ops is written as format 2, which readers of format 2 run.
EXPORT_FORMAT_VERSION = 3
_UNFUSED_FORMAT_VERSION = 2
INFERENCE_TYPES = ("float", "int8")
_LAYER_OPS = custom_ops.LAYER_OPS + tuple(custom_ops.FUSED_OPS)  # ops holding a layer's packed weights
# inference_type="int8": the builtins the converter quantizes. Convolutions and fully connected
# layers gain from TFLite's int8 kernels, and the ops that only move or select values can follow
# their int8 input. Every other builtin (adds, PReLU, multiplies, means, ...) stays float32: between
# float-in/float-out N2UQ ops each would get its own QUANTIZE / DEQUANTIZE pair, run slower than in
# float (ResNet-18 W2A2: 20.8 ms with every builtin int8, against 5.8 ms float, on an AMD EPYC Zen 5)
# and keep the output-stage fusion from seeing the pattern.
INT8_BUILTINS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "PAD", "PADV2",
                           "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE"})


def _package_version():
    import n2uq_tf
    return getattr(n2uq_tf, "__version__", "unknown")


def _metadata(report, fused):
    return {"format_version": EXPORT_FORMAT_VERSION if fused else _UNFUSED_FORMAT_VERSION,
            "n2uq_tf_version": _package_version(), "inference_type": report.inference_type}


def _layer_names(model, streams):
    """{(subgraph, op index): Keras layer name} of every N2UQ op holding packed weights, found by
    its weight bytes (`streams`: weight bytes -> layer names, in graph order)."""
    codes = [c.customCode.decode() if c.customCode else None for c in model.operatorCodes]
    left = {key: list(names) for key, names in streams.items()}
    found = {}
    for s, subgraph in enumerate(model.subgraphs):
        for i, op in enumerate(subgraph.operators):
            if codes[op.opcodeIndex] in _LAYER_OPS:
                weights = model.buffers[subgraph.tensors[int(op.inputs[1])].buffer].data
                names = left.get(b"" if weights is None else weights.tobytes())
                if names:
                    found[s, i] = names.pop(0)
    return found


def _compact(model, layer_names):
    """Drops what the interpreter does not need, in place: the names of inner tensors, empty
    quantization tables, and shape signatures that equal the shape.

    On a small network this structure rivals the packed weights (ResNet-20 at width 16: names
    alone are ~11 KB next to ~67 KB of packed kernels). Graph input and output names stay, and
    the output of each N2UQ conv / FC op is named after its Keras layer (for `inspect_tflite`),
    found by its packed weights (`layer_names`, `_layer_names`).
    """
    output_layers = {}
    for s, subgraph in enumerate(model.subgraphs):
        keep = set(subgraph.inputs.tolist() if subgraph.inputs is not None else []) | \
            set(subgraph.outputs.tolist() if subgraph.outputs is not None else [])
        named = {int(subgraph.operators[i].outputs[0]): name for (g, i), name in layer_names.items() if g == s}
        for index, tensor in enumerate(subgraph.tensors):
            if index in named and index not in keep:
                tensor.name = named[index]
            elif index in named:  # a graph output keeps its name: note the layer in the metadata
                output_layers[str(index)] = named[index]
            elif index not in keep:
                tensor.name = None
            q = tensor.quantization
            if q is not None and q.scale is None and q.zeroPoint is None and q.min is None and q.max is None \
                    and q.details is None:
                tensor.quantization = None
            if tensor.shapeSignature is not None and tensor.shape is not None and \
                    np.array_equal(tensor.shapeSignature, tensor.shape):
                tensor.shapeSignature = None
    return output_layers


def _finish(flatbuffer, report, streams, fuse):
    """Fuses output stages (when `fuse`; noted in `report`), compacts the converter's flatbuffer and
    appends a Model.metadata entry (its own buffer) holding the export metadata as JSON."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    fusions = []
    if fuse:
        from n2uq_tf.export import fusion
        fusions = fusion.fuse_output_stages(model)
    layer_names = _layer_names(model, streams)
    if fusions:
        fusion.note_fusions(report, fusions, layer_names)
    metadata = _metadata(report, bool(fusions))
    output_layers = _compact(model, layer_names)
    if output_layers:
        metadata = dict(metadata, output_layers=output_layers)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _builtin_names(flatbuffer):
    """Names of the builtin op types a flatbuffer uses (e.g. "CONV_2D")."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    used = set()
    for code in model.operatorCodes:
        # builtinCode holds codes past 127; deprecatedBuiltinCode those of older writers
        value = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
        if value != schema.BuiltinOperator.CUSTOM:
            used.add(names.get(value, str(value)))
    return used


def _quantize_selected(converter):
    """Calibrates with `converter` and quantizes only the INT8_BUILTINS (float32 input and output).

    The converter's own int8 path quantizes every builtin it can; TensorFlow's quantization
    debugger (tf.lite.experimental.QuantizationDebugger) restricts it with a denylist of op types
    through the same two steps, calibration only and then the MLIR quantizer, used here directly
    because the debugger also builds a verification model that no interpreter without our ops runs.
    """
    from tensorflow.lite.python import convert as tf_convert
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    denied = sorted(_builtin_names(calibrated) - INT8_BUILTINS)
    return tf_convert.mlir_quantize(calibrated, denylisted_ops=denied)


def _check_arguments(inference_type, representative_dataset):
    if inference_type not in INFERENCE_TYPES:
        raise ValueError(f"inference_type must be one of {', '.join(map(repr, INFERENCE_TYPES))}, "
                         f"got {inference_type!r}")
    if inference_type == "int8":
        if representative_dataset is None:
            raise ValueError("inference_type='int8' needs a representative_dataset: a callable yielding "
                             "lists of float32 input arrays (as TFLite's converter takes), to calibrate the "
                             "int8 builtin layers")
        if not callable(representative_dataset):
            raise ValueError(f"representative_dataset must be a callable yielding lists of float32 input "
                             f"arrays, got {type(representative_dataset).__name__}")
    elif representative_dataset is not None:
        raise ValueError("representative_dataset is only used with inference_type='int8'")


def _representative_by_name(representative_dataset, input_names):
    """The user's calibration generator with each list of arrays (Keras input order) turned into a
    dict keyed by input name: the converted model orders its inputs otherwise (as TFLite's stock
    converter does), and the calibrator matches a dict by name."""
    def generate():
        for sample in representative_dataset():
            if isinstance(sample, (list, tuple)) and len(sample) == len(input_names):
                yield dict(zip(input_names, sample))
            else:
                yield sample
    return generate


def _check_runnable(info, origin):
    """Raises ValueError unless every op of the inspected file is a TFLite builtin or an N2UQ op."""
    foreign = sorted({op.name for op in info.operators if op.custom and op.name not in custom_ops.ALL_OPS})
    if foreign:
        raise ValueError(
            f"the converted model holds ops that are neither TFLite builtins nor N2UQ ops: {', '.join(foreign)} "
            f"(the converter keeps a TensorFlow op without a TFLite builtin as a custom op, which no interpreter "
            f"runs); {origin}. The layers computing them need a TFLite builtin (a float32 computation, "
            "supported layer arguments).")


def export_tflite(model: keras.Model, path: str | os.PathLike[str] | None = None, *, inference_type: str = "float",
                  representative_dataset: Callable[[], Iterable[Any]] | None = None,
                  return_report: bool = False, fuse: bool = True) -> bytes | tuple[bytes, ExportReport]:
    """Converts a quantized tf_keras model to a TFLite flatbuffer with N2UQ custom ops.

    Every lowerable quantized Conv2D / DepthwiseConv2D / Dense (1..4 bits, see
    `n2uq_tf.export.custom_ops`) becomes a quantize(-and-pack) op and a bit-serial conv / FC op
    with its weights bit-packed and a directly following BatchNormalization folded in. All other
    layers are TFLite builtins: float32, or with ``inference_type="int8"`` the convolutions, fully
    connected layers and the pads, pools and reshapes next to them (`INT8_BUILTINS`) int8, calibrated
    on ``representative_dataset``, and the elementwise ops float32 (the custom ops keep float32 inputs
    and outputs; the converter puts QUANTIZE / DEQUANTIZE where int8 and float32 meet). Quantized
    layers that cannot be lowered stay float builtins on their fake-quantized weights (warned about,
    listed in the report); a model with no lowered layer is warned about too (the file is a plain
    float model). The input batch size stays free (shape signature -1, 1 until resized).

    A model trained under a ``mixed_float16`` / ``mixed_bfloat16`` (or float16 / bfloat16) policy
    exports as its float32 twin (same weights, float32 builtins). A `DistillationModel` exports its
    student. The signature keeps the Keras input and output names (outputs named after their
    layers, the wrapped layer's name for a quantized one), as TFLite's ``from_keras_model`` does.
    With ``fuse=True`` the float ops between a lowered layer and the next quantizer (RPReLU, residual
    adds, ReLUs, ...) and that quantizer are fused into the layer's op (`n2uq_tf.export.fusion`;
    same outputs bit for bit, fewer passes over memory); the report says per layer what was fused.
    Before anything is written the file is checked to hold only TFLite builtins and N2UQ ops;
    ``path`` is written atomically (a failed export leaves no file).

    Args:
      model: a quantized Functional or Sequential tf_keras model (`n2uq_tf.quantize_model`), or a
        `DistillationModel`.
      path: where to write the .tflite, or None.
      inference_type: "float" or "int8".
      representative_dataset: for "int8": a callable yielding lists of float32 input arrays in the
        Keras model's input order (or dicts keyed by input name).
      return_report: also return the `ExportReport` (per layer ops, bits, bytes, fusions; file size).
      fuse: fuse output stages into the layer ops (False: one op per builtin, as converted).

    Returns:
      the flatbuffer bytes, or (bytes, report) with ``return_report=True``.
    """
    from n2uq_tf._io import atomic_path
    from n2uq_tf.export.inspect import inspect_tflite

    _check_arguments(inference_type, representative_dataset)
    lowered = lower(model)
    report = lowered.report
    report.inference_type = inference_type
    kept = report.kept_builtin
    if kept:
        warnings.warn("n2uq_tf.export_tflite keeps these quantized layers as float builtins: "
                      + "; ".join(f"{r.name} ({r.type}): {r.reason}" for r in kept), stacklevel=2)
    if not report.lowered:
        warnings.warn(f"n2uq_tf.export_tflite: no layer of model {lowered.model.name!r} becomes an N2UQ op "
                      f"({'no layer is quantized' if not kept else 'no quantized layer can be lowered'}); "
                      "the file is a plain float TFLite model", stacklevel=2)

    function = lowered.export_function.get_concrete_function()
    # The converter saves its trackable as a SavedModel first; given the Keras model that retraces
    # every layer's call (~20 s for a ResNet-20). A module holding only the captured variables
    # is all the freezing needs.
    holder = tf.Module(name="n2uq_export")
    holder.captured = list(function.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], holder)
    converter.allow_custom_ops = True
    if inference_type == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        input_names = [spec.name for spec in lowered.export_function.input_signature]
        converter.representative_dataset = _representative_by_name(representative_dataset, input_names)
        # TFLITE_BUILTINS too: ops without an int8 kernel stay float rather than failing.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        if report.lowered:
            # Calibration runs the float model in the converter's own interpreter, which takes
            # custom ops only from op-resolver registerers (not delegates): give it our kernels.
            from n2uq_tf.export.calibration import op_resolver_registerer
            converter.target_spec._experimental_custom_op_registerers = [op_resolver_registerer()]
    streams = {}
    for r in lowered.lowered_layers:
        streams.setdefault(r.stream.tobytes(), []).append(r.name)
    converted = _quantize_selected(converter) if inference_type == "int8" else converter.convert()
    flatbuffer = _finish(converted, report, streams, fuse)
    if path is None:
        info = inspect_tflite(flatbuffer)
        _check_runnable(info, "export_tflite refused it")
    else:
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(flatbuffer)
            info = inspect_tflite(tmp)  # what was written, read back
            _check_runnable(info, f"nothing was written to {path!r}")
    report.file_bytes = info.file_bytes
    report.data_bytes = info.data_bytes
    return (flatbuffer, report) if return_report else flatbuffer


def plan_export(model: keras.Model) -> ExportReport:
    """The `ExportReport` of `model` without converting: which layers become which ops."""
    return lower(model).report
