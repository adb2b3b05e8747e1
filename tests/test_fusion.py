"""Fused output stages: the kernel core's stage (n2uq_output_stage), the exporter's rewrite
(n2uq_tf.export.fusion) and the fused ops in both interpreters.

The claim under test (custom_ops, "Fused output stages"): a fused file gives the outputs of the
unfused one bit for bit, because every step is the builtin's own float32 operation in the same
order and the quantizer compares the same products with the same thresholds. The thresholds here
are placed exactly on values of the unfused chain, where any other rounding (e.g. constants folded
into the layer's multiplier and bias) changes codes; the tests show that it would.
"""

import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.tools import flatbuffer_utils

import n2uq_tf
import n2uq_tf.tflite as n2tfl
from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops as co
from n2uq_tf.export import export_tflite, fusion, inspect_tflite
from n2uq_tf.tflite import _core
from random_parameters import randomize

BACKENDS = ("tflite", "litert")
L = keras.layers

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


# ------------------------------------------------------------------ NumPy reference of a stage

def reference_steps(y, steps):
    """The builtins' float32 operations one after the other (NumPy rounds each float32 op once)."""
    y = np.asarray(y, np.float32)
    for kind, v in steps:
        v = None if v is None else np.asarray(v, np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            if kind == "add":
                y = y + v
            elif kind == "mul":
                y = y * v
            elif kind == "prelu":
                y = np.where(y >= 0, y, y * v)
            elif kind == "add_tensor":
                y = y + v
            elif kind == "relu":
                y = np.where(y < 0, np.float32(0), y)
            elif kind == "relu6":
                y = np.where(y < 0, np.float32(0), np.where(y > 6, np.float32(6), y))
            elif kind == "relu_n1_to_1":
                y = np.where(y < -1, np.float32(-1), np.where(y > 1, np.float32(1), y))
        y = y.astype(np.float32)
    return y


def reference_codes(x, thresholds, beta1):
    with np.errstate(invalid="ignore", over="ignore"):
        product = (np.asarray(x, np.float32) * np.float32(beta1)).astype(np.float32)
    return (product[..., None] > np.asarray(thresholds, np.float32)).sum(-1)


def reference_pack(codes, bits):
    channels = codes.shape[-1]
    words = -(-channels // 64)
    padded = np.zeros(codes.shape[:-1] + (words * 64,), np.uint64)
    padded[..., :channels] = codes
    lanes = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
    planes = [(((padded >> np.uint64(b)) & np.uint64(1)).reshape(codes.shape[:-1] + (words, 64)) * lanes).sum(
        -1, dtype=np.uint64) for b in range(bits)]
    return np.stack(planes, -2)


def bits_of(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def hard_values(rng, shape, thresholds, beta1):
    """Values with ties at the thresholds (x * beta1 == t exactly where representable), their float32
    neighbours, signed zeros, subnormals, infinities and large magnitudes, and random ones."""
    special = [0.0, -0.0, 1e-45, -1e-45, 1e-39, np.inf, -np.inf, 3e38, -3e38, 6.0, -1.0, 1.0]
    for t in np.asarray(thresholds, np.float32):
        x = np.float32(t / np.float32(beta1))
        special += [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf)), t]
    values = rng.normal(0, 2, int(np.prod(shape))).astype(np.float32)
    picks = rng.random(values.size) < 0.5
    values[picks] = rng.choice(np.array(special, np.float32), int(picks.sum()))
    return values.reshape(shape)


# ------------------------------------------------------------------ the kernel core's stage

STAGES = {  # name: (steps as kinds, float_after)
    "rprelu_residual_relu6": (["add", "prelu", "add", "add_tensor", "relu6"], 3),
    "bn_relu": (["mul", "add", "relu"], None),
    "clamp_negative_slope": (["prelu", "relu_n1_to_1", "mul"], 1),
    "nothing": ([], 0),
    # Sequences the stage compiles whole (output_stage_impl.h, kProgramSteps): on 80 channels the
    # blocks are whole vectors, so they take that loop.
    "program_rprelu": (["add", "prelu", "add"], None),
    "program_residual_rprelu_twice": (["add_tensor", "add", "prelu", "add", "add", "prelu", "add"], 4),
    "program_residual_relu": (["add_tensor", "relu"], 1),
    "program_add_relu": (["add", "relu"], 2),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_output_stage_equals_the_builtins_one_after_the_other(name):
    """Every ISA, 1 and 2 threads, packed and byte codes: the float output bit for bit and the codes
    equal the NumPy chain, with values on, next to and between the thresholds."""
    kinds, float_after = STAGES[name]
    rng = np.random.default_rng(len(name))
    # two words per plane, a partial one; several chunks with 2 threads
    positions, channels = 37, 80 if name.startswith("program") else 70
    for bits, beta1 in ((2, 1.0), (4, 0.7)):
        steps = []
        for kind in kinds:
            value = None
            if kind in ("add", "mul", "prelu"):
                value = rng.normal(0, 1, channels).astype(np.float32)
                value[:4] = (0.1, 0.3, -0.5, 0.0)  # inexact products / sums, a negative slope, a zero
            elif kind == "add_tensor":
                value = rng.normal(0, 1, (positions, channels)).astype(np.float32)
            steps.append((kind, value))
        y0 = hard_values(rng, (positions, channels), np.linspace(-1, 2, 2 ** bits - 1), 1.0)
        after = reference_steps(y0, steps)
        finite = np.unique(after[np.isfinite(after)])
        # thresholds on values the chain produces: any other rounding moves those codes
        thresholds = np.sort(rng.choice(finite, 2 ** bits - 1, replace=False) * np.float32(beta1)).astype(np.float32)
        y0 = np.where(np.isnan(after), np.float32(0), y0)  # NaN: see the next test
        after = reference_steps(y0, steps)
        codes = reference_codes(after, thresholds, beta1)
        assert np.isin((after * np.float32(beta1)).astype(np.float32), thresholds).sum() >= len(thresholds)  # ties
        float_ref = reference_steps(y0, steps[:float_after]) if float_after is not None else None
        for isa in _core.supported_isas():
            for threads in (1, 2):
                for mode in ("pack", "codes"):
                    got_float, got = _core.output_stage(y0, steps, float_after=float_after, quantize=mode, bits=bits,
                                                        thresholds=thresholds, beta1=beta1, isa=isa,
                                                        num_threads=threads)
                    label = f"{name} {bits}-bit {isa} {threads} threads {mode}"
                    if float_after is None:
                        assert got_float is None
                    else:
                        np.testing.assert_array_equal(bits_of(got_float), bits_of(float_ref), err_msg=label)
                    want = reference_pack(codes, bits) if mode == "pack" else codes.astype(np.uint8)
                    np.testing.assert_array_equal(got, want, err_msg=label)


def test_output_stage_nan_and_folding_are_as_documented():
    """The documented differences: a NaN stays NaN through the ReLUs and gets code 0. And why the
    stage does not fold its constants into the layer's affine map: folded, codes move."""
    thresholds = np.array([-0.5, 0.0, 0.5], np.float32)
    y = np.array([[np.nan, -np.nan, 1.0]], np.float32)
    out, codes = _core.output_stage(y, [("relu", None)], float_after=1, quantize="codes", bits=2,
                                    thresholds=thresholds)
    assert np.isnan(out[0, :2]).all() and out[0, 2] == 1.0 and codes.tolist() == [[0, 0, 3]]
    # Folding (acc * m + b) * s + c into acc * (m * s) + (b * s + c) rounds differently: with the
    # thresholds on the sequential values, the folded values cross some of them.
    rng = np.random.default_rng(0)
    acc = rng.integers(-300, 300, (64, 32)).astype(np.float32)
    m, b, s, c = (rng.normal(0, 1, 32).astype(np.float32) for _ in range(4))
    y = acc * m + b
    sequential = reference_steps(y, [("mul", s), ("add", c)])
    folded = (acc * (m * s) + (b * s + c)).astype(np.float32)
    assert not np.array_equal(bits_of(sequential), bits_of(folded))
    triples = [np.sort(rng.choice(sequential.ravel(), 3, replace=False)) for _ in range(20)]
    assert any(not np.array_equal(reference_codes(sequential, t, 1.0), reference_codes(folded, t, 1.0))
               for t in triples), "thresholds on the sequential values should catch a folded stage"
    for t in triples:
        _, got = _core.output_stage(y, [("mul", s), ("add", c)], quantize="codes", bits=2, thresholds=t)
        np.testing.assert_array_equal(got, reference_codes(sequential, t, 1.0))


def test_output_stage_rejects_bad_arguments():
    y = np.zeros((2, 3), np.float32)
    with pytest.raises(_core.CoreError, match="step 0 .ADD. has 2 values, needs 3"):
        _core.output_stage(y, [("add", np.zeros(2, np.float32))], float_after=1)
    with pytest.raises(_core.CoreError, match="ADD_TENSOR. has 3 values, needs 6"):
        _core.output_stage(y, [("add_tensor", np.zeros(3, np.float32))], float_after=1)
    with pytest.raises(_core.CoreError, match="2-bit codes need 3 thresholds, got 2"):
        _core.output_stage(y, [], quantize="pack", bits=2, thresholds=np.zeros(2, np.float32))
    with pytest.raises(_core.CoreError, match="no output"):
        _core.output_stage(y, [])
    with pytest.raises(_core.CoreError, match="float_after must be -1..num_steps"):
        _core.output_stage(y, [("relu", None)], float_after=2)


# ------------------------------------------------------------------ the rewrite on a graph of custom ops

def _prelu(x, alpha):
    """The formula the converter turns into one PRELU (slopes of the rank of x without its batch axis)."""
    return tf.nn.relu(x) + tf.constant(-alpha.reshape([1] * (x.shape.rank - 2) + [-1])) * tf.nn.relu(-x)


class OpGraph:
    """A small network of N2UQ ops (custom_ops' reference bodies) and the float ops between them:

    q0 -> conv1 -> ADD c, PRELU [float output h] -> RELU6 -> q1 (4-bit)
       -> conv2 -> MUL, ADD (a BatchNorm), ADD h + RELU (fused activation) -> q2 (byte codes)
       -> depthwise -> LEAKY_RELU, SUB c -> q3 (3-bit)
       -> conv3 (1x1) -> outputs: + a constant of the full shape (not per channel: stays a builtin),
          + its own ReLU (a residual that depends on the layer: stays), MEAN -> q4
       -> fc1 -> ADD c + RELU -> q5 -> fc2 -> output.
    Thresholds: the input quantizer's spread over the input range; every other quantizer's placed on
    values its input takes for INPUT (ties: x * beta1 == t exactly).
    """
    SHAPE = (2, 6, 6, 8)
    QUANTIZERS = {"q1": (4, 16, 0.9, True), "q2": (2, 16, 1.1, False), "q3": (3, 16, 1.0, True),
                  "q4": (2, 8, 1.0, True), "q5": (2, 12, 1.0, True)}  # name: bits, channels, beta1, packed

    def __init__(self):
        rng = np.random.default_rng(5)
        self.input = rng.normal(0.3, 1.0, self.SHAPE).astype(np.float32)
        normal = lambda *shape, scale=1.0: (rng.normal(0, scale, shape)).astype(np.float32)  # noqa: E731
        self.c = {name: normal(n, scale=0.3) for name, n in (("c1", 16), ("c2", 16), ("c3", 16), ("c5", 12))}
        self.alpha = rng.uniform(0.05, 0.5, 16).astype(np.float32)
        self.scale = rng.uniform(0.5, 1.5, 16).astype(np.float32)
        self.full = normal(1, 6, 6, 8)
        self.layers = {}
        specs = {"conv1": (8, 16, 3, 2), "conv2": (16, 16, 3, 3), "dw": (16, 16, 3, 2),
                 "conv3": (16, 8, 1, 2), "fc1": (8, 12, 1, 2), "fc2": (12, 5, 1, 3)}  # in, out, kernel, weight bits
        for name, (cin, cout, k, wb) in specs.items():
            count = k * k * cout if name == "dw" else k * k * cin * cout
            self.layers[name] = (co.pack_weight_codes(rng.integers(0, 2 ** wb, count), wb),
                                 rng.uniform(0.02, 0.2, cout).astype(np.float32), normal(cout, scale=0.5))
        self.thresholds = {"q0": np.array([-0.4, 0.3, 1.0], np.float32)}
        self.network(tf.constant(self.input), place_thresholds=True)  # eager: the reference bodies

    def _place(self, name, value):
        """Thresholds of quantizer `name` on values its input takes, spread over them."""
        bits, _, beta1, _ = self.QUANTIZERS[name]
        distinct = np.unique((value.numpy() * np.float32(beta1)).astype(np.float32))
        self.thresholds[name] = distinct[np.linspace(0, len(distinct) - 1, 2 ** bits + 1)[1:-1].astype(int)]

    @staticmethod
    def _call(fn, *args):
        # eagerly, the body itself (a tf.function would trace on every call)
        return fn.python_function(*args) if tf.executing_eagerly() else fn(*args)

    def _layer(self, fn, name, x):
        stream, multiplier, bias = self.layers[name]
        return self._call(fn, x, tf.constant(stream), tf.constant(multiplier), tf.constant(bias))

    def _quantize(self, name, x, bits=None, channels=None, beta1=1.0, packed=True):
        if name in self.QUANTIZERS:
            bits, channels, beta1, packed = self.QUANTIZERS[name]
        return self._call(co.quantize_pack_fn(bits, channels, beta1, pack=packed), x,
                          tf.constant(self.thresholds[name]))

    def network(self, x, place_thresholds=False):
        def tap(name, value):
            if place_thresholds:
                self._place(name, value)
            return value

        conv = dict(strides=(1, 1), dilations=(1, 1))
        if True:
            y1 = self._layer(co.conv2d_fn(in_channels=8, out_channels=16, kernel_size=(3, 3), paddings=co.SAME,
                                          act_bits=2, weight_bits=2, **conv), "conv1", self._quantize("q0", x, 2, 8))
            h = _prelu(y1 + self.c["c1"], self.alpha)
            p1 = self._quantize("q1", tap("q1", tf.nn.relu6(h)))
            y2 = self._layer(co.conv2d_fn(in_channels=16, out_channels=16, kernel_size=(3, 3),
                                          paddings=((1, 1), (1, 1)), act_bits=4, weight_bits=3, **conv), "conv2", p1)
            g = tap("q2", tf.nn.relu(y2 * self.scale + self.c["c2"] + h))
            y3 = self._layer(co.depthwise_conv2d_fn(in_channels=16, depth_multiplier=1, kernel_size=(3, 3),
                                                    paddings=co.SAME, act_bits=2, weight_bits=2, **conv), "dw",
                             self._quantize("q2", g))
            k = tap("q3", tf.nn.leaky_relu(y3, 0.1) - self.c["c3"])
            y4 = self._layer(co.conv2d_fn(in_channels=16, out_channels=8, kernel_size=(1, 1), paddings=((0, 0), (0, 0)),
                                          act_bits=3, weight_bits=2, **conv), "conv3", self._quantize("q3", k))
            pooled = tap("q4", tf.reduce_mean(y4, axis=[1, 2]))
            y5 = self._layer(co.fully_connected_fn(in_features=8, out_features=12, act_bits=2, weight_bits=2), "fc1",
                             self._quantize("q4", pooled))
            z = tap("q5", tf.nn.relu(y5 + self.c["c5"]))
            y6 = self._layer(co.fully_connected_fn(in_features=12, out_features=5, act_bits=2, weight_bits=3), "fc2",
                             self._quantize("q5", z))
        return y4 + self.full, y4 + tf.nn.relu(y4), h, y6

    def convert(self):
        return convert_network(self.network, self.SHAPE)


def convert_network(network, shape):
    """The TFLite flatbuffer of network(x) for float32 x of `shape`, custom ops allowed."""
    module = tf.Module()
    module.f = tf.function(network, input_signature=[tf.TensorSpec(shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
    converter.allow_custom_ops = True
    return converter.convert()


def fuse_bytes(content):
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    fusions = fusion.fuse_output_stages(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), fusions


@pytest.fixture(scope="module")
def op_graph():
    graph = OpGraph()
    unfused = graph.convert()
    fused, fusions = fuse_bytes(unfused)
    return graph, unfused, fused, fusions


def run(content, x, backend, threads):
    interpreter = n2tfl.Interpreter(model_content=content, num_threads=threads, backend=backend)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def assert_bit_identical(got, want, label):
    assert len(got) == len(want), label
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (label, i)
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=f"{label}: output {i}")


def test_rewrite_fuses_the_patterns_and_leaves_the_rest(op_graph):
    _, unfused, fused, fusions = op_graph
    before, after = inspect_tflite(unfused), inspect_tflite(fused)
    counts = after.op_counts()
    assert {k: v for k, v in counts.items() if k.startswith("N2UQ")} == {
        "N2UQQuantizePack": 2, "N2UQConv2DFused": 2, "N2UQDepthwiseConv2DFused": 1, "N2UQConv2D": 1,
        "N2UQFullyConnectedFused": 1, "N2UQFullyConnected": 1}
    assert {k: v for k, v in after.op_counts(as_unfused=True).items() if k.startswith("N2UQ")} == \
        {k: v for k, v in before.op_counts().items() if k.startswith("N2UQ")}
    # what stays: MEAN, the full-shape ADD, the self-residual's RELU and ADD
    assert {k: v for k, v in counts.items() if not k.startswith("N2UQ")} == {"MEAN": 1, "ADD": 2, "RELU": 1}
    assert {"PRELU", "RELU6", "LEAKY_RELU", "MUL", "SUB"} <= set(before.op_counts())
    stages = {op.name: [] for op in after.operators}
    for op in after.operators:
        stages[op.name].append(co.describe_output_stage(op.options or {}))
    assert stages["N2UQConv2DFused"] == ["add -> prelu -> float output -> relu6 -> quantize-and-pack 4-bit",
                                         "mul -> add -> add tensor -> relu -> quantize 2-bit"]
    assert stages["N2UQDepthwiseConv2DFused"] == ["prelu -> add -> quantize-and-pack 3-bit"]
    assert stages["N2UQFullyConnectedFused"] == ["add -> relu -> quantize-and-pack 2-bit"]
    first = next(op for op in after.operators if op.name == "N2UQConv2DFused")
    assert first.options["quantize_beta1"] == pytest.approx(0.9) and first.options["float_output"] == 2
    assert [(f.layer_op, f.quantize, f.float_output) for f in fusions] == [
        ("N2UQConv2D", "pack", 2), ("N2UQConv2D", "codes", None), ("N2UQDepthwiseConv2D", "pack", None),
        ("N2UQFullyConnected", "pack", None)]
    assert [name for name, _ in fusions[0].absorbed] == ["ADD", "PRELU", "RELU6"]
    # the file holds fewer tensors (intermediates gone) and no buffer nothing refers to
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(fused))
    assert len(model.subgraphs[0].tensors) < len(flatbuffer_utils.convert_bytearray_to_object(
        bytearray(unfused)).subgraphs[0].tensors)
    used = {t.buffer for t in model.subgraphs[0].tensors} | {m.buffer for m in model.metadata} | {0}
    assert used == set(range(len(model.buffers)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_outputs_equal_unfused_bit_for_bit(op_graph, backend):
    """Thresholds on the chain's own values (ties), 1 and 2 threads, every kernel ISA."""
    graph, unfused, fused, _ = op_graph
    want = run(unfused, graph.input, backend, 1)
    logits = next(w for w in want if w.shape == (2, 5))
    assert not np.array_equal(logits[0], logits[1])  # outputs that depend on the codes
    for threads in (1, 2):
        assert_bit_identical(run(fused, graph.input, backend, threads), want, f"{backend} {threads} threads")
    # a second input: ties are gone, the outputs still equal
    x = np.random.default_rng(9).normal(0, 1.5, graph.SHAPE).astype(np.float32)
    assert_bit_identical(run(fused, x, backend, 2), run(unfused, x, backend, 2), f"{backend} other input")


# ------------------------------------------------------------------ the max pool as a layer op

class PoolGraph:
    """Three pools of one input (float32 [2, 7, 9, 16]), each followed by a quantize-and-pack:
    a PAD of zeros (asymmetric) + 3x3 / 2 'valid' pool + ADD c, PRELU (fused: the PAD too); a PAD of
    ones + 'valid' pool (the pool fused, the PAD stays: its padding is not zeros); a 'same' pool
    (stays: TFLite's 'same' pool skips the padding, it does not count zeros). Thresholds on values the
    quantizers' inputs take (ties)."""
    SHAPE = (2, 7, 9, 16)

    def __init__(self):
        rng = np.random.default_rng(3)
        self.input = hard_values(rng, self.SHAPE, [0.25, -0.5], 1.0)
        self.c = rng.normal(0, 0.3, 16).astype(np.float32)
        self.alpha = rng.uniform(0.05, 0.5, 16).astype(np.float32)
        self.thresholds = {}
        self.network(tf.constant(self.input), place=True)

    def branches(self, x):
        zero = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]]), 3, 2, "VALID")
        ones = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=1.0), 2, 2, "VALID")
        same = tf.nn.max_pool2d(x, 3, 2, "SAME")
        return {"zero": _prelu(zero + self.c, self.alpha), "ones": ones, "same": same}

    def network(self, x, place=False):
        outputs = []
        for name, value in self.branches(x).items():
            if place:
                distinct = np.unique(value.numpy())
                self.thresholds[name] = distinct[np.linspace(0, len(distinct) - 1, 5)[1:-1].astype(int)]
            fn = co.quantize_pack_fn(2, 16, 1.0)
            q = fn.python_function(value, tf.constant(self.thresholds[name])) if tf.executing_eagerly() else \
                fn(value, tf.constant(self.thresholds[name]))
            outputs.append(q)
        return outputs

    def convert(self):
        return convert_network(self.network, self.SHAPE)


