"""Builds (once) and loads the fused C++ training kernel of the activation quantizer.

The library is compiled against the installed TensorFlow's headers, so it is tied to
that TensorFlow version: the file name carries the version, and a missing or stale
library is rebuilt on first use into the package folder (or, if that is read-only,
into $XDG_CACHE_HOME/n2uq_tf). Without a C++ compiler, `load()` warns once and returns
None and ops.py uses its pure-TF reference. N2UQ_TF_DISABLE_FUSED=1 skips the kernel.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "n2uq_train_ops.cc")
_lock = threading.Lock()
_loaded = {}


def _library_name():
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:10]
    return f"n2uq_train_ops_tf{tf.__version__}_{digest}.so"


def _candidate_dirs():
    package_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [package_dir, os.path.join(cache, "n2uq_tf")]


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"


def build_command(output):
    return ([compiler(), "-std=c++17", "-O3", "-fPIC", "-shared", "-ffp-contract=off", "-w", SOURCE, "-o", output]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def build(force=False, verbose=True):
    """Compiles the kernel library if needed and returns its path (raises RuntimeError on failure)."""
    name = _library_name()
    for directory in _candidate_dirs():
        path = os.path.join(directory, name)
        if os.path.exists(path) and not force:
            return path
    errors = []
    for directory in _candidate_dirs():
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError as error:
            errors.append(f"{directory}: {error}")
            continue
        if verbose:
            print(f"n2uq_tf: building the fused quantizer kernel for TensorFlow {tf.__version__} "
                  f"(once, ~15 s) into {directory}", file=sys.stderr)
        try:
            result = subprocess.run(build_command(tmp), capture_output=True, text=True)
        except OSError as error:
            os.unlink(tmp)
            raise RuntimeError(f"cannot run the C++ compiler {compiler()!r}: {error}") from error
        if result.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {SOURCE} failed:\n{result.stderr[-2000:]}")
        path = os.path.join(directory, name)
        os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
        for old in os.listdir(directory):  # libraries of older sources or TF versions
            if old.startswith("n2uq_train_ops_") and old.endswith(".so") and old != name:
                try:
                    os.unlink(os.path.join(directory, old))
                except OSError:
                    pass
        return path
    raise RuntimeError("no writable folder for the kernel library: " + "; ".join(errors))


# Called while Keras traces a model: plain Python, nothing for AutoGraph to convert.
@tf.autograph.experimental.do_not_convert
def load():
    """The op module with n2uq_quantize_forward/backward, or None (then ops.py uses pure TF)."""
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
