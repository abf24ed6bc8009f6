"""bnfold's converter: fold BatchNorm into the weights of the node before it, prove it, write ONNX.

>>> from converter import convert
>>> result = convert("model.onnx")            # doctest: +SKIP
>>> print(result.report.to_text())            # doctest: +SKIP

PyTorch in (needs ``pip install ".[torch]"``): ``convert_torch(module, example_inputs)``, or a TorchScript /
torch.export file given to :func:`convert_file` or ``bnfold convert``. TensorFlow in (needs
``pip install ".[tensorflow]"``): ``convert_keras(model, input_signature)``, or a ``.keras``/``.h5`` file or
SavedModel folder. INT8 after the fold: ``convert(..., int8=True, inputs=[samples])`` (docs/quantization.md).
"""

from converter.errors import ConversionError, InputError, VerificationError
from converter.options import BN_MODES, Options
from converter.pipeline import ConversionResult, convert, convert_file, convert_keras, convert_torch, inspect_model
from converter.quant_options import Int8Options
from converter.report import Counts, LayerRecord, Report
from converter.verify import TOLERANCES, Verification

__all__ = [
    "BN_MODES",
    "TOLERANCES",
    "ConversionError",
    "ConversionResult",
    "Counts",
    "InputError",
    "Int8Options",
    "LayerRecord",
    "Options",
    "Report",
    "Verification",
    "VerificationError",
    "convert",
    "convert_file",
    "convert_keras",
    "convert_torch",
    "inspect_model",
]
