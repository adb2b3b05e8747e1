"""compress_gradients: the compressed optimizer under tf.distribute, held against the test's own arithmetic.

Under MirroredStrategy (two logical CPUs, in a subprocess: the devices must be set before TF starts,
and one process holds one MirroredStrategy) the script trains tiny models with `fit` and reports raw
numbers: weights before/after every step, each replica's gradient (recomputed by the test on a
single-device clone), the test's own payloads encode(g_r, replica_seed(c, step, r)) and the payloads
the optimizer really sent (captured at the all-gather). The assertions are made here.

Float rounding: each decoded value l * norm is one float32 rounding, and the replicas are added in
replica order by separate float32 adds (kept out of XLA so no FMA contraction can make CPUs disagree),
so the update must be bitwise (p0 rounded) + (p1 rounded), rounded once more.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf import distribute as nd

MIRRORED_SCRIPT = textwrap.dedent(r'''
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras as keras
import n2uq_tf
from n2uq_tf import distribute as nd
from n2uq_tf.distribute import optimizer as nd_optimizer
from n2uq_tf.training import DistillationModel, is_quantizer_variable, paper_optimizer

T0 = time.time()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
R = strategy.num_replicas_in_sync
out = {"replicas": R, "timings": {}}


def hexed(a):
    a = np.ascontiguousarray(a)
    return [str(a.dtype), list(a.shape), a.tobytes().hex()]


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((7,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def build(make_optimizer, metrics=()):
    """The MLP compiled under the strategy; the optimizer is made inside the scope, as users do."""
    with strategy.scope():
        model = mlp()
        model.compile(make_optimizer(), "mse", metrics=list(metrics))
    return model


class Snapshots(keras.callbacks.Callback):
    """The weights before training and after every batch (fit runs one step per batch)."""

    def on_train_begin(self, logs=None):
        self.weights = [self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(self.model.get_weights())


def replicas_identical(variables):
    """How many distributed variables were checked, and those whose per-replica copies differ in any bit."""
    differ, checked = [], 0
    for v in variables:
        copies = [c.numpy() for c in v.values]
        assert len(copies) == R, v.name
        checked += 1
        if any(c.tobytes() != copies[0].tobytes() for c in copies[1:]):
            differ.append(v.name)
    return {"checked": checked, "differ": differ}


# --- the test's own gradients and payloads (no optimizer involved) ------------------------------
clone = mlp()  # outside the strategy scope: a plain single-device model


@tf.function  # a graph, as fit's (the same kernel fusions, so the same float gradients)
def clone_gradient(x, y):
    with tf.GradientTape() as tape:
        # What fit computes per replica: the mean loss of the replica's half batch, scaled by 1/replicas.
        loss = keras.losses.MeanSquaredError()(y, clone(x, training=True)) * (1.0 / R)
    return tape.gradient(loss, clone.trainable_variables)


def replica_gradients(weights, xb, yb):
    clone.set_weights(weights)
    half = len(xb) // R  # replica r gets rows [r * half, (r + 1) * half) of the global batch
    return [[g.numpy() for g in clone_gradient(xb[r * half:(r + 1) * half], yb[r * half:(r + 1) * half])]
            for r in range(R)]


def own_payloads(grads, compression, step):
    layout = nd.BucketLayout([g.size for g in grads[0]], compression.bucket_size)
    payloads = [nd.encode(layout.to_buckets([tf.constant(g) for g in grads[r]]), compression,
                          nd.replica_seed(compression, step, r)) for r in range(R)]
    decoded = [nd.decode(p, compression, layout.num_buckets).numpy() for p in payloads]
    return np.stack([p.numpy() for p in payloads]), np.stack(decoded)


# What the optimizer really sends: the all-gather, wrapped (trace time: static shapes; run time: the
# gathered payloads as each replica receives them).
captured, traced_shapes = [], []
real_all_gather = nd_optimizer.all_gather_payloads


def capturing_all_gather(payload, context=None):
    gathered = real_all_gather(payload, context)
    traced_shapes.append([payload.shape.as_list(), gathered.shape.as_list()])

    def keep(value):
        captured.append(np.array(value))
        return np.int32(0)

    token = tf.numpy_function(keep, [gathered], tf.int32, stateful=True)
    with tf.control_dependencies([token]):
        return tf.identity(gathered)


rng = np.random.default_rng(0)
x_small = (0.5 * rng.normal(size=(32, 7))).astype(np.float32)
y_small = rng.normal(size=(32, 3)).astype(np.float32)


def exactness_run(compression_args, x, y):
    """Two fit steps with compressed SGD(learning_rate=1.0), no momentum: w <- w - aggregated gradient."""
    del captured[:], traced_shapes[:]
    model = build(lambda: nd.compress_gradients(keras.optimizers.SGD(learning_rate=1.0), **compression_args))
    compression = model.optimizer.gradient_compression
    snaps = Snapshots()
    nd_optimizer.all_gather_payloads = capturing_all_gather
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, shuffle=False, verbose=0,
                  callbacks=[snaps])
    finally:
        nd_optimizer.all_gather_payloads = real_all_gather
    steps = []
    for step in range(len(snaps.weights) - 1):
        before = snaps.weights[step]
        grads = replica_gradients(before, x[16 * step:16 * (step + 1)], y[16 * step:16 * (step + 1)])
        payloads, decoded = own_payloads(grads, compression, step)
        steps.append({"before": [hexed(w) for w in before], "after": [hexed(w) for w in snaps.weights[step + 1]],
                      "grads": [[hexed(g) for g in replica] for replica in grads],
                      "payloads": hexed(payloads), "decoded": hexed(decoded),
                      "sent": [hexed(s) for s in captured[R * step:R * (step + 1)]]})  # one per replica
    return {"compression": compression.get_config(), "steps": steps, "traced_shapes": traced_shapes[:],
            "sizes": [int(np.prod(v.shape)) for v in model.trainable_variables],
            "exchange_size": list(nd.exchange_size(model.trainable_variables, model.optimizer)),
            "iterations": int(model.optimizer.iterations.numpy()),
            "replicas": replicas_identical(model.variables + model.optimizer.variables)}


t = time.time()
CONFIGS = [("nuqsgd", 2, 16), ("nuqsgd", 4, None), ("nuqsgd", 8, 16),
           ("qsgd", 2, None), ("qsgd", 4, 16), ("qsgd", 8, 16),
           ("qsgdinf", 2, 16), ("qsgdinf", 4, 16), ("qsgdinf", 8, None)]
out["exact"] = [exactness_run(dict(method=m, bits=b, bucket_size=s), x_small, y_small) for m, b, s in CONFIGS]
# Both replicas get the same 8 examples: equal gradients, so only the per-replica noise tells them apart.
x_same, y_same = np.concatenate([x_small[:8]] * 2), np.concatenate([y_small[:8]] * 2)
out["same_data"] = exactness_run(dict(method="nuqsgd", bits=4, bucket_size=16), x_same[:16], y_same[:16])
out["timings"]["exact"] = time.time() - t


# --- a few epochs of Adam per method; seeds; "none" against plain Adam; collectives ----------
def collectives(function):
    """Per traced graph of a tf.function (its function library included): [op, device, dtype] of each collective."""
    graphs = []
    for concrete in function._list_all_concrete_functions():
        graph_def = concrete.graph.as_graph_def()
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        graphs.append(sorted([n.op, n.device.rsplit("/", 1)[-1], tf.dtypes.as_dtype(n.attr["T"].type).name]
                             for n in nodes if "Collective" in n.op or "Nccl" in n.op))
    return graphs


t = time.time()
x_fit = rng.normal(size=(64, 7)).astype(np.float32)
y_fit = (x_fit[:, :3] - 0.5 * x_fit[:, 3:6] + 0.1 * rng.normal(size=(64, 3))).astype(np.float32)
fit_data = tf.data.Dataset.from_tensor_slices((x_fit, y_fit)).batch(16)
RUNS = {"nuqsgd": dict(method="nuqsgd", bits=4, bucket_size=16), "qsgd": dict(method="qsgd", bits=8, bucket_size=16),
        "qsgdinf": dict(method="qsgdinf", bits=2, bucket_size=16), "none": dict(method="none"),
        "nuqsgd_again": dict(method="nuqsgd", bits=4, bucket_size=16),
        "nuqsgd_seed1": dict(method="nuqsgd", bits=4, bucket_size=16, seed=1), "plain": None}
out["fits"] = {}
for name, args in RUNS.items():
    def make_optimizer(args=args):
        optimizer = keras.optimizers.Adam(0.01)
        return optimizer if args is None else nd.compress_gradients(optimizer, **args)
    model = build(make_optimizer, metrics=["mae"])
    history = model.fit(fit_data, epochs=3, shuffle=False, verbose=0).history
    out["fits"][name] = {"history": history, "weights": [hexed(w) for w in model.get_weights()],
                         "optimizer_class": type(model.optimizer).__name__,
                         "replicas": replicas_identical(model.variables + model.optimizer.variables),
                         "collectives": collectives(model.train_function)}
    if name == "nuqsgd":
        model.evaluate(fit_data, verbose=0)
        out["evaluate_collectives"] = collectives(model.test_function)
out["timings"]["fits"] = time.time() - t

# --- DistillationModel + paper_optimizer (N2UQAdam) on a 2-bit student -------------------------
t = time.time()
with strategy.scope():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    teacher = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Dense(16, activation="relu")(inp)))
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.Dense(16, activation="relu")(h)
    student = n2uq_tf.quantize_model(keras.Model(inp, keras.layers.Dense(4)(h)), bits=2)
    distiller = DistillationModel(student, teacher)
    # 8 bits: every variable's largest gradient survives compression, so its first Adam step is ~lr * multiplier.
    distiller.compile(nd.compress_gradients(paper_optimizer(1e-2, epochs=4, steps_per_epoch=4), "nuqsgd", bits=8,
                                            bucket_size=64))
x_d = rng.normal(size=(64, 6)).astype(np.float32)
y_d = rng.integers(0, 4, 64)


class FirstStep(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.before = [v.numpy() for v in student.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        if not hasattr(self, "after"):
            self.after = [v.numpy() for v in student.trainable_variables]


first = FirstStep()
history = distiller.fit(tf.data.Dataset.from_tensor_slices((x_d, y_d)).batch(16), epochs=4, verbose=0,
                        callbacks=[first]).history
optimizer = distiller.optimizer
out["distill"] = {
    "history": history, "optimizer_class": type(optimizer).__name__,
    "is_n2uq_adam": isinstance(optimizer, n2uq_tf.N2UQAdam),
    "is_compressed": isinstance(optimizer, nd.CompressedOptimizer),
    "compression": optimizer.gradient_compression.get_config(),
    "quantizer_lr_multiplier": optimizer.quantizer_lr_multiplier,
    "first_lr": float(n2uq_tf.LinearEpochDecay(1e-2, 4, 4)(0)),
    "variables": [{"name": v.name, "quantizer": bool(is_quantizer_variable(v)),
                   "multiplier": optimizer.lr_multiplier(v), "max_step": float(np.max(np.abs(a - b)))}
                  for v, b, a in zip(student.trainable_variables, first.before, first.after)],
    "replicas": replicas_identical(student.variables + optimizer.variables),
    "collectives": collectives(distiller.train_function)}
out["timings"]["distill"] = time.time() - t

# --- non-finite and huge gradient values: the compressed exchange beside the float all-reduce ---------
t = time.time()
NONFINITE = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
# (variable, index): (replica 0's value, replica 1's value); a (300 values) spans 5 buckets of 64.
BAD = {(0, 10): ("nan", 1.0), (0, 20): ("+inf", 1.0), (0, 30): ("+inf", "-inf"), (0, 40): ("-inf", "-inf"),
       (0, 130): (1.0, "nan"), (0, 200): ("-inf", 2e38), (1, 23): ("+inf", 0.5), (1, 34): ("nan", "nan")}


def bad_gradients(replica):
    rng = np.random.default_rng(40 + replica)
    grads = [rng.normal(size=300).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)]
    grads[0][250:254] = 1e38  # huge but finite: the float sum 2e38 is finite too
    for (variable, index), values in BAD.items():
        value = values[replica]
        grads[variable].reshape(-1)[index] = NONFINITE[value] if isinstance(value, str) else value
    return grads


def exchange_both(compression):
    @tf.function
    def run(grads):
        def step(gs):
            context = tf.distribute.get_replica_context()
            return (nd.exchange_compressed(gs, compression, tf.constant(0, tf.int64)),
                    context.all_reduce(tf.distribute.ReduceOp.SUM, gs))
        return strategy.run(step, args=(grads,))
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: [tf.constant(g) for g in bad_gradients(context.replica_id_in_sync_group)])
    compressed, floats = run(per_replica)
    local = lambda values: [[hexed(v) for v in replica]
                            for replica in zip(*[strategy.experimental_local_results(x) for x in values])]
    layout = nd.BucketLayout([300, 35], compression.bucket_size)
    buckets = [layout.to_buckets(bad_gradients(r)) for r in range(R)]
    seeds = [nd.replica_seed(compression, 0, r) for r in range(R)]
    return {"compression": compression.get_config(), "compressed": local(compressed), "float": local(floats),
            "grads": [[hexed(g) for g in bad_gradients(r)] for r in range(R)],
            "buckets": [hexed(b.numpy()) for b in buckets],
            "payloads": [hexed(nd.encode(b, compression, seed).numpy()) for b, seed in zip(buckets, seeds)],
            "uniform": [hexed(tf.random.stateless_uniform(b.shape, seed=seed).numpy())
                        for b, seed in zip(buckets, seeds)]}


out["nonfinite"] = [exchange_both(nd.GradientCompression(m, b, 64)) for m, b in (("nuqsgd", 4), ("qsgd", 8),
                                                                                  ("qsgdinf", 2))]
out["timings"]["nonfinite"] = time.time() - t
out["timings"]["total"] = time.time() - T0
print("RESULT" + json.dumps(out))
''')


def run_script(script, timeout=3600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):])


def array(hexed):
    dtype, shape, data = hexed
    return np.frombuffer(bytes.fromhex(data), dtype=dtype).reshape(shape)


def bits_of(a):
    return np.asarray(a, np.float32).view(np.int32)


@pytest.fixture(scope="module")
def mirrored():
    return run_script(MIRRORED_SCRIPT)


# --- the test's own decoder (NumPy, from the payload format) --------------------------------------

def magnitude_levels(method, bits):
    """float32 levels, written out from the definitions (not the package's tables)."""
    if method == "nuqsgd":  # {0, 2^(1-K), ..., 1/2, 1}, K = 2^(b-1) - 1
        k = 2 ** (bits - 1) - 1
        return np.array([0.0] + [2.0 ** e for e in range(1 - k, 1)], np.float32)
    s = 2 ** (bits - 1) - 1  # uniform {0, 1/s, ..., 1}
    return np.array([j / s for j in range(s + 1)], np.float32)


def exact_products(payload, compression, num_buckets):
    """float64 sign * level * norm of every value of a payload: exact (a product of two float32)."""
    bits, bucket = compression["bits"], compression["bucket_size"]
    code_words = num_buckets * bucket * bits // 32
    words = payload[:code_words].view(np.uint32)
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    codes = ((words[:, None] >> shifts) & (2 ** bits - 1)).reshape(num_buckets, bucket)
    norms = payload[code_words:code_words + num_buckets].view(np.float32).astype(np.float64)
    assert norms.shape == (num_buckets,) and not np.signbit(norms).any()  # no bucket with non-finite values
    assert not payload[code_words + num_buckets:].any()  # so an empty side list
    levels = magnitude_levels(compression["method"], bits).astype(np.float64)
    sign = np.where(codes >> (bits - 1), -1.0, 1.0)
    return (sign * levels[codes & (2 ** (bits - 1) - 1)] * norms[:, None]).reshape(-1)


def aggregate_candidates(products):
    """The float32 values a two-replica sum p0 + p1 can round to: separate roundings, or FMA either way."""
    p0, p1 = products
    r0, r1 = p0.astype(np.float32), p1.astype(np.float32)
    return np.stack([r0 + r1, (p0 + r1.astype(np.float64)).astype(np.float32),
                     (r0.astype(np.float64) + p1).astype(np.float32)])


def unflatten(layout, flat):
    """Each tensor's 1-D values from a flat (bucketed) NumPy vector, by the layout's segments."""
    return [np.concatenate([flat[position:position + length] for position, _, length in segments]
                           + [np.zeros(0, flat.dtype)]) for segments in layout.segments]


def check_step(run, step):
    """Asserts one fit step against the test's own computation; returns what it found."""
    compression = nd.GradientCompression(**run["compression"])
    layout = nd.BucketLayout(run["sizes"], compression.bucket_size)
    before = [array(w) for w in step["before"]]
    after = [array(w) for w in step["after"]]
    own = array(step["payloads"])  # [replicas, words]: encode(g_r, replica_seed(c, step, r))
    decoded = array(step["decoded"])
    assert own.shape == (2, compression.payload_words(layout.num_buckets))
    # Every replica received exactly the payloads the test computed, in replica order.
    assert len(step["sent"]) == 2
    for sent in step["sent"]:
        np.testing.assert_array_equal(array(sent), own)
    products = np.stack([exact_products(p, run["compression"], layout.num_buckets) for p in own])
    # The package's decode is the test's decode of the same bits (sign, level, norm; one rounding).
    np.testing.assert_array_equal(bits_of(decoded), bits_of(products.astype(np.float32)))
    candidates = aggregate_candidates(products)
    fused = 0
    per_tensor = [np.stack(rows) for rows in zip(*(unflatten(layout, c) for c in candidates))]
    for sums, w0, w1 in zip(per_tensor, before, after):
        sums = sums.reshape((3,) + w0.shape)
        expected = w0[None] - sums  # SGD, lr 1, no momentum: w + (-g * 1), one float32 rounding
        matches = bits_of(w1)[None] == bits_of(expected)
        # Bitwise the separately rounded sum; the FMA candidates are kept to say what went wrong if not.
        assert matches[0].all(), (run["compression"], "weights not the separately rounded sum",
                                  int(np.sum(~matches[0])), "of", matches[0].size,
                                  "matched by an FMA rounding:", int(np.sum(~matches[0] & matches[1:].any(axis=0))))
        fused += int(np.sum(~matches[0]))
    return {"products": products, "candidates": candidates, "fused_only": fused, "before": before, "after": after,
            "layout": layout, "grads": [[array(g) for g in replica] for replica in step["grads"]]}


# --- 1. the update is the sum over replicas of decode(encode(g_r)) --------------------------------

@pytest.mark.slow
def test_mirrored_update_is_sum_of_each_replicas_decoded_compression(mirrored):
    assert mirrored["replicas"] == 2
    runs = mirrored["exact"]
    covered = {(run["compression"]["method"], run["compression"]["bits"]) for run in runs}
    assert covered == {(m, b) for m in ("nuqsgd", "qsgd", "qsgdinf") for b in (2, 4, 8)}
    fused = {}
    for run in runs:
        assert len(run["steps"]) == 2 and run["iterations"] == 2, run["compression"]
        for step in run["steps"]:
            found = check_step(run, step)
            # Not a vacuous comparison: the step moved the weights by the compressed sum.
            moved = sum(int(np.sum(a != b)) for a, b in zip(found["after"], found["before"]))
            assert moved >= 5, run["compression"]  # of 58 (qsgd, 2 bits, bucket 128: most values round to 0)
            fused[(run["compression"]["method"], run["compression"]["bits"])] = found["fused_only"]
    assert not any(fused.values()), fused


@pytest.mark.slow
def test_compressed_sum_is_not_the_float_sum(mirrored):
    """The exchange really quantizes (8-bit qsgdinf: close to, but not, the float gradient sum)."""
    run = next(r for r in mirrored["exact"] if r["compression"] == {"method": "qsgdinf", "bits": 8, "bucket_size": 8192,
                                                                      "seed": 0})
    found = check_step(run, run["steps"][0])
    flat_sum = np.concatenate([(g0 + g1).reshape(-1) for g0, g1 in zip(*found["grads"])])
    layout = found["layout"]
    aggregated = np.concatenate(unflatten(layout, found["candidates"][0]))
    assert not np.allclose(aggregated, flat_sum, rtol=1e-3)
    assert np.corrcoef(aggregated, flat_sum)[0, 1] > 0.99


# --- 2. replicas stay bit-identical ----------------------------------------------------------------

@pytest.mark.slow
def test_replicas_stay_bit_identical(mirrored):
    for run in mirrored["exact"] + [mirrored["same_data"]]:
        assert run["replicas"] == {"checked": 9, "differ": []}, run["compression"]  # 4 weights, iterations, 4 momenta
    for name, fit in mirrored["fits"].items():
        # 4 weights + iterations + 2 x 4 Adam moments, after 3 epochs of 4 steps
        assert fit["replicas"] == {"checked": 13, "differ": []}, name
    assert mirrored["distill"]["replicas"]["differ"] == []
    assert mirrored["distill"]["replicas"]["checked"] > 20


# --- 3. "none" is the framework's optimizer, bit for bit -----------------------------------------

@pytest.mark.slow
def test_none_reproduces_plain_adam_bitwise(mirrored):
    fits = mirrored["fits"]
    none, plain = fits["none"], fits["plain"]
    assert (none["optimizer_class"], plain["optimizer_class"]) == ("CompressedAdam", "Adam")
    assert none["history"] == plain["history"]
    for a, b in zip(none["weights"], plain["weights"]):
        assert a == b  # dtype, shape and every byte
    assert none["history"]["loss"][-1] < 0.8 * none["history"]["loss"][0]
    # ... and the compressed runs are not the same training.
    for name in ("nuqsgd", "qsgd", "qsgdinf"):
        assert fits[name]["weights"] != plain["weights"], name
        assert fits[name]["history"]["loss"][-1] < 0.8 * fits[name]["history"]["loss"][0], name


# --- 4. rounding noise: independent per replica, repeatable per seed -------------------------------

@pytest.mark.slow
def test_rounding_noise_is_independent_per_replica(mirrored):
    run = mirrored["same_data"]
    step = run["steps"][0]
    g0, g1 = [[array(g) for g in replica] for replica in step["grads"]]
    for a, b in zip(g0, g1):  # the same data on both replicas: the same gradient, bit for bit
        np.testing.assert_array_equal(bits_of(a), bits_of(b))
    sent = array(step["sent"][0])
    codes_words = nd.GradientCompression(**run["compression"]).code_words(nd.BucketLayout(run["sizes"], 16).num_buckets)
    assert not np.array_equal(sent[0, :codes_words], sent[1, :codes_words])  # different codes ...
    np.testing.assert_array_equal(sent[0, codes_words:], sent[1, codes_words:])  # ... of the same norms
    found = check_step(run, step)
    d0, d1 = found["products"].astype(np.float32)
    assert np.mean(d0 != d1) > 0.2
    # Correlated noise would have applied 2 * decode(encode(g)) with one seed; it did not.
    layout = found["layout"]
    for doubled in (2 * d0, 2 * d1):
        applied_if_same = [w - d.reshape(w.shape) for d, w in zip(unflatten(layout, doubled), found["before"])]
        assert any(not np.array_equal(a, b) for a, b in zip(found["after"], applied_if_same))


@pytest.mark.slow
def test_fixed_seed_repeats_and_other_seed_changes_the_run(mirrored):
    fits = mirrored["fits"]
    assert fits["nuqsgd_again"]["weights"] == fits["nuqsgd"]["weights"]
    assert fits["nuqsgd_again"]["history"] == fits["nuqsgd"]["history"]
    assert fits["nuqsgd_seed1"]["weights"] != fits["nuqsgd"]["weights"]
    assert fits["nuqsgd_seed1"]["history"]["loss"] != fits["nuqsgd"]["history"]["loss"]


# --- 5. one fused collective per step ---------------------------------------------------------------

@pytest.mark.slow
def test_one_collective_gather_per_step_and_no_gradient_all_reduce(mirrored):
    fits = mirrored["fits"]
    one_gather = [["CollectiveGatherV2", "device:CPU:0", "float32"], ["CollectiveGatherV2", "device:CPU:1", "float32"]]
    framework = [["CollectiveReduceV2", "device:CPU:0", "float32"], ["CollectiveReduceV2", "device:CPU:1", "float32"]]
    for name in ("nuqsgd", "qsgd", "qsgdinf", "nuqsgd_seed1"):
        graphs = fits[name]["collectives"]
        assert graphs and all(graph == one_gather for graph in graphs), (name, graphs)
    assert mirrored["distill"]["collectives"] and all(g == one_gather for g in mirrored["distill"]["collectives"])
    for name in ("none", "plain"):
        graphs = fits[name]["collectives"]
        assert graphs and all(graph == framework for graph in graphs), (name, graphs)
    # Keras adds no collective of its own to the MirroredStrategy step (metrics go through
    # ReductionToOneDevice on CPU) nor to evaluate's.
    assert mirrored["evaluate_collectives"] == [[]]
    print("mirrored train step collectives: compressed", fits["nuqsgd"]["collectives"][0], "none",
          fits["none"]["collectives"][0])


# --- 6. DistillationModel + paper_optimizer ------------------------------------------------------------

@pytest.mark.slow
def test_distillation_with_compressed_paper_optimizer(mirrored):
    out = mirrored["distill"]
    assert out["optimizer_class"] == "CompressedN2UQAdam" and out["is_n2uq_adam"] and out["is_compressed"]
    assert out["compression"] == {"method": "nuqsgd", "bits": 8, "bucket_size": 64, "seed": 0}
    assert out["quantizer_lr_multiplier"] == 0.1
    losses = out["history"]["loss"]
    assert losses[-1] < losses[0]
    lr = out["first_lr"]
    assert lr == pytest.approx(1e-2 * 0.75)
    quantizer = [v for v in out["variables"] if v["quantizer"]]
    others = [v for v in out["variables"] if not v["quantizer"]]
    assert len(quantizer) >= 4 and len(others) >= 6
    # Adam's first step is lr * multiplier * g / (|g| + eps'): just under lr * multiplier where g != 0.
    for v in quantizer:
        assert v["multiplier"] == 0.1, v
        assert 0.095 * lr < v["max_step"] <= 0.1 * lr * 1.0001, v
    for v in others:
        assert v["multiplier"] == 1.0, v
        assert 0.95 * lr < v["max_step"] <= lr * 1.0001, v


# --- 6b. non-finite and huge gradient values --------------------------------------------------------------

def kinds_of(values):
    values = np.asarray(values, np.float32)
    return np.where(np.isnan(values), "nan", np.where(values == np.inf, "+inf",
                                                      np.where(values == -np.inf, "-inf", "finite")))


@pytest.mark.slow
def test_nonfinite_gradients_on_two_replicas_reach_the_sum_as_the_float_exchange_does(mirrored):
    """One NaN or Inf changes its own position of the sum, as in the float all-reduce, and nothing else."""
    import distribute_reference as ref
    for run in mirrored["nonfinite"]:
        config = run["compression"]
        method, bits, bucket = config["method"], config["bits"], config["bucket_size"]
        layout = nd.BucketLayout([300, 35], bucket)
        float_sum = np.concatenate([array(v).reshape(-1) for v in run["float"][0]])
        compressed = [np.concatenate([array(v).reshape(-1) for v in replica]) for replica in run["compressed"]]
        assert compressed[0].tobytes() == compressed[1].tobytes(), config  # replicas agree bit for bit
        for replica in run["float"][1:]:
            assert np.concatenate([array(v).reshape(-1) for v in replica]).tobytes() == float_sum.tobytes()
        # Where the float exchange gives NaN, +Inf or -Inf, so does the compressed one, and only there.
        np.testing.assert_array_equal(kinds_of(compressed[0]), kinds_of(float_sum), err_msg=str(config))
        assert np.sum(~np.isfinite(float_sum)) == 8  # the 8 bad places (-Inf + 2e38 is -Inf)
        # The sum is the reference decoding of each replica's payload, added in replica order ...
        payloads = np.stack([array(p) for p in run["payloads"]])
        with np.errstate(over="ignore", invalid="ignore"):
            expected = ref.decode_sum(payloads, method, bits, layout.num_buckets, bucket)
        np.testing.assert_array_equal(compressed[0], np.concatenate(unflatten(layout, expected)))
        # ... and each payload is the reference's: markers where the values were non-finite, the side list
        # of their kinds, norms of the finite values only.
        for r in range(2):
            buckets, uniform = array(run["buckets"][r]), array(run["uniform"][r])
            own = ref.encode_payload(buckets, method, bits, uniform)
            code_words = layout.num_buckets * bucket * bits // 32
            np.testing.assert_array_equal(payloads[r][code_words:], own[code_words:])  # norms, side list
            np.testing.assert_array_equal(payloads[r][:code_words], own[:code_words])


# --- 9 (with real payloads). exchange_size is what is sent -------------------------------------------

@pytest.mark.slow
def test_payload_sent_has_the_exchange_size(mirrored):
    for run in mirrored["exact"]:
        values, float_bytes, payload_bytes = run["exchange_size"]
        assert values == sum(run["sizes"]) == 58 and float_bytes == 4 * 58
        words = payload_bytes // 4
        assert payload_bytes == 4 * words
        # Traced twice (fit's first call creates the optimizer's variables), once per replica each.
        assert run["traced_shapes"] and all(shapes == [[words], [2, None]] for shapes in run["traced_shapes"])
        for step in run["steps"]:
            for sent in step["sent"]:
                assert array(sent).shape == (2, words)


# --- 10. a single replica compresses too ---------------------------------------------------------------

def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((7,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def _regression_data(n=64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 7)).astype(np.float32)
    y = (x[:, :3] - 0.5 * x[:, 3:6] + 0.1 * rng.normal(size=(n, 3))).astype(np.float32)
    return x, y


@pytest.mark.slow
def test_single_replica_compresses_exactly_and_still_learns():
    x, y = _regression_data()
    # One step of compressed SGD(1.0): w - decode(encode(g, replica_seed(c, 0, 0))), bitwise.
    model = _mlp()
    optimizer = nd.compress_gradients(keras.optimizers.SGD(learning_rate=1.0), "qsgd", bits=4, bucket_size=16, seed=5)
    model.compile(optimizer, "mse")
    before = model.get_weights()
    clone = _mlp()
    clone.set_weights(before)

    @tf.function
    def gradient(xb, yb):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(yb, clone(xb, training=True))  # one replica: no 1/R scaling
        return tape.gradient(loss, clone.trainable_variables)

    grads = gradient(x[:16], y[:16])
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)
    compression = optimizer.gradient_compression
    layout = nd.BucketLayout([int(np.prod(g.shape)) for g in grads], compression.bucket_size)
    payload = nd.encode(layout.to_buckets(grads), compression, nd.replica_seed(compression, 0, 0)).numpy()
    products = exact_products(payload, compression.get_config(), layout.num_buckets).astype(np.float32)
    for w0, w1, applied in zip(before, model.get_weights(), unflatten(layout, products)):
        np.testing.assert_array_equal(bits_of(w1), bits_of(w0 - applied.reshape(w0.shape)))
    flat = np.concatenate([g.numpy().reshape(-1) for g in grads])
    assert not np.allclose(np.concatenate(unflatten(layout, products)), flat, rtol=1e-3)

    # Training: compressed Adam learns and ends near uncompressed Adam, but is a different run.
    histories, weights = {}, {}
    for name in ("plain", "nuqsgd"):
        model = _mlp()
        optimizer = keras.optimizers.Adam(0.01)
        if name != "plain":
            optimizer = nd.compress_gradients(optimizer, "nuqsgd", bits=4, bucket_size=16)
        model.compile(optimizer, "mse")
        histories[name] = model.fit(x, y, batch_size=16, epochs=8, shuffle=False, verbose=0).history["loss"]
        weights[name] = model.get_weights()
    assert histories["nuqsgd"][-1] < 0.5 * histories["nuqsgd"][0]
    assert histories["nuqsgd"][-1] < 1.5 * histories["plain"][-1]
    assert any(not np.array_equal(a, b) for a, b in zip(weights["plain"], weights["nuqsgd"]))


@pytest.mark.slow
def test_nonfinite_gradients_on_one_replica_come_back_where_they_were():
    """With one replica the float exchange is the gradient itself: its NaN and Inf come back in place."""
    import distribute_reference as ref
    rng = np.random.default_rng(7)
    kernel, bias = rng.normal(size=(20, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    kernel[3, 4], kernel[11, 0], kernel[19, 9], bias[2] = np.nan, np.inf, -np.inf, np.nan
    kernel[7, :3] = 3e38  # a bucket whose L2 norm exceeds the largest float32
    variables = [tf.Variable(tf.zeros_like(kernel)), tf.Variable(tf.zeros_like(bias))]
    for method in ("nuqsgd", "qsgd", "qsgdinf"):
        optimizer = nd.compress_gradients(keras.optimizers.SGD(1.0), method, bits=4, bucket_size=64)
        aggregated = optimizer.aggregate_gradients(list(zip([tf.constant(kernel), tf.constant(bias)], variables)))
        out = np.concatenate([g.numpy().reshape(-1) for g, _ in aggregated])
        grads = np.concatenate([kernel.reshape(-1), bias])
        np.testing.assert_array_equal(kinds_of(out), kinds_of(grads), err_msg=method)
        compression = optimizer.gradient_compression
        layout = nd.BucketLayout([200, 10], 64)
        seed = nd.replica_seed(compression, optimizer.iterations, 0)
        buckets = layout.to_buckets([kernel, bias])
        payload = ref.encode_payload(buckets.numpy(), method, 4,
                                     tf.random.stateless_uniform(buckets.shape, seed=seed).numpy())
        expected = ref.decode_payload(payload, method, 4, layout.num_buckets, 64)
        np.testing.assert_array_equal(out, np.concatenate(unflatten(layout, expected)), err_msg=method)


# --- 7. saving and loading -----------------------------------------------------------------------------

def _trained_compressed_model(seed=3):
    x, y = _regression_data()
    model = _mlp()
    model.compile(nd.compress_gradients(keras.optimizers.Adam(0.01, beta_1=0.8), "qsgd", bits=8, bucket_size=16,
                                        seed=seed), "mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model, x, y


def test_keras_file_round_trip_keeps_the_compressed_optimizer(tmp_path):
    model, x, y = _trained_compressed_model()
    path = str(tmp_path / "compressed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    original, restored = model.optimizer, loaded.optimizer
    assert type(restored) is type(original)  # the one CompressedAdam class
    assert isinstance(restored, nd.CompressedOptimizer) and isinstance(restored, keras.optimizers.Adam)
    assert restored.gradient_compression == original.gradient_compression == nd.GradientCompression("qsgd", 8, 16, 3)
    assert restored.get_config() == original.get_config()
    assert len(restored.variables) == len(original.variables) == 9
    for a, b in zip(original.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(restored.iterations.numpy()) == 4
    # Training on continues identically: same state, same (seed, step, replica) noise.
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip():
    base = keras.optimizers.Adam(learning_rate=0.02, beta_1=0.7, epsilon=1e-6, name="my_adam")
    optimizer = nd.compress_gradients(base, "qsgdinf", bits=2, bucket_size=64, seed=9)
    config = optimizer.get_config()
    assert config["compression"] == {"method": "qsgdinf", "bits": 2, "bucket_size": 64, "seed": 9}
    assert config["optimizer"]["config"] == base.get_config()
    json.dumps(config, default=float)  # (Keras' own config holds a NumPy float32 learning rate)
    for rebuilt in (type(optimizer).from_config(config), nd.CompressedOptimizer.from_config(config),
                    keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)),
                    keras.optimizers.get(keras.saving.serialize_keras_object(optimizer)),
                    keras.optimizers.deserialize(keras.optimizers.serialize(optimizer, use_legacy_format=True),
                                                 use_legacy_format=True)):
        assert type(rebuilt) is type(optimizer), rebuilt
        assert rebuilt.gradient_compression == optimizer.gradient_compression
        assert rebuilt.get_config() == config
    # Every compressed class is saved under the one registered name.
    assert keras.optimizers.serialize(optimizer)["registered_name"] == "n2uq_tf>CompressedOptimizer"
    assert keras.optimizers.serialize(optimizer, use_legacy_format=True)["class_name"] == "n2uq_tf>CompressedOptimizer"
    # A base optimizer's own config through the compressed class gives that class with compression off.
    plain_config = type(optimizer).from_config(base.get_config())
    assert not plain_config.gradient_compression.enabled
    with pytest.raises(ValueError, match="compressed-optimizer config"):
        nd.CompressedOptimizer.from_config(base.get_config())
    # The paper optimizer keeps its own hyperparameters through compression.
    paper = nd.compress_gradients(n2uq_tf.paper_optimizer(1e-3, epochs=4, steps_per_epoch=3), "nuqsgd")
    assert isinstance(paper, n2uq_tf.N2UQAdam) and paper.quantizer_lr_multiplier == 0.1
    again = keras.optimizers.deserialize(keras.optimizers.serialize(paper))
    assert type(again) is type(paper) and again.get_config() == paper.get_config()


def test_checkpoint_restores_into_the_uncompressed_base_optimizer(tmp_path):
    model, x, y = _trained_compressed_model()
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    fresh = _mlp(seed=11)
    plain = keras.optimizers.Adam(0.01, beta_1=0.8)
    plain.build(fresh.trainable_variables)
    assert [v.shape for v in plain.variables] == [v.shape for v in model.optimizer.variables]
    status = tf.train.Checkpoint(model=fresh, optimizer=plain).restore(prefix)
    status.assert_existing_objects_matched()
    for a, b in zip(model.optimizer.variables, plain.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    # And the other way: a plain optimizer's checkpoint into a compressed one.
    back = nd.compress_gradients(keras.optimizers.Adam(0.01, beta_1=0.8), "nuqsgd")
    other = _mlp(seed=12)
    back.build(other.trainable_variables)
    tf.train.Checkpoint(model=other, optimizer=back).restore(prefix).assert_existing_objects_matched()
    for a, b in zip(plain.variables, back.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- 8. errors -------------------------------------------------------------------------------------------

def test_legacy_optimizer_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"legacy.*SGD|SGD.*legacy"):
        nd.compress_gradients(keras.optimizers.legacy.SGD(0.1))


def test_built_or_already_compressed_optimizer_is_refused():
    model = _mlp()
    built = keras.optimizers.Adam()
    built.build(model.trainable_variables)
    with pytest.raises(ValueError, match="already built"):
        nd.compress_gradients(built)
    compressed = nd.compress_gradients(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="already compresses"):
        nd.compress_gradients(compressed, "qsgd")


@pytest.mark.parametrize("kwargs, argument", [
    (dict(method="topk"), "method"), (dict(method=4), "method"), (dict(method=None), "method"),
    (dict(bits=3), "bits"), (dict(bits=16), "bits"), (dict(bits=True), "bits"), (dict(bits="4"), "bits"),
    (dict(bits=4, bucket_size=0), "bucket_size"), (dict(bits=4, bucket_size=-8), "bucket_size"),
    (dict(bits=4, bucket_size=12), "bucket_size"), (dict(bits=2, bucket_size=8), "bucket_size"),
    (dict(bucket_size=8.0), "bucket_size"), (dict(bucket_size=True), "bucket_size"),
    (dict(seed=1.5), "seed"),
])
def test_bad_compression_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        nd.compress_gradients(keras.optimizers.SGD(0.1), **kwargs)


def test_exchange_in_cross_replica_context_is_a_runtime_error():
    compression = nd.GradientCompression("nuqsgd", 4, 8)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert tf.distribute.get_replica_context() is None
        with pytest.raises(RuntimeError, match="replica context"):
            nd.exchange_compressed([tf.ones([8])], compression, tf.constant(0, tf.int64))


# --- 9. exchange_size --------------------------------------------------------------------------------------

def test_exchange_size_of_a_million_parameters():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])  # 1,001,000 parameters
    params = 1000 * 1000 + 1000
    none = nd.exchange_size(model.trainable_variables, nd.GradientCompression("none"))
    assert (none.values, none.float32_bytes, none.bytes, none.ratio) == (params, 4 * params, 4 * params, 1.0)
    optimizer = nd.compress_gradients(keras.optimizers.Adam(), "nuqsgd", bits=4, bucket_size=8192)
    size = nd.exchange_size(model.trainable_variables, optimizer)
    # The kernel's 122 whole buckets (999,424 values) are its own; its tail (576) and the bias (1000)
    # share one more; per bucket 8192 codes of 4 bits = 1024 words, plus one float32 norm; then the
    # 4 words of the non-finite side list.
    assert size.bytes == 4 * ((122 + 1) * (1024 + 1) + 4) == 504_316
    assert (size.values, size.float32_bytes) == (params, 4 * params)
    assert size.ratio == pytest.approx(4 * params / 504_316) and size.ratio >= 7
    two_bits = nd.exchange_size(model.trainable_variables, nd.GradientCompression("qsgd", 2))  # bucket 128
    assert two_bits.bytes == 4 * ((7812 + 9) * (8 + 1) + 4)  # 7812 whole buckets; tail 64 + bias 1000 share 9
