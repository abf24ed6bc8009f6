"""The FastAPI application: ``create_app(settings)``; start-up loads and warms every model, shutdown drains.

Readiness is true once start-up finished, at least one model version serves, and no SIGTERM/SIGINT has
arrived: the signal turns it false at once, while uvicorn lets in-flight requests finish before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__, rest, routes, webui
from service.dataplane import DataPlane
from service.errors import BadRequest, Internal, ServiceError
from service.protocol import InferenceRequest
from service.settings import Settings

log = logging.getLogger("bnfold.service")


def _drain_on_signals(dataplane: DataPlane, *also: Callable[[], None]) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers: readiness drops the moment a signal arrives (and
    ``also`` runs: the gRPC server stops taking new calls)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            if not dataplane.draining:
                log.info("signal %d: readiness off, finishing in-flight requests", signum)
            dataplane.draining = True
            for fn in also:
                fn()
            previous(signum, frame)

        signal.signal(sig, handler)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    dataplane: DataPlane = app.state.dataplane
    if not logging.getLogger().handlers:  # a --workers process: `bnfold serve` configured only the parent
        logging.basicConfig(format="bnfold: %(levelname)s: %(message)s")
        logging.getLogger("bnfold").setLevel(dataplane.settings.log_level.upper())
    grpc = None
    if dataplane.settings.grpc_port:
        from service.grpc_server import GrpcTransport  # noqa: PLC0415  (grpc stays unloaded when it is off)

        grpc = GrpcTransport(dataplane)
    _drain_on_signals(dataplane, *([grpc.drain] if grpc else []))
    await dataplane.start()
    if grpc is not None:
        await grpc.start()
    poller = asyncio.create_task(dataplane.poll()) if dataplane.settings.repository_poll_seconds > 0 else None
    try:
        yield
    finally:
        dataplane.draining = True
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        if grpc is not None:
            await grpc.stop()  # after uvicorn drained REST; gRPC has been draining since the signal
        dataplane.stop()


def error_response(exc: ServiceError) -> Response:
    status, headers, body = rest.encode_error(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def create_app(settings: Settings | None = None) -> rest.InferenceMiddleware:
    """The ASGI application: inference requests answered first, everything else by the FastAPI app
    (``.app`` of the returned object; its ``state.dataplane`` holds the models)."""
    settings = settings or Settings()
    app = FastAPI(
        title="bnfold",
        version=__version__,
        summary="Open Inference Protocol V2 (KServe/Triton REST) over ONNX Runtime, BatchNorm folded on load.",
        lifespan=lifespan,
    )
    app.state.dataplane = DataPlane(settings)
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
    return rest.InferenceMiddleware(app, app.state.dataplane)  # POST .../infer ahead of FastAPI (see rest.py)


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
