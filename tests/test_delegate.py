"""The N2UQ TFLite delegate plugin (tflite_tools/tflite via n2uq_tf.tflite).

Models are built from the op contract's tf.functions (n2uq_tf.export.custom_ops) and converted
with allow_custom_ops; the delegate's outputs in tf.lite and ai_edge_litert must equal the
reference bodies run in TensorFlow bit for bit, for 1 and 2 threads. Malformed models run in
child processes with the AddressSanitizer + UBSan build of the plugin (tests/delegate_fuzz.py),
so that a crash or a sanitizer report fails the test instead of killing pytest. The C++
self-test (FlexBuffer fuzzing, kernels under a fake context) runs under the sanitizers too.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from flatbuffers import flexbuffers
from tensorflow.lite.tools import flatbuffer_utils

import n2uq_tf.tflite as n2tfl
from n2uq_tf.export import custom_ops as co
from n2uq_tf import _native
from n2uq_tf.tflite import _core, delegate, op_names

import delegate_fuzz
import native_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "tflite_tools", "tflite")
CORE_DIR = os.path.join(ROOT, "tflite_tools", "core")
BACKENDS = ("tflite", "litert")

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


# ------------------------------------------------------------------ model builders

def thresholds(rng, bits):
    return np.sort(rng.uniform(-0.5, 1.5, 2 ** bits - 1)).astype(np.float32)


def conv_block(rng, x, *, cin, cout, k, strides, dilations, pads, ab, wb, beta1=0.9):
    packed = co.quantize_pack_fn(ab, cin, beta1)(x, tf.constant(thresholds(rng, ab)))
    stream = co.pack_weight_codes(rng.integers(0, 2 ** wb, cout * k[0] * k[1] * cin), wb)
    conv = co.conv2d_fn(in_channels=cin, out_channels=cout, kernel_size=k, strides=strides, dilations=dilations,
                        paddings=pads, act_bits=ab, weight_bits=wb)
    return conv(packed, tf.constant(stream), tf.constant(rng.uniform(0.01, 0.2, cout).astype(np.float32)),
                tf.constant(rng.normal(size=cout).astype(np.float32)))


def depthwise_block(rng, x, *, c, mult, k, strides, dilations, pads, ab, wb):
    codes = co.quantize_pack_fn(ab, c, 1.1, pack=False)(x, tf.constant(thresholds(rng, ab)))
    stream = co.pack_weight_codes(rng.integers(0, 2 ** wb, k[0] * k[1] * c * mult), wb)
    dw = co.depthwise_conv2d_fn(in_channels=c, depth_multiplier=mult, kernel_size=k, strides=strides,
                                dilations=dilations, paddings=pads, act_bits=ab, weight_bits=wb)
    return dw(codes, tf.constant(stream), tf.constant(rng.uniform(0.01, 0.2, c * mult).astype(np.float32)),
              tf.constant(rng.normal(size=c * mult).astype(np.float32)))


def fc_block(rng, x, *, cin, cout, ab, wb):
    packed = co.quantize_pack_fn(ab, cin, 1.0)(x, tf.constant(thresholds(rng, ab)))
    stream = co.pack_weight_codes(rng.integers(0, 2 ** wb, cout * cin), wb)
    fc = co.fully_connected_fn(in_features=cin, out_features=cout, act_bits=ab, weight_bits=wb)
    return fc(packed, tf.constant(stream), tf.constant(rng.uniform(0.01, 0.2, cout).astype(np.float32)),
              tf.constant(rng.normal(size=cout).astype(np.float32)))


class ModelA(tf.Module):
    """conv chain: odd channels 5 -> 65 -> 130 -> 1, strides, dilations, asymmetric and 'same' pads, mixed bits."""

    def __init__(self):
        super().__init__()
        self.seed = 1

    @tf.function(input_signature=[tf.TensorSpec([2, 11, 10, 5], tf.float32)])
    def f(self, x):
        rng = np.random.default_rng(self.seed)
        y1 = conv_block(rng, x, cin=5, cout=65, k=(3, 3), strides=(2, 1), dilations=(1, 1), pads=((1, 0), (2, 1)),
                        ab=2, wb=3)
        h = tf.nn.relu(y1) * 0.25 - 0.1
        y2 = conv_block(rng, h, cin=65, cout=130, k=(1, 3), strides=(1, 2), dilations=(1, 2), pads=((0, 0), (2, 2)),
                        ab=1, wb=4, beta1=1.25)
        y3 = conv_block(rng, y2 * 0.05, cin=130, cout=1, k=(2, 2), strides=(1, 1), dilations=(2, 1),
                        pads=((1, 2), (0, 1)), ab=4, wb=1)
        y4 = conv_block(rng, x, cin=5, cout=7, k=(3, 3), strides=(1, 1), dilations=(1, 1), pads=((1, 1), (1, 1)),
                        ab=3, wb=2)
        # 'same' computed by the kernel: odd height, stride 2, an even kernel width, dilation
        y5 = conv_block(rng, x, cin=5, cout=9, k=(3, 2), strides=(2, 2), dilations=(1, 2), pads=co.SAME, ab=2, wb=2)
        return y1, y2, y3, y4, y5


class ModelB(tf.Module):
    """1-channel conv, depthwise with multiplier, fully connected after a builtin reshape."""

    @tf.function(input_signature=[tf.TensorSpec([1, 9, 9, 3], tf.float32)])
    def f(self, x):
        rng = np.random.default_rng(2)
        y1 = conv_block(rng, x[..., :1], cin=1, cout=4, k=(3, 3), strides=(1, 1), dilations=(1, 1),
                        pads=((1, 1), (1, 1)), ab=1, wb=1)
        d1 = depthwise_block(rng, x, c=3, mult=2, k=(3, 3), strides=(2, 2), dilations=(1, 1), pads=((1, 1), (0, 1)),
                             ab=2, wb=2)
        d2 = depthwise_block(rng, tf.nn.relu(d1) * 0.1, c=6, mult=1, k=(3, 2), strides=(1, 1), dilations=(2, 1),
                             pads=((2, 2), (1, 0)), ab=4, wb=3)
        d3 = depthwise_block(rng, x, c=3, mult=1, k=(2, 3), strides=(2, 1), dilations=(1, 1), pads=co.SAME, ab=2, wb=2)
        flat = tf.reshape(d2, [1, -1])
        f1 = fc_block(rng, flat * 0.2, cin=int(flat.shape[-1]), cout=10, ab=3, wb=2)
        f2 = fc_block(rng, tf.concat([f1, f1], -1) * 0.1, cin=20, cout=70, ab=1, wb=4)
        return y1, d1, d2, f1, f2, d3


class ModelF(tf.Module):
    """The fused ops (custom_ops "Fused output stages") from their reference bodies: a conv whose stage
    takes a per-channel add, a PReLU, the float output, a residual add and ReLU6, then packs 3-bit codes
    (70 channels: a partial second word); a strided, dilated conv writing byte codes only; a depthwise
    with multiplier whose stage ends in a float output; an FC packing 1-bit codes for an FC that
    outputs floats only; a max pool (asymmetric zero pads, 3x2 window, strides 2x1) whose stage adds,
    takes a PReLU and packs 2-bit codes after its float output. Codes and packed outputs are graph
    outputs too."""

    @tf.function(input_signature=[tf.TensorSpec([2, 7, 6, 5], tf.float32)])
    def f(self, x):
        rng = np.random.default_rng(4)
        vector = lambda n, low=-1.0, high=1.0: tf.constant(rng.uniform(low, high, n).astype(np.float32))  # noqa: E731

        def layer_inputs(count, cout, wb):
            return (tf.constant(co.pack_weight_codes(rng.integers(0, 2 ** wb, count), wb)), vector(cout, 0.01, 0.2),
                    vector(cout))

        packed = co.quantize_pack_fn(2, 5, 0.9)(x, tf.constant(thresholds(rng, 2)))
        conv1 = co.conv2d_fused_fn(in_channels=5, out_channels=70, kernel_size=(3, 3), strides=(1, 1),
                                   dilations=(1, 1), paddings=co.SAME, act_bits=2, weight_bits=2,
                                   steps=["add", "prelu", "add_tensor", "relu6"], float_output=2, quantize="pack",
                                   quantize_bits=3, quantize_beta1=1.1)
        residual = tf.tile(x[..., :1], [1, 1, 1, 70]) * 0.5
        h, p1 = conv1(packed, *layer_inputs(70 * 9 * 5, 70, 2), vector(70), vector(70, 0.05, 0.5), residual,
                      tf.constant(thresholds(rng, 3)))
        conv2 = co.conv2d_fused_fn(in_channels=70, out_channels=9, kernel_size=(2, 3), strides=(2, 1),
                                   dilations=(1, 2), paddings=((1, 0), (1, 1)), act_bits=3, weight_bits=1,
                                   quantize="codes", quantize_bits=4, quantize_beta1=1.0)
        codes = conv2(p1, *layer_inputs(9 * 6 * 70, 9, 1), tf.constant(thresholds(rng, 4)))
        dw = co.depthwise_conv2d_fused_fn(in_channels=9, depth_multiplier=2, kernel_size=(3, 3), strides=(1, 1),
                                          dilations=(1, 1), paddings=co.SAME, act_bits=4, weight_bits=2,
                                          steps=["mul", "add", "relu"], float_output=3)
        d = dw(codes, *layer_inputs(9 * 18, 18, 2), vector(18, 0.5, 1.5), vector(18))
        flat = tf.reshape(d, [2, -1])
        features = int(flat.shape[-1])
        p_fc = co.quantize_pack_fn(2, features, 1.0)(flat * 0.1, tf.constant(thresholds(rng, 2)))
        fc1 = co.fully_connected_fused_fn(in_features=features, out_features=65, act_bits=2, weight_bits=3,
                                          steps=["prelu"], quantize="pack", quantize_bits=1, quantize_beta1=0.8)
        q = fc1(p_fc, *layer_inputs(65 * features, 65, 3), vector(65, -0.5, 0.5), tf.constant(thresholds(rng, 1)))
        fc2 = co.fully_connected_fused_fn(in_features=65, out_features=7, act_bits=1, weight_bits=2,
                                          steps=["relu_n1_to_1"], float_output=1)
        pool = co.max_pool2d_fused_fn(channels=5, pool_size=(3, 2), strides=(2, 1), pads=(1, 1, 0, 1),
                                      steps=["add", "prelu"], float_output=0, quantize="pack", quantize_bits=2,
                                      quantize_beta1=0.9)
        pooled, p_pool = pool(x, vector(5), vector(5, 0.05, 0.5), tf.constant(thresholds(rng, 2)))
        return h, codes, d, q, fc2(q, *layer_inputs(7 * 65, 7, 2)), pooled, p_pool


def convert(module):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
    converter.allow_custom_ops = True
    return converter.convert()


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, module in (("A", ModelA()), ("B", ModelB())):
        spec = module.f.input_signature[0]
        x = np.random.default_rng(7).normal(0.5, 0.8, spec.shape).astype(np.float32)
        reference = [np.asarray(r) for r in module.f(tf.constant(x))]
        out[name] = (convert(module), x, reference)
    return out


@pytest.fixture(scope="module")
def fused_model():
    module = ModelF()
    x = np.random.default_rng(8).normal(0.5, 0.8, module.f.input_signature[0].shape).astype(np.float32)
    return convert(module), x, [np.asarray(r) for r in module.f(tf.constant(x))]


def run(content, x, backend, threads, **options):
    interpreter = n2tfl.Interpreter(model_content=content, num_threads=threads, backend=backend,
                                    delegate_options=options)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    # Outputs come back in an order of the converter's choosing: match by shape and values.
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def assert_same_outputs(outputs, reference):
    assert len(outputs) == len(reference)
    unmatched = list(reference)
    for out in outputs:
        for i, ref in enumerate(unmatched):
            if ref.shape == out.shape and np.array_equal(ref, out):
                unmatched.pop(i)
                break
        else:
            shapes = [r.shape for r in unmatched]
            close = [float(np.max(np.abs(r - out))) for r in unmatched if r.shape == out.shape]
            raise AssertionError(f"output {out.shape} matches no reference (left: {shapes}, max diffs {close})")


# ------------------------------------------------------------------ tests

def test_op_names_are_the_plugins_and_the_contracts():
    lib = delegate.library()
    plugin_names = []
    while lib.n2uq_tflite_op_name(len(plugin_names)) is not None:
        plugin_names.append(lib.n2uq_tflite_op_name(len(plugin_names)).decode())
    assert set(plugin_names) == set(op_names.ALL_OPS) and len(plugin_names) == len(op_names.ALL_OPS)
    assert n2tfl.N2UQ_OPS is op_names.ALL_OPS and co.ALL_OPS is op_names.ALL_OPS  # one list, no mirror


RUN_WITHOUT_TENSORFLOW = """
import sys
import numpy as np
sys.modules["tensorflow"] = None  # any import of TensorFlow fails from here on
import n2uq_tf.tflite as n2tfl
model, inputs, outputs = sys.argv[1:]
interpreter = n2tfl.Interpreter(model_path=model)
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.load(inputs))
interpreter.invoke()
np.savez(outputs, *[interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
print(n2tfl.benchmark_model(model, runs=1, warmup=0)["backend"])
"""


def test_runtime_runs_without_tensorflow(models, tmp_path):
    """`n2uq_tf.tflite` with ai_edge_litert alone: a deployment without TensorFlow."""
    content, x, reference = models["A"]
    (tmp_path / "a.tflite").write_bytes(content)
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TENSORFLOW, str(tmp_path / "a.tflite"),
                             str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "litert"
    with np.load(tmp_path / "out.npz") as outputs:
        assert_same_outputs([outputs[key] for key in outputs.files], reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["A", "B"])
def test_outputs_equal_tf_reference_bit_for_bit(models, name, backend):
    content, x, reference = models[name]
    assert set(n2tfl.model_n2uq_ops(model_content=content)) >= {"N2UQQuantizePack"}
    assert n2tfl.model_n2uq_ops(content) == n2tfl.model_n2uq_ops(model_content=content)  # bytes as the path
    results = {}
    for threads in (1, 2):
        results[threads] = run(content, x, backend, threads)
        assert_same_outputs(results[threads], reference)
    for a, b in zip(results[1], results[2]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ops_equal_tf_reference_bit_for_bit(fused_model, backend):
    """The fused ops' float outputs, byte codes and packed codes equal their reference bodies on every
    ISA, 1 and 2 threads."""
    content, x, reference = fused_model
    assert set(n2tfl.model_n2uq_ops(model_content=content)) == {
        "N2UQQuantizePack", "N2UQConv2DFused", "N2UQDepthwiseConv2DFused", "N2UQFullyConnectedFused",
        "N2UQMaxPool2DFused"}
    assert [r.dtype for r in reference] == [np.float32, np.uint8, np.float32, np.int64, np.float32, np.float32,
                                            np.int64]
    assert all(len(np.unique(r)) > 2 for r in reference)
    for isa in _core.supported_isas():
        for threads in (1, 2):
            assert_same_outputs(run(content, x, backend, threads, isa=isa), reference)


def test_isa_option_and_thread_override(models):
    content, x, reference = models["A"]
    for isa in _core.supported_isas():
        assert_same_outputs(run(content, x, "litert", 1, isa=isa, num_threads=3), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_path_option_every_kernel_path_bit_exact(models, backend):
    """The delegate's `path` option forces a conv / FC kernel path, on every ISA that has it."""
    for name in ("A", "B"):
        content, x, reference = models[name]
        for isa, path in _core.supported_combinations():
            for threads in (1, 2):
                assert_same_outputs(run(content, x, backend, threads, isa=isa, path=path), reference)


def test_path_option_is_reported_per_kernel_and_validated(models):
    content, x, _ = models["B"]
    from ai_edge_litert.interpreter import Interpreter
    for path in _core.supported_paths():
        delegate = n2tfl.load_delegate("litert", path=path)
        interpreter = Interpreter(model_content=content, experimental_delegates=[delegate])
        interpreter.allocate_tensors()
        entries = n2tfl.kernel_profile(delegate)
        paths = {e["op"]: e["path"] for e in entries}
        assert paths["N2UQConv2D"] == path and paths["N2UQFullyConnected"] == path
        assert paths["N2UQQuantizePack"] is None and paths["N2UQDepthwiseConv2D"] is None
        del interpreter
    with pytest.raises(ValueError, match="path must be auto, bitserial, dot, lut or amx"):
        n2tfl.load_delegate("litert", path="gemm")
    for isa in _core.supported_isas():
        for path in {"bitserial", "dot", "lut", "amx"} - set(_core.supported_paths(isa)):
            delegate = n2tfl.load_delegate("litert", isa=isa, path=path)
            with pytest.raises(RuntimeError, match=f"path {path} is not supported with ISA {isa}"):
                Interpreter(model_content=content, experimental_delegates=[delegate]).allocate_tensors()


def test_batch_resize_reprepares(models):
    content, x, _ = models["B"]
    interpreter = n2tfl.Interpreter(model_content=content, backend="litert")
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    first = [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]
    interpreter.invoke()  # weights were unpacked once at prepare; a second invoke gives the same result
    for a, d in zip(first, interpreter.get_output_details()):
        assert np.array_equal(a, interpreter.get_tensor(d["index"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_abi_self_test_against_live_interpreter(models, backend):
    """What the plugin reads through tflite_abi.h in Prepare equals the interpreter's own view."""
    content, x, _ = models["A"]
    interpreter = n2tfl.Interpreter(model_content=content, num_threads=2, backend=backend,
                                    delegate_options={"abi_probe": True})
    probe = n2tfl.abi_probe_text().splitlines()
    header = dict(line.split() for line in probe[:2])
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    assert int(header["recommended_num_threads"]) == 2
    assert int(header["tensors_size"]) >= len(details) > 10
    types = {1: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64}
    seen = 0
    for line in probe:
        if not line.startswith("tensor "):
            continue
        fields = line.split()
        index, type_id, nbytes = int(fields[1]), int(fields[3]), int(fields[5])
        name = fields[fields.index("name") + 1] if fields[fields.index("name") + 1] != "dims" else ""
        dims = [int(v) for v in fields[fields.index("dims") + 1:fields.index("signature")]]
        signature = [int(v) for v in fields[fields.index("signature") + 1:]]
        if index not in details:
            continue
        d = details[index]
        assert d["name"] == name
        assert list(d["shape"]) == dims, (d, line)
        # (the interpreters report the shape as the signature when the file has none)
        assert list(d["shape_signature"]) == (signature or dims), (d, line)
        assert types[type_id] == d["dtype"]
        assert nbytes == int(np.prod(dims)) * np.dtype(d["dtype"]).itemsize
        seen += 1
    assert seen == len(details)
    # Nodes: the custom ops with their option sizes and tensor lists as in the flatbuffer.
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    custom = [line.split() for line in probe if line.startswith("node ") and " custom N2UQ" in line]
    flat_custom = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex].customCode]
    assert len(custom) == len(flat_custom) == 10
    for fields, op in zip(custom, flat_custom):
        assert fields[5] == model.operatorCodes[op.opcodeIndex].customCode.decode()
        assert int(fields[7]) == len(op.customOptions)
        inputs = [int(v) for v in fields[fields.index("inputs") + 1:fields.index("outputs")]]
        assert inputs == list(op.inputs)


def test_flexbuffer_reader_widths_and_indirect_values():
    cases = []
    for width in (1, 2, 4, 8):
        fbb = flexbuffers.Builder()
        with fbb.Map():
            fbb.Int("small", -5, byte_width=width)
            fbb.UInt("u", 200, byte_width=width)
            fbb.Bool("flag", True)
            if width >= 4:
                fbb.Float("f", 0.1, byte_width=width)
            fbb.Int("big", 70000 if width >= 4 else 100)
            fbb.IndirectInt("ii", -(2 ** 40), byte_width=8)
            fbb.IndirectUInt("iu", 65535, byte_width=2)
            fbb.IndirectFloat("if", 2.5, byte_width=4)
            fbb.IndirectFloat("id", 0.3, byte_width=8)
            fbb.String("s", "text")
        cases.append(fbb.Finish())
    for buffer in cases:
        parsed = delegate.flexbuffer_dump(buffer)
        expected = flexbuffers.Loads(buffer)
        assert set(parsed) == set(expected)
        for key, value in expected.items():
            kind, got = parsed[key]
            if isinstance(value, str):
                assert kind == "other"
            elif isinstance(value, float):
                assert kind == "float" and got == value
            else:
                assert got == int(value), key
    for bad in (b"", b"\x00", b"\x01\x01", b"abc\x25\x01", cases[0][:-3] + b"\xff\x26\x01", cases[2][5:]):
        with pytest.raises(ValueError, match="malformed custom options"):
            delegate.flexbuffer_dump(bad)


def test_delegate_is_harmless_without_n2uq_ops():
    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32)])
        def f(self, x):
            return tf.nn.relu(x * 2.0 + 1.0)

    module = Plain()
    content = convert(module)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 3
    assert n2tfl.model_n2uq_ops(model_content=content) == []
    for backend in BACKENDS:
        assert np.array_equal(run(content, x, backend, 1)[0], module.f(x).numpy())


