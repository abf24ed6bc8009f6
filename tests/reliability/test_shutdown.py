"""SIGTERM during load: every request the server accepted before the signal completes; exit code 0.

The two kinds of request around a SIGTERM, told apart precisely:

- *accepted*: the server had it before the signal (its ``bnfold_requests_in_flight`` gauge counted it, or its
  connection was established well before the signal, so the event loop has accepted and read it). Each one must
  get its complete 200 answer: no reset, no truncated body, no hang.
- *new*: a connection attempted after the signal may be refused (ECONNREFUSED: the listener is closed), and a
  connection still waiting in the kernel's accept backlog when the listener closes may be dropped (closed or reset
  before a single response byte). An idle keep-alive connection is closed by the server.

Everything else — a 5xx, a partial answer, a hang (30 s socket timeouts), a refusal of a connection attempted
before the signal, a drop of a connection established more than ``BACKLOG_WINDOW`` before it — fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.reliability.helpers import SLOW, metric, read_reply, request_bytes, wait_until
from tests.service.servers import save, slow_model, start

SLOW_REQUEST = request_bytes("POST", "/v2/models/slow/infer", json.dumps(SLOW).encode())
LIVE_REQUEST = request_bytes("GET", "/v2/health/live")
BACKLOG_WINDOW = 1.0  # s: a connection established this long before the signal has been accepted by the server


@dataclass
class Attempt:
    kind: str
    t_connect: float  # before connect()
    t_connected: float | None = None
    outcome: str = ""  # "200", "503", ..., "refused", "dropped", "partial", "timeout", "error:<type>"
    body: bytes = b""
    t_end: float = 0.0


def attempt(port: int, data: bytes, kind: str) -> Attempt:
    a = Attempt(kind, time.monotonic())
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionRefusedError:
        a.outcome = "refused"
        return a
    except OSError as exc:
        a.outcome = f"error:{type(exc).__name__}"
        return a
    a.t_connected = time.monotonic()
    with sock:
        a.outcome, a.body = exchange(sock, data)
    a.t_end = time.monotonic()
    return a


def exchange(sock: socket.socket, data: bytes) -> tuple[str, bytes]:
    """Send one request and read its answer; classify how it ended."""
    got_bytes = False

    class Tap:
        def recv(self, n: int) -> bytes:
            nonlocal got_bytes
            chunk = sock.recv(n)
            got_bytes = got_bytes or bool(chunk)
            return chunk

    try:
        sock.sendall(data)
        reply = read_reply(Tap())  # type: ignore[arg-type]
    except TimeoutError:
        return "timeout", b""
    except (ConnectionError, OSError):
        return ("partial" if got_bytes else "dropped"), b""
    return str(reply.status), reply.body


def test_sigterm_during_load_completes_every_accepted_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    save(slow_model(384, 24), repo, "slow", config='{"max_batch_size": 0}')  # ~0.05-0.15 s per run
    save(slow_model(384, 96), repo, "slower", config='{"max_batch_size": 0}')  # ~0.2-0.6 s per run
    srv = start(
        tmp_path,
        "--model-repository",
        str(repo),
        env={"BNFOLD_MAX_CONCURRENCY": "1", "BNFOLD_MAX_QUEUE": "64", "BNFOLD_GRACEFUL_SHUTDOWN_SECONDS": "60"},
    )
    port = srv.port
    slower = json.dumps(SLOW).encode()
    attempts: list[Attempt] = []
    accepted: list[Attempt] = []
    lock = threading.Lock()
    stop_racers = threading.Event()

    keepalive = []  # keep-alive connections that have served a request already; they time the slower model
    run_seconds = 60.0
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        s.sendall(request_bytes("POST", "/v2/models/slower/infer", slower, close=False))
        assert read_reply(s).status == 200
        run_seconds = min(run_seconds, time.monotonic() - started)
        keepalive.append(s)
    keepalive.pop().close()
    # enough accepted requests that they are still running when the signal comes, BACKLOG_WINDOW + 0.5 s on
    new_connections = min(16, max(2, int(4 * (BACKLOG_WINDOW + 0.5) / run_seconds)))
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)  # stays idle across the signal
    idle.sendall(request_bytes("GET", "/v2/health/live", close=False))
    assert read_reply(idle).status == 200

    def accepted_on_new_connection() -> None:
        a = attempt(port, request_bytes("POST", "/v2/models/slower/infer", slower), "accepted")
        with lock:
            accepted.append(a)

    def accepted_on_keepalive(sock: socket.socket) -> None:
        a = Attempt("accepted-keepalive", time.monotonic(), time.monotonic())
        a.outcome, a.body = exchange(sock, request_bytes("POST", "/v2/models/slower/infer", slower, close=False))
        a.t_end = time.monotonic()
        with lock:
            accepted.append(a)

    def racer(data: bytes, kind: str, pause: float) -> None:
        deadline = time.monotonic() + 60
        while not stop_racers.is_set() and time.monotonic() < deadline:
            a = attempt(port, data, kind)
            with lock:
                attempts.append(a)
            if a.outcome == "refused":
                return
            time.sleep(pause)

    accepted_threads = [threading.Thread(target=accepted_on_new_connection) for _ in range(new_connections)]
    accepted_threads += [threading.Thread(target=accepted_on_keepalive, args=(s,)) for s in keepalive]
    for t in accepted_threads:
        t.start()
    total = new_connections + len(keepalive)
    wait_until(lambda: metric(srv, "bnfold_requests_in_flight") >= total, 30, 0.01, "accepted requests in flight")
    racers = [threading.Thread(target=racer, args=(SLOW_REQUEST, "racing-infer", 0.0)) for _ in range(3)]
    racers += [threading.Thread(target=racer, args=(LIVE_REQUEST, "racing-live", 0.005)) for _ in range(2)]
    for t in racers:
        t.start()
    time.sleep(BACKLOG_WINDOW + 0.5)  # load on; the accepted requests still queued or computing
    in_flight_at_signal = metric(srv, "bnfold_requests_in_flight")
    t_signal = time.monotonic()
    os.kill(srv.proc.pid, signal.SIGTERM)

    idle.settimeout(30)
    try:
        idle_outcome = "closed" if idle.recv(1) == b"" else "data"
    except TimeoutError:
        idle_outcome = "still open after 30 s"
    except ConnectionError:
        idle_outcome = "closed"
    finally:
        idle.close()
    for t in accepted_threads:
        t.join(90)
    code = srv.proc.wait(90)
    stop_racers.set()
    for t in racers:
        t.join(60)
    assert not any(t.is_alive() for t in accepted_threads + racers), "a client hung"

    log = srv.output()
    assert code == 0, log[-3000:]
    assert "readiness off" in log and "Traceback" not in log, log[-3000:]
    assert idle_outcome == "closed", idle_outcome  # the server closes idle keep-alive connections

    # accepted before the signal, still in flight at it: all complete, all 200, full bodies
    assert in_flight_at_signal >= 1
    assert len(accepted) == total
    assert [a.outcome for a in accepted] == ["200"] * total, [(a.kind, a.outcome) for a in accepted]
    ends = [round(a.t_end - t_signal, 3) for a in accepted]
    assert max(ends) > 0, f"every accepted request was done before the signal: {ends}, one run {run_seconds:.3f} s"
    for a in accepted:
        assert json.loads(a.body)["outputs"][0]["name"] == "y"

    # racing: classify each precisely
    problems = []
    for a in attempts:
        since = a.t_connect - t_signal
        if a.outcome == "200":
            continue
        if a.outcome == "refused" and since >= 0:
            continue  # a new connection after the signal
        if a.outcome == "dropped" and a.t_connected is not None and a.t_connected - t_signal > -BACKLOG_WINDOW:
            continue  # in the accept backlog when the listener closed: never accepted by the server
        problems.append(f"{a.kind}: {a.outcome} (connect {since:+.3f} s from the signal)")
    assert not problems, problems
    early = [a for a in attempts if a.t_connected is not None and a.t_connected < t_signal - BACKLOG_WINDOW]
    assert early, "no racing request was accepted well before the signal"
    assert any(a.outcome == "refused" for a in attempts), "no attempt after the signal was refused"
