"""What the server and a model say about themselves: V2 server and model metadata, Triton's model config."""

from __future__ import annotations

from typing import Any

from converter import Report
from service import __version__
from service.runtime.model import LoadedModel
from service.runtime.model_config import BatchPolicy
from service.runtime.samples import SAMPLES_FILE
from service.v2.tensors import TensorSpec

SERVER_NAME = "bnfold"
PLATFORM = "onnxruntime_onnx"
#: Protocol extensions this server implements, as reported in server metadata.
EXTENSIONS = ["binary_tensor_data", "classification"]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": [*EXTENSIONS]}


def model_metadata(model: LoadedModel, versions: list[str], transports: list[str]) -> dict[str, Any]:
    """V2 model metadata, and a ``bnfold`` section: folding, providers, the transports serving the model."""
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [t.metadata() for t in model.inputs],
        "outputs": [t.metadata() for t in model.outputs],
        "bnfold": {
            "version": model.version,
            "providers": model.providers,
            "requested_providers": model.requested_providers,
            "max_batch_size": model.max_batch_size,
            "dynamic_batching": model.batching.metadata() if model.batching else None,
            "folded": fold_summary(model.fold),
            "quantization": model.quantization,
            "warmup_inputs": model.warmup_inputs,
            "transports": transports,
        },
    }


def triton_config(model: LoadedModel) -> dict[str, Any]:
    """Triton's model configuration (``GET .../config``), as far as it applies."""
    batched = model.max_batch_size > 0

    def entry(t: TensorSpec) -> dict[str, Any]:
        dims = list(t.shape[1:] if batched else t.shape)
        e: dict[str, Any] = {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims}
        if t.name in model.config.labels:
            e["label_filename"] = "config.json:labels"
        return e

    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": model.max_batch_size,
        **({"dynamic_batching": _triton_batching(model.batching)} if model.batching else {}),
        "input": [entry(t) for t in model.inputs],
        "output": [entry(t) for t in model.outputs],
        "bnfold": {
            "version": model.version,
            "labels": model.config.labels,
            "providers": model.providers,
            "requested_providers": model.requested_providers,
            "preprocessing": model.config.model_dump(include={"scale", "mean", "std", "layout"}, exclude_none=True),
        },
    }


def _triton_batching(policy: BatchPolicy) -> dict[str, Any]:
    meta = policy.metadata()
    return {k: meta[k] for k in ("max_queue_delay_microseconds", "preferred_batch_size")}


def fold_summary(report: Report | None) -> dict[str, Any] | None:
    if report is None:
        return None
    v = report.verification
    return {
        "folded": [{"name": r.name, "into": r.into} for r in report.folded],
        "kept": [{"name": r.name, "reason": r.reason} for r in report.kept],
        "verification": None
        if v is None
        else {
            "passed": v.passed,
            "max_abs": max((o.max_abs for o in v.outputs), default=0.0),
            "inputs": SAMPLES_FILE if v.samples else "random",
            "runs": v.runs,
            "top1": {o.name: o.top1 for o in v.outputs if o.top1 is not None},
        },
    }
