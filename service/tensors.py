"""One inference request and its answer as decoded tensors: what every transport decodes into and encodes
from, and all the dataplane and the model ever see. No wire format here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

Array = NDArray[Any]


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
