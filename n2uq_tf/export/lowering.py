"""Lowering a quantized tf_keras model to a TF graph of N2UQ custom ops and builtins.

`lower(model)` walks the model's own functional graph (nested functional models included)
and calls every layer in inference mode, except that each `N2UQWrapper` it can lower
(Conv2D, DepthwiseConv2D, Dense and their padded variants, 1..4 bits) becomes the
quantize(-and-pack) op plus a bit-serial conv / FC op of `custom_ops`, with a directly
following BatchNormalization folded into the op's per-channel multiplier and bias.
Wrappers it cannot lower stay float builtins on fake-quantized constants, so the graph
still computes the Keras model's inference outputs. The result is a tf.Module whose
`__call__` is the function the TFLite converter sees; the custom ops' bodies are the plain-TF
references, so it also runs in TensorFlow (the pre-conversion self-check).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops
from n2uq_tf.layers import PaddedConv2D, PaddedDepthwiseConv2D, RPReLU
from n2uq_tf.quantize import methods
from n2uq_tf.quantize.wrapper import N2UQWrapper

MAX_EXPORT_BITS = 4  # the custom ops' bit range (custom_ops: "bits of a quantized tensor are 1..4")
FLOAT_BYTES = 4

_CONV_TYPES = (keras.layers.Conv2D, PaddedConv2D)
_DEPTHWISE_TYPES = (keras.layers.DepthwiseConv2D, PaddedDepthwiseConv2D)
_DENSE_TYPES = (keras.layers.Dense,)


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
            note = r.reason if r.status == "builtin" else (f"+ folded {r.folded}" if r.folded else "")
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

def _float_param_count(layer):
    seen, count = set(), 0
    for v in layer.weights:
        if id(v) not in seen and v.dtype.is_floating:
            seen.add(id(v))
            count += int(np.prod(v.shape))
    return count


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
    if not isinstance(bn, keras.layers.BatchNormalization):
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


def _activation_state(wrapper):
    """Thresholds T (float32), input scale and output step of a wrapper's input quantizer.

    Any method: ``uniform_levels`` gives its inference output exactly as
    step * #{x * input_scale > T_i} (N2UQ: input_scale beta1, step beta2 * delta).
    """
    quantizer, v = wrapper.input_quantizer
    levels = quantizer.uniform_levels(v)
    return (np.asarray(levels.thresholds, np.float32), np.float32(levels.input_scale), np.float32(levels.step))


def _builtin_reason(wrapper, input_shape):
    """Why a wrapper cannot be lowered to custom ops, or None if it can."""
    layer, config = wrapper.layer, wrapper.quantize_config
    if config.weight_bits is None:
        return "weights not quantized (weight_bits=None)"
    if wrapper.input_quantizer is None:
        return "input not quantized (activation_bits=None)"
    try:
        methods.check_exportable(wrapper)
    except ValueError as error:
        return str(error)
    if config.weight_bits > MAX_EXPORT_BITS or config.activation_bits > MAX_EXPORT_BITS:
        return (f"W{config.weight_bits}A{config.activation_bits}: the custom ops take 1..{MAX_EXPORT_BITS} bits")
    if type(layer) not in _CONV_TYPES + _DEPTHWISE_TYPES + _DENSE_TYPES:
        return f"no custom op for {type(layer).__name__}"
    if len(wrapper._weight_vars) != 1:
        return "more than one quantized weight"
    rank = len(input_shape)
    if type(layer) in _DENSE_TYPES:
        if rank != 2:
            return f"Dense on a rank-{rank} input (only [batch, features] is lowered)"
        if input_shape[-1] is None:
            return "unknown input features"
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "data_format='channels_first'"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    if rank != 4 or input_shape[-1] is None:
        return f"input shape {tuple(input_shape)} is not [batch, height, width, channels]"
    padding = getattr(layer, "padding", "valid")
    if not isinstance(layer, (PaddedConv2D, PaddedDepthwiseConv2D)) and padding == "same" \
            and (input_shape[1] is None or input_shape[2] is None):
        return "'same' padding on an input of unknown height/width"
    if padding not in ("same", "valid"):
        return f"padding={padding!r}"
    return None


class _Lowered:
    """One N2UQWrapper call lowered to quantize + conv/FC custom ops (constants ready)."""

    def __init__(self, wrapper, input_shape, bn):
        layer = wrapper.layer
        self.name = layer.name
        self.layer = layer
        self.bn = bn
        config = wrapper.quantize_config
        wb, ab = config.weight_bits, config.activation_bits
        self.thresholds, input_scale, step = _activation_state(wrapper)
        kernel_var, quantizer, variables = wrapper._weight_vars[0]
        view = quantizer.integer_view(tf.convert_to_tensor(kernel_var, tf.float32), variables)
        codes, weight_scale = np.asarray(view.codes), np.asarray(view.scale, np.float64)
        out_channels = int(np.prod(weight_scale.shape))
        in_channels = self.in_channels = int(input_shape[-1])
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
        conv_bias = (np.asarray(layer.bias.numpy(), np.float64).reshape(-1) if getattr(layer, "use_bias", False)
                     else np.zeros(out_channels))
        if bn is not None:
            s, shift = _bn_affine(bn)
            multiplier, bias = s * multiplier, s * conv_bias + shift
        else:
            bias = conv_bias
        self.multiplier = multiplier.astype(np.float32)
        self.bias = bias.astype(np.float32)
        self.activation = None if _is_linear(getattr(layer, "activation", None)) else layer.activation

        if type(layer) in _DENSE_TYPES:
            self.kind = custom_ops.OP_FULLY_CONNECTED
            ordered = codes.T  # [IN][OUT] -> [OUT][IN]
            self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale)
            self.op = custom_ops.fully_connected_fn(in_features=in_channels, out_features=out_channels,
                                                    act_bits=ab, weight_bits=wb)
            self.quantize_name = custom_ops.OP_QUANTIZE_PACK
        else:
            kh, kw = layer.kernel_size
            strides, dilations = tuple(layer.strides), tuple(layer.dilation_rate)
            if isinstance(layer, (PaddedConv2D, PaddedDepthwiseConv2D)):
                paddings = tuple(tuple(p) for p in layer.explicit_padding)
            elif layer.padding == "same":
                paddings = tuple(_tf_same_padding(int(input_shape[1 + i]), (kh, kw)[i], strides[i], dilations[i])
                                 for i in range(2))
            else:
                paddings = ((0, 0), (0, 0))
            self.paddings = paddings
            if type(layer) in _DEPTHWISE_TYPES:
                self.kind = custom_ops.OP_DEPTHWISE_CONV2D
                ordered = codes  # [KH][KW][C][M], flattened as it is
                self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale, pack=False)
                self.quantize_name = custom_ops.OP_QUANTIZE
                self.op = custom_ops.depthwise_conv2d_fn(
                    in_channels=in_channels, depth_multiplier=int(layer.depth_multiplier), kernel_size=(kh, kw),
                    strides=strides, dilations=dilations, paddings=paddings, act_bits=ab, weight_bits=wb)
            else:
                self.kind = custom_ops.OP_CONV2D
                ordered = codes.transpose(3, 0, 1, 2)  # HWIO -> [OC][KH][KW][IC]
                self.quantize = custom_ops.quantize_pack_fn(ab, in_channels, input_scale)
                self.quantize_name = custom_ops.OP_QUANTIZE_PACK
                self.op = custom_ops.conv2d_fn(
                    in_channels=in_channels, out_channels=out_channels, kernel_size=(kh, kw), strides=strides,
                    dilations=dilations, paddings=paddings, act_bits=ab, weight_bits=wb)
        self._stubs = None
        self.stream = custom_ops.pack_weight_codes(ordered, wb)
        self.weight_count = int(codes.size)
        self.report = LayerExport(
            self.name, type(layer).__name__, "lowered", [self.quantize_name, self.kind], wb, ab,
            self.weight_count, int(self.stream.size),
            FLOAT_BYTES * (2 * out_channels + self.thresholds.size),
            folded=None if bn is None else bn.name)
        if self.activation is not None:
            self.report.ops.append(f"builtin {getattr(self.activation, '__name__', 'activation')}")

    def _output_shapes(self, x_shape):
        """Static shapes (batch None) of the quantize op's and the layer op's outputs."""
        x_shape = list(x_shape)
        out = len(self.multiplier)
        if self.kind == custom_ops.OP_FULLY_CONNECTED:
            return x_shape[:-1] + [self.report.activation_bits, custom_ops.words_per_plane(self.in_channels)], \
                x_shape[:-1] + [out]
        spatial = []
        for i in range(2):
            extent = (self.layer.kernel_size[i] - 1) * self.layer.dilation_rate[i] + 1
            size = x_shape[1 + i]
            spatial.append(None if size is None else
                           (size + sum(self.paddings[i]) - extent) // self.layer.strides[i] + 1)
        if self.kind == custom_ops.OP_DEPTHWISE_CONV2D:
            q_shape = x_shape
        else:
            q_shape = x_shape[:-1] + [self.report.activation_bits, custom_ops.words_per_plane(self.in_channels)]
        return q_shape, x_shape[:1] + spatial + [out]

    def stubs(self, x_shape):
        """The two ops with the same names, options and signatures but empty bodies.

        The converter replaces each body by one CUSTOM op anyway; converting the reference bodies
        (bit unpacking, float64 convolutions, a per-channel loop for depthwise) took ~0.7 s per
        layer of converter time for nothing.
        """
        q_shape, y_shape = self._output_shapes(x_shape)
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
        with tf.name_scope(self.name):
            if stub:
                if self._stubs is None:
                    self._stubs = self.stubs(x.shape.as_list())
                quantize, op = self._stubs
            else:
                quantize, op = self.quantize, self.op
            q = quantize(x, tf.constant(self.thresholds))
            if taps is not None:
                taps[self.name] = q
            y = op(q, tf.constant(self.stream), tf.constant(self.multiplier), tf.constant(self.bias))
            if self.activation is not None:
                y = self.activation(y)
        return y


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
    """A wrapper kept as float builtins: its own layer call on fake-quantized constant kernels."""

    def __init__(self, wrapper, reason):
        self.wrapper = wrapper
        layer, config = wrapper.layer, wrapper.quantize_config
        self.name = layer.name
        self.attrs = list(config.weight_attrs) if config.weight_bits is not None else []
        self.kernels = []
        count = 0
        for (var, quantizer, variables), attr in zip(wrapper._weight_vars, self.attrs):
            w = tf.convert_to_tensor(var, tf.float32)
            count += int(np.prod(w.shape))
            self.kernels.append(quantizer(w, False, weights=variables).numpy())  # the method's inference weights
        self.act = _activation_state(wrapper) if wrapper.input_quantizer is not None else None
        ops_used = ["builtin"]
        self.report = LayerExport(
            self.name, type(layer).__name__, "builtin", ops_used, config.weight_bits, config.activation_bits,
            count, 0, FLOAT_BYTES * _float_param_count(wrapper), reason=reason)

    def __call__(self, x, taps, stub=False):
        layer = self.wrapper.layer
        with tf.name_scope(self.name):
            if self.act is not None:
                x = _builtin_quantize(x, *self.act)
            saved = [getattr(layer, a) for a in self.attrs]
            try:
                for attr, k in zip(self.attrs, self.kernels):
                    setattr(layer, attr, tf.constant(k))
                return layer.call(x)
            finally:
                for attr, v in zip(self.attrs, saved):
                    setattr(layer, attr, v)


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

class _Value:
    """A computed tensor that `Node.map_arguments` may pop any number of times."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def pop(self):
        return self.value


