"""The REST wire format: V2 JSON requests and responses, Triton's binary framing and raw bodies, and the one
REST answer to an error (kind -> HTTP status, ``{"error": "<one line>"}``). No HTTP connection handling here.

Binary framing (Triton's binary tensor data extension): the body is a JSON header of
``Inference-Header-Content-Length`` bytes, then each binary tensor's bytes (:mod:`service.v2.binary`) in the
order of the tensors in the header, each announced by its ``binary_data_size`` parameter.

Every size a client declares is checked against the bytes actually present and against the element limit
before anything is allocated, so a forged header cannot make the server reserve memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.errors import (
    BadRequest,
    Busy,
    ClientGone,
    Internal,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
    UnsupportedEncoding,
)
from service.rest import fastjson
from service.v2 import fields
from service.v2.binary import binary_bytes, decode_binary_data
from service.v2.datatypes import DATATYPES, v2_datatype
from service.v2.fields import element_count
from service.v2.tensors import Array, InferRequest, InferResult, InputTensor, OutputRequest, OutputTensor, TensorSpec

Headers = list[tuple[bytes, bytes]]
JSON: Headers = [(b"content-type", b"application/json")]

#: Error kind -> HTTP status.
HTTP_STATUS: dict[str, int] = {
    BadRequest.kind: 400,
    Unauthorized.kind: 401,
    NotFound.kind: 404,
    RequestTimeout.kind: 408,
    PayloadTooLarge.kind: 413,
    UnsupportedEncoding.kind: 415,
    ClientGone.kind: 499,  # never sent: nobody is there to read it
    Internal.kind: 500,
    Unavailable.kind: 503,
    Busy.kind: 503,
    Timeout.kind: 504,
}


# ------------------------------------------------------------------------------------------------ decode
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
    large = header_length is None and len(body) >= fastjson.MIN_BYTES
    obj = fastjson.loads(body) if large else None
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


def encode_result(result: InferResult) -> tuple[bytes, int | None]:
    """The response body of a result, and its JSON header length when binary tensors follow (compute thread)."""
    return encode_response(result.model_name, result.model_version, result.id, result.outputs)


def encode_error(exc: ServiceError) -> tuple[int, Headers, bytes]:
    """The REST answer to any :class:`ServiceError`: status, headers, ``{"error": message}``."""
    headers = list(JSON)
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    if exc.retry_after is not None:
        headers.append((b"retry-after", b"%d" % exc.retry_after))
    return HTTP_STATUS.get(exc.kind, 500), headers, orjson.dumps({"error": exc.message})


def raw_request(
    model: str, inputs: list[TensorSpec], max_batch_size: int, body: bytes, max_elements: int
) -> InferRequest:
    """Triton's raw binary request: the whole body is the single input of ``model`` (batch 1); outputs binary."""
    if len(inputs) != 1:
        raise BadRequest(f"a raw binary request needs a single-input model; '{model}' has {len(inputs)}")
    spec = inputs[0]
    shape = [1 if (i == 0 and max_batch_size > 0 and d < 0) else d for i, d in enumerate(spec.shape)]
    if spec.datatype == "BYTES":
        shape = [1] * len(shape)
    unknown = [i for i, d in enumerate(shape) if d < 0]
    if len(unknown) > 1:
        raise BadRequest(f"a raw binary request cannot infer the shape {list(spec.shape)} of '{spec.name}'")
    if unknown and spec.datatype != "BYTES":
        known = int(np.prod([d for d in shape if d >= 0])) * DATATYPES[spec.datatype].itemsize
        if known == 0 or len(body) % known:
            raise BadRequest(f"raw body of {len(body)} bytes does not fit the shape {list(spec.shape)}")
        shape[unknown[0]] = len(body) // known
    dims, count = element_count(spec.name, shape, max_elements)
    array = decode_binary_data(spec.name, spec.datatype, dims, count, memoryview(body))
    return InferRequest(inputs=[InputTensor(spec.name, spec.datatype, dims, array)], binary_output=True)
