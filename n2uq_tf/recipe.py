"""The N2UQ paper's training recipe as one call: float teacher -> quantized student -> report.

    from n2uq_tf import models, recipe
    float_model = models.resnet20()                   # the teacher, trained below
    student = models.resnet20(bits=2)                 # its quantized twin
    result = recipe.train_n2uq(student, train, test, teacher=float_model, teacher_epochs=30, epochs=128,
                               steps_per_epoch=steps, learning_rate=1.25e-3)
    print(result.student_accuracy, result.report)

`train_n2uq` runs the recipe of the official N2UQ code:

1. the teacher: a trained float model, or (``teacher_epochs`` > 0) one trained here with Adam and a
   linear per-epoch decay (`train_teacher`);
2. the student initialised from float weights (the teacher's, when it is the student's float
   twin, or another float model or file: ``init_from``);
3. distillation: soft cross-entropy to the frozen teacher at temperature 1 with no label term by
   default (`n2uq_tf.training.DistillationModel`), Adam with the quantizer parameters at lr/10 and
   the linear decay (`n2uq_tf.training.paper_optimizer`);
4. evaluation of both models, the quantization report and the plots.

It is what `n2uq-tf train`, ``examples/quickstart.py`` and ``examples/ablation.py`` run; the
command adds its run folder (checkpoints, resume, history.json) around it. Nothing is printed:
pass ``log=print`` to see the phases.
"""

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from n2uq_tf import plots
from n2uq_tf._keras import keras
from n2uq_tf._optional import MissingDependencyError
from n2uq_tf.distribute.compressors import GradientCompression
from n2uq_tf.distribute.optimizer import compress_gradients
from n2uq_tf.models import load_float_weights
from n2uq_tf.quantize.api import load_model
from n2uq_tf.quantize.saving import save_model
from n2uq_tf.report import QuantizationReport, quantization_report
from n2uq_tf.training.distillation import DistillationModel
from n2uq_tf.training.optimizer import PAPER_LEARNING_RATE, paper_optimizer
from n2uq_tf.training.schedules import LinearEpochDecay

__all__ = ["TEACHER", "TEACHER_LR_MULTIPLIER", "RecipeResult", "accuracy", "train_n2uq", "train_teacher"]

# init_from=TEACHER: the student starts from the teacher's float weights (the teacher is its float twin).
TEACHER = "teacher"
# A float teacher trained here peaks at this multiple of the student's learning rate unless given its
# own (`n2uq-tf train --teacher-lr`).
TEACHER_LR_MULTIPLIER = 4

FloatSource = keras.Model | str | os.PathLike[str]
Log = Callable[[str], Any]


def _silent(message: str) -> None:
    pass


@dataclasses.dataclass
class RecipeResult:
    """What `train_n2uq` returns: the two models, their accuracy on the evaluation data, the
    distillation's per-epoch metrics (of this call's fit: a resumed run's earlier epochs are not in
    it), and the PNG files written.

    ``report`` (the student's `n2uq_tf.quantization_report`) is computed on first use.
    """

    student: keras.Model
    teacher: keras.Model
    student_accuracy: float
    teacher_accuracy: float
    history: dict[str, list[float]]
    plots: list[str]

    @functools.cached_property
    def report(self) -> QuantizationReport:
        return quantization_report(self.student)


def _fit(model: keras.Model, data: tf.data.Dataset, *, epochs: int, steps_per_epoch: int | None,
         validation_data: tf.data.Dataset | None, callbacks: Sequence[keras.callbacks.Callback],
         verbose: int | str) -> keras.callbacks.History:
    """The one place both phases train (tests replace it to interrupt a run)."""
    return model.fit(data, validation_data=validation_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     callbacks=list(callbacks), verbose=verbose)


def _steps(data: tf.data.Dataset, steps_per_epoch: int | None) -> int:
    """Steps per epoch: the given number, else the dataset's batch count (it must be known)."""
    if steps_per_epoch is not None:
        return steps_per_epoch
    count = int(data.cardinality())
    if count <= 0:
        raise ValueError("the training data's number of batches is not known (an infinite or filtered "
                         "dataset): pass steps_per_epoch")
    return count


