"""The training recipe for Keras 3 models (``import keras``, TensorFlow backend): the twins of
`DistillationModel`, `N2UQAdam` and `LinearEpochDecay`, registered with Keras 3 under the same names.

Users reach them through the same entry points: ``n2uq_tf.DistillationModel(student, teacher)``
returns the Keras 3 model when the student and teacher are Keras 3 models, and
``n2uq_tf.paper_optimizer(..., model=model)`` the Keras 3 optimizer when ``model`` is one. The loss
(`distillation_loss`), the softmax detection, the schedule's formula and the rule for which variables
are quantizer parameters are the tf_keras front end's own functions, shared, not copied.

Imported by `n2uq_tf.training` where Keras 3 is installed, so that a Keras 3 ``load_model`` after
``import n2uq_tf`` finds these classes.
"""

from typing import Any

import keras
import tensorflow as tf

from n2uq_tf._io import atomic_path
from n2uq_tf._keras_kind import TF_KERAS, keras_of
from n2uq_tf.training.distillation import _DistillationMethods, _resolve_from_logits, check_distillation_arguments
from n2uq_tf.training.optimizer import PAPER_LEARNING_RATE, checked_multiplier, is_quantizer_variable
from n2uq_tf.training.schedules import LinearEpochDecayBase

__all__ = ["DistillationModel", "LinearEpochDecay", "N2UQAdam"]

_PACKAGE = "n2uq_tf"


@keras.saving.register_keras_serializable(package=_PACKAGE, name="LinearEpochDecay")
class LinearEpochDecay(LinearEpochDecayBase, keras.optimizers.schedules.LearningRateSchedule):
    """Keras 3 twin of `n2uq_tf.training.LinearEpochDecay`: lr0 * (1 - (e + 1) / E) in every step of epoch e."""


@keras.saving.register_keras_serializable(package=_PACKAGE, name="N2UQAdam")
class N2UQAdam(keras.optimizers.Adam):
    """Keras 3 Adam whose update for quantizer parameters uses learning_rate * quantizer_lr_multiplier.

    Keras 3 hands `update_step` the step's learning rate, so the multiplier scales that and the
    Adam update itself stays Keras'. Which variables are quantizer parameters is
    `n2uq_tf.training.is_quantizer_variable` (by name, as in the tf_keras `N2UQAdam`).
    Defaults are the paper's: epsilon 1e-8, no weight decay.
    """

    def __init__(self, learning_rate: Any = PAPER_LEARNING_RATE, quantizer_lr_multiplier: float = 0.1,
                 epsilon: float = 1e-8, name: str = "N2UQAdam", **kwargs: Any):
        super().__init__(learning_rate=learning_rate, epsilon=epsilon, name=name, **kwargs)
        self.quantizer_lr_multiplier = checked_multiplier(quantizer_lr_multiplier)

    def lr_multiplier(self, variable):
        """The factor applied to the learning rate for `variable` (1.0 or quantizer_lr_multiplier)."""
        return self.quantizer_lr_multiplier if is_quantizer_variable(variable) else 1.0

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self.lr_multiplier(variable)
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["quantizer_lr_multiplier"] = self.quantizer_lr_multiplier
        return config


class _PerExampleLoss(keras.losses.Loss):
    """A per-example loss function as a Keras Loss (batch mean, sample weights, replica scaling)."""

    def __init__(self, function, name=None):
        super().__init__(name=name or getattr(function, "__name__", "label_loss"))
        self.function = function

    def call(self, y_true, y_pred):
        return self.function(y_true, y_pred)


