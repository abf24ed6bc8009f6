"""deploy/ is what a cluster would accept: every core object against Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict), every KServe object against the openAPIV3Schema of KServe's CRDs (closed: an
unknown field fails), and the manifests agree with each other and with the server they run."""

from __future__ import annotations

import base64
import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service.cli import build_parser
from service.settings import BUNDLED_REPOSITORY, Settings
from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSION,
    ROOT,
    all_objects,
    is_kserve,
    kserve_errors,
    one,
    shared_dir,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

OBJECTS = all_objects()
CORE = [(p, o) for p, o in OBJECTS if not is_kserve(o)]
KSERVE = [(p, o) for p, o in OBJECTS if is_kserve(o)]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def ident(item: tuple[Path, dict[str, Any]]) -> str:
    path, obj = item
    return f"{path.relative_to(DEPLOY)}:{obj['kind']}/{obj['metadata']['name']}"


@pytest.fixture(scope="module")
def shared() -> Path:
    found = shared_dir()
    if found is None:
        reason = "no ../shared/kserve beside the clone (KServe CRDs); set SHARED_DIR"
        if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("REQUIRE_SHARED_DIR") == "1":
            pytest.fail(f"CI (CI=true or REQUIRE_SHARED_DIR=1): {reason}")
        pytest.skip(reason)
    return found


def core_error(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def test_the_folders_hold_the_kserve_and_kubernetes_objects() -> None:
    kinds = {(p.relative_to(DEPLOY).parts[0], o["kind"]) for p, o in OBJECTS}
    assert {("kserve", "ClusterServingRuntime"), ("kserve", "InferenceService")} <= kinds
    wanted = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    assert {("kubernetes", k) for k in wanted} <= kinds
    assert len(CORE) >= 7 and len(KSERVE) >= 4


@pytest.mark.parametrize("item", CORE, ids=ident)
def test_core_object_is_valid_kubernetes(item: tuple[Path, dict[str, Any]]) -> None:
    assert core_error(item[1]) is None


@pytest.mark.parametrize("item", KSERVE, ids=ident)
def test_kserve_object_is_valid_for_kserves_crd(item: tuple[Path, dict[str, Any]], shared: Path) -> None:
    assert kserve_errors(item[1], shared) == []


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]["model"]  # type: ignore[no-any-return]
    return obj["spec"]["containers"][0]  # type: ignore[no-any-return]


DRIFTS = {
    "unknown container field": lambda o: _container(o).__setitem__("argz", ["serve"]),
    "replicas as text": lambda o: o["spec"].__setitem__("replicas", "two"),
    "probe without a handler type": lambda o: _container(o)["readinessProbe"].__setitem__("httpGet", "/v2"),
    "env without a name": lambda o: _container(o)["env"].append({"value": "json"}),
    "resources as a list": lambda o: _container(o).__setitem__("resources", ["cpu"]),
}
KSERVE_DRIFTS = {
    "unknown spec field": lambda o: o["spec"].__setitem__("modelFormats", [{"name": "onnx"}]),
    "protocols as one string": lambda o: o["spec"].__setitem__("protocolVersions", "v2,grpc-v2"),
    "priority as text": lambda o: o["spec"]["supportedModelFormats"][0].__setitem__("priority", "high"),
    "no containers": lambda o: o["spec"].pop("containers"),
    "unknown container field": lambda o: _container(o).__setitem__("argz", ["serve"]),
}
ISVC_DRIFTS = {
    "no predictor": lambda o: o["spec"].pop("predictor"),
    "unknown model field": lambda o: _container(o).__setitem__("storageURI", "s3://x"),
    "replicas as text": lambda o: o["spec"]["predictor"].__setitem__("minReplicas", "one"),
}


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_a_deployment_that_drifts_from_the_schema_fails(drift: str) -> None:
    obj = copy.deepcopy(one("kubernetes/deployment.yaml", "Deployment"))
    DRIFTS[drift](obj)
    assert core_error(obj) is not None


@pytest.mark.parametrize("drift", sorted(KSERVE_DRIFTS))
def test_a_serving_runtime_that_drifts_from_the_schema_fails(drift: str, shared: Path) -> None:
    obj = copy.deepcopy(one("kserve/servingruntime.yaml", "ClusterServingRuntime"))
    KSERVE_DRIFTS[drift](obj)
    assert kserve_errors(obj, shared) != []


@pytest.mark.parametrize("drift", sorted(ISVC_DRIFTS))
def test_an_inference_service_that_drifts_from_the_schema_fails(drift: str, shared: Path) -> None:
    obj = copy.deepcopy(one("kserve/inferenceservice.yaml", "InferenceService"))
    ISVC_DRIFTS[drift](obj)
    assert kserve_errors(obj, shared) != []