def test_model_bytes_as_first_argument_are_the_model_content(models):
    """`Interpreter(export_tflite(model))`: the bytes are the model, not a path."""
    content, x, reference = models["A"]
    interpreter = n2tfl.Interpreter(content, backend="litert")
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    assert_same_outputs([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()], reference)
    with pytest.raises(TypeError, match="both as model_path and model_content"):
        n2tfl.Interpreter(content, model_content=content)


def test_missing_delegate_gives_a_clear_error(models, monkeypatch):
    def unavailable():
        raise n2tfl.DelegateUnavailableError("no compiler")

    monkeypatch.setattr(delegate, "delegate_path", unavailable)
    with pytest.raises(n2tfl.DelegateUnavailableError, match="N2UQ custom ops .*N2UQConv2D.*no compiler"):
        n2tfl.Interpreter(model_content=models["A"][0])


def test_kernel_profile_and_benchmark(models, tmp_path):
    path = tmp_path / "b.tflite"
    path.write_bytes(models["B"][0])
    result = n2tfl.benchmark_model(path, num_threads=1, runs=3, warmup=1)
    assert result["without_delegate"] is None
    assert sorted({op["op"] for op in result["ops"]}) == ["N2UQConv2D", "N2UQDepthwiseConv2D",
                                                          "N2UQFullyConnected", "N2UQQuantize", "N2UQQuantizePack"]
    assert all(op["calls"] == 3 and op["mean_ms"] >= 0 for op in result["ops"])
    text = n2tfl.format_benchmark(result)
    assert "N2UQDepthwiseConv2D" in text and "cannot run" in text


