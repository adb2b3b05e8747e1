"""N2UQ bit-serial kernels vs TFLite's builtin CONV_2D: per layer, end to end, and file sizes.

    python benchmarks/kernels.py [--markdown benchmarks/RESULTS.md]      # everything, one run
    python benchmarks/kernels.py --skip-end-to-end --skip-sizes          # per-layer part only
    python benchmarks/kernels.py --skip-layers                           # ResNet-18 part only

Three parts, all in one run by default (each can be skipped):

1. Per layer (--skip-layers): GMAC/s = N*OH*OW*OC*KH*KW*IC / median time on ResNet-18's 3x3
   layer shapes (stride 1, pad 1, batch 1; and, unless --skip-strided, the stride-2 3x3 conv
   that opens stages 2-4), for each bit width (WkAk), thread count and ISA.
   Ours is what a network pays for the layer: the quantize-and-pack of its float input
   (N2UQQuantizePack) plus the conv, both through the C API on preallocated buffers as the
   TFLite delegate calls them, the conv from a plan prepared once (weights in the chosen
   path's layout) with the path that --path names (default auto: the plan times the paths the
   CPU runs and keeps the fastest; the table names it per row and width). Unless --no-tflite,
   a one-layer tf_keras model per shape is converted to TFLite float32 and int8 (int8 input
   and output, representative dataset) and its CONV_2D is timed in the stock interpreter
   (ai_edge_litert, else tf.lite; default XNNPACK) in the same rounds, with TFLite int8 time
   / our time. With --lce-python, W1A1 is also compared with Larq Compute Engine's binary
   conv (benchmarks/lce_layers.py, run by that Python: LCE pins numpy < 2).
2. End to end (--skip-end-to-end): ResNet-18 at 224x224x3, batch 1, in the stock interpreter:
   ours (`n2uq_tf.models.resnet18(bits=b)` exported with `export_tflite`: the float ops between a
   conv and the next quantizer (RPReLU, residual adds) fused into the conv's output stage, float
   builtins for the stem, the first block's RPReLU, pool and fc, N2UQ ops run by our delegate;
   with --e2e-unfused-bits also exported with fuse=False, with --e2e-int8-bits also
   inference_type="int8"), against the float twin `resnet18()` converted to TFLite int8
   (full-integer post-training quantization, float input/output) and float32, and against
   the standard ReLU ResNet-18 (the network a TFLite user would otherwise ship; TFLite runs
   the RPReLU twin's PReLUs through QUANTIZE/DEQUANTIZE) in full-integer int8 and float32,
   all on the interpreter's default XNNPACK. Random weights (latency does not depend on values), with
   randomized BN statistics and quantizer parameters so the activation codes are spread over
   the levels. The delegate's per-kernel profile splits our time into N2UQ conv (with its fused
   output stage), N2UQ quantize-and-pack and the rest (builtins + interpreter). Sanity lines
   compare each exported model's output with Keras on one image, each N2UQ conv of the unfused
   export with its Keras layer, and the fused export with the unfused one (bit for bit).
3. File sizes (--skip-sizes): file bytes, packed N2UQ weight bytes and the remaining buffers
   (`inspect_tflite`) per exported model, file / (packed + remainder) vs the 1.10 target, and
   the float twin's float32 and int8 .tflite sizes.

Every candidate of a row is timed once per round (one untimed call, then the sample), rounds
interleaved (--repeats / --e2e-repeats of them), so drift on a shared machine hits all
candidates alike; tables show the median over rounds (or, with --statistic min, the best round:
on a machine shared with other jobs contention only adds time, so short samples and the minimum
recover each candidate's own speed) and a noise column, the relative spread (interquartile
range / median: for a layer row the largest of any candidate in the row). Exported models are cached in a
temporary folder for the run (--cache-dir keeps them). --markdown PATH writes all tables with
the machine, versions, thread counts and repeat counts. A benchmark, not a test: nothing here
asserts a speed.
"""

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from n2uq_tf.tflite import _core  # noqa: E402

SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (spatial, channels), 3x3, stride 1, pad 1
# ResNet-18's other 3x3 convs: the first of stages 2-4, stride 2 ('same' padding: 0 above/left,
# 1 below/right), doubling the channels. (input spatial, in channels, out channels).
STRIDED_SHAPES = [(56, 64, 128), (28, 128, 256), (14, 256, 512)]
E2E_INPUT = (224, 224, 3)
STEM_LABEL = "stem alone"
SIZE_TARGET = 1.10
N2UQ_CONV_OPS = ("N2UQConv2D", "N2UQDepthwiseConv2D", "N2UQFullyConnected", "N2UQConv2DFused",
                 "N2UQDepthwiseConv2DFused", "N2UQFullyConnectedFused")  # fused: the layer + its output stage
N2UQ_FUSED_OPS = N2UQ_CONV_OPS[3:]
N2UQ_QUANTIZE_OPS = ("N2UQQuantizePack", "N2UQQuantize")
# ours besides the layers: quantize(-and-pack) ops, and the stem's pool with the first block's stage
N2UQ_OTHER_OPS = N2UQ_QUANTIZE_OPS + ("N2UQMaxPool2DFused",)
# builtin CONV_2D nodes our delegate runs (few input channels: the float stem of every export, the
# int8 stem of an inference_type="int8" export or of TFLite's own int8 model): counted with our convs
BUILTIN_CONV_OPS = ("CONV_2D (int8)", "CONV_2D (float)")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# x86 CPU families by their CPUID family number (the VM's model name may not say), and Intel's
# server cores by family 6 model number, which is where Intel names them.
CPU_FAMILIES = {("AuthenticAMD", 25): "Zen 3 / Zen 4", ("AuthenticAMD", 26): "Zen 5"}
INTEL_MODELS = {85: "Skylake / Cascade Lake server", 106: "Ice Lake server", 143: "Sapphire Rapids",
                207: "Emerald Rapids", 173: "Granite Rapids"}


