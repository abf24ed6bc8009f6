"""Dynamic batching: concurrent requests to one model run as one ONNX Runtime call, each answered on its own.

Triton's ``dynamic_batching`` semantics, opportunistic:

- a request that finds a free execution slot for its model (fewer than ``max_concurrency`` batches of this model
  running) and nothing queued before it runs at once, alone: no added latency when there is no concurrency;
- requests that arrive while the slots are busy queue; when a slot frees, the oldest queued request and every
  later one of the same *signature* (dtype and non-batch dims of every input, so concatenation is exact) join
  one batch of at most ``max_batch_size`` rows. When fewer rows than the preferred size are queued, the batch
  waits up to ``max_queue_delay_microseconds`` (counted from the oldest request's arrival) for more;
- each request keeps what is its own: its requested outputs (the batch computes their union), its parameters
  and id (its :class:`~service.runtime.work.Work` encodes its answer), its deadline (expired while queued: answered
  :class:`~service.errors.Timeout` and never computed; expired while its batch runs: answered at once, its rows
  discarded) and its cancellation (a client gone is dropped from the queue);
- a batch whose computation fails answers every member with the error; a failure while encoding one member's
  answer (e.g. its classification) fails that member only.

Exactness: every input and output of a batched model has a leading dynamic batch dimension (checked at load by
:func:`check_batchable`), and each row of a batched ONNX Runtime call is computed independently of the other rows
for the per-row models that qualify (no op mixes the batch axis), which the tests check against batch-of-one
answers. The queue lives on the event loop (no locks); the computation runs on the scheduler's compute threads,
so ``BNFOLD_MAX_CONCURRENCY`` still bounds the CPU used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from service.errors import Internal, ModelLoadError, Timeout
from service.runtime.work import Timing, Work, compute

if TYPE_CHECKING:
    from service.metrics import BatchMetrics
    from service.runtime.model import LoadedModel
    from service.runtime.model_config import BatchPolicy
    from service.runtime.scheduler import Scheduler
    from service.v2.tensors import TensorSpec

T = TypeVar("T")
log = logging.getLogger("bnfold.service")


def check_batchable(path: object, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int) -> None:
    """Refuse (one line, naming the tensor) a model that cannot be batched exactly."""
    if max_batch < 1:
        raise ModelLoadError(f"{path}: dynamic batching needs max_batch_size >= 1 (it is {max_batch})")
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] >= 0:
                dims = list(spec.shape) if spec.shape else "unknown"
                raise ModelLoadError(
                    f"{path}: dynamic batching needs a leading dynamic batch dimension on every input and output; "
                    f"{kind} '{spec.name}' has shape {dims}"
                )


@dataclass(eq=False)
class _Entry:
    work: Work[Any]
    future: asyncio.Future[tuple[Any, float]]
    enqueued: float
    deadline: float | None
    signature: tuple[Any, ...]
    rows: int
    timer: asyncio.TimerHandle | None = None
    queued: bool = True


@dataclass(eq=False)
class _Batch:
    entries: list[_Entry]
    started: float = 0.0
    timing: Timing = field(default_factory=Timing)


class Batcher:
    """One model's queue of requests waiting to be batched: a :class:`~service.runtime.work.Compute`."""

    def __init__(self, model: LoadedModel, policy: BatchPolicy, scheduler: Scheduler, metrics: BatchMetrics) -> None:
        self.model = model
        self.policy = policy
        self.scheduler = scheduler
        self.metrics = metrics
        self.slots = scheduler.max_concurrency  # batches of this model computed at the same time
        self.running = 0
        self._queue: list[_Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def run(self, work: Work[T], deadline: float | None) -> tuple[T, float]:
        """Queue ``work``; return its answer and the seconds it waited. A running batch is never stopped for one
        request's deadline (it serves others): the deadline answers that request instead."""
        loop = asyncio.get_running_loop()
        feeds = work.feeds
        first = next(iter(feeds.values()))
        signature = tuple((k, v.dtype.str, v.shape[1:]) for k, v in feeds.items())
        entry = _Entry(work, loop.create_future(), time.monotonic(), deadline, signature, int(first.shape[0]))
        if deadline is not None:
            entry.timer = loop.call_at(_loop_time(loop, deadline), self._expire, entry)
        self._queue.append(entry)
        self._dispatch()
        try:
            return await entry.future
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.queued:  # cancelled (client gone) or expired while queued: leave the queue
                entry.queued = False
                self._queue.remove(entry)

    # ------------------------------------------------------------------------------------ event loop side
    def _expire(self, entry: _Entry) -> None:
        if entry.future.done():
            return
        where = "in the queue" if entry.queued else "while its batch ran"
        waited = time.monotonic() - entry.enqueued
        entry.future.set_exception(Timeout(f"request timeout expired after {waited:.3f} s {where}"))

    def _dispatch(self) -> None:
        """Start batches while a slot is free and requests wait (or arm a timer to wait for more rows)."""
        while self.running < self.slots and self._queue:
            head = self._queue[0]
            same = [e for e in self._queue if e.signature == head.signature]
            rows = sum(e.rows for e in same)
            if self.running > 0 and self.policy.max_queue_delay > 0 and rows < self.policy.target(rows):
                due = head.enqueued + self.policy.max_queue_delay
                if time.monotonic() < due:
                    self._arm(due)
                    return
            batch = self._take(same)
            self.running += 1
            task = asyncio.ensure_future(self._execute(batch))
            self._tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(_loop_time(loop, due), self._dispatch)

    def _take(self, candidates: list[_Entry]) -> _Batch:
        taken: list[_Entry] = []
        rows = 0
        for entry in candidates:
            if rows + entry.rows > self.policy.max_batch_size:
                break
            taken.append(entry)
            rows += entry.rows
        for entry in taken:
            entry.queued = False
            self._queue.remove(entry)
        return _Batch(taken)

    async def _execute(self, batch: _Batch) -> None:
        try:
            outcomes, _ = await self.scheduler.submit(lambda: self._compute(batch), None, None)
        except BaseException as exc:  # the compute thread could not run it (shutting down)
            outcomes = [(False, exc)] * len(batch.entries)
        finally:
            self.running -= 1
        for entry, (ok, value) in zip(batch.entries, outcomes, strict=True):
            if entry.future.done():  # expired or cancelled meanwhile
                continue
            if ok:
                entry.future.set_result((value, batch.started - entry.enqueued))
            else:
                entry.future.set_exception(value)
        self._dispatch()

    # ------------------------------------------------------------------------------------ compute thread
    def _compute(self, batch: _Batch) -> list[tuple[bool, Any]]:
        """One ONNX Runtime call for every live member; per-member answers (ok, encoded answer or error).

        A batch whose run fails is run again member by member, so a request whose *values* make the model
        fail (validation cannot see those) gets its own error and never fails its neighbours.
        """
        batch.started = time.monotonic()
        live = [e for e in batch.entries if not e.future.done()]
        gone: tuple[bool, Any] = (False, Timeout("request ended before its batch ran"))
        outcomes: dict[int, tuple[bool, Any]] = {id(e): gone for e in batch.entries}
        if live:
            self.metrics.observe(sum(e.rows for e in live), [batch.started - e.enqueued for e in live])
            try:
                answers = self._run(live, batch.timing)
            except Exception as exc:
                if len(live) == 1:
                    answers = [(False, exc)]
                else:
                    log.info(
                        "%s/%s: a batch of %d failed (%s); running its members one by one",
                        self.model.name,
                        self.model.version,
                        len(live),
                        exc,
                    )
                    answers = [self._alone(e) for e in live]
            for entry, answer in zip(live, answers, strict=True):
                outcomes[id(entry)] = answer
        return [outcomes[id(e)] for e in batch.entries]

    def _alone(self, entry: _Entry) -> tuple[bool, Any]:
        self.metrics.observe(entry.rows, [])
        try:
            return self._run([entry], entry.work.timing)[0]
        except Exception as exc:
            return False, exc

    def _run(self, live: list[_Entry], timing: Timing) -> list[tuple[bool, Any]]:
        model = self.model
        first = live[0].work
        if len(live) == 1:
            feeds = first.feeds
        else:
            feeds = {name: np.concatenate([e.work.feeds[name] for e in live]) for name in first.feeds}
        wanted = {n for e in live for n in e.work.outputs}
        names = [n for n in model.output_names if n in wanted]
        arrays = dict(zip(names, compute(model, feeds, names, None, timing), strict=True))
        total = sum(e.rows for e in live)
        for name, array in arrays.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise Internal(f"output '{name}' has shape {list(array.shape)}, not {total} rows: cannot split it")
        results: list[tuple[bool, Any]] = []
        start = 0
        for entry in live:
            stop = start + entry.rows
            entry.work.timing.compute_seconds = timing.compute_seconds
            try:
                results.append((True, entry.work.finish([arrays[n][start:stop] for n in entry.work.outputs])))
            except Exception as exc:  # this member's encoding failed; its neighbours are unaffected
                results.append((False, exc))
            start = stop
        return results


def _loop_time(loop: asyncio.AbstractEventLoop, monotonic: float) -> float:
    """A ``time.monotonic()`` instant on the loop's clock (uvloop keeps its own clock, so convert by the offset)."""
    return loop.time() + (monotonic - time.monotonic())
