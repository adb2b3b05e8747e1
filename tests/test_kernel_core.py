"""The bit-serial kernel core (tflite_tools/core via n2uq_tf.tflite._core) against ops.py.

Codes come from ops.activation_levels / ops.weight_codes; the reference is an exact
int64 NumPy conv on those codes followed by the float32 affine map. Every (ISA, conv path)
pair the CPU runs (bitserial, dot, lut, amx where offered; forced, so each is tested whatever selection
would pick) and thread counts 1-3 must give identical results. The C++ self-test runs
under AddressSanitizer + UBSan (also with CPU features masked, for the fallback kernels),
and under qemu-aarch64 (NEON, SDOT) when the cross toolchain is installed.
"""

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from n2uq_tf import _native, ops
from n2uq_tf.tflite import _core

import native_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_DIR = os.path.join(ROOT, "tflite_tools", "core")
SELFTEST = os.path.join(ROOT, "tflite_tools", "tests", "core_selftest.cc")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def isas():
    return _core.supported_isas()


@pytest.fixture(scope="module")
def combos():
    """Every (isa, path) pair this CPU runs."""
    return _core.supported_combinations()


def quantizer_params(rng, bits):
    n = 2 ** bits - 1
    start = np.float32(rng.uniform(-0.6, 0.3))
    intervals = rng.uniform(0.05, 0.6, n).astype(np.float32)
    intervals[rng.random(n) < 0.1] = 0.0  # floored to 1e-3 by ops.segment_bounds
    beta1 = np.float32(rng.uniform(0.5, 1.5))
    beta2 = np.float32(rng.uniform(0.5, 1.5))
    thresholds = ops.segment_bounds(start, intervals)[2].numpy()
    return start, intervals, beta1, beta2, thresholds


def activation_codes(x, params, bits):
    start, intervals, beta1, _, _ = params
    return ops.activation_levels(x, start, intervals, beta1, bits).numpy().astype(np.uint8)


def conv_output_size(size, kernel, stride, dilation, pad_a, pad_b):
    return (size + pad_a + pad_b - (kernel - 1) * dilation - 1) // stride + 1


def reference_conv(m, k, strides, dilations, pads, weight_bits):
    """Exact 2 * S_mk - n_w * S_m in int64. m: [N, H, W, C] codes, k: [OC, KH, KW, C] codes."""
    top, bottom, left, right = pads
    (sh, sw), (dh, dw) = strides, dilations
    n, h, w, _ = m.shape
    oc, kh, kw, _ = k.shape
    oh = conv_output_size(h, kh, sh, dh, top, bottom)
    ow = conv_output_size(w, kw, sw, dw, left, right)
    padded = np.pad(m.astype(np.int64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    smk = np.zeros((n, oh, ow, oc), np.int64)
    sm = np.zeros((n, oh, ow, 1), np.int64)
    for y in range(kh):
        for x in range(kw):
            patch = padded[:, y * dh:y * dh + (oh - 1) * sh + 1:sh, x * dw:x * dw + (ow - 1) * sw + 1:sw, :]
            smk += patch @ k[:, y, x, :].astype(np.int64).T
            sm += patch.sum(axis=-1, keepdims=True)
    return 2 * smk - (2 ** weight_bits - 1) * sm


def affine(acc, multiplier, bias):
    return acc.astype(np.float32) * multiplier + bias  # float32 multiply, then add: no FMA


def random_conv_case(seed):
    rng = np.random.default_rng(seed)
    channels = int(rng.choice([1, 3, 63, 64, 65, 130]))
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    sh, sw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    pads = tuple(int(rng.integers(0, e + 1)) for e in ((kh - 1) * dh, (kh - 1) * dh, (kw - 1) * dw, (kw - 1) * dw))
    h = int(rng.integers(1, 7)) + max(0, (kh - 1) * dh - pads[0] - pads[1])
    w = int(rng.integers(1, 12)) + max(0, (kw - 1) * dw - pads[2] - pads[3])
    return dict(rng=rng, batch=int(rng.integers(1, 3)), h=h, w=w, channels=channels,
                out_channels=int(rng.choice([1, 5, 17, 64, 70])), kernel=(kh, kw), strides=(sh, sw),
                dilations=(dh, dw), pads=pads, act_bits=int(rng.integers(1, 5)), weight_bits=int(rng.integers(1, 5)))


@pytest.mark.parametrize("seed", range(24))
def test_conv2d_matches_ops_reference(seed, combos):
    case = random_conv_case(seed)
    rng, a_bits, w_bits = case["rng"], case["act_bits"], case["weight_bits"]
    params = quantizer_params(rng, a_bits)
    x = rng.normal(0.4, 0.8, (case["batch"], case["h"], case["w"], case["channels"])).astype(np.float32)
    m = activation_codes(x, params, a_bits)
    kernel = rng.normal(0, 1, case["kernel"] + (case["channels"], case["out_channels"])).astype(np.float32)
    codes, alpha = ops.weight_codes(kernel, w_bits)
    k = np.transpose(codes.numpy(), (3, 0, 1, 2)).astype(np.uint8)  # [OC, KH, KW, IC]
    alpha = alpha.numpy().reshape(-1)
    delta_a = ops.level_step(a_bits)
    bn_scale = rng.uniform(0.5, 2.0, case["out_channels"]).astype(np.float32)
    multiplier = (bn_scale * params[3] * delta_a * alpha / (2 ** w_bits - 1)).astype(np.float32)
    bias = rng.normal(0, 1, case["out_channels"]).astype(np.float32)

    expected = reference_conv(m, k, case["strides"], case["dilations"], case["pads"], w_bits)
    assert np.abs(expected).max(initial=0) < 2 ** 31
    expected_float = affine(expected, multiplier, bias)
    packed_x = _core.pack_bitplanes(m, a_bits)
    packed_k = _core.pack_bitplanes(k, w_bits)
    for isa, path in combos:
        for threads in (1, 2, 3):
            out_f, out_i = _core.conv2d(packed_x, packed_k, case["channels"], a_bits, w_bits, multiplier, bias,
                                        strides=case["strides"], dilations=case["dilations"], padding=case["pads"],
                                        output="both", isa=isa, path=path, num_threads=threads)
            np.testing.assert_array_equal(out_i, expected, err_msg=f"isa={isa} path={path} threads={threads} {case}")
            np.testing.assert_array_equal(out_f.view(np.int32), expected_float.view(np.int32),
                                          err_msg=f"isa={isa} path={path} threads={threads}")


def _check_conv_codes(m, k, a_bits, w_bits, strides, dilations, pads, combos, rng, threads=(1, 2)):
    expected = reference_conv(m, k, strides, dilations, pads, w_bits)
    out_channels = k.shape[0]
    multiplier = rng.normal(0, 0.1, out_channels).astype(np.float32)
    bias = rng.normal(0, 1, out_channels).astype(np.float32)
    packed_x, packed_k = _core.pack_bitplanes(m, a_bits), _core.pack_bitplanes(k, w_bits)
    for isa, path in combos:
        for t in threads:
            out_f, out_i = _core.conv2d(packed_x, packed_k, m.shape[-1], a_bits, w_bits, multiplier, bias,
                                        strides=strides, dilations=dilations, padding=pads, output="both", isa=isa,
                                        path=path, num_threads=t)
            np.testing.assert_array_equal(out_i, expected, err_msg=f"isa={isa} path={path} threads={t}")
            np.testing.assert_array_equal(out_f, affine(expected, multiplier, bias), err_msg=f"isa={isa} path={path}")


@pytest.mark.parametrize("channels, out_channels", [(512, 16), (577, 13), (1024, 8), (70, 130)])
def test_conv2d_wide_channels(channels, out_channels, combos):
    """Words >= 8: the AVX-512 weight regrouping transposes 8x8 blocks (plus word and channel tails)."""
    rng = np.random.default_rng(channels + out_channels)
    for a_bits, w_bits in ((1, 1), (2, 2), (3, 1), (4, 4)):
        m = rng.integers(0, 2 ** a_bits, (1, 3, 4, channels)).astype(np.uint8)
        k = rng.integers(0, 2 ** w_bits, (out_channels, 3, 3, channels)).astype(np.uint8)
        _check_conv_codes(m, k, a_bits, w_bits, (1, 1), (1, 1), (1, 1, 1, 1), combos, rng)


@pytest.mark.parametrize("a_bits, w_bits", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 1)])
def test_conv2d_dot_winograd_form(a_bits, w_bits, combos):
    """3x3 stride-1 convs on the dot path (every ISA) run in Winograd form (2x2 output tiles, input
    transforms in int8 lanes, weights U(k - 2^(w-1)) as int8): exact at the ends of every range
    (all codes at the top level with zero checkerboards, which drive the transformed input to
    -2M and 4M, weights all 0 or all n_w: |U| = 9 * 2^(w-1)), on partial tiles (odd outputs),
    asymmetric padding, channel tails (not a multiple of 4 or 64), partial output-channel blocks,
    batch 2, and each chunk width the plan picks (1-3 weight vectors)."""
    rng = np.random.default_rng(40 + 10 * a_bits + w_bits)
    dot = [(isa, path) for isa, path in combos if path == "dot"]
    top_m, top_k = 2 ** a_bits - 1, 2 ** w_bits - 1
    for n, h, w, c, oc, pads in ((2, 5, 7, 70, 13, (1, 1, 1, 1)), (1, 6, 9, 131, 64, (0, 2, 1, 0)),
                                 (1, 4, 4, 8, 48, (1, 1, 1, 1)), (1, 3, 5, 5, 37, (2, 0, 0, 2))):
        m = rng.integers(0, top_m + 1, (n, h, w, c)).astype(np.uint8)
        k = rng.integers(0, top_k + 1, (oc, 3, 3, c)).astype(np.uint8)
        _check_conv_codes(m, k, a_bits, w_bits, (1, 1), (1, 1), pads, dot, rng)
        checker = ((np.indices((h, w)).sum(0) % 2) * top_m).astype(np.uint8)[None, :, :, None]
        for m_edge in (np.full((n, h, w, c), top_m, np.uint8), np.broadcast_to(checker, (n, h, w, c)).copy()):
            for k_edge in (np.zeros((oc, 3, 3, c), np.uint8), np.full((oc, 3, 3, c), top_k, np.uint8)):
                _check_conv_codes(m_edge, k_edge, a_bits, w_bits, (1, 1), (1, 1), pads, dot, rng, threads=(2,))


