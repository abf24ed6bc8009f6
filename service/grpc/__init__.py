"""The gRPC transport: V2 ``inference.GRPCInferenceService`` and ``grpc.health.v1`` over HTTP/2 of its own.

:mod:`~service.grpc.server` holds the methods and the server's start and drain, :mod:`~service.grpc.http2` the
HTTP/2 and gRPC framing, :mod:`~service.grpc.codec` the protobuf wire format, :mod:`~service.grpc.protos` the
messages.
"""
