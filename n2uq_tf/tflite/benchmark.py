"""Latency of a .tflite model with the N2UQ delegate, with a per-kernel breakdown.

    result = n2uq_tf.tflite.benchmark_model("model.tflite", num_threads=4, float_model="float.tflite")
    print(n2uq_tf.tflite.format_benchmark(result))

The per-kernel times are measured inside the plugin (`delegate.kernel_profile`); the rest of the
invoke time is builtin ops and interpreter overhead. `python -m n2uq_tf benchmark` prints the same.
"""

import os
import statistics
import time
from typing import Any

import numpy as np

from n2uq_tf.tflite import _core
from n2uq_tf.tflite.delegate import backend_module, kernel_profile, load_delegate, model_n2uq_ops, reset_kernel_profile


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


def default_warmup() -> int:
    """Untimed invokes before timing: the N2UQ kernels' plan trial (a layer whose path selection
    kept a runner-up tries both on its first runs, then keeps the faster) plus 5."""
    return _core.plan_trial_runs() + 5


def benchmark_model(path: str | os.PathLike[str], num_threads: int = 1, runs: int = 50, warmup: int | None = None,
                    backend: str = "auto", float_model: str | os.PathLike[str] | None = None, isa: str | None = None,
                    kernel_path: str | None = None) -> dict[str, Any]:
    """Latency of a .tflite model with the N2UQ delegate, and without it when that is possible.

    A model with N2UQ ops cannot run without the delegate: then "without_delegate" times
    `float_model` (e.g. a float twin) if given, else is None. "ops" is the per-kernel
    breakdown of the N2UQ ops measured inside the plugin; "other_ms" is the rest of the
    mean invoke time (builtin ops and interpreter overhead). `warmup` untimed invokes come first
    (None: `default_warmup()`, so that no layer is still trying its runner-up path when the timing
    starts).
    """
    if warmup is None:
        warmup = default_warmup()
    backend_name, module = backend_module(backend)
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
