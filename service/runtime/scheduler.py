"""Bounded concurrency for inference: ``max_concurrency`` compute threads fed by one FIFO queue.

A request is *admitted* before its body is read; when ``max_concurrency + max_queue`` requests are already
admitted the answer is :class:`~service.errors.Busy` at once (REST 503 with ``Retry-After``), so overload
never turns into unbounded memory or latency (a body must also arrive within ``body_timeout_seconds``).
Admitted requests queue (FIFO) for the compute threads; the blocking work runs there, never on the event
loop. A deadline (V2 ``timeout``, gRPC deadline) covers the wait and the computation: a job still queued at
its deadline is answered :class:`~service.errors.Timeout` without running, a running inference is stopped
through ONNX Runtime's ``RunOptions.terminate``.

The threads are plain ones reading a ``queue.SimpleQueue`` and answering through ``call_soon_threadsafe``:
``run_in_executor`` plus an asyncio semaphore cost about twice as much per request, which on a small model
is several times the inference itself.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from service.errors import Busy, Timeout

if TYPE_CHECKING:
    from service.runtime.model import LoadedModel
    from service.runtime.work import Work

T = TypeVar("T")
log = logging.getLogger("bnfold.service")


@dataclass
class _Job(Generic[T]):
    fn: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[T, float]]
    enqueued: float
    deadline: float | None


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the request went away (cancelled) meanwhile
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Scheduler:
    """The admission count and the compute threads (from :meth:`start`): a :class:`~service.runtime.work.Compute`."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after: int) -> None:
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency + max_queue
        self.retry_after = retry_after
        self.admitted = 0
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the compute threads."""
        self._threads = [
            threading.Thread(target=self._work, name=f"bnfold-infer-{i}", daemon=True)
            for i in range(self.max_concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def admit(self, model: LoadedModel) -> None:
        """Take a place for one request to ``model``, or refuse (:class:`Busy`) when every place is taken;
        :meth:`release` it. The model counts it too: an unload of that version waits until it is released."""
        if self.admitted >= self.limit:
            raise Busy(
                f"server busy: {self.admitted} requests in flight (limit {self.limit}); retry later",
                retry_after=self.retry_after,
            )
        self.admitted += 1
        model.in_flight += 1
        model.idle.clear()

    def release(self, model: LoadedModel) -> None:
        self.admitted -= 1
        model.in_flight -= 1
        if not model.in_flight:
            model.idle.set()

    async def run(self, work: Work[T], deadline: float | None) -> tuple[T, float]:
        """Run one request's work in a compute thread; a running work is stopped at its deadline."""
        if deadline is None:
            return await self.submit(work, None, None)
        work.stoppable()
        return await self.submit(work, deadline, work.stop)

    async def submit(
        self, fn: Callable[[], T], deadline: float | None, cancel: Callable[[], None] | None
    ) -> tuple[T, float]:
        """Run ``fn`` in a compute thread; return its result and the seconds it waited in the queue.

        ``deadline`` is a ``time.monotonic()`` value; ``cancel`` asks a running ``fn`` to stop early.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[T, float]] = loop.create_future()
        self._jobs.put(_Job(fn, loop, future, time.monotonic(), deadline))
        if deadline is None or cancel is None:
            return await future
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), cancel)
        try:
            return await future
        finally:
            timer.cancel()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            started = time.monotonic()
            ok: bool = True
            value: Any = None
            if job.deadline is not None and started >= job.deadline:
                ok = False
                value = Timeout(f"request timeout expired after {started - job.enqueued:.3f} s in the queue")
            else:
                try:
                    value = (job.fn(), started - job.enqueued)
                except BaseException as exc:  # handed to the awaiting request, raised there
                    ok, value = False, exc
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, ok, value)
            except RuntimeError:  # the event loop is closed: shutting down
                log.debug("dropped an inference result after the event loop closed")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads after the jobs already queued."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)
