"""The n2uq-tf command as a user runs it: help, train (with checkpoints and resume), evaluate, report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tf_keras as keras

import n2uq_tf
from n2uq_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet20", "--width", "4", "--image-size", "8", "--batch-size", "32",
        "--teacher-epochs", "1", "--steps-per-epoch", "3"]


def run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "n2uq_tf", *args], env=env, capture_output=True, text=True)


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for word in ("train", "evaluate", "report", "export", "inspect", "benchmark", "Examples:"):
        assert word in result.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    for option in ("--teacher", "--bits", "--resume", "--frozen-thresholds", "--float-downsample", "digits"):
        assert option in train.stdout
    assert run_cli("evaluate", "--help").returncode == 0
    for command in ("report", "export", "inspect", "benchmark"):
        assert run_cli(command, "--help").returncode == 0


def test_unknown_model_is_an_argparse_error():
    result = run_cli("train", "--model", "resnet1000")
    assert result.returncode == 2 and "invalid choice: 'resnet1000'" in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny `n2uq-tf train` run, in process."""
    out = str(tmp_path_factory.mktemp("run") / "digits")
    assert cli.main(["train", *TINY, "--epochs", "2", "--output", out]) == 0
    return out


def test_train_writes_a_loadable_student_and_its_records(finished_run):
    out = finished_run
    for name in ("student.keras", "teacher.keras", "report.txt", "history.json",
                 os.path.join("plots", "thresholds.png"), os.path.join("plots", "weight_levels.png")):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "history.json")) as f:
        record = json.load(f)
    assert len(record["history"]["loss"]) == 2 and len(record["history"]["val_accuracy"]) == 2
    student = n2uq_tf.load_model(os.path.join(out, "student.keras"))
    report = n2uq_tf.quantization_report(student)
    assert len(report.quantized) == 20  # 18 block convs + 2 downsample convs, stem and fc float
    assert {r.weight_bits for r in report.quantized} == {2}
    # The recorded accuracy is the saved student's accuracy on the digits test split.
    x, y = n2uq_tf.data.digits_arrays(image_size=8)[1]
    accuracy = np.mean(np.argmax(student.predict(x, verbose=0), -1) == y)
    assert accuracy == pytest.approx(record["student_accuracy"], abs=1e-6)
    # The teacher stayed float and was not changed by distillation.
    teacher = keras.models.load_model(os.path.join(out, "teacher.keras"),
                                      custom_objects=n2uq_tf.custom_objects())
    assert not any(isinstance(layer, n2uq_tf.N2UQWrapper) for layer in teacher.layers)
    assert record["teacher_accuracy"] == pytest.approx(
        np.mean(np.argmax(teacher.predict(x, verbose=0), -1) == y), abs=1e-6)


def test_used_output_folder_is_refused_and_finished_run_says_so(finished_run, capsys):
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main(["train", *TINY, "--epochs", "2", "--output", finished_run])
    with pytest.raises(SystemExit, match="has finished"):
        cli.main(["train", *TINY, "--epochs", "2", "--output", finished_run, "--resume"])


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real_fit = cli._fit

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _Interrupt()

    def interrupted_fit(model, train_ds, val_ds, epochs, steps, callbacks, args):
        if isinstance(model, n2uq_tf.DistillationModel):  # the student phase; BackupAndRestore runs first
            callbacks = callbacks + [StopAfterFirstEpoch()]
        return real_fit(model, train_ds, val_ds, epochs, steps, callbacks, args)

    monkeypatch.setattr(cli, "_fit", interrupted_fit)
    with pytest.raises(_Interrupt):
        cli.main(["train", *TINY, "--epochs", "3", "--output", out, "--no-plots"])
    assert os.path.exists(os.path.join(out, "teacher.keras"))
    assert not os.path.exists(os.path.join(out, "student.keras"))

    monkeypatch.setattr(cli, "_fit", real_fit)
    assert cli.main(["train", *TINY, "--epochs", "3", "--output", out, "--no-plots", "--resume"]) == 0
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)["history"]
    assert len(history["loss"]) == 2  # epochs 2 and 3 only: epoch 1 came from the checkpoint


def test_evaluate_and_report(finished_run, tmp_path, capsys):
    student = os.path.join(finished_run, "student.keras")
    assert cli.main(["evaluate", student, "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out
    with open(os.path.join(finished_run, "history.json")) as f:
        recorded = json.load(f)["student_accuracy"]
    assert f"top-1 {100 * recorded:.2f}%" in out

    plots = str(tmp_path / "plots")
    assert cli.main(["report", student, "--plots", plots, "--dataset", "digits"]) == 0
    assert "compression" in capsys.readouterr().out
    for name in ("thresholds.png", "weight_levels.png"):
        with open(os.path.join(plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["report", student, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compression"] > 1 and len(report["layers"]) > 20


def test_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing.keras"), "--dataset", "digits"]) == 2
    assert "no model at" in capsys.readouterr().err
    empty = str(tmp_path / "tfds")
    os.makedirs(empty)
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", empty, "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and "download" in err


def test_export_inspect_benchmark(finished_run, tmp_path, capsys):
    student = os.path.join(finished_run, "student.keras")
    tflite_path = str(tmp_path / "student.tflite")
    assert cli.main(["export", student, "-o", tflite_path]) == 0
    out = capsys.readouterr().out
    assert "N2UQConv2D" in out and f"wrote {tflite_path}" in out
    assert cli.main(["inspect", tflite_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == os.path.getsize(tflite_path)
    assert cli.main(["inspect", tflite_path]) == 0
    assert "N2UQQuantizePack x20" in capsys.readouterr().out
    assert cli.main(["benchmark", tflite_path, "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "with n2uq delegate" in out and "N2UQConv2D" in out
    # The exported student gives the Keras student's predictions in the stock interpreter.
    x, _ = n2uq_tf.data.digits_arrays(image_size=8)[1]
    keras_out = n2uq_tf.load_model(student).predict(x[:4], verbose=0)
    interpreter = n2uq_tf.tflite.Interpreter(tflite_path)
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], [4, 8, 8, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x[:4])
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(outp["index"]), keras_out, atol=1e-4)