@pytest.mark.parametrize("a_bits, w_bits", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 1)])
def test_conv2d_dot_winograd_stride2_form(a_bits, w_bits, combos):
    """3x3 stride-2 convs on the dot path (every ISA) run in a polyphase Winograd form: 2x2 output
    tiles of 5x5 input codes d, V = T d T^T with T d = (d0 - d2, d2, d4 - d2, d1, d3), weights
    U = G w' G^T with G w = (w0, w0 + w2, w2, w1, w1), Y = A (U . V) A^T. Exact at the ends of
    every range: checkerboards of zero and top codes (whose differences of differences reach -2M
    and 2M), all codes at the top level, weights all 0 or all n_w (|U| = 4 n_w, w' = -n_w or
    n_w); on partial tiles (odd outputs, inputs that end inside a tile), asymmetric and zero
    padding, channel tails, partial output-channel blocks, batch 2, and the chunk widths the plan
    picks. A plain-NumPy conv of the codes is the reference."""
    rng = np.random.default_rng(90 + 10 * a_bits + w_bits)
    dot = [(isa, path) for isa, path in combos if path == "dot"]
    top_m, top_k = 2 ** a_bits - 1, 2 ** w_bits - 1
    for n, h, w, c, oc, pads in ((2, 5, 7, 70, 13, (1, 1, 1, 1)), (1, 6, 9, 131, 64, (0, 2, 1, 0)),
                                 (1, 4, 4, 8, 48, (1, 1, 1, 1)), (1, 3, 5, 5, 37, (2, 0, 0, 2)),
                                 (1, 8, 8, 64, 16, (0, 1, 0, 1)), (1, 9, 11, 3, 5, (0, 0, 0, 0))):
        m = rng.integers(0, top_m + 1, (n, h, w, c)).astype(np.uint8)
        k = rng.integers(0, top_k + 1, (oc, 3, 3, c)).astype(np.uint8)
        _check_conv_codes(m, k, a_bits, w_bits, (2, 2), (1, 1), pads, dot, rng)
        checker = ((np.indices((h, w)).sum(0) % 2) * top_m).astype(np.uint8)[None, :, :, None]
        stripes = ((np.indices((h, w))[0] % 2) * top_m).astype(np.uint8)[None, :, :, None]
        for m_edge in (np.full((n, h, w, c), top_m, np.uint8), np.broadcast_to(checker, (n, h, w, c)).copy(),
                       np.broadcast_to(top_m - checker, (n, h, w, c)).copy(),
                       np.broadcast_to(stripes, (n, h, w, c)).copy()):
            for k_edge in (np.zeros((oc, 3, 3, c), np.uint8), np.full((oc, 3, 3, c), top_k, np.uint8)):
                _check_conv_codes(m_edge, k_edge, a_bits, w_bits, (2, 2), (1, 1), pads, dot, rng, threads=(2,))


def _winograd_shapes(a_bits, w_bits, combos):
    """Every dot ISA's Winograd forms (stride 1, and the polyphase form of stride 2): channels 3
    (one partial quad), 64 (one word) and 80 (a word tail), output channels 5-40 (partial and
    several vectors of 4, 8 and 16 lanes, so every chunk width), odd heights and widths (partial
    tiles), batch 2, 1 and 2 threads."""
    rng = np.random.default_rng(500 + 10 * a_bits + w_bits)
    dot = [(isa, path) for isa, path in combos if path == "dot"]
    for c in (3, 64, 80):
        for oc, (h, w), pads in ((5, (5, 7), (1, 1, 1, 1)), (8, (3, 9), (0, 2, 1, 1)),
                                 (16, (7, 5), (1, 1, 2, 0)), (40, (9, 3), (1, 1, 1, 1))):
            m = rng.integers(0, 2 ** a_bits, (2, h, w, c)).astype(np.uint8)
            k = rng.integers(0, 2 ** w_bits, (oc, 3, 3, c)).astype(np.uint8)
            for strides in ((1, 1), (2, 2)):
                _check_conv_codes(m, k, a_bits, w_bits, strides, (1, 1), pads, dot, rng)
    return dot


@pytest.mark.parametrize("a_bits", [1, 2, 3, 4])
def test_conv2d_dot_winograd_every_isa(a_bits, combos):
    for w_bits in (1, 2, 3, 4):
        dot = _winograd_shapes(a_bits, w_bits, combos)
    assert ("portable", "dot") in dot


def test_conv2d_dot_winograd_avx2_without_vnni():
    """The VPMADDUBSW build of the AVX2 dot kernels in Winograd form (int16 pair sums of V8 x U)."""
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from n2uq_tf.tflite import _core\n"
        "import test_kernel_core as t\n"
        "assert 'avx_vnni' not in _core.cpu_features()\n"
        "for a in (1, 2, 3, 4):\n"
        "    for w in (1, 2, 3, 4):\n"
        "        dot = t._winograd_shapes(a, w, _core.supported_combinations())\n"
        "assert ('avx2', 'dot') in dot or 'avx2' not in _core.supported_isas(), dot\n"
        "print('ok', dot)\n") % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, N2UQ_CPU_DISABLE="avx_vnni", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ok" in result.stdout


