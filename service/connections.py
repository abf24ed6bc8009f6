"""The connection guard: how long a connection may take to send a request head or sit idle, how many may be open,
and what happens over the cap, for both transports.

Neither uvicorn nor grpcio limits what a client may hold open. uvicorn arms its keep-alive timer only after a
response: a connection that sends nothing, or trickles a request head one byte at a time (slowloris), stays open
forever, and ``limit_concurrency`` answers 503 only once a complete head has arrived. A process whose open files
reach ``RLIMIT_NOFILE`` then accepts nothing on either port, health probes included.

:class:`ConnectionGuard` keeps one transport's connections on an asyncio server; :class:`Connections` holds the
server's guards, sweeps them (one timer, none per request), writes the summary line and the metrics.

REST (uvicorn, httptools or h11): :func:`protocol` names uvicorn's protocol class with the guard mixed in
(uvicorn's ``http=`` takes a class or a dotted name):

- *header timeout*: a connection that has not sent a complete request head ``header_timeout`` seconds after it
  opened, or after its last answer, is closed;
- *idle timeout*: uvicorn's keep-alive timeout (``timeout_keep_alive``), counted here;
- *cap*: at most ``cap`` open connections. A new one over the cap takes the place of the connection that has waited
  longest for a request head (idle keep-alive or slowloris): a probe or a real client sends its head at once and is
  answered, an attacker's connections replace each other. When every open connection is busy with a request, the
  new one gets a 503 with ``Connection: close`` at once;
- *drain*: on shutdown a connection between requests stays open until its idle or header timeout; a request written
  on it meanwhile is answered, with ``Connection: close`` (uvicorn closes it at once, and a request already on its
  way meets a connection reset).

gRPC served by an asyncio server of our own takes a :class:`ConnectionGuard` as uvicorn's protocols do (see its
docstring: four calls). gRPC served by grpcio: :func:`grpc_options` sets the same limits as channel arguments: the
HTTP/2 handshake must complete within the header timeout (``grpc.server_handshake_timeout_ms``), a connection
with no call for the idle timeout gets GOAWAY (``grpc.max_connection_idle_ms``; grpcio counts a connection that
never completed a call as idle too), and ``grpc.max_allowed_incoming_connections`` closes connections over the cap
as they are accepted. grpcio offers no
hook to replace a waiting connection, so the guard keeps room under its cap at the socket level: it shuts down the
quietest connections on the gRPC port that never sent a call (:func:`close_callless`, from /proc and ``TCP_INFO``);
grpcio's open connections are counted from the process's sockets (:func:`sockets_on_port`) when metrics are read.

The cap (``BNFOLD_MAX_CONNECTIONS``, per transport) defaults to what the file limit leaves: ``RLIMIT_NOFILE`` minus
the files open once the models are loaded, minus :data:`RESERVE` for model loads, logs and the health path, shared
between the transports, at most :data:`AUTO_MAX`. Closes are logged as one summary line (at most one per
:data:`REPORT_EVERY_SECONDS`), never one per connection; the figures are in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools wheel: uvicorn's `auto` is h11 too
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "ConnectionGuard",
    "Connections",
    "GuardedProtocol",
    "connection_cap",
    "grpc_options",
    "protocol",
    "sockets_on_port",
]

log = logging.getLogger("bnfold.service")

#: Files kept free of connections: model loads, log files, the repository scan, a health probe's connection.
RESERVE = 64
#: The largest automatic cap per transport (each open connection costs memory too).
AUTO_MAX = 10_000
#: The guard looks at waiting connections this often (or a quarter of the header timeout when shorter), and at
#: gRPC's while they press on its cap, every PRESSED_SWEEP_SECONDS.
SWEEP_SECONDS = 0.25
PRESSED_SWEEP_SECONDS = 0.1
#: Summary lines of closed connections come at most this often.
REPORT_EVERY_SECONDS = 60.0
#: Reasons a connection is closed by the guard (``reason`` label of ``bnfold_connections_closed_total``).
REASONS = ("header_timeout", "idle_timeout", "evicted", "refused")

_REFUSAL_BODY = b'{"error":"too many open connections; try again later"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def file_limit() -> int:
    """This process's soft ``RLIMIT_NOFILE`` (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def open_files() -> int:
    """Files this process has open now (RESERVE when /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return RESERVE


def connection_cap(setting: int, transports: int, limit: int | None = None, in_use: int | None = None) -> int:
    """Open connections allowed per transport: ``setting`` when not 0, else the file limit's room shared between
    ``transports`` (at least 1, at most AUTO_MAX)."""
    if setting:
        return setting
    limit = file_limit() if limit is None else limit
    in_use = open_files() if in_use is None else in_use
    room = (limit - in_use - RESERVE) // max(1, transports)
    return max(1, min(AUTO_MAX, room))


def grpc_options(header_timeout: float, idle_timeout: float, cap: int) -> list[tuple[str, int]]:
    """grpcio server options that bound the handshake, idle connections and their number (see module doc)."""
    return [
        ("grpc.server_handshake_timeout_ms", max(1, round(header_timeout * 1000))),
        ("grpc.max_connection_idle_ms", max(1, round(idle_timeout * 1000))),
        ("grpc.max_allowed_incoming_connections", cap),
    ]


#: struct tcp_info (linux/tcp.h): offsets of tcpi_last_data_recv (u32, ms) and tcpi_bytes_received (u64, Linux 4.1+)
_LAST_DATA_RECV, _BYTES_RECEIVED, _TCP_INFO_SIZE = 52, 128, 136
#: A gRPC connection that has received fewer bytes has never sent a call (preface, SETTINGS and one call's
#: HEADERS are more): the only kind the gRPC guard closes.
GRPC_CALL_BYTES = 120


@dataclass
class PortSocket:
    """A connected TCP socket of this process, as seen when listed."""

    fd: int
    peer: Any  # its remote address, to recognise it again
    quiet_ms: int  # since data last arrived on it (since it opened when nothing ever arrived)
    received: int  # bytes received in all


def _duplicate(fd: int, port: int) -> socket.socket | None:
    """A duplicate of descriptor ``fd`` when it is a connected TCP socket on local ``port`` (one descriptor, which the
    caller closes), else None."""
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            return None
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port:
            sock.getpeername()  # OSError (ENOTCONN) for the listener
            return sock
    except (OSError, IndexError, TypeError):
        pass
    sock.close()
    return None


def sockets_on_port(port: int) -> list[PortSocket]:
    """This process's connected TCP sockets whose local port is ``port`` (the listener excluded); empty where
    /proc/self/fd cannot be read. Holds one extra descriptor at a time."""
    found: list[PortSocket] = []
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    for fd in fds:
        sock = _duplicate(fd, port)
        if sock is None:
            continue
        with sock:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
                peer = sock.getpeername()
            except OSError:
                continue
        (quiet,) = struct.unpack_from("I", info, _LAST_DATA_RECV)
        (received,) = struct.unpack_from("Q", info, _BYTES_RECEIVED) if len(info) >= _TCP_INFO_SIZE else (0,)
        found.append(PortSocket(fd, peer, quiet, received))
    return found


def close_callless(port: int, keep: int) -> int:
    """Shut down the quietest connections on ``port`` that never sent a call, until at most ``keep`` remain;
    the number shut down. (The owner of the descriptor, grpcio, sees the connection end and closes it.)"""
    found = sockets_on_port(port)
    victims = sorted((s for s in found if s.received < GRPC_CALL_BYTES), key=lambda s: -s.quiet_ms)
    closed = 0
    for victim in victims[: len(found) - keep]:
        sock = _duplicate(victim.fd, port)
        if sock is None:
            continue
        with sock:
            try:
                if sock.getpeername() == victim.peer:  # still the same connection
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
            except OSError:
                pass
    return closed


class ConnectionGuard:
    """One transport's connections on an asyncio server: the cap, the header and idle deadlines, counts by reason.

    A connection object has a ``transport`` and a ``guard_busy()`` method (a request is in progress: its head has
    arrived and its answer is not complete). Its server calls, on the event loop: :meth:`admit` when it opens (close
    it when False: over the cap with every connection busy), :meth:`waiting` when it answered its last request,
    :meth:`forget` when it closed. uvicorn's protocols do so through :class:`GuardedProtocol`; an HTTP/2 server of
    our own would call ``waiting(conn, idle=True)`` when its last stream ends. :class:`Connections` sweeps.
    """

    def __init__(self, transport: str, header_timeout: float, idle_timeout: float, cap: int = AUTO_MAX) -> None:
        self.transport = transport
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.cap = cap
        self.open = 0
        self.closed: Counter[str] = Counter()
        # connections between requests, by deadline kind, oldest first: {connection: since}. Busy ones are dropped
        # lazily, when a sweep or an eviction meets them.
        self._heads: dict[Any, float] = {}  # waiting for a request head: header_timeout
        self._idle: dict[Any, float] = {}  # idle between requests: idle_timeout (uvicorn keeps its own timer too)

    def admit(self, conn: Any) -> bool:
        """Count a new connection; over the cap, close the one waiting longest (idle ones first) to make room, or
        refuse this one (False) when every open connection is busy."""
        if self.open >= self.cap and not self._evict():
            self.closed["refused"] += 1
            return False
        self.open += 1
        conn._guard_counted = True
        self.waiting(conn)
        return True

    def waiting(self, conn: Any, idle: bool = False) -> None:
        """``conn`` now waits for a request head: it opened, or answered its last request (``idle``: close it at the
        idle timeout rather than the header timeout)."""
        self._heads.pop(conn, None)
        self._idle.pop(conn, None)
        (self._idle if idle else self._heads)[conn] = time.monotonic()

    def forget(self, conn: Any) -> None:
        """``conn`` closed (idempotent)."""
        self._heads.pop(conn, None)
        self._idle.pop(conn, None)
        if getattr(conn, "_guard_counted", False):
            conn._guard_counted = False
            self.open -= 1

    def sweep(self, now: float) -> None:
        """Close the connections whose header or idle deadline has passed."""
        for waiting, timeout, reason in (
            (self._heads, self.header_timeout, "header_timeout"),
            (self._idle, self.idle_timeout, "idle_timeout"),
        ):
            expired = now - timeout
            for conn, since in list(waiting.items()):
                if since > expired:
                    break
                if conn.guard_busy():
                    del waiting[conn]
                elif conn.transport.is_closing():
                    self.forget(conn)
                else:
                    self._close(conn, reason)

    def _evict(self) -> bool:
        for waiting in (self._idle, self._heads):
            for conn in list(waiting):
                if conn.guard_busy():
                    del waiting[conn]
                    continue
                if conn.transport.is_closing():  # closing already: its place is free
                    self.forget(conn)
                else:
                    self._close(conn, "evicted")
                return True
        return False

    def _close(self, conn: Any, reason: str) -> None:
        self.closed[reason] += 1
        self.forget(conn)
        conn.transport.close()

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of this transport's connection metrics (see :mod:`service.metrics`)."""
        yield "bnfold_connections_open", {"transport": self.transport}, float(self.open)
        yield "bnfold_connections_max", {"transport": self.transport}, float(self.cap)
        for reason in REASONS:
            labels = {"transport": self.transport, "reason": reason}
            yield "bnfold_connections_closed_total", labels, float(self.closed[reason])


