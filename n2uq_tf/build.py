"""python -m n2uq_tf.build: compile the fused training kernel now instead of on first use."""

import argparse

from n2uq_tf import _fused


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = parser.parse_args()
    print(_fused.build(force=args.force))


if __name__ == "__main__":
    main()
