"""The FastAPI application: ``create_app(settings)``; start-up loads and warms every model, shutdown drains.

Readiness is true once start-up finished, at least one model version serves, and no SIGTERM/SIGINT has
arrived: the signal turns it false at once, while uvicorn lets in-flight requests finish before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import threading
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__, memory, serverinfo, webui
from service.errors import ServiceError, Unauthorized
from service.inference import InferenceMiddleware
from service.metrics import Metrics
from service.protocol import InferenceRequest
from service.repository import Repository
from service.routes import router
from service.runtime import LoadedModel
from service.scheduler import Scheduler
from service.settings import Settings

log = logging.getLogger("bnfold.service")


class Service:
    """Everything a request handler needs, hung on ``app.state.service``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.repository = Repository(settings, on_change=self._model_changed)
        self.scheduler: Scheduler | None = None
        self.started = False
        self.draining = False
        self._api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.repository.ready_count() > 0

    def authorize(self, request: Request) -> None:
        value = request.headers.get("authorization")
        self.authorize_header(None if value is None else value.encode("latin-1"))

    def authorize_header(self, value: bytes | None) -> None:
        """Constant-time Bearer check when BNFOLD_API_KEY is set."""
        if self._api_key is None:
            return
        scheme, _, token = (value or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._api_key):
            raise Unauthorized()

    def _model_changed(self, model: LoadedModel, ready: bool) -> None:
        self.metrics.model_ready.labels(model.name, model.version, model.provider).set(1 if ready else 0)

    async def start(self) -> None:
        s = self.settings
        ort.disable_telemetry_events()  # a server has no business phoning home (and a read-only root complains)
        if s.reuse_large_buffers:
            memory.reuse_large_buffers()
        self.scheduler = Scheduler(s.max_concurrency, s.max_queue, s.retry_after_seconds)
        scheduler = self.scheduler
        self.metrics.in_flight.set_function(lambda: scheduler.admitted)
        await self.repository.load_all()
        # everything loaded so far lives as long as the process: keep the garbage collector from rescanning it
        gc.collect()
        gc.freeze()
        self.started = True
        loop, parser = serverinfo.event_loop(), serverinfo.http_parser()
        self.metrics.server_info.labels(loop, parser).set(1)
        log.info("event loop %s, HTTP parser %s", loop, parser)
        log.info("ready: %d model version(s) serving", self.repository.ready_count())

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                await self.repository.rescan()
            except Exception:  # a scan must never kill the poller
                log.exception("repository rescan failed")

    def stop(self) -> None:
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.close()


def _drain_on_signals(svc: Service) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers: readiness drops the moment a signal arrives."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            if not svc.draining:
                log.info("signal %d: readiness off, finishing in-flight requests", signum)
            svc.draining = True
            previous(signum, frame)

        signal.signal(sig, handler)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: Service = app.state.service
    _drain_on_signals(svc)
    await svc.start()
    poller = asyncio.create_task(svc.poll()) if svc.settings.repository_poll_seconds > 0 else None
    try:
        yield
    finally:
        svc.draining = True
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        svc.stop()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers
    )


def create_app(settings: Settings | None = None) -> InferenceMiddleware:
    """The ASGI application: inference requests answered first, everything else by the FastAPI app
    (``.app`` of the returned object; its ``state.service`` holds the models)."""
    settings = settings or Settings()
    app = FastAPI(
        title="bnfold",
        version=__version__,
        summary="Open Inference Protocol V2 (KServe/Triton REST) over ONNX Runtime, BatchNorm folded on load.",
        lifespan=lifespan,
    )
    app.state.service = Service(settings)
    app.include_router(router)
    webui.mount(app, settings)  # `/` and /ui/*: the web page (BNFOLD_UI)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error (logged on the server)")

    _document_inference_request(app)
    return InferenceMiddleware(app, app.state.service)  # POST .../infer ahead of FastAPI (see its docstring)


def _document_inference_request(app: FastAPI) -> None:
    """The infer routes read the raw body (JSON or binary); publish the JSON request schema they accept."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.pop("$defs", {}))
        components["InferenceRequest"] = defs
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
