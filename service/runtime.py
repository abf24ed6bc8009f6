"""One loaded model: its ONNX Runtime session, what it accepts, and the blocking inference call.

Everything here runs in a worker thread (``LoadedModel.infer``) or at load time; the event loop never waits
on ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from converter import ConversionError, Report, convert
from converter.errors import first_line as _first_line
from service.codec import (
    DATATYPES,
    ORT_TO_V2,
    Array,
    InferRequest,
    InputTensor,
    OutputTensor,
    decode_binary_data,
    element_count,
    encode_response,
    parse_request,
)
from service.errors import BadRequest, ModelLoadError, ServiceError, Timeout
from service.settings import PROVIDER_NAMES, Settings

log = logging.getLogger("bnfold.service")

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelConfig(BaseModel):
    """``DIR/<name>/config.json``: every field optional."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(
        None,
        ge=0,
        description="Largest batch (first dim) accepted; 0: no batch dimension. Default 1 when the "
        "first dim is dynamic, else 0.",
    )
    labels: dict[str, list[str]] = Field(default_factory=dict, description="Class labels per output name.")
    providers: list[str] | None = Field(
        None, description="Execution providers for this model (overrides BNFOLD_PROVIDERS)."
    )
    fold_on_load: bool | None = Field(None, description="Overrides BNFOLD_FOLD_ON_LOAD for this model.")
    # How the web page turns a picture or a drawing into the input tensor: pixels read as 0..1, times scale,
    # then (x - mean[c]) / std[c]; layout says where the channels are. The service itself never applies them.
    scale: float | None = Field(None, description="Image inputs: factor for pixel values read as 0..1 (default 1).")
    mean: list[float] | None = Field(None, description="Image inputs: per-channel mean, subtracted after scale.")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Image inputs: per-channel standard deviation, divided by after the mean."
    )
    layout: Literal["NCHW", "NHWC"] | None = Field(None, description="Image inputs: where the channels are.")

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            first = str(exc).replace("\n", " ")[:300]
            raise ModelLoadError(f"{path}: invalid config ({first})") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dim

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class Timing:
    compute_seconds: float = 0.0


