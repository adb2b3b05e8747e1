"""Builds (once) and loads the fused C++ training kernel of the activation quantizer.

The library is compiled against the installed TensorFlow's headers, so it is tied to
that TensorFlow version: the file name carries the version, and a missing or stale
library is rebuilt on first use into the package folder (or, if that is read-only,
into $XDG_CACHE_HOME/n2uq_tf). Without a C++ compiler, `load()` warns once and returns
None and quantization_math/n2uq.py uses its pure-TF reference. N2UQ_TF_DISABLE_FUSED=1 skips the kernel.
"""

import os
import threading
import warnings

import tensorflow as tf

from n2uq_tf import _native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "n2uq_train_ops.cc")
_lock = threading.Lock()
_loaded = {}


def _candidate_dirs():
    return _native.library_dirs()


def compiler():
    return _native.compiler()


def build_command(output):
    return ([compiler(), "-std=c++17", "-O3", "-fPIC", "-shared", "-ffp-contract=off", "-w", SOURCE, "-o", output]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def build(force=False, verbose=True):
    """Compiles the kernel library if needed and returns its path (raises RuntimeError on failure)."""
    # Tied to this TensorFlow's headers and ABI: the version is part of the name.
    prefix = f"n2uq_train_ops_tf{tf.__version__}_"
    name = _native.content_name(prefix, ["-ffp-contract=off"], [SOURCE])
    return _native.build_library(name, build_command, f"the fused quantizer kernel for TensorFlow {tf.__version__}",
                                 stale_prefix="n2uq_train_ops_", force=force, verbose=verbose,
                                 directories=_candidate_dirs())


# The op names the library registers (n2uq_train_ops.cc), as they appear in a saved graph.
OP_NAMES = ("N2uqQuantizeForward", "N2uqQuantizeBackward")


def register_ops():
    """Makes the fused ops known to TensorFlow (building the library if needed), whatever
    N2UQ_TF_DISABLE_FUSED says: earlier n2uq_tf versions traced them into SavedModels, which
    then load only where the ops are registered. Training still follows the setting.
    Raises RuntimeError when the library cannot be built."""
    with _lock:
        if _loaded.get("module") is None:
            tf.load_op_library(build(verbose=False))


def writing_saved_model():
    """True while a SavedModel is being written (tf.saved_model.save, Keras ``save`` to a folder).

    What a SavedModel records must load where this library is not loaded (a fresh process, TF
    Serving, ``N2UQ_TF_DISABLE_FUSED=1``), so functions traced then use TensorFlow's own ops.
    TensorFlow has no public test for this; its save context is the one place that knows (should it
    move, this says False and tests/test_save_formats.py finds our op in the SavedModel).
    """
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:
        return False
    return save_context.in_save_context()


# Called while Keras traces a model: plain Python, nothing for AutoGraph to convert.
@tf.autograph.experimental.do_not_convert
def load():
    """The op module with n2uq_quantize_forward/backward, or None (then quantization_math.n2uq uses pure TF)."""
    if os.environ.get("N2UQ_TF_DISABLE_FUSED") == "1":
        return None
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = None
            try:
                _loaded["module"] = tf.load_op_library(build())
            except (RuntimeError, tf.errors.NotFoundError, OSError) as error:
                warnings.warn(f"n2uq_tf: the fused quantizer kernel is unavailable, using the pure-TF "
                              f"implementation (slower training): {error}", RuntimeWarning, stacklevel=2)
        return _loaded["module"]
