"""n2uq_tf.models: the paper's networks, float and quantized, and float -> quantized weight transfer."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import n2uq_tf
from n2uq_tf import models
from n2uq_tf.layers import PaddedConv2D, PaddedDepthwiseConv2D, RPReLU
from n2uq_tf.quantize import N2UQWrapper

SMALL = (16, 16, 3)
QUANTIZER_SUFFIXES = ("n2uq_start", "n2uq_intervals", "n2uq_beta1", "n2uq_beta2", "optimizer_step")

# Published parameter counts of the torchvision float networks (trainable: conv, BN affine, fc).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "mobilenet_v2": 3_504_872}


@pytest.fixture(scope="module")
def quantized20():
    """One 2-bit ResNet-20 (width 4) shared by the tests that set all the state they check."""
    keras.utils.set_random_seed(0)
    return models.resnet20(2, width=4, input_shape=SMALL)


def short(variable):
    return variable.name.split("/")[-1].split(":")[0]


def weights_by_name(layer):
    """{short name: array} of a layer's float weights; for a wrapper, those of the wrapped layer."""
    return {short(v): v.numpy() for v in layer.weights if not short(v).endswith(QUANTIZER_SUFFIXES)}


def inner_name(layer):
    return layer.layer.name if isinstance(layer, N2UQWrapper) else layer.name


