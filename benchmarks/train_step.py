"""Time of an N2UQ QAT training step relative to the float step, measured in the same run.

CIFAR-style ResNet-20 (He et al. 2016: 3 stages of 3 basic blocks, 16/32/64 filters),
32x32x3 inputs, batch 128, Adam, one `train_on_batch` per step. The quantized model is
`n2uq_tf.quantize_model(resnet20, bits)`: every conv but the first at `bits`, the
classifier float.

    python benchmarks/train_step.py [--steps 10] [--bits 2 4] [--implementation auto|reference] [--xla both|on|off]
                                    [--front-end both|tf_keras|keras3] [--finite-check-cost]
    python benchmarks/train_step.py --quantizer   # the activation quantizer alone, against a ReLU

Each model is timed without XLA and compiled by XLA (`compile(jit_compile=True)`); every
ratio is against the float model compiled the same way, built with the same Keras (tf_keras
through tfmot, or Keras 3: `--front-end`). Without XLA `implementation="auto"`
uses the fused C++ kernel on the CPU (`--implementation reference` times the pure-TF
quantizer instead); under XLA the quantizer is always the pure-TF one. `--finite-check-cost`
adds each quantized model without its NaN/Inf weight check.
"""

import argparse
import os
import statistics
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--implementation", choices=["auto", "reference"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the models this many times")
    parser.add_argument("--xla", choices=["both", "on", "off"], default="both",
                        help="time the models without XLA, compiled by XLA, or both (default)")
    parser.add_argument("--front-end", choices=["both", "tf_keras", "keras3"], default="both",
                        help="the Keras the models are built with: tf_keras (tfmot front end), Keras 3, or both")
    parser.add_argument("--quantizer", action="store_true",
                        help="time the N2UQ activation quantizer alone (forward + backward, one 128x32x32x16 "
                             "tensor) for each implementation, with and without XLA, against a ReLU")
    parser.add_argument("--finite-check-cost", action="store_true",
                        help="also time each quantized model without N2UQWrapper's NaN/Inf weight check")
    return parser.parse_args()


