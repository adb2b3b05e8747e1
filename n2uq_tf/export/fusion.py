"""Fused output stages: a rewrite of the converted TFLite model that moves the ops between a quantized
layer and the next quantizer into the layer op (N2UQConv2D -> N2UQConv2DFused, ...).

Between an N2UQ layer op and the next N2UQ quantizer a network typically computes per-channel,
elementwise float ops: RPReLU (ADD, PRELU, ADD), a residual ADD, ReLU / ReLU6, a BatchNorm that
could not be folded (MUL, ADD). `fuse_output_stages` finds these chains in the converted model and
replaces the layer op, the chain and the quantizer by one fused op whose output stage runs them in
the layer's output pass and writes the next layer's packed codes directly (custom_ops, "Fused
output stages"). It works on the flatbuffer's object form after conversion, so it sees exactly the
ops the converter emitted whatever Keras layers produced them, and it needs nothing from the
Keras-side lowering.

A chain starts at a layer op's float output and follows the tensor through float32 ops of the
layer output's shape (`_step`): ADD / SUB / MUL of a per-channel constant (a scalar, [C] or
[1, ..., C]; a fused activation RELU, RELU_N1_TO_1 or RELU6 adds its step), ADD of a tensor of the
same shape that does not depend on the layer (a residual), PRELU with per-channel slopes,
LEAKY_RELU, RELU, RELU6, RELU_N1_TO_1, while each intermediate tensor has that op as its only
consumer and is no graph output. Where a tensor has several consumers (a shortcut that needs the
float block output) or is a graph output, it becomes the fused op's float output and the chain
continues along the consumer that absorbs the most ops on its way to a quantizer; a second such
branch point ends the chain. The chain ends at an N2UQQuantizePack (packed codes) or N2UQQuantize
(byte codes) of the layer's channels with constant thresholds, or, without one, at the last op it
could absorb (the fused op then outputs the float tensor only). Everything else stays as it was:
ops that are not float32, constants that are not per-channel, a residual that depends on the
layer's own output, broadcasting residuals, int8 builtins. Where two layer ops could take the
same op (the residual ADD of two convs), the first in graph order does. Each step is the float32
operation of the builtin it replaces, so the fused model computes exactly what the unfused one
does (custom_ops, "Exactness"; tests/test_fusion.py compares both files bit for bit).

A float32 MAX_POOL_2D with 'valid' padding and no fused activation counts as a layer op too
(`_pool_layer`), with a PAD of zeros before it (spatial pads only, read by nothing else) taken in:
N2UQMaxPool2DFused; so does an int8 one (an int8 model's stem) with the int8 PAD of its zero point
before it and the DEQUANTIZE after it, the chain then starting at the DEQUANTIZE's float output. A
pool with only a PAD (or DEQUANTIZE) to absorb and no chain after it is still rewritten (those ops
go); one with neither stays a builtin. A 'same' pool stays (TFLite's skips its padding,
which counts no zeros), and so does a PAD of another value, the pool then fused without it.

`export_tflite` runs this rewrite by default (``fuse=True``) and writes export format 3 when
something was fused, format 2 (which older readers run) otherwise.
"""

import dataclasses
import heapq

import numpy as np

from n2uq_tf.export import custom_ops

_FLOAT32 = 0  # schema TensorType.FLOAT32
_CUSTOM = 32  # schema BuiltinOperator.CUSTOM
_FLEXBUFFERS = 0  # schema CustomOptionsFormat.FLEXBUFFERS
# schema ActivationFunctionType -> the step it adds (None: none; TANH, SIGN_BIT: not fusable).
_FUSED_ACTIVATIONS = {0: [], 1: ["relu"], 2: ["relu_n1_to_1"], 3: ["relu6"]}
_FUSED_OF = {layer: fused for fused, layer in custom_ops.FUSED_OPS.items()}
_FUSED_OF["MAX_POOL_2D"] = custom_ops.OP_MAX_POOL2D_FUSED  # a layer without weights (`_pool_layer`)
_INT32 = 2  # schema TensorType.INT32
_INT8 = 9  # schema TensorType.INT8
_VALID = 1  # schema Padding.VALID
_QUANTIZERS = {custom_ops.OP_QUANTIZE_PACK: "pack", custom_ops.OP_QUANTIZE: "codes"}
_QUANTIZER_LABELS = {"pack": "quantize-and-pack", "codes": "quantize"}


