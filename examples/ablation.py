"""The N2UQ paper's ablations (Tables 3 and 4) at toy scale, over several seeds.

    python examples/ablation.py [--dataset digits|cifar10] [--seeds 3] [--epochs 6] [--output ablation_out]

Per seed: a float ResNet-20 teacher, then 2-bit students distilled from it (the paper's
recipe: pure distillation, Adam with quantizer parameters at lr/10, linear decay), one per
quantizer combination:

Table 3 (what each N2UQ component adds):
  baseline                           uniform thresholds (STE), no weight scaling
  + threshold learning (G-STE)       learned thresholds,       no weight scaling
  + entropy-preserving weights       uniform thresholds (STE), entropy-preserving weights
  both (N2UQ)                        learned thresholds,       entropy-preserving weights
Table 4 (weight quantization, with learned thresholds):
  no weight scaling / learnable scale (LSQ-style, per channel) / entropy-preserving

Every student is a fresh `n2uq_tf.models.resnet20` twin built with the row's methods
(``weight_method=`` / ``activation_method=`` passed through the builder) and initialised from
the teacher's float weights with `models.load_float_weights`; each row prints its number of
trainable variables and the learned quantizer state (interval range, mean beta1 / beta2).

A note on an earlier version of this example, whose "+ threshold learning" row collapsed to
14-22%: students were made with ``quantize_model(teacher)`` after the first row's
DistillationModel had set ``teacher.trainable = False``, so rows 2-5 were clones with every
layer frozen (100 trainable variables instead of 226 with N2UQ activations; BatchNorm in
inference mode on the float teacher's moving statistics). With entropy-preserving weights the
quantized conv outputs keep the float scale and frozen BatchNorm still worked; with unscaled
weights (levels +-1/3, +-1 against float weights of mean |w| ~0.07-0.14) they are 2.5-5x too
large for those statistics, and the student diverged from its first batch (loss 11 vs 2.6). quantize_model now gives a
trainable student for a frozen model (with a warning), and this example builds fresh twins.
The thresholds themselves barely move in a run this short (intervals stay within ~0.66-0.68 of
the initial 2/3: the paper's lr/10 for quantizer parameters over a few hundred steps).

Rows that are the same configuration (Table 4's "no weight scaling" is Table 3's
"+ threshold learning", its "entropy-preserving" Table 3's "both") are trained once.
Prints both tables as Markdown (test accuracy, mean +- std over seeds) and writes them with
a bar plot (error bars = std) to the output folder. The default, digits (offline, scikit-learn),
3 seeds x 6 epochs, takes about 2-3 minutes per seed on 2 CPU cores (mostly fixed per-model
overhead: smaller images or larger batches barely help); ``--seeds 5 --epochs 10`` for tighter
figures. ``--dataset cifar10`` needs CIFAR-10 prepared for TFDS.
"""

import argparse
import json
import os
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from n2uq_tf import data, models, recipe  # noqa: E402

# (weight_method, activation_method) per configuration.
CONFIGS = {
    "uniform+none": ("none", "uniform"),
    "n2uq+none": ("none", "n2uq"),
    "uniform+ep": ("n2uq", "uniform"),
    "n2uq+ep": ("n2uq", "n2uq"),
    "n2uq+learnable": ("learnable", "n2uq"),
}
TABLE3 = [("baseline (uniform thresholds, STE)", "uniform+none"),
          ("+ threshold learning (G-STE)", "n2uq+none"),
          ("+ entropy-preserving weights", "uniform+ep"),
          ("both (N2UQ)", "n2uq+ep")]
TABLE4 = [("no weight scaling", "n2uq+none"),
          ("learnable scale", "n2uq+learnable"),
          ("entropy-preserving (N2UQ)", "n2uq+ep")]
FLOAT_LAYERS = ["stem_conv", "fc"]  # n2uq_tf.models' plan: float stem conv and classifier
LEARNING_RATE = 3e-3  # teacher and students (toy scale: few epochs, small batches)

