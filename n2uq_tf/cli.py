"""The `n2uq-tf` command: train, evaluate, report, export, inspect and benchmark N2UQ models.

    n2uq-tf train --model resnet20 --dataset digits --bits 2 --epochs 10 --output runs/digits
    n2uq-tf evaluate runs/digits/student.keras --dataset digits
    n2uq-tf report runs/digits/student.keras --plots runs/digits/plots --dataset digits

`train` runs the paper's recipe, `n2uq_tf.recipe.train_n2uq` (docs/design.md, section 1): a float
teacher (trained here, or any saved float Keras model), a quantized student initialised from the
float weights, pure distillation with Adam, quantizer parameters at lr/10 and a linear per-epoch
decay. Around it the command keeps a run folder: every epoch is checkpointed, so an interrupted
run continues with `--resume`.

Nothing is lost by a command: no command writes over one of its inputs, every model, history and
report appears whole or not at all (n2uq_tf._io), and `train` writes only into a new or empty
folder, a run it continues (--resume) or one it is told to start again (--overwrite).
Expected errors (`CLIError`, and the library errors `_expected_errors` lists) are one line on
stderr, no traceback: exit status 2 for a command line that asks for something wrong or unsafe
(`UsageError`, as argparse's own errors), 1 for a failure (missing data or package, a full disk).
"""

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import textwrap

from n2uq_tf._io import atomic_open, atomic_path, same_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class CLIError(Exception):
    """The one error type of the commands: an expected failure, reported as one line on stderr with
    no traceback and exit status `exit_code` (1: a failure; `UsageError`: 2). Library errors that
    are about the user's input or machine are reported the same way (`_expected_errors`)."""

    exit_code = 1


class UsageError(CLIError):
    """The command line asks for something wrong or unsafe: exit status 2, as argparse's errors."""

    exit_code = 2


DESCRIPTION = ("N2UQ quantization-aware training for tf_keras: train, evaluate and report models, "
               "export them to TFLite with bit-packed ops, inspect and benchmark the result.")

EPILOG = textwrap.dedent("""\
    Examples:
      n2uq-tf train --model resnet20 --dataset digits --bits 2 --epochs 10 --output runs/digits
      n2uq-tf train --model resnet18 --dataset imagenet2012 --manual-dir ~/imagenet --bits 2 \\
          --teacher teacher.keras --epochs 128 --batch-size 256 --output runs/r18w2a2
      n2uq-tf evaluate runs/digits/student.keras --dataset digits
      n2uq-tf report runs/digits/student.keras --plots runs/digits/plots --dataset digits
      n2uq-tf export runs/digits/student.keras -o student.tflite
      n2uq-tf inspect student.tflite
      n2uq-tf benchmark student.tflite --threads 2
      n2uq-tf launch --workers 2 -- python my_train.py --epochs 3

    Run `n2uq-tf COMMAND --help` for the options of one command.""")


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_data_arguments(parser, default_dataset=None, training=False):
    from n2uq_tf import data
    parser.add_argument("--dataset", default=default_dataset, required=default_dataset is None,
                        choices=sorted(data.DATASETS),
                        help="dataset name; 'digits' ships with scikit-learn and needs no download"
                             + (f" (default {default_dataset})" if default_dataset else ""))
    parser.add_argument("--data-dir", help="TFDS data folder (default ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder holding the ILSVRC2012 tar files (imagenet2012 only)")
    parser.add_argument("--download", action="store_true",
                        help="let TFDS download and prepare the dataset if it is missing (needs network)")
    _add_input_arguments(parser, training)
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="batch size (default 256 as in the paper, 64 for digits)")


def _add_input_arguments(parser, training=False):
    """What the pipeline feeds the model: image size, channels, normalisation."""
    from n2uq_tf import data
    default_size, default_channels = ("the dataset's", "3") if training else ("the model's", "the model's")
    parser.add_argument("--image-size", type=_positive_int, help=f"input resolution (default: {default_size})")
    parser.add_argument("--channels", type=int, choices=data.CHANNELS,
                        help=f"image channels: 3 (RGB; gray images repeated) or 1 (gray; RGB as luma) "
                             f"(default: {default_channels})")
    parser.add_argument("--normalization", choices=data.NORMALIZATIONS,
                        help="'dataset' (default): (image - mean) / std with the dataset's statistics; 'unit': "
                             "values in [0, 1]; 'pixels': values in [0, 255], for models that scale their "
                             "input themselves (a Rescaling or Normalization layer first)")


