"""The "amx" conv path: the dot path's GEMMs on AMX tiles, in its direct form (the input split
into stride phases, any kernel, stride and dilation) and its Winograd forms (F(2x2, 3x3) for 3x3
stride 1, the polyphase form for 3x3 stride 2).

This CPU may lack AMX, so the AMX code is tested through its software model of the tile
instructions (N2UQ_AMX_EMULATE=1, a test hook read once per process: hence subprocesses),
bit-exact against the exact NumPy conv of test_kernel_core; where the CPU reports AMX the
hardware path must be offered and be bit-exact on the same shapes. The sanitizer self-test
(test_kernel_core) runs the emulated path too.
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# Checks path amx (forced, threads 1 and 2, int32 and float outputs) against the NumPy reference
# on Winograd shapes of both forms (C and OC with K, M and N tails, odd H/W, batch 2, bits 1-4),
# shapes only the direct form takes (1x1, dilation, 5x5, stride 3) and wide 3-4 bit pixels; prints
# "checked N". With
# N2UQ_DOT_WINOGRAD=0 every shape runs the direct form.
CHECK_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, %(tests)r)
from n2uq_tf.tflite import _core
from test_kernel_core import affine, reference_conv

def check(n, h, w, c, oc, kernel, strides, dilations, pads, a, wb, rng):
    m = rng.integers(0, 2 ** a, (n, h, w, c)).astype(np.uint8)
    k = rng.integers(0, 2 ** wb, (oc, kernel, kernel, c)).astype(np.uint8)
    want = reference_conv(m, k, (strides, strides), (dilations, dilations), pads, wb)
    mult = rng.normal(0, 0.1, oc).astype(np.float32)
    bias = rng.normal(0, 1, oc).astype(np.float32)
    for threads in (1, 2):
        out_f, out_i = _core.conv2d(_core.pack_bitplanes(m, a), _core.pack_bitplanes(k, wb), c, a, wb, mult, bias,
                                    strides=strides, dilations=dilations, padding=pads, output="both", isa="avx512",
                                    path="amx", num_threads=threads)
        where = (n, h, w, c, oc, kernel, strides, dilations, pads, a, wb, threads)
        assert np.array_equal(out_i, want), where
        assert np.array_equal(out_f, affine(want, mult, bias)), where

rng = np.random.default_rng(7)
bits = [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 1), (3, 2), (1, 3)]
count = 0
for i, (c, oc) in enumerate([(c, oc) for c in (3, 64, 80, 128) for oc in (8, 16, 40, 64)]):
    a, wb = bits[i %% len(bits)]
    h, w = (5, 7) if i %% 2 == 0 else (7, 3)
    pads = (1, 1, 1, 1) if i %% 3 else (0, 2, 1, 0)
    for strides in (1, 2):
        check(2, h, w, c, oc, 3, strides, 1, pads, a, wb, rng)
        count += 1
# Many tiles (more than one block of 16; the last blocks shorter) and 4-vector chunks (OC 64).
for strides in (1, 2):
    check(1, 17, 15, 72, 64, 3, strides, 1, (1, 1, 1, 1), 2, 2, rng)
    check(2, 9, 11, 200, 48, 3, strides, 1, (1, 1, 1, 1), 4, 4, rng)
    check(2, 13, 11, 64, 40, 3, strides, 1, (0, 1, 1, 0), 3, 3, rng)
    count += 3
# Not a Winograd form: the phased direct form (1x1, dilation, a 1x1 at stride 2 that reads one
# phase of four, 5x5 at stride 2, stride 3 with dilation 2: taps in every phase and row shift).
check(2, 5, 7, 80, 40, 1, 1, 1, (0, 0, 0, 0), 3, 2, rng)
check(1, 7, 7, 64, 16, 3, 1, 2, (2, 2, 2, 2), 2, 3, rng)
check(2, 9, 8, 72, 24, 1, 2, 1, (0, 0, 0, 0), 2, 2, rng)
check(1, 13, 12, 64, 48, 5, 2, 1, (2, 2, 1, 2), 4, 3, rng)
check(2, 14, 11, 130, 33, 3, 3, 2, (1, 2, 2, 1), 1, 4, rng)
# The direct form's stage of 3-4 bit codes from wide pixels: 330 channels at 3 bits (a 104-byte
# window of planes per word, two registers on the GFNI stager) and 400 at 4 bits (past 128 bytes:
# the mask-move stager), both with a channel tail.
check(1, 7, 6, 330, 24, 3, 2, 1, (1, 1, 1, 1), 3, 2, rng)
check(1, 6, 5, 400, 16, 3, 1, 1, (1, 1, 1, 1), 4, 3, rng)
# 3 images of 4 tile pairs: 2 threads split the pairs in the middle of the second image.
check(3, 11, 9, 64, 24, 3, 1, 1, (1, 1, 1, 1), 2, 2, rng)
# Int8 weights in chunks past 24 KB (3 words: 54 KB), 2 chunks and 3 pairs: each pair runs over
# every chunk, the weights loaded as streaming (ConvJob::amx_pairs_outer).
check(1, 16, 16, 150, 64, 3, 2, 1, (0, 1, 0, 1), 3, 3, rng)
count += 9
# The form a forced amx plan took (direct_compact under N2UQ_AMX_COMPACT=1 with N2UQ_DOT_WINOGRAD=0).
shape = _core.conv_shape(1, 9, 9, 80, 40, 3, padding=1, act_bits=2, weight_bits=2)
plan = _core.ConvPlan(shape, _core.pack_bitplanes(rng.integers(0, 4, (40, 3, 3, 80)), 2), isa="avx512", path="amx")
print("form", plan.form)
print("checked", count)
""" % {"tests": TESTS}