@pytest.mark.parametrize("width", [1, 7, 14, 23, 28, 56, 61, 300, 530])
def test_conv2d_row_blocking(width, combos):
    """Rows split into pixel blocks of every size up to the register limit (and rows longer than
    one 256-column S_m segment), for every bit pair."""
    rng = np.random.default_rng(width)
    for a_bits in (1, 2, 3, 4):
        for w_bits in (1, 2, 3, 4):
            m = rng.integers(0, 2 ** a_bits, (1, 2, width, 70)).astype(np.uint8)
            k = rng.integers(0, 2 ** w_bits, (9, 3, 3, 70)).astype(np.uint8)
            _check_conv_codes(m, k, a_bits, w_bits, (1, 1), (1, 1), (1, 1, 1, 1), combos, rng, threads=(1,))
    m = rng.integers(0, 4, (2, 3, width, 64)).astype(np.uint8)
    k = rng.integers(0, 4, (24, 3, 3, 64)).astype(np.uint8)
    _check_conv_codes(m, k, 2, 2, (1, 2), (1, 1), (1, 1, 1, 1), combos, rng)


STAGING_CASES = [
    # (batch, h, w, channels, out_channels, kernel, strides, dilations, pads)
    (1, 12, 12, 64, 32, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),  # ResNet downsample: even rows, phase 0
    (2, 11, 13, 70, 17, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),  # odd sizes: the last row / column read
    (1, 10, 9, 130, 20, (1, 1), (3, 3), (1, 1), (0, 0, 0, 0)),
    (2, 9, 10, 65, 40, (1, 1), (3, 2), (1, 1), (0, 0, 0, 0)),
    (1, 12, 12, 64, 48, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),  # ResNet stride-2 3x3
    (2, 13, 11, 63, 33, (3, 3), (2, 2), (1, 1), (0, 1, 1, 0)),
    (1, 14, 15, 3, 9, (3, 3), (3, 3), (1, 1), (1, 2, 2, 1)),
    (2, 11, 12, 70, 21, (2, 2), (3, 3), (2, 2), (1, 0, 2, 1)),  # taps on phases 0 and 2 of 3
    (1, 13, 14, 64, 16, (2, 3), (4, 4), (2, 2), (0, 2, 1, 3)),  # phases 0 and 2 of 4; rows skipped
    (2, 10, 10, 65, 18, (3, 1), (2, 3), (2, 1), (2, 2, 0, 0)),  # dilation 2 at stride 2: even rows only
    (1, 9, 9, 129, 64, (1, 3), (3, 2), (1, 2), (0, 0, 2, 1)),
]


@pytest.mark.parametrize("case", range(len(STAGING_CASES)))
def test_conv2d_strided_staging(case, combos):
    """Strided convs stage only the input rows and column phases some tap reads; the rows and
    phases they skip hold whatever an earlier (larger, all-top-level) conv left in the per-thread
    scratch, so any read of them would show in the result."""
    n, h, w, c, oc, kernel, strides, dilations, pads = STAGING_CASES[case]
    rng = np.random.default_rng(100 + case)
    for a_bits, w_bits in ((2, 2), (4, 4), (1, 3), (3, 1)):
        for isa, path in combos:
            for t in (1, 2):  # fill every thread's scratch with nonzero codes first
                top = np.full((2, h + 4, w + 4, c), 2 ** a_bits - 1, np.uint8)
                _core.conv2d(_core.pack_bitplanes(top, a_bits), _core.pack_bitplanes(
                    np.ones((4, 1, 1, c), np.uint8), 1), c, a_bits, 1, strides=(1, 1), output="int32", isa=isa,
                    path=path, num_threads=t)
        m = rng.integers(0, 2 ** a_bits, (n, h, w, c)).astype(np.uint8)
        k = rng.integers(0, 2 ** w_bits, (oc,) + kernel + (c,)).astype(np.uint8)
        _check_conv_codes(m, k, a_bits, w_bits, strides, dilations, pads, combos, rng)


