"""The text batcher's length grouping: padding bound, token cap, fairness, answers in order."""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import pytest

from service.batching import Batcher, _Item
from service.runtime import Outputs
from service.batching import SLACK_TOKENS, LengthPlanner, PadCollate, length_groups

PAD = 0


def _padding(lengths, group) -> float:
    longest = max(lengths[i] for i in group)
    padded = longest * len(group)
    return (padded - sum(lengths[i] for i in group)) / padded


@pytest.mark.parametrize("seed", range(5))
def test_groups_cover_every_text_once_within_the_token_cap_and_padding_bound(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 129, size=64)]
    groups = length_groups(lengths, max_tokens=2048, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(64))
    for group in groups:
        sizes = [lengths[i] for i in group]
        assert sizes == sorted(sizes)  # a run of the length-sorted order
        if len(group) > 1:
            assert max(sizes) * len(group) <= 2048
            assert _padding(lengths, group) <= 0.25 or max(sizes) - min(sizes) <= SLACK_TOKENS


def test_short_texts_do_not_ride_with_a_long_one():
    lengths = [10, 10, 120, 11, 12, 10]
    groups = length_groups(lengths, max_tokens=8192, max_padding=0.25)
    assert groups == [[0, 1, 5, 3, 4], [2]]


def test_the_token_cap_splits_equal_lengths_and_a_lone_long_text_is_still_served():
    assert length_groups([100] * 5, max_tokens=250, max_padding=0.5) == [[0, 1], [2, 3], [4]]
    assert length_groups([500], max_tokens=100, max_padding=0.5) == [[0]]


def test_close_lengths_share_a_call_even_over_the_padding_fraction():
    # 2 vs 6 tokens is 33% padding, but only 4 pad tokens: cheaper than a second call.
    assert length_groups([2, 6], max_tokens=8192, max_padding=0.25) == [[0, 1]]


def _items(lengths):
    return deque(_Item(np.arange(1, n + 1, dtype=np.int64), None) for n in lengths)


def test_the_planner_serves_the_oldest_text_first_and_requeues_the_rest_in_arrival_order():
    pending = _items([100, 5, 6, 98, 7])
    planner = LengthPlanner(max_tokens=8192, max_padding=0.25)
    first = planner(pending, 64)
    assert sorted(len(i.tensor) for i in first) == [98, 100]  # the oldest (100) and its peer
    assert [len(i.tensor) for i in pending] == [5, 6, 7]
    assert [len(i.tensor) for i in planner(pending, 64)] == [5, 6, 7] and not pending


def test_the_planner_looks_at_no_more_than_max_items():
    pending = _items([5] * 10)
    assert len(LengthPlanner(8192, 0.25)(pending, 4)) == 4 and len(pending) == 6


def test_collate_pads_each_call_to_its_own_longest_text():
    batch = PadCollate(pad_id=PAD)([np.array([7, 8, 9]), np.array([4])])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int64


class LengthEcho:
    """Row i answers [first id, real length, padded length]: checkable after grouping."""

    provider = "test"
    input_names = ("input_ids", "attention_mask")

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def run(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        self.shapes.append(ids.shape)
        n, width = ids.shape
        probs = np.stack([ids[:, 0], mask.sum(1), np.full(n, width)], axis=1).astype(np.float32)
        return Outputs(probs, np.zeros((n, 1), np.float32))


def test_mixed_lengths_from_concurrent_requests_come_back_in_request_order():
    model = LengthEcho()
    rng = np.random.default_rng(0)
    requests = [[int(n) for n in rng.integers(2, 120, size=int(k))] for k in rng.integers(1, 6, 30)]

    async def main():
        batcher = Batcher(model, max_batch_size=32, plan=LengthPlanner(2048, 0.25),
                          collate=PadCollate(PAD))
        batcher.start()

        async def one(r, lengths):
            rows = [np.full(n, 1000 * r + j, np.int64) for j, n in enumerate(lengths)]
            return await batcher.submit(rows)

        results = await asyncio.gather(*[one(r, lengths) for r, lengths in enumerate(requests)])
        await batcher.stop()
        return results

    results = asyncio.run(main())
    for r, (lengths, answers) in enumerate(zip(requests, results)):
        assert [int(p[0]) for p, *_ in answers] == [1000 * r + j for j in range(len(lengths))]
        assert [int(p[1]) for p, *_ in answers] == lengths
    assert max(n for n, _ in model.shapes) > 1  # texts shared calls
    assert all(n * width <= 2048 or n == 1 for n, width in model.shapes)
