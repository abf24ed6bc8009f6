"""Hostile connections on 127.0.0.1, for the connection tests and benchmarks/connections.py: idle sockets and
slowloris trickles, on the REST and the gRPC port, each opened once and watched until the server closes it.

Kinds: ``rest-idle`` and ``grpc-idle`` send nothing; ``rest-slowloris`` sends a request head one byte per round and
never finishes it; ``grpc-slowloris`` sends the HTTP/2 preface and SETTINGS one byte per round, then a HEADERS
frame that never completes. A round is every ``round_seconds`` (load shaping, not synchronisation: nothing waits on
it). Each socket records when it connected and when the server closed it (EOF or reset).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import resource
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from service.grpc.protos import grpc_predict_v2_pb2 as pb

KINDS = ("rest-idle", "rest-slowloris", "grpc-idle", "grpc-slowloris")
REST_HEAD = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"x-slow: " + b"a" * 4000
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# HEADERS on stream 1 announcing 16 KiB (END_HEADERS), of which only a trickle ever comes
GRPC_HEAD = H2_PREFACE + b"\x00\x40\x00\x01\x04\x00\x00\x00\x01" + b"\x00" * 16384


def raise_own_file_limit(needed: int) -> bool:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` files if the hard limit allows; False if not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return True


def limited_serve(file_limit: int) -> list[str]:
    """The ``bnfold serve`` command with RLIMIT_NOFILE set to ``file_limit`` first (as ``ulimit -n`` would)."""
    return [
        sys.executable,
        "-c",
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({file_limit}, {file_limit})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'service', 'serve', *sys.argv[1:]])",
    ]


#: A client that retries a refused connection every 50-100 ms within its deadline (grpcio's default waits 1 s)
PROBE_CHANNEL = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def server_live(grpc_port: int, timeout: float = 1.0) -> bool:
    """gRPC ``ServerLive`` on a new channel: True when answered live within ``timeout`` (else False)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=PROBE_CHANNEL) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        try:
            return bool(call(pb.ServerLiveRequest(), timeout=timeout, wait_for_ready=True).live)
        except grpc.RpcError:
            return False


def connection_metrics(port: int) -> dict[str, float]:
    """The server's bnfold_connections_* samples from ``/metrics``, keyed by their text before the value."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    rows = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("bnfold_connections"))
    return {key: float(value) for key, value in rows}


@dataclass
class Hostile:
    kind: str
    sock: socket.socket
    payload: bytes
    connected_at: float | None = None
    closed_at: float | None = None
    sent: int = 0

    @property
    def open_seconds(self) -> float | None:
        if self.connected_at is None or self.closed_at is None:
            return None
        return self.closed_at - self.connected_at


@dataclass
class Attack:
    """``per_kind`` connections of each kind in ``kinds`` against ``rest_port`` / ``grpc_port``."""

    rest_port: int
    grpc_port: int
    per_kind: int
    kinds: tuple[str, ...] = KINDS
    round_seconds: float = 0.1
    conns: list[Hostile] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)  # connect() failures by errno name
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Attack:
        if not raise_own_file_limit(self.per_kind * len(self.kinds) + 256):
            raise RuntimeError(f"the file limit of this process cannot hold {self.per_kind * len(self.kinds)} sockets")
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for c in self.conns:
            c.sock.close()

    def __enter__(self) -> Attack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what the test reads
    def connected(self) -> int:
        return sum(c.connected_at is not None for c in list(self.conns))

    def still_open(self) -> int:
        return sum(c.connected_at is not None and c.closed_at is None for c in list(self.conns))

    def launched(self) -> bool:
        """Every connection was attempted and has connected or failed."""
        conns = list(self.conns)
        return len(conns) == self.per_kind * len(self.kinds) and all(
            c.connected_at is not None or c.closed_at is not None for c in conns
        )

    def longest_open(self, kind: str) -> float:
        """Seconds the longest-lived closed connection of ``kind`` stayed open."""
        times = [c.open_seconds for c in list(self.conns) if c.kind == kind and c.open_seconds is not None]
        return max(times, default=0.0)

    # ------------------------------------------------------------------ the attacker's thread
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for kind in self.kinds:
            port = self.rest_port if kind.startswith("rest") else self.grpc_port
            payload = b"" if kind.endswith("idle") else (REST_HEAD if kind.startswith("rest") else GRPC_HEAD)
            for _ in range(self.per_kind):
                if self._stop.is_set():
                    return
                sock = socket.socket()
                sock.setblocking(False)
                c = Hostile(kind, sock, payload)
                code = sock.connect_ex(("127.0.0.1", port))
                if code == 0:
                    c.connected_at = time.monotonic()
                    sel.register(sock, selectors.EVENT_READ, c)
                elif code == errno.EINPROGRESS:
                    sel.register(sock, selectors.EVENT_WRITE, c)
                else:
                    self.failed[errno.errorcode.get(code, str(code))] += 1
                    c.closed_at = time.monotonic()
                self.conns.append(c)
                self._poll(sel, 0)
        while not self._stop.is_set() and self.still_open() + self._connecting() > 0:
            self._trickle(sel)
            deadline = time.monotonic() + self.round_seconds
            while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                self._poll(sel, left)
        sel.close()

    def _connecting(self) -> int:
        return sum(c.connected_at is None and c.closed_at is None for c in self.conns)

    def _poll(self, sel: selectors.BaseSelector, timeout: float) -> None:
        if not sel.get_map():
            self._stop.wait(timeout)
            return
        for key, _ in sel.select(timeout):
            c: Hostile = key.data
            if c.connected_at is None:  # connect() finished
                code = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                sel.unregister(c.sock)
                if code:
                    self.failed[errno.errorcode.get(code, str(code))] += 1
                    c.closed_at = time.monotonic()
                else:
                    c.connected_at = time.monotonic()
                    sel.register(c.sock, selectors.EVENT_READ, c)
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                c.closed_at = time.monotonic()
                sel.unregister(c.sock)
                c.sock.close()

    def _trickle(self, sel: selectors.BaseSelector) -> None:
        for c in self.conns:
            if c.payload and c.connected_at is not None and c.closed_at is None and c.sent < len(c.payload):
                with contextlib.suppress(OSError):
                    c.sent += c.sock.send(c.payload[c.sent : c.sent + 1])
