"""What both transports share of the Open Inference Protocol V2: decoded tensors, the datatype table,
checked request fields and the binary tensor format. No wire framing, no transport, no ONNX Runtime."""
