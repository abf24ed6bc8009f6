"""The connection guard (service.connections), on the app served in a thread: the header and idle timeouts close
connections (REST and gRPC), over the cap a waiting connection makes room or a new one gets 503, and the cap
follows the file limit. Each test waits for what the server does to a socket (EOF) or for the guard's counts, never
on a clock. The gRPC server's side of the guard, frame by frame, is in test_grpc_http2.py.
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import pytest

from service.connections import AUTO_MAX, RESERVE, ConnectionGuard, connection_cap
from service.grpc import http2
from service.grpc.protos import grpc_predict_v2_pb2 as pb
from service.launcher import free_port
from tests.support.reliability import DIGITS, read_reply, request_bytes, wait_until
from tests.support.servers import InThread, in_process

INFER = json.dumps({"inputs": [DIGITS]}).encode()


def closed_by_server(sock: socket.socket) -> bool:
    """Block (30 s at most) until the server closes ``sock``: True on EOF or reset, False on data."""
    sock.settimeout(30)
    try:
        return sock.recv(65536) == b""
    except ConnectionError:
        return True


def counts(srv: InThread) -> dict[str, float]:
    guard = srv.app.connection_guard
    return {f"{name}{sorted(labels.items())}": value for name, labels, value in guard.samples()}


def closed(srv: InThread, reason: str) -> float:
    return counts(srv)[f"bnfold_connections_closed_total[('reason', '{reason}'), ('transport', 'rest')]"]


def connect(srv: InThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def test_cap_is_what_the_file_limit_leaves_shared_by_the_transports() -> None:
    assert connection_cap(0, 2, limit=1024, in_use=40) == (1024 - 40 - RESERVE) // 2
    assert connection_cap(0, 1, limit=1024, in_use=40) == 1024 - 40 - RESERVE
    assert connection_cap(0, 1, limit=1 << 20, in_use=40) == AUTO_MAX
    assert connection_cap(0, 2, limit=64, in_use=40) == 1  # never 0: a server that accepts nothing is no server
    assert connection_cap(300, 2, limit=1024, in_use=40) == 300  # the setting wins


class FakeTransport:
    closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class FakeConnection:
    """What a server of our own (an HTTP/2 one, say) hands the guard: a transport and ``guard_busy()``."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.busy = False

    def guard_busy(self) -> bool:
        return self.busy


def test_guard_for_any_asyncio_server() -> None:
    guard = ConnectionGuard("grpc", header_timeout=10, idle_timeout=5, cap=3)
    a, b, c, d = (FakeConnection() for _ in range(4))
    assert all(guard.admit(conn) for conn in (a, b, c))
    b.busy = True
    guard.waiting(c, idle=True)  # answered its last call
    assert guard.admit(d)  # over the cap: the idle one makes room before those waiting for a first request
    assert c.transport.closing and not a.transport.closing
    guard.sweep(time.monotonic() + 11)  # past the header deadline: a and d close, the busy one stays
    assert a.transport.closing and d.transport.closing and not b.transport.closing
    assert guard.open == 1
    e, f, g = (FakeConnection() for _ in range(3))
    assert guard.admit(e) and guard.admit(f)
    e.busy = f.busy = True
    assert not guard.admit(g)  # every open connection busy: refused
    closed = {labels.get("reason"): v for name, labels, v in guard.samples() if name.endswith("_total")}
    assert closed == {"header_timeout": 2, "idle_timeout": 0, "evicted": 1, "refused": 1}


def test_connection_without_a_request_head_is_closed_after_the_header_timeout() -> None:
    with in_process(header_timeout_seconds=0.3) as srv:
        silent, slow = connect(srv), connect(srv)
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nx-slow: a")  # never finished
        assert closed_by_server(silent) and closed_by_server(slow)
        assert closed(srv, "header_timeout") == 2
        with connect(srv) as fresh:  # a request sent at once is answered
            fresh.sendall(request_bytes("GET", "/v2/health/live"))
            assert read_reply(fresh).status == 200


def test_keepalive_connection_is_closed_after_the_idle_timeout() -> None:
    with in_process(idle_timeout_seconds=0.3) as srv, connect(srv) as sock:
        sock.sendall(request_bytes("GET", "/v2/health/live", close=False))
        assert read_reply(sock).status == 200
        assert closed_by_server(sock)
        assert closed(srv, "idle_timeout") == 1


def test_over_the_cap_the_connection_waiting_longest_makes_room() -> None:
    with in_process(max_connections=2) as srv:
        oldest, newer = connect(srv), connect(srv)
        newer.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # started a head: waiting too, but since later
        with connect(srv) as probe:
            probe.sendall(request_bytes("GET", "/v2/health/live"))
            assert read_reply(probe).status == 200
        assert closed_by_server(oldest)
        newer.sendall(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_reply(newer).status == 200
        assert closed(srv, "evicted") == 1


def test_over_the_cap_with_every_connection_busy_a_new_one_gets_503() -> None:
    with in_process(max_connections=2) as srv:
        busy = [connect(srv) for _ in range(2)]
        data = request_bytes("POST", "/v2/models/digits/infer", INFER)
        for sock in busy:  # head and half the body: admitted, not answered
            sock.sendall(data[: len(data) - len(INFER) // 2])
        with connect(srv) as refused:
            reply = read_reply(refused)
            assert (reply.status, reply.headers["connection"], reply.headers["retry-after"]) == (503, "close", "1")
            assert closed_by_server(refused)
        for sock in busy:
            sock.sendall(data[len(data) - len(INFER) // 2 :])
            assert read_reply(sock).status == 200
            sock.close()
        assert closed(srv, "refused") == 1


def read_to_end(sock: socket.socket) -> bytes:
    """What the server sends on ``sock`` until it closes it (30 s at most)."""
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def frame_kinds(data: bytes) -> list[int]:
    kinds, pos = [], 0
    while pos + 9 <= len(data):
        kinds.append(data[pos + 3])
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    return kinds


def test_grpc_connection_without_a_call_is_closed_and_an_idle_channel_reconnects() -> None:
    """gRPC: a connection that sends nothing gets SETTINGS, then GOAWAY at the header timeout, and is closed; a
    channel idle for the idle timeout is closed with GOAWAY, and its next call opens a new connection."""
    port = free_port()
    with in_process(grpc_port=port, header_timeout_seconds=0.3, idle_timeout_seconds=0.3) as srv:
        guard = srv.app.app.state.server.connections.grpc
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            kinds = frame_kinds(read_to_end(silent))
        assert kinds[0] == http2.SETTINGS and kinds[-1] == http2.GOAWAY
        assert guard.closed["header_timeout"] == 1
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=pb.ServerLiveRequest.SerializeToString,
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            assert live(pb.ServerLiveRequest(), timeout=30).live
            wait_until(lambda: guard.closed["idle_timeout"] == 1, 30, 0.02, "the idle channel's connection closed")
            assert live(pb.ServerLiveRequest(), timeout=30).live
        assert guard.closed["header_timeout"] == 1  # the channel's second connection sent its call at once


@pytest.mark.parametrize("public", [False, True])
def test_metrics_need_the_api_key_unless_public(public: bool) -> None:
    with in_process(api_key="s3cret", metrics_public=public) as srv, srv.client() as http:
        assert http.get("/metrics").status_code == (200 if public else 401)
        r = http.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and 'bnfold_connections_open{transport="rest"}' in r.text
