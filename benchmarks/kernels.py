"""Bit-serial conv throughput of the kernel core on ResNet-18's 3x3 layer shapes.

    python benchmarks/kernels.py [--threads 1 2] [--bits 1 2 3 4] [--isa avx512 ...] [--tflite]

GMAC/s = N*OH*OW*OC*KH*KW*IC / median time (stride 1, pad 1, batch 1), for each bit
width (WkAk), thread count and ISA path. With --tflite it also builds a one-layer
tf_keras model per shape, converts it to TFLite float32 and int8 (representative
dataset) and times tf.lite.Interpreter's CONV_2D in the same run, then prints our
time relative to int8. A benchmark, not a test: nothing here asserts a speed.
"""

import argparse
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


def time_call(fn, min_time=0.25, repeats=5):
    """Median seconds per call over `repeats` batches of calls lasting about min_time / repeats."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(min_time / repeats / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def macs(size, channels):
    return size * size * channels * channels * 9


def bench_ours(size, channels, bits, isa, threads, rng):
    x = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (1, size, size, channels)), bits)
    w = _core.pack_bitplanes(rng.integers(0, 2 ** bits, (channels, 3, 3, channels)), bits)
    mult = np.full(channels, 0.01, np.float32)
    bias = np.zeros(channels, np.float32)
    seconds = time_call(lambda: _core.conv2d_bitserial(x, w, channels, bits, bits, mult, bias, padding=1, isa=isa,
                                                       num_threads=threads))
    return seconds


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
    parser.add_argument("--isa", nargs="+", default=None, help="ISA paths (default: every supported one)")
    parser.add_argument("--tflite", action="store_true", help="also time TFLite float32 and int8 CONV_2D")
    args = parser.parse_args()
    isas = args.isa or _core.supported_isas()[::-1]
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_name()}; ISA paths: {', '.join(isas)}; GMAC/s (3x3, stride 1, pad 1, batch 1)")
    header = f"{'layer':>14} {'thr':>3} {'isa':>8} " + " ".join(f"{f'W{b}A{b}':>8}" for b in args.bits)
    if args.tflite:
        header += f" {'tfl fp32':>8} {'tfl int8':>8} " + " ".join(f"{f'W{b}A{b}/i8':>8}" for b in args.bits)
    print(header)
    for size, channels in SHAPES:
        layer = f"{size}x{size}x{channels}"
        work = macs(size, channels)
        for threads in args.threads:
            reference = {}
            if args.tflite:
                interpreters = tflite_interpreters(size, channels, threads, rng)
                for kind, interpreter in interpreters.items():
                    reference[kind] = time_call(interpreter.invoke)
            for isa in isas:
                seconds = {b: bench_ours(size, channels, b, isa, threads, rng) for b in args.bits}
                row = f"{layer:>14} {threads:>3} {isa:>8} " + " ".join(
                    f"{work / seconds[b] / 1e9:8.1f}" for b in args.bits)
                if args.tflite:
                    row += f" {work / reference['float'] / 1e9:8.1f} {work / reference['int8'] / 1e9:8.1f} "
                    row += " ".join(f"{reference['int8'] / seconds[b]:8.2f}" for b in args.bits)
                print(row, flush=True)
    if args.tflite:
        print("W*A*/i8: TFLite int8 time / our time (> 1: we are faster)")


if __name__ == "__main__":
    main()
