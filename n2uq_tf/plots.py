"""Figures of what the quantizers learned (PNG, matplotlib).

* `plot_thresholds`: per quantized layer, the histogram of its input activations with
  the learned thresholds T_i / beta1 (input units) drawn over it.
* `plot_weight_levels`: per quantized layer, the fraction of weights at each code
  k = 0..n against the uniform 1 / 2**b (the paper's Fig. 3: the entropy-preserving
  scale spreads the weights over all levels), with the W / alpha distribution.
* `save_plots`: both, as PNG files.

`quantizer_state` and `activation_inputs` give the numbers behind the figures.
matplotlib is only needed for the figures (``pip install n2uq_tf[plots]``); figures are
drawn on their own Agg canvas, so pyplot and the user's backend are never touched.
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from n2uq_tf import model_reader
from n2uq_tf.model_reader import quantizer_state
from n2uq_tf.quantization_math import n2uq as ops

__all__ = ["quantized_layers", "quantizer_state", "activation_inputs", "plot_thresholds",
           "plot_weight_levels", "save_plots"]

MAX_VALUES = 200_000  # activation values kept per layer (a random sample beyond that)
_PANEL_SIZE = (3.7, 2.7)  # inches per panel
_DPI = 120


# --------------------------------------------------------------------------- the numbers

def quantized_layers(model: Any) -> list[tuple[str, Any]]:
    """[(name, N2UQWrapper)] in layer order, nested models included.

    The name is the wrapped layer's path, as in `quantization_report`: its name, prefixed by
    the names of the nested models holding it (``backbone/block1_conv``). A model with a
    ``student`` (distillation) gives its student's layers.
    """
    return [(q.path, q.wrapper) for q in model_reader.quantized_layers(model)]


def _select(quantized, layers):
    """The `QuantizedLayer`s named in ``layers`` (paths, wrapper or layer names), in model order."""
    if layers is None:
        return quantized
    wanted = [layers] if isinstance(layers, str) else list(layers)
    by_name = {}
    for q in quantized:
        for key in (q.path, q.wrapper.name, q.layer.name):
            by_name.setdefault(key, q)
    missing = [k for k in wanted if k not in by_name]
    if missing:
        raise ValueError(f"no quantized layer named {missing[0]!r}; quantized layers: "
                         + ", ".join(q.path for q in quantized))
    chosen = {id(by_name[k]) for k in wanted}
    return [q for q in quantized if id(q) in chosen]  # keep model order


def _with_input(model, layers):
    return [q for q in _select(model_reader.quantized_layers(model), layers) if q.input is not None]


def _with_weights(model, layers):
    return [q for q in _select(model_reader.quantized_layers(model), layers) if q.weight_bits is not None and q.weights]


def _first_batch(x):
    if isinstance(x, tf.data.Dataset):
        x = next(iter(x))
        if isinstance(x, tuple) and len(x) in (2, 3):  # (x, y) or (x, y, sample_weight)
            x = x[0]
    return x


def activation_inputs(model: Any, x: Any, layers: str | Sequence[str] | None = None, max_values: int = MAX_VALUES,
                      batch_size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """{layer: float32 array of the values entering its input quantizer} for inputs ``x``.

    Values are flattened, in input units (before beta1), computed in inference mode
    (``training=False``). Layers with more than ``max_values`` values over the whole
    batch keep a random sample of that size (fixed ``seed``). ``x`` is an array (or the
    structure the model takes), or a tf.data.Dataset whose first batch is used.
    """
    model = model_reader.inspected_model(model)
    reader = model_reader.reader_for(model)
    if not reader.is_functional(model):
        raise ValueError(f"model {model.name!r} is subclassed; activation_inputs needs a Functional or "
                         "Sequential model (or an object with a `student` that is one)")
    quantized = _with_input(model, layers)
    if not quantized:
        return {}
    tensors = reader.activation_input_tensors(model, {id(q.wrapper) for q in quantized})
    extractor = reader.sub_model(model, [t for _, t in tensors])
    names = {id(q.wrapper): q.path for q in quantized}

    x = _first_batch(x)
    flat = tf.nest.flatten(x)
    total = int(flat[0].shape[0])
    rng = np.random.default_rng(seed)
    chunks = {q.path: [] for q in quantized}
    for begin in range(0, total, batch_size):
        chunk = tf.nest.map_structure(lambda a, begin=begin: a[begin:begin + batch_size], x)
        size = int(tf.nest.flatten(chunk)[0].shape[0])
        outputs = tf.nest.flatten(extractor(chunk, training=False))
        for (wrapper, _), out in zip(tensors, outputs):
            values = tf.cast(tf.reshape(out, [-1]), tf.float32).numpy()
            layer_total = values.size * total / size
            if layer_total > max_values:  # keep this chunk's share of the sample
                keep = int(max_values * size / total)
                values = values[np.sort(rng.choice(values.size, keep, replace=False))]
            chunks[names[id(wrapper)]].append(values)
    return {q.path: np.concatenate(chunks[q.path]) for q in quantized}


def _weight_codes(quantized):
    """Codes k (int array) and W on the [-1, 1] level axis (float array) of a layer's kernels.

    Any weight method: its ``integer_view`` gives codes and w_q = scale * (2k - zero2) / 2, so
    W sits at k = W / scale + zero2 / 2 on the code axis, shown as 2k/n - 1 (W / alpha for N2UQ).
    """
    n = ops.num_levels(quantized.weight_bits)
    codes, ratios = [], []
    for _, weight, quantizer, variables in quantized.weights:
        w = np.asarray(tf.convert_to_tensor(weight, tf.float32).numpy(), np.float64)
        view = quantizer.integer_view(w, variables)
        scale = np.broadcast_to(np.asarray(view.scale, np.float64), w.shape)
        nonzero = scale > 0  # all-zero channels have no codes
        position = w[nonzero] / scale[nonzero] + view.zero2 / 2.0
        codes.append(np.asarray(view.codes).reshape(w.shape)[nonzero].astype(np.int64))
        ratios.append(2.0 * position / n - 1.0)
    return np.concatenate(codes), np.concatenate(ratios)


# --------------------------------------------------------------------------- the figures

def _matplotlib():
    """The few matplotlib classes used here (never pyplot: no global backend or figure state)."""
    from n2uq_tf._optional import require
    install = "matplotlib: pip install matplotlib (or n2uq_tf[plots])"
    ticker = require("matplotlib.ticker", "n2uq_tf.plots", install)
    backend_agg = require("matplotlib.backends.backend_agg", "n2uq_tf.plots", install)
    figure = require("matplotlib.figure", "n2uq_tf.plots", install)
    return figure.Figure, backend_agg.FigureCanvasAgg, ticker


def _limit(pairs, max_layers):
    """At most max_layers panels, spread evenly over the model (first and last included)."""
    if max_layers is None or len(pairs) <= max_layers:
        return pairs
    if max_layers < 1:
        raise ValueError(f"max_layers must be at least 1, got {max_layers}")
    if max_layers == 1:
        return pairs[:1]
    picks = sorted({round(i * (len(pairs) - 1) / (max_layers - 1)) for i in range(max_layers)})
    return [pairs[i] for i in picks]


def _grid(count, title, Figure, FigureCanvasAgg):
    ncols = min(count, 2 if count <= 4 else min(6, math.ceil(math.sqrt(count))))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * ncols, _PANEL_SIZE[1] * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.remove()  # so fig.axes holds one panel per layer
    fig.suptitle(title, fontsize=13)
    return fig, axes[:count]


def _legend(fig, axes):
    """One legend for the figure, with each label once (a panel may lack an element)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    # Histograms and bars first, as they are drawn first.
    labels = sorted(entries, key=lambda label: not label.startswith(("input", "fraction")))
    fig.legend([entries[label] for label in labels], labels, loc="outside lower center", ncols=len(labels),
               fontsize=8.5, frameon=False)


