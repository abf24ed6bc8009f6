"""bnfold's converter: fold BatchNorm into the weights of the node before it, prove it, write ONNX.

>>> from converter import convert
>>> result = convert("model.onnx")            # doctest: +SKIP
>>> print(result.report.to_text())            # doctest: +SKIP
"""

from converter.errors import ConversionError, InputError, VerificationError
from converter.pipeline import BN_MODES, ConversionResult, Options, convert, convert_file, inspect_model
from converter.report import Counts, LayerRecord, Report
from converter.verify import TOLERANCES, Verification

__all__ = [
    "BN_MODES",
    "TOLERANCES",
    "ConversionError",
    "ConversionResult",
    "Counts",
    "InputError",
    "LayerRecord",
    "Options",
    "Report",
    "Verification",
    "VerificationError",
    "convert",
    "convert_file",
    "inspect_model",
]
