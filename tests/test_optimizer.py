"""The paper's optimizer recipe: N2UQAdam (quantizer parameters at lr/10), LinearEpochDecay, paper_optimizer."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf.training import (LinearEpochDecay, N2UQAdam, custom_objects, is_quantizer_variable,
                              linear_epoch_decay, paper_optimizer)


def tiny_quantized(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu")(inp)
    x = keras.layers.Dense(8, activation="relu")(x)
    out = keras.layers.Dense(3)(x)
    return n2uq_tf.quantize_model(keras.Model(inp, out), bits=2)


def numpy_adam(value, grads, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
    """Textbook Adam (tf_keras' form: bias correction folded into the step size)."""
    value = value.astype(np.float64)
    m = np.zeros_like(value)
    v = np.zeros_like(value)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        value = value - lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t) * m / (np.sqrt(v) + epsilon)
    return value


def test_is_quantizer_variable():
    model = tiny_quantized()
    flags = {v.name: is_quantizer_variable(v) for v in model.trainable_variables}
    quantizer = [name for name, flag in flags.items() if flag]
    assert sorted(name.split("/")[-1] for name in quantizer) == sorted(
        f"input_{s}:0" for s in n2uq_tf.quantize.QUANTIZER_PARAMETER_SUFFIXES)
    assert not any(flags[n] for n in flags if "kernel" in n or "bias" in n)

    class Named:  # a MirroredStrategy per-replica copy's name
        name = "quant_dense/input_n2uq_intervals/replica_1:0"
    assert is_quantizer_variable(Named())
    Named.name = "dense/kernel_n2uq_start_not:0"
    assert not is_quantizer_variable(Named())


@pytest.mark.parametrize("graph", [False, True])
def test_quantizer_parameters_step_at_a_tenth_of_the_rate(graph):
    model = tiny_quantized()
    variables = model.trainable_variables
    rng = np.random.default_rng(1)
    grads = [[rng.normal(size=v.shape).astype(np.float32) for v in variables] for _ in range(3)]
    before = [v.numpy() for v in variables]
    lr = 0.01
    optimizer = N2UQAdam(lr)

    def step(gs):
        optimizer.apply_gradients(zip(gs, variables))
    if graph:
        step = tf.function(step)
    for gs in grads:
        step([tf.constant(g) for g in gs])

    n_quantizer = 0
    for i, v in enumerate(variables):
        rate = lr * 0.1 if is_quantizer_variable(v) else lr
        n_quantizer += is_quantizer_variable(v)
        expected = numpy_adam(before[i], [gs[i] for gs in grads], rate)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=v.name)
        # Not a scaled gradient in disguise: Adam would undo that, so the step itself is 10x smaller.
        moved = np.abs(v.numpy() - before[i]).max()
        assert moved > 0.5 * rate and moved < 3.5 * rate, (v.name, moved)
    assert n_quantizer == 4


def test_multiplier_applies_to_a_schedule_and_in_fit():
    """In plain compile/fit, with the decay schedule: after one step each variable moved by its rate."""
    model = tiny_quantized()
    lr = 0.02
    model.compile(paper_optimizer(lr, epochs=4, steps_per_epoch=1), keras.losses.MeanSquaredError())
    before = {v.name: v.numpy() for v in model.trainable_variables}
    x = np.random.default_rng(0).random((16, 6), dtype=np.float32)
    model.fit(x, np.ones((16, 3), np.float32), batch_size=16, epochs=1, verbose=0)
    epoch0 = lr * (1 - 1 / 4)
    for v in model.trainable_variables:
        delta = np.abs(v.numpy() - before[v.name])
        rate = epoch0 * (0.1 if is_quantizer_variable(v) else 1.0)
        # First Adam step: |delta| = rate * |g| / (|g| + eps), i.e. the rate wherever g is not ~0.
        moved = delta[delta > 0.01 * rate]
        assert moved.size > 0, v.name
        np.testing.assert_allclose(moved, rate, rtol=1e-3, err_msg=v.name)


