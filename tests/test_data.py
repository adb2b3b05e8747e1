"""n2uq_tf.data: pipelines on small TFDS-format data generated on disk, preprocessing against NumPy
references, the crop-window sampler, digits, and the offline errors.

The TFDS data is real TFDS output, read back through `tfds.builder(name, data_dir=tmp)` exactly as
for a user:
- imagenet2012: fake ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar in a
  manual_dir, prepared by TFDS' own imagenet2012 builder via `load_dataset(..., download=True)`;
- cifar10: TFDS' Cifar10 builder with its download step replaced by generated arrays, which
  writes a genuine prepared cifar10/3.0.2 folder.
"""

import io
import os
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from n2uq_tf import data

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)

# Validation images all have shorter side 64 = round(56 * 256 / 224): the eval path at image_size 56
# is then a pure centre crop, comparable exactly. One odd margin (71 - 56 = 15) checks the floor.
VAL_SHAPES = [(64, 80), (96, 64), (64, 64), (64, 71), (70, 64)]
TRAIN_SYNSETS = 3
TRAIN_PER_SYNSET = 4


def _jpeg(rng, h, w, chroma_downsampling=True):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=chroma_downsampling).numpy()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_imagenet_manual_files(manual_dir):
    rng = np.random.default_rng(0)
    synsets = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
        for synset in synsets[:TRAIN_SYNSETS]:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as sub:
                for i in range(TRAIN_PER_SYNSET):
                    _add(sub, f"{synset}_{i}.JPEG", _jpeg(rng, 40 + 8 * i, 72 - 8 * i))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i, (h, w) in enumerate(VAL_SHAPES, 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, h, w))
    return synsets


