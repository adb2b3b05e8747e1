"""Knowledge distillation from a frozen float teacher, as N2UQ trains (pure distillation).

loss = (1 - alpha) * T^2 * CE(softmax(teacher / T), softmax(student / T)) + alpha * label loss.
The official recipe is alpha = 0, T = 1: soft cross-entropy to the teacher, no labels.
"""

from typing import Any

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import keras
from n2uq_tf._keras_kind import KERAS_3, is_keras3, keras_of
from n2uq_tf.quantize.saving import save_model


def _as_logits(outputs, from_logits):
    """Logits of a model output, or log-probabilities of a softmax output.

    Log-probabilities differ from the logits by a per-example constant, which a softmax at
    any temperature cancels, so the loss stays exact. Where the softmax's input is still
    reachable (Keras keeps it on the tensor, or the graph op is a Softmax) it is used, so no
    precision is lost to probabilities that underflow to 0.
    """
    outputs = tf.convert_to_tensor(outputs)
    if from_logits:
        return tf.cast(outputs, tf.float32)
    logits = getattr(outputs, "_keras_logits", None)
    if logits is None and not tf.executing_eagerly() and hasattr(outputs, "op") \
            and outputs.op.type == "Softmax":
        logits = outputs.op.inputs[0]
    if logits is not None:
        return tf.cast(logits, tf.float32)
    probabilities = tf.cast(outputs, tf.float32)
    # A probability that underflowed to 0 becomes the smallest normal float: finite, and
    # its soft-target mass stays negligible.
    return tf.math.log(tf.maximum(probabilities, np.finfo(np.float32).tiny))


_SOFTMAX_NAMES = ("softmax", "softmax_v2")
_SOFTMAX_SYMBOLS = ("nn.softmax", "math.softmax")
# Outputs taken for logits that are non-negative with rows summing to 1 within this are probabilities.
_DISTRIBUTION_TOLERANCE = 5e-3


def _is_softmax_function(function):
    return getattr(function, "__name__", None) in _SOFTMAX_NAMES


def softmax_output(model, keras_module=keras):
    """Where `model`'s output goes through a softmax (a description naming the layer), else None.

    Looks at the layer producing each output: a Softmax layer, a layer whose activation is
    softmax (a quantized layer's wrapped layer too), ``tf.nn.softmax`` called on a Keras tensor,
    and the last layer of a nested model. A Lambda that normalises is not seen here;
    `DistillationModel` also checks the values it trains on. `keras_module` is the Keras that
    built the model (tf_keras, or Keras 3 for the Keras 3 twin).
    """
    layers = getattr(model, "layers", None) or []
    # A Keras 3 Sequential has no output_names: its output is its last layer's.
    names = getattr(model, "output_names", None) or ([layers[-1].name] if layers else [])
    # Keras 3 lists the ops of a functional graph (keras.ops.softmax) among its operations.
    layers = {layer.name: layer for layer in getattr(model, "operations", None) or layers}
    for name in names:
        layer = layers.get(name)
        layer = getattr(layer, "layer", layer)  # a quantize wrapper: the layer it wraps
        if layer is None:
            continue
        if isinstance(layer, keras_module.Model):
            inner = softmax_output(layer, keras_module)
            if inner is not None:
                return inner
        elif isinstance(layer, keras_module.layers.Softmax) or type(layer).__name__ == "Softmax":
            return f"layer {layer.name!r} (Softmax)"
        elif _is_softmax_function(getattr(layer, "activation", None)):
            return f"layer {layer.name!r} ({type(layer).__name__} with activation softmax)"
        elif getattr(layer, "symbol", None) in _SOFTMAX_SYMBOLS:
            return f"layer {layer.name!r} (tf.{layer.symbol})"
    return None


