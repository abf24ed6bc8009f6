"""The gRPC transport: V2 ``inference.GRPCInferenceService`` and ``grpc.health.v1`` on ``grpc.aio``.

:mod:`~service.grpc.server` holds the servicers and the server's start and drain, :mod:`~service.grpc.codec`
the protobuf wire format, :mod:`~service.grpc.protos` the messages.
"""