def test_pool_fusion_takes_zero_pads_and_valid_pools_only():
    graph = PoolGraph()
    unfused = graph.convert()
    fused, fusions = fuse_bytes(unfused)
    before, after = inspect_tflite(unfused), inspect_tflite(fused)
    assert before.op_counts()["MAX_POOL_2D"] == 3
    assert after.op_counts() == {"N2UQMaxPool2DFused": 2, "PADV2": 1, "MAX_POOL_2D": 1, "N2UQQuantizePack": 1}
    assert [(f.layer_op, f.steps, f.quantize) for f in fusions] == [
        ("PAD + MAX_POOL_2D", ["add", "prelu"], "pack"), ("MAX_POOL_2D", [], "pack")]
    pools = [op.options for op in after.operators if op.name == co.OP_MAX_POOL2D_FUSED]
    assert [(o["filter_height"], o["stride_height"], o["pad_top"], o["pad_bottom"], o["pad_left"], o["pad_right"])
            for o in pools] == [(3, 2, 1, 2, 0, 1), (2, 2, 0, 0, 0, 0)]
    for backend in BACKENDS:
        want = run(unfused, graph.input, backend, 1)
        assert all(len(np.unique(w)) > 1 for w in want)
        for threads in (1, 2):
            assert_bit_identical(run(fused, graph.input, backend, threads), want, f"{backend} {threads} threads")


