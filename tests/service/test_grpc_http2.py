"""The gRPC server's own HTTP/2 (service/grpc/http2.py), in memory: a connection fed bytes as a client would
send them (cut at every byte, padded, split header blocks, compressed messages), its frames read back and
decoded; flow control both ways; reset and oversized calls; GOAWAY on a broken connection; the connection guard's
timeouts, cap and drain, with the guard's clock moved forward by hand."""

from __future__ import annotations

import asyncio
import gzip
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import hpack
import pytest

from service.connections import ConnectionGuard
from service.grpc import http2
from service.grpc.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Call,
    Connection,
    GrpcError,
    Http2Server,
    Methods,
    Payload,
)

ECHO = "/test.Echo/Echo"
BIG = "/test.Echo/Big"
HOLD = "/test.Echo/Hold"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def message(data: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(data)) + data


@dataclass
class Wire:
    """The server's side of one connection, and what it wrote, read back as frames."""

    conn: Connection
    out: bytearray = field(default_factory=bytearray)
    closed: bool = False
    encoder: hpack.Encoder = field(default_factory=hpack.Encoder)
    decoder: hpack.Decoder = field(default_factory=hpack.Decoder)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def send(self, data: bytes, cut: int = 0) -> None:
        """Hand ``data`` to the server, in pieces of ``cut`` bytes (0: at once)."""
        step = cut or len(data) or 1
        for i in range(0, len(data), step):
            self.conn.data_received(data[i : i + step])

    def headers(self, stream: int, path: str = ECHO, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")]
        fields += [("content-type", "application/grpc"), ("te", "trailers"), *extra]
        return bytes(self.encoder.encode(fields))

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, pos = [], 0
        data = bytes(self.out)
        while pos + 9 <= len(data):
            length = int.from_bytes(data[pos : pos + 3], "big")
            kind, flags = data[pos + 3], data[pos + 4]
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            out.append((kind, flags, sid, data[pos + 9 : pos + 9 + length]))
            pos += 9 + length
        self.out = bytearray(data[pos:])
        return out

    def answer(self, stream: int) -> tuple[dict[str, str], bytes]:
        """Headers + trailers and the DATA bytes the server sent on ``stream`` so far."""
        fields: dict[str, str] = {}
        body = b""
        for kind, _, sid, payload in self.frames():
            if sid != stream:
                continue
            if kind == HEADERS:
                fields.update({k: v for k, v in self.decoder.decode(payload)})
            elif kind == DATA:
                body += payload
        return fields, body


async def echo(data: Payload, call: Call) -> bytes:
    if bytes(data) == b"fail":
        raise GrpcError(http2.INVALID_ARGUMENT, "no \u00e9cho 100%", (("retry-after", "3"),))
    return b"echo:" + bytes(data) + b":" + (call.metadata.get(b"x-tag") or b"")


async def big(data: Payload, call: Call) -> bytes:
    return b"b" * 200_000


@pytest.fixture
def wire() -> Callable[..., Wire]:
    def make(max_message: int = 1 << 20, hold: asyncio.Event | None = None) -> Wire:
        async def held(data: Payload, call: Call) -> bytes:
            assert hold is not None
            await hold.wait()
            return b"late"

        server = Http2Server(Methods(unary={ECHO: echo, BIG: big, HOLD: held}), max_message)
        conn = Connection(server)
        w = Wire(conn)
        conn.connection_made(w)  # type: ignore[arg-type]
        w.send(PREFACE + frame(SETTINGS, 0, 0))
        return w

    return make


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("cut", [0, 1, 7, 9, 10])
def test_a_call_cut_anywhere_is_answered(wire: Callable[..., Wire], cut: int) -> None:
    async def go() -> None:
        w = wire()
        hdr = w.headers(1, extra=(("x-tag", "t1"),))
        w.send(frame(HEADERS, END_HEADERS, 1, hdr) + frame(DATA, END_STREAM, 1, message(b"hi")), cut)
        await settle()
        fields, body = w.answer(1)
        assert fields[":status"] == "200" and fields["content-type"] == "application/grpc"
        assert fields["grpc-status"] == "0"
        assert body == message(b"echo:hi:t1")

    asyncio.run(go())


def test_padding_split_header_blocks_and_a_message_over_many_frames(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire()
        hdr = w.headers(1)
        padded_headers = frame(HEADERS, PADDED, 1, bytes((3,)) + hdr[:5] + b"\0\0\0")
        cont = frame(CONTINUATION, END_HEADERS, 1, hdr[5:])
        body = message(b"x" * 40_000)
        data = frame(DATA, PADDED, 1, bytes((2,)) + body[:10] + b"\0\0")
        chunks = [body[i : i + 16384] for i in range(10, len(body), 16384)]
        data += b"".join(frame(DATA, END_STREAM if c is chunks[-1] else 0, 1, c) for c in chunks)
        w.send(padded_headers + cont + data, 1000)
        await settle()
        fields, answer = w.answer(1)
        assert fields["grpc-status"] == "0", fields
        assert answer == message(b"echo:" + b"x" * 40_000 + b":")

    asyncio.run(go())


def test_gzip_message_and_an_unknown_encoding(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire()
        w.send(
            frame(HEADERS, END_HEADERS, 1, w.headers(1, extra=(("grpc-encoding", "gzip"),)))
            + frame(DATA, END_STREAM, 1, message(gzip.compress(b"zipped"), compressed=True))
        )
        await settle()
        assert w.answer(1)[1] == message(b"echo:zipped:")
        w.send(
            frame(HEADERS, END_HEADERS, 3, w.headers(3, extra=(("grpc-encoding", "snappy"),)))
            + frame(DATA, END_STREAM, 3, message(b"??", compressed=True))
        )
        await settle()
        assert w.answer(3)[0]["grpc-status"] == str(http2.UNIMPLEMENTED)

    asyncio.run(go())


def test_errors_are_trailers_only_with_encoded_message(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire()
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1)) + frame(DATA, END_STREAM, 1, message(b"fail")))
        w.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, w.headers(3, path="/no.Such/Method")))
        w.send(frame(HEADERS, END_HEADERS | END_STREAM, 5, w.headers(5)))  # no message at all
        w.send(frame(HEADERS, END_HEADERS, 7, w.headers(7)))
        w.send(frame(DATA, END_STREAM, 7, message(b"a") + message(b"b")))  # two messages on a unary call
        await settle()
        frames = w.frames()
        by_stream = {sid: w.decoder.decode(p) for kind, _, sid, p in frames if kind == HEADERS}
        assert dict(by_stream[1])["grpc-status"] == str(http2.INVALID_ARGUMENT)
        assert dict(by_stream[1])["grpc-message"] == "no %C3%A9cho 100%25"
        assert dict(by_stream[1])["retry-after"] == "3"
        assert dict(by_stream[3])["grpc-status"] == str(http2.UNIMPLEMENTED)
        assert dict(by_stream[5])["grpc-status"] == str(http2.INVALID_ARGUMENT)
        assert dict(by_stream[7])["grpc-status"] == str(http2.INVALID_ARGUMENT)
        assert not [f for f in frames if f[0] == DATA], "an error answer carries no message"

    asyncio.run(go())


