"""The HTTP layer: parse the transport details, call the runtime through the scheduler, encode. Nothing else.

Content-Type is never used to route a request (tritonclient sends none): a body is binary-framed exactly when
``Inference-Header-Content-Length`` is present (0 means a raw single-input body).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__, inference
from service.errors import ServiceError
from service.metrics import CONTENT_TYPE
from service.protocol import (
    EXTENSIONS,
    Error,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
)

if TYPE_CHECKING:
    from service.app import Service

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


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


# ------------------------------------------------------------------------------------ server endpoints
@router.get("/v2", response_model=ServerMetadata, tags=["server"])
async def server_metadata() -> Response:
    return json_response({"name": "bnfold", "version": __version__, "extensions": [*EXTENSIONS]})


@router.get("/v2/health/live", response_model=Live, tags=["health"])
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready}}, tags=["health"])
async def ready(request: Request) -> Response:
    ok = service(request).ready
    return json_response({"ready": ok}, 200 if ok else 503)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.export(), media_type=CONTENT_TYPE)


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
    svc = service(request)
    svc.authorize(request)
    model = svc.repository.get(name, version)
    return json_response(model.metadata(svc.repository.models[name].versions()))


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
    svc = service(request)
    svc.authorize(request)
    try:
        model = svc.repository.get(name, version)
    except ServiceError as exc:
        if exc.status != 503:
            raise
        return json_response({"name": name, "version": version, "ready": False}, 503)
    ok = not svc.draining
    return json_response({"name": model.name, "version": model.version, "ready": ok}, 200 if ok else 503)


@router.get("/v2/models/{model_name}/config", responses=ERRORS, tags=["models"])
async def model_config(request: Request, model_name: str) -> Response:
    return _config(request, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/config", responses=ERRORS, tags=["models"])
async def model_version_config(request: Request, model_name: str, model_version: str) -> Response:
    return _config(request, model_name, model_version)


def _config(request: Request, name: str, version: str | None) -> Response:
    svc = service(request)
    svc.authorize(request)
    return json_response(svc.repository.get(name, version).triton_config())


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


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_DOC,
    tags=["inference"],
)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_DOC,
    tags=["inference"],
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
    """Reached only without :class:`service.inference.InferenceMiddleware` in front (it answers first)."""
    status, headers, body = await inference.handle(
        service(request), model_name, model_version, request.scope, request.receive
    )
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})
