"""One loaded model version: its ONNX Runtime session, the tensors it takes and gives, and the blocking call.

:meth:`LoadedModel.run` is the only place a request reaches ONNX Runtime; it runs in a compute thread (see
:mod:`service.runtime.scheduler`), never on the event loop. Loading lives in :mod:`service.runtime.loading`, checking a
request against the model in :mod:`service.runtime.validation`, shaping the outputs in :mod:`service.runtime.outputs`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from converter.errors import first_line
from service.errors import BadRequest, Internal, Timeout
from service.settings import PROVIDER_NAMES
from service.v2.tensors import Array, TensorSpec

if TYPE_CHECKING:
    from converter import Report
    from service.runtime.model_config import BatchPolicy, ModelConfig


@dataclass
class Timing:
    compute_seconds: float = 0.0


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
    in_flight: int = field(default=0, init=False)  # admitted requests not yet answered (event loop only)
    _drained: list[asyncio.Future[None]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.inputs_by_name = {t.name: t for t in self.inputs}
        self.outputs_by_name = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        self.provider = next((k for k, v in PROVIDER_NAMES.items() if v == first), first)

    def enter(self) -> None:
        """A request for this version was admitted (the dataplane's admission, on the event loop)."""
        self.in_flight += 1

    def leave(self) -> None:
        """That request was answered (or failed); the last one out wakes :meth:`drained`."""
        self.in_flight -= 1
        if self.in_flight == 0:
            for waiter in self._drained:
                if not waiter.done():
                    waiter.set_result(None)
            self._drained.clear()

    async def drained(self) -> None:
        """Return once no admitted request of this version is in flight (an unload waits for this)."""
        if self.in_flight > 0:
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter

    def run(
        self, feeds: dict[str, Array], names: list[str], run_options: ort.RunOptions | None, timing: Timing
    ) -> list[Array]:
        """ONNX Runtime on validated feeds (blocking). ``run_options.terminate`` set meanwhile: Timeout."""
        start = time.perf_counter()
        try:
            return self.session.run(names, feeds, run_options)  # type: ignore[no-any-return]
        except ort_state.InvalidArgument as exc:
            raise BadRequest(f"model '{self.name}' rejected the inputs: {first_line(exc)}") from None
        except ort_state.Fail as exc:
            if run_options is not None and run_options.terminate:
                raise Timeout("request timeout expired during inference") from None
            raise Internal(f"inference failed: {first_line(exc)}") from None
        finally:
            timing.compute_seconds = time.perf_counter() - start
