"""One inference request and its answer as decoded tensors: what every transport decodes into and encodes
from, and all the dataplane and the runtime ever see. No wire format here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from numpy.typing import NDArray

Array = NDArray[Any]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a model takes or gives, as V2 metadata describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dim

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: Array


@dataclass
class OutputRequest:
    name: str
    binary: bool  # REST only: this output as binary data
    classification: int = 0  # top-k as "value:index[:label]" BYTES (Triton's classification extension)


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[OutputRequest] | None = None  # None: every output
    id: str | None = None
    binary_output: bool = False  # REST only: the request's binary_data_output
    timeout_us: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    array: Array
    binary: bool
    datatype: str | None = None  # derived from the array when None


@dataclass
class InferResult:
    """One request's answer, handed to the transport's encoder (in the compute thread)."""

    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


T_co = TypeVar("T_co", covariant=True)


class Encoder(Protocol[T_co]):
    """A transport's encoder of a result into its wire format (bytes, or bytes and a header length). The
    transport hands it down with the decoded request; the runtime calls it last, in the compute thread, so the
    event loop never serializes a response."""

    def __call__(self, result: InferResult, /) -> T_co: ...
