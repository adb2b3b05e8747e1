"""The README's multi-worker recipe end to end: `n2uq-tf launch` + examples/distributed.py, and the
benchmark script that compares every compressor with the float32 exchange in one run."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "distributed.py")
BENCHMARK = os.path.join(ROOT, "benchmarks", "distributed.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(argv, timeout=3600):
    run = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return run


def test_readme_launch_command_trains_two_workers_with_nuqsgd(tmp_path):
    out = tmp_path / "result.json"
    run = _run([sys.executable, "-m", "n2uq_tf.cli", "launch", "-n", "2", "--", sys.executable, EXAMPLE,
                "--compression", "nuqsgd", "--bits", "4", "--epochs", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["workers"], result["replicas"], result["compression"], result["bits"]) == (2, 2, "nuqsgd", 4)
    # 1.1M-parameter MLP: 4 bits + one norm per 8192 values is >= 7x less than float32.
    assert result["parameters"] == 64 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert result["ratio"] >= 7.0
    # Buckets: kernels 65,536 / 1,048,576 / 10,240 values -> 8 + 128 + 1 whole ones of their own; the
    # last kernel's tail (2,048) and the three biases (2,058) share 1. Each bucket: 8192 codes / 8 per
    # word + 1 norm word; then the 4 words of the non-finite side list.
    assert result["bytes_per_step"] == 4 * ((8 + 128 + 1 + 1) * (8192 // 8 + 1) + 4)
    assert result["test_accuracy"] > 0.9  # digits, 2 epochs: the float exchange reaches ~0.97
    # The chief alone reports; both workers' lines come through the launcher's prefixes.
    assert "[worker 0]" in run.stdout and "test accuracy" in run.stdout
    assert "[worker 1]" in run.stdout or "[worker 1]" in run.stderr


def test_benchmark_compares_with_uncompressed_in_one_run(tmp_path):
    # A user's own saved model (not one of the example's): digits are fed at its input size.
    import tf_keras as keras
    from n2uq_tf import distribute
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.Dense(300, activation="relu")(keras.layers.Flatten()(keras.layers.MaxPooling2D()(x)))
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.save(tmp_path / "user_model.keras")
    size = distribute.exchange_size(model.trainable_variables, distribute.GradientCompression("nuqsgd", 4))
    markdown = tmp_path / "bench.md"
    run = _run([sys.executable, BENCHMARK, "--model", str(tmp_path / "user_model.keras"),
                "--configs", "none", "nuqsgd:4", "--epochs", "1", "--markdown", str(markdown)])
    text = markdown.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| none (float32)") or line.startswith("| nuqsgd")]
    assert len(rows) == 3, text  # exchange table: none + nuqsgd; codec table: nuqsgd
    assert f"| {size.float32_bytes:,} | 1.00x |" in rows[0]
    assert f"| {size.bytes:,} | {size.ratio:.2f}x |" in rows[1] and size.ratio >= 7
    accuracy = [float(row.rstrip(" |").rsplit("|", 1)[1]) for row in rows[:2]]
    assert min(accuracy) > 50  # percent, after one epoch on digits (chance: 10)
    assert "| nuqsgd 4-bit |" in run.stdout


@pytest.mark.parametrize("model", ["cnn"])
def test_example_single_process_two_local_replicas(tmp_path, model):
    out = tmp_path / "result.json"
    _run([sys.executable, EXAMPLE, "--model", model, "--local-replicas", "2", "--compression", "qsgdinf",
          "--bits", "8", "--epochs", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["workers"], result["replicas"], result["bits"]) == (1, 2, 8)
    assert 3.5 < result["ratio"] < 4.0  # 8 bits + norms
    assert result["final_loss"] < 2.3  # below chance level's log(10) after one epoch