@dataclasses.dataclass
class Fusion:
    """One fused op: which layer op it extends and what it took in."""
    subgraph: int
    layer_op: str                # N2UQConv2D, N2UQDepthwiseConv2D or N2UQFullyConnected
    fused_op: str                # its fused name
    absorbed: list               # [(builtin or custom op name, scope of its output tensor)] in chain order
    steps: list                  # output-stage step kinds
    float_output: int = None     # steps before the float output, None without one
    float_after_ops: int = None  # absorbed ops before the float output
    quantize: str = None         # None, "pack" or "codes"
    quantized_for: int = None    # index (in the rewritten subgraph) of the op reading the codes
    layer_index: int = None      # index of the fused op in the rewritten subgraph
    scope: str = None            # Keras scope of the layer op's output (names a pool's report row)


def _scope(name):
    """The Keras scope of a converter tensor name ("layer1_0_rprelu2/add_1;layer1_0_rprelu2/Relu" ->
    "layer1_0_rprelu2"), or None."""
    if not name:
        return None
    first = (name.decode(errors="replace") if isinstance(name, bytes) else name).split(";")[0]
    return first.rsplit("/", 1)[0] if "/" in first else None


class _Graph:
    """Producers, consumers and constants of one subgraph."""

    def __init__(self, model, index, names):
        self.model, self.index = model, index
        self.subgraph = model.subgraphs[index]
        self.names = names
        self.producer, self.consumers = {}, {}
        for i, op in enumerate(self.subgraph.operators):
            for t in _indices(op.outputs):
                self.producer[t] = i
            for t in _indices(op.inputs):
                if t >= 0:
                    self.consumers.setdefault(t, []).append(i)
        self.graph_outputs = set(_indices(self.subgraph.outputs))

    def op(self, i):
        return self.subgraph.operators[i]

    def name(self, i):
        return self.names[self.op(i).opcodeIndex]

    def tensor(self, t):
        return self.subgraph.tensors[t]

    def constant(self, t, tensor_type=_FLOAT32):
        """The value of constant tensor t if it is float32 (or `tensor_type`: _INT32, _INT8), else None."""
        tensor = self.tensor(t)
        data = self.model.buffers[tensor.buffer].data if tensor.buffer is not None else None
        if data is None or len(data) == 0 or tensor.type != tensor_type:
            return None
        shape = [] if tensor.shape is None else [int(d) for d in tensor.shape]
        dtype = {_INT32: np.int32, _INT8: np.int8}.get(tensor_type, np.float32)
        return np.frombuffer(bytes(bytearray(data)), dtype).reshape(shape)

    def int8_affine(self, t):
        """(scale, zero point) of int8 tensor t with one scale and zero point, else None."""
        tensor = self.tensor(t)
        q = tensor.quantization
        if tensor.type != _INT8 or q is None or q.scale is None or q.zeroPoint is None or len(q.scale) != 1 \
                or len(q.zeroPoint) != 1:
            return None
        scale = np.float32(q.scale[0])
        return (float(scale), int(q.zeroPoint[0])) if scale > 0 and np.isfinite(scale) else None

    def is_float(self, t):
        return self.tensor(t).type == _FLOAT32

    def shape(self, t):
        tensor = self.tensor(t)
        return (None if tensor.shape is None else tuple(int(d) for d in tensor.shape),
                None if tensor.shapeSignature is None else tuple(int(d) for d in tensor.shapeSignature))

    def ancestors_include(self, t, ops):
        """Whether computing tensor t needs any op of `ops` (op indices)."""
        seen, stack = set(), [t]
        while stack:
            i = self.producer.get(stack.pop())
            if i is None or i in seen:
                continue
            if i in ops:
                return True
            seen.add(i)
            stack.extend(t for t in _indices(self.op(i).inputs) if t >= 0)
        return False


