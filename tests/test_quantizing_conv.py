"""A conv plan's run on a float input it quantizes itself (n2uq_conv_plan_run_quantizing,
ConvPlan.run_quantizing / run_stage_quantizing): the quantize-and-pack of the input and the conv in
one call. On the stride-2 Winograd form of the AVX-512 dot path (even output size, whole
64-channel words) the codes are made inside the conv, between its GEMMs' steps, in bands of tile
rows and, on two threads, in an image per thread; everywhere else the call quantizes first. Either
way the outputs must equal the NumPy reference (the quantizer, the exact conv, the affine) bit for
bit, and the codes it is asked to keep must equal the reference's packed codes.
"""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from n2uq_tf.tflite import _core
from test_fusion import reference_codes, reference_pack, reference_steps
from test_kernel_core import affine, reference_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [  # (n, h, w, c, oc, stride, pads): even outputs first (the inline cases), then the rest
    (1, 56, 56, 64, 48, 2, (1, 1, 1, 1)),
    (2, 28, 20, 128, 40, 2, (1, 1, 1, 1)),
    (1, 24, 32, 64, 64, 2, (0, 1, 0, 1)),   # pad_top 0: each tile row starts on its own input row
    (3, 12, 12, 192, 64, 2, (1, 0, 1, 0)),  # three words per pixel, batch 3 (bands cross images)
    (1, 14, 14, 64, 32, 2, (1, 1, 1, 1)),   # 7x7 output: partial tiles, quantized first
    (1, 16, 16, 48, 32, 2, (1, 1, 1, 1)),   # a partial word: quantized first
    (1, 12, 12, 64, 32, 1, (1, 1, 1, 1)),   # stride 1
]