def _resolve_from_logits(model, from_logits, what, keras_module=keras):
    """The from_logits flag for `model`: detected when None; an explicit True on a softmax output raises."""
    softmax = softmax_output(model, keras_module)
    if from_logits is None:
        return softmax is None
    if from_logits and softmax is not None:
        raise ValueError(
            f"the {what} {model.name!r} ends in a softmax ({softmax}): its outputs are probabilities, which "
            f"{what}_from_logits=True would take for logits (a softmax of probabilities is nearly uniform, so the "
            f"loss would be nearly flat). Pass {what}_from_logits=False, or leave it None to detect it.")
    return bool(from_logits)


def _checked_logits(outputs, what):
    """`outputs` (taken for logits), failing the step, before any update, when they are already a
    distribution over the last axis."""
    outputs = tf.convert_to_tensor(outputs)
    if outputs.shape.rank is None or outputs.shape[-1] is None or outputs.shape[-1] < 2:
        return outputs
    values = tf.cast(outputs, tf.float32)
    sums = tf.reduce_sum(values, axis=-1)
    probabilities = tf.logical_and(tf.reduce_all(values >= 0.0),
                                   tf.reduce_all(tf.abs(sums - 1.0) <= _DISTRIBUTION_TOLERANCE))
    check = tf.debugging.Assert(tf.logical_not(probabilities), [
        f"DistillationModel: the outputs of the {what} are probabilities (non-negative, each row sums to 1) but "
        f"{what}_from_logits=True takes them for logits, which makes the loss nearly flat; pass "
        f"{what}_from_logits=False"])
    with tf.control_dependencies([check]):  # the loss, and so every update, waits for the check
        return tf.identity(outputs)


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float = 1.0,
                      reduction: str = "mean", teacher_from_logits: bool = True,
                      student_from_logits: bool = True) -> tf.Tensor:
    """Soft cross-entropy from teacher to student at `temperature`, times temperature**2.

    Per example: ``-T^2 * sum_k softmax(t / T)_k * log_softmax(s / T)_k`` over the last axis.
    ``reduction="mean"`` (default) averages over the batch, as the official code does;
    ``"none"`` returns the per-example values (shape: the batch dimensions).
    The teacher side gets no gradient. Softmax outputs are accepted with
    ``*_from_logits=False``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    teacher = tf.stop_gradient(_as_logits(teacher_logits, teacher_from_logits))
    student = _as_logits(student_logits, student_from_logits)
    soft_targets = tf.nn.softmax(teacher / temperature, axis=-1)
    per_example = -tf.reduce_sum(soft_targets * tf.nn.log_softmax(student / temperature, axis=-1), axis=-1)
    per_example = per_example * (temperature ** 2)
    return tf.reduce_mean(per_example) if reduction == "mean" else per_example


def check_distillation_arguments(temperature, alpha):
    """(temperature, alpha) as floats, or ValueError naming the one out of range."""
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return temperature, alpha


def _same_keras_error(student, teacher):
    """The TypeError for a student and teacher from different Kerases, or None."""
    kinds = {what: keras_of(model) for what, model in (("student", student), ("teacher", teacher))}
    if KERAS_3 in kinds.values() and kinds["student"] != kinds["teacher"]:
        return TypeError(
            f"DistillationModel: the student is a {kinds['student'] or type(student).__name__} model and the teacher "
            f"a {kinds['teacher'] or type(teacher).__name__} model; build both with the same Keras (`import keras` "
            "for Keras 3, or tf_keras)")
    return None


class _DistillationMethods:
    """What both front ends' `DistillationModel` do the same: the distillation term of the loss,
    and the student standing for the model in calls, weights and configuration.

    A subclass (a tf_keras or Keras 3 ``Model``) sets ``_keras_module`` to its Keras and gives
    ``_deserialize_models(student, teacher, custom_objects)``; ``save`` stays its own.
    """

    _keras_module = None

    def _distillation_term(self, teacher_outputs, student_outputs, sample_weight):
        """(the batch's mean weighted distillation loss, the student's outputs as the loss read them:
        checked for logits where taken for logits)."""
        if self.teacher_from_logits:
            teacher_outputs = _checked_logits(teacher_outputs, "teacher")
        if self.student_from_logits:
            student_outputs = _checked_logits(student_outputs, "student")
        per_example = distillation_loss(teacher_outputs, student_outputs, self.temperature, "none",
                                        self.teacher_from_logits, self.student_from_logits)
        if sample_weight is not None:
            weights = tf.cast(sample_weight, per_example.dtype)
            per_example = per_example * tf.reshape(weights, tf.shape(per_example))
        return tf.reduce_mean(per_example), student_outputs

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def save_weights(self, filepath, *args, **kwargs):
        return self.student.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        return self.student.load_weights(filepath, *args, **kwargs)

    def get_config(self):
        # For to_json (TensorBoard's graph view); the file format of save() is the student's.
        serialize = self._keras_module.saving.serialize_keras_object
        return {"student": serialize(self.student), "teacher": serialize(self.teacher),
                "temperature": self.temperature, "alpha": self.alpha,
                "teacher_from_logits": self.teacher_from_logits,
                "student_from_logits": self.student_from_logits, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the architecture (fresh weights); load trained weights with load_weights."""
        config = dict(config)
        student, teacher = cls._deserialize_models(config.pop("student"), config.pop("teacher"), custom_objects)
        return cls(student, teacher, **config)