def _indices(array):
    return [] if array is None else [int(v) for v in array]


def _per_channel(value, channels, rank):
    """A constant broadcast along the channels only ([C], [1, ..., C], a scalar) as float32 [C], else None."""
    if value.ndim > rank or any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in
                                                                          (1, channels)):
        return None
    return np.ascontiguousarray(np.broadcast_to(value.reshape(-1), (channels,)), np.float32)


class _Chain:
    """Steps, absorbed ops (with the number of steps each gave) and stage inputs gathered along a
    layer output."""

    def __init__(self):
        self.steps, self.ops, self.op_steps = [], [], []
        self.inputs = []  # per step that takes one: ("tensor", index) or ("array", float32 values)

    def extend(self, other):
        self.steps += other.steps
        self.ops += other.ops
        self.op_steps += other.op_steps
        self.inputs += other.inputs

    def steps_before(self, ops):
        """Steps of the first `ops` absorbed ops."""
        return sum(self.op_steps[:ops])

    def copy(self):
        chain = _Chain()
        chain.extend(self)
        return chain


def _step(graph, i, t, channels, layer_ops):
    """The `_Chain` of op i applied to tensor t (the chain's value), or None if it cannot be a step."""
    op, name = graph.op(i), graph.name(i)
    inputs, outputs = _indices(op.inputs), _indices(op.outputs)
    if len(outputs) != 1 or not graph.is_float(outputs[0]) or t not in inputs:
        return None
    shape = graph.shape(t)
    if graph.shape(outputs[0]) != shape:
        return None
    chain = _Chain()
    chain.ops.append(i)
    options = op.builtinOptions
    activation = getattr(options, "fusedActivationFunction", 0) if options is not None else 0
    rank = len(shape[0] or ())
    if name in ("ADD", "SUB", "MUL"):
        if len(inputs) != 2 or inputs[0] == inputs[1] or (name == "SUB" and inputs[0] != t):
            return None
        other = inputs[1] if inputs[0] == t else inputs[0]
        value = graph.constant(other)
        if value is not None:
            vector = _per_channel(value, channels, rank)
            if vector is None:
                return None
            if name == "SUB":
                vector = -vector  # y - c is y + (-c) exactly
            chain.steps.append("mul" if name == "MUL" else "add")
            # the file's own constant where it already holds the C values (the kernel reads any shape)
            chain.inputs.append(("tensor", other) if value.size == channels and name != "SUB" else ("array", vector))
        elif name == "ADD" and graph.is_float(other) and graph.shape(other) == shape \
                and not graph.ancestors_include(other, layer_ops | {i}):
            chain.steps.append("add_tensor")
            chain.inputs.append(("tensor", other))
        else:
            return None
        if activation not in _FUSED_ACTIVATIONS:
            return None
        chain.steps += _FUSED_ACTIVATIONS[activation]
        chain.op_steps.append(len(chain.steps))
        return chain
    if inputs[0] != t:
        return None
    if name == "PRELU" and len(inputs) == 2:
        value = graph.constant(inputs[1])
        vector = None if value is None else _per_channel(value, channels, rank)
        if vector is None:
            return None
        chain.steps.append("prelu")
        chain.inputs.append(("tensor", inputs[1]) if value.size == channels else ("array", vector))
        chain.op_steps.append(1)
        return chain
    if name == "LEAKY_RELU" and len(inputs) == 1:
        # x > 0 ? x : alpha x and PRELU's x >= 0 ? x : alpha x differ only in the sign of a zero.
        chain.steps.append("prelu")
        chain.inputs.append(("array", np.full(channels, getattr(options, "alpha", 0.2), np.float32)))
        chain.op_steps.append(1)
        return chain
    kinds = {"RELU": "relu", "RELU6": "relu6", "RELU_N1_TO_1": "relu_n1_to_1"}
    if name in kinds and len(inputs) == 1:
        chain.steps.append(kinds[name])
        chain.op_steps.append(1)
        return chain
    return None


