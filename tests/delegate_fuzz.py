"""Mutants of an exported 2-bit model, run in child processes with an ASan + UBSan build of the delegate.

Used by tests/test_delegate_fuzz.py (a fixed-seed sample in the test suite, a larger one with
`make fuzz`: FUZZ_CASES, FUZZ_SEED) and by the malformed-model test of tests/test_delegate.py.
Each mutant is a .tflite file; a child process (python with libasan preloaded) runs its jobs
one after the other (interpreter with the sanitized plugin, allocate, set random inputs,
invoke) and prints a line per job, so a crash loses only the job that crashed: the parent
restarts a child after it.

Mutation classes (`CLASSES`): truncations; bit flips anywhere in the file; bit flips in the
custom options, the packed weight buffers and the shape vectors of N2UQ ops; shape, rank and
type edits of N2UQ ops' tensors; option edits (every option of every N2UQ op set to
boundary, out-of-range, float and bool values, removed, and the padding mode changed; the
fused ops' output-stage options too); op-I/O edits (every input slot -> -1, each output -> a
constant tensor of the same or another shape, each output aliased to each input); resized inputs
(random batch, height, width). The base model has every N2UQ op, fused and not.

In tf.lite, files that LiteRT's verifying loader refuses are not run (tf.lite's own loader
does not verify and crashes on many of them, which is no news about the delegate).

Outcomes: "ran", "error" (the interpreter raised; the message is kept) or "crash". A crash
counts against us only when the sanitizer report or crash stack has a frame in our code (the
plugin library or tflite_tools/ sources; UBSan instruments nothing else): the stock runtime
itself crashes on some random corruptions without our delegate, and those are counted as
"stock crash".
"""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np

import native_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "tflite_tools", "tflite")
CORE_DIR = os.path.join(ROOT, "tflite_tools", "core")
N2UQ_OPS = ("N2UQQuantizePack", "N2UQQuantize", "N2UQConv2D", "N2UQDepthwiseConv2D", "N2UQFullyConnected",
            "N2UQConv2DFused", "N2UQDepthwiseConv2DFused", "N2UQFullyConnectedFused", "N2UQMaxPool2DFused")
QUANTIZE_OPS = ("N2UQQuantizePack", "N2UQQuantize")  # the others hold a layer's packed weights (input 1)
RANDOM_CLASSES = ("truncate", "bitflip_file", "bitflip_options", "bitflip_weights", "bitflip_shape", "shape_edit",
                  "rank_edit", "type_edit")
CLASSES = RANDOM_CLASSES + ("option_edit", "op_io_edit", "resize")

Mutant = collections.namedtuple("Mutant", "cls label content resize")


# ------------------------------------------------------------------ the sanitized plugin

def asan_plugin():
    """The delegate plugin built with AddressSanitizer + UBSan (cached by source content); its path."""
    from n2uq_tf import _native
    sources = [os.path.join(PLUGIN_DIR, n) for n in _native.DELEGATE_COMPILED]
    sources += [os.path.join(CORE_DIR, n) for n in _native.CORE_COMPILED]
    headers = [os.path.join(PLUGIN_DIR, n) for n in _native.DELEGATE_HEADERS_AND_SOURCES if n.endswith(".h")]
    headers += [os.path.join(CORE_DIR, n) for n in _native.CORE_HEADERS_AND_SOURCES if n.endswith(".h")]
    command = ([_native.compiler()] + native_build.SANITIZER_FLAGS
               + ["-fPIC", "-shared", "-fvisibility=hidden", "-I" + CORE_DIR, "-I" + PLUGIN_DIR])
    return native_build.cached_binary("n2uq_delegate_asan", command, sources, headers)