args = parse_args()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if args.implementation == "reference":
    os.environ["N2UQ_TF_DISABLE_FUSED"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import n2uq_tf  # noqa: E402  (before Keras 3, so that tf.keras stays as the environment says)

from kernels import cpu_name  # noqa: E402  (benchmarks/kernels.py, beside this script)


def resnet20(keras, num_classes=10):
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for stage, filters in enumerate([16, 32, 64]):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
            y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
            y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
            y = keras.layers.BatchNormalization()(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
                shortcut = keras.layers.BatchNormalization()(shortcut)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(num_classes)(x), name="resnet20")


def compiled(keras, model, jit_compile):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def time_steps(model, x, y, steps):
    """(wall seconds, process CPU seconds) per step. CPU time counts every thread's work and
    is immune to a virtual machine's stolen time, so its ratio is the steadier figure."""
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def quantizer_table():
    """Forward + backward of one activation quantizer against ReLU's, each without and with XLA."""
    x = tf.random.uniform((args.batch, 32, 32, 16), -0.5, 2.5, seed=0)
    g = tf.random.normal(x.shape, seed=1)

    def step(function, params):
        def run(x):  # every gradient is returned, so none of the backward's sums is left out
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = function(x, *params)
            return tape.gradient(y, [x] + params, output_gradients=g)
        return run

    def quantizer(bits, implementation):
        n = 2 ** bits - 1
        params = [tf.Variable(0.0), tf.Variable(tf.fill([n], 2.0 / n)), tf.Variable(1.0), tf.Variable(1.0)]
        return lambda x, *p: n2uq_tf.ops.n2uq_quantize(x, *p, bits, implementation=implementation), params

    rows = {("ReLU", "-", False): tf.function(step(tf.nn.relu, [])),
            ("ReLU", "-", True): tf.function(step(tf.nn.relu, []), jit_compile=True)}
    for bits in args.bits:
        implementations = ["fused", "reference"] if n2uq_tf.ops.active_implementation() == "fused" else ["reference"]
        for implementation in implementations:
            rows[(f"N2UQ A{bits}", implementation, False)] = tf.function(step(*quantizer(bits, implementation)))
        rows[(f"N2UQ A{bits}", "reference", True)] = tf.function(step(*quantizer(bits, "auto")), jit_compile=True)
    samples = {key: [] for key in rows}
    for function in rows.values():
        [t.numpy() for t in function(x)]
    for _ in range(args.rounds * args.steps):
        for key, function in rows.items():
            wall, cpu = time.perf_counter(), time.process_time()
            [t.numpy() for t in function(x)]
            samples[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"\nActivation quantizer alone, forward + backward, {tuple(x.shape)} float32, TF {tf.__version__}, "
          f"{cpu_name()}, {os.cpu_count()} CPU threads, load average {load_average():.1f} at the end; "
          f"medians of {args.rounds * args.steps} interleaved runs\n")
    print("| op        | implementation | XLA | wall ms | CPU ms | CPU vs ReLU (same XLA) |")
    print("|-----------|----------------|-----|---------|--------|------------------------|")
    for (name, implementation, jit), times in samples.items():
        relu_cpu = statistics.median(t[1] for t in samples[("ReLU", "-", jit)])
        wall, cpu = (statistics.median(t[i] for t in times) for i in (0, 1))
        print(f"| {name:9s} | {implementation:14s} | {'yes' if jit else 'no':3s} | {1e3 * wall:7.1f} | "
              f"{1e3 * cpu:6.1f} | {cpu / relu_cpu:21.2f}x |")
    return 0


def main():
    if args.quantizer:
        return quantizer_table()
    x = tf.random.uniform((args.batch, 32, 32, 3))
    y = tf.random.uniform((args.batch,), 0, 10, tf.int32)
    fronts = {"both": ["tf_keras", "keras3"], "tf_keras": ["tf_keras"], "keras3": ["keras3"]}[args.front_end]
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.xla]
    models = {}  # (front end, name, jit_compile) -> compiled model; each mode gets its own models
    for front in fronts:
        if front == "keras3":
            import keras
            from n2uq_tf.keras3 import N2UQWrapper as wrapper_class
        else:
            keras, wrapper_class = tf_keras, n2uq_tf.N2UQWrapper
        keras.utils.set_random_seed(0)
        float_model = resnet20(keras)
        for jit in modes:
            models[(front, "float32", jit)] = compiled(keras, keras.models.clone_model(float_model), jit)
            for bits in args.bits:
                models[(front, f"N2UQ W{bits}A{bits}", jit)] = compiled(
                    keras, n2uq_tf.quantize_model(float_model, bits=bits), jit)
                if args.finite_check_cost:
                    unchecked = n2uq_tf.quantize_model(float_model, bits=bits)
                    for layer in unchecked.layers:
                        if isinstance(layer, wrapper_class):
                            layer.check_finite = False
                    models[(front, f"W{bits}A{bits} no check", jit)] = compiled(keras, unchecked, jit)
    for model in models.values():
        time_steps(model, x, y, 3)  # trace, compile and warm up
    samples = {key: [] for key in models}
    for _ in range(args.rounds):  # interleave so drifts in machine load hit every model alike
        for key, model in models.items():
            samples[key] += time_steps(model, x, y, args.steps)

    load = load_average()
    print(f"\nResNet-20, 32x32, batch {args.batch}, TF {tf.__version__}, {cpu_name()}, {os.cpu_count()} CPU threads, "
          f"load average {load:.1f} at the end; medians of {args.rounds} x {args.steps} interleaved steps\n")
    print("| Keras    | model        | XLA | quantizer | wall ms/step | vs float | CPU ms/step | vs float |")
    print("|----------|--------------|-----|-----------|--------------|----------|-------------|----------|")
    for (front, name, jit), times in samples.items():
        base = samples[(front, "float32", jit)]
        base_wall = statistics.median(t[0] for t in base)
        base_cpu = statistics.median(t[1] for t in base)
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        quantizer = "-" if name == "float32" else n2uq_tf.ops.active_implementation(jit_compile=jit)
        print(f"| {front:8s} | {name:12s} | {'yes' if jit else 'no':3s} | {quantizer:9s} | {1e3 * wall:12.1f} | "
              f"{wall / base_wall:7.2f}x | {1e3 * cpu:11.1f} | {cpu / base_cpu:7.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