def test_conv2d_equals_dequantized_float_conv():
    """The integer form is the exact product of ops.py's quantized activations and weights."""
    rng = np.random.default_rng(7)
    a_bits, w_bits, channels, out_channels = 2, 3, 70, 9
    start, intervals, beta1, beta2, _ = params = quantizer_params(rng, a_bits)
    x = rng.normal(0.4, 0.8, (2, 7, 6, channels)).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 3, channels, out_channels)).astype(np.float32)
    xq = ops.n2uq_quantize(x, start, intervals, beta1, beta2, a_bits, implementation="reference")
    wq = ops.quantize_weights(kernel, w_bits)
    want = tf.nn.conv2d(tf.cast(xq, tf.float64), tf.cast(wq, tf.float64), strides=[1, 2, 1, 1],
                        padding=[[0, 0], [1, 1], [1, 1], [0, 0]]).numpy()
    codes, alpha = ops.weight_codes(kernel, w_bits)
    multiplier = (beta2 * ops.level_step(a_bits) * alpha.numpy().reshape(-1) / (2 ** w_bits - 1)).astype(np.float32)
    got = _core.conv2d_bitserial(_core.pack_bitplanes(activation_codes(x, params, a_bits), a_bits),
                                 _core.pack_bitplanes(np.transpose(codes.numpy(), (3, 0, 1, 2)), w_bits), channels,
                                 a_bits, w_bits, multiplier, None, strides=(2, 1), padding=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_fully_connected(seed, combos):
    rng = np.random.default_rng(100 + seed)
    batch, features, outputs = int(rng.integers(1, 10)), int(rng.choice([1, 63, 64, 65, 130, 300])), \
        int(rng.integers(1, 40))
    a_bits, w_bits = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    m = rng.integers(0, 2 ** a_bits, (batch, features)).astype(np.uint8)
    k = rng.integers(0, 2 ** w_bits, (outputs, features)).astype(np.uint8)
    multiplier = rng.normal(0, 0.1, outputs).astype(np.float32)
    bias = rng.normal(0, 1, outputs).astype(np.float32)
    acc = 2 * (m.astype(np.int64) @ k.astype(np.int64).T) - (2 ** w_bits - 1) * m.astype(np.int64).sum(-1,
                                                                                                       keepdims=True)
    for isa, path in combos:
        for threads in (1, 3):
            out_f, out_i = _core.fully_connected(_core.pack_bitplanes(m, a_bits), _core.pack_bitplanes(k, w_bits),
                                                 features, a_bits, w_bits, multiplier, bias, output="both", isa=isa,
                                                 path=path, num_threads=threads)
            np.testing.assert_array_equal(out_i, acc, err_msg=f"isa={isa} path={path}")
            np.testing.assert_array_equal(out_f, affine(acc, multiplier, bias))


@pytest.mark.parametrize("seed", range(8))
def test_depthwise_matches_ops_reference(seed, isas):
    rng = np.random.default_rng(200 + seed)
    channels, depth_multiplier = int(rng.choice([1, 3, 17, 64, 300])), int(rng.integers(1, 3))
    a_bits, w_bits = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kh, kw, sh, sw, dh, dw = (int(v) for v in rng.integers(1, 4, 2).tolist() + rng.integers(1, 3, 4).tolist())
    pads = tuple(int(rng.integers(0, e + 1)) for e in ((kh - 1) * dh, (kh - 1) * dh, (kw - 1) * dw, (kw - 1) * dw))
    h = int(rng.integers(1, 6)) + max(0, (kh - 1) * dh - pads[0] - pads[1])
    w = int(rng.integers(1, 9)) + max(0, (kw - 1) * dw - pads[2] - pads[3])
    params = quantizer_params(rng, a_bits)
    m = activation_codes(rng.normal(0.4, 0.8, (2, h, w, channels)).astype(np.float32), params, a_bits)
    kernel = rng.normal(0, 1, (kh, kw, channels, depth_multiplier)).astype(np.float32)
    codes = ops.weight_codes(kernel, w_bits, channel_axis=(-2, -1))[0].numpy().astype(np.uint8)
    out_channels = channels * depth_multiplier
    # Output channel c * M + j sees input channel c with kernel [:, :, c, j]: a one-channel
    # dense conv per output channel.
    m_full = np.repeat(m, depth_multiplier, axis=-1)
    flat = codes.reshape(kh, kw, out_channels)
    expected = np.concatenate([
        reference_conv(m_full[..., o:o + 1], flat[None, :, :, o:o + 1], (sh, sw), (dh, dw), pads, w_bits)
        for o in range(out_channels)], axis=-1)
    multiplier = rng.normal(0, 0.1, out_channels).astype(np.float32)
    bias = rng.normal(0, 1, out_channels).astype(np.float32)
    for isa in isas:
        for threads in (1, 2):
            out_f, out_i = _core.depthwise_conv2d(m, codes, a_bits, w_bits, multiplier, bias, strides=(sh, sw),
                                                  dilations=(dh, dw), padding=pads, output="both", isa=isa,
                                                  num_threads=threads)
            np.testing.assert_array_equal(out_i, expected, err_msg=f"isa={isa}")
            np.testing.assert_array_equal(out_f, affine(expected, multiplier, bias))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantize_and_pack_equals_activation_levels(bits, isas):
    rng = np.random.default_rng(bits)
    n = 2 ** bits - 1
    start = np.float32(-0.37)  # negative start
    intervals = rng.uniform(0.05, 0.5, n).astype(np.float32)
    for beta1 in (np.float32(1.0), np.float32(0.5), np.float32(1.37)):
        thresholds = ops.segment_bounds(start, intervals)[2].numpy()
        x = rng.normal(0.3, 1.0, (3, 5, 130)).astype(np.float32)
        # Values whose product with beta1 lands exactly on a threshold (exact for beta1 = 1, 0.5),
        # just beside it, and non-finite values.
        at = (thresholds / beta1).astype(np.float32)
        special = np.concatenate([at, np.nextafter(at, np.inf), np.nextafter(at, -np.inf),
                                  [np.nan, np.inf, -np.inf, 0.0, -0.0, start]]).astype(np.float32)
        x.reshape(-1)[:special.size] = special
        x.reshape(-1)[200:200 + special.size] = special
        want = ops.activation_levels(x, start, intervals, beta1, bits).numpy()
        if beta1 != np.float32(1.37):
            assert np.any(x * beta1 == thresholds[0])  # the exact-threshold case is really exercised
        for isa in isas:
            codes = _core.quantize_codes(x, thresholds, beta1, bits, isa=isa, num_threads=2)
            np.testing.assert_array_equal(codes, want)
            packed = _core.quantize_and_pack(x, thresholds, beta1, bits, isa=isa, num_threads=3)
            np.testing.assert_array_equal(packed, _core.pack_bitplanes(want, bits))
            np.testing.assert_array_equal(_core.unpack_bitplanes(packed, 130), want)


def numpy_codes(x, thresholds, beta1):
    """#{i : float32(x * beta1) > thresholds[i]} in NumPy (any threshold order; NaN compares false)."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.asarray(x, np.float32) * np.float32(beta1)
        return (scaled[..., None] > np.asarray(thresholds, np.float32)).sum(-1).astype(np.uint8)


def numpy_pack(codes, bits):
    """[..., C] codes -> uint64 [..., bits, ceil(C / 64)], channel c in bit c % 64 of word c // 64."""
    channels = codes.shape[-1]
    words = -(-channels // 64)
    padded = np.zeros(codes.shape[:-1] + (words * 64,), np.uint8)
    padded[..., :channels] = codes
    planes = np.stack([(padded >> b) & 1 for b in range(bits)], axis=-2)
    packed = np.packbits(planes, axis=-1, bitorder="little")
    return packed.view("<u8").astype(np.uint64)


def special_values(thresholds, beta1):
    """Values whose product with beta1 is exactly a threshold (where beta1 allows), beside it,
    signed zeros, infinities, NaN and denormals."""
    t = np.asarray(thresholds, np.float32)
    finite = t[np.isfinite(t)]
    at = finite / np.float32(beta1) if beta1 != 0 else finite
    tiny = np.float32(1e-45)
    return np.concatenate([at, np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf)),
                           finite, [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, np.float32(3e-39),
                                    np.float32(-3e-39), np.float32(1.17e-38), np.float32(3e38), np.float32(-3e38)]
                           ]).astype(np.float32)


def quantize_inputs(rng, positions, channels, thresholds, beta1):
    x = rng.normal(0.2, 1.0, (positions, channels)).astype(np.float32)
    special = special_values(thresholds, beta1)
    flat = x.reshape(-1)
    # Sprinkle the special values at random places (several copies), so that every lane
    # of a vector and the channel tails see them.
    for _ in range(3):
        where = rng.choice(flat.size, size=min(flat.size, special.size), replace=False)
        flat[where] = special[:where.size]
        special = rng.permutation(special)
    return x


THRESHOLD_KINDS = ["sorted", "unsorted", "duplicates", "nonfinite"]


def threshold_table(rng, bits, kind):
    n = 2 ** bits - 1
    t = np.sort(rng.uniform(-1.0, 1.5, n)).astype(np.float32)
    if kind == "unsorted":
        t = rng.permutation(t)
    elif kind == "duplicates":
        t = np.sort(rng.choice(t, n)).astype(np.float32)  # repeated values
        t = rng.permutation(t) if bits > 1 else t
        t[rng.random(n) < 0.3] = 0.0
        if n > 1:
            t[-1] = -0.0  # equal to +0.0 in the comparison
    elif kind == "nonfinite":
        choices = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45], np.float32)
        mask = rng.random(n) < 0.5
        t[mask] = rng.choice(choices, int(mask.sum()))
        t = rng.permutation(t)
    return t


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", THRESHOLD_KINDS)
def test_quantize_and_pack_every_isa_bit_exact(bits, kind, isas):
    """Every ISA path and thread count against a NumPy count + packer, bit for bit: channel
    counts around the 16 / 8 lane vectors and 64-channel words, thresholds in any order with
    duplicates, signed zeros, NaN and infinities, x with exact-threshold products, NaN,
    infinities and denormals, beta1 positive, negative and zero."""
    rng = np.random.default_rng(1000 * bits + THRESHOLD_KINDS.index(kind))
    for channels in (1, 15, 16, 17, 63, 64, 65, 130, 1000):
        thresholds = threshold_table(rng, bits, kind)
        for beta1 in (np.float32(0.5), np.float32(1.0), np.float32(rng.uniform(0.3, 2.0)), np.float32(-0.75),
                      np.float32(0.0)):
            positions = int(rng.integers(1, 6)) if channels >= 130 else int(rng.integers(1, 40))
            x = quantize_inputs(rng, positions, channels, thresholds, beta1)
            want = numpy_codes(x, thresholds, beta1)
            want_packed = numpy_pack(want, bits)
            for isa in isas:
                for threads in (1, 2, 3):
                    label = f"isa={isa} threads={threads} C={channels} beta1={beta1} t={thresholds}"
                    packed = _core.quantize_and_pack(x, thresholds, beta1, bits, isa=isa, num_threads=threads)
                    np.testing.assert_array_equal(packed, want_packed, err_msg=label)
                    codes = _core.quantize_codes(x, thresholds, beta1, bits, isa=isa, num_threads=threads)
                    np.testing.assert_array_equal(codes, want, err_msg=label)


