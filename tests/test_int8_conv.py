"""The int8 convolution (n2uq_int8_conv_plan_*, _core.Int8ConvPlan) and the delegate's builtin
int8 CONV_2D kernel (option int8_conv).

The core is checked bit for bit against an independent NumPy model of TFLite's int8 CONV_2D with
XNNPACK's fp32 requantization (n2uq_core.h): int64 accumulation over an explicitly padded input,
float32(acc) times float32(input_scale * filter_scale / output_scale), clamp, round half to even,
plus the zero point; on every (isa, path) this CPU runs (portable C, AVX-512 VNNI, AMX; the AMX
code also through its software model in a child process), 1 and 2 threads. The delegate must give
the stock interpreter's default (XNNPACK) bytes and stay within one quantization step of TFLite's
own kernels, on PTQ-converted Keras convs, and must show in kernel_profile which nodes it ran.
"""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from n2uq_tf.tflite import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


# ------------------------------------------------------------------ NumPy reference

def output_extent(size, kernel, stride, dilation, pad_a, pad_b):
    return (size + pad_a + pad_b - (kernel - 1) * dilation - 1) // stride + 1


def int8_accumulators(x, w, bias, input_zero_point, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0)):
    """TFLite's int32 accumulator in int64: bias + sum (x - zp) * w, with padding holding x = zp.
    x: int8 [N, H, W, C], w: int8 [OC, KH, KW, C], bias: int [OC] or None."""
    top, bottom, left, right = pads
    (sh, sw), (dh, dw) = strides, dilations
    n, h, width, c = x.shape
    oc, kh, kw, _ = w.shape
    oh = output_extent(h, kh, sh, dh, top, bottom)
    ow = output_extent(width, kw, sw, dw, left, right)
    padded = np.full((n, h + top + bottom, width + left + right, c), input_zero_point, np.int64)
    padded[:, top:top + h, left:left + width] = x
    centred = padded - input_zero_point
    acc = np.zeros((n, oh, ow, oc), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = centred[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
            acc += patch @ w[:, i, j, :].astype(np.int64).T
    if bias is not None:
        acc += np.asarray(bias, np.int64)
    return acc


def requantize(acc, filter_scales, input_quant, output_quant, output_range=(-128, 127)):
    """XNNPACK's fp32 requantization, each step in float32."""
    assert np.abs(acc).max(initial=0) < 2 ** 31, "the reference case must fit TFLite's int32 accumulator"
    filter_scales = np.asarray(filter_scales, np.float32).reshape(-1)
    scale = np.float32(input_quant[0]) * np.broadcast_to(filter_scales, (acc.shape[-1],)) / np.float32(output_quant[0])
    assert scale.dtype == np.float32
    zero_point = int(output_quant[1])
    lo, hi = np.float32(output_range[0] - zero_point), np.float32(output_range[1] - zero_point)
    f = acc.astype(np.float32) * scale
    return (np.rint(np.clip(f, lo, hi)).astype(np.int32) + zero_point).astype(np.int8)


def reference_int8_conv(x, w, bias, filter_scales, input_quant, output_quant, strides=(1, 1), dilations=(1, 1),
                        pads=(0, 0, 0, 0), output_range=(-128, 127)):
    acc = int8_accumulators(x, w, bias, input_quant[1], strides, dilations, pads)
    return requantize(acc, filter_scales, input_quant, output_quant, output_range)


def int8_paths():
    """The (isa, path) pairs the int8 conv runs here: portable C always; AVX-512 VNNI and AMX
    (hardware, or the software model under N2UQ_AMX_EMULATE=1) where the core offers them."""
    combos = _core.supported_combinations()
    paths = [("portable", "dot")]
    for pair in (("avx512", "dot"), ("avx512", "amx")):
        if pair in combos:
            paths.append(pair)
    return paths


# ------------------------------------------------------------------ random cases

CHANNELS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 19, 32, 33, 64, 130)
OUT_CHANNELS = (1, 5, 16, 17, 32, 33, 64, 70)
DILATIONS = ((1, 1), (1, 1), (2, 1), (1, 2), (2, 2))


def random_case(seed):
    """A conv of random geometry and quantization; each channel count of CHANNELS over the seeds."""
    rng = np.random.default_rng(seed)
    c = CHANNELS[seed % len(CHANNELS)]
    kh, kw = (int(v) for v in rng.integers(1, 8, 2))
    strides = tuple(int(v) for v in rng.integers(1, 3, 2))
    dilations = DILATIONS[int(rng.integers(0, len(DILATIONS)))]
    eh, ew = (kh - 1) * dilations[0], (kw - 1) * dilations[1]
    pads = tuple(int(rng.integers(0, e + 1)) for e in (eh, eh, ew, ew))
    h = int(rng.integers(1, 8)) + max(0, eh - pads[0] - pads[1])
    # every third case: rows of several 32-pixel blocks
    width = int(rng.integers(1, 14) if (seed // 2) % 3 else rng.integers(30, 100)) + max(0, ew - pads[2] - pads[3])
    oc = int(rng.choice(OUT_CHANNELS))
    x = rng.integers(-128, 128, (int(rng.integers(1, 3)), h, width, c)).astype(np.int8)
    low = -128 if seed % 3 == 0 else -127  # TFLite's symmetric filters stay in -127..127; the core takes -128
    w = rng.integers(low, 128, (oc, kh, kw, c)).astype(np.int8)
    bias = None if seed % 4 == 1 else rng.integers(-20000, 20000, oc).astype(np.int32)
    input_zp = int(rng.choice([-128, 127, int(rng.integers(-128, 128))]))
    output_zp = int(rng.choice([-128, 127, int(rng.integers(-128, 128))]))
    # Scales that spread the outputs over some 60 steps (so rounding and both clamps are exercised).
    acc = int8_accumulators(x, w, bias, input_zp, strides, dilations, pads)
    input_scale = float(rng.uniform(0.005, 0.05))
    per_tensor = seed % 3 == 2
    filter_scales = rng.uniform(0.5, 2.0, 1 if per_tensor else oc).astype(np.float32) * np.float32(0.01)
    output_scale = float(input_scale * 0.01 * max(float(acc.std()), 1.0) / 30.0)
    kind = seed % 5
    if kind == 0:
        output_range = (-128, 127)
    elif kind == 1:
        output_range = (output_zp, 127)  # ReLU
    elif kind == 2:
        output_range = (output_zp, min(127, output_zp + 12))  # a narrow ReLU6-like range
    elif kind == 3:
        output_range = (max(-128, output_zp - 4), min(127, output_zp + 4))  # ReLU_N1_TO_1-like
    else:
        v = int(rng.integers(-128, 128))
        output_range = (v, v)  # degenerate: one value
    return dict(x=x, w=w, bias=bias, filter_scales=filter_scales, input_quant=(input_scale, input_zp),
                output_quant=(output_scale, output_zp), strides=strides, dilations=dilations, pads=pads,
                output_range=output_range, rng=rng)


def check_case(case, paths, threads=(1, 2), other_input=True):
    """Every path of `paths` (and thread count) against the reference, on the case's input and, on the
    same plan, on a second input of another batch and size; returns the number of comparisons."""
    args = (case["w"], case["filter_scales"], case["bias"], case["input_quant"], case["output_quant"])
    geometry = dict(strides=case["strides"], dilations=case["dilations"], pads=case["pads"],
                    output_range=case["output_range"])
    inputs = [case["x"]]
    if other_input:
        n, h, width, c = case["x"].shape
        rng = case["rng"]
        inputs.append(rng.integers(-128, 128, (3 - n, h + int(rng.integers(0, 4)), width + int(rng.integers(0, 9)),
                                                c)).astype(np.int8))
    expected = [reference_int8_conv(x, case["w"], case["bias"], case["filter_scales"], case["input_quant"],
                                    case["output_quant"], **geometry) for x in inputs]
    checked = 0
    for isa, path in paths:
        plan = _core.Int8ConvPlan(*args, strides=case["strides"], dilations=case["dilations"], padding=case["pads"],
                                  output_range=case["output_range"], isa=isa, path=path)
        assert (plan.isa, plan.path) == (isa, path)
        for x, want in zip(inputs, expected):
            for t in threads:
                got = plan.run(x, num_threads=t)
                assert got.dtype == np.int8 and got.shape == want.shape
                if not np.array_equal(got, want):
                    diff = np.argwhere(got != want)
                    first = tuple(diff[0])
                    raise AssertionError(
                        f"isa={isa} path={path} threads={t} x{x.shape} w{case['w'].shape} strides={case['strides']} "
                        f"dilations={case['dilations']} pads={case['pads']} range={case['output_range']} "
                        f"quant={case['input_quant']} {case['output_quant']}: {len(diff)} outputs differ, first "
                        f"at {first}: got {got[first]}, want {want[first]}")
                checked += 1
    return checked


# ------------------------------------------------------------------ core tests

@pytest.mark.parametrize("group", range(6))
def test_int8_conv_matches_reference_on_every_path(group):
    for seed in range(group, 42, 6):
        case = random_case(seed)
        want = reference_int8_conv(case["x"], case["w"], case["bias"], case["filter_scales"], case["input_quant"],
                                   case["output_quant"], case["strides"], case["dilations"], case["pads"],
                                   case["output_range"])
        lo, hi = case["output_range"]
        assert want.min() >= lo and want.max() <= hi
        if (lo, hi) == (-128, 127) and want.size >= 40:  # the case really spreads its outputs
            assert len(np.unique(want)) > 10, (seed, np.unique(want))
        assert check_case(case, int8_paths()) == len(int8_paths()) * 4, seed


def test_int8_paths_are_the_cpus():
    """The paths tested are those the CPU has (and no others are silently skipped)."""
    features = _core.cpu_features()
    combos = _core.supported_combinations()
    paths = int8_paths()
    assert (("avx512", "dot") in paths) == (("avx512", "dot") in combos)
    assert (("avx512", "dot") in paths) == ("avx512" in _core.supported_isas() and "avx512vnni" in features)
    assert (("avx512", "amx") in paths) == _core.amx_status().startswith(("available", "emulated"))


@pytest.mark.parametrize("channels, kernel", [(3, (7, 7)), (4, (4, 4)), (64, (1, 1)), (65, (1, 1)), (1, (1, 1)),
                                              (8, (2, 4)), (130, (3, 3)), (21, (1, 3))])
def test_int8_conv_row_lengths(channels, kernel):
    """Receptive fields of exactly one 64-byte row word (4x4x4, 1x1x64, 2x4x8), one byte over,
    one byte, and several words; pixel counts around the 32-pixel blocks; stride 2."""
    rng = np.random.default_rng(channels * 10 + kernel[0])
    for oc in (16, 31, 64):
        for h, width in ((4, 8), (5, 13), (9, 7)):
            h, width = h + kernel[0] - 1, width + kernel[1] - 1
            case = dict(x=rng.integers(-128, 128, (1, h, width, channels)).astype(np.int8),
                        w=rng.integers(-127, 128, (oc,) + kernel + (channels,)).astype(np.int8),
                        bias=rng.integers(-1000, 1000, oc).astype(np.int32),
                        filter_scales=rng.uniform(0.001, 0.003, oc).astype(np.float32),
                        input_quant=(0.02, int(rng.integers(-128, 128))), output_quant=(0.1 * channels, 5),
                        strides=(1, 2) if oc == 31 else (1, 1), dilations=(1, 1), pads=(0, 0, 0, 0),
                        output_range=(-128, 127), rng=rng)
            check_case(case, int8_paths(), other_input=False)


# (C, KH, KW, stride_w, dilation_h, W, pads): the AVX-512 / AMX kernels stack each output row's
# input columns once where the CPU has VBMI, dilation_width is 1, C <= 32 and KH * C <= 256 (else
# per-pixel rows): fields at and past those limits, output widths around the 32-pixel blocks,
# windows of one and two 64-byte registers, rows shorter than a window, padding at both ends.
ROW_FORM_SHAPES = [
    (32, 8, 1, 1, 1, 40, (3, 4, 0, 0)),    # KH * C = 256: the largest stacked field
    (32, 7, 3, 2, 1, 70, (3, 3, 1, 1)),
    (33, 7, 2, 1, 1, 35, (0, 6, 1, 0)),    # C = 33: per-pixel rows
    (32, 9, 1, 1, 1, 33, (4, 4, 0, 0)),    # KH * C = 288: per-pixel rows
    (1, 1, 1, 1, 1, 100, (0, 0, 0, 0)),    # one-register window
    (1, 7, 7, 3, 2, 97, (6, 12, 6, 6)),
    (3, 7, 7, 2, 1, 229, (0, 0, 0, 0)),    # a stem without padding: 112 outputs per row
    (5, 3, 5, 3, 1, 98, (2, 0, 4, 2)),
    (16, 2, 7, 1, 2, 64, (0, 2, 3, 3)),    # 64 outputs: two whole blocks
    (32, 1, 1, 1, 1, 33, (0, 0, 0, 0)),    # 33 outputs: a block of one
    (2, 5, 1, 3, 1, 94, (2, 2, 0, 0)),     # 32 outputs at stride 3
    (8, 3, 3, 2, 1, 63, (1, 1, 1, 1)),
    (7, 4, 6, 1, 1, 3, (0, 0, 5, 5)),      # a row narrower than the kernel: all edges
    (4, 3, 3, 1, 1, 2, (1, 1, 2, 2)),
]


def row_form_cases():
    rng = np.random.default_rng(77)
    cases = []
    for i, (c, kh, kw, sw, dh, width, pads) in enumerate(ROW_FORM_SHAPES):
        oc = (1, 17, 32, 33, 70)[i % 5]
        h = max(1, (kh - 1) * dh + 1 - pads[0] - pads[1]) + int(rng.integers(0, 3))
        x = rng.integers(-128, 128, (2, h, width, c)).astype(np.int8)
        w = rng.integers(-127, 128, (oc, kh, kw, c)).astype(np.int8)
        input_zp = (-128, 127, 5)[i % 3]
        acc = int8_accumulators(x, w, None, input_zp, (1, sw), (dh, 1), pads)
        cases.append(dict(x=x, w=w, bias=rng.integers(-500, 500, oc).astype(np.int32),
                          filter_scales=rng.uniform(0.5, 2.0, oc).astype(np.float32), input_quant=(1.0, input_zp),
                          output_quant=(float(acc.std()) / 40, int(rng.integers(-20, 20))), strides=(1, sw),
                          dilations=(dh, 1), pads=pads, output_range=(-128, 127), rng=rng))
    return cases


def test_int8_conv_row_forms():
    for case in row_form_cases():
        check_case(case, int8_paths(), other_input=False)


def test_int8_conv_without_vbmi():
    """With AVX-512 VBMI hidden the AVX-512 and AMX kernels take per-pixel rows everywhere: the
    random and row-form cases again."""
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from n2uq_tf.tflite import _core\n"
        "import test_int8_conv as t\n"
        "assert 'avx512vbmi' not in _core.cpu_features()\n"
        "count = sum(t.check_case(t.random_case(seed), t.int8_paths()) for seed in range(0, 42, 3))\n"
        "for case in t.row_form_cases():\n"
        "    count += t.check_case(case, t.int8_paths(), other_input=False)\n"
        "print('checked', count, t.int8_paths())\n") % TESTS
    env = dict(os.environ, N2UQ_CPU_DISABLE="avx512vbmi", PYTHONPATH=ROOT)
    env.pop("N2UQ_AMX_EMULATE", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = len(int8_paths())
    assert f"checked {paths * (14 * 4 + len(ROW_FORM_SHAPES) * 2)}" in result.stdout, result.stdout


def test_int8_conv_resnet_stem_224():
    """The ResNet stem: 7x7 stride 2, 3 -> 64 channels, 224 x 224 with TF's 'same' padding (2, 3)."""
    rng = np.random.default_rng(224)
    case = dict(x=rng.integers(-128, 128, (1, 224, 224, 3)).astype(np.int8),
                w=rng.integers(-127, 128, (64, 7, 7, 3)).astype(np.int8),
                bias=rng.integers(-3000, 3000, 64).astype(np.int32),
                filter_scales=rng.uniform(0.002, 0.02, 64).astype(np.float32), input_quant=(0.0187, -9),
                output_quant=(0.35, -128), strides=(2, 2), dilations=(1, 1), pads=(2, 3, 2, 3),
                output_range=(-128, 127), rng=rng)
    assert check_case(case, int8_paths(), other_input=False) == 2 * len(int8_paths())


def test_int8_conv_large_accumulators():
    """Accumulators far past 2^24 (float32(acc) rounds) up to about 2^27.6, both signs, with the
    input at its ends and zero points -128 and 127, the weights at +-127: the int32 -> float32
    conversion must round as the reference's does."""
    rng = np.random.default_rng(31)
    paths = int8_paths()
    for input_zp, value in ((-128, 127), (127, -128)):
        c, k = 130, 7
        x = np.full((1, 9, 10, c), value, np.int8)
        x[0, 4, 5] = rng.integers(-128, 128, c)  # some variety
        w = np.where(rng.random((6, k, k, c)) < 0.97, 127, -127).astype(np.int8)
        w[1] = -w[1]
        acc = int8_accumulators(x, w, None, input_zp)
        assert np.abs(acc).max() > 2 ** 27
        case = dict(x=x, w=w, bias=None, filter_scales=np.float32([3e-7]), input_quant=(1.0, input_zp),
                    output_quant=(1.0, 0), strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0),
                    output_range=(-128, 127), rng=rng)
        want = reference_int8_conv(x, w, None, case["filter_scales"], case["input_quant"], case["output_quant"])
        assert len(np.unique(want)) >= 3
        check_case(case, paths, other_input=False)


def test_int8_conv_float32_accumulator_rounding():
    """float32(acc) rounds accumulators past 2^24 to a multiple of 8 or 16, which can land them on
    (or move them off) a tie of the requantization: with scale 2^-21 and acc = (k + 1/2) 2^21 +
    a small sum, the reference (and XNNPACK) round the float32 value, not the exact product."""
    rng = np.random.default_rng(17)
    x = rng.integers(-3, 4, (2, 7, 9, 3)).astype(np.int8)
    w = rng.integers(-3, 4, (20, 1, 1, 3)).astype(np.int8)
    k = rng.integers(20, 100, 20) * rng.choice([-1, 1], 20)
    bias = ((k + 0.5) * 2 ** 21).astype(np.int32)
    scale = np.float32(2.0 ** -21)
    acc = int8_accumulators(x, w, bias, 0)
    assert np.abs(acc).min() > 2 ** 24
    want = reference_int8_conv(x, w, bias, [scale], (1.0, 0), (1.0, 0))
    exact = np.rint(acc.astype(np.float64) * 2.0 ** -21)
    assert np.sum(want != exact) > 20  # float32(acc) really decides some outputs
    case = dict(x=x, w=w, bias=bias, filter_scales=np.float32([scale]), input_quant=(1.0, 0), output_quant=(1.0, 0),
                strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), output_range=(-128, 127), rng=rng)
    check_case(case, int8_paths(), other_input=False)


def test_int8_conv_intermediate_sums_past_int32():
    """TFLite's accumulator bias + sum (x - zp) w fits int32 while the kernels' unsigned-byte form
    sum (x + 128) w does not (x = zp = 127, w = 127, K = 69 * 1024 > 2^31 / (255 * 127)): the
    folded bias must cancel the wrapped sum exactly, as in two's complement."""
    c = 69 * 1024
    x = np.full((1, 1, 1, c), 127, np.int8)
    x[0, 0, 0, :3] = [126, 125, 120]  # x - zp: -1, -2, -7
    w = np.full((3, 1, 1, c), 127, np.int8)
    bias = np.array([100, -100, 7], np.int32)
    assert int(((x.astype(np.int64) + 128) * 127).sum()) > 2 ** 31
    acc = int8_accumulators(x, w, bias, 127)
    np.testing.assert_array_equal(acc.reshape(-1), bias - 127 * 10)
    case = dict(x=x, w=w, bias=bias, filter_scales=np.float32([0.0625]), input_quant=(1.0, 127),
                output_quant=(1.0, 0), strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0),
                output_range=(-128, 127), rng=np.random.default_rng(0))
    want = reference_int8_conv(x, w, bias, case["filter_scales"], case["input_quant"], case["output_quant"])
    np.testing.assert_array_equal(want.reshape(-1), [-73, -86, -79])  # -73.125, -85.625, -78.9375
    check_case(case, int8_paths(), other_input=False)


