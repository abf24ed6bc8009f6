"""Per-replica capacity: what one ``bnfold serve`` replica on 1 CPU sustains, for autoscaling targets.

What runs, for each model (``digits``: the bundled 8×8 classifier, V2 JSON body; ``conv224``: the serving
benchmark's 1×3×224×224 four-stage Conv+BN network, V2 binary-extension body as tritonclient sends it):

- the server: ``python -m service serve MODEL --model-name NAME --port P`` pinned to CPU 0 (``taskset``) with
  ``BNFOLD_INTRA_OP_THREADS=1`` — one CPU, as the manifests' ``limits.cpu: 1`` with ``BNFOLD_INTRA_OP_THREADS``
  from that limit; every other setting at its default (as in the manifests);
- the client: ``wrk`` (one thread, keep-alive connections) pinned to CPU 1, POSTing one fixed body, for
  ``--seconds`` at each concurrency of ``--concurrency`` (closed loop: concurrency = requests in flight);
  ``--rounds`` rounds, the concurrency order reversed every other round; per concurrency the median of the
rounds' figures.

Reported per model: requests/s and p50/p99 latency at each concurrency, p99 relative to concurrency 1; the
capacity (the highest requests/s seen); the CPU-bound capacity (1 CPU-second over the server's lowest CPU time
per request: what a dedicated CPU would sustain, less sensitive to a loaded machine); and the *knee*: the
lowest concurrency whose p99 is at least twice the p99 at concurrency 1. The manifests take their autoscaling
targets from these (docs/kubernetes.md, "Autoscaling"): Knative's concurrency target is the knee (the requests
in flight per replica at which p99 latency is twice the unloaded one).

    python -m benchmarks.capacity                       # both models, about 2 × 7 × 2 × 5 s of load
    python -m benchmarks.capacity --models digits --seconds 3 --rounds 1

Writes ``benchmarks/results/capacity.json`` (``--out``); needs ``wrk`` (Debian: ``apt-get install wrk``).
Every answer must be 200 (else exit code 1).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import environment, models, serving
from benchmarks._harness import FIXED_BODY_LUA, clean_env, model_ready_paths, start_server
from benchmarks.environment import emit
from service.launcher import ServerProcess

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "capacity.json"
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
DIGITS = serving.ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
ENCODING = {"digits": "json", "conv224": "binary"}


def prepare(tmp: Path, name: str) -> tuple[Path, serving.Bench]:
    """The model file served and its request bodies (as ``benchmarks.serving`` builds them)."""
    import onnx

    import converter

    model = onnx.load(str(DIGITS)) if name == "digits" else models.build_conv224()
    path = tmp / name / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    folded = converter.convert(model).model
    inp = model.graph.input[0]
    x = np.random.default_rng(0).standard_normal([d.dim_value or 1 for d in inp.type.tensor_type.shape.dim])
    role = "image" if name == "conv224" else "tiny"
    bench = serving.Bench.write(name, role, "", folded, x.astype(np.float32), tmp, {})
    return path, bench


def start(tmp: Path, name: str, path: Path, cpus: set[int] | None) -> ServerProcess:
    """``bnfold serve MODEL --model-name NAME``, one ONNX Runtime thread, every other setting at its default."""
    env = clean_env(BNFOLD_INTRA_OP_THREADS="1")
    return start_server(tmp, name, [str(path), "--model-name", name], cpus=cpus, env=env)


def measure(args: argparse.Namespace, tmp: Path, name: str, lua: Path) -> dict[str, Any]:
    path, bench = prepare(tmp, name)
    server_cpus, client_cpus = (None, None) if args.no_pin else ({0}, {1})
    server = start(tmp, name, path, server_cpus)
    encoding = ENCODING[name]
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in args.concurrency}
    try:
        server.wait_ready(model_ready_paths([name]), 120)
        serving.check(server, bench, encoding)
        url = serving.infer_url(server, name)
        serving.wrk_cell(lua, url, bench, encoding, max(args.concurrency), 2, client_cpus)  # warm-up, not reported
        for round_no in range(args.rounds):
            order = list(args.concurrency) if round_no % 2 == 0 else list(reversed(args.concurrency))
            for c in order:
                r = serving.wrk_cell(lua, url, bench, encoding, c, args.seconds, client_cpus, server.proc.pid)
                runs[c].append(r)
                serving.log(
                    f"{name} c={c}: {r['rps']:.0f} req/s, p99 {r['p99_us'] / 1000:.1f} ms, errors {r['errors']}"
                )
    finally:
        server.stop()
    rows = []
    for c in args.concurrency:
        rows.append(
            {
                "concurrency": c,
                # each figure the median over rounds (one noisy round moves none of them)
                "rps": statistics.median(r["rps"] for r in runs[c]),
                "p50_ms": statistics.median(r["p50_us"] for r in runs[c]) / 1000,
                "p99_ms": statistics.median(r["p99_us"] for r in runs[c]) / 1000,
                "p99_ms_rounds": [r["p99_us"] / 1000 for r in runs[c]],
                "rps_rounds": [r["rps"] for r in runs[c]],
                "errors": sum(r["errors"] for r in runs[c]),
                "server_cpu_ms_per_request": statistics.median(
                    r.get("server_cpu_us_per_request", float("nan")) / 1000 for r in runs[c]
                ),
            }
        )
    base = rows[0]["p99_ms"]
    for row in rows:
        row["p99_vs_c1"] = row["p99_ms"] / base
    cpu_ms = min(row["server_cpu_ms_per_request"] for row in rows)
    knee = next((row["concurrency"] for row in rows if row["p99_ms"] >= 2 * base), None)
    return {
        "model": name,
        "encoding": encoding,
        "body_bytes": bench.body_bytes[encoding],
        "rows": rows,
        "capacity_rps": max(row["rps"] for row in rows),
        # what one whole CPU would sustain at the lowest CPU cost per request measured (load-independent-ish)
        "cpu_bound_rps": 1000 / cpu_ms,
        "p99_doubles_at_concurrency": knee,
        # Knative's target: requests in flight per replica; at the knee the p99 is twice the unloaded one
        "concurrency_target": knee if knee is not None else max(args.concurrency),
        "errors": sum(row["errors"] for row in rows),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("capacity: needs wrk on PATH (Debian: apt-get install wrk)")
    result: dict[str, Any] = {
        "benchmark": "capacity",
        "host": environment.host(),
        "git": environment.git_state("service", "benchmarks"),
        "settings": {"server_cpus": None if args.no_pin else "0", "intra_op_threads": 1, "seconds": args.seconds},
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bnfold-capacity-") as t:
        tmp = Path(t)
        lua = tmp / "bench.lua"
        lua.write_text(FIXED_BODY_LUA)
        for name in args.models:
            result["models"].append(measure(args, tmp, name, lua))
    import os

    result["host"]["loadavg_at_end"] = list(os.getloadavg())
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Per-replica capacity: bnfold serve on {'CPU 0' if result['settings']['server_cpus'] else 'any CPU'}, "
        f"1 intra-op thread; wrk on CPU 1; {result['settings']['seconds']:.0f} s per cell, medians over rounds",
        f"load average at start {result['host'].get('loadavg_at_start')}, "
        f"at end {result['host'].get('loadavg_at_end')}",
        "",
        "| model | body | concurrency | req/s | p50 ms | p99 ms | p99 / p99(c=1) | server CPU ms/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in result["models"]:
        for row in m["rows"]:
            lines.append(
                f"| {m['model']} | {m['encoding']} {m['body_bytes']} B | {row['concurrency']} | {row['rps']:.0f} | "
                f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['p99_vs_c1']:.2f} | "
                f"{row['server_cpu_ms_per_request']:.2f} |"
            )
    lines += [
        "",
        "| model | capacity req/s (measured) | 1 CPU / server CPU per request | p99 doubles at concurrency "
        "| concurrency target |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m in result["models"]:
        knee = m["p99_doubles_at_concurrency"]
        lines.append(
            f"| {m['model']} | {m['capacity_rps']:.0f} | {m['cpu_bound_rps']:.0f} | "
            f"{knee if knee is not None else 'not reached'} | "
            f"{m['concurrency_target']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ENCODING), default=["digits", "conv224"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true", help="run server and client on any CPU")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.concurrency = sorted(set(args.concurrency))
    result = run(args)
    emit(result, table(result), args.out)
    return 1 if any(m["errors"] for m in result["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