def cpu_family():
    """'family 26 model 2 (Zen 5)' from /proc/cpuinfo, or '' where it is not known."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return ""
    if "cpu family" not in info:
        return ""
    family = int(info["cpu family"])
    name = CPU_FAMILIES.get((info.get("vendor_id", ""), family))
    if info.get("vendor_id") == "GenuineIntel" and family == 6 and info.get("model", "").isdigit():
        name = INTEL_MODELS.get(int(info["model"]), name)
    return f"family {family} model {info.get('model', '?')}" + (f" ({name})" if name else "")


def cpu_caches():
    """'L2 2 MB per core, L3 480 MB' from sysfs (cpu0's unified caches from L2 on), or ''. A VM's
    reported model number may not be its host's (a KVM guest has shown family 6 model 167, a
    desktop core's number, with AMX flags); the cache sizes tell two hosts apart where it does not."""
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            level, kind, size = (open(os.path.join(base, entry, name)).read().strip()
                                 for name in ("level", "type", "size"))
            level = int(level)
            if level >= 2 and kind == "Unified":
                sizes[level] = size
    except (OSError, ValueError):
        return ""

    def pretty(size):
        return f"{int(size[:-1]) // 1024} MB" if size.endswith("K") and int(size[:-1]) % 1024 == 0 else size

    return ", ".join(f"L{level} {pretty(size)}" + (" per core" if level == 2 else "") for level, size in
                     sorted(sizes.items()))


def cpu_class():
    """The key of this CPU's RESULTS.md section: model name and family / model number, e.g.
    'Intel(R) Xeon(R) Processor, family 6 model 207 (Emerald Rapids)'."""
    family = cpu_family()
    return f"{cpu_name()}, {family}" if family else cpu_name()


def cpu_flags():
    """The SIMD flags that matter to these kernels (from /proc/cpuinfo)."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni",
              "avx512_bitalg", "avx512vbmi", "popcnt", "amx_tile", "amx_int8", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def stock_interpreter():
    """(name, module) of the stock interpreter: ai_edge_litert if installed, else tf.lite."""
    try:
        from ai_edge_litert import interpreter as litert
        return "ai_edge_litert", litert
    except ImportError:
        import tensorflow as tf
        return "tf.lite", tf.lite


def calls_per_sample(fn, min_time):
    """Calls per timing sample so that one sample lasts about min_time seconds."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, int(min_time / once))


def sample(fn, calls):
    """Seconds per call over `calls` calls, after one untimed call: every candidate starts its sample
    with its own data in cache (the candidate before it in the round may have evicted them)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


STATISTICS = {"median": np.median, "min": np.min}


def summary(values):
    """The per-candidate statistic of its per-round times (--statistic): median, or min (best of
    the rounds: on a machine shared with other jobs, contention only ever adds time)."""
    return float(STATISTICS[STATISTIC](values))


STATISTIC = "median"


def spread(values):
    """Interquartile range / median."""
    return float(np.subtract(*np.percentile(values, [75, 25])) / np.median(values))


def interleaved(candidates, repeats, sample_time, before_rounds=None, after_round=None):
    """Times every zero-argument callable once per round, `repeats` rounds: {key: [seconds per call]}.
    after_round(), if given, runs after each round (outside the timed calls)."""
    calls = {key: calls_per_sample(fn, sample_time) for key, fn in candidates.items()}
    if before_rounds is not None:
        before_rounds()
    samples = {key: [] for key in candidates}
    for _ in range(repeats):
        for key, fn in candidates.items():
            samples[key].append(sample(fn, calls[key]))
        if after_round is not None:
            after_round()
    return samples, calls


def same_out(size, stride):
    """Output size of a 'same'-padded conv: ceil(size / stride)."""
    return -(-size // stride)


def macs(size, channels, out_channels=None, stride=1):
    out = same_out(size, stride)
    return out * out * channels * (out_channels or channels) * 9


def conv_layers(strided=True):
    """Per-layer rows: (label, input spatial, in channels, out channels, stride)."""
    rows = [(f"{size}x{size}x{channels}", size, channels, channels, 1) for size, channels in SHAPES]
    if strided:
        rows += [(f"{size}x{size}x{cin}/2->{cout}", size, cin, cout, 2) for size, cin, cout in STRIDED_SHAPES]
    return rows


def markdown_table(header, rows, align=None):
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------ part 1: per layer

def same_padding(size, stride):
    """TensorFlow's 'same' padding of a 3x3 conv: (top, bottom, left, right)."""
    total = max((same_out(size, stride) - 1) * stride + 3 - size, 0)
    return (total // 2, total - total // 2) * 2


def arena_array(values=None, shape=None, dtype=None):
    """A 64-byte aligned array (a copy of `values`, or empty with `shape` and `dtype`): TFLite's arena
    aligns every tensor to 64 bytes (kDefaultTensorAlignment), numpy only to 16, and a 16-byte offset
    splits every 64-byte vector access of our kernels across two cache lines (the amx conv's float
    output: up to 10% slower on the Xeon)."""
    if values is not None:
        shape, dtype = values.shape, values.dtype
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    out = raw[offset:offset + nbytes].view(dtype).reshape(shape)
    if values is not None:
        out[...] = values
    return out


def our_layer(size, channels, bits, isa, path, threads, rng, out_channels=None, stride=1):
    """(callable, plan): one layer as a network runs it, the quantize-and-pack of the float input and the
    conv in one call (n2uq_conv_plan_run_quantizing, as the delegate runs an N2UQQuantizePack and the conv
    right after it: inside the conv's GEMMs where its path can) from a plan prepared once, through the C
    API on preallocated buffers, called back to back past its trial (an auto plan's first
    _core.plan_trial_runs() runs may try the selection's runner-up), so that the timing sees the path it
    settled on, decided on its own calls as in an application (interleaved with the timing, the trial's
    runs met the spinning workers of TFLite's 2-thread interpreters)."""
    out_channels = out_channels or channels
    x = arena_array(rng.normal(0.3, 1.0, (1, size, size, channels)).astype(np.float32))
    thresholds = np.sort(rng.uniform(-0.5, 1.5, 2 ** bits - 1)).astype(np.float32)
    w = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (out_channels, 3, 3, channels)), bits)
    mult = np.full(out_channels, 0.01, np.float32)
    bias = np.zeros(out_channels, np.float32)
    shape = _core.conv_shape(1, size, size, channels, out_channels, 3, strides=stride,
                             padding=same_padding(size, stride), act_bits=bits, weight_bits=bits)
    out = arena_array(shape=(1, *_core.output_size(shape), out_channels), dtype=np.float32)
    plan = _core.ConvPlan(shape, w, isa=isa, path=path, num_threads=threads)
    lib, err = _core.library(), ctypes.create_string_buffer(256)
    quantizer = _core.InputQuantizer(_core._ptr(x), x.size, _core._ptr(thresholds), thresholds.size, 1.0)
    args = (plan._handle, ctypes.byref(shape), ctypes.byref(quantizer), None, 0, _core._ptr(mult), _core._ptr(bias),
            out_channels, None, _core._ptr(out), out.size, None, 0, None, 0, threads, err, len(err))
    run = lib.n2uq_conv_plan_run_quantizing

    def layer(_keep=(x, thresholds, w, mult, bias, out, shape, plan, quantizer)):
        if run(*args) != 0:
            raise RuntimeError(err.value.decode())

    for _ in range(_core.plan_trial_runs()):
        layer()
    return layer, plan


def tflite_layer_models(size, channels, rng, out_channels=None, stride=1):
    """Float32 and int8 (int8 input/output) TFLite flatbuffers of one 3x3 conv on this shape."""
    import tensorflow as tf
    import tf_keras as keras

    inp = keras.Input((size, size, channels), batch_size=1)
    out = keras.layers.Conv2D(out_channels or channels, 3, stride, padding="same", use_bias=True)(inp)
    model = keras.Model(inp, out)
    result = {}
    for kind in ("float", "int8"):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if kind == "int8":
            def representative():
                for _ in range(4):
                    yield [rng.standard_normal((1, size, size, channels)).astype(np.float32)]
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        result[kind] = converter.convert()
    return result


def tflite_layer_interpreters(flatbuffers, threads):
    _, module = stock_interpreter()
    result = {}
    for kind, content in flatbuffers.items():
        interpreter = module.Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        result[kind] = interpreter
    return result


# Targets of the per-layer table: TFLite int8 time / ours, every row.
LAYER_TARGETS = {1: 2.0, 2: 1.0, 3: 1.0, 4: 1.0}
# The "path" column: the conv path per bit width, and for the dot / amx paths their form (3x3
# layers: Winograd unless the plan's timing chose the direct form).
PATH_ABBREVIATIONS = {("bitserial", "direct"): "bs", ("dot", "direct"): "dot", ("lut", "direct"): "lut",
                      ("amx", "direct"): "amx", ("dot", "winograd"): "wg", ("dot", "winograd_stride2"): "wg",
                      ("amx", "winograd"): "amx-wg", ("amx", "winograd_stride2"): "amx-wg",
                      ("amx", "direct_compact"): "amx-c"}
PATH_LEGEND = ("bs = bitserial, wg = dot in Winograd form (F(2x2, 3x3), or its polyphase variant at stride 2), "
               "dot = dot in direct form, amx-wg = the Winograd GEMM on AMX tiles, amx-c = amx in direct form "
               "with compact weights (codes expanded while the tiles run)")


def amx_phase_probe(seconds=0.3):
    """(direct-form us, Winograd-form us): the best call of one 28x28x128 W2A2 conv on the amx path in
    each form, interleaved for `seconds`; None where this CPU or build has no amx path. On the AMX Xeon VM
    the direct form ran about 86 us and the Winograd form 135 us, but for minutes at a time the host slowed
    the direct form about 3x and the Winograd form about 1.4x (plans prepared then pick the Winograd form),
    so the report gives both, at the start and at the end of the run, to say which phase it saw."""
    if "avx512" not in _core.supported_isas() or "amx" not in _core.supported_paths("avx512"):
        return None
    rng = np.random.default_rng(1)
    size, channels, bits = 28, 128, 2
    shape = _core.conv_shape(1, size, size, channels, channels, 3, padding=1, act_bits=bits, weight_bits=bits)
    w = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (channels, 3, 3, channels)), bits)
    packed = arena_array(_core.pack_bitplanes(rng.integers(0, 2 ** bits, (1, size, size, channels)), bits))
    out = arena_array(shape=(1, size, size, channels), dtype=np.float32)
    mult, bias = np.full(channels, 0.01, np.float32), np.zeros(channels, np.float32)
    saved = os.environ.get("N2UQ_DOT_WINOGRAD")
    plans = {}
    try:  # the core's switch to the direct form, read when a plan is made
        os.environ["N2UQ_DOT_WINOGRAD"] = "0"
        plans["direct"] = _core.ConvPlan(shape, w, isa="avx512", path="amx")
    finally:
        if saved is None:
            del os.environ["N2UQ_DOT_WINOGRAD"]
        else:
            os.environ["N2UQ_DOT_WINOGRAD"] = saved
    plans["winograd"] = _core.ConvPlan(shape, w, isa="avx512", path="amx")
    if plans["direct"].form != "direct" or plans["winograd"].form != "winograd":
        return None
    lib, err = _core.library(), ctypes.create_string_buffer(256)
    calls = {name: (plan._handle, ctypes.byref(shape), _core._ptr(packed), packed.size, _core._ptr(mult),
                    _core._ptr(bias), channels, _core._ptr(out), None, out.size, 1, err, len(err))
             for name, plan in plans.items()}
    best = {name: float("inf") for name in calls}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, call in calls.items():
            start = time.perf_counter()
            if lib.n2uq_conv_plan_run(*call) != 0:
                return None
            best[name] = min(best[name], time.perf_counter() - start)
    return best["direct"] * 1e6, best["winograd"] * 1e6


