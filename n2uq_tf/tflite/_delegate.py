"""Builds (once) and loads the N2UQ TFLite delegate plugin (tflite_tools/tflite).

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
  abi_probe    1: record the tensor/node table seen in Prepare (ABI self-test)
"""

import ctypes
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

from n2uq_tf import _native
from n2uq_tf.tflite import _core

# Mirrors n2uq_tf.export.custom_ops.ALL_OPS (checked by tests) so that running a model
# does not import TensorFlow when only ai_edge_litert is installed.
N2UQ_OPS = ("N2UQQuantizePack", "N2UQQuantize", "N2UQConv2D", "N2UQDepthwiseConv2D", "N2UQFullyConnected",
            "N2UQConv2DFused", "N2UQDepthwiseConv2DFused", "N2UQFullyConnectedFused")
BACKENDS = ("auto", "litert", "tflite")
_SOURCE_NAMES = _native.DELEGATE_HEADERS_AND_SOURCES
_COMPILED = _native.DELEGATE_COMPILED
FLAGS = _native.DELEGATE_FLAGS
_lock = threading.Lock()
_loaded = {}


class DelegateUnavailableError(RuntimeError):
    """The model has N2UQ custom ops but the delegate plugin cannot be built or loaded."""


# Building lives in n2uq_tf._native (shared with the core and the fused training kernel).
build_command = _native.delegate_build_command


def source_dir():
    """The folder with the plugin's C++ sources (N2UQ_DELEGATE_SOURCE_DIR overrides)."""
    try:
        return _native.delegate_source_dir()
    except _native.BuildError as error:
        raise DelegateUnavailableError(str(error)) from error


def build(force: bool = False, verbose: bool = True) -> str:
    """Compiles the delegate plugin if needed and returns its path (DelegateUnavailableError on failure)."""
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


# ------------------------------------------------------------------ converter calibration

# MutableOpResolver::AddCustom(const char*, const TfLiteRegistration*, int min_version, int max_version)
_ADD_CUSTOM_SYMBOL = "_ZN6tflite17MutableOpResolver9AddCustomEPKcPK18TfLiteRegistrationii"


def op_resolver_registerer():
    """A registerer for TFLite's converter-side interpreters: ``fn(resolver_address)``.

    TFLite's int8 calibrator runs the float model in its own interpreter, which takes custom
    ops only from registerers (``converter.target_spec._experimental_custom_op_registerers``),
    not from delegates. This one adds the plugin's kernels (`n2uq_tflite_registration`) to
    the calibrator's MutableOpResolver through AddCustom, a symbol of the TensorFlow wheel's
    libtensorflow_cc (the converter's own TFLite), resolved here with ctypes: no link step,
    and the plugin itself stays free of TensorFlow symbols. Development-time only; apps load
    the plugin as a delegate.
    """
    import tensorflow as tf
    from n2uq_tf.export.custom_ops import ALL_OPS

    path = os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2")
    try:
        add_custom = ctypes.CDLL(path)[_ADD_CUSTOM_SYMBOL]
    except (OSError, AttributeError) as error:
        raise DelegateUnavailableError(
            f"this TensorFlow ({tf.__version__}) does not expose MutableOpResolver::AddCustom in {path}, "
            f"so its int8 calibrator cannot run the N2UQ ops: {error}") from error
    add_custom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    add_custom.restype = None
    lib = library()
    registrations = {name: lib.n2uq_tflite_registration(name.encode()) for name in ALL_OPS}
    missing = [name for name, registration in registrations.items() if not registration]
    if missing:
        raise DelegateUnavailableError(f"the delegate plugin has no registration for {', '.join(missing)}")

    def register(resolver_address):
        for name, registration in registrations.items():
            add_custom(resolver_address, name.encode(), registration, 1, 1)

    return register


# ------------------------------------------------------------------ interpreters