def test_a_large_answer_waits_for_the_clients_window(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire()
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1, path=BIG)) + frame(DATA, END_STREAM, 1, message(b"")))
        await settle()
        frames = w.frames()
        sent = sum(len(p) for kind, _, _, p in frames if kind == DATA)
        assert sent == 65535  # the default windows, no more
        assert not [f for f in frames if f[0] == HEADERS and f[1] & END_STREAM]
        w.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))  # the connection's window alone: no more
        assert not w.frames()
        w.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 20)))
        frames = w.frames()
        sent += sum(len(p) for kind, _, _, p in frames if kind == DATA)
        assert sent == 5 + 200_000
        assert all(len(p) <= 16384 for kind, _, _, p in frames if kind == DATA)  # the client's max frame size
        assert frames[-1][0] == HEADERS and frames[-1][1] & END_STREAM

    asyncio.run(go())


def test_the_server_credits_what_it_reads(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire(max_message=8 << 20)
        w.frames()
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1)))
        body = message(b"y" * (3 << 20))
        for i in range(0, len(body), 1 << 16):
            w.send(frame(DATA, 0, 1, body[i : i + (1 << 16)]))
        updates = [(sid, struct.unpack(">I", p)[0]) for kind, _, sid, p in w.frames() if kind == WINDOW_UPDATE]
        assert sum(n for sid, n in updates if sid == 1) >= len(body) - http2.STREAM_WINDOW // 2
        w.send(frame(DATA, END_STREAM, 1))
        await settle()
        fields, answer = w.answer(1)
        assert fields[":status"] == "200" and len(answer) == 65535  # the 3 MiB echo, as far as the window goes

    asyncio.run(go())


