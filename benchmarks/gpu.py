"""On a machine with an NVIDIA GPU: the service on CUDA (strict provider policy) vs in-process ONNX Runtime CUDA.

Run through ``scripts/gpu-check`` (which installs the ``gpu`` extra first). Serves a ResNet-18-style model
(224×224, BatchNorm folded on load) with ``BNFOLD_PROVIDERS=cuda,cpu BNFOLD_PROVIDER_POLICY=strict``, checks that
the CUDA provider is really active (model metadata), then measures batch-1 latency at concurrency 1: binary
requests over one keep-alive connection vs ``session.run`` on an in-process CUDA session of the same folded model.
Then the same model with dynamic batching off vs on (``BNFOLD_DYNAMIC_BATCHING=true``, max batch 32): requests/s
and p50/p99 with ``--concurrency`` client threads (one keep-alive connection each), off and on alternating for
``--rounds`` rounds, medians. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import convert, zoo
from service.launcher import LaunchError, launch

CUDA = "CUDAExecutionProvider"


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def concurrent_load(port: int, body: bytes, headers: dict[str, str], threads: int, seconds: float) -> dict[str, float]:
    """``threads`` clients, each POSTing ``body`` over its own connection for ``seconds``: req/s, p50, p99."""
    samples: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        while time.perf_counter() < end:
            start = time.perf_counter()
            conn.request("POST", "/v2/models/resnet/infer", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            mine.append(time.perf_counter() - start)
        with lock:
            samples.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"rps": len(samples) / (time.perf_counter() - started), **percentiles(samples)}


def batching_comparison(
    off_port: int, env: dict[str, str], repo: Path, body: bytes, headers: dict[str, str], args: argparse.Namespace
) -> dict[str, object]:
    """Dynamic batching off (the server already running on ``off_port``) vs on (a second server)."""
    on_env = {**env, "BNFOLD_DYNAMIC_BATCHING": "true", "BNFOLD_MAX_BATCH_SIZE": "32"}
    on = launch(["--model-repository", str(repo)], port=args.port + 1, env=on_env, timeout=300)
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for r in range(args.rounds):
            cells: dict[str, dict[str, float]] = {}
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                port = off_port if mode == "off" else args.port + 1
                concurrent_load(port, body, headers, args.concurrency, 1.0)  # warm-up
                cells[mode] = concurrent_load(port, body, headers, args.concurrency, args.seconds)
            rounds.append(cells)
    finally:
        on.stop(timeout=60)
    summary = {
        mode: {k: statistics.median(r[mode][k] for r in rounds) for k in ("rps", "p50_ms", "p99_ms")}
        for mode in ("off", "on")
    }
    return {"concurrency": args.concurrency, "rounds": rounds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads for the batching comparison")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per batching cell")
    parser.add_argument("--rounds", type=int, default=3, help="batching comparison rounds (off/on alternate)")
    args = parser.parse_args()
    if CUDA not in ort.get_available_providers():
        raise SystemExit(f"{CUDA} is not available here: {ort.get_available_providers()}")

    work = Path(tempfile.mkdtemp(prefix="bnfold-gpu-"))
    path = work / "repo" / "resnet" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(zoo.resnet(batch="batch"), str(path))  # dynamic batch: batchable
    env = {**os.environ, "BNFOLD_PROVIDERS": "cuda,cpu", "BNFOLD_PROVIDER_POLICY": "strict"}
    try:  # exits (code 3) at start-up under the strict policy when CUDA is not really available
        server = launch(["--model-repository", str(work / "repo")], port=args.port, env=env, timeout=300)
    except LaunchError as exc:
        raise SystemExit(str(exc)) from None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", args.port)
        conn.request("GET", "/v2/models/resnet")
        meta = json.loads(conn.getresponse().read())
        active = meta["bnfold"]["providers"]
        assert active[0] == CUDA, f"CUDA provider not active: {active}"
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 224, 224],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + x.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        service = []
        for i in range(args.requests + 20):
            start = time.perf_counter()
            conn.request("POST", "/v2/models/resnet/infer", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            if i >= 20:
                service.append(time.perf_counter() - start)
        batching = batching_comparison(args.port, env, work / "repo", body, headers, args)
    finally:
        server.stop(timeout=60)

    options = ort.SessionOptions()
    folded = convert(path).model.SerializeToString()
    session = ort.InferenceSession(folded, options, providers=[CUDA, "CPUExecutionProvider"])
    local = []
    for i in range(args.requests + 20):
        start = time.perf_counter()
        session.run(None, {"input": x})
        if i >= 20:
            local.append(time.perf_counter() - start)
    result = {
        "device": platform.node(),
        "onnxruntime": ort.__version__,
        "providers": active,
        "service": percentiles(service),
        "in_process": percentiles(local),
        "batching": batching,
    }
    result["overhead_p50_ms"] = result["service"]["p50_ms"] - result["in_process"]["p50_ms"]
    print(f"{'':<24}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("in_process", "service"):
        print(f"{name:<24}{result[name]['p50_ms']:>10.3f}{result[name]['p99_ms']:>10.3f}")
    print(f"service overhead at p50: {result['overhead_p50_ms']:.3f} ms (providers {', '.join(active)})")
    summary = batching["summary"]
    assert isinstance(summary, dict)
    print(f"dynamic batching, {args.concurrency} concurrent clients (medians of {args.rounds} rounds):")
    print(f"{'':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for mode in ("off", "on"):
        m = summary[mode]
        print(f"batching {mode:<15}{m['rps']:>10.1f}{m['p50_ms']:>10.3f}{m['p99_ms']:>10.3f}")
    print(f"req/s on/off: {summary['on']['rps'] / summary['off']['rps']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
