"""Communication-efficient data-parallel training: compressed gradient exchange on tf.distribute.

    strategy = tf.distribute.MultiWorkerMirroredStrategy()   # or MirroredStrategy()
    with strategy.scope():
        model = make_model()
        model.compile(n2uq_tf.distribute.compress_gradients("adam", "nuqsgd", bits=4), loss)
    model.fit(dataset)

Compressors (`compressors.py`): "nuqsgd" (exponential levels, Ramezani-Kebrya et al.), "qsgd",
"qsgdinf" and "none". `n2uq-tf launch -n 2 -- python train.py` (or `launch_workers([...], 2)`) starts
local workers on 127.0.0.1.
"""

from n2uq_tf.distribute.compressors import (COMPRESSORS, SUPPORTED_BITS, BucketLayout,  # noqa: F401
                                            GradientCompression, compress_vector, decode, decode_sum, encode,
                                            pack_codes, quantize_buckets, unpack_codes)
# The module n2uq_tf.distribute.launch stays reachable as such; its launch() is re-exported as launch_workers.
from n2uq_tf.distribute.launch import free_ports, is_chief, num_workers, tf_config, worker_index  # noqa: F401
from n2uq_tf.distribute.launch import launch as launch_workers  # noqa: F401
from n2uq_tf.distribute.monitor import ExchangeMonitor, loopback_bytes, strategy_from_environment  # noqa: F401
from n2uq_tf.distribute.optimizer import (CompressedOptimizer, ExchangeSize, all_gather_payloads,  # noqa: F401
                                          compress_gradients, exchange_compressed, exchange_size,
                                          replica_seed)

__all__ = ["COMPRESSORS", "SUPPORTED_BITS", "BucketLayout", "CompressedOptimizer", "ExchangeMonitor", "ExchangeSize",
           "GradientCompression", "all_gather_payloads", "compress_gradients", "compress_vector", "decode",
           "decode_sum", "encode", "exchange_compressed", "exchange_size", "free_ports", "is_chief", "launch_workers",
           "loopback_bytes", "num_workers",
           "pack_codes", "quantize_buckets", "replica_seed", "strategy_from_environment", "tf_config",
           "unpack_codes", "worker_index"]