def _graph_nodes(model):
    """The model's own nodes, inputs first (not the temporary graphs tfmot also called layers in)."""
    return [node for depth in sorted(model._nodes_by_depth, reverse=True) for node in model._nodes_by_depth[depth]]


def _is_functional(layer):
    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


class _GraphPlan:
    """Per node of one functional model: how to compute it (nested models get their own plan)."""

    def __init__(self, model, records):
        self.model = model
        self.steps = []      # (node, handler or None, skip_ids)
        nodes = _graph_nodes(model)
        consumers = {}
        for node in nodes:
            for t_id in set(node.flat_input_ids):
                consumers.setdefault(t_id, []).append(node)
        output_ids = {str(id(t)) for t in model.outputs}
        self.absorbed = set()    # ids of BN nodes folded into the preceding op
        for node in nodes:
            if node.is_input or id(node) in self.absorbed:
                continue
            layer = node.layer
            if isinstance(layer, N2UQWrapper):
                handler, bn_node = self._plan_wrapper(node, consumers, output_ids)
                records.append(("wrapper", handler))
                if bn_node is not None:
                    self.absorbed.add(id(bn_node))
                    records.append(("bn", bn_node.layer, layer.layer.name))
                self.steps.append((node, handler, bn_node))
            elif _is_functional(layer):
                self.steps.append((node, _GraphPlan(layer, records), None))
            elif type(layer) is RPReLU and layer.dtype == "float32":
                records.append(("layer", layer))
                self.steps.append((node, _RPReLU(layer), None))
            else:
                records.append(("layer", layer))
                self.steps.append((node, None, None))

    @staticmethod
    def _plan_wrapper(node, consumers, output_ids):
        wrapper = node.layer
        inputs = tf.nest.flatten(node.input_tensors)
        input_shape = tuple(inputs[0].shape.as_list()) if len(inputs) == 1 else ()
        reason = "more than one input" if len(inputs) != 1 else _builtin_reason(wrapper, input_shape)
        if reason is not None:
            return _KeptBuiltin(wrapper, reason), None
        bn_node = None
        out_ids = node.flat_output_ids
        users = consumers.get(out_ids[0], []) if len(out_ids) == 1 else []
        if (len(users) == 1 and out_ids[0] not in output_ids and _is_linear(getattr(wrapper.layer, "activation", None))
                and len(users[0].flat_input_ids) == 1
                and _foldable_bn(users[0].layer, len(input_shape)) is None):
            bn_node = users[0]
        return _Lowered(wrapper, input_shape, None if bn_node is None else bn_node.layer), bn_node

    def run(self, inputs, taps, stub=False):
        """Computes the model's outputs for `inputs` (a flat list matching model.inputs)."""
        values = {str(id(t)): _Value(v) for t, v in zip(self.model.inputs, inputs)}
        for node, handler, bn_node in self.steps:
            if any(t_id not in values for t_id in node.flat_input_ids):
                raise ValueError(f"cannot compute layer {node.layer.name!r}: an input is not computed "
                                 "(is the model a connected functional graph?)")
            args, kwargs = node.map_arguments(values)
            if isinstance(handler, _GraphPlan):
                outputs = handler.run(tf.nest.flatten(args[0] if len(args) == 1 and not kwargs else args), taps,
                                      stub)
            elif handler is not None:
                outputs = handler(args[0], taps, stub)
            else:
                layer = node.layer
                if layer._call_spec.expects_training_arg:
                    kwargs["training"] = False
                outputs = layer(*args, **kwargs)
            out_ids = bn_node.flat_output_ids if bn_node is not None else node.flat_output_ids
            for t_id, value in zip(out_ids, tf.nest.flatten(outputs)):
                values[t_id] = _Value(value)
        return [values[str(id(t))].pop() for t in self.model.outputs]


