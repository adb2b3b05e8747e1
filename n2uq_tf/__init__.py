"""n2uq_tf: N2UQ quantization-aware training for tf_keras, exported to bit-packed TFLite."""
