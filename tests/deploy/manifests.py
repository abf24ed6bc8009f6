"""The deploy/ manifests as objects, and the schemas they are checked against (shared by the tests and
scripts/kubelet-check)."""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: The Kubernetes release whose OpenAPI schemas core objects are validated against (preStop `sleep` needs 1.30).
KUBERNETES_VERSION = "1.33.0"
KSERVE_CRDS = {
    "ClusterServingRuntime": "serving.kserve.io_clusterservingruntimes.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
}


def shared_dir() -> Path | None:
    """``shared/`` beside the clone (CI), or ``$SHARED_DIR``; None when neither exists."""
    for candidate in (os.environ.get("SHARED_DIR"), ROOT.parent / "shared"):
        if candidate and (Path(candidate) / "kserve").is_dir():
            return Path(candidate)
    return None


#: libyaml's parser when PyYAML has it: KServe's InferenceService CRD is 2 MB of YAML
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def one(path: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(DEPLOY / path) if d["kind"] == kind]
    return doc


def is_kserve(obj: dict[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith("serving.kserve.io/")


@cache
def crd_spec_schema(kind: str, shared: Path) -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema.properties.spec``, closed: unknown fields are errors (as the API server's
    strict field validation, `kubectl apply --validate=strict`, makes them) instead of being pruned silently."""
    (crd,) = documents(shared / "kserve" / KSERVE_CRDS[kind])
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


def kserve_errors(obj: dict[str, Any], shared: Path) -> list[str]:
    """Schema errors of a KServe object's spec (plus the few metadata rules the API server applies)."""
    import jsonschema

    errors = []
    validator = jsonschema.Draft7Validator(crd_spec_schema(obj["kind"], shared))
    for error in validator.iter_errors(obj.get("spec", {})):
        errors.append(f"spec.{'.'.join(str(p) for p in error.absolute_path)}: {error.message}")
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        errors.append(f"unknown top-level fields {sorted(extra)}")
    meta = obj.get("metadata", {})
    if set(meta) - {"name", "namespace", "labels", "annotations"}:
        errors.append(f"unexpected metadata fields {sorted(set(meta))}")
    return errors
