"""DistillationModel: loss and gradients against a hand computation, a frozen teacher, Keras workflow,
MirroredStrategy, and a learning check on a real dataset (sklearn digits)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf.training import DistillationModel, distillation_loss, paper_optimizer


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def hand_loss(teacher_logits, student_logits, labels, temperature, alpha, sample_weight=None):
    """(total, distillation, label) as the issue defines them, in float64 NumPy."""
    t, s = teacher_logits.astype(np.float64), student_logits.astype(np.float64)
    w = np.ones(len(s)) if sample_weight is None else sample_weight
    soft = -(np_softmax(t / temperature) * np_log_softmax(s / temperature)).sum(-1) * temperature ** 2
    hard = -np_log_softmax(s)[np.arange(len(s)), labels]
    distill, label = (w * soft).mean(), (w * hard).mean()
    return (1 - alpha) * distill + alpha * label, distill, label


def hand_logit_gradient(teacher_logits, student_logits, labels, temperature, alpha, sample_weight=None):
    """d total / d student logits, derived by hand: T (q_T - p_T) / N and (q - onehot) / N."""
    t, s = teacher_logits.astype(np.float64), student_logits.astype(np.float64)
    n = len(s)
    w = np.ones(n) if sample_weight is None else sample_weight
    onehot = np.eye(s.shape[1])[labels]
    soft = temperature * (np_softmax(s / temperature) - np_softmax(t / temperature))
    hard = np_softmax(s) - onehot
    return w[:, None] * ((1 - alpha) * soft + alpha * hard) / n


def dense_teacher(classes=4, features=5, batchnorm=False, seed=1):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((features,))
    x = keras.layers.Dense(12)(inp)
    if batchnorm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x), name="teacher")


def linear_student(classes=4, features=5, seed=2, softmax=False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((features,))
    out = keras.layers.Dense(classes, activation="softmax" if softmax else None, name="fc")(inp)
    return keras.Model(inp, out, name="student")


def quantized_student(classes=4, features=5, seed=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((features,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    x = keras.layers.Dense(16, activation="relu")(x)
    out = keras.layers.Dense(classes)(x)
    return n2uq_tf.quantize_model(keras.Model(inp, out), bits=2)


def data(n=16, features=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_function(temperature):
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
    per_example = distillation_loss(t, s, temperature, reduction="none").numpy()
    expected = -(np_softmax(t / temperature) * np_log_softmax(s / temperature)).sum(-1) * temperature ** 2
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    np.testing.assert_allclose(distillation_loss(t, s, temperature).numpy(), expected.mean(), rtol=1e-5)
    # Softmax outputs give the same loss (log-probabilities are logits up to a per-row constant).
    probs = distillation_loss(tf.nn.softmax(t), tf.nn.softmax(s), temperature, teacher_from_logits=False,
                              student_from_logits=False).numpy()
    np.testing.assert_allclose(probs, expected.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(t, s, 0.0)


@pytest.mark.parametrize("temperature, alpha, weighted", [(1.0, 0.0, False), (3.0, 0.3, False),
                                                          (2.0, 0.5, True)])
def test_train_step_loss_and_gradients_match_hand_computation(temperature, alpha, weighted):
    x, y = data()
    w = np.linspace(0.5, 1.5, len(x)) if weighted else None
    teacher, student = dense_teacher(), linear_student()
    teacher_logits = teacher.predict(x, verbose=0)
    student_logits = student.predict(x, verbose=0)
    kernel, bias = (v.numpy().astype(np.float64) for v in student.trainable_variables)

    model = DistillationModel(student, teacher, temperature=temperature, alpha=alpha)
    model.compile(keras.optimizers.SGD(1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True) if alpha else None)
    history = model.fit(x, y, sample_weight=w, batch_size=len(x), epochs=1, shuffle=False, verbose=0).history

    total, distill, label = hand_loss(teacher_logits, student_logits, y, temperature, alpha, w)
    assert history["loss"][0] == pytest.approx(total, rel=1e-5)
    assert history["distillation_loss"][0] == pytest.approx(distill, rel=1e-5)
    assert ("label_loss" in history) == (alpha > 0)
    if alpha:
        assert history["label_loss"][0] == pytest.approx(label, rel=1e-5)

    # One SGD(lr=1) step: the weights moved by minus the gradient of the hand-computed loss.
    dz = hand_logit_gradient(teacher_logits, student_logits, y, temperature, alpha, w)
    new_kernel, new_bias = (v.numpy() for v in student.trainable_variables)
    np.testing.assert_allclose(kernel - new_kernel, x.astype(np.float64).T @ dz, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias - new_bias, dz.sum(0), rtol=1e-4, atol=1e-6)


def test_gradients_match_finite_differences_of_the_loss():
    """Independent of the hand derivation: central differences of the NumPy loss in the weights."""
    x, y = data(n=8)
    teacher, student = dense_teacher(), linear_student()
    t = teacher.predict(x, verbose=0).astype(np.float64)
    kernel, bias = (v.numpy().astype(np.float64) for v in student.trainable_variables)
    model = DistillationModel(student, teacher, temperature=2.0, alpha=0.25)
    model.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    applied = kernel - student.trainable_variables[0].numpy()

    xd, eps = x.astype(np.float64), 1e-6
    numeric = np.zeros_like(kernel)
    for index in np.ndindex(*kernel.shape):
        k = kernel.copy()
        k[index] += eps
        plus = hand_loss(t, xd @ k + bias, y, 2.0, 0.25)[0]
        k[index] -= 2 * eps
        minus = hand_loss(t, xd @ k + bias, y, 2.0, 0.25)[0]
        numeric[index] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(applied, numeric, rtol=1e-3, atol=1e-6)


def test_softmax_student_and_teacher_match_logits():
    """Models ending in softmax (from_logits=False) train exactly like their logit twins, at T != 1."""
    x, y = data()
    results = []
    for softmax in (False, True):
        teacher = dense_teacher()
        if softmax:
            teacher = keras.Model(teacher.input, keras.layers.Softmax()(teacher.output))
        student = linear_student(softmax=softmax)
        model = DistillationModel(student, teacher, temperature=4.0, teacher_from_logits=not softmax,
                                  student_from_logits=not softmax)
        model.compile(keras.optimizers.SGD(0.5))
        history = model.fit(x, batch_size=8, epochs=2, shuffle=False, verbose=0).history
        results.append((history["loss"], student.get_weights()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def above_teacher_entropy(losses, teacher, x, temperature=1.0):
    """Distillation losses minus their floor (T^2 times the teacher's soft-target entropy): the KL part."""
    soft_targets = np_softmax(teacher(x, training=False).numpy().astype(np.float64) / temperature)
    floor = temperature ** 2 * -(soft_targets * np.log(soft_targets)).sum(-1).mean()
    kl = np.asarray(losses) - floor
    assert kl.min() > 0, kl
    return kl


def _softmax_ending(model, kind):
    """`model` (ending in logits) with a softmax added the way `kind` says."""
    logits = model.output
    if kind == "activation_argument":  # Dense(..., activation="softmax"): rebuild the last layer
        last = model.layers[-1]
        config = dict(last.get_config(), activation="softmax")
        dense = keras.layers.Dense.from_config(config)
        out = dense(model.layers[-2].output)
        dense.set_weights(last.get_weights())
    elif kind == "softmax_layer":
        out = keras.layers.Softmax(name="probs")(logits)
    elif kind == "activation_layer":
        out = keras.layers.Activation("softmax", name="probs")(logits)
    else:  # "tf_op": tf.nn.softmax called on the Keras tensor
        out = tf.nn.softmax(logits)
    return keras.Model(model.input, out, name=f"{model.name}_{kind}")


@pytest.mark.parametrize("kind", ["activation_argument", "softmax_layer", "activation_layer", "tf_op"])
def test_softmax_ending_models_train_like_their_logit_twins_with_default_flags(kind):
    """A student and a teacher ending in a softmax, with the default flags, are detected and train
    exactly like their logit twins (the loss falls); taken for logits they trained on a flat loss."""
    x, _ = data(n=32)
    teacher = dense_teacher()
    results = []
    for softmax in (False, True):
        student = linear_student()
        if softmax:
            assert n2uq_tf.training.distillation.softmax_output(_softmax_ending(student, kind)) is not None
            model = DistillationModel(_softmax_ending(student, kind), _softmax_ending(teacher, kind),
                                      temperature=2.0)
            assert not model.student_from_logits and not model.teacher_from_logits
        else:
            model = DistillationModel(student, teacher, temperature=2.0)
            assert model.student_from_logits and model.teacher_from_logits
        model.compile(keras.optimizers.SGD(0.5))
        history = model.fit(x, batch_size=8, epochs=4, shuffle=False, verbose=0).history
        results.append((history["loss"], model.student.get_weights()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    kl = above_teacher_entropy(results[1][0], teacher, x, 2.0)
    assert kl[-1] < 0.5 * kl[0], kl


def test_quantized_softmax_student_is_detected_through_its_wrapper():
    keras.utils.set_random_seed(5)
    inp = keras.Input((5,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    out = keras.layers.Dense(4, activation="softmax", name="probs")(x)
    student = n2uq_tf.quantize_model(keras.Model(inp, out), bits=2, skip_layers=None)
    assert isinstance(student.get_layer("quant_probs"), n2uq_tf.N2UQWrapper)
    model = DistillationModel(student, dense_teacher())
    assert not model.student_from_logits and model.teacher_from_logits
    x, _ = data(n=32)
    model.compile(keras.optimizers.Adam(3e-2))
    kl = above_teacher_entropy(model.fit(x, batch_size=8, epochs=6, verbose=0).history["loss"], model.teacher, x)
    assert kl[-1] < 0.5 * kl[0], kl


def test_softmax_outputs_taken_for_logits_are_refused():
    teacher = dense_teacher()
    student = linear_student(softmax=True)
    with pytest.raises(ValueError, match=r"student 'student' ends in a softmax.*layer 'fc'.*student_from_logits=False"):
        DistillationModel(student, teacher, student_from_logits=True)
    with pytest.raises(ValueError, match="teacher .* ends in a softmax"):
        DistillationModel(linear_student(), _softmax_ending(teacher, "softmax_layer"), teacher_from_logits=True)
    # A normalisation the layers do not show (a Lambda) is caught on the values, before a step trains.
    inp = keras.Input((5,))
    logits = keras.layers.Dense(4)(inp)
    probs = keras.layers.Lambda(lambda z: tf.exp(z) / tf.reduce_sum(tf.exp(z), -1, keepdims=True))(logits)
    hidden = keras.Model(inp, probs, name="hidden_softmax")
    model = DistillationModel(hidden, teacher)
    assert model.student_from_logits
    model.compile(keras.optimizers.SGD(0.5))
    before = [w.copy() for w in hidden.get_weights()]
    with pytest.raises(tf.errors.InvalidArgumentError, match="outputs of the student are probabilities.*"
                                                             "student_from_logits=False"):
        model.fit(data()[0], batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, hidden.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_teacher_is_frozen_in_inference_mode():
    x, _ = data(n=32)
    teacher = dense_teacher(batchnorm=True)
    # Give the BN statistics non-default values, so "unchanged" is not trivially 0 and 1.
    teacher.compile("sgd", "mse")
    teacher.fit(x, np.zeros((32, 4)), epochs=1, verbose=0)
    before = [v.numpy().copy() for v in teacher.variables]
    student = quantized_student()
    model = DistillationModel(student, teacher)
    model.compile(keras.optimizers.Adam(1e-2))
    assert not teacher.trainable
    teacher_ids = {id(v) for v in teacher.variables}
    assert model.trainable_variables and not any(id(v) in teacher_ids for v in model.trainable_variables)
    student_before = [v.numpy().copy() for v in student.trainable_variables]
    model.fit(x, epochs=2, batch_size=8, verbose=0)  # no labels needed for pure distillation
    for a, v in zip(before, teacher.variables):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.name)
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(student_before, student.trainable_variables))
    # Dropout is off in the teacher: its outputs are deterministic, so the loss on a fixed batch is too.
    assert model.evaluate(x, verbose=0) == model.evaluate(x, verbose=0)


def test_keras_workflow_with_tf_data_callbacks_and_saving(tmp_path):
    x, y = data(n=48)
    teacher, student = dense_teacher(), quantized_student()
    model = DistillationModel(student, teacher, alpha=0.2)
    model.compile(paper_optimizer(5e-3, epochs=3, steps_per_epoch=3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    logs = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, epoch_logs=None):
            logs.append(dict(epoch_logs))

    checkpoint = str(tmp_path / "best.h5")
    history = model.fit(train, validation_data=train, epochs=3, verbose=0,
                        callbacks=[Record(), keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss")])
    assert len(logs) == 3
    assert set(history.history) == {"loss", "distillation_loss", "label_loss", "accuracy", "val_loss",
                                     "val_distillation_loss", "val_label_loss", "val_accuracy"}
    assert logs[-1]["loss"] == pytest.approx(0.8 * logs[-1]["distillation_loss"] + 0.2 * logs[-1]["label_loss"],
                                             rel=1e-5)

    # evaluate and predict act on the student; accuracy is the student's outputs against the labels.
    student_logits = student.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(train, verbose=0), student_logits)
    results = model.evaluate(train, verbose=0, return_dict=True)
    assert results["accuracy"] == pytest.approx(np.mean(student_logits.argmax(1) == y))
    total, distill, label = hand_loss(teacher.predict(x, verbose=0), student_logits, y, 1.0, 0.2)
    assert results["loss"] == pytest.approx(total, rel=1e-4)
    assert results["label_loss"] == pytest.approx(label, rel=1e-4)
    assert model.metrics_names[:3] == ["loss", "distillation_loss", "label_loss"]

    # Saving stores the student: n2uq_tf.load_model gives back the quantized student.
    for name in ("student.keras", "student.h5"):
        model.save(str(tmp_path / name))
        loaded = n2uq_tf.load_model(str(tmp_path / name))
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), student_logits)
    loaded = n2uq_tf.load_model(checkpoint)  # written by ModelCheckpoint after the last epoch
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), student_logits)
    weights = str(tmp_path / "w.h5")
    model.save_weights(weights)
    other = DistillationModel(quantized_student(seed=9), teacher)
    other.load_weights(weights)
    np.testing.assert_array_equal(other.student.predict(x, verbose=0), student_logits)


def test_backup_and_restore_resumes_and_config(tmp_path):
    """BackupAndRestore checkpoints the whole distiller (student, optimizer); to_json works."""
    x, _ = data(n=16)

    def build():
        model = DistillationModel(quantized_student(), dense_teacher())
        model.compile(paper_optimizer(1e-2, epochs=4, steps_per_epoch=2))
        return model

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = str(tmp_path / "backup")
    first = build()
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, batch_size=8, epochs=4, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()])
    resumed = build()
    history = resumed.fit(x, batch_size=8, epochs=4, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert history.epoch == [2, 3] and int(resumed.optimizer.iterations) == 8

    config = json.loads(first.to_json())["config"]
    assert config["temperature"] == 1.0 and config["alpha"] == 0.0
    again = DistillationModel.from_config(config)
    assert [type(layer) for layer in again.student.layers] == [type(layer) for layer in first.student.layers]
    assert not again.teacher.trainable


def test_argument_errors():
    teacher, student = dense_teacher(), linear_student()
    with pytest.raises(ValueError, match="alpha"):
        DistillationModel(student, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationModel(student, teacher, temperature=-1)
    with pytest.raises(TypeError, match="teacher"):
        DistillationModel(student, "teacher")
    with pytest.raises(ValueError, match="compile\\(loss="):
        DistillationModel(student, teacher, alpha=0.5).compile("sgd")
    model = DistillationModel(student, teacher, alpha=0.5)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="needs labels"):
        model.fit(data()[0], epochs=1, verbose=0)


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    import n2uq_tf
    from n2uq_tf.training import DistillationModel, paper_optimizer

    def models():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        x = keras.layers.Dense(16, activation="relu")(inp)
        teacher = keras.Model(inp, keras.layers.Dense(4)(x))
        inp = keras.Input((6,))
        x = keras.layers.Dense(16, activation="relu")(inp)
        x = keras.layers.Dense(16, activation="relu")(x)
        student = n2uq_tf.quantize_model(keras.Model(inp, keras.layers.Dense(4)(x)), bits=2)
        model = DistillationModel(student, teacher, temperature=2.0, alpha=0.3)
        model.compile(paper_optimizer(1e-2, epochs=4, steps_per_epoch=4),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 4, 64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    out = {}
    for name, strategy in (("single", tf.distribute.get_strategy()),
                           ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        with strategy.scope():
            model = models()
        history = model.fit(dataset, epochs=4, verbose=0).history
        out[name] = {"replicas": strategy.num_replicas_in_sync, "history": history,
                     "weights": [w.tolist() for w in model.student.get_weights()],
                     "eval": model.evaluate(dataset, verbose=0, return_dict=True)}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=3600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    single, mirrored = out["single"], out["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    losses = mirrored["history"]["loss"]
    assert losses[-1] < losses[0]
    # Same global batches, gradients summed over replicas of the globally averaged loss: the same training.
    for key in single["history"]:
        np.testing.assert_allclose(mirrored["history"][key], single["history"][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)
    for key in single["eval"]:
        assert mirrored["eval"][key] == pytest.approx(single["eval"][key], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_two_bit_student_learns_from_float_teacher_on_digits():
    """A real dataset: sklearn's 8x8 digits. A 2-bit student distilled from its float teacher
    (pure distillation, the paper's optimizer) ends within a few points of the teacher."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order]
    x_train, y_train, x_test, y_test = x[:1347], y[:1347], x[1347:], y[1347:]

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = inp
    for i, filters in enumerate((32, 64, 64)):
        h = keras.layers.Conv2D(filters, 3, padding="same")(h)
        h = keras.layers.BatchNormalization(momentum=0.9)(h)  # few steps: let the statistics settle
        h = keras.layers.ReLU()(h)
        if i == 1:
            h = keras.layers.MaxPooling2D()(h)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    teacher = keras.Model(inp, out)
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x_train, y_train, batch_size=64, epochs=15, verbose=0)

    def accuracy(model):
        return float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))

    teacher_accuracy = accuracy(teacher)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    # The paper's setup: float first conv and classifier, the other convs at W2A2, initialised from the teacher.
    student = n2uq_tf.quantize_model(teacher, bits=2)
    quantized = [layer for layer in student.layers if isinstance(layer, n2uq_tf.N2UQWrapper)]
    assert len(quantized) == 2 and all(layer.input_quantizer[0].bits == 2 for layer in quantized)
    initial_accuracy = accuracy(student)

    epochs, batch_size = 10, 64
    model = DistillationModel(student, teacher)
    model.compile(paper_optimizer(3e-3, epochs=epochs, steps_per_epoch=-(-len(x_train) // batch_size)),
                  metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0).history
    student_accuracy = accuracy(student)
    print(f"digits: teacher {teacher_accuracy:.4f}, 2-bit student at init {initial_accuracy:.4f}, "
          f"distilled {student_accuracy:.4f}")

    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert history["loss"][-1] < history["loss"][0]
    assert teacher_accuracy > 0.93
    assert student_accuracy > initial_accuracy
    assert student_accuracy > teacher_accuracy - 0.05