# ------------------------------------------------------------------ malformed models

def _edit(content, op_name, edit):
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    op = next(o for o in graph.operators if model.operatorCodes[o.opcodeIndex].customCode == op_name.encode())
    edit(model, graph, op)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _options(op, **changes):
    options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
    options.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del options[key]
    op.customOptions = list(flexbuffers.Dumps(options))


def _set_buffer(model, graph, tensor_index, data, shape):
    tensor = graph.tensors[tensor_index]
    model.buffers[tensor.buffer].data = np.frombuffer(bytes(data), np.uint8).copy()
    tensor.shape = np.array(shape, np.int32)


MALFORMED = {
    "garbage options": ("N2UQConv2D", lambda m, g, op: setattr(op, "customOptions", [7, 1, 2, 250, 38, 1]),
                        "malformed custom options"),
    "no options": ("N2UQQuantizePack", lambda m, g, op: setattr(op, "customOptions", None), "malformed custom options"),
    "missing option": ("N2UQConv2D", lambda m, g, op: _options(op, stride_width=None), "missing option 'stride_width'"),
    "bits out of range": ("N2UQConv2D", lambda m, g, op: _options(op, weight_bits=5), "weight_bits"),
    "act_bits mismatch": ("N2UQConv2D", lambda m, g, op: _options(op, act_bits=3), "input shape"),
    "channels mismatch": ("N2UQQuantizePack", lambda m, g, op: _options(op, channels=6), "must end in channels"),
    "huge kernel": ("N2UQConv2D", lambda m, g, op: _options(op, kernel_height=2 ** 40), "kernel_height"),
    "short weight stream": ("N2UQConv2D", lambda m, g, op: _set_buffer(
        m, g, op.inputs[1], m.buffers[g.tensors[op.inputs[1]].buffer].data[:-1],
        [len(m.buffers[g.tensors[op.inputs[1]].buffer].data) - 1]), "weight bitstream"),
    "short multiplier": ("N2UQConv2D", lambda m, g, op: _set_buffer(
        m, g, op.inputs[2], np.ones(2, np.float32).tobytes(), [2]), "multiplier"),
    # (a shape larger than its buffer is already refused by TFLite itself)
    "bias shape smaller than buffer": ("N2UQFullyConnected", lambda m, g, op: setattr(
        g.tensors[op.inputs[3]], "shape", np.array([5], np.int32)), "bias"),
    "wrong weight type": ("N2UQFullyConnected", lambda m, g, op: setattr(g.tensors[op.inputs[1]], "type", 9),
                          "must be uint8"),
    "too few inputs": ("N2UQDepthwiseConv2D", lambda m, g, op: setattr(op, "inputs", np.array(op.inputs[:3])),
                       "expects 4 inputs"),
}