# ---------------------------------------------------------------------------------------------- agreement
RUNTIME = one("kserve/servingruntime.yaml", "ClusterServingRuntime")
DEPLOYMENT = one("kubernetes/deployment.yaml", "Deployment")
GPU_DEPLOYMENT = one("kubernetes/gpu/deployment.yaml", "Deployment")
SERVERS = [("kserve", _container(RUNTIME)), ("deployment", _container(DEPLOYMENT)), ("gpu", _container(GPU_DEPLOYMENT))]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize(("where", "container"), SERVERS, ids=[w for w, _ in SERVERS])
def test_the_command_line_and_environment_are_ones_bnfold_serve_accepts(where: str, container: dict[str, Any]) -> None:
    args = container["args"]
    assert args[:2] == ["bnfold", "serve"]
    parsed = build_parser().parse_args([a.replace("{{.Name}}", "model-name") for a in args[1:]])
    assert parsed.port == 8080 and parsed.model == Path("/mnt/models") and parsed.model_name
    assert parsed.grpc_port == 9000  # KServe's gRPC port (kserve-tritonserver: --grpc-port=9000)
    env = env_of(container)
    known = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known  # bnfold serve refuses or warns about unknown BNFOLD_ variables
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    Settings(**{k.removeprefix("BNFOLD_").lower(): v for k, v in plain.items()})  # every value parses
    assert env["BNFOLD_INTRA_OP_THREADS"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    assert env["BNFOLD_LOG_FORMAT"] == "json"


@pytest.mark.parametrize(("where", "container"), SERVERS, ids=[w for w, _ in SERVERS])
def test_probes_ask_the_v2_health_endpoints_on_the_http_port(where: str, container: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 8080


@pytest.mark.parametrize(("where", "container"), SERVERS, ids=[w for w, _ in SERVERS])
def test_non_root_read_only_and_the_images_uid(where: str, container: dict[str, Any]) -> None:
    pod = {} if where == "kserve" else (DEPLOYMENT if where == "deployment" else GPU_DEPLOYMENT)["spec"]["template"]
    sc = {**(pod.get("spec", {}).get("securityContext", {}) if pod else {}), **container["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001  # the Dockerfile's USER
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable place
    if where != "kserve":  # KServe mounts /mnt/models itself (read-only)
        assert mounts["/mnt/models"]["readOnly"] is True


def test_drain_fits_the_grace_period() -> None:
    pod = DEPLOYMENT["spec"]["template"]["spec"]
    container = _container(DEPLOYMENT)
    drain = int(env_of(container)["BNFOLD_GRACEFUL_SHUTDOWN_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + drain < pod["terminationGracePeriodSeconds"]
    runtime_drain = int(env_of(_container(RUNTIME))["BNFOLD_GRACEFUL_SHUTDOWN_SECONDS"])
    for path in (
        "kserve/inferenceservice.yaml",
        "kserve/inferenceservice-gpu.yaml",
        "kserve/inferenceservice-grpc.yaml",
    ):
        assert runtime_drain < one(path, "InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert runtime_drain < 30  # Kubernetes' default grace period, for InferenceServices that set none


def test_images_are_this_version() -> None:
    assert _container(RUNTIME)["image"] == _container(DEPLOYMENT)["image"] == f"bnfold:{VERSION}"
    assert _container(GPU_DEPLOYMENT)["image"] == f"bnfold:{VERSION}-gpu"
    gpu = one("kserve/inferenceservice-gpu.yaml", "InferenceService")["spec"]["predictor"]["model"]
    assert gpu["runtimeVersion"] == f"{VERSION}-gpu"  # KServe swaps the runtime image's tag for this


def test_gpu_variants_ask_for_a_gpu_and_require_cuda() -> None:
    isvc = one("kserve/inferenceservice-gpu.yaml", "InferenceService")["spec"]["predictor"]["model"]
    for container in (_container(GPU_DEPLOYMENT), isvc):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = env_of(container)
        assert env["BNFOLD_PROVIDERS"] == "cuda,cpu" and env["BNFOLD_PROVIDER_POLICY"] == "strict"
    assert "nvidia.com/gpu" not in str(_container(DEPLOYMENT)["resources"])


def test_inference_services_use_this_runtime_as_declared() -> None:
    formats = {(f["name"], f.get("version")) for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert ("onnx", "1") in formats and RUNTIME["spec"]["supportedModelFormats"][0]["autoSelect"] is True
    assert RUNTIME["spec"]["protocolVersions"] == ["v2", "grpc-v2"]  # KServe's names (the CRD has no enum)
    assert _container(RUNTIME)["name"] == "kserve-container"
    assert "ports" not in _container(RUNTIME)  # Knative allows one; InferenceServices declare gRPC's (h2c)
    for path in sorted((DEPLOY / "kserve").glob("inferenceservice*.yaml")):
        model = one(f"kserve/{path.name}", "InferenceService")["spec"]["predictor"]["model"]
        assert model["runtime"] == RUNTIME["metadata"]["name"] and model["modelFormat"]["name"] == "onnx"
        assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
        if model["protocolVersion"] == "grpc-v2":
            assert model["ports"] == [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]


def test_the_service_and_budgets_select_the_deployments_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    gpu_labels = GPU_DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    service = one("kubernetes/service.yaml", "Service")["spec"]
    assert service["selector"].items() <= labels.items() and service["selector"].items() <= gpu_labels.items()
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not GPU_DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()  # no overlap
    pdb = one("kubernetes/pdb.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert pdb == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    named = {p["name"] for p in _container(DEPLOYMENT)["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= named
    for hpa in ("kubernetes/hpa.yaml", "kubernetes/optional/hpa-inflight.yaml"):
        ref = one(hpa, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])


def test_the_model_configmap_is_the_bundled_model() -> None:
    data = one("kubernetes/model-configmap.yaml", "ConfigMap")["binaryData"]["model.onnx"]
    assert base64.b64decode(data) == (BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx").read_bytes()
    volumes = {v["name"]: v for v in DEPLOYMENT["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["configMap"]["name"] == "bnfold-model"


def test_autoscaling_targets_are_the_measured_ones() -> None:
    """The Knative concurrency target and the in-flight HPA target are the same measured number."""
    target = one("kserve/inferenceservice.yaml", "InferenceService")["metadata"]["annotations"]
    inflight = one("kubernetes/optional/hpa-inflight.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert target["autoscaling.knative.dev/metric"] == "concurrency"
    assert re.fullmatch(r"[1-9][0-9]*", target["autoscaling.knative.dev/target"])
    assert inflight["pods"]["target"]["averageValue"] == target["autoscaling.knative.dev/target"]
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f'autoscaling.knative.dev/target: "{target["autoscaling.knative.dev/target"]}"' in docs
