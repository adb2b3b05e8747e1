"""The delegate's input quantize in the conv: an N2UQQuantizePack whose packed codes only the
N2UQConv2D(Fused) right after it reads is claimed with that conv as one kernel, which quantizes the
float input itself (n2uq_conv_plan_run_quantizing: inside the GEMMs where the path can). Outputs must
equal the ops' TF reference bodies bit for bit with the merge on and off (quantize_into_conv=0), on
both interpreters and at 1 and 2 threads; codes read by two convs, or that are a graph output, are
still written.
"""

import numpy as np
import pytest
import tensorflow as tf

import n2uq_tf.tflite as n2tfl
from n2uq_tf.export import custom_ops as co
from n2uq_tf.tflite import _core
from test_delegate import BACKENDS, assert_same_outputs, conv_block, convert, run, thresholds


class ModelQ(tf.Module):
    """A stride-2 3x3 conv of 64 channels with an even output (the inline route on AVX-512), a
    stride-1 conv, a fused conv whose stage packs codes, a packed tensor two convs read, and one
    that is also a graph output."""

    @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 64], tf.float32)])
    def f(self, x):
        rng = np.random.default_rng(11)
        vector = lambda n, low=-1.0, high=1.0: tf.constant(rng.uniform(low, high, n).astype(np.float32))  # noqa: E731
        y1 = conv_block(rng, x, cin=64, cout=32, k=(3, 3), strides=(2, 2), dilations=(1, 1), pads=((1, 1), (1, 1)),
                        ab=4, wb=4)
        y2 = conv_block(rng, x, cin=64, cout=8, k=(3, 3), strides=(1, 1), dilations=(1, 1), pads=((1, 1), (1, 1)),
                        ab=2, wb=3)
        packed = co.quantize_pack_fn(3, 64, 1.2)(x, tf.constant(thresholds(rng, 3)))
        fused = co.conv2d_fused_fn(in_channels=64, out_channels=16, kernel_size=(3, 3), strides=(2, 2),
                                   dilations=(1, 1), paddings=((0, 1), (0, 1)), act_bits=3, weight_bits=2,
                                   steps=["add", "prelu"], float_output=2, quantize="pack", quantize_bits=2,
                                   quantize_beta1=1.0)
        stream = tf.constant(co.pack_weight_codes(rng.integers(0, 4, 16 * 9 * 64), 2))
        h, p = fused(packed, stream, vector(16, 0.01, 0.2), vector(16), vector(16), vector(16, 0.05, 0.5),
                     tf.constant(thresholds(rng, 2)))
        shared = co.quantize_pack_fn(2, 64, 0.9)(x, tf.constant(thresholds(rng, 2)))
        outs = []
        for cout in (8, 12):
            conv = co.conv2d_fn(in_channels=64, out_channels=cout, kernel_size=(3, 3), strides=(2, 2),
                                dilations=(1, 1), paddings=((1, 1), (1, 1)), act_bits=2, weight_bits=2)
            outs.append(conv(shared, tf.constant(co.pack_weight_codes(rng.integers(0, 4, cout * 9 * 64), 2)),
                             vector(cout, 0.01, 0.2), vector(cout)))
        kept = co.quantize_pack_fn(1, 64, 1.0)(x, tf.constant(thresholds(rng, 1)))
        conv = co.conv2d_fn(in_channels=64, out_channels=4, kernel_size=(3, 3), strides=(2, 2), dilations=(1, 1),
                            paddings=((1, 1), (1, 1)), act_bits=1, weight_bits=1)
        y5 = conv(kept, tf.constant(co.pack_weight_codes(rng.integers(0, 2, 4 * 9 * 64), 1)), vector(4, 0.01, 0.2),
                  vector(4))
        return y1, y2, h, p, outs[0], outs[1], kept, y5


@pytest.fixture(scope="module")
def model_q():
    module = ModelQ()
    x = np.random.default_rng(12).normal(0.3, 1.0, module.f.input_signature[0].shape).astype(np.float32)
    return convert(module), x, [np.asarray(r) for r in module.f(tf.constant(x))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_pairs_equal_the_reference(model_q, backend):
    content, x, reference = model_q
    for merge in (1, 0):
        for threads in (1, 2):
            assert_same_outputs(run(content, x, backend, threads, quantize_into_conv=merge), reference)


def test_which_pairs_merge(model_q):
    """Every quantize op whose codes only the conv right after it reads merges into that conv and
    leaves the profile, the one whose codes are also a graph output included (the pair writes them);
    the one whose codes two convs read stays."""
    content, _, _ = model_q
    from ai_edge_litert.interpreter import Interpreter
    counts = {}
    for merge in (1, 0):
        d = n2tfl.load_delegate("litert", quantize_into_conv=merge)
        interpreter = Interpreter(model_content=content, experimental_delegates=[d])
        interpreter.allocate_tensors()
        ops = [e["op"] for e in n2tfl.kernel_profile(d)]
        counts[merge] = (ops.count("N2UQQuantizePack"), ops.count("N2UQConv2D") + ops.count("N2UQConv2DFused"))
        del interpreter
    assert counts[0] == (5, 6)
    assert counts[1] == (1, 6)
    with pytest.raises(ValueError, match="quantize_into_conv must be 0 or 1"):
        Interpreter(model_content=content, experimental_delegates=[n2tfl.load_delegate("litert",
                                                                                        quantize_into_conv=2)])


def test_inline_route_is_taken_where_the_kernels_have_it():
    """The 32x32x64 stride-2 W4A4 conv of ModelQ, as a plan: inline on the AVX-512 dot path's
    stride-2 form (1 thread: 64 tiles, two bands of two blocks)."""
    shape = _core.conv_shape(1, 32, 32, 64, 32, 3, strides=2, padding=1, act_bits=4, weight_bits=4)
    rng = np.random.default_rng(0)
    plan = _core.ConvPlan(shape, _core.pack_bitplanes(rng.integers(0, 16, (32, 3, 3, 64)), 4), path="auto")
    expected = plan.isa == "avx512" and plan.path == "dot" and plan.form == "winograd_stride2"
    assert plan.quantizes_inline() == expected
