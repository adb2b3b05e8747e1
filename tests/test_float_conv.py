"""The float convolution over few input channels (n2uq_float_conv_plan_*, _core.FloatConvPlan) and
the delegate's builtin float32 CONV_2D kernel (option float_conv).

The core is checked against a float64 NumPy convolution (zero padding, dilation, strides, bias,
the activation's clamp) within float32 rounding of a sum of K products, on every ISA this CPU runs
and at 1 and 2 threads (results must not depend on the thread count). The delegate must claim the
nodes it should (kernel_profile) and give the stock interpreter's result within float rounding.
"""

import numpy as np
import pytest

from n2uq_tf.tflite import _core

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

RANGES = [(-np.inf, np.inf), (0.0, np.inf), (0.0, 6.0), (-1.0, 1.0)]


def reference_conv(x, w, bias, strides, dilations, pads, output_range):
    top, bottom, left, right = pads
    (sh, sw), (dh, dw) = strides, dilations
    n, h, width, c = x.shape
    oc, kh, kw, _ = w.shape
    padded = np.zeros((n, h + top + bottom, width + left + right, c))
    padded[:, top:top + h, left:left + width] = x
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    acc = np.zeros((n, oh, ow, oc)) + (0.0 if bias is None else np.asarray(bias, np.float64))
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
            acc += patch @ w[:, i, j, :].astype(np.float64).T
    return np.clip(acc, output_range[0], output_range[1])


def float_isas():
    return ["portable"] + (["avx512"] if "avx512" in _core.supported_isas() else [])


def random_case(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 9)) if seed % 5 else int(rng.choice([16, 33]))
    oc = int(rng.choice([1, 5, 16, 17, 40, 64, 65, 130]))
    kh, kw = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    dilations = (int(rng.integers(1, 3)), int(rng.integers(1, 3))) if seed % 3 == 0 else (1, 1)
    strides = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    ext_h, ext_w = (kh - 1) * dilations[0], (kw - 1) * dilations[1]
    h, width = ext_h + int(rng.integers(1, 14)), ext_w + int(rng.integers(1, 14))
    pads = tuple(int(rng.integers(0, e + 1)) for e in (ext_h, ext_h, ext_w, ext_w))
    x = rng.normal(size=(int(rng.integers(1, 3)), h, width, c)).astype(np.float32)
    w = rng.normal(size=(oc, kh, kw, c)).astype(np.float32)
    bias = rng.normal(size=oc).astype(np.float32) if seed % 4 else None
    return x, w, bias, strides, dilations, pads, RANGES[seed % 4]


@pytest.mark.parametrize("seed", range(30))
def test_float_conv_matches_reference_on_every_isa(seed):
    x, w, bias, strides, dilations, pads, output_range = random_case(seed)
    expected = reference_conv(x, w, bias, strides, dilations, pads, output_range)
    # float32 products summed in another order: |error| <= K * eps * sum |x w| (loose but not vacuous:
    # a dropped tap or a wrong weight is off by O(|x w|) ~ 1)
    bound = reference_conv(np.abs(x), np.abs(w), None if bias is None else np.abs(bias), strides, dilations, pads,
                           (-np.inf, np.inf))
    tolerance = w[0].size * np.finfo(np.float32).eps * bound + 1e-6
    for isa in float_isas():
        plan = _core.FloatConvPlan(w, bias, strides=strides, dilations=dilations, padding=pads,
                                   output_range=output_range, isa=isa)
        assert plan.isa == isa
        one = plan.run(x, num_threads=1)
        assert one.shape == expected.shape
        assert np.all(np.abs(one - expected) <= tolerance), (isa, float(np.abs(one - expected).max()))
        assert np.array_equal(one, plan.run(x, num_threads=2)), isa  # the thread count changes nothing
        if output_range[0] > -np.inf:
            assert one.min() >= output_range[0] and one.max() <= output_range[1]


