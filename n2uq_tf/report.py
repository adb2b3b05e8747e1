"""quantization_report: what was quantized, with which bits, what it learned and what it saves."""

import dataclasses
from typing import Any

from n2uq_tf import model_reader
from n2uq_tf.quantization_math import n2uq as ops

FLOAT_BYTES = 4

# LayerReport.export, from the exporter's own plan (n2uq_tf.export.plan_export) of each layer status.
EXPORT_PACKED = "packed"          # bit-packed N2UQ custom ops
EXPORT_FLOAT = "float"            # a float TFLite builtin (for a quantized layer: export_note says why)
EXPORT_FOLDED = "folded"          # a BatchNormalization folded into the preceding N2UQ op
_EXPORT_OF_STATUS = {"lowered": EXPORT_PACKED, "builtin": EXPORT_FLOAT, "float": EXPORT_FLOAT,
                     "folded": EXPORT_FOLDED}


@dataclasses.dataclass
class LayerReport:
    name: str
    type: str
    status: str                  # "quantized", "float", "kept float", "unsupported"
    weight_bits: int = None
    activation_bits: int = None
    params: int = 0
    float_bytes: int = 0
    packed_bytes: int = 0
    thresholds: list = None       # learned input thresholds T_i / beta1, in input units
    beta1: float = None
    beta2: float = None
    note: str = ""
    weight_method: str = None     # "n2uq", "dorefa", "lsq", ... (n2uq_tf.quantize.method_table.METHODS)
    activation_method: str = None
    step: float = None            # activation output step (beta2 * delta for N2UQ)
    export: str = None            # what export_tflite makes of it: EXPORT_* above (None: no export plan)
    export_note: str = ""         # why a quantized layer exports as float; what a BN folds into
    # {name: thresholds (its input's units)} of quantizers inside the layer, between its stages
    # (SeparableConv2D: "pointwise_input", on the depthwise output)
    intermediate_thresholds: dict = None

    @property
    def method(self):
        """One method name when weights and input agree (or one is float), else "W:<w> A:<a>"."""
        names = [m for m in (self.weight_method, self.activation_method) if m is not None]
        if not names:
            return ""
        if len(set(names)) == 1:
            return names[0]
        return f"W:{self.weight_method} A:{self.activation_method}"


@dataclasses.dataclass
class QuantizationReport:
    layers: list
    # What training runs for the N2UQ activation quantizers, "fused" (the C++ CPU kernel) or
    # "reference" (pure TF: XLA, GPUs/TPUs), for the model as compiled (n2uq_tf.ops.active_implementation).
    implementation: str = None

    @property
    def total_params(self):
        return sum(r.params for r in self.layers)

    @property
    def float_bytes(self):
        return sum(r.float_bytes for r in self.layers)

    @property
    def packed_bytes(self):
        return sum(r.packed_bytes for r in self.layers)

    @property
    def compression(self):
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 1.0

    @property
    def quantized(self):
        return [r for r in self.layers if r.status == "quantized"]

    @property
    def unsupported(self):
        return [r for r in self.layers if r.status == "unsupported"]

    def to_dict(self):
        return {"layers": [dataclasses.asdict(r) for r in self.layers],
                "total_params": self.total_params, "float_bytes": self.float_bytes,
                "packed_bytes": self.packed_bytes, "compression": self.compression,
                "implementation": self.implementation}

    @property
    def exported_float(self):
        """Quantized layers that the export keeps as float builtins (their reason in ``export_note``)."""
        return [r for r in self.quantized if r.export == EXPORT_FLOAT]

    def __str__(self):
        header = ("layer", "type", "method", "W", "A", "params", "float32 B", "packed B", "export",
                  "thresholds (input units)")
        rows = []
        for r in self.layers:
            if r.params == 0 and r.status == "float":
                continue
            thresholds = "" if r.thresholds is None else _format_thresholds(r.thresholds)
            for name, values in (r.intermediate_thresholds or {}).items():
                thresholds += f"; {name}: {_format_thresholds(values)}"
            if r.status in ("unsupported", "kept float"):
                thresholds = f"{r.status}: {r.note}"
            elif r.export == EXPORT_FOLDED:
                thresholds = r.export_note
            elif r.status == "quantized" and r.export != EXPORT_PACKED and r.export_note:
                thresholds = (f"{thresholds}; " if thresholds else "") + f"exported as float: {r.export_note}"
            rows.append((r.name, r.type, r.method, "-" if r.weight_bits is None else str(r.weight_bits),
                         "-" if r.activation_bits is None else str(r.activation_bits),
                         f"{r.params:,}", f"{r.float_bytes:,}", f"{r.packed_bytes:,}", r.export or "-", thresholds))
        rows.append(("total", "", "", "", "", f"{self.total_params:,}", f"{self.float_bytes:,}",
                     f"{self.packed_bytes:,}", "", f"compression {self.compression:.2f}x"))
        widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header) - 1)]
        lines = []
        for row in [header] + rows:
            cells = [str(c).ljust(w) if i < 3 or i == 8 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells + [str(row[-1])]).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        if self.implementation is not None and any(r.activation_method in ("n2uq", "uniform") for r in self.layers):
            lines.append(f"N2UQ activation quantizers train with: {_IMPLEMENTATION_NAMES[self.implementation]}")
        return "\n".join(lines)

    def summary(self, print_fn=print):
        print_fn(str(self))


