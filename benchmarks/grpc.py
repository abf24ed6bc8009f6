"""gRPC ModelInfer and REST binary side by side: bnfold, NVIDIA Triton and MLServer on the same models, one run.

Models and bodies are the serving benchmark's (``benchmarks._harness.prepare_models``: ``tiny`` 1×20 and
``conv224`` 1×3×224×224; bnfold folds BatchNorm on load, the peers get the folded file). Servers, each pinned
to CPU 0 and idle while another is measured, ONNX Runtime on as many intra-op threads as they have CPUs:

- ``bnfold serve`` (REST and gRPC in one process, default settings);
- Triton (``benchmarks/triton_peer.py``: the ``nvidia-pytriton`` wheel's ``tritonserver``, C++ HTTP and gRPC
  front ends, a python-backend model running the same ONNX in ONNX Runtime), unless ``--skip-triton``;
- MLServer 1.7.1 (``benchmarks/mlserver_runtime.py``, as in benchmarks/serving.py), gRPC only (its REST has
  no binary tensors; its JSON is in benchmarks/serving.py), unless ``--skip-mlserver``.

The load generator is ``h2load`` (Debian ``nghttp2-client``, C, pinned to CPU 1): HTTP/2 with a pre-built
length-prefixed ``ModelInferRequest`` (``raw_input_contents``, as tritonclient.grpc sends it) for gRPC, ``--h1``
with the binary-extension body for REST. Per-request latencies come from h2load's ``--log-file``; server CPU
per call is the user+system time of the server's whole process group (Triton's python backend runs in a
child process) over the cell, divided by the calls answered. Cells of one (model, concurrency) run back to
back, their order rotated every round; figures are medians over rounds. The in-process reference is
``session.run`` alone, timed in a child pinned like the server; overhead = served p50 - in-process p50.
h2load cannot read gRPC trailers, so every server's gRPC answer is first checked with the grpc library
(status OK, output equal to ONNX Runtime's).

    .venv/bin/python -m benchmarks.grpc --triton-python VENV/bin/python --mlserver-python VENV2/bin/python
    .venv/bin/python -m benchmarks.grpc --quick --skip-triton --skip-mlserver   # bnfold alone, ~30 s

(full run ~8 min, benchmarks/results/grpc.json; the peers' virtualenvs: docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import Bench, clean_env, model_ready_paths, parse_cpus, pinned, prepare_models
from benchmarks.environment import emit, git_state, host
from benchmarks.serving import SESSION_OPTIONS, mlserver_config, start_mlserver
from service.launcher import free_port, launch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "grpc.json"
CONCURRENCY = (1, 8, 32)
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


def grpc_body(bench: Bench) -> bytes:
    from service.grpc.protos import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=bench.name)
    request.inputs.add(name=bench.input_name, datatype="FP32", shape=list(bench.input.shape))
    request.raw_input_contents.append(bench.input.tobytes())
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message  # gRPC framing: uncompressed, length


def check_grpc(port: int, bench: Bench) -> None:
    import grpc

    from service.grpc.protos import grpc_predict_v2_pb2 as pb

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(GRPC_PATH, lambda b: b, pb.ModelInferResponse.FromString)
        response = call(grpc_body(bench)[5:], timeout=60)
    out = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(bench.reference.shape)
    np.testing.assert_allclose(out, bench.reference, rtol=1e-4, atol=1e-5)


def h2load(
    url: str, body: Path, headers: list[str], connections: int, seconds: float, h1: bool, cpus: set[int] | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.tsv"
        cmd = ["h2load", "-c", str(connections), "-m", "1", "-D", str(max(1, round(seconds))), "-d", str(body)]
        cmd += ["--log-file", str(log)]
        cmd += [a for h in headers for a in ("-H", h)] + (["--h1"] if h1 else []) + [url]
        proc = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, timeout=seconds + 120, check=False)
        if not log.exists():
            raise RuntimeError(f"h2load wrote no log ({proc.returncode}): {proc.stdout[-800:]} {proc.stderr[-400:]}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = [int(r[2]) / 1000 for r in rows if r[1] == "200"]  # start, status, latency (us)
    if proc.returncode != 0 or not ok:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stdout[-800:]} {proc.stderr[-400:]}")
    return {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "rps": len(ok) / seconds,
        "p50_ms": statistics.median(ok),
        "p99_ms": float(np.percentile(ok, 99)),
    }


def in_process_p50(bench: Bench, model_path: Path, seconds: float, cpus: set[int] | None) -> float:
    code = f"""
