"""Input pipelines for N2UQ training: ImageNet and CIFAR-10 through TFDS, and sklearn's digits offline.

    from n2uq_tf import data
    train = data.load_dataset("cifar10", "train", batch_size=128, seed=0)
    test = data.load_dataset("cifar10", "test", batch_size=512)
    info = data.dataset_info("cifar10")          # num_classes, image_size, splits, mean, std
    (x, y), (x_test, y_test) = data.digits_arrays()   # offline, for fit(x, y)

Nothing downloads unless `download=True`; TFDS data that is missing raises
`DatasetNotAvailableError` with instructions.
"""

from n2uq_tf.data.datasets import (DATASETS, DatasetInfo, DatasetNotAvailableError, DatasetSpec,
                                   dataset_info, digits_arrays, load_dataset)
from n2uq_tf.data.preprocess import (CHANNELS, CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN,
                                     IMAGENET_STD, NORMALIZATIONS, center_crop, model_input, normalize,
                                     pad_random_crop, preprocess_cifar, preprocess_digits, preprocess_imagenet,
                                     random_flip, random_resized_crop, resize_shorter_side, sample_crop_window)

__all__ = [
    "CHANNELS", "CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "DIGITS_MEAN", "DIGITS_STD", "DatasetInfo",
    "DatasetNotAvailableError", "DatasetSpec", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "center_crop",
    "dataset_info", "digits_arrays", "load_dataset", "model_input", "normalize", "pad_random_crop",
    "preprocess_cifar", "preprocess_digits",
    "preprocess_imagenet", "random_flip", "random_resized_crop", "resize_shorter_side", "sample_crop_window",
]
