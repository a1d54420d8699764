"""The paired log-cost bench's arithmetic: the rounds' ratios, their median and range."""

from __future__ import annotations

import math

import pytest

from tools.bench.logpair import Cell, main, make_log, ratios


def test_the_ratio_is_taken_per_round_then_the_median() -> None:
    # round 2's machine is twice as fast for both servers: per-round ratios stay 0.9, where
    # the ratio of the medians of each server's cells would not
    pairs = [(Cell(1000, 20, 0), Cell(900, 24, 0)), (Cell(2000, 10, 0), Cell(1800, 13, 0)),
             (Cell(1000, 20, 0), Cell(700, 30, 0))]
    median, low, high, p99 = ratios(pairs)
    assert (median, low, high) == pytest.approx((0.9, 0.7, 0.9))
    assert p99 == pytest.approx(1.3)


def test_a_cell_without_answers_or_p99_is_left_out() -> None:
    pairs = [(Cell(0, float("nan"), 5), Cell(500, 10, 0)), (Cell(1000, 0, 0), Cell(950, 11, 0))]
    median, low, high, p99 = ratios(pairs)
    assert (median, low, high) == pytest.approx((0.95, 0.95, 0.95))
    assert math.isnan(p99)  # neither round has a usable log-off p99


def test_the_pair_names_two_different_logs(capsys) -> None:
    for bad in ("off", "off,off", "off,mysql"):
        with pytest.raises(SystemExit):
            main(["--pair", bad])
        assert "--pair takes two different logs" in capsys.readouterr().err


def test_each_log_sets_what_its_server_needs(tmp_path) -> None:
    urls = iter(["postgresql://u@127.0.0.1:5/a", "postgresql://u@127.0.0.1:5/b"])
    off, lite = make_log("off", tmp_path, None), make_log("sqlite", tmp_path, None)
    assert dict(off.settings) == {"CLF_PREDICTION_LOG": ""} and off.count is None
    assert dict(lite.settings)["CLF_PREDICTION_LOG"] == str(tmp_path / "predictions.db")
    assert lite.count() == 0  # no file yet
    pg, journaled = (make_log(n, tmp_path, lambda: next(urls))
                     for n in ("postgresql", "postgresql-journal"))
    assert dict(pg.settings)["CLF_LOG_PG_JOURNAL"] == "false"
    assert dict(journaled.settings)["CLF_LOG_PG_JOURNAL"] == "true"
    assert dict(pg.settings)["CLF_PREDICTION_LOG"] != dict(journaled.settings)["CLF_PREDICTION_LOG"]
