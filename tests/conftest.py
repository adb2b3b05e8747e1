import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tf_keras as keras  # noqa: E402


@pytest.fixture(autouse=True)
def release_models_after_each_test():
    """Drops Keras' global state and collects garbage after every test.

    Models, traced graphs and interpreters otherwise pile up over ~900 tests (the suite held
    8 GB at its end before this); the CI machines have 2 cores and limited memory.
    """
    yield
    keras.backend.clear_session()
    gc.collect()


@pytest.fixture
def small_cnn():
    """A functional CNN with a residual add, a depthwise conv and two dense layers."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    out = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(inp, out, name="small_cnn")


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.random((8, 12, 12, 3), dtype=np.float32), rng.integers(0, 4, 8)


def pytest_runtest_logreport(report):
    """With N2UQ_TEST_TIMES=FILE, appends "seconds phase test" per test phase as the run goes (a long
    run on a loaded machine shows where its time goes before it ends; --durations prints at the end)."""
    path = os.environ.get("N2UQ_TEST_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(f"{report.duration:.2f} {report.when} {report.nodeid}\n")
