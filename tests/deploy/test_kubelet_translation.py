"""The kubelet check's translation of a pod spec into `docker run` (scripts/kubelet-check runs it for real)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from service.runtime.repository import single_model_file
from tests.deploy.kubelet import Unsupported, docker_run, quantity, substitute
from tests.deploy.manifests import one

RUNTIME = one("kserve/servingruntime.yaml", "ClusterServingRuntime")
ISVC = one("kserve/inferenceservice.yaml", "InferenceService")
DEPLOYMENT = one("kubernetes/deployment.yaml", "Deployment")
CONFIGMAP = one("kubernetes/model-configmap.yaml", "ConfigMap")


def deployment_pod(tmp_path: Path, pod: dict[str, Any] | None = None) -> list[str]:
    spec = pod or DEPLOYMENT["spec"]["template"]["spec"]
    return docker_run("p", "img:test", spec, {8080: 1, 9000: 2}, tmp_path, configmaps={"bnfold-model": CONFIGMAP}).argv


def test_the_deployment_runs_as_declared(tmp_path: Path) -> None:
    argv = " ".join(deployment_pod(tmp_path))
    for part in (
        "--cpus 1 ",
        "--memory 1073741824 ",
        "--user 10001:10001 ",
        "--group-add 10001 ",
        "--read-only ",
        "--security-opt no-new-privileges ",
        "--cap-drop ALL ",
        "-e BNFOLD_INTRA_OP_THREADS=1 ",  # resourceFieldRef limits.cpu
        "-e BNFOLD_LOG_FORMAT=json ",
        "--tmpfs /tmp:size=67108864,mode=1777 ",
        ":/mnt/models:ro ",
        "-p 127.0.0.1:1:8080 -p 127.0.0.1:2:9000 ",
        "img:test bnfold serve --model-name=digits --http-port=8080 --grpc-port=9000 /mnt/models",
    ):
        assert part in argv + " ", part
    assert "--network" not in argv  # its own network namespace, as a pod


def test_service_links_would_inject_bnfold_variables_so_the_pods_turn_them_off(tmp_path: Path) -> None:
    service = one("kubernetes/service.yaml", "Service")
    pod = DEPLOYMENT["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    kwargs: dict[str, Any] = {"configmaps": {"bnfold-model": CONFIGMAP}, "services": [service]}
    off = docker_run("p", "img", pod, {8080: 1, 9000: 2}, tmp_path / "a", **kwargs).env
    assert not any(k.startswith("BNFOLD_SERVICE") or k.startswith("BNFOLD_PORT") for k in off)
    linked = {**pod, "enableServiceLinks": True}
    on = docker_run("p", "img", linked, {8080: 1, 9000: 2}, tmp_path / "b", **kwargs).env
    assert on["BNFOLD_PORT"] == "tcp://10.96.0.10:80" and on["BNFOLD_SERVICE_PORT_GRPC"] == "9000"


def test_the_configmap_volume_is_laid_out_as_the_kubelet_does_and_serves_one_model(tmp_path: Path) -> None:
    deployment_pod(tmp_path)
    volume = tmp_path / "configmap-bnfold-model"
    assert (volume / "..data").is_symlink() and (volume / "model.onnx").is_symlink()
    assert single_model_file(volume) == volume / "model.onnx"
    assert (volume / "model.onnx").stat().st_mode & 0o777 == 0o444


def test_kserve_template_variables_come_from_the_inference_service(tmp_path: Path) -> None:
    pod = {"containers": RUNTIME["spec"]["containers"], "volumes": RUNTIME["spec"]["volumes"]}
    run = docker_run(
        "k", "img", pod, {8080: 1}, tmp_path, extra_mounts={"/mnt/models": tmp_path}, meta=ISVC["metadata"]
    )
    assert "--model-name=digits" in run.argv and f"{tmp_path}:/mnt/models:ro" in run.argv
    assert run.probes["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert substitute("{{.Labels.team}}-{{.Namespace}}", {"labels": {"team": "a"}}) == "a-default"
    with pytest.raises(Unsupported):
        substitute("{{.Spec.Thing}}", {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, p: c.__setitem__("volumeDevices", []), "volumeDevices"),
        (lambda c, p: c["env"].append({"name": "K", "valueFrom": {"secretKeyRef": {}}}), "secretKeyRef"),
        (lambda c, p: c["resources"]["limits"].__setitem__("nvidia.com/gpu", "1"), "nvidia.com/gpu"),
        (lambda c, p: c["securityContext"].__setitem__("privileged", True), "privileged"),
        (lambda c, p: p.__setitem__("hostNetwork", True), "hostNetwork"),
        (lambda c, p: c["readinessProbe"].__setitem__("exec", {}) or c["readinessProbe"].pop("httpGet"), "httpGet"),
    ],
)
def test_what_the_check_cannot_reproduce_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    pod = copy.deepcopy(DEPLOYMENT["spec"]["template"]["spec"])
    change(pod["containers"][0], pod)
    with pytest.raises(Unsupported, match=message.replace(".", r"\.")):
        deployment_pod(tmp_path, pod)


def test_quantities() -> None:
    assert quantity("500m") == 0.5 and quantity("1Gi") == 1024**3 and quantity(2) == 2 and quantity("64Mi") == 64 << 20


@pytest.mark.parametrize("script", ["kubelet-check", "scale-out-check"])
def test_the_scripts_parse_and_ci_runs_them(script: str) -> None:
    import shutil
    import subprocess

    from tests.deploy.manifests import ROOT

    path = ROOT / "scripts" / script
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"scripts/{script}" in ci and ci.index("scripts/docker-smoke") < ci.index(f"scripts/{script}")
