"""Compressed gradient exchange on a local multi-worker run: bytes, step time and accuracy.

Each configuration is one `examples/distributed.py` run under `n2uq_tf.distribute.launch`
(MultiWorkerMirroredStrategy, N workers on 127.0.0.1, the same data, seed and epochs), so the
uncompressed ("none", the framework's float32 all-reduce) baseline is measured in the same
session, on the same machine, next to every compressor:

    python benchmarks/distributed.py [--workers 2] [--model mlp] [--epochs 6] [--seeds 0 1]
        [--markdown benchmarks/DISTRIBUTED.md]

A second table times the codec itself on the model's gradients (one replica's encode and the
decode + sum of all payloads) op-by-op and XLA-fused, against the float32 training step: the
compression compute overhead and what fusing saved. Nothing here asserts a speed.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, os.pardir, "examples", "distributed.py")
DEFAULT_CONFIGS = ["none", "qsgd:2", "qsgd:4", "qsgd:8", "qsgdinf:2", "qsgdinf:4", "qsgdinf:8",
                   "nuqsgd:2", "nuqsgd:4", "nuqsgd:8"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="mlp", help="as examples/distributed.py --model")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and config")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="method[:bits], e.g. nuqsgd:4")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads per worker (default: cores / workers, at least 1)")
    parser.add_argument("--skip-codec", action="store_true", help="leave out the codec timing table")
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    return args


def run_config(args, method, bits, seed):
    from n2uq_tf.distribute import launch_workers
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, EXAMPLE, "--compression", method, "--bits", str(bits), "--model", args.model,
                   "--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--seed", str(seed), "--threads", str(args.threads), "--json", out]
        log = open(os.path.join(tmp, "log.txt"), "w+")
        status = launch_workers(command, args.workers, stream=log, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if status != 0 or not os.path.exists(out):
            log.seek(0)
            sys.exit(f"{method}:{bits} seed {seed} failed (status {status}):\n{log.read()[-4000:]}")
        with open(out) as result:
            return json.load(result)


def exchange_table(args):
    rows, baseline = [], None
    total = len(args.configs) * len(args.seeds)
    done = 0
    for config in args.configs:
        method, _, bits = config.partition(":")
        bits = int(bits or 4)
        runs = []
        for seed in args.seeds:
            started = time.perf_counter()
            runs.append(run_config(args, method, bits, seed))
            done += 1
            print(f"[{done}/{total}] {config} seed {seed}: {runs[-1]['test_accuracy']:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        row = {"config": "none (float32)" if method == "none" else f"{method} {bits}-bit",
               "bucket": runs[0]["bucket_size"], "bytes": runs[0]["bytes_per_step"],
               "float32_bytes": runs[0]["float32_bytes_per_step"],
               "loopback": statistics.median(r["loopback_bytes_per_step"] or 0 for r in runs),
               "step_ms": statistics.median(r["step_ms_median"] for r in runs),
               "accuracy": [r["test_accuracy"] for r in runs], "parameters": runs[0]["parameters"],
               "replicas": runs[0]["replicas"]}
        if method == "none":
            baseline = row
        rows.append(row)
    return rows, baseline


def format_exchange(rows, baseline, args):
    def mean_std(values):
        mean = 100 * statistics.fmean(values)
        return f"{mean:.2f} +- {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"

    lines = [f"{args.model} on {args.dataset}, {rows[0]['parameters']:,} parameters, {args.workers} workers x "
             f"{rows[0]['replicas'] // args.workers} replica(s) on 127.0.0.1, global batch {args.batch_size}, "
             f"{args.epochs} epochs, seeds {args.seeds}, {args.threads} TF thread(s) per worker; "
             "step ms: median over the run's steps, then over seeds", "",
             "| exchange | bucket | B/step/replica | float32 / this | loopback B/step (measured) | step ms | "
             "vs none | test accuracy % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        step_ratio = f"{row['step_ms'] / baseline['step_ms']:.2f}x" if baseline else "-"
        lo_ratio = (f" ({baseline['loopback'] / row['loopback']:.1f}x less)"
                    if baseline and row["loopback"] and row is not baseline else "")
        lines.append(f"| {row['config']} | {row['bucket'] or '-'} | {row['bytes']:,} | "
                     f"{row['float32_bytes'] / row['bytes']:.2f}x | {row['loopback']:,.0f}{lo_ratio} | "
                     f"{row['step_ms']:.1f} | {step_ratio} | {mean_std(row['accuracy'])} |")
    return lines


def codec_table(args):
    """One replica's encode and the decode + sum of `workers` payloads, op-by-op vs XLA-fused."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras
    from distributed import build_model, load_data
    from n2uq_tf.distribute import compressors as c

    keras.utils.set_random_seed(0)
    model = build_model(args.model, args.dataset)
    (x, y), _ = load_data(args.dataset, tuple(model.input_shape[1:]))
    model.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xb, yb = x[:args.batch_size], y[:args.batch_size]

    def median_ms(fn, *fn_args, repeats=30):
        tf.nest.map_structure(lambda t: t.numpy(), fn(*fn_args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn(*fn_args))
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    model.train_on_batch(xb, yb)
    float_ms = median_ms(lambda: tf.constant(model.train_on_batch(xb, yb)))
    sizes = [v.shape.num_elements() for v in model.trainable_variables]
    grads = [tf.random.normal(v.shape) for v in model.trainable_variables]
    lines = [f"Codec time per step on {sum(sizes):,} gradients ({args.model}), one process, "
             f"decode + sum of {args.workers} payloads; float32 train step {float_ms:.1f} ms (batch {args.batch_size})",
             "", "| compressor | encode op-by-op ms | encode fused ms | decode+sum op-by-op ms | decode+sum fused ms | "
             "fused codec / float step |", "|---|---:|---:|---:|---:|---:|"]
    def codecs(comp, layout, seed):
        """One compressor's encode and decode + sum, op by op and fused, as tf.functions."""
        def encode_plain(grads):
            buckets = layout.to_buckets(grads)
            uniform = tf.random.stateless_uniform(tf.shape(buckets), seed=seed)
            codes, norms = c.quantize_buckets(buckets, comp, uniform)
            return tf.concat([c.pack_codes(codes, comp.bits), tf.bitcast(norms, tf.int32)], 0)

        def decode_plain(payloads):
            words = layout.num_buckets * comp.bucket_size // comp.codes_per_word
            codes = tf.reshape(c.unpack_codes(payloads[:, :words], comp.bits), [args.workers, layout.num_buckets, -1])
            norms = tf.bitcast(payloads[:, words:words + layout.num_buckets], tf.float32)
            values = c.dequantize_buckets(codes, norms, comp)
            return tf.reduce_sum(tf.reshape(values, [args.workers, -1]), axis=0)

        return (tf.function(encode_plain), tf.function(lambda grads: c.encode(layout.to_buckets(grads), comp, seed)),
                tf.function(decode_plain), tf.function(lambda p: c.decode_sum(p, comp, layout.num_buckets)))

    for config in [cfg for cfg in args.configs if not cfg.startswith("none")]:
        method, _, bits = config.partition(":")
        comp = c.GradientCompression(method, int(bits or 4))
        encode_plain, encode_fused, decode_plain, decode_fused = codecs(
            comp, c.BucketLayout(sizes, comp.bucket_size), tf.constant([0, 1], tf.int64))
        payload = encode_fused(grads)
        payloads = tf.stack([payload] * args.workers)
        times = [median_ms(encode_plain, grads), median_ms(encode_fused, grads),
                 median_ms(decode_plain, payloads), median_ms(decode_fused, payloads)]
        np.testing.assert_array_equal(decode_plain(payloads).numpy(), decode_fused(payloads).numpy())
        lines.append(f"| {method} {comp.bits}-bit | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | "
                     f"{times[3]:.2f} | {(times[1] + times[3]) / float_ms:.2f} |")
    return lines


def main():
    args = parse_args()
    rows, baseline = exchange_table(args)
    lines = format_exchange(rows, baseline, args)
    if not args.skip_codec:
        lines += [""] + codec_table(args)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write("# Compressed gradient exchange (benchmarks/distributed.py)\n\n"
                      f"`python benchmarks/distributed.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
