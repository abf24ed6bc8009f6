"""The bundled ``digits`` model: numpy training with ``converter.reference``'s BatchNorm, then ONNX export."""
