"""The one table of Open Inference Protocol V2 datatypes, and what each is called elsewhere.

Every place that needs to know a datatype reads it from :data:`DATATYPES`: the numpy dtype the codecs decode
into, ONNX Runtime's type string (model metadata), the ONNX ``TensorProto`` element type (tests build models
with it) and the field of the gRPC ``InferTensorContents`` message that carries typed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


@dataclass(frozen=True)
class V2Type:
    name: str
    dtype: np.dtype[Any]  # little-endian; object for BYTES
    ort: str  # ONNX Runtime's NodeArg.type
    onnx: int  # onnx.TensorProto.DataType
    contents: str | None  # InferTensorContents field; None: only raw contents can carry it (FP16)


_ROWS = [
    V2Type("BOOL", np.dtype(np.bool_), "tensor(bool)", 9, "bool_contents"),
    V2Type("UINT8", np.dtype("<u1"), "tensor(uint8)", 2, "uint_contents"),
    V2Type("UINT16", np.dtype("<u2"), "tensor(uint16)", 4, "uint_contents"),
    V2Type("UINT32", np.dtype("<u4"), "tensor(uint32)", 12, "uint_contents"),
    V2Type("UINT64", np.dtype("<u8"), "tensor(uint64)", 13, "uint64_contents"),
    V2Type("INT8", np.dtype("<i1"), "tensor(int8)", 3, "int_contents"),
    V2Type("INT16", np.dtype("<i2"), "tensor(int16)", 5, "int_contents"),
    V2Type("INT32", np.dtype("<i4"), "tensor(int32)", 6, "int_contents"),
    V2Type("INT64", np.dtype("<i8"), "tensor(int64)", 7, "int64_contents"),
    V2Type("FP16", np.dtype("<f2"), "tensor(float16)", 10, None),
    V2Type("FP32", np.dtype("<f4"), "tensor(float)", 1, "fp32_contents"),
    V2Type("FP64", np.dtype("<f8"), "tensor(double)", 11, "fp64_contents"),
    V2Type("BYTES", np.dtype(object), "tensor(string)", 8, "bytes_contents"),
]

#: V2 datatype name -> its row.
V2_TYPES: dict[str, V2Type] = {row.name: row for row in _ROWS}
#: V2 datatype name -> numpy dtype (little-endian).
DATATYPES: dict[str, np.dtype[Any]] = {row.name: row.dtype for row in _ROWS}
#: ONNX Runtime type string -> V2 datatype name.
ORT_TO_V2: dict[str, str] = {row.ort: row.name for row in _ROWS}

assert tuple(V2_TYPES) == get_args(Datatype)


def v2_datatype(array: np.ndarray[Any, Any]) -> str:
    """The V2 datatype of an array (any byte order; str/bytes/object arrays are BYTES)."""
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    little = array.dtype.newbyteorder("<") if array.dtype.kind in "iuf" else array.dtype
    for row in _ROWS:
        if row.name != "BYTES" and little == row.dtype:
            return row.name
    raise ValueError(f"no V2 datatype for {array.dtype}")
