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
