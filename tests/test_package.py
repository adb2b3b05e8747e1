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

# Both Kerases in one process after the imports of a test: what `tf.keras` is, the environment
# variable, a tf_keras model quantized, and a Keras 3 student distilled for one step.
BOTH_KERASES = QUANTIZE_SMALL_MODEL + """
import os
import keras, numpy as np, tensorflow as tf
print("tf.keras:", type(tf.keras.layers.Dense(1)).__module__.split(".")[0], os.environ.get("TF_USE_LEGACY_KERAS"))
student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
# Logits (-1, 3) whatever the random state: a random teacher's two outputs on this input can, rarely,
# be non-negative and sum to 1, which DistillationModel rightly refuses as probabilities.
logits = keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant([-1.0, 3.0]))
teacher = keras.Sequential([keras.Input((3,)), logits])
distiller = n2uq_tf.DistillationModel(student, teacher)
distiller.compile(n2uq_tf.paper_optimizer(model=distiller))
loss = distiller.fit(np.ones((4, 3), np.float32), verbose=0).history["loss"][0]
print("keras 3:", type(distiller).__module__, bool(np.isfinite(loss)))
"""


def run_python(code, **env_vars):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


# `import n2uq_tf` leaves `tf.keras` as the environment says: Keras 3, whatever the order of the
# imports, unless the user set TF_USE_LEGACY_KERAS (then tf_keras) or imported tfmot first (tfmot sets
# the variable and makes `tf.keras` tf_keras for the process; n2uq_tf cannot undo that).
@pytest.mark.parametrize("prelude, legacy_variable, tf_keras_is", [
    ("import n2uq_tf", None, "keras"),
    ("import keras\nimport tf_keras\nimport tensorflow as tf\nassert tf.keras.__version__.startswith('3')\n"
     "import n2uq_tf", None, "keras"),
    ("import tf_keras\nimport n2uq_tf\nimport keras\nimport tensorflow as tf", None, "keras"),
    ("import tensorflow as tf\nimport n2uq_tf\nimport tf_keras\nimport keras", None, "keras"),
    ("import n2uq_tf", "1", "tf_keras"),
    ("import tensorflow_model_optimization\nimport tensorflow as tf\nimport n2uq_tf", None, "tf_keras"),
])
@pytest.mark.slow
def test_import_order_does_not_matter(prelude, legacy_variable, tf_keras_is):
    environment = {} if legacy_variable is None else {"TF_USE_LEGACY_KERAS": legacy_variable}
    result = run_python(prelude + "\n" + BOTH_KERASES, **environment)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-3].split() == ["tf_keras", "1"]  # the tf_keras front end, in every case
    variable = "1" if "tensorflow_model_optimization" in prelude else legacy_variable
    assert lines[-2].split() == ["tf.keras:", tf_keras_is, str(variable)]
    assert lines[-1].split() == ["keras", "3:", "n2uq_tf.training.keras3", "True"]


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
    code = ("import n2uq_tf, sys; assert 'n2uq_tf.models' not in sys.modules; "
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


# ------------------------------------------------------------------ layering and the import graph

PACKAGE_DIR = os.path.join(ROOT, "n2uq_tf")

# Each part of the package (a top-level module or subpackage) and its layer: a module imports
# only from its own part and from parts of lower layers, also inside functions (docs/design.md,
# "How the package is layered"). `_keras.custom_objects` imports the registering modules by name.
LAYER_OF_PART = {
    "_io": 0, "_native": 0, "_optional": 0,
    "_fused": 1, "tflite": 1,
    "_keras": 2, "_keras_kind": 2, "quantization_math": 2,
    "layers": 3, "model_reader": 3,
    "quantize": 4,
    "data": 5, "distribute": 5, "keras3": 5, "models": 5, "training": 5,
    "export": 6,
    "plots": 7, "report": 7,
    "build": 8, "recipe": 8,
    "cli": 9,
    "__main__": 10,
    "": 11,  # the package root, which registers the Keras classes on import
}


def package_imports():
    """[(module, part of the package it imports)] for every n2uq_tf import in the package sources."""
    import ast
    found = []
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, PACKAGE_DIR)[:-3].replace(os.sep, ".")
            module = module[:-len(".__init__")] if module.endswith("__init__") else module
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module == "n2uq_tf":
                    targets = [f"n2uq_tf.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{module}: relative import"
                    targets = [node.module]
                else:
                    continue
                for target in targets:
                    if target.startswith("n2uq_tf."):
                        found.append((module, target.split(".")[1]))
    return found


def test_every_import_runs_down_the_layers():
    imports = package_imports()
    assert len(imports) > 100  # the sources were read
    upward = []
    for module, part in imports:
        own = module.split(".")[0]
        assert own in LAYER_OF_PART and part in LAYER_OF_PART, f"{module} -> {part}: give the part a layer"
        if own != part and LAYER_OF_PART[part] >= LAYER_OF_PART[own]:
            upward.append((module, part))
    assert upward == []


def test_quantization_math_is_pure_tensorflow():
    import ast
    folder = os.path.join(PACKAGE_DIR, "quantization_math")
    names = sorted(os.listdir(folder))
    assert {"__init__.py", "n2uq.py", "baselines.py", "_common.py"} <= set(names)
    for name in names:
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [m for m in imported if "keras" in m or m.startswith(("tensorflow_model_optimization",
                                                                            "n2uq_tf.quantize"))], name
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "keras"], name


