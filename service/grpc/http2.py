"""gRPC over HTTP/2 (cleartext, prior knowledge) on the asyncio event loop: the transport under bnfold's V2 gRPC.

Just what a gRPC server needs, no more: the connection preface and SETTINGS, HEADERS/CONTINUATION (HPACK decoded
by the ``hpack`` package, with a per-connection cache of header blocks seen before, which a client's repeated
calls hit), DATA with flow control both ways, PING, RST_STREAM, WINDOW_UPDATE and GOAWAY; then gRPC's length-
prefixed messages, ``grpc-timeout``, gzip/deflate requests, and trailers. Responses are never compressed and
their headers are literal (no dynamic table), so a unary answer is three pre-encoded frames in one write.

A method is a coroutine ``(request bytes, Call) -> response bytes`` (unary) or an async iterator of response
bytes (server streaming). It answers an error by raising :class:`GrpcError`; anything else it raises is
INTERNAL, logged. Decoding the protobuf is the method's business, so a malformed message is its
INVALID_ARGUMENT. A unary call with zero or two request messages is answered INVALID_ARGUMENT as soon as the
client half-closes; a call only runs (and only then counts for a graceful stop) once its request is complete.

A server given a :class:`~service.connections.ConnectionGuard` keeps its connections within the guard's limits: a
connection must send the preface and its first HEADERS within the header timeout, and may stay without an open
stream for the idle timeout (then GOAWAY and close); over the cap a new connection takes the place of the one
waiting longest, or, when every connection has a stream open, gets GOAWAY with ENHANCE_YOUR_CALM and is closed.
A request not complete ``request_timeout`` seconds after its HEADERS is answered DEADLINE_EXCEEDED, so that no
stream keeps its connection busy for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import hpack

if TYPE_CHECKING:
    from service.connections import ConnectionGuard

log = logging.getLogger("bnfold.service")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE = 0x1, 0x2, 0x3, 0x4
S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x5, 0x6

MAX_CONCURRENT_STREAMS = 1000
STREAM_WINDOW = 1 << 20  # what a client may send on one stream before we have read it
CONNECTION_WINDOW = 16 << 20  # at least; one largest message and 1 MiB more when that is larger
MAX_FRAME = 1 << 20  # the largest frame we accept (HTTP/2 allows up to 16 MiB)
MAX_HEADER_LIST = 64 << 10
MAX_MESSAGE_TEXT = 1024  # grpc-message is cut to this many characters
HEADER_CACHE = 64
#: Connections the kernel completes before we accept them (uvicorn's default too). With asyncio's 100, a burst of
#: connections overflows the queue: the kernel drops their handshake's last ACK, and a client that sends nothing
#: believes it is connected while we never see it.
BACKLOG = 2048

# gRPC status codes (grpc.StatusCode's numbers, without importing grpc)
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 8, 12, 13, 14, 16

_FRAME = struct.Struct(">I")
_FIXED_SIZE = {RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4, PRIORITY: 5}


class GrpcError(Exception):
    """A gRPC status other than OK, its one-line message and extra trailers (e.g. ``retry-after``)."""

    def __init__(self, code: int, message: str, trailers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, tuple(trailers)


@dataclass
class Call:
    """What a method sees of its call: the path, request metadata (lower-case names), and the deadline."""

    method: str
    metadata: dict[bytes, bytes]
    deadline: float | None  # time.monotonic(), from grpc-timeout

    def header(self, name: bytes) -> bytes | None:
        return self.metadata.get(name)


Payload = bytes | memoryview  # a request message: a view of the bytes received, where it can be
Unary = Callable[[Payload, Call], Awaitable[bytes]]
ServerStream = Callable[[Payload, Call], AsyncIterator[bytes]]


@dataclass
class Methods:
    """The served methods by path (``/package.Service/Method``)."""

    unary: dict[str, Unary] = field(default_factory=dict)
    server_stream: dict[str, ServerStream] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- encoding
def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + _FRAME.pack(stream) + payload


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer with a ``prefix_bits`` prefix, OR-ed into ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field, never indexed, new name, no Huffman."""
    return b"\x10" + _int(len(name), 7) + name + _int(len(value), 7) + value


RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _int(16, 7) + b"application/grpc"  # :status 200, content-type
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _percent(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def _error_block(code: int, message: str, trailers: Iterable[tuple[str, str]]) -> bytes:
    if len(message) > MAX_MESSAGE_TEXT:
        message = message[: MAX_MESSAGE_TEXT - 1] + "\u2026"
    block = _literal(b"grpc-status", str(code).encode()) + _literal(b"grpc-message", _percent(message))
    for name, value in trailers:
        block += _literal(name.encode("ascii"), value.encode("ascii", "replace"))
    return block


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (``1S``, ``250m`` ...) in seconds; None when malformed."""
    unit = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


# ------------------------------------------------------------------------------------------------ streams
class Stream:
    __slots__ = (
        "body",
        "buffered",
        "closed",
        "ended",
        "headers",
        "held",
        "id",
        "opened",
        "pending",
        "send_window",
        "task",
        "trailers",
        "unread",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.opened = time.monotonic()
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.body = bytearray()
        self.ended = False  # the client half-closed
        self.send_window = send_window
        self.pending: list[bytes] = []  # DATA payloads waiting for flow-control window
        self.trailers: bytes | None = None  # sent once ``pending`` is out
        self.closed = False  # we are done with it (answered or reset)
        self.task: asyncio.Task[None] | None = None
        self.unread = 0  # bytes received on this stream not yet credited back with WINDOW_UPDATE
        self.buffered = 0  # bytes of the unfinished request in ``body``
        self.held = 0  # of those, not yet credited back to the connection's window


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Http2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.header_cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.continuing: tuple[int, int, bytearray] | None = None  # (stream, flags, block) of a split block
        self.send_window = 65535
        self.peer_window = 65535  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16384
        self.unread = 0
        self.buffered = 0  # bytes in the bodies of unfinished requests
        self.going_away = False
        self.guard = server.guard
        self.data_stream: Stream | None = None  # the DATA frame being read: its stream, flags, size, bytes left
        self.data_flags = self.data_size = self.data_left = 0

    # ------------------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a subclass
        self.server.connections.add(self)
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS,
            MAX_CONCURRENT_STREAMS,
            S_INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            S_MAX_FRAME_SIZE,
            MAX_FRAME,
            S_MAX_HEADER_LIST_SIZE,
            MAX_HEADER_LIST,
        )
        update = _frame(WINDOW_UPDATE, 0, 0, _FRAME.pack(self.server.connection_window - 65535))
        self.write(_frame(SETTINGS, 0, 0, settings) + update)
        if self.guard is not None and not self.guard.admit(self):  # over the cap, every connection busy
            self.goaway(ENHANCE_YOUR_CALM, b"too many open connections")
            self.close()
        elif self.server.draining:
            self.goaway(NO_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.guard is not None:
            self.guard.forget(self)
        for stream in self.streams.values():
            stream.closed = True
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if not self.preface:
            buf = self.buffer
            buf += data
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    self.close()
                return
            if buf[: len(PREFACE)] != PREFACE:
                self.close()
                return
            data = bytes(buf[len(PREFACE) :])
            self.buffer = bytearray()
            self.preface = True
        try:
            with memoryview(data) as view:
                self.frames(data, view)
        except ConnectionError_ as exc:
            self.goaway(exc.code)
            self.close()
        except (struct.error, IndexError, ValueError):  # a frame too short for its type (padding, SETTINGS)
            self.goaway(FRAME_SIZE_ERROR)
            self.close()

    def frames(self, data: bytes, view: memoryview) -> None:
        """Read the frames in ``data``. A DATA frame's payload goes to its stream as it arrives, however the
        reads cut it (each byte copied once, into the request body); other frames and frame headers cut by a
        read wait in ``buffer``."""
        pos, end = 0, len(data)
        while pos < end and self.transport is not None:
            if self.data_left:
                n = min(self.data_left, end - pos)
                self.data_chunk(view[pos : pos + n])
                pos += n
                self.data_left -= n
                if not self.data_left:
                    self.data_end()
                continue
            buf = self.buffer
            if buf or end - pos < 9:  # a frame cut by a read
                if len(buf) < 9:
                    take = min(9 - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < 9:
                        return
                length, kind, flags, sid = self.header(buf, 0)
                if kind == DATA and not flags & PADDED:
                    self.buffer = bytearray()
                    self.data_begin(flags, sid, length)
                    continue
                take = min(9 + length - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < 9 + length:
                    return
                self.buffer = bytearray()
                self.frame(kind, flags, sid, bytes(buf[9:]))
                continue
            length, kind, flags, sid = self.header(data, pos)
            if kind == DATA and not flags & PADDED and end - pos - 9 >= length:
                # the common case inline (a call per frame counts at 16 KiB a frame): a whole DATA frame for
                # a stream whose message length has been checked
                stream = self.streams.get(sid)
                if stream is not None and not stream.ended and not stream.closed and len(stream.body) >= 5:
                    stream.body += view[pos + 9 : pos + 9 + length]
                    pos += 9 + length
                    self.buffer_for(stream, length)
                    if flags & END_STREAM:
                        self.end_of_request(stream)
                    else:
                        stream.unread += length
                        if stream.unread >= STREAM_WINDOW // 2:
                            self.write(_frame(WINDOW_UPDATE, 0, sid, _FRAME.pack(stream.unread)))
                            stream.unread = 0
                    continue
            if kind == DATA and not flags & PADDED:
                pos += 9
                self.data_begin(flags, sid, length)
            elif end - pos >= 9 + length:
                self.frame(kind, flags, sid, bytes(view[pos + 9 : pos + 9 + length]))
                pos += 9 + length
            else:
                self.buffer = bytearray(view[pos:])
                return

    def header(self, src: bytes | bytearray, pos: int) -> tuple[int, int, int, int]:
        length = (src[pos] << 16) | (src[pos + 1] << 8) | src[pos + 2]
        if length > MAX_FRAME:
            raise ConnectionError_(FRAME_SIZE_ERROR)
        kind = src[pos + 3]
        if self.continuing is not None and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR)
        return length, kind, src[pos + 4], _FRAME.unpack_from(src, pos + 5)[0] & 0x7FFFFFFF

    # ---------------------------------------------------------------------------------------- frames
    def frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != _FIXED_SIZE.get(kind, len(payload)):
            raise ConnectionError_(FRAME_SIZE_ERROR)
        if kind == DATA:
            self.on_data(flags, sid, payload)
        elif kind == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self.on_headers(flags, sid, payload)
            else:
                self.continuing = (sid, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self.continuing is None or self.continuing[0] != sid:
                raise ConnectionError_(PROTOCOL_ERROR)
            block = self.continuing[2]
            block += payload
            if len(block) > MAX_HEADER_LIST * 4:
                raise ConnectionError_(ENHANCE_YOUR_CALM)
            if flags & END_HEADERS:
                start_flags = self.continuing[1]
                self.continuing = None
                self.on_headers(start_flags, sid, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self.on_settings(payload)
        elif kind == WINDOW_UPDATE:
            self.on_window_update(sid, payload)
        elif kind == PING:
            if not flags & ACK:
                self.write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.drop(sid)
            if stream is not None:
                self.release(stream)
                stream.body = bytearray()
                stream.closed = True
                if stream.task is not None:
                    stream.task.cancel()
        elif kind == GOAWAY:
            self.going_away = True
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR)
        # PRIORITY and unknown frame types are ignored

    def on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR)
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > 0x7FFFFFFF:
                    raise ConnectionError_(FLOW_CONTROL_ERROR)
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                self.peer_max_frame = min(max(value, 16384), 1 << 20)
        self.write(_frame(SETTINGS, ACK, 0))
        self.flush_pending()

    def on_window_update(self, sid: int, payload: bytes) -> None:
        increment = _FRAME.unpack(payload[:4])[0] & 0x7FFFFFFF
        if sid == 0:
            self.send_window += increment
            self.flush_pending()
        else:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.send_window += increment
                self.flush_stream(stream)

    def decode_headers(self, block: bytes) -> list[tuple[bytes, bytes]]:
        cached = self.header_cache.get(block)
        if cached is not None:
            return cached
        entries = self.decoder.header_table.dynamic_entries
        size, first = len(entries), entries[0] if entries else None
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            raise ConnectionError_(ENHANCE_YOUR_CALM) from None
        except hpack.HPACKError:
            raise ConnectionError_(COMPRESSION_ERROR) from None
        if len(entries) != size or (entries[0] if entries else None) is not first:  # an entry added or evicted
            self.header_cache.clear()  # the table changed: blocks decoded before may now mean something else
        elif len(self.header_cache) < HEADER_CACHE and len(block) <= 1024:
            self.header_cache[block] = headers  # type: ignore[assignment]
        return headers  # type: ignore[return-value]

    def on_headers(self, flags: int, sid: int, block: bytes) -> None:
        headers = self.decode_headers(block)  # always: the HPACK table must stay in step with the client's
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only the end of its stream matters
            if flags & END_STREAM:
                self.end_of_request(stream)
            return
        if sid % 2 == 0 or sid <= self.last_stream:
            if sid % 2 == 0 or sid > self.last_stream:
                raise ConnectionError_(PROTOCOL_ERROR)
            return  # a stream we have already closed
        self.last_stream = sid
        if self.going_away or self.server.draining or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.write(_frame(RST_STREAM, 0, sid, _FRAME.pack(REFUSED_STREAM)))
            return
        stream = Stream(sid, self.peer_window)
        stream.headers = headers
        self.streams[sid] = stream
        if flags & END_STREAM:
            self.end_of_request(stream)

    def on_data(self, flags: int, sid: int, payload: bytes) -> None:
        """A padded DATA frame, read whole."""
        pad = payload[0] if payload else 0
        if not payload or 1 + pad > len(payload):
            raise ConnectionError_(PROTOCOL_ERROR)
        self.data_begin(flags, sid, len(payload))
        self.data_left = 0
        self.data_chunk(memoryview(payload)[1 : len(payload) - pad], credit=len(payload))
        self.data_end()

    def data_begin(self, flags: int, sid: int, length: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.ended:
            if sid > self.last_stream:
                raise ConnectionError_(PROTOCOL_ERROR)
            stream = None  # a stream already answered or reset: its data is dropped (and credited)
        self.data_stream, self.data_flags, self.data_size, self.data_left = stream, flags, length, length
        if not length:
            self.data_end()

    def data_chunk(self, chunk: memoryview, credit: int = 0) -> None:
        size = credit or len(chunk)
        stream = self.data_stream
        if stream is None or stream.closed:
            self.credit(size)
            return
        self.credit(size - len(chunk))  # padding
        self.buffer_for(stream, len(chunk))
        body = stream.body
        short = len(body) < 5
        body += chunk
        if short and len(body) >= 5:
            declared = _FRAME.unpack_from(body, 1)[0]
            if declared > self.server.max_message:
                stream.body = bytearray()
                message = f"request message of {declared} bytes is larger than {self.server.max_message}"
                self.answer_error(stream, GrpcError(RESOURCE_EXHAUSTED, message))

    def buffer_for(self, stream: Stream, size: int) -> None:
        """``size`` more bytes of an unfinished request: credited back at once while the connection's unfinished
        requests hold less than its window, else only when their stream lets go of them. So half-sent requests
        hold at most two windows of memory per connection, and one largest message always fits."""
        stream.buffered += size
        self.buffered += size
        if self.buffered <= self.server.connection_window:
            self.credit(size)
        else:
            stream.held += size

    def credit(self, size: int) -> None:
        """Give ``size`` bytes back to the connection's window (in WINDOW_UPDATEs of half the window or more)."""
        self.unread += size
        if self.unread >= self.server.connection_window // 2:
            self.write(_frame(WINDOW_UPDATE, 0, 0, _FRAME.pack(self.unread)))
            self.unread = 0

    def release(self, stream: Stream) -> None:
        self.buffered -= stream.buffered
        stream.buffered = 0
        if stream.held:
            self.credit(stream.held)
            stream.held = 0

    def data_end(self) -> None:
        stream, self.data_stream = self.data_stream, None
        if stream is None:
            return
        if self.data_flags & END_STREAM:
            self.end_of_request(stream)
        elif not stream.closed:
            stream.unread += self.data_size
            if stream.unread >= STREAM_WINDOW // 2:
                self.write(_frame(WINDOW_UPDATE, 0, stream.id, _FRAME.pack(stream.unread)))
                stream.unread = 0

    # ---------------------------------------------------------------------------------------- calls
    def end_of_request(self, stream: Stream) -> None:
        stream.ended = True
        self.release(stream)
        if stream.closed:
            self.drop(stream.id)
            return
        try:
            method, call, message = self.server.request(stream.headers or [], stream.body)
        except GrpcError as exc:
            self.answer_error(stream, exc)
            return
        stream.body = bytearray()
        unary = self.server.methods.unary.get(method)
        if unary is not None:
            stream.task = self.server.spawn(self.run_unary(stream, unary, message, call))
            return
        streaming = self.server.methods.server_stream.get(method)
        assert streaming is not None  # Http2Server.request refuses unknown methods
        stream.task = self.server.spawn(self.run_stream(stream, streaming, message, call), streaming=True)

    async def run_unary(self, stream: Stream, method: Unary, message: Payload, call: Call) -> None:
        try:
            response = await method(message, call)
        except GrpcError as exc:
            self.answer_error(stream, exc)
            return
        except asyncio.CancelledError:
            return  # reset by the client, or its connection is gone
        except Exception:
            log.exception("internal error in gRPC %s", call.method)
            self.answer_error(stream, GrpcError(INTERNAL, "internal error (logged on the server)"))
            return
        if stream.closed:
            return
        n = len(response)
        data = bytes((0, (n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF)) + response
        head = _frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS)
        if len(data) <= min(stream.send_window, self.send_window, self.peer_max_frame):
            stream.send_window -= len(data)
            self.send_window -= len(data)
            self.write(
                head
                + _frame(DATA, 0, stream.id, data)
                + _frame(HEADERS, END_HEADERS | END_STREAM, stream.id, _OK_TRAILERS)
            )
            self.finish(stream)
            return
        self.write(head)
        stream.pending, stream.trailers = [data], _OK_TRAILERS
        self.flush_stream(stream)

    async def run_stream(self, stream: Stream, method: ServerStream, message: Payload, call: Call) -> None:
        try:
            started = False
            async for response in method(message, call):
                if stream.closed:
                    return
                if not started:
                    self.write(_frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
                    started = True
                n = len(response)
                stream.pending.append(struct.pack(">BI", 0, n) + response)
                self.flush_stream(stream)
        except GrpcError as exc:
            if not started:
                self.answer_error(stream, exc)
            else:
                stream.trailers = _error_block(exc.code, exc.message, exc.trailers)
                self.flush_stream(stream)
            return
        except asyncio.CancelledError:
            if not stream.closed and self.transport is not None:  # the server stops: end the stream
                self.answer_error(stream, GrpcError(UNAVAILABLE, "the server is shutting down"))
            raise
        if not started:
            self.write(_frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        stream.trailers = _OK_TRAILERS
        self.flush_stream(stream)

    def answer_error(self, stream: Stream, exc: GrpcError) -> None:
        """A trailers-only answer; the stream is reset after it when the client is still sending."""
        if stream.closed:
            return
        block = RESPONSE_HEADERS + _error_block(exc.code, exc.message, exc.trailers)
        self.write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))
        self.finish(stream)

    def finish(self, stream: Stream) -> None:
        stream.closed = True
        self.release(stream)
        stream.pending = []
        self.drop(stream.id)
        if not stream.ended:  # answered before the client finished sending: tell it to stop
            self.write(_frame(RST_STREAM, 0, stream.id, _FRAME.pack(NO_ERROR)))

    # ------------------------------------------------------------------------------------ sending
    def flush_stream(self, stream: Stream) -> None:
        """Send what the windows allow of the stream's pending DATA; its trailers once all DATA is out."""
        pending = stream.pending
        while pending and not stream.closed:
            room = min(stream.send_window, self.send_window, self.peer_max_frame)
            if room <= 0:
                return  # a WINDOW_UPDATE (or SETTINGS) calls flush again
            item = pending[0]
            chunk = item[:room]
            stream.send_window -= len(chunk)
            self.send_window -= len(chunk)
            self.write(_frame(DATA, 0, stream.id, chunk))
            if len(chunk) < len(item):
                pending[0] = item[room:]
            else:
                pending.pop(0)
        if not pending and stream.trailers is not None and not stream.closed:
            self.write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            self.finish(stream)

    def flush_pending(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.trailers is not None:
                self.flush_stream(stream)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def drop(self, stream_id: int) -> Stream | None:
        """Forget a stream; the connection is idle from when its last open stream goes."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not self.streams and self.guard is not None and self.transport is not None:
            self.guard.waiting(self, idle=True)
        return stream

    def goaway(self, code: int, debug: bytes = b"") -> None:
        self.going_away = True
        self.write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, code) + debug))

    # -------------------------------------------------------------------- the connection guard's calls
    def guard_busy(self) -> bool:
        """A stream is open (its request arriving, its call running or its answer going out)."""
        return bool(self.streams)

    def guard_close(self) -> None:
        """Closed by the guard (no stream open: idle, no request in time, or making room under the cap): GOAWAY
        first, so that a client knows none of its calls was started and may send it again. Bytes it has not
        read by now are dropped rather than keep the socket open."""
        transport = self.transport
        if transport is None:
            return
        self.goaway(NO_ERROR)
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionError_(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Http2Server:
    """The listening socket(s), the connections, and the calls in flight."""

    def __init__(
        self,
        methods: Methods,
        max_message: int,
        guard: ConnectionGuard | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.methods = methods
        self.max_message = max_message
        self.guard = guard  # the limits on connections (none: no timeouts, no cap)
        self.request_timeout = request_timeout  # a request not complete this long after its HEADERS is answered
        self._expiry: asyncio.TimerHandle | None = None
        self.connection_window = min(max(CONNECTION_WINDOW, max_message + (1 << 20)), 0x7FFFFFFF)
        self.connections: set[Connection] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self.streams_running: set[asyncio.Task[None]] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            host.strip("[]") or None,
            port,
            reuse_port=reuse_port or None,
            backlog=BACKLOG,
        )
        if self.request_timeout is not None:
            self._arm_expiry()
        return int(self._server.sockets[0].getsockname()[1])

    def _arm_expiry(self) -> None:
        assert self.request_timeout is not None
        every = min(1.0, self.request_timeout / 4)
        self._expiry = asyncio.get_running_loop().call_later(every, self._expire_requests)

    def _expire_requests(self) -> None:
        self.expire_requests(time.monotonic())
        self._arm_expiry()

    def expire_requests(self, now: float) -> None:
        """Answer DEADLINE_EXCEEDED to the requests not complete ``request_timeout`` seconds after their HEADERS
        (REST's 408): a stream left open holds its connection busy, out of reach of the guard's timeouts."""
        assert self.request_timeout is not None
        expired = now - self.request_timeout
        for conn in list(self.connections):
            for stream in [s for s in conn.streams.values() if not s.ended and s.opened <= expired]:
                message = f"the request was not received completely within {self.request_timeout:g} s"
                conn.answer_error(stream, GrpcError(DEADLINE_EXCEEDED, message))

    def request(self, headers: list[tuple[bytes, bytes]], body: bytearray) -> tuple[str, Call, Payload]:
        """Check a complete request: (method path, call, the one request message); GrpcError if it is not one."""
        path = b""
        metadata: dict[bytes, bytes] = {}
        for name, value in headers:
            if name == b":path":
                path = value
            elif name[:1] != b":":
                metadata[name] = value
        method = path.decode("latin-1")
        if method not in self.methods.unary and method not in self.methods.server_stream:
            raise GrpcError(UNIMPLEMENTED, f"unknown method {method[:200]!r}")
        if not metadata.get(b"content-type", b"").startswith(b"application/grpc"):
            raise GrpcError(INVALID_ARGUMENT, "content-type must be application/grpc")
        deadline = None
        timeout = metadata.get(b"grpc-timeout")
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is None:
                raise GrpcError(INVALID_ARGUMENT, "malformed grpc-timeout")
            deadline = time.monotonic() + seconds
        call = Call(method, metadata, deadline)
        if len(body) < 5:
            raise GrpcError(INVALID_ARGUMENT, "expected one request message, got none" if not body else "truncated")
        flag, length = body[0], _FRAME.unpack_from(body, 1)[0]
        if len(body) != 5 + length:
            if len(body) < 5 + length:
                raise GrpcError(INVALID_ARGUMENT, "the request message is truncated")
            raise GrpcError(INVALID_ARGUMENT, "expected one request message, got more")
        message: Payload = memoryview(body)[5:]  # not copied: the stream lets go of its body
        if flag:
            message = self.decompress(metadata.get(b"grpc-encoding", b"identity"), message)
        return method, call, message

    def decompress(self, encoding: bytes, data: Payload) -> bytes:
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            raise GrpcError(UNIMPLEMENTED, f"unsupported grpc-encoding {encoding[:40].decode('latin-1')!r}")
        inflate = zlib.decompressobj(wbits)
        try:
            out = inflate.decompress(data, self.max_message + 1)
        except zlib.error:
            raise GrpcError(INVALID_ARGUMENT, f"the request message is not valid {encoding.decode()}") from None
        if len(out) > self.max_message:
            raise GrpcError(RESOURCE_EXHAUSTED, f"request message inflates beyond {self.max_message} bytes")
        return out

    def spawn(self, coro: Any, streaming: bool = False) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        running = self.streams_running if streaming else self.calls
        running.add(task)
        task.add_done_callback(running.discard)
        if not streaming:
            task.add_done_callback(self._maybe_idle)
        return task

    def _maybe_idle(self, _: Any) -> None:
        if self._idle is not None and not self.calls:
            self._idle.set()

    def drain(self) -> None:
        """Stop taking calls: close the listener, GOAWAY every connection (calls in flight go on)."""
        if self.draining:
            return
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.goaway(NO_ERROR)

    async def stop(self, grace: float) -> None:
        """Drain, wait up to ``grace`` seconds for the calls in flight, then end the rest and close."""
        self.drain()
        if self._expiry is not None:
            self._expiry.cancel()
        if self.calls:
            self._idle = asyncio.Event()
            if self.calls:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), grace)
        for task in list(self.calls) + list(self.streams_running):
            task.cancel()
        await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
