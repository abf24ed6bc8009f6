"""Connections under attack, and the drain after SIGTERM, against `bnfold serve` with a file limit of 1024.

Without the connection guard, a few hundred idle sockets use up the process's files and nothing answers, health
probes included; slowloris connections are never closed; on SIGTERM, requests written on open keep-alive connections
meet a reset. Each test waits on observable state (the attacker's sockets, the server's log, /metrics), never on a
clock: a client timeout of 1 s is the probes' requirement, not a measure of speed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from service.launcher import ServerProcess, free_port, launch
from tests.support.hostile import Attack, connection_metrics, limited_serve, server_live
from tests.support.reliability import DIGITS, read_reply, refused, request_bytes, wait_until

pytestmark = pytest.mark.slow  # a subprocess server with its own file limit

FILE_LIMIT = 1024
PER_KIND = 750  # 3000 hostile connections: idle and slowloris, REST and gRPC
HEADER_TIMEOUT, IDLE_TIMEOUT = "4", "2"
INFER = json.dumps({"inputs": [DIGITS]}).encode()


def serve(tmp: Path, env: dict[str, str], grpc_port: int = 0) -> ServerProcess:
    port = free_port()
    args = ["--port", str(port), "--grpc-port", str(grpc_port)]
    full_env = {**os.environ, "BNFOLD_WARMUP_RUNS": "1", **env}
    return launch(command=[*limited_serve(FILE_LIMIT), *args], port=port, env=full_env, log=tmp / "server.log")


def get(port: int, method: str, path: str, body: bytes = b"") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request(method, path, body=body or None)
        return conn.getresponse().status
    finally:
        conn.close()


def test_health_and_inference_answer_under_3000_hostile_connections(tmp_path: Path) -> None:
    grpc_port = free_port()
    env = {"BNFOLD_HEADER_TIMEOUT_SECONDS": HEADER_TIMEOUT, "BNFOLD_IDLE_TIMEOUT_SECONDS": IDLE_TIMEOUT}
    srv = serve(tmp_path, env, grpc_port)
    try:
        with Attack(srv.port, grpc_port, PER_KIND, round_seconds=0.2) as attack:
            wait_until(attack.launched, 120, 0.05, "every hostile connection attempted")
            # the attack holds the server: its REST cap is full of them
            rest_cap = connection_metrics(srv.port)['bnfold_connections_max{transport="rest"}']
            assert attack.still_open() >= rest_cap
            for _ in range(3):
                assert get(srv.port, "GET", "/v2/health/live") == 200
                assert get(srv.port, "GET", "/v2/health/ready") == 200
                assert server_live(grpc_port)
                assert get(srv.port, "POST", "/v2/models/digits/infer", INFER) == 200
            # hostile connections are closed while the slowloris ones keep trickling
            wait_until(lambda: attack.still_open() == 0, 120, 0.1, "every hostile connection closed")
            assert sum(attack.failed.values()) == 0, attack.failed  # the listeners kept accepting
        counts = connection_metrics(srv.port)
    finally:
        code = srv.stop()
    log = srv.output()
    assert code == 0, log[-3000:]
    for transport in ("rest", "grpc"):  # slowloris at the header timeout, idle ones evicted to make room
        for reason in ("header_timeout", "evicted"):
            key = f'bnfold_connections_closed_total{{reason="{reason}",transport="{transport}"}}'
            assert counts[key] > 0, counts
    summaries = [line for line in log.splitlines() if "connections closed:" in line]
    assert 1 <= len(summaries) <= 3, summaries  # one line (and one at shutdown), never one per connection
    others = [line for line in log.splitlines() if ("WARNING" in line or "ERROR" in line) and line not in summaries]
    assert not others, others  # e.g. "File descriptor limit reached", "out of system resource"
    assert f"file limit {FILE_LIMIT}" in log


def test_requests_on_open_keepalive_connections_after_sigterm_are_answered(tmp_path: Path) -> None:
    srv = serve(tmp_path, {"BNFOLD_IDLE_TIMEOUT_SECONDS": "120", "BNFOLD_HEADER_TIMEOUT_SECONDS": "120"})
    keepalive = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(8)]
    try:
        for s in keepalive:
            s.sendall(request_bytes("GET", "/v2/health/live", close=False))
            assert read_reply(s).status == 200
        os.kill(srv.proc.pid, signal.SIGTERM)
        wait_until(lambda: "readiness off" in srv.output(), 30, 0.02, "the signal in the server log")
        wait_until(lambda: refused(srv.port), 30, 0.02, "the listener closed")  # uvicorn's shutdown has run
        answers = []
        for s in keepalive:
            s.sendall(request_bytes("POST", "/v2/models/digits/infer", INFER, close=False))
            try:
                reply = read_reply(s)
            except (ConnectionError, OSError) as exc:
                answers.append(type(exc).__name__)
            else:
                answers.append(f"{reply.status} connection: {reply.headers.get('connection')}")
        code = srv.proc.wait(60)
    finally:
        for s in keepalive:
            s.close()
        srv.stop()
    assert all(a in ("200 connection: close", "503 connection: close") for a in answers), answers
    assert code == 0, srv.tail()