def _short(name, limit=28):
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def _save(fig, path):
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=_DPI, facecolor="white")


def plot_thresholds(model: Any, x: Any, path: str | os.PathLike[str] | None = None,
                    layers: str | Sequence[str] | None = None, max_layers: int | None = None, bins: int = 60) -> Any:
    """Input-activation histograms with the learned thresholds, one panel per quantized layer.

    Per panel: the histogram (counts) of the layer's input activations for ``x``, solid
    lines at the thresholds T_i / beta1, faint dashed lines at the segment bounds
    d_i / beta1 (both in input units), the bits and beta1, beta2. The x axis spans the
    bounds and the activations up to their 99.9th percentile (the top 0.1% are not drawn).
    A spike (the zeros of ReLU inputs) much taller than the rest is cut off and its share
    of the values written next to it.
    Saves a PNG to ``path`` when given; returns the matplotlib Figure.
    """
    Figure, FigureCanvasAgg, ticker = _matplotlib()
    quantized = _with_input(model, layers)
    if not quantized:
        raise ValueError("the model has no layer with a quantized input")
    shown = _limit(quantized, max_layers)
    values = activation_inputs(model, x, layers=[q.wrapper.name for q in shown])
    title = "Learned activation thresholds over the input histograms (input units: $T_i/\\beta_1$)"
    if len(shown) < len(quantized):
        title += f"\n{len(shown)} of {len(quantized)} quantized layers"
    fig, axes = _grid(len(shown), title, Figure, FigureCanvasAgg)
    for ax, q in zip(axes, shown):
        name = q.path
        state = model_reader.activation_state(q.input)
        data = values[name]
        marks = np.asarray(state["bounds"] + state["thresholds"])
        lo = min(float(data.min()), float(marks.min())) if data.size else float(marks.min())
        # The top 0.1% of activations would stretch the axis; they are left out of the panel.
        hi = max(float(np.quantile(data, 0.999)), float(marks.max())) if data.size else float(marks.max())
        pad = 0.04 * (hi - lo if hi > lo else 1.0)
        edges = np.linspace(lo - pad, hi + pad, bins + 1)
        counts, _ = np.histogram(data, bins=edges)
        ax.stairs(counts, edges, fill=True, color="#9ecae1", edgecolor="#3182bd", linewidth=0.6,
                  gid="histogram", label="input activations")
        for i, d in enumerate(state["bounds"]):
            ax.axvline(d, color="0.45", linestyle=(0, (3, 3)), linewidth=0.7, alpha=0.7, gid="bound",
                       label="segment bounds $d_i/\\beta_1$" if i == 0 else None)
        for i, t in enumerate(state["thresholds"]):
            ax.axvline(t, color="#d62728", linewidth=1.3, gid="threshold",
                       label="thresholds $T_i/\\beta_1$" if i == 0 else None)
        peak = int(counts.max()) if counts.size else 0
        rest = np.sort(counts)[-2] if counts.size > 1 else peak
        if rest > 0 and peak > 3 * rest:  # the spike would flatten everything else
            ax.set_ylim(0, 1.25 * rest)
            top = int(np.argmax(counts))
            x_top = (edges[top] + edges[top + 1]) / 2
            ax.annotate(f"{peak / max(data.size, 1):.0%} \u2191", xy=(x_top, 1.2 * rest), xytext=(3, 0),
                        textcoords="offset points", ha="left", va="top", fontsize=7, color="#3182bd",
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                              "alpha": 0.8})
        if "beta1" in state:
            note = f"A{state['bits']}  $\\beta_1$={state['beta1']:.3g}  $\\beta_2$={state['beta2']:.3g}"
        else:
            note = f"A{state['bits']} {state['method']}  step={state['step']:.3g}"
        ax.text(0.98, 0.96, note, transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.85})
        ax.set_title(_short(name), fontsize=9.5)
        ax.set_gid(name)
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=7.5)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_count_label))  # "12k": no offset text over the title
    axes[0].set_ylabel("count", fontsize=8.5)
    axes[-1].set_xlabel("input activation", fontsize=8.5)
    _legend(fig, axes)
    _save(fig, path)
    return fig


