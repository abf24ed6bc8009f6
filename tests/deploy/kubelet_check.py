"""The "kubelet" check (scripts/kubelet-check): run the container exactly as deploy/ declares it, with Docker.

Two pods, each read out of the manifests and translated by ``tests.deploy.kubelet``:

- ``kserve``: the ClusterServingRuntime's container merged as KServe does for deploy/kserve/inferenceservice.yaml
  (template variables from its metadata: ``{{.Name}}`` = ``digits``; its terminationGracePeriodSeconds), the
  model as KServe's storage initializer leaves a single-file storageUri: ``/mnt/models/model.onnx``, read-only;
- ``deployment``: deploy/kubernetes/deployment.yaml's pod, the model from model-configmap.yaml laid out as the
  kubelet mounts a ConfigMap, and service/service.yaml's Docker-link variables unless enableServiceLinks is false.

For each: ``docker run`` that command (printed), probes polled as declared (startup, then readiness and
liveness, each at its period and timeout, failing after its failureThreshold), V2 REST inference with
tritonclient.http compared with ONNX Runtime on the host, every log line a JSON object, the process PID 1 and
not root, the root filesystem read-only; then termination as the kubelet does it: the preStop sleep, SIGTERM,
and the exit must come, with code 0, within terminationGracePeriodSeconds (else SIGKILL and a failure). An
inference request in flight when SIGTERM arrives must still be answered 200.

    python -m tests.deploy.kubelet_check --image bnfold:smoke [--port 18100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tests.deploy.kubelet import Pod, docker_run
from tests.deploy.manifests import ROOT, one

MODEL = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"


def log(text: str) -> None:
    print(f"kubelet-check: {text}", flush=True)


class Failure(Exception):
    pass


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise Failure(f"docker {' '.join(args[:3])}...: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def probe_once(pod: Pod, probe: dict[str, Any]) -> bool:
    get = probe["httpGet"]
    url = f"http://127.0.0.1:{pod.ports[get['port']]}{get['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as r:
            return 200 <= r.status < 400
    except (OSError, urllib.error.URLError):
        return False


def run_probe(pod: Pod, kind: str, deadline: float) -> float:
    """Poll a probe as the kubelet does until it succeeds (successThreshold 1); fail after failureThreshold
    failures once initialDelaySeconds passed, or at ``deadline``. Returns the seconds it took."""
    probe = pod.probes[kind]
    start = time.monotonic()
    time.sleep(probe.get("initialDelaySeconds", 0))
    failures = 0
    while True:
        state = docker("inspect", "-f", "{{.State.Status}}", pod.name)
        if state != "running":
            raise Failure(f"{pod.name}: container {state} while waiting for {kind}")
        if probe_once(pod, probe):
            return time.monotonic() - start
        failures += 1
        # startup is allowed failureThreshold tries; readiness just keeps the pod out of endpoints
        if kind != "readinessProbe" and failures >= probe.get("failureThreshold", 3):
            raise Failure(f"{pod.name}: {kind} failed {failures} times: the kubelet would restart the container")
        if time.monotonic() > deadline:
            raise Failure(f"{pod.name}: {kind} never succeeded")
        time.sleep(probe.get("periodSeconds", 10))


def infer(pod: Pod, model: str) -> str:
    import onnxruntime as ort
    from tritonclient import http

    address = f"127.0.0.1:{pod.ports[8080]}"
    client = http.InferenceServerClient(address)
    if not (client.is_server_ready() and client.is_model_ready(model)):
        raise Failure(f"{pod.name}: model {model} not ready over tritonclient")
    meta = client.get_model_metadata(model)
    (inp,) = meta["inputs"]
    (out,) = meta["outputs"]
    x = np.random.default_rng(17).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    tensor = http.InferInput(inp["name"], list(x.shape), inp["datatype"])
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [tensor], outputs=[http.InferRequestedOutput(out["name"], binary_data=True)])
    got = result.as_numpy(out["name"])
    want = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {inp["name"]: x})[0]
    err = float(np.abs(got - want).max())
    if err > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise Failure(f"{pod.name}: served output differs from host ONNX Runtime by {err}")
    return f"V2 REST inference on {model} over tritonclient.http, max |served - host ORT| = {err:.1e}"


def grpc_port(pod: Pod) -> int | None:
    """The container's gRPC port when its args turn gRPC on (``--grpc-port=N``, N > 0), else None."""
    for arg in pod.argv[pod.argv.index("serve") + 1 :] if "serve" in pod.argv else []:
        if arg.startswith("--grpc-port="):
            port = int(arg.split("=", 1)[1])
            return port or None
    return None


