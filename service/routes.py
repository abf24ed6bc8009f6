"""The HTTP layer: parse the transport details, call the runtime through the scheduler, encode. Nothing else.

Content-Type is never used to route a request (tritonclient sends none): a body is binary-framed exactly when
``Inference-Header-Content-Length`` is present (0 means a raw single-input body).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import time
import zlib
from typing import TYPE_CHECKING, Any

import onnxruntime as ort
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.errors import BadRequest, PayloadTooLarge, RequestTimeout, ServiceError, UnsupportedEncoding
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
from service.runtime import Timing

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
DECODE_IN_THREAD_BYTES = 256 << 10  # larger bodies are decoded off the event loop
COMPRESS_MIN_BYTES = 1024


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
    started = time.monotonic()
    svc = service(request)
    svc.authorize(request)
    model = svc.repository.get(model_name, model_version)
    assert svc.scheduler is not None
    m = svc.metrics
    labels = (model.name, model.version, model.provider)
    try:
        async with svc.scheduler.admit():
            m.in_flight.inc()
            try:
                body = await read_body(request, svc.settings.max_body_bytes, svc.settings.body_timeout_seconds)
                header_length = _header_length(request)
                prepare = functools.partial(model.prepare, body, header_length, svc.settings.max_elements)
                if len(body) > DECODE_IN_THREAD_BYTES:
                    prepared = await asyncio.get_running_loop().run_in_executor(None, prepare)
                else:
                    prepared = prepare()
                timeout = prepared.request.timeout_us
                deadline = None if timeout is None else started + timeout / 1e6
                options, timing = ort.RunOptions(), Timing()
                run = functools.partial(model.execute, prepared, options, timing)
                stop = functools.partial(setattr, options, "terminate", True)
                (payload, json_length), queued = await svc.scheduler.run(run, deadline, stop)
            finally:
                m.in_flight.dec()
    except ServiceError as exc:
        m.failure.labels(*labels, str(exc.status)).inc()
        raise
    except Exception:
        m.failure.labels(*labels, "500").inc()
        raise
    m.success.labels(*labels).inc()
    m.queue_seconds.labels(*labels).observe(queued)
    m.compute_seconds.labels(*labels).observe(timing.compute_seconds)
    headers = {}
    if json_length is not None:
        headers["Inference-Header-Content-Length"] = str(json_length)
    media = "application/json" if json_length is None else "application/octet-stream"
    payload, encoding = compress(payload, request.headers.get("accept-encoding", ""))
    if encoding:
        headers["Content-Encoding"] = encoding
    m.request_seconds.labels(*labels).observe(time.monotonic() - started)
    return Response(payload, media_type=media, headers=headers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    number = _decimal(value)
    if number is None:
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, not {value[:40]!r}")
    return number


def _decimal(value: str) -> int | None:
    """A non-negative ASCII decimal of at most 18 digits ('²' passes str.isdigit but not int)."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, decompressed, never more than ``limit`` bytes at any point."""
    declared = request.headers.get("content-length")
    size_declared = None if declared is None else _decimal(declared)
    if declared is not None and (size_declared is None or size_declared > limit):
        raise PayloadTooLarge(f"body of {declared.strip()[:40]} bytes is larger than the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is larger than the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported (gzip, deflate, identity)")
    return inflate(body, encoding, limit)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip or zlib ('deflate', as HTTP and tritonclient mean it) with a bound on the inflated size."""
    inflater = zlib.decompressobj(wbits=(16 if encoding == "gzip" else 0) + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"inflated body is larger than the limit of {limit} bytes")
    if not inflater.eof:
        raise BadRequest(f"{encoding} body is truncated")
    return out


def compress(payload: bytes, accept: str) -> tuple[bytes, str | None]:
    """gzip or deflate the response when the client accepts it and it is worth it."""
    if len(payload) < COMPRESS_MIN_BYTES or not accept:
        return payload, None
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "gzip" in accepted:
        return gzip.compress(payload, compresslevel=1), "gzip"
    if "deflate" in accepted:
        return zlib.compress(payload, 1), "deflate"
    return payload, None
