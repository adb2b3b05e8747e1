"""inspect_tflite: what an exported .tflite holds (ops, custom-op options, bits and bytes per layer)."""

import dataclasses
import json
import math
import os

from n2uq_tf.export import custom_ops
from n2uq_tf.export.converter import EXPORT_FORMAT_VERSION, METADATA_NAME

_LAYER_OPS = custom_ops.LAYER_OPS + tuple(custom_ops.FUSED_OPS)  # the ops holding a layer's packed weights
_QUANTIZE_OPS = {custom_ops.QUANTIZE_PACK: custom_ops.OP_QUANTIZE_PACK,
                 custom_ops.QUANTIZE_CODES: custom_ops.OP_QUANTIZE}  # a fused op's quantize option -> the op


@dataclasses.dataclass
class OperatorInfo:
    index: int
    name: str                 # builtin name (CONV_2D) or custom code (N2UQConv2D)
    custom: bool
    options: dict = None      # decoded custom options
    inputs: list = None
    outputs: list = None
    layer: str = None         # Keras layer of an N2UQ conv / FC op


@dataclasses.dataclass
class QuantizedLayerInfo:
    name: str                 # Keras layer name (the op's output tensor), else "op <index>"
    op: str                   # its op: a layer op (N2UQConv2D) or a fused one (N2UQConv2DFused)
    weight_bits: int
    activation_bits: int
    weight_count: int
    packed_bytes: int         # bytes of its weight buffer in the file
    expected_bytes: int       # ceil(weight_count * weight_bits / 8)
    fused: str = None         # a fused op's output stage (custom_ops.describe_output_stage), else None