def test_int8_conv_ties_round_to_even():
    """float(acc) * scale exactly k + 0.5 rounds to the even neighbour, as XNNPACK's fp32
    requantization does (not away from zero, as TFLite's reference kernels' rounding would)."""
    # scale = 1 * 0.5 / 1: the output is rne(x / 2) + zp for a 1x1 conv with weight 1.
    x = np.array([-9, -7, -5, -3, -1, 0, 1, 3, 5, 7, 9, 11, 127, -128], np.int8).reshape(1, 1, 14, 1)
    half_even = np.array([-4, -4, -2, -2, 0, 0, 0, 2, 2, 4, 4, 6, 64, -64])
    for isa, path in int8_paths():
        for zp in (0, 3, -7):
            plan = _core.Int8ConvPlan(np.ones((1, 1, 1, 1), np.int8), [0.5], None, (1.0, 0), (1.0, zp), isa=isa,
                                      path=path)
            for threads in (1, 2):
                np.testing.assert_array_equal(plan.run(x, num_threads=threads).reshape(-1), half_even + zp,
                                              err_msg=f"isa={isa} path={path} zp={zp}")
    # Per-channel scales 0.5, 0.25, 1.5, 2.5 (exact in binary) over 3x3x3 fields: ties wherever
    # acc is odd (0.25: acc = 2 mod 4), on all 40 output channels and every pixel tail.
    rng = np.random.default_rng(5)
    x = rng.integers(-30, 30, (2, 9, 11, 3)).astype(np.int8)
    w = rng.integers(-3, 4, (40, 3, 3, 3)).astype(np.int8)
    bias = rng.integers(-50, 50, 40).astype(np.int32)
    scales = np.tile(np.float32([0.5, 0.25, 1.5, 2.5]), 10)
    acc = int8_accumulators(x, w, bias, 2, pads=(1, 1, 1, 1))
    f = acc.astype(np.float32) * scales
    ties = (f - np.floor(f)) == 0.5
    assert ties.mean() > 0.2
    want = reference_int8_conv(x, w, bias, scales, (1.0, 2), (1.0, -1), pads=(1, 1, 1, 1))
    away = (np.sign(f) * np.floor(np.abs(f) + 0.5)).clip(-127, 128) - 1
    assert np.sum(want != away) > 100  # rounding half away from zero gives other bytes
    case = dict(x=x, w=w, bias=bias, filter_scales=scales, input_quant=(1.0, 2), output_quant=(1.0, -1),
                strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), output_range=(-128, 127), rng=rng)
    check_case(case, int8_paths(), other_input=False)


