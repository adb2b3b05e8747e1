"""Fused output stages: the kernel core's stage (n2uq_output_stage), the exporter's rewrite
(n2uq_tf.export.fusion) and the fused ops in both interpreters.

The claim under test (custom_ops, "Fused output stages"): a fused file gives the outputs of the
unfused one bit for bit, because every step is the builtin's own float32 operation in the same
order and the quantizer compares the same products with the same thresholds. The thresholds here
are placed exactly on values of the unfused chain, where any other rounding (e.g. constants folded
into the layer's multiplier and bias) changes codes; the tests show that it would.
"""

import copy
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

BACKENDS = ("tflite", "litert")
L = keras.layers

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


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
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_output_stage_equals_the_builtins_one_after_the_other(name):
    """Every ISA, 1 and 2 threads, packed and byte codes: the float output bit for bit and the codes
    equal the NumPy chain, with values on, next to and between the thresholds."""
    kinds, float_after = STAGES[name]
    rng = np.random.default_rng(len(name))
    positions, channels = 37, 70  # two words per plane, a partial one; several chunks with 2 threads
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
