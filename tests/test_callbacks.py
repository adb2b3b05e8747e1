"""QuantizerTensorBoard: the logged scalars, read back from the event files, equal the variables."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf.training.callbacks import QuantizerTensorBoard, quantizer_state


def wrappers_by_name(model):
    return {layer.layer.name: layer for layer in model.layers if isinstance(layer, n2uq_tf.N2UQWrapper)}


def expected_scalars(model):
    """{tag: value} from the variables, thresholds per the spec (1e-3 floor, midpoints, / beta1)."""
    scalars = {}
    for name, wrapper in wrappers_by_name(model).items():
        v = {key: var.numpy() for key, var in wrapper.input_quantizer[1].items()}
        a = np.where(v["intervals"] > np.float32(1e-3), v["intervals"], np.float32(1e-3))
        bounds = v["start"] + np.concatenate([[0], np.cumsum(a)]).astype(np.float32)
        thresholds = (bounds[:-1] + a / 2) / v["beta1"]
        prefix = f"quantizers/{name}/"
        scalars.update({f"{prefix}threshold_{i + 1}": t for i, t in enumerate(thresholds)})
        scalars.update({f"{prefix}interval_{i + 1}": x for i, x in enumerate(v["intervals"])})
        scalars.update({prefix + key: v[key] for key in ("start", "beta1", "beta2")})
    return scalars


class Recorder(keras.callbacks.Callback):
    def __init__(self, model):
        super().__init__()
        self.quantized, self.epochs = model, {}

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = expected_scalars(self.quantized)


def read_events(directory):
    """{step: {tag: value}} from every event file under ``directory`` (offline, no tensorboard)."""
    steps = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                steps.setdefault(event.step, {})[value.tag] = float(tf.make_ndarray(value.tensor))
    return steps


def data(count=32):
    rng = np.random.default_rng(0)
    return rng.normal(0.5, 0.5, (count, 12, 12, 3)).astype(np.float32), rng.integers(0, 4, count)


def compiled(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2, overrides={"fc1": 3})
    # A large learning rate so that every quantizer parameter moves between epochs.
    q.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q


def test_logged_values_equal_the_variables_at_each_epoch_end(small_cnn, tmp_path):
    q = compiled(small_cnn)
    x, y = data()
    recorder = Recorder(q)
    board = QuantizerTensorBoard(str(tmp_path))
    q.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[board, recorder])
    assert board.run_dir == str(tmp_path / "quantizers")
    logged = read_events(board.run_dir)
    assert sorted(logged) == [0, 1]
    for epoch in (0, 1):
        expected = recorder.epochs[epoch]
        assert set(logged[epoch]) == set(expected)
        assert len(expected) == 2 * (3 + 3 + 3) + (7 + 7 + 3)  # conv_a, dw at 2 bits, fc1 at 3 bits
        for tag, value in expected.items():
            assert logged[epoch][tag] == pytest.approx(float(value), rel=1e-6, abs=1e-7), tag
    moved = [t for t in recorder.epochs[0] if recorder.epochs[0][t] != recorder.epochs[1][t]]
    assert any(t.endswith("beta1") for t in moved) and any("threshold" in t for t in moved)


def test_every_n_batches(small_cnn, tmp_path):
    q = compiled(small_cnn)
    x, y = data(48)
    board = QuantizerTensorBoard(str(tmp_path), update_freq=2)
    q.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[board])
    logged = read_events(board.run_dir)
    assert sorted(logged) == [2, 4, 6]  # optimizer steps
    assert logged[6] == pytest.approx({t: float(v) for t, v in expected_scalars(q).items()}, rel=1e-6, abs=1e-7)


class Holder(keras.Model):
    """Stands in for the distillation model: fit runs on it, the quantizers are in .student."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.probe = keras.layers.Dense(4)

    def call(self, x, training=None):
        return self.student(x, training=training) + 0 * self.probe(self.student(x))


def test_logs_the_student_of_a_wrapping_model(small_cnn, tmp_path):
    student = n2uq_tf.quantize_model(small_cnn, bits=2)
    holder = Holder(student)
    holder.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(16)
    board = QuantizerTensorBoard(str(tmp_path), subdir=None)
    holder.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[board])
    logged = read_events(str(tmp_path))
    assert logged[0] == pytest.approx({t: float(v) for t, v in expected_scalars(student).items()},
                                      rel=1e-6, abs=1e-7)
    assert set(quantizer_state(holder)) == {"conv_a", "dw", "fc1"}


def test_rejects_bad_update_freq(tmp_path):
    for bad in ("batch", 0, -3, 1.5, True):
        with pytest.raises(ValueError, match="update_freq"):
            QuantizerTensorBoard(str(tmp_path), update_freq=bad)


def test_with_the_distillation_model(small_cnn, tmp_path):
    from n2uq_tf.training import DistillationModel
    student = n2uq_tf.quantize_model(small_cnn, bits=2)
    distiller = DistillationModel(student, small_cnn)
    distiller.compile(keras.optimizers.Adam(0.01))
    x, _ = data(16)
    recorder = Recorder(student)
    board = QuantizerTensorBoard(str(tmp_path))
    distiller.fit(x, batch_size=8, epochs=1, verbose=0, callbacks=[board, recorder])
    logged = read_events(board.run_dir)
    assert logged[0] == pytest.approx({t: float(v) for t, v in recorder.epochs[0].items()}, rel=1e-6, abs=1e-7)
