"""How to convert: one frozen options object shared by every entry point (files, models in memory, PyTorch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from converter.errors import InputError
from converter.quant_options import Int8Options
from converter.verify import TOLERANCES, InputShapes

BN_MODES: tuple[str, ...] = ("fold", "keep", "affine")

#: What ``inputs`` takes: paths of sample files (``.npz``, a directory of ``.npy``/``.npz``, V2 request JSON).
InputFiles = Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class Options:
    """How to convert. ``atol``/``rtol`` default to :data:`converter.verify.TOLERANCES` for the output dtype.

    ``inputs``: sample files verification runs on (each sample batch-of-one), besides the seeded random
    inputs unless ``random`` is False. ``trace``: always look for the first diverging node (it is looked for
    anyway when verification fails). ``int8``: quantize after the fold, calibrating on ``inputs``.
    """

    bn: str = "fold"
    verify: bool = True
    atol: float | None = None
    rtol: float | None = None
    input_shapes: InputShapes = None
    fp16: bool = False
    fp16_io: bool = False  # with fp16: float16 inputs and outputs too
    seed: int = 0
    inputs: tuple[str, ...] = field(default=())
    random: bool = True
    trace: bool = False
    int8: Int8Options | None = None  # after the fold, quantize to INT8 (converter.quantize)
    keep_overridable_initializers: bool = False  # initializers also listed as graph inputs stay non-constant

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise InputError(f"bn mode must be one of {', '.join(BN_MODES)}, not {self.bn!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"{name} must be a non-negative number, not {value!r}")
        if self.fp16_io and not self.fp16:
            raise InputError("float16 inputs and outputs (fp16_io) need fp16")
        if isinstance(self.inputs, (str, os.PathLike)):
            object.__setattr__(self, "inputs", (os.fspath(self.inputs),))
        else:
            object.__setattr__(self, "inputs", tuple(os.fspath(p) for p in self.inputs))
        if self.verify and not self.random and not self.inputs:
            raise InputError("verification without random inputs needs sample inputs to run on")
        object.__setattr__(self, "int8", Int8Options.of(self.int8))  # True (the entry points' int8=True): defaults
        if self.int8 is not None:
            self.int8.check(self.inputs, self.fp16)

    def tolerances(self, float16_model: bool = False) -> tuple[float, float]:
        """(atol, rtol) of the ONNX Runtime comparison (the float16 ones for a float16 result or model)."""
        atol, rtol = TOLERANCES["float16" if self.fp16 or float16_model else "float32"]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    def framework_tolerances(self, default: tuple[float, float]) -> tuple[float, float]:
        """(atol, rtol) of a comparison with the source framework's outputs: the given ones, else ``default``
        (the cross-framework tolerance), or the float16 one with ``fp16``."""
        atol, rtol = TOLERANCES["float16"] if self.fp16 else default
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)
