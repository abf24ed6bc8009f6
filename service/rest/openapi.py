"""Open Inference Protocol V2 (KServe/Triton REST) message types, for validation of metadata responses and
for the OpenAPI schema at /docs. The inference hot path decodes with :mod:`service.rest.codec` instead (the same
shapes, without building pydantic objects for every number)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.v2.datatypes import Datatype

TensorData = list[Any] | bool | float | int | str


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description='`{"binary_data_size": n}` when the tensor travels as binary data after the JSON'
    )
    data: TensorData | None = Field(None, description="Row-major values, flat or nested as the shape")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='`{"binary_data": true}` for binary output; `{"classification": k}` for top-k labels'
    )


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='`{"binary_data_output": true}`; `{"timeout": microseconds}`'
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    bnfold: dict[str, Any] | None = Field(
        None, description="What was folded on load, active execution providers, max batch size"
    )


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class Error(BaseModel):
    error: str


class ModelList(BaseModel):
    """KServe's ``GET /v2/models``: the models serving at least one version."""

    models: list[str]


class RepositoryIndexRequest(BaseModel):
    """Triton's repository index request (the body may also be empty)."""

    model_config = ConfigDict(strict=True)

    repository_name: str = Field("", description="Ignored: bnfold serves one repository")
    ready: bool = Field(False, description="Only the versions that are READY")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, UNAVAILABLE, LOADING or UNLOADING")
    reason: str = Field(description="Why it is not ready (a load error, 'unloaded', 'not loaded'), or ''")


class RepositoryChangeRequest(BaseModel):
    """Triton's load and unload request (the body may also be empty). bnfold loads only from its repository: of
    Triton's parameters it takes ``unload_dependents`` (nothing depends on a model here) and refuses the others."""

    model_config = ConfigDict(strict=True)

    repository_name: str = Field("", description="Ignored: bnfold serves one repository")
    parameters: dict[str, Any] = Field(default_factory=dict)