@dataclasses.dataclass
class _Pool:
    """What N2UQMaxPool2DFused takes for a MAX_POOL_2D (`_pool_layer`)."""
    options: dict        # its layer options (custom_ops.POOL_OPTIONS, and the int8 input's)
    source: int          # its input tensor (the PAD's input when it takes the PAD)
    pad: int = None      # the PAD op it takes in, or None
    dequantize: int = None  # the DEQUANTIZE op it takes in (int8 pools), or None
    output: int = None   # the layer's float output: the DEQUANTIZE's, else the pool's


def _pool_layer(graph, i):
    """`_Pool` when op i is a MAX_POOL_2D that N2UQMaxPool2DFused can take, else None: 'valid', no fused
    activation, NHWC, optionally after a PAD (or PADV2) of the spatial dims only whose output nothing
    else reads, either

    * float32, the PAD of zeros; or
    * int8 with one scale and zero point kept by the PAD and the pool (TFLite's int8 MAX_POOL_2D does
      not requantize), the PAD's value the zero point (what dequantizes to 0.0), and the pool read by
      one DEQUANTIZE to float32 alone: the op takes the int8 tensor and outputs the DEQUANTIZE's
      float32 values (options input_zero_point, input_scale; custom_ops, N2UQMaxPool2DFused)."""
    op, options = graph.op(i), graph.op(i).builtinOptions
    inputs, outputs = _indices(op.inputs), _indices(op.outputs)
    if graph.name(i) != "MAX_POOL_2D" or options is None or len(inputs) != 1 or len(outputs) != 1:
        return None
    shape = graph.shape(inputs[0])[0]
    if options.padding != _VALID or options.fusedActivationFunction != 0 or not shape or len(shape) != 4:
        return None
    layer = dict(channels=shape[3], filter_height=options.filterHeight, filter_width=options.filterWidth,
                 stride_height=options.strideH, stride_width=options.strideW,
                 pad_top=0, pad_bottom=0, pad_left=0, pad_right=0)
    dequantize, output = None, outputs[0]
    affine = graph.int8_affine(inputs[0])
    if affine is not None:
        users = graph.consumers.get(outputs[0], [])
        if graph.int8_affine(outputs[0]) != affine or outputs[0] in graph.graph_outputs or len(users) != 1 \
                or graph.name(users[0]) != "DEQUANTIZE" or len(_indices(graph.op(users[0]).outputs)) != 1:
            return None
        dequantize, output = users[0], _indices(graph.op(users[0]).outputs)[0]
        if not graph.is_float(output):
            return None
        layer.update(input_zero_point=affine[1], input_scale=affine[0])
    elif not graph.is_float(inputs[0]) or not graph.is_float(outputs[0]):
        return None
    pad, source = graph.producer.get(inputs[0]), inputs[0]
    if pad is None or graph.name(pad) not in ("PAD", "PADV2") or graph.consumers.get(inputs[0]) != [i] \
            or inputs[0] in graph.graph_outputs:
        return _Pool(layer, source, None, dequantize, output)
    pad_inputs = _indices(graph.op(pad).inputs)
    pads = graph.constant(pad_inputs[1], _INT32) if len(pad_inputs) >= 2 else None
    if affine is None:
        value = graph.constant(pad_inputs[2]) if len(pad_inputs) == 3 else np.zeros((), np.float32)
        zero = value is not None and value.size == 1 and value.reshape(-1).view(np.uint32)[0] == 0 \
            and graph.is_float(pad_inputs[0])
    else:  # TFLite's int8 PAD writes the zero point of its output, which must be its input's
        value = graph.constant(pad_inputs[2], _INT8) if len(pad_inputs) == 3 else np.full((), affine[1], np.int8)
        zero = value is not None and value.size == 1 and int(value.reshape(-1)[0]) == affine[1] \
            and graph.int8_affine(pad_inputs[0]) == affine
    if pads is None or pads.shape != (4, 2) or pads[0].any() or pads[3].any() or (pads < 0).any() or not zero:
        return _Pool(layer, source, None, dequantize, output)
    layer.update(pad_top=int(pads[1, 0]), pad_bottom=int(pads[1, 1]), pad_left=int(pads[2, 0]),
                 pad_right=int(pads[2, 1]))
    return _Pool(layer, pad_inputs[0], pad, dequantize, output)