def test_no_file_named_methods():
    for folder, _, files in os.walk(ROOT):
        if ".venv" not in folder and ".git" not in folder:
            assert "methods.py" not in files, folder


MODULES_LOADED = """
import json, sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("n2uq_tf", "tensorflow", "tf_keras", "matplotlib"))
steps = {}
import n2uq_tf
steps["import n2uq_tf"] = loaded()
n2uq_tf.quantize_model, n2uq_tf.DistillationModel, n2uq_tf.quantization_report, n2uq_tf.custom_objects()
steps["front end"] = loaded()
print(json.dumps(steps))
"""

# A device with only the TFLite runtime: TensorFlow, Keras and tfmot cannot be imported.
RUNTIME_ONLY = """
import importlib.abc, json, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
import n2uq_tf.tflite
from n2uq_tf.tflite import Interpreter, delegate_path, model_n2uq_ops
print(json.dumps(sorted(m for m in sys.modules if m.startswith("n2uq_tf"))))
"""


def test_what_each_import_loads():
    import json
    result = run_python(MODULES_LOADED)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads(result.stdout.splitlines()[-1])
    first = steps["import n2uq_tf"]  # the classes Keras looks up by name, nothing that draws or exports
    assert {"n2uq_tf.layers", "n2uq_tf.quantize.wrapper", "n2uq_tf.training.optimizer"} <= set(first)
    assert not [m for m in first if m.startswith(("n2uq_tf.plots", "n2uq_tf.export", "n2uq_tf.cli"))]
    front_end = steps["front end"]
    assert {"n2uq_tf.quantize.api", "n2uq_tf.training.callbacks", "n2uq_tf.report"} <= set(front_end)
    assert not [m for m in front_end if m.startswith(("n2uq_tf.plots", "n2uq_tf.export", "n2uq_tf.cli"))]


def test_runtime_imports_without_tensorflow():
    import json
    result = run_python(RUNTIME_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "n2uq_tf.tflite.delegate" in loaded
    assert not [m for m in loaded if m.split(".")[1:2] not in (["tflite"], ["_native"], [])]  # no exporter


def test_saved_model_loads_with_plain_keras_after_bare_import(tmp_path):
    import tf_keras as keras
    import n2uq_tf
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(3)])
    q = n2uq_tf.quantize_model(model, bits=2, skip_layers=())
    path = str(tmp_path / "m.keras")
    q.save(path)
    code = (f"import numpy as np, n2uq_tf, tf_keras\nm = tf_keras.models.load_model({path!r})\n"
            "print(m.predict(np.ones((1, 6), np.float32), verbose=0).tolist())")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    import ast
    import numpy as np
    got = np.array(ast.literal_eval(result.stdout.splitlines()[-1]))
    np.testing.assert_array_equal(got, q.predict(np.ones((1, 6), np.float32), verbose=0))


def test_modules_under_their_former_names_are_the_same_objects():
    import importlib
    import n2uq_tf
    from n2uq_tf import methods
    from n2uq_tf.quantization_math import baselines, n2uq
    from n2uq_tf.quantize import method_table
    assert importlib.import_module("n2uq_tf.ops") is n2uq_tf.ops is n2uq
    assert methods is importlib.import_module("n2uq_tf.methods") is baselines
    old_quantizers = importlib.import_module("n2uq_tf.quantize.methods")
    assert old_quantizers is method_table
    assert old_quantizers.PACTActivationQuantizer.__name__ == "PACTActivationQuantizer"  # what old .keras files name
    assert n2uq.n2uq_quantize.__module__ == "n2uq_tf.quantization_math.n2uq"
    for name in n2uq_tf.__all__ + ["model_reader", "quantize", "report", "training", "quantization_math"]:
        assert getattr(n2uq_tf, name) is not None  # every name the package root gave at once before


# ------------------------------------------------------------------ custom objects from the registry

def test_custom_objects_are_every_registered_class():
    import tf_keras as keras
    import n2uq_tf
    from n2uq_tf.distribute import CompressedOptimizer
    objects = n2uq_tf.custom_objects()
    assert objects["CompressedOptimizer"] is CompressedOptimizer
    registered = {key.split(">", 1)[1]: cls for key, cls in keras.saving.get_custom_objects().items()
                  if key.startswith("n2uq_tf>")}
    assert objects == registered
    assert {"N2UQWrapper", "N2UQQuantizeConfig", "ActivationQuantizer", "RPReLU", "N2UQAdam",
            "LinearEpochDecay", "PACTActivationQuantizer"} <= set(objects)


def test_registering_modules_are_listed():
    """custom_objects imports the modules that call `register`: the list must name every one."""
    import ast
    from n2uq_tf import _keras
    callers = set()
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py") and name != "_keras.py":
                path = os.path.join(folder, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "register"]
                imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "n2uq_tf._keras"
                           and any(a.name == "register" for a in n.names)]
                if uses and imports:
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    callers.add(module[:-len(".__init__")] if module.endswith("__init__") else module)
    assert callers == set(_keras.REGISTERING_MODULES)