@pytest.mark.parametrize("count", [1, 7, 8, 9, 15, 16, 17, 31, 33, 1000])
def test_quantize_codes_lengths(count, isas):
    """Flat lengths around the vector widths (the codes path has its own tails)."""
    rng = np.random.default_rng(count)
    for bits in (1, 2, 3, 4):
        thresholds = threshold_table(rng, bits, "unsorted")
        x = quantize_inputs(rng, 1, count, thresholds, np.float32(1.0)).reshape(-1)
        want = numpy_codes(x, thresholds, 1.0)
        for isa in isas:
            np.testing.assert_array_equal(_core.quantize_codes(x, thresholds, 1.0, bits, isa=isa), want,
                                          err_msg=f"isa={isa} bits={bits}")


def test_quantize_large_layer_threads(isas):
    """A layer large enough to be split into several tasks: identical for 1, 2 and 3 threads."""
    rng = np.random.default_rng(5)
    for bits in (1, 2, 4):
        thresholds = threshold_table(rng, bits, "sorted")
        x = quantize_inputs(rng, 56 * 56, 64, thresholds, np.float32(0.5)).reshape(1, 56, 56, 64)
        want = numpy_codes(x, thresholds, 0.5)
        want_packed = numpy_pack(want, bits)
        for isa in isas:
            for threads in (1, 2, 3):
                np.testing.assert_array_equal(
                    _core.quantize_and_pack(x, thresholds, 0.5, bits, isa=isa, num_threads=threads), want_packed)
                np.testing.assert_array_equal(
                    _core.quantize_codes(x, thresholds, 0.5, bits, isa=isa, num_threads=threads), want)


def test_numpy_pack_matches_core_pack():
    rng = np.random.default_rng(9)
    for channels in (1, 64, 65, 130):
        codes = rng.integers(0, 16, (3, channels)).astype(np.uint8)
        np.testing.assert_array_equal(numpy_pack(codes, 4), _core.pack_bitplanes(codes, 4))


def test_pack_bitplanes_layout():
    codes = np.zeros((2, 70), np.uint8)
    codes[0, 0] = 3
    codes[0, 65] = 2
    codes[1, 63] = 1
    packed = _core.pack_bitplanes(codes, 2)
    assert packed.shape == (2, 2, 2) and packed.dtype == np.uint64
    assert packed[0, 0, 0] == 1 and packed[0, 1, 0] == 1  # code 3 at channel 0: both planes
    assert packed[0, 1, 1] == 2 and packed[0, 0, 1] == 0  # code 2 at channel 65: plane 1, bit 1 of word 1
    assert packed[1, 0, 0] == 1 << 63


def test_tail_bits_of_packed_input_are_ignored():
    rng = np.random.default_rng(3)
    m = rng.integers(0, 4, (1, 5, 5, 70)).astype(np.uint8)
    k = rng.integers(0, 4, (4, 3, 3, 70)).astype(np.uint8)
    x = _core.pack_bitplanes(m, 2)
    clean = _core.conv2d_bitserial(x, _core.pack_bitplanes(k, 2), 70, 2, 2, padding=1, output="int32")
    x[..., -1] |= np.uint64(0xFFFFFFFFFFFFFFC0)  # garbage above channel 70
    dirty = _core.conv2d_bitserial(x, _core.pack_bitplanes(k, 2), 70, 2, 2, padding=1, output="int32")
    np.testing.assert_array_equal(clean, dirty)


def test_isa_selection(monkeypatch, isas):
    assert "portable" in isas
    assert _core.isa("portable") == "portable"
    assert _core.isa() == isas[-1]
    monkeypatch.setenv("N2UQ_KERNEL_ISA", "portable")
    assert _core.isa() == "portable"
    monkeypatch.setenv("N2UQ_KERNEL_ISA", "sse9")
    with pytest.raises(_core.CoreError, match="N2UQ_KERNEL_ISA"):
        _core.isa()
    monkeypatch.delenv("N2UQ_KERNEL_ISA")
    for name in ("avx2", "avx512", "neon"):
        if name not in isas:
            with pytest.raises(_core.CoreError, match="not supported"):
                _core.isa(name)
    with pytest.raises(_core.CoreError, match="isa must be"):
        _core.isa("fast")


@pytest.mark.parametrize("a_bits, w_bits", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 1)])
def test_plan_runs_other_inputs_of_its_filter(a_bits, w_bits, combos):
    """A plan prepares the weights once (for its path) and runs any batch and input size."""
    rng = np.random.default_rng(10 * a_bits + w_bits)
    k = rng.integers(0, 2 ** w_bits, (37, 3, 3, 70)).astype(np.uint8)
    packed_k = _core.pack_bitplanes(k, w_bits)
    multiplier = rng.normal(0, 0.1, 37).astype(np.float32)
    bias = rng.normal(0, 1, 37).astype(np.float32)
    for isa, path in combos:
        plan = _core.ConvPlan(_core.conv_shape(1, 6, 9, 70, 37, 3, strides=(1, 2), padding=(1, 0, 2, 1),
                                               act_bits=a_bits, weight_bits=w_bits), packed_k, isa=isa, path=path)
        assert (plan.isa, plan.path) == (isa, path)
        for n, h, w in ((1, 6, 9), (2, 3, 17), (1, 11, 4)):
            m = rng.integers(0, 2 ** a_bits, (n, h, w, 70)).astype(np.uint8)
            shape = _core.conv_shape(n, h, w, 70, 37, 3, strides=(1, 2), padding=(1, 0, 2, 1), act_bits=a_bits,
                                     weight_bits=w_bits)
            expected = reference_conv(m, k, (1, 2), (1, 1), (1, 0, 2, 1), w_bits)
            out_f, out_i = plan.run(_core.pack_bitplanes(m, a_bits), multiplier, bias, shape=shape, output="both",
                                    num_threads=2)
            np.testing.assert_array_equal(out_i, expected, err_msg=f"isa={isa} path={path} input {n, h, w}")
            np.testing.assert_array_equal(out_f, affine(expected, multiplier, bias))
        other = _core.conv_shape(1, 6, 9, 70, 37, 3, strides=1, padding=1, act_bits=a_bits, weight_bits=w_bits)
        with pytest.raises(_core.CoreError, match="differs from the plan"):
            plan.run(np.zeros((1, 6, 9, a_bits, 2), np.uint64), shape=other)


def test_auto_path_is_one_the_cpu_runs_and_is_kept_per_shape(monkeypatch):
    monkeypatch.delenv("N2UQ_KERNEL_PATH", raising=False)
    rng = np.random.default_rng(5)
    k = _core.pack_bitplanes(rng.integers(0, 4, (64, 3, 3, 64)), 2)
    shape = _core.conv_shape(1, 14, 14, 64, 64, 3, padding=1, act_bits=2, weight_bits=2)
    chosen = {_core.ConvPlan(shape, k).path for _ in range(3)}
    assert len(chosen) == 1, "selection is measured once per shape and reused"
    assert chosen <= set(_core.supported_paths())


