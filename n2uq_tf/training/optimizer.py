"""The official N2UQ optimizer recipe as a compile-ready tf_keras optimizer.

Adam (epsilon 1e-8, no weight decay); the activation-quantizer parameters (start,
intervals, beta1, beta2) learn at lr / 10; the rate decays linearly per epoch.
Adam normalises the gradient's scale away, so a smaller rate for some variables
cannot be had by scaling their gradients: N2UQAdam applies the multiplier to the
update itself.
"""

import re
from typing import Any

import tensorflow as tf

from n2uq_tf._keras import keras, register
from n2uq_tf._keras_kind import is_keras3, require_tf_keras
from n2uq_tf.quantize.quantizers import QUANTIZER_PARAMETER_SUFFIXES
from n2uq_tf.training.schedules import LinearEpochDecay

PAPER_LEARNING_RATE = 1.25e-3
PAPER_BATCH_SIZE = 256
PAPER_EPOCHS = 128

# "scope/input_n2uq_start:0", or a MirroredStrategy copy "scope/input_n2uq_start/replica_1:0".
_NAME_TAIL = re.compile(r"(/replica_\d+)?(:\d+)?$")


def is_quantizer_variable(variable):
    """True for an N2UQ activation-quantizer parameter (start, intervals, beta1, beta2)."""
    name = _NAME_TAIL.sub("", getattr(variable, "name", "") or "")
    return name.endswith(QUANTIZER_PARAMETER_SUFFIXES)


def checked_multiplier(quantizer_lr_multiplier):
    """quantizer_lr_multiplier as a float >= 0, or ValueError."""
    multiplier = float(quantizer_lr_multiplier)
    if not multiplier >= 0.0:
        raise ValueError(f"quantizer_lr_multiplier must be >= 0, got {quantizer_lr_multiplier!r}")
    return multiplier


@register
class N2UQAdam(keras.optimizers.Adam):
    """Adam whose update for quantizer parameters uses learning_rate * quantizer_lr_multiplier.

    Every other argument is tf_keras Adam's; the defaults here are the paper's
    (epsilon 1e-8, no weight decay). The multiplier applies to the whole step
    (learning_rate may be a schedule), and Adam's moments are per variable as usual.
    """

    def __init__(self, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = PAPER_LEARNING_RATE,
                 quantizer_lr_multiplier: float = 0.1, epsilon: float = 1e-8, name: str = "N2UQAdam", **kwargs: Any):
        require_tf_keras(learning_rate, "n2uq_tf.training.N2UQAdam", "learning_rate schedule",
                         "For Keras 3 use n2uq_tf.training.keras3.N2UQAdam with a Keras 3 schedule, or "
                         "n2uq_tf.paper_optimizer(..., model=your_keras3_model).")
        super().__init__(learning_rate=learning_rate, epsilon=epsilon, name=name, **kwargs)
        self.quantizer_lr_multiplier = checked_multiplier(quantizer_lr_multiplier)
        self._lr_multipliers = {}

    def build(self, var_list):
        # Decide per variable once, on the model's variables: inside a distributed update the
        # variable passed to update_step may be a per-replica copy with another name.
        for variable in var_list:
            self._lr_multipliers[self._var_key(variable)] = (
                self.quantizer_lr_multiplier if is_quantizer_variable(variable) else 1.0)
        super().build(var_list)

    def lr_multiplier(self, variable):
        """The factor applied to the learning rate for `variable` (1.0 or quantizer_lr_multiplier)."""
        multiplier = self._lr_multipliers.get(self._var_key(variable))
        if multiplier is None:
            multiplier = self.quantizer_lr_multiplier if is_quantizer_variable(variable) else 1.0
        return multiplier

    def update_step(self, gradient, variable):
        # tf_keras Adam.update_step with the learning rate times the per-variable multiplier.
        multiplier = self.lr_multiplier(variable)
        lr = tf.cast(self.learning_rate, variable.dtype)
        if multiplier != 1.0:
            lr = lr * tf.cast(multiplier, variable.dtype)
        local_step = tf.cast(self.iterations + 1, variable.dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, variable.dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, variable.dtype), local_step)

        index = self._index_dict[self._var_key(variable)]
        m = self._momentums[index]
        v = self._velocities[index]

        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon_hat = self.epsilon
        if getattr(self, "adaptive_epsilon", False):
            epsilon_hat = self.epsilon * tf.sqrt(1 - beta_2_power)

        if isinstance(gradient, tf.IndexedSlices):
            m.assign_add(-m * (1 - self.beta_1))
            m.scatter_add(tf.IndexedSlices(gradient.values * (1 - self.beta_1), gradient.indices))
            v.assign_add(-v * (1 - self.beta_2))
            v.scatter_add(tf.IndexedSlices(tf.square(gradient.values) * (1 - self.beta_2), gradient.indices))
        else:
            m.assign_add((gradient - m) * (1 - self.beta_1))
            v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_hat.assign(tf.maximum(v_hat, v))
            v = v_hat
        variable.assign_sub((m * alpha) / (tf.sqrt(v) + epsilon_hat))

    def get_config(self):
        config = super().get_config()
        config["quantizer_lr_multiplier"] = self.quantizer_lr_multiplier
        return config


