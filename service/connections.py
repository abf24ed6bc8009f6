"""The connection guard: how long a connection may take to send a request head or sit idle, how many may be open,
and what happens over the cap, for both transports.

Neither uvicorn nor a bare asyncio server limits what a client may hold open. uvicorn arms its keep-alive timer only
after a response: a connection that sends nothing, or trickles a request head one byte at a time (slowloris), stays
open forever, and ``limit_concurrency`` answers 503 only once a complete head has arrived. A process whose open
files reach ``RLIMIT_NOFILE`` then accepts nothing on either port, health probes included.

:class:`ConnectionGuard` keeps one transport's connections on an asyncio server; :class:`Connections` holds the
server's two guards (REST, gRPC), sweeps them (one timer, none per request), writes the summary line and the
metrics. Per transport:

- *header timeout*: a connection that has not sent a complete request head ``header_timeout`` seconds after it
  opened, or after its last answer, is closed. For gRPC's HTTP/2 the request head is the connection preface and
  the first HEADERS;
- *idle timeout*: a connection with no request in progress for ``idle_timeout`` seconds is closed. REST: uvicorn's
  keep-alive timeout (``timeout_keep_alive``), counted here; gRPC: no open stream, then GOAWAY and close;
- *cap*: at most ``cap`` open connections. A new one over the cap takes the place of the connection that has waited
  longest for a request (idle ones first, then those still sending a head): a probe or a real client sends its
  request at once and is answered, an attacker's connections replace each other. When every open connection is
  busy with a request, the new one is refused at once: REST answers 503 with ``Connection: close``, gRPC sends
  GOAWAY with ENHANCE_YOUR_CALM and closes;
- *drain*: on shutdown a REST connection between requests stays open until its idle or header timeout; a request
  written on it meanwhile is answered, with ``Connection: close`` (uvicorn closes it at once, and a request already
  on its way meets a connection reset). gRPC sends GOAWAY on every connection: calls in flight finish, new streams
  are refused (REFUSED_STREAM), and clients send them elsewhere.

REST (uvicorn, httptools or h11): :func:`protocol` names uvicorn's protocol class with the guard mixed in
(uvicorn's ``http=`` takes a class or a dotted name). gRPC (:mod:`service.grpc.http2`): each connection calls the
guard itself (see :class:`ConnectionGuard`).

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
import time
from collections import Counter
from collections.abc import Iterator
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
    "protocol",
]

log = logging.getLogger("bnfold.service")

#: Files kept free of connections: model loads, log files, the repository scan, a health probe's connection.
RESERVE = 64
#: The largest automatic cap per transport (each open connection costs memory too).
AUTO_MAX = 10_000
#: The guard looks at waiting connections this often (or a quarter of the header timeout when shorter).
SWEEP_SECONDS = 0.25
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


class ConnectionGuard:
    """One transport's connections on an asyncio server: the cap, the header and idle deadlines, counts by reason.

    A connection object has a ``transport`` and a ``guard_busy()`` method (a request is in progress: its head has
    arrived and its answer is not complete), and may have a ``guard_close()`` method (how the guard closes it, e.g.
    GOAWAY first; else ``transport.close()``). Its server calls, on the event loop: :meth:`admit` when it opens
    (refuse and close it when False: over the cap with every connection busy), :meth:`waiting` when it answered its
    last request, :meth:`forget` when it closed. uvicorn's protocols do so through :class:`GuardedProtocol`, the
    gRPC server's HTTP/2 connections call ``waiting(conn, idle=True)`` when their last stream ends.
    :class:`Connections` sweeps.
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
        close = getattr(conn, "guard_close", None)
        if close is not None:
            close()
        else:
            conn.transport.close()

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of this transport's connection metrics (see :mod:`service.metrics`)."""
        yield "bnfold_connections_open", {"transport": self.transport}, float(self.open)
        yield "bnfold_connections_max", {"transport": self.transport}, float(self.cap)
        for reason in REASONS:
            labels = {"transport": self.transport, "reason": reason}
            yield "bnfold_connections_closed_total", labels, float(self.closed[reason])


#: How the summary line names a transport and its refusal.
_SHOWN = {"rest": ("REST", "503"), "grpc": ("gRPC", "GOAWAY")}


class Connections:
    """The server's connection limits: the REST guard (uvicorn's protocols find it on the app), the gRPC guard
    (given to the gRPC server), the sweep timer, the summary line and the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.header_timeout = settings.header_timeout_seconds
        self.idle_timeout = settings.idle_timeout_seconds
        self.setting = settings.max_connections
        cap = settings.max_connections or AUTO_MAX
        self.rest = ConnectionGuard("rest", self.header_timeout, self.idle_timeout, cap)
        self.grpc = ConnectionGuard("grpc", self.header_timeout, self.idle_timeout, cap)
        self.guards = [self.rest]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reported: dict[str, Counter[str]] = {"rest": Counter(), "grpc": Counter()}
        self._reported_at: float | None = None

    # ------------------------------------------------------------------ life cycle (the server's event loop)
    def start(self, grpc: bool = False) -> None:
        """Fix the caps from the file limit now (models loaded) and start sweeping on the running loop; ``grpc``:
        the gRPC transport is served too (the file limit's room is shared)."""
        self.guards = [self.rest, self.grpc] if grpc else [self.rest]
        cap = connection_cap(self.setting, len(self.guards))
        for guard in self.guards:
            guard.cap = cap
        self._loop = asyncio.get_running_loop()
        self._arm()
        log.info(
            "connections: at most %d per transport (file limit %d), request head within %g s, idle %g s",
            cap,
            file_limit(),
            self.header_timeout,
            self.idle_timeout,
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._report(force=True)

    def _arm(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(min(SWEEP_SECONDS, self.header_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for guard in self.guards:
            guard.sweep(now)
        self._report()
        self._arm()

    # ------------------------------------------------------------------ the summary line
    def _report(self, force: bool = False) -> None:
        new = {g.transport: g.closed - self._reported[g.transport] for g in self.guards}
        if not any(closed[r] for closed in new.values() for r in ("header_timeout", "evicted", "refused")):
            return
        now = time.monotonic()
        if not force and self._reported_at is not None and now - self._reported_at < REPORT_EVERY_SECONDS:
            return
        parts = []
        for g in self.guards:
            n, (name, refusal) = new[g.transport], _SHOWN[g.transport]
            parts.append(
                f"{name}: {n['header_timeout']} without a request head in {self.header_timeout:g} s, "
                f"{n['idle_timeout']} idle for {self.idle_timeout:g} s, {n['evicted']} to make room at the cap of "
                f"{g.cap}, {n['refused']} refused with {refusal} (all busy), {g.open} open"
            )
        log.warning(
            "connections closed: %s (further closes summed up every %g s)", "; ".join(parts), REPORT_EVERY_SECONDS
        )
        for g in self.guards:
            self._reported[g.transport] = Counter(g.closed)
        self._reported_at = now

    # ------------------------------------------------------------------ metrics
    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of the connection metrics (see :mod:`service.metrics`)."""
        for guard in self.guards:
            yield from guard.samples()


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
