"""Dataset table and `load_dataset`: TFDS pipelines (imagenet2012, cifar10) and sklearn's digits.

Nothing here downloads unless asked (`download=True`): a TFDS dataset that is not prepared in
`data_dir` raises `DatasetNotAvailableError` saying how to get it. Checking is a look at the
folder, never the network.
"""

import dataclasses
import functools
import glob
import importlib
import os
import re
import sys
from typing import Callable, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from n2uq_tf._optional import MissingDependencyError, require
from n2uq_tf.data import preprocess as pp


class DatasetNotAvailableError(FileNotFoundError):
    """The dataset's files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a training script needs to know about a dataset before loading it."""
    name: str
    num_classes: int
    image_size: int                   # default (square) input size
    splits: Mapping[str, int]         # split -> number of examples
    mean: Tuple[float, float, float]  # per-channel normalisation, RGB in [0, 1]
    std: Tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One row of `DATASETS`: adding a dataset is adding a row."""
    info: DatasetInfo
    # (image, training, image_size, seed) -> float32 normalised image
    preprocess: Callable
    # (spec, split, training=, seed=, data_dir=, manual_dir=, download=) -> unbatched (image, label)
    load: Callable
    shuffle_buffer: int
    tfds_name: Optional[str] = None
    skip_decoding: bool = False       # keep JPEG bytes: preprocess decodes only the crop window
    cache: bool = False               # small enough to keep decoded in memory
    manual_files: Tuple[str, ...] = ()
    how_to_get: str = ""              # formatted with name, data_dir, manual_dir


_DIGITS_SPLITS = {"train": 1437, "test": 360}


def _default_data_dir():
    # Same rule as tfds.core.constants.get_default_data_dir, without importing TFDS.
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _split_names(split):
    """Base split names in a TFDS split string such as 'train[:10%]+validation'."""
    return re.findall(r"(?:^|\+)\s*([A-Za-z_][\w-]*)", split)


def _prepared_version_exists(data_dir, tfds_name):
    # A cheap pre-check so the common "not there" case neither builds a builder (which logs
    # warnings about the missing folder) nor touches anything but the local disk.
    return bool(glob.glob(os.path.join(glob.escape(data_dir), tfds_name, "*", "dataset_info.json")))


def _ensure_tfds_can_build():
    # tensorflow-datasets 4.9.x imports `importlib_resources` when preparing a dataset but declares
    # it only for Python < 3.9 (tensorflow/datasets#11212); it uses importlib_resources.abc.Traversable.
    # setup.cfg installs the package on Python 3.10, whose importlib.resources has no .abc; from 3.11
    # the standard library's module has that API and stands in for it.
    try:
        importlib.import_module("importlib_resources")
    except ImportError:
        if sys.version_info < (3, 11):
            raise MissingDependencyError("preparing a TFDS dataset on Python 3.10 needs importlib_resources: pip "
                                         "install importlib_resources (or n2uq_tf[data]; tensorflow/datasets#11212)"
                                         ) from None
        importlib.import_module("importlib.resources.abc")  # makes .abc an attribute, as tfds uses it
        sys.modules["importlib_resources"] = sys.modules["importlib.resources"]


def _tfds():
    return require("tensorflow_datasets", "the TFDS datasets (imagenet2012, cifar10)",
                   "tensorflow-datasets: pip install tensorflow-datasets (or n2uq_tf[data])")


def _not_available(spec, data_dir, manual_dir, detail):
    how = spec.how_to_get.format(name=spec.info.name, data_dir=data_dir, manual_dir=manual_dir)
    return DatasetNotAvailableError(f"{detail}\n{how}")


def _tfds_builder(spec, split, data_dir, manual_dir, download):
    """A prepared TFDS builder for `spec`, preparing it first only if `download`."""
    tfds = _tfds()
    data_dir = os.path.expanduser(data_dir or _default_data_dir())
    manual_dir = os.path.expanduser(manual_dir or os.path.join(data_dir, "downloads", "manual"))
    name = spec.tfds_name
    if not download and not _prepared_version_exists(data_dir, name):
        raise _not_available(spec, data_dir, manual_dir,
                             f"TFDS dataset {name!r} is not prepared in {data_dir} "
                             f"(no {name}/<version>/ there).")
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise _not_available(spec, data_dir, manual_dir,
                                 f"TFDS dataset {name!r} is not prepared in {builder.data_dir} "
                                 f"(version {builder.version} is needed).")
        present = [f for f in spec.manual_files if os.path.exists(os.path.join(manual_dir, f))]
        if spec.manual_files and not present:
            raise _not_available(spec, data_dir, manual_dir,
                                 f"{name!r} cannot be downloaded automatically and {manual_dir} holds none of "
                                 f"{', '.join(spec.manual_files)}.")
        _ensure_tfds_can_build()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    missing = [s for s in _split_names(split) if s not in builder.info.splits]
    if missing:
        raise _not_available(spec, data_dir, manual_dir,
                             f"split {missing[0]!r} of {name!r} is not in {builder.data_dir} "
                             f"(prepared splits: {', '.join(sorted(builder.info.splits))}). TFDS does not "
                             f"add splits to a prepared version: delete that folder, then prepare again.")
    return builder


def _load_tfds(spec, split, *, training, seed, data_dir, manual_dir, download):
    tfds = _tfds()
    builder = _tfds_builder(spec, split, data_dir, manual_dir, download)
    decoders = {"image": tfds.decode.SkipDecoding()} if spec.skip_decoding else None
    # Files are shuffled for training (ImageNet has 1,024 shards); the seed makes it repeatable.
    # TFDS' own autocache is off: `spec.cache` decides (else small eval sets would be cached twice).
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=split, shuffle_files=training, as_supervised=True, decoders=decoders,
                            read_config=read_config)
    return ds.cache() if spec.cache else ds


def _require_sklearn():
    return require("sklearn.datasets", "the 'digits' dataset",
                   "scikit-learn: pip install scikit-learn (or n2uq_tf[data])")


@functools.lru_cache(maxsize=1)
def _digits_raw():
    """((x_train, y_train), (x_test, y_test)): 8x8x1 float32 in [0, 1], int64 labels.

    80/20 split by a fixed permutation (numpy default_rng(0)): 1,437 train, 360 test.
    """
    digits = _require_sklearn().load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n_train = _DIGITS_SPLITS["train"]
    splits = tuple((x[idx], y[idx]) for idx in (order[:n_train], order[n_train:]))
    for arrays in splits:
        for a in arrays:
            a.setflags(write=False)  # cached: nobody may change them in place
    return splits


def _load_digits(spec, split, **_):
    if split not in spec.info.splits:
        raise ValueError(f"digits takes a plain split name ({', '.join(spec.info.splits)}), not {split!r}")
    train, test = _digits_raw()
    return tf.data.Dataset.from_tensor_slices(train if split == "train" else test)


def digits_arrays(image_size: int | tuple[int, int] = 32,
                  channels: int = 3) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """sklearn digits as NumPy arrays for plain `fit(x, y)`: ((x_train, y_train), (x_test, y_test)).

    Images are the evaluation preprocessing of `load_dataset("digits", ...)` (bilinear resize to
    image_size, normalised, gray repeated to `channels`), float32 NHWC; labels int64.
    """
    out = []
    for x, y in _digits_raw():
        x = pp.preprocess_digits(x, False, image_size, channels=channels)
        out.append((x.numpy(), y.copy()))
    return tuple(out)


_TFDS_HOW_TO = (
    "To get it: on a machine with network, run load_dataset({name!r}, download=True, data_dir=...) "
    "or `tfds build {name} --data_dir=DIR`, then copy DIR/{name} to {data_dir}/{name} "
    "(or pass data_dir=DIR / set TFDS_DATA_DIR).")

_IMAGENET_HOW_TO = (
    "ImageNet cannot be downloaded automatically. Register at https://image-net.org/download-images, "
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar and place both in {manual_dir} "
    "(the manual_dir; by default <data_dir>/downloads/manual, i.e. ~/tensorflow_datasets/downloads/manual). "
    "Then prepare it once (hours, ~300 GB free disk) with "
    "load_dataset('imagenet2012', download=True, manual_dir={manual_dir!r}, data_dir={data_dir!r}) "
    "or `tfds build imagenet2012 --manual_dir={manual_dir} --data_dir={data_dir}`.")


DATASETS = {
    "imagenet2012": DatasetSpec(
        info=DatasetInfo("imagenet2012", 1000, 224, {"train": 1_281_167, "validation": 50_000},
                         pp.IMAGENET_MEAN, pp.IMAGENET_STD),
        preprocess=pp.preprocess_imagenet, load=_load_tfds, shuffle_buffer=10_000,
        tfds_name="imagenet2012", skip_decoding=True,
        manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"), how_to_get=_IMAGENET_HOW_TO),
    "cifar10": DatasetSpec(
        info=DatasetInfo("cifar10", 10, 32, {"train": 50_000, "test": 10_000}, pp.CIFAR10_MEAN, pp.CIFAR10_STD),
        preprocess=pp.preprocess_cifar, load=_load_tfds, shuffle_buffer=50_000,
        tfds_name="cifar10", cache=True, how_to_get=_TFDS_HOW_TO),
    "digits": DatasetSpec(
        info=DatasetInfo("digits", 10, 32, dict(_DIGITS_SPLITS), pp.DIGITS_MEAN, pp.DIGITS_STD),
        preprocess=pp.preprocess_digits, load=_load_digits, shuffle_buffer=_DIGITS_SPLITS["train"]),
}


def _spec(name):
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None


def dataset_info(name: str) -> DatasetInfo:
    """`DatasetInfo` (num_classes, image_size, splits -> examples, mean, std) without loading anything."""
    info = _spec(name).info
    return dataclasses.replace(info, splits=dict(info.splits))


def load_dataset(name: str, split: str = "train", *, batch_size: int = 256,
                 image_size: int | tuple[int, int] | None = None, data_dir: str | None = None,
                 manual_dir: str | None = None, download: bool = False, training: bool | None = None,
                 shuffle_buffer: int | None = None, seed: int | None = None, drop_remainder: bool | None = None,
                 repeat: bool = False, channels: int = 3, normalization: str = "dataset") -> tf.data.Dataset:
    """A batched, prefetched `tf.data.Dataset` of (float32 NHWC images, int64 labels).

    name: "imagenet2012", "cifar10" (TFDS, prepared in `data_dir`) or "digits" (ships with
    scikit-learn; offline). training (default: split starts with "train") shuffles and augments;
    evaluation is deterministic and keeps the order. image_size: int or (h, w), default the
    dataset's (224, 32, 32). seed makes shuffling and augmentation repeatable; each pass over the
    dataset (epoch) still sees new random crops. drop_remainder defaults to `training`.
    Images are normalised per channel with `dataset_info(name).mean/std`: torchvision's ImageNet
    statistics, CIFAR-10's training-set statistics, and for digits (pixel / 16, in [0, 1]) the
    mean/std of its training split. The splits are TFDS split strings ("train[:10%]" works) for
    the TFDS datasets, "train" or "test" for digits.
    repeat=True repeats before batching (endless dataset). channels (3, or 1 for gray) and
    normalization ("dataset", "unit" for [0, 1], "pixels" for [0, 255]) shape the images for models
    that take other input (see `preprocess.model_input`).
    TFDS data that is not prepared raises `DatasetNotAvailableError` unless download=True
    (imagenet2012 then needs the ILSVRC2012 tar files in manual_dir).
    """
    spec = _spec(name)
    names = _split_names(split) or [split]
    unknown = [s for s in names if s not in spec.info.splits]
    if unknown:
        raise ValueError(f"{name} has splits {', '.join(spec.info.splits)}, not {unknown[0]!r}")
    if channels not in pp.CHANNELS:
        raise ValueError(f"channels must be one of {pp.CHANNELS}, got {channels!r}")
    if normalization not in pp.NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {pp.NORMALIZATIONS}, got {normalization!r}")
    if training is None:
        training = split.startswith("train")
    if drop_remainder is None:
        drop_remainder = bool(training)
    size = pp.image_hw(image_size or spec.info.image_size)
    ds = spec.load(spec, split, training=training, seed=seed, data_dir=data_dir, manual_dir=manual_dir,
                   download=download)
    if training:
        ds = ds.shuffle(shuffle_buffer or spec.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    preprocess = functools.partial(spec.preprocess, channels=channels, normalization=normalization)
    if training:
        # One random int64 per example, new each epoch yet fixed by `seed`: per-example stateless
        # seeds keep augmentation reproducible under parallel map.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds)

        def fn(example, r):
            image, label = example
            seed_pair = tf.stack([r, tf.constant(0, tf.int64)])
            return preprocess(image, True, size, seed=seed_pair), tf.cast(label, tf.int64)
    else:
        def fn(image, label):
            return preprocess(image, False, size), tf.cast(label, tf.int64)
    # No tensor-dependent Python control flow in the preprocessing: AutoGraph has nothing to do.
    fn = tf.autograph.experimental.do_not_convert(fn)
    # Order only matters when it was asked to be reproducible (evaluation, or a seed).
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training or seed is not None)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
