"""quantization_report: what was quantized, with which bits, what it learned and what it saves."""

import dataclasses
import math

import numpy as np

from n2uq_tf._keras import keras
from n2uq_tf.quantize import registry
from n2uq_tf.quantize.wrapper import N2UQWrapper

FLOAT_BYTES = 4


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
    weight_method: str = None     # "n2uq", "dorefa", "lsq", ... (n2uq_tf.quantize.methods.METHODS)
    activation_method: str = None
    step: float = None            # activation output step (beta2 * delta for N2UQ)

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
                "packed_bytes": self.packed_bytes, "compression": self.compression}

    def __str__(self):
        header = ("layer", "type", "method", "W", "A", "params", "float32 B", "packed B", "thresholds (input units)")
        rows = []
        for r in self.layers:
            if r.params == 0 and r.status == "float":
                continue
            thresholds = ""
            if r.thresholds is not None:
                shown = r.thresholds if len(r.thresholds) <= 4 else r.thresholds[:3] + [r.thresholds[-1]]
                thresholds = " ".join(f"{t:.3g}" for t in shown)
                if len(r.thresholds) > 4:  # first three ... last
                    parts = thresholds.split(" ")
                    thresholds = " ".join(parts[:3] + ["...", parts[3]]) + f" ({len(r.thresholds)} thresholds)"
            if r.status in ("unsupported", "kept float"):
                thresholds = f"{r.status}: {r.note}"
            rows.append((r.name, r.type, r.method, "-" if r.weight_bits is None else str(r.weight_bits),
                         "-" if r.activation_bits is None else str(r.activation_bits),
                         f"{r.params:,}", f"{r.float_bytes:,}", f"{r.packed_bytes:,}", thresholds))
        rows.append(("total", "", "", "", "", f"{self.total_params:,}", f"{self.float_bytes:,}",
                     f"{self.packed_bytes:,}", f"compression {self.compression:.2f}x"))
        widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header) - 1)]
        lines = []
        for row in [header] + rows:
            cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells + [str(row[-1])]).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    def summary(self, print_fn=print):
        print_fn(str(self))


def _walk(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not isinstance(layer, N2UQWrapper):
            yield from _walk(layer)
        else:
            yield layer


def _float_weights(variables):
    return [v for v in variables if v.dtype.is_floating]


def _wrapper_report(wrapper):
    layer = wrapper.layer
    config = wrapper.quantize_config
    # tfmot swaps the inner layer's kernel attribute for the quantized tensor, so the
    # wrapper (not the inner layer) is where every variable is listed.
    quantized_ids = {id(weight) for weight, _, _ in wrapper._weight_vars}
    params = packed = 0
    seen = set()
    for v in _float_weights(wrapper.weights):
        if id(v) in seen:
            continue
        seen.add(id(v))
        size = int(np.prod(v.shape))
        params += size
        if id(v) in quantized_ids:
            channels = int(np.prod([v.shape[a] for a in np.atleast_1d(config.channel_axis)]))
            packed += math.ceil(size * config.weight_bits / 8) + FLOAT_BYTES * channels
        else:
            packed += FLOAT_BYTES * size
    report = LayerReport(layer.name, type(layer).__name__, "quantized", config.weight_bits,
                         config.activation_bits)
    if config.weight_bits is not None:
        report.weight_method = getattr(config, "weight_method", "n2uq")
    if wrapper.input_quantizer is not None:
        quantizer, variables = wrapper.input_quantizer
        report.activation_method = getattr(quantizer, "method", "n2uq")
        levels = quantizer.uniform_levels(variables)
        if "beta1" in variables and "beta2" in variables:
            report.beta1, report.beta2 = float(variables["beta1"].numpy()), float(variables["beta2"].numpy())
        scale = float(levels.input_scale)
        t = np.asarray(levels.thresholds, np.float64)
        report.thresholds = [float(v) for v in (t / scale if scale != 0 else t)]
        report.step = float(levels.step)
    report.params, report.float_bytes, report.packed_bytes = params, FLOAT_BYTES * params, packed
    return report


def quantization_report(model):
    """Per-layer bits, parameters, learned thresholds and packed size of a (quantized) model.

    ``packed_bytes`` counts quantized kernels at their bit width plus a float32 scale per
    output channel, and everything else (biases, BatchNorm, quantizer parameters, float
    layers) at 4 bytes per value. ``print(report)`` shows a table; ``report.to_dict()``
    gives the numbers.
    """
    from n2uq_tf.quantize.api import check_model
    check_model(model)
    rows = []
    for layer in _walk(model):
        if isinstance(layer, N2UQWrapper):
            rows.append(_wrapper_report(layer))
            continue
        size = sum(int(np.prod(v.shape)) for v in _float_weights(layer.weights))
        reason = registry.unsupported_reason(layer)
        if reason is not None:
            status, note = "unsupported", reason
        elif registry.lookup(layer) is not None:
            status, note = "kept float", "not quantized (skip_layers or overrides)"
        else:
            status, note = "float", ""
        rows.append(LayerReport(layer.name, type(layer).__name__, status, params=size,
                                float_bytes=FLOAT_BYTES * size, packed_bytes=FLOAT_BYTES * size, note=note))
    return QuantizationReport(rows)