def test_an_oversized_message_is_refused_from_its_prefix(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        w = wire(max_message=1000)
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1)) + frame(DATA, 0, 1, message(b"z" * 2000)[:100]))
        frames = w.frames()
        fields = dict(w.decoder.decode(next(p for kind, _, sid, p in frames if kind == HEADERS)))
        assert fields["grpc-status"] == str(http2.RESOURCE_EXHAUSTED)
        assert [f for f in frames if f[0] == RST_STREAM and f[2] == 1], "the client is told to stop sending"
        w.send(frame(DATA, END_STREAM, 1, b"z" * 1905))  # the rest, still in flight: dropped
        w.send(frame(HEADERS, END_HEADERS, 3, w.headers(3)) + frame(DATA, END_STREAM, 3, message(b"ok")))
        await settle()
        assert w.answer(3)[1] == message(b"echo:ok:")

    asyncio.run(go())


def test_reset_cancels_the_call_and_stop_waits_only_for_calls_running(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        hold = asyncio.Event()
        w = wire(hold=hold)
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1, path=HOLD)) + frame(DATA, END_STREAM, 1, message(b"")))
        w.send(frame(HEADERS, END_HEADERS, 3, w.headers(3, path=HOLD)) + frame(DATA, END_STREAM, 3, message(b"")))
        w.send(frame(HEADERS, END_HEADERS, 5, w.headers(5)))  # a request that never completes
        await settle()
        server = w.conn.server
        assert len(server.calls) == 2
        w.send(frame(RST_STREAM, 0, 1, struct.pack(">I", http2.CANCEL)))
        await settle()
        assert len(server.calls) == 1
        stopping = asyncio.ensure_future(server.stop(600))
        await settle()
        assert any(kind == GOAWAY for kind, *_ in w.frames())
        hold.set()
        await asyncio.wait_for(stopping, 60)  # stream 5 holds nothing up
        assert w.answer(3)[1] == message(b"late")
        assert w.closed

    asyncio.run(go())


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        frame(DATA, 0, 2, b"x"),
        frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff"),
        frame(WINDOW_UPDATE, 0, 0, b"\x01"),
        frame(RST_STREAM, 0, 1, b""),
    ],
)
def test_a_broken_connection_is_closed(wire: Callable[..., Wire], garbage: bytes) -> None:
    async def go() -> None:
        server = Http2Server(Methods(unary={ECHO: echo}), 1000)
        conn = Connection(server)
        w = Wire(conn)
        conn.connection_made(w)  # type: ignore[arg-type]
        w.send(garbage if garbage.startswith(b"GET") else PREFACE + frame(SETTINGS, 0, 0) + garbage)
        assert w.closed

    asyncio.run(go())