def _count_label(value, _):
    return f"{value / 1000:g}k" if abs(value) >= 1000 else f"{value:g}"


def _entropy_bits(fractions):
    p = fractions[fractions > 0]
    return float(-(p * np.log2(p)).sum())


def plot_weight_levels(model: Any, path: str | os.PathLike[str] | None = None,
                       layers: str | Sequence[str] | None = None, max_layers: int | None = None) -> Any:
    """Fraction of weights at each code k = 0..n, one panel per quantized layer (the paper's Fig. 3).

    Bars: the fraction at each level (codes of every output channel together, each with
    its own alpha); the dashed line is the uniform 1 / 2**b, where the entropy of the
    levels is the maximum b bits. The step line is the distribution of W / alpha drawn
    on the code axis (k = (W/alpha + 1) * n / 2) as a fraction per level width, so it
    lines up with the bars; weights beyond |W/alpha| = 1 are clipped to the end levels.
    Saves a PNG to ``path`` when given; returns the matplotlib Figure.
    """
    Figure, FigureCanvasAgg, ticker = _matplotlib()
    quantized = _with_weights(model, layers)
    if not quantized:
        raise ValueError("the model has no layer with quantized weights")
    shown = _limit(quantized, max_layers)
    title = "Weight levels: fraction of weights per code $k$ (entropy-preserving scale)"
    if len(shown) < len(quantized):
        title += f"\n{len(shown)} of {len(quantized)} quantized layers"
    fig, axes = _grid(len(shown), title, Figure, FigureCanvasAgg)
    for ax, q in zip(axes, shown):
        name, bits = q.path, q.weight_bits
        n = ops.num_levels(bits)
        codes, ratios = _weight_codes(q)
        fractions = np.bincount(codes, minlength=n + 1) / max(codes.size, 1)
        ax.bar(np.arange(n + 1), fractions, width=0.8, color="#74c476", edgecolor="#238b45", linewidth=0.6,
               label="fraction at level $k$")
        ax.axhline(1.0 / (n + 1), color="0.3", linestyle="--", linewidth=1.0, label="uniform $1/2^b$")
        # The W / alpha line needs enough weights per bin to be more than noise.
        per_level = min(8, codes.size // (60 * (n + 1)))
        line_top = 0.0
        if per_level >= 2:
            position = (ratios + 1.0) * n / 2.0
            edges = np.arange(-1.0, n + 1.0 + 1e-9, 1.0 / per_level) - 0.5 / per_level
            density = np.histogram(position, bins=edges)[0] * per_level / max(position.size, 1)
            ax.stairs(density, edges, color="#08519c", linewidth=0.9, label="$W/\\alpha$ on the code axis",
                      gid="ratio")
            line_top = float(density.max())
        clipped = float(np.mean(np.abs(ratios) > 1.0)) if ratios.size else 0.0
        ax.text(0.98, 0.96, f"W{bits}  H = {_entropy_bits(fractions):.2f} of {bits} bits\n"
                f"clipped {clipped:.1%}", transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.85})
        ax.set_title(_short(name), fontsize=9.5)
        ax.set_gid(name)
        ax.set_xlim(-1.0, n + 1.0)
        top = max(fractions.max(), 1.0 / (n + 1))
        ax.set_ylim(0, max(top, min(line_top, 1.5 * top)) * 1.4)
        if n < 16:  # a tick per level, or per 3 levels for 4 bits
            ax.xaxis.set_major_locator(ticker.MultipleLocator(1 if n < 8 else 3))
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=True))
        ax.tick_params(labelsize=7.5)
    axes[0].set_ylabel("fraction of weights", fontsize=8.5)
    axes[-1].set_xlabel("weight code $k$  ($W_q = \\alpha(2k/n - 1)$)", fontsize=8.5)
    _legend(fig, axes)
    _save(fig, path)
    return fig


def save_plots(model: Any, x: Any, directory: str | os.PathLike[str], max_layers: int | None = None) -> list[str]:
    """Writes thresholds.png (needs inputs ``x``; skipped when x is None) and weight_levels.png.

    Returns the list of written paths. Each figure is written only when the model has
    layers of its kind (quantized inputs, quantized weights).
    """
    os.makedirs(directory, exist_ok=True)
    written = []
    if x is not None and _with_input(model, None):
        path = os.path.join(directory, "thresholds.png")
        plot_thresholds(model, x, path, max_layers=max_layers)
        written.append(path)
    if _with_weights(model, None):
        path = os.path.join(directory, "weight_levels.png")
        plot_weight_levels(model, path, max_layers=max_layers)
        written.append(path)
    return written
