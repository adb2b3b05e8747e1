"""The paper's learning-rate schedule: linear decay per epoch, lr0 * (1 - (e + 1) / E).

The official code steps a LambdaLR at the start of every epoch, so epoch e (0-based)
already runs at lr0 * (1 - (e + 1) / E) and the last epoch runs at 0.
"""

import tensorflow as tf

from n2uq_tf._keras import FORMAT_VERSION, check_format_version, keras, register


def linear_epoch_decay(initial_learning_rate: float, epoch: int, epochs: int) -> float:
    """Learning rate of 0-based `epoch` out of `epochs`: lr0 * max(0, 1 - (epoch + 1) / epochs)."""
    return float(initial_learning_rate) * max(0.0, 1.0 - (epoch + 1) / epochs)


def _check_positive_int(value, what):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def linear_epoch_decay_rate(step, initial_learning_rate, epochs, steps_per_epoch):
    """float32 tensor: the rate at optimizer step `step` (a tensor) of the per-epoch linear decay."""
    epoch = tf.math.floordiv(tf.cast(step, tf.int64), steps_per_epoch)
    # float64 so the per-epoch values are the correctly rounded float32 of the formula.
    fraction = 1.0 - tf.cast(epoch + 1, tf.float64) / epochs
    rate = initial_learning_rate * tf.maximum(fraction, 0.0)
    return tf.cast(rate, tf.float32)


class LinearEpochDecayBase:
    """The schedule's arguments, rate and config, for the tf_keras class here and the Keras 3 twin
    (`n2uq_tf.training.keras3.LinearEpochDecay`); each adds its Keras' LearningRateSchedule."""

    def __init__(self, initial_learning_rate: float, epochs: int, steps_per_epoch: int, name: str | None = None):
        self.initial_learning_rate = float(initial_learning_rate)
        self.epochs = _check_positive_int(epochs, "epochs")
        self.steps_per_epoch = _check_positive_int(steps_per_epoch, "steps_per_epoch")
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or "LinearEpochDecay"):
            return linear_epoch_decay_rate(step, self.initial_learning_rate, self.epochs, self.steps_per_epoch)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch, "name": self.name,
                "format_version": FORMAT_VERSION}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        check_format_version(config, cls.__name__)
        return cls(**config)


@register
class LinearEpochDecay(LinearEpochDecayBase, keras.optimizers.schedules.LearningRateSchedule):
    """Per-step schedule holding lr0 * (1 - (e + 1) / E) for every step of epoch e.

    The optimizer evaluates a schedule at its step count before the update, so steps
    0 .. steps_per_epoch - 1 are epoch 0, and so on. Past the last epoch the rate stays 0.
    """
