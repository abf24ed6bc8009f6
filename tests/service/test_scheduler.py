"""The scheduler on a bare event loop with stub work: admission, FIFO compute threads, deadlines, errors.

No server and no model: each test starts a :class:`Scheduler`, hands it stub works and waits for observable
events (a work entered, a gate released), never for time to pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.errors import Busy, Timeout
from service.runtime.scheduler import Scheduler
from tests.support.stub_work import WAIT_SECONDS, StubModel, StubWork


@asynccontextmanager
async def started(max_concurrency: int = 1, max_queue: int = 4) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(max_concurrency, max_queue, retry_after=3)
    scheduler.start()
    try:
        yield scheduler
    finally:
        await asyncio.to_thread(scheduler.close)


async def wait(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_SECONDS)


def test_admission_refuses_beyond_threads_plus_queue_and_gives_places_back() -> None:
    scheduler = Scheduler(2, 1, retry_after=7)  # no threads needed to count places
    a, b = StubModel(), StubModel()
    for model in (a, a, b):
        scheduler.admit(model)
    with pytest.raises(Busy) as refused:
        scheduler.admit(b)
    assert refused.value.retry_after == 7 and "limit 3" in refused.value.message
    assert (a.in_flight, b.in_flight) == (2, 1) and not a.idle.is_set()
    scheduler.release(b)
    assert b.in_flight == 0 and b.idle.is_set()  # an unload of b would go on now
    scheduler.admit(a)
    assert scheduler.admitted == 3 and a.in_flight == 3


def test_work_runs_in_a_compute_thread_and_answers_with_its_wait() -> None:
    async def main() -> tuple[Any, float]:
        async with started() as scheduler:
            return await scheduler.run(StubWork(lambda w: threading.current_thread().name), None)

    name, queued = asyncio.run(main())
    assert name.startswith("bnfold-infer-") and queued >= 0


def test_one_thread_takes_works_in_arrival_order() -> None:
    order: list[int] = []
    gate, entered = threading.Event(), threading.Event()

    def first(w: StubWork) -> None:
        entered.set()
        assert gate.wait(WAIT_SECONDS)

    async def main() -> None:
        async with started() as scheduler:
            blocker = asyncio.ensure_future(scheduler.run(StubWork(first), None))
            await wait(entered)  # the only thread is busy: the next works queue
            rest = [
                asyncio.ensure_future(scheduler.run(StubWork(lambda w, i=i: order.append(i)), None)) for i in range(5)
            ]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(blocker, *rest)

    asyncio.run(main())
    assert order == [0, 1, 2, 3, 4]


def test_a_work_still_queued_at_its_deadline_is_answered_timeout_without_running() -> None:
    gate, entered = threading.Event(), threading.Event()
    ran: list[bool] = []

    def first(w: StubWork) -> None:
        entered.set()
        assert gate.wait(WAIT_SECONDS)

    async def main() -> StubWork:
        async with started() as scheduler:
            blocker = asyncio.ensure_future(scheduler.run(StubWork(first), None))
            await wait(entered)
            late = StubWork(lambda w: ran.append(True))
            queued = asyncio.ensure_future(scheduler.run(late, time.monotonic()))  # expired when a thread gets it
            await asyncio.sleep(0)
            gate.set()
            await blocker
            with pytest.raises(Timeout, match="in the queue"):
                await queued
            return late

    late = asyncio.run(main())
    assert not ran and late.stoppable_called


def test_a_running_work_is_asked_to_stop_at_its_deadline() -> None:
    def until_stopped(w: StubWork) -> str:
        assert w.stopped.wait(WAIT_SECONDS), "the scheduler never asked the work to stop"
        return "stopped"

    async def main() -> str:
        async with started() as scheduler:
            answer, _ = await scheduler.run(StubWork(until_stopped), time.monotonic() + 0.01)
            return str(answer)

    assert asyncio.run(main()) == "stopped"


def test_no_deadline_means_no_stop_machinery() -> None:
    async def main() -> StubWork:
        async with started() as scheduler:
            w = StubWork(lambda w: None)
            await scheduler.run(w, None)
            return w

    w = asyncio.run(main())
    assert not w.stoppable_called and not w.stopped.is_set()


def test_an_exception_in_the_work_reaches_the_awaiting_request() -> None:
    def fails(w: StubWork) -> None:
        raise ValueError("bad values")

    async def main() -> None:
        async with started() as scheduler:
            with pytest.raises(ValueError, match="bad values"):
                await scheduler.run(StubWork(fails), None)
            answer, _ = await scheduler.run(StubWork(lambda w: "still serving"), None)
            assert answer == "still serving"

    asyncio.run(main())


def test_a_cancelled_request_does_not_break_the_thread_that_finishes_its_work() -> None:
    gate, entered = threading.Event(), threading.Event()

    def held(w: StubWork) -> str:
        entered.set()
        assert gate.wait(WAIT_SECONDS)
        return "nobody reads this"

    async def main() -> str:
        async with started() as scheduler:
            gone = asyncio.ensure_future(scheduler.run(StubWork(held), None))
            await wait(entered)
            gone.cancel()  # the client went away while its work runs
            with pytest.raises(asyncio.CancelledError):
                await gone
            gate.set()
            answer, _ = await scheduler.run(StubWork(lambda w: "next"), None)
            return str(answer)

    assert asyncio.run(main()) == "next"


def test_close_finishes_the_queued_works_then_stops_the_threads() -> None:
    done: list[int] = []

    async def main() -> Scheduler:
        scheduler = Scheduler(2, 8, retry_after=1)
        scheduler.start()
        futures = [
            asyncio.ensure_future(scheduler.run(StubWork(lambda w, i=i: done.append(i)), None)) for i in range(6)
        ]
        await asyncio.gather(*futures)
        await asyncio.to_thread(scheduler.close)
        return scheduler

    scheduler = asyncio.run(main())
    assert sorted(done) == list(range(6))
    assert not any(t.is_alive() for t in scheduler._threads)
