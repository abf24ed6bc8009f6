"""Scale-out on one host (scripts/scale-out-check): N replicas of the Deployment's container behind HAProxy,
under load, one replica killed mid-run — no request may be lost.

- replicas: deploy/kubernetes/deployment.yaml's pod translated as by the kubelet check (limits, user, read-only
  root, env, the ConfigMap model volume...), except the network: ``--network host`` with each replica on its own
  127.0.0.1 port (``--http-port`` and ``BNFOLD_HOST=127.0.0.1`` changed, ``--grpc-port=0``): nothing listens
  beyond this host;
- balancer: HAProxy from Debian on the host, 127.0.0.1 only, round robin, health checks on
  ``/v2/health/ready`` (the readiness probe's path) every 500 ms, and L7 retries (``retry-on
  all-retryable-errors``, ``option redispatch``, the request body buffered so a POST can be replayed) — what a
  Service plus a retrying mesh/ingress gives in a cluster;
- load: wrk (``benchmarks.load``'s counting script), the README's digit request, a fixed number of requests at a
  fixed concurrency, loopback only. Run 1 measures the N replicas' throughput; run 2 kills (SIGKILL) one replica
  once it has answered a share of the requests, and every one of the requests must still be answered 200.

    python -m tests.deploy.scale_out_check --image bnfold:smoke [--replicas 3] [--requests 6000]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks._harness import COUNTING_LUA
from tests.deploy.kubelet import docker_run
from tests.deploy.manifests import ROOT, one

BODY = ROOT / "examples" / "requests" / "digit.json"
HAPROXY = """global
    maxconn 2048
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on all-retryable-errors
    option http-buffer-request
frontend bnfold
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1
{servers}
"""


def log(text: str) -> None:
    print(f"scale-out-check: {text}", flush=True)


def replica_pod(port: int) -> tuple[dict[str, Any], str]:
    deployment = one("kubernetes/deployment.yaml", "Deployment")
    pod = copy.deepcopy(deployment["spec"]["template"]["spec"])
    (container,) = pod["containers"]
    # one host network: each replica its own HTTP port, no gRPC listener (it would collide; the load is REST)
    moved = {"--http-port=": f"--http-port={port}", "--grpc-port=": "--grpc-port=0"}
    container["args"] = [next((v for k, v in moved.items() if a.startswith(k)), a) for a in container["args"]]
    overrides = {"BNFOLD_HOST": "127.0.0.1"}
    container["env"] = [{**e, "value": overrides[e["name"]]} if e["name"] in overrides else e for e in container["env"]]
    container.pop("ports")
    model = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--model-name="))
    return pod, model


def success_count(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r"^bnfold_inference_success_total\{[^}]*\} (\S+)$", text, re.M))


def wait_ready(port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"127.0.0.1:{port} not ready after {timeout:.0f} s")


def run_load(url: str, lua: Path, requests: int, connections: int) -> dict[str, Any]:
    stats = load.wrk(url, lua, BODY, requests, connections, None)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6000, help="requests per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--port", type=int, default=18200, help="balancer port; replicas on the next ports")
    parser.add_argument(
        "--no-retry", action="store_true", help="HAProxy without L7 retries: shows that the check sees lost requests"
    )
    args = parser.parse_args(argv)
    if shutil.which("haproxy") is None or shutil.which("wrk") is None:
        log("FAIL: needs haproxy and wrk on the host (Debian: apt-get install haproxy wrk)")
        return 1
    configmap = one("kubernetes/model-configmap.yaml", "ConfigMap")
    work = Path(tempfile.mkdtemp(prefix="bnfold-scale-"))
    names: list[str] = []
    balancer: subprocess.Popen[bytes] | None = None
    try:
        ports = [args.port + 1 + i for i in range(args.replicas)]
        model = ""
        for i, port in enumerate(ports):
            pod, model = replica_pod(port)
            run = docker_run(
                f"bnfold-scale-{args.port}-{i}",
                args.image,
                pod,
                {},
                work / f"r{i}",
                configmaps={configmap["metadata"]["name"]: configmap},
                services=[one("kubernetes/service.yaml", "Service")],
            )
            argv = [*run.argv[:2], "--network", "host", *run.argv[2:]]
            names.append(run.name)
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        for port in ports:
            wait_ready(port)
        log(f"{args.replicas} replicas ready on 127.0.0.1:{ports[0]}..{ports[-1]} (--network host), model {model}")
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
        cfg = work / "haproxy.cfg"
        config = HAPROXY.format(port=args.port, servers=servers)
        if args.no_retry:
            config = config.replace("    retry-on all-retryable-errors\n", "    retry-on none\n")
        cfg.write_text(config)
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config: {check.stdout} {check.stderr}")
        balancer = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_ready(args.port)
        lua = work / "count.lua"
        lua.write_text(COUNTING_LUA)
        url = f"http://127.0.0.1:{args.port}/v2/models/{model}/infer"

        before = [success_count(p) for p in ports]
        steady = run_load(url, lua, args.requests, args.connections)
        share = [success_count(p) - b for p, b in zip(ports, before, strict=True)]
        log(
            f"run 1, {args.replicas} replicas: {steady['answered']} requests at concurrency {args.connections} "
            f"in {steady['wall_s']:.2f} s = {steady['rps']:.0f} req/s, p99 {steady['p99_us'] / 1000:.1f} ms, "
            f"statuses {steady['statuses']}, socket errors {steady['socket_errors']}; per replica {share}"
        )
        if steady["non_200"] or steady["socket_errors"]:
            raise RuntimeError("run 1: requests lost or failed")

        victim, victim_port = names[0], ports[0]
        start_count = success_count(victim_port)
        killed: dict[str, Any] = {}

        def killer() -> None:
            threshold = start_count + args.requests / args.replicas / 3  # a third of its share answered
            while success_count(victim_port) < threshold:
                time.sleep(0.05)
            subprocess.run(["docker", "kill", victim], check=True, capture_output=True, timeout=30)
            killed["at"] = time.monotonic()

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        t0 = time.monotonic()
        chaos = run_load(url, lua, args.requests, args.connections)
        thread.join(timeout=60)
        if "at" not in killed:
            raise RuntimeError("the victim was never killed (it answered too few requests)")
        log(
            f"run 2, {args.replicas} replicas, {victim} killed (SIGKILL) {killed['at'] - t0:.2f} s into the run: "
            f"{chaos['answered']} of {args.requests} requests answered, statuses {chaos['statuses']}, "
            f"socket errors {chaos['errors']}, {chaos['rps']:.0f} req/s, p99 {chaos['p99_us'] / 1000:.1f} ms"
        )
        if chaos["answered"] < args.requests or chaos["non_200"] or chaos["socket_errors"]:
            raise RuntimeError("run 2: requests lost while a replica died")
        result = {
            "replicas": args.replicas,
            "connections": args.connections,
            "requests": args.requests,
            "steady": steady,
            "steady_per_replica": share,
            "chaos": chaos,
        }
        print("SCALE_OUT_JSON " + json.dumps(result))
    except (RuntimeError, subprocess.SubprocessError) as exc:
        log(f"FAIL: {exc}")
        for name in names:
            subprocess.run(["docker", "logs", "--tail", "20", name], check=False)
        return 1
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    log("all checks passed: no request lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
