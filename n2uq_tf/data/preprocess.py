"""Image preprocessing for the N2UQ training recipes, as plain TF functions usable in `tf.data.map`.

Every function takes one image (HWC) and returns float32, normalised with the dataset's mean/std
(or as `normalization` says, with `channels` channels: see `model_input`).
Randomness is stateless: `seed` is a shape-[2] integer tensor (one per example, see
`load_dataset`), so a pipeline with a fixed seed is reproducible; `seed=None` draws one.
"""

import math

import tensorflow as tf

# torchvision's ImageNet statistics (RGB in [0, 1]), as in the official N2UQ code.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Exact per-channel statistics of the CIFAR-10 training set (not the often-copied
# (0.2023, 0.1994, 0.2010), which are per-image std means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# sklearn digits scaled to [0, 1] (pixel / 16): mean/std of our 1,437-image training split at 8x8,
# the same for the three repeated channels.
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3760, 0.3760, 0.3760)

# What the model is fed (`model_input`): "dataset" (image - mean) / std with the dataset's statistics,
# "unit" values in [0, 1], "pixels" values in [0, 255] (for models that scale their input themselves).
NORMALIZATIONS = ("dataset", "unit", "pixels")
CHANNELS = (1, 3)
# ITU-R BT.601 luma, as tf.image.rgb_to_grayscale.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)

# torchvision RandomResizedCrop defaults.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Evaluation resizes the shorter side to 256 for a 224 crop, and in proportion for other sizes.
EVAL_RESIZE_RATIO = 256.0 / 224.0


def image_hw(image_size):
    """`image_size` as an (height, width) pair of ints: an int means a square."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def _seeds(seed, num):
    """`num` independent stateless seeds from one; a random one when `seed` is None."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


def normalize(image, mean, std, max_value=255.0):
    """(image / max_value - mean) / std per channel, float32."""
    image = tf.cast(image, tf.float32) / max_value
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def model_input(image, mean, std, max_value=255.0, channels=3, normalization="dataset"):
    """The last step of every pipeline: an image in [0, max_value] as the model takes it.

    channels: 3 repeats a gray image; 1 turns RGB into its BT.601 luma, normalised (for "dataset")
    with the luma of the channel means and stds (the std so taken is an upper bound of the gray
    image's, exact when the channels move together). normalization: see NORMALIZATIONS.
    """
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    image = tf.cast(image, tf.float32)
    mean, std = tuple(mean), tuple(std)
    source = image.shape[-1] or len(mean)  # a crop's channel count may be unknown while tracing: RGB
    if channels == 1 and source == 3:
        image = tf.image.rgb_to_grayscale(image)
        mean = (sum(w * m for w, m in zip(LUMA_WEIGHTS, mean)),)
        std = (sum(w * s for w, s in zip(LUMA_WEIGHTS, std)),)
        source = 1
    elif source == 1:  # gray: one channel's statistics, repeated after normalising
        mean, std = mean[:1], std[:1]
    if normalization == "dataset":
        image = normalize(image, mean, std, max_value)
    elif normalization == "unit":
        image = image / max_value
    else:
        image = image * (255.0 / max_value)
    return tf.repeat(image, channels, axis=-1) if source == 1 and channels == 3 else image


def sample_crop_window(height, width, seed, scale=CROP_SCALE, ratio=CROP_RATIO, attempts=10):
    """The crop window of torchvision's `RandomResizedCrop.get_params`, stateless.

    Up to `attempts` tries of area fraction ~ U(scale) and aspect ratio w/h ~ exp(U(log ratio));
    the first window that fits the image wins, at a uniform offset. If none fits, the largest
    centred window whose aspect ratio is within `ratio`. Returns int32 scalars (y, x, h, w).
    """
    h_img = tf.cast(height, tf.float32)
    w_img = tf.cast(width, tf.float32)
    area_seed, ratio_seed, y_seed, x_seed = tf.unstack(_seeds(seed, 4))
    # All attempts at once: the first valid one is the one the sequential loop would take.
    area = h_img * w_img * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(area * aspect))  # round half to even, as Python's round()
    h = tf.round(tf.sqrt(area / aspect))
    valid = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(valid)

    in_ratio = w_img / h_img
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)

    crop_h = tf.cast(tf.where(found, h[first], fallback_h), tf.int32)
    crop_w = tf.cast(tf.where(found, w[first], fallback_w), tf.int32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    # maxval is exclusive: offsets 0..height-crop_h, as torch.randint(0, height - h + 1).
    rand_y = tf.random.stateless_uniform([], y_seed, 0, height - crop_h + 1, dtype=tf.int32)
    rand_x = tf.random.stateless_uniform([], x_seed, 0, width - crop_w + 1, dtype=tf.int32)
    y = tf.where(found, rand_y, (height - crop_h) // 2)
    x = tf.where(found, rand_x, (width - crop_w) // 2)
    return y, x, crop_h, crop_w


def _resize(image, size, antialias=True):
    # antialias=True is PIL's (and so torchvision's) bilinear when shrinking; same as plain
    # bilinear when enlarging.
    return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=antialias)


def _decode(image, channels=3):
    """Encoded bytes -> uint8 HWC; an already decoded image passes through."""
    if image.dtype == tf.string:
        return tf.io.decode_image(image, channels=channels, expand_animations=False)
    return image


def random_resized_crop(image, size, seed=None, scale=CROP_SCALE, ratio=CROP_RATIO):
    """torchvision RandomResizedCrop to `size` (float32, unnormalised).

    JPEG bytes (tf.string) are decoded only inside the window (`decode_and_crop_jpeg`), which is
    what makes ImageNet training input fast; a decoded image is sliced.
    """
    size = image_hw(size)
    if image.dtype == tf.string:
        shape = tf.image.extract_jpeg_shape(image)
        y, x, h, w = sample_crop_window(shape[0], shape[1], seed, scale, ratio)
        crop = tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3)
    else:
        shape = tf.shape(image)
        y, x, h, w = sample_crop_window(shape[0], shape[1], seed, scale, ratio)
        crop = tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, -1]))
    return _resize(crop, size)


