"""The prediction-log cells: counting the log's rows, its temporary folder, and the on/off table."""

from __future__ import annotations

import sqlite3

import pytest

from tests.unit.tools.test_bench_report import make_cell
from tools.bench.predlog import count_rows, log_bytes, temp_log
from tools.bench.prometheus import LOG_COMMIT, HistogramDelta
from tools.bench.report import LogRow, log_rows, log_table

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def test_count_rows_is_zero_without_a_file_or_a_table(tmp_path) -> None:
    db = tmp_path / "p.db"
    assert count_rows(db) == 0
    sqlite3.connect(db).close()
    assert count_rows(db) == 0


def test_count_rows_reads_a_wal_log_while_a_writer_holds_it_open(tmp_path) -> None:
    db = tmp_path / "p.db"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY, x TEXT)")
    writer.executemany("INSERT INTO predictions (x) VALUES (?)", [("a",), ("b",), ("c",)])
    writer.commit()
    try:
        assert count_rows(db) == 3
        assert log_bytes(db) > 0
    finally:
        writer.close()


def test_temp_log_is_deleted_with_its_folder() -> None:
    with temp_log() as db:
        sqlite3.connect(db).close()
        assert db.exists() and db.name == "predictions.db"
        folder = db.parent
    assert not folder.exists()


def test_log_row_consistency_allows_the_answers_in_flight_when_wrk_stops() -> None:
    row = LogRow("text", 16, 1000.0, 900.0, 20.0, 30.0, rows=1010, ok=1000)
    assert row.consistent and row.on_off == pytest.approx(0.9)
    assert not LogRow("text", 16, 1.0, 1.0, 1.0, 1.0, rows=999, ok=1000).consistent  # lost
    assert not LogRow("text", 16, 1.0, 1.0, 1.0, 1.0, rows=1017, ok=1000).consistent
    assert not LogRow("text", 16, 1.0, 1.0, 1.0, 1.0, rows=None, ok=1000).consistent


def test_log_rows_pair_each_log_on_cell_with_log_off_at_the_same_c() -> None:
    off = [make_cell(conc=16, requests=20_000), make_cell(conc=64, requests=24_000)]
    on = make_cell(conc=64, requests=12_000)
    on.log_rows = 11_998 + 5
    on.hist[LOG_COMMIT] = HistogramDelta(sum=3.0, count=1000)
    rows = log_rows("image", off, [on, make_cell(conc=8)])
    assert [r.conc for r in rows] == [64, 8]
    r = rows[0]
    assert r.off_rps == pytest.approx((24_000 - 2) / 20) and r.on_rps == pytest.approx(
        (12_000 - 2) / 20)
    assert r.on_off == pytest.approx(11_998 / 23_998)
    assert (r.rows, r.ok, r.consistent) == (12_003, 11_998, True)
    assert r.rows_per_commit == pytest.approx(12.003) and r.commit_ms == pytest.approx(3.0)
    assert rows[1].off_rps is None and rows[1].on_off is None and rows[1].rows is None


def test_log_table_prints_both_counts_and_flags_a_mismatch() -> None:
    good = LogRow("image", 64, 1200.0, 1000.0, 80.0, 95.0, rows=20_010, ok=20_000, commits=800,
                  commit_ms=1.5)
    bad = LogRow("text", 16, 1500.0, 1400.0, 20.0, 25.0, rows=100, ok=28_000)
    lines = log_table([good, bad]).splitlines()
    assert lines[0].startswith("| task | c | log off req/s | log on req/s | on/off |")
    assert lines[2] == ("| image | 64 | 1200 | 1000 | 0.83 | 80.0 | 95.0 | 20010 | 20000 | +10 "
                        "| 25.0 | 1.50 |")
    assert "| 100 | 28000 | -27900 ✗ |" in lines[3]


def test_count_postgres_rows_counts_the_table_and_what_the_spool_holds_beyond_it(
        postgres_url, tmp_path) -> None:
    import time

    from monitoring.store import open_log
    from tests.unit.test_monitoring_store import record
    from tools.bench.predlog import count_postgres_rows

    spool = tmp_path / "spool"
    assert count_postgres_rows(postgres_url, spool) == 0  # no table yet
    log = open_log(postgres_url, spool_dir=spool, spool_retry_s=3600, journal=True)
    log.write_batch([record(f"r{i}", ts=time.time()) for i in range(3)])  # in the spool only
    assert count_postgres_rows(postgres_url, spool) == 3
    log.catch_up()  # now in the table, the spool file indexed to its end
    assert count_postgres_rows(postgres_url, spool) == 3
    log.write_batch([record("r3", ts=time.time())])
    assert count_postgres_rows(postgres_url, spool) == 4
    log.close()
    assert count_postgres_rows(postgres_url, spool) == 4
