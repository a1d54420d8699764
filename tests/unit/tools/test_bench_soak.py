"""The soak cell's table and verdict (tools/bench/soak.py) on hand-made samples, and what it
reads from /proc, without a server."""

from __future__ import annotations

import os

import pytest

from tools.bench.config import parse_config
from tools.bench.predlog import log_size, remove_log
from tools.bench.soak import (ProcSample, Sample, proc_sample, process_roles,
                              slope, soak_table, soak_verdict)

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)

ARBITER, W1, W2 = 100, 101, 102


def samples(worker1_mb, worker2_pid=W2, files=(30, 30)):
    """Five samples over 100 s, 20,000 answers apart; the arbiter flat at 140 MB."""
    out = []
    for i, rss in enumerate(worker1_mb):
        procs = {ARBITER: ProcSample(140.0, 20, 4), W1: ProcSample(rss, files[i > 0], 10),
                 worker2_pid if i >= 2 else W2: ProcSample(200.0, 30, 10)}
        out.append(Sample(25.0 * i, 20_000 * i, procs, 1_000_000 * i))
    return out


def test_slope_is_least_squares_and_needs_three_points():
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([0, 1, 2], [5, 5, 5]) == 0.0
    assert slope([0, 1], [0, 1]) is None
    assert slope([4, 4, 4], [1, 2, 3]) is None


def test_a_worker_that_levels_off_has_no_slope_once_settled():
    # warm-up: 180 -> 200 MB in the first fifth, then flat
    rows = samples([180.0, 200.0, 200.0, 200.0, 200.0])
    roles = process_roles(rows, ARBITER)
    assert roles == {ARBITER: "arbiter", W1: "worker 1", W2: "worker 2"}
    verdict = soak_verdict(rows, roles, errors=0)
    assert ("worker 1 (PID 101): RSS 180 MB at the start, 200 after the first 20%, 200 at the "
            "end: +0.00 MB per 100k answers since") in verdict
    assert "80,000 answers in 100 s, wrk errors 0; the prediction log grew 50 bytes an answer" \
        in verdict


def test_a_growing_worker_shows_its_rate_per_100k_answers():
    # 1 MB per 20,000 answers after warm-up = 5 MB per 100k
    verdict = soak_verdict(samples([180.0, 200.0, 201.0, 202.0, 203.0]), process_roles(
        samples([0] * 5), ARBITER), errors=3)
    assert "worker 1 (PID 101): RSS 180 MB at the start, 200 after the first 20%, 203 at the " \
        "end: +5.00 MB per 100k answers since" in verdict
    assert "wrk errors 3" in verdict


def test_a_worker_that_died_and_came_back_is_a_new_role_and_the_old_one_says_gone():
    rows = samples([180.0, 200.0, 200.0, 200.0, 200.0], worker2_pid=103)
    roles = process_roles(rows, ARBITER)
    assert roles[103] == "worker 3"
    verdict = soak_verdict(rows, roles, errors=0)
    assert "worker 2 (PID 102)" in verdict and "(gone before the end)" in verdict
    table = soak_table(rows, roles)
    assert "RSS MB (arbiter / worker 1 / worker 2 / worker 3)" in table
    assert "| 100 | 80,000 | 140 / 200 / - / 200 |" in table


def test_open_files_growth_is_in_the_verdict():
    verdict = soak_verdict(samples([200.0] * 5, files=(30, 31)), process_roles(
        samples([0] * 5), ARBITER), errors=0)
    assert "open files 31 -> 31, threads 10 -> 10" in verdict


def test_proc_sample_reads_this_process_and_none_for_a_gone_one():
    mine = proc_sample(os.getpid())
    assert mine is not None and mine.rss_mb > 10 and mine.threads >= 1 and mine.files >= 1
    assert proc_sample(2**22 + 12345) is None  # above pid_max's default: never a process


def test_log_size_counts_the_database_its_side_files_and_journal_folder(tmp_path):
    db = tmp_path / "soak.db"
    db.write_bytes(b"x" * 100)
    (tmp_path / "soak.db-wal").write_bytes(b"x" * 10)
    (tmp_path / "soak.db.journal").mkdir()
    (tmp_path / "soak.db.journal" / "w1").write_bytes(b"x" * 5)
    (tmp_path / "other.db").write_bytes(b"x" * 1000)
    assert log_size(db) == 115
    remove_log(db)
    assert log_size(db) == 0 and (tmp_path / "other.db").exists()


def test_the_soak_options():
    cfg = parse_config(["--task", "soak"])
    assert (cfg.tasks, cfg.soak_seconds, cfg.soak_conc, cfg.soak_every_s) == (
        ("soak",), 300.0, 16, 15.0)
    quick = parse_config(["--task", "soak", "--quick", "--soak-conc", "4"])
    assert (quick.soak_seconds, quick.soak_conc, quick.soak_every_s) == (20.0, 4, 4.0)
    with pytest.raises(SystemExit):
        parse_config(["--task", "soak", "--soak-conc", "0"])