class Connections:
    """The server's connection limits: the REST guard (uvicorn), gRPC's (grpcio options and the socket-level guard),
    the sweep timer, the summary line and the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.header_timeout = settings.header_timeout_seconds
        self.idle_timeout = settings.idle_timeout_seconds
        self.setting = settings.max_connections
        self.rest = ConnectionGuard(
            "rest", self.header_timeout, self.idle_timeout, settings.max_connections or AUTO_MAX
        )
        self.grpc_port = 0
        self.grpc_cap = 0
        self.grpc_evicted = 0
        self._files_at_start = 0
        self._pressed = False  # gRPC's connections near its cap at the last sweep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reported: Counter[str] = Counter()
        self._reported_grpc = 0
        self._reported_at: float | None = None

    # ------------------------------------------------------------------ life cycle (the server's event loop)
    def start(self, grpc_port: int = 0) -> None:
        """Fix the caps from the file limit now (models loaded) and start sweeping on the running loop."""
        self._files_at_start = open_files()
        cap = connection_cap(self.setting, 2 if grpc_port else 1, in_use=self._files_at_start)
        self.rest.cap = cap
        self.grpc_port, self.grpc_cap = grpc_port, (cap if grpc_port else 0)
        self._loop = asyncio.get_running_loop()
        self._arm()
        log.info(
            "connections: at most %d per transport (file limit %d), request head within %g s, idle %g s",
            cap,
            file_limit(),
            self.header_timeout,
            self.idle_timeout,
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpcio server options of these limits (after :meth:`start`)."""
        return grpc_options(self.header_timeout, self.idle_timeout, self.grpc_cap)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._report(force=True)

    def _arm(self) -> None:
        assert self._loop is not None
        every = PRESSED_SWEEP_SECONDS if self._pressed else SWEEP_SECONDS
        self._timer = self._loop.call_later(min(every, self.header_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        self.rest.sweep(time.monotonic())
        if self.grpc_port:
            self._sweep_grpc()
        self._report()
        self._arm()

    def grpc_room(self) -> int:
        """gRPC connections kept free for new clients (health probes): grpcio refuses over its cap."""
        return max(1, min(64, self.grpc_cap // 8))

    def _sweep_grpc(self) -> None:
        # cheap test first: the files open beyond the REST connections and those open at start
        keep = self.grpc_cap - self.grpc_room()
        self._pressed = open_files() - self.rest.open - self._files_at_start >= keep
        if self._pressed:
            self.grpc_evicted += close_callless(self.grpc_port, keep)

    # ------------------------------------------------------------------ the summary line
    def _report(self, force: bool = False) -> None:
        closed = self.rest.closed
        hostile = ("header_timeout", "evicted", "refused")
        new = {r: closed[r] - self._reported[r] for r in REASONS}
        grpc_new = self.grpc_evicted - self._reported_grpc
        if not any(new[r] for r in hostile) and not grpc_new:
            return
        now = time.monotonic()
        if not force and self._reported_at is not None and now - self._reported_at < REPORT_EVERY_SECONDS:
            return
        grpc = f"; gRPC: {grpc_new} that sent no call, to keep room under the cap of {self.grpc_cap}"
        log.warning(
            "connections closed: REST: %d without a request head in %g s, %d idle for %g s, %d to make room at the "
            "cap of %d, %d refused with 503 (all busy), %d open%s (further closes summed up every %g s)",
            new["header_timeout"],
            self.header_timeout,
            new["idle_timeout"],
            self.idle_timeout,
            new["evicted"],
            self.rest.cap,
            new["refused"],
            self.rest.open,
            grpc if self.grpc_port else "",
            REPORT_EVERY_SECONDS,
        )
        self._reported = Counter(closed)
        self._reported_grpc = self.grpc_evicted
        self._reported_at = now

    # ------------------------------------------------------------------ metrics
    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of the connection metrics (see :mod:`service.metrics`)."""
        yield from self.rest.samples()
        if self.grpc_port:
            yield "bnfold_connections_open", {"transport": "grpc"}, float(len(sockets_on_port(self.grpc_port)))
            yield "bnfold_connections_max", {"transport": "grpc"}, float(self.grpc_cap)
            labels = {"transport": "grpc", "reason": "evicted"}
            yield "bnfold_connections_closed_total", labels, float(self.grpc_evicted)


def guard_of(app: Any) -> ConnectionGuard | None:
    """The guard of the ASGI app uvicorn serves (its ``connection_guard``, looked for through ``.app`` wrappers)."""
    for _ in range(4):
        guard = getattr(app, "connection_guard", None)
        if guard is not None:
            return guard  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


class GuardedProtocol:
    """Mixed into uvicorn's HttpToolsProtocol or H11Protocol (see :func:`protocol`)."""

    _guard: ConnectionGuard | None = None
    _draining = False
    # provided by the uvicorn protocol
    app: Any
    cycle: Any
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        guard = self._guard = guard_of(self.app)
        if guard is not None and not guard.admit(self):
            self.transport.write(REFUSAL)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.forget(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._guard is not None and not self.transport.is_closing():
            self._guard.waiting(self)

    def timeout_keep_alive_handler(self) -> None:
        if self._guard is not None and not self.transport.is_closing():
            self._guard.closed["idle_timeout"] += 1
        super().timeout_keep_alive_handler()  # type: ignore[misc]

    def guard_busy(self) -> bool:
        """A request head has arrived and its answer is not complete."""
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def shutdown(self) -> None:
        """uvicorn's shutdown closes a connection between requests at once; here it stays open until its
        timeout and answers what arrives meanwhile with ``Connection: close``."""
        if self._guard is None or self.guard_busy():
            super().shutdown()  # type: ignore[misc]
            return
        self._draining = True

    def _close_after_answer(self) -> None:
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False


class GuardedH11Protocol(GuardedProtocol, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self._draining and self.cycle is not None and self.cycle.keep_alive:
            self.cycle.keep_alive = False
            # uvicorn's h11 cycle writes `Connection: close` only when the request asked for it
            self.cycle.scope["headers"].append((b"connection", b"close"))


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(GuardedProtocol, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._close_after_answer()


def protocol() -> str:
    """uvicorn's ``http=`` with the guard: httptools when installed (as uvicorn's ``auto``), else h11. A dotted name,
    so that ``--workers`` processes import it."""
    name = "GuardedH11Protocol" if HttpToolsProtocol is None else "GuardedHttpToolsProtocol"
    return f"{__name__}:{name}"
