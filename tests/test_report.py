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
    # What the file holds for a packed layer: the 2-bit kernel, a float32 multiplier and bias per
    # output channel, and the 3 thresholds; the BatchNormalization after it folds into those.
    assert conv.export == "packed"
    assert conv.packed_bytes == math.ceil(kernel * 2 / 8) + 4 * (2 * 8 + 3)
    bn = rows[conv_bn_name(q)]
    assert (bn.export, bn.packed_bytes, bn.export_note) == ("folded", 0, "folded into conv_a")
    dw = rows["dw"]
    assert dw.packed_bytes == math.ceil(3 * 3 * 8 * 2 / 8) + 4 * (2 * 8 + 3)
    fc1 = rows["fc1"]
    assert fc1.weight_bits == 4 and len(fc1.thresholds) == 15
    np.testing.assert_allclose(conv.thresholds, [1 / 3, 1.0, 5 / 3], rtol=1e-6)  # initial midpoints
    assert rows["stem"].status == "kept float" and rows["logits"].status == "kept float"
    assert report.total_params == sum(int(np.prod(v.shape)) for v in q.weights if v.dtype.is_floating)
    assert report.compression == pytest.approx(report.float_bytes / report.packed_bytes)
    assert report.float_bytes == 4 * report.total_params


def conv_bn_name(model):
    """Name of the BatchNormalization that follows conv_a in the conftest's small_cnn."""
    names = [layer.name for layer in model.layers]
    return next(n for n in names[names.index("quant_conv_a") + 1:] if n.startswith("batch_normalization"))


def test_thresholds_follow_the_variables(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2)
    wrapper = [layer for layer in q.layers if getattr(layer, "input_quantizer", None)][0]
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


def _export_cases():
    """One layer per export decision: packed (BN folded), more than 4 bits, LSQ weights (a zero
    level), float weights, float input; Dense on a rank-3 input."""
    keras = n2uq_tf._keras.keras
    L = keras.layers
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="c_packed")(inp)
    x = L.BatchNormalization(name="bn_folded")(x)
    x = L.Conv2D(6, 3, padding="same", name="c_w8")(x)
    x = L.Conv2D(6, 3, padding="same", name="c_lsq")(x)
    x = L.Conv2D(6, 1, name="c_wfloat")(x)
    x = L.Conv2D(6, 1, name="c_afloat")(x)
    x = L.Reshape((8, 48), name="to_rank3")(x)
    x = L.Dense(5, name="fc_rank3")(x)
    x = L.Flatten(name="flat")(x)
    out = L.Dense(4, name="fc")(x)
    model = keras.Model(inp, out)
    return n2uq_tf.quantize_model(model, bits=2, skip_layers=None, overrides={
        "c_w8": (8, 2), "c_lsq": {"weight_method": "lsq"}, "c_wfloat": {"weight_bits": None},
        "c_afloat": {"activation_bits": None}})


def test_report_says_what_the_export_does():
    """Per layer: the exporter's decision and reason (its own plan, not a copy of its rules), and packed
    bytes only where the export packs."""
    from n2uq_tf.export import plan_export
    q = _export_cases()
    rows = {r.name: r for r in n2uq_tf.quantization_report(q).layers}
    plan = {r.name: r for r in plan_export(q).layers}
    assert {name: rows[name].export for name in plan} == {
        "c_packed": "packed", "bn_folded": "folded", "c_w8": "float", "c_lsq": "float", "c_wfloat": "float",
        "c_afloat": "float", "to_rank3": "float", "fc_rank3": "float", "flat": "float", "fc": "packed"}
    assert "1..4 bits" in rows["c_w8"].export_note
    assert "zero level" in rows["c_lsq"].export_note and "lsq" in rows["c_lsq"].export_note
    assert "weight_bits=None" in rows["c_wfloat"].export_note
    assert "activation_bits=None" in rows["c_afloat"].export_note
    assert "rank-3" in rows["fc_rank3"].export_note
    for name in ("c_w8", "c_lsq", "c_wfloat", "c_afloat", "fc_rank3"):
        assert rows[name].status == "quantized"
        assert rows[name].export_note == plan[name].reason
        # kept as float32 builtins: every value ships as 4 bytes, nothing is packed
        assert rows[name].packed_bytes == rows[name].float_bytes == 4 * rows[name].params, name
    assert rows["c_w8"].packed_bytes == 4 * (3 * 3 * 6 * 6 + 6 + 1 + 3 + 2)  # kernel, bias, start, intervals, betas
    packed = rows["c_packed"]
    assert packed.packed_bytes == math.ceil(3 * 3 * 3 * 6 * 2 / 8) + 4 * (2 * 6 + 3)
    assert packed.packed_bytes == plan["c_packed"].packed_bytes + plan["c_packed"].float_bytes
    assert rows["bn_folded"].packed_bytes == 0
    # the report's total is the exporter's planned weight data
    report = n2uq_tf.quantization_report(q)
    assert report.packed_bytes == plan_export(q).expected_bytes
    assert {r.name for r in report.exported_float} == {"c_w8", "c_lsq", "c_wfloat", "c_afloat", "fc_rank3"}
    text = str(report)
    line = next(t for t in text.splitlines() if t.startswith("c_lsq"))
    assert " float " in line and "exported as float:" in line and "zero level" in line
    assert "folded into c_packed" in next(t for t in text.splitlines() if t.startswith("bn_folded"))