def test_half_sent_requests_hold_the_connection_window(wire: Callable[..., Wire]) -> None:
    """Once a connection's unfinished requests hold a window's worth of bytes (16 MiB here), it credits no more
    back: a client cannot make it buffer without bound by leaving requests unfinished. Finished ones give
    their bytes back."""

    async def go() -> None:
        w = wire(max_message=1 << 20)
        w.frames()
        part = message(b"q" * 900_000)[:-1]
        streams = range(1, 61, 2)  # 30 requests of 900 kB each, one byte short: 27 MB
        for sid in streams:
            w.send(frame(HEADERS, END_HEADERS, sid, w.headers(sid)) + frame(DATA, 0, sid, part))
        updates = [struct.unpack(">I", p)[0] for kind, _, sid, p in w.frames() if kind == WINDOW_UPDATE and sid == 0]
        assert sum(updates) <= 16 << 20
        for sid in streams:
            w.send(frame(DATA, END_STREAM, sid, b"q"))
        await settle()
        updates += [struct.unpack(">I", p)[0] for kind, _, sid, p in w.frames() if kind == WINDOW_UPDATE and sid == 0]
        assert sum(updates) >= 30 * 900_000 - (8 << 20)

    asyncio.run(go())


def connected(server: Http2Server, hello: bool = True) -> Wire:
    """A new connection to ``server``; ``hello``: it sent the preface and SETTINGS."""
    w = Wire(Connection(server))
    w.conn.connection_made(w)  # type: ignore[arg-type]
    if hello:
        w.send(PREFACE + frame(SETTINGS, 0, 0))
    return w


def goaway_codes(w: Wire) -> list[int]:
    return [struct.unpack(">II", p[:8])[1] for kind, _, _, p in w.frames() if kind == GOAWAY]


def closes(guard: ConnectionGuard) -> dict[str, float]:
    return {labels["reason"]: v for name, labels, v in guard.samples() if name == "bnfold_connections_closed_total"}


def test_the_guard_closes_connections_without_a_call_in_time_and_idle_ones_with_goaway() -> None:
    """Header timeout: the preface and a first HEADERS must come within it (a stream open is busy, not waiting).
    Idle timeout: from the end of the last open stream. Either way GOAWAY(NO_ERROR), then close."""

    async def go() -> None:
        guard = ConnectionGuard("grpc", header_timeout=10, idle_timeout=5, cap=10)
        server = Http2Server(Methods(unary={ECHO: echo}), 1000, guard)
        silent, hello, calling = connected(server, hello=False), connected(server), connected(server)
        calling.send(frame(HEADERS, END_HEADERS, 1, calling.headers(1)))  # a stream open, its message to come
        guard.sweep(time.monotonic() + 9)
        assert not (silent.closed or hello.closed or calling.closed)
        guard.sweep(time.monotonic() + 11)
        assert silent.closed and hello.closed and not calling.closed
        assert goaway_codes(hello) == [NO_ERROR]
        calling.send(frame(DATA, END_STREAM, 1, message(b"hi")))
        await settle()
        assert calling.answer(1)[0]["grpc-status"] == "0"
        guard.sweep(time.monotonic() + 4)  # idle since its answer, for less than the idle timeout
        assert not calling.closed
        guard.sweep(time.monotonic() + 6)
        assert calling.closed and goaway_codes(calling) == [NO_ERROR]
        assert closes(guard) == {"header_timeout": 2, "idle_timeout": 1, "evicted": 0, "refused": 0}
        assert guard.open == 0

    asyncio.run(go())


def test_over_the_cap_the_idle_connection_makes_room_else_goaway_enhance_your_calm() -> None:
    async def go() -> None:
        guard = ConnectionGuard("grpc", header_timeout=10, idle_timeout=5, cap=2)
        server = Http2Server(Methods(unary={ECHO: echo}), 1000, guard)
        idle, busy = connected(server), connected(server)
        idle.send(frame(HEADERS, END_HEADERS, 1, idle.headers(1)) + frame(DATA, END_STREAM, 1, message(b"a")))
        busy.send(frame(HEADERS, END_HEADERS, 1, busy.headers(1)))
        await settle()
        idle.frames()
        new = connected(server)  # takes the idle connection's place
        assert idle.closed and goaway_codes(idle) == [NO_ERROR] and not busy.closed
        new.send(frame(HEADERS, END_HEADERS, 1, new.headers(1)))  # busy too
        refused = connected(server, hello=False)
        assert refused.closed and goaway_codes(refused) == [http2.ENHANCE_YOUR_CALM]
        assert not (busy.closed or new.closed)
        assert closes(guard) == {"header_timeout": 0, "idle_timeout": 0, "evicted": 1, "refused": 1}

    asyncio.run(go())


