"""n2uq_tf: N2UQ quantization-aware training for tf_keras, exported to bit-packed TFLite.

    import n2uq_tf
    qmodel = n2uq_tf.quantize_model(float_model, bits=2)
    qmodel.compile(...); qmodel.fit(...)
    print(n2uq_tf.quantization_report(qmodel))

The paper's recipe in one call: ``n2uq_tf.recipe.train_n2uq``, built from ``n2uq_tf.models``
(reference networks), ``n2uq_tf.data`` (datasets), ``n2uq_tf.DistillationModel`` and
``n2uq_tf.paper_optimizer`` (training), ``n2uq_tf.plots``.
Saving: ``n2uq_tf.save_model(qmodel, path)`` (atomic) and ``n2uq_tf.load_model(path)``.
Deployment: ``n2uq_tf.export_tflite(qmodel, "model.tflite")`` and ``n2uq_tf.tflite.Interpreter``.
Data-parallel training with compressed gradients: ``n2uq_tf.distribute.compress_gradients``.
The quantizer math itself (pure TensorFlow): ``n2uq_tf.quantization_math``.

Every name here is imported on first use, except the classes Keras finds by their registered names
when it loads a saved model: where TensorFlow is installed, ``import n2uq_tf`` registers them, so that
``tf_keras.models.load_model("m.keras")`` works after a bare ``import n2uq_tf`` (plots, the exporter and
the CLI still load on first use). The runtime side ``n2uq_tf.tflite`` imports neither TensorFlow nor the
exporter, so on a device with only ai_edge_litert ``import n2uq_tf.tflite`` needs nothing else.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_SUBMODULES = ("cli", "data", "distribute", "export", "layers", "model_reader", "models", "plots",
               "quantization_math", "quantize", "recipe", "report", "tflite", "training")
_NAMES = {
    "n2uq_tf.quantize": ("ActivationQuantizer", "N2UQQuantizeConfig", "N2UQQuantizeScheme", "N2UQWrapper",
                         "WeightQuantizer", "custom_objects", "load_model", "quantize_model", "quantize_scope",
                         "save_model"),
    "n2uq_tf.report": ("QuantizationReport", "quantization_report"),
    "n2uq_tf.training": ("DistillationModel", "LinearEpochDecay", "N2UQAdam", "distillation_loss", "paper_optimizer"),
    "n2uq_tf.export": ("export_tflite", "inspect_tflite"),
}
_MODULE_OF_NAME = {name: module for module, names in _NAMES.items() for name in names}

# Modules that moved, under the names they had before. Importing an old name gives the module
# object itself, not a copy, so both names see the same functions and attributes.
_RENAMED_MODULES = {
    "n2uq_tf.ops": "n2uq_tf.quantization_math.n2uq",
    "n2uq_tf.methods": "n2uq_tf.quantization_math.baselines",
    # .keras files written before the move name their baseline quantizers' module by this name.
    "n2uq_tf.quantize.methods": "n2uq_tf.quantize.method_table",
}


class _RenamedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of `_RENAMED_MODULES`; loading one puts the module it names in its place."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in _RENAMED_MODULES else None

    def create_module(self, spec):
        return None  # a placeholder, replaced below

    def exec_module(self, module):
        # The import system hands out whatever sys.modules holds under the name after exec_module.
        sys.modules[module.__name__] = importlib.import_module(_RENAMED_MODULES[module.__name__])


# First in line, so that no other finder (an editable install's, a stale ops.py of an older
# version) answers for these names; it answers for nothing else.
if not any(type(finder).__name__ == _RenamedModuleFinder.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _RenamedModuleFinder())


def __getattr__(name):
    if name in _SUBMODULES or f"n2uq_tf.{name}" in _RENAMED_MODULES:
        return importlib.import_module(f"n2uq_tf.{name}")
    if name in _MODULE_OF_NAME:
        value = getattr(importlib.import_module(_MODULE_OF_NAME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'n2uq_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_MODULE_OF_NAME) | {"ops", "methods"})


__all__ = sorted(_MODULE_OF_NAME) + ["ops"]


def _front_end_installed():
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("tensorflow", "tf_keras", "tensorflow_model_optimization"))
    except (ImportError, ValueError):  # a finder that refuses the name: treated as not installed
        return False


if _front_end_installed():
    from n2uq_tf import _keras

    _keras.custom_objects()  # imports every module that registers a class
    from n2uq_tf._keras_kind import keras3_available

    if keras3_available():
        # Registers the Keras 3 wrapper (keras.models.load_model finds it) and the Keras 3 model reader.
        importlib.import_module("n2uq_tf.keras3")

