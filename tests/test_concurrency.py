"""The threading contract of exported models: one interpreter per thread, one delegate shared by many.

TFLite interpreters are not thread-safe (one invoke at a time per interpreter), so each thread
owns its interpreter; the N2UQ delegate object, and the plugin library behind it, may be shared
by interpreters running in parallel threads. Outputs must be bit-identical to serial runs.
"""

import threading

import numpy as np
import pytest

import n2uq_tf
import n2uq_tf.tflite as n2tfl

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import tf_keras as keras
    keras.utils.set_random_seed(3)
    inp = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(keras.layers.ReLU()(y))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([x, y]))
    x = keras.layers.Dense(12, activation="relu")(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    qmodel = n2uq_tf.quantize_model(model, bits=2)
    path = str(tmp_path_factory.mktemp("concurrency") / "m.tflite")
    n2uq_tf.export_tflite(qmodel, path)
    ops = set(n2tfl.model_n2uq_ops(path))  # (fused ones run the layer op's kernels too)
    assert {"N2UQConv2DFused", "N2UQDepthwiseConv2DFused", "N2UQFullyConnectedFused", "N2UQFullyConnected"} <= ops
    return path


def invoke(interpreter, x):
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


@pytest.mark.parametrize("backend", ["tflite", "litert"])
@pytest.mark.parametrize("kernel_threads", [1, 2])
def test_interpreters_in_parallel_threads_sharing_one_delegate_are_bit_exact(exported, backend, kernel_threads):
    _, module = n2tfl.delegate.backend_module(backend)
    delegate = n2tfl.load_delegate(backend)
    inputs = [np.random.default_rng(i).normal(size=(1, 10, 10, 3)).astype(np.float32) for i in range(12)]

    def make():
        interpreter = module.Interpreter(model_path=exported, num_threads=kernel_threads,
                                         experimental_delegates=[delegate])
        interpreter.allocate_tensors()
        return interpreter

    serial = make()
    expected = [invoke(serial, x) for x in inputs]
    results, errors = {}, []

    def worker(index):
        try:
            interpreter = make()  # each thread owns its interpreter
            for round_ in range(5):
                for i, x in enumerate(inputs):
                    results[(index, round_, i)] = invoke(interpreter, x)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 3 * 5 * len(inputs)
    for (_, _, i), out in results.items():
        np.testing.assert_array_equal(out, expected[i])