@pytest.fixture(scope="module")
def sanitized():
    """The ASan + UBSan build of the plugin and the environment of a child that loads it."""
    return delegate_fuzz.asan_plugin(), delegate_fuzz.sanitizer_env()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_malformed_models_report_errors_without_crashing(models, sanitized, backend, tmp_path):
    """Each malformed model gets our error message in a child running the sanitized plugin: never a
    crash or a sanitizer report. Besides the cases above, for every N2UQ op type: each input slot
    and every input slot -> -1, the output -> a constant tensor (of its shape: the kernel would
    write into the model; of another shape: the resize fails), the output aliased to each input."""
    mutants, expected = [], []
    for case, (op_name, edit, message) in MALFORMED.items():
        content = models["A" if op_name in ("N2UQConv2D", "N2UQQuantizePack") else "B"][0]
        mutants.append(delegate_fuzz.Mutant("malformed", case, _edit(content, op_name, edit), None))
        expected.append(message)
    for op_name, label, content in delegate_fuzz.op_io_edits(models["B"][0], names=co.LAYER_OPS + (
            co.OP_QUANTIZE_PACK, co.OP_QUANTIZE)):
        mutants.append(delegate_fuzz.Mutant("op_io_edit", f"{op_name}: {label}", content, None))
        expected.append(re.compile(rf"{op_name} \(node \d+\): "))
    # A batch whose buffers the process cannot hold: an error, also where the conv plan's path selection
    # times the candidates (it used to allocate buffers for the whole batch: an abort under ASan).
    mutants.append(delegate_fuzz.Mutant("resize", "batch 2^21", models["A"][0], (2 ** 21, 11, 10, 5)))
    expected.append(re.compile("."))
    assert len(mutants) == len(MALFORMED) + 2 * 7 + 3 * 11 + 1  # 7 edits of a 2-input op, 11 of a 4-input op
    plugin, env = sanitized
    results = delegate_fuzz.run_mutants(mutants, backend, plugin, env, str(tmp_path))
    for (mutant, outcome, detail), message in zip(results, expected):
        assert outcome == "error", f"{mutant.label} ({backend}): {outcome}\n{detail[-3000:]}"
        found = message.search(detail) if isinstance(message, re.Pattern) else message in detail
        assert found, f"{mutant.label} ({backend}): {detail}"


