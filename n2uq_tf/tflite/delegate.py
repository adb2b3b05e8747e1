"""The N2UQ TFLite delegate plugin (tflite_tools/tflite): build, load, and interpreters that use it.

The plugin is a shared library with the external-delegate entry points
`tflite_plugin_create_delegate` / `tflite_plugin_destroy_delegate`; its Prepare claims the
N2UQ custom ops of a model and runs them with the bit-serial kernel core, whose sources are
compiled into the same library. It needs no TensorFlow or LiteRT symbols, so the same file
works with `tf.lite.Interpreter` and `ai_edge_litert.interpreter.Interpreter`.

Built at install time or on first use by `n2uq_tf._native` (g++ -O3 -fPIC -shared, no -march:
the core dispatches ISAs at run time; content-hashed name, atomic rename).

Delegate options (strings, as for any external delegate):
  num_threads  threads for the N2UQ kernels; 0 or absent: the interpreter's num_threads
  isa          auto | portable | avx2 | avx512 | neon (default auto, see N2UQ_KERNEL_ISA)
  path         conv / fully-connected kernel path: auto | bitserial | dot | lut (default auto:
               N2UQ_KERNEL_PATH, else the fastest measured on each layer's shape at Prepare)
  int8_conv    off | auto | all: which builtin int8 CONV_2D nodes the delegate runs (auto: those with
               at most 8 input channels, e.g. an image stem, where an AMX or AVX-512 VNNI kernel runs
               them; the bytes of TFLite's default XNNPACK run)
  float_conv   off | auto | all: the same for float32 CONV_2D nodes (AVX-512 FMA; TFLite's result up
               to float rounding)
  abi_probe    1: record the tensor/node table seen in Prepare (ABI self-test)

Neither TensorFlow nor the exporter is imported here: `Interpreter` runs with ai_edge_litert alone.
Timing a model is `n2uq_tf.tflite.benchmark`; letting the converter's int8 calibrator run the ops
is the exporter's business (`n2uq_tf.export.calibration`).
"""

import ctypes
import os
import threading
from typing import Any


from n2uq_tf import _native
from n2uq_tf.tflite import _core
from n2uq_tf.tflite.op_names import ALL_OPS as N2UQ_OPS

BACKENDS = ("auto", "litert", "tflite")
_lock = threading.Lock()
_loaded = {}


class DelegateUnavailableError(RuntimeError):
    """The model has N2UQ custom ops but the delegate plugin cannot be built or loaded."""


def build(force: bool = False, verbose: bool = True) -> str:
    """Compiles the delegate plugin if needed and returns its path (DelegateUnavailableError on failure).

    Building lives in n2uq_tf._native (shared with the core and the fused training kernel)."""
    try:
        return _native.build_delegate(force=force, verbose=verbose, error=DelegateUnavailableError)
    except _native.BuildError as error:  # sources missing
        raise DelegateUnavailableError(str(error)) from error


def delegate_path() -> str:
    """Path of the delegate plugin library (built on first use)."""
    with _lock:
        if "path" not in _loaded:
            _loaded["path"] = build()
        return _loaded["path"]


def library():
    """The plugin loaded with ctypes (the same handle the interpreters' load_delegate gets)."""
    path = delegate_path()
    with _lock:
        if "lib" not in _loaded:
            lib = ctypes.CDLL(path)
            u64p, sz = ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t
            lib.n2uq_delegate_profile_count.restype = ctypes.c_int
            lib.n2uq_delegate_profile_entry.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                                        ctypes.c_char_p, sz, ctypes.c_char_p, sz,
                                                        ctypes.POINTER(ctypes.c_int), u64p, u64p]
            lib.n2uq_delegate_profile_entry.restype = ctypes.c_int
            lib.n2uq_delegate_profile_path.argtypes = [ctypes.c_int]
            lib.n2uq_delegate_profile_path.restype = ctypes.c_int
            lib.n2uq_delegate_abi_probe.argtypes = [ctypes.c_char_p, sz]
            lib.n2uq_delegate_abi_probe.restype = sz
            lib.n2uq_flexbuffer_dump.argtypes = [ctypes.c_char_p, sz, ctypes.c_char_p, sz]
            lib.n2uq_flexbuffer_dump.restype = ctypes.c_int
            lib.n2uq_tflite_op_name.restype = ctypes.c_char_p
            lib.n2uq_tflite_registration.argtypes = [ctypes.c_char_p]
            lib.n2uq_tflite_registration.restype = ctypes.c_void_p
            if lib.n2uq_delegate_abi_version() != 1:
                raise DelegateUnavailableError("n2uq delegate plugin ABI mismatch")
            _loaded["lib"] = lib
        return _loaded["lib"]


# ------------------------------------------------------------------ interpreters