@dataclasses.dataclass
class TFLiteInspection:
    file_bytes: int
    operators: list
    layers: list
    packed_bytes: int          # bytes of N2UQ weight buffers
    float_bytes: int           # bytes of every other buffer (float weights, multipliers, ...)
    metadata: dict = None      # the n2uq_tf metadata entry, None for a file not written by n2uq_tf

    @property
    def data_bytes(self):
        """The file's weight data: packed N2UQ kernels + every other constant buffer (not metadata)."""
        return self.packed_bytes + self.float_bytes

    @property
    def size_ratio(self):
        """The file's overhead, file bytes / `data_bytes`: what the flatbuffer's structure (operators,
        tensors, metadata) adds to the data it must hold. The one overhead figure of an export:
        `ExportReport.size_ratio` is this figure of the written file."""
        return self.file_bytes / self.data_bytes if self.data_bytes else None

    def op_counts(self, as_unfused=False):
        """{op name: count}. With ``as_unfused=True`` each fused op counts as the layer op and the
        quantizer it stands for: the N2UQ op counts of the same export with ``fuse=False`` (the
        builtins it absorbed are not counted)."""
        counts = {}
        for op in self.operators:
            names = [op.name]
            if as_unfused and (op.name in custom_ops.FUSED_OPS or op.name == custom_ops.OP_MAX_POOL2D_FUSED):
                quantizer = _QUANTIZE_OPS.get((op.options or {}).get("quantize"))
                # the pool's own ops were builtins (PAD, MAX_POOL_2D): only its quantizer counts
                layer = [custom_ops.FUSED_OPS[op.name]] if op.name in custom_ops.FUSED_OPS else []
                names = layer + ([quantizer] if quantizer else [])
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def to_dict(self):
        return {"file_bytes": self.file_bytes, "packed_bytes": self.packed_bytes, "float_bytes": self.float_bytes,
                "data_bytes": self.data_bytes, "size_ratio": self.size_ratio, "metadata": self.metadata,
                "op_counts": self.op_counts(),
                "operators": [dataclasses.asdict(o) for o in self.operators],
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def __str__(self):
        lines = []
        meta = self.metadata or {}
        lines.append(f"n2uq_tf {meta.get('n2uq_tf_version', '?')} export format {meta.get('format_version', '?')}, "
                     f"inference {meta.get('inference_type', '?')}" if self.metadata else
                     "no n2uq_tf metadata (not exported by n2uq_tf)")
        lines.append("operators: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts().items())))
        for op in self.operators:
            if op.custom:
                opts = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in sorted((op.options or {}).items()))
                lines.append(f"  #{op.index:<4d} {op.name:<22s} {opts}")
        if self.layers:
            header = ("layer", "op", "W", "A", "weights", "packed B", "fused output stage")
            rows = [(layer.name, layer.op, str(layer.weight_bits), str(layer.activation_bits),
                     f"{layer.weight_count:,}", f"{layer.packed_bytes:,}", layer.fused or "-") for layer in self.layers]
            widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
            for row in [header] + rows:
                cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
                lines.append("  ".join(cells + [row[-1]]))
        ratio = self.size_ratio
        lines.append(f"file {self.file_bytes:,} B; N2UQ weights {self.packed_bytes:,} B; other buffers "
                     f"{self.float_bytes:,} B; file = "
                     + ("n/a" if ratio is None else f"{ratio:.3f}") + " x its weight data")
        return "\n".join(lines)


def _read(path_or_bytes):
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    path = os.fspath(path_or_bytes)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no .tflite file at {path!r}")
    with open(path, "rb") as f:
        return f.read()


def _name(value):
    return value.decode() if isinstance(value, bytes) else value


def read_metadata(model):
    """The n2uq_tf metadata dict of a model object, None if absent; raises for a newer format."""
    for entry in model.metadata or []:
        if _name(entry.name) == METADATA_NAME:
            data = model.buffers[entry.buffer].data
            try:
                meta = json.loads(bytes(data).decode())
            except (TypeError, ValueError) as error:
                raise ValueError(f"the {METADATA_NAME!r} metadata of this .tflite is not valid JSON: {error}") from None
            version = meta.get("format_version", 0)
            if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
                raise ValueError(f"this .tflite was written by n2uq_tf {meta.get('n2uq_tf_version', '?')} in export "
                                 f"format {version}; this n2uq_tf reads up to format {EXPORT_FORMAT_VERSION}. "
                                 "Upgrade n2uq_tf to read it.")
            return meta
    return None


def _decode_options(data):
    if data is None or len(data) == 0:
        return {}
    from flatbuffers import flexbuffers
    options = flexbuffers.Loads(bytes(data))
    return {(_name(k)): v for k, v in options.items()} if isinstance(options, dict) else {"raw": options}


def inspect_tflite(path_or_bytes: str | os.PathLike[str] | bytes) -> TFLiteInspection:
    """A `TFLiteInspection` of a .tflite file (a path or the bytes): ``print()`` it or ``to_dict()``."""
    from tensorflow.lite.tools import flatbuffer_utils
    data = _read(path_or_bytes)
    try:
        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    except Exception as error:  # flatbuffers raises assorted errors on garbage
        raise ValueError(f"not a TFLite flatbuffer: {type(error).__name__}: {error}") from None
    if not model.subgraphs:
        raise ValueError("not a TFLite flatbuffer: no subgraphs")
    metadata = read_metadata(model)
    operators, layers, weight_buffers = [], [], set()
    index = 0
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            custom = code.customCode is not None and flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) in (
                "CUSTOM", _name(code.customCode))
            name = _name(code.customCode) if custom else flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
            options = _decode_options(op.customOptions) if custom else None
            info = OperatorInfo(index, name, custom, options,
                                [int(i) for i in op.inputs] if op.inputs is not None else [],
                                [int(i) for i in op.outputs] if op.outputs is not None else [])
            operators.append(info)
            if name in _LAYER_OPS:
                tensor = subgraph.tensors[info.inputs[1]]
                weight_buffers.add(tensor.buffer)
                buf = model.buffers[tensor.buffer].data
                kind = custom_ops.FUSED_OPS.get(name, name)
                if kind == custom_ops.OP_FULLY_CONNECTED:
                    count = options["in_features"] * options["out_features"]
                else:
                    count = options["kernel_height"] * options["kernel_width"] * (
                        options["out_channels"] if kind == custom_ops.OP_DEPTHWISE_CONV2D
                        else options["in_channels"] * options["out_channels"])
                out_name = ((metadata or {}).get("output_layers", {}).get(str(info.outputs[0]))
                            or _name(subgraph.tensors[info.outputs[0]].name))
                info.layer = out_name or f"op {index}"
                layers.append(QuantizedLayerInfo(info.layer, name, options["weight_bits"],
                                                 options["act_bits"], count, 0 if buf is None else len(buf),
                                                 math.ceil(count * options["weight_bits"] / 8),
                                                 custom_ops.describe_output_stage(options)))
            index += 1
    meta_buffers = {entry.buffer for entry in model.metadata or []}
    packed = sum(len(model.buffers[b].data) for b in weight_buffers if model.buffers[b].data is not None)
    other = sum(len(b.data) for i, b in enumerate(model.buffers)
                if b.data is not None and i not in weight_buffers and i not in meta_buffers)
    return TFLiteInspection(len(data), operators, layers, packed, other, metadata)


def format_inspection(path_or_bytes):
    """The printable report of `inspect_tflite` (what the CLI's `inspect` prints)."""
    return str(inspect_tflite(path_or_bytes))