def describe_amx_probe(before, after):
    """The report's line for amx_phase_probe's answers at the start and end of the run (None: no line)."""
    if before is None or after is None:
        return None
    return ("AMX phase probe (one 28x28x128 W2A2 conv on the amx path, direct form / Winograd form, best call): "
            f"at start {before[0]:.0f} / {before[1]:.0f} us, at end {after[0]:.0f} / {after[1]:.0f} us (the direct "
            "form faster is the usual phase; where it is slower, the host slowed its tile work and the plans "
            "picked the Winograd form, amx-wg)")


def run_layers(args, isas, rng, md):
    print(f"\n== Per layer: GMAC/s (ResNet-18's 3x3 convs, batch 1; ours = quantize-and-pack + conv); {STATISTIC} of "
          f"{args.repeats} interleaved rounds, {args.sample_time * 1e3:g} ms samples; ISA: {', '.join(isas)}; path "
          f"{args.path}" + (f"; TFLite in {stock_interpreter()[0]} (XNNPACK)" if args.tflite else ""), flush=True)
    header = f"{'layer':>14} {'thr':>3} {'isa':>8} " + " ".join(f"{f'W{b}A{b}':>8}" for b in args.bits)
    if args.tflite:
        header += f" {'tfl fp32':>8} {'tfl int8':>8} " + " ".join(f"{f'W{b}A{b}/i8':>8}" for b in args.bits)
        header += f" {'fp32/i8':>8}"
    header += f" {'paths':>16} {'noise':>6}"
    print(header)
    md_header = ["layer", "threads"] + (["ISA"] if len(isas) > 1 else []) + [f"W{b}A{b}" for b in args.bits]
    if args.tflite:
        md_header += ["TFLite fp32", "TFLite int8"] + [f"W{b}A{b} vs int8" for b in args.bits] + ["fp32 vs int8"]
    md_header += ["path " + "/".join(f"W{b}" for b in args.bits), "noise"]
    md_rows, ratios = [], []
    # The rounds of every row are split over --layer-passes passes through all rows, so that a
    # row's rounds span the whole part's time: a minute in which another job holds a core (on a
    # shared machine) then costs some rounds of many rows, not every round of a few.
    rows = [(layer, size, channels, out_channels, stride, threads)
            for layer, size, channels, out_channels, stride in conv_layers(not args.skip_strided)
            for threads in args.threads]
    models, built, collected = {}, {}, {}
    # Our plans first, as a network prepares every layer before its first invoke: a plan's path
    # selection times the paths on this machine's threads, and TFLite's XNNPACK workers, still
    # spinning after an invoke, took the second core from 2-thread selections (they picked
    # bit-serial or LUT over a 2x faster path).
    for layer, size, channels, out_channels, stride, threads in rows:
        candidates, plans = {}, {}
        for isa in isas:
            for b in args.bits:
                candidates[(isa, b)], plans[(isa, b)] = our_layer(size, channels, b, isa, args.path, threads,
                                                                  rng, out_channels, stride)
        built[(layer, threads)] = candidates, plans
    passes = max(1, min(args.layer_passes, args.repeats))
    for index in range(passes):
        rounds = args.repeats // passes + (1 if index < args.repeats % passes else 0)
        for layer, size, channels, out_channels, stride, threads in rows:
            candidates, _ = built[(layer, threads)]
            if "int8" not in candidates and args.tflite:
                if layer not in models:
                    models[layer] = tflite_layer_models(size, channels, rng, out_channels, stride)
                for kind, interpreter in tflite_layer_interpreters(models[layer], threads).items():
                    candidates[kind] = interpreter.invoke
            samples, _ = interleaved(candidates, rounds, args.sample_time)
            for key, values in samples.items():
                collected.setdefault((layer, threads), {}).setdefault(key, []).extend(values)
        if passes > 1:
            print(f"(pass {index + 1} of {passes} over the {len(rows)} rows done)", flush=True)
    for layer, size, channels, out_channels, stride, threads in rows:
        work = macs(size, channels, out_channels, stride)
        _, plans = built[(layer, threads)]
        samples = collected[(layer, threads)]
        median = {key: summary(v) for key, v in samples.items()}
        noise = max(spread(v) for v in samples.values())
        for isa in isas:
            gmacs = [f"{work / median[(isa, b)] / 1e9:.1f}" for b in args.bits]
            chosen = "/".join(PATH_ABBREVIATIONS[(plans[(isa, b)].path, plans[(isa, b)].form)] for b in args.bits)
            row = f"{layer:>14} {threads:>3} {isa:>8} " + " ".join(f"{g:>8}" for g in gmacs)
            md_row = [layer, threads] + ([isa] if len(isas) > 1 else []) + gmacs
            if args.tflite:
                vs = {b: median["int8"] / median[(isa, b)] for b in args.bits}
                ratios.append((layer, threads, isa, vs, stride))
                row += f" {work / median['float'] / 1e9:8.1f} {work / median['int8'] / 1e9:8.1f} "
                row += " ".join(f"{vs[b]:8.2f}" for b in args.bits)
                row += f" {median['int8'] / median['float']:8.2f}"
                md_row += [f"{work / median['float'] / 1e9:.1f}", f"{work / median['int8'] / 1e9:.1f}"]
                md_row += [f"{vs[b]:.2f}x" for b in args.bits] + [f"{median['int8'] / median['float']:.2f}x"]
            row += f" {chosen:>16} {100 * noise:5.1f}%"
            md_row += [chosen, f"{100 * noise:.0f}%"]
            md_rows.append(md_row)
            print(row, flush=True)
    notes = []
    if args.tflite:
        print("W*A*/i8 and fp32/i8: TFLite int8 time / that time (> 1: faster than TFLite int8); paths: the conv "
              f"path per bit width ({PATH_LEGEND}); noise: largest IQR/median of any candidate in the row")
        # Over every row, then (where strided rows ran) over the stride-1 rows alone.
        groups = [("every layer row", ratios)]
        if any(r[4] != 1 for r in ratios):
            groups.append(("every stride-1 row", [r for r in ratios if r[4] == 1]))
        for bits in sorted(LAYER_TARGETS):
            if bits in args.bits:
                target = LAYER_TARGETS[bits]
                for label, rows in groups:
                    worst = min(rows, key=lambda r: r[3][bits])
                    met = all(r[3][bits] >= target for r in rows)
                    notes.append(f"W{bits}A{bits} >= {target:g}x TFLite int8 on {label}: "
                                 f"{'met' if met else 'NOT met'} (worst {worst[3][bits]:.2f}x at {worst[0]}, "
                                 f"{worst[1]} thread(s))")
        for note in notes:
            print("target: " + note)
    md.append("## Per layer: ResNet-18's 3x3 convs, batch 1 (GMAC/s, higher is better)")
    md.append("")
    md.append(f"{STATISTIC.capitalize()} of {args.repeats} interleaved rounds of {args.sample_time * 1e3:g} ms "
              f"samples (in {passes} pass(es) over all rows). Ours = the quantize-and-pack of the float input plus the "
              "conv (what a network pays per layer), both through the kernel core's C API on preallocated buffers, "
              "the conv from a plan prepared once; ISA "
              f"{', '.join(isas)}, path {args.path} (\"path\" column: the conv path per bit width, {PATH_LEGEND}, "
              "chosen by the plan's timing of the paths and forms this CPU runs when auto, and where a runner-up "
              "came within 2x of the winner, by the trial of both on the plan's first runs, which run back to back "
              "before the timing). TFLite's CONV_2D is a "
              f"one-layer int8-in/int8-out (or float32) model invoked in {stock_interpreter()[0]} with its default "
              "XNNPACK. "
              "\"vs int8\" = TFLite int8 time / that time (> 1: faster than int8). Noise = largest IQR/median of any "
              "candidate in the row. Rows HxWxC: stride 1, 'same' padding, C channels in and out; rows HxWxC/2->C': "
              "the first 3x3 conv of ResNet-18's stages 2-4, stride 2 ('same' padding), C' output channels (GMAC/s "
              "of its own MACs).")
    md.append("")
    md += markdown_table(md_header, md_rows)
    md.append("")
    md += [f"- Target: {note}" for note in notes]
    if notes:
        md.append("")
    return notes