def infer_grpc(pod: Pod, model: str, port: int) -> str:
    """V2 gRPC inference with tritonclient.grpc, and grpc.health.v1 as the kubelet's gRPC probe asks it."""
    import grpc
    import onnxruntime as ort
    import tritonclient.grpc as tgrpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = f"127.0.0.1:{pod.ports[port]}"
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise Failure(f"{pod.name}: grpc.health.v1 Check('') = {answer.status}, not SERVING")
    client = tgrpc.InferenceServerClient(address)
    if not (client.is_server_ready() and client.is_model_ready(model)):
        raise Failure(f"{pod.name}: model {model} not ready over tritonclient.grpc")
    meta = client.get_model_metadata(model, as_json=True)
    (inp,) = meta["inputs"]
    (out,) = meta["outputs"]
    x = np.random.default_rng(18).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    tensor = tgrpc.InferInput(inp["name"], list(x.shape), inp["datatype"])
    tensor.set_data_from_numpy(x)
    got = client.infer(model, [tensor]).as_numpy(out["name"])
    want = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {inp["name"]: x})[0]
    err = float(np.abs(got - want).max())
    if err > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise Failure(f"{pod.name}: gRPC output differs from host ONNX Runtime by {err}")
    return f"grpc.health.v1 SERVING; V2 gRPC inference over tritonclient.grpc, max |served - host ORT| = {err:.1e}"


def check_container(pod: Pod) -> list[str]:
    notes = []
    pid = docker("inspect", "-f", "{{.State.Pid}}", pod.name)
    uid = next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    cmdline = docker("exec", pod.name, "cat", "/proc/1/cmdline").replace("\0", " ").strip()
    if uid == "0":
        raise Failure(f"{pod.name}: runs as root")
    if "bnfold serve" not in cmdline:
        raise Failure(f"{pod.name}: PID 1 is {cmdline!r}, not the server (SIGTERM would not reach it)")
    notes.append(f"PID 1 is '{cmdline}', uid {uid}")
    if (
        docker("exec", pod.name, "sh", "-c", "touch /probe 2>/dev/null && echo writable || echo read-only")
        != "read-only"
    ):
        raise Failure(f"{pod.name}: root filesystem writable")
    if docker("exec", pod.name, "sh", "-c", "touch /mnt/models/probe 2>/dev/null && echo w || echo ro") != "ro":
        raise Failure(f"{pod.name}: /mnt/models writable")
    docker("exec", pod.name, "sh", "-c", "touch /tmp/probe")
    notes.append("root and /mnt/models read-only, /tmp writable")
    return notes


def json_logs(name: str) -> int:
    proc = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            raise Failure(f"{name}: a log line that is not JSON: {line[:200]}") from None
        if not {"time", "level", "logger", "message"} <= entry.keys():
            raise Failure(f"{name}: a log object without time/level/logger/message: {line[:200]}")
    return len(lines)


def terminate(pod: Pod, model: str) -> str:
    """preStop, then SIGTERM with a request in flight; exit 0 within the grace period."""
    body = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}]}
    ).encode()
    url = f"http://127.0.0.1:{pod.ports[8080]}/v2/models/{model}/infer"
    statuses: list[int] = []

    def steady() -> None:  # requests during preStop and the drain, as an endpoint not yet removed would get
        deadline = time.monotonic() + pod.pre_stop_sleep + 0.5
        while time.monotonic() < deadline:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
            except OSError:
                break  # the listener closed: the kubelet has removed the endpoint long before

    start = time.monotonic()
    client = threading.Thread(target=steady)
    client.start()
    time.sleep(pod.pre_stop_sleep)  # the preStop hook (sleep action): the kubelet waits, then signals
    docker("kill", "--signal", "TERM", pod.name)
    remaining = pod.grace_seconds - (time.monotonic() - start)
    try:
        subprocess.run(["docker", "wait", pod.name], capture_output=True, timeout=max(remaining, 1), check=True)
    except subprocess.TimeoutExpired:
        docker("kill", pod.name, check=False)
        raise Failure(f"{pod.name}: still running {pod.grace_seconds} s after termination began (SIGKILL)") from None
    elapsed = time.monotonic() - start
    client.join()
    code = docker("inspect", "-f", "{{.State.ExitCode}}", pod.name)
    if code != "0":
        raise Failure(f"{pod.name}: exit code {code} after SIGTERM")
    if not statuses or any(s != 200 for s in statuses):
        raise Failure(f"{pod.name}: requests during preStop/drain answered {sorted(set(statuses))}")
    logs = subprocess.run(["docker", "logs", pod.name], capture_output=True, text=True, check=False).stderr
    if "readiness off" not in logs:
        raise Failure(f"{pod.name}: no 'readiness off' line after SIGTERM")
    return (
        f"preStop {pod.pre_stop_sleep} s + SIGTERM -> exit code 0 after {elapsed:.2f} s "
        f"(grace period {pod.grace_seconds} s); {len(statuses)} requests during preStop all 200"
    )


