"""The TFLite custom ops of an exported N2UQ model: names, inputs, options, TF reference bodies.

This module is the contract between the exporter (which emits the ops) and the C++ kernels
(which run them): each op is a `tf.function` whose ``experimental_implements`` attribute
makes the TFLite converter (with ``allow_custom_ops``) drop the body and emit one CUSTOM op
with that name and the scalar attributes as its FlexBuffer custom options. The body is a
plain-TF reference of the op, so an exported graph can also be run in TensorFlow and
compared with the Keras model before conversion.

Ops (inputs in order; "bits" of a quantized tensor are 1..4):

* ``N2UQQuantizePack``: x float32 [..., C], thresholds float32 [2^bits - 1]
  -> packed int64 [..., bits, ceil(C / 64)].  Options: bits, channels, beta1.
  code m = #{i : x * beta1 > thresholds[i]} (float32 product, strict >), as
  ``quantization_math.n2uq.activation_levels``; bit b of m goes to plane b; channel c is bit c % 64 of
  word c // 64 of its plane; bits above C are 0 (the int64 holds the uint64 bit pattern).
* ``N2UQQuantize``: x float32 [..., C], thresholds -> codes uint8 [..., C] (feeds depthwise).
  Options: bits, channels, beta1.
* ``N2UQConv2D``: packed activations int64 [N, H, W, act_bits, words], weights uint8
  bitstream (codes [OC][KH][KW][IC]), multiplier float32 [OC], bias float32 [OC]
  -> float32 [N, OH, OW, OC].  Options: in_channels, out_channels, kernel_height,
  kernel_width, stride_height, stride_width, dilation_height, dilation_width, act_bits,
  weight_bits, padding (see Padding; absent for explicit padding at strides 1 x 1), and
  unless padding = PADDING_SAME also pad_top, pad_bottom, pad_left, pad_right.
* ``N2UQDepthwiseConv2D``: codes uint8 [N, H, W, C], weights uint8 bitstream (codes
  [KH][KW][C * M], TF's depthwise layout flattened), multiplier, bias [C * M]
  -> float32 [N, OH, OW, C * M].  Options as N2UQConv2D plus depth_multiplier
  (out_channels = in_channels * depth_multiplier).
* ``N2UQFullyConnected``: packed activations int64 [N, act_bits, words], weights uint8
  bitstream (codes [OUT][IN]), multiplier, bias [OUT] -> float32 [N, OUT].  Options:
  in_features, out_features, act_bits, weight_bits.

Fused output stages: ``N2UQConv2DFused``, ``N2UQDepthwiseConv2DFused`` and ``N2UQFullyConnectedFused``
are their layer op plus what follows it up to the next quantizer, in the layer's output pass:
inputs and options of the layer op, then the stage's. Options: ``steps`` (0..16) and one
``step_<i>`` per step, a kind of STEP_KINDS (by id, from 1):

  =  ==============  ===========================  ==================================
  id kind            y becomes                    input
  =  ==============  ===========================  ==================================
  1  add             y + v[c]                     v: float32, out_channels elements
  2  mul             y * v[c]                     v: float32, out_channels elements
  3  prelu           y >= 0 ? y : y * v[c]        v: float32, out_channels elements
  4  add_tensor      y + r                        r: float32 of the layer output's shape
  5  relu            y < 0 ? 0 : y
  6  relu6           y < 0 ? 0 : y > 6 ? 6 : y
  7  relu_n1_to_1    y < -1 ? -1 : y > 1 ? 1 : y
  =  ==============  ===========================  ==================================

``quantize`` (QUANTIZE_NONE 0, QUANTIZE_PACK 1 or QUANTIZE_CODES 2) with, unless 0,
``quantize_bits`` (1..4) and ``quantize_beta1``: the codes of y after every step, as
N2UQQuantizePack (int64 [..., bits, words]) or N2UQQuantize (uint8 [..., C]) with those options
and the thresholds; ``float_output`` (0..steps, optional; required and equal to ``steps`` when
quantize is 0): the op also outputs y after that many steps, float32 of the layer output's shape.
Inputs after the layer's four: one per step that takes one, in step order, then the thresholds
(2^quantize_bits - 1 float32) when it quantizes. Outputs: the float tensor (if any), then the codes.

``N2UQMaxPool2DFused`` is the same for a layer without weights: a PAD of zeros and the 'valid'
MAX_POOL_2D after it (a ResNet stem's pool), then the stage. Inputs: x float32 [N, H, W, C], then
the stage's. Options: channels (C), filter_height, filter_width, stride_height, stride_width,
pad_top, pad_bottom, pad_left, pad_right (the PAD's zeros; all 0 for a pool without one), then the
stage's. The layer output has (H + pad_top + pad_bottom - filter_height) / stride_height + 1 rows
(columns likewise); each value the max of its window over the zero-padded input. In an int8 model
(``inference_type="int8"``) the op takes the int8 PAD + MAX_POOL_2D + DEQUANTIZE instead: x is int8
with one scale and zero point, given again as options ``input_zero_point`` (-128..127) and
``input_scale`` (float32 > 0; the kernel refuses an input whose own quantization differs), the
padding counts as the zero point (what TFLite's int8 PAD writes), and the layer output is each
window's max m dequantized, float32(m - input_zero_point) * input_scale: what DEQUANTIZE gives, bit
for bit (the product of a small integer and a float32 rounds once however it is computed), and max
commutes with it (scale > 0).

Exactness. Each step is the float32 operation of the TFLite builtin it replaces (ADD / SUB of a
constant as an add, MUL, PRELU, ADD of a tensor, the ReLUs and fused activations), applied to the
same operands in the same order, one rounding per step (no fused multiply-add), and the quantizer
compares the same float32 products x * beta1 with the same thresholds in the same kernels as
N2UQQuantizePack / N2UQQuantize. So a fused op gives the float tensor and the codes of the ops it
replaces bit for bit, ties at a threshold included: no value moves across a threshold by rounding.
The stage deliberately does not fold its constants into the layer's multiplier and bias (or into the
thresholds): folded, (acc * m + b) * s + c rounds differently from acc * (m * s) + (b * s + c), and a
value within an ulp of a threshold would change its code. What can still differ:

* NaN, through the ReLUs: the stage keeps a NaN (NaN < 0 is false); the ReLU kernels of TFLite
  and XNNPACK do not all agree on a NaN (some give 0 or the clamp bound, whose code can differ
  from a NaN's code 0: NaN * beta1 > t is false). A finite network never makes a NaN.
* The sign of a zero: a LEAKY_RELU is fused as a PRELU (x >= 0 ? x : a x instead of
  x > 0 ? x : a x), which differ only at -0 with a negative slope: -0 against +0, equal in
  value and in code.
* The max pool's NaN and signed zeros: the pool takes v > m ? v : m over a window's input
  positions, then 0 where the window reaches into the padding; TFLite's MAX_POOL_2D kernels
  (reference and XNNPACK) can pick another of two equal zeros (+0, -0) or keep a NaN that this
  drops. Max is otherwise exact: every other value is the same.
* Subnormals, if an application sets flush-to-zero on its own thread only: the stage runs on the
  delegate's worker threads too (new threads inherit the creating thread's floating-point mode).

tests/test_fusion.py checks this: outputs of fused and unfused files equal bit for bit, with
thresholds placed exactly on values of the unfused chain (where a folded stage differs).
The exporter (`n2uq_tf.export.fusion`) writes these ops.

Padding (option ``padding``): PADDING_SAME (1) is TF's 'same', computed by the kernel at prepare
from the actual input size (the output has ceil(H / stride) x ceil(W / stride) positions, the
padding they need is split with the extra row / column after), so a resized input is padded as
Keras pads it; the op then has no pad_* options. PADDING_EXPLICIT (0) pads by the pad_* options
at every input size ('valid' is explicit zeros; `n2uq_tf.layers.PaddedConv2D` gives its fixed
PyTorch-style pads). An explicit op with strides 1 x 1 leaves ``padding`` out (each option costs
~12 bytes per op): at stride 1 'same' padding does not depend on the input size, so its pad_*
serve every size whatever they were. Files of export format 1 have no ``padding`` option at all:
their pad_* were fixed for the exported input size, and the kernels refuse an input size at which
a 'same' and an explicit reading of those pads differ (pads that are not 'same' at stride 1, or
at the exported size read from the file's shape signature, were explicit).

Weight bitstream: code j of the flattened code array occupies stream bits
j * weight_bits .. j * weight_bits + weight_bits - 1 (least significant bit first); stream
bit t is bit t % 8 of byte t // 8; the last byte is zero-filled. So the file holds exactly
ceil(count * weight_bits / 8) bytes per quantized kernel.

Output arithmetic (activation value beta2 * delta_a * m, weight value alpha_c * (2k / n_w - 1),
n_w = 2^weight_bits - 1): sum(a * w) = beta2 * delta_a * alpha_c / n_w * (2 * sum(m k) - n_w * sum(m)),
so out = multiplier_c * (2 * sum(m k) - n_w * sum(m)) + bias_c with the layer's bias and a
following BatchNorm folded into multiplier and bias by the exporter. Zero padding is code 0.
"""

