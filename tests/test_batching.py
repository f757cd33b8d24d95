"""Requests batched into model calls (fullstack_ml.runtime.batching): never held while the
model is idle, taken together while it is busy, each request getting its own outputs."""

import asyncio
import threading

import pytest

from fullstack_ml.runtime.batching import Batcher


class Model:
    """Doubles its inputs; a call blocks until `release` is set, so a test decides when the
    model is busy. Records each call's inputs."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.release.wait()
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_a_lone_request_runs_at_once_alone() -> None:
    model = Model()

    async def main() -> list[int]:
        return await Batcher(model, max_records=8)([1, 2, 3])

    assert asyncio.run(main()) == [2, 4, 6]
    assert model.calls == [[1, 2, 3]]


def test_requests_arriving_while_the_model_runs_share_the_next_call() -> None:
    model, sizes = Model(), []

    async def main() -> list[list[int]]:
        batcher = Batcher(model, max_records=4, on_batch=sizes.append)
        model.release.clear()
        first = asyncio.ensure_future(batcher([1]))
        await until(lambda: model.calls)  # the model is busy with [1]
        rest = [asyncio.ensure_future(batcher(r)) for r in ([2, 3], [4], [5, 6], [7])]
        await asyncio.sleep(0.01)
        model.release.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [[2], [4, 6], [8], [10, 12], [14]]
    # queued requests go whole, oldest first, while they fit in max_records
    assert model.calls == [[1], [2, 3, 4], [5, 6, 7]]
    assert sizes == [1, 3, 3]


def test_a_failing_call_fails_its_requests_only() -> None:
    model = Model()

    async def main() -> tuple:
        batcher = Batcher(model, max_records=2)
        model.release.clear()
        first = asyncio.ensure_future(batcher([1]))
        await until(lambda: model.calls)
        bad, later = asyncio.ensure_future(batcher([-1])), asyncio.ensure_future(batcher([4, 5]))
        await asyncio.sleep(0.01)
        model.release.set()
        return await asyncio.gather(first, bad, later, return_exceptions=True)

    first, bad, later = asyncio.run(main())
    assert first == [2] and later == [8, 10]
    assert isinstance(bad, ValueError)
    assert model.calls == [[1], [-1], [4, 5]]


def test_a_request_whose_client_left_is_not_computed() -> None:
    model = Model()

    async def main() -> list[int]:
        batcher = Batcher(model, max_records=8)
        model.release.clear()
        first = asyncio.ensure_future(batcher([1]))
        await until(lambda: model.calls)
        gone, kept = asyncio.ensure_future(batcher([2])), asyncio.ensure_future(batcher([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return [*await first, *await kept]

    assert asyncio.run(main()) == [2, 6]
    assert model.calls == [[1], [3]]