def _quantizer(graph, i, t, channels):
    """(mode, options, thresholds tensor) if op i quantizes tensor t of `channels` channels, else None."""
    mode = _QUANTIZERS.get(graph.name(i))
    inputs = _indices(graph.op(i).inputs)
    if mode is None or len(inputs) != 2 or inputs[0] != t or len(_indices(graph.op(i).outputs)) != 1:
        return None
    from flatbuffers import flexbuffers
    try:
        options = flexbuffers.Loads(bytes(bytearray(graph.op(i).customOptions)))
    except Exception:  # noqa: BLE001 - a malformed quantizer is left alone (its kernel reports it)
        return None
    if not isinstance(options, dict) or options.get("channels") != channels:
        return None
    if graph.constant(inputs[1]) is None:  # thresholds computed in the graph could depend on the layer
        return None
    return mode, options, inputs[1]


def _walk(graph, t, channels, layer_ops):
    """Follows tensor t through single-consumer step ops: (chain, end tensor, quantizer op or None,
    whether it stopped at a branch point: several consumers or a graph output)."""
    chain = _Chain()
    while True:
        users = graph.consumers.get(t, [])
        if len(users) != 1 or t in graph.graph_outputs:
            return chain, t, None, True
        if _quantizer(graph, users[0], t, channels) is not None:
            return chain, t, users[0], False
        step = _step(graph, users[0], t, channels, layer_ops | set(chain.ops))
        if step is None or len(chain.steps) + len(step.steps) > custom_ops.MAX_STEPS:
            return chain, t, None, False
        chain.extend(step)
        t = _indices(graph.op(users[0]).outputs)[0]


def _plan(graph, layer, t=None):
    """(chain, float tensor or None, absorbed ops before it, quantizer op or None) for layer op
    `layer` whose float output is t (default: its output), or None when nothing can be fused."""
    t = _indices(graph.op(layer).outputs)[0] if t is None else t
    shape = graph.shape(t)[0]
    if not shape or not graph.is_float(t):
        return None
    channels = shape[-1]
    chain, end, quantizer, branch = _walk(graph, t, channels, {layer})
    if quantizer is not None:
        return chain, None, None, quantizer
    if branch:
        # The float tensor is needed here; go on along the consumer that takes in the most ops on
        # its way to a quantizer.
        best = None
        for user in graph.consumers.get(end, []):
            if _quantizer(graph, user, end, channels) is not None:
                candidate = (_Chain(), user)
            else:
                step = _step(graph, user, end, channels, {layer} | set(chain.ops))
                if step is None:
                    continue
                rest, _, quantizer, _ = _walk(graph, _indices(graph.op(user).outputs)[0], channels,
                                              {layer} | set(chain.ops) | set(step.ops))
                if quantizer is None or len(chain.steps) + len(step.steps) + len(rest.steps) > custom_ops.MAX_STEPS:
                    continue
                step.extend(rest)
                candidate = (step, quantizer)
            if best is None or len(candidate[0].ops) > len(best[0].ops):
                best = candidate
        if best is not None:
            full = chain.copy()
            full.extend(best[0])
            return full, end, len(chain.ops), best[1]
    if not chain.steps:
        return None
    return chain, end, len(chain.ops), None