import numpy as np
import tensorflow as tf

# The names live where the runtime side reads them without TensorFlow.
from n2uq_tf.tflite.op_names import (  # noqa: F401
    ALL_OPS, OP_CONV2D, OP_CONV2D_FUSED, OP_DEPTHWISE_CONV2D, OP_DEPTHWISE_CONV2D_FUSED, OP_FULLY_CONNECTED,
    OP_FULLY_CONNECTED_FUSED, OP_MAX_POOL2D_FUSED, OP_QUANTIZE, OP_QUANTIZE_PACK)

LAYER_OPS = (OP_CONV2D, OP_DEPTHWISE_CONV2D, OP_FULLY_CONNECTED)  # each op holding a layer's packed weights
FUSED_OPS = {OP_CONV2D_FUSED: OP_CONV2D, OP_DEPTHWISE_CONV2D_FUSED: OP_DEPTHWISE_CONV2D,
             OP_FULLY_CONNECTED_FUSED: OP_FULLY_CONNECTED}  # fused op -> its layer op
POOL_OPTIONS = ("channels", "filter_height", "filter_width", "stride_height", "stride_width", "pad_top", "pad_bottom",
                "pad_left", "pad_right")  # N2UQMaxPool2DFused's layer options

# Output-stage steps of the fused ops (see "Fused output stages"): kind -> (id, takes a tensor input).
STEP_KINDS = {"add": (1, True), "mul": (2, True), "prelu": (3, True), "add_tensor": (4, True), "relu": (5, False),
              "relu6": (6, False), "relu_n1_to_1": (7, False)}
