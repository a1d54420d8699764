"""The bench's tables and per-request CPU breakdown, on hand-made measurements."""

from __future__ import annotations

import pytest

from tools.bench.cells import Cell
from tools.bench.cpu import CpuUse
from tools.bench.prometheus import BATCH_ITEMS, INFERENCE, PREPROCESS, QUEUE_WAIT, HistogramDelta
from tools.bench.raw import RawCell, best_cell, fastest_batch_call
from tools.bench.report import (SummaryRow, breakdown, breakdown_table, fmt, markdown_table,
                                raw_table, served_table, summary_row, summary_table)
from tools.bench.wrk import WrkResult

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def make_cell(conc: int = 64, requests: int = 10_000, seconds: float = 20.0, cpu_s: float = 30.0,
              pre_s: float = 5.0, infer_s: float = 12.0, items: float = 10_000, calls: float = 400,
              wait_s: float = 100.0, noise: float = 0.0) -> Cell:
    wrk = WrkResult(requests=requests, duration_s=seconds, non2xx=2,
                    socket_errors={"connect": 0, "read": 1, "write": 0, "timeout": 0},
                    percentiles_ms={"50": 60.0, "99": 120.0})
    cpu = CpuUse(seconds=seconds, server_cpu_s=cpu_s, wrk_cores=0.03, foreign_cores=noise,
                 steal_cores=0.0, system_busy_cores=1.9)
    hist = {PREPROCESS: HistogramDelta(pre_s, requests), INFERENCE: HistogramDelta(infer_s, calls),
            QUEUE_WAIT: HistogramDelta(wait_s, items), BATCH_ITEMS: HistogramDelta(items, calls)}
    return Cell(conc, wrk, cpu, hist, "", contaminated=noise > 0.25)


def test_fmt_prints_missing_values_as_a_dash() -> None:
    assert fmt(None) == "-"
    assert fmt(3.14159, ".2f") == "3.14"
    assert fmt(7, "d") == "7"


def test_markdown_table_aligns_numeric_columns_right() -> None:
    text = markdown_table(["name", ">n"], [["a", "1"], ["b", "22"]])
    assert text.splitlines() == ["| name | n |", "|---|---:|", "| a | 1 |", "| b | 22 |"]


def test_markdown_table_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["a", "b"], [["only one"]])


def test_cell_derived_numbers() -> None:
    c = make_cell()
    assert c.rps == pytest.approx((10_000 - 2) / 20)
    assert c.items_per_batch == pytest.approx(25.0)
    assert c.server_cpu_ms_per_request == pytest.approx(3.0)
    assert c.hist_mean_ms(PREPROCESS) == pytest.approx(0.5)
    assert c.ort_wall_ms_per_item == pytest.approx(1.2)
    assert c.wrk.errors == 3


def test_served_table_ratios_and_flags() -> None:
    cells = [make_cell(), make_cell(conc=16, noise=0.4)]
    text = served_table(cells, raw_best=1000.0, raw_b64_ms=40.0)
    lines = text.splitlines()
    assert len(lines) == 4
    row64 = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row64[:8] == ["64", "500", "0.50", "60.0", "120.0", "3.0x", "25.0", "3"]
    assert row64[8:11] == ["-", "1.50", "3.00"]
    assert lines[3].endswith("0.40 ⚠ |")


def test_served_table_without_a_yardstick_prints_dashes() -> None:
    row = served_table([make_cell()], raw_best=None, raw_b64_ms=None).splitlines()[2]
    assert "| - | 60.0 | 120.0 | - |" in row


def test_breakdown_with_floor_adds_up() -> None:
    model = make_cell(cpu_s=30.0, pre_s=5.0)  # 3.0 ms/req total, 0.5 ms preprocessing
    floor = make_cell(cpu_s=24.0, pre_s=4.0, requests=16_000)  # 1.5 ms/req, 0.25 ms preprocessing
    b = breakdown(model, floor, intra_op_threads=2)
    assert b.method == "floor-difference"
    assert b.total_ms == pytest.approx(3.0)
    assert b.preprocess_ms == pytest.approx(0.5)
    assert b.inference_ms == pytest.approx(1.5)
    assert b.http_ms == pytest.approx(1.25)
    assert b.residual_ms == pytest.approx(-0.25)  # floor preprocessing 0.25 vs 0.5 here
    assert b.inference_ort_ms == pytest.approx(2.4)  # 1.2 ms wall/item x 2 threads
    assert b.queue_wait_ms == pytest.approx(10.0)


def test_breakdown_without_floor_uses_ort_wall_times_threads() -> None:
    b = breakdown(make_cell(), None, intra_op_threads=1)
    assert b.method == "ort-wall-x-threads"
    assert b.inference_ms == pytest.approx(1.2)
    assert b.http_ms == pytest.approx(3.0 - 0.5 - 1.2)
    assert b.residual_ms == pytest.approx(0.0)


