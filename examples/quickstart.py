"""Quick start: a float CNN on scikit-learn's digits, then the same network at 2 bits with N2UQ.

Runs offline in about a minute on 2 CPU cores:

    python examples/quickstart.py [--bits 2] [--epochs 12]

It trains a small float CNN, quantizes it with ``n2uq_tf.quantize_model`` (weights and
activations at 2 bits, first conv and classifier float, as in the paper), fine-tunes the
quantized model from the float weights, and prints both accuracies and the quantization
report (bits, learned thresholds, packed size per layer).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import n2uq_tf  # noqa: E402


def digits_dataset(seed=0):
    """sklearn's 8x8 digits (1,797 images, shipped with scikit-learn), scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def small_cnn(num_classes=10):
    inp = keras.Input((8, 8, 1))
    x = inp
    for filters, stride in [(32, 1), (32, 1), (64, 2), (64, 1)]:
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)  # few steps: let the statistics settle
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(num_classes)(x)
    return keras.Model(inp, out, name="digits_cnn")


def train(model, data, epochs, lr):
    (x_train, y_train), (x_test, y_test) = data
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs for float training and for QAT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    data = digits_dataset(args.seed)
    start = time.perf_counter()
    float_model = small_cnn()
    float_acc = train(float_model, data, args.epochs, 3e-3)

    quantized = n2uq_tf.quantize_model(float_model, bits=args.bits)
    quantized_acc = train(quantized, data, args.epochs, 1e-3)

    print(f"\nsklearn digits, {len(data[0][0])} train / {len(data[1][0])} test images, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(f"| model              | test accuracy |")
    print(f"|--------------------|---------------|")
    print(f"| float32            | {100 * float_acc:12.1f}% |")
    print(f"| N2UQ W{args.bits}A{args.bits}          | {100 * quantized_acc:12.1f}% |\n")
    print(n2uq_tf.quantization_report(quantized))


if __name__ == "__main__":
    main()