def _cifar_images(n, offset):
    """Distinct images: pixel values encode (offset + index), so an output can be traced back."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = offset + np.arange(n)  # unique key per image
    return images, (offset + np.arange(n)) % 10


def _write_cifar10(data_dir, splits):
    base = tfds.builder_cls("cifar10")
    with tfds.core.registered.skip_registration():
        class GeneratedCifar10(base):
            name = "cifar10"  # same folder, features and version as the real one

            def _split_generators(self, dl_manager):
                return {split: self._examples(*arrays) for split, arrays in splits.items()}

            def _examples(self, images, labels):
                for i, (image, label) in enumerate(zip(images, labels)):
                    yield i, {"id": str(i), "image": image, "label": int(label)}

    GeneratedCifar10(data_dir=data_dir).download_and_prepare()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    data_dir, manual_dir = str(root / "data"), str(root / "manual")
    os.makedirs(manual_dir)
    synsets = _write_imagenet_manual_files(manual_dir)
    # The real TFDS imagenet2012 build from manual files, through our download=True path.
    ds = data.load_dataset("imagenet2012", "validation", batch_size=8, image_size=56, data_dir=data_dir,
                           manual_dir=manual_dir, download=True)
    assert sum(int(x.shape[0]) for x, _ in ds) == len(VAL_SHAPES)
    cifar = {"train": _cifar_images(20, 0), "test": _cifar_images(10, 100)}
    _write_cifar10(data_dir, cifar)
    return {"data_dir": data_dir, "synsets": synsets, "cifar": cifar}


def _unnormalize(x, mean, std):
    return (np.asarray(x) * std + mean) * 255.0


# --- names, info and errors -------------------------------------------------------------------------

def test_unknown_name_lists_the_names():
    for call in (lambda: data.load_dataset("mnist"), lambda: data.dataset_info("mnist")):
        with pytest.raises(ValueError, match="cifar10, digits, imagenet2012"):
            call()


def test_dataset_info():
    info = data.dataset_info("imagenet2012")
    assert (info.num_classes, info.image_size) == (1000, 224)
    assert info.splits == {"train": 1_281_167, "validation": 50_000}
    np.testing.assert_allclose(info.mean, IMAGENET_MEAN)
    info = data.dataset_info("cifar10")
    assert (info.num_classes, info.image_size, info.splits) == (10, 32, {"train": 50_000, "test": 10_000})
    np.testing.assert_allclose(info.std, CIFAR_STD)
    info = data.dataset_info("digits")
    assert (info.num_classes, info.image_size, info.splits) == (10, 32, {"train": 1437, "test": 360})
    info.splits["train"] = 0  # a copy: the table is not changed
    assert data.dataset_info("digits").splits["train"] == 1437
    assert set(data.DATASETS) == {"imagenet2012", "cifar10", "digits"}


def test_missing_tfds_data_says_how_to_get_it(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(data.DatasetNotAvailableError) as err:
        data.load_dataset("cifar10", data_dir=empty)
    assert isinstance(err.value, FileNotFoundError)
    assert "download=True" in str(err.value) and "tfds build cifar10" in str(err.value)
    for download in (False, True):  # True: the tars are missing, so nothing is even attempted
        with pytest.raises(data.DatasetNotAvailableError) as err:
            data.load_dataset("imagenet2012", "validation", data_dir=empty, download=download)
        message = str(err.value)
        assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
        assert os.path.join(empty, "downloads", "manual") in message and "image-net.org" in message
    assert not os.path.exists(empty)  # the check only looked


def test_unknown_and_unprepared_splits(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="train, validation"):  # TFDS' unlabelled test split is not offered
        data.load_dataset("imagenet2012", "test", data_dir=tfds_dir["data_dir"])
    with pytest.raises(ValueError, match="train, test"):
        data.load_dataset("cifar10", "validation", data_dir=tfds_dir["data_dir"])
    # Prepared from the validation tar alone: asking for train says what is missing.
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    _write_imagenet_manual_files(str(manual_dir))
    os.remove(manual_dir / "ILSVRC2012_img_train.tar")
    data_dir = str(tmp_path / "data")
    data.load_dataset("imagenet2012", "validation", data_dir=data_dir, manual_dir=str(manual_dir),
                      download=True)
    missing_train = "(?s)split 'train'.*delete.*ILSVRC2012_img_train.tar"
    with pytest.raises(data.DatasetNotAvailableError, match=missing_train):
        data.load_dataset("imagenet2012", "train[:50%]", data_dir=data_dir)


# --- preprocessing against hand-computed references ------------------------------------------------

def test_normalisation_of_a_constant_image():
    image = np.full((40, 50, 3), [10, 128, 250], np.uint8)
    expected = (np.array([10, 128, 250]) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    out = data.preprocess_imagenet(tf.constant(image), False, 24).numpy()
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    expected = (np.array([10, 128, 250]) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    out = data.preprocess_cifar(tf.constant(image[:32, :32]), False, 32).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    out = data.preprocess_digits(tf.fill([8, 8, 1], 0.5), False, 16).numpy()
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, (0.5 - 0.3054) / 0.3760, atol=1e-5)


def test_imagenet_eval_resize_and_centre_crop_of_a_ramp():
    # Away from the borders (the centre crop keeps only such pixels) bilinear resizing of a linear
    # image gives the ramp at the mapped coordinates: exactly for plain bilinear, within < 0.1 of
    # 255 for the antialiased kernel (sampled at whole pixels, its first moment is not exactly 0).
    # A crop or scale off by one pixel would be off by > 0.5.
    h, w, size = 100, 150, 32
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ramp = (0.9 * yy + 0.5 * xx + 20.0).astype(np.float32)
    image = np.stack([ramp, 255.0 - ramp, 0.5 * ramp], -1)
    out = data.preprocess_imagenet(tf.constant(image), False, size).numpy()
    short = round(size * 256 / 224)            # 37
    new_h, new_w = short, short * w // h       # 37 x 55, long side truncated as in torchvision
    top, left = (new_h - size) // 2, (new_w - size) // 2
    ys = (np.arange(top, top + size) + 0.5) * h / new_h - 0.5
    xs = (np.arange(left, left + size) + 0.5) * w / new_w - 0.5
    ref_ramp = 0.9 * ys[:, None] + 0.5 * xs[None, :] + 20.0
    ref = np.stack([ref_ramp, 255.0 - ref_ramp, 0.5 * ref_ramp], -1)
    np.testing.assert_allclose(_unnormalize(out, IMAGENET_MEAN, IMAGENET_STD), ref, atol=0.1)


def test_imagenet_eval_pipeline_is_a_deterministic_centre_crop(tfds_dir):
    size = 56
    raw = tfds.builder("imagenet2012", data_dir=tfds_dir["data_dir"]).as_dataset(
        split="validation", as_supervised=True, shuffle_files=False)
    raw = [(x.numpy(), int(y)) for x, y in raw]
    ref_x, ref_y = [], []
    for image, label in raw:
        h, w, _ = image.shape
        top, left = (h - size) // 2, (w - size) // 2
        crop = image[top:top + size, left:left + size].astype(np.float32)
        ref_x.append((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
        ref_y.append(label)
    runs = []
    for _ in range(2):
        ds = data.load_dataset("imagenet2012", "validation", batch_size=2, image_size=size,
                               data_dir=tfds_dir["data_dir"])
        batches = list(ds.as_numpy_iterator())
        assert [len(y) for _, y in batches] == [2, 2, 1]  # evaluation keeps the remainder
        runs.append((np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][0], np.stack(ref_x), atol=1e-5)
    assert runs[0][1].dtype == np.int64 and runs[0][1].tolist() == ref_y
    # The labels are those of TFDS' validation_labels.txt for the first len(VAL_SHAPES) images.
    val_synsets = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    expected = sorted(tfds_dir["synsets"].index(s) for s in val_synsets[:len(VAL_SHAPES)])
    assert sorted(ref_y) == expected


def test_imagenet_training_pipeline(tfds_dir):
    n = TRAIN_SYNSETS * TRAIN_PER_SYNSET

    def load(seed, **kw):
        return data.load_dataset("imagenet2012", "train", batch_size=5, image_size=24,
                                 data_dir=tfds_dir["data_dir"], seed=seed, **kw)

    batches = list(load(0).as_numpy_iterator())
    assert [x.shape for x, _ in batches] == [(5, 24, 24, 3)] * (n // 5)  # drop_remainder by default
    assert [len(y) for _, y in load(0, drop_remainder=False).as_numpy_iterator()] == [5, 5, 2]
    x = np.concatenate([b for b, _ in batches])
    assert x.dtype == np.float32 and np.isfinite(x).all()
    lo, hi = -IMAGENET_MEAN / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert (x >= lo - 1e-4).all() and (x <= hi + 1e-4).all()  # bilinear is a convex combination
    labels = np.concatenate([y for _, y in load(0, drop_remainder=False).as_numpy_iterator()])
    assert labels.dtype == np.int64
    assert sorted(labels.tolist()) == sorted(list(range(TRAIN_SYNSETS)) * TRAIN_PER_SYNSET)
    # Same seed: same stream; other seed or next epoch: other crops.
    again = np.concatenate([b for b, _ in load(0).as_numpy_iterator()])
    np.testing.assert_array_equal(x, again)
    other = np.concatenate([b for b, _ in load(1).as_numpy_iterator()])
    assert not np.allclose(x, other)
    ds = load(0)
    first, second = [np.concatenate([b for b, _ in ds.as_numpy_iterator()]) for _ in range(2)]
    assert not np.allclose(first, second)
    rep = load(0, repeat=True)
    assert len(list(rep.take(5))) == 5  # endless


def test_crop_window_sampler_matches_torchvision_ranges():
    seeds = tf.reshape(tf.range(1200, dtype=tf.int64), [600, 2])

    @tf.function
    def windows(height, width):
        return tf.map_fn(lambda s: tf.stack(data.sample_crop_window(height, width, s)), seeds,
                         fn_output_signature=tf.int32)

    # (size, largest possible area fraction: h <= H and w <= 4/3 h)
    for (height, width), largest in [((100, 100), 1.0), ((60, 200), 0.4), ((333, 500), 444 / 500)]:
        y, x, h, w = windows(height, width).numpy().T.astype(np.float64)
        assert (h > 0).all() and (w > 0).all() and (y >= 0).all() and (x >= 0).all()
        assert (y + h <= height).all() and (x + w <= width).all()
        # w = round(sqrt(A r)), h = round(sqrt(A / r)): allow half a pixel of rounding per side.
        area_lo, area_hi = (h + 0.5) * (w + 0.5), np.maximum(h - 0.5, 0) * np.maximum(w - 0.5, 0)
        assert (area_lo >= 0.08 * height * width).all() and (area_hi <= height * width).all()
        assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
        frac = h * w / (height * width)
        assert frac.min() < 0.1 and frac.max() > 0.75 * largest  # the whole scale range is used
        assert len(set(zip(y, x, h, w))) > 500  # random
        # offsets are uniform over the free room: both ends are reached in a coarse sense
        assert (y / np.maximum(height - h, 1)).mean() == pytest.approx(0.5, abs=0.1)
    # No try fits: the largest centred window of ratio 4/3 (or 3/4), torchvision's fallback.
    assert [int(v) for v in data.sample_crop_window(10, 1000, tf.constant([1, 2]))] == [0, 493, 10, 13]
    assert [int(v) for v in data.sample_crop_window(1000, 10, tf.constant([3, 4]))] == [493, 0, 13, 10]


def test_imagenet_training_crop_of_jpeg_equals_crop_of_decoded_image():
    # The fast path decodes only the window; it must give the same window as decoding everything.
    # Exactly so without chroma subsampling; with 4:2:0 (most ImageNet files) libjpeg upsamples the
    # chroma at the window's edge without the pixels outside it, so edge pixels differ a little.
    rng = np.random.default_rng(1)
    for subsampled in (False, True):
        jpeg = tf.constant(_jpeg(rng, 48, 64, chroma_downsampling=subsampled))
        decoded = tf.io.decode_jpeg(jpeg, channels=3)
        for s in range(5):
            seed = tf.constant([s, 7])
            fast = data.random_resized_crop(jpeg, 20, seed).numpy()
            slow = data.random_resized_crop(decoded, 20, seed).numpy()
            assert fast.shape == (20, 20, 3)
            if subsampled:
                assert np.abs(fast - slow).mean() < 3.0
            else:
                np.testing.assert_array_equal(fast, slow)


def _direction_image():
    """Channel 0 = 6x + 20, channel 1 = 6y + 20: a crop's offset and a flip can be read off."""
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([6 * xx + 20, 6 * yy + 20, np.full_like(xx, 128)], -1).astype(np.uint8)


