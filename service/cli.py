"""The ``bnfold`` command: ``serve`` lives here; ``convert`` and ``inspect`` come from the converter.

``bnfold serve`` exit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C included), 2 for bad settings, 3 when
start-up fails (for instance the ``strict`` provider policy and a requested provider that is not active, or the
HTTP or gRPC port taken by another server: checked before any model loads).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import logging.config
import os
import signal
import socket
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter import cli as converter_cli

if TYPE_CHECKING:
    from service.settings import Settings

STARTUP_FAILED = 3
log = logging.getLogger("bnfold.service")


def version() -> str:
    """bnfold's version: the installed package's metadata, else (a clone run without installing) pyproject.toml's."""
    try:
        return importlib.metadata.version("bnfold")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold", description="Fold BatchNorm into ONNX weights, prove it exact, and serve the result."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,inspect,serve}")
    converter_cli.add_commands(sub)
    serve = sub.add_parser(
        "serve",
        help="serve models over the Open Inference Protocol V2 (KServe/Triton REST)",
        description="Serve ONNX models over HTTP (Open Inference Protocol V2), folding BatchNorm on load. "
        "Every setting can also come from the environment (BNFOLD_HOST, BNFOLD_PORT, ...; see docs/serving.md); "
        "flags win over the environment. With no model and no repository: the bundled `digits` model.",
    )
    serve.add_argument(
        "model",
        nargs="?",
        type=Path,
        help="one ONNX model to serve: a file, or a directory holding exactly one .onnx file (KServe's /mnt/models)",
    )
    serve.add_argument("--model-name", help="name to serve that one model under (default: its file stem)")
    serve.add_argument("--model-repository", type=Path, help="repository DIR/<name>/<version>/model.onnx")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", "--http-port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--workers", type=int, help="server processes (default 1)")
    serve.add_argument("--grpc-port", type=int, help="V2 gRPC port (default 8001; 0: no gRPC)")
    serve.add_argument(
        "--model-control-mode",
        choices=("none", "explicit"),
        help="none: load every model at start (default); explicit: only --load-model ones, then what the "
        "repository API loads",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start (repeatable; '*': all)",
    )
    serve.set_defaults(run=_run_serve)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    # imported here: convert/inspect start faster and lighter without the web stack and pydantic
    from pydantic import ValidationError  # noqa: PLC0415

    from service.logging_setup import json_from_the_start  # noqa: PLC0415
    from service.settings import Settings, unknown_variables  # noqa: PLC0415

    json_from_the_start()  # the warnings below already in the log format asked for
    try:
        for name in unknown_variables():
            log.warning("%s names no bnfold setting; ignored", name)
    except ValueError as exc:
        sys.stderr.write(f"bnfold: error: {exc}\n")
        return 2

    overrides: dict[str, Any] = {
        "model": args.model,
        "model_name": args.model_name,
        "model_repository": args.model_repository,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "grpc_port": args.grpc_port,
        "model_control_mode": args.model_control_mode,
        "load_models": args.load_model,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        sys.stderr.write(f"bnfold: error: setting {where}: {message}\n" if where else f"bnfold: error: {message}\n")
        return 2
    if settings.model is not None:
        from service.errors import ModelLoadError  # noqa: PLC0415
        from service.runtime.repository import single_model_file  # noqa: PLC0415

        try:
            single_model_file(settings.model)
        except ModelLoadError as exc:
            sys.stderr.write(f"bnfold: error: {exc}\n")
            return 2
    if settings.model_name is not None and settings.model is None:
        sys.stderr.write("bnfold: error: --model-name (BNFOLD_MODEL_NAME) names the single model: give MODEL too\n")
        return 2
    if settings.model is None and not settings.model_repository.is_dir():
        sys.stderr.write(f"bnfold: error: {settings.model_repository}: model repository not found\n")
        return 2
    taken = taken_port(settings)
    if taken is not None:
        sys.stderr.write(f"bnfold: error: {taken}\n")
        return STARTUP_FAILED
    return serve(settings, overrides)


def taken_port(settings: Settings) -> str | None:
    """Why ``bnfold serve`` cannot listen where the settings say (a port another process holds: a second server on
    the same machine), or None. Checked before the models load, so the server never announces readiness first."""
    ports = [("gRPC", settings.grpc_port, "--grpc-port (0 turns gRPC off)"), ("HTTP", settings.port, "--port")]
    if settings.port and settings.port == settings.grpc_port:
        return f"HTTP and gRPC cannot share port {settings.port}: choose another with --port or --grpc-port"
    for transport, port, flag in ports:
        if port == 0:
            continue
        problem = _cannot_listen(settings.host, port)
        if problem is not None:
            return f"{transport} cannot listen on {settings.host}:{port} ({problem}): choose another port with {flag}"
    return None


def _cannot_listen(host: str, port: int) -> str | None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError:
        return None  # an unresolvable host: the server's own bind says so
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no clash
        try:
            probe.bind(address)
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
    return None


def serve(settings: Settings, overrides: dict[str, Any] | None = None) -> int:
    """Run uvicorn until SIGTERM/SIGINT; the in-flight requests finish first."""
    import uvicorn  # noqa: PLC0415  (convert/inspect do not need the web stack)

    from service import connections  # noqa: PLC0415

    logging.getLogger("bnfold").setLevel(settings.log_level.upper())
    if settings.log_format == "json":
        from service.logging_setup import json_log_config  # noqa: PLC0415

        log_config: dict[str, Any] = json_log_config(settings.log_level)
        logging.config.dictConfig(log_config)  # this process now; uvicorn applies it again (and in each worker)
    else:
        log_config = uvicorn.config.LOGGING_CONFIG
    # uvicorn re-raises the signal it shut down on; a handler here makes that a clean exit (code 0)
    signal.signal(signal.SIGTERM, lambda *_: None)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config,
        "access_log": False,
        # no proxy-header rewriting (nothing here trusts X-Forwarded-*); no per-response Server/Date work
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
        "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
        "timeout_keep_alive": settings.idle_timeout_seconds,
        # uvloop and httptools when installed (dependencies where wheels exist); service.rest.serverinfo reports which
        "loop": "auto",
        "http": connections.protocol(),  # uvicorn's "auto" parser with the connection guard mixed in
    }
    if settings.workers > 1:
        # worker processes build their own app from the environment: pass the flags on through it
        for key, value in (overrides or {}).items():
            if value is not None:
                os.environ[f"BNFOLD_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
        uvicorn.run("service.server:create_app", factory=True, workers=settings.workers, **common)
        return 0
    from service.server import create_app  # noqa: PLC0415

    server = uvicorn.Server(uvicorn.Config(create_app(settings), **common))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    converter_cli.configure_logging()
    if args.command == "serve":
        logging.getLogger("bnfold").setLevel(logging.INFO)
    return converter_cli.run(args)
