"""SIGTERM under load: every request the server had started completes with its full 200; exit code 0.

In flight for certain, not by timing. Each *held* request sends its head and half its body and then waits: the
server has admitted it (the ``bnfold_requests_in_flight`` gauge counts it) and cannot answer it before the rest
arrives. The test sends SIGTERM only once the gauge counts every held request, and sends the rest of the bodies
only once the server shows it is shutting down: "readiness off" in its log, its idle keep-alive connection
closed, its listener closed (a new connection is refused). So every held request is in flight across the
signal, and all of their computations run during the drain, queued behind one another (one compute thread).
Fully sent slow requests (queued before the signal) must complete too, whenever they finish.

Racing clients keep connecting and sending requests around the signal. What each may see:

- 200;
- refused, only when its connection was attempted after the signal was sent (the listener is closed);
- dropped: closed before a single response byte. uvicorn closes, on shutdown, the connections on which no request
  has started, and the kernel resets those still in its accept backlog when the listener closes: the server never
  started that request, so a client may retry it.

Anything else — a 5xx, a partial answer, a hang (30 s socket timeouts), a held or queued request not answered
200 — fails. (With the drain broken, e.g. ``BNFOLD_GRACEFUL_SHUTDOWN_SECONDS=0``, the held requests are cut.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.reliability import SLOW, metric, read_reply, refused, request_bytes, wait_until
from tests.support.servers import Server, save, slow_model, start

pytestmark = pytest.mark.slow  # a subprocess server and a signal

SLOW_BODY = json.dumps(SLOW).encode()
SLOW_REQUEST = request_bytes("POST", "/v2/models/slow/infer", SLOW_BODY)
LIVE_REQUEST = request_bytes("GET", "/v2/health/live")
HELD_NEW, HELD_KEEPALIVE, QUEUED = 4, 2, 4


@dataclass
class Attempt:
    kind: str
    before_signal: bool  # connect() was called before the test sent SIGTERM
    outcome: str = ""  # "200", "503", ..., "refused", "dropped", "partial", "timeout", "error:<type>"
    body: bytes = b""


def exchange(sock: socket.socket, data: bytes) -> tuple[str, bytes]:
    """Send ``data`` (the request, or the rest of it) and read the answer; classify how it ended."""
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


def hold(sock: socket.socket, path: str, body: bytes, keep_alive: bool) -> bytes:
    """Send the head and half the body of a request on ``sock``; return the rest, to send later."""
    data = request_bytes("POST", path, body, close=not keep_alive)
    cut = len(data) - len(body) // 2
    sock.sendall(data[:cut])
    return data[cut:]


def test_sigterm_completes_every_request_in_flight(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    save(slow_model(384, 24), repo, "slow", config='{"max_batch_size": 0}')
    srv = start(
        tmp_path,
        "--model-repository",
        str(repo),
        env={"BNFOLD_MAX_CONCURRENCY": "1", "BNFOLD_MAX_QUEUE": "64", "BNFOLD_GRACEFUL_SHUTDOWN_SECONDS": "60"},
    )
    port = srv.port
    signal_sent = threading.Event()
    stop_racers = threading.Event()
    lock = threading.Lock()
    racing: list[Attempt] = []

    # keep-alive connections that have served a request already, and one that stays idle across the signal
    keepalive = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(HELD_KEEPALIVE + 1)]
    for s in keepalive:
        s.sendall(request_bytes("POST", "/v2/models/slow/infer", SLOW_BODY, close=False))
        assert read_reply(s).status == 200
    idle = keepalive.pop()

    # held: in flight (admitted, body half sent) until the test sends the rest
    held: list[tuple[str, socket.socket, bytes]] = []
    for _ in range(HELD_NEW):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.append(("held-new", s, hold(s, "/v2/models/slow/infer", SLOW_BODY, keep_alive=False)))
    for s in keepalive:
        held.append(("held-keepalive", s, hold(s, "/v2/models/slow/infer", SLOW_BODY, keep_alive=True)))
    wait_until(lambda: metric(srv, "bnfold_requests_in_flight") >= len(held), 30, 0.02, "held requests admitted")

    # queued: sent whole before the signal; they must complete whether they finish before it or during the drain
    queued: list[Attempt] = []

    def send_queued() -> None:
        a = Attempt("queued", True)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            a.outcome, a.body = exchange(s, SLOW_REQUEST)
        with lock:
            queued.append(a)

    def racer(data: bytes, kind: str) -> None:
        while not stop_racers.is_set():
            a = Attempt(kind, not signal_sent.is_set())
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            except ConnectionRefusedError:
                a.outcome = "refused"
            except OSError as exc:
                a.outcome = f"error:{type(exc).__name__}"
            else:
                with sock:
                    a.outcome, a.body = exchange(sock, data)
            with lock:
                racing.append(a)
            if a.outcome == "refused":
                return

    threads = [threading.Thread(target=send_queued) for _ in range(QUEUED)]
    for t in threads:
        t.start()
    # each queued request admitted (the gauge counts it) or answered already; no racer has started yet
    wait_until(
        lambda: metric(srv, "bnfold_requests_in_flight") + len(queued) >= len(held) + QUEUED,
        30,
        0.02,
        "queued requests admitted",
    )
    racers = [threading.Thread(target=racer, args=(SLOW_REQUEST, "racing-infer")) for _ in range(2)]
    racers += [threading.Thread(target=racer, args=(LIVE_REQUEST, "racing-live")) for _ in range(2)]
    for t in racers:
        t.start()
    threads += racers
    wait_until(lambda: any(a.outcome == "200" for a in list(racing)), 60, 0.02, "racing clients served")
    assert metric(srv, "bnfold_requests_in_flight") >= len(held)  # nothing can have answered a held request

    signal_sent.set()  # before the signal: an attempt marked after it may be refused
    os.kill(srv.proc.pid, signal.SIGTERM)
    shutting_down(srv, idle)

    answers = []
    for kind, s, rest in held:  # the rest of each body, after the listener closed
        with s:
            answers.append((kind, *exchange(s, rest)))
    code = srv.proc.wait(90)
    stop_racers.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"

    log = srv.output()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert [(kind, outcome) for kind, outcome, _ in answers] == [(kind, "200") for kind, _, _ in held], answers
    assert [a.outcome for a in queued] == ["200"] * QUEUED
    for _, _, body in answers:
        assert json.loads(body)["outputs"][0]["name"] == "y"

    problems = [
        f"{a.kind}: {a.outcome} ({'before' if a.before_signal else 'after'} the signal)"
        for a in racing
        if not (a.outcome in ("200", "dropped") or (a.outcome == "refused" and not a.before_signal))
    ]
    assert not problems, problems
    assert any(a.outcome == "refused" for a in racing), "no attempt after the signal was refused"


def shutting_down(srv: Server, idle: socket.socket) -> None:
    """Wait for what the server shows of its shutdown: the signal logged, idle connections closed, the listener
    closed (ECONNREFUSED). Raises if any of it does not come."""
    wait_until(lambda: "readiness off" in srv.output(), 30, 0.02, "the signal in the server log")
    idle.settimeout(30)
    try:
        closed = idle.recv(1) == b""
    except ConnectionError:
        closed = True
    finally:
        idle.close()
    assert closed, "the server sent data on an idle keep-alive connection"
    wait_until(lambda: refused(srv.port), 30, 0.02, "the listener closed")