def _backend_module(backend):
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
    "avx512", "neon"), path ("auto", "bitserial", "dot", "lut"), abi_probe (bool). Pass the
    result in `experimental_delegates`.
    """
    name, module = _backend_module(backend)
    load = module.load_delegate if name == "litert" else module.experimental.load_delegate
    options = {key: (int(value) if isinstance(value, bool) else value) for key, value in options.items()
               if value is not None}
    return load(delegate_path(), options)


def _read_model(model_path, model_content):
    if (model_path is None) == (model_content is None):
        raise ValueError("pass exactly one of model_path and model_content")
    if model_content is not None:
        return bytes(model_content)
    with open(model_path, "rb") as f:
        return f.read()


def model_n2uq_ops(model_path: str | os.PathLike[str] | None = None, model_content: bytes | None = None) -> list[str]:
    """Names of the N2UQ custom ops a .tflite model uses (from its operator-code strings)."""
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
    name, module = _backend_module(backend)
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


# ------------------------------------------------------------------ profiling and benchmark

def _native_pointer(delegate):
    if delegate is None:
        return None
    pointer = delegate._get_native_delegate_pointer()
    return int(pointer) if pointer else None


def kernel_profile(delegate=None):
    """Per-kernel timings recorded inside the plugin: a list of dicts (op, output, node,
    invocations, seconds, path), for the live kernels of `delegate` (all delegates if None).
    Times cover the kernel's invoke (a steady-clock span around the core call); path is the
    kernel path a conv / fully connected op prepared ("bitserial", "dot", "lut"), else None."""
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


def _random_inputs(interpreter, seed):
    rng = np.random.default_rng(seed)
    values = []
    for detail in interpreter.get_input_details():
        shape, dtype = detail["shape"], np.dtype(detail["dtype"])
        if np.issubdtype(dtype, np.floating):
            values.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            values.append(rng.random(shape) < 0.5)
        else:
            info = np.iinfo(dtype)
            values.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype))
    return values


def _time_interpreter(interpreter, runs, warmup, seed=0, after_warmup=None):
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), _random_inputs(interpreter, seed)):
        interpreter.set_tensor(detail["index"], value)
    for _ in range(warmup):
        interpreter.invoke()
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return {"mean_ms": 1e3 * statistics.fmean(times), "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "runs": runs}


def benchmark_model(path: str | os.PathLike[str], num_threads: int = 1, runs: int = 50, warmup: int = 5,
                    backend: str = "auto", float_model: str | os.PathLike[str] | None = None, isa: str | None = None,
                    kernel_path: str | None = None) -> dict[str, Any]:
    """Latency of a .tflite model with the N2UQ delegate, and without it when that is possible.

    A model with N2UQ ops cannot run without the delegate: then "without_delegate" times
    `float_model` (e.g. a float twin) if given, else is None. "ops" is the per-kernel
    breakdown of the N2UQ ops measured inside the plugin; "other_ms" is the rest of the
    mean invoke time (builtin ops and interpreter overhead).
    """
    backend_name, module = _backend_module(backend)
    delegate = load_delegate(backend_name, isa=isa, path=kernel_path)
    interpreter = module.Interpreter(model_path=str(path), num_threads=int(num_threads),
                                     experimental_delegates=[delegate])
    runs = max(int(runs), 1)
    # Warm-up invokes (caches, thread pool) stay out of the per-op profile.
    with_delegate = _time_interpreter(interpreter, runs, int(warmup), after_warmup=reset_kernel_profile)
    ops = []
    for entry in kernel_profile(delegate):
        calls = max(entry["invocations"], 1)
        ops.append({"op": entry["op"], "output": entry["output"], "node": entry["node"],
                    "calls": entry["invocations"], "mean_ms": 1e3 * entry["seconds"] / calls, "path": entry["path"]})
    n2uq_ms = sum(op["mean_ms"] * op["calls"] / max(runs, 1) for op in ops)
    for op in ops:
        op["share"] = op["mean_ms"] * op["calls"] / max(runs, 1) / with_delegate["mean_ms"]
    result = {"model": str(path), "backend": backend_name, "num_threads": int(num_threads),
              "isa": _core.isa(isa or "auto"), "n2uq_ops": model_n2uq_ops(model_path=path),
              "with_delegate": with_delegate, "ops": ops, "n2uq_ms": n2uq_ms,
              "other_ms": max(with_delegate["mean_ms"] - n2uq_ms, 0.0), "without_delegate": None,
              "without_delegate_model": None}
    del interpreter
    baseline = None
    if not result["n2uq_ops"]:
        baseline = str(path)
    elif float_model is not None:
        baseline = str(float_model)
    if baseline is not None:
        plain = module.Interpreter(model_path=baseline, num_threads=int(num_threads))
        result["without_delegate"] = _time_interpreter(plain, runs, warmup)
        result["without_delegate_model"] = baseline
    return result


def format_benchmark(result: dict[str, Any]) -> str:
    """A readable table of `benchmark_model`'s result."""
    w = result["with_delegate"]
    lines = [f"model: {result['model']}  ({result['backend']}, {result['num_threads']} thread(s), "
             f"isa {result['isa']}, {w['runs']} runs)",
             f"with n2uq delegate: mean {w['mean_ms']:.3f} ms, median {w['median_ms']:.3f} ms, "
             f"min {w['min_ms']:.3f} ms"]
    base = result["without_delegate"]
    if base is not None:
        lines.append(f"without delegate ({result['without_delegate_model']}): mean {base['mean_ms']:.3f} ms, "
                     f"median {base['median_ms']:.3f} ms, min {base['min_ms']:.3f} ms")
    elif result["n2uq_ops"]:
        lines.append("without delegate: cannot run (the model has N2UQ custom ops; pass a float twin to compare)")
    if result["ops"]:
        lines.append(f"{'node':>5}  {'op':<20} {'path':<9} {'mean ms':>9} {'share':>7}  output")
        for op in result["ops"]:
            lines.append(f"{op['node']:>5}  {op['op']:<20} {op.get('path') or '-':<9} {op['mean_ms']:>9.3f} "
                         f"{100 * op['share']:>6.1f}%  {op['output']}")
        lines.append(f"{'':>5}  {'other ops + overhead':<20} {result['other_ms']:>9.3f} "
                     f"{100 * result['other_ms'] / max(w['mean_ms'], 1e-12):>6.1f}%")
    return "\n".join(lines)
