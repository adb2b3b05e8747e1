"""Keras callbacks for N2UQ training: the learned thresholds and betas in TensorBoard."""

import os
import warnings

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from n2uq_tf._keras import keras
from n2uq_tf.model_reader import inspected_model, quantizer_state, reader_for

__all__ = ["QuantizerTensorBoard", "quantizer_state"]

# What tensorboard.summary.scalar writes (scalars plugin, ScalarPluginData version 0
# serializes to b""). Written by hand because tf.summary.scalar needs the tensorboard
# package, which TensorFlow no longer installs (n2uq_tf has it as the optional tensorboard extra);
# TensorBoard reads these the same.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""))


def scalar_tags(state):
    """{tag: value} of the scalars logged for a `quantizer_state` dict."""
    tags = {}
    for layer, s in state.items():
        prefix = f"quantizers/{layer}/"
        for i, t in enumerate(s["thresholds"], 1):
            tags[f"{prefix}threshold_{i}"] = t
        if "start" in s:  # N2UQ
            tags[f"{prefix}start"] = s["start"]
            for i, a in enumerate(s["intervals"], 1):
                tags[f"{prefix}interval_{i}"] = a
            tags[f"{prefix}beta1"] = s["beta1"]
            tags[f"{prefix}beta2"] = s["beta2"]
        else:  # other methods: their own scalars (PACT's alpha, LSQ's step, ...)
            for name, value in s.get("parameters", {}).items():
                tags[f"{prefix}{name}"] = value
    return tags


class QuantizerTensorBoard(keras.callbacks.Callback):
    """Logs every activation quantizer's thresholds, start, intervals, beta1 and beta2.

    Per quantized layer: ``quantizers/<layer>/threshold_<i>`` (T_i / beta1, input units),
    ``.../start``, ``.../interval_<i>`` (stored values), ``.../beta1``, ``.../beta2``.
    When the model being fitted has a ``student`` (distillation), the student is logged.
    Works in tf_keras and Keras 3 ``fit`` alike, for any model a front end's `model_reader` reads;
    a model without quantized activations is trained as usual, with one warning.

    Args:
      log_dir: the TensorBoard log directory (may be shared with keras' TensorBoard).
      update_freq: "epoch" (at each epoch end, step = epoch) or an int N (every N
        training batches, step = optimizer iterations).
      subdir: the run written under ``log_dir``; its own directory because TensorBoard
        reads one event file per run at a time, and keras' TensorBoard writes "train".
    """

    def __init__(self, log_dir: str | os.PathLike[str], update_freq: str | int = "epoch",
                 subdir: str | None = "quantizers"):
        super().__init__()
        if update_freq != "epoch" and (isinstance(update_freq, bool) or not isinstance(update_freq, int)
                                       or update_freq < 1):
            raise ValueError(f"update_freq must be 'epoch' or a positive int, got {update_freq!r}")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.run_dir = os.path.join(self.log_dir, subdir) if subdir else self.log_dir
        self._writer = None
        self._batches = 0
        self._last_step = None
        self._warned = False

    def on_train_begin(self, logs=None):
        try:  # a model no front end reads fails here, before the first step, not mid-training
            reader_for(inspected_model(self.model))
        except TypeError as error:
            raise TypeError(f"QuantizerTensorBoard cannot read the model being fitted: {error}") from error
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.run_dir)
        if self.update_freq != "epoch":
            self._last_step = self._step()

    def _write(self, step):
        state = quantizer_state(self.model)  # a distiller's student (model_reader.inspected_model)
        if not state:
            if not self._warned:
                warnings.warn("QuantizerTensorBoard: the model has no quantized activations to log", stacklevel=2)
                self._warned = True
            return
        with self._writer.as_default():
            for tag, value in scalar_tags(state).items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)
        self._writer.flush()

    def _step(self):
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        # optimizer.iterations carries on across resumed training; count batches without one.
        return int(iterations.numpy()) if iterations is not None else self._batches

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq == "epoch":
            return
        self._batches += 1
        step = self._step()
        # Written when the step crosses a multiple of N: with steps_per_execution > 1 the
        # step moves by more than one between calls and may skip the multiples themselves.
        if self._last_step is None or step // self.update_freq != self._last_step // self.update_freq:
            self._write(step)
        self._last_step = step

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write(epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
