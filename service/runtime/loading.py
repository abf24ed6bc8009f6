"""Loading one model version: fold BatchNorm (when asked), create the ONNX Runtime session under the provider
policy, read its tensors, warm it up. Runs at start-up and on repository rescans, never per request."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import ConversionError, Report, convert
from converter.errors import first_line
from converter.graph import all_graphs
from converter.quantize import describe
from service.errors import ModelLoadError
from service.runtime.batcher import check_batchable
from service.runtime.model import LoadedModel
from service.runtime.model_config import BatchPolicy, DynamicBatching, ModelConfig
from service.runtime.samples import SAMPLES_FILE, sample_feeds, samples_for
from service.settings import PROVIDER_NAMES, Settings
from service.v2.datatypes import DATATYPES, ORT_TO_V2
from service.v2.tensors import Array, TensorSpec

log = logging.getLogger("bnfold.service")

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def disable_telemetry() -> None:
    """ONNX Runtime's telemetry off for the process: a server has no business phoning home (and a read-only
    root complains)."""
    ort.disable_telemetry_events()


def load_model(name: str, version: str, path: Path, config: ModelConfig, settings: Settings) -> LoadedModel:
    """Fold (if asked and needed), create the session, check providers, warm up. Raises ModelLoadError."""
    start = time.perf_counter()
    fold_report: Report | None = None
    source: str | bytes = str(path)
    fold = settings.fold_on_load if config.fold_on_load is None else config.fold_on_load
    samples = samples_for(path)  # DIR/<name>/samples.npz: verify the fold on real inputs instead of random ones
    graph = _read_graph(path)
    quantization = describe(graph)  # a quantized model serves as it is; the page and metadata say so
    # If/Loop/Scan bodies too: the converter folds there as well
    has_batchnorm = any(n.op_type == "BatchNormalization" for g in all_graphs(graph.graph) for n in g.node)
    del graph
    try:
        if fold and has_batchnorm:
            result = convert(path, bn="fold", inputs=[samples] if samples else (), random=samples is None)
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
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {first_line(exc)}") from None
    active = session.get_providers()
    missing = [p for p in requested if p not in active]
    if missing:
        text = f"{name}/{version}: providers {missing} are not active (active: {active})"
        if settings.provider_policy == "strict":
            raise ProviderError(text)
        log.warning("%s; serving with fallback", text)
    inputs = [_spec(a) for a in session.get_inputs()]
    outputs = [_spec(a) for a in session.get_outputs()]
    max_batch = (
        config.max_batch_size if config.max_batch_size is not None else default_max_batch(inputs, outputs, settings)
    )
    if max_batch > 0 and not all(len(t.shape) > 0 for t in inputs):
        raise ModelLoadError(f"{path}: max_batch_size {max_batch} needs a batch dimension on every input")
    batching = _batch_policy(path, name, version, config, settings, inputs, outputs)
    model = LoadedModel(
        name,
        version,
        path,
        session,
        inputs,
        outputs,
        batching.max_batch_size if batching else max_batch,
        active,
        requested,
        config,
        fold_report,
        batching=batching,
    )
    model.samples = samples
    model.quantization = quantization
    _warm_up(model, settings.warmup_runs)
    model.load_seconds = time.perf_counter() - start
    return model


def default_max_batch(inputs: list[TensorSpec], outputs: list[TensorSpec], settings: Settings) -> int:
    """A model's max batch size when its config.json sets none, as Triton's auto-complete reads the ONNX dims: a
    dynamic first dim on every input and every output is a batch dim (``BNFOLD_MAX_BATCH_SIZE``); on the inputs
    only, batch 1 (how the outputs follow the batch is unknown); otherwise no batch dim (0)."""

    def dynamic_first(tensors: list[TensorSpec]) -> bool:
        return bool(tensors) and all(len(t.shape) > 0 and t.shape[0] < 0 for t in tensors)

    if dynamic_first(inputs):
        return settings.max_batch_size if dynamic_first(outputs) else 1
    return 0


def _batch_policy(
    path: Path,
    name: str,
    version: str,
    config: ModelConfig,
    settings: Settings,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
) -> BatchPolicy | None:
    """The model's dynamic batching, or None. Asked for in config.json: a model that cannot be batched exactly
    fails to load; asked for server-wide (BNFOLD_DYNAMIC_BATCHING): such a model serves unbatched."""
    if config.dynamic_batching is not None:
        size = config.max_batch_size if config.max_batch_size is not None else settings.max_batch_size
        check_batchable(path, inputs, outputs, size)
        return BatchPolicy.of(size, config.dynamic_batching)
    if not settings.dynamic_batching or config.max_batch_size == 0:
        return None
    size = config.max_batch_size if config.max_batch_size is not None else settings.max_batch_size
    try:
        check_batchable(path, inputs, outputs, size)
    except ModelLoadError as exc:
        log.info("%s/%s serves unbatched: %s", name, version, str(exc).removeprefix(f"{path}: "))
        return None
    delay = DynamicBatching(max_queue_delay_microseconds=settings.max_queue_delay_microseconds)
    return BatchPolicy.of(size, delay)


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


def _read_graph(path: Path) -> onnx.ModelProto:
    """The model without its external data: what it holds (BatchNorm? quantized?)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not an ONNX model ({first_line(exc)})") from None


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which the V2 protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def _warm_up(model: LoadedModel, runs: int) -> None:
    if model.samples is not None:  # the model's real inputs, one sample per run
        runs_on = sample_feeds(model.samples, [(t.name, t.datatype, t.shape) for t in model.inputs])
        model.warmup_inputs = f"{len(runs_on)} samples from {SAMPLES_FILE}"
    else:
        runs_on = [_random_feeds(model)]
    for i in range(runs):
        try:
            model.session.run(None, runs_on[i % len(runs_on)])
        except Exception as exc:
            raise ModelLoadError(f"{model.path}: warm-up inference failed: {first_line(exc)}") from None


def _random_feeds(model: LoadedModel) -> dict[str, Array]:
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
    return feeds
