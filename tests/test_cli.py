"""The n2uq-tf command as a user runs it: help, train (with checkpoints and resume), evaluate, report,
export; its data safety (no input overwritten, atomic outputs, run folders) and its errors (one line,
exit status 2 for the command line, 1 for failures, never a traceback for an expected error)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tf_keras as keras

import n2uq_tf
from n2uq_tf import cli, recipe
from tflite_files import builtin_input_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet20", "--width", "4", "--image-size", "8", "--batch-size", "32",
        "--teacher-epochs", "1", "--steps-per-epoch", "3"]


def run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "n2uq_tf", *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
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


def folder_state(folder):
    """{relative path: bytes} of every file under a folder (what a command must leave alone)."""
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = f.read()
    return state


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny `n2uq-tf train` run, in process."""
    out = str(tmp_path_factory.mktemp("run") / "digits")
    assert cli.main(["train", *TINY, "--epochs", "2", "--output", out]) == 0
    return out


@pytest.mark.slow
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
    before = folder_state(finished_run)
    assert cli.main(["train", *TINY, "--epochs", "2", "--output", finished_run]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--epochs", "2", "--output", finished_run, "--resume"]) == 2
    assert "has finished" in capsys.readouterr().err
    assert folder_state(finished_run) == before  # nothing written, nothing removed


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real_fit = recipe._fit

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _Interrupt()

    def interrupted_fit(model, data, *, callbacks, **kwargs):
        if isinstance(model, n2uq_tf.DistillationModel):  # the student phase; BackupAndRestore runs first
            callbacks = list(callbacks) + [StopAfterFirstEpoch()]
        return real_fit(model, data, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(recipe, "_fit", interrupted_fit)
    with pytest.raises(_Interrupt):
        cli.main(["train", *TINY, "--epochs", "3", "--output", out, "--no-plots"])
    assert os.path.exists(os.path.join(out, "teacher.keras"))
    assert not os.path.exists(os.path.join(out, "student.keras"))
    with open(os.path.join(out, "history.json")) as f:
        first = json.load(f)  # written after every epoch
    assert first["epoch"] == [0] and len(first["history"]["loss"]) == 1

    monkeypatch.setattr(recipe, "_fit", real_fit)
    # Continuing under other options would be another run.
    assert cli.main(["train", *TINY, "--epochs", "4", "--output", out, "--no-plots", "--resume"]) == 2
    assert cli.main(["train", *TINY, "--epochs", "3", "--output", out, "--no-plots", "--resume"]) == 0
    with open(os.path.join(out, "history.json")) as f:
        record = json.load(f)
    # The whole run: epoch 1 from before the interruption (as recorded then), 2 and 3 after it.
    assert record["epoch"] == [0, 1, 2]
    assert set(record["history"]) == set(first["history"]) and len(record["history"]["val_accuracy"]) == 3
    for key, values in first["history"].items():
        assert record["history"][key][0] == values[0]
    assert 0 <= record["student_accuracy"] <= 1


@pytest.mark.slow
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
    assert cli.main(["evaluate", str(tmp_path / "missing.keras"), "--dataset", "digits"]) == 2  # the command line
    assert "no model at" in capsys.readouterr().err
    empty = str(tmp_path / "tfds")
    os.makedirs(empty)
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", empty, "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err  # a failure: the data is not on this machine
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
    out = capsys.readouterr().out  # 18 convs fused with what follows them up to the next quantizer
    assert "export format 3" in out and "N2UQConv2DFused x18" in out and "N2UQQuantizePack x3" in out
    unfused_path = str(tmp_path / "unfused.tflite")
    assert cli.main(["export", student, "-o", unfused_path, "--no-fuse"]) == 0
    assert "fused:" not in capsys.readouterr().out
    assert cli.main(["inspect", unfused_path]) == 0
    out = capsys.readouterr().out
    assert "export format 2" in out and "N2UQQuantizePack x20" in out and "Fused" not in out
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


def test_export_int8(finished_run, tmp_path, capsys):
    """`export --int8` calibrates on --calibration-batches batches of --dataset images fed through
    the model's own pipeline: the conv builtins become int8, the N2UQ ops are those of the float
    export, and the file computes what `export_tflite(inference_type="int8")` gives with those
    images (test_export.py checks that export against the Keras model). Without --dataset it is a
    usage error that writes nothing."""
    from n2uq_tf.export import export_tflite, inspect_tflite
    student = os.path.join(finished_run, "student.keras")
    path = str(tmp_path / "int8.tflite")
    assert cli.main(["export", student, "-o", path, "--int8"]) == 2
    assert "--int8 needs --dataset" in capsys.readouterr().err
    assert not os.path.exists(path)
    assert cli.main(["export", student, "-o", path, "--int8", "--dataset", "digits",
                     "--calibration-batches", "2"]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    plain_path = str(tmp_path / "float.tflite")
    assert cli.main(["export", student, "-o", plain_path]) == 0
    capsys.readouterr()
    int8, plain = inspect_tflite(path), inspect_tflite(plain_path)
    assert int8.metadata["inference_type"] == "int8" and plain.metadata["inference_type"] == "float"
    n2uq_ops = lambda info: {k: v for k, v in info.op_counts().items() if k.startswith("N2UQ")}  # noqa: E731
    assert n2uq_ops(int8) == n2uq_ops(plain) and n2uq_ops(int8)
    with open(path, "rb") as f:
        assert builtin_input_types(f.read())["CONV_2D"] == {"INT8"}
    # The same images through the library: the pipeline's first two batches of 16.
    model = n2uq_tf.load_model(student)
    batches = [x.numpy() for x, _ in n2uq_tf.data.load_dataset("digits", "train", batch_size=16, image_size=8,
                                                                training=False, channels=3).take(2)]
    assert sum(len(b) for b in batches) == 32

    def images():
        for batch in batches:
            for image in batch:
                yield [image[None]]
    reference = export_tflite(model, inference_type="int8", representative_dataset=images)
    x, _ = n2uq_tf.data.digits_arrays(image_size=8)[1]
    outputs = []
    for source in ({"model_path": path}, {"model_content": reference}):
        interpreter = n2uq_tf.tflite.Interpreter(**source)
        inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(inp["index"], [8, 8, 8, 3])
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x[:8])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(outp["index"]))
    np.testing.assert_array_equal(outputs[0], outputs[1])


# --- data safety ------------------------------------------------------------------------------------

def test_export_never_writes_over_its_input(finished_run, tmp_path, capsys):
    model = str(tmp_path / "m.keras")
    shutil.copy(os.path.join(finished_run, "student.keras"), model)
    os.symlink(model, str(tmp_path / "link.keras"))
    os.makedirs(tmp_path / "sub")
    before = folder_state(tmp_path)
    # The same file by its name, through a link, and by a path with '..' in it.
    for output in (model, str(tmp_path / "link.keras"), str(tmp_path / "sub" / ".." / "m.keras")):
        assert cli.main(["export", model, "-o", output]) == 2, output
        err = capsys.readouterr().err
        assert "refusing to write over an input" in err and "Traceback" not in err
    assert cli.main(["export", model, "-o", str(tmp_path / "sub")]) == 2  # a folder, not a file
    assert "is a folder" in capsys.readouterr().err
    assert folder_state(tmp_path) == before


def test_a_failed_export_leaves_the_old_file_and_no_partial_one(finished_run, tmp_path, monkeypatch, capsys):
    from n2uq_tf import export
    output = tmp_path / "student.tflite"
    output.write_bytes(b"the previous export")

    def failing_export(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"TFL3 half a model")
        raise ValueError("conversion failed half way")

    monkeypatch.setattr(export, "export_tflite", failing_export)
    assert cli.main(["export", os.path.join(finished_run, "student.keras"), "-o", str(output)]) == 2
    assert "conversion failed half way" in capsys.readouterr().err
    assert output.read_bytes() == b"the previous export"
    assert os.listdir(tmp_path) == ["student.tflite"]  # no temporary left behind


class _StopAfterSetUp(Exception):
    """Raised where training would begin: the folder checks and set-up are done by then."""


@pytest.fixture
def stop_before_training(monkeypatch):
    def stop(*args, **kwargs):
        raise _StopAfterSetUp()
    monkeypatch.setattr(recipe, "_fit", stop)


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, stop_before_training):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "history.json").write_text("my own history")
    (out / "report.txt").write_text("my own report")
    (out / "teacher.keras").write_text("not this run's teacher")
    before = folder_state(out)
    assert cli.main(["train", *TINY, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not an n2uq-tf run" in err and "--overwrite" in err and "history.json" in err
    assert cli.main(["train", *TINY, "--output", str(out), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert folder_state(out) == before
    # --overwrite: the run's own names go (the stale teacher is not reused), other files stay.
    (out / "notes.txt").write_text("keep me")
    (out / "backup").mkdir()
    with pytest.raises(_StopAfterSetUp):
        cli.main(["train", *TINY, "--output", str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]
    assert "removed teacher.keras, history.json, report.txt, backup from" in capsys.readouterr().out
    with open(out / "run.json") as f:
        assert json.load(f)["options"]["model"] == "resnet20"
    # Now a run: a new train is refused, --resume accepted.
    assert cli.main(["train", *TINY, "--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(_StopAfterSetUp):
        cli.main(["train", *TINY, "--output", str(out), "--resume"])


def test_train_output_naming_a_file_or_an_input(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run_cli("train", *TINY, "--output", str(afile))
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and afile.read_text() == "x"
    teacher = tmp_path / "run" / "teacher.keras"  # the run would write (or --overwrite remove) its teacher.keras
    teacher.parent.mkdir()
    teacher.write_text("a teacher")
    result = run_cli("train", *TINY, "--output", str(tmp_path / "run"), "--teacher", str(teacher), "--overwrite")
    assert result.returncode == 2 and "refusing to write over an input" in result.stderr
    assert teacher.read_text() == "a teacher"


def test_interrupt_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "n2uq-tf train: interrupted (continue it with --resume)"


# --- a user's own model against the built-in pipeline -------------------------------------------------

def _user_model(path, input_shape, first=None, classes=10):
    keras.utils.set_random_seed(1)
    inputs = keras.Input(input_shape)
    x = first(inputs) if first is not None else inputs
    if len(input_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(x))
    outputs = keras.layers.Dense(classes)(x)
    model = keras.Model(inputs, outputs)
    model.save(path)
    return model


def _top1(model, x, y):
    return f"top-1 {100 * np.mean(np.argmax(model.predict(x, verbose=0), -1) == y):.2f}%"


def test_evaluate_a_gray_model_and_a_model_that_scales_its_input(tmp_path, capsys):
    raw, labels = n2uq_tf.data.datasets._digits_raw()[1]  # digits test split, pixel / 16, 8x8x1
    # A 1-channel model: fed gray digits at its size (the model's channels and size are the defaults).
    gray = _user_model(str(tmp_path / "gray.keras"), (8, 8, 1))
    assert cli.main(["evaluate", str(tmp_path / "gray.keras"), "--dataset", "digits"]) == 0
    normalised = (raw - n2uq_tf.data.DIGITS_MEAN[0]) / n2uq_tf.data.DIGITS_STD[0]
    assert _top1(gray, normalised, labels) in capsys.readouterr().out
    assert cli.main(["evaluate", str(tmp_path / "gray.keras"), "--dataset", "digits", "--channels", "3"]) == 2
    err = capsys.readouterr().err
    assert "1-channel images, not 3-channel" in err and "--channels 1" in err and "Traceback" not in err
    # A model that scales 0-255 pixels itself: said so, and evaluated on pixels when asked.
    scaled = _user_model(str(tmp_path / "scaled.keras"), (8, 8, 3), first=keras.layers.Rescaling(1 / 255))
    assert cli.main(["evaluate", str(tmp_path / "scaled.keras"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "'rescaling' (Rescaling)" in err and "--normalization pixels" in err
    assert cli.main(["evaluate", str(tmp_path / "scaled.keras"), "--dataset", "digits",
                     "--normalization", "pixels"]) == 0
    assert _top1(scaled, np.repeat(raw * 255, 3, axis=-1), labels) in capsys.readouterr().out


def test_models_the_pipeline_cannot_feed_are_named(tmp_path, capsys):
    _user_model(str(tmp_path / "flat.keras"), (64,))
    assert cli.main(["evaluate", str(tmp_path / "flat.keras"), "--dataset", "digits"]) == 2
    assert "takes inputs of shape (None, 64), not images" in capsys.readouterr().err
    _user_model(str(tmp_path / "five.keras"), (8, 8, 3), classes=5)
    assert cli.main(["evaluate", str(tmp_path / "five.keras"), "--dataset", "digits"]) == 2
    assert "5 classes at its output, fewer than digits's 10" in capsys.readouterr().err
    _user_model(str(tmp_path / "gray.keras"), (8, 8, 1))
    assert cli.main(["evaluate", str(tmp_path / "gray.keras"), "--dataset", "digits", "--image-size", "16"]) == 2
    assert "8x8 images, not 16x16" in capsys.readouterr().err


def test_train_with_a_teacher_that_takes_other_images(tmp_path):
    teacher = str(tmp_path / "teacher.keras")
    _user_model(teacher, (8, 8, 1))
    out = tmp_path / "run"
    result = run_cli("train", "--model", "resnet20", "--width", "4", "--teacher", teacher, "--output", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for words in ("8x8 images, not 32x32", "1-channel images, not 3-channel", "--image-size 8", "--channels 1"):
        assert words in result.stderr, words
    assert not out.exists()  # refused before anything was written


# --- one error path: expected errors are one line with their exit status ------------------------------

def test_tensorboard_without_the_package_is_a_failure_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed (an extra)
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--output", str(out), "--tensorboard"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("n2uq-tf train: error: --tensorboard needs the tensorboard package: "
                           "pip install 'n2uq_tf[tensorboard]'")
    assert not out.exists()


def test_a_missing_optional_package_is_a_failure_not_a_traceback(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.ticker", None)  # matplotlib (the plots extra) not installed
    assert cli.main(["report", os.path.join(finished_run, "student.keras"), "--plots", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "n2uq-tf report: error: n2uq_tf.plots needs matplotlib: pip install matplotlib" in err
    assert "Traceback" not in err


def test_choices_come_from_the_library(capsys):
    from n2uq_tf import data, distribute, models, ops, tflite
    from n2uq_tf.quantize import method_table
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    choices = {(name, action.dest): tuple(action.choices) for name, sub in commands.items()
               for action in sub._actions if action.choices is not None}
    assert choices[("train", "model")] == tuple(sorted(models.MODELS))
    assert choices[("train", "dataset")] == choices[("evaluate", "dataset")] == tuple(sorted(data.DATASETS))
    assert choices[("report", "dataset")] == choices[("export", "dataset")] == tuple(sorted(data.DATASETS))
    bits = tuple(range(ops.MIN_BITS, ops.MAX_BITS + 1))
    for option in ("bits", "weight_bits", "activation_bits"):
        assert choices[("train", option)] == bits
    assert choices[("train", "method")] == tuple(method_table.METHODS)
    assert choices[("train", "weight_method")] == method_table.WEIGHT_METHODS
    assert choices[("train", "activation_method")] == method_table.ACTIVATION_METHODS
    assert choices[("train", "compression")] == tuple(distribute.COMPRESSORS)
    assert choices[("train", "compression_bits")] == distribute.SUPPORTED_BITS
    assert choices[("train", "channels")] == data.CHANNELS
    assert choices[("train", "normalization")] == data.NORMALIZATIONS
    assert choices[("benchmark", "backend")] == tflite.BACKENDS
    assert choices[("benchmark", "isa")] == tflite._core.ISAS


def test_the_native_build_message_reaches_the_command_s_stderr(tmp_path, monkeypatch, capsys):
    import logging

    from n2uq_tf import _native
    package = logging.getLogger("n2uq_tf")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a process that configured no logging (pytest does)
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    cli._show_library_messages()
    fake_compiler = [sys.executable, "-c", "import sys; open(sys.argv[1], 'wb').close()"]
    path = _native.build_library("n2uq_test_lib.so", lambda output: fake_compiler + [output], "a test library",
                                 stale_prefix="n2uq_test_", directories=[str(tmp_path)])
    assert path == str(tmp_path / "n2uq_test_lib.so") and os.path.exists(path)
    assert capsys.readouterr().err == f"n2uq_tf: building a test library (once) into {tmp_path}\n"