def test_a_request_never_completed_is_answered_at_the_request_timeout_and_its_connection_goes_idle() -> None:
    """A stream whose HEADERS came but whose message never completes would keep its connection busy for ever, out
    of reach of the guard: at the request timeout (REST's body timeout) it is DEADLINE_EXCEEDED and reset."""

    async def go() -> None:
        guard = ConnectionGuard("grpc", header_timeout=10, idle_timeout=5, cap=10)
        server = Http2Server(Methods(unary={ECHO: echo}), 1000, guard, request_timeout=30)
        w = connected(server)
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1)) + frame(DATA, 0, 1, message(b"never")[:3]))
        w.send(frame(HEADERS, END_HEADERS, 3, w.headers(3)))
        w.frames()  # SETTINGS and the like
        server.expire_requests(time.monotonic() + 29)
        guard.sweep(time.monotonic() + 29)
        assert not w.frames() and not w.closed and w.conn.guard_busy()
        server.expire_requests(time.monotonic() + 31)
        frames = w.frames()
        for sid in (1, 3):
            (block,) = [p for kind, _, s, p in frames if kind == HEADERS and s == sid]
            assert dict(w.decoder.decode(block))["grpc-status"] == str(http2.DEADLINE_EXCEEDED)
            assert [p for kind, _, s, p in frames if kind == RST_STREAM and s == sid]
        assert not w.conn.guard_busy()
        guard.sweep(time.monotonic() + 6)  # idle since then
        assert w.closed and closes(guard)["idle_timeout"] == 1

    asyncio.run(go())


def test_draining_refuses_new_streams_and_lets_the_running_call_finish(wire: Callable[..., Wire]) -> None:
    async def go() -> None:
        hold = asyncio.Event()
        w = wire(hold=hold)
        w.send(frame(HEADERS, END_HEADERS, 1, w.headers(1, path=HOLD)) + frame(DATA, END_STREAM, 1, message(b"")))
        await settle()
        w.conn.server.drain()
        assert goaway_codes(w) == [NO_ERROR]
        w.send(frame(HEADERS, END_HEADERS, 3, w.headers(3)) + frame(DATA, END_STREAM, 3, message(b"late")))
        refusals = [struct.unpack(">I", p)[0] for kind, _, sid, p in w.frames() if kind == RST_STREAM and sid == 3]
        assert refusals == [http2.REFUSED_STREAM]
        hold.set()
        await settle()
        assert w.answer(1) == (
            {":status": "200", "content-type": "application/grpc", "grpc-status": "0"},
            message(b"late"),
        )

    asyncio.run(go())


def test_a_repeated_header_block_is_read_against_the_table_of_its_time(wire: Callable[..., Wire]) -> None:
    """The same bytes (an indexed field, 0xbe: the newest table entry) mean what the table holds when they come:
    the decoded-block cache must not answer from an older table."""

    def string(value: bytes) -> bytes:
        return bytes((len(value),)) + value

    base = b"\x83\x86\x04" + string(ECHO.encode()) + b"\x0f\x10" + string(b"application/grpc")
    tag = {t: base + b"\x40" + string(b"x-tag") + string(t) for t in (b"one", b"two")}  # added to the table
    newest = base + b"\xbe"

    async def go() -> None:
        w = wire()
        answers = []
        for sid, block in enumerate([tag[b"one"], newest, newest, tag[b"two"], newest], start=0):
            stream = 2 * sid + 1
            w.send(frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, message(b"m")))
            await settle()
            answers.append(w.answer(stream)[1])
        assert answers == [message(b"echo:m:" + t) for t in (b"one", b"one", b"one", b"two", b"two")]

    asyncio.run(go())
