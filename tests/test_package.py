"""The package as a user meets it: imports in any order, and the README's demo."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUANTIZE_SMALL_MODEL = """
import tf_keras
model = tf_keras.Sequential([tf_keras.Input((6, 6, 2)), tf_keras.layers.Conv2D(4, 3), tf_keras.layers.ReLU(),
                             tf_keras.layers.Conv2D(4, 3), tf_keras.layers.Flatten(), tf_keras.layers.Dense(2)])
q = n2uq_tf.quantize_model(model, bits=2)
print(type(q).__module__.split(".")[0], len(n2uq_tf.quantization_report(q).quantized))
"""


def run_python(code):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_USE_LEGACY_KERAS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("prelude", [
    "import n2uq_tf",
    "import keras\nimport tensorflow as tf\nassert tf.keras.__version__.startswith('3')\nimport n2uq_tf",
    "import tensorflow_model_optimization\nimport tensorflow as tf\nimport n2uq_tf",
])
@pytest.mark.slow
def test_import_order_does_not_matter(prelude):
    result = run_python(prelude + "\n" + QUANTIZE_SMALL_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["tf_keras", "1"]


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--epochs", "1"],
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| float32" in result.stdout and "| N2UQ W2A2" in result.stdout
    assert "compression" in result.stdout


def test_submodules_reachable_from_the_package_alone():
    # `import n2uq_tf` then n2uq_tf.distribute.compress_gradients(...) etc., in a fresh interpreter.
    code = ("import n2uq_tf, sys; assert 'n2uq_tf.distribute' not in sys.modules; "
            "print(n2uq_tf.distribute.compress_gradients.__name__, n2uq_tf.models.resnet20.__name__, "
            "n2uq_tf.distribute.launch.free_ports.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=3600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["compress_gradients", "resnet20", "free_ports"]


def readme_block(after):
    """The first ```python block of README.md after the line containing `after`, dedented."""
    import textwrap
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return textwrap.dedent(text[start:text.index("```", start)])


def test_readme_tfmot_by_hand_snippet_gives_the_same_model_as_quantize_model():
    code = readme_block("**tfmot by hand.**") + """
float_model = keras.Sequential([keras.Input((32, 32, 3))] + [
    l.layer if hasattr(l, "quantize_config") else l for l in annotated_model.layers])
auto = n2uq_tf.quantize_model(float_model, bits=2)
def summary(m):  # per layer: class, wrapped class, weight shapes
    return [(type(l).__name__, type(getattr(l, "layer", l)).__name__,
             sorted(tuple(v.shape) for v in l.weights)) for l in m.layers]
print("REPORT", len(n2uq_tf.quantization_report(qmodel).quantized))
print("SAME", summary(qmodel) == summary(auto))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPORT 2" in result.stdout and "SAME True" in result.stdout, result.stdout[-3000:]


def public_api():
    """The entry points users call, as the README and the docstrings name them."""
    import n2uq_tf.data
    import n2uq_tf.distribute
    import n2uq_tf.models
    import n2uq_tf.plots
    import n2uq_tf.recipe
    import n2uq_tf.tflite
    from n2uq_tf import data, distribute, models, plots, recipe, tflite, training
    return [
        n2uq_tf.quantize_model, n2uq_tf.load_model, n2uq_tf.save_model, n2uq_tf.quantize_scope, n2uq_tf.custom_objects,
        n2uq_tf.quantization_report, n2uq_tf.export_tflite, n2uq_tf.inspect_tflite, n2uq_tf.DistillationModel,
        n2uq_tf.distillation_loss, n2uq_tf.paper_optimizer, n2uq_tf.N2UQAdam, n2uq_tf.LinearEpochDecay,
        training.QuantizerTensorBoard, models.resnet18, models.resnet34, models.resnet50, models.resnet20,
        models.mobilenet_v2, models.quantize, models.load_float_weights, models.float_twin, models.get_model,
        data.load_dataset, data.dataset_info, data.digits_arrays, plots.plot_thresholds, plots.plot_weight_levels,
        plots.save_plots, plots.quantizer_state, plots.activation_inputs, plots.quantized_layers, tflite.Interpreter,
        tflite.delegate_path, tflite.load_delegate, tflite.benchmark_model, tflite.format_benchmark,
        tflite.model_n2uq_ops, distribute.compress_gradients, distribute.exchange_size, distribute.launch_workers,
        distribute.free_ports, distribute.tf_config, distribute.worker_index, distribute.num_workers,
        distribute.is_chief, recipe.train_n2uq, recipe.train_teacher, recipe.accuracy,
    ]


def test_public_api_is_typed():
    import inspect
    import typing
    for entry in public_api():
        function = entry.__init__ if inspect.isclass(entry) else entry
        name = getattr(entry, "__qualname__", repr(entry))
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function)  # resolves: no name a type checker could not find
        for parameter in list(signature.parameters.values())[1 if inspect.isclass(entry) else 0:]:
            assert parameter.name in hints, f"{name}: parameter {parameter.name!r} has no type"
        if not inspect.isclass(entry):
            assert "return" in hints, f"{name}: no return type"
    import n2uq_tf
    assert os.path.isfile(os.path.join(os.path.dirname(n2uq_tf.__file__), "py.typed"))


def test_py_typed_is_package_data():
    from setuptools.config.setupcfg import read_configuration
    options = read_configuration(os.path.join(ROOT, "setup.cfg"), ignore_option_errors=True)["options"]
    assert "py.typed" in options["package_data"]["n2uq_tf"]


def test_code_passes_ruff():
    """The package, examples, tests, benchmarks and setup.py pass the ruff rules in pyproject.toml
    (ruff comes with the test extra)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