def _edit_nth(content, op_name, n, edit):
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    op = [o for o in graph.operators if model.operatorCodes[o.opcodeIndex].customCode == op_name.encode()][n]
    edit(model, graph, op)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _set_type(slot, output=False, type_id=0):
    def edit(m, g, op):
        g.tensors[int((op.outputs if output else op.inputs)[slot])].type = type_id
    return edit


def _set_input(slot, tensor_of):
    def edit(m, g, op):
        op.inputs = np.array([tensor_of(g) if i == slot else v for i, v in enumerate(op.inputs)], np.int32)
    return edit


# ModelF's fused ops (the nth of a name): conv1 = (N2UQConv2DFused, 0) with inputs packed, weights,
# multiplier, bias, add values, PReLU slopes, residual, thresholds and outputs float, packed; conv2 =
# (N2UQConv2DFused, 1): packed, weights, multiplier, bias, thresholds -> byte codes; the depthwise:
# codes, weights, multiplier, bias, mul values, add values -> float; fc1 -> packed; fc2 -> float.
CONV1, CONV2 = ("N2UQConv2DFused", 0), ("N2UQConv2DFused", 1)
DW, FC1, FC2 = ("N2UQDepthwiseConv2DFused", 0), ("N2UQFullyConnectedFused", 0), ("N2UQFullyConnectedFused", 1)
POOL = ("N2UQMaxPool2DFused", 0)  # x, add values, PReLU slopes, thresholds -> float, packed
MALFORMED_FUSED = {
    "steps out of range": (CONV1, lambda m, g, op: _options(op, steps=17), "option 'steps' = 17 is out of range"),
    "step kind 0": (CONV1, lambda m, g, op: _options(op, step_0=0), "option 'step_0' = 0 is out of range"),
    "step kind 8": (DW, lambda m, g, op: _options(op, step_2=8), "option 'step_2' = 8 is out of range"),
    "a step missing": (CONV1, lambda m, g, op: _options(op, step_3=None), "missing option 'step_3'"),
    "quantize mode 3": (CONV1, lambda m, g, op: _options(op, quantize=3), "option 'quantize' = 3 is out of range"),
    "quantize_bits missing": (CONV2, lambda m, g, op: _options(op, quantize_bits=None),
                              "missing option 'quantize_bits'"),
    "quantize_bits 5": (FC1, lambda m, g, op: _options(op, quantize_bits=5), "option 'quantize_bits' = 5"),
    "quantize_beta1 not a number": (CONV1, lambda m, g, op: _options(op, quantize_beta1="x"),
                                    "option 'quantize_beta1' must be a number"),
    "quantize_beta1 infinite": (FC1, lambda m, g, op: _options(op, quantize_beta1=float("inf")),
                                "option 'quantize_beta1' is not finite"),
    "float_output beyond the steps": (CONV1, lambda m, g, op: _options(op, float_output=5),
                                      "option 'float_output' = 5 is out of range"),
    "no output at all": (CONV2, lambda m, g, op: _options(op, quantize=0), "needs float_output = steps (0)"),
    "no quantizer, float output mid-chain": (DW, lambda m, g, op: _options(op, float_output=1),
                                             "needs float_output = steps (3)"),
    "steps that take fewer inputs": (CONV1, lambda m, g, op: _options(op, step_2=5),
                                     "expects 7 inputs and 2 outputs, got 8 and 2"),
    "a float output the op lacks": (CONV2, lambda m, g, op: _options(op, float_output=0),
                                    "expects 5 inputs and 2 outputs, got 5 and 1"),
    "one step more than inputs": (FC2, lambda m, g, op: _options(op, steps=2, step_1=2, float_output=2),
                                  "expects 5 inputs and 1 output, got 4 and 1"),
    "residual of another shape": (CONV1, _set_input(6, lambda g: int(g.inputs[0])),
                                  "step 2 residual has shape [2, 7, 6, 5] but the layer's output has [2, 7, 6, 70]"),
    "residual of another type": (CONV1, _set_input(6, lambda g: int(g.operators[0].outputs[0])),
                                 "step 2 residual (tensor"),
    "per-channel values too short": (CONV1, lambda m, g, op: _set_buffer(
        m, g, op.inputs[4], np.ones(69, np.float32).tobytes(), [69]), "step 0 values has shape [69] but needs 70"),
    "per-channel values of another type": (DW, _set_type(4, type_id=2), "must be float32"),
    "thresholds of another count": (CONV2, lambda m, g, op: _set_buffer(
        m, g, op.inputs[4], np.arange(3, dtype=np.float32).tobytes(), [3]), "thresholds has shape [3] but needs 15"),
    "codes output of another type": (CONV2, _set_type(0, output=True, type_id=4), "must be uint8"),
    "packed output of another type": (CONV1, _set_type(1, output=True, type_id=0), "must be int64"),
    "float output of another type": (FC2, _set_type(0, output=True, type_id=2), "must be float32"),
    "pool window larger than the padded input": (POOL, lambda m, g, op: _options(op, filter_height=20),
                                                 "the padded input (9 x 7) is smaller than the filter (20 x 2)"),
    "pool channels of another count": (POOL, lambda m, g, op: _options(op, channels=6),
                                       "input shape [2, 7, 6, 5] must be [N, H, W, channels=6]"),
    "pool pad missing": (POOL, lambda m, g, op: _options(op, pad_left=None), "missing option 'pad_left'"),
    "pool stride 0": (POOL, lambda m, g, op: _options(op, stride_width=0), "option 'stride_width' = 0 is out of range"),
    "pool pads negative": (POOL, lambda m, g, op: _options(op, pad_top=-1), "option 'pad_top' = -1 is out of range"),
    "pool input of another type": (POOL, _set_type(0, type_id=2), "must be float32"),
    "pool input_scale alone": (POOL, lambda m, g, op: _options(op, input_scale=0.5),
                               "options input_zero_point and input_scale come together"),
    "pool int8 options on a float input": (POOL, lambda m, g, op: _options(op, input_zero_point=0, input_scale=0.5),
                                           "must be int8, got float32"),
    "pool input_scale zero": (POOL, lambda m, g, op: _options(op, input_zero_point=0, input_scale=0.0),
                              "option input_scale must be a positive float32"),
    "pool input_zero_point out of int8": (POOL, lambda m, g, op: _options(op, input_zero_point=200, input_scale=0.5),
                                          "option 'input_zero_point' = 200 is out of range"),
    "pool slopes too short": (POOL, lambda m, g, op: _set_buffer(
        m, g, op.inputs[2], np.ones(4, np.float32).tobytes(), [4]), "step 1 values has shape [4] but needs 5"),
}


