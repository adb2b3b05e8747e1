"""The `n2uq-tf` command: train, evaluate, report, export, inspect and benchmark N2UQ models.

    n2uq-tf train --model resnet20 --dataset digits --bits 2 --epochs 10 --output runs/digits
    n2uq-tf evaluate runs/digits/student.keras --dataset digits
    n2uq-tf report runs/digits/student.keras --plots runs/digits/plots --dataset digits

`train` runs the paper's recipe (DESIGN.md section 2): a float teacher (trained here, or any
saved float Keras model), a quantized student initialised from the float weights, pure
distillation with Adam, quantizer parameters at lr/10 and a linear per-epoch decay. Every
epoch is checkpointed, so an interrupted run continues with `--resume`.
"""

import argparse
import inspect
import json
import os
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def _add_data_arguments(parser, default_dataset=None):
    from n2uq_tf import data
    parser.add_argument("--dataset", default=default_dataset, required=default_dataset is None,
                        choices=sorted(data.DATASETS),
                        help="dataset name; 'digits' ships with scikit-learn and needs no download"
                             + (f" (default {default_dataset})" if default_dataset else ""))
    parser.add_argument("--data-dir", help="TFDS data folder (default ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder holding the ILSVRC2012 tar files (imagenet2012 only)")
    parser.add_argument("--download", action="store_true",
                        help="let TFDS download and prepare the dataset if it is missing (needs network)")
    parser.add_argument("--image-size", type=_positive_int, help="input resolution (default: the dataset's)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="batch size (default 256 as in the paper, 64 for digits)")


def build_parser():
    from n2uq_tf import models
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
            Outputs in --output: student.keras, teacher.keras, history.json, report.txt and
            plots/*.png; checkpoints in OUTPUT/backup (continue an interrupted run with --resume)."""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--model", default="resnet20", choices=sorted(models.MODELS),
                       help="network from n2uq_tf.models (default resnet20)")
    train.add_argument("--width", type=_positive_int, help="base width of resnet20 (default 16)")
    _add_data_arguments(train, default_dataset="digits")
    train.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    train.add_argument("--weight-bits", type=int, help="weight bits, overriding --bits")
    train.add_argument("--activation-bits", type=int, help="activation bits, overriding --bits")
    train.add_argument("--float-downsample", action="store_true",
                       help="keep residual downsample convs float (the paper's N2UQ* variant)")
    train.add_argument("--frozen-thresholds", action="store_true",
                       help="freeze thresholds at uniform: the paper's STE baseline")
    train.add_argument("--method", help="quantizer of weights and activations: n2uq (default), uniform, dorefa, "
                                        "pact, lsq or daq (see the README's quantization methods)")
    train.add_argument("--weight-method", help="weight quantizer, overriding --method (also none, learnable)")
    train.add_argument("--activation-method", help="activation quantizer, overriding --method")
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
                       help="continue from the checkpoints in OUTPUT/backup instead of refusing a used folder")
    train.add_argument("--tensorboard", action="store_true",
                       help="log losses, thresholds and betas to OUTPUT/tensorboard")
    train.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
    train.add_argument("--mirrored", action="store_true",
                       help="train data-parallel on every local GPU (or logical CPU device) with "
                            "tf.distribute.MirroredStrategy")
    train.add_argument("--compression", default="none", choices=["none", "nuqsgd", "qsgd", "qsgdinf"],
                       help="compress the gradient exchange between replicas (n2uq_tf.distribute); "
                            "with TF_CONFIG set (e.g. by `n2uq-tf launch`) training is multi-worker")
    train.add_argument("--compression-bits", type=int, default=4, choices=[2, 4, 8],
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
    report.add_argument("--dataset", choices=None, help="dataset for the activation histograms of --plots")
    report.add_argument("--data-dir", help="TFDS data folder")
    report.add_argument("--image-size", type=_positive_int, help="input resolution (default: the dataset's)")
    export = commands.add_parser(
        "export", help="convert a quantized model to TFLite with bit-packed N2UQ ops",
        description="Convert a saved quantized model to a .tflite file: each quantized conv/dense layer "
                    "becomes an N2UQ quantize-and-pack op and a bit-serial conv/FC op (weights stored at "
                    "their bit width, BatchNorm folded), the rest TFLite builtins (float, or int8 with "
                    "--int8). Run it with `n2uq-tf benchmark` or n2uq_tf.tflite.Interpreter.")
    export.add_argument("model_path", metavar="MODEL", help="saved quantized model (.keras, .h5 or SavedModel)")
    export.add_argument("--output", "-o", help="the .tflite to write (default: MODEL with .tflite)")
    export.add_argument("--int8", action="store_true",
                        help="int8 builtins, calibrated on --dataset (the N2UQ ops are bit-serial either way)")
    export.add_argument("--dataset", help="calibration images for --int8 (a dataset name, e.g. digits)")
    export.add_argument("--data-dir", help="TFDS data folder")
    export.add_argument("--calibration-batches", type=_positive_int, default=8,
                        help="batches of 16 images for --int8 calibration (default 8)")

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
    bench.add_argument("--warmup", type=int, default=5, help="untimed invocations first (default 5)")
    bench.add_argument("--float-model", help="a .tflite without N2UQ ops to time without the delegate")
    bench.add_argument("--backend", choices=("auto", "litert", "tflite"), default="auto",
                       help="ai_edge_litert or tf.lite interpreter (default: litert when installed)")
    bench.add_argument("--isa", choices=("auto", "portable", "avx2", "avx512", "neon"), default=None,
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
                             download=getattr(args, "download", False), training=training, seed=seed)


def _model_kwargs(builder, **kwargs):
    accepted = inspect.signature(builder).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in accepted}


def _build(args, num_classes, image_size, bits):
    from n2uq_tf import models
    builder = models.MODELS[args.model]
    kwargs = _model_kwargs(builder, num_classes=num_classes, input_shape=(image_size, image_size, 3),
                           width=args.width, quantize_downsample=not args.float_downsample)
    if bits is not None:
        kwargs.update(_model_kwargs(builder, weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                                    method=args.method, weight_method=args.weight_method,
                                    activation_method=args.activation_method,
                                    learn_thresholds=False if args.frozen_thresholds else None))
    model = builder(bits, **kwargs)
    if args.frozen_thresholds and bits is not None and "learn_thresholds" not in kwargs:
        raise SystemExit(f"n2uq-tf: --frozen-thresholds is not supported by model {args.model}")
    return model


def _steps(args, info, split, batch_size):
    steps = info.splits[split] // batch_size  # training drops the last partial batch
    return min(steps, args.steps_per_epoch) if args.steps_per_epoch else steps


def _fit(model, train_ds, val_ds, epochs, steps, callbacks, args):
    if args.steps_per_epoch:
        train_ds = train_ds.repeat()
    return model.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps,
                     callbacks=callbacks, verbose=_verbose())


def _train_strategy(args, batch_size):
    import tensorflow as tf
    if os.environ.get("TF_CONFIG"):
        if args.mirrored:
            raise SystemExit("n2uq-tf: --mirrored and TF_CONFIG (multi-worker) exclude each other")
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
    import numpy as np
    import tensorflow as tf

    import n2uq_tf
    from n2uq_tf import data, models, training
    from n2uq_tf._keras import keras

    info = data.dataset_info(args.dataset)
    image_size = args.image_size or info.image_size
    batch_size = args.batch_size or (64 if args.dataset == "digits" else 256)
    eval_split = _eval_split(info)
    strategy = _train_strategy(args, batch_size)  # first: MultiWorkerMirroredStrategy must precede other TF work
    from n2uq_tf.distribute import launch as workers
    if workers.num_workers() > 1 and not workers.is_chief():
        # Every worker trains in step with the chief; only the chief writes the run's folder.
        args.output = os.path.join(args.output, f".worker{workers.worker_index()}")
        args.no_plots = True
    os.makedirs(args.output, exist_ok=True)
    backup = os.path.join(args.output, "backup")
    student_path = os.path.join(args.output, "student.keras")
    if not args.resume and (os.path.exists(backup) or os.path.exists(student_path)):
        raise SystemExit(f"n2uq-tf: {args.output!r} already holds a run; pass --resume to continue it "
                         "or choose another --output")
    if args.resume and os.path.exists(student_path):  # written only when the run completes
        raise SystemExit(f"n2uq-tf: the run in {args.output!r} has finished ({student_path}); evaluate it with "
                         f"`n2uq-tf evaluate {student_path} --dataset {args.dataset}`")
    keras.utils.set_random_seed(args.seed)

    train_ds = _dataset(args, "train", batch_size, True, seed=args.seed)
    val_ds = _dataset(args, eval_split, batch_size, False)
    steps = _steps(args, info, "train", batch_size)
    lr = args.lr if args.lr is not None else 1.25e-3 * batch_size / 256
    print(f"n2uq-tf train: {args.model} on {args.dataset} ({info.splits['train']} images, "
          f"{image_size}x{image_size}), {steps} steps/epoch of {batch_size}, lr {lr:g}")

    def compressed(optimizer):
        if args.compression == "none":
            return optimizer
        from n2uq_tf import distribute
        return distribute.compress_gradients(optimizer, args.compression, bits=args.compression_bits,
                                             bucket_size=args.bucket_size, seed=args.seed)

    with strategy.scope():  # variables of the teacher, student and optimizer are mirrored
        # 1. the float teacher
        teacher_path = os.path.join(args.output, "teacher.keras")
        if args.teacher:
            teacher = load_any_model(args.teacher)
            print(f"teacher: {args.teacher}")
        elif os.path.exists(teacher_path):
            teacher = load_any_model(teacher_path)
            print(f"teacher: {teacher_path} (trained earlier in this run)")
        else:
            print(f"teacher: training the float {args.model} for {args.teacher_epochs} epochs")
            teacher = _build(args, info.num_classes, image_size, None)
            teacher_lr = args.teacher_lr or 4 * lr
            teacher.compile(compressed(keras.optimizers.Adam(training.LinearEpochDecay(teacher_lr, args.teacher_epochs,
                                                                                        steps))),
                            keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
            _fit(teacher, train_ds, val_ds, args.teacher_epochs, steps,
                 [keras.callbacks.BackupAndRestore(os.path.join(args.output, "teacher_backup"))], args)
            teacher.save(teacher_path)
            # Continue with the saved teacher (no optimizer attached), as a resumed run will, so
            # the distillation checkpoints of both hold the same objects.
            teacher = load_any_model(teacher_path)
        teacher.trainable = False

        # 2. the quantized student, initialised from float weights as in the paper
        bits = args.bits
        student = _build(args, info.num_classes, image_size, bits)
        init = args.init or (None if args.teacher else teacher_path)
        if init:
            # A path may also be a weights-only file of the float twin.
            models.load_float_weights(student, init if init != teacher_path else teacher)
            print(f"student: {args.model} W{args.weight_bits or bits}A{args.activation_bits or bits}, "
                  f"initialised from {init}")
        elif args.teacher:
            try:
                models.load_float_weights(student, teacher)
                print("student: initialised from the teacher's weights (same architecture)")
            except ValueError as error:
                print(f"student: starting from scratch; the teacher is another architecture ({error}). "
                      "Give --init FLOAT_TWIN to initialise from pretrained float weights.")

        # 3. distillation with the official optimizer recipe
        distiller = training.DistillationModel(student, teacher, temperature=args.temperature, alpha=args.alpha)
        optimizer = compressed(training.paper_optimizer(lr, epochs=args.epochs, steps_per_epoch=steps))
        if args.compression != "none":
            from n2uq_tf import distribute
            size = distribute.exchange_size(student.trainable_variables, optimizer)
            print(f"gradient exchange: {args.compression} {args.compression_bits}-bit, {size.bytes:,} B/step per "
                  f"replica ({size.ratio:.2f}x less than float32's {size.float32_bytes:,})")
        distiller.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) if args.alpha else None,
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        callbacks = [keras.callbacks.BackupAndRestore(backup)]
        if args.tensorboard:
            from n2uq_tf.training.callbacks import QuantizerTensorBoard
            log_dir = os.path.join(args.output, "tensorboard")
            callbacks += [keras.callbacks.TensorBoard(log_dir), QuantizerTensorBoard(log_dir)]
        history = _fit(distiller, train_ds, val_ds, args.epochs, steps, callbacks, args)

        student.save(student_path)
        student.compile(metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        teacher.compile(metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        student_acc = student.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"]
        teacher_acc = teacher.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"]
    report = n2uq_tf.quantization_report(student)
    with open(os.path.join(args.output, "report.txt"), "w") as f:
        f.write(str(report) + "\n")
    with open(os.path.join(args.output, "history.json"), "w") as f:
        json.dump({"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
                   "teacher_accuracy": teacher_acc, "student_accuracy": student_acc}, f, indent=1)
    if not args.no_plots:
        try:
            from n2uq_tf import plots
            sample = np.concatenate([x for x, _ in val_ds.take(4)])
            written = plots.save_plots(student, sample, os.path.join(args.output, "plots"))
            print("plots:", ", ".join(written))
        except ImportError as error:
            print(f"plots skipped ({error}); pip install matplotlib")
    if workers.is_chief():  # the other workers' results are the same numbers
        print(f"\n{args.dataset} {eval_split}: teacher (float) {100 * teacher_acc:.2f}%, "
              f"student {100 * student_acc:.2f}%  ->  {student_path}")
        print(report)
    return 0


def command_evaluate(args):
    from n2uq_tf import data
    from n2uq_tf._keras import keras
    model = load_any_model(args.model_path)
    info = data.dataset_info(args.dataset)
    split = args.split or _eval_split(info)
    if split not in info.splits:
        raise SystemExit(f"n2uq-tf: dataset {args.dataset} has no split {split!r} "
                         f"(splits: {', '.join(info.splits)})")
    if args.image_size is None and model.input_shape[1] is not None:
        args.image_size = model.input_shape[1]
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
    model = n2uq_tf.load_model(args.model_path, compile=False)
    report = n2uq_tf.quantization_report(model)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report)
    if args.plots:
        from n2uq_tf import plots
        written = []
        if args.dataset:
            import numpy as np
            from n2uq_tf import data
            size = args.image_size or model.input_shape[1]
            ds = data.load_dataset(args.dataset, _eval_split(data.dataset_info(args.dataset)), batch_size=128,
                                   image_size=size, data_dir=args.data_dir, training=False)
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
    model = n2uq_tf.load_model(args.model_path, compile=False)
    output = args.output or os.path.splitext(args.model_path.rstrip("/"))[0] + ".tflite"
    representative = None  # calibration images, int8 only
    if args.int8:
        if not args.dataset:
            raise SystemExit("n2uq-tf export: --int8 needs --dataset for calibration images")
        from n2uq_tf import data
        ds = data.load_dataset(args.dataset, "train", batch_size=16, image_size=model.input_shape[1],
                               data_dir=args.data_dir, training=False)
        batches = [x.numpy() for x, _ in ds.take(args.calibration_batches)]

        def calibration_images():
            for batch in batches:
                for image in batch:
                    yield [image[None]]
        representative = calibration_images
    _, report = export_tflite(model, output, inference_type="int8" if args.int8 else "float",
                              representative_dataset=representative, return_report=True)
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
    return launch_from_arguments(args)


COMMANDS = {"train": command_train, "evaluate": command_evaluate, "report": command_report,
            "export": command_export, "inspect": command_inspect, "benchmark": command_benchmark,
            "launch": command_launch}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"n2uq-tf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