def sanitizer_env():
    """Environment of a Python child that loads the sanitized plugin.

    Python itself is not instrumented, so the ASan runtime is preloaded (with libstdc++, whose
    __cxa_throw ASan must find at start-up). Leak checking is off (the interpreter's own leaks);
    allocations over 1 GiB fail like a failed malloc instead of filling the machine; ASan prints
    a stack for SIGSEGV / SIGABRT / SIGBUS / SIGFPE / SIGILL too, so every crash can be placed.
    """
    from n2uq_tf import _native
    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):
        path = subprocess.run([_native.compiler(), f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip()
        assert os.path.isabs(path) and os.path.exists(path), f"the compiler has no {name} (needed for ASan)"
        libs.append(path)
    return dict(os.environ, LD_PRELOAD=" ".join(libs), TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore",
                ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1:"
                             "max_allocation_size_mb=1024:handle_abort=1:handle_sigill=1:handle_sigfpe=1:"
                             "handle_segv=1:handle_sigbus=1",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


# ------------------------------------------------------------------ the base model

def base_model():
    """An exported 2-bit model with every N2UQ op (the .tflite bytes): 'same' convs with stride 2 whose
    sum goes through ReLU (one fused with the residual add and the ReLU, writing the byte codes of a
    'same' depthwise with dilation 2 and multiplier 2, the other plain); that depthwise fused with
    ReLU6 and the packing for an explicit-pad conv (plain: pooled); dense -> ReLU -> dense (fused,
    plain); a depthwise on the input (plain byte-code quantizer, plain depthwise); ReLU, zero pad and a
    3x3 / 2 max pool of the input (fused with the packing for the conv after it)."""
    import n2uq_tf
    from n2uq_tf._keras import keras
    from n2uq_tf.export import export_tflite
    from n2uq_tf.layers import PaddedConv2D
    L = keras.layers
    keras.utils.set_random_seed(11)
    inp = keras.Input((9, 9, 3))
    a = L.Conv2D(8, 3, strides=2, padding="same", name="conv_same")(inp)
    b = L.Conv2D(8, 1, strides=2, padding="same", name="conv_skip")(inp)
    x = L.ReLU(name="relu")(L.Add(name="add")([a, b]))
    x = L.DepthwiseConv2D(3, padding="same", dilation_rate=2, depth_multiplier=2, name="dw")(x)
    x = L.ReLU(6.0, name="relu6")(x)
    x = PaddedConv2D(8, 3, explicit_padding=((1, 1), (0, 1)), name="conv_explicit")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(6, activation="relu", name="fc1")(x)
    x = L.Dense(5, name="fc")(x)
    side = L.GlobalAveragePooling2D(name="side_gap")(L.DepthwiseConv2D(3, name="dw_input")(inp))
    pooled = L.MaxPooling2D(3, strides=2, name="pool")(L.ZeroPadding2D(1, name="pool_pad")(L.ReLU(name="in_relu")(inp)))
    pooled = L.GlobalAveragePooling2D(name="pool_gap")(L.Conv2D(4, 3, padding="same", name="conv_pooled")(pooled))
    model = n2uq_tf.quantize_model(keras.Model(inp, [x, side, pooled]), bits=2, skip_layers=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_tflite(model)


# ------------------------------------------------------------------ mutations

def _read(content):
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.read_model_from_bytearray(bytearray(content))


def _write(model):
    from tensorflow.lite.tools import flatbuffer_utils
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _n2uq_ops(model):
    """[(op name, operator)] of the first subgraph's N2UQ ops, in graph order."""
    codes = [c.customCode.decode() if c.customCode else None for c in model.operatorCodes]
    graph = model.subgraphs[0]
    return [(codes[op.opcodeIndex], op) for op in graph.operators if codes[op.opcodeIndex] in N2UQ_OPS]


def _flip_bits(data, rng, count):
    data = bytearray(data)
    for _ in range(count):
        bit = int(rng.integers(0, 8 * len(data)))
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _random_mutant(cls, rng, base):
    """One mutant of a random class of RANDOM_CLASSES (from `rng`)."""
    if cls == "truncate":
        cut = int(rng.integers(0, len(base)))
        return Mutant(cls, f"first {cut} of {len(base)} bytes", base[:cut], None)
    if cls == "bitflip_file":
        count = int(rng.integers(1, 4))  # (the verifier refuses most files with more)
        return Mutant(cls, f"{count} bits", _flip_bits(base, rng, count), None)
    model = _read(base)
    graph = model.subgraphs[0]
    ops = _n2uq_ops(model)
    name, op = ops[int(rng.integers(0, len(ops)))]
    if cls == "bitflip_options":
        count = int(rng.integers(1, 5))
        op.customOptions = list(_flip_bits(bytes(bytearray(op.customOptions)), rng, count))
        label = f"{name}: {count} bits of its options"
    elif cls == "bitflip_weights":
        layer_ops = [(n, o) for n, o in ops if n not in QUANTIZE_OPS]
        name, op = layer_ops[int(rng.integers(0, len(layer_ops)))]
        buffer = model.buffers[graph.tensors[int(op.inputs[1])].buffer]
        count = int(rng.integers(1, 9))
        buffer.data = np.frombuffer(_flip_bits(buffer.data.tobytes(), rng, count), np.uint8).copy()
        label = f"{name}: {count} bits of its packed weights"
    else:
        slots = [int(i) for i in op.inputs] + [int(i) for i in op.outputs]
        index = slots[int(rng.integers(0, len(slots)))]
        tensor = graph.tensors[index]
        shape = [int(d) for d in tensor.shape] if tensor.shape is not None else []
        if cls == "bitflip_shape" and shape:
            axis, bit = int(rng.integers(0, len(shape))), int(rng.integers(0, 32))
            shape[axis] = int(np.array(shape[axis], np.int32).view(np.uint32) ^ np.uint32(1 << bit))
            shape[axis] = int(np.array(shape[axis], np.uint32).view(np.int32))
            label = f"{name}: tensor {index} dim {axis} bit {bit}"
        elif cls in ("shape_edit", "bitflip_shape"):
            axis = int(rng.integers(0, max(len(shape), 1)))
            value = int(rng.choice([0, 1, -1, 2, 3, 7, 64, 65, 2 ** 16, 2 ** 31 - 1, -2 ** 31]))
            if shape:
                shape[axis] = shape[axis] + 1 if value == 2 else shape[axis] - 1 if value == 3 else value
            label = f"{name}: tensor {index} dim {axis} -> {shape[axis] if shape else None}"
        elif cls == "rank_edit":
            if shape and rng.random() < 0.5:
                del shape[int(rng.integers(0, len(shape)))]
            else:
                shape.insert(int(rng.integers(0, len(shape) + 1)), int(rng.choice([1, 2, 3])))
            label = f"{name}: tensor {index} shape -> {shape}"
        elif cls == "type_edit":
            tensor.type = int(rng.integers(0, 18))
            label = f"{name}: tensor {index} type -> {tensor.type}"
        else:
            raise ValueError(cls)
        tensor.shape = np.array(shape, np.int32)
        tensor.shapeSignature = None
    return Mutant(cls, label, _write(model), None)


_OPTION_VALUES = (None, 0, -1, 1, 2, 3, 4, 5, 64, 4097, 2 ** 24 + 1, 2 ** 31, -2 ** 31, 2 ** 40, 1.5, True)
_FLOAT_VALUES = (0.0, -1.0, 1e38, float("nan"), float("inf"), -float("inf"), 7)


def option_edits(base):
    """Edits of the options of every N2UQ op of `base`, grouped by (op position, option): each option
    set to each of a list of values or removed, an unknown option added, the padding mode switched
    with and without pads. {(position, key): [(label, position, changes)]}."""
    from flatbuffers import flexbuffers
    model = _read(base)
    groups = {}
    for position, (name, op) in enumerate(_n2uq_ops(model)):
        options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
        for key, value in options.items():
            values = _FLOAT_VALUES + (None,) if isinstance(value, float) else _OPTION_VALUES
            groups[position, key] = [(f"{name} #{position}: {key} -> {'removed' if new is None else new!r}",
                                      position, {key: new}) for new in values]
        groups[position, "unknown_option"] = [(f"{name} #{position}: unknown option", position, {"unknown_option": 3})]
        if "kernel_height" in options:  # the padding mode, with and without pads
            pads = {"pad_top": 1, "pad_bottom": 1, "pad_left": 1, "pad_right": 1}
            no_pads = dict.fromkeys(pads)
            groups.setdefault((position, "padding"), [])
            groups[position, "padding"] += [
                (f"{name} #{position}: padding {mode}, pads as they were", position, {"padding": mode})
                for mode in (0, 1)]
            groups[position, "padding"] += [
                (f"{name} #{position}: padding 1 with pads 1", position, dict(pads, padding=1)),
                (f"{name} #{position}: padding 1 without pads", position, dict(no_pads, padding=1)),
                (f"{name} #{position}: padding 0 without pads", position, dict(no_pads, padding=0)),
                (f"{name} #{position}: no padding option, pads 1", position, dict(pads, padding=None))]
    return groups


def apply_option_edit(base, position, changes):
    from flatbuffers import flexbuffers
    model = _read(base)
    _, op = _n2uq_ops(model)[position]
    options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
    for key, value in changes.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value
    op.customOptions = list(flexbuffers.Dumps(options))
    return _write(model)


def op_io_edits(base, names=None):
    """For the first op of each N2UQ op type in `names` (default: every one, all required): each input
    slot -> -1, every input slot -> -1, each output -> a new constant tensor of its own shape and of
    another shape, each output aliased to each input. [(op name, label, content)]."""
    from tensorflow.lite.python import schema_py_generated as schema
    item_bytes = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 9: 1}
    model = _read(base)
    firsts = {}
    for position, (name, _op) in enumerate(_n2uq_ops(model)):
        firsts.setdefault(name, position)
    if names is None:
        assert set(firsts) == set(N2UQ_OPS), f"the base model lacks {set(N2UQ_OPS) - set(firsts)}"
        names = N2UQ_OPS
    out = []

    def edited(position, edit):
        model = _read(base)
        graph = model.subgraphs[0]
        _, op = _n2uq_ops(model)[position]
        edit(model, graph, op)
        return _write(model)

    def to_constant(slot, shape_of):
        def edit(model, graph, op):
            tensor = graph.tensors[int(op.outputs[slot])]
            shape = shape_of([int(d) for d in tensor.shape])
            constant = schema.TensorT()
            constant.shape, constant.type, constant.name = np.array(shape, np.int32), tensor.type, "constant"
            buffer = schema.BufferT()
            buffer.data = np.arange(int(np.prod(shape)) * item_bytes[tensor.type], dtype=np.uint8)
            model.buffers.append(buffer)
            constant.buffer = len(model.buffers) - 1
            graph.tensors.append(constant)
            old = int(op.outputs[slot])
            op.outputs = np.array([len(graph.tensors) - 1 if i == slot else v for i, v in enumerate(op.outputs)],
                                  np.int32)
            # Later ops read the constant now (as a model whose output was made constant would).
            for other in graph.operators:
                if other is not op and other.inputs is not None:
                    other.inputs = np.where(other.inputs == old, len(graph.tensors) - 1, other.inputs).astype(np.int32)
            graph.outputs = np.where(graph.outputs == old, len(graph.tensors) - 1, graph.outputs).astype(np.int32)
        return edit

    for name in names:
        position = firsts[name]
        _, op = _n2uq_ops(model)[position]
        inputs, outputs = len(op.inputs), len(op.outputs)
        for slot in range(inputs):
            def edit(model, graph, op, slot=slot):
                op.inputs = np.array([-1 if i == slot else v for i, v in enumerate(op.inputs)], np.int32)
            out.append((name, f"input {slot} -> -1", edited(position, edit)))
        out.append((name, "every input -> -1", edited(
            position, lambda m, g, op: setattr(op, "inputs", np.full(len(op.inputs), -1, np.int32)))))
        for o in range(outputs):
            which = "output" if outputs == 1 else f"output {o}"
            out.append((name, f"{which} -> a constant of its shape", edited(position, to_constant(o, lambda s: s))))
            out.append((name, f"{which} -> a constant of another shape",
                        edited(position, to_constant(o, lambda s: [2, 3]))))
            for slot in range(inputs):
                def edit(model, graph, op, slot=slot, o=o):
                    op.outputs = np.array([op.inputs[slot] if i == o else v for i, v in enumerate(op.outputs)],
                                          np.int32)
                out.append((name, f"{which} aliased to input {slot}", edited(position, edit)))
    return out


def resize_cases(rng, count):
    """Random input shapes (batch 1-3, height and width 1-40, odd and even, square or not)."""
    return [(int(rng.integers(1, 4)), int(rng.integers(1, 41)), int(rng.integers(1, 41)), 3) for _ in range(count)]


def campaign(base, cases, seed):
    """The mutants of one campaign: `cases` random mutants spread evenly over RANDOM_CLASSES;
    max(1, cases // 200) random edits of every option of every N2UQ op (of its 1-23 edits);
    every op-I/O edit; max(1, cases // 10) resized inputs."""
    rng = np.random.default_rng(seed)
    mutants = []
    for i in range(cases):
        mutants.append(_random_mutant(RANDOM_CLASSES[i % len(RANDOM_CLASSES)], rng, base))
    per_option = max(1, cases // 200)
    for group in option_edits(base).values():
        for i in sorted(rng.permutation(len(group))[:per_option]):
            label, position, changes = group[int(i)]
            mutants.append(Mutant("option_edit", label, apply_option_edit(base, position, changes), None))
    for name, label, content in op_io_edits(base):
        mutants.append(Mutant("op_io_edit", f"{name}: {label}", content, None))
    for shape in resize_cases(rng, max(cases // 10, 1)):
        mutants.append(Mutant("resize", f"input {list(shape)}", base, shape))
    return mutants


# ------------------------------------------------------------------ running in children

_CHILD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    jobs_path, plugin, backend = sys.argv[1:4]
    from ai_edge_litert import interpreter as litert
    if backend == "litert":
        module, load = litert, litert.load_delegate
    else:
        import tensorflow as tf
        module, load = tf.lite, tf.lite.experimental.load_delegate
    with open(jobs_path) as f:
        jobs = json.load(f)
    for job_id, path, resize in jobs:
        print("START", job_id, flush=True)
        try:
            if backend != "litert":
                # tf.lite loads a file without the flatbuffer verifier and crashes in its own loader
                # on many corrupt files, before any delegate runs: screen them with LiteRT's loader.
                try:
                    litert.Interpreter(model_path=path)
                except ValueError as error:
                    if "not a valid Flatbuffer" in str(error):
                        raise
                except Exception:
                    pass
            it = module.Interpreter(model_path=path, experimental_delegates=[load(plugin)])
            if resize is not None:
                it.resize_tensor_input(it.get_input_details()[0]["index"], resize)
            it.allocate_tensors()
            rng = np.random.default_rng(0)
            for d in it.get_input_details():
                it.set_tensor(d["index"], rng.normal(0.5, 1.0, d["shape"]).astype(d["dtype"]))
            it.invoke()
            for d in it.get_output_details():
                it.get_tensor(d["index"])
            outcome = ["ran", ""]
        except Exception as error:
            outcome = ["error", f"{type(error).__name__}: {error}"]
        print("RESULT", job_id, json.dumps(outcome), flush=True)
""")

_FRAME = re.compile(r"^\s*#\d+ 0x[0-9a-f]+ (.*)$", re.M)  # "in function file:line" or "(module+offset)"


def classify_crash(stderr, plugin_path):
    """("ours" | "stock", summary) of a crashed child's stderr.

    Ours: a UBSan report (only our code is instrumented), or an ASan / signal report with a
    stack frame in the plugin or in tflite_tools/ sources. A crash without a stack to read is
    counted as ours: nothing shows it is not.
    """
    plugin_name = os.path.basename(plugin_path)
    summary = next((line.strip() for line in stderr.splitlines() if line.startswith("SUMMARY:")), "")
    if "runtime error:" in stderr:
        line = next(line for line in stderr.splitlines() if "runtime error:" in line)
        return "ours", summary or line.strip()
    frames = _FRAME.findall(stderr)
    if not frames:
        return "ours", summary or (stderr.strip().splitlines() or ["no output"])[-1]
    in_ours = [f for f in frames if plugin_name in f or "tflite_tools/" in f]
    return ("ours" if in_ours else "stock"), summary or frames[0]


def run_mutants(mutants, backend, plugin, env, workdir):
    """Runs every mutant in child processes; returns [(mutant, outcome, detail)] in order, with outcome
    "ran", "error", "crash-ours" or "crash-stock"."""
    jobs = []
    for i, mutant in enumerate(mutants):
        path = os.path.join(workdir, f"mutant_{i}.tflite")
        with open(path, "wb") as f:
            f.write(mutant.content)
        jobs.append([i, path, list(mutant.resize) if mutant.resize else None])
    results = {}
    pending = jobs
    while pending:
        jobs_path = os.path.join(workdir, "jobs.json")
        with open(jobs_path, "w") as f:
            json.dump(pending, f)
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run([sys.executable, "-c", _CHILD, jobs_path, plugin, backend], stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=env, cwd=workdir)
            err.seek(0)
            stderr = err.read()
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("RESULT "):
                _, job_id, outcome = line.split(" ", 2)
                results[int(job_id)] = tuple(json.loads(outcome))
                started = None
        if proc.returncode == 0 and started is None:
            break
        if started is None:  # died outside a job (start-up): nothing to blame on a mutant
            raise AssertionError(f"the {backend} child failed outside a job (rc {proc.returncode}):\n{stderr[-3000:]}")
        kind, summary = classify_crash(stderr, plugin)
        results[started] = (f"crash-{kind}", f"rc {proc.returncode}: {summary}\n{stderr[-6000:]}")
        pending = [job for job in pending if job[0] > started]
    return [(mutants[i], *results[i]) for i in range(len(mutants))]


def is_our_error(message):
    """An error our kernels reported (they name the op and its node)."""
    return any(re.search(rf"{name} \(node \d+\): ", message) for name in N2UQ_OPS)


def tally(results):
    """{class: Counter(outcome)} and a printable table."""
    counts = collections.defaultdict(collections.Counter)
    for mutant, outcome, detail in results:
        key = outcome
        if outcome == "error":
            key = "error (ours)" if is_our_error(detail) else "error (runtime)"
        counts[mutant.cls][key] += 1
    columns = ("ran", "error (ours)", "error (runtime)", "crash-stock", "crash-ours")
    lines = [f"{'class':<16}" + "".join(f"{c:>17}" for c in columns) + f"{'total':>8}"]
    for cls in CLASSES:
        if cls in counts:
            lines.append(f"{cls:<16}" + "".join(f"{counts[cls][c]:>17}" for c in columns)
                         + f"{sum(counts[cls].values()):>8}")
    return counts, "\n".join(lines)