@pytest.mark.parametrize("oc", [64, 70, 96])
@pytest.mark.parametrize("largest_scale", [0.5, 0.75, 1e5])
@pytest.mark.parametrize("output_range", [(-128, 127), (-20, 127), (-100, 30)])
def test_int8_conv_requantization_forms(oc, largest_scale, output_range):
    """The AVX-512 / AMX stores requantize in one of two forms: with every scale <= 0.5 (so that
    float(acc) * scale stays inside int32) without float clamps, the saturating packs and a byte
    max / min giving the range; else clamping in float first (with scales up to 1e5, products
    past int32 that a conversion before the clamp would turn into INT32_MIN). Both against the
    reference, with outputs far past both ends of the range, 64 channels per store and a last
    chunk of 32 or fewer (70, 96), an image wide enough for several blocks per row."""
    rng = np.random.default_rng(oc + int(largest_scale * 8) % 1000)
    x = rng.integers(-128, 128, (1, 20, 75, 3)).astype(np.int8)
    w = rng.integers(-127, 128, (oc, 7, 7, 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, oc).astype(np.int32)
    # Scales (input 1, output 1) of about 1/300 .. largest: outputs of the smaller ones spread over
    # the range, the larger ones saturate at either end.
    filter_scales = np.geomspace(1 / 300, largest_scale, oc).astype(np.float32)
    rng.shuffle(filter_scales)
    case = dict(x=x, w=w, bias=bias, filter_scales=filter_scales, input_quant=(1.0, 3), output_quant=(1.0, -7),
                strides=(2, 2), dilations=(1, 1), pads=(3, 3, 3, 3), output_range=output_range, rng=rng)
    want = reference_int8_conv(x, w, bias, filter_scales, case["input_quant"], case["output_quant"],
                               case["strides"], case["dilations"], case["pads"], output_range)
    assert (want == output_range[0]).sum() > 50 and (want == output_range[1]).sum() > 50
    assert len(np.unique(want)) > 40
    if largest_scale > 1:
        acc = int8_accumulators(x, w, bias, 3, (2, 2), (1, 1), (3, 3, 3, 3))
        assert (np.abs(acc.astype(np.float64) * filter_scales) > 2.0 ** 31).sum() > 1000
    assert check_case(case, int8_paths()) == 4 * len(int8_paths())


def test_int8_conv_isa_and_path_selection(monkeypatch):
    """auto: amx where offered, else the AVX-512 VNNI blocks, else portable C (also under the AVX2
    ISA); paths the int8 conv lacks (bitserial, lut) fall back to that choice, also from
    N2UQ_KERNEL_PATH; amx where it is not offered is refused."""
    for name in ("N2UQ_KERNEL_ISA", "N2UQ_KERNEL_PATH"):
        monkeypatch.delenv(name, raising=False)
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (9, 3, 3, 3)).astype(np.int8)
    x = rng.integers(-128, 128, (1, 8, 9, 3)).astype(np.int8)
    args = (w, [0.01], None, (0.05, 1), (0.2, -3))
    want = reference_int8_conv(x, w, None, [0.01], (0.05, 1), (0.2, -3), pads=(1, 1, 1, 1))
    paths = int8_paths()
    best = paths[-1]
    vnni = ("avx512", "dot") in paths

    def plan(**kwargs):
        p = _core.Int8ConvPlan(*args, padding=1, **kwargs)
        np.testing.assert_array_equal(p.run(x, num_threads=2), want, err_msg=str(kwargs))
        return p.isa, p.path

    assert plan() == best
    assert plan(path="dot") == (("avx512", "dot") if vnni else ("portable", "dot"))
    for fallback in ("bitserial", "lut"):
        assert plan(path=fallback) == best
    assert plan(isa="portable") == ("portable", "dot")
    assert plan(isa="portable", path="lut") == ("portable", "dot")
    if "avx2" in _core.supported_isas():
        assert plan(isa="avx2") == ("portable", "dot")
    with pytest.raises(_core.CoreError, match="the int8 conv's amx path is not available here"):
        _core.Int8ConvPlan(*args, isa="portable", path="amx")
    if ("avx512", "amx") not in paths:
        with pytest.raises(_core.CoreError, match="amx path is not available here"):
            _core.Int8ConvPlan(*args, path="amx")
    monkeypatch.setenv("N2UQ_KERNEL_PATH", "bitserial")
    assert plan() == best
    monkeypatch.setenv("N2UQ_KERNEL_PATH", "dot")
    assert plan() == (("avx512", "dot") if vnni else ("portable", "dot"))
    assert plan(path="auto", isa="portable") == ("portable", "dot")
    monkeypatch.setenv("N2UQ_KERNEL_PATH", "fastest")
    with pytest.raises(_core.CoreError, match="N2UQ_KERNEL_PATH=fastest"):
        _core.Int8ConvPlan(*args)
    monkeypatch.setenv("N2UQ_KERNEL_PATH", "amx")
    with pytest.raises(_core.CoreError, match="amx path is not available here"):
        _core.Int8ConvPlan(*args, isa="portable")


