"""Lowering a quantized tf_keras model to a TF graph of N2UQ custom ops and builtins.

`lower(model)` walks the model's own functional graph (nested functional models included)
and calls every layer in inference mode, except that each `N2UQWrapper` it can lower
(Conv2D, DepthwiseConv2D, Dense and their padded variants, Conv1D as a 2-D conv of height 1,
SeparableConv2D as two quantize + conv pairs; 1..4 bits) becomes the quantize(-and-pack) op
plus a bit-serial conv / FC op of `custom_ops`, with a directly following BatchNormalization
folded into the last op's per-channel multiplier and bias.
Wrappers it cannot lower stay float builtins on fake-quantized constants, so the graph
still computes the Keras model's inference outputs. The result is a tf.Module whose
`__call__` is the function the TFLite converter sees; the custom ops' bodies are the plain-TF
references, so it also runs in TensorFlow (the pre-conversion self-check).
"""

import collections
import dataclasses
import math

import numpy as np
import tensorflow as tf

from n2uq_tf import model_reader
from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops
from n2uq_tf.layers import PaddedConv2D, PaddedDepthwiseConv2D, RPReLU
from n2uq_tf.quantize import method_table

MAX_EXPORT_BITS = 4  # the custom ops' bit range (custom_ops: "bits of a quantized tensor are 1..4")
FLOAT_BYTES = 4

def _kind(layer):
    """The tf_keras class whose lowering a layer takes: its own class, or for one of Keras 3's own
    layer classes (the Keras 3 front end, `n2uq_tf.keras3`) the tf_keras class of the same name."""
    cls = type(layer)
    if cls.__module__.startswith("keras.src.layers."):
        return getattr(keras.layers, cls.__name__, cls)
    return cls


_DENSE_TYPES = (keras.layers.Dense,)
_ONE_D_TYPES = (keras.layers.Conv1D,)  # lowered as 2-D convs of height 1, on [batch, 1, width, channels]

# The custom conv / FC op of each stage of a lowerable layer, in order; each is preceded by its
# quantize(-and-pack) op. SeparableConv2D: depthwise, then its "pointwise_input" quantizer and a 1x1 conv.
_STAGE_OPS = {
    keras.layers.Conv1D: (custom_ops.OP_CONV2D,),
    keras.layers.Conv2D: (custom_ops.OP_CONV2D,),
    PaddedConv2D: (custom_ops.OP_CONV2D,),
    keras.layers.DepthwiseConv2D: (custom_ops.OP_DEPTHWISE_CONV2D,),
    PaddedDepthwiseConv2D: (custom_ops.OP_DEPTHWISE_CONV2D,),
    keras.layers.SeparableConv2D: (custom_ops.OP_DEPTHWISE_CONV2D, custom_ops.OP_CONV2D),
    keras.layers.Dense: (custom_ops.OP_FULLY_CONNECTED,),
}
# Output tensor name suffix of a stage that is not a layer's last ("<layer>/depthwise").
_STAGE_LABELS = {custom_ops.OP_DEPTHWISE_CONV2D: "depthwise", custom_ops.OP_CONV2D: "conv",
                 custom_ops.OP_FULLY_CONNECTED: "fully_connected"}


@dataclasses.dataclass
class LayerExport:
    """What the exporter did with one layer of the model."""
    name: str
    type: str
    status: str                   # "lowered", "builtin" (a quantized layer kept float) or "float"
    ops: list = dataclasses.field(default_factory=list)   # TFLite ops it became ("builtin" for float ones)
    weight_bits: int = None
    activation_bits: int = None
    weight_count: int = 0         # quantized kernel values
    packed_bytes: int = 0         # bytes of the bit-packed kernel in the file
    float_bytes: int = 0          # float32 bytes this layer adds (params, or multiplier/bias/thresholds)
    folded: str = None            # name of the BatchNormalization folded into this layer
    reason: str = ""              # why a quantized layer was kept builtin
    fused: list = dataclasses.field(default_factory=list)  # output stages fused into its op (export_tflite)


