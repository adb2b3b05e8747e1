"""Compressed gradient exchange as an optimizer option: `compile`/`fit` stay as they are.

    optimizer = n2uq_tf.distribute.compress_gradients(keras.optimizers.Adam(1e-3), "nuqsgd", bits=4)
    model.compile(optimizer, loss)      # inside strategy.scope(), as usual
    model.fit(dataset)

tf_keras optimizers aggregate gradients in `aggregate_gradients`, called by `apply_gradients` in
replica context (so by `fit`, `minimize` and DistillationModel alike). The compressed optimizer is
the user's optimizer class with that one method replaced: every replica encodes its gradients,
one all-gather moves the packed codes and norms, and every replica decodes all payloads and sums
them in replica order. The same bytes and the same order on every replica keep the replicas
bit-identical. Keras already scales the loss by 1 / replicas, so the sum is the right aggregate.
"""

import typing
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import FORMAT_VERSION, check_format_version, keras, register
from n2uq_tf._keras_kind import require_tf_keras
from n2uq_tf.distribute.compressors import BucketLayout, GradientCompression, decode_sum, encode

_REGISTERED_NAME = "n2uq_tf>CompressedOptimizer"
# Keras 3 optimizers aggregate gradients elsewhere (no aggregate_gradients hook): not supported yet.
KERAS_3_ALTERNATIVE = ("For a Keras 3 model, train with its optimizer uncompressed (tf.distribute exchanges float32 "
                       "gradients), or build the model with tf_keras to compress the exchange.")
_compressed_classes = {}


def compress_gradients(optimizer: keras.optimizers.Optimizer | str, method: str = "nuqsgd", bits: int = 4,
                       bucket_size: int | None = None, seed: int = 0) -> keras.optimizers.Optimizer:
    """The optimizer, exchanging gradients compressed by `method` at `bits` bits per value.

    optimizer: a tf_keras optimizer instance (Adam, SGD, N2UQAdam, ...) or a name like "adam". A Keras 3
      optimizer raises TypeError: compression is tf_keras-only for now.
    method: "nuqsgd", "qsgd", "qsgdinf", or "none" (the framework's float all-reduce, unchanged).
    bits: 2, 4 or 8 (sign included). bucket_size: values per norm (default 8192; 128 at 2 bits).
    seed: the rounding noise is drawn from (seed, step, replica), so runs repeat exactly.

    Returns an instance of a subclass of the optimizer's class with the same hyperparameters and
    variables (checkpoints are interchangeable with the uncompressed optimizer's). With a single
    replica the gradients are still compressed, so a one-process run shows the effect on accuracy.
    """
    require_tf_keras(optimizer, "n2uq_tf.distribute.compress_gradients", "optimizer", KERAS_3_ALTERNATIVE)
    compression = GradientCompression(method, bits, bucket_size, seed)
    optimizer = keras.optimizers.get(optimizer)
    if isinstance(optimizer, CompressedOptimizer):
        raise ValueError(f"optimizer {optimizer.name!r} already compresses its gradients "
                         f"({optimizer.gradient_compression}); pass the uncompressed optimizer")
    base = type(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer) or "aggregate_gradients" not in dir(base):
        raise TypeError(f"compress_gradients needs a tf_keras optimizer (tf_keras.optimizers.Optimizer), got "
                        f"{base.__module__}.{base.__name__}; legacy optimizers aggregate elsewhere")
    if getattr(optimizer, "_built", False):
        raise ValueError(f"optimizer {optimizer.name!r} is already built; compress it before compile/fit")
    compressed = _compressed_class(base).from_config(optimizer.get_config())
    compressed._gradient_compression = compression
    return compressed


class CompressedOptimizer:
    """Mixin of every compressed optimizer class (isinstance checks) and its deserializer."""

    _gradient_compression = GradientCompression("none")

    @property
    def gradient_compression(self):
        """The GradientCompression in use."""
        return self._gradient_compression

    def aggregate_gradients(self, grads_and_vars):
        compression = self._gradient_compression
        if not compression.enabled:
            return super().aggregate_gradients(grads_and_vars)
        grads_and_vars = list(grads_and_vars)
        present = [i for i, (grad, _) in enumerate(grads_and_vars) if grad is not None]
        if not present:
            return grads_and_vars
        grads = [_dense(grads_and_vars[i][0]) for i in present]
        summed = exchange_compressed(grads, compression, self.iterations)
        out = list(grads_and_vars)
        for i, grad in zip(present, summed):
            out[i] = (grad, grads_and_vars[i][1])
        return out

    def get_config(self):
        # The base class's config plus the compression; from_config below rebuilds this class.
        return {"optimizer": {"class_name": keras.saving.get_registered_name(self._base_class),
                              "config": self._base_class.get_config(self)},
                "compression": self._gradient_compression.get_config(),
                "format_version": FORMAT_VERSION}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "compression" not in config:
            if cls is CompressedOptimizer:
                raise ValueError(f"not a compressed-optimizer config (keys {sorted(config)})")
            return super().from_config(config, custom_objects=custom_objects)  # a base optimizer's config
        config = dict(config)
        check_format_version(config, "The compressed optimizer")
        inner = keras.optimizers.deserialize(config["optimizer"], custom_objects=custom_objects,
                                             use_legacy_format=True)
        return compress_gradients(inner, **config["compression"])


