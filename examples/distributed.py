"""Data-parallel training with compressed gradient exchange (NUQSGD, QSGD, QSGDinf).

One process (every local device, or N logical CPU devices with --local-replicas N):

    python examples/distributed.py --compression nuqsgd --bits 4

N workers on this machine (MultiWorkerMirroredStrategy over 127.0.0.1, as on a cluster):

    n2uq-tf launch -n 2 -- python examples/distributed.py --compression nuqsgd --bits 4

The only change to an ordinary Keras script is the optimizer line:

    optimizer = n2uq_tf.distribute.compress_gradients(keras.optimizers.Adam(lr), "nuqsgd", bits=4)

The chief (worker 0) prints the bytes each replica exchanges per step, the median step time and
the test accuracy; --json writes them for benchmarks/distributed.py. Data: scikit-learn's digits
(offline) or CIFAR-10 (TFDS, prepared). Models: an MLP (1.1M parameters, the size of the
measurements in benchmarks/DISTRIBUTED.md), a small CNN, ResNet-20 float or N2UQ W2A2, or any saved Keras model.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compression", default="nuqsgd", choices=["none", "nuqsgd", "qsgd", "qsgdinf"])
    parser.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="values per norm (default 8192; 128 at 2 bits)")
    parser.add_argument("--model", default="mlp",
                        help="mlp, cnn, resnet20, resnet20-w2a2, or a path to a saved Keras model "
                             "(.keras/.h5/SavedModel; trained from the weights it was saved with)")
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-replicas", type=int, default=None,
                        help="split this process's CPU into N logical devices (MirroredStrategy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads per process (default: TF's choice). Several workers on one "
                             "machine: cores / workers, so they don't fight over the cores")
    parser.add_argument("--json", help="write the chief's results here")
    return parser.parse_args(argv)


CLASSES = 10  # digits and CIFAR-10


def builtin_input_shape(model_name, dataset):
    if dataset == "cifar10":
        return (32, 32, 3)
    return {"mlp": (8, 8, 1), "cnn": (16, 16, 1)}.get(model_name, (16, 16, 3))


def load_data(name, shape):
    """((x_train, y_train), (x_test, y_test)) as NumPy arrays shaped for a model input `shape`:
    (64,) is flat 8x8 digits, (s, s, c) images at s x s with c channels."""
    import numpy as np
    from n2uq_tf import data
    flat = len(shape) == 1 and shape[0] == 64 and name == "digits"
    square = len(shape) == 3 and shape[0] == shape[1]
    if not flat and not (square and shape[2] in ((1, 3) if name == "digits" else (3,))):
        raise SystemExit(f"--model takes input {shape}; {name} can feed (64,) (flat digits) or (s, s, 1 or 3) "
                         "images (CIFAR-10: 3 channels)")
    if name == "digits":
        if flat:
            (x, y), (xt, yt) = data.digits_arrays(image_size=8, channels=1)
            return (x.reshape(len(x), -1), y), (xt.reshape(len(xt), -1), yt)
        return data.digits_arrays(image_size=shape[0], channels=shape[2])
    import tensorflow_datasets as tfds
    arrays = []
    for split in ("train", "test"):
        ds = data.load_dataset("cifar10", split, batch_size=1024, image_size=shape[0], training=False)
        xs, ys = zip(*tfds.as_numpy(ds))
        arrays.append((np.concatenate(xs), np.concatenate(ys)))
    return tuple(arrays)


def build_model(name, dataset, classes=CLASSES):
    """One of the example's models, or a saved model loaded as it is (its input decides the data)."""
    import tf_keras as keras
    from n2uq_tf import models
    if os.path.exists(name):
        import n2uq_tf
        return n2uq_tf.load_model(name, require_quantized=False, compile=False)
    input_shape = builtin_input_shape(name, dataset)
    if name == "mlp":
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(1024, activation="relu"),
                                 keras.layers.Dense(1024, activation="relu"),
                                 keras.layers.Dense(classes)], name="mlp")
    if name == "cnn":
        return keras.Sequential([keras.Input(input_shape),
                                 keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
                                 keras.layers.Conv2D(128, 3, strides=2, padding="same", activation="relu"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes)], name="cnn")
    if name in ("resnet20", "resnet20-w2a2"):
        bits = 2 if name.endswith("w2a2") else None
        return models.resnet20(num_classes=classes, input_shape=input_shape, bits=bits)
    raise SystemExit(f"--model: {name!r} is neither mlp, cnn, resnet20, resnet20-w2a2 nor a saved model path")


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.local_replicas:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()]
                                                   * args.local_replicas)
    import numpy as np
    import tf_keras as keras
    import n2uq_tf
    from n2uq_tf import distribute

    strategy = distribute.strategy_from_environment()
    chief = distribute.is_chief()
    with strategy.scope():
        keras.utils.set_random_seed(args.seed)  # the same initial weights on every worker
        model = build_model(args.model, args.dataset)
    (x_train, y_train), (x_test, y_test) = load_data(args.dataset, tuple(model.input_shape[1:]))

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=args.seed).batch(args.batch_size, drop_remainder=True)
             .with_options(options))
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(args.batch_size).with_options(options)

    with strategy.scope():
        if any(isinstance(layer, n2uq_tf.N2UQWrapper) for layer in model.submodules):  # the paper's optimizer
            base = n2uq_tf.paper_optimizer(args.learning_rate, epochs=args.epochs,
                                           steps_per_epoch=len(x_train) // args.batch_size)
        else:
            base = keras.optimizers.Adam(args.learning_rate)
        optimizer = distribute.compress_gradients(base, args.compression, bits=args.bits,
                                                  bucket_size=args.bucket_size, seed=args.seed)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    monitor = distribute.ExchangeMonitor()
    history = model.fit(train, epochs=args.epochs, callbacks=[monitor], verbose=2 if chief else 0)
    _, accuracy = model.evaluate(test, verbose=0)
    result = dict(monitor.summary, model=args.model, dataset=args.dataset, epochs=args.epochs,
                  workers=distribute.num_workers(), test_accuracy=float(accuracy),
                  final_loss=float(history.history["loss"][-1]),
                  weights_checksum=float(sum(np.abs(w).sum() for w in model.get_weights())))
    if chief:
        print(f"{result['compression']} {result['bits']}-bit, {result['replicas']} replicas "
              f"({result['workers']} workers), {result['parameters']:,} parameters: "
              f"{result['bytes_per_step']:,} B/step per replica ({result['ratio']:.2f}x less than float32), "
              f"median step {result['step_ms_median']:.1f} ms, test accuracy {100 * accuracy:.2f}%")
        if result["loopback_bytes_per_step"] is not None and result["workers"] > 1:
            print(f"loopback traffic measured during fit: {result['loopback_bytes_per_step']:,.0f} B/step "
                  f"(all workers, both directions, gRPC framing included)")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
