"""Exported models on resized inputs: the N2UQ convs pad for the size they get, as Keras does.

An exported model's input can be resized in the interpreter (`resize_tensor_input`). 'same'
convs then need the padding of the new size (odd sizes and strides 2 shift it), which the
kernels compute at prepare from the padding mode in the op's options; explicit pads
(PaddedConv2D) stay. Each case runs the Keras model on the same input at the new size.
"""

import warnings

import numpy as np
import pytest
from flatbuffers import flexbuffers
from tensorflow.lite.tools import flatbuffer_utils

import n2uq_tf
import n2uq_tf.tflite as n2tfl
from n2uq_tf._keras import keras
from n2uq_tf.export import custom_ops, export_tflite, inspect_tflite
from n2uq_tf.layers import PaddedConv2D, PaddedDepthwiseConv2D
from random_parameters import randomize

L = keras.layers
BACKENDS = ("tflite", "litert")
# As test_export.REL_TOL: exact integer sums times float32 multipliers differ from Keras' float32
# convolution by a few ulps; a wrong padding row moves outputs by ~1e-1.
REL_TOL = 2e-5

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _model(input_shape):
    """'same' convs with strides 1 and 2, odd and even kernels, dilation (square and not), a
    non-square kernel, a depthwise 'same' conv with stride 2 and a multiplier, explicit pads at
    strides 1 and 2, 'valid'."""
    inp = keras.Input(input_shape)
    x = L.Conv2D(6, 3, strides=2, padding="same", name="same_s2")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(6, (2, 3), padding="same", dilation_rate=(2, 1), name="same_dil")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="dw_same_s2")(x)
    x = L.Conv2D(7, 4, strides=(2, 1), padding="same", name="same_k4_s21")(x)
    x = PaddedConv2D(5, 3, explicit_padding=((1, 2), (0, 1)), name="explicit")(x)
    x = PaddedDepthwiseConv2D(3, explicit_padding=1, name="dw_explicit")(x)
    x = L.Conv2D(4, 1, padding="valid", name="valid")(x)
    x = PaddedConv2D(4, 2, strides=2, explicit_padding=((1, 0), (1, 0)), name="explicit_s2")(x)
    return keras.Model(inp, x)


@pytest.fixture(scope="module")
def exported():
    keras.utils.set_random_seed(3)
    model = n2uq_tf.quantize_model(_model((12, 10, 3)), bits=2, skip_layers=None)
    randomize(model, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = export_tflite(model)
    # The same weights in a model with free height and width: the Keras reference at any size.
    free = n2uq_tf.quantize_model(_model((None, None, 3)), bits=2, skip_layers=None)
    free.set_weights(model.get_weights())
    return model, free, content


@pytest.fixture(scope="module")
def exported_unfused(exported):
    """The same model exported without fused output stages (as every file before export format 3)."""
    model, free, _ = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, free, export_tflite(model, fuse=False)


def _run(content, x, backend):
    interpreter = n2tfl.Interpreter(model_content=content, backend=backend)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _sizes():
    rng = np.random.default_rng(13)
    fixed = [(9, 9), (7, 7), (13, 17), (12, 10), (16, 16), (11, 8), (8, 5)]
    drawn = [tuple(int(v) for v in rng.integers(5, 24, 2)) for _ in range(5)]
    return fixed + drawn


@pytest.mark.parametrize("backend", BACKENDS)
def test_resized_inputs_match_keras(exported, backend):
    model, free, content = exported
    ops = n2tfl.model_n2uq_ops(model_content=content)  # fused ops: resized residuals and codes too
    assert custom_ops.OP_CONV2D_FUSED in ops and custom_ops.OP_DEPTHWISE_CONV2D_FUSED in ops
    rng = np.random.default_rng(5)
    for h, w in _sizes():
        x = rng.normal(0.3, 1.0, (2, h, w, 3)).astype(np.float32)
        expected = free(x, training=False).numpy()
        got = _run(content, x, backend)
        assert got.shape == expected.shape, (h, w)
        scale = float(np.abs(expected).max())
        diff = float(np.abs(got - expected).max())
        assert diff <= REL_TOL * max(scale, 1.0), f"{h}x{w}: max |keras - {backend}| = {diff:.3g} (scale {scale:.3g})"


def test_the_file_carries_the_padding_mode(exported):
    _, _, content = exported
    options = {op.layer: op.options for op in inspect_tflite(content).operators if op.layer}
    pads = ("pad_top", "pad_bottom", "pad_left", "pad_right")
    for name in ("same_s2", "same_dil", "dw_same_s2", "same_k4_s21"):
        assert options[name]["padding"] == custom_ops.PADDING_SAME and not set(pads) & set(options[name]), name
    # explicit pads; the mode is left out at strides 1 x 1, where they serve every input size
    assert [options["explicit"][p] for p in pads] == [1, 2, 0, 1]
    assert [options["dw_explicit"][p] for p in pads] == [1, 1, 1, 1]
    assert [options["valid"][p] for p in pads] == [0, 0, 0, 0]
    assert [options["explicit_s2"][p] for p in pads] == [1, 0, 1, 0]
    assert not {"explicit", "dw_explicit", "valid"} & {k for k, v in options.items() if "padding" in v}
    assert options["explicit_s2"]["padding"] == custom_ops.PADDING_EXPLICIT


def _as_format_1(content):
    """The file as export format 1 wrote it: no padding option, 'same' pads fixed for the exported size."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    for op in graph.operators:
        if model.operatorCodes[op.opcodeIndex].customCode not in (b"N2UQConv2D", b"N2UQDepthwiseConv2D"):
            continue
        options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
        if options.pop("padding", None) == custom_ops.PADDING_SAME:
            shape = graph.tensors[op.inputs[0]].shape
            for (before, after), size, k, s, d in zip(
                    (("pad_top", "pad_bottom"), ("pad_left", "pad_right")), shape[1:3],
                    (options["kernel_height"], options["kernel_width"]),
                    (options["stride_height"], options["stride_width"]),
                    (options["dilation_height"], options["dilation_width"])):
                total = max((-(-int(size) // s) - 1) * s + (k - 1) * d + 1 - int(size), 0)
                options[before], options[after] = total // 2, total - total // 2
        op.customOptions = list(flexbuffers.Dumps(options))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_1_files_run_at_their_size_and_refuse_ambiguous_sizes(exported_unfused, backend):
    model, free, content = exported_unfused
    old = _as_format_1(content)
    rng = np.random.default_rng(8)
    # at the exported size and at sizes where every 'same' padding is what was exported: as Keras
    for h, w in ((12, 10), (20, 6)):
        x = rng.normal(0.3, 1.0, (1, h, w, 3)).astype(np.float32)
        expected = free(x, training=False).numpy()
        got = _run(old, x, backend)
        np.testing.assert_allclose(got, expected, rtol=0, atol=REL_TOL * max(float(np.abs(expected).max()), 1.0))
    # an odd size changes the 'same' padding of the stride-2 conv: refused, never a silent wrong result
    x = rng.normal(0.3, 1.0, (1, 9, 9, 3)).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"no 'padding' option \(n2uq_tf export format 1\).*9x9.*[Rr]e-export"):
        _run(old, x, backend)
