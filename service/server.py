"""The process: :class:`Server` builds the metrics, the model repository, the scheduler, the dataplane and the
transports as peers, and owns start-up, repository polling and drain. ``create_app(settings)`` is the ASGI
application uvicorn serves (its FastAPI lifespan only calls :meth:`Server.start` and :meth:`Server.stop`).

Readiness is true once start-up finished, at least one model version serves, and no SIGTERM/SIGINT has
arrived: the signal turns it false at once (and the gRPC server stops taking new calls), while uvicorn lets
in-flight requests finish before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from service.connections import Connections
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.rest import app as rest_app
from service.rest import serverinfo
from service.rest.asgi import InferenceMiddleware
from service.runtime import loading, memory
from service.runtime.model import LoadedModel
from service.runtime.repository import Repository
from service.runtime.scheduler import Scheduler
from service.settings import Settings

if TYPE_CHECKING:
    from service.grpc.server import GrpcTransport

log = logging.getLogger("bnfold.service")


class Server:
    """One serving process: its parts, built here and handed to each other, and their lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.repository = Repository(settings, on_change=self._model_changed)
        self.scheduler = Scheduler(settings.max_concurrency, settings.max_queue, settings.retry_after_seconds)
        scheduler = self.scheduler
        self.metrics.in_flight.set_function(lambda: scheduler.admitted)
        self.dataplane = DataPlane(settings, self.repository, self.scheduler, self.metrics)
        self.app = rest_app.build(self.dataplane, self.lifespan)
        self.app.app.state.server = self
        self.connections = Connections(settings)
        self.metrics.add_samples(self.connections.samples)
        self.app.connection_guard = self.connections.rest  # where uvicorn's protocol finds it (service.connections)
        self.grpc: GrpcTransport | None = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load and warm every model, then start the transports (REST is uvicorn's) and the repository poller."""
        s = self.settings
        if s.grpc_port:
            from service.grpc.server import GrpcTransport  # noqa: PLC0415  (grpc stays unloaded when it is off)

            self.grpc = GrpcTransport(self.dataplane, self.connections.grpc)
        drain_on_signals(self.drain)
        loading.disable_telemetry()
        if s.reuse_large_buffers:
            memory.reuse_large_buffers()
        self.scheduler.start()
        await self.repository.load_all()
        # everything loaded so far lives as long as the process: keep the garbage collector from rescanning it
        gc.collect()
        gc.freeze()
        self.dataplane.started = True
        loop, parser = serverinfo.event_loop(), serverinfo.http_parser()
        self.metrics.server_info.labels(loop, parser).set(1)
        log.info("event loop %s, HTTP parser %s", loop, parser)
        log.info("ready: %d model version(s) serving", self.repository.ready_count())
        self.connections.start(grpc=self.grpc is not None)  # the caps from the files left once models loaded
        if self.grpc is not None:
            await self.grpc.start()
        if s.repository_poll_seconds > 0:
            self._poller = asyncio.create_task(self.poll())

    async def poll(self) -> None:
        """Rescan the repository every ``repository_poll_seconds``, for ever."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                await self.repository.rescan()
            except Exception:  # a scan must never kill the poller
                log.exception("repository rescan failed")

    def drain(self, signum: int) -> None:
        """On SIGTERM/SIGINT: readiness off, and the gRPC server stops taking new calls (a signal handler)."""
        if not self.dataplane.draining:
            log.info("signal %d: readiness off, finishing in-flight requests", signum)
        self.dataplane.draining = True
        if self.grpc is not None:
            self.grpc.drain()

    async def stop(self) -> None:
        """After uvicorn drained REST: stop polling, let gRPC finish (draining since the signal), stop computing."""
        self.dataplane.draining = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.grpc is not None:
            await self.grpc.stop()
        self.connections.stop()
        self.scheduler.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The FastAPI lifespan of ``app``: start, serve, stop."""
        if not logging.getLogger().handlers:  # a --workers process: `bnfold serve` configured only the parent
            logging.basicConfig(format="bnfold: %(levelname)s: %(message)s")
            logging.getLogger("bnfold").setLevel(self.settings.log_level.upper())
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def _model_changed(self, model: LoadedModel, ready: bool) -> None:
        self.metrics.model_ready.labels(model.name, model.version, model.provider).set(1 if ready else 0)


def drain_on_signals(drain: Callable[[int], None]) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers: ``drain`` runs the moment a signal arrives, then the
    handler that was there (uvicorn's, which finishes the in-flight requests)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            drain(signum)
            previous(signum, frame)

        signal.signal(sig, handler)


def create_app(settings: Settings | None = None) -> InferenceMiddleware:
    """The ASGI application of a server with ``settings``: inference requests answered first, everything else by
    the FastAPI app (``.app`` of the returned object; ``state.dataplane`` holds the models, ``state.server`` the
    :class:`Server`)."""
    return Server(settings or Settings()).app