def test_breakdown_table_shows_shares_of_the_total() -> None:
    floor = make_cell(cpu_s=24.0, pre_s=4.0, requests=16_000)
    text = breakdown_table(breakdown(make_cell(), floor, 2))
    assert "| inference (ONNX Runtime) | 1.50 | 50% |" in text
    assert "| queue wait (wall, not CPU) | 10.00 |  |" in text


def test_raw_table_and_yardsticks() -> None:
    cells = [RawCell("intra2_spin", 1, 1100.0, 0.9, 1.3, 5000, "CPUExecutionProvider"),
             RawCell("intra2_spin", 64, 1400.0, 45.7, 52.0, 90, "CPUExecutionProvider"),
             RawCell("intra1", 64, 700.0, 91.4, 99.0, 45, "CPUExecutionProvider")]
    assert best_cell(cells).images_per_s == 1400.0
    assert fastest_batch_call(cells, 64).config == "intra2_spin"
    assert fastest_batch_call(cells, 8) is None
    assert "| intra1 | 64 | 700 | 91.40 | 99.00 |" in raw_table(cells)


def test_summary_rows_relate_to_their_own_models_raw_best() -> None:
    rows = [SummaryRow("raw", None, 1000.0, 1.0), summary_row("served", make_cell(), 1000.0),
            summary_row("other model", make_cell(conc=16, noise=0.5), 4000.0)]
    lines = summary_table(rows).splitlines()
    assert lines[2] == "| raw | - | 1000 | 1.00 | - | - | - | - | - |"
    assert lines[3] == "| served | 64 | 500 | 0.50 | 60.0 | 120.0 | 25.0 | 1.50 | 3.00 |"
    assert lines[4].startswith("| other model ⚠ | 16 | 500 | 0.12 |")


def test_floor_bound_is_the_two_costs_paid_in_turn() -> None:
    from tools.bench.report import bound_line, floor_bound

    assert floor_bound(1731.0, 3665.0) == pytest.approx(1175.7, abs=0.1)
    assert floor_bound(None, 3665.0) is None and floor_bound(1731.0, 0.0) is None
    line = bound_line("m", 1225.0, 1731.0, 3665.0, 64)
    assert line.startswith("m at c=64: raw best 1731/s and floor 3665 req/s allow")
    assert "= 1176 req/s (0.68 x raw); served 1225 req/s = 1.04 of that bound" in line
    assert bound_line("m", None, 1731.0, 3665.0, 64) is None


def test_tail_context_splits_a_p99_into_the_closed_loops_mean_and_its_tail() -> None:
    from tools.bench.report import tail_context, tail_line

    # the 2026-12-05 text cell: 64 connections at 2,336 req/s, p99 52.0 ms, floor p99 26.3 ms
    t = tail_context(64, 2336.2, 51.95, 26.3, 13.8)
    assert t["closed_loop_mean_ms"] == pytest.approx(27.39, abs=0.01)
    assert t["closed_loop_mean_x"] == pytest.approx(1.985, abs=0.001)
    assert t["p99_over_mean"] == pytest.approx(1.897, abs=0.001)
    assert t["floor_p99_x"] == pytest.approx(1.906, abs=0.001)
    assert tail_line(t) == ("the connections' mean latency at this rate (c / req/s) is 27.4 ms "
                            "= 2.0x the yardstick, the p99 1.90x that mean; the no-op floor's "
                            "p99 is 26.3 ms = 1.9x the yardstick")
    no_floor = tail_context(64, 2336.2, 51.95, None, 13.8)
    assert no_floor["floor_p99_x"] is None and "floor" not in tail_line(no_floor)
    assert tail_line(tail_context(64, 0.0, 51.95, None, 13.8)) is None


def test_a_cell_with_every_connection_on_one_worker_is_marked() -> None:
    from tools.bench.cells import _one_worker

    one, spread = make_cell(conc=16), make_cell(conc=16)
    one.conns_per_worker, spread.conns_per_worker = [16, 0], [15, 1]
    assert one.one_worker and not spread.one_worker
    assert _one_worker(one) and _one_worker(spread) is None
    c1 = make_cell(conc=1)
    c1.conns_per_worker = [1, 0]
    assert not c1.one_worker  # one connection cannot be spread
    assert not make_cell().one_worker  # not known: not marked
    row = served_table([one], None, None).splitlines()[2]
    assert "| 16+0 ⚖ |" in row
    assert summary_table([summary_row("s", one, 1000.0)]).splitlines()[2].startswith("| s ⚖ |")
