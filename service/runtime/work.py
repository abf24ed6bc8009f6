"""One request's computation (:class:`Work`) and what computes it (:class:`Compute`).

:func:`prepare` checks a decoded request against its model (on the event loop, before it queues); the work
then runs in a compute thread: ONNX Runtime (:meth:`LoadedModel.run <service.runtime.model.LoadedModel.run>`),
the outputs as the request asked for them (:mod:`service.runtime.outputs`), and last the transport's encoder,
so the event loop never serializes a response. The scheduler runs one work at a time per thread; a batcher
reads ``feeds`` and ``outputs`` of several works, runs the model once on their concatenation and calls each
work's :meth:`Work.finish` on its own rows. Both implement :class:`Compute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import onnxruntime as ort

from service.runtime.model import Timing
from service.runtime.outputs import output_tensors
from service.runtime.validation import check_inputs, check_outputs
from service.v2.tensors import Array, Encoder, InferRequest, InferResult

if TYPE_CHECKING:
    from service.runtime.model import LoadedModel

T = TypeVar("T")


class Compute(Protocol):
    """What runs works: :class:`~service.runtime.scheduler.Scheduler` or :class:`~service.runtime.batcher.Batcher`."""

    async def run(self, work: Work[T], deadline: float | None) -> tuple[T, float]:
        """The work's encoded answer and the seconds it waited in the queue. ``deadline`` is a
        ``time.monotonic()`` value: a work still queued then is answered :class:`~service.errors.Timeout`."""
        ...


def prepare(model: LoadedModel, request: InferRequest, encode: Encoder[T]) -> Work[T]:
    """The work of a decoded request, after checking it against the model (:class:`BadRequest` if it does not fit)."""
    return Work(model, request, check_inputs(model, request), check_outputs(model, request), encode)


@dataclass
class Work(Generic[T]):
    """Validated feeds in, the transport's encoded answer out."""

    model: LoadedModel
    request: InferRequest
    feeds: dict[str, Array]
    outputs: list[str]
    encode: Encoder[T]
    run_options: ort.RunOptions | None = None
    timing: Timing = field(default_factory=Timing)

    def __call__(self) -> T:
        """Compute and encode (blocking: a compute thread)."""
        return self.finish(self.model.run(self.feeds, self.outputs, self.run_options, self.timing))

    def finish(self, arrays: list[Array]) -> T:
        """The computed ``outputs`` as the request asked for them (classification), then encoded."""
        model, request = self.model, self.request
        tensors = output_tensors(model, request, self.outputs, arrays)
        return self.encode(InferResult(model.name, model.version, request.id, tensors))

    def stoppable(self) -> None:
        """Let :meth:`stop` end a running computation early (ONNX Runtime's ``RunOptions.terminate``)."""
        self.run_options = ort.RunOptions()

    def stop(self) -> None:
        if self.run_options is not None:
            self.run_options.terminate = True
