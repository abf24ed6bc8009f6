"""Dynamic batching off vs on: p50/p99 latency and requests/s per model, transport and concurrency.

Two ``bnfold serve`` processes, both pinned to CPU 0 (only one is under load at a time) on the same repository:
``off`` (default settings) and ``on`` (``BNFOLD_DYNAMIC_BATCHING=true``, ``BNFOLD_MAX_BATCH_SIZE`` from
``--max-batch-size``, ``BNFOLD_MAX_QUEUE_DELAY_MICROSECONDS`` from ``--max-queue-delay-us``). Every model has a
dynamic batch dimension and carries BatchNorm (folded on load):

- ``tiny``: 1×20, Gemm 20→64 + BN + Relu + Gemm 64→10 (overhead-bound);
- ``mlp``: 1×1024, Gemm 1024→2048 + BN + Relu + Gemm 2048→2048 + BN + Relu + Gemm 2048→10 (~25 MB of weights:
  a batch-of-one run is bound by reading the weights, which a batch reads once);
- ``conv224``: 1×3×224×224, the serving benchmark's 4× [Conv 3×3 s2 + BN + Relu] + GAP + Gemm;
- ``resnet18``: 1×3×224×224, ``converter.zoo.resnet()`` (11.7 M parameters).

Load generators pinned to CPU 1: ``wrk`` (REST JSON and REST binary, fixed body) and ``h2load`` (gRPC, a
pre-built ``ModelInferRequest`` as in benchmarks/grpc.py). The matrix is limited to fit a loaded 2-core host: REST
binary for tiny and mlp at c=1/8/32/64, for conv224 at c=1/32 and resnet18 at c=1/8 (one batch-of-one ResNet-18
run takes ~0.3 s on the loaded core, so 32 connections would not complete one round of requests in a cell);
REST JSON and gRPC for tiny and mlp at c=1/32. resnet18 cells last ``--slow-factor`` times longer.

Before the rounds, a warm-up cell per model shows each server every batch size it will see (uncounted). Each
(model, transport, c) then runs off and on back to back, the order alternating every round; figures are medians
over rounds. After every cell the benchmark waits for that server to drain (one request through the same model):
wrk stops after its duration, but the requests it left in flight are still computed, and both servers share
CPU 0, so a backlog would load the next cell. Before the load every (server, model, transport) answer is checked
against in-process ONNX Runtime; after it, the ``on`` server's ``bnfold_batch_size`` histogram gives the mean rows
per run (over the whole run, c=1 cells included).

    .venv/bin/python -m benchmarks.batching                # ~10 min, benchmarks/results/batching.json
    .venv/bin/python -m benchmarks.batching --quick        # ~1 min: tiny and mlp REST binary, mlp gRPC, c=1/32
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import FIXED_BODY_LUA, Bench, check, clean_env, parse_cpus, post, run_wrk
from benchmarks.environment import emit, git_state, host
from benchmarks.grpc import GRPC_PATH, check_grpc, grpc_body, h2load
from benchmarks.models import build_conv224, build_tiny
from service.launcher import ServerProcess, free_port, launch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "batching.json"

#: (model, transport) -> concurrencies; the order is the order of the table
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("mlp", "binary"): (1, 8, 32, 64),
    ("tiny", "binary"): (1, 8, 32, 64),
    ("conv224", "binary"): (1, 32),
    ("resnet18", "binary"): (1, 8),
    ("mlp", "json"): (1, 32),
    ("tiny", "json"): (1, 32),
    ("mlp", "grpc"): (1, 32),
    ("tiny", "grpc"): (1, 32),
}
QUICK: dict[tuple[str, str], tuple[int, ...]] = {
    ("mlp", "binary"): (1, 32),
    ("tiny", "binary"): (1, 32),
    ("mlp", "grpc"): (1, 32),
}


# ------------------------------------------------------------------------------------------------ models
def build_mlp() -> Any:
    from converter.zoo import Builder

    b = Builder(seed=0)
    x = b.input("input", ["batch", 1024])
    h = b.relu(b.bn(b.gemm(x, 1024, 2048), 2048))
    h = b.relu(b.bn(b.gemm(h, 2048, 2048), 2048))
    b.output(b.gemm(h, 2048, 10), "logits")
    return b.build("mlp")


def build_resnet18() -> Any:
    from converter import zoo

    return zoo.resnet(batch="batch")


MODELS: dict[str, tuple[Callable[[], Any], tuple[int, ...]]] = {
    "tiny": (lambda: build_tiny("batch"), (1, 20)),
    "mlp": (build_mlp, (1, 1024)),
    "conv224": (lambda: build_conv224("batch"), (1, 3, 224, 224)),
    "resnet18": (build_resnet18, (1, 3, 224, 224)),
}


def prepare(tmp: Path, names: Sequence[str]) -> dict[str, Bench]:
    """Repository (models with BN, folded on load), request bodies, the in-process reference output."""
    import onnx

    import converter

    rng = np.random.default_rng(0)
    bodies = tmp / "bodies"
    bodies.mkdir(parents=True)
    out: dict[str, Bench] = {}
    for name in names:
        make, shape = MODELS[name]
        model = make()
        folded = converter.convert(model).model
        src = tmp / "repo" / name / "1"
        src.mkdir(parents=True)
        onnx.save(model, str(src / "model.onnx"))
        x = rng.standard_normal(shape).astype(np.float32)
        nodes = {"original": len(model.graph.node), "folded": len(folded.graph.node)}
        out[name] = Bench.write(name, name, name, folded, x, bodies, nodes)
        (bodies / f"{name}.grpc").write_bytes(grpc_body(out[name]))
    return out


# ------------------------------------------------------------------------------------------------ load
def cell(
    mode: ServerProcess,
    grpc_port: int,
    bench: Bench,
    transport: str,
    c: int,
    seconds: float,
    lua: Path,
    cpus: set[int] | None,
) -> dict[str, Any]:
    if transport == "grpc":
        url = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}"
        body = bench.binary_body.with_suffix(".grpc")
        return h2load(url, body, ["content-type: application/grpc", "te: trailers"], c, seconds, False, cpus)
    if transport == "json":
        args = [str(bench.json_body), "-", "application/json"]
    else:
        args = [str(bench.binary_body), str(bench.binary_header_length), "application/octet-stream"]
    url = f"{mode.url}/v2/models/{bench.name}/infer"
    r = run_wrk(lua, url, args, connections=c, seconds=seconds, cpus=cpus, marker="BENCH_JSON")
    return {
        "requests": r["requests"],
        "errors": sum(r[k] for k in ("connect", "read", "write", "status", "timeout")),
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
    }


def drain(server: ServerProcess, bench: Bench) -> None:
    """Wait until the requests a cell left in flight are computed: one request behind them, through the same model."""
    status, _, body = post(
        f"{server.url}/v2/models/{bench.name}/infer", bench.binary_body.read_bytes(), bench.binary_header_length
    )
    if status != 200:
        raise RuntimeError(f"{server.name}/{bench.name}: drain request answered {status}: {body[:200]!r}")


def mean_batch_sizes(server: ServerProcess) -> dict[str, float]:
    """Rows per ONNX Runtime run, per model, from the server's ``bnfold_batch_size`` histogram."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    sums: dict[str, dict[str, float]] = {}
    for kind, model, value in re.findall(
        r'^bnfold_batch_size_(sum|count)\{[^}]*model="([^"]+)"[^}]*\} (\S+)', text, re.M
    ):
        sums.setdefault(model, {})[kind] = float(value)
    return {m: v["sum"] / v["count"] for m, v in sums.items() if v.get("count")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else parse_cpus(args.server_cpus)
    client_cpus = None if args.no_pin else parse_cpus(args.client_cpus)
    matrix = QUICK if args.quick else MATRIX
    names = list(dict.fromkeys(m for m, _ in matrix))
    result: dict[str, Any] = {
        "host": host(),
        "git": git_state("service", "benchmarks"),
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_microseconds": args.max_queue_delay_us,
            "seconds_per_cell": args.duration,
        },
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        benches = prepare(tmp, names)
        lua = tmp / "fixed.lua"
        lua.write_text(FIXED_BODY_LUA)
        servers: dict[str, tuple[ServerProcess, int]] = {}
        try:
            for mode in ("off", "on"):
                extra = {"BNFOLD_INTRA_OP_THREADS": str(len(server_cpus))} if server_cpus else {}
                if mode == "on":
                    extra |= {
                        "BNFOLD_DYNAMIC_BATCHING": "true",
                        "BNFOLD_MAX_BATCH_SIZE": str(args.max_batch_size),
                        "BNFOLD_MAX_QUEUE_DELAY_MICROSECONDS": str(args.max_queue_delay_us),
                    }
                grpc_port = free_port()
                server = launch(
                    ["--model-repository", str(tmp / "repo")],
                    env=clean_env(**extra),
                    cpus=server_cpus,
                    own_session=True,
                    log=tmp / f"{mode}.log",
                    name=mode,
                    grpc_port=grpc_port,
                    timeout=300,
                )
                servers[mode] = (server, grpc_port)
                for bench in benches.values():
                    check(server, bench, "binary")
                    check(server, bench, "json")
                    check_grpc(grpc_port, bench)
            for r in range(args.rounds):
                if r == 0:  # warm-up: each server sees every batch size it will see, uncounted
                    for (model, transport), concurrency in matrix.items():
                        if transport == "binary":
                            for mode in ("off", "on"):
                                server = servers[mode][0]
                                cell(server, 0, benches[model], "binary", max(concurrency), 1, lua, client_cpus)
                                drain(server, benches[model])
                cells: dict[str, Any] = {}
                for (model, transport), concurrency in matrix.items():
                    for c in concurrency:
                        order = ["off", "on"] if (r + c) % 2 == 0 else ["on", "off"]
                        for mode in order:
                            server, grpc_port = servers[mode]
                            got = cell(server, grpc_port, benches[model], transport, c, args.duration, lua, client_cpus)
                            cells[f"{mode}/{model}/{transport}/c{c}"] = got
                            print(
                                f"round {r + 1} {mode:<3} {model:<8} {transport:<6} c={c:<3} {got['rps']:>8.1f} "
                                f"req/s p50 {got['p50_ms']:.3f} ms p99 {got['p99_ms']:.3f} ms "
                                f"errors {got['errors']}",
                                flush=True,
                            )
                result["rounds"].append({"cells": cells, "loadavg_after": list(os.getloadavg())})
            result["mean_batch_size_on"] = mean_batch_sizes(servers["on"][0])
        finally:
            for server, _ in servers.values():
                server.stop()
    result["summary"] = summarize(result)
    result["goals"] = goals(result["summary"])
    return result


# ------------------------------------------------------------------------------------------------ report
def summarize(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in result["rounds"][0]["cells"]:
        cells = [r["cells"][key] for r in result["rounds"]]
        out[key] = {k: statistics.median(c[k] for c in cells) for k in ("rps", "p50_ms", "p99_ms")}
        out[key]["errors"] = sum(c["errors"] for c in cells)
    return out


def _pairs(summary: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    rows = []
    for key, off in summary.items():
        if key.startswith("off/"):
            _, model, transport, c = key.split("/")
            rows.append((model, transport, c[1:], off, summary[f"on/{model}/{transport}/{c}"]))
    return rows


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """The batching goals (docs/batching.md), each with the figures it was judged on (medians; noise: the table)."""
    pairs = _pairs(summary)
    g: dict[str, Any] = {}
    mlp = [on["rps"] / off["rps"] for m, t, c, off, on in pairs if m == "mlp" and c == "32" and t == "binary"]
    if mlp:
        g["mlp_c32_rps_ratio>=3"] = {"ratio": round(mlp[0], 2), "met": mlp[0] >= 3}
    mlp_grpc = [on["rps"] / off["rps"] for m, t, c, off, on in pairs if m == "mlp" and c == "32" and t == "grpc"]
    if mlp_grpc:
        g["mlp_grpc_c32_rps_ratio>=2.5"] = {"ratio": round(mlp_grpc[0], 2), "met": mlp_grpc[0] >= 2.5}
    tiny = [(f"{t}/c{c}", on["rps"] / off["rps"]) for m, t, c, off, on in pairs if m == "tiny" and c != "1"]
    g["tiny_rps_ratio>=0.95"] = {
        "ratios": {k: round(v, 2) for k, v in tiny},
        "met": all(v >= 0.95 for _, v in tiny),
    }
    slower = [
        f"{m}/{t}/c{c}: rps x{on['rps'] / off['rps']:.2f}, p99 x{on['p99_ms'] / off['p99_ms']:.2f}"
        for m, t, c, off, on in pairs
        if on["rps"] < 0.95 * off["rps"] or on["p99_ms"] > 1.05 * off["p99_ms"]
    ]
    g["no_model_slower_rps_or_p99(5%)"] = {"slower": slower, "met": not slower}
    c1 = {f"{m}/{t}": on["p50_ms"] / off["p50_ms"] for m, t, c, off, on in pairs if c == "1"}
    g["c1_p50_within_5%"] = {
        "ratios": {k: round(v, 3) for k, v in c1.items()},
        "met": all(v <= 1.05 for v in c1.values()),
    }
    return g


def table(result: dict[str, Any]) -> str:
    lines = [
        "model    transport  c  | off req/s  p50 ms   p99 ms |  on req/s  p50 ms   p99 ms | rps on/off"
        "  p50 on/off  p99 on/off",
    ]
    for model, transport, c, off, on in _pairs(result["summary"]):
        lines.append(
            f"{model:<8} {transport:<7} {c:>3} | {off['rps']:>9.1f} {off['p50_ms']:>7.2f} {off['p99_ms']:>8.2f} | "
            f"{on['rps']:>9.1f} {on['p50_ms']:>7.2f} {on['p99_ms']:>8.2f} | {on['rps'] / off['rps']:>10.2f}"
            f"  {on['p50_ms'] / off['p50_ms']:>11.2f}  {on['p99_ms'] / off['p99_ms']:>10.2f}"
        )
    errors = sum(v["errors"] for v in result["summary"].values())
    s = result["settings"]
    lines.append(
        f"on: BNFOLD_MAX_BATCH_SIZE={s['max_batch_size']} BNFOLD_MAX_QUEUE_DELAY_MICROSECONDS="
        f"{s['max_queue_delay_microseconds']}; mean rows per run (on): "
        + ", ".join(f"{m} {v:.1f}" for m, v in sorted(result.get("mean_batch_size_on", {}).items()))
    )
    lines.append(
        f"medians of {len(result['rounds'])} interleaved rounds, {s['seconds_per_cell']} s per cell, errors {errors}; "
        f"load average at start {result['host'].get('loadavg_at_start')}, after each round "
        f"{[[round(x, 1) for x in r['loadavg_after']] for r in result['rounds']]}"
    )
    for goal, verdict in result["goals"].items():
        lines.append(f"goal {goal}: {'met' if verdict['met'] else 'NOT met'} {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per cell (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny and mlp REST binary, mlp gRPC, c=1/32, 1 round")
    p.add_argument("--slow-factor", type=float, default=3.0, help="resnet18 cells last this many times longer")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    result = run(args)
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
