"""The gRPC transport: the V2 ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` over HTTP/2 of
our own (:mod:`service.grpc.http2`) in the same process and event loop as REST, over the same
:class:`DataPlane`.

ModelInfer reads top to bottom: parse the protobuf message, admit (:meth:`DataPlane.admit
<service.dataplane.DataPlane.admit>`), decode (:mod:`service.grpc.codec`), run; its response is serialized in
the compute thread and sent as bytes. Errors map from their kind to a status code in one
table (:data:`GRPC_STATUS`) with the same message text as REST. A full queue is ``UNAVAILABLE`` (with a
``retry-after`` trailer), like REST's 503: the condition is transient and retrying is right, which is what
gRPC clients and retry policies read from UNAVAILABLE; RESOURCE_EXHAUSTED would mix it up with gRPC's own
message-size refusals and per-client quotas. Messages larger than BNFOLD_MAX_BODY_BYTES are refused
(RESOURCE_EXHAUSTED) from their length prefix, before they are read. Bytes that are not the method's protobuf
message are INVALID_ARGUMENT, logged as one line at most every LOG_EVERY_SECONDS.

On SIGTERM the server stops taking new calls at once (GOAWAY) and lets the admitted ones finish within
BNFOLD_GRACEFUL_SHUTDOWN_SECONDS, as uvicorn does for REST; a call whose request never completed is not
admitted and holds nothing up.

Its connections are kept within the limits of a :class:`~service.connections.ConnectionGuard` (header and idle
timeouts, a cap on open connections), as REST's are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from service.connections import ConnectionGuard
from service.dataplane import DataPlane
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
    shown,
)
from service.grpc.codec import decode_request, encode_result, model_config, model_metadata
from service.grpc.http2 import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    Call,
    GrpcError,
    Http2Server,
    Methods,
    Payload,
)
from service.grpc.protos import grpc_predict_v2_pb2 as pb

log = logging.getLogger("bnfold.service")

TRANSPORT = "grpc"
SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
WATCH_EVERY_SECONDS = 1.0
LOG_EVERY_SECONDS = 60.0

#: Error kind -> gRPC status code.
GRPC_STATUS: dict[str, int] = {
    BadRequest.kind: INVALID_ARGUMENT,
    Unauthorized.kind: UNAUTHENTICATED,
    NotFound.kind: NOT_FOUND,
    RequestTimeout.kind: DEADLINE_EXCEEDED,
    PayloadTooLarge.kind: RESOURCE_EXHAUSTED,
    UnsupportedEncoding.kind: UNIMPLEMENTED,
    ClientGone.kind: CANCELLED,
    Internal.kind: INTERNAL,
    Unavailable.kind: UNAVAILABLE,
    Busy.kind: UNAVAILABLE,
    Timeout.kind: DEADLINE_EXCEEDED,
}

M = TypeVar("M", bound=Message)


def grpc_error(exc: ServiceError) -> GrpcError:
    """The gRPC answer to any :class:`ServiceError`."""
    trailers = () if exc.retry_after is None else (("retry-after", str(exc.retry_after)),)
    return GrpcError(GRPC_STATUS.get(exc.kind, INTERNAL), exc.message, trailers)


class MalformedLog:
    """One log line for malformed messages, then at most one per LOG_EVERY_SECONDS with the count since."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.count = 0

    def note(self, method: str, exc: Exception) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            log.warning(
                "gRPC: %d malformed request message(s) since the last such line (the latest to %s: %s)",
                self.count,
                method[:100],
                str(exc)[:100],
            )
            self.next_at, self.count = now + LOG_EVERY_SECONDS, 0