def resize_shorter_side(image, shorter):
    """Resize so the shorter side is `shorter`, keeping the aspect ratio (longer side truncated,
    as torchvision's Resize(int)). Float32 output."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, shorter, shorter * h // short)
    new_w = tf.where(h <= w, shorter * w // short, shorter)
    return _resize(image, tf.stack([new_h, new_w]))


def center_crop(image, size):
    """Central `size` window; offsets floor((H - h) / 2), floor((W - w) / 2)."""
    h, w = image_hw(size)
    shape = tf.shape(image)
    top = (shape[0] - h) // 2
    left = (shape[1] - w) // 2
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
    return tf.ensure_shape(crop, [h, w, image.shape[-1]])


def pad_random_crop(image, padding, seed=None):
    """Zero-pad by `padding` on each side, then a random crop of the original size (CIFAR recipe)."""
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    (crop_seed,) = tf.unstack(_seeds(seed, 1))
    crop = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
    return tf.ensure_shape(crop, image.shape)


def random_flip(image, seed=None):
    """Horizontal flip with probability 1/2."""
    (flip_seed,) = tf.unstack(_seeds(seed, 1))
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def preprocess_imagenet(image, training, image_size=224, seed=None, channels=3, normalization="dataset"):
    """ImageNet preprocessing of the official N2UQ (torchvision) recipe.

    training: RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip.
    evaluation: resize the shorter side to round(256/224 * image_size) then centre crop image_size.
    `image`: JPEG bytes (the fast path: only the crop window is decoded) or a decoded uint8 HWC image.
    Returns float32 (h, w, 3) normalised with ImageNet's mean/std (see `model_input` for the options).
    """
    size = image_hw(image_size)
    if training:
        crop_seed, flip_seed = tf.unstack(_seeds(seed, 2))
        image = random_flip(random_resized_crop(image, size, crop_seed), flip_seed)
    else:
        image = _decode(image)
        image = resize_shorter_side(image, int(round(min(size) * EVAL_RESIZE_RATIO)))
        image = center_crop(image, size)
    return model_input(image, IMAGENET_MEAN, IMAGENET_STD, channels=channels, normalization=normalization)


def preprocess_cifar(image, training, image_size=32, seed=None, channels=3, normalization="dataset"):
    """CIFAR-10 preprocessing.

    training at 32x32: zero-pad 4, random 32x32 crop, horizontal flip -- the standard CIFAR recipe
    (He et al. 2016) used by the CIFAR experiments of LSQ/N2UQ-style work. At any other
    image_size: RandomResizedCrop to image_size + flip instead (ImageNet-style models).
    evaluation: the image itself, resized (bilinear) if image_size is not 32.
    Returns float32 normalised with the CIFAR-10 channel mean/std (see `model_input` for the options).
    """
    size = image_hw(image_size)
    image = _decode(image)
    native = size == (32, 32)
    if training:
        crop_seed, flip_seed = tf.unstack(_seeds(seed, 2))
        image = pad_random_crop(image, 4, crop_seed) if native else random_resized_crop(image, size, crop_seed)
        image = random_flip(image, flip_seed)
    elif not native:
        image = _resize(image, size)
    return model_input(image, CIFAR10_MEAN, CIFAR10_STD, channels=channels, normalization=normalization)


def preprocess_digits(image, training, image_size=32, seed=None, channels=3, normalization="dataset"):
    """sklearn digits: image in [0, 1] (pixel / 16), 8x8x1 (or a batch of them when not training).

    Bilinear resize to image_size, for training a random shift of up to one original pixel
    (zero-pad image_size/8, random crop; no flips: digits are not mirror-symmetric), normalise with
    the digits mean/std and repeat the gray channel `channels` times (see `model_input` for the options).
    """
    size = image_hw(image_size)
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    if training:
        image = pad_random_crop(image, max(1, round(min(size) / 8)), seed)
    return model_input(image, DIGITS_MEAN, DIGITS_STD, max_value=1.0, channels=channels, normalization=normalization)