def test_auto_selection_times_each_form_and_logs_it():
    """With path=auto the plan times every path this CPU runs, and the dot path's direct form as a
    candidate of its own where the shape has a Winograd form (3x3 stride 1 and 2), not elsewhere;
    N2UQ_SELECT_LOG=1 prints the timings and the choice. The chosen plan is exact either way."""
    script = (
        "import numpy as np, sys; sys.path.insert(0, %r)\n"
        "from n2uq_tf.tflite import _core\n"
        "import test_kernel_core as t\n"
        "rng = np.random.default_rng(8)\n"
        "for kernel, strides in ((3, (2, 2)), (3, (1, 1)), (1, (2, 2))):\n"
        "    m = rng.integers(0, 4, (1, 9, 9, 70)).astype(np.uint8)\n"
        "    k = rng.integers(0, 4, (24, kernel, kernel, 70)).astype(np.uint8)\n"
        "    pads = (1, 1, 1, 1) if kernel == 3 else (0, 0, 0, 0)\n"
        "    t._check_conv_codes(m, k, 2, 2, strides, (1, 1), pads, [(_core.isa(), 'auto')], rng, threads=(1,))\n"
        "    print('case done', kernel, strides, file=sys.stderr, flush=True)\n"
    ) % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, N2UQ_SELECT_LOG="1", PYTHONPATH=ROOT)
    env.pop("N2UQ_KERNEL_PATH", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("n2uq path selection", "case done"))]
    if len(_core.supported_paths()) < 2 and "dot" not in _core.supported_paths():  # one candidate: nothing to time
        assert not [line for line in lines if line.startswith("n2uq path")], lines
        return
    assert [line[:14] for line in lines] == ["n2uq path sele", "case done 3 (2", "n2uq path sele", "case done 3 (1",
                                             "n2uq path sele", "case done 1 (2"], lines
    stride2, stride1, pointwise = lines[0], lines[2], lines[4]
    assert "3x3 /2" in stride2 and "3x3 /1" in stride1 and "1x1 /2" in pointwise
    for line in (stride2, stride1, pointwise):
        assert line.count("[chosen]") == 1, line
        for path in _core.supported_paths():
            assert f" {path} " in line, (path, line)
    has_dot = "dot" in _core.supported_paths()
    assert ("dot (direct form)" in stride2) == has_dot and ("dot (direct form)" in stride1) == has_dot
    assert "direct form" not in pointwise


_TRIAL_SCRIPT = """
import numpy as np, sys
sys.path.insert(0, %r)
from n2uq_tf.tflite import _core
import test_kernel_core as t
rng = np.random.default_rng(9)
m = rng.integers(0, 4, (1, 9, 9, 70)).astype(np.uint8)
k = rng.integers(0, 4, (24, 3, 3, 70)).astype(np.uint8)
x, w = _core.pack_bitplanes(m, 2), _core.pack_bitplanes(k, 2)
want = t.reference_conv(m, k, (2, 2), (1, 1), (1, 1, 1, 1), 2)
shape = _core.conv_shape(1, 9, 9, 70, 24, 3, strides=2, padding=1, act_bits=2, weight_bits=2)
first, second = _core.ConvPlan(shape, w), _core.ConvPlan(shape, w)
print("opened", first.on_trial, second.on_trial, file=sys.stderr, flush=True)
for plan in (first, second):
    for _ in range(_core.plan_trial_runs()):
        np.testing.assert_array_equal(plan.run(x, output="int32"), want)
    print("closed", plan.on_trial, plan.path, plan.form, file=sys.stderr, flush=True)
third = _core.ConvPlan(shape, w)
print("third", third.on_trial, third.path, third.form, file=sys.stderr, flush=True)
np.testing.assert_array_equal(third.run(x, output="int32"), want)
"""


def _run_trial_script(trial):
    env = dict(os.environ, N2UQ_SELECT_LOG="1", N2UQ_PLAN_TRIAL=trial, PYTHONPATH=ROOT)
    for name in ("N2UQ_KERNEL_PATH", "N2UQ_DOT_WINOGRAD", "N2UQ_AMX_COMPACT"):
        env.pop(name, None)
    script = _TRIAL_SCRIPT % os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [line for line in result.stderr.splitlines()
            if line.startswith(("n2uq path selection", "n2uq plan trial", "opened", "closed", "third"))]


def test_auto_plan_trial_keeps_the_faster_and_stays_exact():
    """path=auto keeps the selection's runner-up (N2UQ_PLAN_TRIAL=all: whatever its time) and the
    plan's first runs try the two in turn (blocks of 6 runs, winner, runner-up, winner, runner-up),
    every output exact; after each side's 10 timed runs (a block's first run is untimed), that is
    after plan_trial_runs() = 24 runs, the trial closes on the faster per pixel (the runner-up only
    where it won by 5%), as its N2UQ_SELECT_LOG line says, and the plan reports that path and form.
    A plan of the same shape made while a trial is open gets its own trial; one made after it
    closed takes the answer without one. N2UQ_PLAN_TRIAL=0: no trial."""
    assert _core.plan_trial_runs() == 2 * 2 * (5 + 1)
    lines = _run_trial_script("all")
    if len(_core.supported_paths()) < 2 and "dot" not in _core.supported_paths():  # one candidate: no trial
        assert not [line for line in lines if line.startswith("n2uq")] and "opened False False" in lines, lines
        return
    assert [line.split(",")[0].split()[0] for line in lines] == ["n2uq", "opened", "n2uq", "closed", "n2uq",
                                                                  "closed", "third"], lines
    selection, trials = lines[0], [lines[2], lines[4]]
    assert selection.count("[chosen]") == 1 and selection.count("[on trial]") == 1, selection
    assert lines[1] == "opened True True"
    for trial, closed in zip(trials, (lines[3], lines[5])):
        # "...: A 12.34 ns, B 23.45 ns per input pixel (best of 10 runs each): kept A"
        times, kept = trial.split(": ", 1)[1].split(" per input pixel (best of 10 runs each): kept ")
        (name_a, ns_a), (name_b, ns_b) = [part.rsplit(" ", 2)[:2] for part in times.split(", ")]
        assert kept == (name_b if float(ns_b) < 0.95 * float(ns_a) else name_a), trial
        _, on_trial, path, form = closed.split()
        assert on_trial == "False" and kept.split()[0] == path, (trial, closed)
        assert ("(compact weights)" in kept) == (form == "direct_compact"), (trial, closed)
    _, on_trial, path, form = lines[6].split()
    assert on_trial == "False" and (path, form) == tuple(lines[5].split()[2:]), lines
    off = _run_trial_script("0")
    assert [line.split()[0] for line in off] == ["n2uq", "opened", "closed", "closed", "third"], off
    assert "[on trial]" not in off[0] and off[1] == "opened False False", off


def test_plan_reports_its_form(monkeypatch):
    """ConvPlan.form (n2uq_conv_plan_form): the dot path's Winograd forms for 3x3 dilation-1 convs
    at stride 1 and 2, the direct form elsewhere, with N2UQ_DOT_WINOGRAD=0, and on every other
    path; plans of each form stay exact."""
    rng = np.random.default_rng(11)
    m = rng.integers(0, 4, (1, 9, 9, 70)).astype(np.uint8)
    x = _core.pack_bitplanes(m, 2)
    cases = [(3, (1, 1), (1, 1), "winograd"), (3, (2, 2), (1, 1), "winograd_stride2"), (1, (1, 1), (1, 1), "direct"),
             (3, (1, 1), (2, 2), "direct"), (3, (1, 2), (1, 1), "direct")]
    for kernel, strides, dilations, form in cases:
        k = rng.integers(0, 4, (24, kernel, kernel, 70)).astype(np.uint8)
        w = _core.pack_bitplanes(k, 2)
        pad = dilations[0] * (kernel - 1) // 2
        shape = _core.conv_shape(1, 9, 9, 70, 24, kernel, strides=strides, dilations=dilations, padding=pad,
                                 act_bits=2, weight_bits=2)
        want = reference_conv(m, k, strides, dilations, (pad,) * 4, 2)
        for isa in _core.supported_isas():
            for path in _core.supported_paths(isa):
                for winograd in ("1", "0"):
                    monkeypatch.setenv("N2UQ_DOT_WINOGRAD", winograd)
                    plan = _core.ConvPlan(shape, w, isa=isa, path=path)
                    expected = form if path in ("dot", "amx") and winograd == "1" else "direct"
                    assert plan.form == expected, (kernel, strides, dilations, isa, path, winograd)
                    np.testing.assert_array_equal(plan.run(x, output="int32"), want)
    monkeypatch.delenv("N2UQ_DOT_WINOGRAD")


