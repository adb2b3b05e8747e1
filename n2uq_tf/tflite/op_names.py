"""Names of the N2UQ TFLite custom ops: what the exporter writes and the delegate plugin claims.

Plain Python, so the runtime side reads them without TensorFlow. The op contract itself (inputs,
options, reference bodies) is `n2uq_tf.export.custom_ops`, which takes its names from here; the
C++ plugin (tflite_tools/tflite/delegate.cc) spells the same strings.
"""

OP_QUANTIZE_PACK = "N2UQQuantizePack"
OP_QUANTIZE = "N2UQQuantize"
OP_CONV2D = "N2UQConv2D"
OP_DEPTHWISE_CONV2D = "N2UQDepthwiseConv2D"
OP_FULLY_CONNECTED = "N2UQFullyConnected"
# A layer op with its output stage (the builtins after it, and the next quantizer) fused in.
OP_CONV2D_FUSED = "N2UQConv2DFused"
OP_DEPTHWISE_CONV2D_FUSED = "N2UQDepthwiseConv2DFused"
OP_FULLY_CONNECTED_FUSED = "N2UQFullyConnectedFused"
# A PAD of zeros + MAX_POOL_2D with the output stage after it fused in (a ResNet stem's pool).
OP_MAX_POOL2D_FUSED = "N2UQMaxPool2DFused"
ALL_OPS = (OP_QUANTIZE_PACK, OP_QUANTIZE, OP_CONV2D, OP_DEPTHWISE_CONV2D, OP_FULLY_CONNECTED, OP_CONV2D_FUSED,
           OP_DEPTHWISE_CONV2D_FUSED, OP_FULLY_CONNECTED_FUSED, OP_MAX_POOL2D_FUSED)