def _opcode(model, name):
    from tensorflow.lite.python import schema_py_generated as schema
    for i, code in enumerate(model.operatorCodes):
        if code.customCode is not None and bytes(code.customCode) == name.encode():
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = _CUSTOM
    code.customCode = name.encode()
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _constant(model, subgraph, values):
    from tensorflow.lite.python import schema_py_generated as schema
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(values, np.float32).tobytes(), np.uint8).copy()
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(values.shape, np.int32)
    tensor.type = _FLOAT32
    tensor.buffer = len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _fused_operator(model, graph, layer, plan, pool=None):
    """The fused operator for `plan` (`_plan`) and its output-stage keywords; `pool`: `_pool_layer`'s
    answer when the layer op is a MAX_POOL_2D."""
    from flatbuffers import flexbuffers
    from tensorflow.lite.python import schema_py_generated as schema
    chain, float_tensor, float_ops, quantizer = plan
    layer_op = graph.op(layer)
    if pool is not None:
        options, inputs = dict(pool.options), [pool.source]
    else:
        options, inputs = flexbuffers.Loads(bytes(bytearray(layer_op.customOptions))), _indices(layer_op.inputs)[:4]
    float_output = None
    if float_tensor is not None:  # the steps of the ops before it
        float_output = chain.steps_before(float_ops)
    stage = dict(steps=chain.steps, float_output=float_output, quantize=None)
    for kind, value in chain.inputs:
        inputs.append(value if kind == "tensor" else _constant(model, graph.subgraph, value))
    outputs = [] if float_tensor is None else [float_tensor]
    if quantizer is not None:
        q_input = _indices(graph.op(quantizer).inputs)[0]
        mode, q_options, thresholds = _quantizer(graph, quantizer, q_input, graph.shape(q_input)[0][-1])
        stage.update(quantize=mode, quantize_bits=q_options["bits"], quantize_beta1=q_options["beta1"])
        inputs.append(thresholds)
        outputs += _indices(graph.op(quantizer).outputs)
    options.update(custom_ops.output_stage_options(**stage))
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, _FUSED_OF[graph.name(layer)])
    op.inputs = np.array(inputs, np.int32)
    op.outputs = np.array(outputs, np.int32)
    op.customOptions = list(flexbuffers.Dumps(options))
    op.customOptionsFormat = _FLEXBUFFERS
    return op, stage


def _topological(subgraph, order_key):
    """The subgraph's operators in an execution order: each after the producers of its inputs,
    otherwise in the order of `order_key` (op -> number)."""
    ops = subgraph.operators
    producer = {t: i for i, op in enumerate(ops) for t in _indices(op.outputs)}
    waiting, users = [0] * len(ops), {}
    for i, op in enumerate(ops):
        needs = {producer[t] for t in _indices(op.inputs) if t in producer and producer[t] != i}
        waiting[i] = len(needs)
        for p in needs:
            users.setdefault(p, []).append(i)
    ready = [(order_key(op), i) for i, op in enumerate(ops) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (order_key(ops[u]), u))
    if len(order) != len(ops):
        raise ValueError("fusing output stages made the graph cyclic (an n2uq_tf bug: please report it)")
    return [ops[i] for i in order]


def _prune(model):
    """Removes tensors no op or graph input/output refers to and buffers no tensor or metadata
    refers to, renumbering every reference (operators, subgraph inputs/outputs, signatures)."""
    for s, subgraph in enumerate(model.subgraphs):
        used = set(_indices(subgraph.inputs)) | set(_indices(subgraph.outputs))
        for op in subgraph.operators:
            used |= {t for t in _indices(op.inputs) + _indices(op.outputs) + _indices(op.intermediates) if t >= 0}
        keep = [t for t in range(len(subgraph.tensors)) if t in used]
        new = {old: i for i, old in enumerate(keep)}
        if len(keep) == len(subgraph.tensors):
            continue
        remap = np.vectorize(lambda t, new=new: new[t] if t >= 0 else t, otypes=[np.int32])
        subgraph.tensors = [subgraph.tensors[t] for t in keep]
        for op in subgraph.operators:
            for field in ("inputs", "outputs", "intermediates"):
                values = getattr(op, field)
                if values is not None and len(values):
                    setattr(op, field, remap(np.asarray(values)))
        for field in ("inputs", "outputs"):
            values = getattr(subgraph, field)
            if values is not None and len(values):
                setattr(subgraph, field, remap(np.asarray(values)))
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == s:
                for entry in list(signature.inputs or []) + list(signature.outputs or []):
                    entry.tensorIndex = new[entry.tensorIndex]
    used = {0} | {t.buffer for sg in model.subgraphs for t in sg.tensors if t.buffer is not None}
    used |= {m.buffer for m in model.metadata or []}
    keep = [b for b in range(len(model.buffers)) if b in used]
    if len(keep) == len(model.buffers):
        return
    new = {old: i for i, old in enumerate(keep)}
    model.buffers = [model.buffers[b] for b in keep]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.buffer is not None:
                tensor.buffer = new[tensor.buffer]
    for entry in model.metadata or []:
        entry.buffer = new[entry.buffer]


