"""bnfold on uvloop + httptools vs asyncio + h11: the same server, the same models, one run.

Two ``bnfold serve`` processes up at once, both pinned to the server CPUs (each idle while the other is measured):
one with uvloop and httptools (installed as dependencies), one where both are shadowed by modules that refuse to
import (a directory first on its PYTHONPATH), so uvicorn falls back to asyncio's loop and the h11 parser. Each
server's ``bnfold_server_info`` metric is read back to prove which loop and parser it runs. wrk (one thread,
keep-alive, the serving benchmark's Lua script and request bodies) on the client CPUs. ``--rounds`` rounds; in a
round every cell (model, encoding, concurrency) runs on both servers back to back, the order of the two swapped
every round. Per cell: medians over rounds of requests/s, p50 and the server's CPU µs per request, and the median
of the per-round ratios (fast / fallback), the figure to compare on a noisy machine.

    .venv/bin/python -m benchmarks.event_loop                 # ~3 min: 5 rounds x 4 s per cell
    .venv/bin/python -m benchmarks.event_loop --rounds 1 --duration 2

Writes ``benchmarks/results/event_loop.json`` (``--out``); needs ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    FIXED_BODY_LUA,
    ROOT,
    Bench,
    clean_env,
    infer_url,
    model_ready_paths,
    parse_cpus,
    prepare_models,
    start_server,
    versions,
    wrk_cell,
)
from benchmarks.environment import emit, git_state, host
from service.launcher import ServerProcess

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "event_loop.json"
VARIANTS = ("uvloop+httptools", "asyncio+h11")
#: (model, encoding, connections): tiny JSON at c=1, 8 and 32 plus binary and the 224² model
CELLS = (
    ("tiny", "json", 1),
    ("tiny", "json", 8),
    ("tiny", "json", 32),
    ("tiny", "binary", 8),
    ("conv224", "binary", 8),
)


def start(tmp: Path, variant: str, cpus: set[int] | None, threads: int) -> ServerProcess:
    env = clean_env(**({"BNFOLD_INTRA_OP_THREADS": str(threads)} if threads else {}))
    if variant == "asyncio+h11":
        blocked = tmp / "blocked"
        blocked.mkdir(exist_ok=True)
        for name in ("uvloop", "httptools"):
            (blocked / f"{name}.py").write_text("raise ImportError('shadowed by benchmarks.event_loop')\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocked), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return start_server(tmp, variant, ["--model-repository", str(tmp / "bnfold")], cpus=cpus, env=env)


def server_info(server: ServerProcess) -> str:
    """``loop+http`` as the server's own bnfold_server_info metric reports it."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r"^bnfold_server_info\{(.*)\} 1\.0$", text, re.M)
    if match is None:
        raise RuntimeError(f"{server.name}: no bnfold_server_info in /metrics")
    labels = dict(re.findall(r'(\w+)="(\w+)"', match.group(1)))
    return f"{labels['loop']}+{labels['http']}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else parse_cpus(args.server_cpus)
    client_cpus = None if args.no_pin else parse_cpus(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    threads = len(server_cpus) if server_cpus else 0
    result: dict[str, Any] = {
        "benchmark": "event_loop",
        "machine": {**host(), **git_state("service", "converter")},
        "versions": versions(None),
    }
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-event-loop-") as name:
        tmp = Path(name)
        (tmp / "post.lua").write_text(FIXED_BODY_LUA)
        benches = {b.name: b for b in prepare_models(tmp, "conv224")}
        servers = {v: start(tmp, v, server_cpus, threads) for v in VARIANTS}
        try:
            for s in servers.values():
                s.wait_ready(model_ready_paths(list(benches)), 300)
            reported = {v: server_info(s) for v, s in servers.items()}
            if reported != {v: v for v in VARIANTS}:
                raise RuntimeError(f"the servers run {reported}, not what their names say")
            for model, enc, c in CELLS:  # warm-up
                for v in VARIANTS:
                    url = infer_url(servers[v], model)
                    wrk_cell(tmp / "post.lua", url, benches[model], enc, c, args.warmup, client_cpus)
            for r in range(args.rounds):
                cells: dict[str, Any] = {}
                for model, enc, c in CELLS:
                    order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                    for v in order:
                        s = servers[v]
                        w = wrk_cell(
                            tmp / "post.lua",
                            infer_url(s, model),
                            benches[model],
                            enc,
                            c,
                            args.duration,
                            client_cpus,
                            s.proc.pid,
                        )
                        if w["errors"]:
                            raise RuntimeError(f"{v} {model}/{enc}/c{c}: {w['errors']} errors")
                        cells[f"{v}/{model}/{enc}/c{c}"] = w
                        print(
                            f"round {r + 1} {v:<17} {model}/{enc}/c{c:<3} {w['rps']:>8.1f} req/s  "
                            f"p50 {w['p50_us'] / 1000:.3f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
                rounds.append({"wrk": cells, "loadavg_after": list(os.getloadavg())})
        finally:
            for s in servers.values():
                s.stop()
    result["server_info"] = reported
    result["summary"] = summarize(rounds, benches)
    result["rounds"] = rounds
    result["settings"] = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "server_cpus": sorted(server_cpus) if server_cpus else None,
        "client_cpus": sorted(client_cpus) if client_cpus else None,
        "intra_op_threads": threads,
        "bnfold": "python -m service serve --model-repository DIR --port P; default settings (no BNFOLD_* env but "
        "BNFOLD_INTRA_OP_THREADS when pinned); asyncio+h11: uvloop and httptools shadowed on PYTHONPATH",
    }
    return result


def summarize(rounds: list[dict[str, Any]], benches: dict[str, Bench]) -> list[dict[str, Any]]:
    med = statistics.median
    rows = []
    fast, slow = VARIANTS
    for model, enc, c in CELLS:
        per = {v: [r["wrk"][f"{v}/{model}/{enc}/c{c}"] for r in rounds] for v in VARIANTS}
        row: dict[str, Any] = {"cell": f"{model} {enc} c={c}"}
        for v in VARIANTS:
            row[v] = {
                "rps": med(w["rps"] for w in per[v]),
                "p50_ms": med(w["p50_us"] for w in per[v]) / 1000,
                "p99_ms": med(w["p99_us"] for w in per[v]) / 1000,
                "cpu_us": med(w.get("server_cpu_us_per_request", float("nan")) for w in per[v]),
            }
        row["rps_ratio"] = med(a["rps"] / b["rps"] for a, b in zip(per[fast], per[slow], strict=True))
        row["p50_ratio"] = med(a["p50_us"] / b["p50_us"] for a, b in zip(per[fast], per[slow], strict=True))
        rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    fast, slow = VARIANTS
    head = (
        f"{'cell':<20} {'req/s ' + fast:>24} {'req/s ' + slow:>19} {'ratio':>6}  "
        f"{'p50 ms':>7} {'p50 ms':>7} {'ratio':>6}  {'CPU us/req':>10} {'CPU us/req':>10}"
    )
    lines = [head, "-" * len(head)]
    for row in result["summary"]:
        a, b = row[fast], row[slow]
        lines.append(
            f"{row['cell']:<20} {a['rps']:>24.1f} {b['rps']:>19.1f} {row['rps_ratio']:>6.2f}  "
            f"{a['p50_ms']:>7.3f} {b['p50_ms']:>7.3f} {row['p50_ratio']:>6.2f}  "
            f"{a['cpu_us']:>10.0f} {b['cpu_us']:>10.0f}"
        )
    s, m = result["settings"], result["machine"]
    loads = [r["loadavg_after"][0] for r in result["rounds"]]
    lines += [
        "",
        f"ratios: median over rounds of the per-round {fast} / {slow} figure (p50 ratio < 1: faster)",
        f"servers report: {result['server_info']}; on CPU {s['server_cpus']}, wrk on CPU {s['client_cpus']}; "
        f"{s['rounds']} rounds x {s['duration_s']} s per cell, the two servers' order swapped every round",
        f"{m['cpu']}, {m['logical_cpus']} CPUs; load average at start {m.get('loadavg_at_start', ['?'])[0]:.2f}, "
        f"after each round {', '.join(f'{x:.2f}' for x in loads)}; commit {m.get('commit', '?')[:7]}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds over all cells (default 5)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (default 4)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per cell and server (default 2)")
    p.add_argument("--server-cpus", default="0", help="CPUs for the servers (default 0)")
    p.add_argument("--client-cpus", default="1", help="CPUs for wrk and this script (default 1)")
    p.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    result = run(args)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["loadavg_at_end"] = list(os.getloadavg())
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