def test_cifar_training_shift_and_flip():
    image = tf.constant(_direction_image())
    seeds = tf.data.Dataset.range(400).map(lambda i: tf.stack([i, tf.constant(5, tf.int64)]))
    out = seeds.map(lambda s: data.preprocess_cifar(image, True, 32, seed=s)).batch(400)
    out = _unnormalize(next(iter(out)).numpy(), CIFAR_MEAN, CIFAR_STD)
    assert out.shape == (400, 32, 32, 3)
    centre = out[:, 12:20, 12:20]  # never reaches the padding (shift <= 4)
    flipped = centre[:, 0, -1, 0] < centre[:, 0, 0, 0]
    assert 0.4 < flipped.mean() < 0.6
    # Offsets: column 16 shows input column 16 + dx, or 15 + dx when flipped.
    col = (out[:, 16, 16, 0] - 20) / 6 - np.where(flipped, 15, 16)
    row = (out[:, 16, 16, 1] - 20) / 6 - 16
    for shift in (np.round(col, 3), np.round(row, 3)):
        assert set(shift.tolist()) == set(range(-4, 5))  # pad 4 + random crop: all 9 offsets
    # The padding is zero (black) before normalisation.
    assert np.abs(out.min()) < 1e-3


def test_cifar_pipelines(tfds_dir):
    data_dir = tfds_dir["data_dir"]
    images, labels = tfds_dir["cifar"]["test"]
    by_key = {int(img[0, 0, 0]): (img, lab) for img, lab in zip(images, labels)}
    ds = data.load_dataset("cifar10", "test", batch_size=4, data_dir=data_dir)
    seen = 0
    for x, y in ds.as_numpy_iterator():
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape[1:] == (32, 32, 3)
        pixels = np.round(_unnormalize(x, CIFAR_MEAN, CIFAR_STD)).astype(np.uint8)
        for img, lab in zip(pixels, y):
            ref_img, ref_lab = by_key[int(img[0, 0, 0])]
            np.testing.assert_array_equal(img, ref_img)  # evaluation: the image itself
            assert lab == ref_lab
            seen += 1
    assert seen == len(images)
    train = data.load_dataset("cifar10", "train", batch_size=8, data_dir=data_dir, seed=3)
    shapes = [(x.shape, y.shape) for x, y in train.as_numpy_iterator()]
    assert shapes == [((8, 32, 32, 3), (8,))] * 2
    big = data.load_dataset("cifar10", "train", batch_size=8, image_size=48, data_dir=data_dir, seed=3)
    assert next(iter(big))[0].shape == (8, 48, 48, 3)  # random resized crop at other sizes
    big_eval = data.load_dataset("cifar10", "test", batch_size=10, image_size=(40, 48), data_dir=data_dir)
    assert next(iter(big_eval))[0].shape == (10, 40, 48, 3)


