"""`n2uq-tf train` as two MultiWorkerMirroredStrategy workers started by `n2uq-tf launch`, with the
gradient exchange compressed: the README's command line, end to end."""

import os
import subprocess
import sys

import numpy as np
import pytest

import n2uq_tf

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)


def test_train_two_workers_with_nuqsgd(tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "n2uq_tf.cli", "launch", "-n", "2", "--",
               sys.executable, "-m", "n2uq_tf.cli", "train", "--model", "resnet20", "--width", "8",
               "--dataset", "digits", "--image-size", "16", "--bits", "2", "--epochs", "1",
               "--teacher-epochs", "1", "--steps-per-epoch", "3", "--compression", "nuqsgd",
               "--output", str(output), "--no-plots"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "[worker 0] MultiWorkerMirroredStrategy: 2 replicas" in run.stdout
    assert "[worker 0] gradient exchange: nuqsgd 4-bit" in run.stdout
    # The chief owns the run's folder; the other worker wrote its copy aside, and the two students,
    # trained in lockstep on the summed decoded gradients, are the same bit for bit.
    chief = n2uq_tf.load_model(str(output / "student.keras"), compile=False)
    other = n2uq_tf.load_model(str(output / ".worker1" / "student.keras"), compile=False)
    for a, b in zip(chief.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert (output / "history.json").exists() and (output / "report.txt").exists()
    assert not (output / ".worker1" / "plots").exists()
    assert run.stdout.count("student ") >= 1 and "[worker 1] digits" not in run.stdout