def wrappers(model):
    return {layer.layer.name: layer for layer in model.layers if isinstance(layer, N2UQWrapper)}


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def randomize(model, seed=0):
    """Gives every float weight a random value (BN variances positive), so copies are checkable."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for v in layer.weights:
            name = short(v)
            if name.endswith(QUANTIZER_SUFFIXES):
                values.append(v.numpy())
            elif name in ("gamma", "moving_variance"):
                values.append(rng.uniform(0.5, 1.5, v.shape))
            elif name == "alpha":
                values.append(rng.uniform(0.0, 0.5, v.shape))
            elif name in ("kernel", "depthwise_kernel"):
                values.append(v.numpy() * rng.uniform(0.5, 1.5))
            else:
                values.append(rng.normal(0.0, 0.1, v.shape))
        layer.set_weights(values)
    return model


def perturb_quantizers(model, seed=1):
    rng = np.random.default_rng(seed)
    for wrapper in wrappers(model).values():
        _, variables = wrapper.input_quantizer
        variables["start"].assign(rng.uniform(-0.2, 0.2))
        variables["intervals"].assign(rng.uniform(0.4, 0.9, variables["intervals"].shape))
        variables["beta1"].assign(rng.uniform(0.8, 1.2))
        variables["beta2"].assign(rng.uniform(0.8, 1.2))


# ------------------------------------------------------------------ NumPy reference of the float ResNet-20

def np_conv(x, kernel, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i: i + stride * (out_h - 1) + 1: stride, j: j + stride * (out_w - 1) + 1: stride] @ kernel[i, j]
    return out


def reference_resnet20(model, x):
    """Inference forward pass written from the official PyTorch structure, in float64."""
    w = {layer.name: [np.asarray(a, np.float64) for a in layer.get_weights()] for layer in model.layers}

    def bn(name, y):
        gamma, beta, mean, var = w[name]
        return (y - mean) / np.sqrt(var + 1e-5) * gamma + beta

    def rprelu(name, y):
        bias1, alpha, bias2 = w[name]
        y = y + bias1
        return np.where(y > 0, y, alpha * y) + bias2

    y = np.maximum(bn("stem_bn", np_conv(x, w["stem_conv"][0], 1, 1)), 0)
    for stage, stride in zip((1, 2, 3), (1, 2, 2)):
        for index in range(3):
            p = f"layer{stage}_{index}"
            s = stride if index == 0 else 1
            identity = y
            if f"{p}_downsample_conv" in w:
                identity = bn(f"{p}_downsample_bn", np_conv(y, w[f"{p}_downsample_conv"][0], s, 0))
            out = bn(f"{p}_bn1", np_conv(rprelu(f"{p}_rprelu1", y), w[f"{p}_conv1"][0], s, 1))
            out = bn(f"{p}_bn2", np_conv(rprelu(f"{p}_rprelu2", out), w[f"{p}_conv2"][0], 1, 1))
            y = rprelu(f"{p}_rprelu_out", out + identity)
    kernel, bias = w["fc"]
    return y.mean(axis=(1, 2)) @ kernel + bias


def test_float_resnet20_matches_numpy_reference():
    keras.utils.set_random_seed(0)
    model = randomize(models.resnet20(width=4, input_shape=SMALL))
    x = np.random.default_rng(1).normal(size=(3, *SMALL)).astype(np.float32)
    got = model(x, training=False).numpy()
    expected = reference_resnet20(model, x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ------------------------------------------------------------------ shapes and parameter counts

def rprelu_params(blocks, widths, block, stem=64):
    """RPReLU parameters (3 per channel) of the official ResNet blocks."""
    expansion = 4 if block == "bottleneck" else 1
    total, inplanes = 0, stem
    for count_, planes in zip(blocks, widths):
        for _ in range(count_):
            if block == "basic":
                channels = inplanes + 2 * planes
            else:
                channels = inplanes + 2 * planes + planes * expansion
            total += 3 * channels
            inplanes = planes * expansion
    return total


def mobilenet_rprelu_params():
    total, inp = 0, 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for _ in range(n):
            total += 3 * (inp + 2 * inp * t)
            inp = c
    return total


def test_resnet18_imagenet_shapes_and_parameter_count():
    keras.utils.set_random_seed(0)
    model = models.resnet18()
    assert model.name == "resnet18" and model.output_shape == (None, 1000)
    for layer, size in (("stem_pool", 56), ("layer1_1_rprelu_out", 56), ("layer2_0_add", 28),
                        ("layer3_0_add", 14), ("layer4_1_rprelu_out", 7)):
        assert model.get_layer(layer).output_shape[1:3] == (size, size), layer
    rprelu = rprelu_params((2, 2, 2, 2), (64, 128, 256, 512), "basic")
    assert rprelu == 15_936
    assert count(model.trainable_weights) == TORCHVISION_PARAMS["resnet18"] + rprelu
    assert count(model.non_trainable_weights) == 2 * 4_800  # BN running mean/var, 4800 BN channels
    assert model(np.zeros((1, 224, 224, 3), np.float32)).shape == (1, 1000)

    quantized = models.quantize(model, bits=2)
    quantizer_params = 19 * (3 + 3)  # 16 block convs + 3 downsample; start, beta1, beta2 + 3 intervals
    assert count(quantized.trainable_weights) == TORCHVISION_PARAMS["resnet18"] + rprelu + quantizer_params
    assert count(quantized.non_trainable_weights) == 2 * 4_800 + 19  # + tfmot's optimizer_step per wrapper
    assert quantized.output_shape == (None, 1000)


@pytest.mark.parametrize("name,rprelu", [
    ("resnet34", rprelu_params((3, 4, 6, 3), (64, 128, 256, 512), "basic")),
    ("resnet50", rprelu_params((3, 4, 6, 3), (64, 128, 256, 512), "bottleneck")),
    # The official MobileNetV2 gives block 1 an expansion conv (32x32 kernel + BN) torchvision lacks.
    ("mobilenet_v2", mobilenet_rprelu_params() + 32 * 32 + 2 * 32),
])
def test_float_parameter_counts(name, rprelu):
    model = models.get_model(name)
    assert model.output_shape == (None, 1000)
    assert count(model.trainable_weights) == TORCHVISION_PARAMS[name] + rprelu


def test_pytorch_output_sizes_on_odd_input():
    """floor((n + 2p - k) / s) + 1 at every stride-2 layer, as PyTorch (Keras 'same' would round up)."""
    model = models.resnet18(input_shape=(65, 65, 3), num_classes=10)
    sizes = {"stem_conv": 33, "stem_pool": 17, "layer2_0_conv1": 9, "layer2_0_downsample_conv": 9,
             "layer3_0_add": 5, "layer4_0_add": 3}
    for layer, size in sizes.items():
        assert model.get_layer(layer).output_shape[1:3] == (size, size), layer


def test_mobilenet_v2_structure_and_alpha():
    model = models.mobilenet_v2(input_shape=(64, 64, 3), num_classes=10, alpha=0.5)
    assert model.get_layer("stem_conv").output_shape == (None, 32, 32, 16)
    assert model.get_layer("block17_bn3").output_shape == (None, 2, 2, 160)
    assert model.get_layer("head_conv").output_shape[-1] == 1280
    adds = sorted(int(layer.name.split("_")[0][5:]) for layer in model.layers if isinstance(layer, keras.layers.Add))
    assert adds == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    strided = [layer.name for layer in model.layers
               if isinstance(layer, PaddedDepthwiseConv2D) and layer.strides == (2, 2)]
    assert strided == ["block2_conv2", "block4_conv2", "block7_conv2", "block14_conv2"]


# ------------------------------------------------------------------ the quantization plan

def block_input_layer(model, wrapper):
    return wrapper.inbound_nodes[0].inbound_layers


@pytest.mark.parametrize("builder,kwargs,n_quantized,float_downsample", [
    (models.resnet20, dict(bits=2, width=4, input_shape=SMALL, quantize_downsample=False), 18, 2),
    (models.resnet50, dict(bits=3, input_shape=(32, 32, 3), num_classes=10, quantize_downsample=False), 48, 4),
    (models.mobilenet_v2, dict(bits=4, input_shape=(32, 32, 3), num_classes=10), 52, 0),
])
def test_quantized_twin_follows_the_paper(builder, kwargs, n_quantized, float_downsample):
    check_paper_plan(builder(**kwargs), kwargs["bits"], n_quantized, float_downsample)


def test_quantized_resnet20_follows_the_paper(quantized20):
    check_paper_plan(quantized20, 2, 20, 0)


def check_paper_plan(model, bits, n_quantized, float_downsample):
    quantized = wrappers(model)
    assert len(quantized) == n_quantized
    for name, wrapper in quantized.items():
        config = wrapper.quantize_config
        assert (config.weight_bits, config.activation_bits) == (bits, bits), name
        producer = block_input_layer(model, wrapper)
        if name.endswith("downsample_conv"):
            # Quantizer straight on the raw block input: the previous block's output, no RPReLU.
            assert producer.name.endswith(("rprelu_out", "stem_pool", "stem_relu")), name
        elif name == "head_conv":
            assert producer.name == "block17_bn3"
        else:
            assert isinstance(producer, RPReLU) and producer.name == name.replace("conv", "rprelu"), name
        if type(wrapper.layer) is keras.layers.Conv2D:
            assert wrapper.layer.kernel_size == (1, 1)  # padded convs are all PaddedConv2D
    assert isinstance(model.get_layer("stem_conv"), (keras.layers.Conv2D, PaddedConv2D))
    assert isinstance(model.get_layer("fc"), keras.layers.Dense)
    float_convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(float_convs) == 1 + float_downsample
    assert all(n == "stem_conv" or n.endswith("downsample_conv") for n in float_convs)
    if model.name == "mobilenet_v2":
        depthwise = [w for w in quantized.values() if isinstance(w.layer, PaddedDepthwiseConv2D)]
        assert len(depthwise) == 17


def test_quantize_copies_float_weights_exactly():
    keras.utils.set_random_seed(2)
    float_model = randomize(models.resnet20(width=4, input_shape=SMALL), seed=3)
    quantized = models.quantize(float_model, bits=2)
    float_layers = {layer.name: layer for layer in float_model.layers}
    compared = 0
    for layer in quantized.layers:
        expected = weights_by_name(float_layers[inner_name(layer)])
        got = weights_by_name(layer)
        assert set(got) == set(expected), layer.name
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{layer.name}/{key}")
            compared += 1
    assert compared == len(float_model.weights)
    for wrapper in wrappers(quantized).values():  # quantizers at the paper's initialisation
        _, variables = wrapper.input_quantizer
        assert variables["start"].numpy() == 0 and variables["beta1"].numpy() == variables["beta2"].numpy() == 1
        np.testing.assert_allclose(variables["intervals"].numpy(), [2 / 3] * 3)


def test_bits_arguments():
    model = models.resnet20(weight_bits=2, activation_bits=4, width=4, input_shape=SMALL)
    assert {(w.quantize_config.weight_bits, w.quantize_config.activation_bits)
            for w in wrappers(model).values()} == {(2, 4)}
    frozen = models.resnet20(2, width=4, input_shape=SMALL, learn_thresholds=False)
    trainable = {short(v) for v in frozen.trainable_weights}
    assert "input_n2uq_beta1" in trainable and "input_n2uq_start" not in trainable
    assert not any(w.input_quantizer[1]["intervals"].trainable for w in wrappers(frozen).values())
    with pytest.raises(ValueError, match="both weight_bits and activation_bits"):
        models.resnet20(weight_bits=2, width=4, input_shape=SMALL)
    with pytest.raises(ValueError, match="bits"):
        models.resnet20(9, width=4, input_shape=SMALL)


def test_quantized_twin_trains_every_parameter(quantized20):
    """One gradient step reaches every trainable variable: RPReLU, BN, kernels and quantizer parameters."""
    model = quantized20
    x = np.random.default_rng(5).normal(size=(4, *SMALL)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [v.name for v, g in zip(model.trainable_weights, grads) if g is None]
    assert not missing
    assert all(np.isfinite(g.numpy()).all() for g in grads)


# ------------------------------------------------------------------ load_float_weights

def assert_float_weights_equal(quantized, float_model):
    float_layers = {layer.name: layer for layer in float_model.layers}
    for layer in quantized.layers:
        expected = weights_by_name(float_layers[inner_name(layer)])
        got = weights_by_name(layer)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{layer.name}/{key}")


def quantizer_values(model):
    return {name: {k: v.numpy().copy() for k, v in w.input_quantizer[1].items()}
            for name, w in wrappers(model).items()}


@pytest.mark.parametrize("source", ["model", "model.h5", "model.keras", "weights.h5", "w.weights.h5", "ckpt"])
def test_load_float_weights(tmp_path, source, quantized20):
    keras.utils.set_random_seed(6)
    float_model = randomize(models.resnet20(width=4, input_shape=SMALL), seed=7)
    quantized = quantized20
    perturb_quantizers(quantized)
    before = quantizer_values(quantized)
    if source == "model":
        arg = float_model
    else:
        arg = str(tmp_path / source)
        (float_model.save if source.startswith("model") else float_model.save_weights)(arg)
    assert models.load_float_weights(quantized, arg) is quantized
    assert_float_weights_equal(quantized, float_model)
    after = quantizer_values(quantized)
    for name in before:
        for key in before[name]:
            np.testing.assert_array_equal(after[name][key], before[name][key])
    x = np.random.default_rng(8).normal(size=(2, *SMALL)).astype(np.float32)
    assert np.isfinite(quantized.predict(x, verbose=0)).all()


def test_load_float_weights_errors(tmp_path, quantized20):
    quantized = quantized20
    kernel_before = weights_by_name(wrappers(quantized)["layer1_0_conv1"])["kernel"]

    other_classes = randomize(models.resnet20(width=4, input_shape=SMALL, num_classes=5))
    with pytest.raises(ValueError, match="layer 'fc'.*shape"):
        models.load_float_weights(quantized, other_classes)
    # Nothing was assigned before the mismatch was found.
    np.testing.assert_array_equal(weights_by_name(wrappers(quantized)["layer1_0_conv1"])["kernel"], kernel_before)

    with pytest.raises(ValueError, match="layer 'stem_conv'"):
        models.load_float_weights(quantized, models.resnet20(width=8, input_shape=SMALL))

    def rename_fc(layer):
        config = layer.get_config()
        if layer.name == "fc":
            config["name"] = "classifier"
        return layer.__class__.from_config(config)

    renamed = keras.models.clone_model(models.resnet20(width=4, input_shape=SMALL), clone_function=rename_fc)
    with pytest.raises(ValueError, match="layer 'fc' .*no counterpart"):
        models.load_float_weights(quantized, renamed)

    with pytest.raises(FileNotFoundError):
        models.load_float_weights(quantized, str(tmp_path / "missing.h5"))
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="could not load float weights"):
        models.load_float_weights(quantized, str(corrupt))
    models.resnet20(width=8, input_shape=SMALL).save_weights(str(tmp_path / "wide.weights.h5"))
    with pytest.raises(ValueError, match="could not load float weights"):
        models.load_float_weights(quantized, str(tmp_path / "wide.weights.h5"))


# ------------------------------------------------------------------ save / load and errors

@pytest.mark.parametrize("filename", ["q.h5", "q.keras"])
def test_quantized_resnet20_save_load_round_trip(tmp_path, filename, quantized20):
    model = randomize(quantized20, seed=10)
    perturb_quantizers(model)
    x = np.random.default_rng(11).normal(size=(4, *SMALL)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / filename)
    loaded = n2uq_tf.load_model(tmp_path / filename)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert quantizer_values(loaded).keys() == quantizer_values(model).keys()


def test_get_model_and_registry():
    assert set(models.MODELS) == {"resnet18", "resnet34", "resnet50", "resnet20", "mobilenet_v2"}
    model = models.get_model("resnet20", width=4, input_shape=SMALL, name="tiny")
    assert model.name == "tiny" and model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*mobilenet_v2"):
        models.get_model("resnet19")


def test_quantize_rejects_foreign_and_quantized_models(quantized20):
    inputs = keras.Input((8, 8, 3))
    foreign = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Conv2D(4, 3)(inputs)))
    with pytest.raises(ValueError, match="not built by n2uq_tf.models"):
        models.quantize(foreign)
    with pytest.raises(ValueError, match="already quantized"):
        models.quantize(quantized20)
    with pytest.raises(TypeError):
        models.quantize("resnet20")


@pytest.mark.parametrize("builder,kwargs,match", [
    (models.resnet20, dict(input_shape=(32, 32)), "input_shape"),
    (models.resnet20, dict(num_classes=0), "num_classes"),
    (models.resnet20, dict(width=0), "width"),
    (models.resnet18, dict(input_shape=(16, 16, 3)), "at least 32"),
    (models.mobilenet_v2, dict(alpha=-1.0), "alpha"),
])
def test_builder_argument_errors(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)


# ------------------------------------------------------------------ quantizer methods, frozen teachers

def methods_of(model):
    return {(w.quantize_config.weight_method, w.quantize_config.activation_method) for w in wrappers(model).values()}


@pytest.mark.parametrize("builder,kwargs,expected", [
    (models.resnet20, dict(method="lsq"), ("lsq", "lsq")),
    (models.resnet20, dict(method="pact"), ("dorefa", "pact")),  # PACT's paper pairs DoReFa weights
    (models.resnet20, dict(weight_method="none", activation_method="uniform"), ("none", "uniform")),
    (models.resnet20, dict(method="dorefa", activation_method="n2uq"), ("dorefa", "n2uq")),
    (models.resnet20, dict(weight_method="learnable"), ("learnable", "n2uq")),
    (models.resnet18, dict(method="daq", input_shape=(32, 32, 3), num_classes=10), ("daq", "daq")),
    (models.mobilenet_v2, dict(method="dorefa", input_shape=(32, 32, 3), num_classes=10, alpha=0.35),
     ("dorefa", "dorefa")),
])
def test_builders_pass_the_quantizer_methods(builder, kwargs, expected):
    kwargs = dict(dict(width=4, input_shape=SMALL) if builder is models.resnet20 else {}, **kwargs)
    model = builder(2, **kwargs)
    assert methods_of(model) == {expected}
    for wrapper in wrappers(model).values():
        quantizer, _ = wrapper.input_quantizer
        assert quantizer.method == expected[1]
        assert wrapper.weight_quantizers[0].quantizer.method == expected[0]


def test_quantize_passes_the_quantizer_methods():
    keras.utils.set_random_seed(4)
    float_model = models.resnet20(width=4, input_shape=SMALL)
    assert methods_of(models.quantize(float_model, 2)) == {("n2uq", "n2uq")}
    assert methods_of(models.quantize(float_model, 2, method=None)) == {("n2uq", "n2uq")}
    assert methods_of(models.quantize(float_model, 2, weight_method="none", activation_method="uniform")) == {
        ("none", "uniform")}
    star = models.quantize(float_model, 2, method="lsq", quantize_downsample=False)
    assert methods_of(star) == {("lsq", "lsq")} and len(wrappers(star)) == 18
    assert methods_of(models.quantize(float_model, 2, learn_thresholds=False)) == {("n2uq", "uniform")}
    with pytest.raises(ValueError, match="unknown quantization method 'lsqq'"):
        models.quantize(float_model, 2, method="lsqq")
    with pytest.raises(ValueError, match="not a weight method"):
        models.quantize(float_model, 2, weight_method="pact")
    with pytest.raises(ValueError, match="give bits"):
        models.resnet20(width=4, input_shape=SMALL, method="lsq")


def test_quantizing_a_frozen_teacher_gives_a_trainable_student():
    """Regression: DistillationModel sets teacher.trainable = False; a student quantized from that
    teacher afterwards was a clone with every layer frozen (BatchNorm in inference mode on the float
    statistics, RPReLU and BN fixed), which collapsed the examples/ablation.py rows after the first."""
    keras.utils.set_random_seed(8)
    teacher = randomize(models.resnet20(width=4, input_shape=SMALL), seed=9)
    fresh = models.quantize(teacher, 2, weight_method="none")
    n2uq_tf.DistillationModel(fresh, teacher)  # freezes the teacher, as in the ablation loop
    assert not teacher.trainable
    with pytest.warns(UserWarning, match="frozen"):
        student = models.quantize(teacher, 2, weight_method="none")
    with pytest.warns(UserWarning, match="frozen"):
        direct = n2uq_tf.quantize_model(teacher, 2, skip_layers=["stem_conv", "fc"])
    for model in (student, direct):
        assert [(short(v), v.shape) for v in model.trainable_variables] == [
            (short(v), v.shape) for v in fresh.trainable_variables]
        assert all(layer.trainable for layer in model.layers)
    x = np.random.default_rng(10).normal(size=(4, *SMALL)).astype(np.float32)
    # BatchNorm uses batch statistics at training: the same outputs as the student of the unfrozen teacher.
    np.testing.assert_allclose(student(x, training=True).numpy(), fresh(x, training=True).numpy(), rtol=1e-5,
                               atol=1e-5)
    assert teacher.trainable is False  # the teacher itself is left as it was