# --- digits ---------------------------------------------------------------------------------------------

def test_digits_arrays_split_and_determinism():
    (x_train, y_train), (x_test, y_test) = data.digits_arrays()
    assert x_train.shape == (1437, 32, 32, 3) and x_test.shape == (360, 32, 32, 3)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    np.testing.assert_array_equal(x_train[..., 0], x_train[..., 2])  # gray, repeated
    (x2, y2), _ = data.digits_arrays()
    np.testing.assert_array_equal(x_train, x2)
    np.testing.assert_array_equal(y_train, y2)
    (small, _), _ = data.digits_arrays(image_size=8, channels=1)
    assert small.shape == (1437, 8, 8, 1)
    # The stated normalisation is the train split's: mean 0 and std 1 at 8x8.
    assert abs(small.mean()) < 1e-3 and abs(small.std() - 1) < 1e-3


def test_digits_pipelines():
    (_, _), (x_test, y_test) = data.digits_arrays()
    batches = list(data.load_dataset("digits", "test", batch_size=100).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    np.testing.assert_allclose(np.concatenate([x for x, _ in batches]), x_test, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), y_test)
    train = data.load_dataset("digits", "train", batch_size=128, seed=0)
    sizes = [len(y) for _, y in train.as_numpy_iterator()]
    assert sizes == [128] * (1437 // 128)
    n = sum(len(y) for _, y in data.load_dataset("digits", "train", batch_size=128, drop_remainder=False))
    assert n == 1437
    x, _ = next(iter(data.load_dataset("digits", "train", batch_size=1437, seed=0)))
    x2, _ = next(iter(data.load_dataset("digits", "train", batch_size=1437, seed=0)))
    np.testing.assert_array_equal(x.numpy(), x2.numpy())
    assert x.shape == (1437, 32, 32, 3)
    with pytest.raises(ValueError, match="train, test"):
        data.load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="plain split name"):
        data.load_dataset("digits", "train[:10]")


