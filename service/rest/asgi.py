"""The REST transport's inference path: ``POST /v2/models/{m}[/versions/{v}]/infer`` as a plain ASGI handler
ahead of FastAPI.

Why not a FastAPI route: measured on a 1×20 model, FastAPI's routing, request object and response machinery
cost ~0.3 ms of CPU per request, five times the decode + ONNX Runtime + encode work itself
(benchmarks/serving_breakdown.py). :class:`InferenceMiddleware` answers inference requests before FastAPI
sees them; everything else (metadata, health, metrics, /docs) goes through FastAPI (:mod:`service.rest.app`).

:func:`handle` reads top to bottom: admit (:meth:`DataPlane.admit <service.dataplane.DataPlane.admit>`), read
the body, decode it (:mod:`service.rest.codec`), run, respond. Content-Type is never used to route a request
(tritonclient sends none): a body is binary-framed exactly when ``Inference-Header-Content-Length`` is
present (0 means a raw single-input body).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import re
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from service.dataplane import DataPlane
from service.errors import (
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedEncoding,
)
from service.rest.codec import JSON, Headers, encode_error, encode_result, parse_request, raw_request
from service.v2.tensors import InferRequest, TensorSpec

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

TRANSPORT = "rest"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
DECODE_IN_THREAD_BYTES = 256 << 10  # larger bodies are decoded off the event loop
COMPRESS_MIN_BYTES = 1024
BINARY = [(b"content-type", b"application/octet-stream")]
WANTED = {
    b"authorization",
    b"content-length",
    b"content-encoding",
    b"inference-header-content-length",
    b"accept-encoding",
}


class InferenceMiddleware:
    """The outermost ASGI layer: inference requests here, everything else (lifespan too) to ``app``."""

    connection_guard: Any = None  # the server's ConnectionGuard, found here by uvicorn's protocol (service.connections)

    def __init__(self, app: Any, dataplane: DataPlane) -> None:
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            body = orjson.dumps({"error": "Method Not Allowed"})
            headers = [*JSON, (b"allow", b"POST"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            status, headers, body = await handle(self.dataplane, match.group(1), match.group(2), scope, receive)
        except ClientGone:
            return
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def handle(
    dataplane: DataPlane, name: str, version: str | None, scope: Scope, receive: Receive
) -> tuple[int, Headers, bytes]:
    """One inference request: (status, headers, body). Raises only ClientGone (nobody to answer)."""
    headers = {k: v for k, v in scope["headers"] if k in WANTED}
    settings = dataplane.settings
    try:
        with dataplane.admit(name, version, headers.get(b"authorization"), TRANSPORT) as admitted:
            body = await read_body(receive, headers, settings.max_body_bytes, settings.body_timeout_seconds)
            model = admitted.model
            request = await decode(body, headers, model.name, model.inputs, model.max_batch_size, settings.max_elements)
            payload, json_length = await admitted.run(request, encode_result)
    except ClientGone:
        raise
    except ServiceError as exc:
        return encode_error(exc)
    out = list(JSON) if json_length is None else [*BINARY, (b"inference-header-content-length", b"%d" % json_length)]
    payload, encoding = compress(payload, headers.get(b"accept-encoding", b""))
    if encoding is not None:
        out.append((b"content-encoding", encoding))
    return 200, out, payload


async def decode(
    body: bytes, headers: dict[bytes, bytes], model: str, inputs: list[TensorSpec], max_batch: int, max_elements: int
) -> InferRequest:
    """The body as a request: JSON, binary-framed, or raw (the single input of ``model``); large bodies off the
    event loop."""
    header_length = _header_length(headers.get(b"inference-header-content-length"))
    if header_length == 0:
        return raw_request(model, inputs, max_batch, body, max_elements)
    if len(body) > DECODE_IN_THREAD_BYTES:
        parse = functools.partial(parse_request, body, header_length, max_elements)
        return await asyncio.get_running_loop().run_in_executor(None, parse)
    return parse_request(body, header_length, max_elements)


def _header_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    number = decimal(value)
    if number is None:
        shown = value[:40].decode("latin-1")
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, not {shown!r}")
    return number


def decimal(value: bytes) -> int | None:
    """A non-negative ASCII decimal of at most 18 digits (b'\\xb2' is '²': a digit to str.isdigit, not to int)."""
    value = value.strip()
    return int(value) if value.isdigit() and len(value) <= 18 else None


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int, timeout: float) -> bytes:
    """The request body, decompressed, never more than ``limit`` bytes at any point, within ``timeout``."""
    declared = headers.get(b"content-length")
    if declared is not None:
        size = decimal(declared)
        if size is None or size > limit:
            shown = declared[:40].decode("latin-1")
            raise PayloadTooLarge(f"body of {shown} bytes is larger than the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone("the client disconnected before its body arrived")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is larger than the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding in (b"", b"identity"):
        return body
    if encoding not in (b"gzip", b"deflate"):
        shown = encoding[:40].decode("latin-1")
        raise UnsupportedEncoding(f"Content-Encoding {shown!r} is not supported (gzip, deflate, identity)")
    return inflate(body, encoding.decode(), limit)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip or zlib ('deflate', as HTTP and tritonclient mean it) with a bound on the inflated size."""
    inflater = zlib.decompressobj(wbits=(16 if encoding == "gzip" else 0) + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"inflated body is larger than the limit of {limit} bytes")
    if not inflater.eof:
        raise BadRequest(f"{encoding} body is truncated")
    return out


def compress(payload: bytes, accept: bytes) -> tuple[bytes, bytes | None]:
    """gzip or deflate the response when the client accepts it and it is worth it."""
    if len(payload) < COMPRESS_MIN_BYTES or not accept:
        return payload, None
    accepted = {part.split(b";")[0].strip().lower() for part in accept.split(b",")}
    if b"gzip" in accepted:
        return gzip.compress(payload, compresslevel=1), b"gzip"
    if b"deflate" in accepted:
        return zlib.compress(payload, 1), b"deflate"
    return payload, None