# ------------------------------------------------------------------ malformed arguments

def _good_args():
    rng = np.random.default_rng(0)
    return dict(filter=rng.integers(-127, 128, (5, 3, 3, 3)).astype(np.int8),
                filter_scales=np.full(5, 0.01, np.float32), bias=np.zeros(5, np.int32), input_quant=(0.02, 3),
                output_quant=(0.1, -2))


@pytest.mark.parametrize("change, message", [
    (dict(filter=np.zeros((5, 3, 3), np.int8)), r"filter must be 4-D \[OC, KH, KW, IC\]"),
    (dict(filter_scales=np.full(2, 0.01, np.float32)), "filter_scales must hold 1 or out_channels = 5 values, got 2"),
    (dict(filter_scales=np.zeros(0, np.float32)), "filter_scales must hold 1 or out_channels = 5 values, got 0"),
    (dict(bias=np.zeros(4, np.int32)), "bias must hold out_channels = 5 values, got 4"),
    (dict(bias=np.zeros(6, np.int32)), "bias must hold out_channels = 5 values, got 6"),
    (dict(filter_scales=[0.01, 0.01, 0.0, 0.01, 0.01]), "filter scale 2 must be finite and > 0, got 0"),
    (dict(filter_scales=[-0.5]), "filter scale 0 must be finite and > 0, got -0.5"),
    (dict(filter_scales=[0.01, np.nan, 0.01, 0.01, 0.01]), "filter scale 1 must be finite and > 0, got nan"),
    (dict(filter_scales=[0.01, 0.01, 0.01, 0.01, np.inf]), "filter scale 4 must be finite and > 0, got inf"),
    (dict(input_quant=(0.0, 3)), "input_scale must be finite and > 0, got 0"),
    (dict(input_quant=(np.nan, 3)), "input_scale must be finite and > 0, got nan"),
    (dict(output_quant=(-0.1, 0)), "output_scale must be finite and > 0, got -0.1"),
    (dict(output_quant=(np.inf, 0)), "output_scale must be finite and > 0, got inf"),
    (dict(input_quant=(0.02, 128)), r"input_zero_point must be in -128..127, got 128"),
    (dict(input_quant=(0.02, -129)), r"input_zero_point must be in -128..127, got -129"),
    (dict(output_quant=(0.1, -129)), r"output_zero_point must be in -128..127, got -129"),
    (dict(output_range=(5, 4)), "need -128 <= output_min <= output_max <= 127, got 5, 4"),
    (dict(output_range=(-129, 0)), "need -128 <= output_min <= output_max <= 127, got -129, 0"),
    (dict(output_range=(0, 128)), "need -128 <= output_min <= output_max <= 127, got 0, 128"),
    (dict(strides=0), "stride_height must be 1..1024, got 0"),
    (dict(dilations=(1, 0)), "dilation_width must be 1..1024, got 0"),
    (dict(padding=(3, 0, 0, 0)), "pad_top = 3 is larger than the dilated kernel extent"),
    (dict(padding=(0, 0, -1, 0)), "pad_left must be >= 0, got -1"),
    (dict(isa="turbo"), "isa must be one of"),
    (dict(path="gemm"), "path must be one of"),
    (dict(filter=np.zeros((1, 1, 1, 2 ** 20 + 1), np.int8), filter_scales=[1.0], bias=None),
     "a receptive field of 1048577 bytes is more than 1048576"),
])
def test_int8_conv_malformed_arguments_raise(change, message):
    args = _good_args()
    kwargs = dict(strides=1, dilations=1, padding=1, output_range=(-128, 127))
    for key in list(change):
        (args if key in args else kwargs)[key] = change[key]
    with pytest.raises(_core.CoreError, match=message):
        plan = _core.Int8ConvPlan(args["filter"], args["filter_scales"], args["bias"], args["input_quant"],
                                  args["output_quant"], **kwargs)
        plan.run(np.zeros((1, 5, 5, args["filter"].shape[-1]), np.int8))  # padding is checked per input


