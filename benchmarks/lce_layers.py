"""1-bit per-layer comparison with Larq Compute Engine's binary conv (run by kernels.py --lce-python).

    <lce venv>/bin/python benchmarks/lce_layers.py --core-lib n2uq_tf/_lib/n2uq_core_<hash>.so

Runs in a separate Python environment that has larq and larq-compute-engine (LCE 0.16 pins
numpy < 2, so it cannot share n2uq_tf's environment), hence no n2uq_tf import here: our kernel
core is loaded directly with ctypes (its plain C API, n2uq_core.h). For each ResNet-18 3x3 shape
(stride 1, pad 1, batch 1) and thread count, in interleaved rounds of the same process:

- LCE: a one-layer Keras model, larq QuantConv2D with ste_sign input and kernel quantizers
  (pad_values=1, LCE's fast padding), converted with LCE's own converter and run by LCE's
  interpreter (its LceQuantize binarizes the float input inside the graph). The interpreter's
  Python call copies the float input in and the output out; a one-ReLU model of the same
  input and output size is timed in the same rounds and its time subtracted (the ReLU's own
  work is subtracted too, which favours LCE).
- ours W1A1: quantize-and-pack of the same float input plus the conv from a plan (path auto),
  through the C API on preallocated buffers.

Prints one JSON line per row (for kernels.py) and a table.
"""

import argparse
import ctypes
import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]
SHAPE_FIELDS = ("batch", "in_height", "in_width", "in_channels", "out_channels", "kernel_height", "kernel_width",
                "stride_height", "stride_width", "dilation_height", "dilation_width", "pad_top", "pad_bottom",
                "pad_left", "pad_right", "act_bits", "weight_bits")


class ConvShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in SHAPE_FIELDS]


