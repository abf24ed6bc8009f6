"""What the server runs on: its event loop and uvicorn's HTTP parser (uvloop and httptools where installed).

Both are dependencies wherever they have wheels; without them uvicorn falls back to asyncio's own loop and the
pure-Python h11 parser, about half the throughput on small models. The start-up log and the
``bnfold_server_info`` metric say which ones run.
"""

from __future__ import annotations

import asyncio


def event_loop() -> str:
    """The running event loop's implementation: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def http_parser() -> str:
    """What uvicorn's ``http="auto"`` (the setting ``bnfold serve`` uses) resolves to: ``httptools`` or ``h11``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # noqa: PLC0415  (the web stack, only when serving)

    return "httptools" if AutoHTTPProtocol.__module__.endswith("httptools_impl") else "h11"
