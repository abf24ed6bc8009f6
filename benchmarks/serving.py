"""Serving benchmark: in-process ONNX Runtime vs ``bnfold serve`` vs MLServer, one machine, one model.

Two models built in code, each with BatchNorm (bnfold folds it on load; MLServer gets the already-folded file,
so both serve the same graph):

- ``tiny``: input 1×20 FP32; Gemm 20→64 + BatchNormalization + Relu + Gemm 64→10.
- ``conv224`` (default image model): input 1×3×224×224 FP32; four Conv(3×3, stride 2)+BN+Relu stages
  (3→16→32→64→128 channels), global average pool, Gemm 128→10. ``--image-model resnet10`` uses
  ``converter.zoo.resnet(blocks=(1, 1, 1, 1))`` instead (about 50× the compute: overhead hides in its noise).

What runs (``--rounds`` rounds; in each, every cell once, cells of one (model, concurrency) back to back with
their order rotated every round, so drift on a noisy machine lands on all servers alike):

- in-process baseline: a child process with the server's CPU pinning loads each model through the service's
  own ``service.runtime.loading.load_model`` with default ``Settings()`` (so: the same folded graph, session
  options and malloc thresholds, ``service.runtime.memory``), then times, in turn, ``session.run`` alone and the
  service's request path without HTTP (``rest_request_path``: decode, check, run, encode)
  for the JSON and the binary body;
- ``bnfold serve --model-repository DIR --port P`` (a subprocess, default settings: no ``BNFOLD_*`` variables
  except ``BNFOLD_INTRA_OP_THREADS`` when pinned, see ``--intra-op-threads``);
- MLServer (its own virtualenv, ``benchmarks/mlserver_runtime.py`` as the runtime, the same session options,
  JSON only: it has no binary tensor extension; ``debug`` off so that it keeps no access log, as bnfold;
  ``parallel_workers`` 0: inference in the server process, see ``--mlserver-workers``);
- the client: ``wrk`` (one thread, ``--concurrency`` connections, keep-alive) with a Lua script that POSTs
  one fixed body: the V2 JSON request, or the binary-extension request (JSON header + raw FP32 bytes,
  ``Inference-Header-Content-Length``, ``binary_data_output: true``). wrk measures every figure here from
  the client side: latency percentiles at concurrency 1, requests/s at 8 and 32.

Servers and the baseline are pinned to CPU 0, wrk and this script to CPU 1 (``--no-pin`` turns that off). When
pinned, ONNX Runtime gets as many intra-op threads as the servers have CPUs (bnfold, MLServer and the baseline
alike): its default (0) counts the machine's cores, ignores the affinity, and pins a pool thread to CPU 1.

    .venv/bin/python -m benchmarks.serving                  # full run (~8 min), benchmarks/results/serving.json
    .venv/bin/python -m benchmarks.serving --quick          # sanity run (~1 min)
    .venv/bin/python -m benchmarks.serving --skip-mlserver  # without the MLServer comparison
    .venv/bin/python -m benchmarks.serving --before DIR     # also DIR's bnfold (another checkout), same rounds

Needs ``wrk`` on PATH (Debian: ``apt-get install wrk``) and, unless ``--skip-mlserver``, an MLServer
virtualenv (``--mlserver-python``, default ``$BNFOLD_MLSERVER_PYTHON``): ``python3 -m venv VENV &&
VENV/bin/pip install mlserver onnxruntime httptools``, then ``--mlserver-python VENV/bin/python``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import (
    FIXED_BODY_LUA,
    IMAGE_MODELS,
    Bench,
    check,
    clean_env,
    infer_url,
    model_ready_paths,
    parse_cpus,
    prepare_models,
    rest_request_path,
    start_server,
    versions,
    wrk_cell,
)
from benchmarks.environment import emit, git_state, host
from service.launcher import ServerProcess, free_port, status

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "serving.json"
DEFAULT_MLSERVER_PYTHON = os.environ.get("BNFOLD_MLSERVER_PYTHON")
CONCURRENCY = (1, 8, 32)
INTRA_OP_NOTE = (
    "ORT's default (0) sizes the intra-op pool by the machine's cores, not by the process's CPU affinity, and "
    "pins the extra pool threads to the other cores: under taskset -c 0 on 2 cores a session still runs a "
    "thread on CPU 1 (the load generator's). Pinned runs therefore set the thread count to the server's CPUs."
)
TARGET_OVERHEAD_MS = {("tiny", "json"): 0.5, ("image", "binary"): 2.0}
TARGET_RATIO = 2.5
TARGET_RATIO_CONCURRENCY = 8
#: bnfold's session options (service/loading.py with default settings): what the MLServer runtime gets too;
#: ``intra_op_num_threads`` is set per run (``--intra-op-threads``).
SESSION_OPTIONS = {"graph_optimization_level": "all", "intra_op_num_threads": 0, "inter_op_num_threads": 1}


# ------------------------------------------------------------------------------------------------ servers
BEFORE = "bnfold-before"


def start_bnfold(
    tmp: Path, cpus: set[int] | None, intra_op_threads: int, tree: Path = ROOT, name: str = "bnfold"
) -> ServerProcess:
    """``bnfold serve`` of the source ``tree`` (default: this one; ``--before``: another checkout)."""
    extra = {"BNFOLD_INTRA_OP_THREADS": str(intra_op_threads)} if intra_op_threads else {}
    env = clean_env(**extra, PYTHONPATH=str(tree))
    return start_server(tmp, name, ["--model-repository", str(tmp / "bnfold")], cpus=cpus, env=env, cwd=tree)


def serves_binary(server: str) -> bool:
    return server.startswith("bnfold")


def mlserver_config(
    tmp: Path, benches: Sequence[Bench], workers: int, session_options: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    root = tmp / "mlserver"
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,  # MLServer's default True turns on uvicorn's access log; bnfold has none
        # MLServer's default 1 runs inference in worker processes; with uvloop 0.23 MLServer 1.7.1's workers die
        # at start (RuntimeError: no current event loop, in mlserver/parallel/worker.py _ignore_signals)
        "parallel_workers": workers,
        "load_models_at_startup": True,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    for b in benches:
        model_settings = {
            "name": b.name,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": "./model.onnx", "version": "1", "extra": session_options},
        }
        (root / b.name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    shutil.copy(HERE / "mlserver_runtime.py", root / "mlserver_runtime.py")
    return port, settings


def start_mlserver(tmp: Path, python: str, port: int, cpus: set[int] | None) -> ServerProcess:
    root = tmp / "mlserver"
    mlserver = str(Path(python).parent / "mlserver")
    return start_server(
        tmp, "mlserver", [str(root)], command=[mlserver, "start"], port=port, cpus=cpus,
        env=clean_env(PYTHONPATH=str(root)), cwd=root,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ baseline
def baseline_worker(spec: dict[str, Any], cpus: set[int] | None) -> dict[str, Any]:
    """In a fresh child process pinned like the server, on default settings: ``session.run`` and the service's
    request path, no HTTP."""
    if cpus:
        os.sched_setaffinity(0, cpus)  # before ONNX Runtime builds its thread pool
    for key in [k for k in os.environ if k.startswith(("BNFOLD_", "MLSERVER_"))]:
        del os.environ[key]
    from service.runtime import memory
    from service.runtime.loading import load_model
    from service.runtime.model_config import ModelConfig
    from service.settings import Settings

    settings = Settings(model_repository=Path(spec["repository"]), intra_op_threads=spec["intra_op_threads"])
    if settings.reuse_large_buffers:  # as the server's start-up does
        memory.reuse_large_buffers()
    results: dict[str, Any] = {"threads": None, "models": {}}
    for m in spec["models"]:
        path = Path(spec["repository"]) / m["name"] / "1" / "model.onnx"
        model = load_model(m["name"], "1", path, ModelConfig(), settings)
        x = np.load(m["input"])
        bodies = {
            "json": (Path(m["json_body"]).read_bytes(), None),
            "binary": (Path(m["binary_body"]).read_bytes(), m["binary_header_length"]),
        }
        calls = in_process_calls(model, {m["input_name"]: x}, bodies, settings.max_elements)
        for fn in calls.values():  # warm up
            for _ in range(5):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in calls}
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline:
            for key, fn in calls.items():  # in turn: drift hits all three alike
                t0 = time.perf_counter_ns()
                fn()
                samples[key].append((time.perf_counter_ns() - t0) / 1e6)
        results["models"][m["name"]] = samples
    results["threads"] = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    results["affinity"] = sorted(os.sched_getaffinity(0))
    return results


def in_process_calls(
    model: Any, feeds: dict[str, np.ndarray], bodies: dict[str, tuple[bytes, int | None]], max_elements: int
) -> dict[str, Callable[[], None]]:
    """``session.run`` alone, and the service's request path without HTTP for each body."""

    def session_run() -> None:
        model.session.run(None, feeds)

    def service_path(body: bytes, header_length: int | None) -> Callable[[], None]:
        def call() -> None:
            rest_request_path(model, body, header_length, max_elements)

        return call

    calls = {"session_run": session_run}
    for enc, (body, header_length) in bodies.items():
        calls[f"service_path_{enc}"] = service_path(body, header_length)
    return calls


