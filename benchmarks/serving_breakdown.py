"""Where ``bnfold serve`` spends its per-request time: the ASGI app driven in-process, one change at a time.

A diagnostic beside ``benchmarks/serving.py``: no sockets, no uvicorn, no load generator. Each variant is an
ASGI app called directly with a ready request (scope + body) and a no-op ``send``, from one event loop (uvloop
when installed) pinned to one CPU, exactly as uvicorn would call it. Variants take turns in rounds (drift on a
noisy machine hits all alike); reported per request: process CPU time (user + system, every thread: the
figure that decides requests/s on a busy core) and wall-clock p50.

Variants (each "what if" patches the app object this script built, never the service's files):

- ``service path``: ``benchmarks._harness.rest_request_path`` (decode, check, run, encode), no ASGI at all;
- ``minimal FastAPI``: one route doing the same, inline, and again with ``execute`` in a thread
  (``run_in_executor``): the framework's floor and the cost of the thread hop;
- ``bnfold app``: ``service.server.create_app`` with default settings, as served (inference answered by
  ``service.rest.InferenceMiddleware`` ahead of FastAPI, compute threads fed by ``service.runtime.scheduler``).

Earlier versions of this script also patched the app (infer routes matched first, inline scheduler, no-op
metrics); those measurements led to the inference fast path and the queue-fed compute threads, and the
patches no longer apply to the code they measured.

    .venv/bin/python -m benchmarks.serving_breakdown             # tiny JSON and conv224 binary, ~1 min
    .venv/bin/python -m benchmarks.serving_breakdown --rounds 40 --cpu 0
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: the route's string annotations resolve here
from fastapi.responses import Response

from benchmarks.environment import emit
from benchmarks.models import build_conv224, build_tiny

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serving_breakdown.json"


class _Null:
    """A Prometheus metric that does nothing."""

    def labels(self, *_: object) -> _Null:
        return self

    def inc(self, *_: object) -> None:
        pass

    dec = observe = set = inc


def request_body(model: Any, encoding: str) -> tuple[bytes, int | None]:
    import orjson

    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if encoding == "json":
        body = {"inputs": [{"name": inp.name, "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
        return orjson.dumps(body), None
    raw = x.tobytes()
    spec = {"name": inp.name, "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = orjson.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}})
    return header + raw, len(header)


def variants(repo: Path, name: str, body: bytes, header_length: int | None) -> dict[str, Any]:
    """name -> (ASGI app, needs lifespan, patch to apply after start-up)."""
    import service.server as service_app
    from benchmarks._harness import rest_request_path
    from service.runtime.loading import load_model
    from service.runtime.model_config import ModelConfig
    from service.settings import Settings

    # pinned to one CPU: one intra-op thread (ORT's default counts the machine's cores and escapes the affinity)
    pinned = len(os.sched_getaffinity(0))
    settings = Settings(
        model_repository=repo, intra_op_threads=pinned if pinned < (os.cpu_count() or 1) else 0, grpc_port=0
    )
    model = load_model(name, "1", repo / name / "1" / "model.onnx", ModelConfig(), settings)
    pool = __import__("concurrent.futures").futures.ThreadPoolExecutor(2)

    async def direct(scope: dict[str, Any], receive: Any, send: Any) -> None:
        rest_request_path(model, body, header_length, settings.max_elements)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def minimal(hop: bool) -> FastAPI:
        app = FastAPI()

        @app.post("/v2/models/{model_name}/infer")
        async def infer(request: Request, model_name: str) -> Response:
            data = await request.body()
            run = functools.partial(rest_request_path, model, data, header_length, settings.max_elements)
            payload = await asyncio.get_running_loop().run_in_executor(pool, run) if hop else run()
            return Response(payload, media_type="application/json")

        return app

    out: dict[str, Any] = {
        "service path: decode+check+run+encode, no ASGI": (direct, None),
        "minimal FastAPI route, inline": (minimal(hop=False), None),
        "minimal FastAPI route, execute in a thread": (minimal(hop=True), None),
        "bnfold app (as served)": (service_app.create_app(settings), lambda: None),
    }
    return out


async def measure(
    apps: dict[str, Any], path: str, body: bytes, header_length: int | None, rounds: int, per_round: int
) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    if header_length is not None:
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def call(app: Any) -> None:
        sent = False
        status: list[int] = []
        sent_body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message.get("body"):
                sent_body.append(message["body"][:300])

        await app({**scope_base, "state": {}}, receive, send)
        if status != [200]:
            raise RuntimeError(f"status {status}: {b''.join(sent_body)[:300]!r}")

    wall: dict[str, list[float]] = {k: [] for k in apps}
    cpu: dict[str, list[float]] = {k: [] for k in apps}
    for name, app in apps.items():
        try:
            for _ in range(max(20, per_round)):
                await call(app)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}") from None
    for r in range(rounds):
        names = list(apps)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            app = apps[name]
            c0 = time.process_time_ns()
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                await call(app)
                wall[name].append((time.perf_counter_ns() - t0) / 1e3)
            cpu[name].append((time.process_time_ns() - c0) / per_round / 1e3)
    return {
        name: {
            "cpu_us_median_of_rounds": statistics.median(cpu[name]),
            "cpu_us_min_round": min(cpu[name]),
            "wall_us_p50": statistics.median(wall[name]),
            "wall_us_mean": statistics.fmean(wall[name]),
            "requests": len(wall[name]),
        }
        for name in apps
    }


async def run_case(repo: Path, name: str, encoding: str, make: Any, rounds: int) -> dict[str, Any]:
    import contextlib

    import onnx

    model = make()
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    body, header_length = request_body(model, encoding)
    built = variants(repo, name, body, header_length)
    async with contextlib.AsyncExitStack() as stack:
        apps = {}
        for key, (app, patch) in built.items():
            if patch is not None:
                inner = getattr(app, "app", app)  # the FastAPI app behind the inference middleware
                await stack.enter_async_context(inner.router.lifespan_context(inner))
                patch()
            apps[key] = app
        per_round = 100 if name == "tiny" else 30
        return await measure(apps, f"/v2/models/{name}/infer", body, header_length, rounds, per_round)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="rounds (default 20)")
    p.add_argument("--cpu", type=int, default=0, help="pin to this CPU (default 0; -1: no pinning)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # before ORT creates its thread pools: one intra-op thread, as served
    import logging

    logging.getLogger("bnfold").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cases = [("tiny", "json", build_tiny), ("conv224", "binary", build_conv224)]
    result: dict[str, Any] = {"benchmark": "serving_breakdown", "rounds": args.rounds, "cpu": args.cpu, "cases": {}}
    lines = []
    with tempfile.TemporaryDirectory(prefix="bnfold-breakdown-") as tmp:
        for name, encoding, make in cases:
            print(f"measuring {name} {encoding}", file=sys.stderr, flush=True)
            rows = asyncio.run(run_case(Path(tmp) / name, name, encoding, make, args.rounds))
            result["cases"][f"{name}/{encoding}"] = rows
            lines.append(f"{name} {encoding}: per request, in-process ASGI call (no socket, no uvicorn)")
            lines.append(f"  {'variant':<46} {'CPU us':>9} {'wall p50 us':>12} {'wall mean us':>13}")
            for key, row in rows.items():
                lines.append(
                    f"  {key:<46} {row['cpu_us_median_of_rounds']:>9.1f} {row['wall_us_p50']:>12.1f} "
                    f"{row['wall_us_mean']:>13.1f}"
                )
            lines.append("")
    with open("/proc/loadavg") as f:
        result["loadavg_at_end"] = f.read().split()[:3]
    text = "\n".join(lines) + (
        "CPU us: process CPU time per request (all threads; the mean of a round, median over rounds); wall: per request"
    )
    emit(result, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
