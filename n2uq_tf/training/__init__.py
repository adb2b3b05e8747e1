"""Training the way the N2UQ paper does: distillation from a float teacher and the optimizer recipe.

    student = n2uq_tf.quantize_model(float_model, bits=2)
    model = n2uq_tf.training.DistillationModel(student, teacher)
    model.compile(n2uq_tf.training.paper_optimizer(epochs=E, steps_per_epoch=S), metrics=["accuracy"])
    model.fit(dataset, epochs=E)

The same calls take Keras 3 models (``import keras``): DistillationModel then returns the Keras 3
twin, and ``paper_optimizer(..., model=model)`` a Keras 3 optimizer (`n2uq_tf.training.keras3`).
"""

from n2uq_tf._keras import registered_classes
from n2uq_tf._keras_kind import keras3_available
from n2uq_tf.training.callbacks import QuantizerTensorBoard
from n2uq_tf.training.distillation import DistillationModel, distillation_loss
from n2uq_tf.training.optimizer import (PAPER_BATCH_SIZE, PAPER_EPOCHS, PAPER_LEARNING_RATE, N2UQAdam,
                                        is_quantizer_variable, paper_learning_rate, paper_optimizer)
from n2uq_tf.training.schedules import LinearEpochDecay, linear_epoch_decay

if keras3_available():
    # The Keras 3 twins (n2uq_tf.training.keras3), registered with Keras 3 on import so that
    # keras.models.load_model finds them after `import n2uq_tf`.
    from n2uq_tf.training import keras3  # noqa: F401


def custom_objects():
    """Training classes a saved, compiled model may name (its optimizer and schedule)."""
    return registered_classes("n2uq_tf.training")


__all__ = [
    "DistillationModel", "LinearEpochDecay", "N2UQAdam", "QuantizerTensorBoard", "PAPER_BATCH_SIZE", "PAPER_EPOCHS",
    "PAPER_LEARNING_RATE", "custom_objects", "distillation_loss", "is_quantizer_variable",
    "linear_epoch_decay", "paper_learning_rate", "paper_optimizer",
]