def fuse_output_stages(model):
    """Rewrites a converted model object (`flatbuffer_utils.convert_bytearray_to_object`) in place,
    fusing every output stage it can (module docstring); returns the `Fusion` list, in op order."""
    from tensorflow.lite.tools import flatbuffer_utils
    names = [bytes(code.customCode).decode(errors="replace") if code.customCode is not None
             else flatbuffer_utils.opcode_to_name(model, i) for i, code in enumerate(model.operatorCodes)]
    made = []  # (fusion, fused operator, its codes tensor or None)
    for s in range(len(model.subgraphs)):
        graph = _Graph(model, s, names)
        absorbed, replaced = set(), {}
        for layer in range(len(graph.subgraph.operators)):
            if graph.name(layer) not in _FUSED_OF:
                continue
            pool = None
            if graph.name(layer) == "MAX_POOL_2D":
                pool = _pool_layer(graph, layer)
                if pool is None:
                    continue
            plan = _plan(graph, layer, None if pool is None else pool.output)
            if plan is None and pool is not None and (pool.pad is not None or pool.dequantize is not None):
                # nothing to fuse after it, but the PAD or DEQUANTIZE goes: the pool op alone, float output only
                plan = (_Chain(), pool.output, 0, None)
            if plan is None:
                continue
            chain, _, float_ops, quantizer = plan
            taken = set(chain.ops) | ({quantizer} if quantizer is not None else set())
            if pool is not None:
                taken |= {op for op in (pool.pad, pool.dequantize) if op is not None}
            if taken & absorbed:
                continue
            op, stage = _fused_operator(model, graph, layer, plan, pool)
            absorbed |= taken
            replaced[layer] = op
            described = [(graph.name(i), _scope(graph.tensor(_indices(graph.op(i).outputs)[0]).name))
                         for i in chain.ops]
            layer_op = " + ".join(graph.name(op) for op in ([layer] if pool is None else
                                                            [pool.pad, layer, pool.dequantize]) if op is not None)
            fusion = Fusion(s, layer_op, _FUSED_OF[graph.name(layer)], described, list(chain.steps),
                            stage["float_output"], float_ops if stage["float_output"] is not None else None,
                            stage["quantize"],
                            scope=_scope(graph.tensor(_indices(graph.op(layer).outputs)[0]).name))
            made.append((fusion, op, None if quantizer is None else _indices(op.outputs)[-1]))
        if not replaced:
            continue
        position, operators = {}, []
        for i, op in enumerate(graph.subgraph.operators):
            if i in absorbed:
                continue
            op = replaced.get(i, op)
            position[id(op)] = i
            operators.append(op)
        graph.subgraph.operators = operators
        graph.subgraph.operators = _topological(graph.subgraph, lambda op, position=position: position[id(op)])
    _prune(model)
    for fusion, op, codes in made:  # where the fused ops and the readers of their codes ended up
        operators = model.subgraphs[fusion.subgraph].operators
        fusion.layer_index = next(i for i, other in enumerate(operators) if other is op)
        if codes is not None:
            codes = _indices(op.outputs)[-1]  # renumbered by _prune
            fusion.quantized_for = next((i for i, other in enumerate(operators) if codes in _indices(other.inputs)),
                                        None)
    return [fusion for fusion, _, _ in made]