# Channel counts that reach every part of the pools' pixel loop on each ISA: the 64-value register
# blocks (floats: 4 vectors, int8: one vector of bytes), single vectors, 16-byte int8 vectors and
# the scalar tail.
POOL_CHANNEL_CASES = [((1, 6, 5, 100), 3, 2, 1), ((1, 5, 6, 150), (3, 2), (2, 1), (1, 0, 0, 1)),
                      ((2, 4, 4, 64), 2, 2, 0)]


@pytest.fixture(params=_core.supported_isas())
def kernel_isa(request):
    """Each ISA this CPU runs."""
    return request.param


def test_max_pool_kernel_equals_numpy(kernel_isa):
    """n2uq_max_pool2d: the max over each window of the zero-padded input, every shape and thread count."""
    rng = np.random.default_rng(0)
    cases = [((2, 9, 11, 5), 3, 2, (1, 1, 1, 1)), ((1, 7, 7, 70), (2, 3), (1, 2), (0, 2, 1, 0)),
             ((1, 4, 4, 16), 3, 2, 0), ((1, 3, 3, 17), 2, 1, 4), ((1, 1, 1, 1), 1, 1, 0)] + POOL_CHANNEL_CASES
    for shape, size, strides, pads in cases:
        x = rng.normal(0, 1, shape).astype(np.float32)
        x[x > 1.5] = -0.0
        fh, fw = (size, size) if isinstance(size, int) else size
        sh, sw = (strides, strides) if isinstance(strides, int) else strides
        top, bottom, left, right = (pads,) * 4 if isinstance(pads, int) else pads
        padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        oh, ow = (padded.shape[1] - fh) // sh + 1, (padded.shape[2] - fw) // sw + 1
        want = np.full((shape[0], oh, ow, shape[3]), -np.inf, np.float32)
        for fy in range(fh):
            for fx in range(fw):
                want = np.maximum(want, padded[:, fy:fy + sh * (oh - 1) + 1:sh, fx:fx + sw * (ow - 1) + 1:sw])
        for threads in (1, 3):
            got = _core.max_pool2d(x, size, strides=strides, padding=pads, num_threads=threads, isa=kernel_isa)
            np.testing.assert_array_equal(got, want, err_msg=f"{kernel_isa} {shape} {size} {strides} {pads} {threads}")
    x = rng.normal(0, 1, (1, 4, 4, 3)).astype(np.float32)
    with pytest.raises(_core.CoreError, match="smaller than the filter"):
        _core.max_pool2d(x, 5, strides=1, padding=0)
    with pytest.raises(_core.CoreError, match="num_threads"):
        _core.max_pool2d(x, 2, num_threads=0)
    with pytest.raises(_core.CoreError, match="filter_height"):
        _core.max_pool2d(x, 0)


