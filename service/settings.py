"""Every setting of the service, from the environment (prefix ``BNFOLD_``) or the ``bnfold serve`` flags.

The settings table in docs/serving.md is generated from these field descriptions (``tests/test_readme.py`` keeps it in
step), so the description here is the documentation.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The repository shipped inside the package: the ``digits`` model.
BUNDLED_REPOSITORY = Path(__file__).parent / "models"

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BNFOLD_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on (the container image sets 0.0.0.0).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the V2 gRPC API (`inference.GRPCInferenceService` and `grpc.health.v1`) on the "
        "same host; 0 turns gRPC off.",
    )
    workers: int = Field(1, ge=1, le=64, description="Server processes; each loads every model.")
    model: Path | None = Field(
        None,
        description="Serve this one ONNX model (version 1) instead of a repository: a file, or a directory holding "
        "exactly one `.onnx` file at any depth (KServe's `/mnt/models`; hidden entries such as a ConfigMap's "
        "`..data` are skipped). Model name: `BNFOLD_MODEL_NAME`, else the file stem.",
    )
    model_repository: Path = Field(
        BUNDLED_REPOSITORY,
        description="Model repository `DIR/<name>/<version>/model.onnx` (+ optional `DIR/<name>/config.json`). "
        "Default: the bundled repository with the `digits` model.",
    )
    repository_poll_seconds: float = Field(
        0.0,
        ge=0,
        description="Rescan the repository this often and load added or replaced versions (0: only at start); a "
        "model unloaded through the repository API stays unloaded until loaded again.",
    )
    model_control_mode: Literal["none", "explicit"] = Field(
        "none",
        description="`none`: load every model of the repository at start; `explicit` (Triton's "
        "`--model-control-mode=explicit`): load only `BNFOLD_LOAD_MODELS` at start, then what the repository "
        "API (`POST /v2/repository/models/{name}/load`) asks for; no polling. The API loads and unloads in both.",
    )
    load_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="With `BNFOLD_MODEL_CONTROL_MODE=explicit`: the models to load at start, comma-separated (`*`: "
        "all; Triton's `--load-model`); unset: none.",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cpu"],
        description="Execution providers in order of preference, comma-separated: `tensorrt`, `cuda`, `cpu`.",
    )
    provider_policy: Literal["fallback", "strict"] = Field(
        "fallback",
        description="`fallback`: serve on whatever providers ONNX Runtime activates, with a warning; "
        "`strict`: refuse to start unless every requested provider is active (exit code 3).",
    )
    fold_on_load: bool = Field(
        True, description="Fold (and verify) models that still have BatchNormalization nodes before serving."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per session (0: the CPUs this process may run on, so a "
        "cpuset-limited container is not oversubscribed).",
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level for serving sessions."
    )
    warmup_runs: int = Field(3, ge=0, description="Inferences run on each model before it reports ready.")
    dynamic_batching: bool = Field(
        False,
        description="Batch concurrent requests for every model whose config.json says nothing about it and whose "
        "inputs and outputs all have a dynamic first dimension (a config's `dynamic_batching` block always wins).",
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        description="Largest batch (first dimension) of a model whose config.json sets no `max_batch_size` and whose "
        "inputs and outputs all have a dynamic first dimension (Triton's auto-completed `default-max-batch-size`); "
        "with dynamic first dimensions on the inputs only, 1. Also the batch `BNFOLD_DYNAMIC_BATCHING` joins up to.",
    )
    max_queue_delay_microseconds: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="With `BNFOLD_DYNAMIC_BATCHING`: how long a batch may wait for more rows while the model is busy.",
    )
    max_concurrency: int = Field(2, ge=1, description="Inferences computed at the same time, per process.")
    max_queue: int = Field(
        256, ge=0, description="Requests allowed to wait for a compute slot; beyond that the answer is 503."
    )
    retry_after_seconds: int = Field(1, ge=0, description="`Retry-After` sent with 503 answers.")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="Largest request body accepted (413 beyond).")
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A request body not received completely within this time is answered 408 (gRPC: a request "
        "message not complete this long after its HEADERS is DEADLINE_EXCEEDED).",
    )
    max_elements: int = Field(
        16 << 20, ge=1, description="Largest element count of one input tensor accepted (400 beyond)."
    )
    api_key: SecretStr | None = Field(
        None, description="When set, model and inference endpoints need `Authorization: Bearer <key>`."
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection that has not sent a complete request head this long after it opened or after its "
        "last answer is closed (slowloris); for gRPC, the HTTP/2 preface and the first call's HEADERS must come "
        "within it.",
    )
    idle_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="A keep-alive connection idle this long between requests is closed; a gRPC connection with no "
        "call open this long gets GOAWAY and is closed (clients reconnect on their next call).",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Open connections allowed per transport (REST, gRPC); 0: what the open-file limit "
        "(`ulimit -n`) leaves once the models are loaded, less 64, shared by the transports, at most 10000. Over it "
        "a new connection replaces the one waiting longest for a request, or, when all are busy, is refused: REST "
        "with 503, gRPC with GOAWAY (ENHANCE_YOUR_CALM).",
    )
    metrics_public: bool = Field(
        False,
        description="`true`: `/metrics` answers without the API key (for a scraper that cannot send one); by "
        "default it needs the key when `BNFOLD_API_KEY` is set, as the model endpoints do.",
    )
    graceful_shutdown_seconds: int = Field(
        30, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    reuse_large_buffers: bool = Field(
        True,
        description="Keep freed multi-megabyte request buffers for reuse (glibc malloc mmap threshold 32 MiB, trim "
        "threshold 64 MiB) instead of mapping fresh pages for every large request; no effect off glibc or when "
        "`MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` are set.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    ui: bool = Field(
        True, description="Serve the web page at `/` (the models at a glance; try them in a browser); `false`: 404."
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$",
        description="Name of the single model given by `BNFOLD_MODEL` (KServe passes the InferenceService name); "
        "unset: the file stem.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line on stderr (time, level, logger, message)."
    )

    @field_validator("providers", "load_models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        names = [p.lower() for p in value]
        unknown = [p for p in names if p not in PROVIDER_NAMES]
        if unknown or not names:
            raise ValueError(f"providers must be a list of {', '.join(PROVIDER_NAMES)}; got {value}")
        return names

    @model_validator(mode="after")
    def _model_control(self) -> Settings:
        if self.model_control_mode == "explicit" and self.repository_poll_seconds > 0:
            raise ValueError("explicit model control loads only what it is asked to: it polls no repository")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("load_models names the models an explicit model control mode starts with")
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError("explicit model control needs one worker: each worker process has models of its own")
        return self

    def ort_providers(self) -> list[str]:
        return [PROVIDER_NAMES[p] for p in self.providers]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``BNFOLD_*`` variables that name no setting. ValueError for one that is close to a setting's name (a typo,
    e.g. ``BNFOLD_MAX_QUEU``), naming that setting; the others are returned for the caller to warn about (the
    same shell may hold variables of the same prefix for other tools, e.g. docker compose's ``BNFOLD_IMAGE``)."""
    known = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in (os.environ if environ is None else environ) if k.upper().startswith("BNFOLD_"))
    unknown = [k for k in unknown if k.upper() not in known]
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        if close:
            raise ValueError(f"unknown setting {name}; did you mean {close[0]}?")
    return unknown


def settings_table() -> str:
    """The settings table of docs/serving.md (Markdown), generated from the fields above."""
    rows = ["| Variable | Default | What it does |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = ",".join(field.default_factory()) or "unset"  # type: ignore[call-arg]
        elif field.default is None:
            default = "unset"
        elif name == "model_repository":
            default = "bundled"
        else:
            default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        rows.append(f"| `BNFOLD_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows) + "\n"
