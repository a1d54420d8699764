"""The summary's text rows and headers, on hand-made results."""

from __future__ import annotations

import pytest

from tests.unit.tools.test_bench_report import make_cell
from tools.bench.report import summary_table, text_raw_table
from tools.bench.text import text_summary_rows
from tools.bench.textraw import SORTED, TextRawCell

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def text_results() -> dict:
    best = TextRawCell("intra2_spin", 64, 2500.0, 5.0, 150.0, 40, "CPUExecutionProvider", SORTED,
                       0.21, 25.6)
    return {"model": {"tag": "bench-lang-transformer:abc"}, "raw_best": best.to_dict(),
            "served": {"cells": [make_cell(conc=1), make_cell(conc=64)]},
            "floor": {"cells": [make_cell(conc=16), make_cell(conc=64, requests=40_000)]},
            "log_on": {"cells": [make_cell(conc=64, requests=8_000)]}}


def test_text_summary_rows_against_the_text_raw_best() -> None:
    rows = text_summary_rows(text_results())
    assert [r.what for r in rows] == [
        "bench-lang-transformer raw ORT in-process (intra2_spin, batch 64, sorted)",
        "bench-lang-transformer served", "bench-lang-transformer served",
        "bench-lang-transformer floor (CLF_RUNTIME=noop)",
        "bench-lang-transformer served, prediction log on"]
    assert rows[0].per_s == 2500.0 and rows[0].x_raw == 1.0
    assert rows[3].conc == 64 and rows[3].x_raw == pytest.approx((40_000 - 2) / 20 / 2500)
    assert rows[4].x_raw == pytest.approx((8_000 - 2) / 20 / 2500)


def test_summary_table_names_the_unit() -> None:
    text = summary_table(text_summary_rows(text_results()), unit="texts/s")
    assert text.splitlines()[0].startswith("| setup | c | req/s (texts/s) | x raw best |")


def test_text_raw_table_shows_order_padding_and_mean_call() -> None:
    cell = TextRawCell("intra1", 64, 2020.4, 7.15, 149.7, 32, "CPU", SORTED, 0.21, 31.7)
    assert "| intra1 | 64 | sorted | 2020 | 21% | 31.70 | 7.15 | 149.70 |" in text_raw_table([cell])


def test_method_line_says_which_cells_ran_with_the_log() -> None:
    """The summary's last line says every cell ran with the prediction log off but the log-on
    ones, and names the soak's too where the run had one (it serves with the log on)."""
    from tools.bench.__main__ import _summary

    base = {"machine": {"nproc": 2, "cpu_model": "cpu", "onnxruntime": "1.x"},
            "config": {"workers": 2, "duration_s": 10, "warmup_s": 3}}
    soak = {"table": "| t |", "conc": 16, "seconds": 300, "workers": 2}
    plain, soaked = _summary(base), _summary({**base, "soak": soak})
    assert plain.endswith('but the log-on ones runs with CLF_PREDICTION_LOG="".')
    assert "onnxruntime 1.x, CLF_WORKERS=2" in plain  # no provider measured: none named
    assert soaked.startswith("Soak (the prediction log on, c=16, 300 s per model")
    assert soaked.endswith('but the log-on ones and the soak\'s runs with CLF_PREDICTION_LOG="".')