def test_int8_max_pool_kernel_equals_numpy(kernel_isa):
    """n2uq_max_pool2d_int8: TFLite's int8 PAD (the zero point) + MAX_POOL_2D + DEQUANTIZE, i.e. the
    max over each window of the input padded with the zero point, then float32(max - zp) * scale, bit
    for bit; every shape and thread count, the zero point at both ends of int8."""
    rng = np.random.default_rng(1)
    cases = [((2, 9, 11, 5), 3, 2, (1, 1, 1, 1), -128), ((1, 7, 7, 70), (2, 3), (1, 2), (0, 2, 1, 0), 3),
             ((1, 4, 4, 16), 3, 2, 0, 127), ((1, 3, 3, 17), 2, 1, 4, -5), ((1, 1, 1, 1), 1, 1, 0, 0)]
    cases += [case + (zp,) for case, zp in zip(POOL_CHANNEL_CASES, (-128, 17, 127))]
    for shape, size, strides, pads, zp in cases:
        x = rng.integers(-128, 128, shape).astype(np.int8)
        scale = np.float32(rng.uniform(0.001, 0.3))
        fh, fw = (size, size) if isinstance(size, int) else size
        sh, sw = (strides, strides) if isinstance(strides, int) else strides
        top, bottom, left, right = (pads,) * 4 if isinstance(pads, int) else pads
        padded = np.pad(x.astype(np.int32), ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=zp)
        oh, ow = (padded.shape[1] - fh) // sh + 1, (padded.shape[2] - fw) // sw + 1
        m = np.full((shape[0], oh, ow, shape[3]), -129, np.int32)
        for fy in range(fh):
            for fx in range(fw):
                m = np.maximum(m, padded[:, fy:fy + sh * (oh - 1) + 1:sh, fx:fx + sw * (ow - 1) + 1:sw])
        want = (m - zp).astype(np.float32) * scale  # DEQUANTIZE's float32 product
        assert np.array_equal(want, ((m - zp) * np.float64(scale)).astype(np.float32))  # TFLite's reference form
        for threads in (1, 3):
            got = _core.max_pool2d(x, size, strides=strides, padding=pads, num_threads=threads, zero_point=zp,
                                   scale=scale, isa=kernel_isa)
            where = (kernel_isa, shape, size, strides, pads, zp, threads)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), where
    x = rng.integers(-128, 128, (1, 4, 4, 3)).astype(np.int8)
    with pytest.raises(_core.CoreError, match="zero_point must be -128..127"):
        _core.max_pool2d(x, 2, zero_point=200, scale=0.5)
    with pytest.raises(_core.CoreError, match="scale must be positive"):
        _core.max_pool2d(x, 2, zero_point=0, scale=0.0)
    with pytest.raises(_core.CoreError, match="x must be int8"):
        _core.max_pool2d(x.astype(np.float32), 2, zero_point=0, scale=0.5)
    with pytest.raises(_core.CoreError, match="give both"):
        _core.max_pool2d(x, 2, zero_point=0)


