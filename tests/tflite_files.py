"""What the tests read out of a .tflite flatbuffer beyond `inspect_tflite`: tensor types."""

from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def builtin_input_types(data):
    """{builtin op name: the set of type names of its first input} over the main subgraph of the
    flatbuffer `data` (bytes); custom ops are left out."""
    fb = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = fb.subgraphs[0]
    kinds = {}
    for op in graph.operators:
        code = fb.operatorCodes[op.opcodeIndex]
        if code.customCode is None:
            name = OP_NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
            kinds.setdefault(name, set()).add(TYPE_NAMES[graph.tensors[int(op.inputs[0])].type])
    return kinds
