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

Builtin CONV_2D nodes the delegate claims (`builtin_conv_campaign`, with the delegate options
BUILTIN_CONV_OPTIONS): a tiny float32 and int8 stem (`builtin_conv_models`) with every targeted edit
of what the claim reads (the conv options, the quantization scale / zero-point vectors and quantized
dimension, the filter and bias buffers, the shape vectors, the types, the node's tensor lists) and
random combinations of them (classes BUILTIN_CONV_CLASSES).

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
# the delegate's kernels for builtin nodes: CONV_2D over few channels, and the PAD feeding one
BUILTIN_CONV_KERNELS = ("CONV_2D (int8)", "CONV_2D (float)", "PAD")
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
    jobs_path, plugin, backend, options = sys.argv[1:5]
    options = json.loads(options)
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
            it = module.Interpreter(model_path=path, experimental_delegates=[load(plugin, options)])
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


def run_mutants(mutants, backend, plugin, env, workdir, options=None):
    """Runs every mutant in child processes (the delegate created with `options`, a dict of its
    options); returns [(mutant, outcome, detail)] in order, with outcome "ran", "error", "crash-ours"
    or "crash-stock"."""
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
            proc = subprocess.run([sys.executable, "-c", _CHILD, jobs_path, plugin, backend, json.dumps(options or {})],
                                  stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=workdir)
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
    """An error our kernels reported (they name the op, or the builtin conv kernel, and its node)."""
    return any(re.search(re.escape(name) + r" \(node \d+\): ", message) for name in N2UQ_OPS + BUILTIN_CONV_KERNELS)


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
    for cls in CLASSES + BUILTIN_CONV_CLASSES:
        if cls in counts:
            lines.append(f"{cls:<16}" + "".join(f"{counts[cls][c]:>17}" for c in columns)
                         + f"{sum(counts[cls].values()):>8}")
    return counts, "\n".join(lines)


# ------------------------------------------------------------------ builtin CONV_2D nodes

CONV_2D, PAD = 3, 34  # BuiltinOperator
BUILTIN_CONV_OPTIONS = {"int8_conv": "all", "float_conv": "all"}  # claimed on any CPU
BUILTIN_CONV_CLASSES = ("conv_options", "conv_quantization", "conv_buffers", "conv_shapes", "conv_types", "conv_io",
                        "conv_random", "pad")


def builtin_conv_models():
    """{"float": bytes, "int8": bytes}: a tiny tf_keras stem with three CONV_2D nodes the delegate claims
    (int8_conv / float_conv = all) and the PAD before the first (claimed with it): zero padding
    (1, 2) x (2, 1), 3 -> 6 channels 3x3 / 2 'valid' + ReLU; 6 -> 5 channels 3x3 'same'; 5 -> 4
    channels 2x3 'valid' dilated (1, 2) + ReLU6. Converted in float32 and with full-integer int8
    quantization (per-channel filter scales, a float input and output around the int8 graph)."""
    import tensorflow as tf
    import tf_keras as keras
    keras.utils.set_random_seed(5)
    inp = keras.Input((9, 10, 3), batch_size=1)
    x = keras.layers.ZeroPadding2D(((1, 2), (2, 1)))(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="valid", activation="relu",
                            bias_initializer="random_normal")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", bias_initializer="random_normal")(x)
    x = keras.layers.Conv2D(4, (2, 3), padding="valid", dilation_rate=(1, 2), activation="relu6",
                            bias_initializer="random_normal")(x)
    model = keras.Model(inp, x)
    data = np.random.default_rng(1).normal(0.3, 1.5, (8, 9, 10, 3)).astype(np.float32)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["float"] = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([data[i:i + 1]] for i in range(len(data)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        out["int8"] = converter.convert()
    return out


def _builtin_ops(model, code):
    """The first subgraph's operators of builtin `code`, in graph order."""
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [op for op in model.subgraphs[0].operators if codes[op.opcodeIndex] == code]


def _conv_ops(model):
    return _builtin_ops(model, CONV_2D)


def _builtin_edited(content, code, nth, edit):
    model = _read(content)
    edit(model, model.subgraphs[0], _builtin_ops(model, code)[nth])
    return _write(model)


def _conv_tensor(graph, op, slot):
    """The conv's tensor `slot`: "input", "filter", "bias" or "output"."""
    index = op.outputs[0] if slot == "output" else op.inputs[("input", "filter", "bias").index(slot)]
    return graph.tensors[int(index)]


def _set_shape(tensor, shape):
    tensor.shape = np.array(shape, np.int32)
    tensor.shapeSignature = None


def _new_buffer(model, data):
    from tensorflow.lite.python import schema_py_generated as schema
    buffer = schema.BufferT()
    buffer.data = None if data is None else np.frombuffer(bytes(data), np.uint8).copy()
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _buffer_bytes(model, tensor):
    data = model.buffers[tensor.buffer].data
    return b"" if data is None else np.asarray(data, np.uint8).tobytes()


def _output_to_constant(m, g, op):
    """Makes the op's output a new constant tensor of its shape, type and quantization (zeros), read by
    the later ops and the graph's outputs in its place."""
    from tensorflow.lite.python import schema_py_generated as schema
    old = int(op.outputs[0])
    tensor = g.tensors[old]
    constant = schema.TensorT()
    constant.shape, constant.type, constant.name = np.array(tensor.shape, np.int32), tensor.type, "constant"
    constant.quantization = tensor.quantization
    item = 1 if tensor.type == 9 else 4
    constant.buffer = _new_buffer(m, bytes(int(np.prod(tensor.shape)) * item))
    g.tensors.append(constant)
    new = len(g.tensors) - 1
    op.outputs = np.array([new], np.int32)
    for other in g.operators:  # later ops read the constant now
        if other is not op and other.inputs is not None:
            other.inputs = np.where(other.inputs == old, new, other.inputs).astype(np.int32)
    g.outputs = np.where(g.outputs == old, new, g.outputs).astype(np.int32)


def builtin_conv_edits(kind):
    """[(class, label, edit(model, graph, op))]: the targeted edits of one CONV_2D of a `kind` ("int8" or
    "float") model, in the parts the delegate's claim reads: the conv options (builtin_data), the
    quantization vectors (int8), the filter and bias buffers, the shape vectors, the types and the
    node's tensor lists. Each edit gets a fresh copy of the buffers it changes."""
    edits = []

    def option(field, value):
        return lambda m, g, op: setattr(op.builtinOptions, field, value)

    for value in (0, 1, 2, 3, -1):  # schema Padding: SAME 0, VALID 1
        edits.append(("conv_options", f"padding {value}", option("padding", value)))
    for field in ("strideW", "strideH", "dilationWFactor", "dilationHFactor"):
        for value in (0, -1, 2, 1024, 1025, 2 ** 31 - 1, -2 ** 31):
            edits.append(("conv_options", f"{field} {value}", option(field, value)))
    for value in (0, 1, 2, 3, 4, 5, 6, -1, 127):
        edits.append(("conv_options", f"fused activation {value}", option("fusedActivationFunction", value)))

    def no_options(m, g, op):
        op.builtinOptionsType, op.builtinOptions = 0, None
    edits.append(("conv_options", "no options", no_options))

    if kind == "int8":
        def quant(slot, label, change):
            def edit(m, g, op):
                tensor = _conv_tensor(g, op, slot)
                if change is None:
                    tensor.quantization = None
                else:
                    change(tensor.quantization)
            edits.append(("conv_quantization", f"{slot} {label}", edit))

        def set_scale(value, first_only):
            def change(q):
                scale = np.array(q.scale, np.float32)
                scale[:1 if first_only else None] = value
                q.scale = scale
            return change

        def set_zero_point(value):
            def change(q):
                zero_point = np.array(q.zeroPoint, np.int64)
                zero_point[:1] = value
                q.zeroPoint = zero_point
            return change

        for slot in ("input", "filter", "bias", "output"):
            quant(slot, "quantization removed", None)
            quant(slot, "scale empty", lambda q: setattr(q, "scale", np.zeros(0, np.float32)))
            quant(slot, "zero points empty", lambda q: setattr(q, "zeroPoint", np.zeros(0, np.int64)))
            quant(slot, "scale and zero points empty", lambda q: (setattr(q, "scale", np.zeros(0, np.float32)),
                                                                  setattr(q, "zeroPoint", np.zeros(0, np.int64))))
            for value in (0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30):
                quant(slot, f"scale {value}", set_scale(value, slot == "filter"))
            for value in (1, 300, -200):
                quant(slot, f"zero point {value}", set_zero_point(value))
            quant(slot, "one scale and zero point more", lambda q: (
                setattr(q, "scale", np.append(np.array(q.scale, np.float32), np.float32(0.5))),
                setattr(q, "zeroPoint", np.append(np.array(q.zeroPoint, np.int64), 0))))
            for value in (1, 3, 4, -1):
                quant(slot, f"quantized dimension {value}",
                      lambda q, value=value: setattr(q, "quantizedDimension", value))
        quant("filter", "one scale and zero point fewer", lambda q: (
            setattr(q, "scale", np.array(q.scale, np.float32)[:-1]),
            setattr(q, "zeroPoint", np.array(q.zeroPoint, np.int64)[:-1])))
        quant("filter", "one scale (per-tensor)", lambda q: (setattr(q, "scale", np.array(q.scale, np.float32)[:1]),
                                                           setattr(q, "zeroPoint", np.zeros(1, np.int64))))
        quant("filter", "zero points one fewer",
              lambda q: setattr(q, "zeroPoint", np.array(q.zeroPoint, np.int64)[:-1]))
        quant("filter", "scales x 1e6 (requantization scales past 256)",
              lambda q: setattr(q, "scale", np.array(q.scale, np.float32) * np.float32(1e6)))

    def buffer(slot, label, change):
        def edit(m, g, op):
            tensor = _conv_tensor(g, op, slot)
            tensor.buffer = _new_buffer(m, change(_buffer_bytes(m, tensor)))
        edits.append(("conv_buffers", f"{slot} buffer {label}", edit))

    for slot in ("filter", "bias"):
        buffer(slot, "one byte short", lambda data: data[:-1])
        buffer(slot, "one byte long", lambda data: data + b"\x01")
        buffer(slot, "one element short", lambda data: data[:-4])
        buffer(slot, "emptied", lambda data: None)
        buffer(slot, "all 0xff", lambda data: b"\xff" * len(data))
    buffer("filter", "all 0x7f", lambda data: b"\x7f" * len(data))  # float: NaN

    def shape(slot, label, change):
        def edit(m, g, op):
            tensor = _conv_tensor(g, op, slot)
            _set_shape(tensor, change([int(d) for d in tensor.shape]))
        edits.append(("conv_shapes", f"{slot} shape {label}", edit))

    for slot in ("input", "filter", "bias", "output"):
        rank = 1 if slot == "bias" else 4
        for axis in range(rank):
            for value in ("+1", "-1", 0, -1, 2 ** 31 - 1):
                shape(slot, f"dim {axis} {value}", lambda s, axis=axis, value=value: [
                    (d + int(value) if isinstance(value, str) else value) if i == axis else d for i, d in enumerate(s)])
        shape(slot, "rank - 1", lambda s: s[:-1] if len(s) > 1 else [])
        shape(slot, "rank + 1", lambda s: s + [1])

    def retype(slot, type_id):
        def edit(m, g, op):
            _conv_tensor(g, op, slot).type = type_id
        edits.append(("conv_types", f"{slot} type {type_id}", edit))

    for slot in ("input", "filter", "bias", "output"):
        for type_id in (0, 2, 3, 4, 7, 9):  # float32, int32, uint8, int64, int16, int8
            retype(slot, type_id)

    def io(label, edit):
        edits.append(("conv_io", label, edit))

    for slot in range(3):
        io(f"input {slot} -> -1", lambda m, g, op, slot=slot: setattr(
            op, "inputs", np.array([-1 if i == slot else v for i, v in enumerate(op.inputs)], np.int32)))
    io("no bias input", lambda m, g, op: setattr(op, "inputs", np.array(op.inputs[:2], np.int32)))
    io("one input", lambda m, g, op: setattr(op, "inputs", np.array(op.inputs[:1], np.int32)))
    io("four inputs", lambda m, g, op: setattr(op, "inputs", np.append(op.inputs, op.inputs[2]).astype(np.int32)))
    io("input index past the tensors", lambda m, g, op: setattr(
        op, "inputs", np.array([len(g.tensors)] + list(op.inputs[1:]), np.int32)))
    io("filter is the input", lambda m, g, op: setattr(
        op, "inputs", np.array([op.inputs[0], op.inputs[0], op.inputs[2]], np.int32)))
    io("output aliased to the input", lambda m, g, op: setattr(op, "outputs", np.array(op.inputs[:1], np.int32)))
    io("two outputs", lambda m, g, op: setattr(op, "outputs", np.append(op.outputs, op.outputs[0]).astype(np.int32)))

    io("output -> a constant of its shape", _output_to_constant)
    return edits


def _random_conv_mutant(rng, models):
    """A random mutant of a builtin conv model (class conv_random): 1-3 of bit flips in the filter or bias
    buffer, an option set to a random edge value, a quantization value (int8) or a shape dim."""
    kind = ("float", "int8")[int(rng.integers(0, 2))]
    model = _read(models[kind])
    graph = model.subgraphs[0]
    convs = _conv_ops(model)
    nth = int(rng.integers(0, len(convs)))
    op = convs[nth]
    labels = []
    for _ in range(int(rng.integers(1, 4))):
        what = int(rng.integers(0, 4))
        if what == 0:
            slot = ("filter", "bias")[int(rng.integers(0, 2))]
            tensor = _conv_tensor(graph, op, slot)
            data = _buffer_bytes(model, tensor)
            if data:
                count = int(rng.integers(1, 9))
                tensor.buffer = _new_buffer(model, _flip_bits(data, rng, count))
                labels.append(f"{count} bits of the {slot}")
        elif what == 1:
            field = ("padding", "strideW", "strideH", "fusedActivationFunction", "dilationWFactor",
                     "dilationHFactor")[int(rng.integers(0, 6))]
            value = int(rng.choice([0, 1, 2, 3, 4, -1, 7, 64, 1024, 1025, 2 ** 16]))
            if field in ("padding", "fusedActivationFunction"):  # byte fields
                value = ((value & 0xFF) ^ 0x80) - 0x80
            setattr(op.builtinOptions, field, value)
            labels.append(f"{field} {value}")
        elif what == 2 and kind == "int8":
            slot = ("input", "filter", "output")[int(rng.integers(0, 3))]
            q = _conv_tensor(graph, op, slot).quantization
            if q is not None and q.scale is not None and len(q.scale):
                scale = np.array(q.scale, np.float32)
                value = float(rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, rng.uniform(0, 2)]))
                scale[int(rng.integers(0, len(scale)))] = value
                q.scale = scale
                labels.append(f"{slot} scale {value}")
        else:
            slot = ("input", "filter", "bias", "output")[int(rng.integers(0, 4))]
            tensor = _conv_tensor(graph, op, slot)
            dims = [int(d) for d in tensor.shape]
            if dims:
                axis = int(rng.integers(0, len(dims)))
                dims[axis] = int(rng.choice([0, -1, 1, 2, dims[axis] + 1, dims[axis] - 1, 2 ** 20, 2 ** 31 - 1]))
                _set_shape(tensor, dims)
                labels.append(f"{slot} dim {axis} -> {dims[axis]}")
    return Mutant("conv_random", f"{kind} conv {nth}: " + ", ".join(labels or ["unchanged"]), _write(model), None)


def pad_edits(kind):
    """[(label, edit(model, graph, op))]: edits of the PAD before the stem conv of a `kind` model: its
    paddings (values, buffer, shape, type), its tensors' types and quantization, its tensor lists."""
    edits = []

    def paddings(label, change):
        def edit(m, g, op):
            tensor = g.tensors[int(op.inputs[1])]
            tensor.buffer = _new_buffer(m, change(_buffer_bytes(m, tensor)))
        edits.append((f"paddings {label}", edit))

    for index in range(8):
        for value in (-1, 1, 5000, 2 ** 31 - 1):
            def change(data, index=index, value=value):
                values = np.frombuffer(data, np.int32).copy()
                values[index] = value
                return values.tobytes()
            paddings(f"[{index // 2}][{index % 2}] = {value}", change)
    paddings("emptied", lambda data: None)
    paddings("one value short", lambda data: data[:-4])
    paddings("one value long", lambda data: data + bytes(4))

    def reshape(label, shape):
        def edit(m, g, op):
            _set_shape(g.tensors[int(op.inputs[1])], shape)
        edits.append((f"paddings shape {label}", edit))

    reshape("[2, 4]", [2, 4])
    reshape("[8]", [8])
    reshape("[4, 2, 1]", [4, 2, 1])

    def retype(which, type_id):
        def edit(m, g, op):
            index = op.outputs[0] if which == "output" else op.inputs[("input", "paddings").index(which)]
            g.tensors[int(index)].type = type_id
        edits.append((f"{which} type {type_id}", edit))

    for which in ("input", "paddings", "output"):
        for type_id in (0, 2, 3, 4, 9):
            retype(which, type_id)
    if kind == "int8":
        def requantize(m, g, op):
            q = g.tensors[int(op.outputs[0])].quantization
            q.scale = np.array(q.scale, np.float32) * np.float32(2)
        edits.append(("output scale x 2 (a requantizing pad)", requantize))
    edits.append(("input 0 -> -1", lambda m, g, op: setattr(op, "inputs", np.array([-1, op.inputs[1]], np.int32))))
    edits.append(("input 1 -> -1", lambda m, g, op: setattr(op, "inputs", np.array([op.inputs[0], -1], np.int32))))
    edits.append(("one input", lambda m, g, op: setattr(op, "inputs", np.array(op.inputs[:1], np.int32))))
    edits.append(("three inputs", lambda m, g, op: setattr(op, "inputs", np.append(op.inputs, op.inputs[1]).astype(
        np.int32))))
    edits.append(("paddings are the input", lambda m, g, op: setattr(
        op, "inputs", np.array([op.inputs[0], op.inputs[0]], np.int32))))
    edits.append(("output -> a constant of its shape", _output_to_constant))
    return edits


def builtin_conv_campaign(models, random_cases, seed):
    """Mutants of the builtin conv models (`builtin_conv_models`): every edit of builtin_conv_edits on
    the first conv of each model (after the PAD) and the option and I/O edits on the others; every
    edit of pad_edits on the PAD; `random_cases` random mutants (seeded); each model unmutated and
    resized (2 x 17 x 15: the claimed kernels run the new size)."""
    rng = np.random.default_rng(seed)
    mutants = []
    for kind, content in models.items():
        mutants.append(Mutant("conv_io", f"{kind}: unmutated", content, None))
        mutants.append(Mutant("conv_shapes", f"{kind}: input resized", content, (2, 17, 15, 3)))
        for nth in range(len(_conv_ops(_read(content)))):
            for cls, label, edit in builtin_conv_edits(kind):
                if nth == 0 or cls in ("conv_options", "conv_io"):
                    mutants.append(Mutant(cls, f"{kind} conv {nth}: {label}",
                                          _builtin_edited(content, CONV_2D, nth, edit), None))
        for label, edit in pad_edits(kind):
            mutants.append(Mutant("pad", f"{kind} pad: {label}", _builtin_edited(content, PAD, 0, edit), None))
    for _ in range(random_cases):
        mutants.append(_random_conv_mutant(rng, models))
    return mutants
