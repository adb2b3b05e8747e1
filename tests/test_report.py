"""quantization_report: bits, parameters, thresholds and packed bytes per layer."""

import math

import numpy as np
import pytest

import n2uq_tf
from n2uq_tf import ops


def test_report_numbers(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2, overrides={"fc1": 4})
    report = n2uq_tf.quantization_report(q)
    rows = {r.name: r for r in report.layers}
    conv = rows["conv_a"]
    assert (conv.status, conv.weight_bits, conv.activation_bits) == ("quantized", 2, 2)
    kernel, bias = 3 * 3 * 8 * 8, 8
    quantizer = 1 + 3 + 1 + 1  # start, 3 intervals, beta1, beta2
    assert conv.params == kernel + bias + quantizer
    assert conv.float_bytes == 4 * conv.params
    assert conv.packed_bytes == math.ceil(kernel * 2 / 8) + 4 * 8 + 4 * bias + 4 * quantizer
    dw = rows["dw"]
    assert dw.packed_bytes == math.ceil(3 * 3 * 8 * 2 / 8) + 4 * 8 + 4 * 8 + 4 * quantizer
    fc1 = rows["fc1"]
    assert fc1.weight_bits == 4 and len(fc1.thresholds) == 15
    np.testing.assert_allclose(conv.thresholds, [1 / 3, 1.0, 5 / 3], rtol=1e-6)  # initial midpoints
    assert rows["stem"].status == "kept float" and rows["logits"].status == "kept float"
    assert report.total_params == sum(int(np.prod(v.shape)) for v in q.weights if v.dtype.is_floating)
    assert report.compression == pytest.approx(report.float_bytes / report.packed_bytes)
    assert report.float_bytes == 4 * report.total_params


def test_thresholds_follow_the_variables(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    wrapper = [l for l in q.layers if getattr(l, "input_quantizer", None)][0]
    variables = wrapper.input_quantizer[1]
    variables["start"].assign(0.2)
    variables["intervals"].assign([0.2, 0.4, 0.8])
    variables["beta1"].assign(2.0)
    row = [r for r in n2uq_tf.quantization_report(q).layers if r.name == wrapper.layer.name][0]
    np.testing.assert_allclose(row.thresholds, np.array([0.3, 0.6, 1.2]) / 2.0, rtol=1e-6)


def test_printable_table(small_cnn, capsys):
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    report = n2uq_tf.quantization_report(q)
    report.summary()
    text = capsys.readouterr().out
    assert "conv_a" in text and "compression" in text and "kept float" in text
    assert set(report.to_dict()) >= {"layers", "float_bytes", "packed_bytes", "compression"}


def test_report_on_float_model(small_cnn):
    report = n2uq_tf.quantization_report(small_cnn)
    assert not report.quantized and report.compression == 1.0


def test_report_rejects_non_models():
    with pytest.raises(TypeError):
        n2uq_tf.quantization_report(ops)
