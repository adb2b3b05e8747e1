"""Save and load in every Keras format, with all quantizer state, and clear errors."""

import zipfile

import numpy as np
import pytest
import tf_keras as keras

import n2uq_tf
from n2uq_tf.quantize import N2UQWrapper


@pytest.fixture
def trained(small_cnn, batch):
    q = n2uq_tf.quantize_model(small_cnn, bits=3)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(*batch, epochs=2, batch_size=4, verbose=0)
    return q


def quantizer_state(model):
    return {v.name.split("/")[-1] + str(i): v.numpy() for i, layer in enumerate(model.layers)
            if isinstance(layer, N2UQWrapper) for v in layer.input_quantizer[1].values()}


@pytest.mark.parametrize("filename", ["model.keras", "model.h5", "saved_model"])
def test_round_trip_is_bit_identical(trained, batch, tmp_path, filename):
    path = str(tmp_path / filename)
    trained.save(path)
    loaded = n2uq_tf.load_model(path)
    x, y = batch
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), trained.predict(x, verbose=0))
    before, after = quantizer_state(trained), quantizer_state(loaded)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    # The thresholds were trained away from their initial values, so this is not a trivial match.
    assert any(not np.allclose(v, 2 / 7) for k, v in before.items() if "intervals" in k)
    # Training resumes from the restored optimizer state.
    loaded.fit(x, y, epochs=1, batch_size=4, verbose=0)


def test_keras_file_restores_optimizer_state(trained, tmp_path):
    path = str(tmp_path / "m.keras")
    trained.save(path)
    loaded = n2uq_tf.load_model(path)
    assert len(trained.optimizer.variables) == len(loaded.optimizer.variables) > 1
    for a, b in zip(trained.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_quantize_scope_with_plain_tf_keras(trained, batch, tmp_path):
    path = str(tmp_path / "m.h5")
    trained.save(path)
    with n2uq_tf.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(batch[0], verbose=0), trained.predict(batch[0], verbose=0))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        n2uq_tf.load_model(str(tmp_path / "nothing_here.keras"))


@pytest.mark.parametrize("filename, content", [("bad.keras", b"not a zip file"), ("bad.h5", b"\x00" * 64)])
def test_corrupt_file(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(ValueError, match="could not load a quantized model from .*" + filename):
        n2uq_tf.load_model(str(path))


def test_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(ValueError, match="saved_model.pb"):
        n2uq_tf.load_model(str(tmp_path))


def test_float_model_is_not_a_quantized_model(small_cnn, tmp_path):
    path = str(tmp_path / "float.keras")
    small_cnn.save(path)
    with pytest.raises(ValueError, match="without N2UQ-quantized layers"):
        n2uq_tf.load_model(path)


def test_file_from_a_newer_format_version(trained, tmp_path):
    path = tmp_path / "m.keras"
    trained.save(str(path))
    newer = tmp_path / "newer.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = data.replace(b'"format_version": 1', b'"format_version": 99')
                assert b'"format_version": 99' in data
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="newer n2uq_tf.*format version 99"):
        n2uq_tf.load_model(str(newer))


def test_mixed_precision_training(small_cnn, batch):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inp = keras.Input((12, 12, 3))
        x = keras.layers.Conv2D(8, 3, padding="same")(inp)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(8, 3, padding="same")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        out = keras.layers.Dense(4, dtype="float32")(x)
        q = n2uq_tf.quantize_model(keras.Model(inp, out), bits=2)
        wrapper = [layer for layer in q.layers if isinstance(layer, N2UQWrapper)][0]
        assert all(v.dtype == "float32" for v in wrapper.input_quantizer[1].values())
        q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = q.fit(*batch, epochs=2, batch_size=4, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
