"""The bundled ``digits`` model: numpy training with the seed's BatchNorm, then ONNX export."""