@dataclasses.dataclass
class ExportReport:
    """Per-layer export decisions, and file sizes once converted.

    ``packed_bytes`` / ``float_bytes`` / ``expected_bytes`` are planned from the Keras layers;
    ``file_bytes``, ``data_bytes`` and ``size_ratio`` are measured on the written file, the
    same figures as `inspect_tflite` gives for it.
    """
    layers: list
    inference_type: str = "float"
    file_bytes: int = None        # size of the .tflite, once converted
    data_bytes: int = None        # its weight data: packed N2UQ kernels + every other constant buffer

    @property
    def lowered(self):
        return [r for r in self.layers if r.status == "lowered"]

    @property
    def kept_builtin(self):
        return [r for r in self.layers if r.status == "builtin"]

    @property
    def packed_bytes(self):
        return sum(r.packed_bytes for r in self.layers)

    @property
    def float_bytes(self):
        return sum(r.float_bytes for r in self.layers)

    @property
    def expected_bytes(self):
        """Planned weight data: packed quantized kernels + the layers' float32 values."""
        return self.packed_bytes + self.float_bytes

    @property
    def size_ratio(self):
        """The file's overhead: file bytes / its weight data (`TFLiteInspection.size_ratio`)."""
        if self.file_bytes is None or not self.data_bytes:
            return None
        return self.file_bytes / self.data_bytes

    def to_dict(self):
        return {"layers": [dataclasses.asdict(r) for r in self.layers], "inference_type": self.inference_type,
                "packed_bytes": self.packed_bytes, "float_bytes": self.float_bytes,
                "expected_bytes": self.expected_bytes, "file_bytes": self.file_bytes,
                "data_bytes": self.data_bytes, "size_ratio": self.size_ratio}

    def __str__(self):
        header = ("layer", "type", "W", "A", "exported as", "packed B", "float B", "note")
        rows = []
        for r in self.layers:
            if r.status == "float" and not r.float_bytes:
                continue
            note = r.reason if r.status == "builtin" else "; ".join(
                ([f"+ folded {r.folded}"] if r.folded else []) + [f"fused: {f}" for f in r.fused])
            rows.append((r.name, r.type, "-" if r.weight_bits is None else str(r.weight_bits),
                         "-" if r.activation_bits is None else str(r.activation_bits),
                         " + ".join(r.ops) if r.status == "lowered" else r.status,
                         f"{r.packed_bytes:,}", f"{r.float_bytes:,}", note))
        total_note = ""
        if self.file_bytes is not None and self.data_bytes:
            total_note = f"file {self.file_bytes:,} B = {self.size_ratio:.3f} x its weight data ({self.data_bytes:,} B)"
        rows.append(("total", "", "", "", "", f"{self.packed_bytes:,}", f"{self.float_bytes:,}", total_note))
        widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header) - 1)]
        lines = []
        for row in [header] + rows:
            cells = [c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        rule = "-" * max(len(line) for line in lines)
        lines.insert(1, rule)
        lines.insert(len(lines) - 1, rule)
        return "\n".join(lines)


# ------------------------------------------------------------------ per-layer plans

def _is_linear(activation):
    return activation is None or activation is keras.activations.linear or \
        getattr(activation, "__name__", "") == "linear"


def _tf_same_padding(size, kernel, stride, dilation):
    """TF's 'SAME' padding (before, after) of one spatial dim of static `size`."""
    extent = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _foldable_bn(bn, rank):
    """Why a BatchNormalization cannot be folded into the preceding op, or None if it can."""
    if _kind(bn) is not keras.layers.BatchNormalization:
        return "not a BatchNormalization"
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in axis] != [rank - 1]:
        return "normalizes another axis than the channels"
    if getattr(bn, "renorm", False) or getattr(bn, "virtual_batch_size", None) or getattr(bn, "adjustment", None):
        return "uses renorm, virtual batches or an adjustment"
    return None


def _bn_affine(bn):
    """(scale, shift) in float64 with bn(x) = scale * x + shift in inference mode."""
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(bn.epsilon))
    return scale, beta - scale * mean


def _activation_state(activation):
    """Thresholds T (float32), input scale and output step of a `model_reader.QuantizedActivation`.

    Any method: its levels give its inference output exactly as step * #{x * input_scale > T_i}
    (N2UQ: input_scale beta1, step beta2 * delta). The ops take T and the scale as they are (no
    division into input units), so the export is exact for any scale.
    """
    levels = activation.levels()
    return (np.asarray(levels.thresholds, np.float32), np.float32(levels.input_scale), np.float32(levels.step))


