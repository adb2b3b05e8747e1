"""python -m n2uq_tf.build: compile the C++ libraries now instead of on first use.

Builds the fused training kernel of the activation quantizer (against the installed
TensorFlow), the bit-serial inference kernel core and the TFLite delegate plugin (neither
depends on TensorFlow).
"""

import argparse
import logging

from n2uq_tf import _fused
from n2uq_tf.tflite import _core, delegate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the libraries exist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "building ... (once)" as each starts
    print(_fused.build(force=args.force))
    print(_core.build(force=args.force))
    print(delegate.build(force=args.force))


if __name__ == "__main__":
    main()