def build_parser():
    from n2uq_tf import data, distribute, models
    from n2uq_tf.quantization_math import n2uq
    from n2uq_tf.quantize.method_table import ACTIVATION_METHODS, METHODS, WEIGHT_METHODS
    from n2uq_tf.tflite import BACKENDS, _core
    bits = tuple(range(n2uq.MIN_BITS, n2uq.MAX_BITS + 1))
    parser = argparse.ArgumentParser(prog="n2uq-tf", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser(
        "train", help="distil a quantized student from a float teacher (the paper's recipe)",
        description=textwrap.dedent("""\
            Train a quantized N2UQ student by distillation from a float teacher.

            1. Teacher: --teacher PATH loads any saved float Keras model whose input is this
               dataset's normalised images; without it, the float twin of --model is trained
               here for --teacher-epochs and saved as OUTPUT/teacher.keras.
            2. Student: --model quantized at --bits, initialised from the float weights
               (the teacher's when it is the float twin, or --init PATH).
            3. Distillation: soft cross-entropy to the teacher (temperature 1, no label term
               by default), Adam (eps 1e-8), quantizer parameters at lr/10, lr decayed
               linearly per epoch to 0, as in the official N2UQ code.
            Outputs in --output: student.keras, teacher.keras, history.json (every epoch so far,
            kept whole across --resume), report.txt and plots/*.png; checkpoints in OUTPUT/backup.
            OUTPUT/run.json marks the folder as a run (its options): a new run needs a new or empty
            folder; continue an interrupted run with --resume (same options), or start it again
            with --overwrite (removes the run's files listed above, nothing else)."""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--model", default="resnet20", choices=sorted(models.MODELS),
                       help="network from n2uq_tf.models (default resnet20)")
    train.add_argument("--width", type=_positive_int, help="base width of resnet20 (default 16)")
    _add_data_arguments(train, default_dataset="digits", training=True)
    train.add_argument("--bits", type=int, default=2, choices=bits, metavar="BITS",
                       help=f"weight and activation bits, {bits[0]} to {bits[-1]} (default 2)")
    train.add_argument("--weight-bits", type=int, choices=bits, metavar="BITS", help="weight bits, overriding --bits")
    train.add_argument("--activation-bits", type=int, choices=bits, metavar="BITS",
                       help="activation bits, overriding --bits")
    train.add_argument("--float-downsample", action="store_true",
                       help="keep residual downsample convs float (the paper's N2UQ* variant)")
    train.add_argument("--frozen-thresholds", action="store_true",
                       help="freeze thresholds at uniform: the paper's STE baseline")
    train.add_argument("--method", choices=tuple(METHODS),
                       help="quantizer of weights and activations (default n2uq; see the README's quantization "
                            "methods)")
    train.add_argument("--weight-method", choices=WEIGHT_METHODS, help="weight quantizer, overriding --method")
    train.add_argument("--activation-method", choices=ACTIVATION_METHODS,
                       help="activation quantizer, overriding --method")
    train.add_argument("--epochs", type=_positive_int, default=128, help="student epochs (default 128)")
    train.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default 1.25e-3 scaled by batch size / 256)")
    train.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    train.add_argument("--alpha", type=float, default=0.0,
                       help="weight of the label loss; 0 is pure distillation as in the paper")
    train.add_argument("--teacher", help="saved float Keras model to distil from (.keras, .h5, SavedModel)")
    train.add_argument("--teacher-epochs", type=_positive_int, default=30,
                       help="epochs for training the float teacher here when --teacher is not given")
    train.add_argument("--teacher-lr", type=float,
                       help="peak learning rate of the teacher trained here (default 4x --lr), linear decay")
    train.add_argument("--init", help="float weights to initialise the student from (a saved float twin)")
    train.add_argument("--steps-per-epoch", type=_positive_int,
                       help="cap the steps of each epoch (quick trials)")
    train.add_argument("--output", default="runs/n2uq", help="output folder (default runs/n2uq)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in OUTPUT from its checkpoints (same options)")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in a folder that holds a run or other files: removes the run's "
                            "own files there first (other files stay)")
    train.add_argument("--tensorboard", action="store_true",
                       help="log losses, thresholds and betas to OUTPUT/tensorboard")
    train.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
    train.add_argument("--mirrored", action="store_true",
                       help="train data-parallel on every local GPU (or logical CPU device) with "
                            "tf.distribute.MirroredStrategy")
    train.add_argument("--compression", default="none", choices=tuple(distribute.COMPRESSORS),
                       help="compress the gradient exchange between replicas (n2uq_tf.distribute); "
                            "with TF_CONFIG set (e.g. by `n2uq-tf launch`) training is multi-worker")
    train.add_argument("--compression-bits", type=int, default=4, choices=distribute.SUPPORTED_BITS,
                       help="bits per gradient value, sign included (default 4)")
    train.add_argument("--bucket-size", type=_positive_int,
                       help="gradient values per norm (default 8192; 128 at 2 bits)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    evaluate = commands.add_parser("evaluate", help="accuracy of a saved model (float or quantized)",
                                   description="Top-1 and top-5 accuracy of a saved model on a dataset split.")
    evaluate.add_argument("model_path", metavar="MODEL", help="saved model (.keras, .h5 or SavedModel folder)")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--split", help="split to evaluate (default: the dataset's test/validation split)")
    evaluate.add_argument("--steps", type=_positive_int, help="evaluate only this many batches")

    report = commands.add_parser("report", help="bits, thresholds and size per layer of a quantized model",
                                 description="Print the quantization report of a saved quantized model; "
                                             "with --plots also draw thresholds over activation "
                                             "histograms (needs --dataset) and weight-level histograms.")
    report.add_argument("model_path", metavar="MODEL", help="saved quantized model")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--plots", metavar="DIR", help="write thresholds.png and weight_levels.png here")
    report.add_argument("--dataset", choices=sorted(data.DATASETS),
                        help="dataset for the activation histograms of --plots")
    report.add_argument("--data-dir", help="TFDS data folder")
    _add_input_arguments(report)
    export = commands.add_parser(
        "export", help="convert a quantized model to TFLite with bit-packed N2UQ ops",
        description="Convert a saved quantized model to a .tflite file: each quantized conv/dense layer "
                    "becomes an N2UQ quantize-and-pack op and a bit-serial conv/FC op (weights stored at "
                    "their bit width, BatchNorm folded), the rest TFLite builtins (float, or int8 with "
                    "--int8). Run it with `n2uq-tf benchmark` or n2uq_tf.tflite.Interpreter.")
    export.add_argument("model_path", metavar="MODEL", help="saved quantized model (.keras, .h5 or SavedModel)")
    export.add_argument("--output", "-o", help="the .tflite to write (default: MODEL with .tflite)")
    export.add_argument("--int8", action="store_true",
                        help="convolution and fully connected builtins int8, calibrated on --dataset (elementwise "
                             "builtins stay float32; the N2UQ ops are the same either way)")
    export.add_argument("--dataset", choices=sorted(data.DATASETS), help="calibration images for --int8")
    export.add_argument("--data-dir", help="TFDS data folder")
    export.add_argument("--calibration-batches", type=_positive_int, default=8,
                        help="batches of 16 images for --int8 calibration (default 8)")
    export.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="keep the float ops between a layer and the next quantizer as separate builtins "
                             "(default: fused into the layer's op, export format 3; without fused ops a file is "
                             "format 2)")
    _add_input_arguments(export)

    inspect_cmd = commands.add_parser(
        "inspect", help="ops, custom-op options, bits and bytes per layer of a .tflite model",
        description="List a .tflite model's operators with the N2UQ ops' options, the bits and bytes of "
                    "every quantized layer, and the file size against packed weights + float remainder.")
    inspect_cmd.add_argument("model_path", metavar="MODEL", help=".tflite file")
    inspect_cmd.add_argument("--json", action="store_true", help="print as JSON")

    bench = commands.add_parser(
        "benchmark", help="latency of a .tflite model with the N2UQ delegate, per-op breakdown",
        description="Time a .tflite model in a stock TFLite interpreter with the N2UQ delegate attached "
                    "(random inputs, warm-up excluded) and break the time down per N2UQ kernel. A model "
                    "with N2UQ ops cannot run without the delegate: pass --float-model to time a float "
                    "or int8 twin beside it.")
    bench.add_argument("model_path", metavar="MODEL", help=".tflite file")
    bench.add_argument("--threads", type=_positive_int, default=1, help="interpreter threads (default 1)")
    bench.add_argument("--runs", type=_positive_int, default=50, help="timed invocations (default 50)")
    bench.add_argument("--warmup", type=int, default=None,
                       help="untimed invocations first (default: the kernels' plan trial length + 5, so that "
                            "every layer has settled on its path)")
    bench.add_argument("--float-model", help="a .tflite without N2UQ ops to time without the delegate")
    bench.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="ai_edge_litert or tf.lite interpreter (default: litert when installed)")
    bench.add_argument("--isa", choices=_core.ISAS, default=None,
                       help="force a kernel instruction-set path (default: the fastest this CPU has)")

    launch = commands.add_parser(
        "launch", help="run a training command as N local MultiWorkerMirroredStrategy workers",
        description=textwrap.dedent("""\
            Run a command as N local tf.distribute.MultiWorkerMirroredStrategy workers, for a quick
            multi-worker run on one machine before going to a cluster. Each worker gets its own
            TF_CONFIG (127.0.0.1, free ports) and N2UQ_WORKER_INDEX / N2UQ_NUM_WORKERS; output lines
            are prefixed [worker i]. If one worker fails the others are stopped and its exit status
            is returned. Worker 0 is the chief: only it should write files
            (n2uq_tf.distribute.is_chief()).

              n2uq-tf launch -n 2 -- python my_train.py --epochs 3"""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from n2uq_tf.distribute.launch import add_launch_arguments
    add_launch_arguments(launch)
    return parser


# ---------------------------------------------------------------------------------------------

def _verbose():
    return 1 if sys.stdout.isatty() else 2  # progress bar on a terminal, one line per epoch in logs


def load_any_model(path):
    """A float or quantized model saved in any Keras format (teachers are float), with clear errors."""
    import n2uq_tf
    return n2uq_tf.load_model(path, compile=False, require_quantized=False)


def _eval_split(info):
    for name in ("test", "validation", "val"):
        if name in info.splits:
            return name
    return next(s for s in info.splits if not s.startswith("train"))


def _dataset(args, split, batch_size, training, seed=None):
    from n2uq_tf import data
    return data.load_dataset(args.dataset, split, batch_size=batch_size, image_size=args.image_size,
                             data_dir=args.data_dir, manual_dir=getattr(args, "manual_dir", None),
                             download=getattr(args, "download", False), training=training, seed=seed,
                             channels=args.channels or 3, normalization=args.normalization or "dataset")


# --- paths: never write over an input; outputs where a file or a folder is expected ---------------

def _refuse_overwriting_inputs(outputs, inputs):
    """UsageError when an output names the same file or folder as an input (real paths: links, '..')."""
    for output_name, output in outputs:
        for input_name, path in inputs:
            if output and path and same_file(output, path):
                raise UsageError(f"{output_name} {output!r} is the {input_name} {path!r}: refusing to write over an "
                                 "input; choose another output")


def _require_file_output(path, option):
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give the file to write")


def _require_folder_output(path, option):
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a file, not a folder; give a folder (a new one is created)")


# --- the model's input against the built-in pipeline ------------------------------------------------

def _self_scaling_layer(model):
    """The Rescaling or Normalization layer a model begins with (it scales its own input), or None."""
    from n2uq_tf._keras import keras
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        return None
    first = layers[0]
    if isinstance(first, (keras.layers.Rescaling, keras.layers.Normalization)):
        return first
    return _self_scaling_layer(first) if isinstance(first, keras.Model) else None


def _match_pipeline(model, args, name, fill):
    """Checks that `model` takes what the dataset pipeline will feed it, else a UsageError naming each
    mismatch and the options that fix it. fill: unset --image-size / --channels follow the model
    (evaluate, report, export serve a given model); otherwise they are the run's (train's teacher).
    Sets args.image_size, args.channels and args.normalization to what will be fed."""
    from n2uq_tf import data
    info = data.dataset_info(args.dataset)
    shape, outputs = model.input_shape, model.output_shape
    if isinstance(shape, list) or isinstance(outputs, list):
        raise UsageError(f"{name} has {len(shape) if isinstance(shape, list) else 1} input(s) and "
                         f"{len(outputs) if isinstance(outputs, list) else 1} output(s); the built-in pipeline "
                         "feeds one image input and reads one class output. Use it from Python with your own data "
                         "(n2uq_tf.load_model, then evaluate / fit).")
    if len(shape) != 4:
        raise UsageError(f"{name} takes inputs of shape {tuple(shape)}, not images (batch, height, width, "
                         f"channels), which is what the {args.dataset} pipeline feeds. Use it from Python with "
                         "your own data (n2uq_tf.load_model, then evaluate / fit).")
    _, height, width, channels = shape
    mismatches, fixes = [], []
    if height and width:
        if args.image_size is None and fill:
            args.image_size = height if height == width else (height, width)
        fed = data.preprocess.image_hw(args.image_size or info.image_size)
        if fed != (height, width):
            mismatches.append(f"{height}x{width} images, not {fed[0]}x{fed[1]}")
            if fill:  # the user's --image-size contradicts the model
                fixes.append("no --image-size (the model's own size is the default)")
            else:
                fixes.append(f"--image-size {height}" if height == width else
                             "a model with square input (the built-in students are square)")
    if channels not in data.CHANNELS:
        raise UsageError(f"{name} takes {channels}-channel images; the built-in pipeline gives "
                         f"{' or '.join(map(str, data.CHANNELS))} channels")
    if args.channels is None and fill:
        args.channels = channels
    fed_channels = args.channels or 3
    if fed_channels != channels:
        mismatches.append(f"{channels}-channel images, not {fed_channels}-channel ones")
        fixes.append(f"--channels {channels}")
    scaling = _self_scaling_layer(model)
    if scaling is not None and args.normalization is None:
        mismatches.append(f"unnormalised images: its first layer {scaling.name!r} ({type(scaling).__name__}) "
                          f"scales them itself, while the pipeline normalises with the {args.dataset} mean/std")
        fixes.append("--normalization pixels (values 0-255) or --normalization unit (0-1), whichever the "
                     "layer expects (--normalization dataset feeds normalised images anyway)")
    args.normalization = args.normalization or "dataset"
    classes = outputs[-1]
    if classes is not None and classes < info.num_classes:
        mismatches.append(f"{classes} classes at its output, fewer than {args.dataset}'s {info.num_classes}")
        fixes.append("a model with a class per label")
    if mismatches:
        raise UsageError(f"{name} does not take what the {args.dataset} pipeline gives: it takes "
                         + "; ".join(mismatches) + ". Pass " + ", ".join(fixes) + ".")


# --- a training run's folder ----------------------------------------------------------------------

# OUTPUT/run.json marks a folder as a run and records the options that define it.
RUN_MARKER = "run.json"
# Everything `train` writes in its folder: what --overwrite removes, and nothing else.
RUN_FILES = (RUN_MARKER, "student.keras", "teacher.keras", "history.json", "report.txt", "backup", "teacher_backup",
             "plots", "tensorboard")
# The options that define a run: --resume continues a run only under the same ones.
RUN_OPTIONS = ("model", "width", "dataset", "image_size", "channels", "normalization", "batch_size", "bits",
               "weight_bits", "activation_bits", "float_downsample", "frozen_thresholds", "method", "weight_method",
               "activation_method", "epochs", "lr", "temperature", "alpha", "teacher", "teacher_epochs",
               "teacher_lr", "init", "steps_per_epoch", "compression", "compression_bits", "bucket_size", "seed")
_PATH_OPTIONS = ("teacher", "init")
_RUN_OPTION_DEFAULTS = {"channels": 3, "normalization": "dataset"}  # not given = these, for train


def _run_options(args):
    """The run-defining options' effective values (paths absolute)."""
    options = {}
    for name in RUN_OPTIONS:
        value = getattr(args, name)
        if value is None:
            value = _RUN_OPTION_DEFAULTS.get(name)
        options[name] = os.path.abspath(value) if name in _PATH_OPTIONS and value else value
    return options


def _option_text(name, value):
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"no {flag}" if value in (None, False) else f"{flag} {value}"


def _check_run_folder(args):
    """Checks --output, --resume and --overwrite against the folder's state and the inputs; writes nothing."""
    output = args.output
    _require_folder_output(output, "--output")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again: pass one of them")
    run_paths = {name: os.path.join(output, name) for name in RUN_FILES}
    inputs = [(f"--{name}", getattr(args, name)) for name in _PATH_OPTIONS]
    _refuse_overwriting_inputs([("--output", output)] + [("the run's", path) for path in run_paths.values()],
                               inputs)
    marker = run_paths[RUN_MARKER]
    if args.resume:
        if not os.path.isfile(marker):
            raise UsageError(f"{output!r} holds no run to resume (no {RUN_MARKER}, which `n2uq-tf train` writes "
                             "when a run starts)")
        if os.path.exists(run_paths["student.keras"]):  # written only when the run completes
            student = run_paths["student.keras"]
            raise UsageError(f"the run in {output!r} has finished ({student}); evaluate it with "
                             f"`n2uq-tf evaluate {student} --dataset {args.dataset}`, or start it again with "
                             "--overwrite")
        with open(marker) as f:
            recorded = json.load(f).get("options", {})
        current = _run_options(args)
        differ = [name for name in RUN_OPTIONS if name in recorded and recorded[name] != current[name]]
        if differ:
            raise UsageError(f"the run in {output!r} was started with "
                             + ", ".join(_option_text(n, recorded[n]) for n in differ) + "; this command has "
                             + ", ".join(_option_text(n, current[n]) for n in differ)
                             + ". Resume it with the options it was started with")
        return
    if os.path.isfile(marker) and not args.overwrite:
        raise UsageError(f"{output!r} already holds a run ({marker}); pass --resume to continue it, --overwrite to "
                         "start it again, or choose another --output")
    # Other workers' folders (OUTPUT/.workerN, made by them at any time) are not the chief's concern.
    entries = [e for e in os.listdir(output) if not e.startswith(".worker")] if os.path.isdir(output) else []
    if entries and not args.overwrite:
        collide = [name for name in RUN_FILES if name in entries]
        raise UsageError(f"{output!r} is not empty and is not an n2uq-tf run (no {RUN_MARKER})"
                         + (f"; a run would write over {', '.join(collide)} there" if collide else "")
                         + ". Choose a new or empty folder, or pass --overwrite to write the run there "
                         "(it removes the run's own files first: " + ", ".join(RUN_FILES) + ")")


def _start_run_folder(args):
    """A new run (not --resume): clears the run's files under --overwrite and writes the marker."""
    if args.resume:
        return
    removed = []
    for name in RUN_FILES:
        path = os.path.join(args.output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(name)
        elif os.path.lexists(path):
            os.remove(path)
            removed.append(name)
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {args.output}")
    os.makedirs(args.output, exist_ok=True)
    with atomic_open(os.path.join(args.output, RUN_MARKER)) as f:
        json.dump({"n2uq_tf_run": 1, "options": _run_options(args)}, f, indent=1)


def _read_history(path):
    """{epoch: {metric: value}} from a history.json (empty when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        record = json.load(f)
    history = record.get("history", {})
    epochs = record.get("epoch") or list(range(len(next(iter(history.values()), []))))
    return {int(e): {k: v[i] for k, v in history.items() if i < len(v)} for i, e in enumerate(epochs)}


def _write_history(path, epochs, **extra):
    """history.json: every epoch's metrics so far, in epoch order (epoch numbers from 0, as Keras'
    History.epoch), plus `extra` (the final accuracies)."""
    order = sorted(epochs)
    keys = list(dict.fromkeys(k for e in order for k in epochs[e]))
    record = {"epoch": order, "history": {k: [epochs[e].get(k) for e in order] for k in keys}, **extra}
    with atomic_open(path) as f:
        json.dump(record, f, indent=1)


def _history_file_callback(path):
    """A callback keeping OUTPUT/history.json whole: every finished epoch is written at once, and a
    resumed run adds to the epochs recorded before the interruption (Keras' History holds only the
    epochs of one fit call)."""
    from n2uq_tf._keras import keras

    class HistoryFile(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = _read_history(path)

        def on_epoch_end(self, epoch, logs=None):
            # An epoch run again after an interruption replaces its record and any later one.
            self.epochs = {e: m for e, m in self.epochs.items() if e < epoch}
            self.epochs[epoch] = {k: float(v) for k, v in (logs or {}).items()}
            _write_history(path, self.epochs)

    return HistoryFile()


# --- the commands ----------------------------------------------------------------------------------

def _model_kwargs(builder, **kwargs):
    accepted = inspect.signature(builder).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in accepted}


def _build(args, num_classes, image_size, bits):
    from n2uq_tf import models
    builder = models.MODELS[args.model]
    kwargs = _model_kwargs(builder, num_classes=num_classes, input_shape=(image_size, image_size, args.channels or 3),
                           width=args.width, quantize_downsample=not args.float_downsample)
    if bits is not None:
        kwargs.update(_model_kwargs(builder, weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                                    method=args.method, weight_method=args.weight_method,
                                    activation_method=args.activation_method,
                                    learn_thresholds=False if args.frozen_thresholds else None))
    if args.frozen_thresholds and bits is not None and "learn_thresholds" not in kwargs:
        raise UsageError(f"--frozen-thresholds is not supported by model {args.model}")
    return builder(bits, **kwargs)


def _steps(args, info, split, batch_size):
    steps = info.splits[split] // batch_size  # training drops the last partial batch
    return min(steps, args.steps_per_epoch) if args.steps_per_epoch else steps


def _gradient_compression(args):
    """--compression as a GradientCompression (None for none); checked before anything is written."""
    if args.compression == "none":
        return None
    from n2uq_tf.distribute import GradientCompression
    return GradientCompression(args.compression, args.compression_bits, args.bucket_size, args.seed)


def _require_tensorboard():
    """keras' TensorBoard callback needs the tensorboard package (an extra: TensorFlow no longer installs it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise CLIError("--tensorboard needs the tensorboard package: pip install 'n2uq_tf[tensorboard]'") from None


def _train_strategy(args, batch_size):
    import tensorflow as tf
    if os.environ.get("TF_CONFIG"):
        if args.mirrored:
            raise UsageError("--mirrored and TF_CONFIG (multi-worker) exclude each other")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        print(f"MultiWorkerMirroredStrategy: {strategy.num_replicas_in_sync} replicas "
              f"(batch {batch_size} is global)")
        return strategy
    if args.mirrored:
        strategy = tf.distribute.MirroredStrategy()
        print(f"MirroredStrategy over {strategy.num_replicas_in_sync} devices (batch {batch_size} is global)")
        return strategy
    return tf.distribute.get_strategy()


def command_train(args):
    from n2uq_tf import data, recipe
    from n2uq_tf._keras import keras

    info = data.dataset_info(args.dataset)
    batch_size = args.batch_size or (64 if args.dataset == "digits" else 256)
    eval_split = _eval_split(info)
    strategy = _train_strategy(args, batch_size)  # first: MultiWorkerMirroredStrategy must precede other TF work
    from n2uq_tf.distribute import launch as workers
    if workers.num_workers() > 1 and not workers.is_chief():
        # Every worker trains in step with the chief; only the chief writes the run's folder.
        _require_folder_output(args.output, "--output")
        args.output = os.path.join(args.output, f".worker{workers.worker_index()}")
        args.no_plots = True
    _check_run_folder(args)
    compression = _gradient_compression(args)
    if args.tensorboard:
        _require_tensorboard()
    backup = os.path.join(args.output, "backup")
    student_path = os.path.join(args.output, "student.keras")
    teacher_path = os.path.join(args.output, "teacher.keras")
    history_path = os.path.join(args.output, "history.json")

    with strategy.scope():  # variables of the teacher, student and optimizer are mirrored
        teacher = None
        if args.teacher:  # checked before anything is written: it must take this run's images
            teacher = load_any_model(args.teacher)
            _match_pipeline(teacher, args, f"--teacher {args.teacher}", fill=False)
            print(f"teacher: {args.teacher}")
        elif args.resume and os.path.exists(teacher_path):  # trained earlier in this run, never a stale one
            teacher = load_any_model(teacher_path)
            print(f"teacher: {teacher_path} (trained earlier in this run)")
    args.channels = args.channels or 3
    args.normalization = args.normalization or "dataset"
    image_size = args.image_size or info.image_size
    keras.utils.set_random_seed(args.seed)
    train_ds = _dataset(args, "train", batch_size, True, seed=args.seed)  # a missing dataset fails here,
    val_ds = _dataset(args, eval_split, batch_size, False)  # before the folder becomes a run
    if args.steps_per_epoch:
        train_ds = train_ds.repeat()  # a capped epoch continues where the last one stopped
    _start_run_folder(args)
    steps = _steps(args, info, "train", batch_size)
    lr = args.lr if args.lr is not None else 1.25e-3 * batch_size / 256
    print(f"n2uq-tf train: {args.model} on {args.dataset} ({info.splits['train']} images, "
          f"{image_size}x{image_size}x{args.channels}), {steps} steps/epoch of {batch_size}, lr {lr:g}")

    with strategy.scope():
        trained_here = teacher is None
        if trained_here:  # the float twin, trained by the recipe
            teacher = _build(args, info.num_classes, image_size, None)
        student = _build(args, info.num_classes, image_size, args.bits)
    print(f"student: {args.model} W{args.weight_bits or args.bits}A{args.activation_bits or args.bits}")
    if compression is not None:
        from n2uq_tf import distribute
        size = distribute.exchange_size(student.trainable_variables, compression)
        print(f"gradient exchange: {args.compression} {args.compression_bits}-bit, {size.bytes:,} B/step per "
              f"replica ({size.ratio:.2f}x less than float32's {size.float32_bytes:,})")
    # The history file first: an epoch recorded there but not yet checkpointed is run again and
    # its record replaced, while the other order could lose an epoch's record.
    history = _history_file_callback(history_path)
    callbacks = [history, keras.callbacks.BackupAndRestore(backup)]
    if args.tensorboard:
        from n2uq_tf.training.callbacks import QuantizerTensorBoard
        log_dir = os.path.join(args.output, "tensorboard")
        callbacks += [keras.callbacks.TensorBoard(log_dir), QuantizerTensorBoard(log_dir)]
    result = recipe.train_n2uq(
        student, train_ds, val_ds, teacher=teacher, epochs=args.epochs, steps_per_epoch=steps, learning_rate=lr,
        teacher_epochs=args.teacher_epochs if trained_here else 0, teacher_learning_rate=args.teacher_lr,
        # A given teacher of another architecture is no float twin: the student then starts from scratch.
        init_from=args.init or recipe.TEACHER, init_optional=bool(args.teacher and not args.init),
        temperature=args.temperature, alpha=args.alpha, validation_data=val_ds, callbacks=callbacks,
        teacher_callbacks=[keras.callbacks.BackupAndRestore(os.path.join(args.output, "teacher_backup"))],
        teacher_path=teacher_path, student_path=student_path,
        plots_dir=None if args.no_plots else os.path.join(args.output, "plots"), plot_batches=4,
        gradient_compression=compression, strategy=strategy, verbose=_verbose(), log=print)
    with atomic_open(os.path.join(args.output, "report.txt")) as f:
        f.write(str(result.report) + "\n")
    _write_history(history_path, history.epochs, teacher_accuracy=result.teacher_accuracy,
                   student_accuracy=result.student_accuracy)
    if workers.is_chief():  # the other workers' results are the same numbers
        print(f"\n{args.dataset} {eval_split}: teacher (float) {100 * result.teacher_accuracy:.2f}%, "
              f"student {100 * result.student_accuracy:.2f}%  ->  {student_path}")
        print(result.report)
    return 0


def command_evaluate(args):
    from n2uq_tf import data
    from n2uq_tf._keras import keras
    info = data.dataset_info(args.dataset)
    split = args.split or _eval_split(info)
    if split not in info.splits:
        raise UsageError(f"dataset {args.dataset} has no split {split!r} (splits: {', '.join(info.splits)})")
    model = load_any_model(args.model_path)
    _match_pipeline(model, args, args.model_path, fill=True)
    dataset = _dataset(args, split, args.batch_size or 256, False)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")])
    result = model.evaluate(dataset, steps=args.steps, verbose=_verbose(), return_dict=True)
    print(f"{args.model_path} on {args.dataset} {split}: top-1 {100 * result['top1']:.2f}%, "
          f"top-5 {100 * result['top5']:.2f}%")
    return 0


def command_report(args):
    import n2uq_tf
    if args.plots:
        _require_folder_output(args.plots, "--plots")
        _refuse_overwriting_inputs([("--plots", args.plots)], [("MODEL", args.model_path)])
    model = n2uq_tf.load_model(args.model_path, compile=False)
    report = n2uq_tf.quantization_report(model)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report)
    if args.plots:
        from n2uq_tf import plots
        written = []
        if args.dataset:
            import numpy as np
            from n2uq_tf import data
            _match_pipeline(model, args, args.model_path, fill=True)
            ds = data.load_dataset(args.dataset, _eval_split(data.dataset_info(args.dataset)), batch_size=128,
                                   image_size=args.image_size, data_dir=args.data_dir, training=False,
                                   channels=args.channels or 3, normalization=args.normalization)
            sample = np.concatenate([x for x, _ in ds.take(2)])
            written = plots.save_plots(model, sample, args.plots)
        else:
            os.makedirs(args.plots, exist_ok=True)
            path = os.path.join(args.plots, "weight_levels.png")
            plots.plot_weight_levels(model, path)
            written = [path]
            print("(activation histograms need --dataset)", file=sys.stderr)
        print("plots:", ", ".join(written), file=sys.stderr)
    return 0


def command_benchmark(args):
    from n2uq_tf import tflite
    if not os.path.exists(args.model_path):
        raise FileNotFoundError(f"no model at {args.model_path!r}")
    result = tflite.benchmark_model(args.model_path, num_threads=args.threads, runs=args.runs,
                                    warmup=args.warmup, backend=args.backend, float_model=args.float_model,
                                    isa=args.isa)
    print(tflite.format_benchmark(result))
    return 0


def command_export(args):
    import n2uq_tf
    from n2uq_tf.export import export_tflite
    output = args.output or os.path.splitext(args.model_path.rstrip("/"))[0] + ".tflite"
    _require_file_output(output, "--output")
    _refuse_overwriting_inputs([("--output", output)], [("MODEL", args.model_path)])
    if args.int8 and not args.dataset:
        raise UsageError("--int8 needs --dataset for calibration images")
    model = n2uq_tf.load_model(args.model_path, compile=False)
    representative = None  # calibration images, int8 only
    if args.int8:
        from n2uq_tf import data
        _match_pipeline(model, args, args.model_path, fill=True)
        ds = data.load_dataset(args.dataset, "train", batch_size=16, image_size=args.image_size,
                               data_dir=args.data_dir, training=False, channels=args.channels or 3,
                               normalization=args.normalization)
        batches = [x.numpy() for x, _ in ds.take(args.calibration_batches)]

        def calibration_images():
            for batch in batches:
                for image in batch:
                    yield [image[None]]
        representative = calibration_images
    with atomic_path(output) as tmp:  # a failed export leaves no file and the old one as it was
        _, report = export_tflite(model, tmp, inference_type="int8" if args.int8 else "float",
                                  representative_dataset=representative, return_report=True, fuse=args.fuse)
    print(report)
    print(f"wrote {output} ({os.path.getsize(output):,} bytes)")
    return 0


def command_inspect(args):
    from n2uq_tf.export import inspect_tflite
    info = inspect_tflite(args.model_path)
    print(json.dumps(info.to_dict(), indent=1, default=str) if args.json else info)
    return 0


def command_launch(args):
    from n2uq_tf.distribute.launch import launch_from_arguments
    return launch_from_arguments(args)  # a ValueError: a command line it cannot run (exit status 2)


COMMANDS = {"train": command_train, "evaluate": command_evaluate, "report": command_report,
            "export": command_export, "inspect": command_inspect, "benchmark": command_benchmark,
            "launch": command_launch}


def _expected_errors():
    """Library errors that are about the user's input or machine, not bugs: (type, exit status), first
    match wins. Anything else keeps its traceback (a bug to report)."""
    from n2uq_tf._native import BuildError
    from n2uq_tf._optional import MissingDependencyError
    from n2uq_tf.data import DatasetNotAvailableError
    from n2uq_tf.tflite import DelegateUnavailableError
    return ((CLIError, None),                 # ours: the status is the error's own
            (DatasetNotAvailableError, 1),    # the data is not on this machine (the message says how to get it)
            (MissingDependencyError, 1),      # an optional package is not installed (the message names it)
            (BuildError, 1),                  # the C++ libraries cannot be compiled here (no compiler)
            (DelegateUnavailableError, 1),    # the TFLite delegate cannot be built or loaded here
            (FileNotFoundError, 2),           # a path on the command line names nothing
            (ValueError, 2),                  # a value the library refuses, named in its message
            (OSError, 1))                     # the file system refused (permissions, a full disk)


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (which tests and tools may swap), message only."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # as logging's own handlers: a broken stream never stops the command
            self.handleError(record)


def _show_library_messages():
    """The package's INFO messages (a C++ library built on first use) on stderr, where a command's user
    sees them; left alone when the process configured logging itself."""
    package = logging.getLogger("n2uq_tf")
    if not package.handlers and not logging.getLogger().handlers:
        package.addHandler(_StderrHandler())
        package.setLevel(logging.INFO)


def main(argv=None):
    _show_library_messages()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        hint = " (continue it with --resume)" if args.command == "train" else ""
        print(f"n2uq-tf {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as error:
        status = next((code for kind, code in _expected_errors() if isinstance(error, kind)), False)
        if status is False:
            raise
        print(f"n2uq-tf {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code if status is None else status


if __name__ == "__main__":
    sys.exit(main())