def describe(fusion, layer_of=None):
    """Readable parts of a fusion, in order: the absorbed ops grouped by Keras scope, where the float
    output is taken, the quantizer (and the layer reading its codes when `layer_of`, op index ->
    layer name, knows it)."""
    parts, group = [], None
    for index, (name, scope) in enumerate(fusion.absorbed + [(None, None)]):
        if fusion.float_after_ops == index and fusion.quantize is not None:
            group = None
            parts.append("float output")
        if name is None:
            break
        if group is not None and group[0] == scope:
            group[1].append(name)
            parts[-1] = f"{scope + ' ' if scope else ''}({', '.join(group[1])})"
        else:
            group = (scope, [name])
            parts.append(f"{scope + ' ' if scope else ''}({name})")
    if fusion.quantize is not None:
        target = layer_of(fusion.subgraph, fusion.quantized_for) if layer_of and fusion.quantized_for is not None \
            else None
        parts.append(_QUANTIZER_LABELS[fusion.quantize] + (f" for {target}" if target else ""))
    return parts


def _row_and_stage(rows, name):
    """The report row of layer op `name` ("sep/depthwise" is a stage of row "sep") and the stage, or (None, None)."""
    row, stage = rows.get(name), None
    while row is None and name and "/" in name:
        name, part = name.rsplit("/", 1)
        stage = part if stage is None else f"{part}/{stage}"
        row = rows.get(name)
    return row, stage


def _layer_op_position(row, stage):
    """Where the stage's layer op sits in row.ops (quantizer and layer op per stage; the last layer op
    is the layer's own, an earlier one a named stage)."""
    layer_ops = [i for i, op in enumerate(row.ops) if op in custom_ops.LAYER_OPS or op in custom_ops.FUSED_OPS]
    if not layer_ops:
        return None
    return layer_ops[0] if stage is not None and len(layer_ops) > 1 else layer_ops[-1]


def note_fusions(report, fusions, layer_names):
    """Writes each fusion into the `ExportReport` (`LayerExport.fused` and `ops`).

    layer_names: {(subgraph, op index): name} of the N2UQ layer ops in the rewritten model. The row of
    the fused layer gets the description and its op's fused name; the row of the layer reading the
    codes loses the quantizer op that the fused op replaced.
    """
    rows = {row.name: row for row in report.layers}
    for fusion in fusions:
        text = " -> ".join(describe(fusion, lambda s, i: layer_names.get((s, i))))
        if fusion.fused_op == custom_ops.OP_MAX_POOL2D_FUSED:
            # A pool may have no report row of its own (no weights): the row of the first layer whose op
            # it absorbed (an RPReLU), else of its own Keras layer, else of the layer reading its codes
            # gets the note.
            reader = None if fusion.quantized_for is None else \
                _row_and_stage(rows, layer_names.get((fusion.subgraph, fusion.quantized_for)))[0]
            candidates = [rows.get(scope) for _, scope in fusion.absorbed] + [rows.get(fusion.scope), reader]
            row = next((r for r in candidates if r is not None), None)
            if row is not None:
                row.fused.append(f"{fusion.fused_op}: {fusion.scope or 'pool'} ({fusion.layer_op})"
                                 + (f" -> {text}" if text else ""))
        else:
            row, stage = _row_and_stage(rows, layer_names.get((fusion.subgraph, fusion.layer_index)))
            if row is None:
                continue
            row.fused.append(f"{stage}: {text}" if stage else text)
            position = _layer_op_position(row, stage)
            if position is not None:
                row.ops[position] = fusion.fused_op
            if stage is None and any(scope == row.name for _, scope in fusion.absorbed):
                row.ops = [op for op in row.ops if not op.startswith("builtin")]  # its activation runs in the op
        if fusion.quantized_for is None:
            continue
        reader, reader_stage = _row_and_stage(rows, layer_names.get((fusion.subgraph, fusion.quantized_for)))
        position = None if reader is None else _layer_op_position(reader, reader_stage)
        if position and reader.ops[position - 1] in _QUANTIZERS:
            del reader.ops[position - 1]