def our_quantize_pack(size, channels, bits, isa, threads, rng):
    """A zero-argument callable running n2uq_quantize_and_pack (the delegate's N2UQQuantizePack op)
    on one float activation [1, size, size, channels] through the C API on preallocated buffers."""
    x = arena_array(rng.normal(0.3, 1.0, (1, size, size, channels)).astype(np.float32))
    thresholds = np.sort(rng.uniform(-0.5, 1.5, 2 ** bits - 1)).astype(np.float32)
    out = arena_array(shape=(size * size, bits, _core.words_per_plane(channels)), dtype=np.uint64)
    lib, err = _core.library(), ctypes.create_string_buffer(256)
    args = (_core._ptr(x), x.size, size * size, channels, _core._ptr(thresholds), thresholds.size, 1.0, bits,
            _core._ptr(out), out.size, _core.ISAS.index(isa), threads, err, len(err))
    if lib.n2uq_quantize_and_pack(*args) != 0:
        raise RuntimeError(err.value.decode())
    return lambda _keep=(x, thresholds, out): lib.n2uq_quantize_and_pack(*args)


def run_quantize_pack(args, isas, rng, md):
    print(f"\n== Per layer: quantize-and-pack (float32 NHWC -> codes -> bit planes, batch 1): us per call and GB/s "
          f"of float input; {STATISTIC} of {args.repeats} interleaved rounds, {args.sample_time * 1e3:g} ms samples",
          flush=True)
    print(f"{'layer':>14} {'thr':>3} {'isa':>8} " + " ".join(f"{f'A{b} us':>8} {f'A{b} GB/s':>8}" for b in args.bits)
          + f" {'noise':>6}")
    md_header = ["layer", "threads"] + (["ISA"] if len(isas) > 1 else [])
    md_header += [col for b in args.bits for col in (f"A{b} us", f"A{b} GB/s")] + ["noise"]
    md_rows = []
    for size, channels in SHAPES:
        layer = f"{size}x{size}x{channels}"
        gigabytes = size * size * channels * 4 / 1e9
        for threads in args.threads:
            candidates = {(isa, b): our_quantize_pack(size, channels, b, isa, threads, rng)
                          for isa in isas for b in args.bits}
            samples, _ = interleaved(candidates, args.repeats, args.sample_time)
            median = {key: summary(v) for key, v in samples.items()}
            noise = max(spread(v) for v in samples.values())
            for isa in isas:
                cells = [(f"{median[(isa, b)] * 1e6:.1f}", f"{gigabytes / median[(isa, b)]:.1f}") for b in args.bits]
                print(f"{layer:>14} {threads:>3} {isa:>8} " + " ".join(f"{us:>8} {gb:>8}" for us, gb in cells)
                      + f" {100 * noise:5.1f}%", flush=True)
                md_rows.append([layer, threads] + ([isa] if len(isas) > 1 else [])
                               + [c for cell in cells for c in cell] + [f"{100 * noise:.0f}%"])
    md.append("## Per layer: quantize-and-pack (us per call, GB/s of float32 input)")
    md.append("")
    md.append(f"`n2uq_quantize_and_pack` (the delegate's N2UQQuantizePack op) on a [1, H, W, C] float32 activation "
              f"through the C API on preallocated buffers; {STATISTIC} of {args.repeats} interleaved rounds of "
              f"{args.sample_time * 1e3:g} ms samples. Noise = largest IQR/median of any candidate in the row.")
    md.append("")
    md += markdown_table(md_header, md_rows)
    md.append("")


LCE_SETUP = ("python3.11 -m venv /tmp/lce && /tmp/lce/bin/pip install 'numpy<2' 'tensorflow==2.15.*' 'larq==0.13.*' "
             "larq-compute-engine==0.16.0")


