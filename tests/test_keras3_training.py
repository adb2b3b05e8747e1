"""Training Keras 3 models (``import keras``): the distillation model, the paper's optimizer and
schedule, the callbacks, and the clear errors of what is tf_keras-only (distribute's compression).

Float Keras 3 models stand in for quantized ones: this code treats them alike (the quantizer
parameters are found by their variable names, which the test layer below gives too).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import n2uq_tf
from n2uq_tf.training import keras3 as training3
from n2uq_tf.training.optimizer import is_quantizer_variable


def numpy_distillation(teacher_logits, student_logits, temperature):
    """Per-example -T^2 sum softmax(t/T) log softmax(s/T), in float64."""
    def log_softmax(z):
        z = np.asarray(z, np.float64) / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -temperature ** 2 * (np.exp(log_softmax(teacher_logits)) * log_softmax(student_logits)).sum(axis=-1)


def numpy_sparse_cross_entropy(labels, logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def dense_model(weights, bias, activation=None, name=None):
    """A Keras 3 Sequential of one Dense layer holding the given weights."""
    model = keras.Sequential([keras.Input((weights.shape[0],)),
                              keras.layers.Dense(weights.shape[1], activation=activation)], name=name)
    model.layers[-1].set_weights([weights, bias])
    return model


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(6, 5)).astype(np.float32), "labels": rng.integers(0, 4, 6),
            "student_w": rng.normal(size=(5, 4)).astype(np.float32), "student_b": rng.normal(size=4).astype(np.float32),
            "teacher_w": rng.normal(size=(5, 4)).astype(np.float32), "teacher_b": rng.normal(size=4).astype(np.float32),
            "sample_weight": rng.uniform(0.5, 2.0, 6).astype(np.float32)}


def test_the_package_name_gives_the_keras3_twin_for_keras3_models(fixed):
    student = dense_model(fixed["student_w"], fixed["student_b"])
    teacher = dense_model(fixed["teacher_w"], fixed["teacher_b"])
    model = n2uq_tf.DistillationModel(student, teacher, temperature=2.0)
    assert type(model) is training3.DistillationModel and isinstance(model, keras.Model)
    assert (model.temperature, model.alpha, model.student, model.teacher) == (2.0, 0.0, student, teacher)
    assert not teacher.trainable
    tf_student = tf_keras.Sequential([tf_keras.Input((5,)), tf_keras.layers.Dense(4)])
    tf_teacher = tf_keras.Sequential([tf_keras.Input((5,)), tf_keras.layers.Dense(4)])
    assert type(n2uq_tf.DistillationModel(tf_student, tf_teacher)) is n2uq_tf.training.DistillationModel
    with pytest.raises(TypeError, match="student is a keras 3 model and the teacher a tf_keras model"):
        n2uq_tf.DistillationModel(student, tf_teacher)
    with pytest.raises(TypeError, match="DistillationModel: the teacher must be a Keras 3"):
        training3.DistillationModel(student, tf_teacher)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        n2uq_tf.DistillationModel(student, teacher, temperature=0.0)


@pytest.mark.parametrize("temperature, alpha, weighted", [(1.0, 0.0, False), (3.0, 0.25, True)])
def test_loss_is_the_numpy_distillation_loss(fixed, temperature, alpha, weighted):
    x, labels = fixed["x"], fixed["labels"]
    student = dense_model(fixed["student_w"], fixed["student_b"])
    teacher = dense_model(fixed["teacher_w"], fixed["teacher_b"])
    model = n2uq_tf.DistillationModel(student, teacher, temperature=temperature, alpha=alpha)
    model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) if alpha else None)
    weights = fixed["sample_weight"] if weighted else None
    student_logits = x @ fixed["student_w"] + fixed["student_b"]
    teacher_logits = x @ fixed["teacher_w"] + fixed["teacher_b"]
    loss = model.compute_loss(x=x, y=labels if alpha else None, y_pred=student(x),
                              sample_weight=None if weights is None else tf.constant(weights))
    distill = numpy_distillation(teacher_logits, student_logits, temperature)
    label = numpy_sparse_cross_entropy(labels, student_logits)
    if weights is not None:
        distill, label = distill * weights, label * weights
    expected = (1 - alpha) * distill.mean() + alpha * label.mean()
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    np.testing.assert_allclose(float(model.distillation_loss_tracker.result()), distill.mean(), rtol=2e-6)
    # The same through the shared function the tf_keras model uses.
    np.testing.assert_allclose(float(n2uq_tf.distillation_loss(teacher_logits, student_logits, temperature)),
                               numpy_distillation(teacher_logits, student_logits, temperature).mean(), rtol=2e-6)


@pytest.mark.parametrize("ending", ["activation", "layer", "op"])
def test_softmax_outputs_are_detected_and_give_the_same_loss(fixed, ending):
    x = fixed["x"]
    inputs = keras.Input((5,))
    dense = keras.layers.Dense(4, activation="softmax" if ending == "activation" else None)
    logits = dense(inputs)
    outputs = {"activation": lambda t: t, "layer": keras.layers.Softmax(), "op": keras.ops.softmax}[ending](logits)
    teacher = keras.Model(inputs, outputs)
    dense.set_weights([fixed["teacher_w"], fixed["teacher_b"]])
    student = dense_model(fixed["student_w"], fixed["student_b"])
    model = n2uq_tf.DistillationModel(student, teacher, temperature=2.0)
    assert (model.teacher_from_logits, model.student_from_logits) == (False, True)
    expected = numpy_distillation(x @ fixed["teacher_w"] + fixed["teacher_b"],
                                  x @ fixed["student_w"] + fixed["student_b"], 2.0).mean()
    np.testing.assert_allclose(float(model.compute_loss(x=x, y_pred=student(x))), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher_from_logits=True"):
        n2uq_tf.DistillationModel(student, teacher, teacher_from_logits=True)


def test_probabilities_taken_for_logits_stop_training_before_any_update(fixed):
    """A softmax inside a Lambda is not seen on the model: the values are checked in the step (without
    XLA, which drops assertions: CPU's default compile)."""
    teacher = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Lambda(keras.ops.softmax)])
    student = dense_model(fixed["student_w"], fixed["student_b"])
    model = n2uq_tf.DistillationModel(student, teacher)
    assert model.teacher_from_logits
    model.compile(keras.optimizers.SGD(0.1), jit_compile=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outputs of the teacher are probabilities"):
        model.fit(fixed["x"], epochs=1, verbose=0)
    np.testing.assert_array_equal(student.layers[-1].get_weights()[0], fixed["student_w"])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_fit_step_is_the_hand_computed_gradient_step(fixed, jit_compile):
    """SGD on a linear student: dL/ds = T (softmax(s/T) - softmax(t/T)) / batch, dW = x^T dL/ds."""
    x, temperature, rate = fixed["x"], 2.0, 0.5
    student = dense_model(fixed["student_w"], fixed["student_b"])
    teacher = dense_model(fixed["teacher_w"], fixed["teacher_b"])
    model = n2uq_tf.DistillationModel(student, teacher, temperature=temperature)
    model.compile(keras.optimizers.SGD(rate), jit_compile=jit_compile)
    history = model.fit(x, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    s = x.astype(np.float64) @ fixed["student_w"] + fixed["student_b"]
    t = x.astype(np.float64) @ fixed["teacher_w"] + fixed["teacher_b"]
    d_logits = temperature * (softmax(s / temperature) - softmax(t / temperature)) / len(x)
    new_w, new_b = student.layers[-1].get_weights()
    np.testing.assert_allclose(new_w, fixed["student_w"] - rate * x.T @ d_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_b, fixed["student_b"] - rate * d_logits.sum(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(teacher.layers[-1].get_weights()[0], fixed["teacher_w"])  # frozen
    np.testing.assert_allclose(history.history["loss"][0], numpy_distillation(t, s, temperature).mean(), rtol=1e-5)
    assert history.history["distillation_loss"] == history.history["loss"]


def test_fit_steps_equal_the_tf_keras_distillation_model_with_the_paper_optimizer(fixed):
    """The same data, weights and paper optimizer (Adam, lr schedule, lr / 10 for quantizer
    parameters) in both front ends: the students stay equal to float tolerance."""
    x, steps = fixed["x"], 3
    student = keras.Sequential([keras.Input((5,)), QuantizerNamedDense(4)])
    student.set_weights([fixed["student_w"], np.float32(0.3)])
    teacher = dense_model(fixed["teacher_w"], fixed["teacher_b"])
    tf_student = tf_keras.Sequential([tf_keras.Input((5,)), TfKerasQuantizerNamedDense(4)])
    tf_student.set_weights([fixed["student_w"], np.float32(0.3)])
    tf_teacher = tf_keras.Sequential([tf_keras.Input((5,)), tf_keras.layers.Dense(4)])
    tf_teacher.set_weights([fixed["teacher_w"], fixed["teacher_b"]])
    for distiller, compile_args in ((n2uq_tf.DistillationModel(student, teacher, temperature=2.0),
                                     {"jit_compile": True}),
                                    (n2uq_tf.DistillationModel(tf_student, tf_teacher, temperature=2.0), {})):
        optimizer = n2uq_tf.paper_optimizer(0.05, epochs=2, steps_per_epoch=2, model=distiller)
        distiller.compile(optimizer, **compile_args)
        distiller.fit(x, batch_size=2, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    for got, want in zip(student.get_weights(), tf_student.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(student.get_weights()[0], fixed["student_w"])  # it trained


def test_evaluate_save_and_load_the_student(fixed, tmp_path):
    x, labels = fixed["x"], fixed["labels"]
    student = dense_model(fixed["student_w"], fixed["student_b"], name="student")
    teacher = dense_model(fixed["teacher_w"], fixed["teacher_b"], activation="softmax")
    model = n2uq_tf.DistillationModel(student, teacher, alpha=0.5)
    with pytest.raises(ValueError, match="weights a label loss"):
        model.compile("adam")
    with pytest.raises(TypeError, match="tf_keras optimizer"):
        model.compile(n2uq_tf.paper_optimizer(), loss="sparse_categorical_crossentropy")
    model.compile(n2uq_tf.paper_optimizer(model=model),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    logs = model.fit(x, labels, batch_size=3, epochs=1, verbose=0).history
    assert {"loss", "distillation_loss", "label_loss", "accuracy"} <= set(logs)
    result = model.evaluate(x, labels, verbose=0, return_dict=True)
    s, t = x @ student.layers[-1].get_weights()[0] + student.layers[-1].get_weights()[1], x @ fixed["teacher_w"]
    t = t + fixed["teacher_b"]
    distill = numpy_distillation(t, s, 1.0).mean()
    label = numpy_sparse_cross_entropy(labels, s).mean()
    np.testing.assert_allclose(result["distillation_loss"], distill, rtol=1e-5)
    np.testing.assert_allclose(result["label_loss"], label, rtol=1e-5)
    np.testing.assert_allclose(result["loss"], 0.5 * distill + 0.5 * label, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(x, verbose=0), student.predict(x, verbose=0))
    path = str(tmp_path / "student.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == "student" and len(loaded.layers) == 1  # the student, not the distiller
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), student.predict(x, verbose=0))


# ------------------------------------------------------------------ the paper's optimizer and schedule

def quantizer_named_dense(keras_module):
    """Dense with a scalar added to the input, named as an N2UQ quantizer parameter (its start),
    as a layer class of ``keras_module`` (Keras 3 or tf_keras)."""

    class QuantizerNamedDense(keras_module.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units))
            self.start = self.add_weight(name="input_n2uq_start", shape=(), initializer="zeros")

        def call(self, inputs):
            return (inputs + self.start) @ self.kernel

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    return QuantizerNamedDense


QuantizerNamedDense = keras.saving.register_keras_serializable(package="n2uq_tf_tests")(quantizer_named_dense(keras))
TfKerasQuantizerNamedDense = quantizer_named_dense(tf_keras)


def test_keras3_schedule_is_the_formula_and_serializes():
    lr0, epochs, steps_per_epoch = 0.01, 4, 3
    schedule = training3.LinearEpochDecay(lr0, epochs, steps_per_epoch)
    assert isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
    for step in range(epochs * steps_per_epoch + 3):
        epoch = step // steps_per_epoch
        expected = np.float32(lr0 * max(0.0, 1 - (epoch + 1) / epochs))
        assert float(schedule(step)) == expected, step
        assert schedule(step).numpy() == np.float32(n2uq_tf.training.linear_epoch_decay(lr0, epoch, epochs))
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"] == "n2uq_tf>LinearEpochDecay"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is training3.LinearEpochDecay and restored.get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        training3.LinearEpochDecay(lr0, epochs, 0)


def test_keras3_paper_optimizer_steps_quantizer_parameters_at_a_tenth(fixed, tmp_path):
    model = keras.Sequential([keras.Input((5,)), QuantizerNamedDense(4)])
    optimizer = n2uq_tf.paper_optimizer(0.01, epochs=2, steps_per_epoch=1, batch_size=128, model=model)
    assert type(optimizer) is training3.N2UQAdam and isinstance(optimizer, keras.optimizers.Adam)
    assert optimizer.epsilon == 1e-8 and optimizer.quantizer_lr_multiplier == 0.1
    schedule = keras.saving.deserialize_keras_object(optimizer.get_config()["learning_rate"])
    assert type(schedule) is training3.LinearEpochDecay
    assert (schedule.initial_learning_rate, schedule.epochs, schedule.steps_per_epoch) == (0.005, 2, 1)
    kernel, start = model.layers[0].kernel, model.layers[0].start
    assert is_quantizer_variable(start) and not is_quantizer_variable(kernel)
    model.compile(optimizer, loss="mse")
    before = [v.numpy() for v in (kernel, start)]
    x, y = fixed["x"], np.zeros((len(fixed["x"]), 4), np.float32)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    # Adam's first step from zero moments: m_hat = g, v_hat = g^2, so the update is rate * g / (|g| + eps).
    rate = 0.01 * 128 / 256 * (1 - 1 / 2)  # batch scaling, then epoch 0 of 2
    k, s = tf.Variable(before[0]), tf.Variable(before[1])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square((x + s) @ k))
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, [k, s])]
    for variable, old, grad, factor in zip((kernel, start), before, grads, (1.0, 0.1)):
        expected = old - factor * rate * grad / (np.abs(grad) + 1e-8)
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7)
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(config)
    assert type(restored) is training3.N2UQAdam and restored.quantizer_lr_multiplier == 0.1
    path = str(tmp_path / "compiled.keras")
    model.save(path)
    assert type(keras.models.load_model(path).optimizer) is training3.N2UQAdam
    with pytest.raises(ValueError, match="quantizer_lr_multiplier must be >= 0"):
        training3.N2UQAdam(quantizer_lr_multiplier=-1)


# ------------------------------------------------------------------ callbacks and distribute

def test_quantizer_tensorboard_in_a_keras3_fit(fixed, tmp_path):
    """A float Keras 3 model has nothing to log: fit trains with one warning where a front end reads
    Keras 3 models, and otherwise the callback says so before the first step (weights unchanged)."""
    from n2uq_tf import model_reader
    model = dense_model(fixed["student_w"], fixed["student_b"])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    callback = n2uq_tf.training.QuantizerTensorBoard(tmp_path / "logs", update_freq=1)
    y = np.zeros((len(fixed["x"]), 4), np.float32)
    try:
        model_reader.reader_for(model)
    except TypeError:
        with pytest.raises(TypeError, match="QuantizerTensorBoard cannot read the model"):
            model.fit(fixed["x"], y, epochs=1, verbose=0, callbacks=[callback])
        np.testing.assert_array_equal(model.layers[0].get_weights()[0], fixed["student_w"])
    else:
        with pytest.warns(UserWarning, match="no quantized activations"):
            model.fit(fixed["x"], y, epochs=1, verbose=0, callbacks=[callback])
        assert not np.array_equal(model.layers[0].get_weights()[0], fixed["student_w"])


def test_tf_keras_optimizer_names_itself_for_a_keras3_schedule():
    assert type(n2uq_tf.paper_optimizer(model=tf_keras.Sequential([tf_keras.Input((2,))]))) is n2uq_tf.N2UQAdam
    with pytest.raises(TypeError, match=r"n2uq_tf\.training\.N2UQAdam works with tf_keras .*keras3\.N2UQAdam"):
        n2uq_tf.N2UQAdam(training3.LinearEpochDecay(0.1, 2, 2))


def test_compress_gradients_names_itself_for_keras3_optimizers():
    with pytest.raises(TypeError, match=r"n2uq_tf\.distribute\.compress_gradients works with tf_keras .* Keras 3 "
                                        r"Adam.*train with its optimizer uncompressed"):
        n2uq_tf.distribute.compress_gradients(keras.optimizers.Adam(), "nuqsgd", bits=4)
    with pytest.raises(TypeError, match="compress_gradients works with tf_keras"):
        n2uq_tf.distribute.compress_gradients(training3.N2UQAdam())


def test_exchange_monitor_and_exchange_size_read_keras3_models(fixed):
    from n2uq_tf.distribute import ExchangeMonitor, GradientCompression, exchange_size
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7), keras.layers.Dense(4)])
    compression = GradientCompression("nuqsgd", 4, bucket_size=16)
    as_tf = [tf.Variable(tf.zeros(v.shape)) for v in model.trainable_variables]  # the reference: tf.Variables
    assert exchange_size(model.trainable_variables, compression) == exchange_size(as_tf, compression)
    assert exchange_size(model.trainable_variables, compression).values == 5 * 7 + 7 + 7 * 4 + 4
    model.compile("sgd", loss="mse")
    monitor = ExchangeMonitor(skip_steps=0)
    model.fit(fixed["x"], np.zeros((len(fixed["x"]), 4), np.float32), batch_size=3, epochs=1, verbose=0,
              callbacks=[monitor])
    assert monitor.summary["steps"] == 2 and monitor.summary["parameters"] == 74
    assert monitor.summary["bytes_per_step"] == 4 * 74 and monitor.summary["compression"] == "none"


MIRRORED_SCRIPT = """
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import n2uq_tf

def models():
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(1e-3))])
    model = n2uq_tf.DistillationModel(student, teacher, temperature=2.0, alpha=0.3)
    model.compile(n2uq_tf.paper_optimizer(1e-2, epochs=4, steps_per_epoch=4, model=model),
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
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_as_one_replica():
    """Two replicas on two logical CPUs train the Keras 3 distiller as one replica does (the loss
    terms, regularization included, are divided by the number of replicas, as Keras' own)."""
    import json
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    single, mirrored = out["single"], out["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    assert {"loss", "distillation_loss", "label_loss", "accuracy"} <= set(single["history"])
    assert single["history"]["loss"][-1] < single["history"]["loss"][0]
    for key in single["history"]:
        np.testing.assert_allclose(mirrored["history"][key], single["history"][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)
    for key in single["eval"]:
        assert mirrored["eval"][key] == pytest.approx(single["eval"][key], rel=1e-4, abs=1e-6)