import time, numpy as np, onnxruntime as ort, statistics, sys
from service.runtime.loading import load_model
from service.runtime.model_config import ModelConfig
from service.settings import Settings
m = load_model("{bench.name}", "1", __import__("pathlib").Path("{model_path}"), ModelConfig(), Settings())
x = np.load("{model_path.parent / "x.npy"}")
feeds = {{"{bench.input_name}": x}}
for _ in range(5): m.session.run(None, feeds)
t, end = [], time.perf_counter() + {seconds}
while time.perf_counter() < end:
    t0 = time.perf_counter(); m.session.run(None, feeds); t.append((time.perf_counter() - t0) * 1000)
print(statistics.median(t))
"""
    np.save(model_path.parent / "x.npy", bench.input)
    out = subprocess.run(pinned([sys.executable, "-c", code], cpus), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Target:
    """One server's endpoints, the process group to charge CPU time to, and how to stop it."""

    name: str
    pgid: int
    grpc_port: int
    rest_url: str | None  # base URL of a REST binary endpoint, None when not measured
    stop: Callable[[], None]


def start_targets(tmp: Path, args: argparse.Namespace, benches: list[Bench], cpus: set[int] | None) -> list[Target]:
    threads = len(cpus) if cpus else 0
    targets: list[Target] = []
    try:
        grpc_port = free_port()
        env = clean_env(
            BNFOLD_GRPC_PORT=str(grpc_port), **({"BNFOLD_INTRA_OP_THREADS": str(threads)} if threads else {})
        )
        bnfold = launch(["--model-repository", str(tmp / "bnfold")], env=env, cpus=cpus, own_session=True,
                        log=tmp / "bnfold.log")  # fmt: skip
        targets.append(Target("bnfold", bnfold.proc.pid, grpc_port, bnfold.url, bnfold.stop))
        if not args.skip_triton:
            from benchmarks import triton_peer

            files = {b.name: tmp / "mlserver" / b.name / "model.onnx" for b in benches}
            peer = triton_peer.start(args.triton_python, files, cpus=cpus, intra_op_threads=threads or 1,
                                     log=tmp / "triton.log")  # fmt: skip
            targets.append(Target("triton", peer.pid, peer.grpc_port, peer.url, peer.stop))
        if not args.skip_mlserver:
            options = {**SESSION_OPTIONS, "intra_op_num_threads": threads}
            port, settings = mlserver_config(tmp, benches, 0, options)
            ml = start_mlserver(tmp, args.mlserver_python, port, cpus)
            ml.wait_ready(model_ready_paths([b.name for b in benches]), timeout=180)
            targets.append(Target("mlserver", ml.proc.pid, settings["grpc_port"], None, ml.stop))
    except BaseException:
        for t in targets:
            t.stop()
        raise
    return targets


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else parse_cpus(args.server_cpus)
    client_cpus = None if args.no_pin else parse_cpus(args.client_cpus)
    result: dict[str, Any] = {"host": host(), "git": git_state("service", "benchmarks"), "rounds": []}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        benches = prepare_models(tmp, "conv224")
        targets = start_targets(tmp, args, benches, server_cpus)
        result["servers"] = [t.name for t in targets]
        try:
            bodies = {}
            for b in benches:
                for target in targets:
                    check_grpc(target.grpc_port, b)
                (tmp / f"{b.name}.grpc").write_bytes(grpc_body(b))
                bodies[b.name] = tmp / f"{b.name}.grpc"
            result["in_process_p50_ms"] = {
                b.name: in_process_p50(
                    b, tmp / "bnfold" / b.name / "1" / "model.onnx", 5 if args.quick else 10, server_cpus
                )
                for b in benches
            }
            concurrency = (1, 8) if args.quick else CONCURRENCY
            cells_of = [(target, transport) for target in targets for transport in ("grpc", "rest")
                        if transport == "grpc" or target.rest_url]  # fmt: skip
            for r in range(args.rounds):
                cells: dict[str, Any] = {}
                for b in benches:
                    for c in concurrency:
                        k = (r + c) % len(cells_of)
                        for target, transport in cells_of[k:] + cells_of[:k]:
                            if transport == "grpc":
                                url = f"http://127.0.0.1:{target.grpc_port}{GRPC_PATH}"
                                body, h1 = bodies[b.name], False
                                headers = ["content-type: application/grpc", "te: trailers"]
                            else:
                                url, body, h1 = f"{target.rest_url}/v2/models/{b.name}/infer", b.binary_body, True
                                headers = [f"inference-header-content-length: {b.binary_header_length}"]
                            cpu = group_cpu_seconds(target.pgid)
                            cell = h2load(url, body, headers, c, args.duration, h1, client_cpus)
                            ok = cell["requests"] - cell["errors"]
                            cell["cpu_us_per_call"] = (group_cpu_seconds(target.pgid) - cpu) * 1e6 / max(ok, 1)
                            cells[f"{target.name}/{transport}/{b.name}/c{c}"] = cell
                            print(
                                f"round {r + 1} {target.name:<8} {transport:<4} {b.name:<8} c={c:<3} "
                                f"{cell['rps']:>8.1f} req/s p50 {cell['p50_ms']:.3f} ms p99 {cell['p99_ms']:.3f} ms "
                                f"CPU {cell['cpu_us_per_call']:.0f} us/call errors {cell['errors']}",
                                flush=True,
                            )
                result["rounds"].append({"cells": cells, "loadavg_after": list(os.getloadavg())})
        finally:
            for target in targets:
                target.stop()
    result["summary"] = summarize(result)
    result["goals"] = goals(result["summary"], concurrency)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    keys = result["rounds"][0]["cells"].keys()
    out: dict[str, Any] = {}
    for key in keys:
        cells = [r["cells"][key] for r in result["rounds"]]
        out[key] = {k: statistics.median(c[k] for c in cells) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_call")}
        out[key]["errors"] = sum(c["errors"] for c in cells)
    return out


def goals(s: dict[str, Any], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    """bnfold's gRPC against Triton's gRPC and its own REST binary, at c=8 (where present)."""
    rows: list[dict[str, Any]] = []

    def ratio(what: str, a: str, b: str, target: float) -> None:
        if a in s and b in s:
            value = s[a]["rps"] / s[b]["rps"]
            rows.append({"goal": what, "ratio": round(value, 3), "target": target, "met": value >= target})

    c = 8 if 8 in concurrency else max(concurrency)
    ratio(f"tiny c={c}: bnfold gRPC / Triton gRPC", f"bnfold/grpc/tiny/c{c}", f"triton/grpc/tiny/c{c}", 1.0)
    ratio(f"tiny c={c}: bnfold gRPC / bnfold REST binary", f"bnfold/grpc/tiny/c{c}", f"bnfold/rest/tiny/c{c}", 0.9)
    ratio(f"conv224 c={c}: bnfold gRPC / REST binary", f"bnfold/grpc/conv224/c{c}", f"bnfold/rest/conv224/c{c}", 1.0)
    return rows


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    base = result["in_process_p50_ms"]
    lines = [
        "model    c    server   transport |    req/s  p50 ms  p99 ms | CPU us/call | p50 overhead ms | errors",
        "-" * 98,
    ]
    servers = {name: i for i, name in enumerate(result["servers"])}

    def order(key: str) -> tuple[int, int, int, str]:
        server, transport, model, c = key.split("/")
        return list(base).index(model), int(c[1:]), servers[server], transport

    for key in sorted(s, key=order):
        cell = s[key]
        server, transport, model, c = key.split("/")
        lines.append(
            f"{model:<8} {c[1:]:>3}  {server:<8} {'REST bin' if transport == 'rest' else 'gRPC':<9} | "
            f"{cell['rps']:>8.1f} {cell['p50_ms']:>7.3f} {cell['p99_ms']:>7.3f} | {cell['cpu_us_per_call']:>11.0f} | "
            f"{cell['p50_ms'] - base[model]:>15.3f} | {cell['errors']}"
        )
    lines.append(f"in-process session.run p50 ms: {json.dumps({k: round(v, 3) for k, v in base.items()})}")
    for g in result["goals"]:
        lines.append(
            f"  {g['goal']:<48} {g['ratio']:.2f}x (target >= {g['target']}x): {'met' if g['met'] else 'NOT met'}"
        )
    lines.append(
        f"medians of {len(result['rounds'])} rotated rounds; load average at start "
        f"{result['host'].get('loadavg_at_start')}, after each round {[r['loadavg_after'] for r in result['rounds']]}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.grpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per cell (default 4)")
    p.add_argument("--quick", action="store_true", help="c=1 and 8, 1 round, 2 s cells")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--triton-python", default=os.environ.get("BNFOLD_TRITON_PYTHON"), help="nvidia-pytriton venv")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument("--mlserver-python", default=os.environ.get("BNFOLD_MLSERVER_PYTHON"), help="MLServer venv")
    p.add_argument("--skip-mlserver", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    if not args.skip_triton and not args.triton_python:
        p.error("no Triton virtualenv: give --triton-python VENV/bin/python (docs/benchmarks.md), or --skip-triton")
    if not args.skip_mlserver and not args.mlserver_python:
        p.error("no MLServer virtualenv: give --mlserver-python VENV/bin/python, or --skip-mlserver")
    result = run(args)
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