def _builtin_reason(quantized, input_shape):
    """Why a quantized layer (`model_reader.QuantizedLayer`) cannot be lowered to custom ops, or None if it can."""
    layer = quantized.layer
    if quantized.weight_bits is None:
        return "weights not quantized (weight_bits=None)"
    if quantized.input is None:
        return "input not quantized (activation_bits=None)"
    try:
        method_table.check_exportable(quantized.wrapper)
    except ValueError as error:
        return str(error)
    if quantized.weight_bits > MAX_EXPORT_BITS or quantized.activation_bits > MAX_EXPORT_BITS:
        return (f"W{quantized.weight_bits}A{quantized.activation_bits}: the custom ops take "
                f"1..{MAX_EXPORT_BITS} bits")
    stages = _STAGE_OPS.get(_kind(layer))
    if stages is None:
        return f"no custom op for {type(layer).__name__}"
    if len(quantized.weights) != len(stages):
        return (f"{len(quantized.weights)} quantized weights; {type(layer).__name__} is lowered with "
                f"{len(stages)}")
    if len(quantized.intermediate) != len(stages) - 1:
        return f"no quantizer between the stages of {type(layer).__name__}"
    rank = len(input_shape)
    if _kind(layer) in _DENSE_TYPES:
        if rank != 2:
            return f"Dense on a rank-{rank} input (only [batch, features] is lowered)"
        if input_shape[-1] is None:
            return "unknown input features"
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "data_format='channels_first'"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    one_d = _kind(layer) in _ONE_D_TYPES
    spatial = "width" if one_d else "height, width"
    if rank != (3 if one_d else 4) or input_shape[-1] is None:
        return f"input shape {tuple(input_shape)} is not [batch, {spatial}, channels]"
    padding = getattr(layer, "padding", "valid")
    if not isinstance(layer, (PaddedConv2D, PaddedDepthwiseConv2D)) and padding == "same" \
            and any(size is None for size in input_shape[1:-1]):
        return f"'same' padding on an input of unknown {spatial}"
    if padding not in ("same", "valid", "causal"):  # 'causal' exists on Conv1D only
        return f"padding={padding!r}"
    return None


# Geometry of a 2-D conv op: kernel (height, width), strides, dilations, ((top, bottom), (left, right)),
# and whether those pads are 'same' (then the kernel computes them for the input size it gets, a
# resized input too; `paddings` holds them at the export-time size, for the static shapes).
_Geometry = collections.namedtuple("_Geometry", ["kernel_size", "strides", "dilations", "paddings", "same"])
_POINTWISE = _Geometry((1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), False)


def _conv_geometry(layer, input_shape):
    """The `_Geometry` of a conv layer's (first) op; a Conv1D is a 2-D conv of height 1."""
    if _kind(layer) in _ONE_D_TYPES:
        kernel, strides, dilations = ((1, int(v[0])) for v in (layer.kernel_size, layer.strides, layer.dilation_rate))
        spatial = (1, input_shape[1])
    else:
        kernel, strides, dilations = (tuple(int(d) for d in v)
                                      for v in (layer.kernel_size, layer.strides, layer.dilation_rate))
        spatial = tuple(input_shape[1:3])
    same = False
    if isinstance(layer, (PaddedConv2D, PaddedDepthwiseConv2D)):
        paddings = tuple(tuple(p) for p in layer.explicit_padding)
    elif layer.padding == "causal":  # Conv1D: all of the padding before the sequence, (k - 1) * d steps
        paddings = ((0, 0), ((kernel[1] - 1) * dilations[1], 0))
    elif layer.padding == "same":
        paddings = tuple(_tf_same_padding(int(spatial[i]), kernel[i], strides[i], dilations[i]) for i in range(2))
        same = True
    else:
        paddings = ((0, 0), (0, 0))
    return _Geometry(kernel, strides, dilations, paddings, same)