def run_baseline(
    tmp: Path, benches: Sequence[Bench], seconds: float, cpus: set[int] | None, intra_op_threads: int
) -> dict[str, Any]:
    models = []
    for b in benches:
        npy = tmp / "bodies" / f"{b.name}.npy"
        if not npy.exists():
            np.save(npy, b.input)
        models.append(
            {
                "name": b.name,
                "input": str(npy),
                "input_name": b.input_name,
                "json_body": str(b.json_body),
                "binary_body": str(b.binary_body),
                "binary_header_length": b.binary_header_length,
            }
        )
    spec = {
        "repository": str(tmp / "bnfold"),
        "models": models,
        "seconds": seconds,
        "intra_op_threads": intra_op_threads,
    }
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(baseline_worker, spec, cpus).result(timeout=seconds * len(benches) + 300)


# ------------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class Cell:
    server: str
    model: str
    encoding: str
    connections: int


def plan(benches: Sequence[Bench], servers: Sequence[str], concurrency: Sequence[int]) -> list[list[Cell]]:
    """Groups of cells run back to back: one group per (model, concurrency); their order rotates per round."""
    groups = []
    for b in benches:
        for c in concurrency:
            group = [Cell("bnfold", b.name, "json", c), Cell("bnfold", b.name, "binary", c)]
            if "mlserver" in servers:
                group.insert(1, Cell("mlserver", b.name, "json", c))
            if BEFORE in servers:
                group += [Cell(BEFORE, b.name, "json", c), Cell(BEFORE, b.name, "binary", c)]
            groups.append(group)
    return groups


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else parse_cpus(args.server_cpus)
    client_cpus = None if args.no_pin else parse_cpus(args.client_cpus)
    mlserver_python = None if args.skip_mlserver else args.mlserver_python
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH (Debian: apt-get install wrk)")
    if not args.skip_mlserver and not mlserver_python:
        raise SystemExit("no MLServer virtualenv: give --mlserver-python VENV/bin/python, or --skip-mlserver")
    if mlserver_python and not (Path(mlserver_python).parent / "mlserver").exists():
        raise SystemExit(f"no mlserver next to {mlserver_python}; use --mlserver-python or --skip-mlserver")
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    if args.intra_op_threads == "auto":
        threads = len(server_cpus) if server_cpus else 0
    else:
        threads = int(args.intra_op_threads)
    session_options = {**SESSION_OPTIONS, "intra_op_num_threads": threads}
    machine = {**host(), **git_state("service", "converter")}
    result: dict[str, Any] = {"benchmark": "serving", "machine": machine, "versions": versions(mlserver_python)}
    with tempfile.TemporaryDirectory(prefix="bnfold-serving-") as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "post.lua"
        lua.write_text(FIXED_BODY_LUA)
        log(f"building models in {tmp}")
        benches = prepare_models(tmp, args.image_model)
        servers: dict[str, ServerProcess] = {}
        try:
            servers["bnfold"] = start_bnfold(tmp, server_cpus, threads)
            if args.before is not None:
                servers[BEFORE] = start_bnfold(tmp, server_cpus, threads, args.before.resolve(), BEFORE)
            mlserver_settings = None
            if mlserver_python:
                port, mlserver_settings = mlserver_config(tmp, benches, args.mlserver_workers, session_options)
                servers["mlserver"] = start_mlserver(tmp, mlserver_python, port, server_cpus)
            paths = model_ready_paths([b.name for b in benches])
            ready = {name: s.wait_ready(paths, 300) for name, s in servers.items()}
            log("servers ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in ready.items()))
            checks = {}
            for b in benches:
                for name, s in servers.items():
                    for enc in ("json", "binary") if serves_binary(name) else ("json",):
                        checks[f"{name}/{b.name}/{enc}"] = check(s, b, enc)
            groups = plan(benches, list(servers), args.concurrency)
            by_name = {b.name: b for b in benches}
            for group in groups:  # warm-up: a short load on every (server, model, encoding)
                for cell in group:
                    if cell.connections == max(args.concurrency):
                        wrk_cell(
                            lua,
                            infer_url(servers[cell.server], cell.model),
                            by_name[cell.model],
                            cell.encoding,
                            cell.connections,
                            args.warmup,
                            client_cpus,
                        )
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):
                log(f"round {r + 1}/{args.rounds}: in-process baseline ({args.baseline_seconds:g} s per model)")
                base = run_baseline(tmp, benches, args.baseline_seconds, server_cpus, threads)
                cells: dict[str, Any] = {}
                for group in groups:
                    k = r % len(group)
                    for cell in group[k:] + group[:k]:
                        w = wrk_cell(
                            lua,
                            infer_url(servers[cell.server], cell.model),
                            by_name[cell.model],
                            cell.encoding,
                            cell.connections,
                            args.duration,
                            client_cpus,
                            servers[cell.server].proc.pid,
                        )
                        key = f"{cell.server}/{cell.model}/{cell.encoding}/c{cell.connections}"
                        cells[key] = w
                        if w["requests"] == 0 or w["errors"] == w["requests"]:
                            server = servers[cell.server]
                            raise RuntimeError(
                                f"{key}: no successful answer in {args.duration:g} s (server alive: "
                                f"{server.proc.poll() is None}; was it sent a signal?):\n{server.tail(8)}"
                            )
                        err = f", {w['errors']} errors" if w["errors"] else ""
                        if "server_cpu_us_per_request" in w:
                            err = f"  server CPU {w['server_cpu_us_per_request']:.0f} us/req" + err
                        log(
                            f"  {key:<34} {w['rps']:>8.1f} req/s  p50 {w['p50_us'] / 1000:.3f} ms  "
                            f"p99 {w['p99_us'] / 1000:.3f} ms{err}"
                        )
                for name, s in servers.items():
                    if s.proc.poll() is not None or status(s.host, s.port, "/v2/health/ready") != 200:
                        raise RuntimeError(f"{name} died or stopped being ready during the run:\n{s.tail()}")
                rounds.append({"baseline": base, "wrk": cells, "loadavg_after": list(os.getloadavg())})
        finally:
            for s in servers.values():
                s.stop()
            for s in servers.values():
                (Path(args.out).parent / f"serving-{s.name}.log").parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copy(s.log, Path(args.out).parent / f"serving-{s.name}.log")
    result.update(summarize(args, benches, rounds, list(servers), checks, ready))
    result["loadavg_after_each_round"] = [r["loadavg_after"] for r in rounds]
    result["in_process_p50_ms_per_round"] = [
        {
            name: {k: statistics.median(v) for k, v in samples.items()}
            for name, samples in r["baseline"]["models"].items()
        }
        for r in rounds
    ]
    result["settings"] = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "baseline_seconds_per_round": args.baseline_seconds,
        "concurrency": list(args.concurrency),
        "quick": args.quick,
        "server_cpus": sorted(server_cpus) if server_cpus else None,
        "client_cpus": sorted(client_cpus) if client_cpus else None,
        "bnfold": "python -m service serve --model-repository DIR --port P; default settings (no BNFOLD_* env)",
        "before": str(args.before.resolve()) if args.before is not None else None,
        "mlserver_settings": mlserver_settings,
        "session_options": session_options,
        "intra_op_threads": threads,
        "intra_op_threads_note": INTRA_OP_NOTE,
        "client": "wrk -t1 -cC -dDs --timeout 30s, Lua script POSTing one fixed body, keep-alive",
        "latency": "wrk's client-side latency; p50/p99 at c=1 are medians over rounds of each round's percentile",
        "throughput": "wrk requests / duration; median over rounds",
        "overhead": "median over rounds of (bnfold wrk p50 at c=1 - in-process session.run p50 of that round)",
        "ratio": f"median over rounds of (bnfold req/s / MLServer req/s) at c={TARGET_RATIO_CONCURRENCY}, JSON",
    }
    return result


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def summarize(
    args: argparse.Namespace,
    benches: Sequence[Bench],
    rounds: list[dict[str, Any]],
    servers: Sequence[str],
    checks: dict[str, float],
    ready: dict[str, float],
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    rows = []
    targets = []
    med = statistics.median
    for b in benches:
        base_rounds = [r["baseline"]["models"][b.name] for r in rounds]
        pooled = {k: [t for br in base_rounds for t in br[k]] for k in base_rounds[0]}
        inproc = {
            k: {"p50_ms": med(v), "p99_ms": percentile(v, 99), "mean_ms": statistics.fmean(v), "samples": len(v)}
            for k, v in pooled.items()
        }
        rows.append({"model": b.name, "server": "in-process", "encoding": "session.run", **_lat(inproc["session_run"])})
        for enc in ("json", "binary"):
            row = {"model": b.name, "server": "in-process", "encoding": f"svc path {enc}"}
            rows.append({**row, **_lat(inproc[f"service_path_{enc}"])})
        cells: dict[str, Any] = {}
        for server in servers:
            for enc in ("json", "binary") if serves_binary(server) else ("json",):
                row: dict[str, Any] = {"model": b.name, "server": server, "encoding": enc}
                for c in args.concurrency:
                    key = f"{server}/{b.name}/{enc}/c{c}"
                    per_round = [r["wrk"][key] for r in rounds]
                    cpu = [w["server_cpu_us_per_request"] for w in per_round if "server_cpu_us_per_request" in w]
                    agg = {
                        "rps": med(w["rps"] for w in per_round),
                        "server_cpu_us_per_request": med(cpu) if cpu else None,
                        "p50_ms": med(w["p50_us"] for w in per_round) / 1000,
                        "p99_ms": med(w["p99_us"] for w in per_round) / 1000,
                        "errors": sum(w["errors"] for w in per_round),
                        "requests": sum(w["requests"] for w in per_round),
                        "rounds": per_round,
                    }
                    cells[key] = agg
                    row[f"c{c}"] = agg
                rows.append(row)
        models[b.name] = {
            "role": b.role,
            "description": b.description,
            "nodes": b.nodes,
            "body_bytes": b.body_bytes,
            "binary_header_length": b.binary_header_length,
            "in_process": inproc,
            "served": cells,
        }
        # targets
        for (role, enc), limit in TARGET_OVERHEAD_MS.items():
            if role != b.role or 1 not in args.concurrency:
                continue
            key = f"bnfold/{b.name}/{enc}/c1"
            per_round = [
                r["wrk"][key]["p50_us"] / 1000 - med(r["baseline"]["models"][b.name]["session_run"]) for r in rounds
            ]
            value = med(per_round)
            targets.append(
                {
                    "target": f"{b.name} {enc}: p50 overhead over in-process at c=1",
                    "value": value,
                    "unit": "ms",
                    "limit": f"<= {limit} ms",
                    "met": value <= limit,
                    "per_round": per_round,
                }
            )
        if "mlserver" in servers and TARGET_RATIO_CONCURRENCY in args.concurrency:
            c = TARGET_RATIO_CONCURRENCY
            per_round = [
                r["wrk"][f"bnfold/{b.name}/json/c{c}"]["rps"] / r["wrk"][f"mlserver/{b.name}/json/c{c}"]["rps"]
                for r in rounds
            ]
            value = med(per_round)
            targets.append(
                {
                    "target": f"{b.name} json: req/s at c={c}, bnfold / MLServer",
                    "value": value,
                    "unit": "x",
                    "limit": f">= {TARGET_RATIO}x",
                    "met": value >= TARGET_RATIO,
                    "per_round": per_round,
                }
            )
    return {"models": models, "rows": rows, "targets": targets, "checks_max_abs_diff": checks, "ready_s": ready}


def _lat(stats: dict[str, Any]) -> dict[str, Any]:
    return {"c1": {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "rps": None, "errors": 0}}


def table(result: dict[str, Any]) -> str:
    conc = result["settings"]["concurrency"]
    head = f"{'model':<9} {'server':<13} {'encoding':<16}"
    if 1 in conc:
        head += f" {'c=1 p50 ms':>10} {'c=1 p99 ms':>10}"
    head += "".join(f" {f'c={c} req/s':>11}" for c in conc if c != 1)
    cpu_c = TARGET_RATIO_CONCURRENCY if TARGET_RATIO_CONCURRENCY in conc else max(conc)
    head += f" {f'CPU us/req c={cpu_c}':>17}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        line = f"{row['model']:<9} {row['server']:<13} {row['encoding']:<16}"
        if 1 in conc:
            c1 = row.get("c1")
            line += f" {c1['p50_ms']:>10.3f} {c1['p99_ms']:>10.3f}" if c1 else f" {'-':>10} {'-':>10}"
        for c in conc:
            if c == 1:
                continue
            cell = row.get(f"c{c}")
            line += f" {cell['rps']:>11.1f}" if cell else f" {'-':>11}"
        cell = row.get(f"c{cpu_c}")
        cpu = cell.get("server_cpu_us_per_request") if cell else None
        line += f" {cpu:>17.0f}" if cpu is not None else f" {'-':>17}"
        if any(row.get(f"c{c}", {}).get("errors") for c in conc):
            line += "  (errors: " + ", ".join(f"c={c}: {row[f'c{c}']['errors']}" for c in conc) + ")"
        lines.append(line)
    lines.append("")
    lines.append("Targets:")
    for t in result["targets"]:
        unit = " ms" if t["unit"] == "ms" else "x"
        verdict = "met" if t["met"] else "NOT met"
        lines.append(f"  {t['target']:<52} {t['value']:>7.3f}{unit}  (target {t['limit']}): {verdict}")
    lines.append("")
    for name, m in result["models"].items():
        lines.append(
            f"{name}: {m['description']}; JSON body {m['body_bytes']['json']} B, binary {m['body_bytes']['binary']} B"
        )
    v = result["versions"]
    bv = v["bnfold_venv"]
    mv = v.get("mlserver_venv") or {}
    s = result["settings"]
    lines.append(
        f"bnfold: uvicorn {bv['uvicorn']} (uvloop {bv['uvloop']}, httptools {bv['httptools']}), fastapi "
        f"{bv['fastapi']}, onnxruntime {bv['onnxruntime']}"
    )
    if mv:
        lines.append(
            f"MLServer {mv.get('mlserver')}: uvicorn {mv.get('uvicorn')} (uvloop {mv.get('uvloop')}, httptools "
            f"{mv.get('httptools')}), fastapi {mv.get('fastapi')}, onnxruntime {mv.get('onnxruntime')}; "
            f"parallel_workers {s['mlserver_settings']['parallel_workers']}, debug off"
        )
    m = result["machine"]
    lines.append(
        f"client: {v['wrk']} (1 thread, keep-alive); servers on CPU {s['server_cpus']}, wrk on CPU "
        f"{s['client_cpus']}; {s['rounds']} rounds × {s['duration_s']} s per cell; {m['cpu']}, "
        f"{m['logical_cpus']} CPUs; load average at start {m.get('loadavg_at_start')}"
    )
    if s.get("before"):
        lines.append(f"{BEFORE}: the same benchmark served from the source tree {s['before']}")
    threads = s["intra_op_threads"]
    lines.append(
        f"ORT intra-op threads: {threads or 'ORT default (0)'} for bnfold, MLServer and in-process alike"
        + (" (BNFOLD_INTRA_OP_THREADS; the only non-default bnfold setting)" if threads else "")
    )
    lines.append(
        "in-process rows: the server's session alone (session.run) and the service's decode+run+encode without "
        "HTTP (svc path), timed in a pinned child process; every other figure is wrk's, client side; CPU us/req: "
        "the server process's user+system CPU time during that wrk run / requests"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sanity run: 1 round, 2 s per cell")
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 4; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all cells (default 5; quick 1)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load per cell (default 2)")
    p.add_argument("--baseline-seconds", type=float, default=None, help="in-process timing per model per round")
    p.add_argument(
        "--concurrency",
        type=lambda s: tuple(int(c) for c in s.split(",")),
        default=CONCURRENCY,
        help="wrk connections, comma-separated (default 1,8,32)",
    )
    p.add_argument("--image-model", choices=sorted(IMAGE_MODELS), default="conv224", help="the 224² model")
    p.add_argument("--skip-mlserver", action="store_true", help="no MLServer comparison")
    p.add_argument("--mlserver-python", default=DEFAULT_MLSERVER_PYTHON, help="python of MLServer's virtualenv")
    p.add_argument(
        "--mlserver-workers",
        type=int,
        default=0,
        help="MLServer parallel_workers (default 0: inference in the server process; MLServer's own default 1 "
        "starts worker processes, which MLServer 1.7.1 cannot do with uvloop 0.23)",
    )
    p.add_argument(
        "--intra-op-threads",
        default="auto",
        help="ORT intra-op threads for bnfold (BNFOLD_INTRA_OP_THREADS), MLServer and the baseline alike; "
        "auto (default): the number of server CPUs when pinned, else 0 (ORT's own default, bnfold's default)",
    )
    p.add_argument("--server-cpus", default="0", help="CPUs for the servers and the baseline (default 0)")
    p.add_argument("--client-cpus", default="1", help="CPUs for wrk and this script (default 1)")
    p.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    p.add_argument(
        "--before",
        type=Path,
        help="also serve from this bnfold source tree (e.g. `git worktree add /tmp/before HEAD~1`) as "
        f"'{BEFORE}', its cells interleaved with the current tree's in every round: a before/after in one run",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    quick = args.quick
    args.duration = args.duration or (2.0 if quick else 4.0)
    args.rounds = args.rounds or (1 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.baseline_seconds = args.baseline_seconds or (1.0 if quick else 3.0)
    if args.rounds < 1 or args.duration < 1 or not args.concurrency or min(args.concurrency) < 1:
        p.error("--rounds, --duration and every --concurrency must be at least 1")
    result = run(args)
    text = table(result)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["loadavg_at_end"] = list(os.getloadavg())
    emit(result, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
