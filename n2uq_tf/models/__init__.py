"""Reference networks of the N2UQ paper, float or quantized, and float-to-quantized weight transfer.

    from n2uq_tf import models
    teacher = models.resnet18()                  # float: teacher and initialisation
    student = models.resnet18(bits=2)            # quantized twin (N2UQ)
    models.load_float_weights(student, teacher)  # initialise from the float network
    n2uq_star = models.resnet18(bits=2, quantize_downsample=False)  # float downsample (N2UQ*)
"""

from typing import Any

from n2uq_tf._keras import keras
from n2uq_tf.models._common import float_twin, load_float_weights, quantize
from n2uq_tf.models.mobilenet import mobilenet_v2
from n2uq_tf.models.resnet import resnet18, resnet20, resnet34, resnet50

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "mobilenet_v2": mobilenet_v2,
}


def get_model(name: str, /, **kwargs: Any) -> keras.Model:
    """Builds the model registered as ``name`` in `MODELS` with the builder's keyword arguments."""
    try:
        builder = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return builder(**kwargs)


__all__ = ["MODELS", "float_twin", "get_model", "load_float_weights", "mobilenet_v2", "quantize", "resnet18",
           "resnet20", "resnet34", "resnet50"]
