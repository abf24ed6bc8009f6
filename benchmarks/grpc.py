"""gRPC vs REST binary on one ``bnfold serve`` process: p50/p99 latency and requests/s at c=1/8/32.

Models and bodies are the serving benchmark's (``benchmarks._harness.prepare_models``: ``tiny`` 1×20 and
``conv224`` 1×3×224×224, BatchNorm folded on load). One server (REST and gRPC in one process, default settings,
pinned to CPU 0 like the serving benchmark) answers both; the load generator is ``h2load`` (Debian
``nghttp2-client``, C, pinned to CPU 1): HTTP/2 with a pre-built length-prefixed ``ModelInferRequest``
(``raw_input_contents``, as tritonclient.grpc sends it) for gRPC, ``--h1`` with the binary-extension body for
REST. Per-request latencies come from h2load's ``--log-file``. Cells of one (model, concurrency) run back to back,
their order alternating every round. The in-process reference is ``session.run`` alone, timed in a child pinned
like the server; overhead = served p50 - in-process p50. h2load cannot read gRPC trailers, so every
cell first checks one answer with the grpc library (status OK, output equal to ONNX Runtime's).

MLServer's gRPC is not compared here (its REST is, in benchmarks/serving.py): not done in the time this
benchmark had; see docs/grpc.md.

    .venv/bin/python -m benchmarks.grpc            # ~3 min, benchmarks/results/grpc.json
    .venv/bin/python -m benchmarks.grpc --quick    # ~40 s
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import Bench, clean_env, parse_cpus, pinned, prepare_models
from benchmarks.environment import emit, git_state, host
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus = None if args.no_pin else parse_cpus(args.server_cpus)
    client_cpus = None if args.no_pin else parse_cpus(args.client_cpus)
    result: dict[str, Any] = {"host": host(), "git": git_state("service", "benchmarks"), "rounds": []}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        benches = prepare_models(tmp, "conv224")
        grpc_port = free_port()
        threads = len(server_cpus) if server_cpus else 0
        env = clean_env(
            BNFOLD_GRPC_PORT=str(grpc_port), **({"BNFOLD_INTRA_OP_THREADS": str(threads)} if threads else {})
        )
        server = launch(
            ["--model-repository", str(tmp / "bnfold")],
            env=env,
            cpus=server_cpus,
            own_session=True,
            log=tmp / "bnfold.log",
        )
        try:
            bodies = {}
            for b in benches:
                check_grpc(grpc_port, b)
                (tmp / f"{b.name}.grpc").write_bytes(grpc_body(b))
                bodies[b.name] = tmp / f"{b.name}.grpc"
            result["in_process_p50_ms"] = {
                b.name: in_process_p50(
                    b, tmp / "bnfold" / b.name / "1" / "model.onnx", 5 if args.quick else 10, server_cpus
                )
                for b in benches
            }
            concurrency = (1, 8) if args.quick else CONCURRENCY
            for r in range(args.rounds):
                cells: dict[str, Any] = {}
                for b in benches:
                    for c in concurrency:
                        order = ["grpc", "rest"] if (r + c) % 2 == 0 else ["rest", "grpc"]
                        for transport in order:
                            if transport == "grpc":
                                url, body, h1 = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}", bodies[b.name], False
                                headers = ["content-type: application/grpc", "te: trailers"]
                            else:
                                url, body, h1 = f"{server.url}/v2/models/{b.name}/infer", b.binary_body, True
                                headers = [f"inference-header-content-length: {b.binary_header_length}"]
                            cell = h2load(url, body, headers, c, args.duration, h1, client_cpus)
                            cells[f"{transport}/{b.name}/c{c}"] = cell
                            print(
                                f"round {r + 1} {transport:<4} {b.name:<8} c={c:<3} {cell['rps']:>8.1f} req/s "
                                f"p50 {cell['p50_ms']:.3f} ms p99 {cell['p99_ms']:.3f} ms errors {cell['errors']}",
                                flush=True,
                            )
                result["rounds"].append({"cells": cells, "loadavg_after": list(os.getloadavg())})
        finally:
            server.stop()
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    keys = result["rounds"][0]["cells"].keys()
    out: dict[str, Any] = {}
    for key in keys:
        cells = [r["cells"][key] for r in result["rounds"]]
        out[key] = {k: statistics.median(c[k] for c in cells) for k in ("rps", "p50_ms", "p99_ms")}
        out[key]["errors"] = sum(c["errors"] for c in cells)
    return out


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    base = result["in_process_p50_ms"]
    lines = [
        "model    c   | gRPC req/s  p50 ms  p99 ms | REST bin req/s  p50 ms  p99 ms | rps gRPC/REST"
        " | p50 overhead ms gRPC / REST",
    ]
    for key in s:
        if not key.startswith("grpc/"):
            continue
        _, model, c = key.split("/")
        g, h = s[key], s[f"rest/{model}/{c}"]
        lines.append(
            f"{model:<8} {c[1:]:>3} | {g['rps']:>10.1f} {g['p50_ms']:>7.3f} {g['p99_ms']:>7.3f} | "
            f"{h['rps']:>14.1f} {h['p50_ms']:>7.3f} {h['p99_ms']:>7.3f} | {g['rps'] / h['rps']:>13.2f} | "
            f"{g['p50_ms'] - base[model]:.3f} / {h['p50_ms'] - base[model]:.3f}"
        )
    lines.append(f"in-process session.run p50 ms: {json.dumps({k: round(v, 3) for k, v in base.items()})}")
    lines.append(
        f"medians of {len(result['rounds'])} interleaved rounds; load average at start "
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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    result = run(args)
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