MAX_STEPS = 16
QUANTIZE_NONE, QUANTIZE_PACK, QUANTIZE_CODES = 0, 1, 2
QUANTIZE_MODES = {None: QUANTIZE_NONE, "pack": QUANTIZE_PACK, "codes": QUANTIZE_CODES}

WORD_BITS = 64
CONV_OPTIONS = ("in_channels", "out_channels", "kernel_height", "kernel_width", "stride_height", "stride_width",
                "dilation_height", "dilation_width", "act_bits", "weight_bits", "padding")
PAD_OPTIONS = ("pad_top", "pad_bottom", "pad_left", "pad_right")  # absent with PADDING_SAME
PADDING_EXPLICIT = 0
PADDING_SAME = 1
SAME = "same"  # the `paddings` argument of conv2d_fn / depthwise_conv2d_fn for PADDING_SAME


def words_per_plane(channels):
    return -(-int(channels) // WORD_BITS)


# ---------------------------------------------------------------- weight bitstream (NumPy, offline)

def pack_weight_codes(codes, bits):
    """Flattened integer codes (each < 2^bits) -> uint8 bitstream of ceil(count * bits / 8) bytes."""
    codes = np.asarray(codes).reshape(-1).astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise ValueError(f"weight codes must lie in 0..{2 ** bits - 1} for {bits} bits")
    stream_bits = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream_bits, bitorder="little")