def run_pod(pod: Pod, model: str) -> None:
    log(f"{pod.name}: " + " ".join(pod.argv))
    subprocess.run(pod.argv, check=True, capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + 180
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in pod.probes:
            took = run_probe(pod, kind, deadline)
            get = pod.probes[kind]["httpGet"]
            log(f"{pod.name}: {kind} {get['path']} on :{get['port']} succeeded after {took:.1f} s")
    log(f"{pod.name}: {infer(pod, model)}")
    port = grpc_port(pod)
    if port is None:
        log(f"{pod.name}: gRPC NOT CHECKED: the container's args turn no gRPC port on")
    else:
        log(f"{pod.name}: {infer_grpc(pod, model, port)}")
    for note in check_container(pod):
        log(f"{pod.name}: {note}")
    log(f"{pod.name}: {terminate(pod, model)}")
    log(f"{pod.name}: all {json_logs(pod.name)} log lines are JSON objects (time, level, logger, message)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="local tag standing in for the manifests' image")
    parser.add_argument("--port", type=int, default=18100, help="first of the host ports used on 127.0.0.1")
    args = parser.parse_args(argv)
    runtime = one("kserve/servingruntime.yaml", "ClusterServingRuntime")
    isvc = one("kserve/inferenceservice.yaml", "InferenceService")
    deployment = one("kubernetes/deployment.yaml", "Deployment")
    configmap = one("kubernetes/model-configmap.yaml", "ConfigMap")
    names: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="bnfold-kubelet-"))
    try:
        # KServe: the runtime's pod spec with the InferenceService's predictor fields merged in
        storage = work / "kserve-model"
        storage.mkdir()
        shutil.copy(MODEL, storage / "model.onnx")  # a single-file storageUri lands as /mnt/models/<file>
        (storage / "model.onnx").chmod(0o444)
        storage.chmod(0o755)
        predictor = isvc["spec"]["predictor"]
        kserve_pod = {
            "containers": runtime["spec"]["containers"],
            "volumes": runtime["spec"].get("volumes", []),
            "terminationGracePeriodSeconds": predictor.get("terminationGracePeriodSeconds", 30),
        }
        pods = [
            (
                docker_run(
                    f"bnfold-kubelet-kserve-{args.port}",
                    args.image,
                    kserve_pod,
                    {8080: args.port, 9000: args.port + 1},
                    work,
                    extra_mounts={"/mnt/models": storage},
                    meta=isvc["metadata"],
                ),
                isvc["metadata"]["name"],
            ),
            (
                docker_run(
                    f"bnfold-kubelet-deployment-{args.port}",
                    args.image,
                    deployment["spec"]["template"]["spec"],
                    {8080: args.port + 2, 9000: args.port + 3},
                    work,
                    configmaps={configmap["metadata"]["name"]: configmap},
                    services=[one("kubernetes/service.yaml", "Service")],
                ),
                next(
                    a.split("=", 1)[1]
                    for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
                    if a.startswith("--model-name=")
                ),
            ),
        ]
        for pod, model in pods:
            names.append(pod.name)
            run_pod(pod, model)
    except Failure as exc:
        log(f"FAIL: {exc}")
        for name in names:
            with contextlib.suppress(Exception):
                print(docker("logs", "--tail", "30", name, check=False), file=sys.stderr)
        return 1
    finally:
        for name in names:
            docker("rm", "-f", name, check=False)
        shutil.rmtree(work, ignore_errors=True)
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