@keras.saving.register_keras_serializable(package=_PACKAGE, name="DistillationModel")
class DistillationModel(_DistillationMethods, keras.Model):
    """Keras 3 twin of `n2uq_tf.training.DistillationModel`: trains `student` to match a frozen `teacher`.

    The same loss, arguments and behaviour: ``(1 - alpha) * distillation_loss(teacher, student, T)
    + alpha * label loss`` + the student's regularization losses, through Keras 3's ``compute_loss``
    (so the default ``train_step``/``test_step`` run it, under XLA too). ``fit`` and ``evaluate`` log
    ``loss`` (the total), ``distillation_loss``, ``label_loss`` (alpha > 0) and the compiled metrics;
    ``predict``/``__call__`` give the student's outputs; ``save``/``save_weights``/``load_weights``
    act on the student (``save`` writes the file atomically). Under ``jit_compile`` (Keras 3's
    ``"auto"`` picks it where an accelerator is present) the run-time check that outputs taken for
    logits are not probabilities does not run (XLA drops assertions); the check of the models'
    last layers at construction does.
    """

    _keras_module = keras  # for `_DistillationMethods.get_config`

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 1.0, alpha: float = 0.0,
                 teacher_from_logits: bool | None = None, student_from_logits: bool | None = None, **kwargs: Any):
        for model, what in ((student, "student"), (teacher, "teacher")):
            if not isinstance(model, keras.Model):
                raise TypeError(f"DistillationModel: the {what} must be a Keras 3 keras.Model like the other, got "
                                f"{type(model).__module__}.{type(model).__name__}")
        temperature, alpha = check_distillation_arguments(temperature, alpha)
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_from_logits = _resolve_from_logits(teacher, teacher_from_logits, "teacher", keras)
        self.student_from_logits = _resolve_from_logits(student, student_from_logits, "student", keras)
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        self.label_loss_tracker = keras.metrics.Mean(name="label_loss") if alpha > 0 else None
        self.label_loss = None
        if student.built and teacher.built:
            self.built = True

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As ``keras.Model.compile``; ``loss`` is the label loss (a Loss, or a name or function giving
        per-example values), needed only when alpha > 0."""
        if self.alpha > 0 and loss is None:
            raise ValueError(f"alpha={self.alpha} weights a label loss: pass compile(loss=...), e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True)")
        if keras_of(optimizer) == TF_KERAS:
            raise TypeError(f"DistillationModel.compile: the optimizer {type(optimizer).__name__} is a tf_keras "
                            "optimizer, and this is a Keras 3 model; use a Keras 3 optimizer, e.g. "
                            "n2uq_tf.paper_optimizer(..., model=this_model)")
        if loss is not None:
            loss = keras.losses.get(loss)
            self.label_loss = loss if isinstance(loss, keras.losses.Loss) else _PerExampleLoss(loss)
        # Keras' own loss stays unset: compute_loss below is the whole loss.
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        teacher_outputs = self.teacher(x, training=False)
        distill, student_outputs = self._distillation_term(teacher_outputs, y_pred, sample_weight)
        batch = tf.shape(tf.nest.flatten(student_outputs)[0])[0]
        self.distillation_loss_tracker.update_state(distill, sample_weight=batch)
        # Keras 3 sums the replicas' gradients: every term is divided by the number of replicas
        # (Keras' own Loss objects do so themselves), and its "loss" tracker multiplies back.
        total = (1.0 - self.alpha) * distill / replicas
        if self.alpha > 0:
            if y is None:
                raise ValueError(f"alpha={self.alpha} needs labels: the data gave inputs only")
            label_scaled = tf.cast(self.label_loss(y, student_outputs, sample_weight), tf.float32)
            self.label_loss_tracker.update_state(label_scaled * replicas, sample_weight=batch)
            total += self.alpha * label_scaled
        if self.student.losses:
            total += tf.cast(tf.add_n(self.student.losses), tf.float32) / replicas
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None:  # pure distillation: no labels, so no compiled metrics to update
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def save(self, filepath, *args, **kwargs):
        """Saves the student (a ``.keras`` file), atomically."""
        with atomic_path(filepath) as path:
            return self.student.save(path, *args, **kwargs)

    @classmethod
    def _deserialize_models(cls, student, teacher, custom_objects):
        return (keras.saving.deserialize_keras_object(student, custom_objects=custom_objects),
                keras.saving.deserialize_keras_object(teacher, custom_objects=custom_objects))