_IMPLEMENTATION_NAMES = {"fused": "fused (C++ kernel, CPU, no XLA)", "reference": "reference (pure TF, XLA-compilable)"}


def _format_thresholds(values):
    shown = values if len(values) <= 4 else values[:3] + [values[-1]]
    text = " ".join(f"{t:.3g}" for t in shown)
    if len(values) > 4:  # first three ... last
        parts = text.split(" ")
        text = " ".join(parts[:3] + ["...", parts[3]]) + f" ({len(values)} thresholds)"
    return text


def _quantized_report(quantized, params):
    """The row of a quantized layer (a `n2uq_tf.model_reader.QuantizedLayer`), ``params`` its float values."""
    report = LayerReport(quantized.path, type(quantized.layer).__name__, "quantized", quantized.weight_bits,
                         quantized.activation_bits, weight_method=quantized.weight_method)
    if quantized.input is not None:
        variables = quantized.input.variables
        report.activation_method = quantized.input.method
        if "beta1" in variables and "beta2" in variables:
            report.beta1, report.beta2 = float(variables["beta1"].numpy()), float(variables["beta2"].numpy())
        levels = quantized.input.levels()
        report.thresholds = model_reader.input_units(levels.thresholds, levels.input_scale)
        report.step = float(levels.step)
    if quantized.intermediate:
        report.intermediate_thresholds = {q.name: q.input_thresholds() for q in quantized.intermediate}
    # Packed bytes come from the export plan (quantization_report); float until then.
    report.params, report.float_bytes, report.packed_bytes = params, FLOAT_BYTES * params, FLOAT_BYTES * params
    return report


def _export_plan(model):
    """{layer name: [LayerExport, ...]} of the exporter's plan for `model` (the same decisions
    export_tflite takes), or the reason it cannot export the model."""
    from n2uq_tf.export.lowering import lower
    try:
        plan = lower(model).report
    except ValueError as error:
        return None, str(error)
    rows = {}
    for row in plan.layers:
        rows.setdefault(row.name, []).append(row)
    return rows, None


def _apply_export_plan(row, exported):
    """Sets the row's export decision and its packed bytes to what the file will hold for it."""
    row.export = _EXPORT_OF_STATUS[exported.status]
    if exported.status == "folded":
        row.export_note = exported.reason  # "folded into <layer>"
        row.packed_bytes = 0
    else:
        if exported.status == "builtin":
            row.export_note = exported.reason
        row.packed_bytes = exported.packed_bytes + exported.float_bytes


def quantization_report(model: Any) -> QuantizationReport:
    """Per-layer bits, parameters, learned thresholds, packed size and export of a (quantized) model.

    Each row says what `export_tflite` will make of the layer (``export``), decided by the
    exporter's own plan (`n2uq_tf.export.plan_export`): ``"packed"`` (bit-packed N2UQ custom
    ops), ``"float"`` (a float TFLite builtin; for a quantized layer ``export_note`` says why,
    e.g. more than 4 bits, LSQ weights with a zero level, float weights) or ``"folded"`` (a
    BatchNormalization folded into the preceding N2UQ op). ``packed_bytes`` is what the layer
    adds to the exported file's weight data: a packed layer's bit-packed kernel plus its float32
    per-channel multiplier and bias and its thresholds; a folded BatchNormalization nothing;
    every other layer (quantized layers exported as float included) 4 bytes per value.
    ``float_bytes`` is 4 bytes per parameter. ``print(report)`` shows a table;
    ``report.to_dict()`` gives the numbers. A `DistillationModel` is reported by its student.
    ``implementation`` says which N2UQ activation-quantizer kernel training takes, for the
    model's ``jit_compile`` and the devices TensorFlow sees.
    """
    from n2uq_tf.export.source import inference_model
    from n2uq_tf.quantize.api import check_model
    implementation = ops.active_implementation(jit_compile=bool(getattr(model, "jit_compile", False)))
    model = inference_model(model)
    check_model(model)
    reader = model_reader.reader_for(model)
    rows = []
    for walked in reader.walk(model):  # layers inside nested models are named by their path
        layer = walked.layer
        size = reader.float_parameter_count(layer)  # a quantized layer's: its quantizer parameters too
        quantized = reader.quantized(layer, walked.path)
        if quantized is not None:
            rows.append(_quantized_report(quantized, size))
            continue
        reason = reader.unsupported_reason(layer)
        if reason is not None:
            status, note = "unsupported", reason
        elif reader.is_quantizable(layer):
            status, note = "kept float", "not quantized (skip_layers or overrides)"
        else:
            status, note = "float", ""
        rows.append(LayerReport(walked.path, type(layer).__name__, status, params=size,
                                float_bytes=FLOAT_BYTES * size, packed_bytes=FLOAT_BYTES * size, note=note))
    plan, not_exportable = _export_plan(model)
    for row in rows:
        exported = plan.get(row.name) if plan is not None else None
        if exported:
            _apply_export_plan(row, exported.pop(0))
        elif not_exportable is not None and row.status == "quantized":
            row.export_note = f"the model cannot be exported: {not_exportable}"  # nothing is packed then
    return QuantizationReport(rows, implementation)