# ------------------------------------------------------------------ exported Keras models

def resnet18_style(bits, padded_pool=False):
    """ResNet-18's structure at toy size: 3x3 stem, BN, ReLU, max-pool (2x2, or with `padded_pool`
    the ImageNet model's zero pad of 1 and 3x3 / 2), the library's basic blocks (identity shortcuts,
    then a stride-2 block with a downsample conv), GAP, fc; the paper's plan."""
    from n2uq_tf.models import _common, resnet
    keras.utils.set_random_seed(bits)
    inputs = keras.Input((16, 16, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = L.ReLU(name="stem_relu")(_common.batch_norm("stem_bn")(x))
    if padded_pool:
        x = L.MaxPooling2D(3, strides=2, name="stem_pool")(L.ZeroPadding2D(1, name="stem_pool_pad")(x))
    else:
        x = L.MaxPooling2D(2, name="stem_pool")(x)
    for prefix, planes, stride in (("layer1_0", 8, 1), ("layer1_1", 8, 1), ("layer2_0", 16, 2)):
        x = resnet.basic_block(x, planes, stride, prefix)
    x = _common.classifier(10, 16)(L.GlobalAveragePooling2D(name="avgpool")(x))
    model = _common.quantize(keras.Model(inputs, x, name="resnet18_style"), bits)
    randomize(model, bits, alpha_shift=0.25)
    return model


def mixed_network():
    """A shortcut that needs the float tensor, ReLU6, depthwise, LeakyReLU, a BatchNorm that cannot
    be folded (after a ReLU), a stride-2 conv and a quantized Dense head; mixed bits."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((12, 12, 4), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    shortcut = n2uq_tf.layers.RPReLU(name="c1_act")(L.BatchNormalization(name="c1_bn")(x))
    y = L.ReLU(6.0, name="c2_relu6")(L.Conv2D(8, 3, padding="same", name="c2")(shortcut))
    y = L.LeakyReLU(0.1, name="dw_leaky")(L.BatchNormalization(name="dw_bn")(L.DepthwiseConv2D(3, padding="same",
                                                                                               name="dw")(y)))
    y = L.BatchNormalization(name="pw_bn")(L.Conv2D(8, 1, name="pw")(y))
    x = L.ReLU(name="add_relu")(L.Add(name="add")([shortcut, y]))
    x = L.BatchNormalization(name="kept_bn")(x)
    x = L.Conv2D(16, 3, strides=2, padding="same", name="c3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(12, activation="relu", name="d1")(x)
    out = L.Dense(5, name="d2")(x)
    model = n2uq_tf.quantize_model(keras.Model(inp, out), bits=2, skip_layers=None,
                                   overrides={"c2": (3, 2), "dw": (2, 4), "d1": (4, 3)})
    randomize(model, 4, alpha_shift=0.25)
    return model


def _exports(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unfused = export_tflite(model, fuse=False)
        fused, report = export_tflite(model, return_report=True)
    return unfused, fused, report


def _check_parity(model, unfused, fused, batch=2):
    x = np.random.default_rng(1).normal(0, 1, (batch,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    for backend in BACKENDS:
        want = run_resized(unfused, x, backend, 1)
        for threads in (1, 2):
            assert_bit_identical(run_resized(fused, x, backend, threads), want, f"{model.name} {backend} {threads}")
    expected = model(x, training=False).numpy()
    assert np.abs(want[0] - expected).max() <= 1e-4 * max(float(np.abs(expected).max()), 1.0)


def run_resized(content, x, backend, threads):
    interpreter = n2tfl.Interpreter(model_content=content, num_threads=threads, backend=backend)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def _n2uq_counts(counts):
    return {k: v for k, v in counts.items() if k in co.ALL_OPS}


@pytest.mark.slow
def test_resnet20_fused_equals_unfused():
    model = n2uq_tf.models.resnet20(bits=2, width=4, input_shape=(16, 16, 3))
    randomize(model, 1, alpha_shift=0.25)
    unfused, fused, report = _exports(model)
    _check_parity(model, unfused, fused)
    info, before = inspect_tflite(fused), inspect_tflite(unfused)
    assert info.metadata["format_version"] == 3 and before.metadata["format_version"] == 2
    # Every conv fused but the second conv of each downsampling block (its output is the residual the
    # downsample conv's stage adds). Left as builtins: the first block's input RPReLU (after the float
    # stem, before the first quantizer).
    assert info.op_counts() == {"CONV_2D": 1, "ADD": 2, "PRELU": 1, "N2UQQuantizePack": 3, "N2UQConv2DFused": 18,
                                "N2UQConv2D": 2, "MEAN": 1, "FULLY_CONNECTED": 1}
    assert _n2uq_counts(info.op_counts(as_unfused=True)) == _n2uq_counts(before.op_counts())
    assert before.op_counts()["ADD"] == 63 and len(fused) < len(unfused)
    rows = {r.name: r for r in report.layers}
    assert rows["layer1_0_conv2"].fused == [
        "layer1_0_add (ADD) -> layer1_0_rprelu_out (ADD, PRELU, ADD) -> float output -> layer1_1_rprelu1 (ADD, PRELU, "
        "ADD) -> quantize-and-pack for layer1_1_conv1"]
    assert rows["layer3_2_conv2"].fused == ["layer3_2_add (ADD) -> layer3_2_rprelu_out (ADD, PRELU, ADD)"]
    assert rows["layer1_1_conv1"].ops == ["N2UQConv2DFused"]  # its quantizer runs in layer1_0_conv2's op
    assert rows["layer1_0_conv1"].ops == ["N2UQQuantizePack", "N2UQConv2DFused"]
    assert rows["layer2_0_conv2"].ops == ["N2UQConv2D"] and not rows["layer2_0_conv2"].fused
    text = str(report)
    assert "fused: layer1_0_add (ADD) -> layer1_0_rprelu_out" in text and "fused output stage" in str(info)


@pytest.mark.slow
@pytest.mark.parametrize("bits, padded_pool", [(2, True), (4, False)])
def test_resnet18_style_fused_equals_unfused(bits, padded_pool):
    """The stem's pool (with its zero PAD when there is one), the first block's RPReLU and its
    quantize-and-pack become one N2UQMaxPool2DFused that also outputs the float tensor (the shortcut)."""
    model = resnet18_style(bits, padded_pool)
    unfused, fused, report = _exports(model)
    _check_parity(model, unfused, fused)
    info, before = inspect_tflite(fused), inspect_tflite(unfused)
    assert info.op_counts() == {"CONV_2D": 1, "N2UQMaxPool2DFused": 1, "N2UQQuantizePack": 1,
                                "N2UQConv2DFused": 6, "N2UQConv2D": 1, "MEAN": 1, "FULLY_CONNECTED": 1}
    assert before.op_counts()["MAX_POOL_2D"] == 1 and before.op_counts().get("PAD", 0) == int(padded_pool)
    assert _n2uq_counts(info.op_counts(as_unfused=True)) == _n2uq_counts(before.op_counts())
    assert all(layer.activation_bits == bits for layer in info.layers)
    assert len([r for r in report.lowered if r.fused]) == 6
    pool = next(op for op in info.operators if op.name == co.OP_MAX_POOL2D_FUSED)
    size, stride, pad = (3, 2, 1) if padded_pool else (2, 2, 0)
    assert {k: pool.options[k] for k in co.POOL_OPTIONS} == dict(
        channels=8, filter_height=size, filter_width=size, stride_height=stride, stride_width=stride, pad_top=pad,
        pad_bottom=pad, pad_left=pad, pad_right=pad)
    assert co.describe_output_stage(pool.options) == "float output -> add -> prelu -> add -> quantize-and-pack " \
        f"{bits}-bit"
    rows = {r.name: r for r in report.layers}
    assert rows["layer1_0_rprelu1"].fused == [
        f"N2UQMaxPool2DFused: stem_pool ({'PAD + ' if padded_pool else ''}MAX_POOL_2D) -> float output -> "
        "layer1_0_rprelu1 (ADD, PRELU, ADD) -> quantize-and-pack for layer1_0_conv1"]
    assert rows["layer1_0_conv1"].ops == ["N2UQConv2DFused"]  # its quantizer runs in the pool's op


@pytest.mark.slow
def test_int8_export_fuses_the_int8_stem_pool():
    """With inference_type="int8" the stem's int8 PAD + MAX_POOL_2D + DEQUANTIZE, the first block's
    RPReLU and its quantize-and-pack become one N2UQMaxPool2DFused on the int8 tensor (its zero point
    and scale as options): the fused file equals the unfused one bit for bit in both interpreters at
    1 and 2 threads, and the kernel refuses options that disagree with the input's quantization."""
    model = resnet18_style(2, padded_pool=True)

    def calibration():
        for i in range(4):
            yield [np.random.default_rng(30 + i).normal(0, 1, (1, 16, 16, 3)).astype(np.float32)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unfused = export_tflite(model, fuse=False, inference_type="int8", representative_dataset=calibration)
        fused, report = export_tflite(model, return_report=True, inference_type="int8",
                                      representative_dataset=calibration)
    before, after = inspect_tflite(unfused).op_counts(), inspect_tflite(fused).op_counts()
    assert before["MAX_POOL_2D"] == 1 and before["DEQUANTIZE"] == 2 and before["PAD"] == 1
    assert "MAX_POOL_2D" not in after and "PAD" not in after and after["DEQUANTIZE"] == 1  # the classifier's stays
    pool = next(op for op in inspect_tflite(fused).operators if op.name == co.OP_MAX_POOL2D_FUSED)
    assert -128 <= pool.options["input_zero_point"] <= 127 and pool.options["input_scale"] > 0
    assert co.describe_output_stage(pool.options) == "float output -> add -> prelu -> add -> quantize-and-pack 2-bit"
    rows = {r.name: r for r in report.layers}
    assert rows["layer1_0_rprelu1"].fused == [
        "N2UQMaxPool2DFused: stem_pool (PAD + MAX_POOL_2D + DEQUANTIZE) -> float output -> "
        "layer1_0_rprelu1 (ADD, PRELU, ADD) -> quantize-and-pack for layer1_0_conv1"]
    x = np.random.default_rng(1).normal(0, 1, (2, 16, 16, 3)).astype(np.float32)
    for backend in BACKENDS:
        want = run_resized(unfused, x, backend, 1)
        for threads in (1, 2):
            assert_bit_identical(run_resized(fused, x, backend, threads), want, f"int8 {backend} {threads}")
    # An input_scale that is not the int8 input's own: the kernel says so at prepare.
    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(fused))
    names = [bytes(c.customCode).decode() if c.customCode else "" for c in obj.operatorCodes]
    op = next(o for o in obj.subgraphs[0].operators if names[o.opcodeIndex] == co.OP_MAX_POOL2D_FUSED)
    from flatbuffers import flexbuffers
    options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
    options["input_scale"] = options["input_scale"] * 2
    op.customOptions = list(flexbuffers.Dumps(options))
    edited = bytes(flatbuffer_utils.convert_object_to_bytearray(obj))
    with pytest.raises(RuntimeError, match="int8 input's quantization is not the op's input_scale"):
        run_resized(edited, x, "litert", 1)


@pytest.mark.slow
def test_keras3_nested_backbone_pool_fused():
    """A Keras 3 model whose backbone (a Functional nested in the outer one) has a zero-padded max pool
    right before a quantized conv: the pool and that conv's quantize-and-pack become one op, the
    report notes it on the conv's row (the pool has none), and the file equals the unfused one."""
    import keras as keras3
    keras3.utils.set_random_seed(0)
    K = keras3.layers
    image = keras3.Input((16, 16, 3))
    h = K.ReLU()(K.BatchNormalization()(K.Conv2D(8, 3, strides=2, padding="same")(image)))
    h = K.MaxPooling2D(3, strides=2)(K.ZeroPadding2D(1)(h))
    h = K.Conv2D(12, 3, padding="same", name="after_pool")(h)
    backbone = keras3.Model(image, h, name="backbone")
    inp = keras3.Input((16, 16, 3))
    model = n2uq_tf.quantize_model(keras3.Model(inp, K.Dense(5)(K.GlobalAveragePooling2D()(backbone(inp)))),
                                   bits=3)
    unfused, fused, report = _exports(model)
    counts = inspect_tflite(fused).op_counts()
    assert counts[co.OP_MAX_POOL2D_FUSED] == 1 and "MAX_POOL_2D" not in counts and "PAD" not in counts
    assert "MAX_POOL_2D" in inspect_tflite(unfused).op_counts()
    notes = {r.name: r.fused for r in report.layers if r.fused}
    assert list(notes) == ["backbone/after_pool"]
    assert re.fullmatch(r"N2UQMaxPool2DFused: \S+ \(PAD \+ MAX_POOL_2D\) -> quantize-and-pack for backbone/after_pool",
                        notes["backbone/after_pool"][0])
    x = np.random.default_rng(2).normal(0, 1, (2, 16, 16, 3)).astype(np.float32)
    want = run_resized(unfused, x, "litert", 1)
    for backend in BACKENDS:
        for threads in (1, 2):
            assert_bit_identical(run_resized(fused, x, backend, threads), want, f"keras3 {backend} {threads}")
    expected = np.asarray(model(x, training=False))
    assert np.abs(want[0] - expected).max() <= 1e-4 * max(float(np.abs(expected).max()), 1.0)


@pytest.mark.slow
def test_mixed_network_fused_equals_unfused():
    model = mixed_network()
    unfused, fused, report = _exports(model)
    _check_parity(model, unfused, fused)
    rows = {r.name: r for r in report.layers}
    assert {name: r.fused for name, r in rows.items() if r.fused} == {
        "c1": ["c1_act (ADD, PRELU, ADD) -> float output -> quantize-and-pack for c2"],
        "c2": ["c2_relu6 (RELU6) -> quantize for dw"],
        "dw": ["dw_leaky (LEAKY_RELU) -> quantize-and-pack for pw"],
        "pw": ["add_relu (ADD) -> kept_bn (MUL, ADD) -> quantize-and-pack for c3"],
        "d1": ["d1 (RELU) -> quantize-and-pack for d2"]}
    assert rows["d1"].ops == ["N2UQQuantizePack", "N2UQFullyConnectedFused"]  # its ReLU runs in the op
    assert rows["c3"].ops == ["N2UQConv2D"] and rows["d2"].ops == ["N2UQFullyConnected"]
    stages = {layer.name: layer.fused for layer in inspect_tflite(fused).layers}
    assert stages == {"c1": "add -> prelu -> add -> float output -> quantize-and-pack 2-bit",
                      "c2": "relu6 -> quantize 4-bit", "dw": "prelu -> quantize-and-pack 2-bit",
                      "pw": "add tensor -> relu -> mul -> add -> quantize-and-pack 2-bit", "c3": None,
                      "d1": "relu -> quantize-and-pack 2-bit", "d2": None}


def test_format_version_follows_fusion_and_older_readers_refuse_format_3(op_graph, monkeypatch):
    """A file with fused ops is export format 3; one without stays format 2 (readers of format 2 run
    it). A reader of format 2 refuses format 3 naming both, instead of misreading the fused ops."""
    from n2uq_tf.export import converter, inspect as inspect_module
    from n2uq_tf.export.lowering import ExportReport
    _, unfused, _, _ = op_graph
    fused_file = converter._finish(unfused, ExportReport([]), {}, fuse=True)
    plain_file = converter._finish(unfused, ExportReport([]), {}, fuse=False)
    assert inspect_tflite(fused_file).metadata["format_version"] == 3
    assert inspect_tflite(plain_file).metadata["format_version"] == 2
    assert not set(inspect_tflite(plain_file).op_counts()) & set(co.FUSED_OPS)
    monkeypatch.setattr(inspect_module, "EXPORT_FORMAT_VERSION", 2)
    assert inspect_tflite(plain_file).metadata["format_version"] == 2
    with pytest.raises(ValueError, match="export format 3; this n2uq_tf reads up to format 2. Upgrade"):
        inspect_tflite(fused_file)
