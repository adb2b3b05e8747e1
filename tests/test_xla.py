"""XLA-compiled training of tf_keras quantized models, and the choice of the quantizer's implementation.

The quantizer math under XLA is checked against the NumPy references in test_ops_reference.py
(N2UQ) and test_methods.py (the literature methods). Here:

1. ``implementation="auto"``: the fused C++ kernel only on a CPU outside XLA, the pure-TF
   path under XLA and for GPU/TPU graphs (whose traced graphs hold no CPU-only op), the
   choice visible in ``ops.active_implementation`` and ``quantization_report``;
2. models compiled with ``jit_compile=True`` (ResNet-20, a small CNN with every method,
   DistillationModel) train, and their first step's gradients match the uncompiled step's.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tensorflow.python.framework import kernels as registered_kernels

import n2uq_tf
from n2uq_tf import _fused
from n2uq_tf.quantization_math import n2uq as ops
from n2uq_tf.quantize import N2UQWrapper

FUSED_OPS = ("N2uqQuantizeForward", "N2uqQuantizeBackward")


def fused_kernels_or_skip():
    kernels = _fused.load()
    if kernels is None:
        if os.environ.get("CI"):
            raise RuntimeError("the fused kernel failed to build in CI, where a C++ compiler is present")
        pytest.skip("the fused kernel could not be built here (see the RuntimeWarning)")
    return kernels


def quantizer_step(x):
    """Forward and backward of the N2UQ activation quantizer (every gradient)."""
    params = [tf.constant(0.1), tf.constant([0.5, 0.7, 0.6]), tf.constant(1.2), tf.constant(0.9)]
    with tf.GradientTape() as tape:
        tape.watch([x] + params)
        y = ops.n2uq_quantize(x, *params, 2)
    return [y] + tape.gradient(y, [x] + params)


def op_types(function, *specs):
    return {op.type for op in function.get_concrete_function(*specs).graph.get_operations()}


# --------------------------------------------------------------------------- 1. implementation choice

@pytest.fixture
def kernel_loaded(monkeypatch):
    """The decision logic as if the fused kernel were loaded (the kernel itself is not called)."""
    monkeypatch.setattr(ops, "_fused_kernels", lambda: object())


def traced_choice(jit_compile=False, device=None, **kwargs):
    """What active_implementation says while a tf.function is traced (under `device`)."""
    seen = []

    def body():
        if device is None:
            seen.append(ops.active_implementation(**kwargs))
        else:
            with tf.device(device):
                seen.append(ops.active_implementation(**kwargs))
        return tf.zeros([])

    tf.function(body, jit_compile=jit_compile).get_concrete_function()
    return seen[0]


def test_auto_picks_fused_only_on_a_cpu_outside_xla(kernel_loaded):
    assert ops.active_implementation() == "fused"                       # eager, on this CPU
    assert traced_choice() == "fused"
    assert traced_choice(device="/CPU:0") == "fused"
    assert traced_choice(jit_compile=True) == "reference"
    assert traced_choice(jit_compile=True, device="/CPU:0") == "reference"
    assert traced_choice(device="/GPU:0") == "reference"
    assert traced_choice(device="/job:localhost/replica:0/task:0/device:TPU:1") == "reference"
    assert traced_choice(implementation="reference") == "reference"
    # A function without jit_compile traced inside an XLA-compiled one is compiled with it.
    seen = []

    @tf.function
    def inner():
        seen.append(ops.active_implementation())
        return tf.zeros([])

    tf.function(lambda: inner(), jit_compile=True).get_concrete_function()
    assert seen == ["reference"]
    # Asked about another context.
    assert ops.active_implementation(jit_compile=True) == "reference"
    assert ops.active_implementation(device="/GPU:0") == "reference"
    assert ops.active_implementation(device="/device:CPU:0") == "fused"


def test_unplaced_ops_count_as_accelerator_ops_when_one_is_visible(kernel_loaded, monkeypatch):
    """Without a device scope TF places the graph on the GPU when there is one: no fused op then."""
    monkeypatch.setattr(ops, "_accelerators_visible", lambda: True)
    assert traced_choice() == "reference"
    assert traced_choice(device="/CPU:0") == "fused"
    monkeypatch.setattr(ops, "_accelerators_visible", lambda: False)
    assert traced_choice() == "fused"


def test_explicit_and_unavailable_implementations(monkeypatch):
    with pytest.raises(ValueError, match="jit_compile"):
        traced_choice(jit_compile=True, implementation="fused")
    with pytest.raises(ValueError, match="implementation must be one of"):
        ops.active_implementation("xla")
    with pytest.raises(ValueError, match="implementation must be one of"):
        ops.n2uq_quantize(tf.zeros(3), 0.0, tf.fill([3], 0.5), 1.0, 1.0, 2, implementation="gpu")
    monkeypatch.setattr(ops, "_fused_kernels", lambda: None)
    assert ops.active_implementation() == "reference"
    with pytest.raises(RuntimeError, match="not available"):
        ops.active_implementation("fused")


def test_xla_context_is_detected():
    """The private TF test for "compiled by XLA" that the choice relies on still works."""
    seen = []

    def body():
        seen.append(ops.in_xla_context())
        return tf.zeros([])

    tf.function(body, jit_compile=True).get_concrete_function()
    tf.function(body).get_concrete_function()
    assert seen == [True, False]
    assert not ops.in_xla_context()


def test_fused_op_is_cpu_only_and_never_in_a_gpu_or_xla_graph():
    """The fused ops have CPU kernels only; a graph traced for the GPU (soft placement off, as a
    GPU step would run) or compiled by XLA holds none of them, while the CPU graph does."""
    fused_kernels_or_skip()
    for name in FUSED_OPS:
        devices = {k.device_type for k in registered_kernels.get_registered_kernels_for_op(name).kernel}
        assert devices == {"CPU"}, (name, devices)
    spec = tf.TensorSpec([4, 9], tf.float32)

    def on(device):
        def step(x):
            with tf.device(device):
                return quantizer_step(x)
        return tf.function(step)

    soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(False)
    try:
        for device in ("/GPU:0", "/device:GPU:1", "/TPU:0"):
            gpu_ops = op_types(on(device), spec)
            assert not gpu_ops & set(FUSED_OPS), (device, gpu_ops & set(FUSED_OPS))
        graph = on("/GPU:0").get_concrete_function(spec).graph  # every op of the step is meant for the GPU
        assert all("GPU" in op.device for op in graph.get_operations() if op.type not in ("Placeholder", "Identity"))
    finally:
        tf.config.set_soft_device_placement(soft)
    assert set(FUSED_OPS) <= op_types(on("/CPU:0"), spec)
    assert set(FUSED_OPS) <= op_types(tf.function(quantizer_step), spec)
    assert not op_types(tf.function(quantizer_step, jit_compile=True), spec) & set(FUSED_OPS)
    # and the XLA function runs, where the fused op would fail ("no XLA_CPU_JIT kernel")
    x = tf.random.stateless_uniform([4, 9], [1, 2], -0.5, 2.5)
    for got, want in zip(tf.function(quantizer_step, jit_compile=True)(x), quantizer_step(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_disable_fused_environment_variable():
    script = textwrap.dedent("""
        import tensorflow as tf
        from n2uq_tf import ops
        assert ops.active_implementation() == "reference"
        f = tf.function(lambda x: ops.n2uq_quantize(x, 0.0, tf.fill([3], 2 / 3), 1.0, 1.0, 2))
        types = {op.type for op in f.get_concrete_function(tf.TensorSpec([5])).graph.get_operations()}
        assert not any(t.startswith("N2uq") for t in types), types
        print("ok")
    """)
    env = dict(os.environ, N2UQ_TF_DISABLE_FUSED="1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_report_says_which_implementation_trains(small_cnn):
    fused_kernels_or_skip()
    q = n2uq_tf.quantize_model(small_cnn, 2)
    assert n2uq_tf.quantization_report(q).implementation == "fused"
    q.compile("adam", "mse", jit_compile=True)
    report = n2uq_tf.quantization_report(q)
    assert report.implementation == "reference" and report.to_dict()["implementation"] == "reference"
    assert "train with: reference (pure TF, XLA-compilable)" in str(report)


# --------------------------------------------------------------------------- 2. training under XLA

def first_step_gradients(model, x, y, jit_compile):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    return np.concatenate([g.numpy().ravel() for g in tf.function(step, jit_compile=jit_compile)(x, y)])


def relative_gap(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.slow
def test_resnet20_trains_under_xla():
    """ResNet-20 W2A2 with jit_compile=True: the loss falls, and XLA moves the first step's
    gradients less than it moves the float twin's.

    The whole-model gradients cannot be compared element by element: XLA's BatchNormalization
    and convolutions round differently from TensorFlow's kernels (the float twin's gradients
    differ by ~0.5% between the two), and a quantizer turns a last-bit difference at a
    threshold into a level difference. The quantizer itself is bit-exact under XLA where
    the math allows (test_ops_reference.py).
    """
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    keras.utils.set_random_seed(0)
    float_gap = relative_gap(*(first_step_gradients(n2uq_tf.models.resnet20(), x, y, jit) for jit in (False, True)))
    keras.utils.set_random_seed(0)
    model = n2uq_tf.models.resnet20(bits=2)
    plain, compiled = (first_step_gradients(model, x, y, jit) for jit in (False, True))
    assert np.all(np.isfinite(compiled))
    assert relative_gap(plain, compiled) <= float_gap, (relative_gap(plain, compiled), float_gap)

    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    assert n2uq_tf.quantization_report(model).implementation == "reference"
    losses = model.fit(x, y, epochs=5, batch_size=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


ALL_METHODS = [("n2uq", "n2uq"), ("n2uq", "uniform"), ("dorefa", "dorefa"), ("dorefa", "pact"), ("lsq", "lsq"),
               ("daq", "daq"), ("none", "uniform"), ("learnable", "n2uq")]


def bn_cnn():
    """Every quantized layer is followed by BatchNormalization (the paper's layout)."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((10, 10, 2)),
        keras.layers.Conv2D(6, 3, name="c1"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, strides=2, name="c2"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, padding="same", name="dw"), keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="out")])