def _run(script, **env_changes):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("N2UQ_AMX_EMULATE", "N2UQ_KERNEL_PATH", "N2UQ_KERNEL_ISA", "N2UQ_CPU_DISABLE", "N2UQ_DOT_WINOGRAD",
                 "N2UQ_AMX_COMPACT"):
        env.pop(name, None)
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _report(**env_changes):
    """(cpu features, amx status, supported combinations) of a fresh process."""
    out = _run("from n2uq_tf.tflite import _core\n"
               "print(repr((_core.cpu_features(), _core.amx_status(), _core.supported_combinations())))\n",
               **env_changes)
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_emulated_amx_path_is_bit_exact():
    features, status, combos = _report(N2UQ_AMX_EMULATE="1")
    if "avx512vnni" not in features or "avx512f" not in features:
        # The hook needs AVX-512 VNNI: without it the path stays off, with the reason.
        assert ("avx512", "amx") not in combos and status.startswith("unavailable"), status
        return
    assert status.startswith("emulated") and "self-check passed" in status, status
    assert ("avx512", "amx") in combos
    assert "checked 47" in _run(CHECK_SCRIPT, N2UQ_AMX_EMULATE="1")


def test_emulated_amx_path_direct_form_and_selection():
    """With N2UQ_DOT_WINOGRAD=0 the amx plan runs its phased direct form everywhere; auto selection
    may pick amx like any path and stays exact."""
    features, _, _ = _report()
    if "avx512vnni" not in features:
        assert ("avx512", "amx") not in _report(N2UQ_AMX_EMULATE="1")[2]
        return
    assert "checked 47" in _run(CHECK_SCRIPT, N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="0")
    script = (
        "import numpy as np\n"
        "from n2uq_tf.tflite import _core\n"
        "rng = np.random.default_rng(3)\n"
        "k = _core.pack_bitplanes(rng.integers(0, 4, (40, 3, 3, 80)), 2)\n"
        "x = _core.pack_bitplanes(rng.integers(0, 4, (1, 9, 9, 80)), 2)\n"
        "shape = _core.conv_shape(1, 9, 9, 80, 40, 3, padding=1, act_bits=2, weight_bits=2)\n"
        "plan = _core.ConvPlan(shape, k)\n"
        "assert plan.path in _core.supported_paths(), plan.path\n"
        "got = _core.conv2d(x, k, 80, 2, 2, padding=1, output='int32')\n"
        "want = _core.conv2d(x, k, 80, 2, 2, padding=1, output='int32', isa='portable', path='bitserial')\n"
        "assert np.array_equal(got, want)\n"
        "print('auto', plan.path)\n")
    assert "auto " in _run(script, N2UQ_AMX_EMULATE="1")


