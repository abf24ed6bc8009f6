"""bnfold service: Open Inference Protocol V2 over FastAPI and ONNX Runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bnfold")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