@pytest.mark.parametrize("weight_method, activation_method", ALL_METHODS)
@pytest.mark.slow
def test_every_method_trains_under_xla(weight_method, activation_method):
    """Each quantized layer, fed the same input, gives the same output and gradients under XLA
    (to the rounding of XLA's convolution sums: 1e-5 of the largest value), and the compiled
    model trains."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 10, 10, 2)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    q = n2uq_tf.quantize_model(bn_cnn(), 2, weight_method=weight_method, activation_method=activation_method,
                               skip_layers=None)
    q(x[:8], training=True)  # data-dependent initialisation (LSQ, DAQ, learnable scales)
    assert sum(isinstance(layer, N2UQWrapper) for layer in q.layers) == 4
    h = tf.constant(x)
    for layer in q.layers:
        if isinstance(layer, N2UQWrapper):
            def step(h, layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(h)
                    out = layer(h, training=True)
                    loss = tf.reduce_sum(out * tf.sin(out))
                return [out] + tape.gradient(loss, [h] + layer.trainable_variables)

            plain = tf.function(step)(h)
            compiled = tf.function(step, jit_compile=True)(h)
            names = ["output", "input gradient"] + [v.name for v in layer.trainable_variables]
            for name, want, got in zip(names, plain, compiled):
                want, got = want.numpy(), got.numpy()
                assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)) + 1e-30, (layer.name, name)
        h = layer(h, training=True)

    q.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              jit_compile=True)
    losses = q.fit(x, y, epochs=6, batch_size=8, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(losses)) and min(losses[1:]) < losses[0], losses


@pytest.mark.slow
def test_distillation_model_trains_under_xla(small_cnn, batch):
    x, _ = batch
    keras.utils.set_random_seed(5)
    teacher = keras.models.clone_model(small_cnn)
    student = n2uq_tf.quantize_model(small_cnn, 2)
    model = n2uq_tf.DistillationModel(student, teacher)
    model.compile(keras.optimizers.Adam(3e-3), jit_compile=True)
    assert n2uq_tf.quantization_report(model).implementation == "reference"
    losses = model.fit(x, epochs=6, batch_size=4, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
