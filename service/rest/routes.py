"""The REST transport's FastAPI routes: health, metadata, config and metrics, each a thin call into the
:class:`~service.dataplane.DataPlane`. Inference is answered ahead of FastAPI by :mod:`service.rest`; its
routes are declared here only for the OpenAPI schema (:data:`infer_schema`, never mounted for routing).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from service.dataplane import DataPlane
from service.errors import BadRequest
from service.metrics import CONTENT_TYPE
from service.rest.openapi import (
    Error,
    InferenceResponse,
    Live,
    ModelList,
    ModelMetadata,
    ModelReady,
    Ready,
    RepositoryChangeRequest,
    RepositoryIndexRequest,
    RepositoryModel,
    ServerMetadata,
)

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Malformed request, or one that does not fit the model"},
    401: {"model": Error, "description": "BNFOLD_API_KEY is set and the Bearer token is missing or wrong"},
    404: {"model": Error, "description": "Unknown model or version"},
    503: {"model": Error, "description": "Not ready, or the queue is full (see Retry-After)"},
}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    408: {"model": Error, "description": "Body not received within BNFOLD_BODY_TIMEOUT_SECONDS"},
    413: {"model": Error, "description": "Body larger than BNFOLD_MAX_BODY_BYTES"},
    415: {"model": Error, "description": "Content-Encoding other than gzip, deflate or identity"},
    504: {"model": Error, "description": "The request's timeout parameter expired"},
}


def dataplane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


def credentials(request: Request) -> bytes | None:
    value = request.headers.get("authorization")
    return None if value is None else value.encode("latin-1")


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


# ------------------------------------------------------------------------------------ server endpoints
@router.get("/v2", response_model=ServerMetadata, tags=["server"])
async def server_metadata(request: Request) -> Response:
    return json_response(dataplane(request).server_metadata())


@router.get("/v2/health/live", response_model=Live, tags=["health"])
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready}}, tags=["health"])
async def ready(request: Request) -> Response:
    ok = dataplane(request).ready
    return json_response({"ready": ok}, 200 if ok else 503)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    plane = dataplane(request)
    if not plane.settings.metrics_public:
        plane.authorize(credentials(request))  # model names, versions and traffic: behind the key, when one is set
    return Response(plane.metrics.export(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------------- model endpoints
# Each endpoint has an unversioned and a versioned route, with separate handlers so that neither publishes a
# parameter it does not take.
@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=ERRORS, tags=["models"])
async def model_metadata(request: Request, model_name: str) -> Response:
    return _metadata(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    tags=["models"],
)
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> Response:
    return _metadata(request, model_name, model_version)


def _metadata(request: Request, name: str, version: str | None) -> Response:
    return json_response(dataplane(request).model_metadata(name, version, credentials(request)))


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=ERRORS, tags=["models"])
async def model_ready(request: Request, model_name: str) -> Response:
    return _ready(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=ERRORS,
    tags=["models"],
)
async def model_version_ready(request: Request, model_name: str, model_version: str) -> Response:
    return _ready(request, model_name, model_version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    name, version, ok = dataplane(request).model_ready(name, version, credentials(request))
    return json_response({"name": name, "version": version, "ready": ok}, 200 if ok else 503)


@router.get("/v2/models/{model_name}/config", responses=ERRORS, tags=["models"])
async def model_config(request: Request, model_name: str) -> Response:
    return _config(request, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/config", responses=ERRORS, tags=["models"])
async def model_version_config(request: Request, model_name: str, model_version: str) -> Response:
    return _config(request, model_name, model_version)


def _config(request: Request, name: str, version: str | None) -> Response:
    return json_response(dataplane(request).model_config(name, version, credentials(request)))


# ------------------------------------------------------------------------------- the model repository
REPOSITORY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "A version failed to load (the one serving before still serves)"},
    401: ERRORS[401],
    404: {"model": Error, "description": "No such model in the repository"},
    503: {"model": Error, "description": "The server is shutting down"},
}


Body = TypeVar("Body", bound=BaseModel)


async def _body(request: Request, model: type[Body]) -> Body:
    """A repository request's JSON body; empty (as tritonclient sends the index request) means the defaults."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw) if raw.strip() else model()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}" if where else str(first["msg"])) from None


def _optional_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


@router.get("/v2/models", response_model=ModelList, responses={401: ERRORS[401]}, tags=["repository"])
async def models(request: Request) -> Response:
    """The models serving at least one version (KServe's list of models)."""
    return json_response({"models": dataplane(request).model_names(credentials(request))})


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryModel],
    responses={400: {"model": Error, "description": "A body that is not an index request"}, 401: ERRORS[401]},
    tags=["repository"],
    openapi_extra=_optional_body(RepositoryIndexRequest),
)
async def repository_index(request: Request) -> Response:
    """Every version in the repository or in memory, with its state and why (Triton's repository index)."""
    ready_only = (await _body(request, RepositoryIndexRequest)).ready
    return json_response(dataplane(request).repository_index(ready_only, credentials(request)))


@router.post(
    "/v2/repository/models/{model_name}/load",
    response_class=Response,
    responses={200: {"description": "Loaded: every version serves (empty body)"}, **REPOSITORY_ERRORS},
    tags=["repository"],
    openapi_extra=_optional_body(RepositoryChangeRequest),
)
async def load(request: Request, model_name: str) -> Response:
    """(Re)load the model from the repository: folded, verified and warmed up as at start-up."""
    parameters = (await _body(request, RepositoryChangeRequest)).parameters
    await dataplane(request).load_model(model_name, credentials(request), parameters)
    return Response(status_code=200)


@router.post(
    "/v2/repository/models/{model_name}/unload",
    response_class=Response,
    responses={
        200: {"description": "Unloaded, after the requests in flight finished (empty body)"},
        **REPOSITORY_ERRORS,
    },
    tags=["repository"],
)
async def unload(request: Request, model_name: str) -> Response:
    """Refuse new requests for the model, let the admitted ones finish, then unload every version."""
    await _body(request, RepositoryChangeRequest)
    await dataplane(request).unload_model(model_name, credentials(request))
    return Response(status_code=200)


# ------------------------------------------------------------------------------------------- inference
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header of Inference-Header-Content-Length bytes, then binary tensors",
            },
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Length of the JSON header when binary tensors follow it (0: a raw single-input body)",
        }
    ],
}


#: Declared for the OpenAPI schema only: :class:`service.rest.InferenceMiddleware` answers these paths.
infer_schema = APIRouter()


@infer_schema.post(
    "/v2/models/{model_name}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_DOC,
    tags=["inference"],
)
async def infer(model_name: str) -> None:
    """Run the model on the request's inputs."""


@infer_schema.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_DOC,
    tags=["inference"],
)
async def infer_version(model_name: str, model_version: str) -> None:
    """Run this version of the model on the request's inputs."""
