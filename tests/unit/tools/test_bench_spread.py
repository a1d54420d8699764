"""tools/bench/spread.py: the few-connection cell's summary and line, on hand-made cells."""

from __future__ import annotations

import pytest

from tools.bench.spread import spread_line, summarize

from .test_bench_report import make_cell

pytestmark = pytest.mark.tools


def _cell(conc: int, requests: int, per_worker: list[int] | None):
    cell = make_cell(conc=conc, requests=requests, seconds=10.0)
    cell.conns_per_worker = per_worker
    return cell


def test_a_spread_few_cell_against_the_many_one():
    s = summarize(_cell(4, 12_000, [3, 1]), _cell(64, 13_000, [33, 31]), workers=2)
    assert s["few"] == 4 and s["many"] == 64
    assert s["every_worker_serves"] is True and s["connections_per_worker"] == [3, 1]
    assert s["few_rps"] == pytest.approx(1199.8)
    assert s["few_vs_many"] == pytest.approx(0.923, abs=1e-3)
    s["reuseport"] = True
    line = spread_line("spread", s)
    assert "c=4: 1199.8 req/s, 0.92 x c=64's 1299.8" in line
    assert "conns/worker 3+1 (every worker serves; CLF_REUSEPORT=True)" in line


def test_one_worker_holding_every_connection_is_said():
    s = summarize(_cell(4, 6_000, [4, 0]), _cell(64, 13_000, [32, 32]), workers=2)
    assert s["every_worker_serves"] is False
    assert "NOT every worker serves" in spread_line("spread", s)


def test_missing_cells_and_unknown_owners():
    s = summarize(_cell(4, 6_000, None), None, workers=2)
    assert s["every_worker_serves"] is None and s["few_vs_many"] is None
    assert "who serves is unknown" in spread_line("spread", s)
    assert "no c=None cell" in spread_line("spread", summarize(None, None, workers=2))
