"""What every front end shares: a model another framework exported to ONNX (:class:`Exported`), that framework
as the second verification reference (:func:`reference`), the conversion :class:`~converter.core.Source` made of
both (:func:`exported_source`), and the interface each front end module implements (:class:`Frontend`).

A front end (:mod:`converter.frontends.torch`, :mod:`converter.frontends.tensorflow`) recognises its files
without importing its framework (``sniff``), exports a file to ONNX with its framework's outputs on the inputs it
ran (``export_file``), and builds the source the core converts (``source``): the exported ONNX model to rewrite
and verify against, with the framework as a :class:`~converter.core.Framework` reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from numpy.typing import NDArray
from onnx import ModelProto

from converter import verify
from converter.core import Framework, Source
from converter.errors import InputError
from converter.verify import InputShapes

Array = NDArray[Any]


@dataclass
class Exported:
    """A model another framework exported to ONNX, with the inputs the framework ran on and its outputs there."""

    model: ModelProto
    kind: str  # the front end's name of the input: "TorchScript", "nn.Module", "Keras", "SavedModel", ...
    feeds: dict[str, Array]  # ONNX input name -> the input the framework ran on
    expected: list[Array]  # the framework's outputs, flattened, in the ONNX output order
    inputs_from: str  # "seed 0 random inputs", "the program's stored example inputs", "the example inputs"
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    forward: verify.OutputsFn | None = None  # runs the framework's model (inference mode) on other inputs

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {name: list(value.shape) for name, value in self.feeds.items()}


class Frontend(Protocol):
    """A framework whose files bnfold exports to ONNX and verifies against (each front end module is one)."""

    def sniff(self, path: str | Path, /) -> str | None:
        """The kind of a file of this framework, None for a file of another; raises :class:`InputError` for a
        file of this framework that bnfold refuses. Imports no framework."""
        ...

    def export_file(self, path: str | Path, kind: str, input_shapes: InputShapes, seed: int, /) -> Exported:
        """Load a file :meth:`sniff` recognised and export it to ONNX (``input_shapes`` as ``--input-shape``)."""
        ...

    def source(self, exported: Exported, name: str, /) -> Source:
        """What the core converts: the exported model, verified against it and against the framework."""
        ...


def reference(exported: Exported, label: str) -> verify.Reference:
    """The framework's inference-mode forward as a verification reference: always checked on the inputs it ran
    at export (their outputs are already known), and on real samples when the forward pass is at hand."""
    fixed = verify.InputSet(exported.inputs_from, [exported.feeds])

    def forward(feeds: Mapping[str, Array]) -> Sequence[Array]:
        if feeds is exported.feeds:
            return exported.expected
        if exported.forward is None:
            raise InputError(f"{exported.kind}: the source model is not at hand to run on other inputs")
        return exported.forward(feeds)

    return verify.Reference.framework(label, forward, fixed)


def _parsed(data: bytes) -> Callable[[], ModelProto]:
    def parse() -> ModelProto:
        model = ModelProto()
        model.ParseFromString(data)
        return model

    return parse


def exported_source(exported: Exported, name: str, framework: Framework) -> Source:
    """A model another framework exported to ONNX, with that framework as the second reference. A new front end
    needs only its export and a :class:`Framework` whose reference is :func:`reference` (or
    ``Reference.framework(label, forward, fixed_inputs)``)."""
    serialised = exported.model.SerializeToString()  # rewrite() changes exported.model in place
    return Source(
        exported.model,
        name,
        serialised,
        "the exported ONNX model",
        _parsed(serialised),
        framework=framework,
        notes=list(exported.notes),
    )