def test_digits_training_shift_without_flip():
    image = np.zeros((8, 8, 1), np.float32)
    image[2:6, 1] = 1.0  # a vertical bar left of the centre
    seeds = tf.data.Dataset.range(200).map(lambda i: tf.stack([i, tf.constant(9, tf.int64)]))
    out = next(iter(seeds.map(lambda s: data.preprocess_digits(image, True, 32, seed=s)).batch(200))).numpy()
    column_mass = (out[..., 0] - out[..., 0].min()).sum(axis=1)  # (200, 32)
    centre = (column_mass * np.arange(32)).sum(-1) / column_mass.sum(-1)
    eval_centre = 4 * 1 + 1.5  # the bar's column (1) mapped to 32 px
    assert np.abs(centre - eval_centre).max() <= 4.5  # shifted by at most one original pixel
    assert (centre < 16).all()  # never mirrored to the right half
    assert len(np.unique(np.round(centre, 2))) > 5


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.datasets._require_sklearn()


def test_tfds_datasets_without_tensorflow_datasets_say_what_to_install(monkeypatch, tmp_path):
    from n2uq_tf._optional import MissingDependencyError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # the data extra not installed
    with pytest.raises(MissingDependencyError, match=r"pip install tensorflow-datasets \(or n2uq_tf\[data\]\)"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_tfds_can_prepare_data_without_importlib_resources(monkeypatch):
    """tensorflow-datasets imports the undeclared importlib_resources to prepare a dataset: setup.cfg
    installs it on Python 3.10, and from 3.11 the standard library's importlib.resources stands in."""
    import importlib.resources
    monkeypatch.setitem(sys.modules, "importlib_resources", None)  # not installed
    if sys.version_info < (3, 11):
        with pytest.raises(ImportError, match="importlib_resources"):
            data.datasets._ensure_tfds_can_build()
    else:
        data.datasets._ensure_tfds_can_build()
        assert sys.modules["importlib_resources"].abc.Traversable is importlib.resources.abc.Traversable


# --- what the model takes: channels and normalisation -------------------------------------------------

LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)  # ITU-R BT.601, as tf.image.rgb_to_grayscale