@pytest.mark.parametrize("isa, path", int8_paths())
def test_int8_conv_malformed_run_arguments_raise(isa, path):
    args = _good_args()
    plan = _core.Int8ConvPlan(*args.values(), padding=1, isa=isa, path=path)
    x = np.zeros((1, 5, 5, 3), np.int8)
    assert plan.run(x).shape == (1, 5, 5, 5)
    with pytest.raises(_core.CoreError, match=r"x must be \[N, H, W, 3\], got shape \(1, 5, 5, 4\)"):
        plan.run(np.zeros((1, 5, 5, 4), np.int8))
    with pytest.raises(_core.CoreError, match=r"x must be \[N, H, W, 3\], got shape \(5, 5, 3\)"):
        plan.run(np.zeros((5, 5, 3), np.int8))
    for threads in (0, -1, 257):
        with pytest.raises(_core.CoreError, match=f"num_threads must be 1..256, got {threads}"):
            plan.run(x, num_threads=threads)
    unpadded = _core.Int8ConvPlan(*args.values(), padding=0, isa=isa, path=path)
    with pytest.raises(_core.CoreError, match=r"the dilated kernel \(3 x 3\) is larger than the padded input"):
        unpadded.run(np.zeros((1, 2, 5, 3), np.int8))
    with pytest.raises(_core.CoreError, match="batch must be"):
        unpadded.run(np.zeros((0, 5, 5, 3), np.int8))


