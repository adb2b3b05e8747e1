"""ImageNet with the official N2UQ recipe: ResNet-18 W2A2 distilled from a float teacher.

    python examples/imagenet.py --manual-dir ~/imagenet --download --teacher resnet101_float.keras
    python examples/imagenet.py --model resnet50 --bits 4 --teacher t.keras --output runs/r50w4a4
    python examples/imagenet.py --resume             # continue after an interruption

The paper's settings: batch 256, Adam lr 1.25e-3 (quantizer parameters at lr/10), linear
decay to 0 over 128 epochs, pure distillation at temperature 1, student initialised from
float weights (--init FLOAT_TWIN; by default from the teacher when it is the float twin).
The teacher is any saved float tf_keras model that takes this pipeline's images (224x224,
ImageNet mean/std normalised) and returns logits. ImageNet needs the two ILSVRC2012 tar
files in --manual-dir and --download once to let TFDS prepare them (see n2uq_tf.data).
Published top-1 for this recipe (W/A 2/3/4 bits): ResNet-18 69.4/71.9/72.9.
Any `n2uq-tf train` option may be added; later options override the defaults below.
"""

import sys

from n2uq_tf.cli import main

DEFAULTS = ["train", "--dataset", "imagenet2012", "--model", "resnet18", "--bits", "2",
            "--epochs", "128", "--batch-size", "256", "--lr", "1.25e-3",
            "--output", "runs/imagenet_resnet18"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
