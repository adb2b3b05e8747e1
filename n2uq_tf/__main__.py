"""`python -m n2uq_tf` is the `n2uq-tf` command."""

import sys

from n2uq_tf.cli import main

sys.exit(main())