def test_kernel_path_environment_and_arguments(monkeypatch):
    shape = _core.conv_shape(1, 5, 5, 70, 3, 3, padding=1, act_bits=2, weight_bits=2)
    x, w = _good_conv_args()
    for path in _core.supported_paths():
        monkeypatch.setenv("N2UQ_KERNEL_PATH", path)
        assert _core.ConvPlan(shape, w).path == path
        np.testing.assert_array_equal(
            _core.conv2d(x, w, 70, 2, 2, padding=1, output="int32"),
            _core.conv2d(x, w, 70, 2, 2, padding=1, output="int32", isa="portable", path="bitserial"))
    monkeypatch.setenv("N2UQ_KERNEL_PATH", "fastest")
    with pytest.raises(_core.CoreError, match="N2UQ_KERNEL_PATH=fastest"):
        _core.conv2d(x, w, 70, 2, 2, padding=1)
    monkeypatch.delenv("N2UQ_KERNEL_PATH")
    with pytest.raises(_core.CoreError, match="path must be one of"):
        _core.conv2d(x, w, 70, 2, 2, padding=1, path="gemm")
    with pytest.raises(_core.CoreError, match="path lut is not supported with ISA portable"):
        _core.conv2d(x, w, 70, 2, 2, padding=1, isa="portable", path="lut")
    assert "lut" not in _core.supported_paths("portable")
    assert {"bitserial", "dot"} <= set(_core.supported_paths("portable"))


def test_paths_follow_the_cpu_features():
    """A path is offered only where CPUID (and the OS, XCR0) report what its kernels execute."""
    features = set(_core.cpu_features())
    assert features <= {"popcnt", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512vpopcntdq",
                        "avx512vnni", "avx512vbmi", "gfni", "amx_int8", "asimddp"}
    combos = set(_core.supported_combinations())
    assert (("avx512", "dot") in combos) == ("avx512" in _core.supported_isas() and "avx512vnni" in features)
    assert (("avx512", "lut") in combos) == ("avx512" in _core.supported_isas()
                                            and {"avx512vnni", "avx512vbmi"} <= features)
    assert (("neon", "dot") in combos) == ("neon" in _core.supported_isas() and "asimddp" in features)
    assert ("avx2" in _core.supported_isas()) == ({"avx2", "popcnt"} <= features)


def test_fallback_kernels_when_features_are_hidden():
    """N2UQ_CPU_DISABLE hides features (read once per process), so the AVX2 dot path runs its
    VPMADDUBSW kernel instead of AVX-VNNI and the LUT path is withdrawn; outputs stay exact."""
    script = (
        "import numpy as np, sys; sys.path.insert(0, %r)\n"
        "from n2uq_tf.tflite import _core\n"
        "import test_kernel_core as t\n"
        "assert 'avx_vnni' not in _core.cpu_features() and 'avx512vbmi' not in _core.cpu_features()\n"
        "assert all(p != 'lut' for _, p in _core.supported_combinations())\n"
        "rng = np.random.default_rng(1)\n"
        "for a, w in ((1, 1), (2, 2), (3, 4), (4, 4)):\n"
        "    m = rng.integers(0, 2 ** a, (2, 5, 13, 70)).astype(np.uint8)\n"
        "    k = rng.integers(0, 2 ** w, (19, 3, 3, 70)).astype(np.uint8)\n"
        "    want = t.reference_conv(m, k, (1, 1), (1, 1), (1, 1, 1, 1), w)\n"
        "    for isa, path in _core.supported_combinations():\n"
        "        got = _core.conv2d(_core.pack_bitplanes(m, a), _core.pack_bitplanes(k, w), 70, a, w, padding=1,\n"
        "                           output='int32', isa=isa, path=path, num_threads=2)\n"
        "        assert np.array_equal(got, want), (isa, path, a, w)\n"
        "print('ok', _core.supported_combinations())\n") % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, N2UQ_CPU_DISABLE="avx_vnni,avx512vbmi", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ok" in result.stdout


def _good_conv_args():
    m = np.ones((1, 5, 5, 70), np.uint8)
    k = np.ones((3, 3, 3, 70), np.uint8)
    return _core.pack_bitplanes(m, 2), _core.pack_bitplanes(k, 2)


@pytest.mark.parametrize("change, message", [
    (dict(act_bits=0), "act_bits must be 1..4, got 0"),
    (dict(weight_bits=9), "weight_bits must be 1..4, got 9"),
    (dict(weight_bits=8), "8 is not supported"),
    (dict(padding=(3, 1)), "pad_top = 3 is larger than the dilated kernel"),
    (dict(padding=(0, 0, -1, 0)), "pad_left must be >= 0"),
    (dict(strides=0), "stride_height must be 1..1024"),
    (dict(dilations=(1, -2)), "dilation_width must be 1..1024"),
    (dict(in_channels=0), "in_channels must be"),
    (dict(in_channels=200), "input has 100 elements, the shape needs 200"),
    (dict(num_threads=0), "num_threads must be"),
    (dict(isa="turbo"), "isa must be one of"),
    (dict(path="turbo"), "path must be one of"),
])
def test_malformed_conv_arguments_raise(change, message):
    x, w = _good_conv_args()
    kwargs = dict(in_channels=70, act_bits=2, weight_bits=2, padding=1)
    kwargs.update(change)
    with pytest.raises(_core.CoreError, match=message):
        _core.conv2d_bitserial(x, w, **kwargs)


def test_malformed_buffers_raise_through_the_c_api():
    """Lengths that do not match the shape, checked by the C library itself (no wrapper help)."""
    lib = _core.library()
    x, w = _good_conv_args()
    shape = _core.conv_shape(1, 5, 5, 70, 3, 3, padding=1, act_bits=2, weight_bits=2)
    mult = np.ones(3, np.float32)
    out = np.empty(75, np.float32)
    err = ctypes.create_string_buffer(256)

    def conv(x_len, w_len, c_len, out_len, shape=shape, out_ptr=out):
        return lib.n2uq_conv2d_bitserial(ctypes.byref(shape), _core._ptr(x), x_len, _core._ptr(w), w_len,
                                         _core._ptr(mult), _core._ptr(mult), c_len,
                                         None if out_ptr is None else _core._ptr(out_ptr), None, out_len, 0, 1,
                                         err, len(err))

    assert conv(x.size, w.size, 3, 75) == 0
    for args, message in [((x.size - 1, w.size, 3, 75), b"input has 99"),
                          ((x.size, w.size - 1, 3, 75), b"weights has"),
                          ((x.size, w.size, 2, 75), b"multiplier has 2"),
                          ((x.size, w.size, 3, 74), b"output has 74"),
                          ((x.size, w.size, 3, 75, shape, None), b"both NULL")]:
        assert conv(*args) < 0
        assert message in err.value, err.value
    big = _core.conv_shape(1, 5, 5, 70, 3, (9, 3), padding=(0, 1), act_bits=2, weight_bits=2)
    assert conv(x.size, w.size, 3, 75, big) == -1 and b"larger than the padded input" in err.value
    negative = _core.conv_shape(-1, 5, 5, 70, 3, 3, padding=1, act_bits=2, weight_bits=2)
    assert conv(x.size, w.size, 3, 75, negative) == -1 and b"batch must be" in err.value


