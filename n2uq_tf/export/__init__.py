"""Keras -> TFLite export of N2UQ models with bit-packed custom ops (see custom_ops for the op contract)."""
