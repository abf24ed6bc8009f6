"""The gRPC transport: the V2 ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on a
``grpc.aio`` server in the same process and event loop as REST, over the same :class:`DataPlane`.

ModelInfer reads top to bottom: admit (:meth:`DataPlane.admit <service.dataplane.DataPlane.admit>`), decode
(:mod:`service.grpc.codec`), run; its response is serialized in the compute thread and sent as bytes. Errors
map from their kind to a status code in one table (:data:`GRPC_STATUS`) with the same message text as REST.
A full queue is ``UNAVAILABLE`` (with a ``retry-after`` trailer), like REST's 503: the condition is transient
and retrying is right, which is what gRPC clients and retry policies read from UNAVAILABLE; RESOURCE_EXHAUSTED
would mix it up with gRPC's own message-size refusals and per-client quotas. Messages larger than
BNFOLD_MAX_BODY_BYTES are refused by gRPC itself (RESOURCE_EXHAUSTED), before they are read into memory.

On SIGTERM the server stops taking new RPCs at once and lets the admitted ones finish within
BNFOLD_GRACEFUL_SHUTDOWN_SECONDS, as uvicorn does for REST.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

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
)
from service.grpc.codec import decode_request, encode_result, model_config, model_metadata
from service.grpc.protos import grpc_predict_v2_pb2 as pb

log = logging.getLogger("bnfold.service")

TRANSPORT = "grpc"
SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
WATCH_EVERY_SECONDS = 1.0

#: Error kind -> gRPC status code.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    BadRequest.kind: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized.kind: grpc.StatusCode.UNAUTHENTICATED,
    NotFound.kind: grpc.StatusCode.NOT_FOUND,
    RequestTimeout.kind: grpc.StatusCode.DEADLINE_EXCEEDED,
    PayloadTooLarge.kind: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnsupportedEncoding.kind: grpc.StatusCode.UNIMPLEMENTED,
    ClientGone.kind: grpc.StatusCode.CANCELLED,
    Internal.kind: grpc.StatusCode.INTERNAL,
    Unavailable.kind: grpc.StatusCode.UNAVAILABLE,
    Busy.kind: grpc.StatusCode.UNAVAILABLE,
    Timeout.kind: grpc.StatusCode.DEADLINE_EXCEEDED,
}


async def abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """The gRPC answer to any :class:`ServiceError` (raises, as ``context.abort`` does)."""
    if exc.retry_after is not None:
        context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
    await context.abort(GRPC_STATUS.get(exc.kind, grpc.StatusCode.INTERNAL), exc.message)


def credentials(context: grpc.aio.ServicerContext) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value.encode("latin-1") if isinstance(value, str) else bytes(value)
    return None


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _answering_errors(fn: Handler) -> Handler:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except ServiceError as exc:
            await abort(context, exc)

    return handler


class Inference:
    """The ``inference.GRPCInferenceService`` methods."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        _, _, ok = self.dataplane.model_ready(request.name, request.version or None, credentials(context))
        return pb.ModelReadyResponse(ready=ok)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dataplane.model_metadata(request.name, request.version or None, credentials(context))
        return model_metadata(meta)

    async def model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return model_config(self.dataplane.model_config(request.name, request.version or None, credentials(context)))

    async def model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        name, version = request.model_name, request.model_version or None
        with self.dataplane.admit(name, version, credentials(context), TRANSPORT) as admitted:
            decoded = decode_request(request, self.dataplane.settings.max_elements)
            return await admitted.run(decoded, encode_result, deadline)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Handler, request_type: Any, serialize: Callable[[Any], bytes] | None = None) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                _answering_errors(fn),
                request_deserializer=request_type.FromString,
                response_serializer=serialize or (lambda message: message.SerializeToString()),
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self.server_live, pb.ServerLiveRequest),
                "ServerReady": unary(self.server_ready, pb.ServerReadyRequest),
                "ModelReady": unary(self.model_ready, pb.ModelReadyRequest),
                "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest),
                "ModelConfig": unary(self.model_config, pb.ModelConfigRequest),
                "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, bytes),
            },
        )


class Health:
    """``grpc.health.v1.Health`` following readiness: the server (service "" or the inference service's
    name) is SERVING exactly when ``GET /v2/health/ready`` answers 200; other names are NOT_FOUND."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def status(self, service: str) -> int | None:
        if service not in ("", SERVICE):
            return None
        ok = self.dataplane.ready
        return int(health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (looked at every WATCH_EVERY_SECONDS)."""
        unknown = int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        last = None
        while True:
            status = self.status(request.service)
            status = unknown if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_EVERY_SECONDS)

    def handler(self) -> grpc.GenericRpcHandler:
        request = health_pb2.HealthCheckRequest.FromString
        response = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            HEALTH_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self.check, request, response),
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch, request, response),
            },
        )


class GrpcTransport:
    """Start, drain and stop the gRPC server (the process's :class:`~service.server.Server` calls these)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        s = self.dataplane.settings
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
        return f"{host}:{s.grpc_port}"

    async def start(self, connection_options: Sequence[tuple[str, int]] = ()) -> None:
        """Listen and serve; ``connection_options``: the connection guard's limits as grpcio server options
        (:meth:`service.connections.ConnectionGuard.grpc_options`)."""
        s = self.dataplane.settings
        options = [
            *connection_options,
            ("grpc.max_receive_message_length", s.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # with --workers N every process binds the port, as uvicorn's do for REST; alone, a taken port
            # must be an error rather than a silent share with another server
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((Inference(self.dataplane).handler(), Health(self.dataplane).handler()))
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"gRPC cannot listen on {self.address}: {exc}") from None
        if port == 0:
            raise OSError(f"gRPC cannot listen on {self.address}")
        await server.start()
        self.server, self._loop = server, asyncio.get_running_loop()
        self.dataplane.transports.append(TRANSPORT)
        log.info("gRPC (V2 inference.GRPCInferenceService, grpc.health.v1) on %s", self.address)

    def drain(self) -> None:
        """Stop taking RPCs now, finish the admitted ones; safe from a signal handler."""
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
