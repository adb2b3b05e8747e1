"""What a distributed run exchanges and how long its steps take: a callback and a strategy picker."""

import os
import time

import numpy as np
import tensorflow as tf

from n2uq_tf._keras import keras
from n2uq_tf.distribute.compressors import GradientCompression
from n2uq_tf.distribute.optimizer import exchange_size


def strategy_from_environment():
    """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster (as `n2uq-tf launch` sets it),
    MirroredStrategy when this process sees several devices, else the default strategy."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if len(gpus) > 1 or (not gpus and len(cpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def loopback_bytes():
    """Bytes the loopback interface has carried (Linux /proc/net/dev, received side), or None."""
    try:
        with open("/proc/net/dev") as table:
            for line in table:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[0])
    except OSError:
        pass
    return None


class ExchangeMonitor(keras.callbacks.Callback):
    """Records per-step time and the gradient bytes each replica sends; `summary` after fit.

    The loopback counter is whole-machine traffic: meaningful for local multi-worker
    runs on an otherwise quiet machine, where it measures what the collectives really moved.
    """

    def __init__(self, skip_steps=3):
        super().__init__()
        self.skip_steps = skip_steps
        self.step_times = []
        self.summary = {}
        self._start = None
        self._lo_start = None
        self._size = None

    def on_train_begin(self, logs=None):
        self._compression = getattr(self.model.optimizer, "gradient_compression", GradientCompression("none"))
        self._size = exchange_size(self.model.trainable_variables, self._compression)
        self.step_times = []
        self._lo_start = loopback_bytes()

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_times.append(time.perf_counter() - self._start)

    def on_train_end(self, logs=None):
        lo_end = loopback_bytes()
        steps = len(self.step_times)
        timed = self.step_times[self.skip_steps:] or self.step_times
        strategy = self.model.distribute_strategy
        self.summary = {
            "compression": self._compression.method,
            "bits": self._compression.bits if self._compression.enabled else 32,
            "bucket_size": self._compression.bucket_size if self._compression.enabled else None,
            "replicas": strategy.num_replicas_in_sync,
            "parameters": self._size.values,
            "bytes_per_step": self._size.bytes,
            "float32_bytes_per_step": self._size.float32_bytes,
            "ratio": self._size.ratio,
            "steps": steps,
            "step_ms_median": 1e3 * float(np.median(timed)) if timed else None,
            "loopback_bytes_per_step": ((lo_end - self._lo_start) / steps
                                        if steps and lo_end is not None and self._lo_start is not None else None),
        }