@pytest.mark.slow
def test_malformed_fused_ops_report_errors_without_crashing(fused_model, sanitized, tmp_path):
    """Each malformed fused op (its stage options, its stage inputs and outputs) and every op-I/O edit
    of each fused op type gets our error in a child running the sanitized plugin (ai_edge_litert;
    the kernels are the same under tf.lite): never a crash or a sanitizer report."""
    content = fused_model[0]
    mutants, expected = [], []
    for case, ((op_name, nth), edit, message) in MALFORMED_FUSED.items():
        mutants.append(delegate_fuzz.Mutant("malformed", case, _edit_nth(content, op_name, nth, edit), None))
        expected.append(message)
    for op_name, label, edited in delegate_fuzz.op_io_edits(content, names=tuple(co.FUSED_OPS) + (
            co.OP_MAX_POOL2D_FUSED,)):
        mutants.append(delegate_fuzz.Mutant("op_io_edit", f"{op_name}: {label}", edited, None))
        expected.append(re.compile(rf"{op_name} \(node \d+\): "))
    # conv1: 8 inputs, 2 outputs; the depthwise and fc1: 6 inputs, 1 output; the pool: 4 inputs, 2 outputs
    assert len(mutants) == len(MALFORMED_FUSED) + (8 + 1 + 2 * (2 + 8)) + 2 * (6 + 1 + 2 + 6) + (4 + 1 + 2 * (2 + 4))
    plugin, env = sanitized
    results = delegate_fuzz.run_mutants(mutants, "litert", plugin, env, str(tmp_path))
    for (mutant, outcome, detail), message in zip(results, expected):
        assert outcome == "error", f"{mutant.label}: {outcome}\n{detail[-3000:]}"
        found = message.search(detail) if isinstance(message, re.Pattern) else message in detail
        assert found, f"{mutant.label}: {detail}"