def test_float_conv_resnet_stem_224():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 230, 230, 3)).astype(np.float32)
    w = rng.normal(size=(64, 7, 7, 3)).astype(np.float32)
    bias = rng.normal(size=64).astype(np.float32)
    expected = reference_conv(x, w, bias, (2, 2), (1, 1), (0, 0, 0, 0), (0.0, np.inf))
    for isa in float_isas():
        got = _core.FloatConvPlan(w, bias, strides=2, output_range=(0.0, np.inf), isa=isa).run(x, num_threads=2)
        assert got.shape == (1, 112, 112, 64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(w=np.zeros((4, 3, 3), np.float32)), "filter must be 4-D"),
    (dict(bias=np.zeros(3, np.float32)), "bias must hold out_channels = 4"),
    (dict(output_range=(1.0, 0.0)), "output_min <= output_max"),
    (dict(output_range=(np.nan, 1.0)), "output_min <= output_max"),
    (dict(w=np.full((4, 3, 3, 2), np.inf, np.float32)), "filter value 0 is not finite"),
    (dict(strides=0), "stride_height must be 1..1024"),
])
def test_float_conv_bad_arguments_raise(kwargs, message):
    args = dict(w=np.ones((4, 3, 3, 2), np.float32), bias=None, strides=1, padding=0, output_range=(-np.inf, np.inf))
    args.update(kwargs)
    with pytest.raises(_core.CoreError, match=message):
        _core.FloatConvPlan(args["w"], args["bias"], strides=args["strides"], padding=args["padding"],
                            output_range=args["output_range"])


def test_float_conv_bad_run_arguments_raise():
    plan = _core.FloatConvPlan(np.ones((4, 3, 3, 2), np.float32))
    with pytest.raises(_core.CoreError, match="must be \\[N, H, W, 2\\]"):
        plan.run(np.zeros((1, 5, 5, 3), np.float32))
    with pytest.raises(_core.CoreError, match="num_threads must be 1..256"):
        plan.run(np.zeros((1, 5, 5, 2), np.float32), num_threads=0)
    with pytest.raises(_core.CoreError, match="larger than the padded input"):
        plan.run(np.zeros((1, 2, 2, 2), np.float32))
    padded = _core.FloatConvPlan(np.ones((4, 3, 3, 2), np.float32), padding=(5, 0, 0, 0))
    with pytest.raises(_core.CoreError, match="pad_top = 5 is larger than"):
        padded.run(np.zeros((1, 5, 5, 2), np.float32))


# ------------------------------------------------------------------ the delegate

def _keras_conv(cin, cout, kernel, strides, padding, activation, dilation=1, size=(20, 22), bias=True):
    import tensorflow as tf
    import tf_keras as keras
    keras.utils.set_random_seed(cin * 100 + cout)
    inputs = keras.Input(size + (cin,))
    x = keras.layers.Conv2D(cout, kernel, strides=strides, padding=padding, dilation_rate=dilation,
                            use_bias=bias)(inputs)
    if activation == "relu":
        x = keras.layers.ReLU()(x)
    elif activation == "relu6":
        x = keras.layers.ReLU(6.0)(x)
    return tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, x)).convert()


MODELS = {"stem": (3, 64, 7, 2, "same", "relu"), "valid_none": (3, 24, 5, 2, "valid", None),
          "gray_relu6": (1, 16, 3, 1, "same", "relu6"), "dilated": (8, 20, 3, 1, "same", "relu", 2),
          "no_bias": (4, 17, 3, 2, "same", None, 1, (20, 22), False), "wide": (16, 8, 3, 1, "same", None)}


@pytest.fixture(scope="module")
def float_models():
    return {name: _keras_conv(*spec) for name, spec in MODELS.items()}


def _run(content, x, threads, options=None, shape=None):
    from ai_edge_litert.interpreter import Interpreter

    from n2uq_tf.tflite import delegate
    if options is None:
        interpreter = Interpreter(model_content=content, num_threads=threads)
    else:
        interpreter = delegate.Interpreter(model_content=content, num_threads=threads, backend="litert",
                                           delegate_options=options)
    if shape is not None:
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()
    return out, interpreter


def _claimed(interpreter):
    from n2uq_tf.tflite import delegate
    entries = [e for e in delegate.kernel_profile() if e["op"] == "CONV_2D (float)" and e["invocations"] > 0]
    delegate.reset_kernel_profile()
    return entries


