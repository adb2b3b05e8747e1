"""Non-trivial parameters for a quantized model under test: the initial ones (start 0, equal
intervals, unit scales, zero BN statistics and biases) hide bugs in folding, padding and fusion."""

import numpy as np


def randomize(model, seed=0, alpha_shift=0.0):
    """Draws thresholds, scales, BN statistics, biases and RPReLU parameters from fixed ranges.

    ``alpha_shift`` is added to RPReLU/PReLU variables named ``alpha`` (a non-zero mean keeps the
    converter from folding them away).
    """
    rng = np.random.default_rng(seed)
    for v in model.weights:
        n, shape = v.name, tuple(v.shape)
        if "n2uq_start" in n:
            v.assign(rng.uniform(-0.6, -0.1))
        elif "n2uq_intervals" in n:
            v.assign(rng.uniform(0.1, 0.6, shape).astype(np.float32))
        elif "n2uq_beta" in n:
            v.assign(rng.uniform(0.7, 1.4))
        elif "moving_mean" in n:
            v.assign(rng.normal(0, 0.1, shape).astype(np.float32))
        elif "moving_variance" in n:
            v.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif "gamma" in n:
            v.assign(rng.normal(1, 0.2, shape).astype(np.float32))
        elif n.split("/")[-1].startswith(("beta", "bias", "alpha")):
            v.assign(rng.normal(0, 0.1, shape).astype(np.float32) + (alpha_shift if "alpha" in n else 0))