def test_int8_conv_malformed_buffers_through_the_c_api():
    """Lengths and pointers the C library itself must refuse (no wrapper help), never writing the
    output on failure."""
    lib = _core.library()
    args = _good_args()
    w, scales, bias = args["filter"], args["filter_scales"], args["bias"]
    plan_shape = _core.conv_shape(1, 3, 3, 3, 5, 3, act_bits=1, weight_bits=1)
    params = _core.Int8ConvParams(0.02, 3, 0.1, -2, -128, 127)
    err = ctypes.create_string_buffer(256)
    handle = ctypes.c_void_p()

    def create(shape=plan_shape, filt=w, filt_len=w.size, b=bias, b_len=5, s=scales, s_len=5, p=params, isa=0,
               path=0, out=True):
        handle.value = None
        return lib.n2uq_int8_conv_plan_create(
            None if shape is None else ctypes.byref(shape), None if filt is None else _core._ptr(filt), filt_len,
            None if b is None else _core._ptr(b), b_len, None if s is None else _core._ptr(s), s_len,
            None if p is None else ctypes.byref(p), isa, path, ctypes.byref(handle) if out else None, err, len(err))

    for kwargs, status, message in [
            (dict(filt_len=w.size - 1), -2, b"filter must hold out_channels * kernel_height * kernel_width * "
                                            b"in_channels = 135 int8 values, got 134"),
            (dict(filt=None), -2, b"filter must hold"),
            (dict(b_len=4), -2, b"bias must hold out_channels = 5 values, got 4"),
            (dict(s=None), -2, b"filter_scales must hold"),
            (dict(s_len=0), -2, b"filter_scales must hold 1 or out_channels = 5 values, got 0"),
            (dict(p=None), -1, b"params is NULL"),
            (dict(shape=None), -1, b"shape is NULL"),
            (dict(out=False), -1, b"plan pointer is NULL"),
            (dict(isa=9), -1, b""),
            (dict(path=9), -1, b""),
    ]:
        assert create(**kwargs) == status, (kwargs, err.value)
        assert message in err.value and err.value, (kwargs, err.value)
        assert not handle.value
    assert create(b=None, b_len=0) == 0 and handle.value  # no bias: fine
    lib.n2uq_int8_conv_plan_destroy(handle)
    assert create() == 0 and handle.value
    isa, path = ctypes.c_int(-1), ctypes.c_int(-1)
    assert lib.n2uq_int8_conv_plan_info(handle, ctypes.byref(isa), ctypes.byref(path)) == 0
    assert (_core.ISAS[isa.value], _core.PATHS[path.value]) == int8_paths()[-1]
    assert lib.n2uq_int8_conv_plan_info(None, ctypes.byref(isa), ctypes.byref(path)) == -1
    x = np.ones(75, np.int8)
    out = np.full(5 * 5 * 5 + 1, 99, np.int8)
    shape = _core.conv_shape(1, 5, 5, 3, 5, 3, padding=1, act_bits=1, weight_bits=1)

    def run(plan=handle, shape=shape, x_len=75, out_len=125, x_ptr=True, out_ptr=True, threads=1):
        out[:] = 99
        return lib.n2uq_int8_conv_plan_run(plan, None if shape is None else ctypes.byref(shape),
                                           _core._ptr(x) if x_ptr else None, x_len,
                                           _core._ptr(out) if out_ptr else None, out_len, threads, err, len(err))

    other = _core.conv_shape(1, 5, 5, 3, 5, (3, 2), padding=1, act_bits=1, weight_bits=1)
    other_channels = _core.conv_shape(1, 5, 5, 3, 6, 3, padding=1, act_bits=1, weight_bits=1)
    for kwargs, status, message in [
            (dict(plan=None), -1, b"plan is NULL"),
            (dict(shape=None), -1, b"shape is NULL"),
            (dict(x_len=74), -2, b"input has 74 values, the shape needs 75"),
            (dict(x_ptr=False), -2, b"input has"),
            (dict(out_len=124), -2, b"output has 124 values, the shape needs 125"),
            (dict(out_ptr=False), -2, b"output has"),
            (dict(threads=0), -1, b"num_threads must be 1..256, got 0"),
            (dict(shape=other), -1, b"the shape's filter (3 x 2, 3 -> 5 channels) is not the plan's (3 x 3, 3 -> 5)"),
            (dict(shape=other_channels), -1, b"is not the plan's"),
    ]:
        assert run(**kwargs) == status, (kwargs, err.value)
        assert message in err.value, (kwargs, err.value)
        assert np.all(out == 99), kwargs
    assert run() == 0 and np.all(out[125:] == 99) and not np.all(out[:125] == 99)
    lib.n2uq_int8_conv_plan_destroy(handle)
    lib.n2uq_int8_conv_plan_destroy(None)