def wire(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def credentials(call: Call) -> bytes | None:
    return call.metadata.get(b"authorization")


Handler = Callable[[Payload, Call], Awaitable[bytes]]


class Inference:
    """The ``inference.GRPCInferenceService`` methods, bytes in and bytes out."""

    def __init__(self, dataplane: DataPlane, malformed: MalformedLog | None = None) -> None:
        self.dataplane = dataplane
        self.malformed = malformed or MalformedLog()

    def parse(self, kind: type[M], data: Payload, call: Call) -> M:
        try:
            parsed: M = kind.FromString(data)  # any bytes-like object
            return parsed
        except (DecodeError, RuntimeWarning) as exc:
            self.malformed.note(call.method, exc)
            raise GrpcError(INVALID_ARGUMENT, f"malformed protobuf: not a {kind.DESCRIPTOR.name}") from None

    async def server_live(self, data: Payload, call: Call) -> bytes:
        self.parse(pb.ServerLiveRequest, data, call)
        return wire(pb.ServerLiveResponse(live=self.dataplane.live))

    async def server_ready(self, data: Payload, call: Call) -> bytes:
        self.parse(pb.ServerReadyRequest, data, call)
        return wire(pb.ServerReadyResponse(ready=self.dataplane.ready))

    async def model_ready(self, data: Payload, call: Call) -> bytes:
        request = self.parse(pb.ModelReadyRequest, data, call)
        _, _, ok = self.dataplane.model_ready(request.name, request.version or None, credentials(call))
        return wire(pb.ModelReadyResponse(ready=ok))

    async def server_metadata(self, data: Payload, call: Call) -> bytes:
        self.parse(pb.ServerMetadataRequest, data, call)
        return wire(pb.ServerMetadataResponse(**self.dataplane.server_metadata()))

    async def model_metadata(self, data: Payload, call: Call) -> bytes:
        request = self.parse(pb.ModelMetadataRequest, data, call)
        meta = self.dataplane.model_metadata(request.name, request.version or None, credentials(call))
        return wire(model_metadata(meta))

    async def model_config(self, data: Payload, call: Call) -> bytes:
        request = self.parse(pb.ModelConfigRequest, data, call)
        config = self.dataplane.model_config(request.name, request.version or None, credentials(call))
        return wire(model_config(config))

    async def model_infer(self, data: Payload, call: Call) -> bytes:
        request = self.parse(pb.ModelInferRequest, data, call)
        name, version = request.model_name, request.model_version or None
        with self.dataplane.admit(name, version, credentials(call), TRANSPORT) as admitted:
            decoded = decode_request(request, self.dataplane.settings.max_elements)
            return await admitted.run(decoded, encode_result, call.deadline)

    def methods(self) -> dict[str, Handler]:
        handlers = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelInfer": self.model_infer,
        }
        return {f"/{SERVICE}/{name}": _answering_errors(fn) for name, fn in handlers.items()}


def _answering_errors(fn: Handler) -> Handler:
    async def handler(data: Payload, call: Call) -> bytes:
        try:
            return await fn(data, call)
        except ServiceError as exc:
            raise grpc_error(exc) from None

    return handler


class Health:
    """``grpc.health.v1.Health`` following readiness: the server (service "" or the inference service's
    name) is SERVING exactly when ``GET /v2/health/ready`` answers 200; other names are NOT_FOUND."""

    def __init__(self, dataplane: DataPlane, inference: Inference) -> None:
        self.dataplane = dataplane
        self.inference = inference

    def status(self, service: str) -> int | None:
        if service not in ("", SERVICE):
            return None
        ok = self.dataplane.ready
        return int(health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check(self, data: Payload, call: Call) -> bytes:
        request = self.inference.parse(health_pb2.HealthCheckRequest, data, call)
        status = self.status(request.service)
        if status is None:
            raise GrpcError(NOT_FOUND, f"unknown service {shown(request.service)}")
        return wire(health_pb2.HealthCheckResponse(status=status))

    async def watch(self, data: Payload, call: Call) -> AsyncIterator[bytes]:
        """The status now, then each change (looked at every WATCH_EVERY_SECONDS)."""
        request = self.inference.parse(health_pb2.HealthCheckRequest, data, call)
        unknown = int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        last = None
        while True:
            status = self.status(request.service)
            status = unknown if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status).SerializeToString()
                last = status
            await asyncio.sleep(WATCH_EVERY_SECONDS)


class GrpcTransport:
    """Start, drain and stop the gRPC server (the process's :class:`~service.server.Server` calls these)."""

    def __init__(self, dataplane: DataPlane, guard: ConnectionGuard | None = None) -> None:
        self.dataplane = dataplane
        self.guard = guard  # the limits on its connections (service.connections)
        self.server: Http2Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        s = self.dataplane.settings
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
        return f"{host}:{s.grpc_port}"

    async def start(self) -> None:
        s = self.dataplane.settings
        inference = Inference(self.dataplane, MalformedLog())
        health = Health(self.dataplane, inference)
        methods = Methods(
            unary={**inference.methods(), f"/{HEALTH_SERVICE}/Check": health.check},
            server_stream={f"/{HEALTH_SERVICE}/Watch": health.watch},
        )
        server = Http2Server(methods, s.max_body_bytes, self.guard, s.body_timeout_seconds)
        try:
            # with --workers N every process binds the port, as uvicorn's do for REST; alone, a taken port
            # must be an error rather than a silent share with another server
            await server.listen(s.host, s.grpc_port, reuse_port=s.workers > 1)
        except OSError as exc:
            raise OSError(f"gRPC cannot listen on {self.address}: {exc.strerror or exc}") from None
        self.server, self._loop = server, asyncio.get_running_loop()
        self.dataplane.transports.append(TRANSPORT)
        log.info("gRPC (V2 inference.GRPCInferenceService, grpc.health.v1) on %s", self.address)

    def drain(self) -> None:
        """Stop taking calls now, finish the admitted ones; safe from a signal handler."""
        if self.server is None or self._loop is None or self._stopping is not None:
            return
        self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stopping is None and self.server is not None:
            grace = float(self.dataplane.settings.graceful_shutdown_seconds)
            self._stopping = asyncio.ensure_future(self.server.stop(grace))

    async def stop(self) -> None:
        self._begin_stop()
        if self._stopping is not None:
            await self._stopping
