"""n2uq_tf.plots: threshold and weight-level figures checked against NumPy written from the spec."""

import os
import struct
import sys

import numpy as np
import pytest
import tf_keras as keras

import n2uq_tf
from n2uq_tf import plots

# Known quantizer parameters per layer: start, intervals, beta1, beta2. conv_a has an
# interval below the 1e-3 floor, fc1 is 4-bit.
PARAMS = {
    "conv_a": (0.1, [0.2, 0.0005, 0.5], 1.7, 0.8),
    "dw": (-0.05, [0.3, 0.4, 0.6], 0.9, 1.3),
    "fc1": (0.02, list(np.linspace(0.01, 0.2, 15)), 1.25, 1.1),
}


def wrappers_by_name(model):
    return {layer.layer.name: layer for layer in model.layers if isinstance(layer, n2uq_tf.N2UQWrapper)}


@pytest.fixture
def quantized(small_cnn):
    q = n2uq_tf.quantize_model(small_cnn, bits=2, overrides={"fc1": 4})
    for name, wrapper in wrappers_by_name(q).items():
        start, intervals, beta1, beta2 = PARAMS[name]
        v = wrapper.input_quantizer[1]
        v["start"].assign(start)
        v["intervals"].assign(intervals)
        v["beta1"].assign(beta1)
        v["beta2"].assign(beta2)
    return q


@pytest.fixture
def images():
    return np.random.default_rng(1).normal(0.5, 0.5, (16, 12, 12, 3)).astype(np.float32)


def expected_marks(name):
    """Thresholds and bounds in input units, from the spec (float32 like the variables)."""
    start, intervals, beta1, _ = PARAMS[name]
    a = np.asarray(intervals, np.float32)
    a = np.where(a > np.float32(1e-3), a, np.float32(1e-3))
    bounds = np.float32(start) + np.concatenate([[0], np.cumsum(a)]).astype(np.float32)
    thresholds = bounds[:-1] + a / 2
    beta1 = np.float32(beta1)
    return thresholds.astype(np.float64) / beta1, bounds.astype(np.float64) / beta1


def captured_inputs(model, x):
    """The wrappers' inputs, recorded by a stand-in quantizer during an eager call.

    Independent of plots.py. (``wrapper.input`` would not do: tfmot calls the wrappers
    in intermediate graphs too, and node 0 belongs to one of those.)
    """
    recorded = {}

    class Recorder:
        def __init__(self, name, quantizer):
            self.name, self.quantizer = name, quantizer

        def __call__(self, inputs, training, weights, **kwargs):
            recorded.setdefault(self.name, []).append(np.asarray(inputs).ravel())
            return self.quantizer(inputs, training, weights=weights, **kwargs)

    wrappers = wrappers_by_name(model)
    saved = {name: w._input_quantizers for name, w in wrappers.items()}
    try:
        for name, w in wrappers.items():
            (quantizer, variables), = w._input_quantizers
            w._input_quantizers = [(Recorder(name, quantizer), variables)]
        model(x, training=False)
    finally:
        for name, w in wrappers.items():
            w._input_quantizers = saved[name]
    return {name: np.concatenate(parts) for name, parts in recorded.items()}


def expected_fractions(wrapper):
    """Fraction of weights per code, from the spec: alpha = gamma * mean|W| per output channel."""
    config = wrapper.quantize_config
    b = config.weight_bits
    n = 2 ** b - 1
    gamma = (2 ** b - 1) / 2 ** (b - 1)
    kernel = [v for v in wrapper.weights if v.name.split("/")[-1].split(":")[0] in config.weight_attrs]
    assert len(kernel) == 1
    w = kernel[0].numpy().astype(np.float64)
    keep = {a % w.ndim for a in np.atleast_1d(config.channel_axis)}
    alpha = gamma * np.abs(w).mean(axis=tuple(i for i in range(w.ndim) if i not in keep), keepdims=True)
    k = np.round((np.clip(w / alpha, -1, 1) + 1) * n / 2).astype(int)
    return np.bincount(k.ravel(), minlength=n + 1) / k.size, n


def test_threshold_panels(quantized, images):
    fig = plots.plot_thresholds(quantized, images)
    assert len(fig.axes) == 3
    captured = captured_inputs(quantized, images)
    for ax in fig.axes:
        name = ax.get_gid()
        assert ax.get_title() == name
        thresholds, bounds = expected_marks(name)
        lines = {gid: sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == gid)
                 for gid in ("threshold", "bound")}
        np.testing.assert_allclose(lines["threshold"], np.sort(thresholds), rtol=1e-6)
        np.testing.assert_allclose(lines["bound"], np.sort(bounds), rtol=1e-6, atol=1e-7)
        (hist,) = [p for p in ax.patches if p.get_gid() == "histogram"]
        counts, edges, _ = hist.get_data()
        np.testing.assert_array_equal(counts, np.histogram(captured[name], bins=edges)[0])
        assert counts.sum() >= 0.99 * captured[name].size  # only the top 0.1% may fall off the axis
        assert edges[0] <= min(bounds.min(), captured[name].min()) and edges[-1] >= bounds.max()
        text = " ".join(t.get_text() for t in ax.texts)
        assert f"A{2 if name != 'fc1' else 4}" in text and f"{PARAMS[name][2]:.3g}" in text