@dataclass
class Prepared:
    """A decoded request, validated against the model, ready to run."""

    request: InferRequest
    feeds: dict[str, Array]
    names: list[str]


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    providers: list[str]
    requested_providers: list[str]
    config: ModelConfig
    fold: Report | None = None
    load_seconds: float = 0.0
    _output_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._inputs_by_name = {t.name: t for t in self.inputs}
        self._outputs_by_name = {t.name: t for t in self.outputs}
        self._output_names = [t.name for t in self.outputs]

    @property
    def provider(self) -> str:
        """The provider that runs most of the graph: the first active one, short name."""
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        return next((k for k, v in PROVIDER_NAMES.items() if v == first), first)

    # -------------------------------------------------------------------------------------- metadata
    def metadata(self, versions: list[str]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }
        meta["bnfold"] = {
            "version": self.version,
            "providers": self.providers,
            "requested_providers": self.requested_providers,
            "max_batch_size": self.max_batch_size,
            "folded": _fold_summary(self.fold),
        }
        return meta

    def triton_config(self) -> dict[str, Any]:
        batched = self.max_batch_size > 0

        def dims(t: TensorSpec) -> list[int]:
            return list(t.shape[1:] if batched else t.shape)

        def entry(t: TensorSpec) -> dict[str, Any]:
            e: dict[str, Any] = {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)}
            if t.name in self.config.labels:
                e["label_filename"] = "config.json:labels"
            return e

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": self.max_batch_size,
            "input": [entry(t) for t in self.inputs],
            "output": [entry(t) for t in self.outputs],
            "bnfold": {
                "version": self.version,
                "labels": self.config.labels,
                "providers": self.providers,
                "requested_providers": self.requested_providers,
                "preprocessing": self.config.model_dump(include={"scale", "mean", "std", "layout"}, exclude_none=True),
            },
        }

    # ------------------------------------------------------------------------------------- inference
    def prepare(self, body: bytes, header_length: int | None, max_elements: int) -> Prepared:
        """Decode and validate a request body against this model (a client error raises BadRequest)."""
        if header_length == 0:
            request = self.raw_request(body, max_elements)
        else:
            request = parse_request(body, header_length, max_elements)
        feeds = self.validate(request)
        wanted = request.outputs
        names = self._output_names if wanted is None else [self._requested(o.name) for o in wanted]
        return Prepared(request, feeds, names)

    def execute(
        self, prepared: Prepared, run_options: ort.RunOptions | None, timing: Timing
    ) -> tuple[bytes, int | None]:
        """Run ONNX Runtime and encode the response (blocking: runs in a compute thread)."""
        request, names = prepared.request, prepared.names
        start = time.perf_counter()
        try:
            results = self.session.run(names, prepared.feeds, run_options)
        except ort_state.InvalidArgument as exc:
            raise BadRequest(f"model '{self.name}' rejected the inputs: {_first_line(exc)}") from None
        except ort_state.Fail as exc:
            if run_options is not None and run_options.terminate:
                raise Timeout(f"request timeout of {request.timeout_us} us expired during inference") from None
            raise ServiceError(f"inference failed: {_first_line(exc)}") from None
        finally:
            timing.compute_seconds = time.perf_counter() - start
        outputs = []
        wanted = request.outputs
        for i, (name, array) in enumerate(zip(names, results, strict=True)):
            spec = wanted[i] if wanted is not None else None
            binary = spec.binary if spec is not None else request.binary_output
            value = np.asarray(array)
            if spec is not None and spec.classification:
                value = self.classify(name, value, spec.classification)
            outputs.append(OutputTensor(name, value, binary))
        return encode_response(self.name, self.version, request.id, outputs)

    def _requested(self, name: str) -> str:
        if name not in self._outputs_by_name:
            expected = ", ".join(self._output_names)
            raise BadRequest(f"model '{self.name}' has no output '{name}' (outputs: {expected})")
        return name

    def raw_request(self, body: bytes, max_elements: int) -> InferRequest:
        """Triton's raw binary request: the whole body is the single input (batch 1); outputs binary."""
        if len(self.inputs) != 1:
            raise BadRequest(f"a raw binary request needs a single-input model; '{self.name}' has {len(self.inputs)}")
        spec = self.inputs[0]
        shape = [1 if (i == 0 and self.max_batch_size > 0 and d < 0) else d for i, d in enumerate(spec.shape)]
        if spec.datatype == "BYTES":
            shape = [1] * len(shape)
        unknown = [i for i, d in enumerate(shape) if d < 0]
        if len(unknown) > 1:
            raise BadRequest(f"a raw binary request cannot infer the shape {list(spec.shape)} of '{spec.name}'")
        if unknown and spec.datatype != "BYTES":
            known = int(np.prod([d for d in shape if d >= 0])) * DATATYPES[spec.datatype].itemsize
            if known == 0 or len(body) % known:
                raise BadRequest(f"raw body of {len(body)} bytes does not fit the shape {list(spec.shape)}")
            shape[unknown[0]] = len(body) // known
        dims, count = element_count(spec.name, shape, max_elements)
        array = decode_binary_data(spec.name, spec.datatype, dims, count, memoryview(body))
        return InferRequest(inputs=[InputTensor(spec.name, spec.datatype, dims, array)], binary_output=True)

    def validate(self, request: InferRequest) -> dict[str, Array]:
        """Names, datatypes, shapes and batch size of the request against the model."""
        feeds: dict[str, Array] = {}
        for tensor in request.inputs:
            spec = self._inputs_by_name.get(tensor.name)
            if spec is None:
                expected = ", ".join(self._inputs_by_name)
                raise BadRequest(f"model '{self.name}' has no input '{tensor.name}' (inputs: {expected})")
            if tensor.name in feeds:
                raise BadRequest(f"input '{tensor.name}' is given twice")
            if tensor.datatype != spec.datatype:
                raise BadRequest(
                    f"input '{tensor.name}' has datatype {tensor.datatype}, the model takes {spec.datatype}"
                )
            self._check_shape(spec, tensor.shape)
            feeds[tensor.name] = _as_text(tensor) if spec.datatype == "BYTES" else tensor.array
        missing = [n for n in self._inputs_by_name if n not in feeds]
        if missing:
            raise BadRequest(f"missing input(s) for model '{self.name}': {', '.join(missing)}")
        return feeds

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        if len(shape) != len(spec.shape):
            raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if axis == 0 and self.max_batch_size > 0:
                if not 1 <= got <= self.max_batch_size:
                    raise BadRequest(
                        f"input '{spec.name}' has batch size {got}; the model's max batch size is {self.max_batch_size}"
                    )
                if want >= 0 and got != want:
                    raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
            elif want >= 0 and got != want:
                raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
            elif want < 0 and got < 1:
                raise BadRequest(f"input '{spec.name}' has an empty dimension {axis} in shape {list(shape)}")

    def classify(self, name: str, array: Array, count: int) -> Array:
        """Triton's classification extension: top-``count`` as ``"value:index[:label]"`` BYTES."""
        if array.dtype.kind not in "iuf":
            raise BadRequest(f"output '{name}' is {array.dtype}; classification needs numbers")
        batched = self.max_batch_size > 0 and array.ndim > 0
        rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
        k = min(count, rows.shape[1])
        order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
        labels = self.config.labels.get(name, [])
        out = np.empty((rows.shape[0], k), dtype=object)
        for r in range(rows.shape[0]):
            for j, idx in enumerate(order[r]):
                text = f"{rows[r, idx]!s}:{idx}"
                if idx < len(labels):
                    text += f":{labels[idx]}"
                out[r, j] = text.encode()
        return out if batched else out.reshape(k)