# ------------------------------------------------------------------ the AMX code on its software model

EMULATED_SCRIPT = """
import sys
sys.path.insert(0, %(tests)r)
from n2uq_tf.tflite import _core
import test_int8_conv as t
assert _core.amx_status().startswith("emulated"), _core.amx_status()
assert ("avx512", "amx") in t.int8_paths()
count = 0
for seed in (0, 2, 8, 9, 10, 11, 12, 13):  # channels 1, 3, 16, 19, 32, 33, 64, 130
    count += t.check_case(t.random_case(seed), [("avx512", "amx")])
for case in t.row_form_cases():
    t.check_case(case, [("avx512", "amx")], other_input=False)
t.test_int8_conv_ties_round_to_even()
t.test_int8_conv_large_accumulators()
t.test_int8_conv_float32_accumulator_rounding()
t.test_int8_conv_intermediate_sums_past_int32()
for channels, kernel in ((3, (7, 7)), (4, (4, 4)), (65, (1, 1))):
    t.test_int8_conv_row_lengths(channels, kernel)
print("checked", count)
""" % {"tests": TESTS}


def test_int8_conv_emulated_amx_is_bit_exact():
    env = dict(os.environ, PYTHONPATH=ROOT, N2UQ_AMX_EMULATE="1")
    for name in ("N2UQ_KERNEL_PATH", "N2UQ_KERNEL_ISA", "N2UQ_CPU_DISABLE"):
        env.pop(name, None)
    if "avx512vnni" not in _core.cpu_features():
        # The model needs AVX-512 VNNI: without it the int8 conv's amx path stays off, with the reason.
        script = ("from n2uq_tf.tflite import _core\n"
                  "assert _core.amx_status().startswith('unavailable'), _core.amx_status()\n"
                  "try:\n"
                  "    _core.Int8ConvPlan([[[[1]]]], [1.0], None, (1.0, 0), (1.0, 0), path='amx')\n"
                  "except _core.CoreError as e:\n"
                  "    assert 'amx path is not available' in str(e), str(e)\n"
                  "    print('refused')\n")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0 and "refused" in result.stdout, result.stdout + result.stderr[-3000:]
        return
    result = subprocess.run([sys.executable, "-c", EMULATED_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checked 32" in result.stdout, result.stdout


# ------------------------------------------------------------------ the delegate on converted models

CONV2D, RELU_N1_TO_1 = 3, 2  # BuiltinOperator.CONV_2D, ActivationFunctionType.RELU_N1_TO_1
ACTIVATION_CODES = {None: 0, "relu": 1, "clip": 2, "relu6": 3}

# name: (in_channels, out_channels, kernel, strides, padding, dilation, activation, (H, W), bias, per-tensor)
MODELS = {
    "stem_224": (3, 64, 7, 2, "same", 1, "relu", (224, 224), True, False),
    "rgb_valid_relu6": (3, 17, 3, 1, "valid", (1, 2), "relu6", (13, 15), True, False),
    "gray_no_bias": (1, 33, 5, 2, "same", 1, None, (11, 12), False, False),
    "eight_dilated": (8, 70, 3, 1, "same", 2, "relu", (12, 10), True, False),
    "clip_per_tensor": (4, 5, (2, 3), (2, 1), "valid", 1, "clip", (9, 11), True, True),
    "sixteen_channels": (16, 24, 3, 2, "same", 1, "relu", (10, 9), True, False),
}


def build_model(name):
    """A one-conv Keras model converted with full-integer PTQ (int8 conv, float input / output)."""
    import tensorflow as tf  # here, so that the AMX child process above need not load TensorFlow
    import tf_keras as keras

    cin, cout, kernel, strides, padding, dilation, act, hw, bias, per_tensor = MODELS[name]
    keras.utils.set_random_seed(len(name))
    inp = keras.Input(hw + (cin,), batch_size=1)
    y = keras.layers.Conv2D(cout, kernel, strides=strides, padding=padding, dilation_rate=dilation, use_bias=bias,
                            bias_initializer="random_normal")(inp)
    if act == "relu":
        y = keras.layers.ReLU()(y)
    elif act == "relu6":
        y = keras.layers.ReLU(6.0)(y)
    elif act == "clip":
        y = keras.layers.Lambda(lambda t: tf.clip_by_value(t, -1.0, 1.0))(y)
    model = keras.Model(inp, y)
    data = np.random.default_rng(1).normal(0.3, 1.5, (8,) + hw + (cin,)).astype(np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([data[i:i + 1]] for i in range(len(data)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if per_tensor:
        converter._experimental_disable_per_channel = True
    return converter.convert()


def conv_operator(content):
    """(fused activation code, filter scale count, input count) of the model's CONV_2D."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    convs = [op for op in graph.operators
             if max(model.operatorCodes[op.opcodeIndex].builtinCode,
                    model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == CONV2D]
    assert len(convs) == 1
    op = convs[0]
    assert graph.tensors[op.inputs[0]].type == 9 and graph.tensors[op.outputs[0]].type == 9  # int8
    return (op.builtinOptions.fusedActivationFunction, len(graph.tensors[op.inputs[1]].quantization.scale),
            len(op.inputs))


@pytest.fixture(scope="module")
def int8_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_model(name)
        return cache[name]
    return get


def _stock(content, threads, reference=False, shape=None):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = dict(experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES) if reference else {}
    interpreter = Interpreter(model_content=content, num_threads=threads, **kwargs)
    return _prepared(interpreter, shape)


def _prepared(interpreter, shape):
    if shape is not None:
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(shape))
    interpreter.allocate_tensors()
    return interpreter


def _invoke(interpreter, x):
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def _quantization(interpreter):
    """(input quant of the conv's int8 input, output quant of its int8 output), from the stock graph."""
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    assert len(ops) == 1
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    return (tensors[int(ops[0]["inputs"][0])]["quantization"], tensors[int(ops[0]["outputs"][0])]["quantization"])


def _on_grid_input(rng, shape, input_quant):
    """Float inputs that quantize to known int8 values whatever the QUANTIZE kernel's rounding (so
    every interpreter's conv sees the same bytes): normal data quantized, plus both int8 ends."""
    scale, zp = input_quant
    q = np.clip(np.round(rng.normal(0.3, 1.5, shape) / scale) + zp, -128, 127)
    q.reshape(-1)[:7] = [-128, 127, -128, 127, zp, -127, 126]
    return ((q - zp) * scale).astype(np.float32)


def _run_delegate(content, x, threads, backend="litert", shape=None, **options):
    """(output, CONV_2D (int8) profile entries of this delegate) with the n2uq delegate attached."""
    from n2uq_tf.tflite import delegate as n2d

    plugin = n2d.load_delegate(backend, **options)
    _, module = n2d.backend_module(backend)
    interpreter = _prepared(module.Interpreter(model_content=content, num_threads=threads,
                                               experimental_delegates=[plugin]), shape)
    out = _invoke(interpreter, x)
    entries = [e for e in n2d.kernel_profile(plugin) if e["op"] == "CONV_2D (int8)"]
    del interpreter
    return out, entries


def _delegate_configs(cin):
    """(options, whether the conv is claimed, the kernel path it then runs)."""
    paths = int8_paths()
    vnni = ("avx512", "dot") in paths
    best = paths[-1][1]
    configs = [({}, cin <= 8 and vnni, best),  # the default is auto
               (dict(int8_conv="auto"), cin <= 8 and vnni, best),
               (dict(int8_conv="auto", isa="portable"), False, None),  # TFLite's kernel is faster than portable C
               (dict(int8_conv="off"), False, None),
               (dict(int8_conv="all", path="dot"), True, "dot"),
               (dict(int8_conv="all", isa="portable"), True, "dot")]
    if ("avx512", "amx") in paths:
        configs.append((dict(int8_conv="all", path="amx"), True, "amx"))
    return configs


@pytest.mark.parametrize("name", list(MODELS))
def test_delegate_int8_conv_equals_xnnpack(int8_models, name):
    """Outputs byte-identical to the stock interpreter's XNNPACK run for every int8_conv setting and
    path, 1 and 2 threads, with the node claimed exactly where the option says (kernel_profile);
    within one quantization step of TFLite's own kernels; again after resizing the input (batch 2,
    other sizes: 'same' padding recomputed)."""
    content = int8_models(name)
    cin, _, _, _, _, _, act, hw, _, per_tensor = MODELS[name]
    activation, scale_count, input_count = conv_operator(content)
    assert activation == ACTIVATION_CODES[act]
    assert (scale_count == 1) == per_tensor
    assert input_count == 3  # the converter adds a zero bias even for use_bias=False
    rng = np.random.default_rng(len(name))
    input_quant, output_quant = _quantization(_stock(content, 1))
    out_scale, out_zp = output_quant
    for shape in (None, (2, hw[0] + 3, hw[1] + 1, cin), (1, hw[0] - 1, hw[1] + 2, cin)):
        x = _on_grid_input(rng, shape or (1,) + hw + (cin,), input_quant)
        stock = {t: _invoke(_stock(content, t, shape=shape), x) for t in (1, 2)}
        np.testing.assert_array_equal(stock[1], stock[2])
        raw = stock[1] / out_scale + out_zp
        codes = np.round(raw)
        assert np.abs(raw - codes).max() < 1e-3 and len(np.unique(codes)) > 20
        reference = _invoke(_stock(content, 1, reference=True, shape=shape), x)
        assert np.abs(np.round(reference / out_scale) + out_zp - codes).max() <= 1
        for options, claimed, path in _delegate_configs(cin):
            for threads in (1, 2):
                got, entries = _run_delegate(content, x, threads, shape=shape, **options)
                where = f"{name} {options} threads={threads} shape={shape}"
                assert got.dtype == np.float32 and got.shape == stock[1].shape, where
                if not np.array_equal(got, stock[threads]):
                    steps = np.abs(np.round(got / out_scale) - np.round(stock[threads] / out_scale))
                    raise AssertionError(f"{where}: {int((steps > 0).sum())} of {got.size} outputs differ from "
                                         f"XNNPACK's, by up to {steps.max()} steps")
                if claimed:
                    assert len(entries) == 1 and entries[0]["invocations"] == 1, (where, entries)
                    assert entries[0]["path"] == path, (where, entries)
                else:
                    assert entries == [], (where, entries)
    # tf.lite's interpreter takes the same plugin.
    x = _on_grid_input(rng, (1,) + hw + (cin,), input_quant)
    got, entries = _run_delegate(content, x, 1, backend="tflite", int8_conv="all")
    np.testing.assert_array_equal(got, _invoke(_stock(content, 1), x))
    assert len(entries) == 1 and entries[0]["invocations"] == 1


def test_delegate_int8_conv_kernel_runs_on_every_invoke(int8_models):
    """One interpreter invoked on several inputs: each result equals XNNPACK's, the profile counts
    every invoke."""
    from ai_edge_litert.interpreter import Interpreter
    from n2uq_tf.tflite import delegate as n2d

    content = int8_models("rgb_valid_relu6")
    input_quant, _ = _quantization(_stock(content, 1))
    plugin = n2d.load_delegate("litert", int8_conv="all")
    interpreter = _prepared(Interpreter(model_content=content, num_threads=2, experimental_delegates=[plugin]), None)
    stock = _stock(content, 2)
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = _on_grid_input(rng, (1, 13, 15, 3), input_quant)
        np.testing.assert_array_equal(_invoke(interpreter, x), _invoke(stock, x))
    entries = [e for e in n2d.kernel_profile(plugin) if e["op"] == "CONV_2D (int8)"]
    assert len(entries) == 1 and entries[0]["invocations"] == 3


def test_delegate_int8_conv_option_is_validated(int8_models):
    from n2uq_tf.tflite import delegate as n2d

    content = int8_models("rgb_valid_relu6")
    with pytest.raises(ValueError, match="int8_conv must be off, auto or all, got 'sometimes'"):
        n2d.Interpreter(model_content=content, delegate_options={"int8_conv": "sometimes"})
    with pytest.raises(ValueError, match=r"unknown option 'int8conv' \(known: .*int8_conv"):
        n2d.Interpreter(model_content=content, delegate_options={"int8conv": "all"})
