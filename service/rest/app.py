"""The REST transport's ASGI application: inference answered first (:mod:`service.rest.asgi`), everything
else by a FastAPI app (routes, OpenAPI schema, the web page, error handlers). The process around it (models,
start-up, drain) is :mod:`service.server`'s; this module only builds the app over a dataplane."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.dataplane import DataPlane
from service.errors import BadRequest, Internal, ServiceError
from service.rest import routes, webui
from service.rest.asgi import InferenceMiddleware
from service.rest.codec import encode_error
from service.rest.openapi import InferenceRequest

log = logging.getLogger("bnfold.service")

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def error_response(exc: ServiceError) -> Response:
    status, headers, body = encode_error(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def build(dataplane: DataPlane, lifespan: Lifespan | None = None) -> InferenceMiddleware:
    """The ASGI application over ``dataplane``: inference requests answered first, everything else by the
    FastAPI app (``.app`` of the returned object; its ``state.dataplane`` is ``dataplane``). ``lifespan`` is the
    process's start-up and shutdown (:meth:`service.server.Server.lifespan`)."""
    settings = dataplane.settings
    app = FastAPI(
        title="bnfold",
        version=__version__,
        summary="Open Inference Protocol V2 (KServe/Triton REST) over ONNX Runtime, BatchNorm folded on load.",
        lifespan=lifespan,
    )
    app.state.dataplane = dataplane
    app.include_router(routes.router)
    webui.mount(app, settings)  # `/` and /ui/*: the web page (BNFOLD_UI)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(BadRequest(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # routing's own answers (404 no such path, 405 wrong method): HTTP statuses with no dataplane meaning
        body = orjson.dumps({"error": " ".join(str(exc.detail).split())})
        return Response(body, exc.status_code, getattr(exc, "headers", None), media_type="application/json")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(Internal())

    _document_inference_request(app)
    return InferenceMiddleware(app, dataplane)  # POST .../infer ahead of FastAPI (see service.rest.asgi)


def _document_inference_request(app: FastAPI) -> None:
    """The infer routes read the raw body (JSON or binary); publish the JSON request schema they accept."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=[*app.routes, *routes.infer_schema.routes],
        )
        defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.pop("$defs", {}))
        components["InferenceRequest"] = defs
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
