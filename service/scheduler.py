"""Bounded concurrency for inference: a fixed pool of compute threads and a bounded wait queue.

A request is *admitted* before its body is read; when ``max_concurrency + max_queue`` requests are already
admitted the answer is 503 with ``Retry-After`` at once, so overload never turns into unbounded memory or
latency. Admitted requests wait (FIFO) for one of ``max_concurrency`` compute slots; the blocking work runs
in a thread, never on the event loop. A V2 ``timeout`` covers the wait and the computation: an expired wait
is answered 504, a running inference is stopped through ONNX Runtime's ``RunOptions.terminate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.errors import Timeout, Unavailable

T = TypeVar("T")


class Scheduler:
    def __init__(self, max_concurrency: int, max_queue: int, retry_after: int) -> None:
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency + max_queue
        self.retry_after = retry_after
        self.admitted = 0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="bnfold-infer")

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place for one request, or refuse with 503 when every place is taken."""
        if self.admitted >= self.limit:
            raise Unavailable(
                f"server busy: {self.admitted} requests in flight (limit {self.limit}); retry later",
                retry_after=self.retry_after,
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, fn: Callable[[], T], deadline: float | None, cancel: Callable[[], None]) -> tuple[T, float]:
        """Run ``fn`` in a compute thread; return its result and the seconds spent waiting for a slot.

        ``deadline`` is a ``time.monotonic()`` value; ``cancel`` asks a running ``fn`` to stop early.
        """
        start = time.monotonic()
        wait = None if deadline is None else max(0.0, deadline - start)
        try:
            await asyncio.wait_for(self._slots.acquire(), wait)
        except TimeoutError:
            raise Timeout(f"request timeout expired after waiting {wait or 0:.3f} s for a compute slot") from None
        queued = time.monotonic() - start
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, fn)
        except BaseException:
            self._slots.release()
            raise
        # the slot is free when the thread is done, even if this request was cancelled (client gone) meanwhile
        future.add_done_callback(lambda _: self._slots.release())
        timer = None
        if deadline is not None:
            timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), cancel)
        try:
            result = await asyncio.shield(future)
        finally:
            if timer is not None:
                timer.cancel()
        return result, queued

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