def unpack_weight_codes(stream, count, bits):
    """Inverse of `pack_weight_codes`: uint8 bitstream -> int32 codes [count]."""
    stream = np.asarray(stream, np.uint8).reshape(-1)
    if stream.size * 8 < count * bits:
        raise ValueError(f"weight bitstream of {stream.size} bytes is too short for {count} codes of {bits} bits")
    stream_bits = np.unpackbits(stream, bitorder="little")[:count * bits].reshape(count, bits).astype(np.int32)
    return (stream_bits << np.arange(bits, dtype=np.int32)).sum(axis=1).astype(np.int32)


# ---------------------------------------------------------------- TF reference bodies

def _codes(x, thresholds, beta1):
    xs = tf.cast(x, tf.float32) * beta1
    return tf.reduce_sum(tf.cast(xs[..., tf.newaxis] > thresholds, tf.int32), axis=-1)


def _pack_planes(codes, bits, channels):
    """int32 codes [..., C] -> int64 [..., bits, words] bit planes (the uint64 pattern in int64)."""
    words = words_per_plane(channels)
    pad = words * WORD_BITS - channels
    codes = tf.pad(codes, [[0, 0]] * (codes.shape.rank - 1) + [[0, pad]])
    lanes = tf.bitwise.left_shift(tf.ones([WORD_BITS], tf.int64), tf.range(WORD_BITS, dtype=tf.int64))
    planes = []
    for b in range(bits):
        bit = tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(codes, b), 1), tf.int64)
        bit = tf.reshape(bit, tf.concat([tf.shape(bit)[:-1], [words, WORD_BITS]], 0))
        planes.append(tf.reduce_sum(bit * lanes, axis=-1))  # distinct powers of two: the sum is the OR
    return tf.stack(planes, axis=-2)


def _unpack_planes(packed, bits, channels):
    """Inverse of `_pack_planes` -> int32 codes [..., C]."""
    lanes = tf.range(WORD_BITS, dtype=tf.int64)
    codes = 0
    for b in range(bits):
        plane = packed[..., b, :]  # [..., words]
        bit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(plane[..., tf.newaxis], lanes), 1)
        bit = tf.reshape(bit, tf.concat([tf.shape(bit)[:-2], [-1]], 0))[..., :channels]
        codes = codes + tf.cast(bit, tf.int32) * (1 << b)
    return codes


