"""TFLite export side of n2uq_tf. For now: the bit-serial kernel core (`n2uq_tf.tflite._core`)."""
