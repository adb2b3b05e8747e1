"""n2uq_tf.recipe.train_n2uq, the paper's recipe in one call: the teacher trained and saved, the student
started from its float weights, the teacher left as it was, and the accuracies it reports measured
independently (the CLI's end-to-end runs are in test_cli.py)."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf import recipe
from n2uq_tf.training import DistillationModel


def tiny_cnn(name):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(x), name=name)


@pytest.fixture(scope="module")
def digits():
    (x, y), (x_test, y_test) = n2uq_tf.data.digits_arrays(image_size=8)
    return (x[:96], y[:96]), (x_test[:64], y_test[:64])


def batches(arrays):
    return tf.data.Dataset.from_tensor_slices(arrays).batch(32)


def float_weights(model):
    """{variable name: value} of a model's float weights (its quantizer parameters left out)."""
    layers = {getattr(layer, "layer", layer).name for layer in model.layers}
    return {w.name: w.numpy().copy() for w in model.weights if w.name.split("/")[0] in layers}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.mark.slow
def test_train_n2uq_trains_saves_and_freezes_the_teacher_and_starts_the_student_from_it(digits, tmp_path,
                                                                                       monkeypatch):
    (x, y), (x_test, y_test) = digits
    teacher = tiny_cnn("teacher")
    student = n2uq_tf.quantize_model(teacher, bits=2)  # the twin of the still untrained float model
    untrained = float_weights(teacher)
    at_distillation = {}
    real_fit = recipe._fit

    def recording_fit(model, data, **kwargs):
        if isinstance(model, DistillationModel):
            at_distillation["student"] = float_weights(model.student)
            at_distillation["teacher"] = float_weights(model.teacher)
        return real_fit(model, data, **kwargs)

    monkeypatch.setattr(recipe, "_fit", recording_fit)
    logged = []
    teacher_path, student_path = str(tmp_path / "teacher.keras"), str(tmp_path / "student.keras")
    result = recipe.train_n2uq(student, batches((x, y)), batches((x_test, y_test)), teacher=teacher, epochs=2,
                               learning_rate=1e-3, teacher_epochs=2, teacher_path=teacher_path,
                               student_path=student_path, log=logged.append)

    # 1. The teacher was trained here, saved, and the distillation ran with the saved copy.
    trained = float_weights(teacher)
    assert any(not np.array_equal(trained[key], untrained[key]) for key in trained)
    assert result.teacher is not teacher
    assert_same_weights(float_weights(result.teacher), trained)
    assert_same_weights(float_weights(n2uq_tf.load_model(teacher_path, require_quantized=False)), trained)
    # 2. The student started from the trained float weights (not the untrained ones it was cloned from).
    assert_same_weights(at_distillation["student"], trained)
    # 3. Distillation changed the student, not the frozen teacher.
    assert_same_weights(float_weights(result.teacher), at_distillation["teacher"])
    assert not result.teacher.trainable
    assert len(result.history["loss"]) == 2 and "distillation_loss" in result.history
    # 4. The accuracies are the two models' top-1 on the evaluation data, and the saved student is it.
    for model, reported in ((student, result.student_accuracy), (result.teacher, result.teacher_accuracy)):
        assert reported == pytest.approx(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test),
                                         abs=1e-6)
    saved = n2uq_tf.load_model(student_path)
    np.testing.assert_array_equal(saved.predict(x_test, verbose=0), student.predict(x_test, verbose=0))
    assert [row.name for row in result.report.quantized] == ["conv2"] and result.plots == []
    assert logged[0].startswith("teacher: training the float teacher for 2 epochs (lr 0.004)")


class _Stop(Exception):
    pass


def test_init_from_a_model_that_does_not_fit_the_student(digits, tmp_path, monkeypatch):
    (x, y), _ = digits
    data = batches((x, y))
    teacher = tiny_cnn("teacher")
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(10, name="fc")])
    student = n2uq_tf.quantize_model(tiny_cnn("float_twin"), bits=2)
    before = float_weights(student)

    def stop(*args, **kwargs):
        raise _Stop()

    monkeypatch.setattr(recipe, "_fit", stop)  # the distillation would start here
    with pytest.raises(ValueError, match="conv1"):  # required: named, and nothing was copied
        recipe.train_n2uq(student, data, data, teacher=teacher, init_from=other, epochs=1)
    assert_same_weights(float_weights(student), before)
    logged = []
    with pytest.raises(_Stop):  # optional: said, and the student keeps its own weights
        recipe.train_n2uq(student, data, data, teacher=teacher, init_from=other, init_optional=True, epochs=1,
                          log=logged.append)
    assert logged[0].startswith("student: starting from scratch; model 'sequential")
    assert_same_weights(float_weights(student), before)
    path = str(tmp_path / "twin.weights.h5")
    teacher.save_weights(path)
    with pytest.raises(_Stop):  # a weights file of the float twin
        recipe.train_n2uq(student, data, data, teacher=other, init_from=path, epochs=1, log=logged.append)
    assert_same_weights(float_weights(student), float_weights(teacher))
    assert f"student: {student.name} initialised from {path}" in logged


def test_plots_are_drawn_or_skipped_without_matplotlib(digits, tmp_path, monkeypatch):
    (x, y), _ = digits
    student = n2uq_tf.quantize_model(tiny_cnn("float_twin"), bits=2)
    logged = []
    written = recipe._plots(student, batches((x, y)), tmp_path / "plots", 1, logged.append)
    assert sorted(os.path.basename(p) for p in written) == ["thresholds.png", "weight_levels.png"]
    assert logged == ["plots: " + ", ".join(written)]
    monkeypatch.setitem(sys.modules, "matplotlib.ticker", None)  # matplotlib (the plots extra) not installed
    assert recipe._plots(student, batches((x, y)), tmp_path / "none", 1, logged.append) == []
    assert logged[-1].startswith("plots skipped (n2uq_tf.plots needs matplotlib: pip install matplotlib")
