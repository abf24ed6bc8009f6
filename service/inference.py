"""``POST /v2/models/{m}[/versions/{v}]/infer`` as a plain ASGI handler, ahead of FastAPI's routing.

Why not a FastAPI route: measured on a 1×20 model, FastAPI's routing, request object and response machinery
cost ~0.3 ms of CPU per request, five times the decode + ONNX Runtime + encode work itself
(benchmarks/serving_breakdown.py). :class:`InferenceMiddleware` answers inference requests before FastAPI
sees them; everything else (metadata, health, metrics, /docs) goes through FastAPI. The FastAPI infer routes
in :mod:`service.routes` still exist, for the OpenAPI schema, and call the same :func:`handle`.

Content-Type is never used to route a request (tritonclient sends none): a body is binary-framed exactly when
``Inference-Header-Content-Length`` is present (0 means a raw single-input body).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import onnxruntime as ort
import orjson

from service.errors import BadRequest, PayloadTooLarge, RequestTimeout, ServiceError, UnsupportedEncoding
from service.runtime import Timing

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger("bnfold.service")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
DECODE_IN_THREAD_BYTES = 256 << 10  # larger bodies are decoded off the event loop
COMPRESS_MIN_BYTES = 1024
JSON = [(b"content-type", b"application/json")]
BINARY = [(b"content-type", b"application/octet-stream")]
WANTED = {
    b"authorization",
    b"content-length",
    b"content-encoding",
    b"inference-header-content-length",
    b"accept-encoding",
}


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


class InferenceMiddleware:
    """The outermost ASGI layer: inference requests here, everything else (lifespan too) to ``app``."""

    def __init__(self, app: Any, svc: Service) -> None:
        self.app = app
        self.svc = svc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        try:
            status, headers, body = await handle(self.svc, match.group(1), match.group(2), scope, receive)
        except ClientGone:
            return
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error(exc: ServiceError) -> tuple[int, Headers, bytes]:
    headers = list(JSON)
    for key, value in (exc.headers or {}).items():
        headers.append((key.lower().encode(), value.encode()))
    return exc.status, headers, orjson.dumps({"error": exc.message})


async def handle(
    svc: Service, name: str, version: str | None, scope: Scope, receive: Receive
) -> tuple[int, Headers, bytes]:
    """One inference request: (status, headers, body). Client mistakes are 4xx; nothing here raises them."""
    started = time.monotonic()
    headers = {k: v for k, v in scope["headers"] if k in WANTED}
    try:
        svc.authorize_header(headers.get(b"authorization"))
        model = svc.repository.get(name, version)
    except ServiceError as exc:
        return error(exc)
    scheduler = svc.scheduler
    assert scheduler is not None
    bound = svc.metrics.bind(model.name, model.version, model.provider)
    try:
        scheduler.admit()
        try:
            body = await read_body(receive, headers, svc.settings.max_body_bytes, svc.settings.body_timeout_seconds)
            header_length = _header_length(headers.get(b"inference-header-content-length"))
            prepare = functools.partial(model.prepare, body, header_length, svc.settings.max_elements)
            if len(body) > DECODE_IN_THREAD_BYTES:
                prepared = await asyncio.get_running_loop().run_in_executor(None, prepare)
            else:
                prepared = prepare()
            timeout = prepared.request.timeout_us
            timing = Timing()
            if timeout is None:
                options, deadline, stop = None, None, None
            else:
                options, deadline = ort.RunOptions(), started + timeout / 1e6
                stop = functools.partial(setattr, options, "terminate", True)
            run = functools.partial(model.execute, prepared, options, timing)
            (payload, json_length), queued = await scheduler.run(run, deadline, stop)
        finally:
            scheduler.release()
    except ServiceError as exc:
        bound.failure(exc.status).inc()
        return error(exc)
    except ClientGone:
        bound.failure(499).inc()
        raise
    except Exception:
        bound.failure(500).inc()
        log.exception("internal error in inference of %s/%s", model.name, model.version)
        return 500, list(JSON), orjson.dumps({"error": "internal error (logged on the server)"})
    out = list(JSON) if json_length is None else [*BINARY, (b"inference-header-content-length", b"%d" % json_length)]
    payload, encoding = compress(payload, headers.get(b"accept-encoding", b""))
    if encoding is not None:
        out.append((b"content-encoding", encoding))
    bound.success.inc()
    bound.queue_seconds.observe(queued)
    bound.compute_seconds.observe(timing.compute_seconds)
    bound.request_seconds.observe(time.monotonic() - started)
    return 200, out, payload


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
                    raise ClientGone()
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
