"""Stand-ins for a loaded model and its metrics, for the scheduler and batcher on a bare event loop (no server,
no ONNX Runtime): the model doubles its input ``x`` into ``y``, records every run's rows, and can hold a run at
the door (a gate) until the test lets it through."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.runtime.model_config import ModelConfig
from service.runtime.work import Work
from service.v2.tensors import Array, InferRequest, InferResult, TensorSpec

WAIT_SECONDS = 30.0  # a safety net only: every wait ends on an observable event long before


class Poisoned(Exception):
    """The stub model's failure on a row holding NaN (as a model fails on values validation cannot see)."""


@dataclass(eq=False)
class StubModel:
    """``y = 2·x``; each run's row count in ``runs``; ``hold()`` stops the next run until ``release()``."""

    name: str = "stub"
    version: str = "1"
    max_batch_size: int = 64
    output_names: list[str] = field(default_factory=lambda: ["y"])
    outputs_by_name: dict[str, TensorSpec] = field(default_factory=lambda: {"y": TensorSpec("y", "FP32", (-1, -1))})
    config: ModelConfig = field(default_factory=ModelConfig)
    runs: list[int] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0  # what the scheduler's admission counts, as on a loaded model
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    _gate: threading.Event | None = None  # the next run waits on it
    _held: bool = False

    def hold(self) -> None:
        self.entered.clear()
        self._gate = threading.Event()
        self._held = True

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    @property
    def session(self) -> StubModel:
        """The model is its own ONNX Runtime session: :func:`service.runtime.work.compute` calls :meth:`run`."""
        return self

    def run(self, names: list[str], feeds: dict[str, Array], run_options: Any) -> list[Array]:
        gate, self._held = (self._gate if self._held else None), False
        self.entered.set()
        if gate is not None:
            assert gate.wait(WAIT_SECONDS), "the test never released the held run"
        x = feeds["x"]
        self.runs.append(int(x.shape[0]))
        if np.isnan(x).any():
            raise Poisoned("NaN in the input")
        return [x * 2 for _ in names]


@dataclass
class StubBatchMetrics:
    sizes: list[int] = field(default_factory=list)

    def observe(self, rows: int, waits: list[float]) -> None:
        self.sizes.append(rows)


def first_array(result: InferResult) -> Array:
    """An encoder: the first output's array itself."""
    return result.outputs[0].array


def work(model: StubModel, x: Array, request_id: str | None = None) -> Work[Array]:
    """A validated request for ``model`` (validation is not under test here) whose answer is its ``y``."""
    request = InferRequest(inputs=[], id=request_id)
    return Work(model, request, {"x": x}, ["y"], first_array)  # type: ignore[arg-type]


@dataclass
class StubWork:
    """A work the scheduler runs: ``fn`` in the compute thread; records whether it was asked to stop."""

    fn: Any
    stopped: threading.Event = field(default_factory=threading.Event)
    stoppable_called: bool = False

    def __call__(self) -> Any:
        return self.fn(self)

    def stoppable(self) -> None:
        self.stoppable_called = True

    def stop(self) -> None:
        self.stopped.set()
