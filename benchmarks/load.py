"""Load test: many requests at high concurrency on the default model; every answer must be 200.

What runs:

- the server: ``python -m service serve --port P`` as a subprocess, default settings (no ``BNFOLD_*``
  variables): the bundled repository, model ``digits``; pinned to CPU 0 (``--server-cpus``);
- one checked request first (the README's ``examples/requests/digit.json``: a zero, top-3 classification;
  the answer must rank class 0 first);
- the client: ``wrk`` (one thread, ``--concurrency`` keep-alive connections, pinned to CPU 1) POSTing that
  same body, with a Lua script that counts every status code and stops after exactly the number of answers
  asked for; first ``--warmup`` requests (not reported), then ``--requests`` requests, the measured run;
- the server's resident memory (``VmRSS`` in ``/proc/<pid>/status``) after the warm-up ("before"), every
  0.5 s during the measured run (the peak is reported), and at its end ("after");
- finally SIGTERM; the server must exit with code 0.

Targets: no answer other than 200 and no socket error (connect, read, write, timeout); RSS growth (after -
before) at most 10 MB; clean exit. The exit code is 0 when every target is met, else 1.

    .venv/bin/python -m benchmarks.load                          # 100k requests at concurrency 64 (~1-2 min)
    .venv/bin/python -m benchmarks.load --requests 5000          # a quick sanity run

Writes ``benchmarks/results/load.json`` (``--out``); needs ``wrk`` on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import environment
from benchmarks._harness import COUNTING_LUA, package_versions, parse_cpus, rss_mb, run_wrk, start_server, wrk_version
from benchmarks.environment import emit

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "load.json"
BODY = ROOT / "examples" / "requests" / "digit.json"
MODEL = "digits"
RSS_GROWTH_LIMIT_MB = 10.0


# ------------------------------------------------------------------------------------------------ helpers
def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status: int = r.status
            return status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            with contextlib.suppress(OSError, RuntimeError):
                self.samples.append((round(time.monotonic() - self._t0, 2), round(rss_mb(self.pid), 2)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def wrk(url: str, script: Path, body: Path, count: int, connections: int, cpus: set[int] | None) -> dict[str, Any]:
    """``count`` answers through wrk (1 thread, ``connections`` keep-alive connections).

    wrk runs for a duration, not a count: the script stops its thread at ``count`` answers and says so on
    stdout, and the harness sends wrk SIGINT then, so that wrk's summary (and its duration) ends there.
    """
    budget = max(60, int(count / 20) + 60)  # -d is only a safety net (20 req/s would be very slow)
    stats = run_wrk(
        script, url, [str(body), str(count)], connections=connections, seconds=budget, cpus=cpus,
        marker="LOAD_JSON", stop_marker="LIMIT_REACHED", latency=True,
    )  # fmt: skip
    stats["wall_s"] = stats["duration_us"] / 1e6  # wrk's own clock, from its start to the SIGINT
    stats["rps"] = stats["answered"] / stats["wall_s"] if stats["wall_s"] else 0.0
    stats["non_200"] = sum(n for s, n in stats["statuses"].items() if s != "200")
    stats["socket_errors"] = sum(v for k, v in stats["errors"].items() if k != "status")
    return stats


def check_answer(url: str, body: bytes) -> str:
    status, payload = http("POST", f"{url}/v2/models/{MODEL}/infer", body)
    if status != 200:
        raise RuntimeError(f"check request answered {status}: {payload[:300]!r}")
    top = json.loads(payload)["outputs"][0]["data"][0]  # "value:index:label"
    if top.split(":")[1] != "0":
        raise RuntimeError(f"check request: expected class 0 first, got {top}")
    return str(top)


def versions() -> dict[str, str | None]:
    out = package_versions(("uvicorn", "uvloop", "httptools", "fastapi", "onnxruntime"), missing="-")
    out["wrk"] = (wrk_version() or "").split(" [")[0]
    return out


# ------------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else args.server_cpus
    client_cpus = None if args.no_pin else args.client_cpus
    server_set = parse_cpus(server_cpus) if server_cpus else None
    client_set = parse_cpus(client_cpus) if client_cpus else None
    body = BODY.read_bytes()
    host = {**environment.host(), **environment.git_state("service")}  # load average before the run
    with tempfile.TemporaryDirectory(prefix="bnfold-load-") as tmpdir:
        tmp = Path(tmpdir)
        script = tmp / "load.lua"
        script.write_text(COUNTING_LUA)
        server = start_server(tmp, "server", cpus=server_set)
        exit_code: int | None = None
        try:
            ready_s = server.wait_ready(timeout=120)
            top = check_answer(server.url, body)
            url = f"{server.url}/v2/models/{MODEL}/infer"
            rss_start = rss_mb(server.proc.pid)
            warm = wrk(url, script, BODY, args.warmup, args.concurrency, client_set) if args.warmup else None
            rss_before = rss_mb(server.proc.pid)
            sampler = RssSampler(server.proc.pid)
            sampler.start()
            try:
                stats = wrk(url, script, BODY, args.requests, args.concurrency, client_set)
            finally:
                sampler.stop()
            rss_after = rss_mb(server.proc.pid)
            check_answer(server.url, body)  # still right after the load
        finally:
            exit_code = server.stop(timeout=60)
            log = server.tail(200)
    peak = max([rss_after, *(mb for _, mb in sampler.samples)])
    growth = rss_after - rss_before
    targets = [
        {"target": "answers other than 200", "value": stats["non_200"], "limit": 0, "met": stats["non_200"] == 0},
        {
            "target": "socket errors (connect/read/write/timeout)",
            "value": stats["socket_errors"],
            "limit": 0,
            "met": stats["socket_errors"] == 0,
        },
        {
            "target": "answers received",
            "value": stats["answered"],
            "limit": f">= {args.requests}",
            "met": stats["answered"] >= args.requests,
        },
        {
            "target": "RSS growth after - before (MB)",
            "value": round(growth, 2),
            "limit": f"<= {RSS_GROWTH_LIMIT_MB:g}",
            "met": growth <= RSS_GROWTH_LIMIT_MB,
        },
        {"target": "exit code after SIGTERM", "value": exit_code, "limit": 0, "met": exit_code == 0},
    ]
    return {
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "model": MODEL,
            "body": str(BODY.relative_to(ROOT)),
            "body_bytes": len(body),
            "server": "python -m service serve --port P (default settings, no BNFOLD_* variables)",
        },
        "ready_s": round(ready_s, 2),
        "check_answer_top1": top,
        "warmup": warm,
        "run": stats,
        "rss_mb": {
            "at_ready": round(rss_start, 2),
            "before": round(rss_before, 2),
            "after": round(rss_after, 2),
            "peak": round(peak, 2),
            "growth": round(growth, 2),
            "samples": sampler.samples,
        },
        "exit_code": exit_code,
        "targets": targets,
        "all_met": all(t["met"] for t in targets),
        "server_log_tail": log,
        "versions": versions(),
        "machine": host,
    }


def table(result: dict[str, Any]) -> str:
    s, r, m = result["settings"], result["run"], result["rss_mb"]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())) or "-"
    rows = [
        ("requests answered", f"{r['answered']:,}"),
        ("concurrency (connections)", f"{s['concurrency']}"),
        ("status codes", statuses),
        ("socket errors", f"{r['socket_errors']}"),
        ("wall time", f"{r['wall_s']:.1f} s"),
        ("throughput", f"{r['rps']:,.0f} req/s"),
        ("latency p50", f"{r['p50_us'] / 1000:.2f} ms"),
        ("latency p99", f"{r['p99_us'] / 1000:.2f} ms"),
        ("latency p99.9 / max", f"{r['p999_us'] / 1000:.2f} / {r['max_us'] / 1000:.2f} ms"),
        ("server RSS at ready", f"{m['at_ready']:.1f} MB"),
        (f"server RSS before (after {s['warmup']:,} warm-up)", f"{m['before']:.1f} MB"),
        ("server RSS after", f"{m['after']:.1f} MB"),
        ("server RSS growth / peak", f"{m['growth']:+.1f} MB / {m['peak']:.1f} MB"),
        ("exit code after SIGTERM", f"{result['exit_code']}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("Targets:")
    for t in result["targets"]:
        lines.append(
            f"  {t['target']:<44} {t['value']!s:>8}  (target {t['limit']}): {'met' if t['met'] else 'NOT met'}"
        )
    v, mc = result["versions"], result["machine"]
    lines.append("")
    lines.append(
        f"model {s['model']}, body {s['body']} ({s['body_bytes']} B, top-3 classification); server: default "
        f"settings, uvicorn {v['uvicorn']} (uvloop {v['uvloop']}, httptools {v['httptools']}), onnxruntime "
        f"{v['onnxruntime']}; client: {v['wrk']}, 1 thread, keep-alive; server on CPU {s['server_cpus']}, "
        f"wrk on CPU {s['client_cpus']}; {mc['cpu']}, {mc['logical_cpus']} CPUs"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000, help="answers in the measured run (default 100000)")
    p.add_argument("--concurrency", type=int, default=64, help="wrk keep-alive connections (default 64)")
    p.add_argument("--warmup", type=int, default=2000, help="answers before RSS 'before' (default 2000)")
    p.add_argument("--server-cpus", default="0", help="CPUs for the server (default 0)")
    p.add_argument("--client-cpus", default="1", help="CPUs for wrk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        p.error("--requests and --concurrency must be at least 1, --warmup at least 0")
    if shutil.which("wrk") is None:
        p.error("wrk is not on PATH (Debian: apt-get install wrk)")
    if (os.cpu_count() or 1) < 2:
        args.no_pin = True
    result = run(args)
    text = table(result)
    result["command"] = "python -m benchmarks.load " + " ".join(argv if argv is not None else sys.argv[1:])
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    emit(result, text, args.out)
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
