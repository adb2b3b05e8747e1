"""Quick start: distil a 2-bit N2UQ ResNet-20 from its float twin on scikit-learn's digits.

Runs offline in a few minutes on 2 CPU cores (the digits ship with scikit-learn):

    python examples/quickstart.py [--bits 2] [--epochs 12] [--output quickstart_out]

The paper's recipe at toy scale:
1. train a float ResNet-20 (``n2uq_tf.models.resnet20``) as the teacher;
2. quantize its twin (weights and activations at 2 bits, stem and classifier float) and
   initialise it from the float weights;
3. train the student by pure distillation from the frozen teacher, with the official optimizer
   (Adam, quantizer parameters at lr/10, linear per-epoch decay): once with learned N2UQ
   thresholds, once with thresholds frozen at uniform (the paper's baseline, where the
   G-STE is the plain STE);
4. print the accuracy table and the quantization report, and draw the learned thresholds
   over the activation histograms and the weight-level histograms.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras as keras  # noqa: E402

from n2uq_tf import data, models, recipe  # noqa: E402

IMAGE_SIZE = 16  # digits are 8x8; 16x16 keeps three ResNet stages meaningful and the demo fast
WIDTH = 16       # the standard ResNet-20 width
BATCH = 32       # small batches: more steps on a small dataset
LEARNING_RATE = 3e-3  # teacher and students: the paper's 1.25e-3 is for batch 256 and 128 epochs


def _plots_only(message):
    """The recipe's log, less its phase lines (this script prints its own)."""
    if message.startswith("plots skipped"):
        print(f"({message})")


class EpochProgress(keras.callbacks.Callback):
    """One progress bar per training phase, advanced per epoch (on a terminal only)."""

    def __init__(self, epochs):
        super().__init__()
        self.bar = keras.utils.Progbar(epochs, unit_name="epoch") if sys.stdout.isatty() else None

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.update(epoch + 1, [(k, v) for k, v in (logs or {}).items() if k in ("loss", "accuracy")])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs for the teacher and each student")
    parser.add_argument("--output", default="quickstart_out", help="folder for the plots and the student")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    batch = BATCH
    train = data.load_dataset("digits", "train", batch_size=batch, image_size=IMAGE_SIZE, seed=args.seed)
    test = data.load_dataset("digits", "test", batch_size=256, image_size=IMAGE_SIZE)
    info = data.dataset_info("digits")
    steps = info.splits["train"] // batch  # training batches drop the remainder

    print(f"1/3 float teacher: ResNet-20 on {IMAGE_SIZE}x{IMAGE_SIZE} digits, {args.epochs} epochs")
    float_model = models.resnet20(num_classes=10, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), width=WIDTH,
                                  name="teacher")
    teacher = recipe.train_teacher(float_model, train, epochs=args.epochs, learning_rate=LEARNING_RATE,
                                   steps_per_epoch=steps, callbacks=[EpochProgress(args.epochs)])
    # Both students start from the trained float weights (quantized twins, made before distillation
    # freezes the teacher).
    student = models.quantize(teacher, args.bits)
    baseline = models.quantize(teacher, args.bits, learn_thresholds=False)
    os.makedirs(args.output, exist_ok=True)
    print(f"2/3 N2UQ W{args.bits}A{args.bits} student, learned thresholds (distillation)")
    n2uq = recipe.train_n2uq(student, train, test, teacher=teacher, epochs=args.epochs, steps_per_epoch=steps,
                             learning_rate=LEARNING_RATE, init_from=None,  # the twins hold the float weights
                             callbacks=[EpochProgress(args.epochs)],
                             student_path=os.path.join(args.output, "student.keras"),  # atomic: whole or untouched
                             plots_dir=args.output, plot_batches=2, log=_plots_only)
    print(f"3/3 baseline W{args.bits}A{args.bits} student, thresholds frozen at uniform")
    uniform = recipe.train_n2uq(baseline, train, test, teacher=teacher, epochs=args.epochs, steps_per_epoch=steps,
                                learning_rate=LEARNING_RATE, init_from=None, callbacks=[EpochProgress(args.epochs)])

    b = args.bits
    print(f"\nsklearn digits, {info.splits['train']} train / {info.splits['test']} test images, "
          f"{time.perf_counter() - start:.0f} s\n")
    rows = [("float32 teacher", n2uq.teacher_accuracy),
            (f"N2UQ W{b}A{b} (learned thresholds, G-STE)", n2uq.student_accuracy),
            (f"W{b}A{b} uniform thresholds (STE baseline)", uniform.student_accuracy)]
    width = max(len(name) for name, _ in rows)
    print(f"| {'model'.ljust(width)} | test accuracy |")
    print(f"|{'-' * (width + 2)}|---------------|")
    for name, accuracy in rows:
        print(f"| {name.ljust(width)} | {100 * accuracy:12.1f}% |")
    print()
    print(n2uq.report)
    print(f"\nstudent saved to {os.path.join(args.output, 'student.keras')}"
          + (f"; plots: {', '.join(n2uq.plots)}" if n2uq.plots else ""))


if __name__ == "__main__":
    main()
