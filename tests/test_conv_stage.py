"""A conv plan's run with its output stage (n2uq_conv_plan_run_stage, ConvPlan.run_stage): what the
fused layer ops call. Where the plan applies the stage in its own output pass (the amx path's
direct form, stages without a residual) the conv's float output never goes to memory; every
other plan runs the conv, then n2uq_output_stage. Either way the outputs must equal the NumPy
reference (the exact conv, the affine, the builtins' float32 steps one after the other, the
quantizer) bit for bit: on the hardware amx path where the CPU has it, on its software model
(N2UQ_AMX_EMULATE=1, a hook read once per process: hence subprocesses), and on the other paths.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from n2uq_tf.tflite import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# Checks run_stage against the reference for stages of every step kind (residuals, float outputs
# before, between and after the steps, pack / codes / no quantizer, bits 1-4), on shapes with
# channel tails (OC not a multiple of 16 or 64), strides 1 and 2, batch 2, 1 and 2 threads; values
# include ties at the thresholds. Prints "checked N fused F": F cases ran in the conv's own pass.
CHECK_SCRIPT = """
import os
import sys
import numpy as np
sys.path.insert(0, %(tests)r)
from n2uq_tf.tflite import _core
from test_kernel_core import affine, reference_conv
from test_fusion import reference_codes, reference_pack, reference_steps

STAGES = [  # (steps, float_after, quantize)
    (["add", "prelu", "add"], None, "pack"),
    (["mul", "relu"], None, "codes"),
    (["add", "relu6", "prelu", "relu_n1_to_1"], None, "pack"),
    ([], None, "pack"),
    ([], 0, None),
    (["add", "prelu", "add"], 1, "pack"),
    (["add_tensor", "add", "prelu", "add", "add", "prelu", "add"], 4, "pack"),
    (["add_tensor", "relu"], 2, None),
    (["prelu", "add_tensor", "mul"], 0, "codes"),
]
SHAPES = [  # (n, h, w, c, oc, stride)
    (1, 9, 11, 64, 64, 1), (2, 7, 6, 40, 72, 1), (1, 10, 9, 80, 40, 2), (1, 6, 7, 128, 200, 1),
    (2, 5, 5, 16, 16, 2), (1, 13, 12, 64, 96, 1),
]

def check(n, h, w, c, oc, stride, bits, steps, float_after, quantize, threads, path, rng):
    m = rng.integers(0, 2 ** bits, (n, h, w, c)).astype(np.uint8)
    k = rng.integers(0, 2 ** bits, (oc, 3, 3, c)).astype(np.uint8)
    shape = _core.conv_shape(n, h, w, c, oc, 3, strides=stride, padding=1, act_bits=bits, weight_bits=bits)
    plan = _core.ConvPlan(shape, _core.pack_bitplanes(k, bits), path=path, num_threads=threads)
    acc = reference_conv(m, k, (stride, stride), (1, 1), (1, 1, 1, 1), bits)
    mult = rng.uniform(0.002, 0.05, oc).astype(np.float32)
    mult[::7] *= -1  # negative BN scales
    bias = rng.normal(0, 0.5, oc).astype(np.float32)
    y = affine(acc, mult, bias)
    thresholds = np.sort(rng.normal(0.2, 1, 2 ** bits - 1)).astype(np.float32) if quantize else None
    beta1 = np.float32(1.25)
    values = []
    for kind in steps:
        if kind in ("add", "mul", "prelu"):
            values.append(rng.normal(0, 1, oc).astype(np.float32))
        elif kind == "add_tensor":
            values.append(rng.normal(0, 1, y.shape).astype(np.float32))
        else:
            values.append(None)
    step_list = list(zip(steps, values))
    want_float = reference_steps(y, step_list[:float_after]) if float_after is not None else None
    final = reference_steps(y, step_list)
    got_float, got = plan.run_stage(_core.pack_bitplanes(m, bits), mult, bias, step_list, float_after=float_after,
                                    quantize=quantize, bits=bits if quantize else None, thresholds=thresholds,
                                    beta1=beta1, num_threads=threads)
    where = (n, h, w, c, oc, stride, bits, steps, float_after, quantize, threads, path, plan.path, plan.form)
    if float_after is not None:
        assert np.array_equal(got_float.view(np.uint32), want_float.view(np.uint32)), where
    if quantize is not None:
        codes = reference_codes(final, thresholds, beta1)
        want = reference_pack(codes, bits) if quantize == "pack" else codes.astype(np.uint8)
        assert np.array_equal(got, want), where
    if os.environ.get("N2UQ_AMX_COMPACT") == "1" and path == "amx":
        assert plan.form == "direct_compact", where
    direct = plan.form in ("direct", "direct_compact")
    fused = plan.path == "amx" and direct and "add_tensor" not in steps
    assert plan.stage_fused == (plan.path == "amx" and direct), where
    return fused

