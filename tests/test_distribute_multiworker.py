"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 train with compressed gradients.

The same worker script runs twice through the local launcher (`n2uq_tf.distribute.launch`):
nuqsgd at 4 bits, then "none" (the framework's all-reduce) for comparison. Each worker trains an MLP
on sklearn's digits with its DATA shard of every global batch and prints a RESULT line: a checksum of
its weights, the history, the test accuracy computed locally from the weights, and the collective ops
in its traced train step (with their input shapes).
"""

import io
import json
import os
import re
import sys
import textwrap

import pytest

import n2uq_tf
from n2uq_tf.distribute import launch as launcher

pytestmark = pytest.mark.slow  # end to end (subprocesses, training, whole networks)

WORKER_SCRIPT = textwrap.dedent(r'''
import hashlib, json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf

method = sys.argv[1]
T0 = time.time()
strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; before any other TF work
import tf_keras as keras
import n2uq_tf
from n2uq_tf import distribute as nd

(x_train, y_train), (x_test, y_test) = n2uq_tf.data.digits_arrays(image_size=8, channels=1)
x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
x_train, y_train = x_train[:1280], y_train[:1280]  # 20 global batches of 64: whole batches on every worker
dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(64)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = dataset.with_options(options)

with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    optimizer = nd.compress_gradients(keras.optimizers.Adam(3e-3), method, bits=4, bucket_size=256)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
t = time.time()
history = model.fit(dataset, epochs=4, verbose=0).history
fit_seconds = time.time() - t

weights = model.get_weights()
hidden = np.maximum(x_test @ weights[0] + weights[1], 0)  # test accuracy from the weights, no collective
accuracy = float(np.mean((hidden @ weights[2] + weights[3]).argmax(1) == y_test))


def collectives(function):
    """Per traced graph of the train function: [op, dtype, input shape, producer of the input]."""
    graphs = []
    for concrete in function._list_all_concrete_functions():
        graph_def = concrete.graph.as_graph_def()
        nested = [n.op for f in graph_def.library.function for n in f.node_def if "Collective" in n.op]
        ops = [op for op in concrete.graph.get_operations() if "Collective" in op.type or "Nccl" in op.type]
        graphs.append({"nested": nested, "ops": sorted(
            [op.type, op.inputs[0].dtype.name, op.inputs[0].shape.as_list(), op.inputs[0].op.type] for op in ops)})
    return graphs


print("RESULT" + json.dumps({
    "method": method, "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"],
    "replicas": strategy.num_replicas_in_sync, "optimizer_class": type(model.optimizer).__name__,
    "sha256": hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest(),
    "history": history, "accuracy": accuracy, "collectives": collectives(model.train_function),
    "iterations": int(model.optimizer.iterations.numpy()),
    "params": int(sum(w.size for w in weights)),
    "exchange_size": list(nd.exchange_size(model.trainable_variables, model.optimizer)),
    "fit_seconds": fit_seconds, "seconds": time.time() - T0}), flush=True)
''')


def run_workers(method, attempts=2):
    """Both workers' RESULT dicts, by worker index (the launcher picks free loopback ports)."""
    # The workers import the n2uq_tf this test imported.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(n2uq_tf.__file__)))
    env = {"TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    for attempt in range(attempts):
        output = io.StringIO()
        status = launcher.launch([sys.executable, "-c", WORKER_SCRIPT, method], 2, env=env, stream=output,
                                 timeout=3600)
        text = output.getvalue()
        # A port taken between free_ports() and the gRPC server's bind: try once more with new ports.
        if status != 0 and attempt + 1 < attempts and re.search(r"address already in use", text, re.I):
            continue
        break
    assert status == 0, text[-4000:]
    results = {}
    for line in text.splitlines():
        match = re.match(r"\[worker (\d)\] RESULT(.*)$", line)
        if match:
            results[int(match.group(1))] = json.loads(match.group(2))
    assert sorted(results) == [0, 1], text[-4000:]
    return [results[0], results[1]]


@pytest.fixture(scope="module")
def runs():
    return {method: run_workers(method) for method in ("nuqsgd", "none")}


def test_two_workers_train_bit_identically_with_compressed_gradients(runs):
    workers = runs["nuqsgd"]
    for index, worker in enumerate(workers):
        assert worker["task"] == index and worker["replicas"] == 2
        assert worker["optimizer_class"] == "CompressedAdam"
        assert worker["iterations"] == 4 * 20  # 4 epochs of 20 global batches, 32 examples per worker each
    assert workers[0]["sha256"] == workers[1]["sha256"]
    assert workers[0]["history"] == workers[1]["history"] and workers[0]["accuracy"] == workers[1]["accuracy"]
    losses = workers[0]["history"]["loss"]
    assert losses[-1] < 0.3 * losses[0]
    print("multi-worker nuqsgd 4-bit:", {k: workers[0][k] for k in ("accuracy", "fit_seconds", "seconds")},
          "loss", losses)


def test_accuracy_close_to_the_uncompressed_run(runs):
    compressed, none = runs["nuqsgd"][0], runs["none"][0]
    assert runs["none"][0]["sha256"] == runs["none"][1]["sha256"]
    assert none["optimizer_class"] == "CompressedAdam" and none["exchange_size"][2] == 4 * none["params"]
    assert compressed["sha256"] != none["sha256"]  # compression did something
    assert none["accuracy"] > 0.9
    assert compressed["accuracy"] > none["accuracy"] - 0.03, (compressed["accuracy"], none["accuracy"])
    print("test accuracy: nuqsgd 4-bit", compressed["accuracy"], "none", none["accuracy"],
          "| seconds per worker (fit, total):", (compressed["fit_seconds"], compressed["seconds"]),
          (none["fit_seconds"], none["seconds"]))


def test_one_gradient_all_gather_per_step_and_no_gradient_all_reduce(runs):
    for worker in runs["nuqsgd"]:
        values, _, payload_bytes = worker["exchange_size"]
        assert values == worker["params"] == 64 * 64 + 64 + 64 * 10 + 10
        # Kernel 1 (4096) in 16 whole buckets, kernel 2 (640) in 2; its tail (128) and both biases (74)
        # share 1: 19 x (256 / 8 + 1) words, then the 4 words of the non-finite side list.
        assert payload_bytes == 4 * (19 * 33 + 4)
        graphs = worker["collectives"]
        assert graphs
        for graph in graphs:
            assert graph["nested"] == []
            gathers = [op for op in graph["ops"] if op[0] == "CollectiveGatherV2"]
            # One gather of this worker's whole payload (float32 bits of the int32 words) per step.
            assert gathers == [["CollectiveGatherV2", "float32", [payload_bytes // 4], "Bitcast"]], graph
            # Whatever else is there is Keras' scalar bookkeeping (metrics, the dataset's end-of-data
            # check): no all-reduce the size of a gradient.
            others = [op for op in graph["ops"] if op[0] != "CollectiveGatherV2"]
            assert all(op[0] == "CollectiveReduceV2" and op[2] in ([], [1]) for op in others), graph
    for worker in runs["none"]:
        for graph in worker["collectives"]:
            assert not [op for op in graph["ops"] if op[0] == "CollectiveGatherV2"], graph
            # The framework's all-reduce: every gradient in one packed CollectiveReduceV2.
            big = [op for op in graph["ops"] if op[2] not in ([], [1])]
            assert big == [["CollectiveReduceV2", "float32", [worker["params"]], "ConcatV2"]], graph
    print("multi-worker train step collectives: nuqsgd", runs["nuqsgd"][0]["collectives"][0]["ops"],
          "none", runs["none"][0]["collectives"][0]["ops"])


# --- non-finite gradient values between two workers ----------------------------------------------------

NONFINITE_SCRIPT = textwrap.dedent(r'''
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from n2uq_tf import distribute as nd

# (index in a 600-value gradient): (worker 0's value, worker 1's value)
BAD = {3: ("nan", 1.0), 70: ("inf", 2.0), 140: ("inf", "-inf"), 210: ("-inf", "-inf"), 333: (0.5, "nan"),
       400: ("-inf", 3e38), 599: ("nan", "nan")}


def gradient(worker):
    g = np.random.default_rng(worker).normal(size=600).astype(np.float32)
    g[500:504] = 1e38  # huge but finite, the float sum (2e38) too
    for index, values in BAD.items():
        g[index] = np.float32(values[worker])
    return g


compression = nd.GradientCompression("nuqsgd", 4, bucket_size=128)


@tf.function
def exchange(g):
    def step(g):
        g = tf.identity(g)  # on the replica's device: the all-reduce takes its destination from it
        context = tf.distribute.get_replica_context()
        return (nd.exchange_compressed([g], compression, tf.constant(0, tf.int64))[0],
                context.all_reduce(tf.distribute.ReduceOp.SUM, g))
    return strategy.run(step, args=(g,))


worker = strategy.cluster_resolver.task_id
per_replica = strategy.experimental_distribute_values_from_function(lambda context: tf.constant(gradient(worker)))
compressed, summed = (strategy.experimental_local_results(x)[0].numpy() for x in exchange(per_replica))
layout = nd.BucketLayout([600], compression.bucket_size)
payloads = [nd.encode(layout.to_buckets([gradient(w)]), compression, nd.replica_seed(compression, 0, w)).numpy()
            for w in range(2)]
print("RESULT" + json.dumps({"task": worker, "compressed": compressed.tobytes().hex(), "float": summed.tobytes().hex(),
                             "payloads": [p.tobytes().hex() for p in payloads]}), flush=True)
''')


def test_nonfinite_gradients_between_two_workers_reach_the_sum_as_the_float_all_reduce_does():
    import numpy as np

    import distribute_reference as ref
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(n2uq_tf.__file__)))
    env = {"TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    for _attempt in range(2):  # a port taken between free_ports() and the bind: once more with new ports
        output = io.StringIO()
        status = launcher.launch([sys.executable, "-c", NONFINITE_SCRIPT], 2, env=env, stream=output)
        text = output.getvalue()
        if status == 0 or not re.search(r"address already in use", text, re.I):
            break
    assert status == 0, text[-4000:]
    results = {}
    for line in text.splitlines():
        match = re.match(r"\[worker (\d)\] RESULT(.*)$", line)
        if match:
            results[int(match.group(1))] = json.loads(match.group(2))
    assert sorted(results) == [0, 1], text[-4000:]
    values = {key: [np.frombuffer(bytes.fromhex(results[w][key]), np.float32) for w in (0, 1)]
              for key in ("compressed", "float")}
    assert values["compressed"][0].tobytes() == values["compressed"][1].tobytes()  # the workers agree
    compressed, float_sum = values["compressed"][0], values["float"][0]

    def kinds(v):
        return np.where(np.isnan(v), 0, np.where(v == np.inf, 1, np.where(v == -np.inf, 2, 3)))

    np.testing.assert_array_equal(kinds(compressed), kinds(float_sum))  # the same NaN/+Inf/-Inf places, only those
    assert np.sum(~np.isfinite(float_sum)) == 7
    payloads = np.stack([np.frombuffer(bytes.fromhex(p), np.int32) for p in results[0]["payloads"]])
    with np.errstate(over="ignore", invalid="ignore"):
        expected = ref.decode_sum(payloads, "nuqsgd", 4, 5, 128)[:600]
    np.testing.assert_array_equal(compressed, expected)
