"""examples/ablation.py runs end to end (1 seed, 1 epoch, tiny settings) and writes its table and plot."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ablation_smoke(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "ablation.py"), "--seeds", "1", "--epochs", "1",
         "--width", "4", "--image-size", "8", "--train-images", "64", "--batch-size", "16", "--output", str(out)],
        capture_output=True, text=True, timeout=3600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| baseline (uniform thresholds, STE) |" in proc.stdout and "| learnable scale |" in proc.stdout
    assert "±" in proc.stdout
    result = json.loads((out / "ablation.json").read_text())
    assert set(result["accuracy"]) == {"uniform+none", "n2uq+none", "uniform+ep", "n2uq+ep", "n2uq+learnable"}
    assert all(len(v) == 1 for v in result["accuracy"].values())
    # Every row trains a full twin: rows that differ only in the weight quantizer (no variables for
    # "none" and entropy-preserving weights) train the same variables. (Regression: rows after the
    # first were clones of the frozen teacher with only the quantizer parameters trainable.)
    counts = {key: v[0]["trainable_variables"] for key, v in result["quantizers"].items()}
    assert counts["uniform+none"] == counts["uniform+ep"] < counts["n2uq+none"] == counts["n2uq+ep"]
    assert counts["n2uq+learnable"] > counts["n2uq+ep"]
    assert "trainable variables" in proc.stdout
    assert (out / "ablation.md").exists()
    if (out / "ablation.png").exists():
        assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "plot skipped" in proc.stdout


def test_ablation_cifar10_missing_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "ablation.py"), "--dataset", "cifar10", "--seeds", "1",
         "--data-dir", str(tmp_path / "no_data"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=3600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode != 0
    assert "cifar10 is not available" in proc.stderr