def paper_learning_rate(learning_rate: float = PAPER_LEARNING_RATE, *, epochs: int = PAPER_EPOCHS,
                        steps_per_epoch: int | None = None, batch_size: int | None = None,
                        schedule_class: type = LinearEpochDecay) -> Any:
    """The rate `paper_optimizer` gives its Adam: a float, or a `schedule_class` (given steps_per_epoch)."""
    learning_rate = float(learning_rate)
    if batch_size is not None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        learning_rate *= batch_size / PAPER_BATCH_SIZE
    if steps_per_epoch is None:
        return learning_rate
    return schedule_class(learning_rate, epochs, steps_per_epoch)


def paper_optimizer(learning_rate: float = PAPER_LEARNING_RATE, *, epochs: int = PAPER_EPOCHS,
                    steps_per_epoch: int | None = None, quantizer_lr_multiplier: float = 0.1, epsilon: float = 1e-8,
                    batch_size: int | None = None, model: Any = None) -> Any:
    """The official N2UQ optimizer, for ``model.compile(optimizer=paper_optimizer(...))``.

    Adam with epsilon 1e-8 and no weight decay; activation-quantizer parameters (start,
    intervals, beta1, beta2) step at ``learning_rate * quantizer_lr_multiplier`` (lr / 10);
    the rate of 0-based epoch e is ``learning_rate * (1 - (e + 1) / epochs)``, so the last
    epoch runs at 0.

    Args:
      learning_rate: the rate at the paper's batch size 256 (paper: 1.25e-3).
      epochs: the number of epochs fit will run (the decay reaches 0 in the last one).
      steps_per_epoch: batches per epoch. Given, the decay is a `LinearEpochDecay` schedule
        inside the optimizer. None gives a constant rate (no decay: the paper's recipe needs
        steps_per_epoch).
      quantizer_lr_multiplier: factor on the rate for quantizer parameters (paper: 0.1).
      epsilon: Adam's epsilon (paper: 1e-8, not Keras' 1e-7).
      batch_size: if given, the rate is scaled linearly, learning_rate * batch_size / 256
        (the linear scaling rule from the paper's batch of 256).
      model: the model the optimizer will train (a `DistillationModel` too). A Keras 3 model
        (``import keras``) gets the Keras 3 twin, `n2uq_tf.training.keras3.N2UQAdam` with
        `n2uq_tf.training.keras3.LinearEpochDecay`; None or a tf_keras model gets the tf_keras one.

    Returns:
      an `N2UQAdam` of the model's Keras (tf_keras when no model is given).
    """
    optimizer_class, schedule_class = N2UQAdam, LinearEpochDecay
    if model is not None and is_keras3(model):
        from n2uq_tf.training import keras3

        optimizer_class, schedule_class = keras3.N2UQAdam, keras3.LinearEpochDecay
    rate = paper_learning_rate(learning_rate, epochs=epochs, steps_per_epoch=steps_per_epoch,
                               batch_size=batch_size, schedule_class=schedule_class)
    return optimizer_class(rate, quantizer_lr_multiplier=quantizer_lr_multiplier, epsilon=epsilon)
