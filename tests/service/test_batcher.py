"""The batcher on a bare event loop with a stub model (``y = 2·x``) and a real scheduler of one thread.

Batches are made certain rather than timed: the stub model holds its first run at the door while the next
requests queue (each request is queued as soon as its task has run once), so the test knows which requests must
share the next run. Every answer is checked against its own rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from service.errors import Timeout
from service.runtime.batcher import Batcher
from service.runtime.model_config import BatchPolicy
from service.runtime.scheduler import Scheduler
from tests.support.stub_work import WAIT_SECONDS, Poisoned, StubBatchMetrics, StubModel, work


@asynccontextmanager
async def batching(
    model: StubModel, max_batch: int = 8, delay: float = 0.0, preferred: tuple[int, ...] = ()
) -> AsyncIterator[tuple[Batcher, StubBatchMetrics]]:
    scheduler = Scheduler(1, 16, retry_after=1)
    scheduler.start()
    metrics = StubBatchMetrics()
    try:
        yield Batcher(model, BatchPolicy(max_batch, delay, preferred), scheduler, metrics), metrics  # type: ignore[arg-type]
    finally:
        await asyncio.to_thread(scheduler.close)


def rows(i: int, n: int = 1, width: int = 3) -> np.ndarray:
    """Rows distinct per request, so a swapped answer cannot pass."""
    return (np.arange(n * width, dtype=np.float32).reshape(n, width) + 100 * i).astype(np.float32)


async def held_first(model: StubModel, batcher: Batcher) -> asyncio.Future[Any]:
    """A first request whose run is held: the one slot is busy until ``model.release()``."""
    model.hold()
    first = asyncio.ensure_future(batcher.run(work(model, rows(99)), None))
    assert await asyncio.to_thread(model.entered.wait, WAIT_SECONDS)
    return first


async def queued(batcher: Batcher, model: StubModel, inputs: list[np.ndarray], **kw: Any) -> list[asyncio.Future[Any]]:
    futures = [asyncio.ensure_future(batcher.run(work(model, x), kw.get("deadline"))) for x in inputs]
    await asyncio.sleep(0)  # each task runs up to its wait: all are queued now
    return futures


def test_a_request_alone_runs_at_once_by_itself() -> None:
    model = StubModel()

    async def main() -> Any:
        async with batching(model) as (batcher, _):
            return await batcher.run(work(model, rows(1, 2)), None)

    answer, waited = asyncio.run(main())
    np.testing.assert_array_equal(answer, rows(1, 2) * 2)
    assert model.runs == [2] and waited >= 0


def test_requests_queued_behind_a_busy_slot_share_one_run_and_each_gets_its_rows() -> None:
    model = StubModel()

    async def main() -> list[Any]:
        async with batching(model) as (batcher, metrics):
            first = await held_first(model, batcher)
            rest = await queued(batcher, model, [rows(1), rows(2, 2), rows(3)])
            model.release()
            answers = await asyncio.gather(first, *rest)
            assert metrics.sizes == [1, 4]
            return [a for a, _ in answers]

    answers = asyncio.run(main())
    assert model.runs == [1, 4]  # the held one alone, then one run of 1 + 2 + 1 rows
    for answer, x in zip(answers, [rows(99), rows(1), rows(2, 2), rows(3)], strict=True):
        np.testing.assert_array_equal(answer, x * 2)


def test_max_batch_size_splits_the_queue_into_runs() -> None:
    model = StubModel()

    async def main() -> None:
        async with batching(model, max_batch=2) as (batcher, _):
            first = await held_first(model, batcher)
            rest = await queued(batcher, model, [rows(i) for i in range(3)])
            model.release()
            await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert model.runs == [1, 2, 1]


def test_requests_of_different_shapes_never_share_a_run() -> None:
    model = StubModel()

    async def main() -> list[Any]:
        async with batching(model) as (batcher, _):
            first = await held_first(model, batcher)
            rest = await queued(batcher, model, [rows(1, width=3), rows(2, width=5), rows(3, width=3)])
            model.release()
            return [a for a, _ in await asyncio.gather(first, *rest)]

    answers = asyncio.run(main())
    assert model.runs == [1, 2, 1]  # the two width-3 requests together, the width-5 one alone
    np.testing.assert_array_equal(answers[2], rows(2, width=5) * 2)


def test_a_request_whose_deadline_passes_in_the_queue_is_answered_timeout_and_never_computed() -> None:
    model = StubModel()

    async def main() -> None:
        async with batching(model) as (batcher, _):
            first = await held_first(model, batcher)
            (late,) = await queued(batcher, model, [rows(1)], deadline=time.monotonic())
            with pytest.raises(Timeout, match="in the queue"):
                await late
            model.release()
            await first

    asyncio.run(main())
    assert model.runs == [1]  # only the held request ever ran


def test_a_cancelled_request_leaves_the_queue() -> None:
    model = StubModel()

    async def main() -> None:
        async with batching(model) as (batcher, _):
            first = await held_first(model, batcher)
            gone, stays = await queued(batcher, model, [rows(1, 3), rows(2)])
            gone.cancel()  # the client went away while queued
            with pytest.raises(asyncio.CancelledError):
                await gone
            model.release()
            await asyncio.gather(first, stays)

    asyncio.run(main())
    assert model.runs == [1, 1]  # the cancelled request's 3 rows were never computed


def test_a_failing_batch_is_rerun_member_by_member_so_only_the_bad_request_fails() -> None:
    model = StubModel()
    poisoned = rows(2)
    poisoned[0, 0] = np.nan

    async def main() -> list[Any]:
        async with batching(model) as (batcher, _):
            first = await held_first(model, batcher)
            rest = await queued(batcher, model, [rows(1), poisoned, rows(3)])
            model.release()
            return await asyncio.gather(first, *rest, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert model.runs == [1, 3, 1, 1, 1]  # the batch of three failed, then each alone
    assert isinstance(outcomes[2], Poisoned)
    np.testing.assert_array_equal(outcomes[1][0], rows(1) * 2)
    np.testing.assert_array_equal(outcomes[3][0], rows(3) * 2)


def test_an_encoding_failure_fails_that_request_only() -> None:
    model = StubModel()

    def refuse(result: Any) -> Any:
        raise ValueError("cannot encode this one")

    async def main() -> list[Any]:
        async with batching(model) as (batcher, _):
            first = await held_first(model, batcher)
            bad = work(model, rows(2))
            bad.encode = refuse
            futures = [
                asyncio.ensure_future(batcher.run(w, None)) for w in (work(model, rows(1)), bad, work(model, rows(3)))
            ]
            await asyncio.sleep(0)
            model.release()
            return await asyncio.gather(first, *futures, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert model.runs == [1, 3]  # one run for the three; only the encoding of one failed
    assert isinstance(outcomes[2], ValueError)
    np.testing.assert_array_equal(outcomes[3][0], rows(3) * 2)


def test_with_a_queue_delay_a_short_batch_waits_for_the_preferred_size() -> None:
    model = StubModel()

    async def main() -> None:
        # two slots: one held, one free; the queued single row waits (up to 60 s) for a preferred batch of 2
        scheduler = Scheduler(2, 16, retry_after=1)
        scheduler.start()
        batcher = Batcher(model, BatchPolicy(8, 60.0, (2,)), scheduler, StubBatchMetrics())  # type: ignore[arg-type]
        try:
            first = await held_first(model, batcher)
            (a,) = await queued(batcher, model, [rows(1)])
            assert model.runs == []  # waiting for a second row, not run alone on the free slot
            (b,) = await queued(batcher, model, [rows(2)])
            answers = await asyncio.gather(a, b)
            np.testing.assert_array_equal(answers[1][0], rows(2) * 2)
            model.release()
            await first
        finally:
            await asyncio.to_thread(scheduler.close)

    asyncio.run(main())
    assert model.runs == [2, 1]  # the pair as soon as it was complete; the held one after its release
