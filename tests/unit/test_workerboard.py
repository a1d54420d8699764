"""The worker board: each worker's requests in its models, shared through one mapped file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.workerboard import WorkerBoard


def test_a_request_is_alone_only_when_no_other_worker_or_request_is_under_way(
        tmp_path: Path) -> None:
    one, two = WorkerBoard(), WorkerBoard()  # two workers of one server
    one.open(str(tmp_path), 1, 2)
    two.open(str(tmp_path), 2, 2)
    try:
        one.enter()
        assert one.alone()
        two.enter()
        assert not one.alone() and not two.alone()  # each sees the other's request
        two.leave()
        assert one.alone()
        one.enter()  # a second request in the same worker
        assert not one.alone()
        one.leave()
        one.leave()
        assert one.count == 0 and not one.alone()  # no request: nothing asks
    finally:
        one.close()
        two.close()


def test_a_restarted_worker_clears_what_its_dead_predecessor_left(tmp_path: Path) -> None:
    dead, other = WorkerBoard(), WorkerBoard()
    dead.open(str(tmp_path), 1, 2)
    other.open(str(tmp_path), 2, 2)
    dead.enter()  # SIGKILLed with a request in flight: its count stays on the board
    other.enter()
    assert not other.alone()
    restarted = WorkerBoard()
    restarted.open(str(tmp_path), 1, 2)  # circus starts worker 1 again
    assert other.alone()
    for board in (restarted, other):
        board.close()


def test_without_a_directory_a_worker_counts_its_own_requests_only() -> None:
    board = WorkerBoard()
    board.open(None, None, 2)
    board.enter()
    assert board.alone()
    board.enter()
    assert not board.alone()


def test_workers_time_their_models_one_at_a_time(tmp_path: Path) -> None:
    """The start-up lock: a worker's warm-up and timings wait while another's run, so neither
    is measured with the other's start-up on the same cores."""
    one, two = WorkerBoard(), WorkerBoard()
    one.open(str(tmp_path), 1, 2)
    two.open(str(tmp_path), 2, 2)
    one.mark_loaded()
    two.mark_loaded()
    order: list[str] = []

    async def measure(board: WorkerBoard, name: str, hold_s: float) -> None:
        async with board.measuring():
            order.append(f"{name} in")
            await asyncio.sleep(hold_s)
            order.append(f"{name} out")

    async def main() -> None:
        first = asyncio.create_task(measure(one, "one", 0.2))
        await asyncio.sleep(0.05)  # one holds the lock
        await asyncio.gather(first, measure(two, "two", 0.0))

    try:
        asyncio.run(main())
        assert order == ["one in", "one out", "two in", "two out"]
    finally:
        one.close()
        two.close()


def test_without_a_directory_measuring_holds_no_lock() -> None:
    board = WorkerBoard()
    board.open(None, None, 2)

    async def main() -> bool:
        async with board.measuring():
            async with board.measuring():  # nothing to wait for
                return True

    assert asyncio.run(main())


def test_no_worker_times_its_models_while_another_still_loads(tmp_path: Path) -> None:
    """The first worker loaded used to time its calls while the second built its session."""
    one, two = WorkerBoard(), WorkerBoard()
    one.open(str(tmp_path), 1, 2)
    two.open(str(tmp_path), 2, 2)
    one.mark_loaded()
    assert one.others_loading() == [2] and two.others_loading() == [2]
    order: list[str] = []

    async def measure() -> None:
        async with one.measuring():
            order.append("one measures")

    async def load_two() -> None:
        await asyncio.sleep(0.2)
        order.append("two loaded")
        two.mark_loaded()

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(measure(), load_two()), 5)

    try:
        asyncio.run(main())
        assert order == ["two loaded", "one measures"]
        assert one.others_loading() == []
        restarted = WorkerBoard()
        restarted.open(str(tmp_path), 2, 2)  # circus starts worker 2 again: loading again
        assert one.others_loading() == [2]
        restarted.close()
        third = WorkerBoard()  # a worker whose index is past the count asks for more slots:
        third.open(str(tmp_path), 3, 2)  # the others' marks stay where they were
        two.mark_loaded()
        assert one.others_loading() == [] and third.others_loading() == []
        third.close()
    finally:
        one.close()
        two.close()


def test_a_worker_that_never_loads_delays_the_others_by_a_bound(tmp_path: Path, monkeypatch,
                                                                  caplog) -> None:
    from service import workerboard

    monkeypatch.setattr(workerboard, "LOAD_WAIT_S", 0.1)
    one, stuck = WorkerBoard(), WorkerBoard()
    one.open(str(tmp_path), 1, 2)
    stuck.open(str(tmp_path), 2, 2)
    one.mark_loaded()

    async def measure() -> bool:
        async with one.measuring():
            return True

    try:
        assert asyncio.run(asyncio.wait_for(measure(), 5))
        assert "worker(s) [2] still loading" in caplog.text
    finally:
        one.close()
        stuck.close()