@pytest.mark.parametrize("name", list(MODELS))
def test_delegate_float_conv_claims_and_matches_tflite(float_models, name):
    from n2uq_tf.tflite import delegate
    delegate.reset_kernel_profile()
    content, spec = float_models[name], MODELS[name]
    rng = np.random.default_rng(1)
    size = spec[7] if len(spec) > 7 else (20, 22)
    x = rng.normal(size=(1,) + tuple(size) + (spec[0],)).astype(np.float32)
    stock, _ = _run(content, x, 1)
    scale = float(np.abs(stock).max())
    few = spec[0] <= 8
    configs = [({"float_conv": "all", "isa": "portable"}, True), ({"float_conv": "off"}, False)]
    if "avx512" in _core.supported_isas():
        configs += [({"float_conv": "auto"}, few), ({"float_conv": "all"}, True)]
    for options, claims in configs:
        for threads in (1, 2):
            got, interpreter = _run(content, x, threads, options)
            entries = _claimed(interpreter)
            assert bool(entries) == claims, (options, entries)
            np.testing.assert_allclose(got, stock, rtol=0, atol=1e-5 * scale, err_msg=str(options))
            del interpreter
    if few and "avx512" in _core.supported_isas():
        # another input size: the kernel recomputes 'same' padding and the output shape
        bigger = (1, size[0] + 4, size[1] + 6, spec[0])  # even: the dilated model is space-to-batch
        x2 = rng.normal(size=bigger).astype(np.float32)
        stock2, _ = _run(content, x2, 1, shape=bigger)
        got2, interpreter = _run(content, x2, 2, {"float_conv": "auto"}, shape=bigger)
        assert _claimed(interpreter)
        assert got2.shape == stock2.shape
        np.testing.assert_allclose(got2, stock2, rtol=0, atol=1e-5 * float(np.abs(stock2).max()))


def test_delegate_float_conv_option_is_validated(float_models):
    from n2uq_tf.tflite import delegate
    with pytest.raises(Exception, match="float_conv must be off, auto or all"):
        delegate.load_delegate("litert", float_conv="sometimes")


def _padded_stem(int8):
    """ZeroPadding2D + a 'valid' 7x7/2 conv over 3 channels (the exporters' stem), float or int8 PTQ,
    and a second pad whose consumer is a max pool (not a claimed conv)."""
    import tensorflow as tf
    import tf_keras as keras
    keras.utils.set_random_seed(5)
    inputs = keras.Input((30, 34, 3))
    x = keras.layers.ZeroPadding2D(((3, 2), (1, 3)))(inputs)
    x = keras.layers.Conv2D(16, 7, strides=2, padding="valid", activation="relu")(x)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.MaxPooling2D(3, 2)(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, x))
    if int8:
        data = np.random.default_rng(0).normal(size=(4, 30, 34, 3)).astype(np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([data[i:i + 1]] for i in range(4))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


@pytest.mark.parametrize("int8", [False, True])
def test_delegate_runs_the_pad_before_a_claimed_conv(int8):
    """XNNPACK folds a stem's explicit PAD into its conv; once the conv is ours the delegate runs that
    PAD too (TFLite's XNNPACK ran it alone 20x slower), with the same bytes, and leaves other pads."""
    from n2uq_tf.tflite import delegate
    if "avx512" not in _core.supported_isas():
        options = {"int8_conv": "all", "float_conv": "all"}
    else:
        options = {}
    content = _padded_stem(int8)
    x = np.random.default_rng(2).normal(size=(1, 30, 34, 3)).astype(np.float32)
    stock, _ = _run(content, x, 1)
    delegate.reset_kernel_profile()
    got, interpreter = _run(content, x, 2, options)
    ops = [e["op"] for e in delegate.kernel_profile() if e["invocations"] > 0]
    assert sorted(ops) == sorted(["PAD", "CONV_2D (int8)" if int8 else "CONV_2D (float)"]), ops
    if int8:
        assert np.array_equal(got, stock)
    else:
        np.testing.assert_allclose(got, stock, rtol=0, atol=1e-5 * float(np.abs(stock).max()))
    del interpreter
    delegate.reset_kernel_profile()
    off = {"int8_conv": "off", "float_conv": "off"}
    _, interpreter = _run(content, x, 1, off)
    assert not [e for e in delegate.kernel_profile() if e["invocations"] > 0]  # no conv claimed: no pad either
