"""gRPC calls no server should answer badly: malformed protobuf bytes (INVALID_ARGUMENT and one short log line,
not UNKNOWN and a traceback), a unary call that sends no request message (answered at once; SIGTERM does not wait
on calls whose request never completes), more simultaneous calls than the queue holds (each refused one
UNAVAILABLE with retry-after, counted in the metrics), and client strings echoed in errors (cut short, gRPC and
REST alike). All on 127.0.0.1, bounded in count."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2

from tests.support.grpc_servers import GrpcServer, build_grpc_repository, start_grpc
from tests.support.reliability import wait_until
from tests.support.servers import free_port, hold_inference, in_process, save, slow_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
METHODS = [
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelConfig",
    INFER,
    "/grpc.health.v1.Health/Check",
]
MALFORMED = [b"\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12"]  # bad tag; a huge length; a truncated field


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    repo = build_grpc_repository(tmp_path_factory.mktemp("hrepo"))
    port = free_port()
    limits = {"max_concurrency": 1, "max_queue": 4, "retry_after_seconds": 3}
    with in_process(model_repository=repo, grpc_port=port, **limits) as srv:
        yield GrpcServer(srv, port)


def raw_call(target: str, method: str, payload: bytes, timeout: float = 60) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(payload, timeout=timeout)
    assert isinstance(info.value, grpc.RpcError)
    return info.value


@pytest.mark.parametrize("method", METHODS)
def test_malformed_protobuf_is_invalid_argument_with_one_short_log_line(
    served: GrpcServer, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        for payload in MALFORMED:
            error = raw_call(served.target, method, payload)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
            assert "protobuf" in error.details() and len(error.details()) < 300, error.details()
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in records if r.exc_info], "a traceback was logged for a client's bytes"
    assert len(records) <= 1, [r.getMessage() for r in records]  # 15 bad calls: one line (rate-limited) at most
    assert all(len(r.getMessage()) < 300 for r in records)


def test_zero_request_messages_is_invalid_argument_at_once(served: GrpcServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        call = channel.stream_stream(INFER)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter(()), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value  # not DEADLINE_EXCEEDED
            request = service_pb2.ModelInferRequest(model_name="static").SerializeToString()
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter((request, request)), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value


def test_over_capacity_every_refused_call_is_unavailable_and_counted(served: GrpcServer) -> None:
    """One run held inside ONNX Runtime, four queued, 2000 more at once over four connections: each of those is
    UNAVAILABLE with retry-after (none CANCELLED or lost), and the busy failures counted in the metrics are
    exactly those."""
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 384])
    request.raw_input_contents.append(np.full((1, 384), 0.5, np.float32).tobytes())
    body = request.SerializeToString()
    busy_before = metric_busy(served)
    total = 2000
    channels = [grpc.insecure_channel(served.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    calls = [c.unary_unary(INFER) for c in channels]
    with hold_inference(1) as held:
        first = calls[0].future(body, timeout=300)
        held.wait_entered()
        futures = [calls[i % 4].future(body, timeout=300) for i in range(total)]
        wait_until(lambda: sum(f.done() for f in futures) >= total - 4, 240, what="the refused calls answered")
        held.release()
        assert first.result() is not None
        codes: dict[str, int] = {}
        for f in futures:
            error = f.exception()
            if error is None:
                codes["OK"] = codes.get("OK", 0) + 1
                continue
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                assert dict(error.trailing_metadata() or ()).get("retry-after") == "3", error
    for c in channels:
        c.close()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes.get("UNAVAILABLE", 0) >= total - 4, codes
    busy = metric_busy(served)
    assert busy - busy_before == codes["UNAVAILABLE"], (busy - busy_before, codes)


def metric_busy(served: GrpcServer) -> float:
    with served.server.client() as http:
        text = http.get("/metrics").text
    lines = [
        ln for ln in text.splitlines() if ln.startswith("bnfold_inference_failure_total{") and 'error="busy"' in ln
    ]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_long_model_name_is_not_found_with_a_short_message(served: GrpcServer) -> None:
    name = "m" * 100_000
    request = service_pb2.ModelInferRequest(model_name=name).SerializeToString()
    error = raw_call(served.target, INFER, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), error.details()[:200])
    assert len(error.details()) < 1000
    meta = service_pb2.ModelMetadataRequest(name=name).SerializeToString()
    error = raw_call(served.target, "/inference.GRPCInferenceService/ModelMetadata", meta)
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 1000
    check = health_pb2.HealthCheckRequest(service=name).SerializeToString()
    error = raw_call(served.target, "/grpc.health.v1.Health/Check", check)
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 1000


def test_long_model_name_rest_404_body_is_short(served: GrpcServer) -> None:
    name = "m" * 60_000
    with httpx.Client(base_url=served.server.url, timeout=60) as http:
        for answer in (http.get(f"/v2/models/{name}"), http.post(f"/v2/models/{name}/infer", json={"inputs": []})):
            assert answer.status_code == 404, answer.text[:200]
            assert len(answer.content) < 1000


@pytest.mark.slow
def test_sigterm_does_not_wait_on_calls_whose_request_never_completes(tmp_path: Path) -> None:
    """Calls that sent their headers but never finish their request, and calls that sent no message, hold
    nothing up: SIGTERM with a 600 s grace period ends the server as soon as the admitted work is done."""
    repo = tmp_path / "repo"
    save(slow_model(), repo, "slow", config='{"max_batch_size": 0}')
    srv = start_grpc(tmp_path, "--model-repository", str(repo), env={"BNFOLD_GRACEFUL_SHUTDOWN_SECONDS": "600"})
    stop = threading.Event()

    def never_ending() -> Iterator[bytes]:
        stop.wait(600)
        yield from ()

    channel = grpc.insecure_channel(srv.target)
    call = channel.stream_stream(INFER)
    try:
        pending = [call(never_ending(), timeout=600) for _ in range(50)]
        empty = [call(iter(()), timeout=600) for _ in range(50)]
        # one connection, frames in order: once this is answered, the server has seen every call above
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=60)
        wait_until(lambda: all(c.done() for c in empty), 60, what="the calls without a message answered")
        assert {c.code() for c in empty} == {grpc.StatusCode.INVALID_ARGUMENT}
        os.kill(srv.server.proc.pid, signal.SIGTERM)
        assert srv.server.proc.wait(120) == 0, srv.server.output()[-2000:]
    finally:
        stop.set()
        for c in locals().get("pending", []):
            c.cancel()
        channel.close()
        if srv.server.proc.poll() is None:
            srv.server.proc.kill()