def load_core(path):
    lib = ctypes.CDLL(path)
    p, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_size_t
    lib.n2uq_quantize_and_pack.argtypes = [p, i64, i64, i32, p, i32, ctypes.c_float, i32, p, i64, ctypes.c_int,
                                           ctypes.c_int, ctypes.c_char_p, sz]
    lib.n2uq_conv_plan_create.argtypes = [ctypes.POINTER(ConvShape), p, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.POINTER(p), ctypes.c_char_p, sz]
    lib.n2uq_conv_plan_run.argtypes = [p, ctypes.POINTER(ConvShape), p, i64, p, p, i64, p, p, i64, ctypes.c_int,
                                       ctypes.c_char_p, sz]
    lib.n2uq_conv_plan_info.argtypes = [p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.n2uq_pack_bitplanes.argtypes = [p, i64, i64, i32, i32, p, i64, ctypes.c_char_p, sz]
    return lib


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def aligned_empty(shape, dtype):
    """An empty array at a 64-byte boundary, as TFLite's arena places tensors (kernels.py's
    arena_array; this script runs in LCE's environment and imports nothing of ours)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def ours_w1a1(lib, size, channels, threads, rng):
    """(callable, callable giving the plan's path name): quantize-and-pack + conv plan, 1-bit activations and
    weights."""
    err = ctypes.create_string_buffer(512)
    words = (channels + 63) // 64
    x = aligned_empty((1, size, size, channels), np.float32)
    x[...] = rng.standard_normal((1, size, size, channels))
    thresholds = np.zeros(1, np.float32)  # 1 bit: code = x > 0, the sign
    packed = aligned_empty(size * size * words, np.uint64)
    codes = rng.integers(0, 2, (channels * 9, channels)).astype(np.uint8)
    weights = np.empty(channels * 9 * words, np.uint64)
    if lib.n2uq_pack_bitplanes(ptr(codes), codes.size, channels * 9, channels, 1, ptr(weights), weights.size, err,
                               len(err)):
        raise RuntimeError(err.value.decode())
    shape = ConvShape(1, size, size, channels, channels, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    plan = ctypes.c_void_p()
    if lib.n2uq_conv_plan_create(ctypes.byref(shape), ptr(weights), weights.size, 0, 0, threads, ctypes.byref(plan),
                                 err, len(err)):
        raise RuntimeError(err.value.decode())
    mult = np.full(channels, 0.01, np.float32)
    bias = np.zeros(channels, np.float32)
    out = aligned_empty((1, size, size, channels), np.float32)
    keep = (x, thresholds, packed, weights, mult, bias, out, shape, plan)

    def run(_keep=keep):
        if lib.n2uq_quantize_and_pack(ptr(x), x.size, size * size, channels, ptr(thresholds), 1, 1.0, 1, ptr(packed),
                                      packed.size, 0, threads, err, len(err)) or \
                lib.n2uq_conv_plan_run(plan, ctypes.byref(shape), ptr(packed), packed.size, ptr(mult), ptr(bias),
                                       channels, ptr(out), None, out.size, threads, err, len(err)):
            raise RuntimeError(err.value.decode())

    def path_name():  # read after the timing: the plan's first runs may try the selection's runner-up
        path = ctypes.c_int()
        lib.n2uq_conv_plan_info(plan, None, ctypes.byref(path))
        lib.n2uq_path_name.restype = ctypes.c_char_p  # the core's own names: no list here to fall behind it
        return lib.n2uq_path_name(path.value).decode()

    run()
    return run, path_name


def lce_models(size, channels):
    """(binary conv, copy-only ReLU) LCE flatbuffers of one layer on this shape."""
    import larq
    import larq_compute_engine as lce
    import tensorflow as tf

    inp = tf.keras.Input((size, size, channels), batch_size=1)
    conv = larq.layers.QuantConv2D(channels, 3, padding="same", pad_values=1.0, input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)(inp)
    relu = tf.keras.layers.ReLU()(inp)
    return (lce.convert_keras_model(tf.keras.Model(inp, conv)), lce.convert_keras_model(tf.keras.Model(inp, relu)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core-lib", required=True, help="path of n2uq_tf's built kernel core library")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sample-time", type=float, default=0.05)
    parser.add_argument("--statistic", choices=("median", "min"), default="median")
    args = parser.parse_args()
    import larq_compute_engine
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    lib = load_core(args.core_lib)
    rng = np.random.default_rng(0)
    rows = []
    for size, channels in SHAPES:
        macs = size * size * channels * channels * 9
        conv_model, relu_model = lce_models(size, channels)
        for threads in args.threads:
            x = rng.standard_normal((1, size, size, channels)).astype(np.float32)
            lce_conv = Interpreter(conv_model, num_threads=threads)
            lce_copy = Interpreter(relu_model, num_threads=threads)
            ours, path = ours_w1a1(lib, size, channels, threads, rng)
            candidates = {"lce": lambda conv=lce_conv, x=x: conv.interpreter.predict([x]),
                          "copy": lambda relu=lce_copy, x=x: relu.interpreter.predict([x]), "ours": ours}
            calls = {}
            for key, fn in candidates.items():
                fn()
                start = time.perf_counter()
                fn()
                calls[key] = max(1, int(args.sample_time / max(time.perf_counter() - start, 1e-6)))
            samples = {key: [] for key in candidates}
            for _ in range(args.repeats):
                for key, fn in candidates.items():
                    fn()  # untimed: the candidate's own data in cache
                    start = time.perf_counter()
                    for _ in range(calls[key]):
                        fn()
                    samples[key].append((time.perf_counter() - start) / calls[key])
            statistic = np.min if args.statistic == "min" else np.median
            median = {key: float(statistic(v)) for key, v in samples.items()}
            lce_s = max(median["lce"] - median["copy"], 1e-9)
            row = {"layer": f"{size}x{size}x{channels}", "threads": threads, "lce_gmacs": macs / lce_s / 1e9,
                   "lce_raw_gmacs": macs / median["lce"] / 1e9, "ours_gmacs": macs / median["ours"] / 1e9,
                   "ours_vs_lce": lce_s / median["ours"], "path": path(),
                   "noise": max(float(np.subtract(*np.percentile(v, [75, 25])) / np.median(v))
                                for v in samples.values()),
                   "lce_version": getattr(larq_compute_engine, "__version__", "?")}
            rows.append(row)
            print("JSON " + json.dumps(row), flush=True)
    print(f"{'layer':>12} {'thr':>3} {'LCE GMAC/s':>10} {'ours W1A1':>10} {'ours/LCE':>9} {'path':>10}")
    for r in rows:
        print(f"{r['layer']:>12} {r['threads']:>3} {r['lce_gmacs']:10.1f} {r['ours_gmacs']:10.1f} "
              f"{r['ours_vs_lce']:8.2f}x {r['path']:>10}")


if __name__ == "__main__":
    main()