class _Stage:
    """One quantize(-and-pack) op and one bit-serial conv / FC op, constants ready.

    ``name`` names the op's output tensor in the file; ``tap`` is the key of its activation
    codes in `LoweredModel.activation_codes`.
    """

    def __init__(self, *, name, tap, layer, kind, quantizer, weight, in_channels, report, geometry=None,
                 depth_multiplier=1, conv_bias=None, bn=None, one_d=False):
        self.name, self.tap, self.layer, self.kind, self.report, self.one_d = name, tap, layer, kind, report, one_d
        wb, ab = report.weight_bits, report.activation_bits
        self.act_bits = ab
        self.thresholds, input_scale, step = _activation_state(quantizer)
        _, kernel_var, weight_quantizer, variables = weight
        view = weight_quantizer.integer_view(tf.convert_to_tensor(kernel_var, tf.float32), variables)
        codes, weight_scale = np.asarray(view.codes), np.asarray(view.scale, np.float64)
        out_channels = int(np.prod(weight_scale.shape))
        in_channels = self.in_channels = int(in_channels)
        n_w = 2 ** wb - 1
        if view.zero2 != n_w:  # check_exportable keeps such layers builtin
            raise ValueError(f"layer {layer.name!r}: weight zero2 {view.zero2} is not 2^b - 1")

        # Folding. The quantizer outputs step_a * m (m the activation code; N2UQ: step_a =
        # beta2 * delta_a) and the kernel is scale_c * (2k - n_w) / 2 (N2UQ: scale_c = 2 alpha_c / n_w),
        # so the layer computes
        #   conv = step_a * scale_c / 2 * (2 * sum(m k) - n_w * sum(m)) + conv_bias_c,
        # the accumulator in brackets being what the custom op computes exactly. A following
        # BN, y = g * (conv - mean) / sqrt(var + eps) + b = s_c * conv + (b - s_c * mean), gives
        #   multiplier_c = s_c * step_a * scale_c / 2,
        #   bias_c = s_c * (conv_bias_c - mean_c) + b_c,  s_c = g_c / sqrt(var_c + eps)
        # (g = 1 / b = 0 for a BN without scale / center). float64 here, float32 in the file.
        multiplier = float(step) * weight_scale.reshape(-1) / 2.0
        conv_bias = np.zeros(out_channels) if conv_bias is None else np.asarray(conv_bias, np.float64).reshape(-1)
        if bn is not None:
            s, shift = _bn_affine(bn)
            multiplier, bias = s * multiplier, s * conv_bias + shift
        else:
            bias = conv_bias
        self.multiplier = multiplier.astype(np.float32)
        self.bias = bias.astype(np.float32)

        if kind == custom_ops.OP_FULLY_CONNECTED:
            ordered = codes.T  # [IN][OUT] -> [OUT][IN]
            self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale)
            self.op = custom_ops.fully_connected_fn(in_features=in_channels, out_features=out_channels,
                                                    act_bits=ab, weight_bits=wb)
            self.quantize_name = custom_ops.OP_QUANTIZE_PACK
        else:
            self.kernel_size, self.strides, self.dilations, self.paddings, same = geometry
            kh, kw = self.kernel_size
            conv_options = dict(kernel_size=(kh, kw), strides=self.strides, dilations=self.dilations,
                                paddings=custom_ops.SAME if same else self.paddings, act_bits=ab, weight_bits=wb)
            if kind == custom_ops.OP_DEPTHWISE_CONV2D:
                ordered = codes  # [KH][KW][C][M], flattened as it is
                self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale, pack=False)
                self.quantize_name = custom_ops.OP_QUANTIZE
                self.op = custom_ops.depthwise_conv2d_fn(in_channels=in_channels,
                                                         depth_multiplier=int(depth_multiplier), **conv_options)
            else:
                # HWIO -> [OC][KH][KW][IC]; a Conv1D's [K][IC][OC] is HWIO of height 1, a pointwise
                # kernel [1][1][IC][OC].
                ordered = codes.reshape(kh, kw, in_channels, out_channels).transpose(3, 0, 1, 2)
                self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale)
                self.quantize_name = custom_ops.OP_QUANTIZE_PACK
                self.op = custom_ops.conv2d_fn(in_channels=in_channels, out_channels=out_channels, **conv_options)
        self._stubs = None
        self.stream = custom_ops.pack_weight_codes(ordered, wb)
        self.weight_count = int(codes.size)
        self.float_bytes = FLOAT_BYTES * (2 * out_channels + self.thresholds.size)

    def output_shapes(self, x_shape):
        """Static shapes (batch None) of the quantize op's and the layer op's outputs."""
        x_shape = list(x_shape)
        out = len(self.multiplier)
        if self.kind == custom_ops.OP_FULLY_CONNECTED:
            return x_shape[:-1] + [self.act_bits, custom_ops.words_per_plane(self.in_channels)], \
                x_shape[:-1] + [out]
        spatial = []
        for i in range(2):
            extent = (self.kernel_size[i] - 1) * self.dilations[i] + 1
            size = x_shape[1 + i]
            spatial.append(None if size is None else
                           (size + sum(self.paddings[i]) - extent) // self.strides[i] + 1)
        if self.kind == custom_ops.OP_DEPTHWISE_CONV2D:
            q_shape = x_shape
        else:
            q_shape = x_shape[:-1] + [self.act_bits, custom_ops.words_per_plane(self.in_channels)]
        return q_shape, x_shape[:1] + spatial + [out]

    def stubs(self, x_shape):
        """The two ops with the same names, options and signatures but empty bodies.

        The converter replaces each body by one CUSTOM op anyway; converting the reference bodies
        (bit unpacking, float64 convolutions, a per-channel loop for depthwise) took ~0.7 s per
        layer of converter time for nothing.
        """
        q_shape, y_shape = self.output_shapes(x_shape)
        q_dtype = tf.uint8 if self.kind == custom_ops.OP_DEPTHWISE_CONV2D else tf.int64

        def shaped(like, shape, dtype):
            dims = [tf.shape(like)[0] if d is None else d for d in shape]
            return tf.zeros(tf.stack(dims), dtype)

        def quantize(x, thresholds):
            return shaped(x, q_shape, q_dtype)

        def op(q, stream, multiplier, bias):
            return shaped(q, y_shape, tf.float32)

        return (tf.function(quantize, experimental_implements=_implements_of(self.quantize), autograph=False),
                tf.function(op, experimental_implements=_implements_of(self.op), autograph=False))

    def __call__(self, x, taps, stub=False):
        if stub:
            if self._stubs is None:
                self._stubs = self.stubs(x.shape.as_list())
            quantize, op = self._stubs
        else:
            quantize, op = self.quantize, self.op
        q = quantize(x, tf.constant(self.thresholds))
        if taps is not None:
            taps[self.tap] = q
        return op(q, tf.constant(self.stream), tf.constant(self.multiplier), tf.constant(self.bias))


class _Lowered:
    """One N2UQWrapper call lowered to custom ops: its stages (`_STAGE_OPS`), then its activation.

    A SeparableConv2D is two stages: the input quantizer and the depthwise op, then its
    "pointwise_input" quantizer and a 1x1 conv carrying the bias (and a folded BN). A Conv1D runs
    as a 2-D conv of height 1: its input is expanded to [batch, 1, width, channels] and the
    output squeezed back.
    """

    def __init__(self, quantized, input_shape, bn, prefix=""):
        layer = quantized.layer
        # Named by its path (n2uq_tf.model_reader): in the report, the activation codes and
        # the .tflite tensor names, as in quantization_report.
        self.name, self.layer, self.bn = quantized.path, layer, bn
        self.one_d = _kind(layer) in _ONE_D_TYPES
        self.activation = None if _is_linear(getattr(layer, "activation", None)) else layer.activation
        self.report = LayerExport(self.name, type(layer).__name__, "lowered", [], quantized.weight_bits,
                                  quantized.activation_bits, folded=None if bn is None else prefix + bn.name)
        quantizers = [(self.name, quantized.input)] + [
            (f"{self.name}/{between.name}", between) for between in quantized.intermediate]
        kinds = _STAGE_OPS[_kind(layer)]
        shape = list(input_shape)
        if self.one_d:
            shape.insert(1, 1)
        self.stages = []
        for i, kind in enumerate(kinds):
            last = i == len(kinds) - 1
            tap, quantizer = quantizers[i]
            if kind == custom_ops.OP_FULLY_CONNECTED:
                geometry = None
            else:
                geometry = _conv_geometry(layer, input_shape) if i == 0 else _POINTWISE
            stage = _Stage(
                name=self.name if last else f"{self.name}/{_STAGE_LABELS[kind]}", tap=tap, layer=layer, kind=kind,
                quantizer=quantizer, weight=quantized.weights[i], in_channels=shape[-1], report=self.report,
                geometry=geometry, one_d=self.one_d,
                depth_multiplier=getattr(layer, "depth_multiplier", 1) if kind == custom_ops.OP_DEPTHWISE_CONV2D else 1,
                conv_bias=layer.bias.numpy() if last and getattr(layer, "use_bias", False) else None,
                bn=bn if last else None)
            shape = stage.output_shapes(shape)[1]
            self.stages.append(stage)
        self.report.ops = [op for s in self.stages for op in (s.quantize_name, s.kind)]
        self.report.weight_count = sum(s.weight_count for s in self.stages)
        self.report.packed_bytes = sum(int(s.stream.size) for s in self.stages)
        self.report.float_bytes = sum(s.float_bytes for s in self.stages)
        if self.activation is not None:
            self.report.ops.append(f"builtin {getattr(self.activation, '__name__', 'activation')}")

    def __call__(self, x, taps, stub=False):
        with tf.name_scope(self.name):
            if self.one_d:
                x = tf.expand_dims(x, 1)
            for stage in self.stages:
                x = stage(x, taps, stub)
            if self.one_d:
                x = tf.squeeze(x, 1)
            if self.activation is not None:
                x = self.activation(x)
        return x


def _implements_of(function):
    """The experimental_implements text of a custom_ops tf.function (name and options)."""
    from google.protobuf import text_format
    return text_format.MessageToString(function._attributes["_implements"].func, as_one_line=True)


def _builtin_quantize(x, thresholds, input_scale, step):
    """The activation quantizer as TFLite builtins: step * #{x * input_scale > T_i}."""
    xs = tf.cast(x, tf.float32) * tf.constant(input_scale, tf.float32)
    if thresholds.size <= 15:
        level = tf.add_n([tf.cast(xs > float(t), tf.float32) for t in thresholds])
    else:
        # Bucketize counts boundaries <= x; the next float above T turns that into T < x.
        upper = np.nextafter(thresholds, np.float32(np.inf)).astype(np.float32)
        level = tf.cast(tf.raw_ops.Bucketize(input=xs, boundaries=[float(t) for t in upper]), tf.float32)
    return level * tf.constant(step, tf.float32)


class _KeptBuiltin:
    """A quantized layer kept as float builtins: its own layer call on fake-quantized constant kernels."""

    def __init__(self, quantized, reason, reader):
        self.quantized, self.reader = quantized, reader
        layer = quantized.layer
        self.name = quantized.path
        self.kernels = {}
        count = 0
        for weight in quantized.weights:
            w = tf.convert_to_tensor(weight.variable, tf.float32)
            count += int(np.prod(w.shape))
            # the method's inference weights
            self.kernels[weight.attr] = weight.quantizer(w, False, weights=weight.variables).numpy()
        self.act = _activation_state(quantized.input) if quantized.input is not None else None
        # A split layer (SeparableConv2D) has its intermediate quantizer as builtins too.
        self.between = [_activation_state(between) for between in quantized.intermediate]
        ops_used = ["builtin"]
        self.report = LayerExport(
            self.name, type(layer).__name__, "builtin", ops_used, quantized.weight_bits, quantized.activation_bits,
            count, 0, FLOAT_BYTES * reader.float_parameter_count(quantized.wrapper), reason=reason)

    def __call__(self, x, taps, stub=False):
        with tf.name_scope(self.name):
            if self.act is not None:
                x = _builtin_quantize(x, *self.act)
            kernels = {attr: tf.constant(k) for attr, k in self.kernels.items()}
            between = None
            if self.between:
                [state] = self.between
                between = lambda t: _builtin_quantize(t, *state)  # noqa: E731
            return self.reader.call_with_kernels(self.quantized, x, kernels, between)


class _RPReLU:
    """RPReLU as ADD, PRELU, ADD: the converter fuses relu(y) + (-alpha) * relu(-y) into one PRELU.

    Exact: for y < 0 both give alpha * y, for y >= 0 both give y. The layer's own call
    (relu(y) - alpha * relu(-y)) converts to seven ops instead. The fusion only happens when
    alpha has the rank of x without its batch axis ([1, 1, C] for NHWC).
    """

    def __init__(self, layer):
        self.name = layer.name
        self.bias1, self.bias2 = (np.asarray(v.numpy(), np.float32) for v in (layer.bias1, layer.bias2))
        self.neg_alpha = -np.asarray(layer.alpha.numpy(), np.float32)

    def __call__(self, x, taps, stub=False):
        with tf.name_scope(self.name):
            y = x + tf.constant(self.bias1)
            neg_alpha = self.neg_alpha.reshape([1] * (x.shape.rank - 2) + [-1])
            y = tf.nn.relu(y) + tf.constant(neg_alpha) * tf.nn.relu(-y)
            return y + tf.constant(self.bias2)


# ------------------------------------------------------------------ the graph walk

class _GraphPlan:
    """Per node of one functional model: how to compute it (nested models get their own plan).

    The nodes are the reader's (`model_reader.GraphNode`): the model's own graph, inputs first.
    """

    def __init__(self, model, records, reader, prefix=""):
        self.model, self.reader = model, reader
        self.steps = []      # (node, handler or None, skip_ids)
        nodes = reader.graph_nodes(model)
        consumers = {}
        for node in nodes:
            for t_id in set(node.input_ids):
                consumers.setdefault(t_id, []).append(node)
        output_ids = {reader.tensor_id(t) for t in model.outputs}
        self.absorbed = set()    # ids of BN nodes folded into the preceding op
        nested_plans = {}
        for node in nodes:
            if node.is_input or id(node) in self.absorbed:
                continue
            layer = node.layer
            quantized = reader.quantized(layer)
            if quantized is not None:
                quantized = dataclasses.replace(quantized, path=prefix + quantized.path)
                handler, bn_node = self._plan_wrapper(node, quantized, consumers, output_ids, prefix)
                records.append(("wrapper", handler))
                if bn_node is not None:
                    self.absorbed.add(id(bn_node))
                    records.append(("bn", bn_node.layer, handler.name, prefix))
                self.steps.append((node, handler, bn_node))
            elif reader.is_functional(layer):
                if id(layer) not in nested_plans:  # a nested model called twice is planned (and reported) once
                    nested_plans[id(layer)] = _GraphPlan(layer, records, reader,
                                                         prefix + layer.name + model_reader.SEPARATOR)
                self.steps.append((node, nested_plans[id(layer)], None))
            elif type(layer) is RPReLU and layer.dtype == "float32":
                records.append(("layer", layer, prefix))
                self.steps.append((node, _RPReLU(layer), None))
            else:
                records.append(("layer", layer, prefix))
                self.steps.append((node, None, None))

    def _plan_wrapper(self, node, quantized, consumers, output_ids, prefix):
        inputs = node.inputs
        input_shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
        reason = "more than one input" if len(inputs) != 1 else _builtin_reason(quantized, input_shape)
        if reason is not None:
            return _KeptBuiltin(quantized, reason, self.reader), None
        bn_node = None
        out_ids = node.output_ids
        users = consumers.get(out_ids[0], []) if len(out_ids) == 1 else []
        if (len(users) == 1 and out_ids[0] not in output_ids
                and _is_linear(getattr(quantized.layer, "activation", None)) and len(users[0].input_ids) == 1
                and _foldable_bn(users[0].layer, len(input_shape)) is None):
            bn_node = users[0]
        return _Lowered(quantized, input_shape, None if bn_node is None else bn_node.layer, prefix), bn_node

    def run(self, inputs, taps, stub=False):
        """Computes the model's outputs for `inputs` (a flat list matching model.inputs)."""
        values = {self.reader.tensor_id(t): v for t, v in zip(self.model.inputs, inputs)}
        for node, handler, bn_node in self.steps:
            if any(t_id not in values for t_id in node.input_ids):
                raise ValueError(f"cannot compute layer {node.layer.name!r}: an input is not computed "
                                 "(is the model a connected functional graph?)")
            args, kwargs = node.arguments(values)
            if isinstance(handler, _GraphPlan):
                outputs = handler.run(tf.nest.flatten(args[0] if len(args) == 1 and not kwargs else args), taps,
                                      stub)
            elif handler is not None:
                outputs = handler(args[0], taps, stub)
            else:
                outputs = self.reader.call_inference(node.layer, args, kwargs)
            out_ids = bn_node.output_ids if bn_node is not None else node.output_ids
            for t_id, value in zip(out_ids, tf.nest.flatten(outputs)):
                values[t_id] = value
        return [values[self.reader.tensor_id(t)] for t in self.model.outputs]


class LoweredModel(tf.Module):
    """The exportable graph of a quantized model.

    ``lowered(x)`` (``lowered.serve``, a tf.function with the model's input signature, batch size free) gives the
    model's inference outputs computed through the custom ops' TF reference bodies;
    ``lowered.activation_codes(x)`` gives {layer name: int32 activation codes [..., C]} of every
    lowered layer's quantize op (a SeparableConv2D's intermediate quantizer under
    "<layer>/pointwise_input"); ``lowered.report`` is the `ExportReport` (no file sizes yet).
    """

    def __init__(self, model):
        super().__init__(name="n2uq_lowered")
        from n2uq_tf.export.source import export_source
        from n2uq_tf.quantize.api import check_finite_weights
        model = export_source(model)  # a distiller's student; float32 twin of a mixed-precision model
        check_finite_weights(model)
        reader = model_reader.reader_for(model)
        if not reader.is_functional(model):
            raise ValueError(f"model {model.name!r} is not a functional graph; build it with an Input "
                             "(Functional API, or Sequential with an input shape) to export it")
        self.model = model
        records = []
        self._plan = _GraphPlan(model, records, reader)
        self.report = ExportReport(self._report_rows(records, reader))
        # Every quantize + conv/FC op pair (`_Stage`; a SeparableConv2D has two), in graph order.
        self.lowered_layers = [stage for r in records if r[0] == "wrapper" and isinstance(r[1], _Lowered)
                               for stage in r[1].stages]
        self._lowered = {stage.tap: stage for stage in self.lowered_layers}
        from n2uq_tf.export.source import signature_names
        input_names, self.output_names = signature_names(model)
        specs = [tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(model.inputs, input_names)]
        self._single = len(specs) == 1
        # `serve` is what the converter gets; a tf.function as the instance's __call__ would not be
        # found by Python's call protocol.
        self.serve = tf.function(self._forward, input_signature=specs, autograph=False)
        self.activation_codes = tf.function(self._codes, input_signature=specs, autograph=False)
        # The same graph with empty custom-op bodies: what export_tflite converts (see _Stage.stubs).
        self.export_function = tf.function(self._forward_stub, input_signature=specs, autograph=False)

    def __call__(self, *inputs):
        return self.serve(*inputs)

    @staticmethod
    def _report_rows(records, reader):
        rows, seen = [], set()
        for record in records:
            kind = record[0]
            if kind == "wrapper":
                rows.append(record[1].report)
            elif kind == "bn":
                _, bn, into, prefix = record
                seen.add(id(bn))
                rows.append(LayerExport(prefix + bn.name, type(bn).__name__, "folded", [],
                                        reason=f"folded into {into}"))
            else:
                _, layer, prefix = record
                if id(layer) in seen:  # a shared layer is stored once
                    continue
                seen.add(id(layer))
                rows.append(LayerExport(prefix + layer.name, type(layer).__name__, "float", ["builtin"],
                                        float_bytes=FLOAT_BYTES * reader.float_parameter_count(layer)))
        return rows

    def _run(self, inputs, taps, stub=False):
        outputs = self._plan.run(list(inputs), taps, stub)
        return outputs[0] if len(outputs) == 1 else outputs

    def _forward(self, *inputs):
        return self._run(inputs, None)

    def _forward_stub(self, *inputs):
        # Outputs keyed by the Keras output names: the converter makes them the signature's names.
        return dict(zip(self.output_names, self._plan.run(list(inputs), None, True)))

    def _codes(self, *inputs):
        taps = {}
        self._run(inputs, taps)
        codes = {}
        for name, q in taps.items():
            h = self._lowered[name]
            if h.quantize_name == custom_ops.OP_QUANTIZE_PACK:
                codes[name] = custom_ops._unpack_planes(q, h.report.activation_bits, h.in_channels)
            else:
                codes[name] = tf.cast(q, tf.int32)
            if h.one_d:  # back to the Conv1D input's [batch, width, channels]
                codes[name] = tf.squeeze(codes[name], 1)
        return codes


def lower(model):
    """The `LoweredModel` of a quantized tf_keras model (see the module docstring)."""
    return LoweredModel(model)
