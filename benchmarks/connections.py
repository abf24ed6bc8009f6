"""Connections under attack: ``bnfold serve`` with a file limit of 1024 (``ulimit -n 1024``, common in containers)
against 3000 hostile connections, idle and slowloris, on the REST and the gRPC port, opened as fast as one client
thread can (``tests/support/hostile.py``: the attacker of the reliability tests).

While the hostile connections are open, the script probes the server every ``--probe-every`` seconds: ``GET
/v2/health/live``, ``GET /v2/health/ready``, gRPC ``ServerLive`` and an inference of the bundled ``digits`` model,
each on a new connection with a 1 s client timeout (the gRPC client retries a refused connection every 50-100 ms
within it), and times the answers. It reports how long each kind of hostile
connection stayed open before the server closed it (the timeouts at their defaults, 10 s for a request head and 5 s
idle, unless ``--header-timeout``/``--idle-timeout``), the server's connection metrics, and its summary log lines.

    python -m benchmarks.connections            # ~20 s, benchmarks/results/connections.json
    python -m benchmarks.connections --quick    # short timeouts (2 s, 1 s), ~10 s
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.environment import host
from service.launcher import free_port, launch
from tests.support.hostile import KINDS, Attack, connection_metrics, limited_serve, server_live

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "connections.json"
INFER = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}]})


def timed_http(port: int, method: str, path: str, body: str | None = None) -> float | None:
    """Seconds to a 200 answer on a new connection, or None (error, other status, or no answer in 1 s)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        return time.perf_counter() - start if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def timed_server_live(port: int) -> float | None:
    """Seconds to a live ServerLive answer (a client that retries a refused connection), or None."""
    start = time.perf_counter()
    return time.perf_counter() - start if server_live(port) else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"host": host(), "file_limit": args.file_limit, "per_kind": args.per_kind}
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_WARMUP_RUNS": "1"}
    if args.header_timeout:
        env["BNFOLD_HEADER_TIMEOUT_SECONDS"] = str(args.header_timeout)
    if args.idle_timeout:
        env["BNFOLD_IDLE_TIMEOUT_SECONDS"] = str(args.idle_timeout)
    log = Path(tempfile.mkdtemp(prefix="bnfold-connections-")) / "server.log"
    command = [*limited_serve(args.file_limit), "--port", str(port), "--grpc-port", str(grpc_port)]
    server = launch(command=command, port=port, env=env, log=log)
    probes: dict[str, list[float | None]] = {"live": [], "ready": [], "grpc ServerLive": [], "infer": []}
    try:
        attack = Attack(port, grpc_port, args.per_kind, round_seconds=0.2).start()
        started = time.monotonic()
        while not attack.launched():
            time.sleep(0.01)
        result["launch_seconds"] = time.monotonic() - started
        while attack.still_open() and time.monotonic() - started < args.limit:
            probes["live"].append(timed_http(port, "GET", "/v2/health/live"))
            probes["ready"].append(timed_http(port, "GET", "/v2/health/ready"))
            probes["grpc ServerLive"].append(timed_server_live(grpc_port))
            probes["infer"].append(timed_http(port, "POST", "/v2/models/digits/infer", INFER))
            time.sleep(args.probe_every)
        result["all_closed_seconds"] = time.monotonic() - started if not attack.still_open() else None
        attack.stop()
        result["metrics"] = connection_metrics(port)
    finally:
        result["exit_code"] = server.stop()
    output = server.output()
    result["summary_lines"] = [line for line in output.splitlines() if "connections closed:" in line]
    result["other_warnings"] = sum(
        ("WARNING" in line or "ERROR" in line) and "connections closed:" not in line for line in output.splitlines()
    )
    result["connect_failures"] = dict(attack.failed)
    result["kinds"] = {}
    for kind in KINDS:
        times = [c.open_seconds for c in attack.conns if c.kind == kind and c.open_seconds is not None]
        result["kinds"][kind] = {
            "connections": sum(c.kind == kind for c in attack.conns),
            "closed": len(times),
            "open_median_s": statistics.median(times) if times else None,
            "open_max_s": max(times, default=None),
        }
    result["probes"] = {
        name: {
            "count": len(times),
            "answered": sum(t is not None for t in times),
            "median_ms": 1000 * statistics.median([t for t in times if t is not None]) if any(times) else None,
            "max_ms": 1000 * max((t for t in times if t is not None), default=0.0),
        }
        for name, times in probes.items()
    }
    return result


def show(result: dict[str, Any]) -> None:
    total = sum(k["connections"] for k in result["kinds"].values())
    print(
        f"bnfold serve, file limit {result['file_limit']}, {total} hostile connections "
        f"({result['per_kind']} of each kind), load average at start {result['host'].get('loadavg_at_start')}"
    )
    print(f"{'hostile kind':<16}{'connections':>12}{'closed':>8}{'open median s':>15}{'open max s':>12}")
    for kind, k in result["kinds"].items():
        median = "-" if k["open_median_s"] is None else f"{k['open_median_s']:.2f}"
        longest = "-" if k["open_max_s"] is None else f"{k['open_max_s']:.2f}"
        print(f"{kind:<16}{k['connections']:>12}{k['closed']:>8}{median:>15}{longest:>12}")
    print(f"\n{'probe (1 s timeout)':<20}{'answered':>12}{'median ms':>11}{'max ms':>9}")
    for name, p in result["probes"].items():
        median = "-" if p["median_ms"] is None else f"{p['median_ms']:.1f}"
        print(f"{name:<20}{p['answered']:>6} of {p['count']:<3}{median:>11}{p['max_ms']:>9.1f}")
    print(f"\nevery hostile connection attempted in {result['launch_seconds']:.2f} s; ", end="")
    closed = result["all_closed_seconds"]
    print("not all closed" if closed is None else f"all closed {closed:.2f} s after the first")
    print(f"connect() failures: {result['connect_failures'] or 'none'}; server exit code {result['exit_code']}")
    for key, value in result["metrics"].items():
        print(f"  {key} {value:g}")
    print(f"summary log lines: {len(result['summary_lines'])}; other warnings or errors: {result['other_warnings']}")
    for line in result["summary_lines"]:
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="header timeout 2 s, idle 1 s")
    p.add_argument("--per-kind", type=int, default=750, help="hostile connections of each of the 4 kinds")
    p.add_argument("--file-limit", type=int, default=1024, help="the server's RLIMIT_NOFILE")
    p.add_argument("--header-timeout", type=float, default=None, help="BNFOLD_HEADER_TIMEOUT_SECONDS")
    p.add_argument("--idle-timeout", type=float, default=None, help="BNFOLD_IDLE_TIMEOUT_SECONDS")
    p.add_argument("--probe-every", type=float, default=0.2, help="seconds between probe rounds")
    p.add_argument("--limit", type=float, default=120.0, help="give up after this many seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.header_timeout = args.header_timeout or 2.0
        args.idle_timeout = args.idle_timeout or 1.0
    result = run(args)
    show(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {args.out}")
    missed = [name for name, p in result["probes"].items() if p["answered"] < p["count"]]
    return 1 if missed or result["all_closed_seconds"] is None or result["exit_code"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