def test_malformed_pack_quantize_depthwise_raise():
    with pytest.raises(_core.CoreError, match="code 4 at index 1 exceeds 3"):
        _core.pack_bitplanes(np.array([1, 4, 0]), 2)
    with pytest.raises(_core.CoreError, match="bits must be 1..4, got 0"):
        _core.pack_bitplanes(np.array([1]), 0)
    with pytest.raises(_core.CoreError, match="need 3 thresholds, got 2"):
        _core.quantize_and_pack(np.zeros((2, 3), np.float32), [0.1, 0.2], 1.0, 2)
    with pytest.raises(_core.CoreError, match="num_positions"):
        _core.quantize_and_pack(np.zeros((0, 3), np.float32), [0.1, 0.2, 0.3], 1.0, 2)
    with pytest.raises(_core.CoreError, match="input code 5 exceeds 3"):
        _core.depthwise_conv2d(np.full((1, 4, 4, 3), 5), np.ones((3, 3, 3, 1), np.uint8), 2, 2, padding=1)
    with pytest.raises(_core.CoreError, match="weight code 2 exceeds 1"):
        _core.depthwise_conv2d(np.ones((1, 4, 4, 3), np.uint8), np.full((3, 3, 3, 1), 2), 2, 1, padding=1)
    with pytest.raises(_core.CoreError, match="must be uint64"):
        _core.fully_connected(np.zeros((1, 2, 1), np.int64), np.zeros((1, 2, 1), np.uint64), 10, 2, 2)


def _cached_build(tag, command_prefix, sources, link_flags):
    headers = [os.path.join(CORE_DIR, name) for name in _native.CORE_HEADERS_AND_SOURCES if name.endswith(".h")]
    return native_build.cached_binary(f"core_selftest_{tag}", command_prefix, sources, headers, link_flags)


def test_native_build_cache_keeps_one_binary_per_tag(tmp_path, monkeypatch):
    """A rebuild from changed sources replaces the tag's older binary in the cache (each sanitizer
    build is tens of MB); other tags, the libraries and unfinished builds stay."""
    monkeypatch.setattr(_native, "library_dirs", lambda: [str(tmp_path / "other"), str(tmp_path)])
    source = tmp_path / "main.cc"
    keep = ["core_selftest_asan_0123456789ab", "core_selftest_asan_neon_0123456789ab",
            "core_selftest_asan_0123456789ab.tmp42", "n2uq_core_0123456789ab.so"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    command = [_native.compiler(), "-std=c++17"]
    built = []
    for value in (1, 2):
        source.write_text(f"int main() {{ return {value} - {value}; }}\n")
        built.append(native_build.cached_binary("demo", command, [str(source)]))
        assert subprocess.run([built[-1]]).returncode == 0
    assert built[0] != built[1] and not os.path.exists(built[0])
    assert native_build.cached_binary("demo", command, [str(source)]) == built[1]  # cached: not rebuilt
    native_build.prune_older_builds(str(tmp_path), "core_selftest_asan", keep=None)
    assert sorted(os.listdir(tmp_path)) == sorted(keep[1:] + ["main.cc", os.path.basename(built[1])])


def test_the_build_lists_every_core_file():
    """The package build compiles every .cc file of tflite_tools/core and hashes every file there
    (a source left off one list is missing from the library, or a changed header leaves a stale
    build in the cache); tflite_tools/README.md's app build compiles core/*.cc on that promise."""
    files = sorted(os.listdir(CORE_DIR))
    assert sorted(_native.CORE_COMPILED) == [f for f in files if f.endswith(".cc")]
    assert sorted(_native.CORE_HEADERS_AND_SOURCES) == [f for f in files if f.endswith((".cc", ".h"))]


def _selftest_sources():
    return [os.path.join(CORE_DIR, name) for name in _native.CORE_COMPILED] + [SELFTEST]


@pytest.mark.slow
def test_cpp_selftest_under_asan_and_ubsan():
    compiler = _native.compiler()
    binary = _cached_build("asan", [compiler] + native_build.SANITIZER_FLAGS + ["-I" + CORE_DIR],
                           _selftest_sources(), [])
    env = dict(os.environ, **native_build.SANITIZER_ENV)
    for name in ("N2UQ_KERNEL_ISA", "N2UQ_KERNEL_PATH", "N2UQ_CPU_DISABLE", "N2UQ_AMX_EMULATE", "N2UQ_DOT_WINOGRAD",
                 "N2UQ_AMX_COMPACT"):
        env.pop(name, None)
    result = subprocess.run([binary, "80"], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "selftest: OK" in result.stdout
    for isa, path in _core.supported_combinations():
        assert f" {isa}/{path}" in result.stdout, (isa, path, result.stdout)
    # The int8 conv (n2uq_int8_conv_plan_*) on each of its paths the CPU runs.
    int8_paths = result.stdout.split("int8 conv paths:")[1].split(";")[0].split()
    assert int8_paths == ["portable/dot"] + [f"avx512/{path}" for path in ("dot", "amx")
                                             if ("avx512", path) in _core.supported_combinations()]
    # The amx path on the tile model (test_kernel_amx): the sanitizers see every tile load and
    # store address the hardware would use, on the Winograd tail shapes and the random cases.
    if "avx512vnni" in _core.cpu_features():
        result = subprocess.run([binary, "30"], capture_output=True, text=True, env=dict(env, N2UQ_AMX_EMULATE="1"),
                                timeout=3600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "selftest: OK" in result.stdout and " avx512/amx" in result.stdout and "amx: emulated" in result.stdout
        # Its direct form everywhere, with compact weights (expanded one tap and word ahead of the
        # tiles) and with int8 weights (chunk-outer, and pair-outer where chunks pass 24 KB).
        for compact in ("1", "0"):
            direct = dict(env, N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT=compact)
            result = subprocess.run([binary, "20"], capture_output=True, text=True, timeout=3600, env=direct)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert "selftest: OK" in result.stdout and " avx512/amx" in result.stdout
    # The int8 conv's per-pixel rows where its column-stacked rows would run (VBMI hidden).
    if "avx512vbmi" in _core.cpu_features():
        result = subprocess.run([binary, "30"], capture_output=True, text=True,
                                env=dict(env, N2UQ_CPU_DISABLE="avx512vbmi"), timeout=3600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "selftest: OK" in result.stdout and "avx512vbmi" not in result.stdout.split("cpu:")[-1]
    # The fallback kernels (AVX2 without AVX-VNNI) under the sanitizers too.
    if "avx_vnni" in _core.cpu_features():
        env["N2UQ_CPU_DISABLE"] = "avx_vnni"
        result = subprocess.run([binary, "30"], capture_output=True, text=True, env=env, timeout=3600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "selftest: OK" in result.stdout and "avx_vnni" not in result.stdout.split("cpu:")[-1]


AARCH64_CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


# Skipped only off CI: .ci/run installs the cross toolchain, so in CI a missing tool is a failure.
@pytest.mark.skipif((AARCH64_CXX is None or QEMU is None) and not os.environ.get("CI"),
                    reason="NEON path needs aarch64-linux-gnu-g++ and qemu-aarch64 "
                           "(apt-get install -y g++-aarch64-linux-gnu qemu-user)")
@pytest.mark.slow
def test_cpp_selftest_neon_under_qemu():
    assert AARCH64_CXX and QEMU, "CI must have aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them)"
    binary = _cached_build("aarch64", [AARCH64_CXX, "-std=c++17", "-O2", "-static", "-pthread", "-ffp-contract=off",
                                       "-I" + CORE_DIR], _selftest_sources(), [])
    result = subprocess.run([QEMU, binary, "60"], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ISAs: portable neon" in result.stdout
    assert " neon/dot" in result.stdout and "asimddp" in result.stdout  # qemu's default CPU has SDOT
    # A core without the dot-product extension (Cortex-A53): SDOT must never be chosen.
    result = subprocess.run([QEMU, "-cpu", "cortex-a53", binary, "10"], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " neon/bitserial" in result.stdout and " neon/dot" not in result.stdout
