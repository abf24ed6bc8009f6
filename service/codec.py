"""Open Inference Protocol V2 tensors <-> numpy, JSON and the binary tensor data extension. No HTTP here.

Binary framing (Triton's binary tensor data extension): the body is a JSON header of
``Inference-Header-Content-Length`` bytes, then each binary tensor's bytes in the order of the tensors in the
header, each announced by its ``binary_data_size`` parameter. Little-endian, row-major; BOOL is one byte;
a BYTES element is a 4-byte little-endian length then the bytes.

Every size a client declares is checked against the bytes actually present and against the element limit
before anything is allocated, so a forged header cannot make the server reserve memory.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from service import fastjson, fields
from service.datatypes import DATATYPES, v2_datatype
from service.errors import BadRequest
from service.tensors import Array, InferRequest, InputTensor, OutputRequest, OutputTensor

__all__ = [
    "DATATYPES",
    "InferRequest",
    "InputTensor",
    "OutputRequest",
    "OutputTensor",
    "encode_response",
    "parse_request",
]

_LEN = struct.Struct("<I")
MAX_RANK = 32


# ------------------------------------------------------------------------------------------------ decode
def element_count(name: str, shape: object, limit: int, where: str | None = None) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape; refuse element counts above ``limit`` before anything is allocated.

    ``where`` names the field in error messages (default: ``input '<name>' shape``).
    """
    where = where or f"input '{name}' shape"
    dims = fields.array(shape, where)
    if len(dims) > MAX_RANK:
        raise BadRequest(f"input '{name}': shape of rank {len(dims)} is beyond the limit of {MAX_RANK}")
    for i, d in enumerate(dims):
        fields.integer(d, fields.at(where, i))
    if any(d < 0 for d in dims):
        raise BadRequest(f"input '{name}': shape {dims} has a negative dimension")
    if any(d > limit for d in dims):  # an empty tensor can still have absurd dims
        raise BadRequest(f"input '{name}': shape {dims} is beyond the limits")
    count = math.prod(dims)
    if count > limit:
        raise BadRequest(f"input '{name}': shape {dims} has {count} elements, above the limit of {limit}")
    return tuple(dims), count


