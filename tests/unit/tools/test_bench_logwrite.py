"""The log-write bench runs end to end on a tiny log, and counts what it wrote."""

from __future__ import annotations

from tools.bench.logwrite import measure


def test_measure_writes_the_groups_and_counts_their_bytes() -> None:
    m = measure("uuid7", rows=50, group=2, commits=3)
    assert m["wall_us"] > 0 and m["user_us"] >= 0 and m["sys_us"] >= 0
    assert m["kb_per_commit"] >= 2 * 12.6  # two 12.6 KB inputs into the segment per commit