def _unpack_stream(stream, count, bits):
    bit_index = tf.range(count * bits)
    byte = tf.gather(tf.cast(stream, tf.int32), bit_index // 8)
    stream_bits = tf.reshape(tf.bitwise.bitwise_and(tf.bitwise.right_shift(byte, bit_index % 8), 1), [count, bits])
    return tf.reduce_sum(stream_bits * tf.bitwise.left_shift(1, tf.range(bits)), axis=1)


def _affine(acc, multiplier, bias):
    return tf.cast(acc, tf.float32) * multiplier + bias


def _implements(name, **options):
    attrs = ['attr {key: "tfl_fusable_op" value {b: true}}']
    for key, value in options.items():
        if isinstance(value, bool):
            attrs.append(f'attr {{key: "{key}" value {{b: {str(value).lower()}}}}}')
        elif isinstance(value, (int, np.integer)):
            attrs.append(f'attr {{key: "{key}" value {{i: {int(value)}}}}}')
        elif isinstance(value, (float, np.floating)):
            attrs.append(f'attr {{key: "{key}" value {{f: {float(np.float32(value))!r}}}}}')
        else:
            raise TypeError(f"custom-op option {key!r} must be a bool, int or float, got {type(value).__name__}")
    return f'name: "{name}" ' + " ".join(attrs)


def quantize_pack_fn(bits, channels, beta1, pack=True):
    """The N2UQQuantizePack (pack=True) or N2UQQuantize op as a tf.function(x, thresholds)."""
    beta1 = float(np.float32(beta1))
    name = OP_QUANTIZE_PACK if pack else OP_QUANTIZE

    @tf.function(experimental_implements=_implements(name, bits=int(bits), channels=int(channels), beta1=beta1))
    def quantize(x, thresholds):
        codes = _codes(x, thresholds, tf.constant(beta1, tf.float32))
        if pack:
            return _pack_planes(codes, int(bits), int(channels))
        return tf.cast(codes, tf.uint8)

    return quantize


def _int_conv(codes, kernel_codes, strides, dilations, paddings, depthwise):
    """Exact integer conv of codes in float64 (sums stay far below 2^53); zero padding is code 0."""
    x = tf.cast(codes, tf.float64)
    if paddings == SAME:
        padding = "SAME"
    else:
        x = tf.pad(x, [[0, 0], list(paddings[0]), list(paddings[1]), [0, 0]])
        padding = "VALID"
    k = tf.cast(kernel_codes, tf.float64)
    if depthwise:
        # depthwise_conv2d has no float64 CPU kernel with dilation; per-channel conv2d instead.
        channels = int(k.shape[2])
        outs = []
        for c in range(channels):
            outs.append(tf.nn.conv2d(x[..., c:c + 1], k[:, :, c:c + 1, :], [1, *strides, 1], padding,
                                     dilations=list(dilations)))
        return tf.concat(outs, axis=-1)
    return tf.nn.conv2d(x, k, [1, *strides, 1], padding, dilations=list(dilations))


def _conv_options(in_channels, out_channels, kernel_size, strides, dilations, paddings, act_bits, weight_bits):
    """The options of a conv / depthwise op; `paddings` is SAME or ((top, bottom), (left, right))."""
    options = dict(zip(CONV_OPTIONS, (in_channels, out_channels, kernel_size[0], kernel_size[1], strides[0],
                                      strides[1], dilations[0], dilations[1], act_bits, weight_bits,
                                      PADDING_SAME if paddings == SAME else PADDING_EXPLICIT)))
    if paddings != SAME:
        (top, bottom), (left, right) = paddings
        options.update(zip(PAD_OPTIONS, (top, bottom, left, right)))
        if tuple(strides) == (1, 1):
            del options["padding"]  # stride 1: the pads serve every input size (see Padding)
    return {k: int(v) for k, v in options.items()}


def _conv2d_body(*, in_channels, out_channels, kernel_size, strides, dilations, paddings, act_bits, weight_bits):
    """(options, reference body (packed, weight_stream, multiplier, bias) -> float32) of N2UQConv2D."""
    kh, kw = kernel_size
    options = _conv_options(in_channels, out_channels, kernel_size, strides, dilations, paddings, act_bits,
                            weight_bits)
    n_w = 2 ** weight_bits - 1

    def conv(packed, weight_stream, multiplier, bias):
        m = _unpack_planes(packed, act_bits, in_channels)
        k = _unpack_stream(weight_stream, out_channels * kh * kw * in_channels, weight_bits)
        k = tf.transpose(tf.reshape(k, [out_channels, kh, kw, in_channels]), [1, 2, 3, 0])  # HWIO
        s_mk = _int_conv(m, k, strides, dilations, paddings, False)
        s_m = _int_conv(m, tf.ones([kh, kw, in_channels, 1], tf.int32), strides, dilations, paddings, False)
        return _affine(2 * s_mk - n_w * s_m, multiplier, bias)

    return options, conv


def conv2d_fn(**conv):
    """The N2UQConv2D op as a tf.function(packed, weight_stream, multiplier, bias).

    Keywords: in_channels, out_channels, kernel_size, strides, dilations, paddings, act_bits,
    weight_bits; paddings: SAME (TF's 'same' for whatever input size comes) or ((top, bottom),
    (left, right)).
    """
    options, body = _conv2d_body(**conv)
    return tf.function(body, experimental_implements=_implements(OP_CONV2D, **options))


def _depthwise_body(*, in_channels, depth_multiplier, kernel_size, strides, dilations, paddings, act_bits,
                    weight_bits):
    """(options, reference body (codes, weight_stream, multiplier, bias) -> float32) of N2UQDepthwiseConv2D."""
    kh, kw = kernel_size
    out_channels = in_channels * depth_multiplier
    options = _conv_options(in_channels, out_channels, kernel_size, strides, dilations, paddings, act_bits,
                            weight_bits)
    options["depth_multiplier"] = int(depth_multiplier)
    n_w = 2 ** weight_bits - 1

    def depthwise(codes, weight_stream, multiplier, bias):
        m = tf.cast(codes, tf.int32)
        k = _unpack_stream(weight_stream, kh * kw * out_channels, weight_bits)
        k = tf.reshape(k, [kh, kw, in_channels, depth_multiplier])
        # Output channel c * M + j sees input channel c: repeat each input channel M times.
        m_rep = tf.repeat(m, depth_multiplier, axis=-1)
        k_flat = tf.reshape(k, [kh, kw, out_channels, 1])
        s_mk = _int_conv(m_rep, k_flat, strides, dilations, paddings, True)
        s_m = _int_conv(m_rep, tf.ones([kh, kw, out_channels, 1], tf.int32), strides, dilations, paddings, True)
        return _affine(2 * s_mk - n_w * s_m, multiplier, bias)

    return options, depthwise


def depthwise_conv2d_fn(**depthwise):
    """The N2UQDepthwiseConv2D op as a tf.function(codes, weight_stream, multiplier, bias).

    Keywords: in_channels, depth_multiplier, kernel_size, strides, dilations, paddings, act_bits,
    weight_bits.
    """
    options, body = _depthwise_body(**depthwise)
    return tf.function(body, experimental_implements=_implements(OP_DEPTHWISE_CONV2D, **options))


def _fully_connected_body(*, in_features, out_features, act_bits, weight_bits):
    """(options, reference body (packed, weight_stream, multiplier, bias) -> float32) of N2UQFullyConnected."""
    options = dict(in_features=int(in_features), out_features=int(out_features), act_bits=int(act_bits),
                   weight_bits=int(weight_bits))
    n_w = 2 ** weight_bits - 1

    def fully_connected(packed, weight_stream, multiplier, bias):
        m = tf.cast(_unpack_planes(packed, act_bits, in_features), tf.float64)
        k = tf.cast(tf.reshape(_unpack_stream(weight_stream, out_features * in_features, weight_bits),
                               [out_features, in_features]), tf.float64)
        s_mk = tf.matmul(m, k, transpose_b=True)
        s_m = tf.reduce_sum(m, axis=-1, keepdims=True)
        return _affine(2 * s_mk - n_w * s_m, multiplier, bias)

    return options, fully_connected


def fully_connected_fn(**fully_connected):
    """The N2UQFullyConnected op as a tf.function(packed, weight_stream, multiplier, bias).

    Keywords: in_features, out_features, act_bits, weight_bits.
    """
    options, body = _fully_connected_body(**fully_connected)
    return tf.function(body, experimental_implements=_implements(OP_FULLY_CONNECTED, **options))


# ---------------------------------------------------------------- fused output stages

def output_stage_options(steps=(), *, float_output=None, quantize=None, quantize_bits=None, quantize_beta1=1.0):
    """The custom options of a fused op's output stage (see "Fused output stages").

    steps: kinds of STEP_KINDS in order; float_output: steps applied before the float output, or
    None; quantize: None, "pack" or "codes", with quantize_bits and quantize_beta1.
    """
    steps = list(steps)
    unknown = [kind for kind in steps if kind not in STEP_KINDS]
    if unknown:
        raise ValueError(f"unknown output-stage step {unknown[0]!r} (known: {', '.join(STEP_KINDS)})")
    if len(steps) > MAX_STEPS:
        raise ValueError(f"an output stage has at most {MAX_STEPS} steps, got {len(steps)}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None, 'pack' or 'codes', got {quantize!r}")
    if float_output is not None and not 0 <= int(float_output) <= len(steps):
        raise ValueError(f"float_output must be 0..{len(steps)} (steps before the float output), got {float_output!r}")
    if quantize is None and float_output != len(steps):
        raise ValueError("an output stage without a quantizer outputs the float tensor after every step: "
                         f"float_output must be {len(steps)}")
    options = {"steps": len(steps)}
    options.update((f"step_{i}", STEP_KINDS[kind][0]) for i, kind in enumerate(steps))
    options["quantize"] = QUANTIZE_MODES[quantize]
    if quantize is not None:
        if quantize_bits is None or not 1 <= int(quantize_bits) <= 4:
            raise ValueError(f"quantize_bits must be 1..4, got {quantize_bits!r}")
        options["quantize_bits"] = int(quantize_bits)
        options["quantize_beta1"] = float(np.float32(quantize_beta1))
    if float_output is not None:
        options["float_output"] = int(float_output)
    return options


_STEP_LABELS = {"add": "add", "mul": "mul", "prelu": "prelu", "add_tensor": "add tensor", "relu": "relu",
                "relu6": "relu6", "relu_n1_to_1": "relu_n1_to_1"}


def describe_output_stage(options):
    """A fused op's output stage in words, from its custom options: "add tensor -> prelu -> float
    output -> prelu -> quantize-and-pack 2-bit" (None for options without a stage)."""
    if "steps" not in options:
        return None
    kinds = {number: kind for kind, (number, _) in STEP_KINDS.items()}
    steps = options["steps"] if isinstance(options["steps"], int) else 0
    parts = [_STEP_LABELS.get(kinds.get(options.get(f"step_{i}")), "?") for i in range(steps)]
    float_output = options.get("float_output")
    quantize = options.get("quantize", QUANTIZE_NONE)
    if isinstance(float_output, int) and quantize != QUANTIZE_NONE:
        parts.insert(float_output, "float output")
    if quantize == QUANTIZE_PACK:
        parts.append(f"quantize-and-pack {options.get('quantize_bits', '?')}-bit")
    elif quantize == QUANTIZE_CODES:
        parts.append(f"quantize {options.get('quantize_bits', '?')}-bit")
    return " -> ".join(parts) or "nothing"


def stage_input_count(steps, quantize):
    """Inputs an output stage adds after the layer's four."""
    return sum(STEP_KINDS[kind][1] for kind in steps) + (quantize is not None)


# The float32 operation of each step, as the TFLite builtin it replaces computes it.
_STEP_OPS = {
    "add": lambda y, v: y + tf.reshape(v, [-1]),
    "mul": lambda y, v: y * tf.reshape(v, [-1]),
    "prelu": lambda y, v: tf.where(y >= 0.0, y, y * tf.reshape(v, [-1])),
    "add_tensor": lambda y, r: y + r,
    "relu": lambda y, _: tf.where(y < 0.0, tf.zeros_like(y), y),
    "relu6": lambda y, _: tf.where(y < 0.0, tf.zeros_like(y), tf.where(y > 6.0, tf.fill(tf.shape(y), 6.0), y)),
    "relu_n1_to_1": lambda y, _: tf.where(y < -1.0, tf.fill(tf.shape(y), -1.0),
                                          tf.where(y > 1.0, tf.ones_like(y), y)),
}


def _step_boundary(y):
    """y, through an op that Grappler's arithmetic optimizer does not look through: it would
    otherwise rewrite a chain of float adds (or muls) into one AddN (or reassociate it), which
    rounds differently from the ops one after the other that the reference stands for."""
    return tf.raw_ops.Snapshot(input=y)


def output_stage_reference(y, stage_inputs, steps=(), *, float_output=None, quantize=None, quantize_bits=None,
                           quantize_beta1=1.0):
    """The output stage in plain TF on a layer output y [..., C]: the fused op's outputs, a tuple
    (float tensor if float_output is not None, then the codes if quantize)."""
    inputs = iter(stage_inputs)
    outputs = []
    y = _step_boundary(y)
    for i, kind in enumerate(steps):
        if float_output == i:
            outputs.append(y)
        y = _step_boundary(_STEP_OPS[kind](y, next(inputs) if STEP_KINDS[kind][1] else None))
    if float_output == len(steps):
        outputs.append(y)
    if quantize is not None:
        codes = _codes(y, next(inputs), tf.constant(float(np.float32(quantize_beta1)), tf.float32))
        channels = int(y.shape[-1])
        outputs.append(_pack_planes(codes, int(quantize_bits), channels) if quantize == "pack"
                       else tf.cast(codes, tf.uint8))
    return tuple(outputs)


def _fused_fn(name, layer_options, layer_body, stage):
    stage_options = output_stage_options(**stage)
    options = dict(layer_options, **stage_options)

    @tf.function(experimental_implements=_implements(name, **options))
    def fused(x, weight_stream, multiplier, bias, *stage_inputs):
        outputs = output_stage_reference(layer_body(x, weight_stream, multiplier, bias), stage_inputs, **stage)
        return outputs[0] if len(outputs) == 1 else outputs

    return fused


def conv2d_fused_fn(*, steps=(), float_output=None, quantize=None, quantize_bits=None, quantize_beta1=1.0, **conv):
    """The N2UQConv2DFused op as a tf.function(packed, weight_stream, multiplier, bias, *stage_inputs):
    `conv2d_fn`'s keywords plus the stage's (`output_stage_options`)."""
    return _fused_fn(OP_CONV2D_FUSED, *_conv2d_body(**conv),
                     dict(steps=steps, float_output=float_output, quantize=quantize, quantize_bits=quantize_bits,
                          quantize_beta1=quantize_beta1))


def depthwise_conv2d_fused_fn(*, steps=(), float_output=None, quantize=None, quantize_bits=None, quantize_beta1=1.0,
                              **depthwise):
    """The N2UQDepthwiseConv2DFused op: `depthwise_conv2d_fn`'s keywords plus the stage's."""
    return _fused_fn(OP_DEPTHWISE_CONV2D_FUSED, *_depthwise_body(**depthwise),
                     dict(steps=steps, float_output=float_output, quantize=quantize, quantize_bits=quantize_bits,
                          quantize_beta1=quantize_beta1))


def fully_connected_fused_fn(*, steps=(), float_output=None, quantize=None, quantize_bits=None, quantize_beta1=1.0,
                             **fully_connected):
    """The N2UQFullyConnectedFused op: `fully_connected_fn`'s keywords plus the stage's."""
    return _fused_fn(OP_FULLY_CONNECTED_FUSED, *_fully_connected_body(**fully_connected),
                     dict(steps=steps, float_output=float_output, quantize=quantize, quantize_bits=quantize_bits,
                          quantize_beta1=quantize_beta1))


def max_pool2d_fused_fn(*, channels, pool_size, strides, pads=(0, 0, 0, 0), steps=(), float_output=None, quantize=None,
                        quantize_bits=None, quantize_beta1=1.0):
    """The N2UQMaxPool2DFused op as a tf.function(x, *stage_inputs): zero pads (top, bottom, left,
    right), a 'valid' max pool of `pool_size` and `strides` (pairs), then the stage (`output_stage_options`)."""
    (fh, fw), (sh, sw) = (tuple(int(v) for v in pool_size), tuple(int(v) for v in strides))
    top, bottom, left, right = (int(p) for p in pads)
    layer_options = dict(channels=int(channels), filter_height=fh, filter_width=fw, stride_height=sh, stride_width=sw,
                         pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right)
    stage = dict(steps=steps, float_output=float_output, quantize=quantize, quantize_bits=quantize_bits,
                 quantize_beta1=quantize_beta1)
    options = dict(layer_options, **output_stage_options(**stage))

    @tf.function(experimental_implements=_implements(OP_MAX_POOL2D_FUSED, **options))
    def fused(x, *stage_inputs):
        padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        pooled = tf.nn.max_pool2d(padded, (fh, fw), (sh, sw), "VALID")
        outputs = output_stage_reference(pooled, stage_inputs, **stage)
        return outputs[0] if len(outputs) == 1 else outputs

    return fused
