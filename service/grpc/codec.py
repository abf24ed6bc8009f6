"""V2 gRPC messages (``inference.ModelInferRequest`` / ``ModelInferResponse``) <-> decoded tensors.

Inputs come as typed ``contents`` (one repeated field per datatype family, see :mod:`service.v2.datatypes`) or
as ``raw_input_contents`` (one entry per input, in order: little-endian row-major bytes; a BYTES element is a
4-byte little-endian length and its bytes; FP16 can only travel this way). Outputs always go back as
``raw_output_contents``, as Triton answers them (tritonclient reads either). Every declared shape is checked
against the element limit and against the bytes present before anything is allocated, as for REST; a
mistake the two transports share is worded as REST words it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.grpc.protos import grpc_predict_v2_pb2 as pb
from service.v2 import fields
from service.v2.binary import binary_bytes, decode_binary_data
from service.v2.datatypes import V2_TYPES, V2Type, v2_datatype
from service.v2.fields import element_count
from service.v2.tensors import Array, InferRequest, InferResult, InputTensor, OutputRequest


def decode_request(msg: pb.ModelInferRequest, max_elements: int) -> InferRequest:
    params = parameters(msg.parameters)
    request = InferRequest(inputs=[], id=msg.id or None, parameters=params, binary_output=True)
    request.timeout_us = fields.optional_natural(params, "timeout", "parameters")  # REST's check and words
    if not msg.inputs:
        raise BadRequest("inputs must be a non-empty list")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs")
    for i, tensor in enumerate(msg.inputs):
        name, datatype = tensor.name, tensor.datatype
        row = V2_TYPES.get(datatype)
        if row is None:
            shown = datatype[:40]
            raise BadRequest(f"inputs[{i}].datatype: unknown datatype {shown!r} (one of {', '.join(V2_TYPES)})")
        shape, count = element_count(name, list(tensor.shape), max_elements)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input '{name}': has both contents and raw_input_contents")
            array = _raw(name, row, shape, count, raw[i])
        else:
            array = _typed(name, row, shape, count, tensor.contents)
        request.inputs.append(InputTensor(name, datatype, shape, array))
    if msg.outputs:
        request.outputs = [_output_request(o, i) for i, o in enumerate(msg.outputs)]
    return request


def _raw(name: str, row: V2Type, shape: tuple[int, ...], count: int, data: bytes) -> Array:
    if row.name != "BYTES" and len(data) != count * row.dtype.itemsize:
        raise BadRequest(
            f"input '{name}': raw_input_contents has {len(data)} bytes, shape {list(shape)} of {row.name} "
            f"needs {count * row.dtype.itemsize}"
        )
    if row.name in ("BYTES", "BOOL"):  # length-prefixed elements; bytes that must be 0 or 1
        return decode_binary_data(name, row.name, shape, count, memoryview(data))
    return np.frombuffer(data, dtype=row.dtype).reshape(shape)  # the size is checked above


def _typed(name: str, row: V2Type, shape: tuple[int, ...], count: int, contents: pb.InferTensorContents) -> Array:
    if row.contents is None:
        raise BadRequest(f"input '{name}': {row.name} has no typed contents; send it in raw_input_contents")
    values = getattr(contents, row.contents)
    if len(values) != count:
        raise BadRequest(f"input '{name}': {len(values)} elements given, shape {list(shape)} needs {count}")
    if row.name == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    if row.dtype.kind in "iu" and row.dtype.itemsize < 4:  # carried in a 32-bit field: may not fit
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(row.dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise BadRequest(f"input '{name}': a value is out of the {row.name} range")
        return wide.astype(row.dtype).reshape(shape)
    return np.array(values, dtype=row.dtype).reshape(shape)


def _output_request(spec: pb.ModelInferRequest.InferRequestedOutputTensor, i: int) -> OutputRequest:
    where = fields.at(fields.at("outputs", i), "parameters")
    classes = fields.optional_natural(parameters(spec.parameters), "classification", where)
    return OutputRequest(spec.name, True, classes or 0)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """``map<string, InferParameter>`` as plain Python values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(value, choice)
    return out


def encode_result(result: InferResult) -> bytes:
    """The serialized ``ModelInferResponse`` (built in the compute thread, sent as is)."""
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version)
    if result.id is not None:
        response.id = result.id
    for out in result.outputs:
        datatype = out.datatype or v2_datatype(out.array)
        response.outputs.add(name=out.name, datatype=datatype, shape=out.array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(binary_bytes(out.array, datatype))
        else:
            response.raw_output_contents.append(np.ascontiguousarray(out.array, V2_TYPES[datatype].dtype).tobytes())
    data: bytes = response.SerializeToString()
    return data


def model_metadata(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    tensors = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
        outputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
    )


def _data_type(v2: str) -> str:
    """Triton's ModelConfig DataType of a V2 datatype (Triton calls BYTES TYPE_STRING)."""
    return "TYPE_STRING" if v2 == "BYTES" else f"TYPE_{v2}"


def model_config(config: dict[str, Any]) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=config["name"],
            platform=config["platform"],
            backend=config["backend"],
            max_batch_size=config["max_batch_size"],
            input=[
                pb.ModelInput(name=t["name"], data_type=_data_type(t["data_type"][5:]), dims=t["dims"])
                for t in config["input"]
            ],
            output=[
                pb.ModelOutput(
                    name=t["name"],
                    data_type=_data_type(t["data_type"][5:]),
                    dims=t["dims"],
                    label_filename=t.get("label_filename", ""),
                )
                for t in config["output"]
            ],
        )
    )