DEFAULTS = {  # per dataset: image size, ResNet-20 width, batch, epochs
    "digits": dict(image_size=16, width=8, batch=32, epochs=6),
    "cifar10": dict(image_size=32, width=16, batch=128, epochs=30),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DEFAULTS), default="digits")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="epochs for the teacher and each student")
    parser.add_argument("--width", type=int, help="ResNet-20 width (16 is the standard)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-images", type=int, help="use only the first N training images (quick runs)")
    parser.add_argument("--data-dir", help="TFDS data_dir for cifar10")
    parser.add_argument("--output", default="ablation_out")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        name = {"batch": "batch_size"}.get(key, key)
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def load(args, seed):
    if args.dataset == "digits":
        train = data.load_dataset("digits", "train", batch_size=args.batch_size, image_size=args.image_size,
                                  seed=seed)
        test = data.load_dataset("digits", "test", batch_size=256, image_size=args.image_size)
        train_count = data.dataset_info("digits").splits["train"]
    else:
        kw = dict(image_size=args.image_size, data_dir=args.data_dir)
        train = data.load_dataset("cifar10", "train", batch_size=args.batch_size, seed=seed, **kw)
        test = data.load_dataset("cifar10", "test", batch_size=256, **kw)
        train_count = data.dataset_info("cifar10").splits["train"]
    if args.train_images:
        train_count = min(train_count, args.train_images)
        # Told its batch count (unbatch hides it), Keras starts each epoch at the first batch again.
        train = train.unbatch().take(args.train_images).batch(args.batch_size, drop_remainder=True).apply(
            tf.data.experimental.assert_cardinality(train_count // args.batch_size))
    return train, test, max(1, train_count // args.batch_size)


def train_teacher(args, train, test, steps):
    teacher = models.resnet20(num_classes=10, input_shape=(args.image_size, args.image_size, 3), width=args.width)
    recipe.train_teacher(teacher, train, epochs=args.epochs, learning_rate=LEARNING_RATE, steps_per_epoch=steps)
    return teacher, recipe.accuracy(teacher, test)


def quantizer_summary(student):
    """Learned activation-quantizer state after training: interval range, mean beta1 / beta2."""
    intervals, beta1, beta2 = [], [], []
    for layer in student.layers:
        quantizer = getattr(layer, "input_quantizer", None)
        if quantizer is None or "intervals" not in quantizer[1]:
            continue
        variables = quantizer[1]
        intervals.append(variables["intervals"].numpy())
        beta1.append(float(variables["beta1"].numpy()))
        beta2.append(float(variables["beta2"].numpy()))
    intervals = np.concatenate(intervals)
    return {"interval_min": float(intervals.min()), "interval_max": float(intervals.max()),
            "beta1_mean": float(np.mean(beta1)), "beta2_mean": float(np.mean(beta2))}


def train_student(args, teacher, train, test, steps, weight_method, activation_method):
    """A fresh quantized ResNet-20 twin (`n2uq_tf.models`' plan), distilled by the paper's recipe from
    the teacher's float weights.

    The twin is built anew rather than quantized from ``teacher``: DistillationModel freezes its
    teacher, and (before quantize_model reset that) a student cloned from the frozen teacher had
    every BatchNorm in inference mode and only its quantizer parameters trainable.
    """
    student = models.resnet20(args.bits, num_classes=10, input_shape=(args.image_size, args.image_size, 3),
                              width=args.width, weight_method=weight_method, activation_method=activation_method)
    trainable = len(student.trainable_variables)
    result = recipe.train_n2uq(student, train, test, teacher=teacher, epochs=args.epochs, steps_per_epoch=steps,
                               learning_rate=LEARNING_RATE)  # init_from the teacher, its float twin
    return result.student_accuracy, dict(quantizer_summary(student), trainable_variables=trainable)


def markdown_table(title, rows, results):
    lines = [f"**{title}**", "", "| configuration | test accuracy (%) |", "|---|---|"]
    for label, key in rows:
        acc = 100 * np.asarray(results[key])
        lines.append(f"| {label} | {acc.mean():.2f} ± {acc.std():.2f} |")
    return "\n".join(lines)


def plot(tables, results, path, title):
    """Bar plot with std error bars; a Figure on the Agg canvas (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tables), sharey=True)
    for ax, (name, rows) in zip(np.atleast_1d(axes), tables):
        acc = [100 * np.asarray(results[key]) for _, key in rows]
        means, stds = [a.mean() for a in acc], [a.std() for a in acc]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([textwrap.fill(label, 16) for label, _ in rows], fontsize=8)
        ax.set_title(name)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 5), 100)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        load(args, 0)
    except data.DatasetNotAvailableError as error:
        sys.exit(f"{args.dataset} is not available: {error}")
    results = {key: [] for key in CONFIGS}
    summaries = {key: [] for key in CONFIGS}
    teachers = []
    for seed in range(args.seeds):
        keras.utils.set_random_seed(seed)
        train, test, steps = load(args, seed)
        teacher, teacher_acc = train_teacher(args, train, test, steps)
        teachers.append(teacher_acc)
        print(f"seed {seed}: float teacher {100 * teacher_acc:.2f}%", flush=True)
        for key, (weight_method, activation_method) in CONFIGS.items():
            keras.utils.set_random_seed(1000 + seed)  # the same student initialisation noise per row
            acc, summary = train_student(args, teacher, train, test, steps, weight_method, activation_method)
            results[key].append(acc)
            summaries[key].append(summary)
            print(f"  W:{weight_method:9s} A:{activation_method:7s} {100 * acc:.2f}%  "
                  f"({summary['trainable_variables']} trainable variables; "
                  f"intervals {summary['interval_min']:.3f}..{summary['interval_max']:.3f}, "
                  f"mean beta1 {summary['beta1_mean']:.3f}, beta2 {summary['beta2_mean']:.3f})", flush=True)

    b = args.bits
    setting = (f"{args.dataset}, ResNet-20 width {args.width}, {args.image_size}x{args.image_size}, "
               f"W{b}A{b}, {args.epochs} epochs, batch {args.batch_size}, {args.seeds} seed(s), "
               f"mean ± std over seeds")
    teacher_acc = 100 * np.asarray(teachers)
    text = "\n\n".join([
        f"Ablations ({setting}); float teacher {teacher_acc.mean():.2f} ± {teacher_acc.std():.2f}%",
        markdown_table("Table 3: N2UQ components", TABLE3, results),
        markdown_table("Table 4: weight quantization (learned thresholds)", TABLE4, results),
    ])
    print("\n" + text)
    n2uq, uniform = np.mean(results["n2uq+ep"]), np.mean(results["uniform+none"])
    print(f"\nfull N2UQ {'>=' if n2uq >= uniform else '<'} uniform baseline on the mean "
          f"({100 * n2uq:.2f}% vs {100 * uniform:.2f}%); {time.perf_counter() - start:.0f} s")

    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "ablation.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output, "ablation.json"), "w") as f:
        json.dump({"settings": vars(args), "teacher": teachers, "configs": CONFIGS, "accuracy": results,
                   "quantizers": summaries}, f, indent=1)
    try:
        plot([("Table 3", TABLE3), ("Table 4", TABLE4)], results, os.path.join(args.output, "ablation.png"),
             setting)
    except ImportError as error:
        print(f"(plot skipped: {error})")
    return results


if __name__ == "__main__":
    main()
