"""Which layer gets which N2UQ quantization: a declarative table.

Each row names a tf_keras layer class, the attributes holding its kernels and the
kernels' output-channel axis. Layers listed in UNSUPPORTED stay float and are
reported with the reason; any other layer with weights is reported as unsupported too.
"""

from n2uq_tf import layers as n2uq_layers
from n2uq_tf._keras import keras

layers = keras.layers

# layer class -> (kernel attributes, output-channel axis of those kernels)
SUPPORTED = {
    layers.Conv2D: (("kernel",), -1),
    layers.DepthwiseConv2D: (("depthwise_kernel",), (-2, -1)),  # one scale per depthwise output channel
    layers.Dense: (("kernel",), -1),
    n2uq_layers.PaddedConv2D: (("kernel",), -1),  # PyTorch-style explicit padding, used by n2uq_tf.models
    n2uq_layers.PaddedDepthwiseConv2D: (("depthwise_kernel",), (-2, -1)),
}

UNSUPPORTED = {
    layers.SeparableConv2D: "its depthwise output feeds the pointwise conv unquantized; "
                            "build it as DepthwiseConv2D + Conv2D(1x1) to quantize both",
    layers.Conv2DTranspose: "transposed convolution has no bit-serial kernel",
    layers.Conv1D: "only 2-D convolutions are lowered to bit-serial kernels",
    layers.Conv3D: "only 2-D convolutions are lowered to bit-serial kernels",
}


def lookup(layer):
    """(kernel attributes, channel axis) for a supported layer, else None.

    Exact class match: a subclass may change `call`, so it is not assumed to be supported.
    """
    return SUPPORTED.get(type(layer))


def unsupported_reason(layer):
    """Why a layer with weights cannot be quantized, or None if it is supported or weightless."""
    if lookup(layer) is not None:
        return None
    reason = UNSUPPORTED.get(type(layer))
    if reason is not None:
        return reason
    kernel_like = [w for w in layer.weights if "kernel" in w.name]
    if kernel_like:
        return f"no N2UQ rule for {type(layer).__name__}"
    return None