def run_lce(args, md):
    """1 bit against Larq Compute Engine's binary conv (benchmarks/lce_layers.py in LCE's own Python)."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = [args.lce_python, os.path.join(here, "lce_layers.py"), "--core-lib", _core.build(verbose=False),
               "--repeats", str(args.repeats), "--sample-time", str(args.sample_time), "--statistic", STATISTIC,
               "--threads", *map(str, args.threads)]
    print(f"\n== Per layer, 1 bit: ours W1A1 vs Larq Compute Engine's binary conv ({args.lce_python})", flush=True)
    # LCE's environment has its own TensorFlow and Keras: none of this process's settings for them.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(result.stderr[-3000:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode})")
    rows = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("JSON ")]
    print("\n".join(line for line in result.stdout.splitlines() if not line.startswith("JSON ")), flush=True)
    worst = min(rows, key=lambda r: r["ours_vs_lce"])
    note = (f"W1A1 >= Larq Compute Engine {rows[0]['lce_version']} on every shape: "
            f"{'met' if all(r['ours_vs_lce'] >= 1.0 for r in rows) else 'NOT met'} "
            f"(worst {worst['ours_vs_lce']:.2f}x at {worst['layer']}, {worst['threads']} thread(s))")
    md.append("## Per layer, 1 bit: ours W1A1 vs Larq Compute Engine's binary conv (GMAC/s)")
    md.append("")
    md.append(f"`benchmarks/lce_layers.py` in a separate environment (LCE {rows[0]['lce_version']} pins numpy < 2), "
              "timing both in the same process in interleaved rounds: LCE = larq QuantConv2D (ste_sign input and "
              "kernel, pad_values=1) converted by LCE's converter and run by its interpreter, the input binarization "
              "included, its Python call's input/output copies subtracted (a same-size one-ReLU model timed "
              "alongside); ours = quantize-and-pack + conv plan through the C API. LCE's own documentation says its "
              "x86 build runs reference (unoptimized) kernels: it is optimized for ARMv8, so on x86 this row "
              "measures LCE's fallback.")
    md.append("")
    md += markdown_table(["layer", "threads", "LCE", "ours W1A1", "ours vs LCE", "path", "noise"],
                         [[r["layer"], r["threads"], f"{r['lce_gmacs']:.1f}", f"{r['ours_gmacs']:.1f}",
                           f"{r['ours_vs_lce']:.2f}x", r["path"], f"{100 * r['noise']:.0f}%"] for r in rows])
    md.append("")
    md.append(f"- Target: {note}")
    md.append("")
    return [note]


# ------------------------------------------------------------------ part 2 and 3: ResNet-18

def relu_resnet18(input_shape, classes=1000):
    """The standard ResNet-18 (He et al., v1 basic blocks, ReLU, BN after every conv): the network
    a TFLite user would ship in int8 instead of the N2UQ model (whose RPReLUs TFLite int8 cannot run)."""
    import tf_keras as keras
    from tf_keras import layers

    def conv_bn(x, filters, kernel, stride, name, relu=True):
        x = layers.ZeroPadding2D(kernel // 2, name=name + "_pad")(x) if kernel > 1 else x
        x = layers.Conv2D(filters, kernel, stride, use_bias=False, name=name + "_conv")(x)
        x = layers.BatchNormalization(epsilon=1e-5, name=name + "_bn")(x)
        return layers.ReLU(name=name + "_relu")(x) if relu else x

    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, 64, 7, 2, "stem")
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, 2)(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layer{stage + 1}_{block}"
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv_bn(x, filters, 1, stride, name + "_downsample", relu=False)
            y = conv_bn(x, filters, 3, stride, name + "_1")
            y = conv_bn(y, filters, 3, 1, name + "_2", relu=False)
            x = layers.ReLU(name=name + "_out")(layers.Add(name=name + "_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="resnet18_relu")


def _randomize_float(model, rng):
    """Random BN affine and RPReLU parameters (weights keep their He init)."""
    for v in model.weights:
        name, shape = v.name.split("/")[-1], tuple(v.shape)
        if name.startswith("gamma"):
            v.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif name.startswith("beta") and "n2uq" not in v.name:
            v.assign(rng.normal(0.0, 0.2, shape).astype(np.float32))
        elif name.startswith(("bias1", "bias2")):
            v.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
        elif name.startswith("alpha"):
            v.assign(rng.uniform(0.1, 0.4, shape).astype(np.float32))


def _randomize_quantizers(model, rng):
    """Non-uniform thresholds spread over the normalized activations (codes use all levels)."""
    for v in model.weights:
        name, shape = v.name, tuple(v.shape)
        if "n2uq_start" in name:
            v.assign(rng.uniform(-0.6, -0.1))
        elif "n2uq_intervals" in name:
            n = shape[0]
            v.assign((rng.uniform(0.1, 0.6, shape) * 3.0 / max(n, 3)).astype(np.float32))
        elif "n2uq_beta" in name:
            v.assign(rng.uniform(0.7, 1.4))


def _calibrate_batch_norm(model, images):
    """Moving statistics = the batch statistics of `images` (one training-mode pass at momentum 0),
    so every BN output is normalized and the quantizers see activations of unit scale."""
    import tf_keras as keras
    bns = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def code_spread(quantized, image):
    """Over the lowered layers: mean fraction of the 2^b levels used, and the layers using one level."""
    from n2uq_tf.export.lowering import lower
    codes = lower(quantized).activation_codes(image)
    used, single = [], []
    bits = {w.layer.name: w.quantize_config.activation_bits for w in quantized.layers
            if type(w).__name__ == "N2UQWrapper"}
    for name, c in codes.items():
        values = np.unique(c.numpy())
        used.append(len(values) / 2 ** bits.get(name, 1))
        if len(values) < 2:
            single.append(name)
    return float(np.mean(used)), single, len(codes)


def layer_check(quantized, path, probe, label):
    """Sanity lines: each N2UQ conv of the exported model against its Keras layer (wrapper + folded BN)
    fed the interpreter's own input to that layer, and where the whole-model outputs first part.

    Feeding each layer the interpreter's input isolates the kernels: a random-weight network amplifies
    every activation that float rounding puts on the other side of a threshold, so whole-model
    outputs drift apart at 224x224 without any kernel error."""
    import tf_keras as keras
    from n2uq_tf import inspect_tflite
    from n2uq_tf import tflite
    name, module = stock_interpreter()
    delegate = tflite.load_delegate("litert" if name == "ai_edge_litert" else "tflite")
    kwargs = {"experimental_preserve_all_tensors": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = module.Interpreter(model_path=path, num_threads=2, experimental_delegates=[delegate], **kwargs)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], probe)
    interpreter.invoke()
    ops = inspect_tflite(path).operators
    fused = sorted({op.name for op in ops if op.name in N2UQ_FUSED_OPS})
    if fused:  # a fused conv's outputs are its stage's, not the layer's: nothing to hold against Keras
        raise ValueError(f"layer_check reads files without fused ops (export_tflite(fuse=False)); {path} has "
                         f"{', '.join(fused)}")
    producer_input = {op.outputs[0]: op.inputs[0] for op in ops if op.name in N2UQ_QUANTIZE_OPS}
    names = {layer.name for layer in quantized.layers}
    isolated, chained, first = [], [], None
    for op in ops:
        if op.name != "N2UQConv2D" or op.inputs[0] not in producer_input:
            continue
        got = interpreter.get_tensor(op.outputs[0])
        layer_in = interpreter.get_tensor(producer_input[op.inputs[0]])
        bn_name = op.layer.replace("_downsample_conv", "_downsample_bn").replace("_conv", "_bn")
        wrapper = quantized.get_layer("quant_" + op.layer)
        y = wrapper(layer_in, training=False)
        bn = quantized.get_layer(bn_name) if bn_name in names else None
        if bn is not None:
            y = bn(y, training=False)
        y = y.numpy()
        scale = max(float(np.abs(y).max()), 1.0)
        isolated.append((float(np.abs(got - y).max()) / scale, op.layer))
        out = (bn or wrapper).get_output_at(-1)
        chained.append((op.layer, got, out))
    sub = keras.Model(quantized.inputs, [c[2] for c in chained])
    refs = sub(probe, training=False)
    for (layer, got, _), ref in zip(chained, refs):
        ref = ref.numpy()
        diff = np.abs(got - ref)
        scale = max(float(np.abs(ref).max()), 1.0)
        if first is None and diff.max() > 1e-4 * scale:
            first = (layer, float(np.mean(diff > 1e-4 * scale)), ref.shape)
    worst = max(isolated)
    lines = [f"{label}, each of its {len(isolated)} N2UQ convs fed the interpreter's own input vs its Keras layer "
             f"(+ folded BN): worst max |diff| / max |output| = {worst[0]:.2g} ({worst[1]}) "
             f"[{'within' if worst[0] <= 2e-5 else 'OUTSIDE'} the tests' 2e-5 float tolerance]"]
    if first is not None:
        lines.append(f"{label}, whole model vs Keras: outputs first part at {first[0]} {first[2][1:]}, on "
                     f"{100 * first[1]:.2f}% of its outputs (one input code that float rounding put across a "
                     f"threshold changes a 3x3 x {first[2][-1]}-channel footprint = "
                     f"{100 * 9 * first[2][-1] / np.prod(first[2][1:]):.2f}% of them); later layers amplify it")
    else:
        lines.append(f"{label}, whole model vs Keras: every N2UQ conv output within 1e-4 relative")
    return lines


def build_e2e_models(args, cache):
    """Exports every ResNet-18 variant into `cache`: {key: info dict}, plus the sanity lines."""
    import tensorflow as tf
    import n2uq_tf
    from n2uq_tf import models

    rng = np.random.default_rng(1)
    images = rng.standard_normal((4,) + E2E_INPUT).astype(np.float32)
    probe = rng.standard_normal((1,) + E2E_INPUT).astype(np.float32)

    def representative():
        for i in range(len(images)):
            yield [images[i:i + 1]]

    infos, sanity = {}, []
    t0 = time.perf_counter()
    import tf_keras as keras
    keras.utils.set_random_seed(0)
    float_model = models.resnet18(input_shape=E2E_INPUT)
    _randomize_float(float_model, rng)
    _calibrate_batch_norm(float_model, images)
    expected_float = float_model(probe, training=False).numpy()

    relu_model = relu_resnet18(E2E_INPUT)
    _randomize_float(relu_model, rng)
    _calibrate_batch_norm(relu_model, images)
    expected_relu = relu_model(probe, training=False).numpy()
    # The float stem alone (what every variant of ours keeps as float builtins, as the paper keeps the
    # first layer full precision): how much of an invoke no low-bit kernel can take over.
    stem_model = keras.Model(float_model.input, float_model.get_layer("stem_relu").output)
    expected_stem = stem_model(probe, training=False).numpy()
    twins = {"tfl": ("float twin", float_model, expected_float), "relu": ("ReLU ResNet-18", relu_model, expected_relu),
             "stem": (STEM_LABEL, stem_model, expected_stem)}
    for prefix, (twin, keras_model, expected) in twins.items():
        for kind in ("float", "int8"):
            path = os.path.join(cache, f"resnet18_{prefix}_{kind}.tflite")
            start = time.perf_counter()
            converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
            if kind == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = representative
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            with open(path, "wb") as f:
                f.write(converter.convert())
            label = f"TFLite float32 ({twin})" if kind == "float" else f"TFLite int8 PTQ ({twin})"
            infos[f"{prefix}_{kind}"] = {"label": label, "path": path, "ours": False, "expected": expected,
                                         "convert_s": time.perf_counter() - start, "part": prefix == "stem"}
            print(f"  converted {label}: {os.path.getsize(path):,} B in {time.perf_counter() - start:.1f} s",
                  flush=True)
            if (kind == "int8" and prefix in ("relu", "stem")) or (kind == "float" and prefix == "stem"):
                # The same file with our delegate, which runs its stem conv (3 input channels; every
                # other op stays TFLite's): what our kernels give a TFLite user's own model, and the
                # stem as every export of ours runs it.
                infos[f"{prefix}_{kind}_n2uq"] = dict(infos[f"{prefix}_{kind}"], delegate=True,
                                                      label=f"{label} + N2UQ delegate")

    for bits in sorted(set(args.e2e_bits) | set(args.e2e_int8_bits)):
        start = time.perf_counter()
        quantized = models.quantize(float_model, bits=bits)
        _randomize_quantizers(quantized, rng)
        _calibrate_batch_norm(quantized, images)
        expected = quantized(probe, training=False).numpy()
        build_s = time.perf_counter() - start
        check_layers = True  # a few seconds per model
        if check_layers:
            used, single, count = code_spread(quantized, probe)
            sanity.append(f"W{bits}A{bits} activation codes on the probe image: {count} quantized convs use on "
                          f"average {100 * used:.0f}% of their levels; single-level layers: "
                          f"{', '.join(single) or 'none'}")
        # unfused: the per-layer sanity lines read it (a fused conv outputs its stage), and the fused file
        # is checked against it bit for bit; timed too for --e2e-unfused-bits
        kinds = (["float", "unfused"] if bits in args.e2e_bits else []) + (
            ["int8"] if bits in args.e2e_int8_bits else [])
        for kind in kinds:
            path = os.path.join(cache, f"resnet18_w{bits}a{bits}_{kind}.tflite")
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                kwargs = {"inference_type": "int8", "representative_dataset": representative} if kind == "int8" else {}
                if kind == "unfused":
                    kwargs["fuse"] = False
                _, report = n2uq_tf.export_tflite(quantized, path, return_report=True, **kwargs)
            label = f"ours W{bits}A{bits}" + {"float": "", "int8": " (int8 builtins)", "unfused": " unfused"}[kind]
            infos[f"w{bits}_{kind}"] = {"label": label, "path": path, "ours": True, "bits": bits, "kind": kind,
                                        "expected": expected, "convert_s": time.perf_counter() - start,
                                        "kept_builtin": [r.name for r in report.kept_builtin],
                                        "timed": kind != "unfused" or bits in args.e2e_unfused_bits}
            if check_layers and kind == "unfused":
                sanity += layer_check(quantized, path, probe, label)
            print(f"  exported {label}: {os.path.getsize(path):,} B in {time.perf_counter() - start:.1f} s "
                  f"(+{build_s:.1f} s to build and calibrate the Keras model)", flush=True)
        del quantized
    print(f"  models ready in {time.perf_counter() - t0:.0f} s", flush=True)
    for key, info in infos.items():
        got = run_once(info, probe)
        exp = info["expected"]
        scale = max(float(np.abs(exp).max()), 1.0)
        diff = float(np.abs(got - exp).max())
        info["sanity"] = (diff, scale, int(got.argmax()) == int(exp.argmax()))
        sanity.append(f"{info['label']} vs its Keras model on one 224x224 image: max |diff| {diff:.3g} "
                      f"({diff / scale:.2g} of max |logit| {scale:.3g}), "
                      f"top-1 {'equal' if info['sanity'][2] else 'DIFFERS'}"
                      + ((" [within the tests' 2e-5 relative float tolerance]" if diff <= 2e-5 * scale else
                          " [beyond the tests' 2e-5 relative tolerance: see the per-layer lines for where]")
                         if info["ours"] and info["kind"] in ("float", "unfused")
                         else " [quantized by the converter: not expected to match closely]"
                         if "int8" in key else ""))
    for info in infos.values():  # the fused export computes what the unfused one does, bit for bit
        if info["ours"] and info["kind"] == "float" and f"w{info['bits']}_unfused" in infos:
            same = np.array_equal(run_once(info, probe).view(np.uint32),
                                  run_once(infos[f"w{info['bits']}_unfused"], probe).view(np.uint32))
            sanity.append(f"{info['label']} (fused) vs {info['label']} unfused on the probe image: "
                          + ("bit-identical outputs" if same else "outputs DIFFER"))
    return infos, sanity


def make_interpreter(info, threads):
    """(interpreter, delegate or None) in the stock interpreter; ours get the N2UQ delegate."""
    from n2uq_tf import tflite
    name, module = stock_interpreter()
    delegate = None
    delegates = []
    if info["ours"] or info.get("delegate"):
        delegate = tflite.load_delegate("litert" if name == "ai_edge_litert" else "tflite")
        delegates = [delegate]
    interpreter = module.Interpreter(model_path=info["path"], num_threads=threads, experimental_delegates=delegates)
    interpreter.allocate_tensors()
    return interpreter, delegate


def run_once(info, image):
    interpreter, _ = make_interpreter(info, 2)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], image.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).astype(np.float32)


def run_end_to_end(args, infos, md):
    from n2uq_tf import tflite
    interp_name = stock_interpreter()[0]
    print(f"\n== End to end: ResNet-18 {'x'.join(map(str, E2E_INPUT))}, batch 1, {interp_name}; {STATISTIC} of "
          f"{args.e2e_repeats} interleaved rounds of ~{args.e2e_sample_time * 1e3:g} ms samples", flush=True)
    order = [k for k in infos if infos[k]["ours"] and infos[k]["timed"]] + [
        "relu_int8", "relu_int8_n2uq", "relu_float", "tfl_int8", "tfl_float", "stem_float", "stem_float_n2uq",
        "stem_int8", "stem_int8_n2uq"]
    header = (f"{'model':<34} {'thr':>3} {STATISTIC + ' ms':>10} {'noise':>6} {'vs ReLU i8':>10} {'vs twin i8':>10} "
              f"{'N2UQ conv':>9} {'pack/pool':>9} {'rest':>6}")
    print(header)
    md_rows, results = [], {}
    image = np.random.default_rng(3).standard_normal((1,) + E2E_INPUT).astype(np.float32)
    for threads in args.threads:
        live = {key: make_interpreter(infos[key], threads) for key in order}
        for interpreter, delegate in live.values():
            inp = interpreter.get_input_details()[0]
            interpreter.set_tensor(inp["index"], image)
            # Warm-up (caches, thread pools, XNNPACK weight packing); with our delegate also past its
            # layers' plan trials (tflite.default_warmup), so that every timed invoke runs settled paths.
            for _ in range(tflite.default_warmup() if delegate is not None else 2):
                interpreter.invoke()
        candidates = {key: interpreter.invoke for key, (interpreter, _) in live.items()}
        # Invoke seconds of every call in the rounds (the untimed one before each sample too), the
        # same invocations the delegate's profile covers: the shares below are exact fractions.
        counted = {key: 0.0 for key in order}

        def counting(key, fn, counted=counted):
            def call():
                start = time.perf_counter()
                fn()
                counted[key] += time.perf_counter() - start
            return call

        profiled = [key for key in order if infos[key]["ours"] or infos[key].get("delegate")]
        # Per round and model: (invoke seconds, conv seconds, pack/pool seconds), from running totals.
        totals = {key: (0.0, 0.0, 0.0) for key in profiled}
        round_parts = {key: [] for key in profiled}

        def reset(counted=counted):
            for key in counted:
                counted[key] = 0.0
            tflite.reset_kernel_profile()

        def read_round(profiled=profiled, live=live, counted=counted, totals=totals, round_parts=round_parts):
            for key in profiled:
                profile = tflite.kernel_profile(live[key][1])
                conv_s = sum(e["seconds"] for e in profile if e["op"] in N2UQ_CONV_OPS + BUILTIN_CONV_OPS)
                now = (counted[key], conv_s, sum(e["seconds"] for e in profile if e["op"] in N2UQ_OTHER_OPS))
                round_parts[key].append(tuple(b - a for a, b in zip(totals[key], now)))
                totals[key] = now

        samples, calls = interleaved({k: counting(k, fn) for k, fn in candidates.items()}, args.e2e_repeats,
                                     args.e2e_sample_time, before_rounds=reset, after_round=read_round)
        median = {key: summary(v) for key, v in samples.items()}
        for key in order:
            info = infos[key]
            shares = None
            if key in round_parts:
                # The median round's shares: a round in which the host preempted the process outside our
                # kernels (the interpreter's own time) would otherwise move the whole run's "rest".
                parts = np.array(round_parts[key])
                conv_share = float(np.median(parts[:, 1] / parts[:, 0]))
                pack_share = float(np.median(parts[:, 2] / parts[:, 0]))
                shares = (conv_share, pack_share, 1.0 - conv_share - pack_share)
            vs = median["relu_int8"] / median[key]
            vs_twin = median["tfl_int8"] / median[key]
            noise = spread(samples[key])
            results[(key, threads)] = {"median_ms": 1e3 * median[key], "noise": noise, "vs_int8": vs,
                                       "vs_twin_int8": vs_twin, "shares": shares}
            share_txt = [f"{100 * s:.0f}%" for s in shares] if shares else ["-", "-", "-"]
            print(f"{info['label']:<34} {threads:>3} {1e3 * median[key]:10.2f} {100 * noise:5.1f}% {vs:9.2f}x "
                  f"{vs_twin:9.2f}x {share_txt[0]:>9} {share_txt[1]:>9} {share_txt[2]:>6}", flush=True)
            md_rows.append([info["label"], threads, f"{1e3 * median[key]:.2f}", f"{vs:.2f}x", f"{vs_twin:.2f}x",
                            *share_txt, f"{100 * noise:.0f}%"])
        del live, candidates
    print("vs ReLU i8 / twin i8: TFLite int8 time of the ReLU ResNet-18 / of the RPReLU float twin, over that time "
          "(> 1: faster); N2UQ conv / pack/pool: share of the invoke time in our kernels (delegate profile; conv "
          "includes a fused conv's output stage; pack/pool: quantize-and-pack ops and the stem's fused pool); rest: "
          "builtins (stem conv, fc, ...) + interpreter")
    md.append(f"## End to end: ResNet-18, {'x'.join(map(str, E2E_INPUT))}, batch 1")
    md.append("")
    md.append(f"{interp_name} `Interpreter`, {STATISTIC} of {args.e2e_repeats} interleaved rounds (each round runs "
              f"every model of the row group for ~{args.e2e_sample_time * 1e3:g} ms), after 2 warm-up invokes "
              f"({tflite.default_warmup()} with the N2UQ delegate: its layers' plan trials included). Ours: "
              "`resnet18(bits=b)` exported with `export_tflite` (the RPReLUs and residual adds between a conv and the "
              "next quantizer fused into the conv's output stage, which also packs the next conv's input; the stem's "
              "zero pad and max pool, the first block's RPReLU and its quantize-and-pack in one N2UQMaxPool2DFused; "
              "float builtins for the 7x7 stem conv and the fc; \"unfused\" = `fuse=False`, every "
              "float op a builtin; \"int8 builtins\" = `inference_type=\"int8\"`: the stem conv, its pads "
              "and pool and the fc int8, the elementwise builtins float32), with the N2UQ delegate, which also runs "
              "builtin convs over <= 8 input channels (here the stem conv: float32, or int8 with TFLite's bytes; "
              "counted in \"N2UQ conv\"). \"+ N2UQ delegate\": TFLite's own file with our delegate, which takes "
              "its stem conv the same way (every other op stays TFLite's). "
              "TFLite int8 / "
              "float32: the standard ReLU ResNet-18 (what a TFLite user would otherwise ship) and the RPReLU float "
              "twin `resnet18()`, converted by TFLite (full-integer PTQ on 4 random images, float input/output; "
              "TFLite runs the twin's PReLUs through QUANTIZE/DEQUANTIZE), on the interpreter's default XNNPACK. "
              "\"vs ReLU int8\" / \"vs twin int8\" = that TFLite int8 time / the row's time. "
              "N2UQ conv / pack/pool = share of invoke time inside our conv ops (with their fused output stages) and "
              "our other ops (separate quantize-and-pack ops, the stem's fused pool; the delegate's per-kernel "
              "profile, per round, median over the rounds); rest = builtin ops and interpreter overhead. "
              "\"stem alone\" rows: the float twin's stem conv (zero pad, 7x7/2 conv with BN and ReLU) as a TFLite "
              "model of its own, float32 and int8 PTQ, timed in the same rounds, with TFLite's kernels and with "
              "ours: the part every variant of ours keeps as a float builtin (the paper keeps the first layer full "
              "precision). "
              "Noise = IQR/median over rounds.")
    md.append("")
    md += markdown_table(["model", "threads", f"{STATISTIC} ms", "vs ReLU int8", "vs twin int8", "N2UQ conv",
                          "N2UQ pack/pool", "rest", "noise"], md_rows)
    md.append("")
    return results


def run_sizes(infos, md):
    from n2uq_tf import inspect_tflite
    print("\n== File sizes", flush=True)
    print(f"{'model':<28} {'file B':>12} {'packed B':>11} {'ideal B':>11} {'other B':>11} {'file/(p+o)':>10}")
    rows, ratios = [], []
    for info in infos.values():
        if info.get("part"):
            continue
        size = os.path.getsize(info["path"])
        if info["ours"]:
            ins = inspect_tflite(info["path"])
            ideal = sum(layer.expected_bytes for layer in ins.layers)
            ratio = ins.size_ratio
            ratios.append((info["label"], ratio))
            print(f"{info['label']:<28} {size:>12,} {ins.packed_bytes:>11,} {ideal:>11,} {ins.float_bytes:>11,} "
                  f"{ratio:>10.4f}")
            rows.append([info["label"], f"{size:,}", f"{ins.packed_bytes:,}", f"{ideal:,}", f"{ins.float_bytes:,}",
                         f"{ratio:.4f}", "met" if ratio <= SIZE_TARGET else "**not met**"])
        else:
            print(f"{info['label']:<28} {size:>12,} {'-':>11} {'-':>11} {'-':>11} {'-':>10}")
            rows.append([info["label"], f"{size:,}", "-", "-", "-", "-", "-"])
    print(f"packed: bytes of the N2UQ weight buffers; ideal: sum of ceil(weights * bits / 8); other: every other "
          f"buffer (stem, fc, multipliers, biases, PReLU, ...); target file/(p+o) <= {SIZE_TARGET}")
    md.append("## File sizes: ResNet-18")
    md.append("")
    md.append("Packed = bytes of the N2UQ weight buffers (`inspect_tflite`); ideal = sum over layers of "
              "ceil(weights x bits / 8); other = every other buffer (float stem and fc, per-channel multipliers and "
              f"biases, PReLU slopes, int8 scales, ...). Target: file / (packed + other) <= {SIZE_TARGET:.2f}.")
    md.append("")
    md += markdown_table(["model", "file bytes", "packed N2UQ", "ideal packed", "other buffers",
                          "file / (packed + other)", f"<= {SIZE_TARGET:.2f}"], rows)
    md.append("")
    return ratios


# ------------------------------------------------------------------ main

def _versions():
    out = {"python": platform.python_version()}
    for name in ("tensorflow", "ai_edge_litert", "numpy"):
        try:
            from importlib import metadata
            out[name] = metadata.version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - informational only
            pass
    return out


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        # The results file itself does not count: a second run in a clone has rewritten it.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/RESULTS.md"], cwd=here, capture_output=True, text=True)
        if head.returncode == 0:
            return head.stdout.strip() + (" (working tree modified)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return "unknown"


RESULTS_TITLE = "# n2uq_tf kernel benchmark results"
RESULTS_INTRO = ("One section per CPU class (model name, family and model number), each written by `python "
                 "benchmarks/kernels.py --markdown benchmarks/RESULTS.md` on a CPU of that class: a run replaces the "
                 "section of its own class and keeps the others. Ratios are always between candidates timed in the "
                 "same run.")


def write_cpu_section(path, cpu, lines):
    """Writes `lines` as the section of CPU model `cpu` in the Markdown file `path`, keeping the
    sections of other CPU classes (delimited by cpu-class comments) as they are."""
    from n2uq_tf._io import atomic_open
    begin, end = f"<!-- cpu-class: {cpu} -->", "<!-- end cpu-class -->"
    sections, order = {}, []
    if os.path.exists(path):
        text = open(path).read()
        while "<!-- cpu-class: " in text:
            start = text.index("<!-- cpu-class: ")
            name = text[start + len("<!-- cpu-class: "):text.index(" -->", start)]
            stop = text.index(end, start) + len(end)
            sections[name] = text[start:stop]
            order.append(name)
            text = text[stop:]
    if cpu not in sections:
        order.append(cpu)
    sections[cpu] = "\n".join([begin] + lines).rstrip() + "\n" + end
    with atomic_open(path, "w") as f:
        f.write("\n\n".join([RESULTS_TITLE, RESULTS_INTRO] + [sections[name] for name in order]) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4], help="per-layer bit widths")
    parser.add_argument("--isa", nargs="+", default=None, help="ISA paths (default: the fastest supported)")
    parser.add_argument("--path", default="auto", choices=_core.PATHS,
                        help="per layer: conv kernel path (default auto: each plan times the paths this CPU runs)")
    parser.add_argument("--tflite", action=argparse.BooleanOptionalAction, default=True,
                        help="per layer: also time TFLite float32 and int8 CONV_2D (default on)")
    parser.add_argument("--repeats", type=int, default=9, help="per layer: interleaved timing rounds per row")
    parser.add_argument("--layer-passes", type=int, default=2,
                        help="per layer: passes over all rows that share each row's rounds (spreads a row's rounds "
                             "over the part's whole time)")
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median",
                        help="per-candidate statistic of the rounds (min: best round, for a machine shared with "
                             "other jobs)")
    parser.add_argument("--sample-time", type=float, default=0.05, help="per layer: seconds per timing sample")
    parser.add_argument("--skip-layers", action="store_true", help="skip the per-layer part")
    parser.add_argument("--skip-strided", action="store_true",
                        help="per layer: only the stride-1 3x3 shapes (not ResNet-18's stride-2 3x3 convs)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip the end-to-end ResNet-18 timing")
    parser.add_argument("--skip-sizes", action="store_true", help="skip the file-size table")
    parser.add_argument("--e2e-bits", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="end to end: our bit widths exported with float builtins")
    parser.add_argument("--e2e-unfused-bits", type=int, nargs="*", default=[2],
                        help="end to end: our bit widths also timed exported with fuse=False (none: skip)")
    parser.add_argument("--e2e-int8-bits", type=int, nargs="*", default=[2],
                        help="end to end: our bit widths also exported with inference_type='int8' (none: skip)")
    parser.add_argument("--e2e-repeats", type=int, default=9, help="end to end: interleaved timing rounds")
    parser.add_argument("--e2e-sample-time", type=float, default=0.25, help="end to end: seconds per sample")
    parser.add_argument("--lce-python", default=None, metavar="PYTHON",
                        help="per layer: also compare W1A1 with Larq Compute Engine, run by this Python (an "
                             f"environment with larq-compute-engine 0.16; e.g. {LCE_SETUP})")
    parser.add_argument("--cache-dir", default=None, help="keep the exported .tflite files here (default: a "
                                                           "temporary folder removed at the end)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write all tables as Markdown to PATH")
    args = parser.parse_args()
    global STATISTIC
    STATISTIC = args.statistic
    isas = args.isa or [_core.isa()]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    flags = cpu_flags()
    versions = _versions()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs; {' '.join(flags)}); kernel ISA: {', '.join(isas)}; "
          f"threads {args.threads}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    amx_before = amx_phase_probe()
    if amx_before:
        print(f"AMX phase probe (28x28x128 W2A2, direct / Winograd form): {amx_before[0]:.0f} / {amx_before[1]:.0f} us",
              flush=True)
    body, targets = [], []
    if not args.skip_layers:
        targets += run_layers(args, isas, rng, body)
        if args.lce_python:
            targets += run_lce(args, body)
        else:
            print(f"\n(1-bit comparison with Larq Compute Engine skipped: pass --lce-python; setup: {LCE_SETUP})")
        run_quantize_pack(args, isas, rng, body)
    e2e, size_ratios, sanity = None, None, []
    if not (args.skip_end_to_end and args.skip_sizes):
        with contextlib.ExitStack() as stack:
            cache = args.cache_dir
            if cache is None:
                cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="n2uq_bench_"))
            os.makedirs(cache, exist_ok=True)
            print(f"\n== Building and exporting ResNet-18 {'x'.join(map(str, E2E_INPUT))} (cache: {cache})", flush=True)
            infos, sanity = build_e2e_models(args, cache)
            print("sanity:\n" + "\n".join("  " + line for line in sanity), flush=True)
            if not args.skip_end_to_end:
                e2e = run_end_to_end(args, infos, body)
            if not args.skip_sizes:
                size_ratios = run_sizes(infos, body)
    if e2e:
        # The end-to-end targets, against the ReLU twin's full-integer int8 at 1 thread.
        goals = {2: 2.0, 4: 1.0}
        for key, threads in e2e:
            if key.startswith("w") and key.endswith("_float"):
                bits, r = int(key[1:-6]), e2e[(key, threads)]
                line = (f"end to end, W{bits}A{bits} at {threads} thread(s): {r['vs_int8']:.2f}x TFLite int8 of the "
                        f"ReLU ResNet-18 ({r['median_ms']:.2f} ms)")
                if threads == 1 and bits in goals:
                    line += f" (target >= {goals[bits]:g}x: {'met' if r['vs_int8'] >= goals[bits] else 'NOT met'})"
                if bits == 2 and r["shares"]:
                    outside = r["shares"][2]
                    line += (f"; share of invoke time outside our kernels {100 * outside:.0f}% (target <= 20%: "
                             f"{'met' if outside <= 0.20 else 'NOT met'})")
                    stem, tfl_stem = e2e.get(("stem_float_n2uq", threads)), e2e.get(("stem_float", threads))
                    if stem and tfl_stem:
                        line += (f" (its float stem conv counted as ours; the stem alone as a model of its own: "
                                 f"{stem['median_ms']:.2f} ms with our delegate, {tfl_stem['median_ms']:.2f} ms with "
                                 f"TFLite's kernels)")
                targets.append(line)
            if key.startswith("w") and key.endswith("_int8"):
                bits, r = int(key[1:-5]), e2e[(key, threads)]
                line = (f"end to end, W{bits}A{bits} with inference_type='int8' at {threads} thread(s): "
                        f"{r['vs_int8']:.2f}x TFLite int8 of the ReLU ResNet-18 ({r['median_ms']:.2f} ms)")
                if threads == 1 and bits in goals:
                    line += f" (target >= {goals[bits]:g}x: {'met' if r['vs_int8'] >= goals[bits] else 'NOT met'})"
                if r["shares"]:
                    outside = r["shares"][2]
                    line += (f"; share of invoke time outside our kernels (its int8 stem conv counted as ours) "
                             f"{100 * outside:.0f}%" + (f" (target <= 20%: {'met' if outside <= 0.20 else 'NOT met'})"
                                                        if bits == 2 else ""))
                targets.append(line)
    if size_ratios:
        worst = max(size_ratios, key=lambda r: r[1])
        targets.append(f"file / (packed + other) <= {SIZE_TARGET:.2f}: "
                       f"{'met' if worst[1] <= SIZE_TARGET else 'NOT met'} (worst {worst[1]:.4f}, {worst[0]})")
    if targets:
        print("\ntargets:\n" + "\n".join("  " + t for t in targets))
        body += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    amx_line = describe_amx_probe(amx_before, amx_phase_probe() if amx_before else None)
    if amx_line:
        print(amx_line)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s; load average at start {load_before}, at end {load_after}")
    if args.markdown:
        caches = cpu_caches()
        md = [f"## {cpu_class()} ({' '.join(flags) or 'n/a'})", "",
              f"Written by `python benchmarks/kernels.py {' '.join(sys.argv[1:])}` on "
              f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} (commit {_git_commit()}), {elapsed:.0f} s.", "",
              f"- CPU: {cpu_name()}, {cpu_family() or 'family n/a'}, {os.cpu_count()} logical CPUs"
              f"{', ' + caches if caches else ''}; flags: "
              f"{' '.join(flags) or 'n/a'}; kernel "
              f"features detected: {' '.join(_core.cpu_features()) or 'none'}",
              f"- Kernel ISA path: {', '.join(isas)}; threads: {', '.join(map(str, args.threads))}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"- Load average (1/5/15 min) at start {load_before and tuple(round(x, 2) for x in load_before)}, "
              f"at end {load_after and tuple(round(x, 2) for x in load_after)}"
              + (" (above the CPU count: other jobs competed for the cores during the run, the 2-thread rows and "
                 "the multi-millisecond end-to-end invokes most)"
                 if load_before and max(load_before[0], (load_after or [0])[0]) > (os.cpu_count() or 1) else ""),
              *([f"- {amx_line}"] if amx_line else []),
              f"- Repeats: per layer {args.repeats} rounds x {args.sample_time * 1e3:g} ms samples; end to end "
              f"{args.e2e_repeats} rounds x ~{args.e2e_sample_time * 1e3:g} ms samples; statistic per candidate: "
              f"{STATISTIC} of its rounds", ""]
        if sanity:
            md += ["Sanity checks:", ""] + [f"- {line}" for line in sanity] + [""]
        body = [("#" + line) if line.startswith("## ") else line for line in body]  # sections inside the CPU's
        write_cpu_section(args.markdown, cpu_class(), md + body)
        print(f"wrote the {cpu_class()} section of {args.markdown}")


if __name__ == "__main__":
    main()