def test_linear_epoch_decay_values():
    lr0, epochs, spe = 1.25e-3, 5, 3
    schedule = LinearEpochDecay(lr0, epochs, spe)
    for step in range(epochs * spe + 4):
        e = step // spe
        expected = lr0 * max(0.0, 1 - (e + 1) / epochs)
        assert linear_epoch_decay(lr0, e, epochs) == pytest.approx(expected, abs=1e-15)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-12)
    # Epoch boundaries: the first and last step of each epoch, and the last epoch at exactly 0.
    assert float(schedule(0)) == pytest.approx(lr0 * 0.8)
    assert float(schedule(spe - 1)) == pytest.approx(lr0 * 0.8)
    assert float(schedule(spe)) == pytest.approx(lr0 * 0.6)
    assert float(schedule((epochs - 1) * spe)) == 0.0
    assert float(tf.function(schedule)(tf.constant(7, tf.int64))) == pytest.approx(lr0 * 0.4)


def test_schedule_per_epoch_in_fit():
    """The rate the optimizer used in each fit epoch is lr0 * (1 - (e + 1) / E)."""
    model = tiny_quantized()
    epochs, spe, lr0 = 4, 3, 1e-2
    optimizer = paper_optimizer(lr0, epochs=epochs, steps_per_epoch=spe)
    model.compile(optimizer, keras.losses.MeanSquaredError())
    seen = []

    class Record(keras.callbacks.Callback):
        # The optimizer shows the rate it computed for its latest update, so read it after the step.
        def on_train_batch_end(self, batch, logs=None):
            seen.append(float(optimizer.learning_rate))

    x = np.random.default_rng(0).random((12, 6), dtype=np.float32)
    model.fit(x, np.zeros((12, 3), np.float32), batch_size=4, epochs=epochs, verbose=0, callbacks=[Record()])
    expected = [linear_epoch_decay(lr0, e, epochs) for e in range(epochs) for _ in range(spe)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=1e-12)


def test_paper_optimizer_defaults():
    opt = paper_optimizer(steps_per_epoch=10)
    assert isinstance(opt, N2UQAdam)
    assert opt.epsilon == 1e-8 and opt.weight_decay is None and opt.quantizer_lr_multiplier == 0.1
    assert opt.beta_1 == 0.9 and opt.beta_2 == 0.999
    schedule = opt._learning_rate
    assert isinstance(schedule, LinearEpochDecay)
    assert (schedule.initial_learning_rate, schedule.epochs, schedule.steps_per_epoch) == (1.25e-3, 128, 10)
    # Linear scaling from the paper's batch of 256; no steps_per_epoch: a constant rate.
    opt = paper_optimizer(batch_size=64, quantizer_lr_multiplier=0.5)
    assert float(opt.learning_rate) == pytest.approx(1.25e-3 / 4)
    assert opt.quantizer_lr_multiplier == 0.5
    with pytest.raises(ValueError, match="batch_size"):
        paper_optimizer(batch_size=0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        paper_optimizer(steps_per_epoch=0)
    with pytest.raises(ValueError, match="quantizer_lr_multiplier"):
        N2UQAdam(quantizer_lr_multiplier=-1)


def test_config_round_trip():
    opt = paper_optimizer(2e-3, epochs=7, steps_per_epoch=5, quantizer_lr_multiplier=0.25)
    config = keras.optimizers.serialize(opt)
    again = keras.optimizers.deserialize(config)
    assert type(again) is N2UQAdam
    assert again.get_config() == opt.get_config()
    assert again.quantizer_lr_multiplier == 0.25
    assert again._learning_rate.get_config() == opt._learning_rate.get_config()
    schedule = LinearEpochDecay(1.0, 3, 2, name="decay")
    assert LinearEpochDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()
    assert set(custom_objects()) == {"N2UQAdam", "LinearEpochDecay"}


@pytest.mark.parametrize("filename", ["model.keras", "model.h5"])
def test_compiled_model_saves_and_loads_with_its_optimizer(tmp_path, filename):
    model = tiny_quantized()
    model.compile(paper_optimizer(1e-2, epochs=3, steps_per_epoch=2), keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 6), dtype=np.float32), rng.random((8, 3), dtype=np.float32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / filename)
    model.save(path)
    # .keras finds the registered classes by name; legacy .h5 names the schedule by its bare
    # class name, so it needs the training custom objects (n2uq_tf.custom_objects() includes them).
    loaded = n2uq_tf.load_model(path, custom_objects=custom_objects())
    assert type(loaded.optimizer) is N2UQAdam
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Training resumes identically, quantizer parameters still at a tenth of the rate.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