class LoweredModel(tf.Module):
    """The exportable graph of a quantized model.

    ``lowered(x)`` (``lowered.serve``, a tf.function with the model's input signature, batch size free) gives the
    model's inference outputs computed through the custom ops' TF reference bodies;
    ``lowered.activation_codes(x)`` gives {layer name: int32 activation codes [..., C]} of every
    lowered layer's quantize op; ``lowered.report`` is the `ExportReport` (no file sizes yet).
    """

    def __init__(self, model):
        super().__init__(name="n2uq_lowered")
        from n2uq_tf.export.source import export_source
        model = export_source(model)  # a distiller's student; float32 twin of a mixed-precision model
        if not _is_functional(model):
            raise ValueError(f"model {model.name!r} is not a functional graph; build it with an Input "
                             "(Functional API, or Sequential with an input shape) to export it")
        self.model = model
        records = []
        self._plan = _GraphPlan(model, records)
        self.report = ExportReport(self._report_rows(records))
        self.lowered_layers = [r[1] for r in records if r[0] == "wrapper" and isinstance(r[1], _Lowered)]
        self._lowered = {h.name: h for h in self.lowered_layers}
        from n2uq_tf.export.source import signature_names
        input_names, self.output_names = signature_names(model)
        specs = [tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(model.inputs, input_names)]
        self._single = len(specs) == 1
        # `serve` is what the converter gets; a tf.function as the instance's __call__ would not be
        # found by Python's call protocol.
        self.serve = tf.function(self._forward, input_signature=specs, autograph=False)
        self.activation_codes = tf.function(self._codes, input_signature=specs, autograph=False)
        # The same graph with empty custom-op bodies: what export_tflite converts (see _Lowered.stubs).
        self.export_function = tf.function(self._forward_stub, input_signature=specs, autograph=False)

    def __call__(self, *inputs):
        return self.serve(*inputs)

    @staticmethod
    def _report_rows(records):
        rows, seen = [], set()
        for record in records:
            kind = record[0]
            if kind == "wrapper":
                rows.append(record[1].report)
            elif kind == "bn":
                _, bn, into = record
                seen.add(id(bn))
                rows.append(LayerExport(bn.name, type(bn).__name__, "folded", [], reason=f"folded into {into}"))
            else:
                layer = record[1]
                if id(layer) in seen:  # a shared layer is stored once
                    continue
                seen.add(id(layer))
                rows.append(LayerExport(layer.name, type(layer).__name__, "float", ["builtin"],
                                        float_bytes=FLOAT_BYTES * _float_param_count(layer)))
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
        return codes


def lower(model):
    """The `LoweredModel` of a quantized tf_keras model (see the module docstring)."""
    return LoweredModel(model)