def test_gray_and_unnormalised_cifar(tfds_dir):
    data_dir = tfds_dir["data_dir"]
    images, _ = tfds_dir["cifar"]["test"]
    by_key = {int(img[0, 0, 0]): img for img in images}
    # Evaluation keeps the order: the default (RGB, normalised) run names the images of each position.
    rgb = np.concatenate([x for x, _ in data.load_dataset("cifar10", "test", batch_size=10, data_dir=data_dir)])
    keys = np.round(_unnormalize(rgb, CIFAR_MEAN, CIFAR_STD)[:, 0, 0, 0]).astype(int)
    pixels = np.stack([by_key[k] for k in keys]).astype(np.float32)
    gray = pixels @ LUMA
    expected = {
        (1, "pixels"): gray[..., None], (1, "unit"): gray[..., None] / 255,
        (1, "dataset"): ((gray / 255 - LUMA @ CIFAR_MEAN) / (LUMA @ CIFAR_STD))[..., None],
        (3, "pixels"): pixels, (3, "unit"): pixels / 255, (3, "dataset"): (pixels / 255 - CIFAR_MEAN) / CIFAR_STD}
    for (channels, normalization), want in expected.items():
        x = np.concatenate([x for x, _ in data.load_dataset("cifar10", "test", batch_size=10, data_dir=data_dir,
                                                            channels=channels, normalization=normalization)])
        assert x.shape == (10, 32, 32, channels), (channels, normalization)
        np.testing.assert_allclose(x, want, rtol=1e-5, atol=2e-4, err_msg=f"{channels} {normalization}")
    # The defaults are the RGB, dataset-normalised images, bit for bit.
    np.testing.assert_array_equal(np.concatenate([x for x, _ in data.load_dataset(
        "cifar10", "test", batch_size=10, data_dir=data_dir, channels=3, normalization="dataset")]), rgb)


def test_gray_and_unnormalised_digits():
    raw = data.datasets._digits_raw()[1][0]  # the test split in [0, 1] (pixel / 16), 8x8x1
    mean, std = data.DIGITS_MEAN[0], data.DIGITS_STD[0]
    for channels in (1, 3):
        for normalization, want in (("unit", raw), ("pixels", raw * 255), ("dataset", (raw - mean) / std)):
            x = next(iter(data.load_dataset("digits", "test", batch_size=360, image_size=8, channels=channels,
                                            normalization=normalization)))[0].numpy()
            np.testing.assert_allclose(x, np.repeat(want, channels, axis=-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        data.load_dataset("digits", "test", channels=2)
    with pytest.raises(ValueError, match="normalization"):
        data.load_dataset("digits", "test", normalization="imagenet")
