"""The text ceiling's pure parts: how the mix is cut into calls, padded and timed."""

from __future__ import annotations

import numpy as np
import pytest

from tools.bench.textraw import (ARRIVAL, SORTED, TextRawCell, make_feeds, padding_share,
                                 plan_calls, text_plans, time_cycle)

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)

LENGTHS = [5, 100, 3, 7, 128, 4]


def test_arrival_calls_keep_the_mix_order() -> None:
    assert plan_calls(LENGTHS, 4, ARRIVAL) == [[0, 1, 2, 3], [4, 5]]
    assert plan_calls(LENGTHS, 1, ARRIVAL) == [[i] for i in range(6)]


def test_sorted_calls_group_similar_lengths() -> None:
    calls = plan_calls(LENGTHS, 3, SORTED)
    assert calls == [[2, 5, 0], [3, 1, 4]]
    assert [LENGTHS[i] for c in calls for i in c] == sorted(LENGTHS)


def test_plan_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_calls(LENGTHS, 0, SORTED)
    with pytest.raises(ValueError):
        plan_calls(LENGTHS, 2, "random")


def test_padding_share_counts_slots_up_to_each_calls_longest() -> None:
    # arrival, batch 3: [5,100,3] -> 300 slots, 108 real; [7,128,4] -> 384 slots, 139 real
    assert padding_share(LENGTHS, plan_calls(LENGTHS, 3, ARRIVAL)) == pytest.approx(
        1 - 247 / 684)
    assert padding_share(LENGTHS, plan_calls(LENGTHS, 1, ARRIVAL)) == 0.0
    assert padding_share(LENGTHS, plan_calls(LENGTHS, 3, SORTED)) < padding_share(
        LENGTHS, plan_calls(LENGTHS, 3, ARRIVAL))
    assert padding_share([], []) == 0.0


def test_feeds_are_padded_to_each_calls_longest_with_a_mask() -> None:
    rows = [np.arange(1, n + 1, dtype=np.int64) for n in (2, 4, 1)]
    feeds = make_feeds(rows, [[0, 1], [2]], pad_id=0)
    assert feeds[0]["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert feeds[0]["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert feeds[1]["input_ids"].shape == (1, 1)
    assert feeds[0]["input_ids"].dtype == np.int64


def test_plans_cover_batch_one_once_and_larger_batches_both_ways() -> None:
    assert text_plans([1, 64]) == [(1, ARRIVAL), (64, SORTED), (64, ARRIVAL)]


def test_time_cycle_stops_after_whole_passes_and_counts_texts() -> None:
    feeds = [{"input_ids": np.zeros((n, 2))} for n in (3, 1, 2)]
    calls = []
    wall, lat, texts = time_cycle(lambda f: calls.append(len(f["input_ids"])), feeds,
                                  warmup_s=0.0, seconds=0.0)
    assert calls[-3:] == [3, 1, 2] and len(lat) == 3 and texts == 6
    assert wall >= 0 and (lat >= 0).all()


def test_text_cell_json_says_texts_per_second() -> None:
    cell = TextRawCell("intra1", 64, 2000.0, 5.0, 150.0, 10, "CPUExecutionProvider", SORTED,
                       0.2, 20.0)
    d = cell.to_dict()
    assert d["texts_per_s"] == 2000.0 and "images_per_s" not in d
    assert (d["order"], d["padding_share"], d["mean_ms"]) == (SORTED, 0.2, 20.0)
