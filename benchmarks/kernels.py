"""Bit-serial conv throughput of the kernel core on ResNet-18's 3x3 layer shapes.

    python benchmarks/kernels.py [--threads 1 2] [--bits 1 2 3 4] [--isa avx512 ...] [--tflite]

GMAC/s = N*OH*OW*OC*KH*KW*IC / median time (stride 1, pad 1, batch 1), for each bit
width (WkAk), thread count and ISA path. Our conv is called through the C API with
preallocated buffers, as a TFLite delegate calls it (the NumPy wrapper would allocate the
output every call). With --tflite it also builds a one-layer tf_keras model per shape,
converts it to TFLite float32 and int8 (representative dataset) and times
tf.lite.Interpreter's CONV_2D in the same run, then prints TFLite int8 time / our time.

Every candidate of a (layer, threads) row is timed once per round, rounds interleaved
(--repeats of them), so drift on a shared machine hits all candidates alike; the table
shows medians over rounds and the "noise" column the largest relative spread
(interquartile range / median) of any candidate in the row. A benchmark, not a test:
nothing here asserts a speed.
"""

import argparse
import ctypes
import os
import platform
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from n2uq_tf.tflite import _core  # noqa: E402

SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (spatial, channels), 3x3, stride 1, pad 1


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calls_per_sample(fn, min_time):
    """Calls per timing sample so that one sample lasts about min_time seconds."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, int(min_time / once))


def sample(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def macs(size, channels):
    return size * size * channels * channels * 9


def our_conv(size, channels, bits, isa, threads, rng):
    """A zero-argument callable running one conv through the C API on preallocated buffers."""
    x = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (1, size, size, channels)), bits)
    w = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (channels, 3, 3, channels)), bits)
    mult = np.full(channels, 0.01, np.float32)
    bias = np.zeros(channels, np.float32)
    out = np.empty((1, size, size, channels), np.float32)
    shape = _core.conv_shape(1, size, size, channels, channels, 3, padding=1, act_bits=bits, weight_bits=bits)
    lib, err = _core.library(), ctypes.create_string_buffer(256)
    args = (ctypes.byref(shape), _core._ptr(x), x.size, _core._ptr(w), w.size, _core._ptr(mult), _core._ptr(bias),
            channels, _core._ptr(out), None, out.size, _core.ISAS.index(isa), threads, err, len(err))
    if lib.n2uq_conv2d_bitserial(*args) != 0:
        raise RuntimeError(err.value.decode())
    # Keep the buffers alive with the closure.
    return lambda _keep=(x, w, mult, bias, out): lib.n2uq_conv2d_bitserial(*args)


def tflite_interpreters(size, channels, threads, rng):
    """Float32 and int8 tf.lite.Interpreter for one 3x3 conv on this shape."""
    import tensorflow as tf
    import tf_keras as keras

    inp = keras.Input((size, size, channels), batch_size=1)
    out = keras.layers.Conv2D(channels, 3, padding="same", use_bias=True)(inp)
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
        interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        data = np.zeros(detail["shape"], detail["dtype"])
        interpreter.set_tensor(detail["index"], data)
        result[kind] = interpreter
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--isa", nargs="+", default=None, help="ISA paths (default: the fastest supported)")
    parser.add_argument("--tflite", action="store_true", help="also time TFLite float32 and int8 CONV_2D")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds per row")
    parser.add_argument("--sample-time", type=float, default=0.05, help="seconds per timing sample")
    args = parser.parse_args()
    isas = args.isa or [_core.isa()]
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_name()}; ISA paths: {', '.join(isas)}; GMAC/s (3x3, stride 1, pad 1, batch 1); "
          f"median of {args.repeats} interleaved rounds")
    header = f"{'layer':>14} {'thr':>3} {'isa':>8} " + " ".join(f"{f'W{b}A{b}':>8}" for b in args.bits)
    if args.tflite:
        header += f" {'tfl fp32':>8} {'tfl int8':>8} " + " ".join(f"{f'W{b}A{b}/i8':>8}" for b in args.bits)
        header += f" {'fp32/i8':>8}"
    header += f" {'noise':>6}"
    print(header)
    for size, channels in SHAPES:
        layer = f"{size}x{size}x{channels}"
        work = macs(size, channels)
        for threads in args.threads:
            candidates = {}
            if args.tflite:
                for kind, interpreter in tflite_interpreters(size, channels, threads, rng).items():
                    candidates[kind] = interpreter.invoke
            for isa in isas:
                for b in args.bits:
                    candidates[(isa, b)] = our_conv(size, channels, b, isa, threads, rng)
            calls = {key: calls_per_sample(fn, args.sample_time) for key, fn in candidates.items()}
            samples = {key: [] for key in candidates}
            for _ in range(args.repeats):
                for key, fn in candidates.items():
                    samples[key].append(sample(fn, calls[key]))
            median = {key: float(np.median(v)) for key, v in samples.items()}
            noise = max(float(np.subtract(*np.percentile(v, [75, 25])) / np.median(v)) for v in samples.values())
            for isa in isas:
                row = f"{layer:>14} {threads:>3} {isa:>8} " + " ".join(
                    f"{work / median[(isa, b)] / 1e9:8.1f}" for b in args.bits)
                if args.tflite:
                    row += f" {work / median['float'] / 1e9:8.1f} {work / median['int8'] / 1e9:8.1f} "
                    row += " ".join(f"{median['int8'] / median[(isa, b)]:8.2f}" for b in args.bits)
                    row += f" {median['int8'] / median['float']:8.2f}"
                row += f" {100 * noise:5.1f}%"
                print(row, flush=True)
    if args.tflite:
        print("W*A*/i8 and fp32/i8: TFLite int8 time / that time (> 1: faster than TFLite int8); "
              "noise: largest IQR/median of any candidate in the row")


if __name__ == "__main__":
    main()
