"""The log-append bench runs each way on a tiny log, and each way logs every answer."""

from __future__ import annotations

import pytest

from monitoring.sqlite_log import SQLiteLog
from tools.bench.logappend import WAYS, answer_shape, measure, writer


@pytest.mark.parametrize("way", WAYS)
def test_each_way_logs_every_answer_of_the_batch(tmp_path, way: str) -> None:
    log = SQLiteLog(tmp_path / "p.db", journal=True, index_interval_s=0.01)
    try:
        writer(log, way, answer_shape("text"), 3)()
        assert log.count() == 3
    finally:
        log.close()


def test_measure_gives_a_cost_per_answer() -> None:
    assert measure("image", "batch", 2, n=3, reps=1) > 0