rng = np.random.default_rng(11)
paths = sys.argv[1].split(",")
count = fused = 0
for i, (n, h, w, c, oc, stride) in enumerate(SHAPES):
    for j, (steps, float_after, quantize) in enumerate(STAGES):
        bits = 1 + (i + j) %% 4
        threads = 1 + (i + j) %% 2
        for path in paths:
            fused += check(n, h, w, c, oc, stride, bits, steps, float_after, quantize, threads, path, rng)
            count += 1
print("checked", count, "fused", fused)
""" % {"tests": TESTS}


def _run(script, *args, **env_changes):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("N2UQ_AMX_EMULATE", "N2UQ_KERNEL_PATH", "N2UQ_KERNEL_ISA", "N2UQ_CPU_DISABLE", "N2UQ_DOT_WINOGRAD",
                 "N2UQ_AMX_COMPACT"):
        env.pop(name, None)
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                            timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _counts(line):
    words = line.split()
    assert words[0] == "checked" and words[2] == "fused", line
    return int(words[1]), int(words[3])


def test_unfused_paths_equal_the_reference():
    """Every path of this CPU but amx (tested below): the conv, then the stage."""
    paths = [p for p in _core.supported_paths() if p != "amx"]
    total, fused = _counts(_run(CHECK_SCRIPT, ",".join(paths)))
    assert total == 6 * 9 * len(paths) and fused == 0


def test_emulated_amx_direct_form_fuses_the_stage():
    """The software model of the tile instructions, direct form everywhere (N2UQ_DOT_WINOGRAD=0):
    stages without a residual run in the conv's pass, the rest after it, all exact."""
    if "avx512vnni" not in _core.cpu_features():
        # The model needs AVX-512 VNNI: without it the hook leaves the path off (test_kernel_amx).
        out = _run("from n2uq_tf.tflite import _core\nprint('amx' in _core.supported_paths())", N2UQ_AMX_EMULATE="1")
        assert out == "False"
        return
    total, fused = _counts(_run(CHECK_SCRIPT, "amx", N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0"))
    assert total == 6 * 9 and fused == 6 * 6
    # Compact weights (one vector, up to two pairs at a time): the same stages in their output pass.
    total, fused = _counts(_run(CHECK_SCRIPT, "amx", N2UQ_AMX_EMULATE="1", N2UQ_DOT_WINOGRAD="0",
                                N2UQ_AMX_COMPACT="1"))
    assert total == 6 * 9 and fused == 6 * 6


def test_hardware_amx_fuses_the_stage_where_present():
    """On a CPU with AMX, the hardware tiles in the direct form (exact, fused as above); elsewhere the
    path is not offered."""
    if "amx" not in _core.supported_paths():
        assert "amx_int8" not in _core.cpu_features() or not _core.amx_status().startswith("available")
        return
    total, fused = _counts(_run(CHECK_SCRIPT, "amx", N2UQ_DOT_WINOGRAD="0"))
    assert total == 6 * 9 and fused == 6 * 6
    total, fused = _counts(_run(CHECK_SCRIPT, "amx", N2UQ_DOT_WINOGRAD="0", N2UQ_AMX_COMPACT="1"))
    assert total == 6 * 9 and fused == 6 * 6
    total, fused = _counts(_run(CHECK_SCRIPT, "amx"))  # Winograd forms where they apply: unfused
    assert total == 6 * 9


def _plan(bits=2, oc=40, path="auto"):
    shape = _core.conv_shape(1, 6, 6, 64, oc, 3, padding=1, act_bits=bits, weight_bits=bits)
    k = _core.pack_bitplanes(np.ones((oc, 3, 3, 64), np.uint8), bits)
    x = _core.pack_bitplanes(np.ones((1, 6, 6, 64), np.uint8), bits)
    return _core.ConvPlan(shape, k, path=path), x


def test_run_stage_rejects_bad_arguments():
    plan, x = _plan()
    ones = np.ones(40, np.float32)
    with pytest.raises(_core.CoreError, match="multiplier has 39 elements"):
        plan.run_stage(x, ones[:39], ones[:39], [("relu", None)], float_after=1)
    with pytest.raises(_core.CoreError, match="2-bit codes need 3 thresholds"):
        plan.run_stage(x, ones, ones, [], quantize="pack", bits=2, thresholds=np.zeros(2, np.float32))
    with pytest.raises(_core.CoreError, match="no output"):
        plan.run_stage(x, ones, ones, [("relu", None)])
    with pytest.raises(_core.CoreError, match="step 0 .ADD. has 39 values"):
        plan.run_stage(x, ones, ones, [("add", ones[:39])], float_after=1)
    with pytest.raises(_core.CoreError, match="input has"):
        plan.run_stage(x[:, :3], ones, ones, [], float_after=0)
    lib, err = _core.library(), _core.ctypes.create_string_buffer(256)
    out = np.zeros(6 * 6 * 40, np.float32)
    status = lib.n2uq_conv_plan_run_stage(plan._handle, _core.ctypes.byref(plan.shape), _core._ptr(x), x.size,
                                          _core._ptr(ones), _core._ptr(ones), 40, None, _core._ptr(out), out.size,
                                          None, 0, None, 0, 1, err, len(err))
    assert status != 0 and b"stage is NULL" in err.value
    assert lib.n2uq_conv_plan_stage_fused(None) < 0


def test_run_stage_refuses_a_residual_that_is_the_float_output():
    """The unfused order writes the float output before the residual is read, so the two may not
    share memory (the delegate's tensors never do)."""
    plan, x = _plan()
    ones = np.ones(40, np.float32)
    stage = _core.OutputStage()
    stage.num_steps = 1
    out = np.zeros(6 * 6 * 40, np.float32)
    stage.steps[0].kind = _core.STEP_KINDS.index("add_tensor") + 1
    stage.steps[0].values = out.ctypes.data
    stage.steps[0].values_len = out.size
    stage.float_after = 1
    lib, err = _core.library(), _core.ctypes.create_string_buffer(256)
    status = lib.n2uq_conv_plan_run_stage(plan._handle, _core.ctypes.byref(plan.shape), _core._ptr(x), x.size,
                                          _core._ptr(ones), _core._ptr(ones), 40, _core.ctypes.byref(stage),
                                          _core._ptr(out), out.size, None, 0, None, 0, 1, err, len(err))
    assert status != 0 and b"residual overlaps out_float" in err.value


@pytest.mark.parametrize("path", ["auto", "dot"])
def test_run_stage_refuses_operands_inside_the_float_output(path):
    """The conv writes the float output before the stage reads its per-channel operands and
    thresholds (in place in that output: unfused; pair by pair: fused), so an operand that lies in
    it is refused, not read after being overwritten. Apart from it, the same call runs exactly."""
    plan, x = _plan(path=path)
    ones = np.ones(40, np.float32)
    lib, err = _core.library(), _core.ctypes.create_string_buffer(256)
    n = 6 * 6 * 40  # the float output's elements
    out = np.zeros(n + 40 + 3, np.float32)  # the float output, then room for the operands

    def run(values_at, thresholds_at):
        stage = _core.OutputStage()
        stage.num_steps = 1
        stage.steps[0].kind = _core.STEP_KINDS.index("add") + 1
        stage.steps[0].values = values_at.ctypes.data
        stage.steps[0].values_len = 40
        stage.float_after = 1
        stage.quantize = _core.QUANTIZE_MODES.index("pack")
        stage.bits, stage.thresholds, stage.num_thresholds, stage.beta1 = 2, thresholds_at.ctypes.data, 3, 1.0
        packed = np.zeros(6 * 6 * 2, np.uint64)
        status = lib.n2uq_conv_plan_run_stage(plan._handle, _core.ctypes.byref(plan.shape), _core._ptr(x), x.size,
                                              _core._ptr(ones), _core._ptr(ones), 40, _core.ctypes.byref(stage),
                                              _core._ptr(out), n, _core._ptr(packed), packed.size, None, 0,
                                              1, err, len(err))
        return status, packed

    thresholds = np.array([0.5, 1.5, 2.5], np.float32)
    status, _ = run(out[40:80], thresholds)  # inside the float output
    assert status != 0 and b"step 0's values overlaps out_float" in err.value
    status, _ = run(ones, out[100:103])
    assert status != 0 and b"thresholds overlap out_float" in err.value
    out[n:n + 40] = 0.25  # just past it: accepted, and equal to separate buffers
    out[n + 40:] = thresholds
    status, packed = run(out[n:n + 40], out[n + 40:])
    assert status == 0, err.value
    float_then, packed_then = out[:n].copy(), packed
    status, packed = run(np.full(40, 0.25, np.float32), thresholds)
    assert status == 0 and np.array_equal(out[:n], float_then) and np.array_equal(packed, packed_then)