def _inputs(rng, n, h, w, c, bits):
    thresholds = np.sort(rng.normal(0, 1, 2 ** bits - 1)).astype(np.float32)
    x = rng.normal(0, 1.2, (n, h, w, c)).astype(np.float32)
    beta1 = np.float32(0.75)
    # Ties: values whose product with beta1 lands exactly on a threshold (x * beta1 > t is false).
    flat = x.reshape(-1)
    picks = rng.integers(0, flat.size, flat.size // 50)
    flat[picks] = thresholds[rng.integers(0, thresholds.size, picks.size)] / beta1
    return x, thresholds, beta1


def _inline_possible(plan, shape):
    """Where run_wino2_quantizing can apply: the AVX-512 dot path's stride-2 form, even output, C % 64
    (it then also needs two bands of two register blocks per thread)."""
    oh, ow = _core.output_size(shape)
    return (plan.isa == "avx512" and plan.path == "dot" and plan.form == "winograd_stride2" and oh % 2 == 0
            and ow % 2 == 0 and shape.in_channels % 64 == 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantizing_run_equals_the_reference(bits):
    rng = np.random.default_rng(bits)
    paths = [p for p in _core.supported_paths() if p != "amx"]
    inline = 0
    for n, h, w, c, oc, stride, pads in SHAPES:
        x, thresholds, beta1 = _inputs(rng, n, h, w, c, bits)
        k = rng.integers(0, 2 ** bits, (oc, 3, 3, c)).astype(np.uint8)
        codes = reference_codes(x, thresholds, beta1).astype(np.uint8)
        mult = rng.uniform(0.01, 0.05, oc).astype(np.float32)
        bias = rng.normal(0, 0.5, oc).astype(np.float32)
        expected = affine(reference_conv(codes, k, (stride, stride), (1, 1), pads, bits), mult, bias)
        shape = _core.conv_shape(n, h, w, c, oc, 3, strides=stride, padding=pads, act_bits=bits, weight_bits=bits)
        for path in paths:
            for threads in (1, 2):
                plan = _core.ConvPlan(shape, _core.pack_bitplanes(k, bits), path=path, num_threads=threads)
                where = f"{(n, h, w, c, oc, stride, pads)} path {path} threads {threads}"
                if not _inline_possible(plan, shape):
                    assert not plan.quantizes_inline(num_threads=threads), where
                inline += plan.quantizes_inline(num_threads=threads)
                got = plan.run_quantizing(x, thresholds, mult, bias, beta1=beta1, num_threads=threads)
                np.testing.assert_array_equal(got, expected, err_msg=where)
                # Codes kept for another reader: quantized first, whole, and the same conv output.
                kept = np.zeros(n * h * w * bits * (-(-c // 64)), np.uint64)
                got = plan.run_quantizing(x, thresholds, mult, bias, beta1=beta1, packed=kept, num_threads=threads)
                np.testing.assert_array_equal(got, expected, err_msg=where)
                np.testing.assert_array_equal(kept, reference_pack(codes, bits).reshape(-1), err_msg=where)
    # On an AVX-512 VNNI CPU the four stride-2 shapes above with even outputs took the inline route
    # on 1 thread (most on 2 as well).
    if "avx512" in _core.supported_isas() and "avx512vnni" in _core.cpu_features() and "dot" in paths:
        assert inline >= 4


def test_quantizing_run_with_an_output_stage():
    """run_stage_quantizing: the same conv, then a stage that packs codes for the next layer."""
    rng = np.random.default_rng(7)
    n, h, w, c, oc, bits = 1, 28, 28, 64, 64, 4
    x, thresholds, beta1 = _inputs(rng, n, h, w, c, bits)
    k = rng.integers(0, 2 ** bits, (oc, 3, 3, c)).astype(np.uint8)
    mult = rng.uniform(0.01, 0.05, oc).astype(np.float32)
    bias = rng.normal(0, 0.5, oc).astype(np.float32)
    shape = _core.conv_shape(n, h, w, c, oc, 3, strides=2, padding=1, act_bits=bits, weight_bits=bits)
    y = affine(reference_conv(reference_codes(x, thresholds, beta1).astype(np.uint8), k, (2, 2), (1, 1),
                              (1, 1, 1, 1), bits), mult, bias)
    steps = [("add", rng.normal(0, 0.1, oc).astype(np.float32)),
             ("prelu", rng.uniform(0.1, 0.9, oc).astype(np.float32))]
    stage_t = np.sort(rng.normal(0, 0.5, 3)).astype(np.float32)
    after = reference_steps(y, steps)
    for threads in (1, 2):
        plan = _core.ConvPlan(shape, _core.pack_bitplanes(k, bits), path="auto", num_threads=threads)
        out_f, out_q = plan.run_stage_quantizing(x, thresholds, mult, bias, steps, beta1=beta1, float_after=len(steps),
                                                 quantize="pack", bits=2, stage_thresholds=stage_t, stage_beta1=1.5,
                                                 num_threads=threads)
        np.testing.assert_array_equal(out_f, after)
        np.testing.assert_array_equal(out_q, reference_pack(reference_codes(after, stage_t, 1.5), 2))


def test_inline_quantizing_can_be_turned_off():
    """N2UQ_QUANTIZE_INLINE=0: the call quantizes first (read per call; same outputs)."""
    script = (
        "import numpy as np\n"
        "from n2uq_tf.tflite import _core\n"
        "rng = np.random.default_rng(0)\n"
        "shape = _core.conv_shape(1, 16, 16, 64, 16, 3, strides=2, padding=1, act_bits=2, weight_bits=2)\n"
        "plan = _core.ConvPlan(shape, _core.pack_bitplanes(rng.integers(0, 4, (16, 3, 3, 64)), 2), path='dot')\n"
        "print(plan.form, plan.quantizes_inline())\n")
    env = dict(os.environ, N2UQ_QUANTIZE_INLINE="0", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout + out.stderr


def test_bad_arguments_name_what_is_wrong():
    rng = np.random.default_rng(3)
    shape = _core.conv_shape(1, 16, 16, 64, 16, 3, strides=2, padding=1, act_bits=2, weight_bits=2)
    plan = _core.ConvPlan(shape, _core.pack_bitplanes(rng.integers(0, 4, (16, 3, 3, 64)), 2), path="auto")
    x = rng.normal(size=(1, 16, 16, 64)).astype(np.float32)
    t = np.array([-0.5, 0.0, 0.5], np.float32)
    with pytest.raises(_core.CoreError, match="x"):
        plan.run_quantizing(x[:, :8], t)  # half the input
    with pytest.raises(_core.CoreError, match="thresholds"):
        plan.run_quantizing(x, t[:2])
    with pytest.raises(_core.CoreError, match="packed"):
        plan.run_quantizing(x, t, packed=np.zeros(10, np.uint64))
    lib, err = _core.library(), ctypes.create_string_buffer(256)
    out = np.zeros((1, 8, 8, 16), np.float32)
    ones = np.ones(16, np.float32)
    rc = lib.n2uq_conv_plan_run_quantizing(plan._handle, ctypes.byref(shape), None, None, 0, _core._ptr(ones),
                                           _core._ptr(ones), 16, None, _core._ptr(out), out.size, None, 0, None, 0, 1,
                                           err, 256)
    assert rc != 0 and b"quantizer is NULL" in err.value