def decode_json_data(name: str, datatype: str, shape: tuple[int, ...], count: int, data: object) -> Array:
    """JSON ``data`` (flat or nested as the shape) to an array of ``datatype``."""
    dtype = DATATYPES[datatype]
    if isinstance(data, np.ndarray):  # flat float64 from fastjson, for float datatypes only
        if data.size != count:
            raise BadRequest(f"input '{name}': {data.size} elements given, shape {list(shape)} needs {count}")
        return _cast(data, dtype, shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten_strings(name, data)
        if len(flat) != count:
            raise BadRequest(f"input '{name}': {len(flat)} elements given, shape {list(shape)} needs {count}")
        return np.array(flat, dtype=object).reshape(shape)
    try:
        arr = np.array(data)
        if dtype.kind in "iu" and arr.dtype.kind not in "iub":
            arr = _exact_integers(name, datatype, data)  # e.g. UINT64 beyond int64 next to small values
    except (ValueError, OverflowError, TypeError):
        raise BadRequest(f"input '{name}': data is ragged or not all numbers") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise BadRequest(f"input '{name}': data is ragged or not all {datatype} values")
    if arr.size != count:
        raise BadRequest(f"input '{name}': {arr.size} elements given, shape {list(shape)} needs {count}")
    if arr.ndim > 1 and arr.shape != shape:
        raise BadRequest(f"input '{name}': nested data has shape {list(arr.shape)}, declared {list(shape)}")
    kind = arr.dtype.kind
    if datatype == "BOOL":
        if arr.size and kind != "b":
            raise BadRequest(f"input '{name}': BOOL data must be true/false")
    elif dtype.kind in "iu":
        if arr.size and kind not in "iu":
            raise BadRequest(f"input '{name}': {datatype} data must be integers")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequest(f"input '{name}': a value is out of the {datatype} range")
    elif arr.size and kind not in "iuf":
        raise BadRequest(f"input '{name}': {datatype} data must be numbers")
    return _cast(arr, dtype, shape)


def _cast(arr: Array, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
    with np.errstate(over="ignore"):  # beyond FP16/FP32 range rounds to ±inf, as IEEE casts do
        return arr.astype(dtype, copy=False).reshape(shape)


def _exact_integers(name: str, datatype: str, data: list[Any]) -> Array:
    """Python ints that numpy would turn into floats or objects: keep them exact, or refuse."""
    values = np.array(data, dtype=object)
    flat = values.ravel().tolist()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise BadRequest(f"input '{name}': {datatype} data must be integers")
    info = np.iinfo(DATATYPES[datatype])
    if flat and (min(flat) < info.min or max(flat) > info.max):
        raise BadRequest(f"input '{name}': a value is out of the {datatype} range")
    return np.array(flat, dtype=DATATYPES[datatype]).reshape(values.shape)


def _flatten_strings(name: str, data: list[Any]) -> list[str]:
    out: list[str] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise BadRequest(f"input '{name}': BYTES data must be strings")
            out.append(item)
        else:
            stack.pop()
    return out


def decode_binary_data(name: str, datatype: str, shape: tuple[int, ...], count: int, buf: memoryview) -> Array:
    """Binary tensor bytes (exactly the tensor, nothing more) to an array; zero-copy for numeric types."""
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        items: list[bytes] = []
        offset, end = 0, len(buf)
        while offset < end:
            if offset + 4 > end:
                raise BadRequest(f"input '{name}': BYTES element length is cut off")
            (length,) = _LEN.unpack_from(buf, offset)
            offset += 4
            if length > end - offset:
                raise BadRequest(f"input '{name}': BYTES element of {length} bytes overruns its data")
            items.append(bytes(buf[offset : offset + length]))
            offset += length
            if len(items) > count:
                break
        if len(items) != count:
            raise BadRequest(f"input '{name}': {len(items)} BYTES elements given, shape {list(shape)} needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise BadRequest(
            f"input '{name}': binary_data_size is {len(buf)} bytes, shape {list(shape)} of {datatype} needs {expected}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise BadRequest(f"input '{name}': BOOL bytes must be 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def parse_request(body: bytes, header_length: int | None, max_elements: int) -> InferRequest:
    """A V2 inference request: JSON, or JSON header plus binary tensors when ``header_length`` is given."""
    header: bytes | memoryview
    if header_length is None:
        header, rest = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        view = memoryview(body)
        header, rest = view[:header_length], view[header_length:]
    obj = fastjson.loads(body) if header_length is None else None
    if obj is None:
        try:
            obj = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"request must be a JSON object, got {fields.kind(obj)}")
    params = fields.optional_obj(obj, "parameters")
    request = InferRequest(inputs=[], parameters=params)
    request.id = fields.optional_string(obj, "id")
    request.binary_output = fields.optional_bool(params, "binary_data_output", "parameters", False)
    request.timeout_us = fields.optional_natural(params, "timeout", "parameters")
    inputs = fields.array(fields.required(obj, "inputs"), "inputs")
    if not inputs:
        raise BadRequest("inputs must be a non-empty list")
    offset = 0
    for i, item in enumerate(inputs):
        where = fields.at("inputs", i)
        spec = fields.obj(item, where)
        name = fields.string(fields.required(spec, "name", where), fields.at(where, "name"))
        datatype = fields.string(fields.required(spec, "datatype", where), fields.at(where, "datatype"))
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}.datatype: unknown datatype {datatype[:40]!r} (one of {', '.join(DATATYPES)})")
        shape, count = element_count(name, fields.required(spec, "shape", where), max_elements, f"{where}.shape")
        iparams = fields.optional_obj(spec, "parameters", where)
        size = fields.optional_natural(iparams, "binary_data_size", fields.at(where, "parameters"))
        data = spec.get("data")
        if size is not None:
            if data is not None:
                raise BadRequest(f"input '{name}': has both data and binary_data_size")
            if offset + size > len(rest):
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(rest) - offset} bytes left)"
                )
            array = decode_binary_data(name, datatype, shape, count, rest[offset : offset + size])
            offset += size
        elif data is not None:
            array = decode_json_data(name, datatype, shape, count, data)
        else:
            raise BadRequest(f"input '{name}': no data and no binary_data_size")
        request.inputs.append(InputTensor(name, datatype, shape, array))
    if offset != len(rest):
        raise BadRequest(f"binary data sizes add up to {offset} bytes but {len(rest)} bytes follow the header")
    outputs = obj.get("outputs")
    if outputs is not None:
        wanted = fields.array(outputs, "outputs")
        # an empty list selects nothing in particular: every output, as when `outputs` is absent (Triton's reading)
        if wanted:
            request.outputs = [
                _output_request(o, fields.at("outputs", i), request.binary_output) for i, o in enumerate(wanted)
            ]
    return request


def _output_request(item: object, where: str, default_binary: bool) -> OutputRequest:
    spec = fields.obj(item, where)
    name = fields.string(fields.required(spec, "name", where), fields.at(where, "name"))
    params = fields.optional_obj(spec, "parameters", where)
    binary = fields.optional_bool(params, "binary_data", fields.at(where, "parameters"), default_binary)
    classes = fields.optional_natural(params, "classification", fields.at(where, "parameters"))
    return OutputRequest(name, binary, classes or 0)


# ------------------------------------------------------------------------------------------------ encode
def binary_bytes(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def _json_data(array: Array, datatype: str) -> Any:
    if datatype == "BYTES":
        return [i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in array.ravel()]
    return np.ascontiguousarray(array).ravel()


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary tensors follow it."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        datatype = out.datatype or v2_datatype(out.array)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(out.array.shape)}
        if out.binary:
            blob = binary_bytes(out.array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(out.array, datatype)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
