"""One loaded model version: its ONNX Runtime session, the tensors it takes and gives, its settings and its
requests in flight. A record that requests read; loading lives in :mod:`service.runtime.loading`, a request's
run against the model (checks, the ONNX Runtime call, outputs) in :mod:`service.runtime.work`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from service.settings import PROVIDER_NAMES
from service.v2.tensors import TensorSpec

if TYPE_CHECKING:
    from converter import Report
    from service.runtime.model_config import BatchPolicy, ModelConfig


@dataclass(eq=False)  # identity: a loaded version is one object (and a dict key, e.g. for its batcher)
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
    batching: BatchPolicy | None = None  # dynamic batching (service.runtime.batcher); None: each request runs alone
    samples: Path | None = None  # DIR/<name>/samples.npz: real inputs for fold verification and warm-up
    warmup_inputs: str = "seed 0 random inputs"
    quantization: str | None = None  # how the model is quantized (converter.quantize.describe); None: float
    inputs_by_name: dict[str, TensorSpec] = field(init=False)
    outputs_by_name: dict[str, TensorSpec] = field(init=False)
    output_names: list[str] = field(init=False)
    provider: str = field(init=False)  # the provider that runs most of the graph: the first active one, short name
    # admitted requests not yet answered, and set when there are none: the scheduler's admission counts them
    # (event loop only) and an unload waits for idle (drained)
    in_flight: int = field(default=0, init=False)
    idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self.inputs_by_name = {t.name: t for t in self.inputs}
        self.outputs_by_name = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        self.provider = next((k for k, v in PROVIDER_NAMES.items() if v == first), first)
        self.idle.set()

    async def drained(self) -> None:
        """Return once no admitted request of this version is in flight (an unload waits for this)."""
        await self.idle.wait()