def backend_module(backend):
    """("litert", ai_edge_litert.interpreter) or ("tflite", tf.lite) for a name in BACKENDS.

    "auto" prefers ai_edge_litert; TensorFlow is imported only when tf.lite is the one used.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("auto", "litert"):
        try:
            from ai_edge_litert import interpreter as litert
            return "litert", litert
        except ImportError:
            if backend == "litert":
                raise
    import tensorflow as tf
    return "tflite", tf.lite


def load_delegate(backend: str = "auto", **options: Any) -> Any:
    """The N2UQ delegate as a `Delegate` object of the chosen interpreter package.

    Options: num_threads (int, 0 = the interpreter's), isa ("auto", "portable", "avx2",
    "avx512", "neon"), path ("auto", "bitserial", "dot", "lut", "amx"), int8_conv and float_conv ("off",
    "auto", "all": builtin CONV_2D nodes over few input channels the delegate runs), abi_probe (bool). Pass the
    result in `experimental_delegates`.
    """
    name, module = backend_module(backend)
    load = module.load_delegate if name == "litert" else module.experimental.load_delegate
    options = {key: (int(value) if isinstance(value, bool) else value) for key, value in options.items()
               if value is not None}
    return load(delegate_path(), options)


def _read_model(model_path, model_content):
    if isinstance(model_path, (bytes, bytearray)) and model_content is None:  # the bytes export_tflite returns
        model_path, model_content = None, model_path
    if (model_path is None) == (model_content is None):
        raise ValueError("pass exactly one of model_path and model_content")
    if model_content is not None:
        return bytes(model_content)
    with open(model_path, "rb") as f:
        return f.read()


def model_n2uq_ops(model_path: str | os.PathLike[str] | bytes | None = None,
                   model_content: bytes | None = None) -> list[str]:
    """Names of the N2UQ custom ops a .tflite model uses (from its operator-code strings).

    Like `Interpreter`, takes the flatbuffer bytes `n2uq_tf.export_tflite` returns in place of a path.
    """
    content = _read_model(model_path, model_content)
    # Names are stored as NUL-terminated flatbuffer strings; N2UQQuantize is a prefix of
    # N2UQQuantizePack, so match the terminator too.
    return [name for name in N2UQ_OPS if name.encode() + b"\0" in content]


def Interpreter(model_path: str | os.PathLike[str] | bytes | None = None, model_content: bytes | None = None,
                num_threads: int | None = None, backend: str = "auto", delegate_options: dict[str, Any] | None = None,
                **kwargs: Any) -> Any:
    """A stock TFLite interpreter (ai_edge_litert or tf.lite) with the N2UQ delegate attached.

    num_threads goes to the interpreter (context->recommended_num_threads) and so also to
    the N2UQ kernels unless delegate_options sets num_threads. Other keyword arguments go
    to the interpreter's constructor. A flatbuffer given as ``model_path`` (the bytes that
    `n2uq_tf.export_tflite` returns) is taken as ``model_content``.
    """
    if isinstance(model_path, (bytes, bytearray)):  # Interpreter(export_tflite(model)): not a path
        if model_content is not None:
            raise TypeError("Interpreter: model bytes given both as model_path and model_content")
        model_path, model_content = None, bytes(model_path)
    name, module = backend_module(backend)
    try:
        delegate = load_delegate(name, **(delegate_options or {}))
    except DelegateUnavailableError as error:
        content = _read_model(model_path, model_content)
        ops = model_n2uq_ops(model_content=content)
        if ops:
            raise DelegateUnavailableError(f"the model uses N2UQ custom ops ({', '.join(ops)}) which need the n2uq "
                                           f"delegate plugin, but it is unavailable: {error}") from error
        delegate = None
    delegates = list(kwargs.pop("experimental_delegates", None) or [])
    if delegate is not None:
        delegates.append(delegate)
    return module.Interpreter(model_path=model_path, model_content=model_content, num_threads=num_threads,
                              experimental_delegates=delegates, **kwargs)


# ------------------------------------------------------------------ kernel profile and self-tests

def _native_pointer(delegate):
    if delegate is None:
        return None
    pointer = delegate._get_native_delegate_pointer()
    return int(pointer) if pointer else None


def kernel_profile(delegate=None):
    """Per-kernel timings recorded inside the plugin: a list of dicts (op, output, node,
    invocations, seconds, path), for the live kernels of `delegate` (all delegates if None).
    Times cover the kernel's invoke (a steady-clock span around the core call); path is the
    kernel path a conv / fully connected op prepared ("bitserial", "dot", "lut", "amx"), else None."""
    lib = library()
    wanted = _native_pointer(delegate)
    entries = []
    for i in range(lib.n2uq_delegate_profile_count()):
        owner = ctypes.c_void_p()
        op, name = ctypes.create_string_buffer(64), ctypes.create_string_buffer(512)
        node, calls, ns = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_uint64()
        if lib.n2uq_delegate_profile_entry(i, ctypes.byref(owner), op, len(op), name, len(name), ctypes.byref(node),
                                           ctypes.byref(calls), ctypes.byref(ns)) != 0:
            continue
        if wanted is not None and owner.value != wanted:
            continue
        path = lib.n2uq_delegate_profile_path(i)
        entries.append({"op": op.value.decode(), "output": name.value.decode(errors="replace"),
                        "node": node.value, "invocations": calls.value, "seconds": ns.value * 1e-9,
                        "path": _core.PATHS[path] if 0 < path < len(_core.PATHS) else None})
    return sorted(entries, key=lambda e: e["node"])


def reset_kernel_profile():
    library().n2uq_delegate_profile_reset()


def abi_probe_text():
    """What the last delegate created with abi_probe=1 saw in its Prepare (see delegate.cc)."""
    lib = library()
    size = lib.n2uq_delegate_abi_probe(None, 0)
    buffer = ctypes.create_string_buffer(size + 1)
    lib.n2uq_delegate_abi_probe(buffer, len(buffer))
    return buffer.value.decode(errors="replace")


def flexbuffer_dump(data):
    """The plugin's FlexBuffer reader on raw bytes: {key: (kind, value)}, ValueError when malformed."""
    data = bytes(data)
    out = ctypes.create_string_buffer(1 << 16)
    status = library().n2uq_flexbuffer_dump(data, len(data), out, len(out))
    text = out.value.decode(errors="replace")
    if status != 0:
        raise ValueError(text)
    result = {}
    for line in text.splitlines():
        key, rest = line.split("=", 1)
        kind, value = rest.split(":", 1)
        result[key] = (kind, float(value) if kind == "float" else int(value) if kind in ("int", "uint", "bool")
                       else None)
    return result