# ------------------------------------------------------------------ sanitizers

@pytest.mark.slow
def test_cpp_selftest_under_asan_and_ubsan():
    sources = [os.path.join(PLUGIN_DIR, name) for name in ("delegate_selftest.cc", "delegate.cc",
                                                           "flexbuffer_options.cc")]
    sources += [os.path.join(CORE_DIR, name) for name in _native.CORE_COMPILED]
    headers = [os.path.join(PLUGIN_DIR, name) for name in ("tflite_abi.h", "flexbuffer_options.h")]
    headers += [os.path.join(CORE_DIR, name) for name in _native.CORE_HEADERS_AND_SOURCES if name.endswith(".h")]
    command = [_native.compiler()] + native_build.SANITIZER_FLAGS + ["-I" + CORE_DIR, "-I" + PLUGIN_DIR]
    binary = native_build.cached_binary("delegate_selftest_asan", command, sources, headers)
    env = dict(os.environ, **native_build.SANITIZER_ENV)
    result = subprocess.run([binary, "3000"], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "selftest: OK" in result.stdout


# ------------------------------------------------------------------ exporter

@pytest.mark.slow
def test_exported_resnet20_matches_keras(tmp_path):
    from n2uq_tf.export import export_tflite
    from n2uq_tf import models as n2models
    model = n2models.resnet20(bits=2, width=4, input_shape=(16, 16, 3))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    content = export_tflite(model)
    assert n2tfl.model_n2uq_ops(model_content=content)
    for backend in BACKENDS:
        interpreter = n2tfl.Interpreter(model_content=content, num_threads=2, backend=backend)
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
