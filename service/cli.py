"""The ``bnfold`` command: ``serve`` lives here; ``convert`` and ``inspect`` come from the converter.

``bnfold serve`` exit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C included), 2 for bad settings, 3 when
start-up fails (for instance the ``strict`` provider policy and a requested provider that is not active).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter import cli as converter_cli

if TYPE_CHECKING:
    from service.settings import Settings

STARTUP_FAILED = 3
log = logging.getLogger("bnfold.service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold", description="Fold BatchNorm into ONNX weights, prove it exact, and serve the result."
    )
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
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        sys.stderr.write(f"bnfold: error: setting {where}: {first['msg']}\n")
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
    return serve(settings, overrides)


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
                os.environ[f"BNFOLD_{key.upper()}"] = str(value)
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