register(CompressedOptimizer)


def _compressed_class(base):
    """One subclass per optimizer class, serialized under the one registered name."""
    if base not in _compressed_classes:
        cls = type(f"Compressed{base.__name__}", (CompressedOptimizer, base), {"_base_class": base})
        # Keras writes the registered name of an object's class; route every subclass to ours.
        from tf_keras.src.saving import object_registration
        object_registration._GLOBAL_CUSTOM_NAMES[cls] = _REGISTERED_NAME
        _compressed_classes[base] = cls
    return _compressed_classes[base]


def _dense(grad):
    if isinstance(grad, tf.IndexedSlices):  # embeddings: the sparse rows become a dense gradient
        return tf.convert_to_tensor(grad)
    return grad


def replica_seed(compression, step, replica_id):
    """The stateless-RNG seed of one replica's rounding noise at one step: fresh and independent."""
    base = tf.stack([tf.constant(compression.seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(replica_id, tf.int64))


def exchange_compressed(grads, compression, step):
    """Sum over replicas of the decoded compressed gradients; call in replica context.

    grads: this replica's dense gradients. Returns tensors shaped and typed like them.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("exchange_compressed runs in replica context (inside strategy.run / "
                           "apply_gradients), not in cross-replica context")
    layout = BucketLayout([g.shape.num_elements() for g in grads], compression.bucket_size)
    seed = replica_seed(compression, step, context.replica_id_in_sync_group)
    payload = encode(layout.to_buckets(grads), compression, seed)
    gathered = all_gather_payloads(payload, context)  # [replicas, words]
    total = decode_sum(gathered, compression, layout.num_buckets)  # replica order: identical everywhere
    return [tf.cast(tf.reshape(flat, g.shape), g.dtype) for flat, g in zip(layout.from_flat(total), grads)]


def all_gather_payloads(payload, context=None):
    """[replicas, words] int32: every replica's payload, by replica id, in one collective.

    ReplicaContext.all_gather runs two collectives per call under the collective strategies
    (the shapes first, then the data); our payloads have one static shape, so the launcher's single
    all-gather is enough. The words travel as float32: collectives take float and int types alike,
    but int32 lives in host memory on GPUs; a gather copies bits and never computes on them.
    """
    context = context or tf.distribute.get_replica_context()
    if context.num_replicas_in_sync == 1:
        return payload[None]
    as_float = tf.bitcast(payload, tf.float32)
    if _collective_launchers(tf.distribute.get_strategy()) is not None and tf.inside_function():
        gathered = context.merge_call(_gather_merge_fn, args=(as_float,))
    else:  # any other strategy, or eager: the public (two-collective) path
        gathered = context.all_gather(as_float, axis=0)
    return tf.reshape(tf.bitcast(gathered, tf.int32), [context.num_replicas_in_sync, -1])


def _collective_launchers(strategy):
    """The per-device collective launchers of a collective strategy (TF internals), or None."""
    from tensorflow.python.distribute import cross_device_ops
    extended = strategy.extended
    collective = getattr(extended, "_collective_ops", None) or getattr(extended, "_cross_device_ops", None)
    launchers = getattr(collective, "_launchers", None)
    if (isinstance(collective, cross_device_ops.CollectiveAllReduce) and launchers
            and all(hasattr(launcher, "_all_gather") for launcher in launchers)):
        return collective
    return None


def _gather_merge_fn(strategy, per_replica):
    from tensorflow.python.distribute import distribute_utils, values
    collective = _collective_launchers(strategy)
    local = strategy.experimental_local_results(per_replica)
    options = getattr(strategy.extended, "_communication_options", None)
    with collective._lock:  # the same collective order on every device
        gathered = [launcher._all_gather(value, options) for launcher, value in zip(collective._launchers, local)]
    return distribute_utils.regroup(gathered, wrap_class=values.Mirrored)


class ExchangeSize(typing.NamedTuple):
    """What one replica contributes to the gradient exchange per step."""

    values: int
    float32_bytes: int
    bytes: int

    @property
    def ratio(self):
        """float32 bytes / payload bytes: how many times smaller the exchange is."""
        return self.float32_bytes / self.bytes

    def __repr__(self):
        return (f"ExchangeSize(values={self.values}, float32_bytes={self.float32_bytes}, bytes={self.bytes}, "
                f"ratio={self.ratio:.2f})")


def exchange_size(variables: Sequence[tf.Variable],
                  compression: GradientCompression | keras.optimizers.Optimizer) -> "ExchangeSize":
    """Bytes one replica puts into the exchange per step for these trainable variables.

    compression: a GradientCompression, or an optimizer (an uncompressed one exchanges float32).
    "none" is the float32 gradients (what the framework's all-reduce moves per replica, before its
    ring or tree schedule).
    """
    if not isinstance(compression, GradientCompression):
        compression = getattr(compression, "gradient_compression", GradientCompression("none"))
    sizes = [int(np.prod(v.shape)) for v in variables]  # tf.Variable and Keras 3 variables alike
    values = sum(sizes)
    if not compression.enabled:
        return ExchangeSize(values, 4 * values, 4 * values)
    layout = BucketLayout(sizes, compression.bucket_size)
    return ExchangeSize(values, 4 * values, 4 * compression.payload_words(layout.num_buckets))
