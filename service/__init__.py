"""bnfold service: Open Inference Protocol V2 over FastAPI and ONNX Runtime."""