# ------------------------------------------------------------------------------------------------ load
def load_model(name: str, version: str, path: Path, config: ModelConfig, settings: Settings) -> LoadedModel:
    """Fold (if asked and needed), create the session, check providers, warm up. Raises ModelLoadError."""
    start = time.perf_counter()
    fold_report: Report | None = None
    source: str | bytes = str(path)
    fold = settings.fold_on_load if config.fold_on_load is None else config.fold_on_load
    try:
        if fold and _has_batchnorm(path):
            result = convert(path, bn="fold")
            fold_report = result.report
            source = result.model.SerializeToString()
            log.info(
                "%s/%s: folded %d of %d BatchNorm(s)", name, version, len(fold_report.folded), len(fold_report.layers)
            )
    except ConversionError as exc:
        raise ModelLoadError(f"{path}: cannot fold: {exc}") from None
    requested = _providers(config, settings)
    if "CUDAExecutionProvider" in requested and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels: the provider library has no RUNPATH to them
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[settings.graph_optimization_level]
    options.intra_op_num_threads = settings.intra_op_threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(source, options, providers=requested)
    except Exception as exc:  # ORT raises several unrelated types for unreadable models
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {_first_line(exc)}") from None
    active = session.get_providers()
    missing = [p for p in requested if p not in active]
    if missing:
        text = f"{name}/{version}: providers {missing} are not active (active: {active})"
        if settings.provider_policy == "strict":
            raise ProviderError(text)
        log.warning("%s; serving with fallback", text)
    inputs = [_spec(a) for a in session.get_inputs()]
    outputs = [_spec(a) for a in session.get_outputs()]
    first_dynamic = bool(inputs) and all(len(t.shape) > 0 and t.shape[0] < 0 for t in inputs)
    max_batch = config.max_batch_size if config.max_batch_size is not None else (1 if first_dynamic else 0)
    if max_batch > 0 and not all(len(t.shape) > 0 for t in inputs):
        raise ModelLoadError(f"{path}: max_batch_size {max_batch} needs a batch dimension on every input")
    model = LoadedModel(
        name, version, path, session, inputs, outputs, max_batch, active, requested, config, fold_report
    )
    _warm_up(model, settings.warmup_runs)
    model.load_seconds = time.perf_counter() - start
    return model


def usable_cpus() -> int:
    """CPUs this process may run on (ONNX Runtime's own default counts the machine's, ignoring affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ProviderError(ModelLoadError):
    """``strict`` provider policy and a requested provider is not active: the server refuses to start."""


def _providers(config: ModelConfig, settings: Settings) -> list[str]:
    if config.providers is None:
        return settings.ort_providers()
    unknown = [p for p in config.providers if p.lower() not in PROVIDER_NAMES]
    if unknown:
        raise ModelLoadError(f"config providers {unknown} unknown (use {', '.join(PROVIDER_NAMES)})")
    return [PROVIDER_NAMES[p.lower()] for p in config.providers]


def _has_batchnorm(path: Path) -> bool:
    import onnx  # noqa: PLC0415  (only at load time)

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    return any(n.op_type == "BatchNormalization" for n in model.graph.node)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which the V2 protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def _warm_up(model: LoadedModel, runs: int) -> None:
    rng = np.random.default_rng(0)
    feeds: dict[str, Array] = {}
    for spec in model.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        dtype = DATATYPES[spec.datatype]
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        elif dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    for _ in range(runs):
        try:
            model.session.run(None, feeds)
        except Exception as exc:
            raise ModelLoadError(f"{model.path}: warm-up inference failed: {_first_line(exc)}") from None


def _as_text(tensor: InputTensor) -> Array:
    """ONNX string tensors hold UTF-8 text; ONNX Runtime takes them as Python str."""
    try:
        values = [v.decode() if isinstance(v, bytes) else v for v in tensor.array.ravel()]
    except UnicodeDecodeError:
        raise BadRequest(f"input '{tensor.name}': BYTES elements must be UTF-8 text for this model") from None
    return np.array(values, dtype=object).reshape(tensor.array.shape)


def _fold_summary(report: Report | None) -> dict[str, Any] | None:
    if report is None:
        return None
    v = report.verification
    return {
        "folded": [{"name": r.name, "into": r.into} for r in report.folded],
        "kept": [{"name": r.name, "reason": r.reason} for r in report.kept],
        "verification": None
        if v is None
        else {"passed": v.passed, "max_abs": max((o.max_abs for o in v.outputs), default=0.0)},
    }
