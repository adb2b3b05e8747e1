"""CIFAR-10 with the official N2UQ recipe: float teacher -> quantized ResNet-20 by distillation.

    python examples/cifar10.py                       # W2A2 ResNet-20, batch 256, 128 epochs
    python examples/cifar10.py --bits 3 --teacher my_float_model.keras --output runs/c10_w3a3
    python examples/cifar10.py --download            # first run on a machine with network

Any `n2uq-tf train` option may be added (see `n2uq-tf train --help`); later options override
the defaults below. CIFAR-10 comes from TFDS: without --download it must already be prepared
in --data-dir (~/tensorflow_datasets), or the run stops with instructions. Without --teacher
the float twin is trained here first (--teacher-epochs, default 30). Checkpoints are written
every epoch; continue an interrupted run with --resume.
"""

import sys

from n2uq_tf.cli import main

DEFAULTS = ["train", "--dataset", "cifar10", "--model", "resnet20", "--bits", "2",
            "--epochs", "128", "--batch-size", "256", "--lr", "1.25e-3",
            "--output", "runs/cifar10_resnet20"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