def _compressed(optimizer: keras.optimizers.Optimizer,
                compression: GradientCompression | None) -> keras.optimizers.Optimizer:
    if compression is None or not compression.enabled:
        return optimizer
    return compress_gradients(optimizer, compression.method, bits=compression.bits,
                              bucket_size=compression.bucket_size, seed=compression.seed)


def _scope(strategy: tf.distribute.Strategy | None) -> contextlib.AbstractContextManager:
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def train_teacher(model: keras.Model, train_data: tf.data.Dataset, *, epochs: int,
                  learning_rate: float, steps_per_epoch: int | None = None,
                  validation_data: tf.data.Dataset | None = None,
                  callbacks: Sequence[keras.callbacks.Callback] = (),
                  gradient_compression: GradientCompression | None = None,
                  strategy: tf.distribute.Strategy | None = None, verbose: int | str = 0) -> keras.Model:
    """Trains a float classifier (logits out, integer labels) in place and returns it: Adam with
    the rate decayed linearly per epoch from ``learning_rate`` to 0 (`LinearEpochDecay`).

    ``gradient_compression``: the replicas exchange compressed gradients
    (`n2uq_tf.distribute.compress_gradients`). ``strategy``: compile and fit in its scope (build
    ``model`` there too).
    """
    steps = _steps(train_data, steps_per_epoch)
    with _scope(strategy):
        optimizer = keras.optimizers.Adam(LinearEpochDecay(learning_rate, epochs, steps))
        model.compile(_compressed(optimizer, gradient_compression),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        _fit(model, train_data, epochs=epochs, steps_per_epoch=steps, validation_data=validation_data,
             callbacks=callbacks, verbose=verbose)
    return model


def accuracy(model: keras.Model, data: tf.data.Dataset, strategy: tf.distribute.Strategy | None = None) -> float:
    """Top-1 accuracy of a classifier on (images, integer labels) batches."""
    with _scope(strategy):
        model.compile(metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return float(model.evaluate(data, verbose=0, return_dict=True)["accuracy"])


def _describe(source: FloatSource) -> str:
    return f"model {source.name!r}" if isinstance(source, keras.Model) else os.fspath(source)


def _initialise(student: keras.Model, teacher: keras.Model, init_from: FloatSource | None, init_optional: bool,
                log: Log) -> None:
    """Step 2: the student's float weights (layer by layer name; quantizer parameters keep theirs)."""
    if init_from is None:
        return
    source = teacher if isinstance(init_from, str) and init_from == TEACHER else init_from
    what = "the teacher's weights" if source is teacher else _describe(source)
    try:
        load_float_weights(student, source)
    except ValueError as error:
        if not init_optional:
            raise
        log(f"student: starting from scratch; {what} do not fit it ({error}). "
            "Give init_from (--init) a float twin to initialise from pretrained float weights.")
        return
    log(f"student: {student.name} initialised from {what}")


def train_n2uq(student: keras.Model, train_data: tf.data.Dataset, eval_data: tf.data.Dataset, *,
               teacher: keras.Model, epochs: int, steps_per_epoch: int | None = None,
               learning_rate: float = PAPER_LEARNING_RATE, teacher_epochs: int = 0,
               teacher_learning_rate: float | None = None, init_from: FloatSource | None = TEACHER,
               init_optional: bool = False, temperature: float = 1.0, alpha: float = 0.0,
               validation_data: tf.data.Dataset | None = None,
               callbacks: Sequence[keras.callbacks.Callback] = (),
               teacher_callbacks: Sequence[keras.callbacks.Callback] = (),
               teacher_path: str | os.PathLike[str] | None = None,
               student_path: str | os.PathLike[str] | None = None,
               plots_dir: str | os.PathLike[str] | None = None, plot_batches: int = 4,
               gradient_compression: GradientCompression | None = None,
               strategy: tf.distribute.Strategy | None = None, verbose: int | str = 0,
               log: Log = _silent) -> RecipeResult:
    """Distils the quantized ``student`` from the float ``teacher`` by the paper's recipe.

    Args:
      student: the quantized model to train (e.g. ``models.resnet20(bits=2)``), built in
        ``strategy``'s scope when one is given.
      train_data, eval_data: batches of (images, integer labels); the accuracies are measured on
        ``eval_data`` (and the activation histograms of the plots drawn from it).
      teacher: a float classifier with logits out. Trained here first for ``teacher_epochs``
        epochs at ``teacher_learning_rate`` (default ``TEACHER_LR_MULTIPLIER * learning_rate``)
        when ``teacher_epochs`` > 0; it is frozen for the distillation.
      epochs, steps_per_epoch, learning_rate: the distillation's length (steps_per_epoch: the
        batches of ``train_data`` by default) and peak rate (decayed linearly per epoch to 0);
        ``steps_per_epoch`` also applies to the teacher's training.
      init_from: float weights for the student: `TEACHER` (default; the teacher is its float
        twin), a float model or a path (`n2uq_tf.models.load_float_weights`), or None (keep the
        student's weights). init_optional: a source that does not fit the student (another
        architecture) is logged and skipped instead of raising ValueError.
      temperature, alpha: of `DistillationModel` (alpha > 0 adds the label loss).
      validation_data: evaluated after every epoch of both phases (metrics ``val_*``).
      callbacks, teacher_callbacks: Keras callbacks of the distillation and of the teacher's
        training, run in the given order.
      teacher_path: where a teacher trained here is saved (atomically); the distillation then
        continues with the saved copy, as a resumed run that loads it does, so checkpoints of
        the two hold the same objects. student_path: where the trained student is saved.
      plots_dir: draw `n2uq_tf.plots.save_plots` of the student there, with activations from
        ``plot_batches`` batches of ``eval_data`` (skipped with a log line without matplotlib).
      gradient_compression: compress the gradient exchange between replicas
        (`n2uq_tf.distribute.GradientCompression`).
      strategy: build, train and evaluate in its scope (a `tf.distribute` strategy).
      verbose: Keras' fit verbosity. log: called with a line per phase (e.g. ``print``).
    """
    steps = _steps(train_data, steps_per_epoch)
    with _scope(strategy):
        # 1. the float teacher
        if teacher_epochs:
            rate = teacher_learning_rate if teacher_learning_rate is not None else TEACHER_LR_MULTIPLIER * learning_rate
            log(f"teacher: training the float {teacher.name} for {teacher_epochs} epochs (lr {rate:g})")
            train_teacher(teacher, train_data, epochs=teacher_epochs, learning_rate=rate, steps_per_epoch=steps,
                          validation_data=validation_data, callbacks=teacher_callbacks,
                          gradient_compression=gradient_compression, verbose=verbose)
            if teacher_path is not None:
                save_model(teacher, teacher_path)
                teacher = load_model(teacher_path, compile=False, require_quantized=False)

        # 2. the student, initialised from float weights
        _initialise(student, teacher, init_from, init_optional, log)

        # 3. distillation with the official optimizer
        log(f"student: distilling {student.name} from {teacher.name} for {epochs} epochs (lr {learning_rate:g})")
        distiller = DistillationModel(student, teacher, temperature=temperature, alpha=alpha)
        optimizer = paper_optimizer(learning_rate, epochs=epochs, steps_per_epoch=steps)
        distiller.compile(optimizer=_compressed(optimizer, gradient_compression),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) if alpha else None,
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        history = _fit(distiller, train_data, epochs=epochs, steps_per_epoch=steps, validation_data=validation_data,
                       callbacks=callbacks, verbose=verbose)

        # 4. evaluation (the saved student first: a later failure loses no training)
        if student_path is not None:
            save_model(student, student_path)
        student_accuracy = accuracy(student, eval_data)
        teacher_accuracy = accuracy(teacher, eval_data)
    plots = _plots(student, eval_data, plots_dir, plot_batches, log) if plots_dir is not None else []
    return RecipeResult(student=student, teacher=teacher, student_accuracy=student_accuracy,
                        teacher_accuracy=teacher_accuracy, history=dict(history.history), plots=plots)


def _plots(student: keras.Model, eval_data: tf.data.Dataset, directory: str | os.PathLike[str], batches: int,
           log: Log) -> list[str]:
    sample = np.concatenate([x for x, _ in eval_data.take(batches)])
    try:
        written = plots.save_plots(student, sample, os.fspath(directory))
    except MissingDependencyError as error:  # matplotlib (the plots extra) is not installed
        log(f"plots skipped ({error})")
        return []
    log("plots: " + ", ".join(written))
    return written
