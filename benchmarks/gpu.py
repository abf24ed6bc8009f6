"""On a machine with an NVIDIA GPU: the service on CUDA (strict provider policy) vs in-process ONNX Runtime CUDA.

Run through ``scripts/gpu-check`` (which installs the ``gpu`` extra first). Serves a ResNet-18-style model
(224×224, BatchNorm folded on load) with ``BNFOLD_PROVIDERS=cuda,cpu BNFOLD_PROVIDER_POLICY=strict``, checks that
the CUDA provider is really active (model metadata), then measures batch-1 latency at concurrency 1: binary
requests over one keep-alive connection vs ``session.run`` on an in-process CUDA session of the same folded model.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    if CUDA not in ort.get_available_providers():
        raise SystemExit(f"{CUDA} is not available here: {ort.get_available_providers()}")

    work = Path(tempfile.mkdtemp(prefix="bnfold-gpu-"))
    path = work / "repo" / "resnet" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(zoo.resnet(), str(path))
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
    }
    result["overhead_p50_ms"] = result["service"]["p50_ms"] - result["in_process"]["p50_ms"]
    print(f"{'':<24}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("in_process", "service"):
        print(f"{name:<24}{result[name]['p50_ms']:>10.3f}{result[name]['p99_ms']:>10.3f}")
    print(f"service overhead at p50: {result['overhead_p50_ms']:.3f} ms (providers {', '.join(active)})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
