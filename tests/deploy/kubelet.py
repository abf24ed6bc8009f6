"""A pod's container as the kubelet would run it, spelled as one `docker run` command line.

Only what deploy/ uses is translated, and everything it uses must be: a field this does not know raises
``Unsupported`` (so a manifest cannot gain a setting the kubelet check silently ignores). Kubernetes semantics
kept: ``args`` replace the image's CMD and keep its ENTRYPOINT (``command`` would replace it), env values and
``resourceFieldRef`` (``ceil(limit / divisor)``), CPU and memory limits, the user and group, a read-only root,
dropped capabilities, no privilege escalation, volumes (a ConfigMap as the kubelet lays it out: a timestamped
folder, a ``..data`` link and one link per key, read-only; an ``emptyDir`` of medium Memory as a tmpfs of its
size limit). What differs on purpose: the image (a local tag) and the network — each pod gets its own network
namespace (Docker's bridge) with its container ports published on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Unsupported(ValueError):
    """The manifest uses something this translation does not reproduce."""


CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "ports", "resources", "readinessProbe",
    "livenessProbe", "startupProbe", "securityContext", "volumeMounts", "lifecycle",
}  # fmt: skip
POD_FIELDS = {
    "containers", "volumes", "securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken",
    "topologySpreadConstraints", "tolerations", "enableServiceLinks",
}  # fmt: skip
SECURITY_FIELDS = {
    "runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "readOnlyRootFilesystem", "allowPrivilegeEscalation",
    "privileged", "capabilities", "seccompProfile",
}  # fmt: skip
TEMPLATE = re.compile(r"\{\{\s*\.(Name|Namespace|Labels\.[\w./-]+|Annotations\.[\w./-]+)\s*\}\}")


def substitute(text: str, meta: dict[str, Any]) -> str:
    """KServe's ReplacePlaceholders: Go template fields of the InferenceService's ObjectMeta."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "Name":
            return str(meta["name"])
        if key == "Namespace":
            return str(meta.get("namespace", "default"))
        group, _, name = key.partition(".")
        return str(meta.get(group.lower(), {}).get(name, ""))

    out = TEMPLATE.sub(value, text)
    if "{{" in out:
        raise Unsupported(f"template not understood: {text}")
    return out


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``1``, ``1Gi``, ``512Mi``, ``1G``) as a number."""
    s = str(text)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


@dataclass
class Pod:
    """What the checks need besides the command: ports, probes, grace period, preStop."""

    name: str
    argv: list[str]
    ports: dict[int, int]  # container port -> host port on 127.0.0.1
    probes: dict[str, dict[str, Any]]
    grace_seconds: int
    pre_stop_sleep: int
    env: dict[str, str]
    files: list[Path] = field(default_factory=list)


def service_link_variables(service: dict[str, Any], ip: str) -> dict[str, str]:
    """The variables the kubelet sets for a Service (``{NAME}_SERVICE_HOST``, ``{NAME}_PORT=tcp://...``...)."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    ports = service["spec"].get("ports", [])
    env = {f"{name}_SERVICE_HOST": ip}
    for i, port in enumerate(ports):
        proto = port.get("protocol", "TCP")
        number = port["port"]
        if i == 0:
            env[f"{name}_SERVICE_PORT"] = str(number)
            env[f"{name}_PORT"] = f"{proto.lower()}://{ip}:{number}"
        if "name" in port:
            env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
        prefix = f"{name}_PORT_{number}_{proto}"
        env |= {
            prefix: f"{proto.lower()}://{ip}:{number}",
            f"{prefix}_PROTO": proto.lower(),
            f"{prefix}_PORT": str(number),
            f"{prefix}_ADDR": ip,
        }
    return env


def _check(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise Unsupported(f"{where}: {sorted(unknown)} not reproduced by the kubelet check")


def configmap_volume(root: Path, configmap: dict[str, Any], mode: int) -> Path:
    """The kubelet's ConfigMap volume layout under ``root``."""
    stamp = root / "..2026_01_01_00_00_00.000000000"
    stamp.mkdir(parents=True)
    items = {k: v.encode() for k, v in configmap.get("data", {}).items()}
    items |= {k: base64.b64decode(v) for k, v in configmap.get("binaryData", {}).items()}
    for key, content in items.items():
        (stamp / key).write_bytes(content)
        (stamp / key).chmod(mode)
    (root / "..data").symlink_to(stamp.name)
    for key in items:
        (root / key).symlink_to(f"..data/{key}")
    root.chmod(0o755)
    stamp.chmod(0o755)
    return root


def docker_run(
    name: str,
    image: str,
    pod: dict[str, Any],
    host_ports: dict[int, int],
    work: Path,
    *,
    configmaps: dict[str, dict[str, Any]] | None = None,
    extra_mounts: dict[str, Path] | None = None,
    meta: dict[str, Any] | None = None,
    services: list[dict[str, Any]] | None = None,
) -> Pod:
    """``docker run`` for the pod's single container. ``extra_mounts``: volumes a controller adds (KServe's
    model volume at /mnt/models), read-only; ``meta``: the InferenceService metadata for template variables;
    ``services``: the namespace's Services, whose Docker-link variables the kubelet injects unless
    ``enableServiceLinks`` is false."""
    _check(pod, POD_FIELDS, "pod spec")
    pod = copy.deepcopy(pod)  # the probes' named ports are resolved in place below
    (container,) = pod["containers"]
    _check(container, CONTAINER_FIELDS, f"container {container.get('name')}")
    meta = meta or {}
    argv = ["docker", "run", "-d", "--name", name]
    # resources: limits are what the container gets (requests only place the pod)
    limits = container.get("resources", {}).get("limits", {})
    unknown_resources = set(limits) - {"cpu", "memory"}
    if unknown_resources:
        raise Unsupported(f"resources {sorted(unknown_resources)} (a GPU pod is not run here)")
    if "cpu" in limits:
        argv += ["--cpus", f"{quantity(limits['cpu']):g}"]
    if "memory" in limits:
        argv += ["--memory", str(int(quantity(limits["memory"])))]
    # security: pod-level first, the container's wins
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    _check(sc, SECURITY_FIELDS, "securityContext")
    if "runAsUser" in sc:
        argv += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("runAsNonRoot") and sc.get("runAsUser", 0) == 0:
        raise Unsupported("runAsNonRoot without a runAsUser: the kubelet would check the image's USER")
    if "fsGroup" in sc:
        argv += ["--group-add", str(sc["fsGroup"])]
    if sc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if sc.get("privileged"):
        raise Unsupported("privileged")
    for cap in sc.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", cap]
    for cap in sc.get("capabilities", {}).get("add", []):
        argv += ["--cap-add", cap]
    if sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] != "RuntimeDefault":
        raise Unsupported("a seccomp profile other than RuntimeDefault (Docker's default)")
    # environment
    env: dict[str, str] = {}
    if pod.get("enableServiceLinks", True):
        for i, service in enumerate(services or []):
            env |= service_link_variables(service, f"10.96.0.{10 + i}")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = substitute(str(item["value"]), meta)
        elif "resourceFieldRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["resourceFieldRef"]
            resource = ref["resource"]
            if not resource.startswith("limits.") or resource.removeprefix("limits.") not in limits:
                raise Unsupported(f"resourceFieldRef {resource} without that limit")
            amount = quantity(limits[resource.removeprefix("limits.")]) / quantity(ref.get("divisor", "1"))
            env[item["name"]] = str(math.ceil(amount))
        else:
            raise Unsupported(f"env {item['name']}: {item.get('valueFrom')}")
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    # volumes
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            if volume["emptyDir"].get("medium") != "Memory":
                raise Unsupported("an emptyDir on disk")
            opts = f"size={int(quantity(size))}," if size else ""
            argv += ["--tmpfs", f"{mount['mountPath']}:{opts}mode=1777"]
        elif "configMap" in volume:
            cm_name = volume["configMap"]["name"]
            cm = (configmaps or {})[cm_name]
            host = configmap_volume(work / f"configmap-{cm_name}", cm, volume["configMap"].get("defaultMode", 0o644))
            argv += ["-v", f"{host}:{mount['mountPath']}{ro}"]
        else:
            raise Unsupported(f"volume {mount['name']}: {sorted(volume)}")
    for path, host in (extra_mounts or {}).items():
        argv += ["-v", f"{host}:{path}:ro"]
    # network: the pod's own namespace, its ports on 127.0.0.1 only
    declared = {p["containerPort"] for p in container.get("ports", [])}
    for container_port, host_port in host_ports.items():
        argv += ["-p", f"127.0.0.1:{host_port}:{container_port}"]
    missing = declared - set(host_ports)
    if missing:
        raise Unsupported(f"container ports {sorted(missing)} not published")
    if container.get("imagePullPolicy", "IfNotPresent") == "Always":
        raise Unsupported("imagePullPolicy Always (no registry here)")
    if "command" in container:
        argv += ["--entrypoint", container["command"][0]]
        args = [*container["command"][1:], *container.get("args", [])]
    else:
        args = container.get("args", [])
    argv.append(image)
    argv += [substitute(a, meta) for a in args]
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for probe in probes.values():
        get = probe.get("httpGet")
        if get is None:
            raise Unsupported(f"probe {probe}: only httpGet is reproduced")
        get["port"] = named.get(get["port"], get["port"])
    lifecycle = container.get("lifecycle", {})
    _check(lifecycle, {"preStop"}, "lifecycle")
    pre_stop = lifecycle.get("preStop", {})
    _check(pre_stop, {"sleep"}, "preStop")
    return Pod(
        name=name,
        argv=argv,
        ports=dict(host_ports),
        probes=probes,
        grace_seconds=int(pod.get("terminationGracePeriodSeconds", 30)),
        pre_stop_sleep=int(pre_stop.get("sleep", {}).get("seconds", 0)),
        env=env,
    )