def test_emulated_amx_path_compact_weights():
    """N2UQ_AMX_COMPACT=1: the direct form keeps its weights as 1/2/4-bit codes and expands them
    one tap and word ahead of the tiles (one vector, up to two pairs at a time): exact on every shape
    and bit width above, with the form reported; =0 keeps the int8 layout."""
    features, _, _ = _report()
    if "avx512vnni" not in features:
        assert ("avx512", "amx") not in _report(N2UQ_AMX_EMULATE="1")[2]
        return
    out = _run(CHECK_SCRIPT, N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="1")
    assert "checked 47" in out and "form direct_compact" in out, out[-500:]
    out = _run(CHECK_SCRIPT, N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="0")
    assert "form direct\n" in out, out[-500:]


def test_amx_direct_form_stages_the_same_without_gfni():
    """The direct form stages 2-4 bit codes with GF2P8AFFINEQB where the CPU reports GFNI and AVX-512
    VBMI, else (N2UQ_CPU_DISABLE=gfni) with a mask move per plane: both exact on every shape above;
    the core reports gfni exactly where /proc/cpuinfo does (with AVX-512)."""
    features, _, _ = _report()
    if "avx512vnni" not in features:
        assert ("avx512", "amx") not in _report(N2UQ_AMX_EMULATE="1")[2]
        return
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        assert ("gfni" in features) == ("gfni" in flags), (features, flags)
    hidden, _, _ = _report(N2UQ_CPU_DISABLE="gfni")
    assert "gfni" not in hidden and "avx512vbmi" in hidden or "avx512vbmi" not in features
    out = _run(CHECK_SCRIPT, N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="0", N2UQ_CPU_DISABLE="gfni")
    assert "checked 47" in out and "form direct\n" in out, out[-500:]


def test_amx_path_follows_the_cpu():
    """Without the hook the path is offered only where the CPU and OS report AMX (then it must
    have passed its self-check and be exact); elsewhere forcing it fails naming the path, and
    auto selection never returns it."""
    features, status, combos = _report()
    if "amx_int8" in features:
        assert status.startswith("available"), status
        assert ("avx512", "amx") in combos
        assert "checked 47" in _run(CHECK_SCRIPT)
        out = _run(CHECK_SCRIPT, N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="1")
        assert "checked 47" in out and "form direct_compact" in out, out[-500:]
    else:
        assert status.startswith("unavailable"), status
        assert all(path != "amx" for _, path in combos)
    # Hiding AMX withdraws the hardware path on any CPU, and says why.
    features, status, combos = _report(N2UQ_CPU_DISABLE="amx_int8")
    assert "amx_int8" not in features and all(path != "amx" for _, path in combos)
    assert status.startswith("unavailable"), status
    script = (
        "import numpy as np, os\n"
        "from n2uq_tf.tflite import _core\n"
        "x = _core.pack_bitplanes(np.ones((1, 6, 6, 80), np.uint8), 2)\n"
        "k = _core.pack_bitplanes(np.ones((40, 3, 3, 80), np.uint8), 2)\n"
        "for isa in _core.supported_isas():\n"
        "    try:\n"
        "        _core.conv2d(x, k, 80, 2, 2, padding=1, isa=isa, path='amx')\n"
        "        raise SystemExit('amx ran with ' + isa)\n"
        "    except _core.CoreError as e:\n"
        "        assert 'path amx is not supported with ISA ' + isa in str(e), str(e)\n"
        "shape = _core.conv_shape(1, 6, 6, 80, 40, 3, padding=1, act_bits=2, weight_bits=2)\n"
        "assert _core.ConvPlan(shape, k).path != 'amx'\n"
        "os.environ['N2UQ_KERNEL_PATH'] = 'amx'\n"
        "try:\n"
        "    _core.ConvPlan(shape, k)\n"
        "    raise SystemExit('N2UQ_KERNEL_PATH=amx ran')\n"
        "except _core.CoreError as e:\n"
        "    assert 'path amx is not supported' in str(e), str(e)\n"
        "print('refused')\n")
    assert "refused" in _run(script, N2UQ_CPU_DISABLE="amx_int8")