class DistillationModel(_DistillationMethods, keras.Model):
    """Trains `student` to match a frozen `teacher`; everything else acts on the student.

    ``loss = (1 - alpha) * distillation_loss(teacher, student, temperature)
    + alpha * compiled label loss`` (+ the student's regularization losses). The paper's
    recipe is ``alpha=0, temperature=1``: then ``compile`` needs no ``loss`` and the data
    need no labels. The teacher is set ``trainable = False`` and always called with
    ``training=False`` (its BatchNorm statistics are not updated).

    - ``fit`` logs ``loss`` (the total), ``distillation_loss``, ``label_loss`` (alpha > 0)
      and the compiled metrics of the student's outputs against the labels;
      ``evaluate`` logs the same; ``predict`` and ``__call__`` return the student's outputs.
    - ``save``/``save_weights``/``load_weights`` act on the student only, so
      ``n2uq_tf.load_model`` of a saved file returns the (quantized) student. The file holds no
      optimizer state; use ``keras.callbacks.BackupAndRestore`` to resume interrupted training
      (it checkpoints this whole model: student, teacher and optimizer).
    - Softmax outputs are turned back into logits (the softmax's input when reachable, else
      log-probabilities), which is exact at any temperature. A teacher or student that ends in a
      softmax (a Softmax layer, a softmax activation) is detected; outputs taken for logits that
      turn out to be probabilities stop training with an error rather than train on a flat loss.
    - Works with tf.data, callbacks and ``tf.distribute`` strategies (build student, teacher
      and this model inside ``strategy.scope()``). Losses are averaged over the global batch.

    Args:
      student: the model to train (e.g. ``n2uq_tf.quantize_model(float_model)``).
      teacher: a trained model with the same output classes.
      temperature: softmax temperature T (> 0); the distillation term is scaled by T^2.
      alpha: weight of the label loss, in [0, 1].
      teacher_from_logits, student_from_logits: None (default) detects from the model's last
        layer whether it outputs logits; False when that model outputs probabilities; True when it
        outputs logits (a model detected to end in a softmax then raises ValueError).
    """

    _keras_module = keras  # for `_DistillationMethods.get_config`

    def __new__(cls, student=None, teacher=None, *args, **kwargs):
        # A Keras 3 student and teacher get the Keras 3 twin (not an instance of this class, so
        # Python does not run __init__ here again).
        if is_keras3(student) and is_keras3(teacher):
            from n2uq_tf.training import keras3

            return keras3.DistillationModel(student, teacher, *args, **kwargs)
        return super().__new__(cls, student, teacher, *args, **kwargs)

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 1.0, alpha: float = 0.0,
                 teacher_from_logits: bool | None = None, student_from_logits: bool | None = None, **kwargs: Any):
        mixed = _same_keras_error(student, teacher)
        if mixed is not None:
            raise mixed
        super().__init__(**kwargs)
        for model, what in ((student, "student"), (teacher, "teacher")):
            if not isinstance(model, keras.Model):
                raise TypeError(f"{what} must be a tf_keras.Model or a Keras 3 keras.Model, got {type(model).__name__}")
        temperature, alpha = check_distillation_arguments(temperature, alpha)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_from_logits = _resolve_from_logits(teacher, teacher_from_logits, "teacher")
        self.student_from_logits = _resolve_from_logits(student, student_from_logits, "student")
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        self.label_loss_tracker = keras.metrics.Mean(name="label_loss")
        # Built models make this one built: BackupAndRestore needs that before fit.
        if student.built and teacher.built:
            self.built = True

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As ``keras.Model.compile``; ``loss`` is the label loss, needed only when alpha > 0."""
        if self.alpha > 0 and loss is None:
            raise ValueError(f"alpha={self.alpha} weights a label loss: pass compile(loss=...), e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True)")
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    @property
    def metrics(self):
        # Our own loss trackers replace the compiled loss's "loss" tracker, which would
        # record the label loss alone under the name of the total.
        trackers = [self.total_loss_tracker, self.distillation_loss_tracker]
        if self.alpha > 0:
            trackers.append(self.label_loss_tracker)
        if self._is_compiled and self.compiled_metrics is not None:
            trackers += self.compiled_metrics.metrics
        return trackers

    def _compute_losses(self, y, sample_weight, student_outputs, teacher_outputs):
        """(loss to differentiate, per-replica logged values) for one replica's batch.

        The loss to differentiate is divided by the number of replicas, as Keras does,
        because the replicas' gradients are summed.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        distill, student_outputs = self._distillation_term(teacher_outputs, student_outputs, sample_weight)
        total_for_log = (1.0 - self.alpha) * distill
        loss = total_for_log / replicas
        label = None
        if self.alpha > 0:
            if y is None:
                raise ValueError(f"alpha={self.alpha} needs labels: the data gave inputs only")
            # compiled_loss returns the replica-scaled loss; the logged value is per replica.
            label_scaled = tf.cast(self.compiled_loss(y, student_outputs, sample_weight), tf.float32)
            label = label_scaled * replicas
            loss += self.alpha * label_scaled
            total_for_log += self.alpha * label
        if self.student.losses:
            regularization = tf.cast(tf.add_n(self.student.losses), tf.float32)
            loss += regularization / replicas
            total_for_log += regularization
        return loss, total_for_log, distill, label

    def _update_metrics(self, y, sample_weight, student_outputs, total, distill, label):
        batch = tf.shape(tf.nest.flatten(student_outputs)[0])[0]
        self.total_loss_tracker.update_state(total, sample_weight=batch)
        self.distillation_loss_tracker.update_state(distill, sample_weight=batch)
        if label is not None:
            self.label_loss_tracker.update_state(label, sample_weight=batch)
        if y is not None and self.compiled_metrics is not None:
            self.compiled_metrics.update_state(y, student_outputs, sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Outside the tape: the teacher's variables are trainable tf.Variables (only the Keras
        # flag is off), and the tape would otherwise keep its activations for a backward pass.
        teacher_outputs = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_outputs = self.student(x, training=True)
            loss, total, distill, label = self._compute_losses(y, sample_weight, student_outputs, teacher_outputs)
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        return self._update_metrics(y, sample_weight, student_outputs, total, distill, label)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        student_outputs = self.student(x, training=False)
        teacher_outputs = self.teacher(x, training=False)
        _, total, distill, label = self._compute_losses(y, sample_weight, student_outputs, teacher_outputs)
        return self._update_metrics(y, sample_weight, student_outputs, total, distill, label)

    # Saving acts on the student, so the file is an ordinary (quantized) model, written atomically.
    def save(self, filepath, *args, **kwargs):
        return save_model(self.student, filepath, *args, **kwargs)

    @classmethod
    def _deserialize_models(cls, student, teacher, custom_objects):
        from n2uq_tf.quantize.api import quantize_scope

        with quantize_scope(custom_objects or {}):
            return (keras.saving.deserialize_keras_object(student),
                    keras.saving.deserialize_keras_object(teacher))