def test_activation_inputs(quantized, images):
    values = plots.activation_inputs(quantized, images)
    captured = captured_inputs(quantized, images)
    assert set(values) == set(captured) == {"conv_a", "dw", "fc1"}
    for name in values:
        np.testing.assert_allclose(values[name], captured[name], rtol=1e-6, atol=1e-6)
    # In chunks, and sampled: a subset of the values, at most max_values of them.
    small = plots.activation_inputs(quantized, images, layers=["conv_a"], max_values=1000, batch_size=5)
    assert list(small) == ["conv_a"] and 900 <= small["conv_a"].size <= 1000
    assert np.isin(small["conv_a"], captured["conv_a"]).all()


def test_activation_inputs_of_a_nested_model(quantized, images):
    inp = keras.Input((12, 12, 3))
    outer = keras.Model(inp, keras.layers.Dense(2)(quantized(inp)))
    values = plots.activation_inputs(outer, images)
    # Layers inside a nested model are named by their path, as in quantization_report.
    captured = {f"{quantized.name}/{name}": v for name, v in captured_inputs(quantized, images).items()}
    assert set(values) == set(captured)
    for name in values:
        np.testing.assert_allclose(values[name], captured[name], rtol=1e-6, atol=1e-6)


def test_weight_level_bars(quantized):
    fig = plots.plot_weight_levels(quantized)
    assert len(fig.axes) == 3
    wrappers = wrappers_by_name(quantized)
    for ax in fig.axes:
        name = ax.get_gid()
        fractions, n = expected_fractions(wrappers[name])
        (bars,) = ax.containers
        np.testing.assert_array_equal([p.get_x() + p.get_width() / 2 for p in bars], np.arange(n + 1))
        np.testing.assert_allclose([p.get_height() for p in bars], fractions, rtol=1e-12)
        uniform = [line for line in ax.lines if line.get_label().startswith("uniform")]
        assert uniform[0].get_ydata()[0] == pytest.approx(1 / (n + 1))
        p = fractions[fractions > 0]
        assert f"H = {-(p * np.log2(p)).sum():.2f}" in ax.texts[0].get_text()


def test_layer_selection_and_limits(quantized, images):
    assert [ax.get_gid() for ax in plots.plot_thresholds(quantized, images, layers=["dw"]).axes] == ["dw"]
    fig = plots.plot_weight_levels(quantized, max_layers=2)
    assert [ax.get_gid() for ax in fig.axes] == ["conv_a", "fc1"]  # first and last
    assert "2 of 3" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="no quantized layer named"):
        plots.plot_weight_levels(quantized, layers=["stem"])


def test_quantizer_state(quantized):
    state = plots.quantizer_state(quantized)
    assert list(state) == ["conv_a", "dw", "fc1"]
    for name, s in state.items():
        start, intervals, beta1, beta2 = PARAMS[name]
        thresholds, bounds = expected_marks(name)
        np.testing.assert_allclose(s["thresholds"], thresholds, rtol=1e-6)
        np.testing.assert_allclose(s["intervals"], np.float32(intervals))  # stored, not floored
        assert (s["start"], s["beta1"], s["beta2"]) == (np.float32(start), np.float32(beta1), np.float32(beta2))


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_save_plots_writes_pngs_without_touching_pyplot(quantized, images, tmp_path):
    import matplotlib
    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    written = plots.save_plots(quantized, images, str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in written] == ["thresholds.png", "weight_levels.png"]
    for path in written:
        width, height = png_size(path)
        assert os.path.getsize(path) > 1000 and width > 400 and height > 300
    assert matplotlib.get_backend() == backend and ("matplotlib.pyplot" in sys.modules) == had_pyplot
    # Without inputs only the weight levels can be drawn.
    assert plots.save_plots(quantized, None, str(tmp_path / "w")) == [str(tmp_path / "w" / "weight_levels.png")]


@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa", "daq"])
def test_other_methods_are_drawn_from_their_integer_views(method, images):
    """Thresholds from uniform_levels, bars from integer_view codes, for every literature method."""
    keras.utils.set_random_seed(3)
    inp = keras.Input(images.shape[1:])
    x = keras.layers.Conv2D(6, 3, name="c1")(inp)
    x = keras.layers.Conv2D(5, 3, name="c2")(x)
    model = n2uq_tf.quantize_model(keras.Model(inp, x), 2, method=method, skip_layers=None)
    model.predict(images, verbose=0)  # data-dependent initialisations (LSQ, DAQ) happen here
    fig = plots.plot_thresholds(model, images)
    for ax in fig.axes:
        quantizer, variables = wrappers_by_name(model)[ax.get_gid()].input_quantizer
        levels = quantizer.uniform_levels(variables)
        want = sorted(np.asarray(levels.thresholds, np.float64) / float(levels.input_scale))
        got = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == "threshold")
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for ax in plots.plot_weight_levels(model).axes:
        wrapper = wrappers_by_name(model)[ax.get_gid()]
        (_, kernel, quantizer, variables), = wrapper.weight_quantizers
        codes = np.asarray(quantizer.integer_view(kernel.numpy(), variables).codes).reshape(-1)
        want = np.bincount(codes, minlength=4) / codes.size
        (bars,) = ax.containers
        np.testing.assert_allclose([p.get_height() for p in bars], want, atol=1e-12)
